"""The compressor contract: every factorized layer against the dense layer it stands for, the
public implied-weight switch, functional_call, dtypes, and the registry."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sepnet.compress import CompressionSpec, Compressor, compress_, methods
from sepnet.compress.factorize import Factorization, Unit
from sepnet.compress.jsvd import SVDConv2d
from sepnet.compress.lowrank import LowRankLinear, Tucker2Conv2d
from sepnet.compress.tt import TTLinear
from sepnet.compress.tt_conv import TTConv2d
from sepnet.factorized import FactorizedLayer, implied_path
from sepnet.layers import FlatSeparableLinear
from sepnet.measures import parameter_counts
from sepnet.network import build_network


def _linear_layers():
    return {
        "separable": FlatSeparableLinear((4, 6), (3, 5), rank=2),
        "tt": TTLinear((2, 3, 4), (3, 1, 5), rank=3),
        "lowrank": LowRankLinear(24, 15, rank=4),
    }


def _conv_layers():
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=1)
    return {
        "tt_conv": TTConv2d((2, 4), (2, 3), 3, rank=3, stride=2, padding=1),
        "jsvd": SVDConv2d(conv, [3]),
        "lowrank": Tucker2Conv2d(conv, (3, 4)),
    }


@pytest.mark.parametrize("name", ["separable", "tt", "lowrank"])
def test_a_linear_factorized_layer_is_the_linear_layer_of_its_implied_weight(name):
    layer = _linear_layers()[name].double()
    assert isinstance(layer, FactorizedLayer) and layer.stands_for is nn.Linear
    x = torch.randn(7, 24, dtype=torch.float64)
    expected = nn.functional.linear(x, layer.implied_weight(), layer.bias.reshape(-1))
    for path in ("always", "never"):
        layer.implied_path = path
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    dense = nn.Linear(24, 15)
    assert layer.dense_parameters() == sum(p.numel() for p in dense.parameters())
    assert layer.stored_parameters() == sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize("name", ["tt_conv", "jsvd", "lowrank"])
def test_a_conv_factorized_layer_is_the_convolution_of_its_implied_kernel(name):
    layer = _conv_layers()[name].double()
    assert layer.stands_for is nn.Conv2d and layer.implied_weight().shape == (6, 8, 3, 3)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    expected = nn.functional.conv2d(x, layer.implied_weight(), layer.bias, stride=2, padding=1)
    for path in ("always", "never"):
        layer.implied_path = path
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert layer.dense_parameters() == sum(p.numel() for p in nn.Conv2d(8, 6, 3).parameters())


def test_the_implied_path_switch_is_checked_and_restored():
    layer = _linear_layers()["tt"]
    with pytest.raises(ValueError, match="implied_path 'sometimes'"):
        layer.implied_path = "sometimes"
    net = nn.Sequential(layer, nn.ReLU(), _linear_layers()["separable"].requires_grad_(False))
    net[2].implied_path = "never"
    with implied_path(net, "always"):
        assert layer.uses_implied(1) and net[2].uses_implied(1)
    assert layer.implied_path == "auto" and net[2].implied_path == "never"


@pytest.mark.parametrize("kind", ["tt", "tt_conv"])
def test_functional_call_gives_every_core_a_gradient_on_the_built_weight_path(kind):
    """Slicing the cores' ParameterList re-wrapped cores 1..d as new leaves: under
    functional_call (torch.func) they got no gradient."""
    layer = _linear_layers()["tt"] if kind == "tt" else _conv_layers()["tt_conv"]
    layer.implied_path = "always"
    x = torch.randn(4, 24) if kind == "tt" else torch.randn(2, 8, 5, 5)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters()}
    functional_call(layer, params, (x,)).square().sum().backward()
    for key, value in params.items():
        assert value.grad is not None and value.grad.abs().sum() > 0, key


VGG = dict(num_classes=10, image_shape=(3, 32, 32), backbone="vgg16", backbone_kwargs={"width": 1 / 8},
           head="dense", head_kwargs={"hidden": [64]})


@pytest.mark.parametrize("method,targets", [
    ("separable", ["head.*"]), ("tt", ["head.*"]), ("lowrank", ["*"]),
    ("tt_conv", ["backbone.*"]), ("jsvd", ["backbone.*"])])
def test_compressed_layers_take_the_networks_dtype(method, targets):
    torch.manual_seed(0)
    net = build_network(**VGG).double()
    compress_(net, [{"method": method, "targets": targets, "budget": 3}])
    assert {p.dtype for p in net.parameters()} == {torch.float64}
    assert net(torch.rand(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_a_new_method_is_one_class_and_bad_options_are_one_line_errors():
    assert {"separable", "tt", "tt_conv", "jsvd", "lowrank", "magnitude", "hydra", "deadwood"} <= set(methods())

    class Halve(Factorization, name="_test_halve", targets=(nn.Linear,)):
        defaults = {"rank": 1}

        def units(self, net, layers):
            return [Unit([(n, m)], lambda r, m=m: r * (m.in_features + m.out_features)) for n, m in layers]

        def build(self, unit, rank):
            (_, m), = unit.layers
            return [LowRankLinear(m.in_features, m.out_features, rank, m.bias is not None)], f"halve rank {rank}"

    try:
        net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
        lines = compress_(net, [{"method": "_test_halve", "targets": ["0"], "budget": 2}])
        assert isinstance(net[0], LowRankLinear) and lines == ["0: halve rank 8"]
        with pytest.raises(ValueError, match="compression _test_halve: unknown option 'modes'"):
            compress_(net, [{"method": "_test_halve", "targets": ["2"], "options": {"modes": 3}}])
        with pytest.raises(ValueError, match="registered twice"):
            type("Again", (Factorization,), {}, name="_test_halve", targets=(nn.Linear,))
    finally:
        Compressor.registry.pop("_test_halve")
    with pytest.raises(ValueError, match="unknown compression method 'svd'"):
        CompressionSpec(method="svd")


def test_shared_factors_count_once_and_every_method_reports_the_same_dense_size():
    torch.manual_seed(0)
    dense = parameter_counts(build_network(**VGG)).dense
    for method, targets in [("jsvd", ["backbone.*"]), ("lowrank", ["*"]), ("tt", ["head.*"])]:
        net = build_network(**VGG, compression=[{"method": method, "targets": targets, "budget": 4}])
        counts = parameter_counts(net)
        assert counts.dense == dense and counts.stored < dense, method
