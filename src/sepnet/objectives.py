"""Training objectives: what a training step minimizes, one class a loss.

An objective is built once for a network (`build_objective`), prepares what it needs then (the
training attack's estimator, the Lipschitz bound of the margin loss) and is called the same way
for every batch: `objective(x, y)` gives the logits, the task loss, the figures to log and the
inputs the logits are of. The `model.adversarial` section (`AdversarialTraining`) chooses it by
`loss`, a name each objective registers, so no loss name can fall through to another's path.

    none              cross-entropy on the clean batch
    at                cross-entropy on adversarial examples (PGD-AT, fast FGSM, N-FGSM; `mix`)
    trades            TRADES: CE(clean) + beta KL(clean || adversarial)
    lipschitz_margin  certified training: CE with sqrt(2) L eps added to every wrong logit
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from sepnet import metric_names as names
from sepnet.attacks import Attacker, AttackSpec, eval_mode
from sepnet.lipschitz import final_linear, last_linear_weight, lipschitz_bound, lipschitz_margin_loss, row_distances

__all__ = ["AdversarialTraining", "Objective", "ObjectiveOutput", "build_objective", "objectives",
           "adversarial_batch", "trades_loss"]


class ObjectiveOutput(NamedTuple):
    logits: Tensor  # of `inputs`, in training mode
    loss: Tensor  # the task loss (the constraint and compression terms are added by the caller)
    logged: dict[str, Tensor]  # extra figures for the logger
    inputs: Tensor  # what the logits are of (the adversarial batch for "at")


class Objective:
    """One training objective. Subclasses register by `name` (the section's `loss`) and
    implement `__call__`; `prepare` (optional) runs once when the objective is built."""

    registry: ClassVar[dict[str, type["Objective"]]] = {}
    name: ClassVar[str] = ""
    attacks: ClassVar[tuple[str, ...] | None] = None  # the training attacks it accepts (None: any)
    uses_attack: ClassVar[bool] = True  # whether `attack` takes part at all

    def __init_subclass__(cls, name: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        if name in Objective.registry:
            raise ValueError(f"training objective {name!r} is registered twice")
        cls.name = name
        Objective.registry[name] = cls

    def __init__(self, config: "AdversarialTraining", net: nn.Module, attacker: Attacker) -> None:
        self.config, self.net, self.attacker = config, net, attacker

    def prepare(self) -> None:
        """Once, when the objective is built for its network (default: nothing)."""

    def __call__(self, x: Tensor, y: Tensor) -> ObjectiveOutput:
        raise NotImplementedError


def objectives() -> list[str]:
    """The registered objective names (`model.adversarial.loss`)."""
    return sorted(Objective.registry)


@dataclass(frozen=True)
class AdversarialTraining:
    """The `model.adversarial` section: which objective the network trains on.

    loss: a registered objective (`objectives()`): "none" (clean training), "at" (cross-entropy
        on adversarial examples: PGD-AT with a "pgd" attack, fast AT with "fgsm" (random start,
        step ~1.25 eps) or "nfgsm" (noise of 2 eps, step = eps, no clipping; resists
        catastrophic overfitting)), "trades" (CE(clean) + trades_beta KL(clean || adv), the
        attack maximizing that KL: "pgd" or "fgsm") or "lipschitz_margin" (certified training
        of a network with a fixed Lipschitz bound, no attack: cross-entropy with sqrt(2) L
        margin_eps added to every wrong logit, Tsuzuku et al. 2018).
    attack: the training attack, an AttackSpec (eps and step in pixel units).
    mix: fraction of each batch replaced by adversarial examples ("at" only; 1 = all).
    trades_beta: TRADES' weight of the robustness term.
    margin_eps, margin_temperature: the Lipschitz-margin loss's L2 radius (pixel units) and the
        temperature dividing its logits.
    """

    loss: str = "none"
    attack: AttackSpec = field(default_factory=AttackSpec)
    mix: float = 1.0
    trades_beta: float = 6.0
    margin_eps: float = 36 / 255
    margin_temperature: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.attack, dict):  # read back from a checkpoint's hyperparameters
            object.__setattr__(self, "attack", AttackSpec(**self.attack))
        if self.loss not in Objective.registry:
            raise ValueError(f"adversarial.loss {self.loss!r}: expected one of {objectives()}")
        if self.margin_eps < 0 or self.margin_temperature <= 0:
            raise ValueError(f"adversarial.margin_eps must be >= 0 and margin_temperature > 0, got "
                             f"{self.margin_eps} and {self.margin_temperature}")
        if not 0 <= self.mix <= 1:
            raise ValueError(f"adversarial.mix must be in [0, 1], got {self.mix}")
        if self.trades_beta < 0:
            raise ValueError(f"adversarial.trades_beta must be >= 0, got {self.trades_beta}")
        accepted = Objective.registry[self.loss].attacks
        if accepted is not None and self.attack.name not in accepted:
            raise ValueError(f"adversarial.attack {self.attack.name!r} cannot serve loss {self.loss!r}: "
                             f"expected one of {list(accepted)}")


def build_objective(config: AdversarialTraining, net: nn.Module, attacker: Attacker) -> Objective:
    """The objective `config.loss` names, prepared for `net`."""
    objective = Objective.registry[config.loss](config, net, attacker)
    objective.prepare()
    return objective


# --------------------------------------------------------------------------- the objectives
def adversarial_batch(attacker: Attacker, spec: AttackSpec, x: Tensor, y: Tensor, mix: float = 1.0) -> Tensor:
    """The batch with its first round(mix * len) images replaced by adversarial ones (PGD-AT,
    fast FGSM, N-FGSM)."""
    n_adv = round(mix * x.shape[0])
    if n_adv == 0:
        return x
    if n_adv == x.shape[0]:  # the whole batch: no copy into a new one
        return attacker.generate(x, y, spec)
    return torch.cat([attacker.generate(x[:n_adv], y[:n_adv], spec), x[n_adv:]])


def trades_loss(net: nn.Module, attacker: Attacker, spec: AttackSpec, x: Tensor, y: Tensor,
                beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """TRADES: x_adv maximizes KL(p(x) || p(x_adv)) (p(x) from the eval-mode model, as the attack
    runs in eval mode); returns (clean logits, CE(f(x), y) + beta KL(p(x) || p(x_adv)), the KL)."""
    with torch.no_grad(), eval_mode(net):
        clean_probs = net(x).softmax(-1)
    x_adv = attacker.generate(x, y, spec, soft_targets=clean_probs)
    logits = net(x)
    kl = nn.functional.kl_div(net(x_adv).log_softmax(-1), logits.softmax(-1), reduction="batchmean")
    return logits, nn.functional.cross_entropy(logits, y) + beta * kl, kl


class Clean(Objective, name="none"):
    """Cross-entropy on the clean batch."""

    uses_attack = False

    def __call__(self, x: Tensor, y: Tensor) -> ObjectiveOutput:
        logits = self.net(x)
        return ObjectiveOutput(logits, nn.functional.cross_entropy(logits, y), {}, x)


class AdversarialExamples(Objective, name="at"):
    """Cross-entropy on the batch with its first `mix` share made adversarial by `attack`."""

    def __call__(self, x: Tensor, y: Tensor) -> ObjectiveOutput:
        x = adversarial_batch(self.attacker, self.config.attack, x, y, self.config.mix)
        logits = self.net(x)
        return ObjectiveOutput(logits, nn.functional.cross_entropy(logits, y), {}, x)


class Trades(Objective, name="trades"):
    """TRADES (Zhang et al. 2019); its attack maximizes the KL, so only PGD or FGSM serve."""

    attacks = ("pgd", "fgsm")

    def __call__(self, x: Tensor, y: Tensor) -> ObjectiveOutput:
        logits, loss, kl = trades_loss(self.net, self.attacker, self.config.attack, x, y, self.config.trades_beta)
        return ObjectiveOutput(logits, loss, {names.TRADES_KL: kl}, x)


class LipschitzMargin(Objective, name="lipschitz_margin"):
    """Lipschitz-margin training (Tsuzuku et al. 2018): no attack; the network's Lipschitz bound,
    read once here, must not change with its weights (orthogonal layers only) -- except in a
    final linear layer that training may change (last-layer normalization): then the feature map
    before it must have a fixed bound, and the loss uses the pairwise certificate's terms, the
    layer's row distances, recomputed (and differentiated through) at every step."""

    uses_attack = False

    def prepare(self) -> None:
        try:
            bound = lipschitz_bound(self.net)
        except ValueError as err:
            raise ValueError(f"adversarial.loss lipschitz_margin needs a network with a Lipschitz bound: {err}") from None
        self.last = None
        if bound.fixed:
            self.bound = bound.value
            return
        found = final_linear(self.net, bound)
        if found is None or not found[3]:
            raise ValueError("adversarial.loss lipschitz_margin: the network's Lipschitz bound changes with its "
                             "weights (a dense layer); expected orthogonal layers only (backbones lipmlp, lipconvnet), "
                             "or a changing final linear layer after them (head_kwargs.normalize_last)")
        _, self.last, self.bound, _ = found

    def __call__(self, x: Tensor, y: Tensor) -> ObjectiveOutput:
        logits = self.net(x)
        distances = None if self.last is None else row_distances(last_linear_weight(self.last))
        loss = lipschitz_margin_loss(logits, y, self.config.margin_eps, self.bound, self.config.margin_temperature,
                                     distances)
        return ObjectiveOutput(logits, loss, {}, x)
