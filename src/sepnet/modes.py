"""`eval_mode`: the one way sepnet switches a model to eval mode and back (`attack_guard` in
sepnet.attacks builds on it)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block; every submodule's own mode restored after,
    also when the block raises."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training
