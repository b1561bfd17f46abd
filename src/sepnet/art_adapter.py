"""Every use of ART's private internals, in one place. Written against
adversarial-robustness-toolbox 1.20.1; `check_art_internals()` fails loudly when the methods it
relies on change (the tests call it).

ART stays the definition of sepnet's gradient attacks: `TensorPGD` is ART's PyTorch PGD (the
same iteration: random start in the ball, clipping, signed / normalized gradient step,
projection, clipping) run on device tensors, with the numpy parts of ART's iteration done by
torch on the device instead:
- the random start: ART draws it with numpy on the host (`art.utils.random_sphere`) and copies
  it over; here torch draws the same law (Linf: uniform in the cube; L2: uniform in the ball,
  radius eps U^(1/d), as ART's incomplete-gamma construction);
- the projection and clipping: ART builds tensors from numpy values at every call
  (`torch.tensor(eps)`, `torch.tensor(clip_max)`) and takes minima over broadcast copies;
- the NaN checks: `torch.any(grad.isnan())` and the masked assignment of NaN steps synchronize
  the device every iteration; here NaNs become 0 by `nan_to_num`, as ART replaces them.
With the random start injected (`start=`), its result is ART stock's image by image.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import art
import numpy as np
import torch
from art.attacks.evasion import ProjectedGradientDescentPyTorch
from art.estimators.classification import PyTorchClassifier
from torch import Tensor, nn

__all__ = ["ART_VERSION", "FastClassifier", "FloatLogits", "TensorPGD", "check_art_internals", "random_start"]

ART_VERSION = "1.20.1"
# ART's private methods TensorPGD overrides or calls, with the parameters it relies on
INTERNALS: dict[str, tuple[str, ...]] = {
    "_compute_pytorch": ("self", "x", "x_init", "y", "mask", "eps", "eps_step", "random_init", "momentum"),
    "_compute_perturbation_pytorch": ("self", "x", "y", "mask", "momentum"),
    "_apply_perturbation_pytorch": ("self", "x", "perturbation", "eps_step"),
    "_projection": ("values", "eps", "norm_p", "suboptimal"),
}
# attributes of ART's objects read here: PGD's settings, and the estimator's wrapped model / device
PGD_ATTRIBUTES = ("norm", "eps", "eps_step", "max_iter", "num_random_init", "targeted", "decay", "estimator")
ESTIMATOR_ATTRIBUTES = ("_model", "_device", "clip_values", "nb_classes")


def check_art_internals() -> None:
    """Raise if the installed ART is not the one this module was written against, or if the
    private methods it overrides have other parameters."""
    if art.__version__ != ART_VERSION:
        raise RuntimeError(f"sepnet.art_adapter was written against ART {ART_VERSION}, found {art.__version__}: "
                           "check TensorPGD against ART's ProjectedGradientDescentPyTorch, then update ART_VERSION")
    for name, params in INTERNALS.items():
        found = tuple(inspect.signature(getattr(ProjectedGradientDescentPyTorch, name)).parameters)
        if found != params:
            raise RuntimeError(f"ART's ProjectedGradientDescentPyTorch.{name}{found} changed (expected {params}): "
                               "sepnet.art_adapter.TensorPGD must follow it")
    model = nn.Linear(2, 2)
    estimator = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(2,), nb_classes=2,
                                  clip_values=(0.0, 1.0))
    pgd = ProjectedGradientDescentPyTorch(estimator, eps=0.1, eps_step=0.05, max_iter=1, verbose=False)
    for owner, attributes in ((estimator, ESTIMATOR_ATTRIBUTES), (pgd, PGD_ATTRIBUTES)):
        missing = [a for a in attributes if not hasattr(owner, a)]
        if missing:
            raise RuntimeError(f"ART's {type(owner).__name__} lacks {missing}: sepnet.art_adapter must follow it")
    if getattr(estimator._model, "_model", None) is not model:
        raise RuntimeError("ART's PyTorchClassifier no longer keeps the model as `_model._model`: "
                           "sepnet.art_adapter.FastClassifier must follow it")


def random_start(shape: tuple[int, ...], eps: float, norm: float, device, dtype=torch.float32) -> Tensor:
    """A point drawn uniformly from the norm ball of radius eps, per sample (ART's
    `random_sphere` law), on the device: Linf uniform in the cube; L2 a uniform direction
    times eps U^(1/d)."""
    n, d = shape[0], math.prod(shape[1:])
    if norm == np.inf:
        return torch.empty(shape, device=device, dtype=dtype).uniform_(-eps, eps)
    if norm == 2:
        direction = torch.randn(n, d, device=device, dtype=dtype)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-30)
        radius = eps * torch.rand(n, 1, device=device, dtype=dtype).pow(1 / d)
        return (direction * radius).view(shape)
    raise NotImplementedError(f"random start for norm {norm}: expected inf or 2")


class FloatLogits(nn.Module):
    """The model with float32 outputs, whatever autocast computed: ART turns logits into numpy
    arrays (its APGD builds its own stock estimators from `estimator.model`), and numpy has no
    bfloat16. Holds no state of its own; modes and buffers are the wrapped model's."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).float()


class FastClassifier(PyTorchClassifier):
    """ART estimator with input-only gradients that stay on the device.

    `loss_gradient` differentiates the loss with torch.autograd.grad with respect to the input
    alone (no parameter gradients, no zero_grad), keeps torch tensors as torch tensors, and
    leaves the model's mode alone (the caller holds `attack_guard`). With `soft_labels=True`
    the targets are probability vectors and the loss is KL(target || model), TRADES' inner loss.
    """

    def __init__(self, *args, soft_labels: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.soft_labels = soft_labels
        # channels-last images take the faster oneDNN / cuDNN convolution paths; a model without
        # convolutions would only pay for the copy (and a reshape of it in its first layer)
        self._channels_last = any(isinstance(m, nn.Conv2d) for m in self._model._model.modules())
        low_high = self.clip_values  # as Python floats, read once (not a numpy reduction an iteration)
        self.clip_range = None if low_high is None else (float(np.min(low_high[0])), float(np.max(low_high[1])))

    @property
    def takes_indices(self) -> bool:
        """Whether `loss_gradient` may be given class indices instead of one-hot labels."""
        return not self.soft_labels

    def _loss_value(self, logits: Tensor, y: Tensor) -> Tensor:
        if self.soft_labels:
            return nn.functional.kl_div(logits.log_softmax(-1), y.float(), reduction="sum")
        if y.dim() == 2:
            y = y.argmax(-1)
        return nn.functional.cross_entropy(logits, y.long(), reduction="sum")

    def _layout(self, x: Tensor) -> Tensor:
        """Images in channels-last layout for a convolutional model; values are unchanged."""
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last and x.dim() == 4 else x

    def loss_gradient(self, x, y, training_mode: bool = False, **kwargs):
        as_numpy = not isinstance(x, Tensor)
        x_t = self._layout(torch.as_tensor(x, device=self._device).float()).detach().requires_grad_(True)
        y_t = torch.as_tensor(y, device=self._device)
        with torch.enable_grad():
            loss = self._loss_value(self._model._model(x_t), y_t)
            (grad,) = torch.autograd.grad(loss, x_t)
        return grad.float().cpu().numpy() if as_numpy else grad

    def logits(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """Model outputs for a device tensor, in chunks, without gradients."""
        with torch.no_grad():
            return torch.cat([self._model._model(self._layout(chunk)) for chunk in x.float().split(batch_size)])

    def predict(self, x, batch_size: int = 256, training_mode: bool = False, **kwargs):
        out = self.logits(torch.as_tensor(x, device=self._device), batch_size)
        return out if isinstance(x, Tensor) else out.cpu().numpy()


class TensorPGD(ProjectedGradientDescentPyTorch):
    """ART's PGD on device tensors, without numpy, host round trips or device syncs in its
    iterations (module docstring), without ART's DataLoader, and without the success rate ART
    computes with two extra forward passes only to log it. Restarts keep, per sample, the first
    adversarial example that fools the model (one sync per restart: evaluation only).

    `start`: a function (shape, eps) -> the random start's perturbation, to inject one (tests
    compare with ART stock); None draws it with `random_start`."""

    start: Callable[[tuple[int, ...], float], Tensor] | None = None

    def generate_tensor(self, x: Tensor, targets: Tensor) -> Tensor:
        """x: inputs on the estimator's device; targets: one-hot labels (or probabilities)."""
        self._batch_id = 0
        best, fooled = None, None
        # class indices once, for an estimator that takes them (FastClassifier), not an argmax an iteration
        labels = targets.argmax(-1) if getattr(self.estimator, "takes_indices", False) else targets
        for _ in range(max(1, self.num_random_init)):  # no step writes into x: it starts as x itself
            adv, momentum = x, (torch.zeros_like(x) if self.decay is not None else None)
            for i in range(self.max_iter):
                self._i_max_iter = i
                adv = self._compute_pytorch(adv, x, labels, None, self.eps, self.eps_step,
                                            self.num_random_init > 0 and i == 0, momentum)
            if best is None:
                best = adv
            else:
                best = torch.where(fooled.view(-1, *[1] * (x.dim() - 1)), best, adv)
            if self.num_random_init <= 1:
                break
            with torch.no_grad():
                fooled = self.estimator.logits(best).argmax(-1) != targets.argmax(-1)
            if bool(fooled.all()):
                break
        return best

    def _norm(self) -> float:
        return np.inf if self.norm in ("inf", np.inf) else float(self.norm)

    def _clip(self, x: Tensor) -> Tensor:
        clip = getattr(self.estimator, "clip_range", None)
        if clip is None and self.estimator.clip_values is not None:  # an ART stock estimator
            clip = (float(np.min(self.estimator.clip_values[0])), float(np.max(self.estimator.clip_values[1])))
        return x if clip is None else x.clamp(*clip)

    def _compute_pytorch(self, x, x_init, y, mask, eps, eps_step, random_init, momentum):
        if random_init:
            draw = self.start or (lambda shape, radius: random_start(shape, radius, self._norm(), x.device, x.dtype))
            delta = draw(tuple(x.shape), float(eps))
            x = self._clip(x + (delta if mask is None else delta * mask))
        perturbation = self._compute_perturbation_pytorch(x, y, mask, momentum)
        x = self._apply_perturbation_pytorch(x, perturbation, eps_step)
        return x_init + self._projection(x - x_init, eps, self.norm)

    def _compute_perturbation_pytorch(self, x, y, mask, momentum):
        grad = torch.nan_to_num_(self.estimator.loss_gradient(x=x, y=y), nan=0.0)  # in place: a fresh tensor
        if self.targeted:
            grad = -grad
        if mask is not None:
            grad = grad * (mask != 0)
        if self.decay is not None:  # momentum (MI-FGSM), in place as ART does
            flat = grad.reshape(len(grad), -1)
            l1 = flat.norm(p=1, dim=1, keepdim=True)
            momentum.mul_(self.decay).add_((flat / torch.where(l1 == 0, 1, l1)).view_as(grad))
            grad = momentum
        norm = self._norm()
        if norm == np.inf:
            return grad.sign()
        if norm == 2:
            flat = grad.reshape(len(grad), -1)
            length = flat.norm(dim=1, keepdim=True)
            return (flat / torch.where(length == 0, 1, length)).view_as(grad)
        return super()._compute_perturbation_pytorch(x, y, mask, momentum)

    def _apply_perturbation_pytorch(self, x, perturbation, eps_step):
        return self._clip(x + float(eps_step) * perturbation)  # finite: the gradient's NaNs are 0 already

    @staticmethod
    def _projection(values, eps, norm_p, *, suboptimal: bool = True):
        eps = float(eps)
        if norm_p in ("inf", np.inf):
            return values.clamp(-eps, eps)
        if float(norm_p) == 2:
            flat = values.reshape(len(values), -1)
            length = flat.norm(dim=1, keepdim=True)
            scale = torch.where(length == 0, 1, (eps / length).clamp(max=1.0))
            return (flat * scale).view_as(values)
        return ProjectedGradientDescentPyTorch._projection(values, eps, norm_p, suboptimal=suboptimal)
