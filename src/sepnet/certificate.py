"""Certified robustness: the `model.certificate` section, certified accuracy, and the checks that
a certificate is sound.

The certified accuracy at radius r is the share of images that are correct with a logit margin
above sqrt(2) L r, L the network's Lipschitz bound (sepnet.lipschitz). It is computed in float32
outside autocast whatever the trainer's precision: a margin of bf16 logits is not what the bound,
a property of the float32 weights, speaks about. The certificate is a proof only if L is right,
which three checks test; they fail loudly (`CertificateError`), never as a warning:
- every layer's norm, computed on the layer *as applied* (its matrix through its own forward:
  an SVD where it is small enough, power iteration otherwise), is at most the constant the bound
  uses for it, and at most 1 for a layer orthogonal by construction;
- an empirical lower bound of L (gradient ascent on ||f(a) - f(b)|| / ||a - b||) stays below L;
- PGD-L2 and APGD-L2 at each radius break no image certified at it.

`Certifier` is what the training module and the callbacks ask: whether the network is
certifiable, its bound, the certified masks of a batch and the checks.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from sepnet.attacks import Attacker, AttackSpec
from sepnet.guards import eval_mode
from sepnet.lipschitz import (CertificateError, LipschitzBound, PairwiseBound, certified_from_logits, layer_bound,
                              lipschitz_bound, lipschitz_leaves, pairwise_bound, pairwise_certified)

__all__ = ["CertificateConfig", "Certifier", "applied_norm", "layer_norm_check", "empirical_lipschitz",
           "certified_masks", "float32_logits", "soundness_checks", "NORM_TOLERANCE"]

NORM_TOLERANCE = 1e-4
# the bound a certificate uses is the measured one rounded up by this much: it covers the float64
# product of float32 norms and the drift of layers whose kernel moves a little in every forward
# (orthogonium's power-iteration vectors, ~1e-6), and `Certifier.verify` fails loudly past it
BOUND_SLACK = 1e-5


@dataclass(frozen=True)
class CertificateConfig:
    """The `model.certificate` section: how a network with a Lipschitz bound is certified.
    Settings of the evaluation, not of the model (a flag given with a checkpoint wins).

    radii: L2 radii (pixel units) of the certified accuracy, on every validation and test image
        (`<stage>/certified_acc/<radius>`, e.g. val/certified_acc/36_255).
    check_images: test images the soundness checks run on after `run.py test` (0: none).
    attack_steps: steps of the PGD-L2 and APGD-L2 attacks at each certified radius.
    """

    radii: tuple[float, ...] = (36 / 255, 72 / 255, 108 / 255)
    check_images: int = 1000
    attack_steps: int = 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "radii", tuple(float(r) for r in self.radii))
        if not self.radii or any(r <= 0 for r in self.radii):
            raise ValueError(f"certificate.radii must be > 0, got {list(self.radii)}")
        if self.check_images < 0 or self.attack_steps < 1:
            raise ValueError(f"certificate.check_images must be >= 0 and attack_steps >= 1, got "
                             f"{self.check_images} and {self.attack_steps}")


def float32_logits(net: nn.Module, x: Tensor, logits: Tensor | None = None) -> Tensor:
    """The network's logits in float32 outside autocast: `logits` when they already are."""
    device = x.device.type
    if logits is not None and logits.dtype == torch.float32 and not torch.is_autocast_enabled(device):
        return logits
    with torch.autocast(device, enabled=False):
        return net(x.float())


def certified_masks(net: nn.Module, x: Tensor, y: Tensor, radii: Sequence[float], bound: float) -> dict[float, Tensor]:
    """Per radius, the images certified at it (eval mode, float32)."""
    with eval_mode(net), torch.no_grad():
        return certified_from_logits(float32_logits(net, x), y, radii, bound)


# --------------------------------------------------------------------------- the layer check
def applied_norm(layer: nn.Module, input_shape: Sequence[int], max_elements: int = 2 ** 22,
                 iterations: int = 200) -> tuple[float, str]:
    """The spectral norm of an affine layer's linear part as the layer computes it (a copy in
    eval mode, in the layer's own precision; the norms in float64), and how: the SVD of its
    matrix, built column by column through its forward, where that has at most `max_elements`
    entries; else power iteration on J^T J (its forward and vector-Jacobian product), which
    approaches the norm from below."""
    f = copy.deepcopy(layer).eval()
    dtype = next(f.parameters()).dtype
    n_in = math.prod(input_shape)
    with torch.no_grad():
        offset = f(torch.zeros(1, *input_shape, dtype=dtype))  # the bias
        if n_in * offset.numel() <= max_elements:
            columns = f(torch.eye(n_in, dtype=dtype).view(n_in, *input_shape)) - offset
            norm = torch.linalg.matrix_norm(columns.reshape(n_in, -1).double(), ord=2)
            return float(norm), "SVD of the layer as applied (exact)"
    v = torch.randn(1, *input_shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    for _ in range(iterations):
        v = (v / v.double().norm().to(dtype)).requires_grad_(True)
        with torch.enable_grad():
            out = f(v)
            (v,) = torch.autograd.grad(out, v, out - offset)  # J^T J v
    return float(v.double().norm().sqrt()), f"power iteration on the layer as applied, {iterations} steps (from below)"


def _input_shapes(net: nn.Module, x: Tensor) -> dict[str, tuple[int, ...]]:
    """Each leaf layer's input shape (one image), from a forward pass on x[:1]."""
    shapes, handles = {}, []

    def record(name: str, args: tuple) -> None:
        shapes.setdefault(name, tuple(args[0].shape[1:]))

    for name, m in lipschitz_leaves(net):
        handles.append(m.register_forward_pre_hook(lambda _, args, name=name: record(name, args)))
    try:
        with eval_mode(net), torch.no_grad():
            net(x[:1].float())
    finally:
        for h in handles:
            h.remove()
    return shapes


def layer_norm_check(net: nn.Module, x: Tensor, tolerance: float = NORM_TOLERANCE, max_elements: int = 2 ** 22,
                     iterations: int = 200) -> list[dict]:
    """Every layer with weights: its norm as applied (`applied_norm`) against the constant the
    bound uses for it, and against 1 where the layer is orthogonal by construction (its constant
    is fixed); CertificateError naming the layer if either is exceeded by more than `tolerance`."""
    rows, shapes = [], _input_shapes(net, x)
    for name, m in lipschitz_leaves(net):
        part = layer_bound(name, m)
        if part is None or next(m.parameters(), None) is None:
            continue
        norm, how = applied_norm(m, shapes[name], max_elements, iterations)
        rows.append({"layer": name, "spectral_norm": norm, "claimed": part.constant, "how": how})
        if part.fixed and norm > 1 + tolerance:
            raise CertificateError(f"layer {name}: spectral norm {norm:.6f} > 1 + {tolerance:g} for a layer "
                                   "orthogonal by construction: the Lipschitz bound is void")
        if norm > part.constant * (1 + tolerance):
            raise CertificateError(f"layer {name}: spectral norm {norm:.6f} as applied exceeds the constant "
                                   f"{part.constant:.6f} the bound uses: the Lipschitz bound is void")
    return rows


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


def soundness_checks(net: nn.Module, attacker: Attacker, x: Tensor, y: Tensor, radii: Sequence[float],
                     bound: LipschitzBound, attack_steps: int = 50, pairwise: PairwiseBound | None = None) -> dict:
    """The three checks of a certificate; CertificateError on the first that fails. Returns
    their figures for the report. The attacked images are exactly those the certificate
    certifies (float32), the figure the report prints: with `pairwise`, the pairwise
    certificate's (a superset of the sqrt(2) L one's), so images certified only by the tighter
    bound are attacked too."""
    report = {"layer_norms": layer_norm_check(net, x)}
    lower = empirical_lipschitz(net, x[: min(len(x), 64)])
    report["empirical_lipschitz_lower_bound"] = lower
    if lower > bound.value * (1 + NORM_TOLERANCE):
        raise CertificateError(f"empirical Lipschitz lower bound {lower:.6g} exceeds the claimed bound "
                               f"{bound.value:.6g}: the certificate is void")
    with eval_mode(net), torch.no_grad():
        logits = float32_logits(net, x)
    masks = (pairwise_certified(logits, y, radii, pairwise) if pairwise is not None
             else certified_from_logits(logits, y, radii, bound.value))
    report["certificate"] = "pairwise" if pairwise is not None else "global"
    report["attacks_at_radius"] = {}
    for r in radii:
        certified = masks[r]
        broken = {}
        for name in ("pgd", "apgd_ce"):
            spec = AttackSpec(name=name, norm="l2", eps=r, step_size=r / 4, steps=attack_steps, random_start=True)
            if certified.any():
                adv = attacker.generate(x[certified], y[certified], spec)
                with eval_mode(net), torch.no_grad():
                    broken[name] = int((float32_logits(net, adv).argmax(-1) != y[certified]).sum())
            else:
                broken[name] = 0
        report["attacks_at_radius"][f"{r:.6g}"] = {"certified": int(certified.sum()), "broken": broken}
        if any(broken.values()):
            raise CertificateError(f"an L2 attack at radius {r:.4g} broke {max(broken.values())} of the "
                                   f"{int(certified.sum())} images certified at it: the certificate is void")
    return report


class Certifier:
    """A network's certificate as the training module and callbacks use it: `certifiable`
    (every layer has a bound), `measure()` (the bound now, after the last weight change),
    `masks` (certified per radius, float32: the pairwise certificate where the network ends in a
    linear layer, sepnet.lipschitz.PairwiseBound, else sqrt(2) L), `global_masks` (the sqrt(2) L
    one, reported beside it) and `check` (the soundness checks, on the certificate `masks` uses)."""

    def __init__(self, net: nn.Module, config: CertificateConfig) -> None:
        self.net, self.config = net, config
        self.certifiable = lipschitz_bound(net, strict=False).certifiable
        self.pairwise_available = self.certifiable and pairwise_bound(net) is not None
        self.bound: LipschitzBound | None = None
        self.pairwise: PairwiseBound | None = None

    def measure(self) -> LipschitzBound:
        """The bound now, rounded up by BOUND_SLACK (and the pairwise terms with it)."""
        measured = lipschitz_bound(self.net)
        self.bound = LipschitzBound(measured.value * (1 + BOUND_SLACK), measured.factors, measured.missing)
        pairwise = pairwise_bound(self.net, measured)
        self.pairwise = (PairwiseBound(pairwise.feature * (1 + BOUND_SLACK), pairwise.distances, pairwise.layer)
                         if pairwise is not None else None)
        return self.bound

    def verify(self) -> float:
        """After an evaluation: the bound measured again must still be within the one it
        certified with (the weights did not change; a layer's forward may move its kernel by
        rounding only); CertificateError otherwise. Returns the new measurement."""
        now = lipschitz_bound(self.net).value
        if self.bound is not None and now > self.bound.value:
            raise CertificateError(f"the Lipschitz bound moved during the evaluation, {now:.9g} > the {self.bound.value:.9g} "
                                   "it certified with: the certificate is void")
        return now

    def _logits(self, x: Tensor, logits: Tensor | None) -> Tensor:
        if self.bound is None:
            self.measure()
        with torch.no_grad():
            return float32_logits(self.net, x, logits)

    def masks(self, x: Tensor, y: Tensor, logits: Tensor | None = None) -> dict[float, Tensor]:
        """Per radius, which of (x, y) are certified; `logits`: eval-mode logits of x already
        computed (used where they are float32 outside autocast)."""
        logits = self._logits(x, logits)
        if self.pairwise is not None:
            return pairwise_certified(logits, y, self.config.radii, self.pairwise)
        return certified_from_logits(logits, y, self.config.radii, self.bound.value)

    def global_masks(self, x: Tensor, y: Tensor, logits: Tensor | None = None) -> dict[float, Tensor]:
        return certified_from_logits(self._logits(x, logits), y, self.config.radii, self.bound.value)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The certificates reported: "" (the one `masks` uses) and, beside a pairwise one, "global"."""
        return ("", "global") if self.pairwise_available else ("",)

    def all_masks(self, x: Tensor, y: Tensor, logits: Tensor | None = None) -> dict[str, dict[float, Tensor]]:
        """`masks` under "" and, where the network has a pairwise certificate, `global_masks`."""
        masks = {"": self.masks(x, y, logits)}
        if self.pairwise_available:
            masks["global"] = self.global_masks(x, y, logits)
        return masks

    def check(self, attacker: Attacker, x: Tensor, y: Tensor) -> dict:
        bound = self.measure()
        return soundness_checks(self.net, attacker, x, y, self.config.radii, bound, self.config.attack_steps,
                                self.pairwise)
