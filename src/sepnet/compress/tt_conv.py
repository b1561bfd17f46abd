"""`tt_conv`: tensor-train convolutions (Garipov et al. 2016, "Ultimate tensorization")."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from sepnet.compress.factorize import Factorization, Unit, mode_split
from sepnet.compress.tt import capped_ranks, contract, contraction_macs, load_cores_, tensor_train
from sepnet.factorized import FactorizedLayer, built_matrix_pays

__all__ = ["TTConv2d", "TTConv"]


class TTConv2d(FactorizedLayer):
    """nn.Conv2d(prod(in_modes), prod(out_modes), kernel_size) in tensor-train format
    (Garipov et al. 2016, "Ultimate tensorization"):

        K[x, y, (c1..cd), (s1..sd)] = G0[x, y, :] G1[:, c1, s1, :] ... Gd[:, cd, sd, :]

    a spatial core G0 of shape (kH, kW, r0), then channel cores (r_{k-1}, c_k, s_k, r_k), r_d = 1.
    The structured forward convolves every input channel with the r0 spatial filters (one grouped
    conv, stride / padding / dilation as nn.Conv2d's) and contracts the (channel, r0) maps with
    the channel cores at every pixel, never building the kernel. Where building the kernel and
    one convolution with it cost at most `factorized.MATRIX_WORK_FACTOR` times that
    (`_implied_pays`: every CIFAR-sized layer at a training batch), the forward builds the kernel
    from the cores and runs one convolution at nn.Conv2d's speed instead: the same function and
    gradients (`implied_path` switches by hand; benchmarks/layers.py --tt-paths times both).

    naive=True stores the plain 4-way TT of the kernel, cores over (kH, kW, C, S), and convolves
    with the rebuilt kernel: the baseline the paper compares against.

    Initialization: normal cores whose implied kernel entries have nn.Conv2d's variance,
    1 / (3 C kH kW).
    """

    stands_for = nn.Conv2d

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
        self.ranks = capped_ranks(sizes, inner)
        fan_in = self.in_channels * math.prod(self.kernel_size)
        std = (1 / (3 * fan_in * math.prod(self.ranks))) ** (1 / (2 * len(sizes)))
        self.cores = nn.ParameterList(nn.Parameter(torch.randn(self.ranks[k], n, self.ranks[k + 1]) * std)
                                      for k, n in enumerate(sizes))
        bound = 1 / math.sqrt(fan_in)
        self.bias = nn.Parameter(torch.empty(self.out_channels).uniform_(-bound, bound)) if bias else None
        # the kernel path's cost against the structured one's (shapes and ranks are fixed): see _implied_pays
        self._path_costs = (self.build_macs(), self.in_channels * self.out_channels * math.prod(self.kernel_size),
                            self.macs_per_pixel())

    def _sizes(self) -> list[int]:
        """Mode sizes of the cores: (kH kW, c1 s1, ..., cd sd), or (kH, kW, C, S) when naive."""
        if self.naive:
            return [*self.kernel_size, self.in_channels, self.out_channels]
        return [math.prod(self.kernel_size), *(c * s for c, s in zip(self.in_modes, self.out_modes))]

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, in_modes: Sequence[int], out_modes: Sequence[int],
                  rank: int | Sequence[int], naive: bool = False) -> "TTConv2d":
        """The TT-SVD approximation of `conv` (`approximation_error`: its relative Frobenius error)."""
        if conv.groups != 1 or (math.prod(in_modes), math.prod(out_modes)) != (conv.in_channels, conv.out_channels):
            raise ValueError(f"TT conv modes {tuple(in_modes)} -> {tuple(out_modes)} do not fit {conv}: expected "
                             f"{conv.in_channels} -> {conv.out_channels} channels, groups 1")
        layer = cls(in_modes, out_modes, conv.kernel_size, rank, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, naive=naive).to(device=conv.weight.device, dtype=conv.weight.dtype)
        cores = tensor_train(layer._arranged(conv.weight), layer.ranks)
        layer.approximation_error = load_cores_(layer, cores, conv.bias, layer.implied_weight, conv.weight)
        return layer

    def _arranged(self, kernel: Tensor) -> Tensor:
        """An (S, C, kH, kW) kernel as the tensor the cores factorize (see `_sizes`)."""
        k = kernel.permute(2, 3, 1, 0)  # (kH, kW, C, S)
        if self.naive:
            return k
        d = len(self.in_modes)
        k = k.reshape(math.prod(self.kernel_size), *self.in_modes, *self.out_modes)
        order = [0, *(axis for j in range(d) for axis in (1 + j, 1 + d + j))]
        return k.permute(order).reshape(self._sizes())

    def implied_weight(self) -> Tensor:
        """The implied (S, C, kH, kW) kernel, from the cores alone."""
        cores = list(self.cores)  # not self.cores[1:] (see TTLinear.implied_weight)
        acc = cores[0].reshape(-1, cores[0].shape[-1])
        for core in cores[1:]:
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
        return spatial + contraction_macs(self.in_modes, self.out_modes, self.ranks[1:])

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

    def _implied_pays(self, pixels: int) -> bool:
        """Convolve with the built kernel when building it and the dense convolution cost at most
        `factorized.MATRIX_WORK_FACTOR` x the structured forward's multiply-adds over these output
        pixels (TTLinear's rule): the structured forward's grouped conv into C r0 maps and its
        per-pixel contractions run far below a dense convolution's speed per multiply-add."""
        return built_matrix_pays(*self._path_costs, pixels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"TTConv2d expects (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        if self.naive or self.uses_implied(self._output_pixels(x)):
            kernel, bias = self.implied_weight(), self.bias
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
        t = contract(t.reshape(batch * height * width, -1), cores, self.in_modes, self.out_modes, first_rank=r0)
        y = t.reshape(batch, height, width, self.out_channels).permute(0, 3, 1, 2)
        return y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"{self.in_modes} -> {self.out_modes}, kernel {self.kernel_size}, ranks={list(self.ranks)}"
                f"{', naive' if self.naive else ''}, {self.dense_parameters() / self.stored_parameters():.1f}x")


class TTConv(Factorization, name="tt_conv", targets=(nn.Conv2d,)):
    """nn.Conv2d (groups 1) -> TTConv2d. options: modes (channel cores, default 2), rank (int),
    init ("random" default, or "from_conv": TT-SVD of the current kernel), naive (the plain
    4-way TT of the kernel instead of the spatial core + channel cores)."""

    defaults = {"modes": 2, "rank": 8, "init": "random", "naive": False}

    def units(self, net, layers):
        opts = self.options
        self.check_choice("init", ("random", "from_conv"))
        units = []
        for name, conv in layers:
            if conv.groups != 1 or conv.padding_mode != "zeros":
                raise self.error(f"{name} has groups {conv.groups} / padding mode {conv.padding_mode!r}; "
                                 "expected an ordinary convolution")
            in_modes, out_modes = mode_split(conv.in_channels, opts["modes"]), mode_split(conv.out_channels, opts["modes"])
            sizes = ([*conv.kernel_size, conv.in_channels, conv.out_channels] if opts["naive"] else
                     [math.prod(conv.kernel_size), *(c * s for c, s in zip(in_modes, out_modes))])
            bias = conv.out_channels if conv.bias is not None else 0

            def cost(r, sizes=sizes, b=bias):
                ranks = capped_ranks(sizes, [r] * (len(sizes) - 1))
                return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(sizes)) + b
            units.append(Unit([(name, conv)], cost, (in_modes, out_modes)))
        return units

    def build(self, unit, rank):
        (_, conv), (in_modes, out_modes) = unit.layers[0], unit.plan
        naive, extra = self.options["naive"], ""
        if self.options["init"] == "from_conv":
            layer = TTConv2d.from_conv(conv, in_modes, out_modes, rank, naive=naive)
            extra = f", TT-SVD error {layer.approximation_error:.3f}"
        else:
            layer = TTConv2d(in_modes, out_modes, conv.kernel_size, rank, conv.stride, conv.padding, conv.dilation,
                             bias=conv.bias is not None, naive=naive)
        return [layer], (f"tt_conv{' (naive)' if naive else ''} {in_modes} -> {out_modes} ranks "
                         f"{list(layer.ranks)}: {layer.stored_parameters():,} / {layer.dense_parameters():,}{extra}")
