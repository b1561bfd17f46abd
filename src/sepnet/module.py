"""ImageClassifier: normalize -> backbone -> head, with the constraint and adversarial losses."""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
import torchmetrics
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from sepnet import metric_names as names
from sepnet.attacks import AdversarialTraining, Attacker, AttackSpec, adversarial_loss
from sepnet.compress import compression_epoch_, compression_loss
from sepnet.constraints import ConstraintConfig, SparsityTarget, constraint_loss, proximal_constraint_
from sepnet.evaluation import ValidationConfig, reduced_autoattack, robust_masks, unique_labels
from sepnet.lipschitz import certified_from_logits, lipschitz_bound, lipschitz_margin_loss
from sepnet.measures import implied_nonzeros, parameter_counts, separable_layers
from sepnet.network import NetworkConfig, build_network
from sepnet.optimization import OptimizationConfig, build_optimization

log = logging.getLogger(__name__)


Section = TypeVar("Section")
_NEEDS_THREE_CLASSES = ("apgd_dlr", "autoattack", "autoattack_standard")  # DLR uses the third logit


def _section(cls: type[Section], value: Section | dict[str, Any] | None) -> Section:
    """A config section as its dataclass: given as one (the CLI), as a dict of its fields (a
    checkpoint's hyperparameters, a user's own code) or None (the defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"{cls.__name__}: expected the dataclass or a dict of its fields, got {type(value).__name__}")


def _collect_rng_states() -> dict:
    """torch, CUDA, numpy and Python RNG states in types that `torch.load(weights_only=True)`
    (Lightning's default) accepts: tensors, ints, floats, strings and tuples."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])


class ImageClassifier(L.LightningModule):
    """Image classifier with separable layers, joint constraints and adversarial training: the
    network comes from sepnet.network; this class wires the losses, metrics and logging.

    Args:
        num_classes, image_shape, mean, std: linked from the datamodule (mean/std normalize
            inside the network, so attacks see [0, 1] pixels).
        network: backbone and head (sepnet.network.NetworkConfig).
        constraint: the joint constraint on the factors (sepnet.constraints.ConstraintConfig).
        adversarial: adversarial training (sepnet.attacks.AdversarialTraining).
        optimization: optimizer and LR schedule (sepnet.optimization.OptimizationConfig).
        validation: the validation attacks and how often they run (sepnet.evaluation.ValidationConfig).
        fast_attacks: ART attacks through sepnet's FastClassifier (input-only gradients on the
            device) instead of ART's stock PyTorchClassifier.

    Each section is a dataclass or, read back from a checkpoint, a dict of its fields. The test
    attacks are not hyperparameters (a checkpoint must not decide how it is tested):
    `configure_test_suite`, called by `run.py test` from its `report` section.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        network: NetworkConfig = NetworkConfig(),
        constraint: ConstraintConfig = ConstraintConfig(),
        adversarial: AdversarialTraining = AdversarialTraining(),
        optimization: OptimizationConfig = OptimizationConfig(),
        validation: ValidationConfig = ValidationConfig(),
        fast_attacks: bool = True,
    ) -> None:
        super().__init__()
        self.network_config = _section(NetworkConfig, network)
        self.constraint = _section(ConstraintConfig, constraint)
        self.adversarial = _section(AdversarialTraining, adversarial)
        self.optimization = _section(OptimizationConfig, optimization)
        self.validation = _section(ValidationConfig, validation)
        # plain types only: checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({
            "num_classes": num_classes, "image_shape": tuple(image_shape), "mean": tuple(mean),
            "std": tuple(std), "network": asdict(self.network_config), "constraint": asdict(self.constraint),
            "adversarial": asdict(self.adversarial), "optimization": asdict(self.optimization),
            "validation": asdict(self.validation), "fast_attacks": fast_attacks})
        self.net = build_network(num_classes, image_shape, mean, std, **asdict(self.network_config))
        self.sparsity_target = (SparsityTarget(self.net, self.constraint.sparsity_target,
                                               self.constraint.sparsity_ramp)
                                if self.constraint.sparsity_target is not None else None)
        self.attacker = Attacker(self.net, tuple(image_shape), num_classes, fast=fast_attacks)
        if num_classes < 3 and any(a.name in _NEEDS_THREE_CLASSES for a in self.val_attacks):
            raise ValueError(f"validation.attacks: APGD-DLR needs at least 3 classes, the model has {num_classes}: "
                             "expected other attacks")
        self.metrics = nn.ModuleDict({
            f"{stage}_acc": torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
            for stage in ("train", "val", "test")
        })
        self.robust_metrics = self._robust_metrics("val", self.val_attacks)
        self.certified_metrics = self._certified_metrics()
        self._margin_bound = self._lipschitz_margin_bound()
        self.test_attacks, self.test_images, self.test_cascade = [], 0, True
        self.configure_test_suite()

    @property
    def val_attacks(self) -> list[AttackSpec]:
        return self.validation.attacks

    @property
    def certifiable(self) -> bool:
        """Whether the network has a Lipschitz bound (sepnet.lipschitz), hence certified accuracy."""
        return len(self.certified_metrics) > 0

    def _certified_metrics(self) -> nn.ModuleDict:
        try:
            lipschitz_bound(self.net)
        except ValueError:
            return nn.ModuleDict()
        return nn.ModuleDict({f"{stage}_{names.radius_label(r)}": torchmetrics.MeanMetric()
                              for stage in ("val", "test") for r in self.validation.certify_radii})

    def _lipschitz_margin_bound(self) -> float | None:
        """The constant bound the Lipschitz-margin loss uses (read once: no sync in the steps)."""
        if self.adversarial.loss != "lipschitz_margin":
            return None
        try:
            bound = lipschitz_bound(self.net)
        except ValueError as err:
            raise ValueError(f"adversarial.loss lipschitz_margin needs a network with a Lipschitz bound: {err}") from None
        if not bound.fixed:
            raise ValueError("adversarial.loss lipschitz_margin: the network's Lipschitz bound changes with its weights "
                             "(a dense layer); expected orthogonal layers only (backbones lipmlp, lipconvnet)")
        return bound.value

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # ------------------------------------------------------------------ losses
    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        if self._margin_bound is not None:  # certified training: no attack
            logits, extra, trained_on = self.net(x), {}, x
            task = lipschitz_margin_loss(logits, y, self.adversarial.margin_eps, self._margin_bound,
                                         self.adversarial.margin_temperature)
        else:
            logits, task, extra, trained_on = adversarial_loss(self.net, self.attacker, self.adversarial, x, y)
        penalty, parts = constraint_loss(self.net, self.constraint)
        pruning, pruning_parts = compression_loss(self.net, trained_on, logits)
        loss = task + penalty + pruning
        parts.update(pruning_parts)
        self.metrics["train_acc"](logits, y)
        if self._logging_step():
            self.log_dict({names.TRAIN_LOSS: loss, names.TRAIN_TASK_LOSS: task, **parts, **extra}, on_step=True,
                          on_epoch=False)
        self.log(names.TRAIN_ACC, self.metrics["train_acc"], on_step=False, on_epoch=True)
        return loss

    def _logging_step(self) -> bool:
        """Whether the logger writes step metrics at this step (Lightning writes every
        log_every_n_steps optimizer steps). Step-only metrics are not aggregated, so calling
        self.log on the other steps is pure bookkeeping that costs a small model a large share
        of its step (benchmarks/training.py measures it)."""
        trainer = self._trainer
        if trainer is None:
            return True
        return (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0 or trainer.fast_dev_run

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, then the proximal sparsity step with the LR that step used."""
        lr = optimizer.param_groups[0]["lr"]
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.sparsity_target is not None:
            self.sparsity_target.step_(self.trainer.global_step, self._total_steps)
        else:
            proximal_constraint_(self.net, self.constraint, lr)

    def _evaluate(self, batch, batch_idx: int, stage: str) -> None:
        """Shared validation/test step: clean metrics, then the attacks on a fixed subset."""
        x, y = batch
        logits = self(x)
        self.metrics[f"{stage}_acc"](logits, y)
        self.log(names.loss(stage), nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log(names.acc(stage), self.metrics[f"{stage}_acc"])
        if self.certifiable:  # every image: one forward, already done; the bound once an epoch
            bound = self._epoch_bound
            for radius, mask in certified_from_logits(logits, y, self.validation.certify_radii, bound).items():
                metric = self.certified_metrics[f"{stage}_{names.radius_label(radius)}"]
                metric.update(mask.float())
                self.log(names.certified_acc(stage, radius), metric)
            self.log(names.lipschitz_bound(stage), bound, sync_dist=True)
        n = self._images_to_attack(batch_idx, stage, len(y))
        if n == 0:
            return
        # validation: every attack on all clean-correct images (standalone figures, for the
        # masking check); test: AutoAttack's cascade, each attack on the survivors
        attacks, cascade = ((self.val_attacks, False) if stage == "val"
                            else (self.test_attacks, self.test_cascade))
        clean = (logits[:n].argmax(-1) == y[:n]).detach()  # eval mode already: no second forward
        masks = robust_masks(self.net, self.attacker, x[:n], y[:n], attacks, cascade=cascade, clean=clean)
        for label, mask in masks.items():
            if label != "clean":
                metric = self.robust_metrics[f"{stage}_{label}"]
                metric.update(mask.float())
                self.log(names.robust_acc(stage, label), metric)

    def _images_to_attack(self, batch_idx: int, stage: str, batch_size: int) -> int:
        """How many images of this batch the attacks run on (a fixed prefix of the unshuffled
        loader, so the same images every time)."""
        if stage == "test":
            per_rank = -(-self.test_images // max(1, self.trainer.world_size))
            n = max(0, min(batch_size, per_rank - self._test_attacked))
            self._test_attacked += n
            return n
        if self.validation.batches is not None and batch_idx >= self.validation.batches:
            return 0
        if not self.trainer.sanity_checking and (self.current_epoch + 1) % self.validation.every_n_epochs:
            return 0
        return batch_size

    def _robust_metrics(self, stage: str, attacks: list[AttackSpec]) -> nn.ModuleDict:
        """One mean-of-survivors metric per attack and for the per-image worst case; the
        torchmetrics state is summed over DDP ranks."""
        return nn.ModuleDict({f"{stage}_{label}": torchmetrics.MeanMetric()
                              for label in [*unique_labels(attacks), names.WORST]})

    def configure_test_suite(self, attacks: list[AttackSpec] | None = None, images: int = 512,
                             cascade: bool = True, square_queries: int = 1000) -> list[AttackSpec]:
        """The attacks `test` runs on its first `images` test images. None: the validation
        attacks, then APGD-CE, APGD-DLR and Square (`square_queries`) at the first one's eps."""
        if images < 0:
            raise ValueError(f"test images must be >= 0, got {images}")
        if attacks is None:
            extra = reduced_autoattack(self.val_attacks[0], square_queries)[1:]
            if self.hparams.num_classes < 3:  # DLR needs a third logit: binary tasks skip it
                extra = [a for a in extra if a.name != "apgd_dlr"]
            attacks = [*self.val_attacks, *extra]
        elif self.hparams.num_classes < 3 and any(a.name in _NEEDS_THREE_CLASSES for a in attacks):
            raise ValueError(f"report.attacks: APGD-DLR needs at least 3 classes, the model has "
                             f"{self.hparams.num_classes}: expected other attacks")
        self.test_attacks, self.test_images, self.test_cascade = list(attacks), images, cascade
        metrics = self._robust_metrics("test", self.test_attacks)
        self.robust_metrics = nn.ModuleDict({
            **{k: v for k, v in self.robust_metrics.items() if not k.startswith("test_")},
            **metrics}).to(self.device)
        return self.test_attacks

    def on_test_epoch_start(self) -> None:
        self._test_attacked = 0
        self._epoch_bound = lipschitz_bound(self.net).value if self.certifiable else None

    def on_validation_epoch_start(self) -> None:
        """The Lipschitz bound for this evaluation (the weights do not change inside it)."""
        self._epoch_bound = lipschitz_bound(self.net).value if self.certifiable else None

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(-1)

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self):
        return build_optimization(self.parameters(), self.optimization, self.trainer.max_epochs,
                                  self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = _collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming a fit: restore the RNG states now, before the training loader's iterator is
        # created (the sanity check runs under Lightning's isolate_rng, so it draws nothing).
        # `load_from_checkpoint` has no trainer and leaves the global RNG alone.
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit" and "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])

    def on_train_epoch_start(self) -> None:
        compression_epoch_(self.net, self.current_epoch)  # HYDRA's and the dual pruning's phases
        last = self.trainer.max_epochs is not None and self.current_epoch >= self.trainer.max_epochs - 1
        if self.sparsity_target is not None and last:
            self.sparsity_target.freeze_()  # the target, exactly, for the last epoch at the latest

    def on_fit_start(self) -> None:
        self._total_steps = int(self.trainer.estimated_stepping_batches)  # the sparsity schedule's length
        self.log_summary()

    @rank_zero_only
    def log_summary(self) -> None:
        """Per-layer shapes, stored vs dense-equivalent parameters, and the whole-model ratio."""
        lines = ["separable layers (stored / dense-equivalent parameters):"]
        for name, layer in separable_layers(self.net):
            nnz, exact = implied_nonzeros(layer)
            zeros = sum(int((f == 0).sum()) for t in layer.factors for f in t)
            sparse = (f", {zeros:,} zero factor entries, implied nnz {'' if exact else '<= '}{nnz:,}"
                      if zeros else "")
            lines.append(f"  {name}: {layer.in_shape} -> {layer.out_shape} rank {layer.rank}: "
                         f"{layer.stored_parameters():,} / {layer.dense_parameters():,} "
                         f"({layer.dense_parameters() / layer.stored_parameters():.1f}x){sparse}")
        others = [line for line in self.net.compression_summary if ": separable " not in line]
        if others:
            lines.append("other compressors:")
            lines += [f"  {line}" for line in others]
        c = parameter_counts(self.net)
        lines.append(f"  whole model: {c.stored:,} stored, {c.nonzero:,} non-zero, {c.dense:,} "
                     f"dense-equivalent ({c.compression:.1f}x)")
        log.info("\n".join(lines))
