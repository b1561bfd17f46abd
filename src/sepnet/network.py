"""The plain network: normalize -> backbone -> head, pixels in [0, 1] in, logits out. Built
without Lightning, so export, the benchmarks and a user's own loop get the same model that
`ImageClassifier` trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from sepnet.backbones import build_backbone
from sepnet.compress import CompressionSpec, compress_
from sepnet.heads import HEADS

__all__ = ["NetworkConfig", "Normalize", "Network", "build_network"]


@dataclass(frozen=True)
class NetworkConfig:
    """The `model.network` section. backbone: a name of sepnet.backbones.BACKBONES ("mlp",
    "vgg16", "vit", "resnet34"); backbone_kwargs: its builder's options; head: a name of
    sepnet.heads.HEADS ("dense", "separable"); head_kwargs: the head's options, over the
    backbone's defaults for that head; compression: compressors applied after, in order
    (sepnet.compress.CompressionSpec: method, targets, exclude, budget, options)."""

    backbone: str = "mlp"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    head: str = "separable"
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    compression: list[CompressionSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        specs = [s if isinstance(s, CompressionSpec) else CompressionSpec(**s) for s in self.compression or []]
        object.__setattr__(self, "compression", specs)


class Normalize(nn.Module):
    """(x - mean) / std per channel: the model's first layer, so attacks work on [0, 1] pixels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Network(nn.Module):
    """The plain model: normalize, backbone, head. Pixels in [0, 1] in, logits out."""

    def __init__(self, normalize: Normalize, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.normalize, self.backbone, self.head = normalize, backbone, head
        self.compression_summary: list[str] = []  # one line per layer a compressor changed

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(self.normalize(x)))


def build_network(num_classes: int = 10, image_shape: Sequence[int] = (3, 32, 32),
                  mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                  backbone: str = "mlp", backbone_kwargs: dict[str, Any] | None = None,
                  head: str = "separable", head_kwargs: dict[str, Any] | None = None,
                  compression: Sequence[CompressionSpec | dict] = ()) -> Network:
    """A backbone of sepnet.backbones.BACKBONES with a head of sepnet.heads.HEADS; the head's
    options go over the backbone's defaults for that head; then the compressors, in order."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {sorted(HEADS)}")
    built = build_backbone(backbone, image_shape, **(backbone_kwargs or {}))
    head_args = {**built.head_defaults.get(head, {}), **(head_kwargs or {})}
    net = Network(Normalize(mean, std), built.module, HEADS[head](built.out_shape, num_classes, **head_args))
    net.compression_summary = compress_(net, compression)
    return net
