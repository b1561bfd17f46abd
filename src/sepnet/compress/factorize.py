"""Factorizations: compressors that replace layers by factorized layers of a chosen rank.

`Factorization.apply` is the one loop every such method shares: split the targets into units
(a layer, or a group that shares factors), give each unit a rank (from the budget, or the
`rank` option), build its layers and put them in place on the device and in the dtype of the
layers they replace. A method gives `units`, `build` and, for a budget, each unit's cost(rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from sepnet.compress.spec import Compressor, dense_size, replace_module
from sepnet.convert import balanced_factorization

__all__ = ["Factorization", "Unit", "largest_fitting", "mode_split"]


def largest_fitting(fits: Callable[[int], bool], top: int) -> int:
    """The largest r in [1, top] with fits(r), for fits true at 1 and monotone."""
    low, high = 1, top
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def mode_split(n: int, modes: int) -> tuple[int, ...]:
    """n split into `modes` balanced factors; where n has too few prime factors (10 into 3),
    leading modes of size 1 fill up (1, 2, 5)."""
    for used in range(modes, 0, -1):
        try:
            return (1,) * (modes - used) + balanced_factorization(n, used)
        except ValueError:
            continue
    raise AssertionError("unreachable: one factor always works")


@dataclass
class Unit:
    """Layers that get one rank together. cost(rank): parameters they store at that rank, biases
    included. plan: whatever `build` needs (shapes, modes)."""

    layers: list[tuple[str, nn.Module]]
    cost: Callable[[int], int]
    plan: Any = None

    @property
    def dense(self) -> int:
        return sum(dense_size(m) for _, m in self.layers)

    @property
    def name(self) -> str:
        return ", ".join(name for name, _ in self.layers)


class Factorization(Compressor):
    """Base of the factorizing compressors (no name: registers nothing itself)."""

    defaults = {"rank": 8}

    def units(self, net: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[Unit]:
        raise NotImplementedError

    def check_choice(self, option: str, allowed: tuple[str, ...]) -> None:
        """A one-line error when options[option] is not one of `allowed`."""
        if self.options[option] not in allowed:
            raise self.error(f"{option} {self.options[option]!r}; expected one of {list(allowed)}")

    def build(self, unit: Unit, rank: int) -> tuple[list[nn.Module], str]:
        """(one new layer per unit layer, the summary's text after "name: ")."""
        raise NotImplementedError

    def kept(self, net: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
        """Targets the method leaves dense (their parameters still count against the budget)."""
        return []

    def option_ranks(self, units: list[Unit]) -> list[int]:
        """Ranks without a budget: the `rank` option for every unit."""
        return [int(self.options["rank"])] * len(units)

    def budget_ranks(self, units: list[Unit], kept: int = 0) -> list[int]:
        """One rank per unit for the budget over all of them together: the largest common rank r
        (each unit capped where it would store as much as its dense parameters) whose total
        stays within (sum(dense) + kept) / budget - kept. Small layers (a 10-class classifier)
        thus keep their full rank while the big ones carry the compression."""
        caps = [largest_fitting(lambda r, u=u: u.cost(r) <= u.dense, u.dense) if u.cost(1) <= u.dense else 1
                for u in units]
        allowed = (sum(u.dense for u in units) + kept) / self.spec.budget - kept

        def total(r: int) -> int:
            return sum(u.cost(min(r, cap)) for u, cap in zip(units, caps))

        if total(1) > allowed:
            raise self.error(f"budget {self.spec.budget:g}x is unreachable for {self.spec.targets}: rank 1 "
                             f"already stores {total(1):,} of their {sum(u.dense for u in units):,} parameters, "
                             f"{int(allowed):,} allowed")
        r = largest_fitting(lambda r: total(r) <= allowed, max(caps))
        return [min(r, cap) for cap in caps]

    def apply(self, net: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[str]:
        kept = self.kept(net, layers)
        kept_names = {name for name, _ in kept}
        units = self.units(net, [(n, m) for n, m in layers if n not in kept_names])
        if self.spec.budget is not None:
            ranks = self.budget_ranks(units, kept=sum(dense_size(m) for _, m in kept))
        else:
            ranks = self.option_ranks(units)
        lines = [f"{name}: {self.name} leaves it dense" for name, _ in kept]
        for unit, rank in zip(units, ranks):
            new, text = self.build(unit, rank)
            for (name, _), layer in zip(unit.layers, new):
                replace_module(net, name, layer)
            lines.append(f"{unit.name}: {text}")
        return lines
