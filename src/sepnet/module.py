"""ImageClassifier: normalize -> backbone -> head, with the constraint and adversarial losses."""

from __future__ import annotations

import logging
from dataclasses import asdict

import lightning as L
import torchmetrics
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from sepnet import metric_names as names
from sepnet.attacks import Attacker, AttackSpec
from sepnet.certificate import CertificateConfig, Certifier
from sepnet.compress import compression_epoch_, compression_loss
from sepnet.compress.sparsity import SparsityTarget
from sepnet.constraints import ConstraintConfig, constraint_loss, proximal_constraint_
from sepnet.evaluation import AttackProgress, ValidationConfig, reduced_autoattack, robust_masks, unique_labels
from sepnet.measures import compression_report
from sepnet.network import NetworkConfig, build_network
from sepnet.objectives import AdversarialTraining, build_objective
from sepnet.optimization import OptimizationConfig, build_optimization
from sepnet.rng import RNGStates
from sepnet.sections import as_section

log = logging.getLogger(__name__)


class ImageClassifier(L.LightningModule):
    """Image classifier with separable layers, joint constraints and adversarial training: the
    network comes from sepnet.network; this class wires the losses, metrics and logging.

    Args:
        num_classes, image_shape, mean, std: linked from the datamodule (mean/std normalize
            inside the network, so attacks see [0, 1] pixels).
        network: backbone and head (sepnet.network.NetworkConfig).
        constraint: the joint constraint on the factors (sepnet.constraints.ConstraintConfig).
        adversarial: the training objective (sepnet.objectives.AdversarialTraining).
        optimization: optimizer and LR schedule (sepnet.optimization.OptimizationConfig).
        validation: the validation attacks and how often they run (sepnet.evaluation.ValidationConfig).
        certificate: radii and soundness checks of a certifiable network (sepnet.certificate.CertificateConfig).
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
        certificate: CertificateConfig = CertificateConfig(),
        fast_attacks: bool = True,
    ) -> None:
        super().__init__()
        self.network_config = as_section(NetworkConfig, network)
        self.constraint = as_section(ConstraintConfig, constraint)
        self.adversarial = as_section(AdversarialTraining, adversarial)
        self.optimization = as_section(OptimizationConfig, optimization)
        self.validation = as_section(ValidationConfig, validation)
        self.certificate = as_section(CertificateConfig, certificate)
        # plain types only: checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({
            "num_classes": num_classes, "image_shape": tuple(image_shape), "mean": tuple(mean),
            "std": tuple(std), "network": asdict(self.network_config), "constraint": asdict(self.constraint),
            "adversarial": asdict(self.adversarial), "optimization": asdict(self.optimization),
            "validation": asdict(self.validation), "certificate": asdict(self.certificate),
            "fast_attacks": fast_attacks})
        self.net = build_network(num_classes, image_shape, mean, std, **asdict(self.network_config))
        self.sparsity_target = (SparsityTarget(self.net, self.constraint.sparsity_target,
                                               self.constraint.sparsity_ramp)
                                if self.constraint.sparsity_target is not None else None)
        self.attacker = Attacker(self.net, tuple(image_shape), num_classes, fast=fast_attacks)
        for attack in self.val_attacks:
            attack.check_classes(num_classes, "validation.attacks")
        self.metrics = nn.ModuleDict({
            f"{stage}_acc": torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
            for stage in ("train", "val", "test")
        })
        self.robust_metrics = self._robust_metrics("val", self.val_attacks)
        self.certifier = Certifier(self.net, self.certificate)
        self.certified_metrics = nn.ModuleDict({
            f"{stage}_{kind}{names.radius_label(r)}": torchmetrics.MeanMetric() for stage in ("val", "test")
            for r in self.certificate.radii for kind in self.certifier.kinds} if self.certifier.certifiable else {})
        self.objective = build_objective(self.adversarial, self.net, self.attacker)
        self.test_attacks, self.test_images, self.test_cascade = [], 0, True
        self._log_step, self._bar, self._progress = True, True, None
        self.configure_test_suite()

    @property
    def val_attacks(self) -> list[AttackSpec]:
        return self.validation.attacks

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # ------------------------------------------------------------------ losses
    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        logits, task, extra, trained_on = self.objective(x, y)
        penalty, parts = constraint_loss(self.net, self.constraint)
        pruning, pruning_parts = compression_loss(self.net, trained_on, logits)
        loss = task + penalty + pruning
        parts.update(pruning_parts)
        self.metrics["train_acc"](logits, y)
        if self._log_step:  # the loss on the progress bar too (where one shows: Lightning reads it every step)
            self.log(names.TRAIN_LOSS, loss, on_step=True, on_epoch=False, prog_bar=self._bar)
            self.log_dict({names.TRAIN_TASK_LOSS: task, **parts, **extra}, on_step=True, on_epoch=False)
        self.log(names.TRAIN_ACC, self.metrics["train_acc"], on_step=False, on_epoch=True, prog_bar=self._bar)
        return loss

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Whether the logger writes step metrics at this step (Lightning writes every
        log_every_n_steps optimizer steps). Step-only metrics are not aggregated, so calling
        self.log on the other steps is pure bookkeeping that costs a small model a large share
        of its step (benchmarks/training.py measures it). Outside a Trainer: every step."""
        trainer = self.trainer
        self._log_step = (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0 or bool(trainer.fast_dev_run)
        self._bar = trainer.progress_bar_callback is not None  # else prog_bar metrics would cost a sync a step

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
        self.log(names.acc(stage), self.metrics[f"{stage}_acc"], prog_bar=True)
        if self.certifier.certifiable:  # every image, float32 logits; the bound measured at the epoch's start
            for kind, by_radius in self.certifier.all_masks(x, y, logits).items():
                for radius, mask in by_radius.items():
                    metric = self.certified_metrics[f"{stage}_{kind}{names.radius_label(radius)}"]
                    metric.update(mask.float())
                    self.log(names.certified_acc(stage, radius, kind), metric)
            self.log(names.lipschitz_bound(stage), self.certifier.bound.value, sync_dist=True)
        n = self._images_to_attack(batch_idx, stage, len(y))
        if n == 0:
            return
        # validation: every attack on all clean-correct images (standalone figures, for the
        # masking check); test: AutoAttack's cascade, each attack on the survivors
        attacks, cascade = ((self.val_attacks, False) if stage == "val"
                            else (self.test_attacks, self.test_cascade))
        clean = (logits[:n].argmax(-1) == y[:n]).detach()  # eval mode already: no second forward
        if self._progress is not None and stage == "test":
            self._progress.next_batch(n)
        masks = robust_masks(self.net, self.attacker, x[:n], y[:n], attacks, cascade=cascade, clean=clean,
                             progress=self._progress if stage == "test" else None)
        for label, mask in masks.items():
            if label != "clean":
                metric = self.robust_metrics[f"{stage}_{label}"]
                metric.update(mask.float())
                self.log(names.robust_acc(stage, label), metric, prog_bar=label == names.WORST)

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
        classes = self.hparams.num_classes
        if attacks is None:  # DLR needs a third logit: binary tasks skip it
            extra = [a for a in reduced_autoattack(self.val_attacks[0], square_queries)[1:]
                     if a.entry.min_classes <= classes]
            attacks = [*self.val_attacks, *extra]
        for attack in attacks:
            attack.check_classes(classes, "report.attacks")
        self.test_attacks, self.test_images, self.test_cascade = list(attacks), images, cascade
        metrics = self._robust_metrics("test", self.test_attacks)
        self.robust_metrics = nn.ModuleDict({
            **{k: v for k, v in self.robust_metrics.items() if not k.startswith("test_")},
            **metrics}).to(self.device)
        return self.test_attacks

    def on_test_epoch_start(self) -> None:
        self._test_attacked = 0
        no_bar = self.trainer.progress_bar_callback is None and self.trainer.is_global_zero
        self._progress = AttackProgress(self.test_images, len(self.test_attacks)) if no_bar else None  # log lines
        self.on_validation_epoch_start()

    def on_validation_epoch_start(self) -> None:
        """The Lipschitz bound for this evaluation (the weights do not change inside it)."""
        if self.certifier.certifiable:
            self.certifier.measure()

    def on_validation_epoch_end(self) -> None:
        if self.certifier.certifiable:
            self.certifier.verify()  # fails loudly if the bound moved past the one certified with

    on_test_epoch_end = on_validation_epoch_end

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

    def configure_callbacks(self) -> list[L.Callback]:
        return [RNGStates()]  # bit-identical resume (sepnet.rng)

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
        log.info(compression_report(self.net, self.net.compression_summary))
