"""The joint constraint on separable factors: the condition-number and sparsity penalties, their
proximal step and the `model.constraint` section (its sparsity target, a pruner, is
sepnet.compress.sparsity). The measures they build
on (kappa, sparsity, counts) are pure functions in sepnet.measures.

Everything numerical runs in float64 with autocast off, so results are finite for zero,
rank-deficient, tiny and huge factors in any training precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from sepnet import metric_names as names
from sepnet.layers import SeparableLinear
from sepnet.measures import implied_core, separable_layers, structural_rank

ConditionForm = Literal["amgm", "logdet", "logcond", "implied"]
SparsityForm = Literal["l1", "tl1"]

LOGDET_EPS = 1e-5
LOGCOND_EPS = 1e-6

__all__ = [
    "ConditionForm",
    "SparsityForm",
    "condition_penalty",
    "sparsity_penalty",
    "implied_penalty",
    "constraint_penalties",
    "proximal_step_",
    "ConstraintConfig",
    "constraint_loss",
    "proximal_constraint_",
]


# --------------------------------------------------------------------------- regularizers
def _log_squared_singular_values(factors: Tensor) -> Tensor:
    """log(sigma_i^2) of a matrix or a stack (..., O, I) of matrices, in float64, differentiable,
    finite with finite gradients for zero and rank-deficient factors.

    sigma_i^2 gets a floor of 1e-12 sigma_max^2 (plus float64's smallest normal): relative, so
    the penalties stay scale invariant, and large enough that d log(sigma^2) / d sigma, which
    grows like 1 / sigma, stays representable in float32. The penalties therefore saturate at
    kappa ~ 1e6; the monitors report the true kappa.
    """
    s2 = torch.linalg.svdvals(factors.to(torch.float64)).square()
    floor = 1e-12 * s2.amax(-1, keepdim=True).detach() + torch.finfo(torch.float64).tiny
    return torch.log(s2 + floor)


def _condition_penalties(factors: Tensor, form: ConditionForm) -> Tensor:
    """The penalty of each matrix of a stack (n, O, I); see `condition_penalty`."""
    logs = _log_squared_singular_values(factors)
    q = logs.shape[-1]
    if form == "amgm":
        return q * (torch.logsumexp(logs, -1) - math.log(q)) - logs.sum(-1)
    if form == "logdet":
        log_det = logs.sum(-1) - q * math.log(q)
        return torch.logaddexp(log_det, torch.full_like(log_det, math.log(LOGDET_EPS))).square()
    if form == "logcond":
        return -torch.log(torch.exp(0.5 * (logs.amin(-1) - logs.amax(-1))) + LOGCOND_EPS)
    raise ValueError(f"unknown condition penalty {form!r}; expected amgm, logdet or logcond")


def condition_penalty(factor: Tensor, form: ConditionForm = "amgm") -> Tensor:
    """Differentiable penalty on the condition number of one factor U (q = min dim, G = q x q Gram).

    - "amgm" (default): q log(tr G / q) - log det G. Scale invariant, >= 0, zero exactly at
      kappa = 1, and every singular value gets a gradient.
    - "logdet": (log(eps + det(G / q)))^2, eps = 1e-5. Pulls det(G / q) towards 1, so it fixes
      the factor's volume, not its shape: it can reach zero at any kappa, and it saturates (no
      gradient to speak of) once det(G / q) << eps. Not scale invariant.
    - "logcond": -log(sigma_min / sigma_max + eps), eps = 1e-6 relative to sigma_max, a
      smoothed log kappa that is scale invariant and bounded by log(1 / eps); only the two
      extreme singular values get a gradient.
    Returns a float32 scalar; computed in float64 with autocast off.
    """
    with torch.autocast(factor.device.type, enabled=False):
        return _condition_penalties(factor.unsqueeze(0), form)[0].float()


def sparsity_penalty(factor: Tensor, form: SparsityForm = "l1", a: float = 1.0) -> Tensor:
    """L1 (sum |u|) or transformed L1, sum (a + 1)|u| / (a + |u|), of one factor."""
    magnitude = factor.abs().float()
    if form == "l1":
        return magnitude.sum()
    if form == "tl1":
        if a <= 0:
            raise ValueError(f"transformed-L1 parameter a must be > 0, got {a}")
        return ((a + 1) * magnitude / (a + magnitude)).sum()
    raise ValueError(f"unknown sparsity penalty {form!r}; expected l1 or tl1")


def constraint_penalties(
    model: nn.Module,
    condition: ConditionForm = "amgm",
    sparsity_form: SparsityForm = "l1",
    a: float = 1.0,
    include_sparsity: bool = True,
) -> dict[str, Tensor]:
    """Sum of the condition and sparsity penalties over every factor of every SeparableLinear.

    Returns {"cond": ..., "sparsity": ...}; both zero tensors when the model has no such layer.
    The caller weights them (so a zero weight can skip the work altogether).
    """
    if condition == "implied":
        layers = [layer for _, layer in separable_layers(model)]
        zero = next(model.parameters()).new_zeros((), dtype=torch.float32)
        parts = constraint_penalties(model, "amgm", sparsity_form, a, include_sparsity) if include_sparsity \
            else {"sparsity": zero}
        parts["cond"] = torch.stack([implied_penalty(layer) for layer in layers]).sum() if layers else zero
        return parts
    by_shape: dict[tuple, list[Tensor]] = {}
    for _, layer in separable_layers(model):
        for term in layer.factors:
            for factor in term:
                by_shape.setdefault((tuple(factor.shape), factor.device), []).append(factor)
    zero = next(model.parameters()).new_zeros((), dtype=torch.float32)
    if not by_shape:
        return {"cond": zero, "sparsity": zero}
    cond, sparse = [], []
    with torch.autocast(zero.device.type, enabled=False):
        # one batched SVD per factor shape: the per-step cost stays a few small kernels
        for factors in by_shape.values():
            stack = torch.stack(factors)
            cond.append(_condition_penalties(stack, condition).sum())
            if include_sparsity:
                sparse.append(sparsity_penalty(stack, sparsity_form, a))
    return {
        "cond": torch.stack(cond).sum().float(),
        "sparsity": torch.stack(sparse).sum() if sparse else zero,
    }


@torch.no_grad()
def proximal_step_(
    model: nn.Module, step: float, form: SparsityForm = "l1", a: float = 1.0
) -> None:
    """Soft-threshold every separable factor in place after the optimizer step.

    `step` is learning rate x sparsity weight. For L1 this is the exact proximal operator, so
    entries below the threshold become exact zeros. For transformed L1 the threshold per entry
    is step x rho_a'(|u|) = step x a (a + 1) / (a + |u|)^2 (one reweighted-L1 step, the usual
    proximal-gradient treatment of this concave penalty).
    """
    if step < 0:
        raise ValueError(f"proximal step must be >= 0, got {step}")
    for _, layer in separable_layers(model):
        for term in layer.factors:
            for factor in term:
                magnitude = factor.abs()
                if form == "l1":
                    threshold = step
                elif form == "tl1":
                    threshold = step * a * (a + 1) / (a + magnitude).square()
                else:
                    raise ValueError(f"unknown sparsity penalty {form!r}; expected l1 or tl1")
                factor.copy_(factor.sign() * (magnitude - threshold).clamp_min(0))


@dataclass(frozen=True)
class ConstraintConfig:
    """The `model.constraint` section: the joint constraint on the separable factors.

    condition_weight: weight of the condition-number penalty (0 switches it off).
    condition_form: "amgm", "logdet" or "logcond" on each factor (see condition_penalty), or
        "implied": the amgm penalty of each layer's implied matrix, at any rank (implied_penalty).
    sparsity_weight: weight of the sparsity penalty (0 switches it off).
    sparsity_form: "l1" or "tl1".
    tl1_a: the transformed-L1 parameter a.
    proximal: apply sparsity by soft-thresholding after each optimizer step (exact zeros)
        instead of adding its subgradient to the loss.
    sparsity_target: fraction of each separable layer's factor entries that end exactly zero
        (SparsityTarget's gradual magnitude rule; replaces sparsity_weight). sparsity_ramp: the
        fraction of the run's optimizer steps over which it ramps up (then fine-tuning).
    """

    condition_weight: float = 0.0
    condition_form: ConditionForm = "amgm"
    sparsity_weight: float = 0.0
    sparsity_form: SparsityForm = "l1"
    tl1_a: float = 1.0
    proximal: bool = False
    sparsity_target: float | None = None
    sparsity_ramp: float = 0.5

    def __post_init__(self) -> None:
        for name in ("condition_weight", "sparsity_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"constraint.{name} must be >= 0, got {getattr(self, name)}")
        if self.sparsity_target is not None and not 0 < self.sparsity_target < 1:
            raise ValueError(f"constraint.sparsity_target must be in (0, 1), got {self.sparsity_target}")


def constraint_loss(model: nn.Module, config: ConstraintConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """(weighted penalty to add to the loss, its parts to log); zero and nothing when off."""
    use_sparsity = config.sparsity_weight > 0 and not config.proximal and config.sparsity_target is None
    if config.condition_weight == 0 and not use_sparsity:
        return next(model.parameters()).new_zeros(()), {}
    parts = constraint_penalties(model, config.condition_form, config.sparsity_form, config.tl1_a,
                                 include_sparsity=use_sparsity)
    total = config.condition_weight * parts["cond"]
    if use_sparsity:
        total = total + config.sparsity_weight * parts["sparsity"]
    return total, {names.CONDITION_LOSS: parts["cond"], names.SPARSITY_LOSS: parts["sparsity"]}


def proximal_constraint_(model: nn.Module, config: ConstraintConfig, lr: float) -> None:
    """The proximal sparsity step after an optimizer step taken with `lr` (when configured)."""
    if config.proximal and config.sparsity_weight > 0:
        proximal_step_(model, lr * config.sparsity_weight, config.sparsity_form, config.tl1_a)


def implied_penalty(layer: SeparableLinear) -> Tensor:
    """The amgm penalty of the implied matrix W = sum_r kron(U_1(r), ..., U_N(r)), at any rank,
    without building W: q log(tr G / q) - log det G for G the smaller-side Gram of
    `implied_core` (q = its size), which has W's non-zero singular values. Scale invariant,
    >= 0, zero exactly when every non-zero singular value of W is equal.

    What it bounds: with p the penalty, kappa(W) over its non-zero singular values is at most
    2 exp(p / 2) (the arithmetic-geometric mean inequality on the two extreme eigenvalues of G),
    at every rank; for R = 1 it is sum_k (q / q_k) amgm(U_k), each factor's penalty weighted by
    the other modes' sizes (G is the Kronecker product of the factors' Grams). What it does not: a
    core whose structural rank is below its smaller side (rare: W's rank R prod min(O_k, I_k)
    below both of the core's sides) has a singular G; there the penalty falls back to the
    log-ratio of the core's extreme non-zero singular values. A G that is numerically singular
    gets a floor of 1e-12 on its eigenvalues (relative to their mean), so the penalty saturates
    near kappa ~ 1e6 as the factor penalties do. Cost per step: the core's Gram and a float64
    Cholesky (`cholesky_ex`: no host sync), O(small^2 large) -- 512 x 128 for a
    (512, 2, 2) -> (8, 8, 8) rank-4 head; rank 1 needs only the factors.
    """
    if layer.rank == 1:  # G = kron of the factors' Grams: the weighted factor penalties, exactly
        sizes = [min(f.shape) for f in layer.factors[0]]
        return sum(math.prod(sizes) / q * condition_penalty(f, "amgm") for q, f in zip(sizes, layer.factors[0]))
    with torch.autocast(layer.factors[0][0].device.type, enabled=False):
        core = implied_core(layer, torch.float64)
        tall = core if core.shape[0] >= core.shape[1] else core.mT
        q = tall.shape[1]
        if structural_rank(layer, core) < q:
            s = torch.linalg.svdvals(core)[:structural_rank(layer, core)]
            return (s[0].log() - s[-1].clamp_min(1e-30).log()).float()
        gram = tall.mT @ tall
        gram = gram / torch.diagonal(gram).mean().clamp_min(torch.finfo(torch.float64).tiny)
        floor = 1e-12 * torch.eye(q, dtype=gram.dtype, device=gram.device)
        chol, _ = torch.linalg.cholesky_ex(gram + floor)  # the floor keeps it positive definite
        logdet = 2 * torch.diagonal(chol).log().sum()
        return (q * torch.log(torch.trace(gram + floor) / q) - logdet).float()
