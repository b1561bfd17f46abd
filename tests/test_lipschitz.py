"""Certified robustness: orthogonal separable layers, the network's Lipschitz bound, the
certificate and its soundness checks (which fail loudly), the Lipschitz-margin loss."""

import math

import lightning as L
import pytest
import torch
from torch import nn

from sepnet.activations import MaxMin
from sepnet.attacks import Attacker, AttackSpec
from sepnet.data import DigitsDataModule
from sepnet.layers import SeparableLinear
from sepnet.certificate import certified_masks, empirical_lipschitz, layer_norm_check, soundness_checks
from sepnet.lipschitz import CertificateError, lipschitz_bound, lipschitz_margin_loss
from sepnet.module import ImageClassifier
from sepnet.network import build_network


@pytest.mark.parametrize("in_shape,out_shape,rank", [
    ((4, 6), (4, 6), 1), ((4, 6), (3, 5), 1), ((2, 3, 4), (4, 3, 2), 1), ((4, 6), (3, 5), 2), ((2, 3, 4), (4, 3, 2), 3)])
def test_orthogonal_layer_singular_values(in_shape, out_shape, rank):
    """R = 1: every non-zero singular value within 1e-5 of 1 (a Kronecker product of
    (semi-)orthogonal factors), square or not. R > 1: the largest one is 1 (the layer is
    divided by its exact spectral norm), not all of them: not an isometry."""
    torch.manual_seed(0)
    layer = SeparableLinear(in_shape, out_shape, rank=rank, orthogonal=True)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
    for _ in range(3):  # a few steps: the parametrization keeps the factors orthogonal
        opt.zero_grad()
        layer(torch.randn(8, *in_shape)).square().sum().backward()
        opt.step()
    s = torch.linalg.svdvals(layer.implied_weight().detach().double())
    structural = math.prod(min(o, i) for o, i in zip(out_shape, in_shape))
    if rank == 1:
        assert (s[:structural] - 1).abs().max() < 1e-5
    else:
        assert abs(float(s[0]) - 1) < 1e-5 and float(s[-1]) < 1 - 1e-3
    assert abs(layer.lipschitz_constant() - 1) < 1e-5
    x = torch.randn(5, *in_shape)
    expected = x.reshape(5, -1) @ layer.implied_weight().T + layer.bias.reshape(-1)
    torch.testing.assert_close(layer(x).reshape(5, -1), expected, rtol=1e-5, atol=1e-5)


def test_maxmin_is_one_lipschitz_and_norm_preserving():
    x = torch.randn(10, 6, 3)
    y = MaxMin()(x)
    torch.testing.assert_close(y.norm(), x.norm())
    torch.testing.assert_close(y[:, :3], torch.maximum(x[:, :3], x[:, 3:]))
    with pytest.raises(ValueError, match="even size along dim 1"):
        MaxMin()(torch.randn(2, 5))


def _lipmlp(**kwargs):
    torch.manual_seed(0)
    return build_network(10, (1, 8, 8), mean=(0.3,), std=(0.4,), backbone="lipmlp",
                         backbone_kwargs={"hidden_shapes": [[16, 8, 8], [16, 8, 8]]}, **kwargs)


def test_the_bound_composes_the_layers_and_the_normalization_exactly():
    net = _lipmlp()
    bound = lipschitz_bound(net)
    assert bound.value == pytest.approx(1 / 0.4, rel=1e-5) and bound.fixed
    assert "normalize 1 / min(std) 2.5" in bound.describe()
    x = torch.rand(32, 1, 8, 8)
    assert empirical_lipschitz(net, x) <= bound.value * (1 + 1e-4)
    dense = build_network(10, (1, 8, 8), mean=(0.3,), std=(0.4,), backbone="mlp",
                          backbone_kwargs={"hidden_shapes": [[4, 8, 8]], "dense": True}, head="dense")
    linears = [m for m in dense.modules() if isinstance(m, nn.Linear)]
    expected = math.prod(float(torch.linalg.matrix_norm(m.weight.detach(), ord=2)) for m in linears) / 0.4
    bound = lipschitz_bound(dense)  # dense layers count by their exact norms, which training changes
    assert bound.value == pytest.approx(expected, rel=1e-5) and not bound.fixed
    with pytest.raises(ValueError, match=r"no Lipschitz bound for backbone.0 \(SeparableLinear\)"):
        lipschitz_bound(build_network(10, (1, 8, 8), backbone="mlp"))  # not orthogonal: no certificate


def _trained_lipmlp(epochs=6):
    torch.manual_seed(0)
    model = ImageClassifier(num_classes=10, image_shape=(1, 8, 8), mean=(0.3,), std=(0.4,),
                            network={"backbone": "lipmlp", "backbone_kwargs": {"hidden_shapes": [[16, 8, 8], [16, 8, 8]]}},
                            adversarial={"loss": "lipschitz_margin", "margin_eps": 0.1},
                            optimization={"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.0},
                            validation={"batches": 0}, certificate={"radii": [0.05, 0.1]})
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0)
    dm = DigitsDataModule(batch_size=64)
    trainer.fit(model, dm)
    dm.setup()
    x = torch.stack([dm.test_set[i][0] for i in range(len(dm.test_set))])
    y = torch.tensor([int(dm.test_set[i][1]) for i in range(len(dm.test_set))])
    return model.eval(), x, y


@pytest.mark.slow
def test_certified_images_survive_strong_l2_attacks_and_the_checks_pass():
    model, x, y = _trained_lipmlp()
    bound = lipschitz_bound(model.net)
    masks = certified_masks(model.net, x, y, [0.05, 0.1], bound.value)
    assert masks[0.05].float().mean() > 0.3 and masks[0.1].sum() <= masks[0.05].sum()
    attacker = Attacker(model.net, (1, 8, 8), 10)
    for name in ("pgd", "apgd_ce"):  # strong: many steps, restarts
        spec = AttackSpec(name=name, norm="l2", eps=0.1, step_size=0.02, steps=100, restarts=3)
        adv = attacker.generate(x[masks[0.1]], y[masks[0.1]], spec)
        assert ((adv - x[masks[0.1]]).flatten(1).norm(dim=1) <= 0.1 + 1e-5).all()
        assert (model.net(adv).argmax(-1) == y[masks[0.1]]).all(), name
    report = soundness_checks(model.net, attacker, x, y, [0.05, 0.1], bound, attack_steps=20)
    assert report["empirical_lipschitz_lower_bound"] <= bound.value
    assert all(r["spectral_norm"] <= 1 + 1e-4 for r in report["layer_norms"])
    assert report["attacks_at_radius"]["0.1"]["certified"] == int(masks[0.1].sum())


def test_a_layer_that_is_not_lipschitz_makes_the_checks_fail(monkeypatch):
    import sepnet.certificate as certificate

    model, x, y = _trained_lipmlp(epochs=2)
    layer = model.net.backbone[2]
    nn.utils.parametrize.remove_parametrizations(layer.factors[0], "1")  # no longer kept orthogonal ...
    with torch.no_grad():
        layer.factors[0][1].mul_(3.0)  # ... and three times too large, still flagged orthogonal
    bound = lipschitz_bound(model.net)  # measured: the bound itself stays honest
    assert bound.value == pytest.approx(3 / 0.4, rel=1e-3)
    with pytest.raises(CertificateError, match=r"layer backbone.2: spectral norm 3.0"):
        layer_norm_check(model.net, x)
    claimed = type(bound)(1 / 0.4, bound.factors)  # a certificate that trusted the flag instead ...
    monkeypatch.setattr(certificate, "layer_norm_check", lambda net, x: [])  # ... and skipped the norm check
    with pytest.raises(CertificateError, match="exceeds the claimed bound"):  # the empirical check catches it
        soundness_checks(model.net, Attacker(model.net, (1, 8, 8), 10), x, y, [0.1], claimed)


def test_the_margin_loss_shifts_the_wrong_logits_and_needs_a_fixed_bound():
    logits, y = torch.zeros(2, 3), torch.tensor([0, 2])
    loss = lipschitz_margin_loss(logits, y, eps=0.5, bound=2.0)
    shift = math.sqrt(2) * 2.0 * 0.5
    expected = -math.log(1 / (1 + 2 * math.exp(shift)))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="lipschitz_margin needs a network with a Lipschitz bound"):
        ImageClassifier(network={"backbone": "mlp"}, image_shape=(1, 8, 8), mean=(0.3,), std=(0.4,),
                        adversarial={"loss": "lipschitz_margin"})


@pytest.mark.parametrize("in_modes,out_modes,rank,isometry", [
    ((2, 2), (4, 4), 2, True),  # every core maps r m -> n r' with r m <= n r': W^T W = I
    ((8, 4, 4), (2, 4, 2), 3, False),  # shrinking: W W^T = I (all 16 singular values 1)
    ((4, 4, 4), (4, 4, 4), 4, False),  # square, ranks > 1: the last core shrinks, norm < 1
])
def test_the_orthogonal_tt_layer_has_norm_at_most_one_and_trains(in_modes, out_modes, rank, isometry):
    """TTLinear(orthogonal=True): after training steps every singular value of the implied
    matrix is at most 1 + 1e-5 and the bound (product of the cores' norms) is 1 and above the
    exact norm; an isometry where every core is tall, all ones for a shrinking layer whose
    cores are wide; the structured forward equals the implied matrix."""
    from sepnet.compress.tt import TTLinear

    torch.manual_seed(0)
    layer = TTLinear(in_modes, out_modes, rank, orthogonal=True)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        layer.implied_path = "never"
        layer(torch.randn(8, layer.in_features)).square().sum().backward()
        opt.step()
    s = torch.linalg.svdvals(layer.implied_weight().detach().double())
    assert float(s[0]) <= 1 + 1e-5 and abs(layer.lipschitz_constant() - 1) < 1e-5
    assert layer.lipschitz_constant() >= float(s[0]) - 1e-6
    if isometry or layer.out_features < layer.in_features:
        assert (s[:min(layer.in_features, layer.out_features)] - 1).abs().max() < 1e-5
    if (in_modes, out_modes) == ((4, 4, 4), (4, 4, 4)):
        assert float(s[0]) < 1 - 1e-3  # not an isometry: said in the module docstring
    x = torch.randn(5, layer.in_features)
    torch.testing.assert_close(layer(x), x @ layer.implied_weight().T + layer.bias, rtol=1e-5, atol=1e-5)


def test_a_network_with_orthogonal_tt_layers_is_certified_and_checked(monkeypatch):
    """The tt compressor with `orthogonal: true` on a lipmlp's plain dense classifier (which alone
    would make the bound its trained norm): the network's bound composes the TT layer's, every
    layer passes the norm check by the SVD of the implied matrix; cores that are not orthogonal
    fail it loudly; TT-SVD init with orthogonal is refused."""
    from sepnet.compress import CompressionSpec, compress_
    from sepnet.compress.tt import TTLinear

    torch.manual_seed(0)
    net = build_network(10, (3, 8, 8), backbone="lipmlp", head="dense", scale_inputs=False,
                        backbone_kwargs={"hidden_shapes": [[4, 4, 4]]})
    compress_(net, [CompressionSpec(method="tt", targets=["head.layers.1"],
                                    options={"modes": 2, "rank": 2, "orthogonal": True})])
    (tt,) = [m for m in net.modules() if isinstance(m, TTLinear)]
    assert tt.orthogonal
    bound = lipschitz_bound(net)
    assert bound.value == pytest.approx(1.0, abs=1e-5) and "orthogonal TT" in bound.describe()
    x = torch.rand(64, 3, 8, 8)
    rows = {r["layer"]: r for r in layer_norm_check(net, x)}
    assert rows["head.layers.1"]["how"] == "SVD of the layer as applied (exact)"
    assert empirical_lipschitz(net, x) <= bound.value
    cores = TTLinear.tt_cores
    monkeypatch.setattr(TTLinear, "tt_cores", lambda self: [1.5 * c for c in cores(self)])
    with pytest.raises(CertificateError, match=r"layer head.layers.1: spectral norm"):
        layer_norm_check(net, x)
    with pytest.raises(ValueError, match="expected init 'random' with orthogonal"):
        compress_(build_network(10, (3, 8, 8), backbone="lipmlp", head="dense",
                                backbone_kwargs={"hidden_shapes": [[4, 4, 4]]}),
                  [CompressionSpec(method="tt", targets=["head.layers.1"],
                                   options={"orthogonal": True, "init": "from_linear"})])


def _normalized_lipconvnet():
    return ImageClassifier(num_classes=10, image_shape=(3, 8, 8), mean=(0.5,) * 3, std=(0.25,) * 3,
                           network={"backbone": "lipconvnet", "backbone_kwargs": {"widths": [8, 16]},
                                    "head": "dense", "head_kwargs": {"orthogonal": True, "normalize_last": True}},
                           adversarial={"loss": "lipschitz_margin", "margin_eps": 0.1},
                           optimization={"optimizer": "adamw", "lr": 0.05, "weight_decay": 0.0})


def test_last_layer_normalization_is_measured_and_certified_by_its_row_distances():
    """Singla et al.'s last-layer normalization: the classifier's rows each of unit norm, not
    orthonormal. Its bound is its measured norm (not fixed), the pairwise certificate reads the
    rows as applied, and the margin loss adds eps L_g ||w_y - w_j|| to logit j, differentiated
    through: a step moves the classifier's raw weight and its rows stay unit."""
    from sepnet.lipschitz import pairwise_bound

    torch.manual_seed(0)
    model = _normalized_lipconvnet()
    last = model.net.head.layers[-1]
    rows = last.weight.detach()
    assert torch.allclose(rows.norm(dim=1), torch.ones(10), atol=1e-6)
    bound = lipschitz_bound(model.net)
    assert not bound.fixed and bound.factors[-1].rule == "RowNormalized linear, spectral norm"
    assert bound.factors[-1].constant == pytest.approx(float(torch.linalg.matrix_norm(rows.double(), 2)))
    pairwise = pairwise_bound(model.net)
    assert pairwise.feature == pytest.approx(bound.value / bound.factors[-1].constant)
    torch.testing.assert_close(pairwise.distances, torch.cdist(rows.double(), rows.double()))
    x = torch.rand(64, 3, 8, 8)
    report = soundness_checks(model.net.eval(), Attacker(model.net, (3, 8, 8), 10), x, model.net(x).argmax(-1).detach(),
                              [0.05], bound, attack_steps=10, pairwise=pairwise)  # the three checks pass for it
    assert report["certificate"] == "pairwise" and report["layer_norms"][-1]["spectral_norm"] > 1
    model.net.train()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    out = model.objective(x, y)
    logits = out.logits.detach()
    shift = 0.1 * pairwise.feature * pairwise.distances[y].float()
    expected = nn.functional.cross_entropy(logits + shift, y)
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    before = last.parametrizations.weight.original.detach().clone()
    out.loss.backward()
    assert last.parametrizations.weight.original.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    assert not torch.equal(before, last.parametrizations.weight.original)
    assert torch.allclose(last.weight.norm(dim=1), torch.ones(10), atol=1e-6)


def test_the_margin_loss_refuses_a_changing_bound_before_the_last_layer():
    """Only the final linear layer may change its bound under the margin loss: a dense hidden
    layer before a normalized classifier is refused by name."""
    with pytest.raises(ValueError, match="lipschitz_margin: the network's Lipschitz bound changes"):
        ImageClassifier(num_classes=10, image_shape=(3, 8, 8), mean=(0.5,) * 3, std=(0.25,) * 3,
                        network={"backbone": "lipconvnet", "backbone_kwargs": {"widths": [8, 16]}, "head": "dense",
                                 "head_kwargs": {"hidden": [32], "orthogonal": False, "normalize_last": True}},
                        adversarial={"loss": "lipschitz_margin", "margin_eps": 0.1})


def test_orthonormal_rows_give_the_same_margin_loss_either_way():
    """For orthonormal rows every ||w_y - w_j|| is sqrt(2): the pairwise shift equals the
    global sqrt(2) L eps one."""
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    distances = math.sqrt(2) * (1 - torch.eye(4))
    torch.testing.assert_close(lipschitz_margin_loss(logits, y, 0.3, 1.5, 0.5, distances),
                               lipschitz_margin_loss(logits, y, 0.3, 1.5, 0.5))
