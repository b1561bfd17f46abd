"""Epoch time of the Lightning application against a plain PyTorch loop doing the same work,
and the cost of the constraint monitor.

    python -m benchmarks.training [--images 5120] [--repeats 2]

Same data (a fixed subset of ../shared/data/cifar10-jpeg decoded once into memory), same model
(ImageClassifier.net), same optimizer, loss (cross-entropy + condition and sparsity penalties)
and batch size; no validation. Three timings per model, each the best of `--repeats` epochs:
1. plain loop; 2. Lightning (logger and checkpointing off); 3. Lightning with the TensorBoard
logger and the ConstraintMonitor (every 50 steps, as configured by default).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets, transforms

from sepnet.callbacks import ConstraintMonitor
from sepnet.constraints import constraint_penalties
from sepnet.module import ImageClassifier

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
MODELS = {  # network sections
    "mlp": dict(backbone="mlp", head="separable"),
    "vgg16 (width 1/4)": dict(backbone="vgg16", backbone_kwargs={"width": 0.25}, head="separable",
                              head_kwargs={"hidden_shapes": [[4, 4, 8], [4, 4, 8]]}),
}
CONSTRAINT = dict(condition_weight=1e-3, sparsity_weight=1e-5)
OPTIMIZATION = dict(optimizer="sgd", lr=0.01, scheduler="none")


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self.start)


def plain_epochs(model: ImageClassifier, loader: DataLoader, repeats: int) -> float:
    net = model.net.train()
    opt = torch.optim.SGD(net.parameters(), lr=OPTIMIZATION["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x, y in loader:
            loss = nn.functional.cross_entropy(net(x), y)
            parts = constraint_penalties(net)
            loss = loss + CONSTRAINT["condition_weight"] * parts["cond"] + CONSTRAINT["sparsity_weight"] * parts["sparsity"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return min(times)


def lightning_epochs(model: ImageClassifier, loader: DataLoader, repeats: int, monitor: bool) -> float:
    timer = EpochTimer()
    callbacks = [timer] + ([ConstraintMonitor(every_n_steps=50)] if monitor else [])
    with tempfile.TemporaryDirectory() as tmp:
        logger = TensorBoardLogger(tmp, name="bench") if monitor else False
        trainer = L.Trainer(max_epochs=repeats, accelerator="cpu", logger=logger, callbacks=callbacks,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                            log_every_n_steps=50)
        trainer.fit(model, train_dataloaders=loader)
    return min(timer.times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5120)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    ds = datasets.ImageFolder(str(ROOT / "train"), transforms.ToTensor())
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[: args.images].tolist()
    xs, ys = zip(*(ds[i] for i in idx))
    data = TensorDataset(torch.stack(xs), torch.tensor(ys))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.images} CIFAR-10 images "
          f"in memory, batch {args.batch}; best of {args.repeats} epochs")
    print(f"{'model':20} {'plain s':>8} {'Lightning s':>12} {'overhead':>9} {'+monitor s':>11} {'monitor':>8}")
    for name, kwargs in MODELS.items():
        results = []
        for kind in ("plain", "lightning", "monitor"):
            torch.manual_seed(0)
            model = ImageClassifier(network=kwargs, constraint=CONSTRAINT, optimization=OPTIMIZATION)
            loader = DataLoader(data, batch_size=args.batch, shuffle=True,
                                generator=torch.Generator().manual_seed(0))
            if kind == "plain":
                results.append(plain_epochs(model, loader, args.repeats))
            else:
                results.append(lightning_epochs(model, loader, args.repeats, monitor=kind == "monitor"))
        plain, light, mon = results
        print(f"{name:20} {plain:8.2f} {light:12.2f} {light / plain - 1:+9.1%} {mon:11.2f} {mon / light - 1:+8.1%}")


if __name__ == "__main__":
    main()
