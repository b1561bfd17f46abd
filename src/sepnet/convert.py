"""Replace nn.Linear layers of any model by separable ones."""

from __future__ import annotations

import fnmatch
import logging
from typing import Iterator, Literal, Sequence

from torch import nn

from sepnet.layers import FlatSeparableLinear, check_factor_shapes

log = logging.getLogger(__name__)

__all__ = ["balanced_factorization", "factor_shapes", "separable_"]


def _ordered_factorizations(n: int, modes: int, smallest: int) -> Iterator[tuple[int, ...]]:
    if modes == 1:
        if n >= smallest:
            yield (n,)
        return
    d = smallest
    while d ** modes <= n:
        if n % d == 0:
            for rest in _ordered_factorizations(n // d, modes - 1, d):
                yield (d, *rest)
        d += 1


def balanced_factorization(n: int, modes: int) -> tuple[int, ...]:
    """Split n into `modes` factors > 1 (ascending) that are as equal as possible.

    Raises ValueError when n has fewer than `modes` prime factors (e.g. 7 into 2 factors).
    """
    if modes < 1:
        raise ValueError(f"number of modes must be >= 1, got {modes}")
    if modes == 1:
        return (n,)
    candidates = list(_ordered_factorizations(n, modes, 2))
    if not candidates:
        raise ValueError(
            f"cannot split {n} features into {modes} factors > 1; give the factor shapes "
            "explicitly or use fewer modes"
        )
    return min(candidates, key=lambda f: (f[-1] / f[0], sum(f)))


def factor_shapes(in_features: int, out_features: int, modes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Automatic (in_shape, out_shape) for a flat in_features -> out_features layer."""
    return balanced_factorization(in_features, modes), balanced_factorization(out_features, modes)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def separable_(
    model: nn.Module,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    modes: int = 2,
    rank: int = 1,
    init: Literal["random", "from_linear"] = "from_linear",
    shapes: dict[str, tuple[Sequence[int], Sequence[int]]] | None = None,
) -> dict[str, FlatSeparableLinear]:
    """Replace, in place, every nn.Linear whose qualified name matches a glob in `include` (and
    none in `exclude`) by a FlatSeparableLinear acting on the last dim.

    Args:
        model: any module, e.g. a timm ViT ("blocks.*.mlp.fc1", "blocks.*.attn.qkv", "head").
        include: glob patterns on qualified module names.
        exclude: glob patterns to skip.
        modes: number of factors per layer when the shapes are automatic.
        rank: Kronecker terms per layer.
        init: "from_linear" (nearest Kronecker sum to the current weights) or "random".
        shapes: explicit {name: (in_shape, out_shape)}; other layers get balanced shapes.
    Returns:
        {qualified name: new layer}.
    """
    if init not in ("random", "from_linear"):
        raise ValueError(f"unknown init {init!r}; expected 'random' or 'from_linear'")
    shapes = dict(shapes or {})
    targets = [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and _matches(name, include) and not _matches(name, exclude)
    ]
    unknown = set(shapes) - {name for name, _ in targets}
    if unknown:
        raise ValueError(f"shapes given for {sorted(unknown)}, which are not matched nn.Linear layers")
    replaced = {}
    for name, linear in targets:
        in_shape, out_shape = shapes.get(name) or factor_shapes(linear.in_features, linear.out_features, modes)
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        try:
            check_factor_shapes(linear, in_shape, out_shape)
        except ValueError as err:
            raise ValueError(f"{name!r}: {err}") from None
        if init == "from_linear":
            layer = FlatSeparableLinear.from_linear(linear, in_shape, out_shape, rank)
            log.info("%s: Kronecker approximation relative error %.4f", name, layer.approximation_error)
        else:
            layer = FlatSeparableLinear(in_shape, out_shape, rank, bias=linear.bias is not None)
            layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        replaced[name] = layer
    return replaced
