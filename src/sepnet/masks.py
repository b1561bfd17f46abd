"""Pruning masks, one mechanism for every pruner: a weight parametrization (torch.nn.utils.parametrize).

`MaskedWeight` multiplies a tensor (a layer's weight, a separable layer's factor) by a 0/1 mask
held as a buffer (so checkpoints keep it); magnitude pruning, the Lagrangian-dual pruning,
HYDRA and the factors' sparsity target all mask this way, so the measures, the monitors and the
export have one path (`masked_tensors`, `remove_masks_`).
With scores (HYDRA, Sehwag et al. 2020) the mask is the top-k of |scores| in the forward, and
the gradient reaches the scores straight through it; once fixed, the mask is a plain buffer.
Each MaskedWeight has a `phase`: 0 while its scores train with the network's weights frozen,
1 once the mask is fixed and the weights train (fine-tuning); sepnet.compress.hydra switches the
phases at epoch starts, so a resumed run continues in the phase it was in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["MaskedWeight", "mask_tensor_", "masked_tensors", "masked_layers", "remove_masks_", "parametrized_copy",
           "topk_masks"]


def topk_masks(scores: list[Tensor], keep: int, every_row: bool = False) -> list[Tensor]:
    """Boolean masks, one per tensor, keeping exactly the `keep` largest scores over all of them
    together (one tensor: a layer's top-k; several: a global top-k across layers).

    every_row: each row (output unit: index 0 of a weight) keeps its largest score first and the
    other keep - rows entries go by score, so no output unit is cut off and the count stays
    exact (keep must then be at least the number of rows)."""
    guarded = None
    if every_row:
        rows = sum(s.shape[0] for s in scores)
        if keep < rows:
            raise ValueError(f"a mask that keeps every output unit keeps at least {rows:,} entries, got keep {keep:,}")
        guarded = torch.cat([nn.functional.one_hot(s.flatten(1).argmax(1), s[0].numel()).bool().flatten()
                             for s in scores])
        keep -= rows
    flat = torch.cat([s.flatten() for s in scores])
    if guarded is not None:
        flat = flat.masked_fill(guarded, -math.inf)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[flat.topk(keep).indices] = True
    if guarded is not None:
        chosen |= guarded
    return [part.view_as(s) for part, s in zip(chosen.split([s.numel() for s in scores]), scores)]


class _TopK(torch.autograd.Function):
    """Hard top-k mask of |scores| in the forward (every output unit keeps one entry); the
    gradient passes straight through."""

    @staticmethod
    def forward(ctx, scores: Tensor, keep: int) -> Tensor:
        return topk_masks([scores.abs()], keep, every_row=True)[0].to(scores.dtype)

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
        self._phase: int | None = None  # the buffer's host copy: read once, not in every forward (a sync)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._phase = None

    @property
    def scoring(self) -> bool:
        """In HYDRA's score phase: the mask is the scores' top-k, chosen in every forward."""
        if self._phase is None:
            self._phase = int(self.phase)
        return self.scores is not None and self._phase == 0

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
            self._phase = 1


def mask_tensor_(module: nn.Module, name: str, mask: Tensor, keep: int | None = None, scores: Tensor | None = None,
                 score_epochs: int = 0) -> MaskedWeight:
    """Put `module.<name>` (a weight, or an entry of a ParameterList) under a MaskedWeight; a
    fixed mask keeps what `mask` keeps. Returns the MaskedWeight."""
    masked = MaskedWeight(mask, int(mask.sum()) if keep is None else keep, scores, score_epochs)
    parametrize.register_parametrization(module, name, masked)
    return masked


def masked_tensors(net: nn.Module) -> list[tuple[str, nn.Module, str, MaskedWeight]]:
    """(module name, module, tensor name, its MaskedWeight) for every masked tensor in `net`."""
    out = []
    for module_name, m in net.named_modules():
        if parametrize.is_parametrized(m):
            for tensor, chain in m.parametrizations.items():
                out += [(module_name, m, tensor, p) for p in chain if isinstance(p, MaskedWeight)]
    return out


def masked_layers(net: nn.Module) -> list[tuple[str, nn.Module, MaskedWeight]]:
    """(name, layer, its MaskedWeight) for every layer whose weight carries one (the pruners')."""
    return [(name, m, masked) for name, m, tensor, masked in masked_tensors(net) if tensor == "weight"]


def remove_masks_(net: nn.Module) -> nn.Module:
    """Make every mask permanent (zeros in the tensor, no parametrization): for export."""
    for _, m, tensor, masked in masked_tensors(net):
        masked.fix_()
        parametrize.remove_parametrizations(m, tensor, leave_parametrized=True)
    return net


def parametrized_copy(net: nn.Module) -> nn.Module:
    """A deep copy whose parametrized modules each get a class of their own. torch gives a
    parametrized module a generated class that `copy.deepcopy` shares with the copy, and
    `remove_parametrizations` deletes the property from that class: removing a mask from a plain
    deep copy would break the original's weight."""
    import copy

    clone = copy.deepcopy(net)
    for m in clone.modules():
        if parametrize.is_parametrized(m):
            cls = type(m)
            m.__class__ = type(cls.__name__, cls.__bases__,
                               {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})
    return clone
