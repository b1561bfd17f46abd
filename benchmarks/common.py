"""Helpers the benchmark studies share: the CIFAR-10 JPEG data, the training loop, the
evaluation (PGD-20, the reduced AutoAttack, the honesty checks) and where results and figures go.

The benchmarks are a package: run a study from the repository root as a module,
`python -m benchmarks.<study>` (benchmarks/__init__.py lists them).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn

from sepnet.attacks import AttackSpec
from sepnet.data import ImageFolderDataModule
from sepnet.evaluation import correct, honesty_checks, robust_masks
from sepnet.measures import layer_condition_number, separable_layers
from sepnet.module import ImageClassifier

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"

DATA = HERE.parents[1] / "shared" / "data" / "cifar10-jpeg"
# the training sets a run can name: the shared CIFAR-10 JPEG copies (the same 10k test images)
DATA_SETS = {"20k": DATA, "40k": HERE.parents[1] / "shared" / "data" / "cifar10-jpeg-40k"}


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


EPS = 8 / 255


def eval_specs(eps: float, square_queries: int = 1000) -> dict[str, AttackSpec]:
    """PGD-20 and the reduced AutoAttack for the CPU (APGD-CE and APGD-DLR with 100 steps and 1
    restart, Square with `square_queries` queries); steps of eps / 4."""
    step = eps / 4
    return {
        "pgd20": AttackSpec(name="pgd", eps=eps, step_size=step, steps=20),
        "aa_apgd_ce": AttackSpec(name="apgd_ce", eps=eps, step_size=step, steps=100),
        "aa_apgd_dlr": AttackSpec(name="apgd_dlr", eps=eps, step_size=step, steps=100),
        "aa_square": AttackSpec(name="square", eps=eps, step_size=step, steps=square_queries),
    }


EVAL = eval_specs(EPS)


AA = ("aa_apgd_ce", "aa_apgd_dlr", "aa_square")


def exact_kappa(layer) -> float:
    """Exact kappa of a separable layer over its structural rank, also for the MLP's 2048x3072
    rank > 1 layers, where the monitor's default gives the Weyl bound (vacuous there)."""
    return layer_condition_number(layer, max_dense_elements=2**24).value


class KappaHistory(L.Callback):
    """Mean log10 kappa of the separable layers (exact values) after every epoch."""

    def __init__(self) -> None:
        self.history: list[float] = []
        self.per_layer: list[list[float]] = []  # log10 kappa of every layer (inf: singular)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # exact values only: the Weyl bound of large rank > 1 layers jumps between finite and
        # vacuous and would make the curve meaningless
        kappas = [exact_kappa(layer) for _, layer in separable_layers(pl_module)]
        finite = [math.log10(k) for k in kappas if math.isfinite(k)]
        self.per_layer.append([math.log10(k) for k in kappas])
        if finite:
            self.history.append(sum(finite) / len(finite))


def data_root(data: str) -> Path:
    """The folder of DATA_SETS[data] to read. The shared cifar10-jpeg-40k/test is a link to
    cifar10-jpeg/test, which the copy on these machines holds as a plain file naming its target:
    then a view of it under data/ (git-ignored) links train and test to the real folders."""
    if data not in DATA_SETS:
        raise ValueError(f"training set {data!r}: expected one of {sorted(DATA_SETS)}")
    root = DATA_SETS[data]
    link = root / "test"
    if not link.is_file():
        return root
    view = HERE.parent / "data" / root.name
    view.mkdir(parents=True, exist_ok=True)
    for name, target in (("train", root / "train"), ("test", (root / link.read_text().strip()).resolve())):
        if not (view / name).exists():
            (view / name).symlink_to(target, target_is_directory=True)
    return view


def datamodule(batch_size: int, data: str = "20k", workers: int = 2, crop: bool = True,
               flip: bool = True) -> ImageFolderDataModule:
    """One of DATA_SETS with 5% of its training images held out; crop, flip: the augmentation."""
    return ImageFolderDataModule(root=str(data_root(data)), batch_size=batch_size, num_workers=workers,
                                 pin_memory=False, mean=CIFAR_MEAN, std=CIFAR_STD, val_fraction=0.05,
                                 crop=crop, flip=flip)


def train(model: ImageClassifier, epochs: int, batch_size: int, callbacks=(), logger=False,
          data: ImageFolderDataModule | None = None) -> tuple[float, KappaHistory]:
    kappa = KappaHistory()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[kappa, *callbacks])
    start = time.perf_counter()
    trainer.fit(model, data or datamodule(batch_size))
    return time.perf_counter() - start, kappa


def evaluate(net: nn.Module, attacker, pgd_images: int, aa_images: int, honesty_images: int = 256,
             eps: float = EPS, split: str = "test", square_queries: int = 1000) -> dict:
    """sepnet.evaluation on the test set: clean accuracy on all 10k images, PGD-20 on the first
    `pgd_images`, then the reduced AutoAttack on the PGD survivors among the first `aa_images`
    (worst_acc: an image counts if it survives all four), and the honesty checks. split "val":
    the same on the 1,000 held-out training images instead (for choosing weights)."""
    if split not in ("test", "val"):
        raise ValueError(f"evaluation split {split!r}: expected 'test' or 'val'")
    dm = datamodule(500)
    dm.setup()
    hits, xs, ys = [], [], []  # the test loader's fixed shuffle makes its prefix a random sample
    subset = max(pgd_images, aa_images, honesty_images)
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()  # val: a random split
    for x, y in loader:
        hits.append(correct(net, x, y))
        if sum(len(t) for t in ys) < subset:
            xs.append(x), ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    if len(y) < subset:
        raise ValueError(f"{split} split: {len(y)} images, fewer than the {subset} to attack")
    out = {"clean_acc": torch.cat(hits).float().mean().item(), "eval_split": split}
    specs = eval_specs(eps, square_queries)
    pgd = robust_masks(net, attacker, x[:pgd_images], y[:pgd_images], [specs["pgd20"]])["pgd_linf"]
    out["pgd20_acc"] = pgd.float().mean().item()
    alive = torch.ones(aa_images, dtype=torch.bool)
    alive[:min(pgd_images, aa_images)] = pgd[:aa_images]
    aa = robust_masks(net, attacker, x[:aa_images], y[:aa_images], [specs[k] for k in AA], alive=alive)
    out["worst_acc"] = aa["worst"].float().mean().item()
    if honesty_images:
        checks = honesty_checks(net, attacker, x[:honesty_images], y[:honesty_images], specs["pgd20"],
                                square_queries)
        out["honesty"] = {"accuracy": checks["accuracy"], "warnings": checks["warnings"]}
    return out
