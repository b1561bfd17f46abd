"""The GPU path, measured in one command: CUDA + bf16 + channels-last training with adversarial
training, the separable layer and the attacks on the card, and a first GPU-scale robust figure.

    python -m benchmarks.gpu --out gpu.json          # on a lent H100/H200, about 7 minutes
    python -m benchmarks.gpu --tiny --out tiny.json  # every path on the CPU in seconds (tested)

Sections (each ratio is against a baseline measured in the same run, on the same device):
1. environment: card, torch/CUDA versions, backend flags, free memory;
2. layer: SeparableLinear vs nn.Linear at VGG-16's FC1 (512x7x7 -> 4096), forward + backward,
   fp32 and bf16 autocast, batches 128 and 1024, CUDA-event timing after warm-up, and the
   achieved fraction of the card's dense peak FLOP/s;
3. training: full-width VGG-16 (CIFAR variant), dense vs separable head, on CIFAR-10 images
   decoded once into device memory, channels-last: images/s and peak memory of a clean, a
   fast-FGSM and a PGD-10 step, fp32 vs bf16-mixed; then the same model through `run.py fit`
   for a fixed number of steps (Lightning's overhead on the card);
4. run: `run.py fit` of the separable VGG-16 with fast-FGSM AT on the 20k training images for
   `--fit-minutes`, then `run.py test` with the worst-case suite on 1,000 test images;
5. attacks: on that model, sepnet's PGD-10 vs torchattacks vs ART's stock estimator on 1,024
   test images: accuracy agreement and time ratios.
7. sync: the training steps of tests/test_sync_free.py (fast FGSM, PGD, TRADES, N-FGSM, the
   proximal and sparsity-target constraints, rank 2, HYDRA, dual pruning; RunWatch and
   EpochLine on) through Lightning on the card, every non-logging step under
   `torch.cuda.set_sync_debug_mode("error")`: per case "ok" or the first synchronizing call.
   On the CPU (--tiny) the mode does nothing; the path runs.
6. hours: every GPU cell of the compressor benchmark (conf/experiments/compressors/*.yaml,
   `benchmarks/compressors.py --write-configs`) built by the application's own CLI from its
   config with the card's trainer (conf/trainer/gpu.yaml) and trained for a few steps on the
   CIFAR-10 copy: seconds per training step (loader, Lightning, PGD-10 AT, constraint and
   pruning hooks included) and per validation pass, scaled to the cell's epochs on full
   CIFAR-10 (45k training images, batch 128): the estimated GPU hours per cell. Not run by
   default (`--sections hours`).
A section that fails is recorded under "errors" and the next one runs; the JSON is rewritten
after every section, so a run stopped at its limit keeps what it measured.

On a lent machine (no internet there; its image has torch, Lightning, timm, torchmetrics, not
ART, torchattacks or jsonargparse): download those wheels into an ignored `.whl/` (`pip download
--no-deps --only-binary=:all: --python-version 3.12 ...` for adversarial-robustness-toolbox,
torchattacks, jsonargparse, docstring_parser, typeshed_client at requirements.txt's versions),
pack the CIFAR-10 copy with `tar czf .gpudata/cifar10-jpeg.tgz -C ../shared/data cifar10-jpeg`
(10 MB), carry both, install with `pip install --no-index --no-deps --target /tmp/site .whl/*`,
unpack to /tmp and pass `--data /tmp/cifar10-jpeg`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import instantiate_class
from torch import nn

from sepnet.attacks import Attacker, AttackSpec
from sepnet.layers import SeparableLinear
from sepnet.module import ImageClassifier

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# dense peak FLOP/s of the cards we are lent (NVIDIA data sheets, SXM): fp32 and bf16 tensor cores
PEAK = {"H100": {"fp32": 67e12, "bf16": 989e12}, "H200": {"fp32": 67e12, "bf16": 989e12}}


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - begin) / iters


def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
           "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        env.update(card=torch.cuda.get_device_name(), free_gib=free / 2**30, total_gib=total / 2**30)
    return env


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((p[precision] for card, p in PEAK.items() if card in name), None)


def layer_section(device: torch.device, tiny: bool) -> list[dict]:
    in_shape, out_shape = ((8, 2, 2), (4, 4, 4)) if tiny else ((512, 7, 7), (16, 16, 16))
    rows = []
    for batch in ((4, 8) if tiny else (128, 1024)):
        for precision in ("fp32", "bf16"):
            row = {"batch": batch, "precision": precision}
            for name, layer, shape in (
                ("dense", nn.Linear(int(torch.tensor(in_shape).prod()), int(torch.tensor(out_shape).prod())),
                 (batch, int(torch.tensor(in_shape).prod()))),
                ("separable", SeparableLinear(in_shape, out_shape), (batch, *in_shape)),
            ):
                layer = layer.to(device)
                x = torch.randn(*shape, device=device, requires_grad=True)

                def step():
                    with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                        layer(x).float().sum().backward()

                seconds = timed(step, device, 2 if tiny else 10, 3 if tiny else 50)
                row[f"{name}_ms"] = seconds * 1e3
                if name == "dense":  # forward + backward: 3 GEMMs of 2*B*I*O flops
                    flops = 3 * 2 * batch * layer.in_features * layer.out_features
                    peak = peak_flops(device, precision)
                    row["dense_peak_fraction"] = flops / seconds / peak if peak else None
            row["separable_speedup"] = row["dense_ms"] / row["separable_ms"]
            rows.append(row)
    return rows


def cifar_images(n: int, device: torch.device, data: Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, str]:
    """n images of `split` decoded once into device memory (random pixels when the copy is absent)."""
    if not (data / split).is_dir():
        g = torch.Generator().manual_seed(0)
        return (torch.rand(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device),
                "random pixels (CIFAR-10 copy not found)")
    from torchvision import datasets, transforms

    ds = datasets.ImageFolder(str(data / split), transforms.ToTensor())
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    xs, ys = zip(*(ds[i] for i in idx))
    return torch.stack(xs).to(device), torch.tensor(ys).to(device), f"{n} CIFAR-10 {split} images in device memory"


def vgg(head: str, tiny: bool) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(network={"backbone": "vgg16", "backbone_kwargs": {"width": 1 / 16 if tiny else 1.0},
                                    "head": head}, mean=CIFAR_MEAN, std=CIFAR_STD, validation={"batches": 0})


def training_section(device: torch.device, tiny: bool, data: Path) -> tuple[list[dict], str]:
    batch = 8 if tiny else 256
    x, y, source = cifar_images(batch * (2 if tiny else 8), device, data)
    x = x.contiguous(memory_format=torch.channels_last)
    specs = {"clean": None, "fgsm": AttackSpec(name="fgsm", step_size=10 / 255),
             "pgd10": AttackSpec(name="pgd", steps=10)}
    rows = []
    for head in ("dense", "separable"):
        model = vgg(head, tiny).to(device).to(memory_format=torch.channels_last)
        net, attacker = model.net, Attacker(model.net, (3, 32, 32), 10)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        for kind, spec in specs.items():
            for precision in ("fp32", "bf16"):
                chunks = list(zip(x.split(batch), y.split(batch)))
                state = {"i": 0}

                def step():
                    xb, yb = chunks[state["i"] % len(chunks)]
                    state["i"] += 1
                    with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                        if spec is not None:
                            xb = attacker.generate(xb, yb, spec)
                        loss = nn.functional.cross_entropy(net.train()(xb), yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds = timed(step, device, 1 if tiny else 3, 2 if tiny else 10)
                rows.append({"head": head, "step": kind, "precision": precision, "images_per_s": batch / seconds,
                             "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None})
    return rows, source


def run_cli(args: list[str], cwd: Path, timeout: float) -> tuple[float, str]:
    begin = time.perf_counter()
    out = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, text=True,
                         capture_output=True, timeout=timeout)
    name = args[args.index("--trainer.logger.init_args.name") + 1] if "--trainer.logger.init_args.name" in args else ""
    (cwd / f"{args[0]}_{name}.log").write_text(out.stdout + out.stderr)  # the whole output, kept for reading
    if out.returncode != 0:
        raise RuntimeError(f"run.py {args[0]} failed: {out.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - begin, out.stdout + out.stderr


def cli_args(device: torch.device, tiny: bool, data: Path) -> list[str]:
    if tiny:  # the offline default on the CPU
        return ["--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed", "--trainer.limit_val_batches", "1",
                "--model.validation.batches", "1", "--trainer.enable_progress_bar", "false"]
    data_args = ["--data", str(REPO / "conf/data/cifar10_jpeg.yaml"), "--data.init_args.root", str(data),
                 "--data.init_args.num_workers", "8", "--data.init_args.pin_memory", "true"]
    return [*data_args, "--trainer", str(REPO / "conf/trainer/gpu.yaml"), "--model.network.backbone", "vgg16",
            "--model.network.backbone_kwargs", "{}", "--model.network.head", "separable",
            "--model.network.head_kwargs", "{}", "--model.adversarial.loss", "at",
            "--model.adversarial.attack", f'{{"name": "fgsm", "eps": {8 / 255}, "step_size": {10 / 255}}}',
            "--model.optimization.lr", "0.05", "--model.optimization.optimizer", "sgd",
            "--model.optimization.weight_decay", "5e-4", "--model.validation.attacks", '[{"name": "pgd", "eps": 0.0314, "step_size": 0.0078, "steps": 10}, '
            '{"name": "fgsm", "eps": 0.0314, "step_size": 0.0314, "random_start": false}]',
            "--trainer.enable_progress_bar", "false", "--model.validation.batches", "2"]


def lightning_section(device, tiny, data, work: Path, manual: list[dict]) -> dict:
    """`run.py fit` for a fixed number of fast-FGSM steps (no validation): images/s against the
    bare loop's bf16 fast-FGSM step of the same model (loader, logging, callbacks included)."""
    steps, batch = (3, 64) if tiny else (200, 128)
    seconds, _ = run_cli(["fit", *cli_args(device, tiny, data), "--trainer.max_steps", str(steps),
                          "--trainer.limit_val_batches", "0", "--trainer.logger.init_args.name", "steps"],
                         work, 600)
    bare = next(r["images_per_s"] for r in manual
                if r["head"] == "separable" and r["step"] == "fgsm" and r["precision"] == "bf16")
    images_per_s = steps * batch / seconds  # start-up included: a lower bound
    return {"steps": steps, "batch": batch, "seconds": seconds, "images_per_s_incl_startup": images_per_s,
            "bare_loop_images_per_s": bare, "ratio_to_bare_loop": images_per_s / bare}


def max_time(minutes: float) -> str:
    """Lightning's DD:HH:MM:SS for a number of minutes (fractions kept: 1.5 is 00:00:01:30)."""
    hours, seconds = divmod(round(minutes * 60), 3600)
    days, hours = divmod(hours, 24)
    return f"{days:02d}:{hours:02d}:{seconds // 60:02d}:{seconds % 60:02d}"


def real_run(device, tiny, data, work: Path, minutes: float, test_images: int) -> tuple[dict, Path]:
    fit_args = ["fit", *cli_args(device, tiny, data), "--trainer.logger.init_args.name", "gpu"]
    fit_args += (["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3"] if tiny else
                 ["--trainer.max_epochs", "1000", "--trainer.max_time", max_time(minutes)])
    fit_seconds, fit_out = run_cli(fit_args, work, 60 * minutes + 300)
    ckpt = next((work / "logs/gpu").glob("version_*/checkpoints/last.ckpt"))
    test_seconds, _ = run_cli(["test", *cli_args(device, tiny, data), "--trainer.logger.init_args.name", "gpu",
                               "--report.images", str(test_images), "--ckpt_path", str(ckpt),
                               "--report.honesty_images", str(min(256, test_images))], work, 900)
    report = json.loads((ckpt.parents[1] / "test_report.json").read_text())
    epochs = torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] + 1
    return {"fit_seconds": fit_seconds, "epochs": epochs, "test_seconds": test_seconds,
            "final_validation": fit_out.split("final validation: ")[-1].splitlines()[0],
            "test": report["metrics"], "honesty_warnings": report.get("honesty", {}).get("warnings", [])}, ckpt


def attack_section(device, ckpt: Path, tiny: bool, data: Path) -> dict:
    import torchattacks

    model = ImageClassifier.load_from_checkpoint(ckpt, map_location=device).to(device).eval()
    n = 16 if tiny else 1024
    x, y, _ = cifar_images(n, device, data, "test") if not tiny else (None, None, None)
    if tiny:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, *model.hparams.image_shape, generator=g).to(device)
        y = torch.randint(0, model.hparams.num_classes, (n,), generator=g).to(device)
    eps, step = (0.1, 0.025) if tiny else (8 / 255, 2 / 255)
    spec = AttackSpec(name="pgd", eps=eps, step_size=step, steps=10, random_start=False)
    net, shape, classes = model.net, tuple(model.hparams.image_shape), model.hparams.num_classes
    ta = torchattacks.PGD(net, eps=eps, alpha=step, steps=10, random_start=False)
    ways = {"sepnet": lambda: Attacker(net, shape, classes).generate(x, y, spec),
            "torchattacks": lambda: ta(x, y),
            "art_stock": lambda: Attacker(net, shape, classes, fast=False).generate(x, y, spec)}
    out = {}
    for name, attack in ways.items():
        adv = attack()
        out[f"{name}_seconds"] = timed(attack, device, 0, 1)
        with torch.no_grad():
            out[f"{name}_acc"] = float((net(adv).argmax(1) == y).float().mean())
    out["sepnet_vs_torchattacks_time"] = out["sepnet_seconds"] / out["torchattacks_seconds"]
    out["sepnet_vs_art_stock_time"] = out["sepnet_seconds"] / out["art_stock_seconds"]
    out["max_acc_difference"] = max(abs(out["sepnet_acc"] - out[f"{k}_acc"]) for k in ("torchattacks", "art_stock"))
    return out


CIFAR10_TRAIN = 50_000  # the GPU cells' training set before the data module holds out validation


class StepTimer(L.Callback):
    """Seconds per training step in the steady state: from the end of batch `warmup - 1` to the
    end of batch `warmup + steps - 1`, so the loader's waits between batches are included;
    the device is synchronized at both ends."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start, self.seconds = None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx in (self.warmup - 1, self.warmup + self.steps - 1):
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            if batch_idx == self.warmup - 1:
                self.start = time.perf_counter()
            else:
                self.seconds = (time.perf_counter() - self.start) / self.steps


class SyncDebug(L.Callback):
    """Every training step that does not log, from its batch start to its batch end (the other
    callbacks' batch-end hooks included: this one goes last), under CUDA's sync debug mode
    "error": a synchronizing call raises."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.global_step + 1) % self.log_every != 0 and torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")


def sync_section(device: torch.device, tiny: bool) -> dict:
    """benchmarks.sync_cases' training steps on `device` under the sync debug mode (section 7)."""
    from benchmarks.sync_cases import CASES, LOG_EVERY, case_model
    from sepnet.callbacks import EpochLine, RunWatch
    from sepnet.data import DigitsDataModule

    result = {}
    for case in CASES:
        model = case_model(case)
        data = DigitsDataModule(batch_size=32)
        data.setup("fit")
        # the batches already on the card (a loader's host-to-device copy is not the step's)
        x, y = next(iter(data.train_dataloader()))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.to(device), y.to(device)), batch_size=32)
        trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=4 if tiny else 12,
                            log_every_n_steps=LOG_EVERY, limit_val_batches=0, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            callbacks=[RunWatch(), EpochLine(), SyncDebug(LOG_EVERY)])
        try:
            trainer.fit(model, train_dataloaders=loader)
            result[case] = "ok"
        except RuntimeError as err:
            result[case] = str(err).splitlines()[0]
        finally:
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")
    return result


def tiny_image_folder(root: Path, per_class: int = 8) -> Path:
    """A 10-class ImageFolder of random 32x32 JPEGs (train/ and test/), for the CPU check."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def hours_cell(path: Path, device: torch.device, tiny: bool, data: Path, work: Path,
               warmup: int, steps: int) -> dict:
    """One GPU cell through the application's CLI: its config, the card's trainer, the CIFAR-10
    copy standing in for full CIFAR-10 (same image size and classes; a 5k validation split as
    CIFAR10DataModule holds out), `network.init_from` dropped (the dense start's weights do not
    change the cost of a step); `warmup + steps` training steps, then one validation pass."""
    import gc

    import yaml

    from sepnet.cli import SepnetCLI
    from sepnet.measures import parameter_counts
    from sepnet.data import VisionDataModule

    config = yaml.safe_load(path.read_text())
    batch = config["data"]["init_args"]["batch_size"]
    train_images = CIFAR10_TRAIN - instantiate_class((), config["data"]).val_size(CIFAR10_TRAIN)  # the cell's split
    network = config["model"]["network"]
    args = ["--config", str(path), "--trainer", str(REPO / "conf/trainer/gpu.yaml"),
            "--model.network.init_from", "null",
            "--data", str(REPO / "conf/data/cifar10_jpeg.yaml"), "--data.init_args.root", str(data),
            "--data.init_args.batch_size", str(8 if tiny else batch),
            "--data.init_args.num_workers", str(0 if tiny else config["data"]["init_args"]["num_workers"]),
            "--data.init_args.pin_memory", str(device.type == "cuda").lower(),
            "--data.init_args.val_fraction", "0.25",  # 5k of the copy's 20k, as full CIFAR-10 holds out
            "--trainer.max_steps", str(warmup + steps), "--trainer.logger", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.check_val_every_n_epoch", "100000",
            "--trainer.default_root_dir", str(work / "hours" / path.stem),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if tiny:  # the CPU check: the same cell at 1/16 width
        args += ["--trainer.accelerator", "cpu", "--model.network.backbone_kwargs",
                 json.dumps({**network.get("backbone_kwargs", {}), "width": 1 / 16})]
    begin = time.perf_counter()
    cli = SepnetCLI(ImageClassifier, VisionDataModule, subclass_mode_data=True, run=False, args=args,
                    save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    build = time.perf_counter() - begin
    timer = StepTimer(warmup, steps)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if timer.seconds is None:
        raise RuntimeError(f"{path.stem}: fewer than {warmup + steps} training steps ran")
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    val = time.perf_counter() - start
    counts = parameter_counts(cli.model)
    epochs = config["trainer"]["max_epochs"]
    steps_per_epoch = math.ceil(train_images / batch)
    # a step at the tiny check's batch stands for a step at the config's batch
    row = {"cell": path.stem, "from_dense": bool(network.get("init_from")), "epochs": epochs,
           "batch": batch, "measured_batch": 8 if tiny else batch, "step_s": timer.seconds,
           "images_per_s": (8 if tiny else batch) / timer.seconds, "val_s": val,
           "train_images": train_images, "steps_per_epoch": steps_per_epoch, "build_s": build,
           "params_stored": counts.stored, "params_nonzero": counts.nonzero,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    row["hours"] = epochs * (steps_per_epoch * timer.seconds + val) / 3600
    del cli
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def hours_section(device: torch.device, tiny: bool, data: Path, work: Path, limit_s: float,
                  warmup: int = 5, steps: int = 20) -> dict:
    """Estimated GPU hours of every GPU cell (see the module docstring, section 6); cells left
    when `limit_s` has passed are listed as not measured. A pruning or joint-SVD cell's figure
    is its own 50 epochs; `with_dense_start` adds the half of the dense run it starts from."""
    folder = REPO / "conf/experiments/compressors"
    # dense runs first, then the budgets by priority (model30's pruning cells cost as model10's)
    order = ("dense", "model10", "fc226", "model30")

    def priority(path: Path) -> tuple:
        parts = path.stem.split("_")  # cifar10_<model>_dense or cifar10_<model>_<budget>_<method>
        return order.index(parts[2]) if parts[2] in order else len(order), parts[1] == "resnet34", path.stem

    paths = sorted(folder.glob("*.yaml"), key=priority)
    if tiny:
        paths = [folder / f"cifar10_vgg16_{name}.yaml" for name in ("dense", "fc226_separable", "model10_hydra")]
        data, warmup, steps = tiny_image_folder(work / "tiny_images"), 1, 2
    begin, rows, errors, skipped = time.perf_counter(), [], {}, []
    for path in paths:
        if time.perf_counter() - begin > limit_s:
            skipped.append(path.stem)
            continue
        try:
            rows.append(hours_cell(path, device, tiny, data, work, warmup, steps))
            print(f"  hours {json.dumps(rows[-1])}", flush=True)
        except Exception as err:  # noqa: BLE001 - one cell's failure must not cost the others
            errors[path.stem] = f"{type(err).__name__}: {err}"
            print(f"  hours {path.stem} FAILED: {errors[path.stem]}", flush=True)
    dense = {r["cell"].split("_")[1]: r for r in rows if r["cell"].endswith("_dense")}
    for row in rows:
        start = dense.get(row["cell"].split("_")[1])
        if row["from_dense"] and start:  # the dense run's epochs before the start, shared by all its cells
            row["with_dense_start"] = row["hours"] + start["hours"] * (start["epochs"] - row["epochs"]) / start["epochs"]
    return {"rows": rows, "errors": errors, "not_measured": skipped, "warmup": warmup, "steps": steps}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="every path on the CPU in seconds")
    parser.add_argument("--out", default="gpu.json", help="where the JSON object goes (rewritten after each section)")
    parser.add_argument("--data", default=str(DATA), help="the CIFAR-10 JPEG copy (ImageFolder layout)")
    parser.add_argument("--fit-minutes", type=float, default=3.5)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--work", default="gpu_run", help="folder for the run's logs and checkpoints")
    parser.add_argument("--sections", default="layer,training,lightning,run,attacks,sync",
                        help="comma-separated sections to run (a rerun of the ones that failed; "
                             "hours: the GPU cells' estimated hours, not in the default)")
    parser.add_argument("--hours-limit-s", type=float, default=300,
                        help="hours section: no new cell is started after this many seconds")
    args = parser.parse_args(argv)
    wanted = set(args.sections.split(","))
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        parser.error("no CUDA device: expected a GPU machine, or --tiny for the CPU check")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    data, work, out = Path(args.data).resolve(), Path(args.work).resolve(), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"environment": environment(device), "errors": {}, "section_seconds": {}}
    begin = time.perf_counter()

    def section(name: str, fn):
        """One section; a failure is recorded and the next section still runs (device time is
        scarce: one broken path must not cost the others' figures). The JSON is rewritten after
        each section, so a run stopped at its time limit keeps what it measured."""
        if name not in wanted:
            return None
        start = time.perf_counter()
        print(f"[{start - begin:6.1f}s] {name} ...", flush=True)
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - recorded, reported, and the run goes on
            result["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"[{time.perf_counter() - begin:6.1f}s] {name} FAILED: {result['errors'][name]}", flush=True)
            value = None
        result["section_seconds"][name] = time.perf_counter() - start
        out.write_text(json.dumps(result, indent=2, default=str))
        return value

    result["layer"] = section("layer", lambda: layer_section(device, args.tiny))
    training = section("training", lambda: training_section(device, args.tiny, data))
    result["training"], result["training_data"] = training if training else (None, None)
    out.write_text(json.dumps(result, indent=2, default=str))
    if result["training"]:
        result["lightning"] = section("lightning",
                                      lambda: lightning_section(device, args.tiny, data, work, result["training"]))
    run = section("run", lambda: real_run(device, args.tiny, data, work, args.fit_minutes,
                                          32 if args.tiny else args.test_images))
    result["run"], ckpt = run if run else (None, None)
    if ckpt is not None:
        result["attacks"] = section("attacks", lambda: attack_section(device, ckpt, args.tiny, data))
    result["sync"] = section("sync", lambda: sync_section(device, args.tiny))
    result["hours"] = section("hours", lambda: hours_section(device, args.tiny, data, work, args.hours_limit_s))
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result["environment"]))
    for row in result.get("layer") or []:
        print("layer", json.dumps(row))
    for row in result.get("training") or []:
        print("train", json.dumps(row))
    for key in ("lightning", "run", "attacks", "sync", "hours", "errors", "section_seconds"):
        print(key, json.dumps(result.get(key)))
    return result


if __name__ == "__main__":
    main()
