"""Trainable pruning masks as weight parametrizations (torch.nn.utils.parametrize).

`MaskedWeight` multiplies a weight by a 0/1 mask held as a buffer (so checkpoints keep it).
With scores (HYDRA, Sehwag et al. 2020) the mask is the top-k of |scores| in the forward, and
the gradient reaches the scores straight through it; once fixed, the mask is a plain buffer.
Each MaskedWeight has a `phase`: 0 while its scores train with the network's weights frozen,
1 once the mask is fixed and the weights train (fine-tuning). `set_phases_` applies that to the
whole network at every epoch start, so a resumed run continues in the phase it was in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["MaskedWeight", "masked_layers", "set_phases_", "remove_masks_", "topk_masks"]


def topk_masks(scores: list[Tensor], keep: int) -> list[Tensor]:
    """Boolean masks, one per tensor, keeping the `keep` largest scores over all of them
    together (one tensor: a layer's top-k; several: a global top-k across layers)."""
    flat = torch.cat([s.flatten() for s in scores])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[flat.topk(keep).indices] = True
    return [part.view_as(s) for part, s in zip(chosen.split([s.numel() for s in scores]), scores)]


class _TopK(torch.autograd.Function):
    """Hard top-k mask of |scores| in the forward; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, scores: Tensor, keep: int) -> Tensor:
        return topk_masks([scores.abs()], keep)[0].to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class MaskedWeight(nn.Module):
    """weight * mask. keep: entries the mask keeps. scores: initial scores (HYDRA) or None for
    a fixed mask given by `mask`. score_epochs: epochs of the score phase (after them the mask
    is fixed to the scores' top-k and the weights train)."""

    def __init__(self, mask: Tensor, keep: int, scores: Tensor | None = None, score_epochs: int = 0) -> None:
        super().__init__()
        self.keep, self.score_epochs = keep, score_epochs
        self.register_buffer("mask", mask.clone().float())
        self.register_buffer("phase", torch.tensor(0 if scores is not None else 1))
        self.scores = nn.Parameter(scores.clone()) if scores is not None else None

    @property
    def scoring(self) -> bool:
        """In HYDRA's score phase: the mask is the scores' top-k, chosen in every forward."""
        return self.scores is not None and int(self.phase) == 0

    def forward(self, weight: Tensor) -> Tensor:
        if self.scoring:
            return weight * _TopK.apply(self.scores, self.keep).to(weight.dtype)
        return weight * self.mask.to(weight.dtype)

    def current_mask(self) -> Tensor:
        if self.scoring:
            return _TopK.apply(self.scores.detach(), self.keep)
        return self.mask

    @torch.no_grad()
    def fix_(self) -> None:
        """End the score phase: the mask becomes the scores' top-k, for good."""
        if self.scoring:
            self.mask.copy_(_TopK.apply(self.scores, self.keep))
            self.phase.fill_(1)


def hydra_scores(weight: Tensor) -> Tensor:
    """HYDRA's initial scores: proportional to the weights, sqrt(6 / fan_in) w / max|w|."""
    fan_in = weight[0].numel()
    return math.sqrt(6 / fan_in) * weight / weight.abs().max().clamp_min(1e-30)


def masked_layers(net: nn.Module) -> list[tuple[str, nn.Module, MaskedWeight]]:
    """(name, layer, its MaskedWeight) for every layer whose weight carries one."""
    out = []
    for name, m in net.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            found = [p for p in m.parametrizations["weight"] if isinstance(p, MaskedWeight)]
            if found:
                out.append((name, m, found[0]))
    return out


def set_phases_(net: nn.Module, epoch: int) -> None:
    """At an epoch start: fix the masks whose score phase is over; while any layer is still in
    its score phase, only scores train (every other parameter frozen, as HYDRA does)."""
    layers = masked_layers(net)
    if not any(masked.scores is not None for _, _, masked in layers):
        return  # nothing of HYDRA's here: leave requires_grad as it is
    for _, _, masked in layers:
        if masked.scores is not None and epoch >= masked.score_epochs:
            masked.fix_()
    scoring = any(m.scoring for _, _, m in layers)
    scores = {id(m.scores) for _, _, m in layers if m.scores is not None}
    for p in net.parameters():
        p.requires_grad_((id(p) in scores) if scoring else (id(p) not in scores))


def remove_masks_(net: nn.Module) -> nn.Module:
    """Make every mask permanent (zeros in `weight`, no parametrization): for export."""
    for _, m, masked in masked_layers(net):
        masked.fix_()
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return net
