"""Certified robustness at equal parameter budgets (issue 28), and the Lipschitz-convolution
library choice.

    python -m benchmarks.certified --layers                      # AOC / AOL / deel-torchlip vs nn.Conv2d
    python -m benchmarks.certified --budget 0.1M --model lipconvnet_dense --seed 0 --epochs 6
    python -m benchmarks.certified --budget 0.1M --model lipconvnet_dense --epochs 18 --recipe temperature=0.5   # a lever
    python -m benchmarks.certified --report                      # tables + certified-vs-radius plot

Models (the same recipe for all: mean-only normalization, so the bound is the network's own
1; the Lipschitz-margin loss at L2 36/255, temperature 0.25; AdamW 5e-3, cosine; batch 256):
- lipconvnet_dense: orthogonal convolutions (orthogonium AOC), orthogonal 1x1 convolutions
  between stages, an orthogonal (Bjorck) dense classifier: the 1-Lipschitz dense model;
- lipconvnet_separable: the same convolutions, the 1x1 maps and the classifier orthogonal-
  separable (Kronecker factors), wider to spend the same budget; lipconvnet_separable_c10: the
  same with a (10, 1, 1) classifier;
- lipconvnet_dense_c10 / _c10r16 / _tt16: the dense model with only its classifier factorized
  (orthogonal separable (10, 1, 1) with 1 or 16 Kronecker terms; an orthogonal TT, ranks 16);
- lipconvnet_dense_narrow: the dense model at narrower widths, with about as many parameters as
  the factorized-classifier rows (the plain way to spend that budget);
- lipconvnet_dense_lln: the dense model with last-layer normalization (Singla et al., ICLR
  2022): its classifier's rows of unit norm, not orthonormal, certified by the pairwise
  certificate (the loss shifts logit j by 36/255 ||w_y - w_j||);
- lipmlp: every layer orthogonal-separable, on the raw (C, H, W) image.
Each run trains on the shared CIFAR-10 JPEG copy's 20k training images and reports, on the 10k
test images: clean accuracy, certified accuracy at 36/255, 72/255, 108/255 (and the curve to
255/255; where the network ends in a linear layer, the pairwise certificate's figures too,
which the table shows and the checks attack), the Lipschitz bound and how it was composed, parameters, train seconds, and the
soundness checks on 1,000 test images (layer norms, an empirical lower bound, PGD-L2 and
APGD-L2 at each radius breaking no certified image; a failure is recorded as an error and the
run's row is marked void). One JSON line per finished run in
benchmarks/results/certified.jsonl; a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import CIFAR_MEAN, CIFAR_STD, DATA_SETS, FIGURES, datamodule, train
from sepnet.attacks import Attacker
from sepnet.data import ImageFolderDataModule
from sepnet.certificate import soundness_checks
from sepnet.lipschitz import CertificateError, certified_from_logits, lipschitz_bound, pairwise_bound, pairwise_certified
from sepnet.module import ImageClassifier

HERE = Path(__file__).resolve().parent

RESULTS = HERE / "results" / "certified.jsonl"
RADII = (36 / 255, 72 / 255, 108 / 255)
CURVE = tuple(r / 255 for r in range(0, 256, 12))


def models(dense_widths: list[int], separable_widths: list[int], mlp_hidden: list[list[int]],
           narrow_widths: list[int]) -> dict[str, dict]:
    """One budget's networks: the convnet dense and separable (widths chosen to spend the same
    parameters), the separable one again with a (10, 1, 1) classifier -- all channels to every
    class, each spatial mode pooled by one learned unit vector, where the default (1, 2, 5) maps
    all channels through a single row (BENCHMARKS.md shows that bottleneck) -- the dense one with
    a factorized classifier, a narrower dense one with as many parameters as those, and lipmlp."""
    def convnet(head: str, widths: list[int], pointwise: str | None = None, **extra) -> dict:
        return {"backbone": "lipconvnet", "head": head,
                "backbone_kwargs": {"widths": widths, "depth": 2, "pointwise": pointwise or head}, **extra}

    return {"lipconvnet_dense": convnet("dense", dense_widths),
            "lipconvnet_separable": convnet("separable", separable_widths),
            "lipconvnet_separable_c10": convnet("separable", separable_widths,
                                                head_kwargs={"classifier_shape": [10, 1, 1]}),
            # the dense model's own layers with only its classifier made separable: what the
            # dense classifier's parameters (about half of the model) buy
            "lipconvnet_dense_c10": convnet("separable", dense_widths, pointwise="dense",
                                            head_kwargs={"classifier_shape": [10, 1, 1]}),
            # ... with 16 Kronecker terms in the classifier (divided by the exact norm of their
            # sum): 16 learned spatial poolings where the rank-1 classifier has one
            "lipconvnet_dense_c10r16": convnet("separable", dense_widths, pointwise="dense",
                                               head_kwargs={"classifier_shape": [10, 1, 1], "rank": 16}),
            # ... or an orthogonal tensor-train classifier (TT ranks 16, 3 cores) in place of the
            # dense one: the tt compressor's orthogonal mode on a plain Linear
            "lipconvnet_dense_tt16": convnet("dense", dense_widths, head_kwargs={"orthogonal": False}, compression=[
                {"method": "tt", "targets": ["head.layers.1"], "options": {"modes": 3, "rank": 16, "orthogonal": True}}]),
            # the plain alternative to a factorized classifier: the dense model made narrower until
            # it has as many parameters as the _c10r16 / _tt16 rows
            "lipconvnet_dense_narrow": convnet("dense", narrow_widths),
            # the dense model with last-layer normalization (Singla et al., ICLR 2022): its
            # classifier's rows of unit norm instead of orthonormal, certified pairwise
            "lipconvnet_dense_lln": convnet("dense", dense_widths, head_kwargs={"normalize_last": True}),
            "lipmlp": {"backbone": "lipmlp", "head": "separable", "backbone_kwargs": {"hidden_shapes": mlp_hidden}}}


def pointwise_sweep(bases: tuple[int, ...] = (8, 16, 32)) -> dict[str, dict]:
    """Issue 43's cost question: the convnet with 1x1 stage maps (3x3 stem), so that its
    arithmetic is in 1x1 maps, dense-orthogonal (k1_dense_w*) against Kronecker-orthogonal
    (k1_kron_w*), at widths (w, 2w, 4w); the same orthogonal dense classifier for both."""
    def net(width: int, pointwise: str) -> dict:
        return {"backbone": "lipconvnet", "head": "dense",
                "backbone_kwargs": {"widths": [width, 2 * width, 4 * width], "depth": 2, "kernel_size": 1,
                                    "stem_kernel_size": 3, "pointwise": pointwise}}
    return {f"k1_{kind}_w{w}": net(w, pointwise) for w in bases
            for kind, pointwise in (("dense", "dense"), ("kron", "separable"))}


BUDGETS = {
    "0.1M": models([16, 32, 64], [24, 48, 96], [[32, 32, 32], [32, 32, 32], [16, 16, 16]], [12, 24, 48]),
    "0.3M": models([32, 64, 128], [48, 96, 192], [[64, 32, 32], [64, 32, 32], [64, 32, 32], [32, 16, 16]],
                   [26, 52, 104]),
    "1x1": pointwise_sweep(),  # not a budget: a width sweep (`--budget 1x1 --model k1_dense_w16 ...`)
}


# the recipe and its levers (issue 43): `--recipe key=value ...` changes one of them for a run
# (margin: the loss's radius, x/255; schedule: the learning rate's; augment: random crops
# and flips, flips only, or none; data: the training set, benchmarks.common.DATA_SETS)
RECIPE = {"temperature": 0.25, "margin": 36.0, "lr": 5e-3, "batch": 256, "schedule": "cosine",
          "augment": "crop_flip", "data": "20k"}
CHOICES = {"schedule": ("cosine", "onecycle"), "augment": ("crop_flip", "flip", "none"), "data": tuple(DATA_SETS)}


def parse_recipe(items: list[str]) -> dict:
    """`key=value` strings -> the recipe's changed entries (a bad key or value: ValueError naming it)."""
    changed = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in RECIPE:
            raise ValueError(f"--recipe {item!r}: expected one of {sorted(RECIPE)} as key=value")
        if key in CHOICES:
            if value not in CHOICES[key]:
                raise ValueError(f"--recipe {item!r}: expected {key} one of {list(CHOICES[key])}")
            changed[key] = value
            continue
        try:
            changed[key] = type(RECIPE[key])(value)
        except ValueError:
            raise ValueError(f"--recipe {item!r}: expected a {type(RECIPE[key]).__name__} value") from None
        if changed[key] <= 0:
            raise ValueError(f"--recipe {item!r}: expected a positive value")
    return changed


def training_data(recipe: dict, workers: int = 2) -> ImageFolderDataModule:
    """The recipe's training set, batch and augmentation."""
    recipe = {**RECIPE, **recipe}
    return datamodule(recipe["batch"], recipe["data"], workers, crop=recipe["augment"] == "crop_flip",
                      flip=recipe["augment"] != "none")


def classifier(network: dict, recipe: dict | None = None) -> ImageClassifier:
    recipe = {**RECIPE, **(recipe or {})}
    return ImageClassifier(
        num_classes=10, image_shape=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD,
        network={**network, "scale_inputs": False},
        constraint={"condition_weight": 0.0, "sparsity_weight": 0.0, "proximal": False},
        optimization={"optimizer": "adamw", "lr": recipe["lr"], "weight_decay": 0.0,
                      "scheduler": recipe["schedule"]},
        adversarial={"loss": "lipschitz_margin", "margin_eps": recipe["margin"] / 255,
                     "margin_temperature": recipe["temperature"]},
        validation={"batches": 0}, certificate={"radii": list(RADII)})


def test_images(batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    dm = datamodule(batch)
    dm.setup()
    xs, ys = zip(*dm.test_dataloader())  # the loader's fixed shuffle: a prefix is a random sample
    return torch.cat(xs), torch.cat(ys)


def run(budget: str, model: str, seed: int, epochs: int, check_images: int, recipe: dict | None = None) -> dict:
    torch.manual_seed(seed)
    recipe = recipe or {}
    module = classifier(BUDGETS[budget][model], recipe)
    params = sum(p.numel() for p in module.net.parameters())
    seconds, _ = train(module, epochs, recipe.get("batch", RECIPE["batch"]), data=training_data(recipe))
    net = module.net.eval()
    x, y = test_images()
    bound = lipschitz_bound(net)
    with torch.no_grad():
        logits = torch.cat([net(c) for c in x.split(500)])
    record = {"budget": budget, "model": model, "seed": seed, "epochs": epochs, "params": params,
              "train_seconds": seconds, "clean_acc": float((logits.argmax(-1) == y).float().mean()),
              "lipschitz_bound": bound.value, "bound_how": bound.describe(), "network": BUDGETS[budget][model],
              **({"recipe": recipe} if recipe else {})}
    record["certified_curve"] = fractions(certified_from_logits(logits, y, CURVE, bound.value))
    pairwise = pairwise_bound(net, bound)
    record.update(certified_fractions(logits, y, bound, pairwise))
    begin = time.perf_counter()
    record["soundness"] = soundness_record(net, x[:check_images], y[:check_images], bound, pairwise)
    record["check_seconds"] = time.perf_counter() - begin
    return record


def fractions(masks: dict[float, torch.Tensor]) -> dict[str, float]:
    """Per radius (as "r/255"), the fraction of images certified."""
    return {f"{r * 255:.0f}/255": float(m.float().mean()) for r, m in masks.items()}


def certified_fractions(logits: torch.Tensor, y: torch.Tensor, bound, pairwise) -> dict:
    """The sqrt(2) L certificate's figures at RADII, and the pairwise one's where there is one
    (the network ends in a linear layer)."""
    figures = {"certified": fractions(certified_from_logits(logits, y, RADII, bound.value))}
    if pairwise is not None:
        figures["certified_pairwise"] = fractions(pairwise_certified(logits, y, RADII, pairwise))
    return figures


def soundness_record(net: nn.Module, x: torch.Tensor, y: torch.Tensor, bound, pairwise=None) -> dict:
    """The soundness checks on (x, y) as a record: passed with their figures, or the error (with
    `pairwise`, the attacks at the radius attack what the pairwise certificate certifies)."""
    try:
        report = soundness_checks(net, Attacker(net, (3, 32, 32), 10), x, y, RADII, bound, pairwise=pairwise)
    except CertificateError as err:
        return {"passed": False, "error": str(err)}
    return {"passed": True, "images": len(y), "empirical_lipschitz_lower_bound": report["empirical_lipschitz_lower_bound"],
            "max_layer_norm": max(r["spectral_norm"] for r in report["layer_norms"]),
            "attacks_at_radius": report["attacks_at_radius"]}


def layer_choice(repeats: int = 5) -> None:
    """The Lipschitz convolution candidates on one layer (32 -> 32 channels, 3x3, 32x32 maps,
    batch 64): the exact L2 norm of the kernel as it computes (DFT on the zero-padded grid) and
    the training forward+backward time against nn.Conv2d, in one run."""
    from deel import torchlip
    from orthogonium.layers.conv.AOC.ortho_conv import AdaptiveOrthoConv2d
    from orthogonium.layers.conv.AOL.aol import AOLConv2D

    from sepnet.lipschitz_layers import circular_conv_norm

    c, n, b = 32, 32, 64
    torch.manual_seed(0)
    layers = {"nn.Conv2d (not Lipschitz)": nn.Conv2d(c, c, 3, padding=1),
              "orthogonium AOC": AdaptiveOrthoConv2d(c, c, 3, padding="same", padding_mode="zeros"),
              "orthogonium AOL": AOLConv2D(c, c, 3, padding=1),
              "deel-torchlip SpectralConv2d": torchlip.SpectralConv2d(c, c, 3, padding=1)}
    x = torch.rand(b, c, n, n)
    times = {name: [] for name in layers}
    for layer in layers.values():
        layer.train()
        layer(x).sum().backward()  # warm-up
    for _ in range(repeats):  # alternating
        for name, layer in layers.items():
            start = time.perf_counter()
            layer(x).sum().backward()
            times[name].append(time.perf_counter() - start)
    base = sorted(times["nn.Conv2d (not Lipschitz)"])[repeats // 2]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {c}->{c} 3x3 on {n}x{n}, batch {b}, "
          f"median of {repeats}")
    print(f"{'layer':30} {'L2 norm (DFT, zeros)':>20} {'fwd+bwd ms':>11} {'vs conv':>8} {'params':>7}")
    for name, layer in layers.items():
        layer.eval()
        med = sorted(times[name])[repeats // 2]
        norm = circular_conv_norm(layer.weight, (n + 2, n + 2))
        print(f"{name:30} {norm:20.5f} {1e3 * med:11.1f} {med / base:7.2f}x {sum(p.numel() for p in layer.parameters()):7d}")


def report(results: Path = RESULTS, figure: Path = FIGURES / "certified.png") -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    print("| budget | model | seeds | params | epochs | clean | certified 36/255 | 72/255 | 108/255 | bound | "
          "train s / epoch | soundness |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    groups: dict[tuple, list] = {}
    for r in rows:
        lever = " ".join(f"{k}={v:g}" if isinstance(v, float | int) else f"{k}={v}"
                         for k, v in sorted(r.get("recipe", {}).items()))
        groups.setdefault((r["budget"], r["model"] + (f" ({lever})" if lever else ""), r["epochs"]), []).append(r)
    for (budget, model, epochs), rs in sorted(groups.items()):
        def mean(f):
            values = [f(r) for r in rs]
            m = sum(values) / len(values)
            return f"{m:.3f}" + (f" ± {max(values) - m:.3f}" if len(values) > 1 else "")
        passed = all(r["soundness"]["passed"] for r in rs)
        print(f"| {budget} | {model} | {len(rs)} | {rs[0]['params']:,} | {epochs} | {mean(lambda r: r['clean_acc'])} | "
              + " | ".join(mean(lambda r, k=k: r.get("certified_pairwise", r["certified"])[k])
                           for k in ("36/255", "72/255", "108/255"))
              + f" | {mean(lambda r: r['lipschitz_bound'])} | {sum(r['train_seconds'] for r in rs) / len(rs) / epochs:.0f} | "
              f"{'passed' if passed else 'FAILED'} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({b for b, _, _ in groups})
    colors = {m: f"C{i}" for i, m in enumerate(sorted({m for _, m, _ in groups}))}  # one colour a model, every panel
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4.5), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], budgets):
        for (budget, model, epochs), rs in sorted(groups.items()):
            if budget != panel:
                continue
            radii = list(rs[0]["certified_curve"])
            values = [sum(r["certified_curve"][k] for r in rs) / len(rs) for k in radii]
            ax.plot([int(k.split("/")[0]) for k in radii], values, marker="o", ms=3, color=colors[model],
                    linestyle="-" if epochs == min(e for b, _, e in groups if b == panel) else "--",
                    label=f"{model} ({rs[0]['params'] / 1e3:.0f}k, {epochs} ep, {len(rs)} seed{'s' * (len(rs) > 1)})")
        ax.set(title=f"budget {panel}", xlabel="L2 radius (x/255)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("certified accuracy (CIFAR-10 test, mean over seeds)")
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    print(f"wrote {figure}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", action="store_true", help="the convolution library measurement only")
    parser.add_argument("--report", action="store_true", help="tables and the certified-vs-radius plot")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="0.1M")
    parser.add_argument("--model", choices=sorted({m for b in BUDGETS.values() for m in b}), nargs="*",
                        help="default: every model of the budget")
    parser.add_argument("--seed", type=int, nargs="*", default=[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--check-images", type=int, default=1000)
    parser.add_argument("--recipe", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"change the recipe (a lever): keys {sorted(RECIPE)}, defaults {RECIPE}")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--figure", default=str(FIGURES / "certified.png"), help="--report's plot")
    args = parser.parse_args(argv)
    if args.layers:
        layer_choice()
        return
    results = Path(args.results)
    if args.report:
        report(results, Path(args.figure))
        return
    try:
        recipe = parse_recipe(args.recipe)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    args.model = args.model or sorted(BUDGETS[args.budget])
    if stray := [m for m in args.model if m not in BUDGETS[args.budget]]:
        raise SystemExit(f"--model {' '.join(stray)}: not in budget {args.budget}; expected some of {sorted(BUDGETS[args.budget])}")
    results.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if results.is_file():
        done = {(r["budget"], r["model"], r["seed"], r["epochs"], json.dumps(r.get("recipe", {}), sort_keys=True))
                for r in map(json.loads, results.read_text().splitlines()) if r}
    failed = []
    for seed in args.seed:
        for model in args.model:
            if (args.budget, model, seed, args.epochs, json.dumps(recipe, sort_keys=True)) in done:
                print(f"skip {args.budget} {model} seed {seed} ({args.epochs} epochs, recipe {recipe}): done")
                continue
            record = run(args.budget, model, seed, args.epochs, args.check_images, recipe)
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps({k: record[k] for k in ("budget", "model", "seed", "params", "clean_acc", "certified",
                                                     "lipschitz_bound", "train_seconds")}), flush=True)
            if not record["soundness"]["passed"]:
                failed.append(f"{args.budget} {model} seed {seed}: {record['soundness']['error']}")
    if failed:  # recorded (the row says void), and the command fails
        raise SystemExit("soundness check FAILED, the certificates are void: " + "; ".join(failed))


if __name__ == "__main__":
    main()
