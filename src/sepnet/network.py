"""The plain network: normalize -> backbone -> head, pixels in [0, 1] in, logits out. Built
without Lightning, so export, the benchmarks and a user's own loop get the same model that
`ImageClassifier` trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from sepnet.backbones import build_backbone
from sepnet.compress import CompressionSpec, compress_
from sepnet.heads import HEADS
from sepnet.lipschitz import LipschitzChain, LipschitzModule

__all__ = ["NetworkConfig", "Normalize", "Network", "build_network", "load_weights_"]


@dataclass(frozen=True)
class NetworkConfig:
    """The `model.network` section. backbone: a name of sepnet.backbones.BACKBONES ("mlp",
    "vgg16", "vit", "resnet34"); backbone_kwargs: its builder's options; head: a name of
    sepnet.heads.HEADS ("dense", "separable"); head_kwargs: the head's options, over the
    backbone's defaults for that head; init_from: weights of the uncompressed network to start
    from (a Lightning checkpoint of an ImageClassifier, or a state dict of its `net`), loaded
    before the compressors run -- prune or decompose a trained model; compression: compressors
    applied in order (sepnet.compress.CompressionSpec: method, targets, exclude, budget,
    options). A checkpoint of the compressed run holds everything: init_from is read again when
    the network is rebuilt, so keep the file where it was. scale_inputs: divide by the
    dataset's std after subtracting its mean (the usual); False subtracts the mean only, as
    certified networks do: a division by std ~0.25 multiplies the Lipschitz bound by 1 / min(std)
    (4.1 on CIFAR-10), so every certified margin would have to be 4x larger."""

    backbone: str = "mlp"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    head: str = "separable"
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    compression: list[CompressionSpec] = field(default_factory=list)
    scale_inputs: bool = True

    def __post_init__(self) -> None:
        specs = [s if isinstance(s, CompressionSpec) else CompressionSpec(**s) for s in self.compression or []]
        object.__setattr__(self, "compression", specs)


class Normalize(LipschitzModule):
    """(x - mean) / std per channel: the model's first layer, so attacks work on [0, 1] pixels.
    A per-channel diagonal map: its L2 constant is exactly 1 / min(std)."""

    lipschitz_rule = "1 / min(std)"

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def lipschitz_constant(self) -> float:
        return 1.0 / float(self.std.min())


class Network(LipschitzChain, nn.Module):
    """The plain model: normalize, backbone, head. Pixels in [0, 1] in, logits out."""

    lipschitz_parts = ("normalize", "backbone", "head")

    def __init__(self, normalize: Normalize, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.normalize, self.backbone, self.head = normalize, backbone, head
        self.compression_summary: list[str] = []  # one line per layer a compressor changed

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(self.normalize(x)))


def load_weights_(net: nn.Module, path: str) -> None:
    """Weights of `net` from a Lightning checkpoint ("net." keys) or a plain state dict; a
    file that does not fit is a one-line error naming the first key that differs."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"network.init_from {path} does not exist: expected a checkpoint or state dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, ...
        raise ValueError(f"network.init_from {path} is unreadable ({type(err).__name__}): expected a "
                         "checkpoint or state dict file") from None
    if "state_dict" in state:
        state = {k[4:]: v for k, v in state["state_dict"].items() if k.startswith("net.")}
    own = net.state_dict()
    for key, value in own.items():
        if key not in state or state[key].shape != value.shape:
            got = "missing" if key not in state else tuple(state[key].shape)
            raise ValueError(f"network.init_from {path} does not fit the network before compression: {key} is "
                             f"{got} there, expected {tuple(value.shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise ValueError(f"network.init_from {path} has {extra[0]}, which the network before compression "
                         "lacks: expected the weights of the uncompressed network")
    net.load_state_dict(state)


def build_network(num_classes: int = 10, image_shape: Sequence[int] = (3, 32, 32),
                  mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                  backbone: str = "mlp", backbone_kwargs: dict[str, Any] | None = None,
                  head: str = "separable", head_kwargs: dict[str, Any] | None = None,
                  init_from: str | None = None, compression: Sequence[CompressionSpec | dict] = (),
                  scale_inputs: bool = True) -> Network:
    """A backbone of sepnet.backbones.BACKBONES with a head of sepnet.heads.HEADS; the head's
    options go over the backbone's defaults for that head; then the weights of `init_from` and
    the compressors, in order. scale_inputs False: normalize by the mean only (NetworkConfig)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {sorted(HEADS)}")
    built = build_backbone(backbone, image_shape, **(backbone_kwargs or {}))
    head_args = {**built.head_defaults.get(head, {}), **(head_kwargs or {})}
    normalize = Normalize(mean, std if scale_inputs else [1.0] * len(std))
    net = Network(normalize, built.module, HEADS[head](built.out_shape, num_classes, **head_args))
    net.input_shape = tuple(image_shape)  # one image's (C, H, W): what a structural pruner traces with
    if init_from:
        load_weights_(net, init_from)
    net.compression_summary = compress_(net, compression)
    return net
