import lightning as L
import pytest
import torch
from conftest import fit_briefly
from torch import nn

from sepnet.attacks import Attacker, AttackSpec, project
from sepnet.data import DigitsDataModule
from sepnet.module import ImageClassifier

EPS = 0.1


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    x = torch.stack([dm.test_set[i][0] for i in range(len(dm.test_set))])
    y = torch.stack([dm.test_set[i][1] for i in range(len(dm.test_set))])
    return dm, x, y


@pytest.fixture(scope="module")
def trained(digits):
    """A small CNN with BatchNorm trained on the digits for a few hundred steps."""
    dm, _, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 64, 10))
    return fit_briefly(model, dm.train_dataloader(), epochs=6, lr=3e-3)


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def plain_pgd(model, x, y, eps, step, steps):
    """Independent reference: sign-gradient PGD from x, projected to the Linf ball and [0, 1]."""
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = (x + (adv.detach() + step * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return adv


SPECS = {
    "fgsm": dict(step_size=EPS),
    "pgd": dict(steps=5),
    "apgd_ce": dict(steps=5),
    "apgd_dlr": dict(steps=5),
    "square": dict(steps=50),
    "cw_linf": dict(steps=5, step_size=0.01),
    "deepfool": dict(steps=5),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_attack_stays_in_ball_and_leaves_no_trace(name, trained, digits):
    _, x, y = digits
    x, y = x[:48], y[:48]
    model = trained.train()  # in train mode on purpose: the attack must not change that
    grads = []
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    stats = [b.clone() for b in model.buffers()]
    spec = AttackSpec(name=name, eps=EPS, **{"step_size": 0.025, **SPECS[name]})
    adv = Attacker(model, (1, 8, 8), 10).generate(x, y, spec)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert (adv - x).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert model.training
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(s, b) for s, b in zip(stats, model.buffers()))
    model.eval()
    model.zero_grad(set_to_none=True)
    assert _acc(model, adv, y) <= _acc(model, x, y) + 1e-6


@pytest.mark.parametrize("name", list(SPECS))
def test_attacks_run_under_bf16_autocast(name, digits):
    # bf16-mixed training and testing: a final nn.Linear gives bf16 logits, which ART turns
    # into numpy arrays (its APGD builds its own estimators from the model) -- numpy has no bf16
    _, x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with torch.autocast("cpu", torch.bfloat16):
        assert model(x[:2]).dtype == torch.bfloat16
        spec = AttackSpec(name=name, eps=EPS, **{"step_size": 0.025, **SPECS[name]})
        adv = Attacker(model, (1, 8, 8), 10).generate(x[:16], y[:16], spec)
    assert adv.dtype == x.dtype and (adv - x[:16]).abs().max() <= EPS + 1e-6


@pytest.mark.parametrize("name", ["autoattack", "autoattack_standard"])
def test_autoattack_variants_run(name, trained, digits):
    # a large eps: APGD-CE breaks every image, so the later attacks (Square's 5,000 queries x 5
    # restarts) have nothing left to attack; at eps 0.1 one robust image costs minutes
    _, x, y = digits
    x, y, eps = x[:4], y[:4], 0.3
    adv = Attacker(trained, (1, 8, 8), 10).generate(x, y, AttackSpec(name=name, eps=eps, step_size=0.05))
    assert (adv - x).abs().max() <= eps + 1e-6
    assert _acc(trained, adv, y) < _acc(trained, x, y)


def test_pgd_agrees_with_plain_pytorch_and_stock_art(trained, digits):
    _, x, y = digits
    spec = AttackSpec(name="pgd", eps=EPS, step_size=0.025, steps=10, random_start=False)
    ours = _acc(trained, Attacker(trained, (1, 8, 8), 10).generate(x, y, spec), y)
    stock = _acc(trained, Attacker(trained, (1, 8, 8), 10, fast=False).generate(x, y, spec), y)
    reference = _acc(trained, plain_pgd(trained, x, y, EPS, 0.025, 10), y)
    clean = _acc(trained, x, y)
    assert clean > 0.85 and ours < clean - 0.1  # the attack does something
    assert abs(ours - reference) <= 0.01
    assert abs(ours - stock) <= 0.005


def test_l2_pgd_respects_the_l2_ball(trained, digits):
    _, x, y = digits
    spec = AttackSpec(name="pgd", norm="l2", eps=0.5, step_size=0.1, steps=5)
    adv = Attacker(trained, (1, 8, 8), 10).generate(x[:32], y[:32], spec)
    assert ((adv - x[:32]).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()


def test_soft_target_attack_increases_kl(trained, digits):
    _, x, y = digits
    x, y = x[:64], y[:64]
    with torch.no_grad():
        p = trained(x).softmax(-1)
    spec = AttackSpec(name="pgd", eps=EPS, step_size=0.025, steps=5)
    adv = Attacker(trained, (1, 8, 8), 10).generate(x, y, spec, soft_targets=p)
    with torch.no_grad():
        kl = nn.functional.kl_div(trained(adv).log_softmax(-1), p, reduction="batchmean")
        noise = project(x + EPS * torch.randn_like(x).sign(), x, EPS, "linf")
        kl_noise = nn.functional.kl_div(trained(noise).log_softmax(-1), p, reduction="batchmean")
    assert kl > 2 * kl_noise


def test_project_linf_and_l2():
    x = torch.full((2, 1, 2, 2), 0.5)
    far = x + torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
    assert torch.allclose(project(far, x, 0.1, "linf"), x + torch.tensor([0.1, -0.1]).view(2, 1, 1, 1))
    out = project(x + 0.3, x, 0.2, "l2")
    assert (out - x).flatten(1).norm(dim=1).allclose(torch.tensor(0.2))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(eps=-0.1), "eps must be a finite number >= 0, got -0.1"),
        (dict(eps=float("nan")), "eps must be a finite number >= 0, got nan"),
        (dict(norm="l1"), "unknown attack norm 'l1'"),
        (dict(name="fab"), "unknown attack 'fab'"),
        (dict(steps=0), "steps must be >= 1, got 0"),
        (dict(restarts=0), "restarts must be >= 1, got 0"),
        (dict(step_size=0), "step_size must be > 0, got 0"),
        (dict(name="cw_linf", norm="l2"), "cw_linf is an Linf attack"),
        (dict(eps=8), "attack eps 8 is above 1: eps is in pixel units"),
    ],
)
def test_invalid_attack_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttackSpec(**kwargs)


def _train(loss: str, attack: str, dm, epochs=15):
    torch.manual_seed(0)
    adversarial = {"loss": loss, "attack": {"name": attack, "eps": EPS, "step_size": 0.025, "steps": 5}}
    model = ImageClassifier(num_classes=10, image_shape=(1, 8, 8), mean=(0.3,), std=(0.38,),
                            network={"backbone": "mlp", "backbone_kwargs": {"hidden_shapes": [[4, 8, 8]]}},
                            optimization={"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0},
                            adversarial=adversarial,
                            validation={"attacks": [{"eps": EPS, "step_size": 0.025, "steps": 5}], "batches": 0})
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                        limit_val_batches=0, accumulate_grad_batches=2)
    trainer.fit(model, dm)
    return model.net.eval()


def test_adversarial_training_increases_robust_accuracy(digits):
    dm, x, y = digits
    spec = AttackSpec(name="pgd", eps=EPS, step_size=0.025, steps=10)
    robust = {}
    for mode, loss, attack in (("none", "none", "pgd"), ("pgd", "at", "pgd"), ("trades", "trades", "pgd"),
                               ("nfgsm", "at", "nfgsm")):
        net = _train(loss, attack, dm)
        robust[mode] = _acc(net, Attacker(net, (1, 8, 8), 10).generate(x, y, spec), y)
    assert robust["pgd"] > robust["none"] + 0.05, robust
    assert robust["trades"] > robust["none"] + 0.05, robust
    assert robust["nfgsm"] > robust["none"] + 0.05, robust


def test_nfgsm_is_a_noisy_unclipped_step_and_training_only(trained, digits):
    _, x, y = digits
    spec = AttackSpec(name="nfgsm", eps=EPS, step_size=EPS)
    torch.manual_seed(0)
    adv = Attacker(trained, (1, 8, 8), 10).generate(x, y, spec)
    delta = (adv - x).abs()
    assert adv.min() >= 0 and adv.max() <= 1
    assert delta.max() <= 3 * EPS + 1e-6 and delta.max() > 1.5 * EPS  # noise 2 eps + step eps
    assert _acc(trained, adv, y) < _acc(trained, x, y) - 0.1
    with pytest.raises(ValueError, match="nfgsm is a training attack"):
        ImageClassifier(validation={"attacks": [{"name": "nfgsm"}]})
    with pytest.raises(ValueError, match="nfgsm is an Linf attack"):
        AttackSpec(name="nfgsm", norm="l2")


def test_fgsm_takes_its_step_size_and_defaults_to_eps():
    """Fast FGSM (random start, step ~1.25 eps) must step what it is told: ART's own
    FastGradientMethod steps eps whatever its eps_step, which made every fast-FGSM run step eps.
    On a linear model every input coordinate has a non-zero gradient, so after a random start
    u ~ U(-eps, eps) and a step a * sign(g), a coordinate ends on the ball's boundary with
    probability min(1, 1/2 + (a - eps) / (2 eps)): 0.5 at a = eps, 0.625 at 1.25 eps, 1 at 2 eps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    attacker = Attacker(net, (3, 8, 8), 10)
    x, y = torch.rand(256, 3, 8, 8) * 0.6 + 0.2, torch.randint(0, 10, (256,))  # away from 0 and 1
    for ratio, expected in ((1.0, 0.5), (1.25, 0.625), (2.0, 1.0)):
        spec = AttackSpec(name="fgsm", eps=EPS, step_size=ratio * EPS, random_start=True)
        delta = (attacker.generate(x, y, spec) - x).abs()
        assert delta.max() <= EPS + 1e-6
        assert abs((delta > EPS - 1e-6).float().mean().item() - expected) < 0.02, ratio
    # without a random start: exactly x + step * sign(grad), clipped
    spec = AttackSpec(name="fgsm", eps=EPS, random_start=False)
    assert spec.step_size == EPS and AttackSpec(name="pgd", eps=EPS).step_size == 2 / 255
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(net(xr), y, reduction="sum"), xr)
    torch.testing.assert_close(attacker.generate(x, y, spec), (x + EPS * grad.sign()).clamp(0, 1))


def test_one_registry_entry_says_how_an_attack_runs_and_where_it_may_be_used():
    from sepnet.attacks import ATTACKS
    from sepnet.evaluation import evaluation_attacks

    assert all((entry.build is None) != (entry.craft is None) for entry in ATTACKS.values())
    assert {name for name, entry in ATTACKS.items() if entry.training_only} == {"nfgsm"}
    assert {name for name, entry in ATTACKS.items() if entry.min_classes > 2} == {
        "apgd_dlr", "autoattack", "autoattack_standard"}
    assert AttackSpec(name="apgd_dlr").entry is ATTACKS["apgd_dlr"]
    with pytest.raises(ValueError, match="report.attacks: nfgsm is a training attack"):
        evaluation_attacks([{"name": "nfgsm"}], "report.attacks")
