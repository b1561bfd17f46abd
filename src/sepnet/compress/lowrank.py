"""`lowrank`: the low-rank baseline. An nn.Linear weight as U V (rank r), an nn.Conv2d as a
Tucker-2 decomposition (Kim et al. 2016, "Compression of deep convolutional neural networks for
fast and low power mobile applications"): a 1 x 1 convolution to r input-side channels, the
kH x kW core convolution to r output-side channels, a 1 x 1 convolution back out.

options: rank (int; for a convolution both Tucker ranks, each capped at its channel count),
init ("random" default, or "svd": the truncated SVD of the current weight, for a convolution
the truncated HOSVD of the kernel on its two channel modes; Kim et al. pick ranks by VBMF, the
budget picks them here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sepnet.compress.factorize import Factorization, Unit
from sepnet.factorized import FactorizedLayer

__all__ = ["LowRankLinear", "Tucker2Conv2d", "LowRank"]


def _leading(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(matrix.detach(), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


class LowRankLinear(FactorizedLayer):
    """nn.Linear(in_features, out_features) as W = U V, U (out, r), V (r, in). Random init gives
    the implied weight nn.Linear's entry variance, 1 / (3 in_features)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"low-rank rank {rank}: expected 1..{min(in_features, out_features)} for a "
                             f"{in_features} -> {out_features} layer")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.second = nn.Parameter(torch.randn(out_features, rank) / math.sqrt(3 * rank))
        bound = 1 / math.sqrt(in_features)
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """The truncated SVD of `linear`, singular values split evenly (`approximation_error`:
        its relative error)."""
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        u, s, vh = _leading(linear.weight, rank)
        with torch.no_grad():
            layer.second.copy_(u * s.sqrt())
            layer.first.copy_(s.sqrt()[:, None] * vh)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        error = (layer.implied_weight() - linear.weight).norm() / linear.weight.norm().clamp_min(1e-30)
        layer.approximation_error = float(error.detach())
        return layer

    def implied_weight(self) -> Tensor:
        return self.second @ self.first

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_implied(x.numel() // max(1, x.shape[-1])):
            return nn.functional.linear(x, self.implied_weight(), self.bias)
        return nn.functional.linear(nn.functional.linear(x, self.first), self.second, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, rank={self.rank}, {self.compression():.1f}x"


class Tucker2Conv2d(FactorizedLayer):
    """nn.Conv2d(in_channels, out_channels, kernel_size) as 1 x 1 (C -> r_in), the kH x kW core
    (r_in -> r_out; stride, padding, dilation), 1 x 1 (r_out -> S, bias). Random init gives the
    implied kernel nn.Conv2d's entry variance, 1 / (3 C kH kW)."""

    stands_for = nn.Conv2d

    def __init__(self, conv: nn.Conv2d, ranks: tuple[int, int]) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"Tucker2Conv2d: {conv} must have groups 1 and zero padding")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.rank_in, self.rank_out = min(ranks[0], conv.in_channels), min(ranks[1], conv.out_channels)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        kh, kw = self.kernel_size
        self.first = nn.Parameter(torch.randn(self.rank_in, self.in_channels, 1, 1) / math.sqrt(self.in_channels))
        self.core = nn.Parameter(torch.randn(self.rank_out, self.rank_in, kh, kw) / math.sqrt(self.rank_in * kh * kw))
        self.last = nn.Parameter(torch.randn(self.out_channels, self.rank_out, 1, 1) / math.sqrt(3 * self.rank_out))
        bound = 1 / math.sqrt(self.in_channels * kh * kw)
        self.bias = nn.Parameter(torch.empty(self.out_channels).uniform_(-bound, bound)) if conv.bias is not None else None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: tuple[int, int]) -> "Tucker2Conv2d":
        """The truncated HOSVD of `conv`'s kernel on its output and input channel modes
        (`approximation_error`: its relative error)."""
        layer = cls(conv, ranks).to(device=conv.weight.device, dtype=conv.weight.dtype)
        kernel = conv.weight.detach()
        out_basis = _leading(kernel.flatten(1), layer.rank_out)[0]  # (S, r_out)
        in_basis = _leading(kernel.transpose(0, 1).flatten(1), layer.rank_in)[0]  # (C, r_in)
        with torch.no_grad():
            layer.core.copy_(torch.einsum("sb,scyx,ca->bayx", out_basis, kernel, in_basis))
            layer.last.copy_(out_basis[:, :, None, None])
            layer.first.copy_(in_basis.t()[:, :, None, None])
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        error = (layer.implied_weight() - kernel).norm() / kernel.norm().clamp_min(1e-30)
        layer.approximation_error = float(error.detach())
        return layer

    def implied_weight(self) -> Tensor:
        return torch.einsum("sb,bayx,ac->scyx", self.last[:, :, 0, 0], self.core, self.first[:, :, 0, 0])

    def forward(self, x: Tensor) -> Tensor:
        args = (self.stride, self.padding, self.dilation)
        if self.uses_implied(x.shape[0]):
            return nn.functional.conv2d(x, self.implied_weight(), self.bias, *args)
        z = nn.functional.conv2d(nn.functional.conv2d(x, self.first), self.core, None, *args)
        return nn.functional.conv2d(z, self.last, self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.out_channels}, kernel {self.kernel_size}, "
                f"ranks=({self.rank_in}, {self.rank_out}), {self.compression():.1f}x")


class LowRank(Factorization, name="lowrank", targets=(nn.Linear, nn.Conv2d)):
    """nn.Linear -> LowRankLinear, nn.Conv2d -> Tucker2Conv2d (see the module docstring)."""

    defaults = {"rank": 8, "init": "random"}

    def units(self, net, layers):
        self.check_choice("init", ("random", "svd"))
        return [Unit([(name, m)], lambda r, m=m: self._cost(m, r)) for name, m in layers]

    @staticmethod
    def _cost(m: nn.Module, r: int) -> int:
        bias = m.bias.numel() if m.bias is not None else 0
        if isinstance(m, nn.Linear):
            return min(r, m.in_features, m.out_features) * (m.in_features + m.out_features) + bias
        r_in, r_out = min(r, m.in_channels), min(r, m.out_channels)
        return m.in_channels * r_in + r_out * r_in * math.prod(m.kernel_size) + r_out * m.out_channels + bias

    def build(self, unit, rank):
        (_, m), svd = unit.layers[0], self.options["init"] == "svd"
        if isinstance(m, nn.Linear):
            rank = min(rank, m.in_features, m.out_features)
            layer = (LowRankLinear.from_linear(m, rank) if svd else
                     LowRankLinear(m.in_features, m.out_features, rank, m.bias is not None))
            shape = f"rank {rank}"
        else:
            layer = Tucker2Conv2d.from_conv(m, (rank, rank)) if svd else Tucker2Conv2d(m, (rank, rank))
            shape = f"Tucker-2 ranks ({layer.rank_in}, {layer.rank_out})"
        error = layer.approximation_error
        extra = f", SVD error {error:.3f}" if error is not None else ""
        return [layer], f"lowrank {shape}: {layer.stored_parameters():,} / {layer.dense_parameters():,}{extra}"
