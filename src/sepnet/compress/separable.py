"""`separable`: nn.Linear -> FlatSeparableLinear, a sum of Kronecker products on the flat
features (sepnet.layers). options: modes (default 2), rank (int), init ("random" default, or
"from_linear": the nearest Kronecker sum to the current weights)."""

from __future__ import annotations

from torch import nn

from sepnet.compress.factorize import Factorization, Unit, mode_split
from sepnet.layers import FlatSeparableLinear


class Separable(Factorization, name="separable", targets=(nn.Linear,)):
    defaults = {"modes": 2, "rank": 1, "init": "random"}

    def units(self, net, layers):
        self.check_choice("init", ("random", "from_linear"))
        units = []
        for name, linear in layers:
            shapes = (mode_split(linear.in_features, self.options["modes"]),
                      mode_split(linear.out_features, self.options["modes"]))
            per_term = sum(i * o for i, o in zip(*shapes))
            bias = linear.out_features if linear.bias is not None else 0
            units.append(Unit([(name, linear)], lambda r, t=per_term, b=bias: r * t + b, shapes))
        return units

    def build(self, unit, rank):
        (_, linear), (in_shape, out_shape) = unit.layers[0], unit.plan
        if self.options["init"] == "from_linear":
            layer = FlatSeparableLinear.from_linear(linear, in_shape, out_shape, rank)
        else:
            layer = FlatSeparableLinear(in_shape, out_shape, rank, bias=linear.bias is not None)
        return [layer], (f"separable {in_shape} -> {out_shape} rank {rank}: "
                         f"{layer.stored_parameters():,} / {layer.dense_parameters():,}")
