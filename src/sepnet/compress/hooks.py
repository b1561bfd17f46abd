"""Training-time work of compressors: a loss term each step and a step at each epoch start.

A compressor that needs it (HYDRA's score phase, the Lagrangian-dual pruning) attaches a
`CompressionHook` to the network in its `apply`; the training module calls `compression_loss`
and `compression_epoch_`, which name no method. Hooks are submodules of the network
(`net.compression_hooks`), so their buffers go into checkpoints and a resumed run continues.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CompressionHook", "attach_hook", "compression_hooks", "compression_loss", "compression_epoch_"]


class CompressionHook(nn.Module):
    """One compressor's training-time work. Override either method; both default to nothing."""

    def loss(self, x: Tensor, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(term added to the training loss, values to log) for the batch the logits are of."""
        return logits.new_zeros(()), {}

    def epoch_start(self, epoch: int) -> None:
        """At the start of training epoch `epoch` (0-based; also the first epoch of a resumed run)."""


def attach_hook(net: nn.Module, hook: CompressionHook) -> CompressionHook:
    if not hasattr(net, "compression_hooks"):
        net.compression_hooks = nn.ModuleList()
    net.compression_hooks.append(hook)
    return hook


def compression_hooks(net: nn.Module) -> list[CompressionHook]:
    """The network's hooks (no module walk: this runs every training step)."""
    return list(getattr(net, "compression_hooks", ()))


def compression_loss(net: nn.Module, x: Tensor, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Every hook's training term for the batch the logits are of, and the values to log."""
    total, parts = logits.new_zeros(()), {}
    for hook in compression_hooks(net):
        loss, logged = hook.loss(x, logits)
        total = total + loss
        parts.update(logged)
    return total, parts


def compression_epoch_(net: nn.Module, epoch: int) -> None:
    """Every hook's epoch-start step."""
    for hook in compression_hooks(net):
        hook.epoch_start(epoch)
