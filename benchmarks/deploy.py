"""Deployment size and CPU latency: dense vs separable models, measured in the same run.

    python -m benchmarks.deploy

For each model: TorchScript file size, sparse state-dict size (bitmask format of sepnet.export),
and median CPU latency of the TorchScript model at batch 1 and 64 (2 threads here). The dense
models' FC part is also shown magnitude-pruned (torch.nn.utils.prune) to the separable head's
parameter count, as the pruning baseline stores it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from sepnet.measures import fc_parameter_counts, parameter_counts
from sepnet.export import sparse_state_dict, to_torchscript
from sepnet.module import ImageClassifier

FAMILIES = {
    "vgg16/4": (dict(backbone="vgg16", backbone_kwargs={"width": 0.25}, head="dense"),
                dict(backbone="vgg16", backbone_kwargs={"width": 0.25}, head="separable")),
    "vgg16": (dict(backbone="vgg16", head="dense"), dict(backbone="vgg16", head="separable")),
    "mlp": (dict(backbone="mlp", head="dense", head_kwargs={"hidden": [512]}),
            dict(backbone="mlp", head="separable")),
}
def latency_ms(module, batch: int, repeats: int = 20) -> float:
    x = torch.rand(batch, 3, 32, 32)
    with torch.no_grad():
        for _ in range(3):
            module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[repeats // 2]


def prune_fc(net: nn.Module, keep: int) -> None:
    """Global magnitude pruning of the nn.Linear weights down to `keep` non-zeros, made permanent."""
    linears = [(m, "weight") for m in net.modules() if isinstance(m, nn.Linear)]
    total = sum(m.weight.numel() for m, _ in linears)
    prune.global_unstructured(linears, pruning_method=prune.L1Unstructured, amount=max(0, total - keep))
    for m, name in linears:
        prune.remove(m, name)


def fc_nonzero(net: nn.Module) -> int:
    return fc_parameter_counts(net).nonzero


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CIFAR-sized input 3x32x32, "
          "median latency of the TorchScript model")
    print(f"{'model':22} {'non-zero':>11} {'FC non-zero':>12} {'TorchScript KiB':>16} {'sparse dict KiB':>16} "
          f"{'ms @1':>7} {'ms @64':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for family, (dense_kwargs, sep_kwargs) in FAMILIES.items():
            separable = ImageClassifier(network=sep_kwargs).eval()
            pruned = ImageClassifier(network=dense_kwargs).eval()
            prune_fc(pruned.net, fc_nonzero(separable.net))
            rows = [("separable", separable), ("dense", ImageClassifier(network=dense_kwargs).eval()),
                    ("dense, FC pruned", pruned)]
            for kind, model in rows:
                label = f"{family} {kind}"
                ts = to_torchscript(model.net, (3, 32, 32), Path(tmp) / "m.pt")
                sd = Path(tmp) / "sd.pt"
                torch.save(sparse_state_dict(model.net), sd)
                loaded = torch.jit.load(str(ts))
                counts = parameter_counts(model.net)
                print(f"{label:22} {counts.nonzero:11,} {fc_nonzero(model.net):12,} "
                      f"{ts.stat().st_size / 1024:16.1f} {sd.stat().st_size / 1024:16.1f} "
                      f"{latency_ms(loaded, 1):7.2f} {latency_ms(loaded, 64):8.1f}")


if __name__ == "__main__":
    main()
