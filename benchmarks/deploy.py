"""The deployed cost (issue 41): what each compressor's model costs where it runs, in the
currencies a device pays -- bytes, multiply-adds, onnxruntime CPU latency, memory -- beside the
non-zero count every verdict so far used.

    python -m benchmarks.deploy --cells              # export and measure every cell; one JSON line each
    python -m benchmarks.deploy --cells --model vgg --budget model30
    python -m benchmarks.deploy --report             # the table, and accuracy-against-cost fronts
    python -m benchmarks.deploy --certified          # issue 43: the certified models' deployed cost
    python -m benchmarks.deploy --certified --report

Cells: the converged verdict's VGG-16/4 cells (dense; TT-conv, global and layer-wise magnitude,
HYDRA, joint SVD, low rank at model10 and model30; the structured baselines narrow and channel)
and the ViT at model10 / model30 (dense, separable, TT, magnitude, global magnitude, HYDRA, low
rank). Weights do not change these costs except for sparse storage, so the cells are built
untrained, except the pruned ones, whose masks (and channel's architecture) come from the
committed dense start (benchmarks/results/converged_vgg_dense_fgsm_e15_s0.pt; the ViT's pruners
from their own untrained dense weights: said in the row).

Per cell, each model exported by sepnet.export twice, its factorized layers' folds chosen by
onnxruntime measurement for batch 1 and for batch 64 (sepnet.deploy): bytes of the ONNX file
(pruned weights as sparse initializers), gzipped, and of the sparse state dict; multiply-adds
per image counted on the exported graph; onnxruntime CPU latency (ms per image) at batch 1 (the
batch-1 export) and 64 (the batch-64 export), on 1 and 2 threads, and torch eager's beside it:
the median of `--repeats` runs after warm-up, every cell measured in each round before the
next round starts (interleaved: they see the same machine); the peak resident memory of a
fresh process that loads the batch-64 model into an onnxruntime session and runs one batch.
Results: benchmarks/results/deployed.jsonl (a rerun skips measured cells).

`--certified` does the same for the Lipschitz models of benchmarks.certified (each (budget,
model) of certified.jsonl, built untrained: the cost does not depend on the weights) into
certified_cost.jsonl, and its report plots certified accuracy at 36/255 (certified.jsonl, mean
over seeds at the shortest schedule both kinds share) against multiply-adds and latency: dense-
orthogonal against Kronecker-orthogonal (separable) 1x1 maps and classifiers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.cells import DENSE, cell_config
from benchmarks.common import FIGURES, HERE
from sepnet.deploy import session_memory
from sepnet.export import export_network
from sepnet.measures import parameter_counts
from sepnet.network import build_network

RESULTS = HERE / "results" / "deployed.jsonl"
WORK = HERE.parent / "exports" / "deployed"  # git-ignored: the exported files
DENSE_START = HERE / "results" / "converged_vgg_dense_fgsm_e15_s0.pt"
VGG_METHODS = ["ttconv_tt", "magnitude_global", "magnitude", "hydra", "jsvd_tt", "lowrank", "narrow", "channel"]
VIT_METHODS = ["separable", "tt", "magnitude", "magnitude_global", "hydra", "lowrank"]
BUDGETS = ("model10", "model30")
SHAPE = (3, 32, 32)


def plan() -> list[tuple[str, str, str]]:
    cells = [("vgg", "-", "dense"), ("vit", "-", "dense")]
    cells += [("vgg", b, m) for b in BUDGETS for m in VGG_METHODS]
    cells += [("vit", b, m) for b in BUDGETS for m in VIT_METHODS]
    return cells


def network(model: str, budget: str, method: str) -> tuple[dict, str]:
    """The cell's network section and where its weights come from."""
    if method == "dense":
        return DENSE[model], "untrained"
    start = str(DENSE_START) if model == "vgg" else None
    net, _, from_dense = cell_config(model, budget, method, start, 30, 15)
    if from_dense and model == "vit":  # no committed ViT dense start: its masks from its own initial weights
        net = {k: v for k, v in net.items() if k != "init_from"}
        return net, "masks of the untrained dense weights"
    return net, ("masks / channels from the committed dense start" if from_dense else "untrained")


def export_cell(model: str, budget: str, method: str, work: Path, fold: str = "auto") -> dict:
    """Build the cell, export it for batch 1 and for batch 64; the static figures (kept in the
    work folder as static.json: a later run measures the exported files without exporting again)."""
    def build() -> dict:
        section, weights = network(model, budget, method)
        torch.manual_seed(0)
        net = build_network(num_classes=10, image_shape=SHAPE, **section).eval()
        dense = parameter_counts(build_network(num_classes=10, image_shape=SHAPE, **DENSE[model])).dense
        return {"model": model, "budget": budget, "method": method, "weights": weights,
                **export_twice(net, dense, work / f"{model}_{budget}_{method}", fold)}

    return cached_export(work / f"{model}_{budget}_{method}", build)


def cached_export(folder: Path, build) -> dict:
    """build() (which exports into folder) unless its static figures are cached there."""
    cached = folder / "static.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    row = build()
    cached.write_text(json.dumps(row))
    return row


def export_twice(net: torch.nn.Module, dense: int, folder: Path, fold: str = "auto") -> dict:
    """The network exported with its folds chosen for batch 1 and for batch 64; the static figures."""
    counts = parameter_counts(net)
    reports = {b: export_network(net, SHAPE, folder / f"batch{b}", batch=b, fold=fold) for b in (1, 64)}
    big = reports[64]
    onnx_bytes = Path(big["files"]["onnx"]).read_bytes()
    return {"params_stored": counts.stored, "params_nonzero": counts.nonzero, "params_dense": dense,
            "nonzero_compression": dense / counts.nonzero,
            "onnx_bytes": len(onnx_bytes), "onnx_gzip_bytes": len(gzip.compress(onnx_bytes, 9)),
            "sparse_state_dict_bytes": big["bytes"]["sparse_state_dict"], "macs_per_image": big["macs_per_image"],
            "macs_per_image_batch1_export": reports[1]["macs_per_image"],
            "stores": big["onnx"]["stores"], "computes": big["onnx"]["computes"],
            "folds": {str(b): [c for c in r["folds"] if c["folded"]] for b, r in reports.items()},
            "factorized_layers": len(big["folds"]),
            "files": {str(b): r["files"] for b, r in reports.items()},
            "max_logit_difference": max(r["max_logit_difference"] for r in reports.values())}


def _eager(onnx_file: str):
    """The TorchScript file written beside the ONNX one (the same folds), loaded for eager timing."""
    return torch.jit.load(str(Path(onnx_file).with_name("model.torchscript.pt")))


def measure(rows: list[dict], repeats: int, rounds: int) -> None:
    """Latencies (ms/image): onnxruntime and torch at batch 1 and 64, on 1 and 2 threads, every
    cell in each round (interleaved); medians over all runs. In place: row["latency"]."""
    import onnxruntime as ort

    configs = [(b, t) for b in (1, 64) for t in (1, 2)]
    times = {id(r): {f"{engine}_b{b}_t{t}": [] for engine in ("ort", "torch") for b, t in configs} for r in rows}
    sessions, models, inputs = {}, {}, {b: torch.rand(b, *SHAPE) for b in (1, 64)}
    for r in rows:
        for b, t in configs:
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = t, 1, 3
            sessions[id(r), b, t] = ort.InferenceSession(r["files"][str(b)]["onnx"], options,
                                                         providers=["CPUExecutionProvider"])
        for b in (1, 64):
            models[id(r), b] = _eager(r["files"][str(b)]["onnx"])
    for _ in range(rounds):
        for r in rows:
            for b, t in configs:
                session, feed = sessions[id(r), b, t], {"pixels": inputs[b].numpy()}
                for _ in range(2):
                    session.run(None, feed)
                for _ in range(repeats):
                    start = time.perf_counter()
                    session.run(None, feed)
                    times[id(r)][f"ort_b{b}_t{t}"].append(1e3 * (time.perf_counter() - start) / b)
                torch.set_num_threads(t)
                with torch.no_grad():
                    for _ in range(2):
                        models[id(r), b](inputs[b])
                    for _ in range(repeats):
                        start = time.perf_counter()
                        models[id(r), b](inputs[b])
                        times[id(r)][f"torch_b{b}_t{t}"].append(1e3 * (time.perf_counter() - start) / b)
    for r in rows:
        r["latency_ms_per_image"] = {k: statistics.median(v) for k, v in times[id(r)].items()}
        r["runs_per_figure"] = repeats * rounds


CERTIFIED_COST = HERE / "results" / "certified_cost.jsonl"


def plain_log_ticks(ax) -> None:
    """A log x axis labelled 0.1, 0.2, 0.5 ... rather than 2x10^-1 on every minor tick."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def certified_cells() -> list[tuple[str, str]]:
    from benchmarks.certified import RESULTS as CERTIFIED

    return sorted({(r["budget"], r["model"]) for r in records(CERTIFIED)})


def run_certified(args: argparse.Namespace) -> None:
    from benchmarks.certified import BUDGETS, classifier

    done = {(r["budget"], r["method"]) for r in records(args.results)}
    rows = []
    for budget, model in certified_cells():
        if (budget, model) in done or (args.method and model not in args.method):
            continue
        def build(budget: str = budget, model: str = model) -> dict:
            torch.manual_seed(0)
            net = classifier(BUDGETS[budget][model]).net.eval()
            size = sum(p.numel() for p in net.parameters())
            return {"model": BUDGETS[budget][model]["backbone"], "budget": budget, "method": model,
                    "weights": "untrained", **export_twice(net, size, Path(args.work) / f"certified_{budget}_{model}")}

        rows.append(cached_export(Path(args.work) / f"certified_{budget}_{model}", build))
        print(f"exported {budget} {model}", flush=True)
    if not args.export_only:
        finish(rows, args)


def kronecker_model(model: str) -> bool:
    """Whether a certified model's 1x1 maps are Kronecker-orthogonal (its name says so)."""
    return "separable" in model or "kron" in model or model == "lipmlp"


def certified_report(results: Path, figures: Path = FIGURES, certified: Path | None = None) -> None:
    """The certified models' cost beside their certified accuracy at 36/255 (6 epochs, mean
    over seeds, the spread of 2 seeds as a bar) and the fronts: certified accuracy against MACs,
    batch-1 and batch-64 latency. The 1x1 width sweep (budget "1x1") gets its own row of panels,
    a line for each kind through its widths: its cells were measured in one run together, and
    latencies of different runs are not compared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.certified import RESULTS as CERTIFIED

    accuracy: dict[tuple[str, str], list[float]] = {}
    for r in records(certified or CERTIFIED):
        if r["epochs"] == 6 and not r.get("recipe"):
            accuracy.setdefault((r["budget"], r["model"]), []).append(r["certified"]["36/255"])
    rows = records(results)
    print("| budget | model | params | MACs/img | ort b1 ms | ort b64 ms | torch b1 ms | ONNX KB | folded (b1 / b64) "
          "| certified 36/255 (6 ep, seeds) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in sorted(rows, key=lambda r: (r["budget"], r["method"])):
        lat, acc = r["latency_ms_per_image"], accuracy.get((r["budget"], r["method"]), [])
        print(f"| {r['budget']} | {r['method']} | {r['params_stored']:,} | {r['macs_per_image'] / 1e6:.2f}M | "
              f"{lat['ort_b1_t1']:.3f} | {lat['ort_b64_t1']:.3f} | {lat['torch_b1_t1']:.3f} | {r['onnx_bytes'] / 1e3:,.0f} | "
              f"{'/'.join(str(len(r['folds'][b])) for b in ('1', '64'))} of {r['factorized_layers']} | "
              + (f"{statistics.mean(acc):.3f} ({len(acc)})" if acc else "--") + " |")
    panels = [("multiply-adds / image (M)", lambda r: r["macs_per_image"] / 1e6),
              ("onnxruntime ms / image, batch 1", lambda r: r["latency_ms_per_image"]["ort_b1_t1"]),
              ("onnxruntime ms / image, batch 64", lambda r: r["latency_ms_per_image"]["ort_b64_t1"])]
    groups = [[r for r in rows if r["budget"] != "1x1"], [r for r in rows if r["budget"] == "1x1"]]
    groups = [g for g in groups if any(accuracy.get((r["budget"], r["method"])) for r in g)]
    if not groups:
        print("no cost row has a 6-epoch certified row: no plot")
        return
    fig, axes = plt.subplots(len(groups), 3, figsize=(15, 4.5 * len(groups)), squeeze=False)
    for row_axes, group in zip(axes, groups):
        for ax, (label, value) in zip(row_axes, panels):
            lines: dict[bool, list[tuple[float, float]]] = {}
            for r in group:
                acc = accuracy.get((r["budget"], r["method"]))
                if not acc:
                    continue
                kron, mean = kronecker_model(r["method"]), statistics.mean(acc)
                spread = [[mean - min(acc)], [max(acc) - mean]]
                ax.errorbar(value(r), mean, yerr=spread, fmt="s" if kron else "o", color="C1" if kron else "C0",
                            capsize=2)
                ax.annotate(f"{r['method']} {r['budget']}", (value(r), mean), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
                lines.setdefault(kron, []).append((value(r), mean))
            if group[0]["budget"] == "1x1":  # the sweep: one line a kind, through its widths
                for kron, points in lines.items():
                    ax.plot(*zip(*sorted(points)), color="C1" if kron else "C0", alpha=0.6,
                            label="Kronecker-orthogonal 1x1" if kron else "dense-orthogonal 1x1")
                ax.legend(fontsize=7)
            ax.set(xlabel=label, ylabel="certified accuracy, L2 36/255 (6 epochs)", xscale="log")
            plain_log_ticks(ax)
            ax.grid(alpha=0.3)
        row_axes[0].set_title("1x1-stage convnet, widths (w, 2w, 4w)" if group[0]["budget"] == "1x1"
                              else "circles: dense-orthogonal; squares: Kronecker-orthogonal")
    fig.tight_layout()
    path = figures / "certified_cost.png"
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def finish(rows: list[dict], args: argparse.Namespace) -> None:
    """Measure the exported rows (interleaved), add the session memory, append the lines."""
    if not rows:
        return
    measure(rows, args.repeats, args.rounds)
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    for r in rows:
        r["peak_rss_bytes_batch64"] = session_memory(r["files"]["64"]["onnx"], SHAPE, 64)
        r["machine"] = machine
        with args.results.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps({k: r[k] for k in ("model", "budget", "method", "onnx_bytes", "macs_per_image")}
                         | {"ort_b1_t1": r["latency_ms_per_image"]["ort_b1_t1"],
                            "ort_b64_t1": r["latency_ms_per_image"]["ort_b64_t1"]}), flush=True)


def refresh_memory(results: Path) -> None:
    """Measure the recorded rows' session memory again from their exported files (kept in the work
    folder) and rewrite the file: the figures before 2026-12-07 07:00 were the measuring
    process's own peak (ru_maxrss, carried across exec), the same 9.2 GB for every row."""
    rows = records(results)
    for r in rows:
        r["peak_rss_bytes_batch64"] = session_memory(r["files"]["64"]["onnx"], SHAPE, 64)
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{results}: {len(rows)} rows' session memory measured again")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run(args: argparse.Namespace) -> None:
    done = {(r["model"], r["budget"], r["method"]) for r in records(args.results)}
    cells = [c for c in plan() if (not args.model or c[0] in args.model) and (not args.budget or c[1] in args.budget)
             and (not args.method or c[2] in args.method) and c not in done]
    rows = []
    for model, budget, method in cells:
        begin = time.perf_counter()
        try:
            rows.append(export_cell(model, budget, method, Path(args.work), args.fold))
        except ValueError as err:  # a budget the method cannot reach, said by the library
            print(json.dumps({"model": model, "budget": budget, "method": method, "status": "unreachable",
                              "reason": str(err)}), flush=True)
            continue
        print(f"exported {model} {budget} {method} in {time.perf_counter() - begin:.0f} s", flush=True)
    if not args.export_only:
        finish(rows, args)


ROBUST = {"vgg": HERE / "results" / "compressors_converged.jsonl", "vit": HERE / "results" / "compressors.jsonl"}


def worst_case(model: str) -> dict[tuple[str, str], list[float]]:
    """(budget, method) -> the worst-case robust accuracies recorded for it (every seed): the
    converged table for the VGG, the 3-epoch table for the ViT (it has no converged one)."""
    out: dict[tuple[str, str], list[float]] = {}
    for r in records(ROBUST[model]):
        if r.get("model") == model and r.get("status", "ok") == "ok" and "worst_acc" in r:
            budget = "-" if r["method"] == "dense" else r["budget"]
            out.setdefault((budget, r["method"]), []).append(r["worst_acc"])
    return out


def report(results: Path, figures: Path = FIGURES) -> None:
    rows = records(results)
    if not rows:
        raise SystemExit(f"{results}: no measured cells; run --cells first")
    print("| model | budget | method | non-zero | x | ONNX KB | gz KB | sparse dict KB | MACs/img | ort b1 t1 | ort b1 t2 "
          "| ort b64 t1 | ort b64 t2 | torch b1 t1 | torch b64 t1 | RSS MB | folded (b1 / b64) | worst case |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in sorted(rows, key=lambda r: (r["model"], r["budget"], r["method"] != "dense", r["method"])):
        lat = r["latency_ms_per_image"]
        robust = worst_case(r["model"]).get((r["budget"], r["method"]), [])
        acc = f"{statistics.mean(robust):.3f} ({len(robust)})" if robust else "--"
        folded = "/".join(str(len(r["folds"][b])) for b in ("1", "64"))
        print(f"| {r['model']} | {r['budget']} | {r['method']} | {r['params_nonzero']:,} | {r['nonzero_compression']:.1f} | "
              f"{r['onnx_bytes'] / 1e3:,.0f} | {r['onnx_gzip_bytes'] / 1e3:,.0f} | {r['sparse_state_dict_bytes'] / 1e3:,.0f} | "
              f"{r['macs_per_image'] / 1e6:.2f}M | {lat['ort_b1_t1']:.3f} | {lat['ort_b1_t2']:.3f} | {lat['ort_b64_t1']:.3f} | "
              f"{lat['ort_b64_t2']:.3f} | {lat['torch_b1_t1']:.3f} | {lat['torch_b64_t1']:.3f} | "
              f"{r['peak_rss_bytes_batch64'] / 1e6:.0f} | {folded} of {r['factorized_layers']} | {acc} |")
    goal(rows)
    verdict(rows)
    fronts(rows, figures / "deployed.png")


def goal(rows: list[dict]) -> None:
    """Issue 41's goal: each factorized cell's onnxruntime speedup over its model's dense one at
    batch 64 (1 thread) against its MAC reduction m; met where the speedup is at least m / 2 and
    above 1 (a cell slower than dense meets no goal). The pruned cells compute dense (m = 1) and the
    structured ones are smaller dense networks: shown, the goal not theirs."""
    dense = {r["model"]: r for r in rows if r["method"] == "dense"}
    print("\n| model | budget | method | MAC reduction | ort b64 speedup | b1 speedup | speedup / MAC reduction | goal (>= 0.5) |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in sorted(rows, key=lambda r: (r["model"], r["budget"], r["method"])):
        base = dense.get(r["model"])
        if base is None or r is base:
            continue
        macs = base["macs_per_image"] / r["macs_per_image"]
        speed = {b: base["latency_ms_per_image"][f"ort_b{b}_t1"] / r["latency_ms_per_image"][f"ort_b{b}_t1"]
                 for b in (1, 64)}
        if not r["factorized_layers"]:
            met = "(not factorized)"
        elif macs <= 1:
            met = "no MAC reduction"
        else:
            met = "met" if speed[64] >= max(macs / 2, 1) else "missed"
        print(f"| {r['model']} | {r['budget']} | {r['method']} | {macs:.2f}x | {speed[64]:.2f}x | {speed[1]:.2f}x | "
              f"{speed[64] / macs:.2f} | {met} |")


CURRENCIES = {"ort b1 ms": lambda r: r["latency_ms_per_image"]["ort_b1_t1"],
              "ort b64 ms": lambda r: r["latency_ms_per_image"]["ort_b64_t1"],
              "ONNX gz KB": lambda r: r["onnx_gzip_bytes"] / 1e3}


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (cost, accuracy, name) points no other point beats on both: cheaper-first."""
    front, best = [], float("-inf")
    for cost, acc, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((cost, acc, name))
            best = acc
    return front


def verdict(rows: list[dict]) -> None:
    """The verdict by deployment target: for each model, budget and currency (batch-1 and batch-64
    latency on one onnxruntime thread, gzipped file), the Pareto front of mean worst-case robust
    accuracy against the cost, cheapest first (dense included: the cost of not compressing)."""
    print()
    for model in sorted({r["model"] for r in rows}):
        robust = worst_case(model)
        budgets = sorted({r["budget"] for r in rows if r["model"] == model and r["budget"] != "-"})
        for budget in budgets:
            cells = [r for r in rows if r["model"] == model and r["budget"] in (budget, "-")
                     and robust.get((r["budget"], r["method"]))]
            for currency, cost in CURRENCIES.items():
                points = [(cost(r), statistics.mean(robust[(r["budget"], r["method"])]), r["method"]) for r in cells]
                line = " < ".join(f"{name} ({c:.3g}, {a:.3f})" for c, a, name in pareto(points))
                print(f"front {model} {budget} by {currency}: {line or '--'}")


def fronts(rows: list[dict], path: Path) -> None:
    """Worst-case robust accuracy against onnxruntime latency (batch 1 and 64, 1 thread) and
    against ONNX bytes, one panel row a budget (VGG, the converged table); the Pareto front of
    each panel drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    robust = worst_case("vgg")
    vgg = [r for r in rows if r["model"] == "vgg"]
    budgets = sorted({r["budget"] for r in vgg if r["budget"] != "-"})
    axes_x = [("ort_b1_t1", "onnxruntime ms / image, batch 1"), ("ort_b64_t1", "onnxruntime ms / image, batch 64"),
              ("onnx_bytes", "ONNX file, MB")]
    fig, axes = plt.subplots(len(budgets), 3, figsize=(15, 4.5 * len(budgets)), squeeze=False)
    for row_axes, budget in zip(axes, budgets):
        cells = [r for r in vgg if r["budget"] in (budget, "-") and robust.get((r["budget"], r["method"]))]
        for ax, (key, label) in zip(row_axes, axes_x):
            points = []
            for r in cells:
                x = r["onnx_bytes"] / 1e6 if key == "onnx_bytes" else r["latency_ms_per_image"][key]
                y = statistics.mean(robust[(r["budget"], r["method"])])
                points.append((x, y, r["method"]))
                ax.scatter(x, y)
                ax.annotate(r["method"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            front = [(x, y) for x, y, _ in pareto(points)]
            if front:
                ax.step(*zip(*front), where="post", color="k", alpha=0.4, linewidth=1)
            ax.set(xlabel=label, ylabel="worst-case robust accuracy", title=f"VGG-16/4, {budget}",
                   xscale="log")
            plain_log_ticks(ax)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", action="store_true", help="export and measure the cells not yet measured")
    parser.add_argument("--report", action="store_true", help="the table and the fronts")
    parser.add_argument("--certified", action="store_true", help="the certified models (issue 43) instead")
    parser.add_argument("--fold", choices=("auto", "never", "always"), default="auto",
                        help="the folds: measured per layer (auto), or forced (for a quick check)")
    parser.add_argument("--export-only", action="store_true",
                        help="export the cells, measure nothing (a later --cells measures them on a quiet machine)")
    parser.add_argument("--model", nargs="*", choices=("vgg", "vit"))
    parser.add_argument("--budget", nargs="*")
    parser.add_argument("--method", nargs="*")
    parser.add_argument("--repeats", type=int, default=10, help="runs per round of each latency figure")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (figures are medians of all runs)")
    parser.add_argument("--results", type=Path, default=None, help="default: deployed.jsonl (certified_cost.jsonl)")
    parser.add_argument("--work", default=str(WORK), help="folder for the exported files (git-ignored)")
    parser.add_argument("--memory", action="store_true", help="measure the recorded rows' session memory again")
    args = parser.parse_args(argv)
    args.results = args.results or (CERTIFIED_COST if args.certified else RESULTS)
    if args.memory:
        refresh_memory(args.results)
    elif args.report:
        (certified_report if args.certified else report)(args.results)
    elif args.certified:
        run_certified(args)
    elif args.cells:
        run(args)
    else:
        parser.error("expected --cells, --certified or --report")


if __name__ == "__main__":
    main()
