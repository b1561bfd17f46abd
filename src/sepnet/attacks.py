"""ART attacks, run so that they leave no trace on the model.

Pixels are in [0, 1] at the model's input (normalization is inside the model) and eps is in
pixel units. ART's estimator switches the model to eval mode without restoring it, and calls
zero_grad()/backward() on the parameters; `attack_guard` undoes all of that.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch
from art.estimators.classification import PyTorchClassifier
from torch import Tensor, nn

__all__ = ["AttackSpec", "attack_guard", "Attacker"]

_NORMS = {"linf": np.inf, "l2": 2}


@dataclass(frozen=True)
class AttackSpec:
    """One attack, every parameter explicit (ART's defaults assume other scales).

    name: "pgd" or "fgsm"; norm: "linf" or "l2"; eps and step_size in pixel units;
    steps: iterations (PGD); random_start: start from a uniform point in the eps ball.
    """

    name: str = "pgd"
    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.name not in ("pgd", "fgsm"):
            raise ValueError(f"unknown attack {self.name!r}; expected 'pgd' or 'fgsm'")
        if self.norm not in _NORMS:
            raise ValueError(f"unknown attack norm {self.norm!r}; expected 'linf' or 'l2'")
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise ValueError(f"attack eps must be a finite number >= 0, got {self.eps}")
        if not self.step_size > 0:
            raise ValueError(f"attack step_size must be > 0, got {self.step_size}")
        if self.steps < 1:
            raise ValueError(f"attack steps must be >= 1, got {self.steps}")

    @property
    def label(self) -> str:
        return f"{self.name}_{self.norm}" if self.name == "pgd" else self.name


@contextlib.contextmanager
def attack_guard(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients enabled, parameter gradients and buffers (BatchNorm statistics)
    restored afterwards, and the train/eval mode of every submodule restored."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    buffers = {b: b.detach().clone() for b in model.buffers()}
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for p, g in grads.items():
                p.grad = g
            for b, value in buffers.items():
                b.copy_(value)


class Attacker:
    """Builds ART's estimator once per model and crafts adversarial examples in [0, 1]."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
        self.model = model
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self._estimator: PyTorchClassifier | None = None

    def estimator(self, device: torch.device) -> PyTorchClassifier:
        if self._estimator is None or self._estimator.device != device:
            self._estimator = PyTorchClassifier(
                model=self.model, loss=nn.CrossEntropyLoss(), input_shape=self.input_shape,
                nb_classes=self.num_classes, clip_values=(0.0, 1.0),
                device_type="gpu" if device.type == "cuda" else "cpu")
        return self._estimator

    def _art_attack(self, spec: AttackSpec, device: torch.device, batch_size: int):
        estimator = self.estimator(device)
        norm = _NORMS[spec.norm]
        if spec.name == "fgsm":
            return FastGradientMethod(estimator, norm=norm, eps=spec.eps, eps_step=spec.step_size,
                                      num_random_init=int(spec.random_start), batch_size=batch_size)
        return ProjectedGradientDescentPyTorch(
            estimator, norm=norm, eps=spec.eps, eps_step=spec.step_size, max_iter=spec.steps,
            num_random_init=int(spec.random_start), batch_size=batch_size, verbose=False)

    def generate(self, x: Tensor, y: Tensor, spec: AttackSpec) -> Tensor:
        """Adversarial version of x (same device and dtype), inside the eps ball and [0, 1]."""
        if spec.eps == 0:
            return x.detach().clone()
        with attack_guard(self.model):
            attack = self._art_attack(spec, x.device, batch_size=x.shape[0])
            adv = attack.generate(x.detach().float().cpu().numpy(), y=y.detach().cpu().numpy())
        return torch.as_tensor(adv, device=x.device).to(x.dtype)
