"""Joint SVD of repeated convolutions (Chen et al., "Joint matrix decomposition for deep
convolutional neural networks compression").

A kH x kW kernel K (O, I, kH, kW) unfolds to the (I kH) x (O kW) matrix M[(i, y), (o, x)] =
K[o, i, y, x]; a rank-r factorization M = U V is a kH x 1 convolution (I -> r, weights U) followed
by a 1 x kW convolution (r -> O, weights V), the strides, paddings and dilations split between
them. Same-shape convolutions of one stage share factors:

- "svd": each layer its own U_n V_n (the baseline);
- "ljsvd": one U for the group, private V_n (truncated SVD of [M_1 ... M_N]);
- "rjsvd": one V for the group, private U_n (truncated SVD of [M_1; ...; M_N]);
- "bijsvd": M_n = U_n V + U V_n, the rank split p = r_l / (r_l + r_r), fitted by alternating
  RJSVD and LJSVD on the residuals from zero for K iterations (the error never increases).

Shared factors stay shared parameters during fine-tuning.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SVDConv2d", "unfold_kernel", "fold_kernel", "joint_svd", "JOINT_METHODS"]

JOINT_METHODS = ("svd", "ljsvd", "rjsvd", "bijsvd")


def unfold_kernel(kernel: Tensor) -> Tensor:
    """(O, I, kH, kW) -> the (I kH) x (O kW) matrix M[(i, y), (o, x)]."""
    o, i, kh, kw = kernel.shape
    return kernel.permute(1, 2, 0, 3).reshape(i * kh, o * kw)


def fold_kernel(matrix: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of `unfold_kernel` for a kernel of `shape` (O, I, kH, kW)."""
    o, i, kh, kw = shape
    return matrix.reshape(i, kh, o, kw).permute(2, 0, 1, 3)


def _truncated(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(U, V) with U V the best rank-`rank` approximation; singular values split evenly."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def joint_svd(matrices: Sequence[Tensor], method: str, rank: int, iterations: int = 10,
              split: float = 0.5) -> list[list[tuple[Tensor, Tensor]]]:
    """Factors per matrix: for each, a list of (U, V) terms whose products sum to its
    approximation; a factor object shared between matrices is the same tensor. `rank` is the
    rank of each term (bijsvd: split into round(split * rank) for U_n V and the rest for U V_n)."""
    if method not in JOINT_METHODS:
        raise ValueError(f"unknown joint SVD method {method!r}; expected one of {list(JOINT_METHODS)}")
    if rank < 1:
        raise ValueError(f"joint SVD rank must be >= 1, got {rank}")
    ms = [m.detach() for m in matrices]
    if method == "svd":
        return [[_truncated(m, rank)] for m in ms]
    if method == "ljsvd":
        u, _ = _truncated(torch.cat(ms, 1), rank)
        basis = torch.linalg.pinv(u)  # V_n = argmin ||M_n - U V_n|| = U^+ M_n
        return [[(u, basis @ m)] for m in ms]
    if method == "rjsvd":
        _, v = _truncated(torch.cat(ms, 0), rank)
        basis = torch.linalg.pinv(v)
        return [[(m @ basis, v)] for m in ms]
    r_right = max(1, min(rank - 1, round(split * rank)))  # U_n V: shared V
    r_left = max(1, rank - r_right)  # U V_n: shared U
    shared_u = torch.zeros(ms[0].shape[0], r_left, dtype=ms[0].dtype, device=ms[0].device)
    private_v = [torch.zeros(r_left, m.shape[1], dtype=m.dtype, device=m.device) for m in ms]
    for _ in range(max(1, iterations)):
        residual = [m - shared_u @ v for m, v in zip(ms, private_v)]
        _, shared_v = _truncated(torch.cat(residual, 0), r_right)
        pinv_v = torch.linalg.pinv(shared_v)
        private_u = [r @ pinv_v for r in residual]
        residual = [m - u @ shared_v for m, u in zip(ms, private_u)]
        shared_u, _ = _truncated(torch.cat(residual, 1), r_left)
        pinv_u = torch.linalg.pinv(shared_u)
        private_v = [pinv_u @ r for r in residual]
    return [[(u, shared_v), (shared_u, v)] for u, v in zip(private_u, private_v)]


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class SVDConv2d(nn.Module):
    """A convolution as a sum of (kH x 1 conv to r maps, then 1 x kW conv) branches.

    Args:
        conv: the nn.Conv2d it stands for (shape, stride, padding, dilation and bias taken from
            it; groups 1, zero padding).
        ranks: the rank of each branch.
        shared: {(branch, "vertical" | "horizontal"): nn.Parameter} factors to use instead of
            new ones (joint SVD: one object in several layers).
    """

    def __init__(self, conv: nn.Conv2d, ranks: Sequence[int],
                 shared: dict[tuple[int, str], nn.Parameter] | None = None) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"SVDConv2d: {conv} must have groups 1 and numeric zero padding")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = _pair(conv.kernel_size)
        (sh, sw), (ph, pw), (dh, dw) = _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation)
        self._vertical_args = dict(stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1))
        self._horizontal_args = dict(stride=(1, sw), padding=(0, pw), dilation=(1, dw))
        shared = shared or {}
        kh, kw = self.kernel_size
        self.vertical = nn.ParameterList()
        self.horizontal = nn.ParameterList()
        for b, r in enumerate(ranks):
            vertical, horizontal = shared.get((b, "vertical")), shared.get((b, "horizontal"))
            self.vertical.append(vertical if vertical is not None else nn.Parameter(
                torch.randn(r, self.in_channels, kh, 1) / math.sqrt(self.in_channels * kh)))
            self.horizontal.append(horizontal if horizontal is not None else nn.Parameter(
                torch.randn(self.out_channels, r, 1, kw) / math.sqrt(r * kw)))
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None

    def set_factors_(self, terms: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Load (U, V) matrix factors of the unfolded kernel into the branches."""
        o, i = self.out_channels, self.in_channels
        kh, kw = self.kernel_size
        with torch.no_grad():
            for vertical, horizontal, (u, v) in zip(self.vertical, self.horizontal, terms):
                r = u.shape[1]
                vertical.copy_(u.t().reshape(r, i, kh, 1))
                horizontal.copy_(v.reshape(r, o, kw).permute(1, 0, 2).unsqueeze(2))

    def kernel(self) -> Tensor:
        """The implied (O, I, kH, kW) kernel."""
        total = 0
        for vertical, horizontal in zip(self.vertical, self.horizontal):
            r = vertical.shape[0]
            u = vertical.reshape(r, -1).t()  # (I kH, r)
            v = horizontal.squeeze(2).permute(1, 0, 2).reshape(r, -1)  # (r, O kW)
            total = total + u @ v
        return fold_kernel(total, (self.out_channels, self.in_channels, *self.kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        y = sum(nn.functional.conv2d(nn.functional.conv2d(x, vertical, None, **self._vertical_args),
                                     horizontal, None, **self._horizontal_args)
                for vertical, horizontal in zip(self.vertical, self.horizontal))
        return y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y

    def stored_parameters(self) -> int:
        """Parameters held by this layer, shared factors included (counted once per model by
        sepnet.constraints.parameter_counts)."""
        return sum(p.numel() for p in self.parameters())

    def dense_parameters(self) -> int:
        return (self.in_channels * self.out_channels * math.prod(self.kernel_size)
                + (self.out_channels if self.bias is not None else 0))

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, kernel {self.kernel_size}, ranks {[p.shape[0] for p in self.vertical]}"
