"""ART attacks: explicit settings, a fast estimator, and no trace left on the model.

Pixels are in [0, 1] at the model's input (normalization is inside the model) and eps is in
pixel units. ART's stock estimator switches the model to eval mode without restoring it, calls
zero_grad()/backward() on the parameters and round-trips through numpy; `FastClassifier` takes
input-only gradients on the device, and `attack_guard` restores mode, gradients and buffers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Literal

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

from sepnet import metric_names as names
from sepnet.art_adapter import FastClassifier, FloatLogits, TensorAPGD, TensorPGD, TensorSquare
from sepnet.guards import eval_mode

__all__ = ["AttackSpec", "attack_guard", "eval_mode", "FastClassifier", "Attacker", "ATTACKS",
           "TRAINING_ATTACKS", "project", "adversarial_batch", "trades_loss"]

_NORMS = {"linf": np.inf, "l2": 2}


@dataclass(frozen=True)
class AttackSpec:
    """One attack, every parameter explicit (ART's defaults assume other scales).

    name: one of ATTACKS ("fgsm", "pgd", "apgd_ce", "apgd_dlr", "autoattack",
        "autoattack_standard", "cw_linf", "deepfool", "square"), or a training-only attack of
        TRAINING_ATTACKS ("nfgsm": N-FGSM, whose examples leave the eps ball by design).
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
        if self.name not in ATTACKS and self.name not in TRAINING_ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; expected one of "
                             f"{sorted([*ATTACKS, *TRAINING_ATTACKS])}")
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


# attacks the adapter runs on device tensors (for a FastClassifier); the rest go through ART's numpy
TENSOR_ATTACKS = ("fgsm", "pgd", "apgd_ce", "apgd_dlr", "square")

# training-only attacks: their examples are not inside the eps ball, so they never score a model
TRAINING_ATTACKS: dict[str, Callable] = {"nfgsm": n_fgsm}

ATTACKS: dict[str, Callable] = {
    "fgsm": _fgsm, "pgd": _pgd, "apgd_ce": _apgd("cross_entropy"),
    "apgd_dlr": _apgd("difference_logits_ratio"), "square": _square, "autoattack": _autoattack,
    "autoattack_standard": _autoattack_standard, "cw_linf": _cw_linf, "deepfool": _deepfool,
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
        if spec.name in TRAINING_ATTACKS:
            with attack_guard(self.model):
                estimator = self.estimator(x.device, soft_labels=not self.fast)  # always a FastClassifier
                return TRAINING_ATTACKS[spec.name](estimator, x.detach().float(), y, spec).to(x.dtype)
        with attack_guard(self.model):
            estimator = self.estimator(x.device, soft_labels=soft_targets is not None)
            key = (id(estimator), spec, x.shape[0])
            tensor_path = isinstance(estimator, FastClassifier) and spec.name in TENSOR_ATTACKS
            if not tensor_path:  # ART's other attacks keep state between calls: new ones
                attack = ATTACKS[spec.name](estimator, spec, x.shape[0])
            else:  # the adapter's attacks keep none: built (their settings checked) once
                if key not in self._attacks:
                    self._attacks[key] = ATTACKS[spec.name](estimator, spec, x.shape[0])
                attack = self._attacks[key]
            labels = soft_targets if soft_targets is not None else y
            if tensor_path and isinstance(attack, TensorPGD):
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


# --------------------------------------------------------------------------- training losses
def adversarial_batch(attacker: Attacker, spec: AttackSpec, x: Tensor, y: Tensor, mix: float = 1.0) -> Tensor:
    """The batch with its first round(mix * len) images replaced by adversarial ones (PGD-AT,
    fast FGSM, N-FGSM)."""
    n_adv = round(mix * x.shape[0])
    if n_adv == 0:
        return x
    if n_adv == x.shape[0]:  # the whole batch: no copy into a new one
        return attacker.generate(x, y, spec)
    return torch.cat([attacker.generate(x[:n_adv], y[:n_adv], spec), x[n_adv:]])


def trades_loss(net: nn.Module, attacker: Attacker, spec: AttackSpec, x: Tensor, y: Tensor,
                beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """TRADES: x_adv maximizes KL(p(x) || p(x_adv)) (p(x) from the eval-mode model, as the attack
    runs in eval mode); returns (clean logits, CE(f(x), y) + beta KL(p(x) || p(x_adv)), the KL)."""
    with torch.no_grad(), eval_mode(net):
        clean_probs = net(x).softmax(-1)
    x_adv = attacker.generate(x, y, spec, soft_targets=clean_probs)
    logits = net(x)
    kl = nn.functional.kl_div(net(x_adv).log_softmax(-1), logits.softmax(-1), reduction="batchmean")
    return logits, nn.functional.cross_entropy(logits, y) + beta * kl, kl


@dataclass(frozen=True)
class AdversarialTraining:
    """The `model.adversarial` section: which examples the network trains on.

    loss: "none" (clean training), "at" (cross-entropy on adversarial examples: PGD-AT with a
        "pgd" attack, fast AT with "fgsm" (random start, step ~1.25 eps) or "nfgsm" (noise of 2
        eps, step = eps, no clipping; resists catastrophic overfitting)) or "trades" (CE(clean)
        + trades_beta KL(clean || adv), the attack maximizing that KL; "pgd" or "fgsm" or
        "lipschitz_margin" (certified training of a network with a Lipschitz bound, no attack:
        cross-entropy with sqrt(2) L margin_eps added to every wrong logit, Tsuzuku et al. 2018;
        sepnet.lipschitz).
    attack: the training attack, an AttackSpec (eps and step in pixel units).
    mix: fraction of each batch replaced by adversarial examples ("at" only; 1 = all).
    trades_beta: TRADES' weight of the robustness term.
    margin_eps, margin_temperature: the Lipschitz-margin loss's L2 radius (pixel units) and the
        temperature dividing its logits.
    """

    loss: Literal["none", "at", "trades", "lipschitz_margin"] = "none"
    attack: AttackSpec = field(default_factory=AttackSpec)
    mix: float = 1.0
    trades_beta: float = 6.0
    margin_eps: float = 36 / 255
    margin_temperature: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.attack, dict):  # read back from a checkpoint's hyperparameters
            object.__setattr__(self, "attack", AttackSpec(**self.attack))
        if self.loss not in ("none", "at", "trades", "lipschitz_margin"):
            raise ValueError(f"adversarial.loss {self.loss!r}: expected 'none', 'at', 'trades' or 'lipschitz_margin'")
        if self.margin_eps < 0 or self.margin_temperature <= 0:
            raise ValueError(f"adversarial.margin_eps must be >= 0 and margin_temperature > 0, got "
                             f"{self.margin_eps} and {self.margin_temperature}")
        if not 0 <= self.mix <= 1:
            raise ValueError(f"adversarial.mix must be in [0, 1], got {self.mix}")
        if self.trades_beta < 0:
            raise ValueError(f"adversarial.trades_beta must be >= 0, got {self.trades_beta}")
        if self.loss == "trades" and self.attack.name not in ("pgd", "fgsm"):
            raise ValueError(f"adversarial.attack {self.attack.name!r} cannot maximize TRADES' KL: "
                             "expected 'pgd' or 'fgsm' with loss 'trades'")


def adversarial_loss(net: nn.Module, attacker: Attacker, config: AdversarialTraining, x: Tensor,
                     y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
    """(logits, task loss, extra figures to log, the inputs the logits are of) for one training
    batch: the adversarial batch for "at", the clean one for "none" and "trades"."""
    if config.loss == "trades":
        logits, task, kl = trades_loss(net, attacker, config.attack, x, y, config.trades_beta)
        return logits, task, {names.TRADES_KL: kl}, x
    if config.loss == "at":
        x = adversarial_batch(attacker, config.attack, x, y, config.mix)
    logits = net(x)
    return logits, nn.functional.cross_entropy(logits, y), {}, x
