"""Joint SVD of repeated convolutions: the two-conv layer, the joint factorizations, the
equal-budget rule and the compressor's shared parameters."""

import pytest
import torch
from torch import nn

from sepnet.compress.jsvd import _joint_cost, equal_budget_rank
from sepnet.measures import parameter_counts
from sepnet.compress.jsvd import SVDConv2d, fold_kernel, joint_svd, unfold_kernel
from sepnet.network import build_network


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_two_conv_layer_equals_the_conv_with_its_rebuilt_kernel(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=stride, padding=padding, dilation=dilation).double()
    layer = SVDConv2d(conv, [4, 2]).double()  # two branches, random factors
    x = torch.randn(2, 6, 11, 11, dtype=torch.float64)
    expected = nn.functional.conv2d(x, layer.implied_weight(), layer.bias, stride, padding, dilation)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    # at full rank the factors of the unfolded kernel give back the convolution itself
    matrix = unfold_kernel(conv.weight)
    assert torch.equal(fold_kernel(matrix, conv.weight.shape), conv.weight)
    full = SVDConv2d(conv, [min(matrix.shape)]).double()
    full.set_factors_(joint_svd([matrix], "svd", min(matrix.shape))[0])
    torch.testing.assert_close(full(x), conv(x), rtol=1e-10, atol=1e-10)


def test_ljsvd_and_rjsvd_are_exact_when_the_group_shares_a_space():
    torch.manual_seed(0)
    u = torch.randn(24, 4, dtype=torch.float64)
    columns = [u @ torch.randn(4, 18, dtype=torch.float64) for _ in range(3)]
    v = torch.randn(4, 18, dtype=torch.float64)
    rows = [torch.randn(24, 4, dtype=torch.float64) @ v for _ in range(3)]
    for method, matrices in (("ljsvd", columns), ("rjsvd", rows)):
        factors = joint_svd(matrices, method, 4)
        for (term,), m in zip(factors, matrices):
            torch.testing.assert_close(term[0] @ term[1], m, rtol=1e-10, atol=1e-10)
        shared = 0 if method == "ljsvd" else 1
        assert all(f[0][shared] is factors[0][0][shared] for f in factors)  # one shared factor
    # on unrelated matrices a shared factor costs accuracy: per-layer SVD of the same rank is better
    unrelated = [torch.randn(24, 18, dtype=torch.float64) for _ in range(3)]

    def error(method):
        return sum(float((t[0] @ t[1] - m).norm()) for (t,), m in zip(joint_svd(unrelated, method, 4), unrelated))
    assert error("svd") < error("ljsvd")


def test_bijsvd_error_never_increases_over_iterations():
    torch.manual_seed(0)
    matrices = [torch.randn(24, 24, dtype=torch.float64) for _ in range(4)]
    errors = []
    for iterations in (1, 2, 4, 8, 16):
        factors = joint_svd(matrices, "bijsvd", 8, iterations=iterations)
        errors.append(sum(float((sum(u @ v for u, v in terms) - m).norm() ** 2)
                          for terms, m in zip(factors, matrices)))
    assert all(a >= b - 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


@pytest.mark.parametrize("method", ["ljsvd", "rjsvd", "bijsvd"])
@pytest.mark.parametrize("n", [2, 4, 7])
def test_equal_budget_rank_stores_at_most_the_per_layer_svds(method, n):
    rows = cols = 3 * 64  # I = O = 64, 3 x 3
    for per_layer in (4, 16, 32):
        rank = equal_budget_rank(method, n, rows, cols, per_layer)
        assert _joint_cost(method, n, rows, cols, rank) <= _joint_cost("svd", n, rows, cols, per_layer)
        assert _joint_cost(method, n, rows, cols, rank + 1) > _joint_cost("svd", n, rows, cols, per_layer)
        if method != "bijsvd":  # the paper's rule: about 2N / (N + 1) times the per-layer rank
            assert abs(rank - 2 * n * per_layer / (n + 1)) <= 1


def _vgg(compression):
    torch.manual_seed(0)
    return build_network(num_classes=10, image_shape=(3, 32, 32), backbone="vgg16",
                         backbone_kwargs={"width": 1 / 8}, head="dense", compression=compression)


def test_jsvd_compressor_shares_factors_counts_them_once_and_resumes():
    spec = [{"method": "jsvd", "targets": ["backbone.*"], "options": {"method": "ljsvd", "rank": 4}}]
    net = _vgg(spec)
    layers = {n: m for n, m in net.named_modules() if isinstance(m, SVDConv2d)}
    pair = [layers["backbone.27"], layers["backbone.30"]]  # stage 4: two 64 -> 64 convs after the first
    assert pair[0].vertical[0] is pair[1].vertical[0] and pair[0].horizontal[0] is not pair[1].horizontal[0]
    assert isinstance(net.backbone[0], nn.Conv2d)  # the first convolution stays dense
    counts = parameter_counts(net)
    assert counts.stored == sum(p.numel() for p in net.parameters())  # shared factors once
    assert counts.dense == parameter_counts(_vgg([])).dense
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    assert pair[0].vertical[0].grad is not None
    other = _vgg(spec)
    other.load_state_dict(net.state_dict())
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(other.eval()(x), net.eval()(x))
    again = {n: m for n, m in other.named_modules() if isinstance(m, SVDConv2d)}
    assert again["backbone.27"].vertical[0] is again["backbone.30"].vertical[0]


def test_jsvd_full_rank_keeps_the_function_and_budgets_hold():
    dense = _vgg([])
    x = torch.rand(2, 3, 32, 32)
    full = _vgg([{"method": "jsvd", "targets": ["backbone.*"], "options": {"method": "svd", "rank": 10**4}}])
    torch.testing.assert_close(full.eval()(x), dense.eval()(x), rtol=1e-4, atol=1e-4)
    for method in ("svd", "ljsvd", "rjsvd", "bijsvd"):
        net = _vgg([{"method": "jsvd", "targets": ["backbone.*"], "budget": 3, "options": {"method": method}}])
        layers = [m for m in net.modules() if isinstance(m, SVDConv2d)]
        stored = sum(p.numel() for p in {id(p): p for m in layers for p in m.parameters()}.values())
        assert sum(m.dense_parameters() for m in layers) / stored >= 3 - 1e-9, method


def test_jsvd_budget_holds_for_the_convolutions_it_leaves_dense():
    """The first and 1x1 convolutions stay dense but are targets: the budget covers them too."""
    from sepnet.compress import compress_

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 3), nn.Conv2d(32, 64, 1))
    dense = sum(p.numel() for p in net.parameters())
    compress_(net, [{"method": "jsvd", "budget": 2, "options": {"method": "svd"}}])
    assert isinstance(net[1], SVDConv2d) and isinstance(net[3], nn.Conv2d)
    stored = sum(p.numel() for p in net.parameters())
    assert dense / 2 * 0.8 < stored <= dense / 2
    with pytest.raises(ValueError, match="budget 8x is unreachable"):  # the dense ones alone exceed it
        compress_(nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 64, 1)),
                  [{"method": "jsvd", "budget": 8, "options": {"method": "svd"}}])
