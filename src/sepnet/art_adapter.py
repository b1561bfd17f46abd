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
from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescentPyTorch, SquareAttack
from art.estimators.classification import PyTorchClassifier
from torch import Tensor, nn

__all__ = ["ART_VERSION", "FastClassifier", "FloatLogits", "TensorAPGD", "TensorPGD", "TensorSquare", "check_art_internals",
           "random_start"]

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


def norm_order(norm) -> float:
    """An ART attack's `norm` setting as a number: np.inf for "inf" / np.inf, else float."""
    return np.inf if norm in ("inf", np.inf) else float(norm)


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
        return norm_order(self.norm)

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


# --------------------------------------------------------------------------- evaluation attacks
def _forward(estimator, x: Tensor) -> Tensor:
    """The estimator's model on a device tensor (channels-last for a FastClassifier's convnet)."""
    layout = getattr(estimator, "_layout", None)
    return estimator._model._model(x if layout is None else layout(x))


def _class_indices(y, device) -> Tensor:
    y = torch.as_tensor(y, device=device)
    return y.argmax(-1) if y.dim() == 2 else y.long()


def _apgd_loss(loss_type: str, logits: Tensor, y: Tensor) -> Tensor:
    """ART's per-image APGD losses: cross-entropy, or the difference of logits ratio
    -(z_y - z_i) / (z_1 - z_3), z_i the largest other logit (ART's formula, vectorized: ART
    loops over the images in Python)."""
    if loss_type == "cross_entropy":
        return nn.functional.cross_entropy(logits, y, reduction="none")
    top = logits.sort(dim=1).values
    z_y = logits.gather(1, y[:, None])[:, 0]
    z_i = torch.where(logits.argmax(1) != y, top[:, -1], top[:, -2])
    return -(z_y - z_i) / (top[:, -1] - top[:, -3])


class TensorAPGD(AutoProjectedGradientDescent):
    """ART's AutoProjectedGradientDescent (Croce & Hein 2020) on device tensors: ART's iteration
    (its step-size checkpoints, momentum 0.75, the conditions that halve the step and return to
    the best point, its losses) with one forward-backward pass per iteration where ART makes
    three passes (a gradient, then the loss of the new point apart, with parameter gradients
    and numpy copies), and DLR vectorized where ART loops over images in Python.

    One forward-backward per iteration is possible because the loss of the new point and the
    gradient there come from the same pass; when a checkpoint sends an image back to its best
    point, the gradient stored with that point is reused (the reference AutoAttack does the
    same). The iterates are ART's.

    What comes back differs from ART in one way, on purpose: ART returns the *last* iterate if
    it fools the model and otherwise the random start, so an image fooled at some iterate and
    recovered by the last one counts as robust; here it gets the last iterate that fooled the
    model (the reference AutoAttack's rule). The robust set is therefore ART's or a subset of
    it, never larger (`keep_best = False` gives ART's rule, for the equality tests).

    `start`: as TensorPGD's, a function (shape, eps) -> the random start's perturbation."""

    start: Callable[[tuple[int, ...], float], Tensor] | None = None
    keep_best: bool = True

    def __init__(self, estimator, *args, **kwargs) -> None:
        self._source = estimator  # ART swaps the estimator for a stock one built around its model
        super().__init__(estimator, *args, **kwargs)

    def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs) -> np.ndarray:
        """ART's numpy entry point (ART's AutoAttack calls it), on the tensor path; a `mask`
        goes to ART's own iteration."""
        if kwargs.get("mask") is not None:
            return super().generate(x, y, **kwargs)
        device = self._source._device
        x_t = torch.as_tensor(x, device=device).float()
        if y is None:
            if self.targeted:
                raise ValueError("Target labels `y` need to be provided for a targeted attack.")
            y = self._source.predict(x, batch_size=self.batch_size).argmax(-1)
        return self.generate_tensor(x_t, _class_indices(y, device)).cpu().numpy()

    def _norm(self) -> float:
        return norm_order(self.norm)

    def _step_direction(self, grad: Tensor) -> Tensor:
        norm, flat = self._norm(), grad.reshape(len(grad), -1)
        if norm == np.inf:
            return grad.sign()
        order = 1 if norm == 1 else 2
        return (flat / (flat.norm(p=order, dim=1, keepdim=True) + 1e-7)).view_as(grad)  # ART's tol

    def _loss_grad(self, x: Tensor, y: Tensor, grad: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """Per-image loss, the gradient of their mean (ART's reduction) and the predictions."""
        x = x.detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            logits = _forward(self._source, x).float()
            loss = _apgd_loss(self.loss_type, logits, y)
            g = torch.autograd.grad(loss.mean(), x)[0] if grad else None
        if g is not None and self.targeted:
            g = -g
        return loss.detach(), g, logits.detach().argmax(-1)

    def _fooled(self, pred: Tensor, y: Tensor) -> Tensor:
        return pred == y if self.targeted else pred != y

    def generate_tensor(self, x: Tensor, y: Tensor) -> Tensor:
        """x: images on the device; y: class indices (or one-hot), the targets if targeted."""
        y = _class_indices(y, x.device)
        x = x.detach()
        x_adv = x.clone()
        clip = self._source.clip_values
        low, high = (0.0, 1.0) if clip is None else (float(np.min(clip[0])), float(np.max(clip[1])))
        draw = self.start or (lambda shape, radius: random_start(shape, radius, self._norm(), x.device, x.dtype))
        for _ in range(max(1, self.nb_random_init)):
            with torch.no_grad():
                robust = ~self._fooled(_forward(self._source, x_adv).argmax(-1), y)
            if not bool(robust.any()):
                break
            idx = robust.nonzero().flatten()
            x_init = x[idx]
            start = (x_adv[idx] + draw(tuple(x_init.shape), float(self.eps))).clamp(low, high)
            start = x_init + TensorPGD._projection(start - x_init, self.eps, self.norm)
            out = torch.cat([self._run(s, xi, yi, low, high) for s, xi, yi in
                             zip(start.split(self.batch_size), x_init.split(self.batch_size), y[idx].split(self.batch_size))])
            x_adv[idx] = out
        return x_adv

    def _checkpoints(self) -> list[int]:
        w = [0, 0.22]
        while w[-1] + max(w[-1] - w[-2] - 0.03, 0.06) <= 1:
            w.append(w[-1] + max(w[-1] - w[-2] - 0.03, 0.06))
        return [math.ceil(p * self.max_iter) for p in w]

    def _run(self, x_k: Tensor, x_init: Tensor, y: Tensor, low: float, high: float) -> Tensor:
        """ART's APGD iteration on one batch from its start x_k; the adversarial batch back."""
        start, checkpoints = x_k, self._checkpoints()
        shape = (len(x_k),) + (1,) * (x_k.dim() - 1)
        eta = torch.full(shape, float(self.eps_step), device=x_k.device)
        count = torch.zeros(len(x_k), device=x_k.device)
        project = lambda v: x_init + TensorPGD._projection(v - x_init, self.eps, self.norm)  # noqa: E731
        loss_k, grad_k, _ = self._loss_grad(x_k, y, True)
        found = start  # per image, the last iterate that fooled the model; the start if none did (ART's rule)
        for k in range(self.max_iter):
            z = (x_k + eta * self._step_direction(grad_k)).clamp(low, high)
            last = k == self.max_iter - 1
            if k == 0:
                x_next = project(z)
                f_next, grad_next, pred = self._loss_grad(x_next, y, not last)
                eta_prev, f_max_prev = eta.clone(), loss_k.clone()
                f_max, x_max, x_max_prev = loss_k.clone(), x_k.clone(), x_init.clone()
                grad_max = grad_k.clone()
                better = f_next >= loss_k
            else:
                z = project(z)
                x_next = project((x_k + 0.75 * (z - x_k) + 0.25 * (x_k - x_k_prev)).clamp(low, high))
                f_next, grad_next, pred = self._loss_grad(x_next, y, not last)
                better = f_next < f_max if self.targeted else f_next > f_max
            found = torch.where(self._fooled(pred, y).view(shape), x_next, found)
            if k > 0 and bool((f_next == 0).all()):  # ART's early exit
                x_k = x_next
                break
            count += better
            f_max = torch.where(better, f_next, f_max)
            if k > 0:  # ART keeps x_init as the first best point's predecessor
                x_max_prev = torch.where(better.view(shape), x_k, x_max_prev)
            x_max = torch.where(better.view(shape), x_next, x_max)
            if grad_next is not None:
                grad_max = torch.where(better.view(shape), grad_next, grad_max)
            x_k_prev, x_k, grad_k = x_k, x_next, grad_next
            if k > 0 and k in checkpoints:
                since = k - checkpoints[checkpoints.index(k) - 1]
                back = (count < 0.75 * since) | ((eta_prev == eta).view(-1) & (f_max_prev == f_max))
                eta = torch.where(back.view(shape), eta / 2, eta)
                x_k = torch.where(back.view(shape), x_max, x_k)
                x_k_prev = torch.where(back.view(shape), x_max_prev, x_k_prev)
                if grad_k is not None:
                    grad_k = torch.where(back.view(shape), grad_max, grad_k)
                count.zero_()
                eta_prev, f_max_prev = eta.clone(), f_max.clone()
        if self.keep_best:
            return found
        with torch.no_grad():  # ART's rule: the last iterate if it fools the model, else the start
            final = self._fooled(_forward(self._source, x_k).argmax(-1), y)
        return torch.where(final.view(shape), x_k, start)


class TensorSquare(SquareAttack):
    """ART's Linf SquareAttack on device tensors, one forward pass per iteration where ART makes
    three (it predicts every image to see which are still robust, then recomputes the margin of
    the current points, then the candidates'): the current points' logits are kept, so only
    the candidates are evaluated. The random draws are ART's own, from numpy's global generator
    in ART's order (a few scalars an iteration; the Linf stripes once), so with the same numpy
    seed the result is ART stock's. The L2 attack is ART's own iteration (`generate`)."""

    def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs) -> np.ndarray:
        if self.norm not in ("inf", np.inf) or y is None:
            return super().generate(x, y, **kwargs)
        device = self.estimator._device
        x_t = torch.as_tensor(x, device=device).float()
        return self.generate_tensor(x_t, _class_indices(y, device)).cpu().numpy()

    def _logits(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([_forward(self.estimator, c).float() for c in x.split(self.batch_size)])

    @staticmethod
    def _margin(logits: Tensor, y: Tensor) -> Tensor:
        """ART's loss: the true logit minus the second largest one."""
        return logits.gather(1, y[:, None])[:, 0] - logits.topk(2, dim=1).values[:, 1]

    def generate_tensor(self, x: Tensor, y: Tensor) -> Tensor:
        """x: images (N, C, H, W) on the device; y: class indices (or one-hot)."""
        if self.norm not in ("inf", np.inf):
            return torch.as_tensor(self.generate(x.cpu().numpy(), y.cpu().numpy()), device=x.device)
        y = _class_indices(y, x.device)
        low, high = (float(np.min(self.estimator.clip_values[0])), float(np.max(self.estimator.clip_values[1])))
        channels, height, width = x.shape[1:]
        eps = self.eps
        x = x.detach().float()
        clean_logits = self._logits(x)
        x_adv, logits = x.clone(), clean_logits.clone()

        def candidates(idx: Tensor, new: Tensor) -> None:  # keep a candidate where the margin fell
            new_logits = self._logits(new)
            improved = self._margin(new_logits, y[idx]) - self._margin(logits[idx], y[idx]) < 0
            x_adv[idx] = torch.where(improved.view(-1, 1, 1, 1), new, x_adv[idx])
            logits[idx] = torch.where(improved[:, None], new_logits, logits[idx])

        for _ in range(self.nb_restarts):
            robust = logits.argmax(-1) == y
            if not bool(robust.any()):
                break
            idx = robust.nonzero().flatten()
            x_adv[idx], logits[idx] = x[idx], clean_logits[idx]  # ART restarts from the clean images
            stripes = np.random.choice([-1, 1], size=(len(idx), channels, 1, width))
            new = (x[idx].double() + eps * torch.as_tensor(stripes, device=x.device)).clamp(low, high).float()
            candidates(idx, new)
            for i in range(self.max_iter):
                fraction = self._get_percentage_of_elements(i)
                robust = logits.argmax(-1) == y
                if not bool(robust.any()):
                    break
                idx = robust.nonzero().flatten()
                tile = max(int(round(math.sqrt(fraction * height * width))), 1)
                top, left = np.random.randint(0, height - tile), np.random.randint(0, width - tile)
                signs = np.random.choice([-2 * eps, 2 * eps], size=[channels, 1, 1])
                delta = torch.zeros((channels, height, width), dtype=torch.float64, device=x.device)
                delta[:, top:top + tile, left:left + tile] = torch.as_tensor(signs, device=x.device)
                x_init = x[idx]
                new = torch.maximum(x_adv[idx].double() + delta, (x_init - eps).double())  # ART's float64 sum
                new = torch.minimum(new, (x_init + eps).double()).clamp(low, high).float()
                candidates(idx, new)
        return x_adv
