"""One evaluation for `run.py test`, validation and the benchmarks: clean accuracy, attacks
run as a cascade (each on the images the earlier ones did not break, as AutoAttack does), the
per-image worst case over all of them, and the honesty checks.

Every function takes the plain network (pixels in [0, 1] in, logits out) and an `Attacker`,
so the CLI's numbers and the benchmarks' come from the same code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from sepnet import metric_names as names
from sepnet.attacks import Attacker, AttackSpec, eval_mode

log = logging.getLogger(__name__)

__all__ = ["AttackProgress", "ValidationConfig", "evaluation_attacks", "reduced_autoattack", "unique_labels", "correct", "robust_masks", "accuracies",
           "honesty_checks", "masking_warnings"]


def evaluation_attacks(specs: Sequence[dict | AttackSpec], where: str) -> list[AttackSpec]:
    """AttackSpecs that may score a model: a training-only attack (N-FGSM, whose examples leave
    the eps ball) is a one-line error naming `where` it was given."""
    attacks = [spec if isinstance(spec, AttackSpec) else AttackSpec(**spec) for spec in specs]
    for spec in attacks:
        if spec.entry.training_only:
            raise ValueError(f"{where}: {spec.name} is a training attack (its examples leave the eps "
                             "ball); expected an evaluation attack")
    return attacks


@dataclass(frozen=True)
class ValidationConfig:
    """The `model.validation` section: how validation attacks the model. Settings of the run,
    not of the model: a flag given with a checkpoint wins over the checkpoint's value.

    attacks: AttackSpecs; each runs on every clean-correct image of the attacked batches
        (standalone figures, for the masking check), and val/robust_acc/worst -- the checkpoint
        monitor -- is the per-image worst case over them. None: PGD-10 and FGSM, Linf 8/255
        (FGSM beating PGD is a sign of gradient masking, see sepnet.callbacks.RunWatch).
    batches: validation batches attacked (the first ones of the unshuffled loader, so the same
        images every time); None attacks all of them.
    every_n_epochs: attack at validation every this many epochs.
    (A certifiable network's certified accuracy: the `certificate` section, sepnet.certificate.)
    """

    attacks: list[AttackSpec] | None = None
    batches: int | None = 4
    every_n_epochs: int = 1

    def __post_init__(self) -> None:
        default = [AttackSpec(), AttackSpec(name="fgsm", step_size=AttackSpec.eps, random_start=False)]
        object.__setattr__(self, "attacks", evaluation_attacks(self.attacks or default, "validation.attacks"))
        if self.batches is not None and self.batches < 0:
            raise ValueError(f"validation.batches must be >= 0 or null, got {self.batches}")
        if self.every_n_epochs < 1:
            raise ValueError(f"validation.every_n_epochs must be >= 1, got {self.every_n_epochs}")


def reduced_autoattack(spec: AttackSpec, square_queries: int = 1000, apgd_steps: int = 100) -> list[AttackSpec]:
    """`spec`, then APGD-CE, APGD-DLR (both untargeted, one restart) and Square at its eps and
    norm: the suite `run.py test` and the benchmarks run unless told otherwise."""
    return [spec,
            spec.replace(name="apgd_ce", steps=apgd_steps, restarts=1),
            spec.replace(name="apgd_dlr", steps=apgd_steps, restarts=1),
            spec.replace(name="square", steps=square_queries, restarts=1)]


def unique_labels(attacks: Sequence[AttackSpec]) -> list[str]:
    """Metric labels, with _2, _3 ... appended where two attacks share one (PGD-10 and PGD-50)."""
    labels, seen = [], {}
    for spec in attacks:
        seen[spec.label] = seen.get(spec.label, 0) + 1
        labels.append(spec.label if seen[spec.label] == 1 else f"{spec.label}_{seen[spec.label]}")
    return labels


@torch.no_grad()
def correct(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> Tensor:
    """Per image: is it classified correctly (eval mode, in chunks)."""
    with eval_mode(net):
        return torch.cat([net(xb).argmax(-1) == yb for xb, yb in zip(x.split(batch_size), y.split(batch_size))])


def robust_masks(net: nn.Module, attacker: Attacker, x: Tensor, y: Tensor,
                 attacks: Sequence[AttackSpec], cascade: bool = True, alive: Tensor | None = None,
                 clean: Tensor | None = None, batch_size: int = 250,
                 progress: Callable[[str, int, int, Tensor], None] | None = None) -> dict[str, Tensor]:
    """Per image, whether it is still classified correctly: "clean", then one entry per attack
    (`unique_labels`), then "worst" (it survived every attack).

    cascade: each attack runs only on the images no earlier attack broke, so its entry is the
        accuracy after it *and every attack before it* (AutoAttack's way, cheapest); False runs
        every attack on all clean-correct images, so each entry is that attack alone.
    alive: images already broken elsewhere (False) are not attacked and count as broken.
    clean: the eval-mode clean predictions' correctness, when the caller has it already.
    progress: called after each chunk an attack runs on: (label, images done, images to do,
        the images still robust so far), e.g. `AttackProgress`.
    """
    clean = correct(net, x, y) if clean is None else clean
    start = clean if alive is None else clean & alive.to(clean.device)
    masks, worst = {"clean": clean}, start.clone()
    for label, spec in zip(unique_labels(attacks), attacks):
        todo = (worst if cascade else start).nonzero().flatten()
        hit = torch.zeros_like(start)
        for chunk in todo.split(batch_size) if len(todo) else ():
            hit[chunk] = correct(net, attacker.generate(x[chunk], y[chunk], spec), y[chunk])
            if progress is not None:
                progress(label, int((todo <= chunk[-1]).sum()), len(todo), hit[todo[todo <= chunk[-1]]])
        if progress is not None and not len(todo):  # nothing left to attack: said too
            progress(label, 0, 0, hit[todo])
        masks[label] = hit
        worst &= hit
    masks[names.WORST] = worst
    return masks


def accuracies(masks: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v.float().mean()) for k, v in masks.items()}


def honesty_checks(net: nn.Module, attacker: Attacker, x: Tensor, y: Tensor, spec: AttackSpec,
                   square_queries: int = 1000) -> dict:
    """Three checks a robustness evaluator runs against `spec` (PGD expected), on x, y:
    accuracy against 0.25x to 16x eps (capped at 1) must fall to ~0; black-box Square
    (`square_queries`) must not beat it (gradient masking); PGD with 4x the steps (at least 50)
    and 3 restarts must not be more than a point stronger (the figure would be overstated)."""
    acc, warnings = {"clean": float(correct(net, x, y).float().mean())}, []

    def attacked(s: AttackSpec) -> float:
        return float(correct(net, attacker.generate(x, y, s), y).float().mean())

    base = acc[spec.label] = attacked(spec)
    curve = {}
    for factor in (0.25, 0.5, 1.0, 2.0, 4.0, 16.0):
        eps = min(1.0, spec.eps * factor) if spec.norm == "linf" else spec.eps * factor
        step = max(spec.step_size, 2.5 * eps / spec.steps)
        curve[f"{eps:.4f}"] = attacked(spec.replace(eps=eps, step_size=step))
    last = list(curve.values())[-1]
    if last > 0.05:
        warnings.append(f"accuracy {last:.3f} at eps {list(curve)[-1]} does not fall to ~0: "
                        "gradients may be masked or the attack misconfigured")
    acc["square"] = attacked(spec.replace(name="square", steps=square_queries, restarts=1))
    if acc["square"] < base - 0.01:
        warnings.append(f"black-box Square ({acc['square']:.3f}) beats white-box {spec.label} "
                        f"({base:.3f}): a sign of gradient masking")
    strong = spec.replace(steps=max(50, 4 * spec.steps), restarts=3, random_start=True)
    acc["pgd_strong"] = attacked(strong)
    if acc["pgd_strong"] < base - 0.01:
        warnings.append(f"PGD-{strong.steps} x3 restarts ({acc['pgd_strong']:.3f}) is more than a point "
                        f"stronger than {spec.label} ({base:.3f}): that attack's figure is overstated")
    return {"images": len(y), "attack": vars(spec), "accuracy": acc, "eps_curve": curve,
            "warnings": warnings}


def masking_warnings(robust: dict[str, float], first: str, best_first: float | None = None,
                     tolerance: float = 0.01) -> list[str]:
    """Signs of gradient masking in one set of standalone robust accuracies (label -> accuracy):
    another attack beats the first (multi-step) one by more than `tolerance`, or the first one's
    accuracy collapsed below a quarter of its best so far (fast FGSM's catastrophic overfitting)."""
    warnings = []
    base = robust[first]
    for label, value in robust.items():
        if label not in (first, names.WORST) and value < base - tolerance:
            warnings.append(f"{label} ({value:.3f}) beats {first} ({base:.3f}): gradient masking?")
    if best_first is not None and best_first > 0.1 and base < best_first / 4:
        warnings.append(f"{first} accuracy collapsed from {best_first:.3f} to {base:.3f}: "
                        "catastrophic overfitting (try --model.adversarial.attack.name nfgsm)")
    return warnings


class AttackProgress:
    """Progress of `run.py test`'s attacks as log lines, for a log without a progress bar (a
    cluster's log file would otherwise stay silent for the whole test): after every chunk an
    attack runs on, the attack, the chunk's images done and still robust, the test images
    attacked so far of `total`, and the time left, estimated from the share of attack work done
    (each batch's images x its attacks)."""

    def __init__(self, total: int, attacks: int, stage: str = "test") -> None:
        self.total, self.attacks, self.stage = max(1, total), max(1, attacks), stage
        self.start, self.before, self.batch, self.index, self.labels = time.perf_counter(), 0, 0, -1, []

    def next_batch(self, images: int) -> None:
        """A batch of `images` attacked images begins (after the previous batch's)."""
        self.before, self.batch, self.index, self.labels = self.before + self.batch, images, -1, []

    def __call__(self, label: str, done: int, todo: int, robust: Tensor) -> None:
        if label not in self.labels:
            self.labels.append(label)
        index = len(self.labels) - 1
        share = (self.before + self.batch * (index + done / max(1, todo)) / self.attacks) / self.total
        elapsed = time.perf_counter() - self.start
        left = elapsed * (1 - share) / share if share > 0 else float("nan")
        log.info("%s: %s %d/%d images, robust %d; %d/%d test images attacked, %.0f s, about %.0f s left",
                 self.stage, label, done, todo, int(robust.sum()), self.before + self.batch, self.total, elapsed, left)
