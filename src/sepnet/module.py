"""ImageClassifier: normalize -> backbone -> head, with the constraint and adversarial losses."""

from __future__ import annotations

import logging
import random
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torchmetrics
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from sepnet.attacks import Attacker, AttackSpec, adversarial_batch, trades_loss
from sepnet.constraints import constraint_penalties, parameter_counts, proximal_step_, separable_layers
from sepnet.evaluation import evaluation_attacks, reduced_autoattack, robust_masks, unique_labels
from sepnet.network import build_network

log = logging.getLogger(__name__)


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
    """Image classifier with separable layers, joint constraints and adversarial training.

    Args:
        num_classes: classes (linked from the datamodule).
        image_shape: (C, H, W) of the input (linked from the datamodule).
        mean: per-channel normalization mean (linked from the datamodule).
        std: per-channel normalization std (linked from the datamodule).
        backbone: "mlp", "vgg16", "vit" or "resnet34".
        backbone_kwargs: options of the backbone builder (see sepnet.backbones).
        head: "dense" or "separable".
        head_kwargs: options of the head, over the backbone's defaults for that head.
        condition_weight: weight of the condition-number penalty (0 switches it off).
        condition_form: "amgm", "logdet" or "logcond" (see sepnet.constraints).
        sparsity_weight: weight of the sparsity penalty (0 switches it off).
        sparsity_form: "l1" or "tl1".
        tl1_a: the transformed-L1 parameter a.
        proximal: apply sparsity by soft-thresholding after each optimizer step (exact zeros)
            instead of adding its subgradient to the loss.
        optimizer: "sgd" or "adamw".
        lr: learning rate.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        weight_decay: weight decay.
        scheduler: "none", "multistep", "cosine" or "onecycle" (stepped per epoch, except onecycle).
        milestones: epochs at which multistep multiplies the LR by gamma.
        gamma: multistep factor.
        adv_training: "none", "pgd" (Madry PGD-AT), "fgsm" (fast FGSM with random start; use
            adv_step_size ~ 1.25 adv_eps), "nfgsm" (N-FGSM: noise of 2 eps, step adv_step_size
            = adv_eps, no clipping to the ball; resists catastrophic overfitting) or "trades"
            (PGD on KL to the clean prediction, then CE(clean) + trades_beta KL(clean || adv)).
        adv_eps: adversarial-training eps in pixel units.
        adv_step_size: attack step in pixel units.
        adv_steps: PGD iterations.
        adv_norm: "linf" or "l2".
        adv_mix: fraction of each batch replaced by adversarial examples (1 = all; PGD/FGSM).
        trades_beta: TRADES' weight of the robustness term.
        fast_attacks: ART attacks through sepnet's FastClassifier (input-only gradients on the
            device) instead of ART's stock PyTorchClassifier.
        val_attacks: attacks for the validation robust metrics, each a dict of AttackSpec fields
            (name, norm, eps, step_size, steps, random_start); each runs on every clean-correct
            image of the subset, and val/robust_acc/worst is the per-image worst case over them
            (the checkpoint monitor). Default: PGD-10 and FGSM, Linf 8/255 (FGSM beating PGD is
            a sign of gradient masking, see sepnet.callbacks.RunWatch).
        robust_batches: validation batches attacked (the first ones of the unshuffled loader,
            so the same images every time); None attacks all of them.
        robust_every_n_epochs: attack at validation every this many epochs.

    The test attacks are not hyperparameters (a checkpoint must not decide how it is tested):
    `configure_test_suite`, called by `run.py test` from its `report` section.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        backbone: str = "mlp",
        backbone_kwargs: dict[str, Any] | None = None,
        head: Literal["dense", "separable"] = "separable",
        head_kwargs: dict[str, Any] | None = None,
        condition_weight: float = 0.0,
        condition_form: Literal["amgm", "logdet", "logcond"] = "amgm",
        sparsity_weight: float = 0.0,
        sparsity_form: Literal["l1", "tl1"] = "l1",
        tl1_a: float = 1.0,
        proximal: bool = False,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        scheduler: Literal["none", "multistep", "cosine", "onecycle"] = "cosine",
        milestones: tuple[int, ...] = (100, 150),
        gamma: float = 0.1,
        adv_training: Literal["none", "pgd", "fgsm", "nfgsm", "trades"] = "none",
        adv_eps: float = AttackSpec.eps,
        adv_step_size: float = AttackSpec.step_size,
        adv_steps: int = 10,
        adv_norm: Literal["linf", "l2"] = "linf",
        adv_mix: float = 1.0,
        trades_beta: float = 6.0,
        fast_attacks: bool = True,
        val_attacks: list[dict[str, Any]] | None = None,
        robust_batches: int | None = 4,
        robust_every_n_epochs: int = 1,
    ) -> None:
        super().__init__()
        for name in ("condition_weight", "sparsity_weight", "weight_decay", "lr", "trades_beta"):
            if locals()[name] < 0:
                raise ValueError(f"{name} must be >= 0, got {locals()[name]}")
        if not 0 <= adv_mix <= 1:
            raise ValueError(f"adv_mix must be in [0, 1], got {adv_mix}")
        self.save_hyperparameters()
        self.net = build_network(num_classes, image_shape, mean, std, backbone, backbone_kwargs,
                                 head, head_kwargs)
        self.adv_spec = None
        if adv_training != "none":
            name = adv_training if adv_training in ("fgsm", "nfgsm") else "pgd"
            self.adv_spec = AttackSpec(name=name, norm=adv_norm, eps=adv_eps, step_size=adv_step_size,
                                       steps=adv_steps)
        self.attacker = Attacker(self.net, tuple(image_shape), num_classes, fast=fast_attacks)
        default_val = [{}, {"name": "fgsm", "step_size": AttackSpec.eps, "random_start": False}]
        self.val_attacks = evaluation_attacks(val_attacks or default_val, "val_attacks")
        if robust_every_n_epochs < 1:
            raise ValueError(f"robust_every_n_epochs must be >= 1, got {robust_every_n_epochs}")
        self.metrics = nn.ModuleDict({
            f"{stage}_acc": torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
            for stage in ("train", "val", "test")
        })
        self.robust_metrics = self._robust_metrics("val", self.val_attacks)
        self.test_attacks, self.test_images, self.test_cascade = [], 0, True
        self.configure_test_suite()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # ------------------------------------------------------------------ losses
    def constraint_loss(self) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        use_sparsity = hp.sparsity_weight > 0 and not hp.proximal
        if hp.condition_weight == 0 and not use_sparsity:
            return torch.zeros((), device=self.device), {}
        parts = constraint_penalties(self.net, hp.condition_form, hp.sparsity_form, hp.tl1_a,
                                     include_sparsity=use_sparsity)
        total = hp.condition_weight * parts["cond"] + (hp.sparsity_weight * parts["sparsity"]
                                                      if use_sparsity else 0.0)
        return total, {"train/loss_cond": parts["cond"], "train/loss_sparsity": parts["sparsity"]}

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        hp = self.hparams
        if hp.adv_training == "trades":
            logits, task, kl = trades_loss(self.net, self.attacker, self.adv_spec, x, y, hp.trades_beta)
            if self._logging_step():
                self.log("train/loss_trades_kl", kl)
        else:
            if self.adv_spec is not None:
                x = adversarial_batch(self.attacker, self.adv_spec, x, y, hp.adv_mix)
            logits = self(x)
            task = nn.functional.cross_entropy(logits, y)
        penalty, parts = self.constraint_loss()
        loss = task + penalty
        self.metrics["train_acc"](logits, y)
        if self._logging_step():
            self.log_dict({"train/loss": loss, "train/loss_task": task, **parts}, on_step=True,
                          on_epoch=False)
        self.log("train/acc", self.metrics["train_acc"], on_step=False, on_epoch=True)
        return loss

    def _logging_step(self) -> bool:
        """Whether the logger writes step metrics at this step (Lightning writes every
        log_every_n_steps optimizer steps). Step-only metrics are not aggregated, so calling
        self.log on the other steps is pure bookkeeping: ~3 ms a step, +40% epoch time for a
        small MLP (benchmarks/training.py)."""
        trainer = self._trainer
        if trainer is None:
            return True
        return (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0 or trainer.fast_dev_run

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, then the proximal sparsity step with the LR that step used."""
        lr = optimizer.param_groups[0]["lr"]
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        hp = self.hparams
        if hp.proximal and hp.sparsity_weight > 0:
            proximal_step_(self.net, lr * hp.sparsity_weight, hp.sparsity_form, hp.tl1_a)

    def _evaluate(self, batch, batch_idx: int, stage: str) -> None:
        """Shared validation/test step: clean metrics, then the attacks on a fixed subset."""
        x, y = batch
        logits = self(x)
        self.metrics[f"{stage}_acc"](logits, y)
        self.log(f"{stage}/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", self.metrics[f"{stage}_acc"])
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
                self.log(f"{stage}/robust_acc/{label}", metric)

    def _images_to_attack(self, batch_idx: int, stage: str, batch_size: int) -> int:
        """How many images of this batch the attacks run on (a fixed prefix of the unshuffled
        loader, so the same images every time)."""
        hp = self.hparams
        if stage == "test":
            per_rank = -(-self.test_images // max(1, self.trainer.world_size))
            n = max(0, min(batch_size, per_rank - self._test_attacked))
            self._test_attacked += n
            return n
        if hp.robust_batches is not None and batch_idx >= hp.robust_batches:
            return 0
        if not self.trainer.sanity_checking and (self.current_epoch + 1) % hp.robust_every_n_epochs:
            return 0
        return batch_size

    def _robust_metrics(self, stage: str, attacks: list[AttackSpec]) -> nn.ModuleDict:
        """One mean-of-survivors metric per attack and for the per-image worst case; the
        torchmetrics state is summed over DDP ranks."""
        return nn.ModuleDict({f"{stage}_{label}": torchmetrics.MeanMetric()
                              for label in [*unique_labels(attacks), "worst"]})

    def configure_test_suite(self, attacks: list[AttackSpec] | None = None, images: int = 512,
                             cascade: bool = True, square_queries: int = 1000) -> list[AttackSpec]:
        """The attacks `test` runs on its first `images` test images. None: the validation
        attacks, then APGD-CE, APGD-DLR and Square (`square_queries`) at the first one's eps."""
        if images < 0:
            raise ValueError(f"test images must be >= 0, got {images}")
        if attacks is None:
            extra = reduced_autoattack(self.val_attacks[0], square_queries)[1:]
            attacks = [*self.val_attacks, *extra]
        self.test_attacks, self.test_images, self.test_cascade = list(attacks), images, cascade
        metrics = self._robust_metrics("test", self.test_attacks)
        self.robust_metrics = nn.ModuleDict({
            **{k: v for k, v in self.robust_metrics.items() if not k.startswith("test_")},
            **metrics}).to(self.device)
        return self.test_attacks

    def on_test_epoch_start(self) -> None:
        self._test_attacked = 0

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(-1)

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum,
                                  nesterov=hp.nesterov and hp.momentum > 0, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        epochs = max(1, self.trainer.max_epochs or 1)
        if hp.scheduler == "none":
            return opt
        if hp.scheduler == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=hp.lr, total_steps=max(1, self.trainer.estimated_stepping_batches))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if hp.scheduler == "multistep":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(hp.milestones), hp.gamma)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = _collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming a fit: restore the RNG states now, before the training loader's iterator is
        # created (the sanity check runs under Lightning's isolate_rng, so it draws nothing).
        # `load_from_checkpoint` has no trainer and leaves the global RNG alone.
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit" and "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])

    def on_fit_start(self) -> None:
        self.log_summary()

    @rank_zero_only
    def log_summary(self) -> None:
        """Per-layer shapes, stored vs dense-equivalent parameters, and the whole-model ratio."""
        lines = ["separable layers (stored / dense-equivalent parameters):"]
        for name, layer in separable_layers(self.net):
            lines.append(f"  {name}: {layer.in_shape} -> {layer.out_shape} rank {layer.rank}: "
                         f"{layer.stored_parameters():,} / {layer.dense_parameters():,} "
                         f"({layer.dense_parameters() / layer.stored_parameters():.1f}x)")
        c = parameter_counts(self.net)
        lines.append(f"  whole model: {c.stored:,} stored, {c.nonzero:,} non-zero, {c.dense:,} "
                     f"dense-equivalent ({c.compression:.1f}x)")
        log.info("\n".join(lines))
