import math

import pytest
import torch
from conftest import matrix_and_product_paths_agree
from torch import nn

from sepnet.measures import condition_number
from sepnet.layers import FlatSeparableLinear, SeparableLinear, _mode_product, contraction_order, nearest_kronecker

SHAPES = [((5,), (3,)), ((4, 3), (2, 5)), ((3, 4, 2), (2, 3, 5))]


def _kron_sum(factors):
    total = 0
    for term in factors:
        k = term[0]
        for f in term[1:]:
            k = torch.kron(k, f)
        total = total + k
    return total


@pytest.mark.parametrize("in_shape,out_shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 3])
def test_forward_equals_dense_kron(in_shape, out_shape, rank):
    torch.manual_seed(0)
    layer = SeparableLinear(in_shape, out_shape, rank=rank).double()
    with torch.no_grad():  # non-orthogonal factors, so the check is not special to the init
        for term in layer.factors:
            for f in term:
                f.normal_()
    weight = _kron_sum([[f.detach() for f in term] for term in layer.factors])
    assert torch.equal(layer.implied_weight().detach(), weight)
    x = torch.randn(6, *in_shape, dtype=torch.float64)
    expected = x.reshape(6, -1) @ weight.T + layer.bias.detach().reshape(-1)
    torch.testing.assert_close(layer(x).reshape(6, -1), expected, rtol=1e-12, atol=1e-12)


def test_extra_leading_dims_and_single_sample():
    layer = SeparableLinear((4, 3), (2, 5), rank=2).double()
    x = torch.randn(2, 7, 4, 3, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, 7, 2, 5)
    torch.testing.assert_close(layer(x[0, 0]), y[0, 0])
    torch.testing.assert_close(layer(x[:1, :1]).reshape(-1), y[0, 0].reshape(-1))


@pytest.mark.parametrize("in_shape,out_shape", SHAPES)
def test_gradcheck(in_shape, out_shape):
    torch.manual_seed(0)
    layer = SeparableLinear(in_shape, out_shape, rank=2).double()
    params = [f for term in layer.factors for f in term] + [layer.bias]
    x = torch.randn(3, *in_shape, dtype=torch.float64, requires_grad=True)

    def functional(x, *ps):
        it = iter(ps)
        y = 0
        for _ in layer.factors:
            z = x.reshape(-1, *in_shape)
            term = [next(it) for _ in in_shape]
            for k in layer.order:
                z = _mode_product(z, term[k], k)
            y = y + z
        return y + next(it)

    inputs = (x, *[p.detach().clone().requires_grad_() for p in params])
    assert torch.autograd.gradcheck(functional, inputs)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


def test_order_contracts_the_shrinking_mode_first():
    assert contraction_order((512, 7, 7), (16, 16, 16))[0] == 0
    assert contraction_order((2, 2, 64), (16, 16, 4))[0] == 2


def test_init_is_orthogonal_with_default_linear_variance():
    torch.manual_seed(0)
    layer = SeparableLinear((64, 8, 8), (16, 8, 8), rank=1)
    for f in layer.factors[0]:
        assert condition_number(f) == pytest.approx(1.0, abs=1e-4)
    w = layer.implied_weight().detach()
    expected = 1 / (3 * layer.in_features)
    assert (w.square().mean() / expected).item() == pytest.approx(1.0, rel=1e-3)
    ref = nn.Linear(layer.in_features, 8)
    assert ref.weight.var().item() == pytest.approx(expected, rel=0.1)
    layer3 = SeparableLinear((16, 16), (8, 32), rank=3)
    ms = layer3.implied_weight().detach().square().mean().item()
    assert ms == pytest.approx(1 / (3 * 256), rel=0.3)


def test_from_linear_recovers_exact_kronecker():
    torch.manual_seed(0)
    for in_shape, out_shape in SHAPES[1:]:
        for rank in (1, 3):
            factors = [[torch.randn(o, i, dtype=torch.float64) for o, i in zip(out_shape, in_shape)]
                       for _ in range(rank)]
            linear = nn.Linear(math.prod(in_shape), math.prod(out_shape)).double()
            with torch.no_grad():
                linear.weight.copy_(_kron_sum(factors))
            layer = SeparableLinear.from_linear(linear, in_shape, out_shape, rank=rank)
            assert layer.approximation_error < 1e-9
            torch.testing.assert_close(layer.implied_weight().detach(), linear.weight.detach())
            x = torch.randn(5, math.prod(in_shape), dtype=torch.float64)
            torch.testing.assert_close(layer(x.reshape(5, *in_shape)).reshape(5, -1), linear(x))


@pytest.mark.parametrize("in_shape,out_shape", [((8, 6), (6, 8)), ((4, 3, 4), (3, 4, 3))])
def test_from_linear_error_decreases_with_rank(in_shape, out_shape):
    torch.manual_seed(0)
    linear = nn.Linear(math.prod(in_shape), math.prod(out_shape)).double()
    errors = [SeparableLinear.from_linear(linear, in_shape, out_shape, rank=r).approximation_error
              for r in (1, 2, 4, 8)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert 0 < errors[-1] < errors[0] < 1


def test_nearest_kronecker_full_rank_is_exact_for_two_modes():
    torch.manual_seed(0)
    w = torch.randn(6, 6, dtype=torch.float64)
    _, error = nearest_kronecker(w, (2, 3), (3, 2), rank=9)
    assert error < 1e-12


def test_flat_layer_on_tokens_matches_dense():
    torch.manual_seed(0)
    layer = FlatSeparableLinear((4, 6), (3, 8), rank=2).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, 5, 24)
    expected = x @ layer.implied_weight().detach().T + layer.bias.detach().reshape(-1)
    torch.testing.assert_close(y, expected)
    assert (layer.in_features, layer.out_features) == (24, 24)


@pytest.mark.parametrize("autocast", [False, True])
def test_implied_matrix_path_matches_the_mode_products(autocast):
    """Many rows through a small layer take one GEMM with the implied matrix (ViT tokens); the
    result and every gradient equal the mode products'."""
    torch.manual_seed(0)
    layer = FlatSeparableLinear((8, 16), (16, 24), rank=6)
    x = torch.randn(2, 64, 128)
    assert layer._implied_pays(128) and not layer._implied_pays(8)  # the rule: rows and multiply-adds
    assert not FlatSeparableLinear((32, 32), (32, 32), rank=1)._implied_pays(10**6)  # 16x the products' work
    matrix_and_product_paths_agree(layer, x, autocast)


@pytest.mark.parametrize("in_shape,out_shape,input_dtype", [
    ((32, 4, 4), (8, 4, 4), torch.float32),
    ((64, 2, 2), (8, 8, 8), torch.float32),   # the VGG/8 head: the tensordot branch of the backward
    ((64, 2, 2), (8, 8, 8), torch.bfloat16),  # input already bf16, as after an autocast conv
])
def test_autocast_bfloat16_close_to_float32(in_shape, out_shape, input_dtype):
    torch.manual_seed(0)
    layer = SeparableLinear(in_shape, out_shape, rank=2)
    x0 = torch.rand(16, *in_shape)
    x = x0.clone().requires_grad_(True)
    layer(x).square().sum().backward()
    ref, ref_grad, ref_factor_grad = layer(x0), x.grad.clone(), layer.factors[0][0].grad.clone()
    layer.zero_grad()
    xb = x0.to(input_dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xb)
        y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == input_dtype
    assert layer.factors[0][0].grad.dtype == torch.float32
    assert (y.float() - ref).norm() / ref.norm() < 2e-2
    assert (xb.grad.float() - ref_grad).norm() / ref_grad.norm() < 5e-2
    assert (layer.factors[0][0].grad - ref_factor_grad).norm() / ref_factor_grad.norm() < 5e-2


def test_extra_repr_shows_shapes_rank_and_compression():
    text = repr(SeparableLinear((512, 2, 2), (16, 8, 4), rank=2))
    assert "in_shape=(512, 2, 2)" in text and "out_shape=(16, 8, 4)" in text and "rank=2" in text
    assert "x smaller" in text


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(in_shape=(4, 0), out_shape=(2, 2)), r"in_shape .*positive"),
        (dict(in_shape=(4, 3), out_shape=(2, -1)), r"out_shape .*positive"),
        (dict(in_shape=(4, 3), out_shape=(2,)), r"same number of modes"),
        (dict(in_shape=(4, 3), out_shape=(2, 2), rank=0), r"rank must be"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SeparableLinear(**kwargs)


def test_bad_input_shape_names_both_shapes():
    layer = SeparableLinear((4, 3), (2, 5))
    with pytest.raises(ValueError, match=r"\(\.\.\., 4, 3\), got \(2, 3, 4\)"):
        layer(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"expected input of shape"):
        layer(torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 12\), got \(2, 11\)"):
        FlatSeparableLinear((4, 3), (2, 5))(torch.zeros(2, 11))
    with pytest.raises(ValueError, match=r"12 -> 10 layer, but the linear layer is 12 -> 9"):
        SeparableLinear.from_linear(nn.Linear(12, 9), (4, 3), (2, 5))
