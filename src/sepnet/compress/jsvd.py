"""`jsvd`: joint SVD of repeated convolutions (Chen et al., "Joint matrix decomposition for deep
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

from sepnet.compress.factorize import Factorization, Unit, largest_fitting
from sepnet.factorized import FactorizedLayer

__all__ = ["SVDConv2d", "JointSVD", "unfold_kernel", "fold_kernel", "joint_svd", "equal_budget_rank", "JOINT_METHODS"]

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


class SVDConv2d(FactorizedLayer):
    """A convolution as a sum of (kH x 1 conv to r maps, then 1 x kW conv) branches.

    Args:
        conv: the nn.Conv2d it stands for (shape, stride, padding, dilation and bias taken from
            it; groups 1, zero padding).
        ranks: the rank of each branch.
        shared: {(branch, "vertical" | "horizontal"): nn.Parameter} factors to use instead of
            new ones (joint SVD: one object in several layers).
    """

    stands_for = nn.Conv2d

    def __init__(self, conv: nn.Conv2d, ranks: Sequence[int],
                 shared: dict[tuple[int, str], nn.Parameter] | None = None) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"SVDConv2d: {conv} must have groups 1 and numeric zero padding")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = _pair(conv.kernel_size)
        (sh, sw), (ph, pw), (dh, dw) = _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation)
        self.stride, self.padding, self.dilation = (sh, sw), (ph, pw), (dh, dw)
        self._vertical_args = dict(stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1))
        self._horizontal_args = dict(stride=(1, sw), padding=(0, pw), dilation=(1, dw))
        shared = shared or {}
        kh, kw = self.kernel_size
        new = dict(dtype=conv.weight.dtype, device=conv.weight.device)
        self.vertical = nn.ParameterList()
        self.horizontal = nn.ParameterList()
        for b, r in enumerate(ranks):
            vertical, horizontal = shared.get((b, "vertical")), shared.get((b, "horizontal"))
            self.vertical.append(vertical if vertical is not None else nn.Parameter(
                torch.randn(r, self.in_channels, kh, 1, **new) / math.sqrt(self.in_channels * kh)))
            self.horizontal.append(horizontal if horizontal is not None else nn.Parameter(
                torch.randn(self.out_channels, r, 1, kw, **new) / math.sqrt(r * kw)))
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> "SVDConv2d":
        """One branch: the truncated SVD of `conv`'s unfolded kernel (`approximation_error`: its
        relative error)."""
        layer = cls(conv, [rank])
        layer.set_factors_(joint_svd([unfold_kernel(conv.weight.detach())], "svd", rank)[0])
        kernel = conv.weight.detach()
        layer.approximation_error = float((layer.implied_weight() - kernel).norm() / kernel.norm().clamp_min(1e-30))
        return layer

    def set_factors_(self, terms: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Load (U, V) matrix factors of the unfolded kernel into the branches."""
        o, i = self.out_channels, self.in_channels
        kh, kw = self.kernel_size
        with torch.no_grad():
            for vertical, horizontal, (u, v) in zip(self.vertical, self.horizontal, terms):
                r = u.shape[1]
                vertical.copy_(u.t().reshape(r, i, kh, 1))
                horizontal.copy_(v.reshape(r, o, kw).permute(1, 0, 2).unsqueeze(2))

    def implied_weight(self) -> Tensor:
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

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, kernel {self.kernel_size}, ranks {[p.shape[0] for p in self.vertical]}"


def _joint_cost(method: str, n: int, rows: int, cols: int, rank: int, split: float = 0.5) -> int:
    """Factor entries of a group of n (rows x cols) unfolded kernels at joint rank `rank`."""
    if method == "svd":
        return n * rank * (rows + cols)
    if method == "ljsvd":
        return rank * rows + n * rank * cols
    if method == "rjsvd":
        return n * rank * rows + rank * cols
    right = max(1, min(rank - 1, round(split * rank)))
    left = max(1, rank - right)
    return n * right * rows + right * cols + left * rows + n * left * cols


def equal_budget_rank(method: str, n: int, rows: int, cols: int, per_layer_rank: int, split: float = 0.5) -> int:
    """The largest joint rank whose factors store no more than per-layer SVDs of rank
    `per_layer_rank` (about 2N / (N + 1) times it for LJSVD / RJSVD with I = O)."""
    allowed = _joint_cost("svd", n, rows, cols, per_layer_rank)
    return largest_fitting(lambda r: _joint_cost(method, n, rows, cols, r, split) <= allowed, max(1, 4 * per_layer_rank))


def _conv_groups(net: nn.Module, convs: list[tuple[str, nn.Conv2d]]) -> list[list[tuple[str, nn.Conv2d]]]:
    """Same-shape convolutions of one stage: a pooling layer or another `layerN` starts a stage."""
    stage, stages, prefix = 0, {}, None
    for name, m in net.named_modules():
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            stage += 1
        parts = [p for p in name.split(".") if p.startswith("layer")]
        if parts and parts[0] != prefix:
            prefix, stage = parts[0], stage + 1
        stages[name] = stage
    groups: dict[tuple, list] = {}
    for name, conv in convs:
        key = (stages[name], conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
               conv.dilation, conv.bias is not None)
        groups.setdefault(key, []).append((name, conv))
    return list(groups.values())


class JointSVD(Factorization, name="jsvd", targets=(nn.Conv2d,)):
    """Convolutions -> SVDConv2d (kH x 1 then 1 x kW) with factors shared across same-shape
    layers of a stage. options: method ("ljsvd" default, "rjsvd", "bijsvd", or "svd" per layer),
    rank (the per-layer SVD rank whose parameter count each group matches: the equal-budget
    rule), iterations and split (bijsvd). Factors come from the current weights. The network's
    first convolution and 1 x 1 convolutions stay dense, as in the paper."""

    defaults = {"method": "ljsvd", "rank": 8, "iterations": 10, "split": 0.5}

    def kept(self, net, layers):
        first = next((name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
        return [(name, conv) for name, conv in layers if name == first or conv.kernel_size == (1, 1)]

    def units(self, net, layers):
        method, split = self.options["method"], self.options["split"]
        if method not in JOINT_METHODS:
            raise self.error(f"method {method!r}; expected one of {list(JOINT_METHODS)}")
        units = []
        for group in _conv_groups(net, layers):
            conv = group[0][1]
            rows, cols = conv.in_channels * conv.kernel_size[0], conv.out_channels * conv.kernel_size[1]
            bias = len(group) * conv.out_channels if conv.bias is not None else 0
            units.append(Unit(group, lambda r, n=len(group), a=rows, b=cols, c=bias:
                              _joint_cost(method, n, a, b, r, split) + c, (rows, cols)))
        return units

    def option_ranks(self, units):
        return [equal_budget_rank(self.options["method"], len(u.layers), *u.plan, int(self.options["rank"]),
                                  self.options["split"]) for u in units]

    def build(self, unit, rank):
        opts = self.options
        factors = joint_svd([unfold_kernel(c.weight) for _, c in unit.layers], opts["method"], rank,
                            opts["iterations"], opts["split"])
        params: dict[int, nn.Parameter] = {}  # factor tensor -> its Parameter: joint_svd returns a
        layers = []  # shared factor as one tensor object
        for (_, conv), terms in zip(unit.layers, factors):
            shared = {(b, side): params[id(t)] for b, pair in enumerate(terms)
                      for side, t in zip(("vertical", "horizontal"), pair) if id(t) in params}
            layer = SVDConv2d(conv, [u.shape[1] for u, _ in terms], shared)
            layer.set_factors_(terms)
            for b, (u, v) in enumerate(terms):
                params.setdefault(id(u), layer.vertical[b])
                params.setdefault(id(v), layer.horizontal[b])
            layers.append(layer)
        stored = sum(p.numel() for p in {id(p): p for layer in layers for p in layer.parameters()}.values())
        return layers, f"jsvd {opts['method']} rank {rank}: {stored:,} / {unit.dense:,}"
