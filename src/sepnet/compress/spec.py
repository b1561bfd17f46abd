"""The `network.compression` entries, the registry of compression methods, and `compress_`.

A method is a `Compressor` subclass that registers itself by name when its module is imported:

    class LowRank(Factorization, name="lowrank", targets=(nn.Linear, nn.Conv2d)):
        defaults = {"rank": 8, "init": "svd"}
        ...

`compress_` looks methods up by that name; nothing here names one.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Sequence

from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from sepnet.masks import masked_layers
from sepnet.measures import parameter_counts

log = logging.getLogger(__name__)

__all__ = ["CompressionSpec", "Compressor", "compress_", "dense_size", "replace_module", "methods"]


class Compressor:
    """One compression method applied to the layers an entry targets.

    Class keywords (at registration): name (the entry's `method`), targets (the layer types it
    acts on; exactly these types, not subclasses). Class attributes: defaults (every option and
    its default; other option names are refused), prunes (its budget counts the weights it
    masks, biases kept). `apply` changes the network in place and returns one summary line per
    layer (or group) it changed; training-time work goes into a `sepnet.compress.hooks`
    CompressionHook that `apply` attaches to the network.
    """

    registry: ClassVar[dict[str, type["Compressor"]]] = {}
    name: ClassVar[str] = ""
    targets: ClassVar[tuple[type[nn.Module], ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    prunes: ClassVar[bool] = False
    meets_model_budget: ClassVar[bool] = False  # True: takes a budget_of "model" as it is (see ChannelPruning)
    structural: ClassVar[bool] = False  # True: leaves a smaller dense network, whose dense size is its own

    def __init_subclass__(cls, name: str | None = None, targets: Sequence[type[nn.Module]] = (), **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:  # an intermediate base (Factorization, Pruner) registers nothing
            return
        if name in Compressor.registry:
            raise ValueError(f"compression method {name!r} is registered twice ({Compressor.registry[name].__name__}, "
                             f"{cls.__name__})")
        cls.name, cls.targets = name, tuple(targets)
        Compressor.registry[name] = cls

    def __init__(self, spec: "CompressionSpec") -> None:
        unknown = sorted(set(spec.options) - set(self.defaults))
        if unknown:
            raise ValueError(f"compression {self.name}: unknown option {unknown[0]!r}; expected some of "
                             f"{sorted(self.defaults)}")
        self.spec = spec
        self.options = {**self.defaults, **spec.options}

    def apply(self, net: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[str]:
        raise NotImplementedError

    def error(self, message: str) -> ValueError:
        return ValueError(f"compression {self.name}: {message}")


def methods() -> list[str]:
    """The registered method names."""
    return sorted(Compressor.registry)


@dataclass(frozen=True)
class CompressionSpec:
    """One compressor. method: a registered method name (`methods()`). targets / exclude: globs
    on qualified module names. budget: target compression (> 1), or None to use the options
    alone. budget_of: "targets" (the budget is the targeted layers' own compression) or "model"
    (the whole network's non-zero compression once this entry is applied: the targets get what
    the rest of the network, as the earlier entries left it, does not use). options: the
    method's own (see each method's docstring)."""

    method: str
    targets: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    budget: float | None = None
    budget_of: str = "targets"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in Compressor.registry:
            raise ValueError(f"unknown compression method {self.method!r}; expected one of {methods()}")
        if self.budget_of not in ("targets", "model"):
            raise ValueError(f"compression budget_of {self.budget_of!r}: expected 'targets' or 'model'")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 1):
            raise ValueError(f"compression budget {self.budget} for {self.method}: expected a compression "
                             "factor > 1 (10 = ten times fewer parameters)")

    @property
    def compressor(self) -> type[Compressor]:
        return Compressor.registry[self.method]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def dense_size(m: nn.Module) -> int:
    """Parameters a (dense) module holds."""
    return sum(p.numel() for p in m.parameters())


def replace_module(net: nn.Module, name: str, layer: nn.Module) -> None:
    """Put `layer` where `name` is, on the device and in the dtype of the module it replaces."""
    old = net.get_submodule(name)
    reference = next(old.parameters(), None)
    if reference is not None:
        layer.to(device=reference.device, dtype=reference.dtype)
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent), child, layer)


def _targets(net: nn.Module, spec: CompressionSpec) -> list[tuple[str, nn.Module]]:
    kinds = spec.compressor.targets
    found = [(name, m) for name, m in net.named_modules()
             if type_before_parametrizations(m) in kinds and _matches(name, spec.targets)
             and not _matches(name, spec.exclude)]
    pruned = {name for name, _, _ in masked_layers(net)}
    masked = [name for name, _ in found if name in pruned]
    if masked:
        raise ValueError(f"compression {spec.method}: {masked[0]} is already pruned; expected pruning "
                         "after the factorizations in the compression list")
    if not found:
        layers = [name for name, m in net.named_modules() if type_before_parametrizations(m) in kinds]
        raise ValueError(f"compression {spec.method}: targets {spec.targets} match no "
                         f"{'/'.join(k.__name__ for k in kinds)} layer; expected some of {layers[:8]}"
                         f"{' ...' if len(layers) > 8 else ''}")
    return found


def _as_target_budget(net: nn.Module, spec: CompressionSpec, targets: list[tuple[str, nn.Module]]) -> CompressionSpec:
    """A whole-model budget as the budget of this entry's targets, given the rest of the network."""
    model = parameter_counts(net)
    target_dense = sum(dense_size(m) for _, m in targets)
    # the rest of the network at what training will make of it: every parameter counts (a bias
    # or norm shift initialized at zero does not stay zero) except the weights a mask holds at zero
    own = {id(p) for _, m in targets for p in m.parameters()}
    rest = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values() if id(p) not in own)
    rest -= sum(int((masked.current_mask() == 0).sum()) for _, _, masked in masked_layers(net))
    allowed = model.dense / spec.budget - rest
    if allowed <= 0:
        raise ValueError(f"compression {spec.method}: whole-model budget {spec.budget:g}x is unreachable: the "
                         f"layers outside {spec.targets} already have {rest:,} non-zero parameters, "
                         f"{int(model.dense / spec.budget):,} allowed for the whole model")
    if allowed >= target_dense:
        raise ValueError(f"compression {spec.method}: whole-model budget {spec.budget:g}x is met without "
                         f"compressing {spec.targets}: expected a larger budget or other targets")
    if spec.compressor.prunes:  # pruning keeps the biases: the weights carry the whole budget
        weights = sum(m.weight.numel() for _, m in targets)
        biases = target_dense - weights
        if allowed - biases < len(targets):
            raise ValueError(f"compression {spec.method}: whole-model budget {spec.budget:g}x is unreachable: "
                             f"{spec.targets} keep {biases:,} biases, {int(allowed):,} non-zero parameters allowed "
                             "for them")
        return replace(spec, budget=weights / (allowed - biases), budget_of="targets")
    return replace(spec, budget=target_dense / allowed, budget_of="targets")


def _restore_modes(net: nn.Module, modes: dict[str, bool]) -> None:
    """Each module back in the train / eval mode it had before a compressor ran (a module the
    compressor made takes its parent's): a library may trace the network in eval mode and leave
    it there (torch-pruning's dependency graph does), and a network left in eval mode trains
    with its BatchNorm frozen at the running statistics of the layers it had before, and dead."""
    root, resolved = modes.get("", net.training), {}
    for name, m in net.named_modules():  # parents come before their children
        m.training = resolved[name] = modes.get(name, resolved.get(name.rpartition(".")[0], root))


def compress_(net: nn.Module, specs: Sequence[CompressionSpec | dict]) -> list[str]:
    """Apply the compressors in order, in place; returns one summary line per layer changed."""
    lines = []
    for spec in specs:
        spec = spec if isinstance(spec, CompressionSpec) else CompressionSpec(**spec)
        compressor = spec.compressor(spec)  # options checked before anything changes
        targets = _targets(net, spec)
        if spec.budget is not None and spec.budget_of == "model" and not compressor.meets_model_budget:
            spec = _as_target_budget(net, spec, targets)
            compressor.spec = spec
        modes = {name: m.training for name, m in net.named_modules()}
        lines += compressor.apply(net, targets)
        _restore_modes(net, modes)
    for line in lines:
        log.debug("compression: %s", line)
    return lines
