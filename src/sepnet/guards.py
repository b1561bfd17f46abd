"""Guards that switch a model's train / eval state for a block and restore it after: `eval_mode`
is the one way sepnet does it (`attack_guard` in sepnet.attacks builds on it)."""

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
