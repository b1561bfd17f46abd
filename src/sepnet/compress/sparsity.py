"""The sparsity target of the separable factors (`constraint.sparsity_target`): gradual magnitude
pruning of every separable layer's factors to an exact zero fraction, with the masks of
sepnet.masks (the mechanism every pruner uses). Not a `network.compression` entry: its schedule
is the run's optimizer steps, which the training module drives (`step_`, `freeze_`)."""

from __future__ import annotations

import torch
from torch import nn

from sepnet.masks import mask_tensor_, topk_masks
from sepnet.measures import factor_list, separable_layers

__all__ = ["SparsityTarget"]


class SparsityTarget(nn.Module):
    """Exact sparsity at a chosen level in every separable layer's factors.

    The rule (gradual magnitude pruning, Zhu & Gupta 2017, on the factors): at optimizer step t
    each layer's factors keep their largest-magnitude entries so that a fraction
    target x (1 - (1 - t / T)^3) of them is zero, T = ramp x the run's optimizer steps; pruned
    entries stay pruned (each factor under a sepnet.masks MaskedWeight, the mechanism of every
    pruner), and from step T on the zero pattern is frozen at exactly the target and the network
    fine-tunes with it. The start of the last epoch freezes whatever has not reached the target
    yet. Masks are buffers: zeros survive resume and the sparse export.

    An earlier rule -- a Lagrangian-dual L1 weight with the proximal step -- collapsed a VGG/4
    head to chance at target 0.5: the per-step soft threshold accumulates over steps and shrank
    every factor entry, wanted or not (BENCHMARKS.md, "Sparsity at a chosen level").
    """

    def __init__(self, model: nn.Module, target: float, ramp: float = 0.5) -> None:
        super().__init__()
        if not 0 < ramp <= 1:
            raise ValueError(f"constraint.sparsity_ramp must be in (0, 1], got {ramp}")
        self.target, self.ramp = target, ramp
        self.__dict__["_layers"] = [layer for _, layer in separable_layers(model)]  # not submodules
        if not self._layers:
            raise ValueError("constraint.sparsity_target: the model has no separable layer to sparsify")
        self.register_buffer("frozen", torch.zeros(len(self._layers), dtype=torch.bool))
        self._frozen: list[bool] | None = None  # the buffer's host copy
        # each factor's MaskedWeight (all ones to start); they live in the network, not here
        self.__dict__["_masks"] = [[mask_tensor_(term, str(k), torch.ones_like(term[k]))
                                    for term in layer.factors for k in range(len(term))] for layer in self._layers]

    def zero_fractions(self) -> list[float]:
        return [sum(int((f == 0).sum()) for f in factor_list(l)) / sum(f.numel() for f in factor_list(l))
                for l in self._layers]

    def level(self, step: int, total_steps: int) -> float:
        """The zero fraction the schedule asks for after optimizer step `step`."""
        ramp = max(1, round(self.ramp * total_steps))
        return self.target * (1 - (1 - min(1.0, step / ramp)) ** 3)

    def _is_frozen(self, i: int) -> bool:
        """Whether layer i's mask is fixed, read on the host: the buffer is read once after
        construction or a checkpoint load, not at every step (a device sync)."""
        if self._frozen is None:
            self._frozen = [bool(f) for f in self.frozen.tolist()]
        return self._frozen[i]

    def _freeze(self, i: int) -> None:
        self._is_frozen(i)
        self._frozen[i] = True
        self.frozen[i] = True

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._frozen = None

    @torch.no_grad()
    def step_(self, step: int, total_steps: int) -> None:
        """After optimizer step `step` of `total_steps`."""
        level = self.level(step, total_steps)
        for i in range(len(self._layers)):
            if not self._is_frozen(i):
                self._prune_(i, level)
                if level >= self.target:
                    self._freeze(i)

    @torch.no_grad()
    def freeze_(self, i: int | None = None) -> None:
        """Prune layer i (every unfrozen layer when None) to exactly the target and fix its mask."""
        for index in ([i] if i is not None else range(len(self._layers))):
            if not self._is_frozen(index):
                self._prune_(index, self.target)
                self._freeze(index)

    def _prune_(self, index: int, level: float) -> None:
        """Layer `index`'s factors with the smallest-magnitude entries zeroed: `level` of them,
        among those its mask still keeps (a pruned entry never comes back)."""
        factors, masks = factor_list(self._layers[index]), self._masks[index]
        entries = sum(f.numel() for f in factors)
        keep = max(1, entries - round(level * entries))
        magnitudes = [torch.where(m.mask.bool(), f.abs(), -1.0) for f, m in zip(factors, masks)]  # pruned: last
        for masked, chosen in zip(masks, topk_masks(magnitudes, keep)):
            masked.mask.mul_(chosen)
