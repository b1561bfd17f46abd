"""Bit-identical resume: the random number generators' states in every checkpoint, restored when
a fit resumes from it (before the training loader's iterator exists, so the resumed epochs
draw what an uninterrupted run draws). `ImageClassifier.configure_callbacks` attaches it."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch

__all__ = ["RNGStates", "collect_rng_states", "set_rng_states"]


def collect_rng_states() -> dict:
    """torch, CUDA, numpy and Python RNG states in types that `torch.load(weights_only=True)`
    (Lightning's default) accepts: tensors, ints, floats, strings and tuples."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])


class RNGStates(L.Callback):
    """Saves the RNG states into `checkpoint["rng_states"]`; restores them when a fit resumes.
    Lightning restores callbacks before the loops start (the sanity check runs under its
    isolate_rng, so it draws nothing); `test` and `validate` leave the global RNG alone."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.fn == "fit" and "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
