"""Pruning: compressors that mask weights instead of replacing layers, and `magnitude`.

A pruner's budget counts the weights it keeps (biases stay), so `budget_of: model` gives the
weights the whole remaining budget. Every output unit keeps at least one weight: a row pruned
away entirely would cut the network there.
"""

from __future__ import annotations

import logging

from torch import nn

from sepnet.compress.spec import Compressor
from sepnet.masks import mask_tensor_, remove_masks_, topk_masks

log = logging.getLogger(__name__)

__all__ = ["Pruner", "Magnitude", "remove_pruning_"]


class Pruner(Compressor):
    """Base of the pruning compressors (no name: registers nothing itself)."""

    prunes = True
    defaults = {"amount": None}

    def keep_fraction(self) -> float:
        """1 / budget, or 1 - options.amount (exactly one of them must be given)."""
        amount = self.options["amount"]
        if (self.spec.budget is None) == (amount is None):
            raise self.error("expected a budget or options.amount (one of them)")
        fraction = 1 / self.spec.budget if self.spec.budget is not None else 1 - float(amount)
        if not 0 < fraction <= 1:
            raise self.error(f"amount {amount} must be in [0, 1)")
        return fraction

    @staticmethod
    def layer_keep(weight, fraction: float) -> int:
        """Weights a layer keeps at `fraction`: at least one per output unit."""
        return min(weight.numel(), max(round(fraction * weight.numel()), weight.shape[0]))


class Magnitude(Pruner, name="magnitude", targets=(nn.Linear, nn.Conv2d)):
    """Unstructured magnitude pruning of nn.Linear / nn.Conv2d weights (biases kept), with
    sepnet.masks masks. options: scope ("layer": each layer keeps 1/budget of its
    weights; "global": the largest weights of all targets together, exactly the budget's
    count), amount (fraction pruned, instead of a budget). Either way each output unit keeps its
    largest weight, inside the count. The masks stay through fine-tuning; `remove_pruning_` makes
    them permanent."""

    defaults = {"scope": "layer", "amount": None}

    def apply(self, net, layers):
        scope = self.options["scope"]
        if scope not in ("layer", "global"):
            raise self.error(f"scope {scope!r}; expected 'layer' or 'global'")
        fraction = self.keep_fraction()
        weights = [m.weight.detach().abs() for _, m in layers]
        if scope == "global":
            total, rows = sum(w.numel() for w in weights), sum(w.shape[0] for w in weights)
            keep = round(fraction * total)
            if keep < rows:
                log.warning("compression magnitude: %s keeps %d weights, fewer than the %d output units; "
                            "each unit keeps one", self.spec.targets, keep, rows)
            masks = topk_masks(weights, max(keep, rows), every_row=True)
        else:
            masks = [topk_masks([w], self.layer_keep(w, fraction), every_row=True)[0] for w in weights]
        kept = [mask_tensor_(m, "weight", mask).keep for (_, m), mask in zip(layers, masks)]
        return [f"{name}: magnitude ({scope}) keeps {keep:,} / {m.weight.numel():,} weights"
                for (name, m), keep in zip(layers, kept)]


def remove_pruning_(net: nn.Module) -> nn.Module:
    """Make every pruning mask (sepnet.masks) permanent: zeros in the weights and factors, no
    mask buffer or parametrization. For export."""
    return remove_masks_(net)
