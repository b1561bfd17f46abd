"""Activations for Lipschitz networks (sepnet.lipschitz)."""

from __future__ import annotations

import torch
from torch import Tensor

from sepnet.lipschitz import LipschitzModule

__all__ = ["MaxMin"]


class MaxMin(LipschitzModule):
    """GroupSort with groups of 2 (Anil et al. 2019) along `dim`: each pair of channels becomes
    (max, min). 1-Lipschitz and gradient-norm preserving (a permutation per input), unlike ReLU."""

    lipschitz_rule = "MaxMin"

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[self.dim] % 2:
            raise ValueError(f"MaxMin needs an even size along dim {self.dim}, got shape {tuple(x.shape)}")
        a, b = x.chunk(2, dim=self.dim)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)

    def lipschitz_constant(self) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
