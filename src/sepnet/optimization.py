"""The `model.optimization` section and the optimizer + LR schedule it builds (Lightning's
`configure_optimizers` return value), usable from a plain training loop too."""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

__all__ = ["OptimizationConfig", "build_optimization"]


@dataclass(frozen=True)
class OptimizationConfig:
    """optimizer: "sgd" or "adamw". lr: learning rate. momentum, nesterov: SGD's.
    weight_decay: weight decay. scheduler: "none", "multistep", "cosine" (over max_epochs) or
    "onecycle" (per step; the others per epoch). milestones, gamma: multistep's epochs and factor.
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    scheduler: Literal["none", "multistep", "cosine", "onecycle"] = "cosine"
    milestones: tuple[int, ...] = (100, 150)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"optimization.{name} must be >= 0, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimization.optimizer {self.optimizer!r}: expected 'sgd' or 'adamw'")
        if self.scheduler not in ("none", "multistep", "cosine", "onecycle"):
            raise ValueError(f"optimization.scheduler {self.scheduler!r}: expected 'none', 'multistep', "
                             "'cosine' or 'onecycle'")
        object.__setattr__(self, "milestones", tuple(self.milestones))


def build_optimization(params: Iterable[nn.Parameter], config: OptimizationConfig, max_epochs: int | None,
                       total_steps: int | float) -> dict | torch.optim.Optimizer:
    """The optimizer and its schedule; `max_epochs` sizes cosine (`total_steps` where the run has no
    epoch count: max_epochs -1 with max_steps or max_time), `total_steps` onecycle."""
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                              nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.scheduler == "none":
        return opt
    if config.scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(1, int(total_steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
    if config.scheduler == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(config.milestones), config.gamma)
    elif max_epochs is None or max_epochs < 1:  # a run bounded by steps or time: cosine over its steps
        if not math.isfinite(total_steps):
            raise ValueError("optimization.scheduler cosine: the run has no length (max_epochs -1, no max_steps); "
                             "expected --trainer.max_steps, or --model.optimization.scheduler none")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total_steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
