"""The `network.compression` section: compressors applied to a built network, in order.

Each entry names a method, the layers it acts on (globs on qualified module names of the
network, e.g. "head.*" or "backbone.blocks.*.mlp.fc1") and either a budget (target compression
of those layers' parameters, e.g. 10 for 10x fewer) or the method's own options:

    compression:
      - {method: tt, targets: ["head.*"], budget: 50}              # TT layers, ranks picked for 50x
      - {method: separable, targets: ["head.*"], options: {rank: 2}}
      - {method: magnitude, targets: ["*"], budget: 10, options: {scope: global}}

Methods: "separable" (Kronecker sums, sepnet.layers), "tt" (tensor train, sepnet.tt),
"magnitude" (unstructured magnitude pruning with torch.nn.utils.prune masks, layer by layer or
global). Factorizations replace nn.Linear layers; pruning masks the weights of nn.Linear and
nn.Conv2d layers. The masks are buffers, so checkpoints keep them and resume with them.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from sepnet.convert import balanced_factorization, separable_
from sepnet.tt import TTConv2d, TTLinear, _capped, tt_parameters, tt_ranks

log = logging.getLogger(__name__)

__all__ = ["CompressionSpec", "COMPRESSORS", "compress_", "remove_pruning_", "pruned_layers"]


@dataclass(frozen=True)
class CompressionSpec:
    """One compressor. method: a name of COMPRESSORS. targets / exclude: globs on qualified
    module names. budget: target compression (> 1), or None to use the options alone.
    budget_of: "targets" (the budget is the targeted layers' own compression) or "model" (the
    whole network's non-zero compression once this entry is applied: the targets get what the
    rest of the network, as the earlier entries left it, does not use). options: the method's
    own (see each method's docstring)."""

    method: str
    targets: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    budget: float | None = None
    budget_of: str = "targets"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in COMPRESSORS:
            raise ValueError(f"unknown compression method {self.method!r}; expected one of {sorted(COMPRESSORS)}")
        if self.budget_of not in ("targets", "model"):
            raise ValueError(f"compression budget_of {self.budget_of!r}: expected 'targets' or 'model'")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 1):
            raise ValueError(f"compression budget {self.budget} for {self.method}: expected a compression "
                             "factor > 1 (10 = ten times fewer parameters)")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


TARGET_KINDS: dict[str, tuple[type, ...]] = {  # the layers each method acts on
    "separable": (nn.Linear,), "tt": (nn.Linear,), "tt_conv": (nn.Conv2d,), "jsvd": (nn.Conv2d,),
    "magnitude": (nn.Linear, nn.Conv2d), "hydra": (nn.Linear, nn.Conv2d), "deadwood": (nn.Linear, nn.Conv2d)}


def _targets(net: nn.Module, spec: CompressionSpec) -> list[tuple[str, nn.Module]]:
    kinds = TARGET_KINDS[spec.method]
    found = [(name, m) for name, m in net.named_modules()
             if type(m) in kinds and _matches(name, spec.targets) and not _matches(name, spec.exclude)]
    masked = [name for name, m in found if hasattr(m, "weight_mask")]
    if masked:
        raise ValueError(f"compression {spec.method}: {masked[0]} is already pruned; expected pruning "
                         "after the factorizations in the compression list")
    if not found:
        layers = [name for name, m in net.named_modules() if type(m) in kinds]
        raise ValueError(f"compression {spec.method}: targets {spec.targets} match no "
                         f"{'/'.join(k.__name__ for k in kinds)} layer; expected some of {layers[:8]}"
                         f"{' ...' if len(layers) > 8 else ''}")
    return found


def _modes(n: int, modes: int) -> tuple[int, ...]:
    """n split into `modes` balanced factors; where n has too few prime factors (10 into 3),
    leading modes of size 1 fill up (1, 2, 5)."""
    for used in range(modes, 0, -1):
        try:
            return (1,) * (modes - used) + balanced_factorization(n, used)
        except ValueError:
            continue
    raise AssertionError("unreachable: one factor always works")


def _replace(net: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent), child, layer)


def _dense(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _search(fits: Callable[[int], bool], top: int) -> int:
    """The largest r in [1, top] with fits(r), for fits true at 1 and monotone."""
    low, high = 1, top
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _budget_ranks(spec: CompressionSpec, units: list[tuple[str, int, Callable[[int], int]]],
                  kept: int = 0) -> list[int]:
    """One rank per unit (a layer, or a group sharing factors) for spec.budget over all of them
    together: the largest common rank r (each unit capped where it would store as much as its
    dense parameters) whose total stays within sum(dense) / budget. Small layers (a 10-class
    classifier) thus keep their full rank while the big ones carry the compression. `kept`:
    parameters of targets the method leaves as they are; the budget holds for them too."""
    caps = [_search(lambda r, c=cost, d=dense: c(r) <= d, dense) if cost(1) <= dense else 1
            for _, dense, cost in units]
    allowed = (sum(dense for _, dense, _ in units) + kept) / spec.budget - kept

    def total(r: int) -> int:
        return sum(cost(min(r, cap)) for (_, _, cost), cap in zip(units, caps))

    if total(1) > allowed:
        raise ValueError(f"compression {spec.method} budget {spec.budget:g}x is unreachable for {spec.targets}: "
                         f"rank 1 already stores {total(1):,} of their {sum(d for _, d, _ in units):,} "
                         f"parameters, {int(allowed):,} allowed")
    r = _search(lambda r: total(r) <= allowed, max(caps))
    return [min(r, cap) for cap in caps]


def _ranks(spec: CompressionSpec, plans: list[tuple], default: int) -> list[int]:
    """Each planned (name, module, cost, ...) layer's rank: from the budget, or options.rank."""
    if spec.budget is not None:
        return _budget_ranks(spec, [(name, _dense(m), cost) for name, m, cost, *_ in plans])
    return [int(spec.options.get("rank", default))] * len(plans)


def tt_(net: nn.Module, spec: CompressionSpec) -> list[str]:
    """nn.Linear -> TTLinear. options: modes (cores, default 3), rank (int), init ("random"
    default, or "from_linear": TT-SVD of the current weights)."""
    opts = {"modes": 3, "init": "random", **spec.options}
    if opts["init"] not in ("random", "from_linear"):
        raise ValueError(f"compression tt: init {opts['init']!r}; expected 'random' or 'from_linear'")
    plans = []
    for name, linear in _targets(net, spec):
        in_modes, out_modes = _modes(linear.in_features, opts["modes"]), _modes(linear.out_features, opts["modes"])
        bias = linear.out_features if linear.bias is not None else 0

        def cost(r, i=in_modes, o=out_modes, b=bias):
            return tt_parameters(i, o, tt_ranks(i, o, r)) + b
        plans.append((name, linear, cost, in_modes, out_modes))
    ranks = _ranks(spec, plans, default=8)
    lines = []
    for (name, linear, _, in_modes, out_modes), rank in zip(plans, ranks):
        if opts["init"] == "from_linear":
            layer, error = TTLinear.from_linear(linear, in_modes, out_modes, rank)
            extra = f", TT-SVD error {error:.3f}"
        else:
            layer = TTLinear(in_modes, out_modes, rank, bias=linear.bias is not None).to(linear.weight.device)
            extra = ""
        _replace(net, name, layer)
        lines.append(f"{name}: tt {in_modes} -> {out_modes} ranks {list(layer.ranks)}: "
                     f"{layer.stored_parameters():,} / {layer.dense_parameters():,}{extra}")
    return lines


def tt_conv_(net: nn.Module, spec: CompressionSpec) -> list[str]:
    """nn.Conv2d (groups 1) -> TTConv2d. options: modes (channel cores, default 2), rank (int),
    init ("random" default, or "from_conv": TT-SVD of the current kernel), naive (the plain
    4-way TT of the kernel instead of the spatial core + channel cores)."""
    opts = {"modes": 2, "init": "random", "naive": False, **spec.options}
    if opts["init"] not in ("random", "from_conv"):
        raise ValueError(f"compression tt_conv: init {opts['init']!r}; expected 'random' or 'from_conv'")
    plans = []
    for name, conv in _targets(net, spec):
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"compression tt_conv: {name} has groups {conv.groups} / padding mode "
                             f"{conv.padding_mode!r}; expected an ordinary convolution")
        in_modes, out_modes = _modes(conv.in_channels, opts["modes"]), _modes(conv.out_channels, opts["modes"])
        sizes = ([*conv.kernel_size, conv.in_channels, conv.out_channels] if opts["naive"] else
                 [math.prod(conv.kernel_size), *(c * s for c, s in zip(in_modes, out_modes))])
        bias = conv.out_channels if conv.bias is not None else 0

        def cost(r, sizes=sizes, b=bias):
            ranks = _capped(sizes, [r] * (len(sizes) - 1))
            return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(sizes)) + b
        plans.append((name, conv, cost, in_modes, out_modes))
    ranks = _ranks(spec, plans, default=8)
    lines = []
    for (name, conv, _, in_modes, out_modes), rank in zip(plans, ranks):
        if opts["init"] == "from_conv":
            layer, error = TTConv2d.from_conv(conv, in_modes, out_modes, rank, naive=opts["naive"])
            extra = f", TT-SVD error {error:.3f}"
        else:
            layer = TTConv2d(in_modes, out_modes, conv.kernel_size, rank, conv.stride, conv.padding, conv.dilation,
                             bias=conv.bias is not None, naive=opts["naive"]).to(conv.weight.device)
            extra = ""
        _replace(net, name, layer)
        lines.append(f"{name}: tt_conv{' (naive)' if opts['naive'] else ''} {in_modes} -> {out_modes} "
                     f"ranks {list(layer.ranks)}: {layer.stored_parameters():,} / {layer.dense_parameters():,}{extra}")
    return lines


def _joint_cost(method: str, n: int, rows: int, cols: int, rank: int, split: float = 0.5) -> int:
    """Factor entries of a group of n (rows x cols) unfolded kernels at joint rank `rank`."""
    if method == "svd":
        return n * rank * (rows + cols)
    if method == "ljsvd":
        return rank * rows + n * rank * cols
    if method == "rjsvd":
        return n * rank * rows + rank * cols
    right = max(1, min(rank - 1, round(split * rank)))
    left = max(1, rank - right)
    return n * right * rows + right * cols + left * rows + n * left * cols


def equal_budget_rank(method: str, n: int, rows: int, cols: int, per_layer_rank: int, split: float = 0.5) -> int:
    """The largest joint rank whose factors store no more than per-layer SVDs of rank
    `per_layer_rank` (about 2N / (N + 1) times it for LJSVD / RJSVD with I = O)."""
    allowed = _joint_cost("svd", n, rows, cols, per_layer_rank)
    return _search(lambda r: _joint_cost(method, n, rows, cols, r, split) <= allowed, max(1, 4 * per_layer_rank))


def _conv_groups(net: nn.Module, convs: list[tuple[str, nn.Conv2d]]) -> list[list[tuple[str, nn.Conv2d]]]:
    """Same-shape convolutions of one stage: a pooling layer or another `layerN` starts a stage."""
    stage, stages, prefix = 0, {}, None
    for name, m in net.named_modules():
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            stage += 1
        parts = [p for p in name.split(".") if p.startswith("layer")]
        if parts and parts[0] != prefix:
            prefix, stage = parts[0], stage + 1
        stages[name] = stage
    groups: dict[tuple, list] = {}
    for name, conv in convs:
        key = (stages[name], conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
               conv.dilation, conv.bias is not None)
        groups.setdefault(key, []).append((name, conv))
    return list(groups.values())


def jsvd_(net: nn.Module, spec: CompressionSpec) -> list[str]:
    """Convolutions -> SVDConv2d (kH x 1 then 1 x kW) with factors shared across same-shape
    layers of a stage (sepnet.jsvd). options: method ("ljsvd" default, "rjsvd", "bijsvd", or
    "svd" per layer), rank (the per-layer SVD rank whose parameter count each group matches:
    the equal-budget rule), iterations and split (bijsvd). Factors come from the current weights.
    The network's first convolution and 1 x 1 convolutions stay dense, as in the paper."""
    from sepnet.jsvd import SVDConv2d, joint_svd, unfold_kernel

    opts = {"method": "ljsvd", "iterations": 10, "split": 0.5, **spec.options}
    method = opts["method"]
    first = next((name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
    convs, kept = [], []
    for name, conv in _targets(net, spec):
        (kept if name == first or conv.kernel_size == (1, 1) else convs).append((name, conv))
    groups = _conv_groups(net, convs)
    units = []
    for group in groups:
        conv = group[0][1]
        rows, cols = conv.in_channels * conv.kernel_size[0], conv.out_channels * conv.kernel_size[1]
        bias = len(group) * conv.out_channels if conv.bias is not None else 0
        units.append((group[0][0], sum(_dense(c) for _, c in group),
                      lambda r, n=len(group), a=rows, b=cols: _joint_cost(method, n, a, b, r, opts["split"]) + bias))
    if spec.budget is not None:
        ranks = _budget_ranks(spec, units, kept=sum(_dense(c) for _, c in kept))
    else:
        per_layer = int(opts.get("rank", 8))
        ranks = [equal_budget_rank(method, len(g), g[0][1].in_channels * g[0][1].kernel_size[0],
                                   g[0][1].out_channels * g[0][1].kernel_size[1], per_layer, opts["split"])
                 for g in groups]
    lines = [f"{name}: jsvd leaves it dense (first or 1x1 convolution)" for name, _ in kept]
    for group, rank in zip(groups, ranks):
        factors = joint_svd([unfold_kernel(c.weight) for _, c in group], method, rank, opts["iterations"],
                            opts["split"])
        params: dict[int, nn.Parameter] = {}  # factor tensor -> its Parameter: joint_svd returns a
        for (name, conv), terms in zip(group, factors):  # shared factor as one tensor object
            shared = {(b, side): params[id(t)] for b, pair in enumerate(terms)
                      for side, t in zip(("vertical", "horizontal"), pair) if id(t) in params}
            layer = SVDConv2d(conv, [u.shape[1] for u, _ in terms], shared).to(conv.weight.device)
            layer.set_factors_(terms)
            for b, (u, v) in enumerate(terms):
                params.setdefault(id(u), layer.vertical[b])
                params.setdefault(id(v), layer.horizontal[b])
            _replace(net, name, layer)
        stored = sum(p.numel() for p in {id(p): p for n, _ in group
                                         for p in net.get_submodule(n).parameters()}.values())
        lines.append(f"{', '.join(n for n, _ in group)}: jsvd {method} rank {rank}: "
                     f"{stored:,} / {sum(_dense(c) for _, c in group):,}")
    return lines


def separable_compress_(net: nn.Module, spec: CompressionSpec) -> list[str]:
    """nn.Linear -> FlatSeparableLinear (Kronecker sums on the flat features). options: modes
    (default 2), rank (int), init ("random" default, or "from_linear")."""
    opts = {"modes": 2, "init": "random", **spec.options}
    plans = []
    for name, linear in _targets(net, spec):
        in_shape, out_shape = _modes(linear.in_features, opts["modes"]), _modes(linear.out_features, opts["modes"])
        bias = linear.out_features if linear.bias is not None else 0
        per_term = sum(i * o for i, o in zip(in_shape, out_shape))
        plans.append((name, linear, lambda r, t=per_term, b=bias: r * t + b, in_shape, out_shape))
    ranks = _ranks(spec, plans, default=1)
    lines = []
    for (name, _, _, in_shape, out_shape), rank in zip(plans, ranks):
        layer = separable_(net, include=[name], modes=opts["modes"], rank=rank, init=opts["init"],
                           shapes={name: (in_shape, out_shape)})[name]
        lines.append(f"{name}: separable {in_shape} -> {out_shape} rank {rank}: "
                     f"{layer.stored_parameters():,} / {layer.dense_parameters():,}")
    return lines


def magnitude_(net: nn.Module, spec: CompressionSpec) -> list[str]:
    """Unstructured magnitude pruning of nn.Linear / nn.Conv2d weights (biases kept). options:
    scope ("layer": each layer keeps 1/budget of its weights; "global": the smallest weights of
    all targets together go; either way each output unit keeps at least one weight), amount (fraction pruned, instead
    of a budget). The masks stay through fine-tuning; `remove_pruning_` makes them permanent."""
    opts = {"scope": "layer", **spec.options}
    if opts["scope"] not in ("layer", "global"):
        raise ValueError(f"compression magnitude: scope {opts['scope']!r}; expected 'layer' or 'global'")
    if (spec.budget is None) == ("amount" not in opts):
        raise ValueError("compression magnitude: expected a budget or options.amount (one of them)")
    targets = _targets(net, spec)
    keep_fraction = 1 / spec.budget if spec.budget is not None else 1 - float(opts["amount"])
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"compression magnitude: amount {opts['amount']} must be in [0, 1)")
    if opts["scope"] == "global":
        total = sum(m.weight.numel() for _, m in targets)
        prune.global_unstructured([(m, "weight") for _, m in targets], pruning_method=prune.L1Unstructured,
                                  amount=total - max(1, round(keep_fraction * total)))
        with torch.no_grad():  # no output unit left without a weight (a layer pruned away
            for _, m in targets:  # entirely cuts the network): its largest weight comes back
                rows = m.weight_mask.flatten(1)
                empty = rows.sum(1) == 0
                if empty.any():
                    best = m.weight_orig.detach().abs().flatten(1).argmax(1)
                    rows[empty.nonzero().squeeze(1), best[empty]] = 1
    else:
        for _, m in targets:
            keep = min(m.weight.numel(), max(round(keep_fraction * m.weight.numel()), m.weight.shape[0]))
            prune.l1_unstructured(m, "weight", amount=m.weight.numel() - keep)
    return [f"{name}: magnitude ({opts['scope']}) keeps {int(m.weight_mask.sum()):,} / {m.weight.numel():,} weights"
            for name, m in targets]


def hydra_(net: nn.Module, spec: CompressionSpec) -> list[str]:
    """HYDRA (Sehwag et al. 2020): per-weight importance scores, initialized proportional to
    the weights (so the first mask is layer-wise magnitude pruning's), trained for
    `score_epochs` epochs under the run's (adversarial) loss with the weights frozen and the
    top-k mask in the forward (straight-through gradient); then the mask is fixed and the
    weights fine-tune. Start from a trained model (network.init_from). options: score_epochs
    (default 1), amount (fraction pruned, instead of a budget). Each layer keeps the same
    fraction, at least one weight per output unit."""
    from torch.nn.utils import parametrize

    from sepnet.masks import MaskedWeight, hydra_scores

    opts = {"score_epochs": 1, **spec.options}
    if (spec.budget is None) == ("amount" not in opts):
        raise ValueError("compression hydra: expected a budget or options.amount (one of them)")
    keep_fraction = 1 / spec.budget if spec.budget is not None else 1 - float(opts["amount"])
    if not 0 < keep_fraction <= 1 or int(opts["score_epochs"]) < 0:
        raise ValueError(f"compression hydra: amount must be in [0, 1) and score_epochs >= 0, got "
                         f"{opts.get('amount')} and {opts['score_epochs']}")
    lines = []
    for name, m in _targets(net, spec):
        numel = m.weight.numel()
        keep = min(numel, max(round(keep_fraction * numel), m.weight.shape[0]))
        scores = hydra_scores(m.weight.detach())
        masked = MaskedWeight(torch.zeros_like(scores), keep, scores, int(opts["score_epochs"]))
        masked.mask.copy_(masked.current_mask())
        parametrize.register_parametrization(m, "weight", masked)
        lines.append(f"{name}: hydra keeps {keep:,} / {numel:,} weights (scores for {opts['score_epochs']} epochs)")
    return lines


def deadwood_(net: nn.Module, spec: CompressionSpec) -> list[str]:
    """Lagrangian-dual global pruning (sepnet.deadwood, our reading of Deadwooding): a penalty on
    the weight mass outside the global top-k with a dual variable that grows while the budget is
    violated, distillation towards the dense starting network, then a global magnitude mask that
    keeps exactly the budget and fine-tuning. Start from a trained model (network.init_from).
    options: kick_in (epochs, default 1), penalty_epochs (default 5), dual_step (0.05),
    kd_weight (1.0), temperature (4.0), amount (fraction pruned, instead of a budget)."""
    from sepnet.deadwood import attach

    opts = dict(spec.options)
    amount = opts.pop("amount", None)
    if (spec.budget is None) == (amount is None):
        raise ValueError("compression deadwood: expected a budget or options.amount (one of them)")
    unknown = set(opts) - {"kick_in", "penalty_epochs", "dual_step", "kd_weight", "temperature"}
    if unknown:
        raise ValueError(f"compression deadwood: unknown options {sorted(unknown)}; expected kick_in, "
                         "penalty_epochs, dual_step, kd_weight, temperature, amount")
    targets = _targets(net, spec)
    total = sum(m.weight.numel() for _, m in targets)
    keep = max(1, round(total / spec.budget if spec.budget is not None else total * (1 - float(amount))))
    dead = attach(net, targets, keep, opts)
    return [f"{', '.join(n for n, _ in targets[:3])}{' ...' if len(targets) > 3 else ''}: deadwood keeps "
            f"{keep:,} / {total:,} weights after {dead.penalty_epochs} penalty epochs"]


PRUNERS = ("magnitude", "hydra", "deadwood")  # budgets count the weights they mask
COMPRESSORS: dict[str, Callable[[nn.Module, CompressionSpec], list[str]]] = {
    "separable": separable_compress_, "tt": tt_, "tt_conv": tt_conv_, "jsvd": jsvd_, "magnitude": magnitude_,
    "hydra": hydra_, "deadwood": deadwood_}


def _as_target_budget(net: nn.Module, spec: CompressionSpec) -> CompressionSpec:
    """A whole-model budget as the budget of this entry's targets, given the rest of the network."""
    from dataclasses import replace

    from sepnet.constraints import parameter_counts

    targets = _targets(net, spec)
    model = parameter_counts(net)
    target_dense = sum(_dense(m) for _, m in targets)
    # the rest of the network at what training will make of it: every parameter counts (a bias
    # or norm shift initialized at zero does not stay zero) except the weights a mask holds at zero
    own = {id(p) for _, m in targets for p in m.parameters()}
    rest = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values() if id(p) not in own)
    rest -= sum(int((m.weight_mask == 0).sum()) for _, m in pruned_layers(net))
    allowed = model.dense / spec.budget - rest
    if allowed <= 0:
        raise ValueError(f"compression {spec.method}: whole-model budget {spec.budget:g}x is unreachable: the "
                         f"layers outside {spec.targets} already have {rest:,} non-zero parameters, "
                         f"{int(model.dense / spec.budget):,} allowed for the whole model")
    if allowed >= target_dense:
        raise ValueError(f"compression {spec.method}: whole-model budget {spec.budget:g}x is met without "
                         f"compressing {spec.targets}: expected a larger budget or other targets")
    if spec.method in PRUNERS:  # pruning keeps the biases: the weights carry the whole budget
        weights = sum(m.weight.numel() for _, m in targets)
        biases = target_dense - weights
        if allowed - biases < len(targets):
            raise ValueError(f"compression {spec.method}: whole-model budget {spec.budget:g}x is unreachable: "
                             f"{spec.targets} keep {biases:,} biases, {int(allowed):,} non-zero parameters allowed "
                             "for them")
        return replace(spec, budget=weights / (allowed - biases), budget_of="targets")
    return replace(spec, budget=target_dense / allowed, budget_of="targets")


def compress_(net: nn.Module, specs: Sequence[CompressionSpec | dict]) -> list[str]:
    """Apply the compressors in order, in place; returns one summary line per layer changed."""
    lines = []
    for spec in specs:
        spec = spec if isinstance(spec, CompressionSpec) else CompressionSpec(**spec)
        if spec.budget is not None and spec.budget_of == "model":
            spec = _as_target_budget(net, spec)
        lines += COMPRESSORS[spec.method](net, spec)
    for line in lines:
        log.debug("compression: %s", line)
    return lines


def pruned_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers carrying a pruning mask on their weight."""
    return [(name, m) for name, m in net.named_modules() if isinstance(getattr(m, "weight_mask", None), torch.Tensor)]


def remove_pruning_(net: nn.Module) -> nn.Module:
    """Make every pruning mask (torch.nn.utils.prune, sepnet.masks) permanent: zeros in
    `weight`, no mask buffer or parametrization. For export."""
    from sepnet.masks import remove_masks_

    for _, m in pruned_layers(net):
        prune.remove(m, "weight")
    return remove_masks_(net)
