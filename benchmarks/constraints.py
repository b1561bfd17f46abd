"""Which differentiable condition-number penalty to default to, and what the penalties cost.

    python -m benchmarks.constraints

1. A teacher-student regression: a SeparableLinear (16, 16) -> (16, 16), rank 2, fits an
   ill-conditioned Kronecker teacher with MSE + weight x penalty, for each penalty form. Reports
   the task loss, the factors' mean kappa, the implied layer's kappa and the factors' norm.
2. The cost of `constraint_penalties` on the CIFAR MLP and VGG models of sepnet, relative to a
   forward+backward training step of the same model (batch 128) measured in the same run.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from sepnet.measures import condition_number, layer_condition_number
from sepnet.constraints import condition_penalty, constraint_penalties, implied_penalty
from sepnet.layers import SeparableLinear


def teacher_student(form: str | None, weight: float = 1e-2, steps: int = 1500, rank: int = 2) -> dict:
    torch.manual_seed(0)
    scales = torch.logspace(0, 2, 16)  # each teacher factor has kappa = 100
    teacher = [torch.linalg.qr(torch.randn(16, 16))[0] * scales for _ in range(2)]
    w_true = torch.kron(*teacher) / 100
    student = SeparableLinear((16, 16), (16, 16), rank=rank, bias=False)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    x_val = torch.randn(512, 256)
    for _ in range(steps):
        x = torch.randn(128, 256)
        loss = (student(x.view(-1, 16, 16)).reshape(128, -1) - x @ w_true.T).square().mean()
        if form == "implied":
            loss = loss + weight * implied_penalty(student)
        elif form is not None:
            loss = loss + weight * sum(condition_penalty(f, form) for t in student.factors for f in t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mse = (student(x_val.view(-1, 16, 16)).reshape(512, -1) - x_val @ w_true.T).square().mean()
        target = (x_val @ w_true.T).square().mean()
    factors = [f for t in student.factors for f in t]
    return {
        "form": form or "none", "rank": rank,
        "rel_mse": (mse / target).item(),
        "factor_kappa": sum(condition_number(f) for f in factors) / len(factors),
        "layer_kappa": layer_condition_number(student).value,
        "factor_norm": sum(f.detach().norm().item() for f in factors) / len(factors),
    }


def penalty_overhead(name: str, model: nn.Module, x: torch.Tensor, repeats: int = 10, form: str = "amgm") -> None:
    y = torch.randint(0, 10, (x.shape[0],))

    def step(with_penalty: bool):
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if with_penalty:
            p = constraint_penalties(model, form)
            loss = loss + 1e-3 * p["cond"] + 1e-5 * p["sparsity"]
        loss.backward()

    def median(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[repeats // 2]

    plain, penalized = median(lambda: step(False)), median(lambda: step(True))
    alone = median(lambda: (constraint_penalties(model, form)["cond"] * 1.0).backward())
    print(f"{name + ', ' + form:36} step {1e3 * plain:8.1f} ms   with penalties {1e3 * penalized:8.1f} ms   "
          f"penalties alone {1e3 * alone:6.2f} ms   overhead {penalized / plain - 1:+.1%}")


def main() -> None:
    print("1. teacher-student, SeparableLinear (16,16)->(16,16) at rank R, teacher kappa 1e4, "
          "penalty weight 1e-2, Adam 1500 steps")
    print(f"{'form':8} {'rank':>4} {'rel. MSE':>9} {'mean factor kappa':>18} {'layer kappa':>12} {'factor norm':>12}")
    for rank in (1, 2, 4, 8):
        for form in [None, "amgm", "logdet", "logcond", "implied"]:
            if rank > 2 and form in ("logdet", "logcond"):
                continue
            r = teacher_student(form, rank=rank)
            print(f"{r['form']:8} {rank:4} {r['rel_mse']:9.4f} {r['factor_kappa']:18.2f} {r['layer_kappa']:12.2f} "
                  f"{r['factor_norm']:12.3f}", flush=True)
    print("\n2. cost of constraint_penalties (condition form + l1) per training step, batch 128")
    for name, model in cifar_models().items():
        for form in ("amgm", "implied"):
            penalty_overhead(name, model, torch.rand(128, 3, 32, 32), form=form)


def cifar_models() -> dict[str, nn.Module]:
    """CPU-sized CIFAR models: separable MLP and VGG-16 (width 1/4) with a separable head."""
    from sepnet.backbones import build_backbone
    from sepnet.heads import SeparableHead

    models = {}
    for name, kwargs in {"mlp": {}, "vgg16": {"width": 0.25}}.items():
        b = build_backbone(name, (3, 32, 32), **kwargs)
        head_kwargs = b.head_defaults.get("separable", {})
        if name == "vgg16":
            head_kwargs = {"hidden_shapes": [(4, 4, 8), (4, 4, 8)]}
        models[f"{name} (separable)"] = nn.Sequential(b.module, SeparableHead(b.out_shape, 10, **head_kwargs))
    b = build_backbone("vgg16", (3, 32, 32), width=0.25)  # the reproduction study's 84x head (sep_b)
    models["vgg16/4 sep_b (rank 4)"] = nn.Sequential(b.module, SeparableHead(
        b.out_shape, 10, hidden_shapes=[(8, 8, 8), (8, 8, 8)], rank=4, separable_classifier=True))
    return models


if __name__ == "__main__":
    main()
