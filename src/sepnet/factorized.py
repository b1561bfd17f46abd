"""The contract of a factorized layer: a module that stands for a dense nn.Linear or nn.Conv2d
whose weight it does not store.

Every such layer (SeparableLinear, TTLinear, TTConv2d, SVDConv2d, the low-rank layers) derives
from `FactorizedLayer` and gives two things: the dense layer's shape (its `in_features` /
`out_features`, or `in_channels` / `out_channels` / `kernel_size`) and `implied_weight()`, the
dense weight or kernel rebuilt from its factors. Parameter counts, the implied-weight path
switch and the compression ratio then come from here, the same for every method.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import ClassVar, Iterator, Literal

import torch
from torch import Tensor, nn

__all__ = ["FactorizedLayer", "ImpliedPath", "IMPLIED_PATHS", "MATRIX_WORK_FACTOR", "built_matrix_pays",
           "factorized_layers", "implied_path"]

ImpliedPath = Literal["auto", "always", "never"]
IMPLIED_PATHS = ("auto", "always", "never")

# the implied matrix's GEMM is used while it does at most this many times the structured
# products' multiply-adds: one GEMM runs several times faster per multiply-add on a CPU
MATRIX_WORK_FACTOR = 8


def built_matrix_pays(build_macs: int, dense_macs: int, structured_macs: int, rows: int) -> bool:
    """Whether a factorized layer should build its implied matrix (or kernel) and run one dense
    GEMM / convolution over `rows` rows (or output pixels): building it plus the dense work costs
    at most MATRIX_WORK_FACTOR x the structured products' multiply-adds (per row: `dense_macs`,
    `structured_macs`)."""
    return build_macs + rows * dense_macs <= MATRIX_WORK_FACTOR * rows * structured_macs


class FactorizedLayer(nn.Module):
    """A layer that stands for a dense `stands_for` layer (nn.Linear or nn.Conv2d) it does not store.

    Subclasses implement `implied_weight()` and, where they have a structured forward and a
    built-weight forward, `_implied_pays(rows)` (the cost rule for `implied_path="auto"`).
    `implied_path` is the public switch between the two: "auto" (the rule decides per call),
    "always" (build the weight, one dense GEMM / convolution) or "never" (the structured forward).
    """

    stands_for: ClassVar[type[nn.Module]] = nn.Linear
    _implied_path: ImpliedPath = "auto"
    # the relative Frobenius error of the implied weight against the dense layer's, where the
    # layer was made from one (`from_linear` / `from_conv`, which every method returns as a layer)
    approximation_error: float | None = None

    # ------------------------------------------------------------------ what a subclass gives
    def implied_weight(self) -> Tensor:
        """The dense weight this layer stands for: (out, in) for nn.Linear (C-order flattening of
        the features), (out, in, kH, kW) for nn.Conv2d."""
        raise NotImplementedError(f"{type(self).__name__} must implement implied_weight()")

    def folded(self) -> nn.Module:
        """The dense layer this one stands for, its weight the implied one, fixed: what an export
        runs where one dense GEMM or convolution is faster than the factor operations. An
        nn.Linear on the flat features, or an nn.Conv2d with the layer's stride, padding and
        dilation (a convolution subclass stores them under those names)."""
        with torch.no_grad():
            weight = self.implied_weight().detach()
            bias = getattr(self, "bias", None)
            if self.stands_for is nn.Conv2d:
                dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                                  self.dilation, bias=bias is not None)
            else:
                dense = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
            dense = dense.to(device=weight.device, dtype=weight.dtype)
            dense.weight.copy_(weight.reshape(dense.weight.shape))
            if bias is not None:
                dense.bias.copy_(bias.detach().reshape(-1))
        return dense

    def dense_weight(self) -> Tensor:
        """Deprecated alias of `implied_weight` (renamed in 0.2.0; removed in 0.3.0)."""
        warnings.warn("dense_weight() is deprecated since sepnet 0.2.0: use implied_weight()", DeprecationWarning,
                      stacklevel=2)
        return self.implied_weight()

    def _implied_pays(self, rows: int) -> bool:
        """The "auto" rule: whether building the weight pays for `rows` rows / output pixels."""
        return False

    # ------------------------------------------------------------------ the contract
    @property
    def implied_path(self) -> ImpliedPath:
        return self._implied_path

    @implied_path.setter
    def implied_path(self, value: ImpliedPath) -> None:
        if value not in IMPLIED_PATHS:
            raise ValueError(f"implied_path {value!r}: expected one of {IMPLIED_PATHS}")
        self._implied_path = value

    def uses_implied(self, rows: int) -> bool:
        """Whether the forward over `rows` rows (output pixels) builds the implied weight."""
        if self._implied_path == "auto":
            return self._implied_pays(rows)
        return self._implied_path == "always"

    def implied_shape(self) -> tuple[int, ...]:
        if self.stands_for is nn.Conv2d:
            return (self.out_channels, self.in_channels, *self.kernel_size)
        return (self.out_features, self.in_features)

    def stored_parameters(self) -> int:
        """Parameters this layer holds (a factor shared with other layers included; the model's
        counts, sepnet.measures.parameter_counts, count a shared factor once)."""
        return sum(p.numel() for p in self.parameters())

    def dense_parameters(self) -> int:
        """Parameters of the dense layer this one stands for (weight and bias)."""
        bias = self.implied_shape()[0] if getattr(self, "bias", None) is not None else 0
        return math.prod(self.implied_shape()) + bias

    def compression(self) -> float:
        return self.dense_parameters() / max(1, self.stored_parameters())


def factorized_layers(module: nn.Module) -> Iterator[tuple[str, FactorizedLayer]]:
    """(qualified name, layer) of the outermost factorized layers inside `module`."""
    inside: list[str] = []
    for name, m in module.named_modules():
        if isinstance(m, FactorizedLayer) and not any(name.startswith(f"{p}.") for p in inside):
            inside.append(name)
            yield name, m


@contextlib.contextmanager
def implied_path(module: nn.Module, path: ImpliedPath) -> Iterator[nn.Module]:
    """Every factorized layer of `module` on `path` inside the block, each one's own setting
    restored after (benchmarks and tests compare the two forwards with it)."""
    layers = [m for m in module.modules() if isinstance(m, FactorizedLayer)]
    before = [m.implied_path for m in layers]
    try:
        for m in layers:
            m.implied_path = path
        yield module
    finally:
        for m, value in zip(layers, before):
            m.implied_path = value
