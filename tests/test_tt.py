"""Tensor-train layers: the core-by-core forward, TT-SVD, initialization, counts."""

import math

import pytest
import torch
from conftest import matrix_and_product_paths_agree
from torch import nn

from sepnet.compress.tt import TTLinear, tt_parameters, tt_ranks, tt_svd


@pytest.mark.parametrize("in_modes,out_modes,rank", [((4, 3, 2), (2, 5, 3), 3), ((8, 8), (4, 16), 5),
                                                     ((2, 3, 2, 2), (3, 2, 2, 2), [2, 4, 2])])
def test_forward_equals_the_dense_weight_built_from_the_cores(in_modes, out_modes, rank):
    torch.manual_seed(0)
    layer = TTLinear(in_modes, out_modes, rank).double()
    x = torch.randn(3, 5, math.prod(in_modes), dtype=torch.float64)  # leading dims kept
    y = layer(x)
    assert y.shape == (3, 5, math.prod(out_modes))
    torch.testing.assert_close(y, x @ layer.implied_weight().t() + layer.bias, rtol=1e-12, atol=1e-12)


def test_tt_svd_reconstructs_an_exact_low_tt_rank_matrix():
    torch.manual_seed(0)
    source = TTLinear((4, 3, 5), (3, 4, 2), rank=3).double()  # random cores: TT ranks (1, 3, 3, 1)
    linear = nn.Linear(60, 24).double()
    with torch.no_grad():
        linear.weight.copy_(source.implied_weight())
    layer = TTLinear.from_linear(linear, (4, 3, 5), (3, 4, 2), rank=3)
    error = layer.approximation_error
    assert error < 1e-10
    torch.testing.assert_close(layer.implied_weight(), linear.weight, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.bias, linear.bias)
    # rank 2 cannot: the error is real and reported
    truncated = TTLinear.from_linear(linear, (4, 3, 5), (3, 4, 2), rank=2).approximation_error
    assert truncated > 1e-3


def test_tt_svd_error_decreases_with_rank_and_full_rank_is_exact():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).double()
    errors = [TTLinear.from_linear(linear, (4, 4, 4), (2, 4, 4), rank=r).approximation_error for r in (1, 2, 4, 8, 16, 64)]
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.5 and errors[-1] < 1e-10


def test_initialization_has_the_variance_of_nn_linear():
    # an entry sums prod(r) products of d core entries: without the 1 / prod(r) in the core
    # variance (tensorly-torch's mistake) the entries would be prod(r) = 16x too large in variance
    weights = []
    for seed in range(16):
        torch.manual_seed(seed)
        weights.append(TTLinear((8, 8, 8), (4, 4, 8), rank=4).implied_weight().flatten())
    variance = float(torch.cat(weights).var())
    target = 1 / (3 * 512)  # nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
    assert abs(variance / target - 1) < 0.15, variance / target
    linear = nn.Linear(512, 128)
    assert abs(float(linear.weight.var()) / target - 1) < 0.1


def test_parameter_counts_by_formula_and_ranks_capped():
    layer = TTLinear((4, 8, 4), (4, 4, 8), rank=6)
    assert layer.ranks == (1, 6, 6, 1)
    assert layer.stored_parameters() == 1 * 4 * 4 * 6 + 6 * 8 * 4 * 6 + 6 * 4 * 8 * 1 + 128
    assert layer.stored_parameters() == tt_parameters((4, 8, 4), (4, 4, 8), layer.ranks) + 128
    assert layer.dense_parameters() == 128 * 128 + 128
    # the first cut holds 2 x 3 = 6 values: a rank above that is capped
    assert tt_ranks((2, 4), (3, 5), 50) == (1, 6, 1)
    assert len(tt_svd(torch.randn(15, 8), (2, 4), (3, 5), 50)) == 2


def test_gradients_reach_every_core():
    torch.manual_seed(0)
    layer = TTLinear((2, 3, 2), (3, 2, 2), rank=2).double()
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *cores: layer(x), (x, *layer.cores))


@pytest.mark.parametrize("args,match", [
    (((4, 4), (4,), 2), "same number"),
    (((4, 4), (4, 4), [2, 2]), "expected 1 internal ranks"),
    (((4, 4), (4, 4), 0), "TT ranks must be >= 1"),
])
def test_bad_construction(args, match):
    with pytest.raises(ValueError, match=match):
        TTLinear(*args)


def test_from_linear_with_wrong_modes_names_both_sizes():
    with pytest.raises(ValueError, match=r"imply a 16 -> 16 layer, but the linear layer is 12 -> 16"):
        TTLinear.from_linear(nn.Linear(12, 16), (4, 4), (4, 4), 2)
    with pytest.raises(ValueError, match="expects 16 input features"):
        TTLinear((4, 4), (4, 4), 2)(torch.randn(2, 12))


@pytest.mark.parametrize("in_modes,out_modes", [((4, 8, 16), (2, 2, 2)), ((2, 2, 2), (4, 8, 16))])
def test_both_contraction_orders_equal_the_dense_weight(in_modes, out_modes):
    torch.manual_seed(0)
    layer = TTLinear(in_modes, out_modes, rank=3).double()
    x = torch.randn(6, math.prod(in_modes), dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.implied_weight().t() + layer.bias, rtol=1e-12, atol=1e-12)
    assert layer._reversed == (in_modes[-1] > in_modes[0])  # the cheaper end; the two cases take both


@pytest.mark.parametrize("autocast", [False, True])
def test_implied_matrix_path_matches_the_core_contractions(autocast):
    """Many rows through a small TT layer (a ViT's tokens at 10x) take one GEMM with the implied
    matrix; the result and every gradient equal the core-by-core contraction's."""
    torch.manual_seed(0)
    layer = TTLinear((8, 16), (16, 24), rank=6)
    assert layer.macs_per_row() == 36864  # three quarters of the dense layer's 49,152
    assert layer._implied_pays(128) and not layer._implied_pays(1)  # the rule: rows and multiply-adds
    assert layer.build_macs() == 8 * 16 * 6 * 16 * 24  # (8, 16, 6) x (6, 16, 24)
    assert not TTLinear((8, 8, 8), (8, 8, 8), rank=1)._implied_pays(10**6)  # 21x the contractions' work
    x = torch.randn(2, 64, 128)
    assert layer(x).shape == (2, 64, 384)
    matrix_and_product_paths_agree(layer, x, autocast)


@pytest.mark.parametrize("naive", [False, True])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), (2, 1)])
def test_tt_conv_equals_conv2d_with_its_rebuilt_kernel(naive, stride, padding):
    from sepnet.compress.tt_conv import TTConv2d

    torch.manual_seed(0)
    layer = TTConv2d((2, 4), (4, 2), 3, rank=3, stride=stride, padding=padding, naive=naive).double()
    layer.implied_path = "never"  # the structured forward (a naive layer has no other)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    expected = nn.functional.conv2d(x, layer.implied_weight(), layer.bias, stride, padding)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), (1, "same")])
def test_tt_conv_kernel_path_matches_the_structured_forward(autocast, stride, padding):
    """A TT convolution at a CIFAR-sized batch convolves with its kernel built from the cores
    (the rule: building it and the dense conv cost at most 8x the structured forward); output and
    every gradient equal the structured forward's."""
    from sepnet.compress.tt_conv import TTConv2d

    torch.manual_seed(0)
    layer = TTConv2d((4, 4), (4, 8), 3, rank=[9, 19], stride=stride, padding=padding)  # the VGG cell's 2nd conv
    assert layer.macs_per_pixel() == 16 * 9 * 9 + (16 * 9 * 4 * 19 + 4 * 19 * 4 * 8)  # grouped conv + 2 cores
    assert layer.build_macs() == 9 * 9 * 16 * 19 + 9 * 16 * 19 * 32  # (9, r0) x (r0, c1 s1 r1), then x (r1, c2 s2)
    x = torch.randn(2, 16, 7, 7)
    pixels = 2 * (7 * 7 if stride == 1 else 3 * 3)
    assert layer._output_pixels(x) == pixels == layer(x).shape[0] * layer(x)[0, 0].numel()
    assert layer._implied_pays(pixels)
    matrix_and_product_paths_agree(layer, x, autocast)


def test_tt_conv_keeps_the_structured_forward_where_it_is_far_cheaper():
    """The kernel path's rule counts the kernel's build (a few pixels do not pay for it) and
    leaves a layer whose structured forward is over 8x cheaper on it."""
    from sepnet.compress.tt_conv import TTConv2d

    last = TTConv2d((8, 16), (8, 16), 3, rank=[9, 19])  # the VGG cell's last conv, on 2x2 maps
    assert last._implied_pays(128 * 2 * 2) and not last._implied_pays(1)  # the kernel's build is counted
    big = TTConv2d((16, 16), (16, 16), 3, rank=[1, 1])  # 256 -> 256 at rank 1: 56x fewer multiply-adds
    assert not big._implied_pays(10**6)


@pytest.mark.parametrize("naive", [False, True])
def test_tt_conv_svd_is_exact_for_a_low_rank_kernel_and_counts_by_formula(naive):
    from sepnet.compress.tt_conv import TTConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(TTConv2d((2, 4), (4, 2), 3, rank=3, naive=naive).double().implied_weight())
    layer = TTConv2d.from_conv(conv, (2, 4), (4, 2), rank=3, naive=naive)
    error = layer.approximation_error
    assert error < 1e-10
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-10)
    sizes = [3, 3, 8, 8] if naive else [9, 8, 8]
    r = layer.ranks
    assert layer.stored_parameters() == sum(r[k] * n * r[k + 1] for k, n in enumerate(sizes)) + 8
    assert layer.dense_parameters() == 8 * 8 * 9 + 8


def test_tt_conv_initialization_has_the_variance_of_conv2d():
    from sepnet.compress.tt_conv import TTConv2d

    kernels = []
    for seed in range(20):
        torch.manual_seed(seed)
        kernels.append(TTConv2d((4, 4), (4, 8), 3, rank=4).implied_weight().flatten())
    target = 1 / (3 * 16 * 9)  # nn.Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C kH kW
    assert abs(float(torch.cat(kernels).var()) / target - 1) < 0.2
