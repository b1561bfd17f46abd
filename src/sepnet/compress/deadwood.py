"""`deadwood`: Lagrangian-dual global pruning, our reading of "Deadwooding" (Kaur et al. 2022,
"Deadwooding: robust global pruning for deep neural networks"), whose full text we could not read.

The constraint: the fraction of the targeted weights' L1 mass outside the global top-k (k = the
budget of non-zero weights) is at most `tolerance`. The training loss adds lambda x violation;
after `kick_in` epochs each step then raises lambda by projected dual ascent, lambda <- max(0,
lambda + dual_step x (violation - tolerance)), *after* the step has used it: lambda grows while
the mass outside the top-k exceeds the tolerance and shrinks once it is below, so the dual
settles where the constraint is met. With tolerance 0 the constraint cannot be met before the
mask (some mass is always outside the top-k) and lambda only grows: a ramped penalty, the rule
of the benchmark rows made before the tolerance existed. A knowledge-
distillation term pulls the network towards the dense teacher it started from (T^2 KL at
temperature T), beside the run's adversarial loss. After `penalty_epochs` epochs the global
magnitude mask keeps exactly k weights and the network fine-tunes with it.

The targeted layers carry sepnet.masks masks from the start (all ones during the penalty phase),
so a checkpoint of either phase loads into a freshly built network.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from sepnet import metric_names as names
from sepnet.compress.hooks import CompressionHook, attach_hook
from sepnet.compress.prune import Pruner
from sepnet.masks import MaskedWeight, mask_tensor_, topk_masks

__all__ = ["Deadwood", "DualPruning"]


class Deadwood(CompressionHook):
    """The penalty, its dual variable and the phase of one Lagrangian-dual pruning entry.

    Args:
        layers: the targeted nn.Linear / nn.Conv2d modules.
        masks: their MaskedWeights (all ones until the penalty phase ends).
        keep: non-zero weights the budget allows over all of them together.
        kick_in: epochs before lambda starts to grow.
        penalty_epochs: epochs of the penalty phase; then the mask is fixed.
        dual_step: lambda's step per unit of violation.
        tolerance: the L1-mass fraction outside the top-k the constraint allows.
        kd_weight, temperature: the distillation term (0 switches it off).
        teacher: the dense network to distil from (kept out of the state dict and the counts).
    """

    def __init__(self, layers: list[nn.Module], masks: list[MaskedWeight], keep: int, kick_in: int = 1,
                 penalty_epochs: int = 5,
                 dual_step: float = 0.05, tolerance: float = 0.05, kd_weight: float = 1.0,
                 temperature: float = 4.0, teacher: nn.Module | None = None) -> None:
        super().__init__()
        if not 0 <= tolerance < 1:
            raise ValueError(f"compression deadwood: tolerance must be in [0, 1), got {tolerance}")
        self.keep, self.kick_in, self.penalty_epochs, self.tolerance = keep, kick_in, penalty_epochs, tolerance
        self.dual_step, self.kd_weight, self.temperature = dual_step, kd_weight, temperature
        self.register_buffer("lam", torch.zeros(()))
        self.register_buffer("phase", torch.tensor(0))
        self.__dict__["_layers"] = layers  # not submodules: they live in the network already
        self.__dict__["_masks"] = masks
        self.__dict__["_teacher"] = teacher.eval().requires_grad_(False) if teacher is not None else None
        self._epoch = 0
        self._phase: int | None = None  # the buffer's host copy: read at epoch starts, not every step

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._phase = None

    def _current_phase(self) -> int:
        if self._phase is None:
            self._phase = int(self.phase)
        return self._phase

    def _weights(self) -> list[Tensor]:
        return [m.weight for m in self._layers]  # masked (all ones in the penalty phase)

    def violation(self) -> Tensor:
        """Fraction of the L1 mass outside the global top-`keep` (0 when within the budget)."""
        magnitudes = torch.cat([w.abs().flatten() for w in self._weights()])
        total = magnitudes.sum().clamp_min(1e-30)
        inside = magnitudes.detach().topk(self.keep).indices
        return (total - magnitudes[inside].sum()) / total

    def loss(self, x: Tensor, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self._current_phase() == 1:
            return logits.new_zeros(()), {}
        violation = self.violation()
        total = self.lam.clone() * violation  # this step's lambda; the update below is for the next
        parts = {names.compression_term("deadwood_violation"): violation.detach(),
                 names.compression_term("deadwood_lambda"): self.lam.clone()}
        if self.training and self._epoch >= self.kick_in:  # projected dual ascent
            self.lam.copy_((self.lam + self.dual_step * (violation.detach() - self.tolerance)).clamp_min(0))
        if self._teacher is not None and self.kd_weight > 0:
            teacher = self._teacher.to(x.device)
            with torch.no_grad():
                target = (teacher(x) / self.temperature).softmax(-1)
            kd = nn.functional.kl_div((logits / self.temperature).log_softmax(-1), target, reduction="batchmean")
            total = total + self.kd_weight * self.temperature ** 2 * kd
            parts[names.compression_term("deadwood_kd")] = kd.detach()
        return total, parts

    @torch.no_grad()
    def epoch_start(self, epoch: int) -> None:
        """At an epoch start: after the penalty phase, the global magnitude mask keeps exactly
        `keep` weights, for good."""
        self._epoch = epoch
        if self._current_phase() == 0 and epoch >= self.penalty_epochs:
            for masked, chosen in zip(self._masks, topk_masks([w.abs() for w in self._weights()], self.keep)):
                masked.mask.copy_(chosen)
            self.phase.fill_(1)
            self._phase = 1


class DualPruning(Pruner, name="deadwood", targets=(nn.Linear, nn.Conv2d)):
    """A penalty on the weight mass outside the global top-k with a dual variable (see the
    module docstring), distillation towards the dense starting network, then a global magnitude
    mask that keeps exactly the budget and fine-tuning. Start from a trained model
    (network.init_from). options: kick_in (epochs, default 1), penalty_epochs (default 5),
    dual_step (0.05), tolerance (0.05), kd_weight (1.0), temperature (4.0), amount (fraction
    pruned, instead of a budget)."""

    defaults = {"kick_in": 1, "penalty_epochs": 5, "dual_step": 0.05, "tolerance": 0.05, "kd_weight": 1.0,
                "temperature": 4.0, "amount": None}

    def apply(self, net, layers):
        total = sum(m.weight.numel() for _, m in layers)
        keep = max(1, round(total * self.keep_fraction()))
        teacher = copy.deepcopy(net)
        # all-ones masks from the start: a checkpoint of either phase loads into a new network
        masks = [mask_tensor_(m, "weight", torch.ones_like(m.weight)) for _, m in layers]
        options = {k: v for k, v in self.options.items() if k != "amount"}
        dead = attach_hook(net, Deadwood([m for _, m in layers], masks, keep, teacher=teacher, **options))
        return [f"{', '.join(n for n, _ in layers[:3])}{' ...' if len(layers) > 3 else ''}: deadwood keeps "
                f"{keep:,} / {total:,} weights after {dead.penalty_epochs} penalty epochs"]
