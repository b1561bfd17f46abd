"""ART attacks: explicit settings, a fast estimator, and no trace left on the model.

Pixels are in [0, 1] at the model's input (normalization is inside the model) and eps is in
pixel units. ART's stock estimator switches the model to eval mode without restoring it, calls
zero_grad()/backward() on the parameters and round-trips through numpy; `FastClassifier` takes
input-only gradients on the device, and `attack_guard` restores mode, gradients and buffers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from art.attacks.evasion import (
    AutoAttack,
    AutoProjectedGradientDescent,
    CarliniLInfMethod,
    DeepFool,
    SquareAttack,
)
from art.estimators.classification import PyTorchClassifier
from torch import Tensor, nn

from sepnet.art_adapter import FastClassifier, FloatLogits, TensorAPGD, TensorPGD, TensorSquare
from sepnet.guards import eval_mode

__all__ = ["AttackSpec", "AttackEntry", "attack_guard", "eval_mode", "FastClassifier", "Attacker", "ATTACKS",
           "project"]

_NORMS = {"linf": np.inf, "l2": 2}


@dataclass(frozen=True)
class AttackSpec:
    """One attack, every parameter explicit (ART's defaults assume other scales).

    name: one of ATTACKS ("fgsm", "pgd", "apgd_ce", "apgd_dlr", "autoattack",
        "autoattack_standard", "cw_linf", "deepfool", "square", and the training-only "nfgsm":
        N-FGSM, whose examples leave the eps ball by design).
    norm: "linf" or "l2". eps, step_size: pixel units; step_size unset is eps for "fgsm" and
        "nfgsm" (the classic one-step attacks) and 2/255 for the others. FGSM with a random start
        and step_size ~1.25 eps is fast FGSM (Wong et al.): one PGD step, step_size honoured.
        steps: iterations (queries for Square).
    random_start: start from a random point of the eps ball (FGSM/PGD).
    restarts: random restarts (PGD, APGD, Square).
    """

    name: str = "pgd"
    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float | None = None
    steps: int = 10
    random_start: bool = True
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; expected one of {sorted(ATTACKS)}")
        if self.norm not in _NORMS:
            raise ValueError(f"unknown attack norm {self.norm!r}; expected 'linf' or 'l2'")
        if not (isinstance(self.eps, (int, float)) and self.eps >= 0 and math.isfinite(self.eps)):
            raise ValueError(f"attack eps must be a finite number >= 0, got {self.eps}")
        if self.step_size is None:
            one_step = self.name in ("fgsm", "nfgsm") and self.eps > 0
            object.__setattr__(self, "step_size", self.eps if one_step else 2 / 255)
        if self.norm == "linf" and self.eps > 1:
            raise ValueError(f"attack eps {self.eps:g} is above 1: eps is in pixel units (pixels in "
                             "[0, 1]); for 8/255 write 0.0314")
        if not self.step_size > 0:
            raise ValueError(f"attack step_size must be > 0, got {self.step_size}")
        if self.steps < 1:
            raise ValueError(f"attack steps must be >= 1, got {self.steps}")
        if self.restarts < 1:
            raise ValueError(f"attack restarts must be >= 1, got {self.restarts}")
        if self.name in ("cw_linf", "nfgsm") and self.norm != "linf":
            raise ValueError(f"{self.name} is an Linf attack, got norm {self.norm!r}")

    @property
    def entry(self) -> "AttackEntry":
        """What ATTACKS knows of this attack: its builder, path, use and class-count rule."""
        return ATTACKS[self.name]

    def check_classes(self, num_classes: int, where: str) -> None:
        """A one-line error where the model has too few classes for this attack."""
        if num_classes < self.entry.min_classes:
            raise ValueError(f"{where}: {self.name} needs at least {self.entry.min_classes} classes (it uses the "
                             f"third logit), the model has {num_classes}: expected other attacks")

    @property
    def label(self) -> str:
        """Metric name: val/robust_acc/<label>."""
        return self.name if self.name == "cw_linf" else f"{self.name}_{self.norm}"

    def replace(self, **changes) -> "AttackSpec":
        return AttackSpec(**{**asdict(self), **changes})


@contextlib.contextmanager
def attack_guard(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients enabled (also inside no_grad or inference_mode), and afterwards the
    train/eval mode of every submodule, parameter gradients and buffers (BatchNorm statistics)
    exactly as before."""
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    buffers = {b: b.detach().clone() for b in model.buffers()}
    try:
        with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        with torch.no_grad():
            for p, g in grads.items():
                p.grad = g
            for b, value in buffers.items():
                b.copy_(value)


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project x_adv onto the eps ball around x (Linf or L2) and into [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        delta = delta * (eps / norms).clamp(max=1.0)
    return (x + delta).clamp(0, 1)


# --------------------------------------------------------------------------- attack factory
def _fgsm(est, s, bs):
    """FGSM as one step of ART's PGD: from x, or from a random point of the ball (fast FGSM),
    a step of `step_size`, projected to the ball and [0, 1]. ART's FastGradientMethod always
    steps eps outside its minimal mode (its eps_step is the minimal search's increment), so
    fast FGSM's step 1.25 eps would be silently lost there; this also stays on the device."""
    return TensorPGD(est, norm=_NORMS[s.norm], eps=s.eps, eps_step=s.step_size, max_iter=1,
                     num_random_init=int(s.random_start), batch_size=bs, verbose=False)


def _pgd(est, s, bs):
    return TensorPGD(
        est, norm=_NORMS[s.norm], eps=s.eps, eps_step=s.step_size, max_iter=s.steps,
        num_random_init=s.restarts if s.random_start else 0, batch_size=bs, verbose=False)


def _apgd_class(est) -> type:
    """TensorAPGD / TensorSquare (ART's iterations on the device, sepnet.art_adapter) for a
    FastClassifier; ART's stock classes for a stock estimator (`Attacker(fast=False)`, the
    reference the benchmarks compare with)."""
    return TensorAPGD if isinstance(est, FastClassifier) else AutoProjectedGradientDescent


def _square_class(est) -> type:
    return TensorSquare if isinstance(est, FastClassifier) else SquareAttack


def _apgd(loss_type):
    def build(est, s, bs):
        return _apgd_class(est)(
            est, norm=_NORMS[s.norm], eps=s.eps, eps_step=s.step_size, max_iter=s.steps,
            nb_random_init=s.restarts, batch_size=bs, loss_type=loss_type, verbose=False)
    return build


def _square(est, s, bs):
    return _square_class(est)(est, norm=_NORMS[s.norm], max_iter=s.steps, eps=s.eps, p_init=0.8,
                              nb_restarts=s.restarts, batch_size=bs, verbose=False)


def _autoattack(est, s, bs):
    """ART's own AutoAttack set, spelled out (ART builds it with progress bars on): APGD-CE and
    APGD-DLR (100 steps, 5 restarts each), DeepFool (100 steps), Square (5000 queries, 5
    restarts), all untargeted."""
    norm = _NORMS[s.norm]
    attacks = [
        _apgd_class(est)(est, norm=norm, eps=s.eps, eps_step=s.step_size, max_iter=100,
                                     nb_random_init=5, batch_size=bs, loss_type=loss, verbose=False)
        for loss in ("cross_entropy", "difference_logits_ratio")
    ]
    attacks += [DeepFool(est, max_iter=100, epsilon=1e-3, nb_grads=10, batch_size=bs, verbose=False),
                _square_class(est)(est, norm=norm, max_iter=5000, eps=s.eps, p_init=0.8, nb_restarts=5,
                             batch_size=bs, verbose=False)]
    return AutoAttack(est, norm=norm, eps=s.eps, eps_step=s.step_size, attacks=attacks, batch_size=bs)


def _autoattack_standard(est, s, bs):
    """As close to RobustBench's "standard" AutoAttack as ART allows: APGD-CE (100 steps, no
    restart), targeted APGD-DLR (AutoAttack(targeted=True) runs it against every other class,
    not only the top 9), Square (5000 queries). FAB-T has no ART implementation and is left out."""
    attacks = [
        _apgd_class(est)(est, norm=_NORMS[s.norm], eps=s.eps, eps_step=s.step_size,
                         max_iter=100, nb_random_init=1, batch_size=bs,
                         loss_type="cross_entropy", verbose=False),
        _apgd_class(est)(est, norm=_NORMS[s.norm], eps=s.eps, eps_step=s.step_size,
                         max_iter=100, nb_random_init=1, batch_size=bs, targeted=True,
                         loss_type="difference_logits_ratio", verbose=False),
        _square_class(est)(est, norm=_NORMS[s.norm], max_iter=5000, eps=s.eps, p_init=0.8,
                           nb_restarts=1, batch_size=bs, verbose=False),
    ]
    return AutoAttack(est, norm=_NORMS[s.norm], eps=s.eps, eps_step=s.step_size, attacks=attacks,
                      batch_size=bs, targeted=True)


def _cw_linf(est, s, bs):
    return CarliniLInfMethod(est, confidence=0.0, learning_rate=s.step_size, max_iter=s.steps,
                             batch_size=bs, verbose=False)


def _deepfool(est, s, bs):
    return DeepFool(est, max_iter=s.steps, epsilon=0.02, nb_grads=10, batch_size=bs, verbose=False)


def n_fgsm(estimator: FastClassifier, x: Tensor, y: Tensor, spec: AttackSpec) -> Tensor:
    """N-FGSM (de Jorge et al. 2022, "Make some noise"): uniform noise of 2 eps, one signed
    gradient step of `step_size` from there, and no projection back to the eps ball (only into
    [0, 1]); the larger, unclipped perturbation is what avoids fast FGSM's catastrophic
    overfitting. Linf only; use step_size = eps, as the paper does."""
    start = (x + torch.empty_like(x).uniform_(-2 * spec.eps, 2 * spec.eps)).clamp(0, 1)
    # class indices where the estimator takes them; else soft labels (KL to a one-hot target =
    # cross-entropy, the same gradient)
    labels = y.long() if estimator.takes_indices else nn.functional.one_hot(y.long(), estimator.nb_classes).float()
    grad = estimator.loss_gradient(start, labels)
    return (start + spec.step_size * grad.sign()).clamp(0, 1).detach()


@dataclass(frozen=True)
class AttackEntry:
    """One attack of the registry. build: (estimator, spec, batch size) -> an ART attack object;
    craft: (estimator, x, y, spec) -> examples, for an attack that is a function, not an ART
    class; tensor: runs on device tensors through sepnet.art_adapter (with a FastClassifier);
    one_hot: its tensor path takes one-hot (or soft) labels, not class indices; training_only:
    its examples leave the eps ball, so it never scores a model; min_classes: fewest classes it
    works on (DLR divides by the third-largest logit)."""

    build: Callable | None = None
    craft: Callable | None = None
    tensor: bool = False
    one_hot: bool = False
    training_only: bool = False
    min_classes: int = 2


ATTACKS: dict[str, AttackEntry] = {
    "fgsm": AttackEntry(_fgsm, tensor=True, one_hot=True),
    "pgd": AttackEntry(_pgd, tensor=True, one_hot=True),
    "apgd_ce": AttackEntry(_apgd("cross_entropy"), tensor=True),
    "apgd_dlr": AttackEntry(_apgd("difference_logits_ratio"), tensor=True, min_classes=3),
    "square": AttackEntry(_square, tensor=True),
    "autoattack": AttackEntry(_autoattack, min_classes=3),
    "autoattack_standard": AttackEntry(_autoattack_standard, min_classes=3),
    "cw_linf": AttackEntry(_cw_linf),
    "deepfool": AttackEntry(_deepfool),
    "nfgsm": AttackEntry(craft=n_fgsm, training_only=True),
}


class Attacker:
    """Builds the estimators once per model and crafts adversarial examples in [0, 1].

    Args:
        model: the plain nn.Module (pixels in [0, 1] in, logits out).
        input_shape: (C, H, W).
        num_classes: classes.
        fast: use FastClassifier (input-only gradients on the device); False uses ART's stock
            PyTorchClassifier (for comparison; it is slower, the guard keeps it traceless).
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], num_classes: int,
                 fast: bool = True) -> None:
        self.model = model
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.fast = fast
        self._estimators: dict[tuple, PyTorchClassifier] = {}
        self._attacks: dict[tuple, object] = {}  # ART attack objects, per estimator, spec and batch size

    def estimator(self, device: torch.device, soft_labels: bool = False) -> PyTorchClassifier:
        key = (str(device), soft_labels)
        if key not in self._estimators:
            cls = FastClassifier if (self.fast or soft_labels) else PyTorchClassifier
            extra = {"soft_labels": soft_labels} if cls is FastClassifier else {}
            self._estimators[key] = cls(
                model=FloatLogits(self.model), loss=nn.CrossEntropyLoss(), input_shape=self.input_shape,
                nb_classes=self.num_classes, clip_values=(0.0, 1.0),
                device_type="gpu" if device.type == "cuda" else "cpu", **extra)
        return self._estimators[key]

    def generate(self, x: Tensor, y: Tensor, spec: AttackSpec, soft_targets: Tensor | None = None) -> Tensor:
        """Adversarial version of x (same device and dtype), inside the eps ball and [0, 1].

        With `soft_targets` (probabilities), PGD/FGSM maximize KL(soft_targets || model): the
        TRADES inner maximization.
        """
        if spec.eps == 0:
            return x.detach().clone()
        entry = spec.entry
        if entry.craft is not None:
            with attack_guard(self.model):
                estimator = self.estimator(x.device, soft_labels=not self.fast)  # always a FastClassifier
                return entry.craft(estimator, x.detach().float(), y, spec).to(x.dtype)
        with attack_guard(self.model):
            estimator = self.estimator(x.device, soft_labels=soft_targets is not None)
            key = (id(estimator), spec, x.shape[0])
            tensor_path = isinstance(estimator, FastClassifier) and entry.tensor
            if not tensor_path:  # ART's other attacks keep state between calls: new ones
                attack = entry.build(estimator, spec, x.shape[0])
            else:  # the adapter's attacks keep none: built (their settings checked) once
                if key not in self._attacks:
                    self._attacks[key] = entry.build(estimator, spec, x.shape[0])
                attack = self._attacks[key]
            labels = soft_targets if soft_targets is not None else y
            if tensor_path and entry.one_hot:  # TensorPGD
                if soft_targets is None:
                    labels = nn.functional.one_hot(y.long(), self.num_classes).float()
                adv = attack.generate_tensor(x.detach().float(), labels.detach().float())
                return adv.to(x.dtype)  # projected onto the ball and clipped to [0, 1] in each iteration
            if tensor_path:  # TensorAPGD, TensorSquare: class indices
                adv = attack.generate_tensor(x.detach().float(), y.long())
            else:
                adv = attack.generate(x.detach().float().cpu().numpy(), y=labels.detach().cpu().numpy())
        # minimum-perturbation attacks (DeepFool, CW) are unbounded: score them inside the ball;
        # for the others this only removes float rounding at the boundary
        return project(torch.as_tensor(adv, device=x.device).to(x.dtype), x.detach(), spec.eps, spec.norm)
