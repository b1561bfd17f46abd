"""Long, resumable certified-training runs toward the target (issue 43): >= 50% certified at L2
36/255 with <= 0.3M parameters.

    python -m benchmarks.certified_long --budget 0.1M --model lipconvnet_dense --data 40k --epochs 100
    python -m benchmarks.certified_long --model lipconvnet_dense_lln --recipe augment=none temperature=0.5   # the CPU recipe
    python -m benchmarks.certified_long --report

Each run trains one model of benchmarks/certified.py (the same recipe: mean-only normalization,
the Lipschitz-margin loss at 36/255, temperature 0.25, AdamW 5e-3 cosine, batch 256) on the
shared CIFAR-10 JPEG copy (`--data 20k`: cifar10-jpeg, `40k`: cifar10-jpeg-40k; 5% of the
training images held out, as in certified.py), and after every epoch writes one JSON line with
clean and certified accuracy on all 10k test images (the curve; the weights are not chosen on
it: the run reports its last epoch). At the end: the soundness checks on 1,000 test images and
a final line. `--recipe key=value` changes the recipe as benchmarks/certified.py's levers do
(the training set is `--data`), named in the run's key.

Resumable across sessions: the run's state (Lightning's last.ckpt: weights, optimizer,
scheduler, loop and RNG states; about 1 MB) lives in benchmarks/results/certified_long/<run>/ and
is committed, so a fresh machine continues where the last session stopped (an epoch boundary:
at most one epoch is lost). A rerun of a finished run does nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

from benchmarks.certified import (BUDGETS, RECIPE, certified_fractions, classifier, parse_recipe, soundness_record,
                                  training_data)
from benchmarks.common import DATA_SETS, FIGURES
from sepnet.callbacks import last_checkpoint
from sepnet.data import ImageFolderDataModule
from sepnet.lipschitz import lipschitz_bound, pairwise_bound

HERE = Path(__file__).resolve().parent

RESULTS = HERE / "results" / "certified_long.jsonl"
STATE = HERE / "results" / "certified_long"
DATA = DATA_SETS


def run_key(budget: str, model: str, data: str, epochs: int, seed: int, recipe: dict | None = None) -> str:
    levers = "".join(f"_{k}-{v}" for k, v in sorted((recipe or {}).items()))
    return f"{model}_{budget}_{data}_e{epochs}_s{seed}{levers}"


def datamodule(data: str, workers: int, recipe: dict | None = None) -> ImageFolderDataModule:
    """The training set `data` with the recipe's batch and augmentation."""
    return training_data({**(recipe or {}), "data": data}, workers)


def test_set(data: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 10k test images (the same for 20k and 40k)."""
    dm = datamodule(data, 0, {"batch": 500})
    dm.setup()
    xs, ys = zip(*dm.test_dataloader())  # the loader's fixed shuffle: a prefix is a random sample
    return torch.cat(xs), torch.cat(ys)


def certified_figures(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Clean and certified accuracy (float32, eval mode) on (x, y), and the bound."""
    bound = lipschitz_bound(net)
    with torch.no_grad():
        logits = torch.cat([net(c) for c in x.split(500)])
    return {"clean_acc": float((logits.argmax(-1) == y).float().mean()), "lipschitz_bound": bound.value,
            **certified_fractions(logits, y, bound, pairwise_bound(net, bound))}


class CertifiedCurve(L.Callback):
    """After every training epoch: one JSON line with the test figures."""

    def __init__(self, key: str, x: torch.Tensor, y: torch.Tensor, results: Path) -> None:
        self.key, self.x, self.y, self.results = key, x, y, results
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seconds = time.perf_counter() - self._start
        was_training = pl_module.training
        pl_module.eval()
        try:
            figures = certified_figures(pl_module.net, self.x, self.y)
        finally:
            pl_module.train(was_training)
        line = {"run": self.key, "kind": "epoch", "epoch": trainer.current_epoch + 1, "train_seconds": seconds,
                **figures}
        with self.results.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)


def records(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []


def run(args: argparse.Namespace) -> None:
    try:
        recipe = parse_recipe(args.recipe)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if "data" in recipe:
        raise SystemExit(f"--recipe data={recipe['data']}: expected the training set as --data")
    key = run_key(args.budget, args.model, args.data, args.epochs, args.seed, recipe)
    if any(r["run"] == key and r["kind"] == "final" for r in records(args.results)):
        print(f"{key}: done")
        return
    torch.manual_seed(args.seed)
    module = classifier(BUDGETS[args.budget][args.model], recipe)
    state = STATE / key
    state.mkdir(parents=True, exist_ok=True)
    resume = state / "last.ckpt"
    x, y = test_set(args.data)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[CertifiedCurve(key, x, y, args.results),
                                                           last_checkpoint(str(state))])
    trainer.fit(module, datamodule(args.data, args.workers, recipe), ckpt_path=str(resume) if resume.is_file() else None)
    net = module.net.eval()
    final = {"run": key, "kind": "final", "budget": args.budget, "model": args.model, "data": args.data,
             "seed": args.seed, "epochs": args.epochs, "params": sum(p.numel() for p in net.parameters()),
             "network": BUDGETS[args.budget][args.model], **({"recipe": recipe} if recipe else {}),
             **certified_figures(net, x, y)}
    n = args.check_images
    bound = lipschitz_bound(net)
    final["soundness"] = soundness_record(net, x[:n], y[:n], bound, pairwise_bound(net, bound))
    with args.results.open("a") as f:
        f.write(json.dumps(final) + "\n")
    print(json.dumps(final), flush=True)
    if not final["soundness"]["passed"]:
        raise SystemExit(f"soundness check FAILED, the certificates are void: {final['soundness']['error']}")


def curves(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """Per run, its epoch lines by epoch (a redone epoch: the later line)."""
    epochs: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r["kind"] == "epoch":
            epochs.setdefault(r["run"], {})[r["epoch"]] = r
    return epochs


def report(results: Path, figures: Path = FIGURES) -> None:
    """Per run: the last epoch's figures under both certificates (the sqrt(2) L one, and the
    pairwise one where the network ends in a linear layer), the curve every 10 epochs, and the
    curves' figure (figures/certified_long.png)."""
    rows = records(results)
    epochs = curves(rows)
    finals = {r["run"]: r for r in rows if r["kind"] == "final"}
    print("| run | epochs done | clean | certified 36/255 | 72/255 | 108/255 | pairwise 36/255 | 72/255 | 108/255 "
          "| s / epoch | soundness |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    radii = ("36/255", "72/255", "108/255")
    for key, curve in sorted(epochs.items()):
        last = curve[max(curve)]
        status = ("passed" if finals[key]["soundness"]["passed"] else "FAILED") if key in finals else "running"
        seconds = sum(r["train_seconds"] for r in curve.values()) / len(curve)
        pairwise = last.get("certified_pairwise")
        print(f"| {key} | {max(curve)} | {last['clean_acc']:.3f} | "
              + " | ".join(f"{last['certified'][k]:.3f}" for k in radii) + " | "
              + " | ".join(f"{pairwise[k]:.3f}" if pairwise else "-" for k in radii)
              + f" | {seconds:.0f} | {status} |")
    for key, curve in sorted(epochs.items()):
        points = [f"{e}: {best(curve[e]):.3f}" for e in sorted(curve) if e % 10 == 0 or e == 1]
        print(f"{key} certified 36/255 (the tighter certificate) by epoch: {', '.join(points)}")
    if epochs:
        print(f"figure: {figure(epochs, figures / 'certified_long.png')}")


def best(line: dict, radius: str = "36/255") -> float:
    """The fraction certified at radius by the tighter of the line's certificates."""
    return max(line["certified"][radius], line.get("certified_pairwise", {}).get(radius, 0.0))


def figure(epochs: dict[str, dict[int, dict]], path: Path) -> Path:
    """Certified accuracy at 36/255 (solid: the tighter certificate; dotted: sqrt(2) L where the
    pairwise one is tighter) and clean accuracy (faint) per epoch, one colour a run; the target
    (0.50) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, (key, curve) in enumerate(sorted(epochs.items())):
        xs = sorted(curve)
        colour = f"C{i}"
        ax.plot(xs, [best(curve[e]) for e in xs], color=colour, label=key)
        if any(best(curve[e]) > curve[e]["certified"]["36/255"] for e in xs):
            ax.plot(xs, [curve[e]["certified"]["36/255"] for e in xs], color=colour, linestyle=":", linewidth=1)
        ax.plot(xs, [curve[e]["clean_acc"] for e in xs], color=colour, alpha=0.35, linewidth=1)
    ax.axhline(0.5, color="black", linestyle="--", linewidth=0.8, label="target: 0.50 certified at 36/255")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy on the 10k test images")
    ax.set_title("long certified runs: certified at L2 36/255 (solid), clean (faint)")
    ax.set_ylim(0, 0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="the table of runs and their curves")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="0.1M")
    parser.add_argument("--model", choices=sorted(BUDGETS["0.1M"]), default="lipconvnet_dense")
    parser.add_argument("--data", choices=sorted(DATA), default="40k")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="data loader workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the other core stays free)")
    parser.add_argument("--check-images", type=int, default=1000)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--figures", type=Path, default=FIGURES, help="where --report writes its figure")
    parser.add_argument("--recipe", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"levers as in benchmarks.certified: keys {sorted(k for k in RECIPE if k != 'data')}")
    args = parser.parse_args(argv)
    if args.report:
        report(args.results, args.figures)
        return
    torch.set_num_threads(args.threads)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    run(args)


if __name__ == "__main__":
    main()
