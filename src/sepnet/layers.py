"""Separable structured layers: a dense weight replaced by a sum of Kronecker products.

For an input X of shape (..., I1, ..., IN) the layer computes

    Y = sum_r  X x1 U1(r) x2 U2(r) ... xN UN(r)  +  Bias,        Uk(r): (Ok, Ik)

without ever building the implied dense matrix W = sum_r kron(U1(r), ..., UN(r)).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from sepnet.factorized import FactorizedLayer, built_matrix_pays
from sepnet.lipschitz import LipschitzModule

# the orthogonal mode's rank-R normalization is exact (an SVD of the implied core in every forward)
# up to this many core entries, and R (the triangle inequality) above
EXACT_NORM_MAX_ELEMENTS = 2 ** 18

__all__ = [
    "SeparableLinear",
    "FlatSeparableLinear",
    "contraction_order",
    "nearest_kronecker",
    "kron_all",
    "implied_core",
]


def _as_shape(shape: Sequence[int] | int, name: str) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    if len(shape) == 0 or any(d < 1 for d in shape):
        raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {shape}")
    return shape


# --------------------------------------------------------------------------- contraction order
def contraction_order(in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[int, ...]:
    """Mode order that minimizes the multiply-adds of the chained mode products.

    Applying mode k to the current feature shape d costs prod(d) * out_shape[k] per sample and
    changes d[k] from in_shape[k] to out_shape[k]. Exhaustive for N <= 6 modes, greedy above.
    """
    n = len(in_shape)

    def cost(order: Sequence[int]) -> int:
        return contraction_cost(in_shape, out_shape, order)

    if n <= 6:
        return tuple(min(itertools.permutations(range(n)), key=cost))
    order: list[int] = []
    while len(order) < n:
        rest = [k for k in range(n) if k not in order]
        order.append(min(rest, key=lambda k: cost(order + [k])))
    return tuple(order)


def contraction_cost(in_shape: Sequence[int], out_shape: Sequence[int], order: Sequence[int]) -> int:
    """Multiply-adds per sample (one term) of the mode products applied in `order`."""
    dims, total = list(in_shape), 0
    for k in order:
        total += math.prod(dims) * out_shape[k]
        dims[k] = out_shape[k]
    return total


def check_factor_shapes(linear: nn.Linear, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
    """Factor shapes must multiply to the linear layer's sizes."""
    if (math.prod(in_shape), math.prod(out_shape)) != (linear.in_features, linear.out_features):
        raise ValueError(f"factor shapes {tuple(in_shape)} -> {tuple(out_shape)} imply a "
                         f"{math.prod(in_shape)} -> {math.prod(out_shape)} layer, but the linear "
                         f"layer is {linear.in_features} -> {linear.out_features}")


class _BatchedModeProduct(torch.autograd.Function):
    """Y[p] = U @ X[p] for X of shape (P, d, Q), with batched-GEMM kernels in both directions.

    torch.matmul's broadcast backward for the shared U goes through a slower reduction path;
    here dU = sum_p G[p] @ X[p]^T is one batched GEMM and a sum (when the (P, O, d) partials
    are no larger than X): the dominant first mode of a VGG head is the case it is for
    (benchmarks/layers.py times it).
    """

    @staticmethod
    def forward(ctx, factor: Tensor, x: Tensor) -> Tensor:
        # Under autocast both operands take the autocast dtype here, and the backward works in
        # that dtype too (it runs outside autocast): saving the uncast tensors would pair a bf16
        # gradient with an fp32 operand. Gradients go back in each input's own dtype.
        device = x.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else torch.promote_types(factor.dtype, x.dtype))
        ctx.dtypes = factor.dtype, x.dtype
        factor, x = factor.to(dtype), x.to(dtype)
        ctx.save_for_backward(factor, x)
        return torch.bmm(factor.expand(x.shape[0], *factor.shape), x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        factor, x = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_factor = grad_x = None
        if ctx.needs_input_grad[0]:
            if x.shape[0] * factor.numel() <= x.numel():
                grad_factor = torch.bmm(grad, x.mT).sum(0)
            else:
                grad_factor = torch.tensordot(grad, x, dims=([0, 2], [0, 2]))
            grad_factor = grad_factor.to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_x = torch.bmm(factor.mT.expand(x.shape[0], *factor.mT.shape), grad).to(ctx.dtypes[1])
        return grad_factor, grad_x


def _mode_product(x: Tensor, factor: Tensor, mode: int) -> Tensor:
    """Multiply mode `mode` of the feature dims of x (shape (P, d1..dN)) by factor (O, d_mode)."""
    dims = x.shape[1:]
    pre = x.shape[0] * math.prod(dims[:mode])
    post = math.prod(dims[mode + 1:])
    out_dims = (*x.shape[:1], *dims[:mode], factor.shape[0], *dims[mode + 1:])
    if post == 1:  # last mode: one GEMM over all rows
        return (x.reshape(pre, dims[mode]) @ factor.mT).reshape(out_dims)
    if pre == 1:  # first mode of a single sample: one GEMM over all columns
        return (factor @ x.reshape(dims[mode], post)).reshape(out_dims)
    x3 = x.reshape(pre, dims[mode], post)
    if torch.jit.is_tracing() or not (torch.is_grad_enabled() and (x.requires_grad or factor.requires_grad)):
        return torch.matmul(factor, x3).reshape(out_dims)  # same forward; traceable for export
    return _BatchedModeProduct.apply(factor, x3).reshape(out_dims)


# --------------------------------------------------------------------------- the layer
class SeparableLinear(FactorizedLayer, LipschitzModule):
    """Linear map on unflattened tensors: (..., *in_shape) -> (..., *out_shape).

    Args:
        in_shape: feature shape of the input, e.g. (512, 2, 2) for a conv map.
        out_shape: feature shape of the output, one entry per input mode.
        rank: number of Kronecker terms summed (R).
        bias: add a learnable bias of shape `out_shape`.
        orthogonal: keep every factor orthogonal or semi-orthogonal (Stiefel), through
            torch.nn.utils.parametrizations.orthogonal (its matrix_exp map: the householder map
            of torch 2.14 collapsed non-square factors to zero after one AdamW step), so that
            the layer is 1-Lipschitz (L2):
            for R = 1 the implied matrix is a Kronecker product of (semi-)orthogonal factors,
            whose singular values are products of ones: spectral norm exactly 1, no
            normalization. For R > 1 a sum of such products can reach norm R, so the layer is
            divided by the *exact* spectral norm of its implied matrix, the largest singular
            value of `implied_core` (same non-zero singular values, far smaller), recomputed
            in every forward and differentiated through: spectral norm exactly 1 again. Where
            that core is large (over EXACT_NORM_MAX_ELEMENTS entries) it is divided by R
            instead: norm at most 1 (sound), possibly less.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        rank: int = 1,
        bias: bool = True,
        orthogonal: bool = False,
    ) -> None:
        super().__init__()
        self.in_shape = _as_shape(in_shape, "in_shape")
        self.out_shape = _as_shape(out_shape, "out_shape")
        if len(self.in_shape) != len(self.out_shape):
            raise ValueError(
                f"in_shape {self.in_shape} and out_shape {self.out_shape} must have the same "
                "number of modes"
            )
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        self.rank = rank
        self.factors = nn.ModuleList(
            nn.ParameterList(torch.empty(o, i) for o, i in zip(self.out_shape, self.in_shape))
            for _ in range(rank)
        )
        self.bias = nn.Parameter(torch.empty(self.out_shape)) if bias else None
        self.order = contraction_order(self.in_shape, self.out_shape)
        # the implied matrix's GEMM against the mode products (shapes and rank are fixed): see _implied_pays
        self._dense_is_cheap = built_matrix_pays(0, self.in_features * self.out_features, self.macs_per_row(), 1)
        # set by from_linear: relative Frobenius error of the Kronecker approximation
        self.approximation_error: float | None = None
        self.orthogonal = orthogonal
        self.reset_parameters()
        if orthogonal:
            for term in self.factors:
                for k in range(self.num_modes):
                    nn.utils.parametrizations.orthogonal(term, str(k), orthogonal_map="matrix_exp")

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)

    @property
    def num_modes(self) -> int:
        return len(self.in_shape)

    def reset_parameters(self) -> None:
        """Orthogonal factors (kappa = 1) scaled so the implied dense weight has the entry
        variance of PyTorch's nn.Linear default, 1 / (3 fan_in) (orthogonal mode: unscaled,
        the parametrization keeps them orthogonal); bias as in nn.Linear."""
        for term in self.factors:
            for k, scale in enumerate(self._factor_scales()):
                if nn.utils.parametrize.is_parametrized(term, str(k)):  # through its right inverse
                    original = term.parametrizations[str(k)].original
                    with torch.no_grad():
                        setattr(term, str(k), nn.init.orthogonal_(torch.empty(
                            self.out_shape[k], self.in_shape[k], dtype=original.dtype, device=original.device)))
                    continue
                nn.init.orthogonal_(term[k])
                with torch.no_grad():
                    term[k].mul_(scale)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _factor_scales(self) -> list[float]:
        # A semi-orthogonal (O, I) matrix has mean squared entry 1 / max(O, I); the Kronecker
        # product multiplies those and the R terms add. Target: 1 / (3 * prod(I)).
        per_mode = (3.0 * self.rank) ** (-1.0 / self.num_modes)
        return [math.sqrt(per_mode * o / min(o, i)) for o, i in zip(self.out_shape, self.in_shape)]

    def forward(self, x: Tensor) -> Tensor:
        n = self.num_modes
        if tuple(x.shape[x.dim() - n:]) != self.in_shape or x.dim() < n:
            raise ValueError(
                f"SeparableLinear expected input of shape (..., {', '.join(map(str, self.in_shape))})"
                f", got {tuple(x.shape)}"
            )
        lead = x.shape[: x.dim() - n]
        h = x.reshape(-1, *self.in_shape)
        if self.uses_implied(h.shape[0]):  # small layer, many rows: one GEMM with the implied matrix
            w = self.implied_weight()
            bias = self.bias.flatten() if self.bias is not None else None
            return nn.functional.linear(h.reshape(h.shape[0], -1), w.to(h.dtype) if not torch.is_autocast_enabled(
                h.device.type) else w, bias).reshape(*lead, *self.out_shape)
        y = self.mode_products(h)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, *self.out_shape)

    def mode_products(self, h: Tensor) -> Tensor:
        """The R terms' mode products on modes 1..N of h (shape (P, d1..dN, ...): trailing dims
        are carried along), summed; orthogonal mode with R > 1 divided by the spectral norm. No bias."""
        y = None
        for term in self.factors:
            z = h
            for k in self.order:
                z = _mode_product(z, term[k].to(z.dtype), k)
            y = z if y is None else y + z
        if self.orthogonal and self.rank > 1:
            y = y / self.spectral_norm().to(y.dtype)
        return y

    def folded(self) -> nn.Module:
        """The implied dense layer on the unflattened features: (..., *in_shape) -> (..., *out_shape)."""
        n = self.num_modes
        return nn.Sequential(nn.Flatten(-n), super().folded(), nn.Unflatten(-1, self.out_shape))

    def macs_per_row(self) -> int:
        """Multiply-adds of the mode products for one input row, all R terms."""
        dims, total = list(self.in_shape), 0
        for k in self.order:
            total += math.prod(dims) * self.out_shape[k]
            dims[k] = self.out_shape[k]
        return self.rank * total

    def _implied_pays(self, rows: int) -> bool:
        """The implied matrix when its GEMM costs at most MATRIX_WORK_FACTOR x the mode products'
        multiply-adds per row and enough rows share the R x I x O cost of building it: one GEMM
        runs several times faster per multiply-add than R x N small products on a CPU
        (`python benchmarks/layers.py` measures both)."""
        return self._dense_is_cheap and rows >= 4 * self.rank * self.num_modes

    def implied_weight(self) -> Tensor:
        """The implied dense matrix (prod(out_shape), prod(in_shape)), for C-order flattening
        (orthogonal mode, R > 1: divided by its spectral norm, as the forward is)."""
        weight = sum(kron_all(list(term)) for term in self.factors)
        return weight / self.spectral_norm() if self.orthogonal and self.rank > 1 else weight

    def freeze_normalization_(self) -> "SeparableLinear":
        """For inference, once the orthogonal parametrization is removed (`sepnet.deploy.
        inference_copy`): orthogonal mode with R > 1 divides by the implied core's spectral norm
        (a QR and an SVD, which no ONNX opset has) in every forward; fold its current value into
        each term's first factor and leave the orthogonal mode, so the layer is the same function
        as a plain sum of Kronecker products. In place; a no-op elsewhere."""
        if self.orthogonal and self.rank > 1:
            if any(nn.utils.parametrize.is_parametrized(term) for term in self.factors):
                raise RuntimeError("freeze_normalization_: remove the orthogonal parametrization first")
            with torch.no_grad():
                norm = self.spectral_norm()
                for term in self.factors:
                    term[0].div_(norm)
            self.orthogonal = False
        return self

    lipschitz_rule = "orthogonal separable, measured"  # the LipschitzModule contract

    def lipschitz_constant(self) -> float | None:
        """Orthogonal mode: the exact spectral norm of the layer as it computes (1 up to float
        rounding): R = 1, the product of the factors' largest singular values; R > 1, the
        largest singular value of the (normalized) implied core. None outside it."""
        if not self.orthogonal:
            return None
        with torch.no_grad():
            if self.rank == 1:
                return math.prod(float(torch.linalg.matrix_norm(f.double(), ord=2)) for f in self.factors[0])
            if self.core_elements() > EXACT_NORM_MAX_ELEMENTS:  # the triangle inequality's bound
                return sum(math.prod(float(torch.linalg.matrix_norm(f.double(), ord=2)) for f in term)
                           for term in self.factors) / self.rank
            norm = torch.linalg.matrix_norm(implied_core(self, torch.float64), ord=2)
            return float(norm / self.spectral_norm().double())

    def core_elements(self) -> int:
        """Entries of `implied_core(self)` (at most; its sides are bounded by the factors' spans)."""
        rows = math.prod(min(o, self.rank * i) for o, i in zip(self.out_shape, self.in_shape))
        cols = math.prod(min(i, self.rank * o) for o, i in zip(self.out_shape, self.in_shape))
        return rows * cols

    def spectral_norm(self) -> Tensor:
        """The spectral norm the orthogonal mode divides by (before any normalization): exactly,
        the largest singular value of `implied_core(self)` (differentiable), where the core has
        at most EXACT_NORM_MAX_ELEMENTS entries; above, the rank R, which bounds the norm of a
        sum of R products of (semi-)orthogonal factors (the triangle inequality): sound, looser."""
        if self.core_elements() > EXACT_NORM_MAX_ELEMENTS:
            return self.factors[0][0].new_tensor(float(self.rank))
        with torch.autocast(self.factors[0][0].device.type, enabled=False):
            return torch.linalg.matrix_norm(implied_core(self, torch.float64), ord=2).to(self.factors[0][0].dtype)

    def extra_repr(self) -> str:
        stored, dense = self.stored_parameters(), self.dense_parameters()
        return (
            f"in_shape={self.in_shape}, out_shape={self.out_shape}, rank={self.rank}, "
            f"bias={self.bias is not None}{', orthogonal' if self.orthogonal else ''}, params={stored:,} (dense {dense:,}, "
            f"{dense / stored:.1f}x smaller)"
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        rank: int = 1,
    ) -> "SeparableLinear":
        """Nearest sum of `rank` Kronecker products to a trained nn.Linear; bias copied.

        The relative Frobenius error ||W - W_hat|| / ||W|| is kept in `layer.approximation_error`.
        """
        in_shape, out_shape = _as_shape(in_shape, "in_shape"), _as_shape(out_shape, "out_shape")
        check_factor_shapes(linear, in_shape, out_shape)
        layer = cls(in_shape, out_shape, rank=rank, bias=linear.bias is not None)
        layer = layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        factors, error = nearest_kronecker(linear.weight.detach(), in_shape, out_shape, rank)
        with torch.no_grad():
            for term, term_factors in zip(layer.factors, factors):
                for param, value in zip(term, term_factors):
                    param.copy_(value)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().reshape(out_shape))
        layer.approximation_error = error
        return layer


class FlatSeparableLinear(SeparableLinear):
    """Drop-in for nn.Linear on flat features (..., in_features) -> (..., out_features).

    The last dim is viewed as `in_shape` (C order), e.g. ViT tokens (B, T, D) with D = 24 x 32.
    """

    def folded(self) -> nn.Module:
        """The implied nn.Linear on the flat features."""
        return FactorizedLayer.folded(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"FlatSeparableLinear expected input of shape (..., {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        y = super().forward(x.unflatten(-1, self.in_shape))
        return y.flatten(-self.num_modes) if self.num_modes > 1 else y


# --------------------------------------------------------------------------- Kronecker approximation
def _rearrange(weight: Tensor, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Tensor:
    """Van Loan-Pitsianis rearrangement: W[(o1..oN), (i1..iN)] -> T[(o1,i1), ..., (oN,iN)].

    A sum of R Kronecker products of W becomes a rank-R CP tensor T (a rank-R matrix for N=2).
    """
    n = len(in_shape)
    t = weight.reshape(*out_shape, *in_shape)
    t = t.permute([axis for k in range(n) for axis in (k, n + k)])
    return t.reshape([o * i for o, i in zip(out_shape, in_shape)])


def nearest_kronecker(
    weight: Tensor,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    rank: int = 1,
    iterations: int = 200,
    tol: float = 1e-12,
) -> tuple[list[list[Tensor]], float]:
    """Factors [r][k] of the sum of `rank` Kronecker products nearest to `weight`, and the
    relative Frobenius error.

    N = 2: truncated SVD of the rearranged matrix (Van Loan-Pitsianis), the optimal answer.
    N > 2: CP-ALS on the rearranged N-way tensor, started from its HOSVD (leading singular
    vectors of each unfolding); exact for an exactly Kronecker-structured weight, a local
    optimum otherwise. Each term's factors are rescaled to equal Frobenius norms.
    """
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    w = weight.detach().to(torch.float64)
    t = _rearrange(w, in_shape, out_shape)
    n = len(in_shape)
    if n == 1:
        cols = [[w]] + [[torch.zeros_like(w)] for _ in range(rank - 1)]
        return _balanced(cols, weight.dtype, in_shape, out_shape), 0.0
    if n == 2:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        r = min(rank, s.numel())
        cols = [[u[:, j] * s[j], vh[j]] for j in range(r)]
    else:
        cols = _cp_als(t, rank, iterations, tol)
    cols += [[torch.zeros(d, dtype=w.dtype) for d in t.shape] for _ in range(rank - len(cols))]
    factors = _balanced(cols, weight.dtype, in_shape, out_shape)
    approx = sum(kron_all([f.to(torch.float64) for f in term]) for term in factors)
    error = (torch.linalg.norm(approx - w) / torch.linalg.norm(w).clamp_min(1e-300)).item()
    return factors, error


def _span(matrices: list[Tensor]) -> Tensor:
    """Orthonormal basis (detached) of the sum of the matrices' column spaces."""
    q, _ = torch.linalg.qr(torch.cat([m.detach() for m in matrices], 1))
    return q


def implied_core(layer: "SeparableLinear", dtype: torch.dtype = torch.float64) -> Tensor:
    """C = (kron B_k)^T W (kron A_k), with B_k / A_k orthonormal bases of the sum over terms of
    the mode-k factors' column / row spaces: C has W's non-zero singular values and is a sum of
    Kronecker products of (d_k x e_k) matrices, d_k <= min(O_k, R I_k), e_k <= min(I_k, R O_k).
    For a head such as (512, 2, 2) -> (8, 8, 8) at rank 4 it is 512 x 128 instead of 512 x 2048,
    and it has full structural rank where W does not. The bases are detached: the first-order
    gradient of W's singular values is exact through C. (W without the orthogonal mode's
    normalization.)"""
    n = layer.num_modes
    factors = [[f.to(dtype) for f in term] for term in layer.factors]
    outs = [_span([term[k] for term in factors]) for k in range(n)]
    ins = [_span([term[k].mT for term in factors]) for k in range(n)]
    return sum(kron_all([outs[k].mT @ term[k] @ ins[k] for k in range(n)]) for term in factors)


def kron_all(mats: Sequence[Tensor]) -> Tensor:
    """kron(mats[0], mats[1], ...): the implied matrix of one Kronecker term."""
    out = mats[0].contiguous()
    for m in mats[1:]:
        out = torch.kron(out, m.contiguous())  # a parametrized factor may be a transposed view
    return out


def _balanced(cols, dtype, in_shape, out_shape) -> list[list[Tensor]]:
    """Reshape CP columns into (O_k, I_k) factors with equal norms inside each term."""
    terms = []
    for col in cols:
        norms = [torch.linalg.norm(c) for c in col]
        total = math.prod(float(x) for x in norms)
        target = total ** (1.0 / len(col)) if total > 0 else 0.0
        terms.append([
            (c * (target / float(nrm)) if float(nrm) > 0 else c).reshape(o, i).to(dtype)
            for c, nrm, o, i in zip(col, norms, out_shape, in_shape)
        ])
    return terms


def _cp_als(t: Tensor, rank: int, iterations: int, tol: float) -> list[list[Tensor]]:
    """Rank-`rank` CP decomposition by alternating least squares; returns columns per term."""
    n = t.dim()
    unfoldings = [t.movedim(k, 0).reshape(t.shape[k], -1) for k in range(n)]
    mats = []
    for k in range(n):  # HOSVD start: leading left singular vectors, padded if rank is larger
        u = torch.linalg.svd(unfoldings[k], full_matrices=False)[0][:, :rank]
        if u.shape[1] < rank:
            extra = torch.randn(t.shape[k], rank - u.shape[1], dtype=t.dtype,
                                generator=torch.Generator().manual_seed(k))
            u = torch.cat([u, 1e-3 * extra], 1)
        mats.append(u)
    norm_t = torch.linalg.norm(t)
    previous = None
    for _ in range(iterations):
        for k in range(n):
            others = [mats[j] for j in range(n) if j != k]
            khatri_rao = _khatri_rao(others)
            gram = torch.ones(rank, rank, dtype=t.dtype)
            for m in others:
                gram = gram * (m.mT @ m)
            mats[k] = torch.linalg.lstsq(gram, (unfoldings[k] @ khatri_rao).mT).solution.mT
        residual = torch.linalg.norm(unfoldings[0] - mats[0] @ _khatri_rao(mats[1:]).mT) / norm_t
        if previous is not None and abs(previous - residual) < tol:
            break
        previous = residual
    return [[mats[k][:, j] for k in range(n)] for j in range(rank)]


def _khatri_rao(mats: Sequence[Tensor]) -> Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = (out.unsqueeze(1) * m.unsqueeze(0)).reshape(-1, out.shape[1])
    return out
