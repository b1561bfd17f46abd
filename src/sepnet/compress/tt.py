"""`tt`: tensor-train layers (Novikov et al. 2015, "Tensorizing neural networks") for nn.Linear.

A TT layer stores the weight of an nn.Linear with in_features = m1...md and out_features =
n1...nd as d cores G_k of shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1:

    W[(i1..id), (j1..jd)] = G1[:, i1, j1, :] G2[:, i2, j2, :] ... Gd[:, id, jd, :]

The forward contracts the input with one core after the other (from whichever end costs fewer
multiply-adds) and never builds W.

Orthogonal mode (certified networks, sepnet.lipschitz): each step of that contraction maps the
index pair (r_{k-1}, m_k) to (n_k, r_k) and leaves every other mode alone, so W = S_d ... S_1
with S_k = (core k as an (r_{k-1} m_k) x (n_k r_k) matrix) tensored with identities, and
||W|| <= prod ||core k|| in that reshaping. Each core is kept (semi-)orthogonal *in that shape*
(torch's orthogonal parametrization), so ||W|| <= 1, and W is an isometry when every core is
tall (r_{k-1} m_k <= n_k r_k). Orthogonal cores in any other reshaping (TT-SVD's
left-orthogonal form) bound nothing by themselves.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from sepnet.compress.factorize import Factorization, Unit, mode_split
from sepnet.factorized import FactorizedLayer, built_matrix_pays
from sepnet.lipschitz import LipschitzModule

__all__ = ["TTLinear", "TT", "tensor_train", "tt_ranks", "tt_parameters", "tt_svd", "capped_ranks", "load_cores_"]


def tt_ranks(in_modes: Sequence[int], out_modes: Sequence[int], rank: int | Sequence[int]) -> tuple[int, ...]:
    """The d + 1 ranks (1, r1, ..., r_{d-1}, 1): an int is the same internal rank everywhere,
    each capped at the largest rank the cut between cores allows."""
    d = len(in_modes)
    inner = [rank] * (d - 1) if isinstance(rank, int) else list(rank)
    if len(inner) != d - 1:
        raise ValueError(f"TT ranks {list(rank)}: expected {d - 1} internal ranks for {d} cores")
    if any(r < 1 for r in inner):
        raise ValueError(f"TT ranks must be >= 1, got {inner}")
    return capped_ranks([m * n for m, n in zip(in_modes, out_modes)], inner)


def capped_ranks(sizes: Sequence[int], inner: Sequence[int]) -> tuple[int, ...]:
    """Ranks (1, r1, ..., 1) of a TT with mode sizes `sizes`, each internal rank cut to what its
    neighbours can carry (r_k <= r_{k-1} n_k and r_k <= n_{k+1} r_{k+1}): no rank is wasted."""
    ranks = [1, *inner, 1]
    for k in range(1, len(ranks) - 1):
        ranks[k] = min(ranks[k], ranks[k - 1] * sizes[k - 1])
    for k in range(len(ranks) - 2, 0, -1):
        ranks[k] = min(ranks[k], ranks[k + 1] * sizes[k])
    return tuple(ranks)


def tensor_train(tensor: Tensor, ranks: Sequence[int]) -> list[Tensor]:
    """TT-SVD (Oseledets 2011): cores (r_{k-1}, n_k, r_k) of a d-way tensor by sequential
    truncated SVDs; `ranks` as from `_capped` (1 at both ends). Exact when the tensor's TT ranks
    are within them."""
    sizes = tensor.shape
    rest = tensor.detach().reshape(1, -1)
    cores = []
    for k, n in enumerate(sizes):
        rest = rest.reshape(ranks[k] * n, -1)
        if k == len(sizes) - 1:
            cores.append(rest.reshape(ranks[k], n, 1))
            break
        u, s, vh = torch.linalg.svd(rest, full_matrices=False)
        r = ranks[k + 1]
        cores.append(u[:, :r].reshape(ranks[k], n, r))
        rest = s[:r, None] * vh[:r]
    return cores


def tt_parameters(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Stored entries of the cores (bias not included)."""
    return sum(ranks[k] * m * n * ranks[k + 1] for k, (m, n) in enumerate(zip(in_modes, out_modes)))


def _interleaved(weight: Tensor, in_modes: Sequence[int], out_modes: Sequence[int]) -> Tensor:
    """The (out, in) weight as the d-way tensor of shape (m1 n1, ..., md nd)."""
    d = len(in_modes)
    t = weight.t().reshape(*in_modes, *out_modes)  # (m1..md, n1..nd)
    order = [axis for k in range(d) for axis in (k, d + k)]
    return t.permute(order).reshape([m * n for m, n in zip(in_modes, out_modes)])


def tt_svd(weight: Tensor, in_modes: Sequence[int], out_modes: Sequence[int],
           rank: int | Sequence[int]) -> list[Tensor]:
    """Cores of the TT approximation of an (out, in) weight by sequential truncated SVDs
    (Oseledets' TT-SVD on the interleaved modes). Exact when the weight has TT ranks <= rank."""
    ranks = tt_ranks(in_modes, out_modes, rank)
    cores = tensor_train(_interleaved(weight, in_modes, out_modes), ranks)
    return [core.reshape(core.shape[0], m, n, core.shape[-1]) for core, m, n in zip(cores, in_modes, out_modes)]


@torch.no_grad()
def load_cores_(layer: nn.Module, cores: Sequence[Tensor], bias: Tensor | None, rebuilt: Callable[[], Tensor],
           reference: Tensor) -> float:
    """Copy TT-SVD cores and the bias into `layer`; the relative error of `rebuilt()` vs `reference`."""
    for core, value in zip(layer.cores, cores):
        core.copy_(value.reshape(core.shape))
    if bias is not None:
        layer.bias.copy_(bias)
    return float((rebuilt() - reference).norm() / reference.norm().clamp_min(1e-30))


def contract(x: Tensor, cores: Sequence[Tensor], in_modes: Sequence[int], out_modes: Sequence[int],
              first_rank: int = 1) -> Tensor:
    """x (batch, first_rank x prod in_modes) through the cores (r, m, n, r'), first to last: one
    GEMM a core."""
    batch = x.shape[0]
    t = x.reshape(batch, 1, first_rank, -1)  # (batch, output modes done, rank, input modes left)
    for core, m, n in zip(cores, in_modes, out_modes):
        done, r, left = t.shape[1], t.shape[2], t.shape[3] // m
        t = t.reshape(batch, done, r, m, left).permute(0, 1, 4, 2, 3).reshape(-1, r * m)
        t = (t @ core.reshape(r * m, -1)).reshape(batch, done, left, n, core.shape[-1])
        t = t.permute(0, 1, 3, 4, 2).reshape(batch, done * n, core.shape[-1], left)
    return t.reshape(batch, -1)


def contraction_macs(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Multiply-adds per sample of `_contract` in this core order."""
    return sum(math.prod(out_modes[:k]) * math.prod(in_modes[k:]) * ranks[k] * out_modes[k] * ranks[k + 1]
               for k in range(len(in_modes)))


class TTLinear(FactorizedLayer, LipschitzModule):
    """nn.Linear(prod(in_modes), prod(out_modes)) in tensor-train format.

    Args:
        in_modes: (m1, ..., md), their product the input features.
        out_modes: (n1, ..., nd), their product the output features.
        rank: internal TT rank (int) or the d - 1 ranks; capped where a cut allows less.
        bias: add a learnable bias.
        orthogonal: every core (semi-)orthogonal as an (r_{k-1} m_k) x (n_k r_k) matrix, so the
            layer is at most 1-Lipschitz (the module docstring's argument); initialized
            orthogonal, not from a dense layer.

    Initialization: i.i.d. normal cores whose implied weight entries have nn.Linear's variance,
    1 / (3 in_features): an entry is a sum over prod(r_k) products of d core entries, so each core
    gets variance (1 / (3 in_features prod r_k))^(1/d).
    """

    def __init__(self, in_modes: Sequence[int], out_modes: Sequence[int], rank: int | Sequence[int] = 8,
                 bias: bool = True, orthogonal: bool = False) -> None:
        super().__init__()
        if len(in_modes) != len(out_modes) or len(in_modes) < 2:
            raise ValueError(f"TT modes {tuple(in_modes)} -> {tuple(out_modes)}: expected the same number "
                             "(>= 2) of input and output modes")
        if min(*in_modes, *out_modes) < 1:
            raise ValueError(f"TT modes must be >= 1, got {tuple(in_modes)} -> {tuple(out_modes)}")
        self.in_modes, self.out_modes = tuple(in_modes), tuple(out_modes)
        self.in_features, self.out_features = math.prod(in_modes), math.prod(out_modes)
        self.ranks = tt_ranks(in_modes, out_modes, rank)
        d = len(in_modes)
        std = (1 / (3 * self.in_features * math.prod(self.ranks))) ** (1 / (2 * d))
        self.orthogonal = orthogonal
        if orthogonal:  # stored as the matrices the contraction applies, kept on the Stiefel manifold
            self.cores = nn.ParameterList(
                nn.Parameter(nn.init.orthogonal_(torch.empty(self.ranks[k] * m, n * self.ranks[k + 1])))
                for k, (m, n) in enumerate(zip(in_modes, out_modes)))
            for k in range(d):
                nn.utils.parametrizations.orthogonal(self.cores, str(k), orthogonal_map="matrix_exp")
        else:
            self.cores = nn.ParameterList(
                nn.Parameter(torch.randn(self.ranks[k], m, n, self.ranks[k + 1]) * std)
                for k, (m, n) in enumerate(zip(in_modes, out_modes)))
        # contract from the end where that is cheaper (a layer that shrinks its input: the big
        # input modes go first; benchmarks/layers.py measures it)
        self._reversed = (contraction_macs(in_modes[::-1], out_modes[::-1], self.ranks[::-1])
                          < contraction_macs(in_modes, out_modes, self.ranks))
        bound = 1 / math.sqrt(self.in_features)
        self.bias = nn.Parameter(torch.empty(self.out_features).uniform_(-bound, bound)) if bias else None
        # the implied matrix's cost against the contractions' (shapes and ranks are fixed): see _implied_pays
        self._path_costs = (self.build_macs(), self.in_features * self.out_features, self.macs_per_row())

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_modes: Sequence[int], out_modes: Sequence[int],
                    rank: int | Sequence[int]) -> "TTLinear":
        """The TT-SVD approximation of `linear` (`approximation_error`: its relative Frobenius error)."""
        if (math.prod(in_modes), math.prod(out_modes)) != (linear.in_features, linear.out_features):
            raise ValueError(f"TT modes {tuple(in_modes)} -> {tuple(out_modes)} imply a {math.prod(in_modes)} -> "
                             f"{math.prod(out_modes)} layer, but the linear layer is {linear.in_features} -> "
                             f"{linear.out_features}")
        layer = cls(in_modes, out_modes, rank, bias=linear.bias is not None)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        cores = tt_svd(linear.weight, in_modes, out_modes, layer.ranks[1:-1])
        layer.approximation_error = load_cores_(layer, cores, linear.bias, layer.implied_weight, linear.weight)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"TTLinear expects {self.in_features} input features, got input of shape "
                             f"{tuple(x.shape)}")
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.uses_implied(x.shape[0]):  # small layer, many rows: one GEMM with the implied matrix
            w, bias = self.implied_weight(), self.bias
            if not torch.is_autocast_enabled(x.device.type):  # autocast casts them itself
                w, bias = w.to(x.dtype), bias.to(x.dtype) if bias is not None else None
            return nn.functional.linear(x, w, bias).reshape(*lead, self.out_features)
        if self._reversed:  # last core first: the same sum with every mode order reversed
            d = len(self.in_modes)
            flip = (0, *range(d, 0, -1))
            x = x.reshape(-1, *self.in_modes).permute(flip).reshape(x.shape[0], -1)
            cores = [core.permute(3, 1, 2, 0) for core in reversed(self.tt_cores())]
            y = contract(x, cores, self.in_modes[::-1], self.out_modes[::-1])
            y = y.reshape(-1, *self.out_modes[::-1]).permute(flip).reshape(x.shape[0], -1)
        else:
            y = contract(x, self.tt_cores(), self.in_modes, self.out_modes)
        y = y.reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def tt_cores(self) -> list[Tensor]:
        """The cores (r_{k-1}, m_k, n_k, r_k) the layer computes with (orthogonal mode: each
        parametrized orthogonal matrix reshaped). A list, not self.cores[1:]: slicing a
        ParameterList re-wraps its entries, which cuts them out of torch.func.functional_call's graph."""
        cores = list(self.cores)
        if not self.orthogonal:
            return cores
        return [core.reshape(self.ranks[k], m, n, self.ranks[k + 1])
                for k, (core, m, n) in enumerate(zip(cores, self.in_modes, self.out_modes))]

    lipschitz_rule = "orthogonal TT, product of the core norms"  # the LipschitzModule contract

    def lipschitz_constant(self) -> float | None:
        """Orthogonal mode: a bound on the layer's spectral norm, the product of the cores' norms
        as the matrices the contraction applies (SVDs; 1 up to float rounding). None outside it."""
        if not self.orthogonal:
            return None
        with torch.no_grad():
            return math.prod(float(torch.linalg.matrix_norm(core.detach().double().reshape(r * m, -1), ord=2))
                             for core, r, m in zip(self.tt_cores(), self.ranks, self.in_modes))

    def macs_per_row(self) -> int:
        """Multiply-adds of the core contractions for one input row, in the order forward uses."""
        if self._reversed:
            return contraction_macs(self.in_modes[::-1], self.out_modes[::-1], self.ranks[::-1])
        return contraction_macs(self.in_modes, self.out_modes, self.ranks)

    def build_macs(self) -> int:
        """Multiply-adds of `dense_weight` (the chain of core products)."""
        total, rows, cols = 0, self.in_modes[0], self.out_modes[0]
        for k in range(1, len(self.in_modes)):
            total += rows * cols * self.ranks[k] * self.in_modes[k] * self.out_modes[k] * self.ranks[k + 1]
            rows, cols = rows * self.in_modes[k], cols * self.out_modes[k]
        return total

    def _implied_pays(self, rows: int) -> bool:
        """The implied matrix when building it and one GEMM with it cost at most
        MATRIX_WORK_FACTOR x the core contractions' multiply-adds for these rows (its build
        cost counted: a rank-17 head's is not negligible at a batch of 128): d small GEMMs with
        their permutes run far below one GEMM's speed per multiply-add on a CPU, and a ViT's
        token layers at 10x do *more* multiply-adds as TT than dense
        (`python benchmarks/layers.py --tt-paths` measures both paths)."""
        return built_matrix_pays(*self._path_costs, rows)

    def implied_weight(self) -> Tensor:
        """The implied (out_features, in_features) weight, from the cores alone."""
        cores = self.tt_cores()
        acc = cores[0][0]  # (m1, n1, r1)
        for core in cores[1:]:
            rows, cols = acc.shape[0], acc.shape[1]
            acc = torch.einsum("MNr,rmns->MmNns", acc, core)
            acc = acc.reshape(rows * core.shape[1], cols * core.shape[2], core.shape[3])
        return acc[..., 0].t()

    def extra_repr(self) -> str:
        return (f"{self.in_modes} -> {self.out_modes}, ranks={list(self.ranks)}, "
                f"{self.dense_parameters() / self.stored_parameters():.1f}x{', orthogonal' if self.orthogonal else ''}")


class TT(Factorization, name="tt", targets=(nn.Linear,)):
    """nn.Linear -> TTLinear. options: modes (cores, default 3), rank (int), init ("random"
    default, or "from_linear": TT-SVD of the current weights), orthogonal (TTLinear's
    1-Lipschitz mode, for certified networks; random orthogonal cores)."""

    defaults = {"modes": 3, "rank": 8, "init": "random", "orthogonal": False}

    def units(self, net, layers):
        self.check_choice("init", ("random", "from_linear"))
        if self.options["orthogonal"] and self.options["init"] == "from_linear":
            raise ValueError("tt: orthogonal cores start orthogonal, not from the layer's TT-SVD (its cores are "
                             "orthogonal in another shape); expected init 'random' with orthogonal")
        units = []
        for name, linear in layers:
            modes = (mode_split(linear.in_features, self.options["modes"]),
                     mode_split(linear.out_features, self.options["modes"]))
            bias = linear.out_features if linear.bias is not None else 0
            units.append(Unit([(name, linear)], lambda r, m=modes, b=bias: tt_parameters(*m, tt_ranks(*m, r)) + b,
                              modes))
        return units

    def build(self, unit, rank):
        (_, linear), (in_modes, out_modes) = unit.layers[0], unit.plan
        extra = ""
        if self.options["init"] == "from_linear":
            layer = TTLinear.from_linear(linear, in_modes, out_modes, rank)
            extra = f", TT-SVD error {layer.approximation_error:.3f}"
        else:
            layer = TTLinear(in_modes, out_modes, rank, bias=linear.bias is not None,
                             orthogonal=self.options["orthogonal"])
        return [layer], (f"tt {in_modes} -> {out_modes} ranks {list(layer.ranks)}: "
                         f"{layer.stored_parameters():,} / {layer.dense_parameters():,}{extra}")
