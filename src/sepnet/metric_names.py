"""Every metric name sepnet logs, in one place: TensorBoard tags, `trainer.callback_metrics`
keys, the checkpoint monitor and the test report use these. A stage is "train", "val" or "test"."""

from __future__ import annotations

WORST = "worst"  # the per-image worst case over the attacks of a suite
TRAIN_LOSS = "train/loss"
TRAIN_TASK_LOSS = "train/loss_task"
TRAIN_ACC = "train/acc"
CONDITION_LOSS = "train/loss_cond"
SPARSITY_LOSS = "train/loss_sparsity"
TRADES_KL = "train/loss_trades_kl"
ROBUST_GAP = "val/robust_gap"  # the first validation attack's accuracy minus the worst case


def acc(stage: str) -> str:
    return f"{stage}/acc"


def loss(stage: str) -> str:
    return f"{stage}/loss"


def robust_acc(stage: str, label: str = WORST) -> str:
    """Accuracy under one attack (its label) or, by default, the per-image worst case."""
    return f"{stage}/robust_acc/{label}"


def compression_term(name: str) -> str:
    """A compressor's training-time value (the dual pruning's lambda, violation, distillation)."""
    return f"train/{name}"


def radius_label(radius: float) -> str:
    """36/255 -> "36_255" (a whole number of 255ths), else the radius to 4 digits, "." as "p"
    (0.05 -> "0p05": a module name cannot hold a dot)."""
    steps = radius * 255
    return f"{round(steps)}_255" if abs(steps - round(steps)) < 1e-6 else f"{radius:.4g}".replace(".", "p")


def certified_acc(stage: str, radius: float, kind: str = "") -> str:
    """Share of images correct with a Lipschitz certificate at L2 `radius` (sepnet.certificate):
    the tightest the network has; kind "global": the sqrt(2) L one, reported beside it."""
    return f"{stage}/certified_acc{'_' + kind if kind else ''}/{radius_label(radius)}"


def lipschitz_bound(stage: str) -> str:
    return f"{stage}/lipschitz_bound"
