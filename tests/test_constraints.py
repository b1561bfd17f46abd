import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sepnet.constraints import condition_penalty, constraint_penalties, proximal_step_, sparsity_penalty
from sepnet.layers import SeparableLinear
from sepnet.measures import (condition_number, fc_parameter_counts, layer_condition_number, parameter_counts,
                             separable_layers, sparsity)

FORMS = ["amgm", "logdet", "logcond"]


def _adversarial_factors():
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    singular = base.clone()
    singular[3] = singular[0]
    rank_one = torch.outer(torch.randn(4), torch.randn(6))
    return {
        "zero": torch.zeros(4, 6),
        "singular": singular,
        "rank_one": rank_one,
        "tiny": base * 1e-20,
        "huge": base * 1e20,
        "orthogonal": torch.linalg.qr(torch.randn(6, 4))[0].T.contiguous(),
    }


def test_condition_number_of_kron_is_product():
    torch.manual_seed(0)
    factors = [torch.randn(3, 3, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64),
               torch.randn(2, 2, dtype=torch.float64)]
    kron = torch.kron(torch.kron(factors[0], factors[1]), factors[2])
    expected = math.prod(condition_number(f) for f in factors)
    assert condition_number(kron) == pytest.approx(expected, rel=1e-9)
    layer = SeparableLinear((3, 4, 2), (3, 4, 2)).double()
    with torch.no_grad():
        for p, f in zip(layer.factors[0], factors):
            p.copy_(f)
    result = layer_condition_number(layer)
    assert not result.is_bound and result.value == pytest.approx(expected, rel=1e-9)


def test_condition_number_rank_deficient_is_inf_never_nan():
    f = _adversarial_factors()
    assert condition_number(f["zero"]) == math.inf
    assert condition_number(f["singular"]) == math.inf
    assert condition_number(f["rank_one"]) == math.inf
    assert math.isfinite(condition_number(f["tiny"]))
    assert math.isfinite(condition_number(f["huge"]))
    assert condition_number(f["orthogonal"]) == pytest.approx(1.0, rel=1e-5)


def test_layer_condition_dense_and_bound_for_rank_two():
    torch.manual_seed(0)
    small = SeparableLinear((3, 4), (3, 4), rank=2).double()
    exact = layer_condition_number(small)
    s = torch.linalg.svdvals(small.implied_weight().detach())
    assert not exact.is_bound and exact.value == pytest.approx((s[0] / s[-1]).item(), rel=1e-9)
    big = SeparableLinear((64, 64, 2), (64, 64, 2), rank=2)  # 2^26 entries: bound path
    bound = layer_condition_number(big)
    assert bound.is_bound and bound.value > 0
    small_bound = layer_condition_number(small, max_dense_elements=0)  # the bound is an upper bound
    assert small_bound.is_bound and small_bound.value >= exact.value * (1 - 1e-9)
    medium = SeparableLinear((8, 8), (8, 8), rank=2)  # 4,096 entries, over a limit of 4,000
    assert layer_condition_number(medium, max_dense_elements=4000).is_bound
    assert not layer_condition_number(medium, max_dense_elements=4096).is_bound


def test_layer_condition_gram_route_matches_svd():
    torch.manual_seed(0)
    layer = SeparableLinear((16, 32), (16, 40), rank=3)  # 640x512: sides >= 256, Gram route
    s = torch.linalg.svdvals(layer.implied_weight().detach().double())
    result = layer_condition_number(layer)
    assert not result.is_bound and result.value == pytest.approx((s[0] / s[-1]).item(), rel=1e-6)
    with torch.no_grad():  # a rank-deficient layer: one input column of every term is zero
        for term in layer.factors:
            term[1][:, 0] = 0
    singular = layer_condition_number(layer)
    assert singular.value == math.inf and not singular.is_bound


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(_adversarial_factors()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_condition_penalty_finite_on_adversarial_factors(form, name, dtype):
    u = _adversarial_factors()[name].to(dtype).requires_grad_()
    value = condition_penalty(u, form)
    value.backward()
    assert torch.isfinite(value) and value.dtype == torch.float32
    assert torch.isfinite(u.grad).all()


@pytest.mark.parametrize("form", FORMS)
def test_condition_penalty_under_autocast(form):
    u = torch.randn(8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = condition_penalty(u, form)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(u.grad).all()
    assert value.item() == pytest.approx(condition_penalty(u.detach(), form).item(), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 6),
    log_scale=st.floats(-30, 30),
    seed=st.integers(0, 10_000),
    form=st.sampled_from(FORMS),
    zero_rows=st.integers(0, 6),
)
def test_condition_penalty_finite_property(rows, cols, log_scale, seed, form, zero_rows):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, cols, generator=g) * 10.0**log_scale
    u[: min(zero_rows, rows)] = 0
    u.requires_grad_()
    value = condition_penalty(u, form)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(u.grad).all()


def test_amgm_is_zero_exactly_at_kappa_one_and_scale_invariant():
    q = torch.linalg.qr(torch.randn(8, 5, dtype=torch.float64))[0]
    assert condition_penalty(q, "amgm").item() == pytest.approx(0.0, abs=1e-5)
    u = torch.randn(5, 8, dtype=torch.float64)
    v = condition_penalty(u, "amgm").item()
    assert v > 0.1
    assert condition_penalty(1e6 * u, "amgm").item() == pytest.approx(v, rel=1e-6)


def _descend(form, steps=200):
    torch.manual_seed(0)
    u = torch.randn(6, 10, requires_grad=True)
    start = (condition_number(u), condition_penalty(u, form).item())
    opt = torch.optim.Adam([u], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        condition_penalty(u, form).backward()
        opt.step()
    return start, (condition_number(u), condition_penalty(u, form).item())


@pytest.mark.parametrize("form", ["amgm", "logcond"])
def test_kappa_penalties_decrease_kappa_under_gradient_descent(form):
    (kappa0, _), (kappa1, _) = _descend(form)
    assert kappa1 < 0.5 * kappa0


def test_logdet_form_reaches_its_target_without_fixing_kappa():
    # det(G/q) = 1 can hold at any kappa: the authors' form fixes the volume, not the shape.
    (kappa0, pen0), (kappa1, pen1) = _descend("logdet")
    assert pen1 < 1e-3 * pen0
    assert kappa1 > 0.5 * kappa0


def test_sparsity_penalties_and_unknown_forms():
    u = torch.tensor([[0.0, -2.0], [0.5, 1.0]])
    assert sparsity_penalty(u, "l1").item() == pytest.approx(3.5)
    a = 1.0
    tl1 = sum((a + 1) * abs(x) / (a + abs(x)) for x in [0.0, 2.0, 0.5, 1.0])
    assert sparsity_penalty(u, "tl1", a).item() == pytest.approx(tl1)
    with pytest.raises(ValueError, match="'l3'"):
        sparsity_penalty(u, "l3")
    with pytest.raises(ValueError, match="'svd'"):
        condition_penalty(u, "svd")
    with pytest.raises(ValueError, match="a must be > 0"):
        sparsity_penalty(u, "tl1", a=0)


def test_proximal_step_makes_exact_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(SeparableLinear((8, 4), (4, 4)), nn.ReLU())
    before = [f.detach().clone() for f in model[0].factors[0]]
    proximal_step_(model, step=0.1, form="l1")
    for old, new in zip(before, model[0].factors[0]):
        expected = old.sign() * (old.abs() - 0.1).clamp_min(0)
        torch.testing.assert_close(new.detach(), expected)
    stats = sparsity(model[0].factors[0], threshold=0.0)
    assert stats["zeros"] == sum(int((b.abs() <= 0.1).sum()) for b in before) > 0
    proximal_step_(model, step=0.05, form="tl1", a=1.0)
    with pytest.raises(ValueError, match="proximal step must be >= 0"):
        proximal_step_(model, step=-1)


def test_sparsity_counts():
    t = torch.tensor([0.0, 1e-4, -0.5, 0.0])
    s = sparsity([t], threshold=1e-3)
    assert (s["numel"], s["zeros"], s["near_zero"]) == (4, 2, 3)
    assert s["zero_fraction"] == 0.5


def test_parameter_counts_whole_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(0),
                          SeparableLinear((4, 2, 2), (2, 2, 2)))
    sep = model[3]
    with torch.no_grad():
        sep.factors[0][0][0].zero_()
    counts = parameter_counts(model)
    conv_bn = 3 * 4 * 9 + 4 + 4 + 4
    assert counts.stored == conv_bn + (2 * 4 + 2 * 2 + 2 * 2) + 8
    assert counts.dense == conv_bn + 16 * 8 + 8
    assert counts.nonzero == counts.stored - 4 - int((model[1].bias == 0).sum())
    assert counts.compression == pytest.approx(counts.dense / counts.stored)
    fc = fc_parameter_counts(model)
    assert (fc.stored, fc.dense) == (2 * 4 + 2 * 2 + 2 * 2 + 8, 16 * 8 + 8)


def test_constraint_penalties_sum_over_layers():
    torch.manual_seed(0)
    model = nn.Sequential(SeparableLinear((4, 4), (2, 8), rank=2), SeparableLinear((2, 8), (3, 3)))
    out = constraint_penalties(model, condition="amgm", sparsity_form="l1")
    factors = [f for layer in model for term in layer.factors for f in term]
    assert out["cond"].item() == pytest.approx(sum(condition_penalty(f).item() for f in factors), rel=1e-5)
    assert out["sparsity"].item() == pytest.approx(sum(f.abs().sum().item() for f in factors), rel=1e-5)
    out["cond"].backward()
    assert all(f.grad is not None for f in factors)
    empty = constraint_penalties(nn.Linear(3, 3))
    assert empty["cond"].item() == 0 and empty["sparsity"].item() == 0


def _digits_fit(tmp_path, target, epochs=4, ckpt=None):
    import lightning as L

    from sepnet.data import DigitsDataModule
    from sepnet.module import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier(num_classes=10, image_shape=(1, 8, 8), mean=(0.3,), std=(0.4,),
                            network={"backbone": "mlp", "backbone_kwargs": {"hidden_shapes": [[4, 16, 16]]}},
                            optimization={"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0},
                            constraint={"sparsity_target": target},
                            validation={"batches": 0})
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, DigitsDataModule(batch_size=64), ckpt_path=ckpt)
    return model, trainer


def test_sparsity_target_is_met_exactly_and_its_zeros_survive_resume_and_export(tmp_path):
    from sepnet.compress import remove_pruning_
    from sepnet.compress.sparsity import SparsityTarget
    from sepnet.export import sparse_state_dict

    model, trainer = _digits_fit(tmp_path, 0.75, epochs=3)
    control = model.sparsity_target
    assert all(abs(z - 0.75) <= 0.01 for z in control.zero_fractions()), control.zero_fractions()
    assert bool(control.frozen.all())
    zero_pattern = [(f == 0).clone() for _, l in separable_layers(model) for t in l.factors for f in t]
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    resumed, _ = _digits_fit(tmp_path, 0.75, epochs=5, ckpt=str(tmp_path / "s.ckpt"))
    after = [(f == 0) for _, l in separable_layers(resumed) for t in l.factors for f in t]
    assert all(torch.equal(a, b) for a, b in zip(zero_pattern, after))  # frozen: same zeros, more epochs
    # the export: 1 bit a zero instead of 4 bytes
    big = nn.Sequential(SeparableLinear((64, 64), (64, 64), rank=4))
    SparsityTarget(big, 0.75).freeze_()
    remove_pruning_(big)  # as the export does: the zeros in the factors, no masks to ship
    size = {}
    for key, state in (("sparse", sparse_state_dict(big)), ("plain", big.state_dict())):
        torch.save(state, tmp_path / f"{key}.pt")
        size[key] = (tmp_path / f"{key}.pt").stat().st_size
    assert size["sparse"] < 0.4 * size["plain"], size


def test_sparsity_target_ramps_cubically_keeps_pruned_entries_and_nnz_compounds():
    from sepnet.compress.sparsity import SparsityTarget
    from sepnet.measures import implied_nonzeros

    torch.manual_seed(0)
    net = nn.Sequential(SeparableLinear((4, 8), (4, 8)), SeparableLinear((8, 8), (4, 4), rank=2))
    control = SparsityTarget(net, 0.9, ramp=0.5)
    assert control.level(0, 100) == 0 and abs(control.level(25, 100) - 0.9 * (1 - 0.5 ** 3)) < 1e-12
    previous = [torch.zeros_like(f, dtype=torch.bool) for l in net for t in l.factors for f in t]
    for step in range(0, 60, 5):
        with torch.no_grad():  # training would move every entry, pruned ones included
            for p in net.parameters():
                p.add_(0.01)
        control.step_(step, 100)
        zeros = [f == 0 for l in net for t in l.factors for f in t]
        assert all(bool((z | ~p).all()) for z, p in zip(zeros, previous))  # pruned stays pruned
        previous = zeros
        assert all(abs(z - control.level(step, 100)) <= 0.02 for z in control.zero_fractions())
    assert bool(control.frozen.all()) and all(abs(z - 0.9) <= 0.01 for z in control.zero_fractions())
    rank1 = net[0]
    nnz, exact = implied_nonzeros(rank1)
    assert exact and nnz == int(rank1.implied_weight().count_nonzero())
    assert nnz == math.prod(int(f.count_nonzero()) for f in rank1.factors[0])
    bound, exact = implied_nonzeros(net[1])
    assert not exact and bound >= int(net[1].implied_weight().count_nonzero())
    with pytest.raises(ValueError, match="no separable layer"):
        SparsityTarget(nn.Linear(4, 4), 0.5)


def test_implied_penalty_is_the_factor_amgm_at_rank_one_and_bounds_kappa_at_any_rank():
    from sepnet.constraints import implied_penalty

    torch.manual_seed(0)
    rank1 = SeparableLinear((6, 4), (5, 3)).double()
    with torch.no_grad():
        for f in rank1.factors[0]:
            f.copy_(torch.randn_like(f) * torch.logspace(0, 1, f.shape[1], dtype=torch.float64))
    sizes = [min(f.shape) for f in rank1.factors[0]]  # q_k; G = G_1 kron G_2, q = q_1 q_2
    factors = sum(math.prod(sizes) / q * condition_penalty(f, "amgm").double()
                  for q, f in zip(sizes, rank1.factors[0]))
    assert abs(float(implied_penalty(rank1)) - float(factors)) < 1e-4 * max(1.0, float(factors))
    for shapes, rank in ((((512, 2, 2), (8, 8, 8)), 4), (((8, 8), (8, 8)), 3), (((4, 4, 4), (2, 4, 8)), 2)):
        layer = SeparableLinear(*shapes, rank=rank).double()
        p = float(implied_penalty(layer))
        kappa = layer_condition_number(layer, max_dense_elements=10**8).value
        assert p >= -1e-9 and kappa <= 2 * math.exp(p / 2) * (1 + 1e-6), (shapes, p, kappa)


def test_implied_penalty_descends_the_implied_kappa_at_rank_four():
    from sepnet.constraints import implied_penalty

    torch.manual_seed(0)
    layer = SeparableLinear((8, 8), (8, 8), rank=4)
    with torch.no_grad():  # an ill-conditioned start
        for term in layer.factors:
            for f in term:
                f.mul_(torch.logspace(0, 1.5, 8))
    before = layer_condition_number(layer).value
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        implied_penalty(layer).backward()
        opt.step()
    after = layer_condition_number(layer).value
    assert after < before / 5, (before, after)


def test_layer_kappa_is_exact_from_the_core_where_the_dense_matrix_is_too_large():
    torch.manual_seed(0)
    layer = SeparableLinear((1024, 4, 4), (8, 8, 8), rank=2).double()  # dense 512 x 16384: 8.4M entries
    from_core = layer_condition_number(layer)  # default limit 4M: the 512 x 256 core
    dense = layer_condition_number(layer, max_dense_elements=10**8)
    assert not from_core.is_bound and abs(from_core.value / dense.value - 1) < 1e-6
