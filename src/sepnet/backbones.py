"""Feature extractors: (B, C, H, W) pixels (already normalized) -> unflattened features.

Each builder returns a `Backbone`: the module, its feature shape, and the head settings that
make the classic architecture (VGG's 4096-wide classifier, ResNet's pooled linear layer).
Looked up by name in `BACKBONES`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import timm
import torch
import torchvision
from torch import nn

from sepnet.activations import MaxMin
from sepnet.convert import balanced_factorization, separable_
from sepnet.guards import eval_mode
from sepnet.layers import SeparableLinear
from sepnet.lipschitz_layers import OrthoConv2d, SeparablePointwise

__all__ = ["Backbone", "BACKBONES", "build_backbone"]


@dataclass
class Backbone:
    module: nn.Module
    out_shape: tuple[int, ...]
    head_defaults: dict[str, dict] = field(default_factory=dict)


# --------------------------------------------------------------------------- MLP
def mlp(image_shape: Sequence[int], hidden_shapes: Sequence[Sequence[int]] = ((8, 16, 16), (8, 16, 16)),
        rank: int = 1, dropout: float = 0.0, dense: bool = False) -> Backbone:
    """MLP whose layers are all separable: (C, H, W) in, never flattened. `dense=True` builds the
    dense baseline with the same widths (flatten, nn.Linear, unflatten to the hidden shape)."""
    layers: list[nn.Module] = []
    shape = tuple(image_shape)
    for out in hidden_shapes:
        out = tuple(out)
        if dense:
            layer = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), math.prod(out)), nn.Unflatten(1, out))
        else:
            layer = SeparableLinear(shape, out, rank)
        layers += [layer, nn.ReLU(inplace=True), nn.Dropout(dropout)]
        shape = out
    head = {"separable": {"separable_classifier": True, "rank": rank}}
    return Backbone(nn.Sequential(*layers), shape, head)


def lipmlp(image_shape: Sequence[int], hidden_shapes: Sequence[Sequence[int]] = ((8, 16, 16), (8, 16, 16)),
           rank: int = 1) -> Backbone:
    """The all-separable MLP made certifiable: every layer an orthogonal SeparableLinear (spectral
    norm exactly 1) followed by MaxMin (1-Lipschitz) on the first feature mode (even sizes), so
    that with the orthogonal separable classifier (its default head) the network's L2 Lipschitz
    constant is 1 / min(std) of its normalization (sepnet.lipschitz)."""
    layers: list[nn.Module] = []
    shape = tuple(image_shape)
    for out in hidden_shapes:
        out = tuple(out)
        if out[0] % 2:
            raise ValueError(f"lipmlp hidden shape {list(out)}: MaxMin pairs the first mode, expected it even")
        layers += [SeparableLinear(shape, out, rank, orthogonal=True), MaxMin(dim=1)]
        shape = out
    head = {"separable": {"separable_classifier": True, "rank": rank, "orthogonal": True}}
    return Backbone(nn.Sequential(*layers), shape, head)


def lipconvnet(image_shape: Sequence[int], widths: Sequence[int] = (16, 32, 64), depth: int = 1,
               kernel_size: int = 3, pointwise: str = "dense", padding_mode: str = "circular",
               stem_kernel_size: int | None = None) -> Backbone:
    """A small 1-Lipschitz convnet (ConvNet-XS style, Boissin et al. 2025's AOC layers): per
    stage an orthogonal k x k convolution and MaxMin, `depth` times, stages joined by an
    invertible 2x2 space-to-depth (PixelUnshuffle: a permutation, norm 1) and an orthogonal 1x1
    map to the next width; the RGB stem is an orthogonal k x k convolution.

    pointwise: the 1x1 maps, "dense" (orthogonal 1x1 convolutions) or "separable" (their channel
        matrix a Kronecker product of orthogonal factors, SeparablePointwise): the maps between
        stages, and with kernel_size 1 the stages' own maps too; the head follows: "dense" is an
        orthogonal Linear on the flattened features, "separable" an orthogonal separable classifier.
    kernel_size: the stages' convolutions; stem_kernel_size: the RGB stem's (default the same).
        kernel_size 1 gives a network whose arithmetic is all in 1x1 maps (spatial mixing from
        the stem and the space-to-depth steps), where a Kronecker map of (a x a) (x) (b x b)
        factors costs c (a + b) multiply-adds a pixel against a dense one's c^2.
    Widths must be even (MaxMin pairs channels)."""
    if pointwise not in ("dense", "separable"):
        raise ValueError(f"lipconvnet pointwise {pointwise!r}: expected 'dense' or 'separable'")
    if depth < 1 or not widths or any(w < 2 or w % 2 for w in widths):
        raise ValueError(f"lipconvnet widths {list(widths)} and depth {depth}: expected even widths and depth >= 1")
    channels, h, w = image_shape
    stem_kernel_size = kernel_size if stem_kernel_size is None else stem_kernel_size

    def stage_map(width: int) -> nn.Module:
        if kernel_size == 1 and pointwise == "separable":
            return SeparablePointwise(balanced_factorization(width, 2), balanced_factorization(width, 2))
        return OrthoConv2d(width, width, kernel_size, (h, w), padding_mode)

    layers: list[nn.Module] = []
    for stage, width in enumerate(widths):
        if stage == 0:
            layers += [OrthoConv2d(channels, width, stem_kernel_size, (h, w), padding_mode), MaxMin(dim=1)]
        else:
            if h % 2 or w % 2:
                raise _TooSmall(f"a {h}x{w} map cannot be halved for stage {stage + 1}")
            layers.append(nn.PixelUnshuffle(2))
            channels, h, w = 4 * channels, h // 2, w // 2
            if pointwise == "dense":
                layers.append(OrthoConv2d(channels, width, 1, (h, w), padding_mode))
            else:
                layers.append(SeparablePointwise(balanced_factorization(channels, 2), balanced_factorization(width, 2)))
            layers.append(MaxMin(dim=1))
        layers += [m for _ in range(depth - (stage == 0)) for m in (stage_map(width), MaxMin(dim=1))]
        channels = width
    head = {"dense": {"orthogonal": True},
            "separable": {"separable_classifier": True, "orthogonal": True}}
    return Backbone(nn.Sequential(*layers), (channels, h, w), head)


# --------------------------------------------------------------------------- VGG-16
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16(image_shape: Sequence[int], variant: str = "cifar", width: float = 1.0,
          batch_norm: bool = True) -> Backbone:
    """VGG-16 convolutions. "cifar" drops the last pool so 32x32 inputs keep a 512x2x2 map;
    "imagenet" ends with the 7x7 adaptive pool of torchvision's VGG (512x7x7 for the head).
    `width` scales every convolution's channel count (0.25 gives a CPU-sized network of the same
    shape); the heads keep their widths (512, or 4096 for "imagenet", dense and separable alike)
    so that dense and separable heads are compared at the same width."""
    if variant not in ("cifar", "imagenet"):
        raise ValueError(f"unknown VGG variant {variant!r}; expected 'cifar' or 'imagenet'")
    cfg = VGG16[:-1] if variant == "cifar" else VGG16
    layers: list[nn.Module] = []
    channels = image_shape[0]
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = max(1, int(round(v * width)))
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm)]
        layers += [nn.BatchNorm2d(out)] if batch_norm else []
        layers.append(nn.ReLU(inplace=True))
        channels = out
    if variant == "imagenet":
        layers.append(nn.AdaptiveAvgPool2d(7))
    module = nn.Sequential(*layers)
    out_shape = _probe(module, image_shape)
    hidden = 4096 if variant == "imagenet" else 512
    sep_hidden = (16, 16, 16) if variant == "imagenet" else (8, 8, 8)
    return Backbone(module, out_shape, {
        "dense": {"hidden": [hidden] * 2, "dropout": 0.5},
        "separable": {"hidden_shapes": [sep_hidden, sep_hidden], "dropout": 0.5},
    })


# --------------------------------------------------------------------------- ViT (timm)
def vit(image_shape: Sequence[int], model_name: str = "vit_tiny_patch16_224", patch_size: int = 4,
        depth: int | None = None, embed_dim: int | None = None, num_heads: int | None = None,
        separable_blocks: Sequence[str] = (), modes: int = 2, rank: int = 1) -> Backbone:
    """timm ViT returning pooled tokens (D,). `separable_blocks` picks block layers to make
    separable by glob ("mlp.fc1", "mlp.fc2", "attn.qkv", "attn.proj")."""
    overrides = {k: v for k, v in dict(depth=depth, embed_dim=embed_dim, num_heads=num_heads).items()
                 if v is not None}
    model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=image_shape[1:],
                              patch_size=patch_size, in_chans=image_shape[0], **overrides)
    if separable_blocks:
        separable_(model, include=[f"blocks.*.{p}" for p in separable_blocks], modes=modes,
                   rank=rank, init="random")
    return Backbone(model, (model.num_features,), {"separable": {"separable_classifier": True}})


# --------------------------------------------------------------------------- ResNet-34
def resnet34(image_shape: Sequence[int], stem: str = "cifar") -> Backbone:
    """torchvision ResNet-34 up to layer4 (no pool, no fc). "cifar" stem: 3x3 stride-1 conv and
    no max-pool (32x32 -> 512x4x4); "imagenet": the standard 7x7 stride-2 stem."""
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"unknown ResNet stem {stem!r}; expected 'cifar' or 'imagenet'")
    net = torchvision.models.resnet34(weights=None)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(image_shape[0], 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif image_shape[0] != 3:
        net.conv1 = nn.Conv2d(image_shape[0], 64, 7, stride=2, padding=3, bias=False)
    module = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                           net.layer1, net.layer2, net.layer3, net.layer4)
    return Backbone(module, _probe(module, image_shape), {"dense": {"pool": True}})


def _probe(module: nn.Module, image_shape: Sequence[int]) -> tuple[int, ...]:
    """The feature shape for one image; an image too small for the backbone is a one-line error."""
    with torch.no_grad(), eval_mode(module):
        try:
            return tuple(module(torch.zeros(1, *image_shape)).shape[1:])
        except RuntimeError as err:
            raise _TooSmall(str(err).splitlines()[0]) from None


class _TooSmall(ValueError):
    """A feature extractor's probe failed on the configured image shape."""


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "mlp": mlp,
    "lipmlp": lipmlp,
    "lipconvnet": lipconvnet,
    "vgg16": vgg16,
    "vit": vit,
    "resnet34": resnet34,
}


def build_backbone(name: str, image_shape: Sequence[int], **kwargs) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    try:
        return BACKBONES[name](tuple(image_shape), **kwargs)
    except TypeError as err:  # an option the builder does not have
        raise ValueError(f"backbone {name!r}: {err}; expected options of "
                         f"{name}{inspect.signature(BACKBONES[name])}") from None
    except _TooSmall as err:
        raise ValueError(f"backbone {name!r} cannot take images of shape {tuple(image_shape)}: "
                         f"expected larger images ({err})") from None
