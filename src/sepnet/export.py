"""Export a trained classifier for deployment: TorchScript, and a state dict whose mostly-zero
tensors are stored sparsely.

    python -m sepnet.export logs/default/version_0/checkpoints/last.ckpt exports/default
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from sepnet.compress import remove_pruning_
from sepnet.guards import eval_mode

log = logging.getLogger(__name__)

__all__ = ["to_torchscript", "sparse_state_dict", "dense_state_dict", "export_checkpoint"]


def to_torchscript(net: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Trace the plain model (pixels in [0, 1] in, logits out) in eval mode and save it."""
    with torch.no_grad(), eval_mode(net):
        # batch 2: the traced branches (see layers._mode_product) then hold for every batch size
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


def export_checkpoint(ckpt: str, out_dir: str) -> dict[str, Path]:
    from sepnet.module import ImageClassifier

    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist: expected a .ckpt file")
    model = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    remove_pruning_(model.net)  # pruned weights hold their zeros; no masks to ship
    out = Path(out_dir)
    shape = tuple(model.hparams.image_shape)
    paths = {"torchscript": to_torchscript(model.net, shape, out / "model.torchscript.pt"),
             "sparse_state_dict": out / "state_dict.sparse.pt"}
    _atomic(lambda tmp: torch.save(sparse_state_dict(model.net), tmp), paths["sparse_state_dict"])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="Lightning checkpoint of an ImageClassifier")
    parser.add_argument("out_dir", help="folder for model.torchscript.pt and state_dict.sparse.pt")
    args = parser.parse_args(argv)
    try:
        paths = export_checkpoint(args.ckpt, args.out_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for name, path in paths.items():
        print(f"{name}: {path} ({path.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
