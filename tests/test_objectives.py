"""Training objectives: every registered loss prepared once and called one way; no loss name
falls through to another's path."""

import math

import pytest
import torch
from torch import nn

from sepnet.attacks import Attacker
from sepnet.network import build_network
from sepnet.objectives import AdversarialTraining, Objective, build_objective, objectives

LIPMLP = {"backbone": "lipmlp", "head": "separable", "backbone_kwargs": {"hidden_shapes": [[4, 8, 8]]},
          "scale_inputs": False}


def _setup(loss: str, network: dict | None = None, **section):
    torch.manual_seed(0)
    net = build_network(10, (3, 8, 8), **(network or {"backbone": "mlp", "backbone_kwargs": {"hidden_shapes": [[4, 8, 8]]}}))
    config = AdversarialTraining(loss=loss, **section)
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    return net, build_objective(config, net, Attacker(net, (3, 8, 8), 10)), x, y


def test_every_objective_is_registered_and_the_section_refuses_others():
    assert objectives() == ["at", "lipschitz_margin", "none", "trades"]
    with pytest.raises(ValueError, match=r"adversarial.loss 'pgd_at': expected one of \['at', 'lipschitz_margin'"):
        AdversarialTraining(loss="pgd_at")


def test_lipschitz_margin_is_its_own_loss_not_clean_training():
    """The defect: called outside the LightningModule (as benchmarks/attacks.py does),
    `lipschitz_margin` silently trained on the clean cross-entropy. Its loss must be the margin
    loss: every wrong logit raised by sqrt(2) L eps before the cross-entropy."""
    net, objective, x, y = _setup("lipschitz_margin", LIPMLP, margin_eps=0.5, margin_temperature=1.0)
    out = objective(x, y)
    clean = nn.functional.cross_entropy(out.logits, y)
    shift = math.sqrt(2) * objective.bound * 0.5 * (1 - nn.functional.one_hot(y, 10).float())
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits + shift, y))
    assert out.loss > clean + 0.1
    assert objective.bound == pytest.approx(1.0, abs=1e-4)  # orthogonal layers, mean-only normalization


def test_each_objective_trains_on_what_it_names():
    net, objective, x, y = _setup("at", attack={"name": "fgsm", "eps": 0.1, "step_size": 0.1, "random_start": False})
    out = objective(x, y)
    assert not torch.equal(out.inputs, x) and (out.inputs - x).abs().max() <= 0.1 + 1e-6
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(net(out.inputs), y))
    _, clean, _, _ = _setup("none")
    out = clean(x, y)
    assert torch.equal(out.inputs, x) and out.logged == {}
    _, trades, _, _ = _setup("trades", attack={"name": "pgd", "eps": 0.1, "step_size": 0.05, "steps": 2})
    out = trades(x, y)
    assert set(out.logged) == {"train/loss_trades_kl"} and out.loss > nn.functional.cross_entropy(out.logits, y)


def test_an_objective_restricts_its_attacks_and_a_new_one_registers_itself():
    with pytest.raises(ValueError, match="cannot serve loss 'trades'"):
        AdversarialTraining(loss="trades", attack={"name": "nfgsm"})

    class Doubled(Objective, name="doubled_test_objective"):
        def __call__(self, x, y):
            logits = self.net(x)
            return (logits, 2 * nn.functional.cross_entropy(logits, y), {}, x)

    try:
        assert "doubled_test_objective" in objectives()
        _, objective, x, y = _setup("doubled_test_objective")
        assert isinstance(objective, Doubled)
    finally:
        del Objective.registry["doubled_test_objective"]
