"""The last-checkpoint callback, constraint monitors (TensorBoard), the test report and the
run watch."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sepnet import metric_names as names
from sepnet.evaluation import evaluation_attacks, honesty_checks, masking_warnings, unique_labels
from sepnet.layers import SeparableLinear
from sepnet.lipschitz import CertificateError
from sepnet.masks import masked_layers
from sepnet.measures import (
    condition_number,
    factorized_layers,
    implied_nonzeros,
    layer_condition_number,
    parameter_counts,
    separable_layers,
    singular_values,
    sparsity,
)

log = logging.getLogger(__name__)

__all__ = ["ConstraintMonitor", "EpochLine", "EvalReport", "RunWatch", "last_checkpoint"]


def last_checkpoint(dirpath: str | None = None) -> ModelCheckpoint:
    """Lightning's own way to keep the latest state: no monitor, one file named last.ckpt,
    overwritten after every epoch (the `checkpoint` section keeps the best one beside it)."""
    return ModelCheckpoint(dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)


class ConstraintMonitor(L.Callback):
    """Logs, per separable layer, every factor's kappa, the implied layer's kappa, sparsity and
    parameter counts, plus whole-model totals; singular-value histograms to TensorBoard.

    Args:
        every_n_steps: training steps between two logs (0: only at validation).
        threshold: |u| at or below which an entry counts as near zero.
        histograms: write singular-value histograms (TensorBoard only).
    """

    def __init__(self, every_n_steps: int = 50, threshold: float = 1e-3, histograms: bool = True) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps, self.threshold, self.histograms = every_n_steps, threshold, histograms

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def _log(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is None:
            return
        metrics: dict[str, float] = {}
        tb = trainer.logger.experiment if isinstance(trainer.logger, TensorBoardLogger) else None
        for name, layer in separable_layers(pl_module):
            key = f"constraints/{name}"
            for r, term in enumerate(layer.factors):
                for k, factor in enumerate(term):
                    metrics[f"{key}/kappa_r{r}_u{k}"] = _finite(condition_number(factor))
                    if tb is not None and self.histograms and stage == "val":
                        tb.add_histogram(f"{key}/singular_values_r{r}_u{k}",
                                         singular_values(factor), trainer.global_step)
            kappa = layer_condition_number(layer)
            metrics[f"{key}/kappa{'_bound' if kappa.is_bound else ''}"] = _finite(kappa.value)
            stats = sparsity([f for term in layer.factors for f in term], self.threshold)
            metrics[f"{key}/zero_fraction"] = stats["zero_fraction"]
            metrics[f"{key}/near_zero_fraction"] = stats["near_zero_fraction"]
            nnz, exact = implied_nonzeros(layer)  # rank 1: prod of the factors' nnz
            metrics[f"{key}/implied_nnz{'' if exact else '_bound'}"] = float(nnz)
            counts = parameter_counts(layer)
            metrics[f"{key}/compression"] = counts.compression
        for name, layer in factorized_layers(pl_module):  # TT, TT-conv, joint-SVD, low-rank layers
            if not isinstance(layer, SeparableLinear):
                metrics[f"compression/{name}/compression"] = layer.compression()
        for name, _, masked in masked_layers(pl_module):  # every pruner's masks
            metrics[f"compression/{name}/kept_fraction"] = float(masked.current_mask().float().mean())
        counts = parameter_counts(pl_module)
        metrics.update({
            "constraints/model/params_stored": float(counts.stored),
            "constraints/model/params_nonzero": float(counts.nonzero),
            "constraints/model/params_dense": float(counts.dense),
            "constraints/model/compression": counts.compression,
            "constraints/model/nonzero_compression": counts.nonzero_compression,
        })
        trainer.logger.log_metrics(metrics, step=trainer.global_step)


def _finite(value: float) -> float:
    """TensorBoard scalars cannot be inf: report rank-deficient as a large sentinel."""
    return value if math.isfinite(value) else 1e30


class EvalReport(L.Callback):
    """What `run.py test` runs and prints. Its settings belong to the evaluation, not to the
    checkpoint: they come from this `report` section of the command line or config.

    `test` attacks the first `images` test images (a fixed random sample) with `attacks` as a
    cascade (each attack on the images the earlier ones did not break), and headlines
    test/robust_acc/worst, the per-image worst case. It then runs the honesty checks
    (sepnet.evaluation.honesty_checks) against the first attack on the first `honesty_images`.
    The table (the threat model, then the worst case with the warnings beside it) also goes to
    the run's log folder: each `test` writes test_report.<N>.json (N counts up, so no report is
    overwritten) and links test_report.json to the newest; a stand-alone `validate` writes
    validate_report.json. The report names the attacked images (their indices in the test set).

    Args:
        attacks: AttackSpec dicts; None: the model's validation attacks, then APGD-CE, APGD-DLR
            and Square at the first one's eps (the benchmarks' reduced AutoAttack).
        images: test images attacked (0: clean accuracy only).
        cascade: False runs every attack on all clean-correct images (standalone figures).
        square_queries: Square's queries in the default suite and in the honesty check.
        honesty_images: images for the honesty checks (0 switches them off).
        seed: the seed of the test images' order, whose first `images` are attacked (None: the
            data module's, its seed + 2), so an independent suite can attack the same images.
    A network with a Lipschitz bound also gets its certificate: the bound, the certified
    accuracies and, after `test`, the soundness checks on `model.certificate.check_images` test
    images (sepnet.certificate); a failed check is written into the report as its error and the
    command fails.
    """

    def __init__(self, attacks: list[dict[str, Any]] | None = None, images: int = 512, cascade: bool = True,
                 square_queries: int = 1000, honesty_images: int = 256, seed: int | None = None) -> None:
        if images < 0 or honesty_images < 0 or square_queries < 1:
            raise ValueError(f"report: images and honesty_images must be >= 0 and square_queries >= 1, got "
                             f"{images}, {honesty_images} and {square_queries}")
        self.attacks = None if attacks is None else evaluation_attacks(attacks, "report.attacks")
        self.images, self.cascade = images, cascade
        self.square_queries, self.honesty_images, self.seed = square_queries, honesty_images, seed
        self.suite: list | None = None  # the test attacks as configured, the defaults filled in

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "test":
            self.suite = pl_module.configure_test_suite(self.attacks, self.images, self.cascade, self.square_queries)

    def on_test_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "test")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer, pl_module, "val")

    def _report(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        if not trainer.is_global_zero:
            return
        counts = parameter_counts(pl_module)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
        attacks = self.suite if stage == "test" else pl_module.val_attacks
        report = {
            "metrics": metrics,
            "headline": metrics.get(names.robust_acc(stage)),
            "parameters": {"stored": counts.stored, "nonzero": counts.nonzero, "dense": counts.dense,
                           "compression": counts.compression,
                           "nonzero_compression": counts.nonzero_compression},
            "attacks": [{"label": label, **vars(a)} for label, a in zip(unique_labels(attacks), attacks)],
            "threat_model": _threat_model(attacks[0]) if attacks else None,
            "attacked_images": self.images if stage == "test" else None,
            "cascade": self.cascade if stage == "test" else False,
            "checkpoint": trainer.ckpt_path,
        }
        if stage == "test":
            report["attacked_indices"], report["image_order"] = _attacked_indices(trainer, self.images)
        if stage == "test" and self.honesty_images and attacks:
            x, y = _first_images(trainer, self.honesty_images)
            report["honesty"] = honesty_checks(pl_module.net, pl_module.attacker, x.to(pl_module.device),
                                               y.to(pl_module.device), attacks[0], self.square_queries)
        failure = None
        if pl_module.certifier.certifiable:
            report["certificate"], failure = self._certificate(trainer, pl_module, stage, metrics)
        path = _write_report(Path(log_dir or "."), "test" if stage == "test" else "validate", report)
        log.info("%s report (%s)\n%s\nwritten to %s", stage, trainer.ckpt_path or "current weights",
                 _table(report, stage), path)
        if failure is not None:
            raise failure

    def _certificate(self, trainer, pl_module, stage: str, metrics: dict) -> tuple[dict, Exception | None]:
        """The bound, how it was computed, the certified accuracies and (test) the soundness checks."""
        certifier = pl_module.certifier
        bound = certifier.measure()
        radii = certifier.config.radii
        certificate = {"lipschitz_bound": bound.value, "how": bound.describe(),
                       "kind": "pairwise" if certifier.pairwise is not None else "global",
                       "certified_acc": {names.radius_label(r): metrics.get(names.certified_acc(stage, r)) for r in radii}}
        if certifier.pairwise is not None:  # both certificates (the global one is never tighter)
            certificate["pairwise"] = {"last_layer": certifier.pairwise.layer, "feature_bound": certifier.pairwise.feature}
            certificate["certified_acc_global"] = {names.radius_label(r): metrics.get(names.certified_acc(stage, r, "global"))
                                                   for r in radii}
        if stage != "test" or not certifier.config.check_images:
            return certificate, None
        x, y = _first_images(trainer, certifier.config.check_images)
        certificate["checked_images"] = len(y)
        try:
            certificate["soundness"] = certifier.check(pl_module.attacker, x.to(pl_module.device), y.to(pl_module.device))
        except CertificateError as err:
            certificate["error"] = str(err)
            return certificate, err
        return certificate, None


def _threat_model(spec) -> dict:
    return {"norm": spec.norm, "eps": spec.eps, "eps_255": round(spec.eps * 255, 3)}


def _attacked_indices(trainer, images: int) -> tuple[list[int] | None, dict | None]:
    """The attacked test images' indices in the test set, and the rule that orders them."""
    data = trainer.datamodule
    order = getattr(data, "test_order", None)
    if order is None:
        return None, None
    return order.indices[:images], {"seed": order.seed, "rule": order.rule}


def _write_report(folder: Path, stage: str, report: dict) -> Path:
    """validate_report.json; or test_report.<N>.json, N one more than the last, with
    test_report.json linked to it (a copy where links are not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    if stage == "validate":
        path = folder / "validate_report.json"
    else:
        taken = [int(p.name.split(".")[1]) for p in folder.glob("test_report.*.json") if p.name.split(".")[1].isdigit()]
        path = folder / f"test_report.{max(taken, default=-1) + 1}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    if stage == "test":
        latest, tmp = folder / "test_report.json", folder / "test_report.json.tmp"
        tmp.unlink(missing_ok=True)
        try:
            tmp.symlink_to(path.name)
        except OSError:
            tmp.write_text(path.read_text())
        tmp.replace(latest)
    return path


def _table(report: dict, stage: str) -> str:
    """The threat model; the worst case with every warning beside it; clean and the single attacks."""
    metrics, warnings = dict(report["metrics"]), report.get("honesty", {}).get("warnings", [])
    rows = []
    threat = report.get("threat_model")
    if threat:
        norm = {"linf": "Linf", "l2": "L2"}[threat["norm"]]
        rows.append(("threat model", f"{norm} {threat['eps']:.4f}", f"eps {threat['eps_255']:g}/255, pixels in [0, 1]"))
    worst = metrics.pop(names.robust_acc(stage), None)
    if worst is not None:
        rows.append((names.robust_acc(stage), f"{worst:.4f}",
                     "per-image worst case over every attack below" + ("; WARNING: " + " | ".join(warnings)
                                                                       if warnings else "")))
    order = [names.acc(stage)] + [names.robust_acc(stage, a["label"]) for a in report["attacks"]]
    note = "after this and every attack above" if report["cascade"] else "this attack alone"
    for key in order + sorted(set(metrics) - set(order)):
        if key in metrics:
            rows.append((key, f"{metrics[key]:.4f}", note if "/robust_acc/" in key else ""))
    rows += [(f"params/{k}", f"{v:,.1f}" if isinstance(v, float) else f"{v:,}", "")
             for k, v in report["parameters"].items()]
    for key, value in report.get("honesty", {}).get("accuracy", {}).items():
        rows.append((f"honesty/{key}", f"{value:.4f}", ""))
    certificate = report.get("certificate")
    if certificate:
        verdict = ("ERROR: " + certificate["error"] if "error" in certificate else
                   f"soundness checks passed on {certificate['checked_images']} images" if "soundness" in certificate
                   else "soundness checks not run")
        rows.append(("certificate/lipschitz_bound", f"{certificate['lipschitz_bound']:.4f}", verdict))
    width = max(len(k) for k, _, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v:>14}  {n}".rstrip() for k, v, n in rows)


def _first_images(trainer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    loaders = trainer.test_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    xs, ys, total = [], [], 0
    for x, y in loader:
        xs.append(x), ys.append(y)
        total += len(y)
        if total >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


class EpochLine(L.Callback):
    """One log line per training epoch: epoch, mean training loss, validation accuracy, validation
    worst case (where that epoch ran the attacks) and seconds. `run.py` adds it when there is no
    progress bar (no terminal: a scheduler's log file), which would otherwise stay silent from
    the model summary to the end. The loss is summed on the device: one host sync an epoch."""

    def __init__(self) -> None:
        self._loss_sum: torch.Tensor | None = None
        self._batches, self._start = 0, None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._loss_sum, self._batches, self._start = None, 0, time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:  # an epoch resumed in its middle: its time from here, not from the process start
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        if self._batches:
            parts.append(f"train loss {float(self._loss_sum) / self._batches:.4f}")
        every = pl_module.validation.every_n_epochs
        attacked = (trainer.current_epoch + 1) % max(1, every) == 0  # else the worst case is an old one
        for key, label in ((names.acc("val"), "val acc"), (names.robust_acc("val"), "val worst case")):
            if key in metrics and (attacked or key == names.acc("val")):
                parts.append(f"{label} {float(metrics[key]):.4f}")
        radii = pl_module.certificate.radii
        if pl_module.certifier.certifiable and names.certified_acc("val", radii[0]) in metrics:
            parts.append(f"val certified {names.radius_label(radii[0])} "
                         f"{float(metrics[names.certified_acc('val', radii[0])]):.4f}")
        parts.append(f"{time.perf_counter() - (self._start or time.perf_counter()):.0f} s")
        self._start = None
        log.info(", ".join(parts))


class RunWatch(L.Callback):
    """Warns, once each, when a run goes wrong while it trains:
    - gradient masking: at a robust validation, another attack beats the first one by more than
      `tolerance` (e.g. FGSM or Square stronger than PGD), or the first attack's accuracy
      collapses below a quarter of its best (fast FGSM's catastrophic overfitting);
    - divergence: the training loss is not finite or exceeds `divergence_factor` x its value
      at the first logged steps.
    Also logs val/robust_gap = first attack's accuracy - worst case.

    Args:
        tolerance: accuracy margin for the masking warning.
        divergence_factor: loss ratio for the divergence warning (0 switches it off).
    """

    def __init__(self, tolerance: float = 0.01, divergence_factor: float = 100.0) -> None:
        if tolerance < 0 or divergence_factor < 0:
            raise ValueError(f"watch: tolerance and divergence_factor must be >= 0, got {tolerance} "
                             f"and {divergence_factor}")
        self.tolerance, self.divergence_factor = tolerance, divergence_factor
        self.best_first: float | None = None
        self.first_loss: float | None = None
        self._peak: torch.Tensor | None = None  # largest loss since the last check, on the device
        self._first: torch.Tensor | None = None  # the first loss, on the device until a check reads it
        self.warned: set[str] = set()

    def _warn(self, trainer, message: str) -> None:
        key = message.split(":")[0]
        if trainer.is_global_zero and key not in self.warned:
            self.warned.add(key)
            log.warning("epoch %d: %s", trainer.current_epoch, message)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """No host sync here but on logging steps: the first loss and the running peak stay on
        the device until a step the logger syncs anyway."""
        if not self.divergence_factor or outputs is None:
            return
        loss = torch.as_tensor(outputs["loss"] if isinstance(outputs, dict) else outputs).detach()
        if self.first_loss is None and self._first is None:
            self._first = loss
            return
        self._peak = loss if self._peak is None else torch.maximum(self._peak, loss)  # NaN propagates
        if trainer.global_step % max(1, getattr(trainer, "log_every_n_steps", 1)) == 0:  # a logging step
            self._check_peak(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check_peak(trainer)

    def _check_peak(self, trainer) -> None:
        if self._first is not None:
            first, self._first = float(self._first), None
            if math.isfinite(first):
                self.first_loss = abs(first)
            else:
                self._peak = torch.tensor(first) if self._peak is None else self._peak + first
        if self._peak is None:
            return
        peak, self._peak = float(self._peak), None
        if not math.isfinite(peak) or (self.first_loss and peak > self.divergence_factor * self.first_loss):
            first = "not finite" if self.first_loss is None else f"{self.first_loss:.3g}"
            self._warn(trainer, f"diverging loss: {peak:.3g} by step {trainer.global_step} (first {first}); "
                                "lower the lr or the constraint weights")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        labels = unique_labels(pl_module.val_attacks)
        robust = {label: float(trainer.callback_metrics[names.robust_acc("val", label)])
                  for label in [*labels, names.WORST] if names.robust_acc("val", label) in trainer.callback_metrics}
        if labels[0] not in robust:
            return  # no robust evaluation this epoch
        for message in masking_warnings(robust, labels[0], self.best_first, self.tolerance):
            self._warn(trainer, message)
        self.best_first = max(self.best_first or 0.0, robust[labels[0]])
        if names.WORST in robust:
            pl_module.log(names.ROBUST_GAP, robust[labels[0]] - robust[names.WORST], sync_dist=True)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Cluster preemption (SIGTERM): nothing is saved mid-epoch. last.ckpt stays the state at
        the end of the last finished epoch, so `--ckpt_path last` runs the interrupted epoch again
        and ends with the weights an uninterrupted deterministic run has (a mid-epoch state would
        not: the training loader's order and workers cannot be resumed exactly); `run.py` exits
        143. A run stopped by an error before its first step leaves no log folder."""
        if isinstance(exception, SIGTERMException):
            return
        if trainer.global_step == 0 and trainer.ckpt_path is None and trainer.is_global_zero:
            folder = Path(trainer.log_dir or "")
            if trainer.loggers and folder.is_dir() and not any(folder.rglob("*.ckpt")):
                for logger in trainer.loggers:  # close the event files first: a TensorBoard
                    logger.finalize("failed")  # flush after the folder went would replace the error
                shutil.rmtree(folder, ignore_errors=True)
                if folder.parent.is_dir() and not any(folder.parent.iterdir()):
                    folder.parent.rmdir()

    def state_dict(self) -> dict:
        return {"best_first": self.best_first, "first_loss": self.first_loss}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_first, self.first_loss = state_dict["best_first"], state_dict["first_loss"]
