"""`channel`: structured (channel) pruning with torch-pruning's dependency graph (Fang et al.,
"DepGraph: Towards Any Structural Pruning", CVPR 2023): whole output channels of the targeted
convolutions and whole units of the targeted linear layers are removed, and every layer that
reads them shrinks to match, so the result is a smaller dense network that every runtime runs at
its reduced cost (no mask, no sparse kernel needed). The baseline a practitioner tries first
against the compressors that only count non-zeros.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sepnet.compress.spec import Compressor, dense_size

__all__ = ["ChannelPruning"]


class ChannelPruning(Compressor, name="channel", targets=(nn.Linear, nn.Conv2d)):
    """Removes the targeted layers' output channels (units) of smallest L-`norm` weight norm;
    the network's classifier (its last layer) keeps its outputs. options: scope ("layer": each
    layer loses the same fraction of channels; "global": the least important channels of all
    targets together), norm (1 or 2), amount (fraction of channels removed, instead of a budget).
    A budget is met by bisection over that fraction, on copies (budget_of "model": the whole
    network's parameters, the layers that shrink with the targets included; "targets": the
    targeted layers' own). Start from a trained model (network.init_from). The network must
    carry its input shape (`input_shape`, as sepnet.network.build_network's does). The result
    is counted as the smaller dense network it is (sepnet.measures: its dense size is its own);
    its ratio to the network it came from is in the summary lines (`keeps x / y channels`) and
    the benchmarks count it against the dense model."""

    defaults = {"scope": "layer", "norm": 1, "amount": None}
    meets_model_budget = True  # the layers that shrink with the targets count: compress_ passes the model budget
    structural = True

    def apply(self, net, layers):
        scope, amount = self.options["scope"], self.options["amount"]
        if scope not in ("layer", "global"):
            raise self.error(f"scope {scope!r}; expected 'layer' or 'global'")
        if (self.spec.budget is None) == (amount is None):
            raise self.error("expected a budget or options.amount (one of them)")
        shape = getattr(net, "input_shape", None)
        if shape is None:
            raise self.error("the network has no input_shape: expected one built by sepnet.network.build_network")
        names = [name for name, _ in layers]
        if amount is None:
            amount = self._fraction_for_budget(net, names, shape)
        before = {name: _channels(net.get_submodule(name)) for name in names}
        self._prune(net, names, shape, float(amount))
        return [f"{name}: channel keeps {_channels(net.get_submodule(name))} / {before[name]} channels"
                for name in names]

    def _prune(self, net: nn.Module, names: list[str], shape, amount: float) -> None:
        import torch_pruning as tp

        if amount <= 0:
            return
        prunable = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        classifier = prunable[-1][1]  # the logits keep every class
        ignored = [m for n, m in prunable if n not in names or m is classifier]
        pruner = tp.pruner.MagnitudePruner(net, torch.rand(1, *shape), importance=tp.importance.MagnitudeImportance(
            p=self.options["norm"]), pruning_ratio=amount, global_pruning=self.options["scope"] == "global",
            ignored_layers=ignored)
        with torch.no_grad():
            pruner.step()

    def _size(self, net: nn.Module, names: list[str]) -> int:
        if self.spec.budget_of == "model":
            return sum(p.numel() for p in net.parameters())
        return sum(dense_size(net.get_submodule(n)) for n in names)

    def _fraction_for_budget(self, net: nn.Module, names: list[str], shape) -> float:
        """The smallest fraction of channels whose removal meets the budget (bisection)."""
        allowed = self._size(net, names) / self.spec.budget
        # at most all but 2 channels of the narrowest layer: past that torch-pruning leaves a layer
        # whole rather than empty, and the size stops falling with the fraction
        classifier = [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
        low, high = 0.0, 1 - 2 / min(_channels(net.get_submodule(n)) for n in names if n != classifier)
        trial = copy.deepcopy(net)
        self._prune(trial, names, shape, high)
        if self._size(trial, names) > allowed:
            raise self.error(f"budget {self.spec.budget:g}x is unreachable: removing {high:.0%} of the channels of "
                             f"{self.spec.targets} leaves {self._size(trial, names):,} parameters, {int(allowed):,} allowed")
        for _ in range(12):
            middle = (low + high) / 2
            trial = copy.deepcopy(net)
            self._prune(trial, names, shape, middle)
            low, high = (middle, high) if self._size(trial, names) > allowed else (low, middle)
        return high


def _channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
