"""Constraint monitors (TensorBoard) and the test-report callback."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from sepnet.constraints import (
    condition_number,
    layer_condition_number,
    parameter_counts,
    separable_layers,
    singular_values,
    sparsity,
)

log = logging.getLogger(__name__)

__all__ = ["ConstraintMonitor", "EvalReport", "BestAndLastCheckpoint"]


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps the best files by the monitored metric *and* refreshes
    last.ckpt after every validation, so `fit --ckpt_path last` resumes from the latest epoch.

    Lightning 2.6 writes last.ckpt only when a top-k file was written at the same step; this
    subclass writes it also when the monitored metric did not improve (Lightning's writes are
    atomic: serialized in memory, then committed through an fsspec transaction).
    """

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_skipped(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_skipped(trainer)

    def _save_last_if_skipped(self, trainer) -> None:
        # nothing was written at this step (else the skip check is true): write last.ckpt
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


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
            counts = parameter_counts(layer)
            metrics[f"{key}/compression"] = counts.compression
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
    """At the end of `test` (and of a stand-alone `validate`): a table of clean and robust
    accuracy and parameter figures, also written as <stage>_report.json in the run's log folder.

    After `test` it also runs the honesty checks on the first `honesty_images` test images,
    against the model's first validation attack (PGD expected):
    - accuracy vs eps (0 to 16x eps, capped at 1): it must fall to ~0;
    - white box vs black box: Square (`square_queries` queries) beating it hints at masking;
    - PGD with 4x the steps (at least 50) and 3 restarts must not be more than a point stronger.
    Warnings go to the log and to the JSON. Args: honesty_images: 0 switches the checks off.
    """

    def __init__(self, honesty_images: int = 256, square_queries: int = 1000) -> None:
        if honesty_images < 0 or square_queries < 1:
            raise ValueError(f"honesty_images must be >= 0 and square_queries >= 1, got "
                             f"{honesty_images} and {square_queries}")
        self.honesty_images, self.square_queries = honesty_images, square_queries

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
        report = {
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")},
            "parameters": {"stored": counts.stored, "nonzero": counts.nonzero, "dense": counts.dense,
                           "compression": counts.compression,
                           "nonzero_compression": counts.nonzero_compression},
            "attacks": [vars(a) for a in getattr(pl_module, "val_attacks", [])],
        }
        if stage == "test" and self.honesty_images and getattr(pl_module, "val_attacks", None):
            report["honesty"] = honesty_checks(pl_module, _first_images(trainer, self.honesty_images),
                                               self.square_queries)
        folder = Path(log_dir or ".")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{'test' if stage == 'test' else 'validate'}_report.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(path)
        rows = [(k, f"{v:.4f}") for k, v in report["metrics"].items()]
        rows += [(f"params/{k}", f"{v:,.1f}" if isinstance(v, float) else f"{v:,}")
                 for k, v in report["parameters"].items()]
        for key, value in report.get("honesty", {}).get("accuracy", {}).items():
            rows.append((f"honesty/{key}", f"{value:.4f}"))
        width = max(len(k) for k, _ in rows)
        table = "\n".join(f"  {k:<{width}}  {v:>14}" for k, v in rows)
        log.info(f"{stage} report\n%s\nwritten to %s", table, path)
        for warning in report.get("honesty", {}).get("warnings", []):
            log.warning("honesty check: %s", warning)


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


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def honesty_checks(pl_module, data: tuple[torch.Tensor, torch.Tensor], square_queries: int) -> dict:
    """Accuracy-vs-eps curve, Square vs the white-box attack, and a stronger PGD; see EvalReport."""
    x, y = (t.to(pl_module.device) for t in data)
    spec = pl_module.val_attacks[0]
    attacker, net = pl_module.attacker, pl_module.net
    was_training = net.training
    net.eval()
    acc, warnings = {"clean": _accuracy(net, x, y)}, []
    base = _accuracy(net, attacker.generate(x, y, spec), y)
    acc[spec.label] = base
    curve = {}
    for factor in (0.25, 0.5, 1.0, 2.0, 4.0, 16.0):
        eps = min(1.0, spec.eps * factor)
        step = max(spec.step_size, 2.5 * eps / spec.steps)
        curve[f"{eps:.4f}"] = _accuracy(net, attacker.generate(x, y, spec.replace(eps=eps, step_size=step)), y)
    last = list(curve.values())[-1]
    if last > 0.05:
        warnings.append(f"accuracy {last:.3f} at eps {list(curve)[-1]} does not fall to ~0: "
                        "gradients may be masked or the attack misconfigured")
    square = spec.replace(name="square", steps=square_queries, restarts=1)
    acc["square"] = _accuracy(net, attacker.generate(x, y, square), y)
    if acc["square"] < base - 0.01:
        warnings.append(f"black-box Square ({acc['square']:.3f}) beats white-box {spec.label} "
                        f"({base:.3f}): a sign of gradient masking")
    strong = spec.replace(steps=max(50, 4 * spec.steps), restarts=3, random_start=True)
    acc["pgd_strong"] = _accuracy(net, attacker.generate(x, y, strong), y)
    if acc["pgd_strong"] < base - 0.01:
        warnings.append(f"PGD-{strong.steps} x3 restarts ({acc['pgd_strong']:.3f}) is more than a point "
                        f"stronger than the validation attack ({base:.3f}): robust accuracy is overstated")
    net.train(was_training)
    return {"images": len(y), "attack": vars(spec), "accuracy": acc, "eps_curve": curve,
            "warnings": warnings}
