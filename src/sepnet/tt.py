"""Tensor-train (TT) layers (Novikov et al. 2015, "Tensorizing neural networks").

A TT layer stores the weight of an nn.Linear with in_features = m1...md and out_features =
n1...nd as d cores G_k of shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1:

    W[(i1..id), (j1..jd)] = G1[:, i1, j1, :] G2[:, i2, j2, :] ... Gd[:, id, jd, :]

The forward contracts the input with one core after the other (from whichever end costs fewer
multiply-adds) and never builds W.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from sepnet.layers import built_matrix_pays

__all__ = ["TTLinear", "TTConv2d", "tensor_train", "tt_ranks", "tt_parameters", "tt_svd"]


def tt_ranks(in_modes: Sequence[int], out_modes: Sequence[int], rank: int | Sequence[int]) -> tuple[int, ...]:
    """The d + 1 ranks (1, r1, ..., r_{d-1}, 1): an int is the same internal rank everywhere,
    each capped at the largest rank the cut between cores allows."""
    d = len(in_modes)
    inner = [rank] * (d - 1) if isinstance(rank, int) else list(rank)
    if len(inner) != d - 1:
        raise ValueError(f"TT ranks {list(rank)}: expected {d - 1} internal ranks for {d} cores")
    if any(r < 1 for r in inner):
        raise ValueError(f"TT ranks must be >= 1, got {inner}")
    return _capped([m * n for m, n in zip(in_modes, out_modes)], inner)


def _capped(sizes: Sequence[int], inner: Sequence[int]) -> tuple[int, ...]:
    """Ranks (1, r1, ..., 1) of a TT with mode sizes `sizes`, each internal rank cut to what its
    neighbours can carry (r_k <= r_{k-1} n_k and r_k <= n_{k+1} r_{k+1}): no rank is wasted."""
    ranks = [1, *inner, 1]
    for k in range(1, len(ranks) - 1):
        ranks[k] = min(ranks[k], ranks[k - 1] * sizes[k - 1])
    for k in range(len(ranks) - 2, 0, -1):
        ranks[k] = min(ranks[k], ranks[k + 1] * sizes[k])
    return tuple(ranks)


def tensor_train(tensor: Tensor, ranks: Sequence[int]) -> list[Tensor]:
    """TT-SVD (Oseledets 2011): cores (r_{k-1}, n_k, r_k) of a d-way tensor by sequential
    truncated SVDs; `ranks` as from `_capped` (1 at both ends). Exact when the tensor's TT ranks
    are within them."""
    sizes = tensor.shape
    rest = tensor.detach().reshape(1, -1)
    cores = []
    for k, n in enumerate(sizes):
        rest = rest.reshape(ranks[k] * n, -1)
        if k == len(sizes) - 1:
            cores.append(rest.reshape(ranks[k], n, 1))
            break
        u, s, vh = torch.linalg.svd(rest, full_matrices=False)
        r = ranks[k + 1]
        cores.append(u[:, :r].reshape(ranks[k], n, r))
        rest = s[:r, None] * vh[:r]
    return cores


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
    cores = tensor_train(_interleaved(weight, in_modes, out_modes), ranks)
    return [core.reshape(core.shape[0], m, n, core.shape[-1]) for core, m, n in zip(cores, in_modes, out_modes)]


@torch.no_grad()
def _load_(layer: nn.Module, cores: Sequence[Tensor], bias: Tensor | None, rebuilt: Callable[[], Tensor],
           reference: Tensor) -> float:
    """Copy TT-SVD cores and the bias into `layer`; the relative error of `rebuilt()` vs `reference`."""
    for core, value in zip(layer.cores, cores):
        core.copy_(value.reshape(core.shape))
    if bias is not None:
        layer.bias.copy_(bias)
    return float((rebuilt() - reference).norm() / reference.norm().clamp_min(1e-30))


def _contract(x: Tensor, cores: Sequence[Tensor], in_modes: Sequence[int], out_modes: Sequence[int],
              first_rank: int = 1) -> Tensor:
    """x (batch, first_rank x prod in_modes) through the cores (r, m, n, r'), first to last: one
    GEMM a core."""
    batch = x.shape[0]
    t = x.reshape(batch, 1, first_rank, -1)  # (batch, output modes done, rank, input modes left)
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
        # the implied matrix's cost against the contractions' (shapes and ranks are fixed): see _materialize
        self._path_costs = (self.build_macs(), self.in_features * self.out_features, self.macs_per_row())

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
        cores = tt_svd(linear.weight, in_modes, out_modes, layer.ranks[1:-1])
        return layer, _load_(layer, cores, linear.bias, layer.dense_weight, linear.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"TTLinear expects {self.in_features} input features, got input of shape "
                             f"{tuple(x.shape)}")
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self._materialize(x.shape[0]):  # small layer, many rows: one GEMM with the implied matrix
            w, bias = self.dense_weight(), self.bias
            if not torch.is_autocast_enabled(x.device.type):  # autocast casts them itself
                w, bias = w.to(x.dtype), bias.to(x.dtype) if bias is not None else None
            return nn.functional.linear(x, w, bias).reshape(*lead, self.out_features)
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

    def macs_per_row(self) -> int:
        """Multiply-adds of the core contractions for one input row, in the order forward uses."""
        if self._reversed:
            return _macs(self.in_modes[::-1], self.out_modes[::-1], self.ranks[::-1])
        return _macs(self.in_modes, self.out_modes, self.ranks)

    def build_macs(self) -> int:
        """Multiply-adds of `dense_weight` (the chain of core products)."""
        total, rows, cols = 0, self.in_modes[0], self.out_modes[0]
        for k in range(1, len(self.in_modes)):
            total += rows * cols * self.ranks[k] * self.in_modes[k] * self.out_modes[k] * self.ranks[k + 1]
            rows, cols = rows * self.in_modes[k], cols * self.out_modes[k]
        return total

    def _materialize(self, rows: int) -> bool:
        """Use the implied matrix when building it and one GEMM with it cost at most 8x the core
        contractions' multiply-adds for these rows (SeparableLinear's factor; its build cost is
        counted here, as a rank-17 head's is not negligible at a batch of 128): d small GEMMs
        with their permutes run far below one GEMM's speed per multiply-add on a CPU (a ViT's
        token layers at 10x do *more* multiply-adds as TT than dense and trained 3x slower;
        benchmarks/layers.py --tt-paths)."""
        return built_matrix_pays(*self._path_costs, rows)

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


class TTConv2d(nn.Module):
    """nn.Conv2d(prod(in_modes), prod(out_modes), kernel_size) in tensor-train format
    (Garipov et al. 2016, "Ultimate tensorization"):

        K[x, y, (c1..cd), (s1..sd)] = G0[x, y, :] G1[:, c1, s1, :] ... Gd[:, cd, sd, :]

    a spatial core G0 of shape (kH, kW, r0), then channel cores (r_{k-1}, c_k, s_k, r_k), r_d = 1.
    The structured forward convolves every input channel with the r0 spatial filters (one grouped
    conv, stride / padding / dilation as nn.Conv2d's) and contracts the (channel, r0) maps with
    the channel cores at every pixel, never building the kernel. Where building the kernel and
    one convolution with it cost at most `layers.MATRIX_WORK_FACTOR` times that (`_materialize`: every
    CIFAR-sized layer at a training batch), the forward builds the kernel from the cores and runs
    one convolution at nn.Conv2d's speed instead: the same function and gradients, 6-33x faster
    forward+backward on a CPU at the VGG-16/4 layers (benchmarks/layers.py --tt-paths).

    naive=True stores the plain 4-way TT of the kernel, cores over (kH, kW, C, S), and convolves
    with the rebuilt kernel: the baseline the paper compares against.

    Initialization: normal cores whose implied kernel entries have nn.Conv2d's variance,
    1 / (3 C kH kW).
    """

    def __init__(self, in_modes: Sequence[int], out_modes: Sequence[int], kernel_size: int | tuple[int, int],
                 rank: int | Sequence[int] = 8, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, bias: bool = True,
                 naive: bool = False) -> None:
        super().__init__()
        if len(in_modes) != len(out_modes) or not in_modes:
            raise ValueError(f"TT conv modes {tuple(in_modes)} -> {tuple(out_modes)}: expected the same number "
                             "(>= 1) of input and output channel modes")
        self.in_modes, self.out_modes = tuple(in_modes), tuple(out_modes)
        self.in_channels, self.out_channels = math.prod(in_modes), math.prod(out_modes)
        self.kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.stride, self.padding, self.dilation, self.naive = stride, padding, dilation, naive
        sizes = self._sizes()
        inner = [rank] * (len(sizes) - 1) if isinstance(rank, int) else list(rank)
        if len(inner) != len(sizes) - 1 or min(inner, default=1) < 1:
            raise ValueError(f"TT conv ranks {inner}: expected {len(sizes) - 1} internal ranks >= 1")
        self.ranks = _capped(sizes, inner)
        fan_in = self.in_channels * math.prod(self.kernel_size)
        std = (1 / (3 * fan_in * math.prod(self.ranks))) ** (1 / (2 * len(sizes)))
        self.cores = nn.ParameterList(nn.Parameter(torch.randn(self.ranks[k], n, self.ranks[k + 1]) * std)
                                      for k, n in enumerate(sizes))
        bound = 1 / math.sqrt(fan_in)
        self.bias = nn.Parameter(torch.empty(self.out_channels).uniform_(-bound, bound)) if bias else None
        # the kernel path's cost against the structured one's (shapes and ranks are fixed): see _materialize
        self._path_costs = (self.build_macs(), self.in_channels * self.out_channels * math.prod(self.kernel_size),
                            self.macs_per_pixel())

    def _sizes(self) -> list[int]:
        """Mode sizes of the cores: (kH kW, c1 s1, ..., cd sd), or (kH, kW, C, S) when naive."""
        if self.naive:
            return [*self.kernel_size, self.in_channels, self.out_channels]
        return [math.prod(self.kernel_size), *(c * s for c, s in zip(self.in_modes, self.out_modes))]

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, in_modes: Sequence[int], out_modes: Sequence[int],
                  rank: int | Sequence[int], naive: bool = False) -> tuple["TTConv2d", float]:
        """(the TT-SVD approximation of `conv`, its relative Frobenius error)."""
        if conv.groups != 1 or (math.prod(in_modes), math.prod(out_modes)) != (conv.in_channels, conv.out_channels):
            raise ValueError(f"TT conv modes {tuple(in_modes)} -> {tuple(out_modes)} do not fit {conv}: expected "
                             f"{conv.in_channels} -> {conv.out_channels} channels, groups 1")
        layer = cls(in_modes, out_modes, conv.kernel_size, rank, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, naive=naive).to(device=conv.weight.device, dtype=conv.weight.dtype)
        cores = tensor_train(layer._arranged(conv.weight), layer.ranks)
        return layer, _load_(layer, cores, conv.bias, layer.kernel, conv.weight)

    def _arranged(self, kernel: Tensor) -> Tensor:
        """An (S, C, kH, kW) kernel as the tensor the cores factorize (see `_sizes`)."""
        k = kernel.permute(2, 3, 1, 0)  # (kH, kW, C, S)
        if self.naive:
            return k
        d = len(self.in_modes)
        k = k.reshape(math.prod(self.kernel_size), *self.in_modes, *self.out_modes)
        order = [0, *(axis for j in range(d) for axis in (1 + j, 1 + d + j))]
        return k.permute(order).reshape(self._sizes())

    def kernel(self) -> Tensor:
        """The implied (S, C, kH, kW) kernel, from the cores alone."""
        acc = self.cores[0].reshape(-1, self.cores[0].shape[-1])
        for core in self.cores[1:]:
            acc = (acc @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
        if self.naive:
            return acc.reshape(*self.kernel_size, self.in_channels, self.out_channels).permute(3, 2, 0, 1)
        d = len(self.in_modes)
        k = acc.reshape(math.prod(self.kernel_size), *(v for c, s in zip(self.in_modes, self.out_modes)
                                                      for v in (c, s)))
        order = [0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2)]  # (kHkW, c1..cd, s1..sd)
        k = k.permute(order).reshape(*self.kernel_size, self.in_channels, self.out_channels)
        return k.permute(3, 2, 0, 1)

    def macs_per_pixel(self) -> int:
        """Multiply-adds of the structured forward per output pixel (grouped spatial conv and
        channel contractions); a naive layer always convolves with its kernel."""
        if self.naive:
            return self.in_channels * self.out_channels * math.prod(self.kernel_size)
        spatial = self.in_channels * self.ranks[1] * math.prod(self.kernel_size)
        return spatial + _macs(self.in_modes, self.out_modes, self.ranks[1:])

    def build_macs(self) -> int:
        """Multiply-adds of `kernel` (the chain of core products)."""
        total, rows = 0, self.cores[0].shape[1]
        for core in self.cores[1:]:
            total += rows * core.shape[0] * core.shape[1] * core.shape[2]
            rows *= core.shape[1]
        return total

    def _output_pixels(self, x: Tensor) -> int:
        """Output pixels of this call over the batch (nn.Conv2d's output size; padding "same" keeps
        the size, "valid" is 0)."""
        if self.padding == "same":
            return x.shape[0] * x.shape[-2] * x.shape[-1]
        padding = 0 if self.padding == "valid" else self.padding
        pixels = 1
        for size, k, s, p, d in zip(x.shape[-2:], self.kernel_size, *(
                (v, v) if isinstance(v, int) else v for v in (self.stride, padding, self.dilation))):
            pixels *= (size + 2 * p - d * (k - 1) - 1) // s + 1
        return x.shape[0] * pixels

    def _materialize(self, pixels: int) -> bool:
        """Convolve with the built kernel when building it and the dense convolution cost at most
        `layers.MATRIX_WORK_FACTOR` x the structured forward's multiply-adds over these output pixels
        (TTLinear's rule): the structured forward's grouped conv into C r0 maps and its
        per-pixel contractions run far below a dense convolution's speed per multiply-add (7x
        slower than the dense conv at a tenth of its parameters, 256 channels on 8x8 maps)."""
        return built_matrix_pays(*self._path_costs, pixels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"TTConv2d expects (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        if self.naive or self._materialize(self._output_pixels(x)):
            kernel, bias = self.kernel(), self.bias
            if not torch.is_autocast_enabled(x.device.type):  # autocast casts them itself
                kernel, bias = kernel.to(x.dtype), bias.to(x.dtype) if bias is not None else None
            return nn.functional.conv2d(x, kernel, bias, self.stride, self.padding, self.dilation)
        batch, channels = x.shape[:2]
        r0 = self.ranks[1]
        spatial = self.cores[0].reshape(*self.kernel_size, r0).permute(2, 0, 1).unsqueeze(1)  # (r0, 1, kH, kW)
        z = nn.functional.conv2d(x, spatial.repeat(channels, 1, 1, 1), None, self.stride, self.padding,
                                 self.dilation, groups=channels)  # (N, C r0, H', W'), channel c*r0 + a
        height, width = z.shape[-2:]
        t = z.reshape(batch, channels, r0, height * width).permute(0, 3, 2, 1)  # (N, H'W', r0, C)
        cores = [core.reshape(core.shape[0], m, n, core.shape[-1])
                 for core, m, n in zip(list(self.cores)[1:], self.in_modes, self.out_modes)]
        t = _contract(t.reshape(batch * height * width, -1), cores, self.in_modes, self.out_modes, first_rank=r0)
        y = t.reshape(batch, height, width, self.out_channels).permute(0, 3, 1, 2)
        return y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y

    def stored_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_parameters(self) -> int:
        """Parameters of the nn.Conv2d this layer stands for."""
        return (self.in_channels * self.out_channels * math.prod(self.kernel_size)
                + (self.out_channels if self.bias is not None else 0))

    def extra_repr(self) -> str:
        return (f"{self.in_modes} -> {self.out_modes}, kernel {self.kernel_size}, ranks={list(self.ranks)}"
                f"{', naive' if self.naive else ''}, {self.dense_parameters() / self.stored_parameters():.1f}x")
