"""The Lipschitz contract: layers that state their L2 bound, and the bound of a network of them.

A network f whose logits are L-Lipschitz in L2 cannot change its prediction on x under any
perturbation of L2 norm <= eps while the logit margin f_y(x) - max_{j != y} f_j(x) exceeds
sqrt(2) L eps (Tsuzuku et al. 2018, "Lipschitz-margin training"). This module holds what the
layers need to take part (it imports no sepnet layer, so every layer module can):

- `LipschitzModule`: a layer that gives `lipschitz_constant()` (its L2 constant, or None where
  this instance has none) and `lipschitz_rule` (how, for the report); `lipschitz_fixed` says
  training cannot change it (orthogonal by construction). deel-torchlip's `LipschitzModule` is
  the model. A subclass that gives neither is refused when its class is created.
- `LipschitzChain`: a module applied as its parts in order (`lipschitz_parts` names them).
- `OrthogonalParametrization`: a weight parametrization whose result has norm at most 1.
- `MeasuredParametrization`: one whose result is bounded by its measured spectral norm, which
  training changes (row normalization, Singla et al. 2022's last-layer normalization).

`lipschitz_bound` walks a network through chains and nn.Sequential and multiplies the leaves'
constants; torch's own layers, which cannot sign the contract, have their rules here: an
orthogonally parametrized nn.Linear by its measured norm, a dense nn.Linear by its exact spectral
norm (which training changes), and ReLU, Flatten, Unflatten, Identity, Dropout (eval),
PixelShuffle / PixelUnshuffle (permutations) by 1. Any other layer has no bound, and the network
no certificate. The checks that a bound is sound are in sepnet.certificate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import _Orthogonal  # the class torch's orthogonal() registers

from sepnet.factorized import FactorizedLayer

__all__ = ["LipschitzModule", "LipschitzChain", "OrthogonalParametrization", "MeasuredParametrization", "CertificateError", "LipschitzBound",
           "LayerBound", "PairwiseBound", "lipschitz_bound", "lipschitz_leaves", "layer_bound", "pairwise_bound", "final_linear", "last_linear_weight", "row_distances",
           "spectral_norm", "certified_from_logits", "pairwise_certified", "lipschitz_margin_loss"]

ONE_LIPSCHITZ = (nn.ReLU, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.PixelUnshuffle, nn.PixelShuffle)


class CertificateError(RuntimeError):
    """A soundness check of a certificate failed: the certificate is void."""


class LipschitzModule(nn.Module):
    """The contract of a layer with an L2 Lipschitz bound. Subclasses give
    `lipschitz_constant()` and `lipschitz_rule`; `lipschitz_fixed` (default True) says the
    constant holds whatever the weights (orthogonal by construction: its norm is at most 1 up to
    rounding, which sepnet.certificate checks on the layer as applied)."""

    lipschitz_rule: ClassVar[str] = ""
    lipschitz_fixed: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.lipschitz_constant is LipschitzModule.lipschitz_constant or not cls.lipschitz_rule:
            raise TypeError(f"{cls.__name__} breaks the LipschitzModule contract: expected it to define "
                            "lipschitz_constant() and lipschitz_rule")

    def lipschitz_constant(self) -> float | None:
        """The layer's L2 Lipschitz constant as it computes (an upper bound), or None where this
        instance has none (e.g. a separable layer outside its orthogonal mode)."""
        raise NotImplementedError


class LipschitzChain:
    """Mixin of a module whose forward applies `lipschitz_parts` (attribute names) in order, so
    its bound is the product of theirs."""

    lipschitz_parts: ClassVar[tuple[str, ...]] = ()


class OrthogonalParametrization(nn.Module):
    """Base of a weight parametrization whose result has spectral norm at most 1."""


class MeasuredParametrization(nn.Module):
    """Base of a weight parametrization whose result is bounded by its measured spectral norm (not
    fixed: training changes it)."""


def spectral_norm(weight: Tensor) -> float:
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(weight.detach().double().flatten(1), ord=2))


def _parametrized_linear(m: nn.Module, kind: type) -> bool:
    """An nn.Linear whose weight has one parametrization, of `kind`."""
    return (isinstance(m, nn.Linear) and nn.utils.parametrize.is_parametrized(m, "weight")
            and len(m.parametrizations.weight) == 1 and isinstance(m.parametrizations.weight[0], kind))


def _orthogonal_linear(m: nn.Module) -> bool:
    """An nn.Linear whose weight is (semi-)orthogonal by construction: one parametrization, an
    OrthogonalParametrization or torch's `parametrizations.orthogonal`."""
    return _parametrized_linear(m, (OrthogonalParametrization, _Orthogonal))


@dataclass(frozen=True)
class LayerBound:
    """One layer's part of the bound."""

    name: str
    rule: str
    constant: float
    fixed: bool


def layer_bound(name: str, m: nn.Module) -> LayerBound | None:
    """The layer's constant and rule, or None where it has none."""
    if isinstance(m, LipschitzModule):
        constant = m.lipschitz_constant()
        return None if constant is None else LayerBound(name, m.lipschitz_rule, constant, m.lipschitz_fixed)
    if _orthogonal_linear(m):
        return LayerBound(name, "orthogonal linear, measured", spectral_norm(m.weight), True)
    if _parametrized_linear(m, MeasuredParametrization):
        rule = f"{type(m.parametrizations.weight[0]).__name__} linear, spectral norm"
        return LayerBound(name, rule, spectral_norm(m.weight), False)
    if type(m) is nn.Linear:
        return LayerBound(name, "spectral norm", spectral_norm(m.weight), False)
    if isinstance(m, ONE_LIPSCHITZ):
        return LayerBound(name, type(m).__name__, 1.0, True)
    return None


def lipschitz_leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The layers of a chain network in order: LipschitzChain parts and nn.Sequential opened."""
    if isinstance(module, LipschitzChain):
        for part in module.lipschitz_parts:
            yield from lipschitz_leaves(getattr(module, part), f"{prefix}.{part}" if prefix else part)
    elif isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from lipschitz_leaves(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix, module


@dataclass
class LipschitzBound:
    """The network's L2 Lipschitz bound and how it was computed, one entry per layer; `missing`
    names the first layer without a bound (then the network has no certificate)."""

    value: float
    factors: list[LayerBound] = field(default_factory=list)
    missing: str | None = None

    @property
    def certifiable(self) -> bool:
        return self.missing is None

    @property
    def fixed(self) -> bool:
        """Whether training cannot change it (no dense layer counted by its trained norm): what
        the Lipschitz-margin loss needs to use it as a constant."""
        return self.certifiable and all(f.fixed for f in self.factors)

    def describe(self) -> str:
        parts = [f"{f.name or 'input'} {f.rule} {f.constant:.7g}" for f in self.factors if f.constant != 1.0]
        return f"product of per-layer L2 constants = {self.value:.7g} ({'; '.join(parts) or 'every layer 1'})"


def lipschitz_bound(net: nn.Module, strict: bool = True) -> LipschitzBound:
    """The L2 Lipschitz bound of a chain network. A layer without a bound: ValueError naming it
    (strict), or a bound whose `missing` names it."""
    bound = LipschitzBound(1.0)
    for name, m in lipschitz_leaves(net):
        part = layer_bound(name, m)
        if part is None:
            bound.missing = (f"no Lipschitz bound for {name} ({type(m).__name__}): expected orthogonal separable "
                             "layers or convolutions, nn.Linear, Normalize, MaxMin, ReLU or reshaping layers")
            if strict:
                raise ValueError(bound.missing)
            bound.value = math.inf
            return bound
        bound.factors.append(part)
        bound.value *= part.constant
    return bound


RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)  # parameter-free maps that only move entries


@dataclass
class PairwiseBound:
    """A network that ends in a linear layer W after a feature map g with L2 bound `feature`:
    f_y - f_j = (w_y - w_j) . g(x) + (b_y - b_j) is exactly `feature` ||w_y - w_j||-Lipschitz
    in g's bound, so an image is certified at r when f_y - f_j > r feature ||w_y - w_j|| for
    every j != y: never looser than sqrt(2) L, tighter where W's rows are not orthonormal.
    `distances[y, j]` = ||w_y - w_j|| (float64)."""

    feature: float
    distances: Tensor
    layer: str


def last_linear_weight(m: nn.Module) -> Tensor | None:
    """The matrix a final affine layer applies: an nn.Linear's weight (its parametrized value), or
    a factorized layer's implied one (`implied_weight`, the FactorizedLayer contract)."""
    if isinstance(m, nn.Linear):
        return m.weight
    if isinstance(m, FactorizedLayer) and m.stands_for is nn.Linear:
        return m.implied_weight()
    return None


def final_linear(net: nn.Module, bound: LipschitzBound | None = None) -> tuple[str, nn.Module, float, bool] | None:
    """(name, layer, bound of the feature map before it, whether that bound is fixed) where the
    network ends in a linear layer (only reshaping layers after it), or None."""
    leaves = list(lipschitz_leaves(net))
    bound = bound or lipschitz_bound(net, strict=False)
    if not bound.certifiable:
        return None
    index = max((i for i, (_, m) in enumerate(leaves) if next(m.parameters(), None) is not None), default=None)
    if index is None or not all(isinstance(m, RESHAPES) for _, m in leaves[index + 1:]):
        return None
    name, last = leaves[index]
    if last_linear_weight(last) is None:
        return None
    before = bound.factors[:index]
    return name, last, math.prod(f.constant for f in before), all(f.fixed for f in before)


def row_distances(weight: Tensor) -> Tensor:
    """||w_i - w_j|| for the rows of a (classes, features) matrix, differentiable (0 on the
    diagonal, with a zero gradient there)."""
    w = weight.reshape(weight.shape[0], -1)
    return (w[:, None] - w[None]).square().sum(-1).clamp_min(1e-24).sqrt() * (1 - torch.eye(len(w), device=w.device,
                                                                                             dtype=w.dtype))


def pairwise_bound(net: nn.Module, bound: LipschitzBound | None = None) -> PairwiseBound | None:
    """The pairwise certificate's terms, or None where the network does not end in a linear layer
    (then the sqrt(2) L certificate is the one it has)."""
    found = final_linear(net, bound)
    if found is None:
        return None
    name, last, feature, _ = found
    with torch.no_grad():
        distances = row_distances(last_linear_weight(last).detach().double())
    return PairwiseBound(feature, distances, name)


def pairwise_certified(logits: Tensor, y: Tensor, radii: Sequence[float], pairwise: PairwiseBound) -> dict[float, Tensor]:
    """Per radius, the images certified by the pairwise certificate (eval-mode logits)."""
    logits = logits.detach().double()
    correct = logits.argmax(-1) == y
    margins = logits.gather(1, y[:, None]) - logits  # (N, C): f_y - f_j
    needed = pairwise.feature * pairwise.distances.to(logits.device)[y]  # (N, C): its Lipschitz constant
    others = ~nn.functional.one_hot(y, logits.shape[-1]).bool()
    return {r: correct & ((margins > r * needed) | ~others).all(-1) for r in radii}


def certified_from_logits(logits: Tensor, y: Tensor, radii: Sequence[float], bound: float) -> dict[float, Tensor]:
    """Per radius, the images certified at it: correct with a logit margin > sqrt(2) bound radius
    (eval-mode logits)."""
    logits = logits.detach().float()
    top2 = logits.topk(2, dim=-1)
    correct = top2.indices[:, 0] == y
    margin = logits.gather(1, y[:, None])[:, 0] - top2.values[:, 1]
    return {r: correct & (margin > math.sqrt(2) * bound * r) for r in radii}


def lipschitz_margin_loss(logits: Tensor, y: Tensor, eps: float, bound: float, temperature: float = 1.0,
                          distances: Tensor | None = None) -> Tensor:
    """Lipschitz-margin training (Tsuzuku et al. 2018): cross-entropy after adding sqrt(2) L eps
    to every logit but the true one, so that training pushes the margins past the certified
    radius eps; `temperature` divides the logits (a larger one, a softer hinge). With the final
    linear layer's row `distances` (classes x classes; `bound` then the feature map's), the
    pairwise certificate's own terms instead: eps L_g ||w_y - w_j|| added to logit j."""
    if distances is None:
        shift = math.sqrt(2) * bound * eps * (1 - nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype))
    else:
        shift = eps * bound * distances.to(logits.dtype)[y]  # zero at j = y
    return nn.functional.cross_entropy((logits + shift) / temperature, y)
