"""Forward+backward time and peak memory of SeparableLinear vs TTLinear vs nn.Linear vs
tensorly-torch, at the separable layer's parameter count; and of a VGG 3x3 convolution vs
TTConv2d (Garipov, and the naive 4-way TT) vs the two-conv SVD layer at a tenth of its parameters.

    python -m benchmarks.layers [--batch 128] [--repeats 20] [--device cpu]
    python -m benchmarks.layers --tt-paths     # TTLinear / TTConv2d: structured vs implied matrix / kernel

Each variant runs in its own subprocess so that peak memory (ru_maxrss on CPU, the CUDA
allocator's peak on GPU) is its own. Ratios are against the dense layer of the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch

CASES = {
    "vgg16_imagenet_fc1": ((512, 7, 7), (16, 16, 16)),
    "cifar_head": ((512, 2, 2), (8, 8, 8)),
}


def separable_macs(in_shape, out_shape, rank):
    from sepnet.layers import contraction_cost, contraction_order

    return rank * contraction_cost(in_shape, out_shape, contraction_order(in_shape, out_shape))


def build(variant: str, in_shape, out_shape, budget: int):
    from torch import nn

    from sepnet.layers import SeparableLinear

    if variant == "dense":
        return nn.Linear(math.prod(in_shape), math.prod(out_shape)), True
    if variant == "separable":
        return SeparableLinear(in_shape, out_shape), False
    if variant.startswith("tt"):  # "tt3": three cores on the flat features, rank nearest the budget
        from sepnet.compress.factorize import mode_split
        from sepnet.compress.tt import TTLinear

        cores = int(variant[2:])
        in_modes, out_modes = mode_split(math.prod(in_shape), cores), mode_split(math.prod(out_shape), cores)
        rank = min(range(1, 257), key=lambda r: abs(TTLinear(in_modes, out_modes, r).stored_parameters() - budget))
        return TTLinear(in_modes, out_modes, rank), True
    import tltorch

    _, kind, implementation = variant.split("_")
    best = None
    for rank in range(1, 400):  # integer rank whose parameter count is closest to the budget
        layer = tltorch.FactorizedLinear(in_shape, out_shape, factorization=kind, rank=rank,
                                         implementation=implementation)
        gap = abs(sum(p.numel() for p in layer.parameters()) - budget)
        if best is None or gap < best[0]:
            best = (gap, layer)
        elif gap > best[0]:
            break
    return best[1], True


# a VGG 3x3 convolution (CIFAR VGG-16, 256 channels at 8x8); factorized variants at 1/10 of its
# parameters
CONV_CASES = {"vgg_conv3x3_256": (256, 256, 8)}
CONV_VARIANTS = ["dense", "tt_conv", "tt_conv_naive", "svd_conv"]


def build_conv(variant: str, channels_in: int, channels_out: int):
    from torch import nn

    from sepnet.compress.factorize import mode_split
    from sepnet.compress.jsvd import SVDConv2d
    from sepnet.compress.tt_conv import TTConv2d

    conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)
    budget = sum(p.numel() for p in conv.parameters()) / 10
    if variant == "dense":
        return conv

    def nearest(make):
        return min((make(r) for r in range(1, 257)),
                   key=lambda m: abs(sum(p.numel() for p in m.parameters()) - budget))

    modes_in, modes_out = mode_split(channels_in, 2), mode_split(channels_out, 2)
    if variant == "svd_conv":
        return nearest(lambda r: SVDConv2d(conv, [r]))
    return nearest(lambda r: TTConv2d(modes_in, modes_out, 3, r, padding=1, naive=variant.endswith("naive")))


def run_one(variant: str, case: str, batch: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    if case in CONV_CASES:
        channels_in, channels_out, size = CONV_CASES[case]
        layer, shape = build_conv(variant, channels_in, channels_out), (batch, channels_in, size, size)
    else:
        in_shape, out_shape = CASES[case]
        from sepnet.layers import SeparableLinear

        budget = sum(p.numel() for p in SeparableLinear(in_shape, out_shape).parameters())
        layer, flat = build(variant, in_shape, out_shape, budget)
        shape = (batch, math.prod(in_shape)) if flat else (batch, *in_shape)
    layer = layer.to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()
    if time.perf_counter() - start > 1.0:  # pathological variants: a few timed steps suffice
        repeats = 2
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {"variant": variant, "case": case, "ms": 1e3 * sorted(times)[len(times) // 2],
            "peak_mb": peak_mb, "params": sum(p.numel() for p in layer.parameters())}


# TTLinear's two paths at the study's shapes (benchmarks/compressors.py): rows = the rows one
# forward sees (ViT: batch 128 x 65 tokens; VGG head: batch 128)
TT_PATH_CASES = {
    "vit_qkv_10x": ((8, 16), (16, 24), 6, 128 * 65),
    "vit_fc1_10x": ((8, 16), (16, 32), 6, 128 * 65),
    "vit_qkv_30x": ((4, 4, 8), (6, 8, 8), 2, 128 * 65),
    "vit_fc1_30x": ((4, 4, 8), (8, 8, 8), 2, 128 * 65),
    "vgg_head_11x": ((8, 8, 8), (8, 8, 8), 17, 128),
    "vgg_head_84x": ((8, 8, 8), (8, 8, 8), 5, 128),
    "vgg_head_226x": ((8, 8, 8), (8, 8, 8), 2, 128),
}
# TTConv2d's two paths (structured forward vs the built kernel): the VGG-16/4 TT-conv cell's
# layers (compressors.py ttconv_tt: channel modes, ranks, map size at batch 128) and the
# 256-channel case above
TT_CONV_PATH_CASES = {
    "cell10_conv3_32x32": ((4, 4), (4, 4), [9, 13], 32),
    "cell10_conv17_8x8": ((8, 8), (8, 8), [9, 19], 8),
    "cell10_conv40_2x2": ((8, 16), (8, 16), [9, 19], 2),
    "cell30_conv3_32x32": ((4, 4), (4, 4), [6, 6], 32),
    "cell30_conv40_2x2": ((8, 16), (8, 16), [6, 6], 2),
    "vgg_conv3x3_256": None,
}


def tt_paths(repeats: int, batch: int = 128) -> None:
    """Forward+backward of TTLinear by its core contractions and by the implied matrix, and of
    TTConv2d by its structured forward and by the kernel built from its cores (rebuilt each
    step), against the dense layer, in this process; which path the layer's rule picks."""
    from torch import nn

    from sepnet.compress.tt_conv import TTConv2d
    from sepnet.compress.tt import TTLinear

    def median_ms(module, x) -> float:
        times = []
        for i in range(repeats + 2):
            start = time.perf_counter()
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).square().mean().backward()
            if i >= 2:
                times.append(time.perf_counter() - start)
        return 1e3 * sorted(times)[len(times) // 2]

    def row(case, rows, layer, dense, x, rule, ratio):
        dense_ms = median_ms(dense, x)
        paths = {}
        for materialize in (False, True):
            layer.implied_path = "always" if materialize else "never"
            paths[materialize] = median_ms(layer, x)
        layer.implied_path = "auto"
        print(f"{case:19} {rows:7} {ratio:9.1f} {dense_ms:9.2f} {paths[False]:11.2f} {paths[True]:9.2f} "
              f"{paths[False] / paths[True]:13.1f}x {'matrix' if rule else 'cores':>7}")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fwd+bwd, median of {repeats}")
    print(f"{'TTLinear':19} {'rows':>7} {'MAC ratio':>9} {'dense ms':>9} {'cores ms':>11} {'matrix ms':>9} "
          f"{'matrix speedup':>14} {'rule':>7}")
    for case, (in_modes, out_modes, rank, rows) in TT_PATH_CASES.items():
        torch.manual_seed(0)
        layer = TTLinear(in_modes, out_modes, rank)
        x = torch.randn(rows, layer.in_features, requires_grad=True)
        row(case, rows, layer, nn.Linear(layer.in_features, layer.out_features), x, layer.uses_implied(rows),
            layer.in_features * layer.out_features / layer.macs_per_row())
    print(f"{'TTConv2d, batch ' + str(batch):19} {'pixels':>7} {'MAC ratio':>9} {'dense ms':>9} "
          f"{'structured ms':>11} {'kernel ms':>9} {'kernel speedup':>14} {'rule':>7}")
    for case, spec in TT_CONV_PATH_CASES.items():
        torch.manual_seed(0)
        if spec is None:
            layer, size = build_conv("tt_conv", *CONV_CASES[case][:2]), CONV_CASES[case][2]
        else:
            in_modes, out_modes, ranks, size = spec
            layer = TTConv2d(in_modes, out_modes, 3, ranks, padding=1)
        dense = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1)
        x = torch.randn(batch, layer.in_channels, size, size, requires_grad=True)
        pixels = layer._output_pixels(x)
        row(case, pixels, layer, dense, x, layer.uses_implied(pixels),
            layer.in_channels * layer.out_channels * 9 / layer.macs_per_pixel())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "CASE"), help=argparse.SUPPRESS)
    parser.add_argument("--tt-paths", action="store_true",
                        help="only TTLinear's and TTConv2d's two paths (structured vs the implied matrix / kernel) "
                             "at the compressor study's shapes")
    args = parser.parse_args()
    if args.tt_paths:
        tt_paths(args.repeats, args.batch)
        return
    if args.one:
        print(json.dumps(run_one(*args.one, args.batch, args.repeats, args.device)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"batch {args.batch}, median of {args.repeats} fwd+bwd steps (input gradient included)")
    header = f"{'case':20} {'variant':24} {'params':>10} {'ms':>9} {'speedup':>8} {'peak MB':>9} {'FLOP ratio':>10} {'of limit':>8}"
    print(header)
    for case, (in_shape, out_shape) in CASES.items():
        dense_macs = math.prod(in_shape) * math.prod(out_shape)
        flop_ratio = dense_macs / separable_macs(in_shape, out_shape, 1)
        dense_ms = None
        for variant in ["dense", "separable", "tt3", "tt4", "tltorch_cp_factorized", "tltorch_cp_reconstructed",
                        "tltorch_blocktt_factorized", "tltorch_blocktt_reconstructed"]:
            repeats = max(3, args.repeats // 4) if variant == "dense" else args.repeats
            out = subprocess.run(
                [sys.executable, __file__, "--one", variant, case, "--batch", str(args.batch),
                 "--repeats", str(repeats), "--device", args.device],
                capture_output=True, text=True)
            if out.returncode != 0:
                reason = out.stderr.strip().splitlines()[-1][:70]
                print(f"{case:20} {variant:24} failed: {reason}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            dense_ms = dense_ms or r["ms"]
            speedup = dense_ms / r["ms"]
            extra = (f"{flop_ratio:10.0f} {speedup / flop_ratio:8.0%}" if variant == "separable" else "")
            print(f"{case:20} {variant:24} {r['params']:10,} {r['ms']:9.2f} {speedup:7.1f}x "
                  f"{r['peak_mb']:9.1f} {extra}")
    for case in CONV_CASES:
        dense_ms = None
        for variant in CONV_VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, "--one", variant, case, "--batch", str(args.batch),
                 "--repeats", str(args.repeats), "--device", args.device], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{case:20} {variant:24} failed: {out.stderr.strip().splitlines()[-1][:70]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            dense_ms = dense_ms or r["ms"]
            print(f"{case:20} {variant:24} {r['params']:10,} {r['ms']:9.2f} {dense_ms / r['ms']:7.1f}x "
                  f"{r['peak_mb']:9.1f}")


if __name__ == "__main__":
    main()
