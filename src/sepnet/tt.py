"""Tensor-train (TT) layers (Novikov et al. 2015, "Tensorizing neural networks").

A TT layer stores the weight of an nn.Linear with in_features = m1...md and out_features =
n1...nd as d cores G_k of shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1:

    W[(i1..id), (j1..jd)] = G1[:, i1, j1, :] G2[:, i2, j2, :] ... Gd[:, id, jd, :]

The forward contracts the input with one core after the other (from whichever end costs fewer
multiply-adds) and never builds W.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["TTLinear", "tt_ranks", "tt_parameters", "tt_svd"]


def tt_ranks(in_modes: Sequence[int], out_modes: Sequence[int], rank: int | Sequence[int]) -> tuple[int, ...]:
    """The d + 1 ranks (1, r1, ..., r_{d-1}, 1): an int is the same internal rank everywhere,
    each capped at the largest rank the cut between cores allows."""
    d = len(in_modes)
    inner = [rank] * (d - 1) if isinstance(rank, int) else list(rank)
    if len(inner) != d - 1:
        raise ValueError(f"TT ranks {list(rank)}: expected {d - 1} internal ranks for {d} cores")
    if any(r < 1 for r in inner):
        raise ValueError(f"TT ranks must be >= 1, got {inner}")
    sizes = [m * n for m, n in zip(in_modes, out_modes)]
    capped = [min(r, math.prod(sizes[:k + 1]), math.prod(sizes[k + 1:])) for k, r in enumerate(inner)]
    return (1, *capped, 1)


def tt_parameters(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Stored entries of the cores (bias not included)."""
    return sum(ranks[k] * m * n * ranks[k + 1] for k, (m, n) in enumerate(zip(in_modes, out_modes)))


def _interleaved(weight: Tensor, in_modes: Sequence[int], out_modes: Sequence[int]) -> Tensor:
    """The (out, in) weight as the d-way tensor of shape (m1 n1, ..., md nd)."""
    d = len(in_modes)
    t = weight.t().reshape(*in_modes, *out_modes)  # (m1..md, n1..nd)
    order = [axis for k in range(d) for axis in (k, d + k)]
    return t.permute(order).reshape([m * n for m, n in zip(in_modes, out_modes)])


def tt_svd(weight: Tensor, in_modes: Sequence[int], out_modes: Sequence[int],
           rank: int | Sequence[int]) -> list[Tensor]:
    """Cores of the TT approximation of an (out, in) weight by sequential truncated SVDs
    (Oseledets' TT-SVD on the interleaved modes). Exact when the weight has TT ranks <= rank."""
    ranks = tt_ranks(in_modes, out_modes, rank)
    rest = _interleaved(weight.detach(), in_modes, out_modes).reshape(1, -1)
    cores = []
    for k, (m, n) in enumerate(zip(in_modes, out_modes)):
        rest = rest.reshape(ranks[k] * m * n, -1)
        if k == len(in_modes) - 1:
            cores.append(rest.reshape(ranks[k], m, n, 1))
            break
        u, s, vh = torch.linalg.svd(rest, full_matrices=False)
        r = min(ranks[k + 1], s.numel())
        cores.append(u[:, :r].reshape(ranks[k], m, n, r))
        rest = s[:r, None] * vh[:r]
    return cores


def _contract(x: Tensor, cores: Sequence[Tensor], in_modes: Sequence[int], out_modes: Sequence[int]) -> Tensor:
    """x (batch, prod in_modes) through the cores, first to last: one GEMM a core."""
    batch = x.shape[0]
    t = x.reshape(batch, 1, 1, -1)  # (batch, output modes done, rank, input modes left)
    for core, m, n in zip(cores, in_modes, out_modes):
        done, r, left = t.shape[1], t.shape[2], t.shape[3] // m
        t = t.reshape(batch, done, r, m, left).permute(0, 1, 4, 2, 3).reshape(-1, r * m)
        t = (t @ core.reshape(r * m, -1)).reshape(batch, done, left, n, core.shape[-1])
        t = t.permute(0, 1, 3, 4, 2).reshape(batch, done * n, core.shape[-1], left)
    return t.reshape(batch, -1)


def _macs(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Multiply-adds per sample of `_contract` in this core order."""
    return sum(math.prod(out_modes[:k]) * math.prod(in_modes[k:]) * ranks[k] * out_modes[k] * ranks[k + 1]
               for k in range(len(in_modes)))


class TTLinear(nn.Module):
    """nn.Linear(prod(in_modes), prod(out_modes)) in tensor-train format.

    Args:
        in_modes: (m1, ..., md), their product the input features.
        out_modes: (n1, ..., nd), their product the output features.
        rank: internal TT rank (int) or the d - 1 ranks; capped where a cut allows less.
        bias: add a learnable bias.

    Initialization: i.i.d. normal cores whose implied weight entries have nn.Linear's variance,
    1 / (3 in_features): an entry is a sum over prod(r_k) products of d core entries, so each core
    gets variance (1 / (3 in_features prod r_k))^(1/d).
    """

    def __init__(self, in_modes: Sequence[int], out_modes: Sequence[int], rank: int | Sequence[int] = 8,
                 bias: bool = True) -> None:
        super().__init__()
        if len(in_modes) != len(out_modes) or len(in_modes) < 2:
            raise ValueError(f"TT modes {tuple(in_modes)} -> {tuple(out_modes)}: expected the same number "
                             "(>= 2) of input and output modes")
        if min(*in_modes, *out_modes) < 1:
            raise ValueError(f"TT modes must be >= 1, got {tuple(in_modes)} -> {tuple(out_modes)}")
        self.in_modes, self.out_modes = tuple(in_modes), tuple(out_modes)
        self.in_features, self.out_features = math.prod(in_modes), math.prod(out_modes)
        self.ranks = tt_ranks(in_modes, out_modes, rank)
        d = len(in_modes)
        std = (1 / (3 * self.in_features * math.prod(self.ranks))) ** (1 / (2 * d))
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(self.ranks[k], m, n, self.ranks[k + 1]) * std)
            for k, (m, n) in enumerate(zip(in_modes, out_modes)))
        # contract from the end where that is cheaper (a layer that shrinks its input: the big
        # input modes go first); 1.6-3x faster at VGG's FC1 (benchmarks/layers.py)
        self._reversed = (_macs(in_modes[::-1], out_modes[::-1], self.ranks[::-1])
                          < _macs(in_modes, out_modes, self.ranks))
        bound = 1 / math.sqrt(self.in_features)
        self.bias = nn.Parameter(torch.empty(self.out_features).uniform_(-bound, bound)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_modes: Sequence[int], out_modes: Sequence[int],
                    rank: int | Sequence[int]) -> tuple["TTLinear", float]:
        """(the TT-SVD approximation of `linear`, its relative Frobenius error)."""
        if (math.prod(in_modes), math.prod(out_modes)) != (linear.in_features, linear.out_features):
            raise ValueError(f"TT modes {tuple(in_modes)} -> {tuple(out_modes)} imply a {math.prod(in_modes)} -> "
                             f"{math.prod(out_modes)} layer, but the linear layer is {linear.in_features} -> "
                             f"{linear.out_features}")
        layer = cls(in_modes, out_modes, rank, bias=linear.bias is not None)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            for core, value in zip(layer.cores, tt_svd(linear.weight, in_modes, out_modes, layer.ranks[1:-1])):
                core.copy_(value)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            error = float((layer.dense_weight() - linear.weight).norm() / linear.weight.norm().clamp_min(1e-30))
        return layer, error

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"TTLinear expects {self.in_features} input features, got input of shape "
                             f"{tuple(x.shape)}")
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self._reversed:  # last core first: the same sum with every mode order reversed
            d = len(self.in_modes)
            flip = (0, *range(d, 0, -1))
            x = x.reshape(-1, *self.in_modes).permute(flip).reshape(x.shape[0], -1)
            cores = [core.permute(3, 1, 2, 0) for core in reversed(self.cores)]
            y = _contract(x, cores, self.in_modes[::-1], self.out_modes[::-1])
            y = y.reshape(-1, *self.out_modes[::-1]).permute(flip).reshape(x.shape[0], -1)
        else:
            y = _contract(x, list(self.cores), self.in_modes, self.out_modes)
        y = y.reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> Tensor:
        """The implied (out_features, in_features) weight, from the cores alone."""
        acc = self.cores[0][0]  # (m1, n1, r1)
        for core in self.cores[1:]:
            rows, cols = acc.shape[0], acc.shape[1]
            acc = torch.einsum("MNr,rmns->MmNns", acc, core)
            acc = acc.reshape(rows * core.shape[1], cols * core.shape[2], core.shape[3])
        return acc[..., 0].t()

    def stored_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_parameters(self) -> int:
        """Parameters of the nn.Linear this layer stands for."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"{self.in_modes} -> {self.out_modes}, ranks={list(self.ranks)}, "
                f"{self.dense_parameters() / self.stored_parameters():.1f}x")
