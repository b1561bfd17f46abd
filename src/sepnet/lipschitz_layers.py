"""1-Lipschitz building blocks of a certifiable convnet, each with its exact L2 norm.

- `OrthoConv2d`: an orthogonal k x k convolution, stride 1, "same" circular padding, from
  orthogonium's AdaptiveOrthoConv2d (AOC; Boissin et al. 2025: BCOP x RKO, an explicit kernel
  kept orthogonal by its parametrization; MIT). Chosen over deel-torchlip's SpectralConv2d and
  orthogonium's AOL on a measurement (`benchmarks/certified.py --layers`, BENCHMARKS.md): AOC's
  norm is exactly 1, where SpectralConv2d's normalization leaves 0.63 (a third of every margin
  lost) and AOL's rescaling is at most 1 but only tight for an orthogonal kernel; AOC costs
  1.25x a plain convolution's training step on the CPU, AOL and SpectralConv2d 1.07x.
- `SeparablePointwise`: a 1x1 convolution whose channel matrix is a Kronecker product (channels
  split in modes, e.g. 256 = 16 x 16), an orthogonal SeparableLinear applied at every pixel: the
  separable method inside a convnet.

The norm of a circular convolution on an n x n map is exact by Fourier analysis (Sedghi et al.
2019): it is the largest singular value over the n^2 frequencies of the (out x in) matrices of
the kernel's 2-D DFT. With zero padding the same computation on the padded (n + k - 1) grid
bounds it from above (the zero-padded map is a restriction of that circular one).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from sepnet.layers import SeparableLinear
from sepnet.lipschitz import LipschitzModule, MeasuredParametrization, OrthogonalParametrization

__all__ = ["BjorckOrthonormal", "RowNormalized", "row_normalized_linear_", "OrthoConv2d", "SeparablePointwise", "circular_conv_norm", "orthonormal_linear_"]


def circular_conv_norm(kernel: Tensor, grid: tuple[int, int]) -> float:
    """L2 operator norm of the circular convolution (or cross-correlation) by `kernel`
    (out, in, kh, kw) on a `grid` (h, w) map: max over frequencies of sigma_max of the DFT."""
    out, inp, kh, kw = kernel.shape
    h, w = grid
    if kh > h or kw > w:
        raise ValueError(f"kernel {kh}x{kw} larger than the {h}x{w} map")
    with torch.no_grad():
        padded = kernel.new_zeros((out, inp, h, w), dtype=torch.float64)
        padded[:, :, :kh, :kw] = kernel.detach().double()
        spectrum = torch.fft.fft2(padded).permute(2, 3, 0, 1)  # (h, w, out, in)
        return float(torch.linalg.matrix_norm(spectrum, ord=2).max())


class BjorckOrthonormal(OrthogonalParametrization):
    """Parametrization of a weight by its (semi-)orthogonal polar factor, computed by Bjorck /
    Newton-Schulz iterations X <- 1.5 X - 0.5 X X^T X from W / ||W||_F and differentiated
    through (Anil et al. 2019, "Sorting out Lipschitz function approximation"). Each iteration
    maps every singular value of [0, 1] into [0, 1] (s -> 1.5 s - 0.5 s^3) and towards 1, so the
    result's norm is at most 1 whatever the count (sepnet.lipschitz measures it anyway).
    Used where torch's `parametrizations.orthogonal` is impractical: on a 10 x 6144 classifier
    it takes ~8 s a forward-backward on the CPU (it works with the 6144-square), this ~1 ms."""

    def __init__(self, iterations: int = 15) -> None:
        super().__init__()
        self.iterations = iterations

    def forward(self, weight: Tensor) -> Tensor:
        tall = weight.shape[0] > weight.shape[1]
        x = weight.t() if tall else weight  # rows <= columns: the small Gram is rows x rows
        x = x / x.norm().clamp_min(1e-12)
        for _ in range(self.iterations):
            x = 1.5 * x - 0.5 * (x @ x.t()) @ x
        return x.t() if tall else x

    def extra_repr(self) -> str:
        return f"iterations={self.iterations}"


def orthonormal_linear_(layer: nn.Linear, iterations: int = 15) -> nn.Linear:
    """Register BjorckOrthonormal on `layer.weight` (in place); returns the layer."""
    nn.utils.parametrize.register_parametrization(layer, "weight", BjorckOrthonormal(iterations))
    return layer


class RowNormalized(MeasuredParametrization):
    """Parametrization of a weight by its rows each scaled to unit L2 norm: last-layer
    normalization (Singla, Singla and Feizi, ICLR 2022, "Improved deterministic l2 robustness on
    CIFAR-10 and CIFAR-100"). A classifier's logits are then w_j . g(x) with every ||w_j|| = 1,
    so no class wins by the length of its row; the rows need not be orthogonal, so the pairwise
    certificate (||w_y - w_j|| <= 2, sepnet.lipschitz.pairwise_bound) is the one that pays, and
    the layer's bound is its measured spectral norm (at most sqrt(rows))."""

    def forward(self, weight: Tensor) -> Tensor:
        return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)


def row_normalized_linear_(layer: nn.Linear) -> nn.Linear:
    """Register RowNormalized on `layer.weight` (in place); returns the layer."""
    nn.utils.parametrize.register_parametrization(layer, "weight", RowNormalized())
    return layer


class OrthoConv2d(LipschitzModule):
    """Orthogonal k x k convolution, stride 1, for (in_channels, *input_hw) maps.

    Args:
        in_channels, out_channels: channels (out < in: rows orthonormal, norm 1; out > in: an
            isometry).
        kernel_size: odd kernel side (1 gives an orthogonal channel map).
        input_hw: the map's (height, width), which the exact norm needs.
        padding_mode: "circular" (the map is exactly orthogonal; its norm exact) or "zeros"
            (orthogonal inside, norm <= 1 at the border; its norm bounded above).
        bias: a learnable bias (no effect on the Lipschitz constant).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, input_hw: Sequence[int],
                 padding_mode: str = "circular", bias: bool = True) -> None:
        super().__init__()
        from orthogonium.layers.conv.AOC.ortho_conv import AdaptiveOrthoConv2d

        if kernel_size % 2 != 1:
            raise ValueError(f"OrthoConv2d kernel_size {kernel_size}: expected an odd size ('same' padding)")
        if padding_mode not in ("circular", "zeros"):
            raise ValueError(f"OrthoConv2d padding_mode {padding_mode!r}: expected 'circular' or 'zeros'")
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.padding_mode = padding_mode
        self.conv = AdaptiveOrthoConv2d(in_channels, out_channels, kernel_size, stride=1, padding="same",
                                        padding_mode=padding_mode, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def lipschitz_constant(self) -> float:
        """The exact L2 norm of the linear part (circular), or an upper bound (zeros)."""
        k = self.conv.kernel_size[0]
        grid = self.input_hw if self.padding_mode == "circular" else tuple(n + k - 1 for n in self.input_hw)
        return circular_conv_norm(self.conv.weight, grid)

    @property
    def lipschitz_rule(self) -> str:
        return ("orthogonal conv, DFT norm (exact)" if self.padding_mode == "circular"
                else "orthogonal conv, DFT norm on the padded grid (upper bound)")

    def extra_repr(self) -> str:
        return f"input_hw={self.input_hw}"


class ChannelsFirstSeparableLinear(SeparableLinear):
    """A SeparableLinear applied to channels-first maps: (N, *in_shape, P) -> (N, *out_shape, P),
    the modes after the batch and P (the pixels) last, as an NCHW map is laid out. Its mode
    products are then batched GEMMs on the map as it lies (mode k: (N * prod(modes before k),
    d_k, rest) views), where the rows layout needs the map transposed to NHWC and back; its
    implied path and its fold are the same as a 1x1 convolution. Everything else -- factors,
    parametrization, counts, norms -- is SeparableLinear's."""

    def forward(self, x: Tensor) -> Tensor:
        n = self.num_modes
        if x.dim() != n + 2 or tuple(x.shape[1:n + 1]) != self.in_shape:
            raise ValueError(f"{type(self).__name__} expected input of shape (N, {', '.join(map(str, self.in_shape))}, "
                             f"P), got {tuple(x.shape)}")
        batch, pixels = x.shape[0], x.shape[-1]
        bias = self.bias.reshape(1, -1, 1) if self.bias is not None else None
        if self.uses_implied(batch * pixels):  # one GEMM per image with the implied matrix
            w = self.implied_weight()
            y = torch.matmul(w if torch.is_autocast_enabled(x.device.type) else w.to(x.dtype), x.reshape(batch, -1, pixels))
            return (y if bias is None else y + bias.to(y.dtype)).reshape(batch, *self.out_shape, pixels)
        y = self.mode_products(x).reshape(batch, -1, pixels)
        return (y if bias is None else y + bias.to(y.dtype)).reshape(batch, *self.out_shape, pixels)

    def folded(self) -> nn.Module:
        """The implied matrix as a kernel-1 convolution over the pixels, modes flattened around it."""
        n = self.num_modes
        dense = super().folded()[1]  # nn.Linear (out, in) with the implied weight and the bias
        conv = nn.Conv1d(self.in_features, self.out_features, 1, bias=dense.bias is not None).to(dense.weight)
        with torch.no_grad():
            conv.weight.copy_(dense.weight[:, :, None])
            if dense.bias is not None:
                conv.bias.copy_(dense.bias)
        return nn.Sequential(nn.Flatten(1, n), conv, nn.Unflatten(1, self.out_shape))


class SeparablePointwise(LipschitzModule):
    """A 1x1 convolution (C, H, W) -> (C', H, W) whose C' x C channel matrix is the Kronecker
    product of an orthogonal SeparableLinear over channel modes (C = prod(in_modes)): the same
    map at every pixel, so the operator is I_HW (x) W and its L2 norm is W's. The layer works on
    the NCHW map as it lies (ChannelsFirstSeparableLinear: no transposes)."""

    def __init__(self, in_modes: Sequence[int], out_modes: Sequence[int], rank: int = 1,
                 orthogonal: bool = True) -> None:
        super().__init__()
        self.layer = ChannelsFirstSeparableLinear(in_modes, out_modes, rank, orthogonal=orthogonal)
        self.in_shape = self.layer.in_shape  # its own: an export may fold `layer` into a dense one

    @property
    def orthogonal(self) -> bool:
        return self.layer.orthogonal

    lipschitz_rule = "orthogonal separable pointwise, measured"

    def lipschitz_constant(self) -> float | None:
        """The measured norm of the channel map (orthogonal: 1 up to rounding), the layer's."""
        return self.layer.lipschitz_constant()

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        y = self.layer(x.reshape(n, *self.in_shape, h * w))
        return y.reshape(n, -1, h, w)
