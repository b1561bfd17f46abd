"""Every compressor at equal non-zero budgets under one adversarial training and one attack suite.

    python -m benchmarks.compressors                       # the whole plan, in priority order
    python -m benchmarks.compressors --model vgg --budget fc226 --method hydra   # some cells
    python -m benchmarks.compressors --list                # the plan and what is done
    python -m benchmarks.compressors --report              # tables + benchmarks/figures/compressors.png

Models (real CIFAR-10 from ../shared/data/cifar10-jpeg): the VGG-16 at 1/4 convolution width
with the 512-wide head of benchmarks/reproduce.py, and a small timm ViT (depth 4, width 128,
2 heads, patch 4: 0.81M parameters, 98% of them in linear layers).

Budgets, as non-zero parameters: "fcN" -- the VGG's FC layers at the non-zero count of the
separable head at ~N x (sep_a / sep_b / sep_c of reproduce.py: 11.5x, 84x, 226x), the rest of the
network dense; "modelN" -- the whole network at N x fewer non-zero parameters (the VGG's
convolutions compressed as well; every linear layer of the ViT).

Training: every cell gets the same number of epochs (--epochs, 3) of fast-FGSM adversarial
training (Linf 8/255, random start, step 8/255 = eps; reproduce.py's ADV_STEP says why).
Methods that start from a trained dense model (pruning, joint SVD) start from the dense run of
the same seed after --dense-epochs (1) epochs and are trained for the remaining epochs, so the
dense epochs count. Evaluation: reproduce.py's
(clean on 10k test images; PGD-20, APGD-CE, APGD-DLR, Square on the fixed first 1,000; the
per-image worst case; the honesty checks). One JSON line per cell in
benchmarks/results/compressors.jsonl; a rerun skips finished cells; cells a method cannot reach
are recorded as such. TensorBoard runs (the ConstraintMonitor's tags) under --tb.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.cells import DENSE, HERE, RESULTS, done_keys, plan, report, run_cell, write_configs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", nargs="*", choices=sorted(DENSE))
    parser.add_argument("--budget", nargs="*")
    parser.add_argument("--method", nargs="*")
    parser.add_argument("--seed", nargs="*", type=int)
    parser.add_argument("--protocol", choices=("short", "converged"), default="short",
                        help="short: 3 epochs (the table so far); converged: benchmarks/converged.py")
    parser.add_argument("--epochs", type=int, default=None, help="epochs a cell trains (short: 3)")
    parser.add_argument("--pilot", type=int, default=0, help="converged: the dense pilot run's epochs")
    parser.add_argument("--adv", choices=("fgsm", "nfgsm"), default="fgsm",
                        help="converged: the training attack (nfgsm where fast FGSM collapses)")
    parser.add_argument("--dense-epochs", type=int, default=1, help="dense epochs before the pruning methods start")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--honesty-images", type=int, default=256)
    parser.add_argument("--pgd-images", type=int, default=1000)
    parser.add_argument("--aa-images", type=int, default=1000)
    parser.add_argument("--results", default=str(RESULTS), help="JSON-lines file the cells append to")
    parser.add_argument("--tb", default=str(HERE.parent / "lightning_logs" / "compressors"),
                        help="TensorBoard directory (default: the repository's lightning_logs/compressors)")
    parser.add_argument("--list", action="store_true", help="print the plan and what is done")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--write-configs", action="store_true", help="write conf/experiments/compressors/")
    args = parser.parse_args()
    if args.protocol == "converged":
        from benchmarks.converged import main as converged_main

        converged_main(args)
        return
    args.epochs = 3 if args.epochs is None else args.epochs
    if args.write_configs:
        write_configs(HERE.parent / "conf" / "experiments" / "compressors")
        return
    if args.report:
        report(Path(args.results))
        return
    if not 0 < args.dense_epochs < args.epochs:
        parser.error(f"--dense-epochs {args.dense_epochs}: expected between 1 and --epochs - 1 ({args.epochs - 1})")
    done = done_keys(Path(args.results))
    cells = [c for c in plan() if (not args.model or c[0] in args.model) and (not args.budget or c[1] in args.budget)
             and (not args.method or c[2] in args.method) and (args.seed is None or c[3] in args.seed)]
    if not cells:
        parser.error("no cell of the plan matches --model/--budget/--method/--seed; see --list")
    for model, budget, method, seed in cells:
        key = (model, budget, method, seed, args.epochs, args.dense_epochs)
        if args.list or key in done:
            print(f"{'done' if key in done else 'todo'}: {model} {budget} {method} seed {seed}")
            continue
        record = run_cell(model, budget, method, seed, args)
        with Path(args.results).open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({k: v for k, v in record.items() if not isinstance(v, (list, dict))}), flush=True)


if __name__ == "__main__":
    main()
