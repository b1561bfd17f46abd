"""Measures of factorized and pruned networks, as pure functions: condition numbers, sparsity,
implied non-zeros and parameter counts. The penalties that use them are in sepnet.constraints.

Everything numerical runs in float64 with autocast off, so results are finite for zero,
rank-deficient, tiny and huge factors in any training precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from sepnet.factorized import FactorizedLayer, factorized_layers
from sepnet.layers import SeparableLinear, implied_core
from sepnet.masks import masked_tensors

_DENSE_KAPPA_MAX_ELEMENTS = 2**22
_GRAM_MIN_SIDE = 256  # from here on the Gram route is exact enough (see _dense_singular_values)

__all__ = [
    "singular_values",
    "condition_number",
    "layer_condition_number",
    "LayerCondition",
    "sparsity",
    "parameter_counts",
    "ParameterCounts",
    "fc_parameter_counts",
    "factorized_layers",
    "implied_nonzeros",
    "implied_core",
    "separable_layers",
    "factor_list",
    "compression_report",
]


def separable_layers(model: nn.Module) -> Iterator[tuple[str, SeparableLinear]]:
    """(qualified name, layer) for every SeparableLinear inside `model`."""
    for name, module in model.named_modules():
        if isinstance(module, SeparableLinear):
            yield name, module


# --------------------------------------------------------------------------- condition numbers
def singular_values(matrix: Tensor) -> Tensor:
    """Singular values in descending order, float64, no gradient."""
    with torch.no_grad(), torch.autocast(matrix.device.type, enabled=False):
        return torch.linalg.svdvals(matrix.detach().to(torch.float64))


def _dense_singular_values(matrix: Tensor) -> Tensor:
    """Singular values of a large implied matrix: square roots of the float64 Gram matrix's
    eigenvalues when both sides have at least _GRAM_MIN_SIDE entries (far cheaper than the SVD of
    a large matrix). In float64 the Gram route resolves sigma_min down to ~1e-6
    sigma_max, well below the float32 rank tolerance (sigma_max x side x eps, >= 3e-5 sigma_max
    from side 256) under which kappa is inf anyway: kappa moves by under 0.1%. Smaller matrices
    take the SVD."""
    if min(matrix.shape) < _GRAM_MIN_SIDE:
        return singular_values(matrix)
    with torch.no_grad(), torch.autocast(matrix.device.type, enabled=False):
        w = matrix.detach().to(torch.float64)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)


def _kappa_from_singular_values(s: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> float:
    """sigma_max / sigma_min, inf when the matrix is numerically rank-deficient (or zero): sigma_min
    at or below sigma_max x max(shape) x eps of the matrix's own dtype, as matrix_rank decides."""
    s_max, s_min = float(s[0]), float(s[-1])
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    tolerance = s_max * max(shape) * eps
    if s_max == 0.0 or s_min <= tolerance or not math.isfinite(s_max):
        return math.inf
    return s_max / s_min


def condition_number(matrix: Tensor) -> float:
    """kappa = sigma_max / sigma_min over the min(rows, cols) singular values; inf, never NaN,
    for a rank-deficient or zero matrix."""
    return _kappa_from_singular_values(singular_values(matrix), tuple(matrix.shape), matrix.dtype)


@dataclass(frozen=True)
class LayerCondition:
    """Condition number of a separable layer's implied matrix; `is_bound` marks an upper bound."""

    value: float
    is_bound: bool


def layer_condition_number(layer: SeparableLinear,
                           max_dense_elements: int = _DENSE_KAPPA_MAX_ELEMENTS) -> LayerCondition:
    """kappa of the implied dense matrix, over its structural rank.

    The singular values of kron(U1, ..., UN) are the products of the factors' singular values
    (prod_k min(O_k, I_k) of them), so for rank 1 kappa is the product of the factors' kappas.
    For rank > 1 it is computed from the dense matrix when that has at most `max_dense_elements`
    entries (4M by default: cheap enough to log every epoch), else from `implied_core` (same
    non-zero singular values, often far smaller) when that fits; above both,
    Weyl's inequalities give an upper bound (sum of the terms' sigma_max over the best term's
    sigma_min minus the others' sigma_max), inf when that is vacuous.
    """
    if layer.rank == 1:
        kappas = [condition_number(f) for f in layer.factors[0]]
        return LayerCondition(math.prod(kappas), is_bound=False)
    if layer.in_features * layer.out_features <= max_dense_elements:
        weight = layer.implied_weight()
        s = _dense_singular_values(weight)
        structural = min(s.numel(), layer.rank * math.prod(
            min(o, i) for o, i in zip(layer.out_shape, layer.in_shape)))
        s = s[:structural]
        return LayerCondition(_kappa_from_singular_values(s, tuple(weight.shape), weight.dtype), False)
    with torch.no_grad():  # the compressed core has W's non-zero singular values
        core_elements = math.prod(min(o, layer.rank * i) for o, i in zip(layer.out_shape, layer.in_shape)) * \
            math.prod(min(i, layer.rank * o) for o, i in zip(layer.out_shape, layer.in_shape))
        if core_elements <= max_dense_elements:
            core = implied_core(layer)
            s = _dense_singular_values(core)[:structural_rank(layer, core)]
            return LayerCondition(_kappa_from_singular_values(s, tuple(core.shape), core.dtype), False)
    extremes = []
    for term in layer.factors:
        svs = [singular_values(f) for f in term]
        extremes.append((math.prod(float(s[0]) for s in svs), math.prod(float(s[-1]) for s in svs)))
    total_max = sum(hi for hi, _ in extremes)
    best_min = max(lo - (total_max - hi) for hi, lo in extremes)
    return LayerCondition(total_max / best_min if best_min > 0 else math.inf, is_bound=True)


# --------------------------------------------------------------------------- sparsity and counts
def sparsity(tensors: Iterable[Tensor], threshold: float = 1e-3) -> dict[str, float]:
    """Counts of exact zeros and of |u| <= threshold over the given tensors, and their fractions."""
    total = zeros = small = 0
    with torch.no_grad():
        for t in tensors:
            total += t.numel()
            zeros += int((t == 0).sum())
            small += int((t.abs() <= threshold).sum())
    total = max(total, 1)
    return {"numel": total, "zeros": zeros, "near_zero": small,
            "zero_fraction": zeros / total, "near_zero_fraction": small / total}


@dataclass(frozen=True)
class ParameterCounts:
    """Stored, non-zero and dense-equivalent parameter counts."""

    stored: int
    nonzero: int
    dense: int

    @property
    def compression(self) -> float:
        """Dense-equivalent parameters per stored parameter."""
        return self.dense / max(self.stored, 1)

    @property
    def nonzero_compression(self) -> float:
        """Dense-equivalent parameters per non-zero parameter."""
        return self.dense / max(self.nonzero, 1)


def parameter_counts(module: nn.Module) -> ParameterCounts:
    """Counts over every parameter of `module` (convs, norms, embeddings, heads included).

    A factorized layer (sepnet.factorized.FactorizedLayer) counts as the layer it
    stands for in `dense`, shared factors once; a masked tensor (sepnet.masks: a pruned weight or
    factor) counts its unmasked non-zero entries as non-zero, its full size as stored; HYDRA's
    scores are training-only state and not counted.
    """
    stored = nonzero = dense = 0
    seen: set[int] = set()
    masked: dict[int, Tensor] = {}  # id(original) -> the tensor the network computes with
    for _, m, tensor, mask in masked_tensors(module):
        masked[id(m.parametrizations[tensor].original)] = getattr(m, tensor)
        if mask.scores is not None:
            seen.add(id(mask.scores))  # HYDRA's scores: training-only state, not part of the model

    def nonzeros(p: Tensor) -> int:
        return int(masked.get(id(p), p).count_nonzero())

    with torch.no_grad():
        for _, layer in factorized_layers(module):
            params = [p for p in layer.parameters() if id(p) not in seen]  # shared factors once
            seen.update(id(p) for p in params)
            stored += sum(p.numel() for p in params)
            nonzero += sum(nonzeros(p) for p in params)
            dense += layer.dense_parameters()
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                stored += p.numel()
                nonzero += nonzeros(p)
                dense += p.numel()
    return ParameterCounts(stored, nonzero, dense)


def fc_parameter_counts(module: nn.Module) -> ParameterCounts:
    """Counts over the fully-connected part only: every nn.Linear and every factorized layer that
    stands for one (separable, TT, low rank)."""
    parts = [parameter_counts(m) for m in module.modules() if isinstance(m, nn.Linear)
             or (isinstance(m, FactorizedLayer) and m.stands_for is nn.Linear)]
    return ParameterCounts(sum(c.stored for c in parts), sum(c.nonzero for c in parts),
                           sum(c.dense for c in parts))


def factor_list(layer: SeparableLinear) -> list[Tensor]:
    """Every factor of every term, in order."""
    return [factor for term in layer.factors for factor in term]


def implied_nonzeros(layer: SeparableLinear) -> tuple[int, bool]:
    """(non-zeros of the implied dense matrix, whether exact): nnz(kron(U1..UN)) = prod nnz(Uk)
    for rank 1, so sparsity compounds across modes; for rank > 1 the sum over terms bounds it."""
    per_term = [math.prod(int(f.count_nonzero()) for f in term) for term in layer.factors]
    return min(sum(per_term), layer.in_features * layer.out_features), layer.rank == 1


def structural_rank(layer: SeparableLinear, core: Tensor) -> int:
    """The largest rank `implied_core(layer)` can have: R prod min(O_k, I_k), or its smaller side."""
    return min(*core.shape, layer.rank * math.prod(min(o, i) for o, i in zip(layer.out_shape, layer.in_shape)))


def compression_report(net: nn.Module, compressor_lines: Sequence[str] = ()) -> str:
    """Per separable layer its shapes, stored / dense-equivalent parameters and zeros; the other
    compressors' summary lines (`compressor_lines`); the whole model's counts."""
    lines = ["separable layers (stored / dense-equivalent parameters):"]
    for name, layer in separable_layers(net):
        nnz, exact = implied_nonzeros(layer)
        zeros = sum(int((f == 0).sum()) for t in layer.factors for f in t)
        sparse = f", {zeros:,} zero factor entries, implied nnz {'' if exact else '<= '}{nnz:,}" if zeros else ""
        lines.append(f"  {name}: {layer.in_shape} -> {layer.out_shape} rank {layer.rank}: "
                     f"{layer.stored_parameters():,} / {layer.dense_parameters():,} "
                     f"({layer.dense_parameters() / layer.stored_parameters():.1f}x){sparse}")
    others = [line for line in compressor_lines if ": separable " not in line]
    if others:
        lines += ["other compressors:", *(f"  {line}" for line in others)]
    c = parameter_counts(net)
    lines.append(f"  whole model: {c.stored:,} stored, {c.nonzero:,} non-zero, {c.dense:,} "
                 f"dense-equivalent ({c.compression:.1f}x)")
    return "\n".join(lines)
