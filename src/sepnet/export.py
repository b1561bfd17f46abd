"""Export a trained classifier for deployment: ONNX with the compression kept (sepnet.deploy),
checked on onnxruntime; TorchScript; and a state dict whose mostly-zero tensors are stored
sparsely. Prints one line: bytes, multiply-adds, onnxruntime latency at batch 1 and 64.

    python -m sepnet.export logs/default/version_0/checkpoints/last.ckpt exports/default
    python -m sepnet.export CKPT OUT_DIR --batch 1 --fold auto     # folds chosen for batch-1 serving
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from sepnet.deploy import choose_folds, graph_macs, inference_copy, onnx_logits, ort_latency, to_onnx
from sepnet.guards import eval_mode
from sepnet.masks import parametrized_copy, remove_masks_

log = logging.getLogger(__name__)

__all__ = ["to_torchscript", "sparse_state_dict", "dense_state_dict", "export_network", "export_checkpoint"]


def to_torchscript(net: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Trace the plain model (pixels in [0, 1] in, logits out) in eval mode and save it. torch
    deprecates tracing for torch.export (the ONNX export's path); TorchScript stays as a format
    while torch ships it, its deprecation and tracer warnings silenced here: the factorized
    layers' paths are fixed before the trace (sepnet.deploy.choose_folds), and batch 2 makes the
    traced branches (see layers._mode_product) hold for every batch size."""
    with torch.no_grad(), eval_mode(net), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(net, torch.rand(2, *input_shape), check_trace=False)
    _atomic(lambda tmp: traced.save(str(tmp)), path)
    return path


_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack(value: Tensor) -> dict:
    """Non-zero bitmask (1 bit an entry) plus the non-zero values."""
    flat = value.reshape(-1)
    mask = flat != 0
    padded = torch.cat([mask, mask.new_zeros((-mask.numel()) % 8)]).view(-1, 8).to(torch.uint8)
    return {"shape": tuple(value.shape), "bits": (padded * _BITS).sum(1).to(torch.uint8),
            "values": flat[mask].clone()}


def _unpack(packed: dict) -> Tensor:
    numel = int(torch.tensor(packed["shape"]).prod()) if packed["shape"] else 1
    mask = ((packed["bits"].unsqueeze(1) & _BITS) != 0).view(-1)[:numel]
    flat = packed["values"].new_zeros(numel)
    flat[mask] = packed["values"]
    return flat.view(packed["shape"])


def sparse_state_dict(net: nn.Module, min_zero_fraction: float = 0.1) -> dict:
    """State dict in which every float tensor with at least `min_zero_fraction` zeros is stored
    as a bitmask and its non-zero values (1 bit + 4 bytes per non-zero instead of 4 bytes an
    entry: smaller from ~3% zeros on)."""
    out = {}
    for key, value in net.state_dict().items():
        if value.is_floating_point() and value.numel() and (value == 0).float().mean() >= min_zero_fraction:
            out[key] = _pack(value)
        else:
            out[key] = value
    return out


def dense_state_dict(state: dict) -> dict[str, Tensor]:
    """Inverse of `sparse_state_dict`: load_state_dict accepts the result."""
    return {k: (_unpack(v) if isinstance(v, dict) else v) for k, v in state.items()}


def _atomic(write, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def export_network(net: nn.Module, input_shape: tuple[int, ...], out_dir: Path, batch: int = 64,
                   fold: str = "auto", threads: int = 1, check_images: Tensor | None = None) -> dict:
    """model.onnx, model.torchscript.pt and state_dict.sparse.pt of `net` in `out_dir`, and
    export_report.json: the folds chosen (for `batch`), what the ONNX file stores and what
    onnxruntime computes, bytes (ONNX, gzipped, sparse state dict), multiply-adds per image on
    the exported graph, onnxruntime ms per image at batch 1 and 64 on `threads` threads, and the
    largest difference of the ONNX logits from the network's own (eval mode; on `check_images`,
    random images by default); a difference above 1e-4 (times 1 + |logit|) is an error."""
    deployed = inference_copy(net)
    folds = choose_folds(deployed, input_shape, batch, fold, threads)
    paths = {"onnx": out_dir / "model.onnx", "torchscript": out_dir / "model.torchscript.pt",
             "sparse_state_dict": out_dir / "state_dict.sparse.pt"}
    report = {"onnx": to_onnx(deployed, input_shape, paths["onnx"]),
              "folds": [vars(c) for c in folds], "fold_rule": fold, "fold_batch": batch}
    to_torchscript(deployed, input_shape, paths["torchscript"])
    plain = remove_masks_(parametrized_copy(net))  # the network's own keys: it loads into a freshly built one
    _atomic(lambda tmp: torch.save(sparse_state_dict(plain), tmp), paths["sparse_state_dict"])
    x = check_images if check_images is not None else torch.rand(64, *input_shape)
    training = net.training
    with torch.no_grad():  # against the network itself, not its inference copy: the copy's own errors count
        reference = net.eval()(x.float())
        gap = (onnx_logits(paths["onnx"], x, threads) - reference).abs()
    net.train(training)
    difference = float(gap.max())
    if not bool((gap <= 1e-4 * (1 + reference.abs())).all()):  # fp32: 1e-4, relative for large logits
        raise ValueError(f"ONNX export of {out_dir}: onnxruntime's logits differ from torch's by up to "
                         f"{difference:.3g}; expected at most 1e-4 (x (1 + |logit|))")
    onnx_bytes = paths["onnx"].read_bytes()
    report.update({
        "bytes": {"onnx": len(onnx_bytes), "onnx_gzip": len(gzip.compress(onnx_bytes, 9)),
                  "sparse_state_dict": paths["sparse_state_dict"].stat().st_size},
        "macs_per_image": graph_macs(paths["onnx"]),
        "onnxruntime_ms_per_image": {str(b): ort_latency(paths["onnx"], torch.rand(b, *input_shape), threads)
                                     for b in (1, 64)},
        "threads": threads, "max_logit_difference": difference, "checked_images": len(x),
        "files": {k: str(v) for k, v in paths.items()}})
    _atomic(lambda tmp: tmp.write_text(json.dumps(report, indent=2)), out_dir / "export_report.json")
    return report


def summary(report: dict) -> str:
    """The export's one line."""
    b, ms = report["bytes"], report["onnxruntime_ms_per_image"]
    folded = sum(c["folded"] for c in report["folds"])
    return (f"model.onnx {b['onnx'] / 1e6:.2f} MB ({b['onnx_gzip'] / 1e6:.2f} MB gzipped), "
            f"{report['macs_per_image'] / 1e6:.2f}M MACs/image, onnxruntime {ms['1']:.3f} ms/image at batch 1, "
            f"{ms['64']:.3f} at batch 64 ({report['threads']} thread{'s' * (report['threads'] > 1)}); "
            f"{folded}/{len(report['folds'])} factorized layers folded; logits within "
            f"{report['max_logit_difference']:.1e} of torch")


def export_checkpoint(ckpt: str, out_dir: str, batch: int = 64, fold: str = "auto", threads: int = 1) -> dict:
    """`export_network` of a Lightning checkpoint's network."""
    from sepnet.module import ImageClassifier

    path, out = Path(ckpt), Path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist: expected a .ckpt file")
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"export folder {out_dir}: {parent} is a file; expected a folder")
    try:
        model = ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a checkpoint, truncated, another model's ...
        raise ValueError(f"checkpoint {ckpt} is unreadable ({type(err).__name__}): expected a complete "
                         "Lightning .ckpt file of an ImageClassifier") from None
    return export_network(model.net, tuple(model.hparams.image_shape), out, batch, fold, threads)


def main(argv: list[str] | None = None) -> None:
    from sepnet.cli import fail

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="Lightning checkpoint of an ImageClassifier")
    parser.add_argument("out_dir", help="folder for model.onnx, model.torchscript.pt, state_dict.sparse.pt")
    parser.add_argument("--batch", type=int, default=64, help="the batch size the folds are chosen for")
    parser.add_argument("--fold", choices=("auto", "never", "always"), default="auto",
                        help="factorized layers folded into dense ones: where measured faster (auto), never, always")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the timings")
    args = parser.parse_args(argv)
    try:
        report = export_checkpoint(args.ckpt, args.out_dir, args.batch, args.fold, args.threads)
    except Exception as err:  # noqa: BLE001 -- one line, as run.py; SEPNET_DEBUG=1 re-raises
        fail(err)
    print(summary(report))


if __name__ == "__main__":
    main()
