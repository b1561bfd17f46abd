"""A training step makes no host round trip and no device sync outside logging steps: forward,
attack, losses, constraint penalties, sparsity target, compressor hooks, RunWatch, EpochLine.
On the CPU the calls that would sync a GPU are counted (`Tensor.item / cpu / numpy / tolist`,
`bool / int / float` of a tensor) and numpy's random generator (a host draw)."""

import collections

import lightning as L
import numpy as np
import pytest
import torch

from benchmarks.sync_cases import CASES, LOG_EVERY, case_model
from sepnet.callbacks import EpochLine, RunWatch
from sepnet.data import DigitsDataModule
from sepnet.module import ImageClassifier

SYNCS = ("item", "cpu", "numpy", "tolist", "__bool__", "__int__", "__float__")
NUMPY_RANDOM = ("uniform", "randn", "rand", "normal", "random", "choice", "randint")


class Counter(L.Callback):
    """Counts the calls per training step, from its batch start to the next one (the optimizer
    step, the proximal / sparsity step and the batch-end callbacks included); stops at the
    epoch's end."""

    def __init__(self) -> None:
        self.calls: collections.Counter = collections.Counter()
        self.step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.step = None

    def wrap(self, name, original):
        def counted(*args, **kwargs):
            if self.step is not None:
                self.calls[(self.step, name)] += 1
            return original(*args, **kwargs)
        return counted


def count_syncs(model: ImageClassifier, monkeypatch, steps: int = 8) -> collections.Counter:
    counter = Counter()
    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counter.wrap(name, getattr(torch.Tensor, name)))
    for name in NUMPY_RANDOM:
        monkeypatch.setattr(np.random, name, counter.wrap(f"np.random.{name}", getattr(np.random, name)))
    trainer = L.Trainer(max_steps=steps, log_every_n_steps=LOG_EVERY, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[counter, RunWatch(), EpochLine()])
    trainer.fit(model, DigitsDataModule(batch_size=32))
    return counter.calls


@pytest.mark.parametrize("case", CASES)
def test_no_host_sync_outside_logging_steps(case, monkeypatch):
    calls = count_syncs(case_model(case), monkeypatch)
    off_logging = {k: n for k, n in calls.items() if (k[0] + 1) % LOG_EVERY != 0}
    assert off_logging == {}, off_logging
    assert sum(calls.values()) > 0  # the logging steps do read values: the counter works


def test_the_sync_count_catches_an_item_put_back(monkeypatch):
    model = case_model("fgsm")
    step = model.training_step

    def with_item(batch, batch_idx):
        loss = step(batch, batch_idx)
        loss.item()  # the kind of call the test is there to catch
        return loss

    monkeypatch.setattr(model, "training_step", with_item)
    calls = count_syncs(model, monkeypatch, steps=3)
    assert calls[(0, "item")] == 1 and calls[(1, "item")] == 1
