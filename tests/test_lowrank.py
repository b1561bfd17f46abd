"""The low-rank baseline: truncated SVD for nn.Linear, Tucker-2 for nn.Conv2d."""

import pytest
import torch
from torch import nn

from sepnet.compress import compress_
from sepnet.compress.lowrank import LowRankLinear, Tucker2Conv2d
from sepnet.measures import parameter_counts


def test_from_linear_is_the_truncated_svd_with_the_eckart_young_error():
    torch.manual_seed(0)
    linear = nn.Linear(40, 30).double()
    s = torch.linalg.svdvals(linear.weight.detach())
    for rank in (1, 5, 30):
        layer = LowRankLinear.from_linear(linear, rank)
        error = layer.approximation_error
        expected = s[rank:].square().sum().sqrt() / s.square().sum().sqrt()
        assert error == pytest.approx(float(expected), abs=1e-10)
        x = torch.randn(3, 40, dtype=torch.float64)
        torch.testing.assert_close(layer(x), x @ layer.implied_weight().T + linear.bias)
    assert error < 1e-12  # full rank: the layer itself


def test_tucker2_is_exact_for_a_kernel_of_low_channel_ranks_and_counts_by_formula():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 10, 3, padding=1).double()
    core = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    with torch.no_grad():  # channel ranks (4 out, 3 in)
        conv.weight.copy_(torch.einsum("sb,bayx,ac->scyx", torch.randn(10, 4, dtype=torch.float64), core,
                                       torch.randn(3, 12, dtype=torch.float64)))
    layer = Tucker2Conv2d.from_conv(conv, (3, 4))
    error = layer.approximation_error
    assert error < 1e-10
    x = torch.randn(2, 12, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x))
    assert layer.stored_parameters() == 12 * 3 + 4 * 3 * 9 + 4 * 10 + 10
    lossy = Tucker2Conv2d.from_conv(conv, (2, 2))
    worse = lossy.approximation_error
    assert worse > 0.01 and lossy.rank_in == 2


def test_random_init_has_the_dense_layers_variance():
    torch.manual_seed(0)
    weight = LowRankLinear(512, 256, rank=32).implied_weight().detach()
    assert weight.var().item() == pytest.approx(1 / (3 * 512), rel=0.1)
    kernel = Tucker2Conv2d(nn.Conv2d(64, 64, 3), (16, 16)).implied_weight().detach()
    assert kernel.var().item() == pytest.approx(1 / (3 * 64 * 9), rel=0.1)
    with pytest.raises(ValueError, match="low-rank rank 300: expected 1..256"):
        LowRankLinear(512, 256, rank=300)


def test_the_lowrank_compressor_meets_a_budget_over_linear_and_conv_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))
    dense = parameter_counts(net).stored
    lines = compress_(net, [{"method": "lowrank", "targets": ["*"], "budget": 8, "options": {"init": "svd"}}])
    assert isinstance(net[2], Tucker2Conv2d) and isinstance(net[5], LowRankLinear)
    counts = parameter_counts(net)
    assert counts.dense == dense and 8 <= counts.compression < 8 * 1.5
    assert "Tucker-2 ranks" in lines[0] and "SVD error" in lines[-1]
    assert net(torch.rand(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="compression lowrank: init 'hosvd'"):
        compress_(nn.Sequential(nn.Linear(4, 4)), [{"method": "lowrank", "options": {"init": "hosvd"}}])
