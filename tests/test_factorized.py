"""The compressor contract: every factorized layer against the dense layer it stands for, the
public implied-weight switch, functional_call, dtypes, and the registry -- its contract test is
parametrized over the registered methods, so a method in a new file is tested here unnamed."""

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
from sepnet.factorized import FactorizedLayer, factorized_layers, implied_path
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


def test_dense_weight_is_a_deprecated_alias_of_implied_weight():
    layer = _linear_layers()["tt"]
    with pytest.warns(DeprecationWarning, match="implied_weight"):
        weight = layer.dense_weight()
    torch.testing.assert_close(weight, layer.implied_weight())


def _layer_inputs(net, names, x):
    """The input each named layer gets in a forward pass of x."""
    inputs, handles = {}, []
    for name in names:
        handles.append(net.get_submodule(name).register_forward_pre_hook(
            lambda _, args, name=name: inputs.__setitem__(name, args[0].detach()) or None))
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    return inputs


@pytest.mark.parametrize("method", methods())
def test_every_registered_method_keeps_the_contract(method):
    """Each registered method at a 3x budget on a small VGG (float64): the network keeps its
    dtype and dense-equivalent size and gets fewer non-zero parameters; every factorized layer
    computes, on both paths, the dense layer of its implied weight (with the settings of the
    layer it replaced), and so does its `folded()` dense layer; it counts its parameters as the
    contract says."""
    torch.manual_seed(0)
    net = build_network(**VGG).double()
    before, dense = copy.deepcopy(net), parameter_counts(net).dense
    assert compress_(net, [{"method": method, "budget": 3}])
    counts = parameter_counts(net)
    assert counts.dense == (counts.stored if Compressor.registry[method].structural else dense)
    assert counts.nonzero < dense
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    assert net(x).dtype == torch.float64
    layers = dict(factorized_layers(net))
    inputs = _layer_inputs(net, layers, x)
    for name, layer in layers.items():
        original = before.get_submodule(name)
        assert isinstance(original, layer.stands_for) and layer.implied_weight().shape == original.weight.shape
        bias = None if layer.bias is None else layer.bias.reshape(-1)
        if layer.stands_for is nn.Linear:
            expected = nn.functional.linear(inputs[name].flatten(1), layer.implied_weight(), bias)
        else:
            expected = nn.functional.conv2d(inputs[name], layer.implied_weight(), bias, original.stride,
                                            original.padding, original.dilation)
        for path in ("always", "never"):
            with implied_path(layer, path):
                torch.testing.assert_close(layer(inputs[name]).reshape(expected.shape), expected, rtol=1e-9, atol=1e-9)
        folded = layer.folded()  # what an export runs where folding is faster
        assert type(folded) is not type(layer)
        torch.testing.assert_close(folded(inputs[name]), layer(inputs[name]), rtol=1e-9, atol=1e-9)
        assert layer.stored_parameters() == sum(p.numel() for p in layer.parameters())
        assert layer.dense_parameters() == sum(p.numel() for p in original.parameters())


def test_a_method_in_a_new_file_is_found_and_covered_by_the_registry_tests(tmp_path):
    """A compressor defined in a new module of sepnet.compress, nothing else changed: the
    package finds it and the contract test above runs on it."""
    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"
    shutil.copytree(repo / "src" / "sepnet", source / "sepnet")
    (source / "sepnet" / "compress" / "halve_example.py").write_text(
        "from torch import nn\n"
        "from sepnet.compress.factorize import Factorization, Unit\n"
        "from sepnet.compress.lowrank import LowRankLinear\n\n\n"
        "class HalveExample(Factorization, name='halve_example', targets=(nn.Linear,)):\n"
        "    defaults = {'rank': 1}\n\n"
        "    def units(self, net, layers):\n"
        "        return [Unit([(n, m)], lambda r, m=m: r * (m.in_features + m.out_features)) for n, m in layers]\n\n"
        "    def build(self, unit, rank):\n"
        "        (_, m), = unit.layers\n"
        "        return [LowRankLinear.from_linear(m, rank)], f'halve_example rank {rank}'\n")
    env = {**os.environ, "PYTHONPATH": str(source)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                          "-k", "every_registered_method_keeps_the_contract and halve_example"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert "1 passed" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
