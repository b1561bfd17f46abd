"""`hydra`: HYDRA (Sehwag et al. 2020), pruning with importance scores trained under the run's
(adversarial) loss."""

from __future__ import annotations

import math

from torch import Tensor, nn

from sepnet.compress.hooks import CompressionHook, attach_hook, compression_hooks
from sepnet.compress.prune import Pruner
from sepnet.masks import mask_tensor_, masked_layers, topk_masks

__all__ = ["Hydra", "ScorePhases", "hydra_scores"]


def hydra_scores(weight: Tensor) -> Tensor:
    """HYDRA's initial scores: proportional to the weights, sqrt(6 / fan_in) w / max|w|."""
    fan_in = weight[0].numel()
    return math.sqrt(6 / fan_in) * weight / weight.abs().max().clamp_min(1e-30)


class ScorePhases(CompressionHook):
    """At each epoch start: fix the masks whose score phase is over; while any layer is still in
    its score phase, only scores train (every other parameter frozen, as HYDRA does)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.__dict__["_net"] = net  # not a submodule: the hook lives inside it

    def epoch_start(self, epoch: int) -> None:
        layers = masked_layers(self._net)
        for _, _, masked in layers:
            if masked.scores is not None and epoch >= masked.score_epochs:
                masked.fix_()
        scoring = any(m.scoring for _, _, m in layers)
        scores = {id(m.scores) for _, _, m in layers if m.scores is not None}
        for p in self._net.parameters():
            p.requires_grad_((id(p) in scores) if scoring else (id(p) not in scores))


class Hydra(Pruner, name="hydra", targets=(nn.Linear, nn.Conv2d)):
    """Per-weight importance scores, initialized proportional to the weights (so the first mask
    is layer-wise magnitude pruning's), trained for `score_epochs` epochs under the run's loss
    with the weights frozen and the top-k mask in the forward (straight-through gradient); then
    the mask is fixed and the weights fine-tune. Start from a trained model (network.init_from).
    options: score_epochs (default 1), amount (fraction pruned, instead of a budget). Each
    layer keeps the same fraction, every output unit at least its highest-scored weight."""

    defaults = {"score_epochs": 1, "amount": None}

    def apply(self, net, layers):
        fraction, epochs = self.keep_fraction(), int(self.options["score_epochs"])
        if epochs < 0:
            raise self.error(f"score_epochs must be >= 0, got {epochs}")
        lines = []
        for name, m in layers:
            keep = self.layer_keep(m.weight, fraction)
            scores = hydra_scores(m.weight.detach())
            first = topk_masks([scores.abs()], keep, every_row=True)[0]  # the scores' top-k: the mask they start with
            mask_tensor_(m, "weight", first, keep, scores, epochs)
            lines.append(f"{name}: hydra keeps {keep:,} / {m.weight.numel():,} weights (scores for {epochs} epochs)")
        if not any(isinstance(h, ScorePhases) for h in compression_hooks(net)):
            attach_hook(net, ScorePhases(net))
        return lines
