"""Classifier heads over unflattened features: dense (the usual MLP) and separable."""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from sepnet.activations import MaxMin
from sepnet.convert import balanced_factorization
from sepnet.layers import SeparableLinear
from sepnet.lipschitz import LipschitzChain
from sepnet.lipschitz_layers import orthonormal_linear_, row_normalized_linear_

__all__ = ["DenseHead", "SeparableHead", "HEADS", "classifier_shape"]


def classifier_shape(num_classes: int, modes: int) -> tuple[int, ...]:
    """num_classes split into `modes` balanced factors, padded with leading 1s when it has too
    few prime factors (10 classes over 3 modes -> (1, 2, 5))."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for used in range(modes, 1, -1):
        try:
            return (1,) * (modes - used) + balanced_factorization(num_classes, used)
        except ValueError:
            continue
    return (1,) * (modes - 1) + (num_classes,)


class DenseHead(LipschitzChain, nn.Module):
    """Optional global average pool, flatten, dense hidden layers, dense classifier.

    Args:
        in_shape: feature shape from the backbone, e.g. (512, 2, 2).
        num_classes: output classes.
        hidden: widths of the hidden layers (VGG: [4096, 4096]; none for a linear head).
        dropout: dropout before each hidden and the classifier layer (VGG uses 0.5).
        pool: average-pool spatial dims first (ResNet style).
        orthogonal: every Linear's weight its (semi-)orthogonal polar factor (BjorckOrthonormal:
            norm at most 1), MaxMin instead of ReLU: a 1-Lipschitz head (sepnet.lipschitz
            certifies it).
        normalize_last: the classifier's rows each of unit norm instead (last-layer
            normalization, Singla et al. ICLR 2022; sepnet.lipschitz_layers.RowNormalized): its
            bound is its measured norm, and the pairwise certificate uses its row distances.
    """

    lipschitz_parts = ("layers",)

    def __init__(self, in_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (),
                 dropout: float = 0.0, pool: bool = False, orthogonal: bool = False,
                 normalize_last: bool = False) -> None:
        super().__init__()
        in_shape = tuple(in_shape)
        layers: list[nn.Module] = []
        if pool and len(in_shape) == 3:
            layers.append(nn.AdaptiveAvgPool2d(1))
            in_shape = in_shape[:1]
        layers.append(nn.Flatten())
        width = math.prod(in_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), MaxMin(dim=1) if orthogonal else nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        *hidden_layers, classifier = [layer for layer in layers if isinstance(layer, nn.Linear)]
        for layer in hidden_layers if orthogonal else ():
            orthonormal_linear_(layer)
        if normalize_last:
            row_normalized_linear_(classifier)
        elif orthogonal:
            orthonormal_linear_(classifier)
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class SeparableHead(LipschitzChain, nn.Module):
    """Chain of SeparableLinear layers on the unflattened features, then the classifier.

    Args:
        in_shape: feature shape from the backbone, e.g. (512, 2, 2); never flattened.
        num_classes: output classes.
        hidden_shapes: output shape of each hidden separable layer, same number of modes as
            in_shape, e.g. [[16, 16, 16], [16, 16, 16]] for VGG's 4096-wide layers.
        rank: Kronecker terms per separable layer.
        dropout: dropout after each hidden layer.
        separable_classifier: make the last layer separable too (num_classes split into as many
            factors as there are modes; an error if it cannot be); else a dense Linear on the
            flattened last hidden features.
        orthogonal: every separable layer orthogonal (1-Lipschitz), with MaxMin instead of ReLU
            after the hidden ones (sepnet.lipschitz certifies such a head).
        classifier_shape: the separable classifier's output shape (product num_classes, as many
            modes as the features; one -1 takes the classes the other modes leave, as in
            reshape), e.g. [-1, 1, 1]: every class from all channels, each spatial mode pooled by
            one learned vector; None splits num_classes over the modes ((1, 2, 5) for 10).
    """

    lipschitz_parts = ("layers",)

    def __init__(self, in_shape: Sequence[int], num_classes: int,
                 hidden_shapes: Sequence[Sequence[int]] = (), rank: int = 1, dropout: float = 0.0,
                 separable_classifier: bool = False, orthogonal: bool = False,
                 classifier_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        shape = tuple(in_shape)
        layers: list[nn.Module] = []
        for out in hidden_shapes:
            out = tuple(out)
            if len(out) != len(shape):
                raise ValueError(
                    f"hidden shape {list(out)} must have {len(shape)} modes like the features "
                    f"{list(shape)}"
                )
            activation = MaxMin(dim=1) if orthogonal else nn.ReLU(inplace=True)
            layers += [SeparableLinear(shape, out, rank, orthogonal=orthogonal), activation, nn.Dropout(dropout)]
            shape = out
        if separable_classifier:
            classes = _requested_classes(num_classes, len(shape), classifier_shape)
            layers += [SeparableLinear(shape, classes, rank, orthogonal=orthogonal), nn.Flatten()]
        else:
            layers += [nn.Flatten(), nn.Linear(math.prod(shape), num_classes)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


def _requested_classes(num_classes: int, modes: int, requested: Sequence[int] | None) -> tuple[int, ...]:
    """SeparableHead's classifier shape: `classifier_shape` when None; else `requested`, whose one
    -1 (as in reshape) takes the classes the other modes leave; a one-line error if it does not
    hold num_classes over `modes` modes."""
    if requested is None:
        return classifier_shape(num_classes, modes)
    classes = tuple(requested)
    if classes.count(-1) == 1:
        rest = math.prod(c for c in classes if c != -1)
        classes = tuple(num_classes // rest if c == -1 and num_classes % rest == 0 else c for c in classes)
    if math.prod(classes) != num_classes or len(classes) != modes:
        raise ValueError(f"head classifier_shape {list(classes)}: expected {modes} modes whose product is "
                         f"{num_classes} (the classes)")
    return classes


HEADS: dict[str, type[nn.Module]] = {"dense": DenseHead, "separable": SeparableHead}
