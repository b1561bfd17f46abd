"""sepnet.evaluation: the cascade, the worst case, the honesty checks and the masking watch."""

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import fit_briefly
from torch import nn

from sepnet.attacks import Attacker, AttackSpec
from sepnet.callbacks import RunWatch
from sepnet.data import DigitsDataModule
from sepnet.evaluation import (
    correct,
    honesty_checks,
    masking_warnings,
    reduced_autoattack,
    robust_masks,
    unique_labels,
)

EPS = 0.1
PGD = AttackSpec(name="pgd", eps=EPS, step_size=0.025, steps=5, random_start=False)
FGSM = AttackSpec(name="fgsm", eps=EPS, step_size=EPS, random_start=False)


@pytest.fixture(scope="module")
def data():
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    x = torch.stack([dm.test_set[i][0] for i in range(len(dm.test_set))])[:96]
    y = torch.stack([dm.test_set[i][1] for i in range(len(dm.test_set))])[:96]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return fit_briefly(model, dm.train_dataloader(), epochs=4, lr=1e-2), x, y


class Quantized(nn.Module):
    """Gradient masking by construction: inputs rounded to 4 levels (zero gradient almost
    everywhere), so gradient attacks stall while a black-box attack still works."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 3) / 3)


def test_cascade_is_the_and_of_standalone_attacks(data):
    model, x, y = data
    attacker = Attacker(model, (1, 8, 8), 10)
    alone = robust_masks(model, attacker, x, y, [PGD, FGSM], cascade=False)
    cascade = robust_masks(model, attacker, x, y, [PGD, FGSM], cascade=True)
    assert torch.equal(alone["clean"], correct(model, x, y))
    # deterministic attacks: the cascade's second figure is "survived both", the worst the same
    assert torch.equal(cascade["pgd_linf"], alone["pgd_linf"])
    assert torch.equal(cascade["fgsm_linf"], alone["pgd_linf"] & alone["fgsm_linf"])
    assert torch.equal(cascade["worst"], alone["worst"])
    assert torch.equal(alone["worst"], alone["pgd_linf"] & alone["fgsm_linf"])
    assert alone["worst"].sum() < alone["clean"].sum()  # the attacks do something
    # nothing counts as robust that was misclassified clean
    assert not (alone["worst"] & ~alone["clean"]).any()


def test_images_not_alive_are_not_attacked(data):
    model, x, y = data
    calls = []
    attacker = Attacker(model, (1, 8, 8), 10)
    generate = attacker.generate
    attacker.generate = lambda xb, yb, spec: calls.append(len(xb)) or generate(xb, yb, spec)
    alive = torch.zeros(len(y), dtype=torch.bool)
    alive[:10] = True
    masks = robust_masks(model, attacker, x, y, [PGD], alive=alive)
    assert sum(calls) == int((alive & masks["clean"]).sum()) and not masks["worst"][10:].any()


def test_labels_and_default_suite():
    assert unique_labels([PGD, PGD.replace(steps=50), FGSM]) == ["pgd_linf", "pgd_linf_2", "fgsm_linf"]
    suite = reduced_autoattack(PGD, square_queries=300)
    assert [s.name for s in suite] == ["pgd", "apgd_ce", "apgd_dlr", "square"]
    assert all(s.eps == EPS and s.norm == "linf" for s in suite) and suite[-1].steps == 300


def test_gradient_masking_is_flagged(data):
    model, x, y = data
    masked = Quantized(model)
    attacker = Attacker(masked, (1, 8, 8), 10)
    square = AttackSpec(name="square", eps=EPS, step_size=0.025, steps=200)
    x, y = x[:64], y[:64]
    masks = robust_masks(masked, attacker, x, y, [PGD, square], cascade=False)
    robust = {k: float(v.float().mean()) for k, v in masks.items() if k != "clean"}
    warnings = masking_warnings(robust, "pgd_linf")
    assert robust["square_linf"] < robust["pgd_linf"] - 0.01
    assert warnings and "square_linf" in warnings[0]
    checks = honesty_checks(masked, attacker, x, y, PGD, square_queries=200)
    assert any("beats white-box" in w for w in checks["warnings"])
    # the same checks on the unmasked model: Square does not beat PGD
    plain = honesty_checks(model, Attacker(model, (1, 8, 8), 10), x, y, PGD, square_queries=200)
    assert not any("beats white-box" in w for w in plain["warnings"])


def test_masking_warnings_rules():
    assert masking_warnings({"pgd_linf": 0.40, "fgsm_linf": 0.45, "worst": 0.4}, "pgd_linf") == []
    assert "fgsm_linf (0.300) beats pgd_linf" in masking_warnings({"pgd_linf": 0.40, "fgsm_linf": 0.30},
                                                                  "pgd_linf")[0]
    collapsed = masking_warnings({"pgd_linf": 0.05}, "pgd_linf", best_first=0.40)
    assert collapsed and "catastrophic overfitting" in collapsed[0]
    assert masking_warnings({"pgd_linf": 0.35}, "pgd_linf", best_first=0.40) == []


def _watch_epoch(watch, metrics, epoch=0):
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=epoch,
                              callback_metrics={k: torch.tensor(v) for k, v in metrics.items()})
    logged = {}
    module = SimpleNamespace(val_attacks=[PGD, FGSM], log=lambda k, v, **_: logged.__setitem__(k, v))
    watch.on_validation_epoch_end(trainer, module)
    return logged


def test_run_watch_warns_on_masking_and_collapse(caplog):
    watch = RunWatch()
    with caplog.at_level(logging.WARNING, logger="sepnet.callbacks"):
        logged = _watch_epoch(watch, {"val/robust_acc/pgd_linf": 0.40, "val/robust_acc/fgsm_linf": 0.42,
                                      "val/robust_acc/worst": 0.38})
        assert not caplog.records and logged["val/robust_gap"] == pytest.approx(0.02)
        _watch_epoch(watch, {"val/robust_acc/pgd_linf": 0.06, "val/robust_acc/fgsm_linf": 0.02,
                             "val/robust_acc/worst": 0.01}, epoch=1)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "fgsm_linf (0.020) beats pgd_linf (0.060)" in text and "catastrophic overfitting" in text
    assert watch.state_dict()["best_first"] == pytest.approx(0.40)


def test_run_watch_warns_on_divergence(caplog):
    watch = RunWatch(divergence_factor=100)
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=0, global_step=0)
    with caplog.at_level(logging.WARNING, logger="sepnet.callbacks"):
        for loss in (2.0, 3.0, 150.0):
            watch.on_train_batch_end(trainer, None, torch.tensor(loss), None, 0)
        assert not caplog.records
        watch.on_train_batch_end(trainer, None, torch.tensor(250.0), None, 0)
        watch.on_train_batch_end(trainer, None, torch.tensor(float("nan")), None, 0)
    assert len(caplog.records) == 1 and "diverging loss: 250" in caplog.records[0].getMessage()


def test_run_watch_checks_the_loss_peak_at_logging_steps_and_epoch_end(caplog):
    """Between logging steps the loss peak stays on the device (no host sync a step); a spike
    between them is still warned, at the next logging step or the epoch's end."""
    watch = RunWatch(divergence_factor=100)
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=0, global_step=3, log_every_n_steps=50)
    with caplog.at_level(logging.WARNING, logger="sepnet.callbacks"):
        for batch_idx, loss in enumerate((2.0, 500.0, 3.0)):
            watch.on_train_batch_end(trainer, None, torch.tensor(loss), None, batch_idx)
        assert not caplog.records and watch._peak is not None  # not checked yet
        watch.on_train_epoch_end(trainer, None)
    assert len(caplog.records) == 1 and "diverging loss: 500 by step 3" in caplog.records[0].getMessage()
    fresh = RunWatch(divergence_factor=100)
    with caplog.at_level(logging.WARNING, logger="sepnet.callbacks"):
        fresh.on_train_batch_end(trainer, None, torch.tensor(float("nan")), None, 0)
        assert len(caplog.records) == 1  # the first loss, too, stays on the device until a check
        fresh.on_train_epoch_end(trainer, None)
    assert "diverging loss: nan" in caplog.records[-1].getMessage() and "first not finite" in caplog.records[-1].getMessage()
