"""Lagrangian-dual global pruning: our reading of "Deadwooding" (Kaur et al. 2022, "Deadwooding:
robust global pruning for deep neural networks"), whose full text we could not read.

While the budget is violated the training loss adds lambda x violation, where the violation is
the fraction of the targeted weights' L1 mass outside the global top-k (k = the budget of
non-zero weights); lambda grows by dual ascent, lambda += dual_step x violation at every step
after `kick_in` epochs, so it never decreases while the budget is violated. A knowledge-
distillation term pulls the network towards the dense teacher it started from (T^2 KL at
temperature T), beside the run's adversarial loss. After `penalty_epochs` epochs the global
magnitude mask keeps exactly k weights and the network fine-tunes with it.

The targeted layers carry torch.nn.utils.prune masks from the start (all ones during the penalty
phase), so a checkpoint of either phase loads into a freshly built network.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from sepnet.masks import topk_masks

__all__ = ["Deadwood", "objectives", "compression_loss", "compression_epoch_"]


class Deadwood(nn.Module):
    """The penalty, its dual variable and the phase of one Lagrangian-dual pruning entry.

    Args:
        layers: the targeted nn.Linear / nn.Conv2d modules (already carrying identity prune masks).
        keep: non-zero weights the budget allows over all of them together.
        kick_in: epochs before lambda starts to grow.
        penalty_epochs: epochs of the penalty phase; then the mask is fixed.
        dual_step: lambda's step per unit of violation.
        kd_weight, temperature: the distillation term (0 switches it off).
        teacher: the dense network to distil from (kept out of the state dict and the counts).
    """

    def __init__(self, layers: list[nn.Module], keep: int, kick_in: int = 1, penalty_epochs: int = 5,
                 dual_step: float = 0.05, kd_weight: float = 1.0, temperature: float = 4.0,
                 teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.keep, self.kick_in, self.penalty_epochs = keep, kick_in, penalty_epochs
        self.dual_step, self.kd_weight, self.temperature = dual_step, kd_weight, temperature
        self.register_buffer("lam", torch.zeros(()))
        self.register_buffer("phase", torch.tensor(0))
        self.__dict__["_layers"] = layers  # not submodules: they live in the network already
        self.__dict__["_teacher"] = teacher.eval().requires_grad_(False) if teacher is not None else None
        self._epoch = 0

    def _weights(self) -> list[Tensor]:
        return [m.weight_orig * m.weight_mask for m in self._layers]

    def violation(self) -> Tensor:
        """Fraction of the L1 mass outside the global top-`keep` (0 when within the budget)."""
        magnitudes = torch.cat([w.abs().flatten() for w in self._weights()])
        total = magnitudes.sum().clamp_min(1e-30)
        inside = magnitudes.detach().topk(self.keep).indices
        return (total - magnitudes[inside].sum()) / total

    def loss(self, x: Tensor, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if int(self.phase) == 1:
            return logits.new_zeros(()), {}
        violation = self.violation()
        if self.training and self._epoch >= self.kick_in:
            self.lam += self.dual_step * violation.detach()  # dual ascent: grows while violated
        total = self.lam * violation
        parts = {"train/deadwood_violation": violation.detach(), "train/deadwood_lambda": self.lam.clone()}
        if self._teacher is not None and self.kd_weight > 0:
            teacher = self._teacher.to(x.device)
            with torch.no_grad():
                target = (teacher(x) / self.temperature).softmax(-1)
            kd = nn.functional.kl_div((logits / self.temperature).log_softmax(-1), target, reduction="batchmean")
            total = total + self.kd_weight * self.temperature ** 2 * kd
            parts["train/deadwood_kd"] = kd.detach()
        return total, parts

    @torch.no_grad()
    def start_epoch(self, epoch: int) -> None:
        """At an epoch start: after the penalty phase, the global magnitude mask keeps exactly
        `keep` weights, for good."""
        self._epoch = epoch
        if int(self.phase) == 0 and epoch >= self.penalty_epochs:
            for m, chosen in zip(self._layers, topk_masks([w.abs() for w in self._weights()], self.keep)):
                m.weight_mask.copy_(chosen)
            self.phase.fill_(1)


def attach(net: nn.Module, layers: list[tuple[str, nn.Module]], keep: int, options: dict) -> Deadwood:
    """Identity prune masks on `layers`, a copy of `net` as the teacher, and the Deadwood module
    registered on the network (its buffers go into checkpoints)."""
    teacher = copy.deepcopy(net)
    modules = []
    for _, m in layers:
        prune.identity(m, "weight")
        modules.append(m)
    dead = Deadwood(modules, keep, teacher=teacher, **options)
    if not hasattr(net, "objectives"):
        net.objectives = nn.ModuleList()
    net.objectives.append(dead)
    return dead


def objectives(net: nn.Module) -> list[Deadwood]:
    """The network's training-term compressors (registered by `attach`; no module walk: this
    runs every training step)."""
    return list(getattr(net, "objectives", ()))


def compression_loss(net: nn.Module, x: Tensor, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The compressors' training terms (Lagrangian-dual pruning) for the batch the logits are of."""
    total, parts = logits.new_zeros(()), {}
    for objective in objectives(net):
        loss, logged = objective.loss(x, logits)
        total = total + loss
        parts.update(logged)
    return total, parts


def compression_epoch_(net: nn.Module, epoch: int) -> None:
    """Every compressor's epoch-start step: HYDRA's phases, the dual pruning's final mask."""
    from sepnet.masks import set_phases_

    set_phases_(net, epoch)
    for objective in objectives(net):
        objective.start_epoch(epoch)
