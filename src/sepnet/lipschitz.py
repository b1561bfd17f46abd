"""Lipschitz certificates for networks of 1-Lipschitz layers.

A network f whose logits are L-Lipschitz in L2 cannot change its prediction on x under any
perturbation of L2 norm <= eps while the logit margin f_y(x) - max_{j != y} f_j(x) exceeds
sqrt(2) L eps (Tsuzuku et al. 2018, "Lipschitz-margin training"): the certified accuracy at eps
is the share of images that are correct with such a margin. It costs one forward pass and no
attack can overstate it -- provided the bound L is right, which the soundness checks test and
which fail loudly (`CertificateError`), never as a warning:
- every layer's exact spectral norm is at most its claimed constant (x (1 + 1e-4));
- an empirical lower bound of L (gradient-norm ascent) never exceeds the claimed L;
- PGD-L2 and APGD-L2 at eps break no image certified at eps.

`lipschitz_bound` composes the bound layer by layer: Normalize scales by 1 / min(std) (exact:
a per-channel diagonal map), an orthogonal SeparableLinear (or SeparablePointwise) by its
measured norm (1 up to rounding), an orthogonal convolution (sepnet.lipschitz_layers) by its
DFT norm, an orthogonal TTLinear by the product of its cores' norms (sepnet.compress.tt), an
orthogonally parametrized nn.Linear by its measured norm, a dense nn.Linear by its exact
spectral norm, and MaxMin, ReLU, Flatten, Unflatten, PixelUnshuffle (a permutation),
Identity and Dropout (eval) by 1. Any other module has no bound here and the network gets no
certificate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import _Orthogonal  # the class torch's orthogonal() registers

from sepnet.activations import MaxMin
from sepnet.compress.tt import TTLinear
from sepnet.guards import eval_mode
from sepnet.heads import DenseHead, SeparableHead
from sepnet.layers import SeparableLinear, implied_core
from sepnet.lipschitz_layers import BjorckOrthonormal, OrthoConv2d, SeparablePointwise
from sepnet.network import Network, Normalize

__all__ = ["CertificateError", "LipschitzBound", "lipschitz_bound", "certified_masks", "certified_from_logits",
           "layer_norm_check", "empirical_lipschitz", "soundness_checks", "lipschitz_margin_loss"]

NORM_TOLERANCE = 1e-4
# layers with an `orthogonal` flag, a `norm_rule` and `lipschitz_constant()` (their measured norm)
ORTHOGONAL_LAYERS = (SeparableLinear, SeparablePointwise, OrthoConv2d, TTLinear)
ONE_LIPSCHITZ = (nn.ReLU, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.PixelUnshuffle, nn.PixelShuffle)


def orthogonal_linear(m: nn.Module) -> bool:
    """An nn.Linear whose weight is (semi-)orthogonal by construction: BjorckOrthonormal, or
    torch's `parametrizations.orthogonal`, as its only parametrization."""
    return (isinstance(m, nn.Linear) and nn.utils.parametrize.is_parametrized(m, "weight")
            and len(m.parametrizations.weight) == 1
            and isinstance(m.parametrizations.weight[0], (BjorckOrthonormal, _Orthogonal)))


class CertificateError(RuntimeError):
    """A soundness check of a certificate failed: the certificate is void."""


@dataclass
class LipschitzBound:
    """The network's L2 Lipschitz bound and how it was computed, one factor per layer."""

    value: float
    factors: list[tuple[str, str, float]] = field(default_factory=list)  # (module name, rule, constant)

    def describe(self) -> str:
        parts = [f"{name or 'input'} {rule} {constant:.7g}" for name, rule, constant in self.factors
                 if constant != 1.0]
        return f"product of per-layer L2 constants = {self.value:.7g} ({'; '.join(parts) or 'every layer 1'})"

    @property
    def fixed(self) -> bool:
        """Whether training cannot change it (no dense layer counted by its trained norm): what
        the Lipschitz-margin loss needs to use it as a constant."""
        return all(rule != "spectral norm" for _, rule, _ in self.factors)


def _leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The chain of layers in order: the Network's parts, heads and Sequential containers are opened."""
    if isinstance(module, Network):
        for part in ("normalize", "backbone", "head"):
            yield from _leaves(getattr(module, part), f"{prefix}{part}")
    elif isinstance(module, (DenseHead, SeparableHead)):
        yield from _leaves(module.layers, f"{prefix}.layers")
    elif isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix, module


def spectral_norm(weight: Tensor) -> float:
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(weight.detach().double().flatten(1), ord=2))


def lipschitz_bound(net: nn.Module) -> LipschitzBound:
    """The L2 Lipschitz bound of a chain network (sepnet.network.Network or nn.Sequential);
    ValueError naming the first layer that has none."""
    bound = LipschitzBound(1.0)
    for name, m in _leaves(net):
        if isinstance(m, Normalize):
            rule, constant = "1 / min(std)", 1.0 / float(m.std.min())
        elif isinstance(m, ORTHOGONAL_LAYERS) and m.orthogonal:  # 1 up to float rounding: the measured one
            rule, constant = m.norm_rule, m.lipschitz_constant()
        elif orthogonal_linear(m):
            rule, constant = "orthogonal linear, measured", spectral_norm(m.weight)
        elif type(m) is nn.Linear:
            rule, constant = "spectral norm", spectral_norm(m.weight)
        elif isinstance(m, (MaxMin, *ONE_LIPSCHITZ)):
            rule, constant = type(m).__name__, 1.0
        else:
            raise ValueError(f"no Lipschitz bound for {name} ({type(m).__name__}): expected orthogonal separable "
                             "layers or convolutions, nn.Linear, Normalize, MaxMin, ReLU or reshaping layers")
        bound.factors.append((name, rule, constant))
        bound.value *= constant
    return bound


def layer_norm_check(net: nn.Module, tolerance: float = NORM_TOLERANCE, max_elements: int = 2 ** 22,
                     power_iterations: int = 200) -> list[dict]:
    """Every orthogonal layer's spectral norm, computed apart from the layer's own bookkeeping,
    against its claimed 1; CertificateError if one exceeds 1 + tolerance. Convolutions: the DFT
    norm (sepnet.lipschitz_layers; exact for circular padding, an upper bound for zeros);
    orthogonal nn.Linear: the SVD. Separable layers (SeparablePointwise: its SeparableLinear),
    R = 1: the product of the factors' largest singular values (SVDs; the singular values of a
    Kronecker product are the products of the factors'), exact. R > 1: the SVD of the implied
    matrix, or of `implied_core` (same non-zero singular values), where either has at most
    `max_elements` entries; else power iteration on the layer itself (its forward and vector-
    Jacobian product, bias off), which approaches the norm from below: reported as such."""
    rows = []
    for name, m in _leaves(net):
        m = m.layer if isinstance(m, SeparablePointwise) else m
        if isinstance(m, OrthoConv2d):
            norm, how = m.lipschitz_constant(), m.norm_rule
        elif orthogonal_linear(m):
            norm, how = spectral_norm(m.weight), "SVD of the weight (exact)"
        elif isinstance(m, TTLinear) and m.orthogonal:  # the layer itself, not the cores the bound multiplies
            norm, how = _tt_norm(m, max_elements, power_iterations)
        elif not (isinstance(m, SeparableLinear) and m.orthogonal):
            continue
        else:
            norm, how = _separable_norm(m, max_elements, power_iterations)
        rows.append({"layer": name, "spectral_norm": norm, "how": how})
        if norm > 1 + tolerance:
            raise CertificateError(f"layer {name}: spectral norm {norm:.6f} > 1 + {tolerance:g}: the Lipschitz "
                                   "bound is void")
    return rows


def _separable_norm(m: SeparableLinear, max_elements: int, power_iterations: int) -> tuple[float, str]:
    """An orthogonal SeparableLinear's spectral norm and how it was computed (layer_norm_check)."""
    with torch.no_grad():
        if m.rank == 1:
            norm = math.prod(spectral_norm(f) for f in m.factors[0])
            how = "product of the factors' SVD norms (exact)"
        elif m.in_features * m.out_features <= max_elements:
            norm, how = spectral_norm(m.implied_weight()), "SVD of the implied matrix (exact)"
        elif m.core_elements() <= max_elements:
            norm = spectral_norm(implied_core(m) / m.spectral_norm().double())
            how = "SVD of the implied core (exact)"
        else:
            norm, how = _power_norm(m, power_iterations), f"power iteration, {power_iterations} steps (from below)"
    return norm, how


def _tt_norm(m: TTLinear, max_elements: int, power_iterations: int) -> tuple[float, str]:
    """An orthogonal TTLinear's spectral norm and how it was computed (layer_norm_check)."""
    with torch.no_grad():
        if m.in_features * m.out_features <= max_elements:
            return spectral_norm(m.implied_weight()), "SVD of the implied matrix (exact)"
    return _power_norm(m, power_iterations, (m.in_features,)), f"power iteration, {power_iterations} steps (from below)"


def _power_norm(layer: SeparableLinear | TTLinear, iterations: int, in_shape: Sequence[int] | None = None) -> float:
    """sigma_max of the layer's linear part by power iteration on W^T W (forward, then its VJP);
    `in_shape`: one input's shape (default: the separable layer's)."""
    v = torch.randn(1, *(layer.in_shape if in_shape is None else in_shape), dtype=torch.float64)
    bias, layer.bias = layer.bias, None
    try:
        layer.double()
        for _ in range(iterations):
            v = v / v.norm()
            with torch.enable_grad():
                x = v.clone().requires_grad_(True)
                y = layer(x)
                (v,) = torch.autograd.grad(y, x, y)  # W^T W v
        return float(v.norm().sqrt())
    finally:
        layer.float()
        layer.bias = bias


def empirical_lipschitz(net: nn.Module, x: Tensor, steps: int = 50, lr: float = 0.01) -> float:
    """A lower bound of the network's L2 Lipschitz constant: the largest ||f(a) - f(b)|| / ||a - b||
    found by gradient ascent from pairs (x, x + small noise), over the images given."""
    with eval_mode(net), torch.enable_grad():
        a = x.detach().clone().requires_grad_(True)
        b = (x + 1e-2 * torch.randn_like(x)).detach().requires_grad_(True)
        opt = torch.optim.Adam([a, b], lr=lr)
        best = 0.0
        for _ in range(steps):
            ratio = (net(a) - net(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1).clamp_min(1e-12)
            best = max(best, float(ratio.detach().max()))
            opt.zero_grad()
            (-ratio.sum()).backward()
            opt.step()
    return best


def certified_masks(net: nn.Module, x: Tensor, y: Tensor, radii: Sequence[float], bound: float) -> dict[float, Tensor]:
    """Per radius, the images certified at it: correct with a logit margin > sqrt(2) bound radius."""
    with eval_mode(net), torch.no_grad():
        return certified_from_logits(net(x), y, radii, bound)


def certified_from_logits(logits: Tensor, y: Tensor, radii: Sequence[float], bound: float) -> dict[float, Tensor]:
    """`certified_masks` from eval-mode logits already computed."""
    logits = logits.detach().float()
    top2 = logits.topk(2, dim=-1)
    correct = top2.indices[:, 0] == y
    margin = logits.gather(1, y[:, None])[:, 0] - top2.values[:, 1]
    return {r: correct & (margin > math.sqrt(2) * bound * r) for r in radii}


def lipschitz_margin_loss(logits: Tensor, y: Tensor, eps: float, bound: float, temperature: float = 1.0) -> Tensor:
    """Lipschitz-margin training (Tsuzuku et al. 2018): cross-entropy after adding sqrt(2) L eps
    to every logit but the true one, so that training pushes the margins past the certified
    radius eps; `temperature` divides the logits (a larger one, a softer hinge)."""
    shifted = logits + math.sqrt(2) * bound * eps * (1 - nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype))
    return nn.functional.cross_entropy(shifted / temperature, y)


def soundness_checks(net: nn.Module, attacker, x: Tensor, y: Tensor, radii: Sequence[float],
                     bound: LipschitzBound, attack_steps: int = 50) -> dict:
    """The three checks of a certificate; CertificateError on the first that fails. Returns
    their figures for the report."""
    from sepnet.attacks import AttackSpec

    report = {"layer_norms": layer_norm_check(net)}
    lower = empirical_lipschitz(net, x[: min(len(x), 64)])
    report["empirical_lipschitz_lower_bound"] = lower
    if lower > bound.value * (1 + NORM_TOLERANCE):
        raise CertificateError(f"empirical Lipschitz lower bound {lower:.6g} exceeds the claimed bound "
                               f"{bound.value:.6g}: the certificate is void")
    masks = certified_masks(net, x, y, radii, bound.value)
    report["attacks_at_radius"] = {}
    for r in radii:
        certified = masks[r]
        broken = {}
        for name in ("pgd", "apgd_ce"):
            spec = AttackSpec(name=name, norm="l2", eps=r, step_size=r / 4, steps=attack_steps, random_start=True)
            if certified.any():
                adv = attacker.generate(x[certified], y[certified], spec)
                with eval_mode(net), torch.no_grad():
                    broken[name] = int((net(adv).argmax(-1) != y[certified]).sum())
            else:
                broken[name] = 0
        report["attacks_at_radius"][f"{r:.6g}"] = {"certified": int(certified.sum()), "broken": broken}
        if any(broken.values()):
            raise CertificateError(f"an L2 attack at radius {r:.4g} broke {max(broken.values())} of the "
                                   f"{int(certified.sum())} images certified at it: the certificate is void")
    return report
