"""The deployed model: an inference copy of a network, exported to ONNX with the compression kept,
and what onnxruntime makes of it (bytes, multiply-adds counted on the exported graph, latency).

- `inference_copy`: masks and parametrizations made permanent (pruned zeros in the weights,
  orthogonal factors and kernels as constants; an orthogonal sum of Kronecker terms divided by
  its norm as a constant), eval mode.
- `choose_folds`: every factorized layer stays its factor operations (mode products, TT
  contractions, the two convolutions of low rank / joint SVD) unless folding it into the dense
  layer it stands for is *measured* faster on onnxruntime for that layer at the export batch
  size (`fold="auto"`; or "never" / "always"). Each layer's path is fixed before the export, so
  the graph never holds a branch chosen by the tracing batch size, and the choices go into the
  export report.
- `to_onnx`: torch.export-based ONNX (opset 18), pixels in [0, 1] in, logits out, a dynamic batch
  axis, one file; weights that are mostly zeros (pruned) are stored as ONNX sparse initializers
  (COO), which onnxruntime densifies when it loads the model: the file shrinks, the arithmetic
  stays dense (microsoft/onnxruntime#5540: no kernel consumes sparse initializers).
- `graph_macs`, `ort_latency`, `session_memory`: the deployed cost.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sepnet.factorized import factorized_layers
from sepnet.layers import SeparableLinear
from sepnet.masks import parametrized_copy, remove_masks_

__all__ = ["inference_copy", "FoldChoice", "choose_folds", "to_onnx", "onnx_logits", "graph_macs", "ort_latency", "ort_latencies",
           "session_memory", "OPSET", "SPARSE_MIN_ZERO_FRACTION"]

OPSET = 18
# a dense weight above this many entries (64 MB in float32) is never folded: its factor operations stay
FOLD_MAX_ELEMENTS = 2 ** 24
# stored sparse (COO: int64 indices and values, 12 bytes a non-zero) where that beats 4 bytes an entry
SPARSE_MIN_ZERO_FRACTION = 0.7
Fold = Literal["auto", "never", "always"]


def inference_copy(net: nn.Module) -> nn.Module:
    """A copy of `net` for inference: eval mode, pruning masks and every other parametrization
    made permanent (their current values become plain parameters)."""
    net = remove_masks_(parametrized_copy(net)).eval()
    for m in list(net.modules()):
        if nn.utils.parametrize.is_parametrized(m):
            for name in list(m.parametrizations.keys()):
                nn.utils.parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    for m in net.modules():  # once every factor is a plain tensor (a layer's factors are its children's)
        if isinstance(m, SeparableLinear):
            m.freeze_normalization_()  # an orthogonal sum of R > 1 terms: its norm a constant
    return net.requires_grad_(False)


@dataclass(frozen=True)
class FoldChoice:
    """One factorized layer's path in the export: `folded` into its dense layer or kept as its
    factor operations; the onnxruntime latencies (ms, at `batch`) that decided it, where measured."""

    layer: str
    kind: str
    folded: bool
    batch: int
    factors_ms: float | None = None
    folded_ms: float | None = None


def _layer_inputs(net: nn.Module, names: Sequence[str], x: Tensor) -> dict[str, Tensor]:
    inputs, handles = {}, []

    def record(name: str, args: tuple) -> None:
        inputs.setdefault(name, args[0].detach())

    for name in names:
        handles.append(net.get_submodule(name).register_forward_pre_hook(lambda _, a, n=name: record(n, a)))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return inputs


def choose_folds(net: nn.Module, input_shape: Sequence[int], batch: int = 64, fold: Fold = "auto",
                 threads: int = 1, repeats: int = 20) -> list[FoldChoice]:
    """Decide, and apply in place, each outermost factorized layer's path (see the module
    docstring); `net` should be an `inference_copy`. "auto" times the layer alone in onnxruntime,
    both ways (its factor operations with its per-call rule switched off, and its folded dense
    layer; the runs alternated), on its own input at `batch` images (medians of `repeats` after
    warm-up; on 1 thread in CPU time, so a busy machine's preemptions do not decide it). A layer
    whose dense weight has over FOLD_MAX_ELEMENTS entries is never folded ("always" included)."""
    if fold not in ("auto", "never", "always"):
        raise ValueError(f"fold {fold!r}: expected 'auto', 'never' or 'always'")
    layers = dict(factorized_layers(net))
    inputs = _layer_inputs(net, list(layers), torch.rand(batch, *input_shape)) if fold == "auto" else {}
    choices = []
    for name, layer in layers.items():
        if layer.dense_parameters() > FOLD_MAX_ELEMENTS:  # e.g. an MLP's (3, 32, 32) -> (32, 32, 32) layer: 4 GB dense
            layer.implied_path = "never"
            choices.append(FoldChoice(name, type(layer).__name__, False, batch))
            continue
        folded_layer = layer.folded()
        if fold == "auto":
            x = inputs[name]
            path, layer.implied_path = layer.implied_path, "never"  # time the factor operations, not
            try:                                                     # the layer's own per-call rule
                factors = _export_bytes(layer, x)
            finally:
                layer.implied_path = path
            clock = time.thread_time if threads == 1 else time.perf_counter  # CPU time: immune to preemption
            factors_ms, folded_ms = (ms * len(x) for ms in ort_latencies(
                [factors, _export_bytes(folded_layer, x)], x, threads, repeats, clock))
            folded = folded_ms < factors_ms
        else:
            factors_ms = folded_ms = None
            folded = fold == "always"
        if folded:
            _replace(net, name, folded_layer)
        else:
            layer.implied_path = "never"  # the factor operations, whatever the batch
        choices.append(FoldChoice(name, type(layer).__name__, folded, batch, factors_ms, folded_ms))
    return choices


def _replace(net: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, layer)


def _export(net: nn.Module, x: Tensor, dynamic: bool = True):
    """torch.onnx's torch.export-based exporter; `dynamic`: with a dynamic batch axis (dim 0 of
    the input), else for x's shape alone."""
    shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress and deprecation chatter
        program = torch.onnx.export(net, (x,), dynamo=True, opset_version=OPSET, dynamic_shapes=shapes,
                                    input_names=["pixels"], output_names=["logits"], verbose=False)
    return program.model_proto


def _export_bytes(module: nn.Module, x: Tensor) -> bytes:
    """One layer for timing at x's batch: no dynamic axis needed (nor always traceable alone)."""
    return _export(module, x, dynamic=False).SerializeToString()


def _sparsify(model) -> list[str]:
    """Initializers with at least SPARSE_MIN_ZERO_FRACTION zeros become sparse initializers (COO
    with flat int64 indices); returns their names."""
    import onnx
    from onnx import helper, numpy_helper

    keep, sparse = [], []
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.size >= 64 and a.dtype.kind == "f" and (a == 0).mean() >= SPARSE_MIN_ZERO_FRACTION:
            flat = a.reshape(-1)
            idx = np.flatnonzero(flat)
            sparse.append(helper.make_sparse_tensor(numpy_helper.from_array(flat[idx], init.name),
                                                    numpy_helper.from_array(idx.astype(np.int64), f"{init.name}.indices"),
                                                    list(a.shape)))
        else:
            keep.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.sparse_initializer.extend(sparse)
    onnx.checker.check_model(model)
    return [s.values.name for s in sparse]


def to_onnx(net: nn.Module, input_shape: Sequence[int], path: Path) -> dict:
    """Export the plain network (pixels in [0, 1] in, logits out; an `inference_copy` with its
    folds chosen) to one ONNX file at `path`, mostly-zero weights as sparse initializers. Returns
    what the file stores."""
    import onnx

    model = _export(net, torch.rand(2, *input_shape))
    sparse = _sparsify(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(tmp))
    tmp.replace(path)
    return {"opset": OPSET, "sparse_initializers": sparse,
            "stores": (f"{len(sparse)} mostly-zero weight tensors as sparse initializers (COO), the rest dense"
                       if sparse else "every weight dense"),
            "computes": ("dense: onnxruntime densifies sparse initializers when it loads the model"
                         if sparse else "dense")}


def _session(model: bytes | str | Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, (str, Path)) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_logits(model: bytes | str | Path, x: Tensor, threads: int = 1, batch: int = 500) -> Tensor:
    """The ONNX model's outputs on x, in chunks of `batch`."""
    session = _session(model, threads)
    name = session.get_inputs()[0].name
    return torch.cat([torch.from_numpy(session.run(None, {name: chunk.numpy()})[0])
                      for chunk in x.float().split(batch)])


def ort_latency(model: bytes | str | Path, x: Tensor, threads: int = 1, repeats: int = 20) -> float:
    """onnxruntime CPU latency in ms per image on the batch x: median of `repeats` runs after
    three of warm-up."""
    session = _session(model, threads)
    feed = {session.get_inputs()[0].name: x.float().numpy()}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / len(x)


def ort_latencies(models: Sequence[bytes | str | Path], x: Tensor, threads: int = 1, repeats: int = 20,
                  clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """ort_latency of several models on the batch x, their runs alternated (one run of each in
    turn), so that a change in the machine's load falls on all of them alike. `clock`:
    time.thread_time measures this thread's CPU time instead of the wall clock -- the work of a
    1-thread session, which runs its kernels on the calling thread, without the time the thread
    spent preempted (what decides a fold on a busy machine)."""
    sessions = [_session(m, threads) for m in models]
    feeds = [{s.get_inputs()[0].name: x.float().numpy()} for s in sessions]
    for _ in range(3):
        for session, feed in zip(sessions, feeds):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for session, feed, own in zip(sessions, feeds, times):
            start = clock()
            session.run(None, feed)
            own.append(clock() - start)
    return [1e3 * statistics.median(own) / len(x) for own in times]


def session_memory(model: str | Path, input_shape: Sequence[int], batch: int, threads: int = 1) -> int:
    """Peak resident memory (bytes) of a fresh process that loads the model into an
    onnxruntime session and runs one batch: measured in a child process, so each model's figure
    is its own: the child's VmHWM, the high-water mark of its own address space. (Not
    getrusage's ru_maxrss: Linux carries the forking parent's peak across exec into it.)"""
    import subprocess
    import sys

    code = ("import numpy as np, onnxruntime as ort\n"
            "o = ort.SessionOptions(); o.intra_op_num_threads = {t}; o.log_severity_level = 3\n"
            "s = ort.InferenceSession({p!r}, o, providers=['CPUExecutionProvider'])\n"
            "s.run(None, {{s.get_inputs()[0].name: np.random.rand({b}, {shape}).astype(np.float32)}})\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])\n").format(
        t=threads, p=str(model), b=batch, shape=", ".join(map(str, input_shape)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024  # kilobytes on Linux


def graph_macs(model: bytes | str | Path) -> int:
    """Multiply-adds per image counted on the ONNX graph (Conv, Gemm, MatMul, Einsum-free graphs
    as torch.onnx writes them), with the batch set to 1 and shapes inferred by onnx."""
    import onnx
    from onnx import numpy_helper, shape_inference

    m = onnx.load(str(model)) if isinstance(model, (str, Path)) else onnx.load_from_string(model)
    # shape inference takes no sparse initializers: dense stand-ins of their shapes (only shapes count)
    m.graph.initializer.extend(numpy_helper.from_array(np.zeros(list(t.dims), np.float32), t.values.name)
                               for t in m.graph.sparse_initializer)
    del m.graph.sparse_initializer[:]
    for value in m.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    m = shape_inference.infer_shapes(m, data_prop=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in
              [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    shapes.update({i.name: list(i.dims) for i in m.graph.initializer})
    total = 0
    for node in m.graph.node:
        if node.op_type == "Conv":
            w, y = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w and y and all(y):
                total += math.prod(y) * math.prod(w[1:])  # every output entry: C_in / groups x kH x kW
        elif node.op_type in ("MatMul", "Gemm"):
            a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a and y and all(a) and all(y):
                transposed = node.op_type == "Gemm" and any(att.name == "transA" and att.i for att in node.attribute)
                total += math.prod(y) * (a[-2] if transposed else a[-1])
    return int(total)
