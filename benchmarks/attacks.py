"""PGD throughput: sepnet's ART-based PGD vs ART's stock estimator vs torchattacks, the cost
of an adversarial-training epoch, and fast FGSM: ART's FastGradientMethod vs sepnet's FGSM.

    python benchmarks/attacks.py [--images 1024] [--batch 256]

A small CNN is first trained for two clean epochs on 10k images of ../shared/data/cifar10-jpeg so
that adversarial accuracy means something; then PGD-10 Linf eps 8/255, step 2/255, random start,
runs on the first `--images` test images with each implementation, on the same model and batch.
Then fast FGSM (random start, step 1.25 eps as configured) with ART's FastGradientMethod (sepnet's
FGSM until 2026-11-27) and with sepnet's FGSM (one step of ART's PGD), both on FastClassifier:
time, and the fraction of coordinates on the ball's boundary (0.5 if the step taken is eps,
0.625 if it is 1.25 eps).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchattacks
from torch import nn
from torchvision import datasets, transforms

from sepnet.attacks import Attacker, AttackSpec, attack_guard

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


def small_cnn() -> nn.Module:
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), nn.Flatten(), nn.Linear(128 * 16, 10))


def load(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = datasets.ImageFolder(str(ROOT / split), transforms.ToTensor())
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    xs, ys = zip(*(ds[i] for i in idx))
    return torch.stack(xs), torch.tensor(ys)


def epoch(model, opt, x, y, batch, attack=None) -> float:
    model.train()
    start = time.perf_counter()
    for i in range(0, len(y), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        if attack is not None:
            xb = attack(xb, yb)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return time.perf_counter() - start


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--train", type=int, default=10000)
    args = parser.parse_args()
    torch.manual_seed(0)
    x_train, y_train = load("train", args.train)
    x_test, y_test = load("test", args.images)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    epoch(model, opt, x_train, y_train, 128)
    clean_epoch = epoch(model, opt, x_train, y_train, 128)  # the second, warm epoch is the baseline
    model.eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; small CNN after two clean "
          f"epoch: clean accuracy {accuracy(model, x_test, y_test):.3f} on {args.images} test images")
    eps, step, steps = 8 / 255, 2 / 255, 10
    spec = AttackSpec(name="pgd", eps=eps, step_size=step, steps=steps, random_start=True)
    fast, stock = Attacker(model, (3, 32, 32), 10), Attacker(model, (3, 32, 32), 10, fast=False)
    ta = torchattacks.PGD(model, eps=eps, alpha=step, steps=steps, random_start=True)

    def run(name, fn):
        fn(x_test[: args.batch], y_test[: args.batch])  # warm-up
        start = time.perf_counter()
        adv = torch.cat([fn(x_test[i:i + args.batch], y_test[i:i + args.batch])
                         for i in range(0, args.images, args.batch)])
        seconds = time.perf_counter() - start
        return name, seconds, accuracy(model, adv, y_test)

    results = [
        run("ART stock PyTorchClassifier", lambda x, y: stock.generate(x, y, spec)),
        run("torchattacks PGD", lambda x, y: ta(x, y)),
        run("sepnet FastClassifier (ART)", lambda x, y: fast.generate(x, y, spec)),
    ]
    art_s, ta_s = results[0][1], results[1][1]
    print(f"PGD-{steps} Linf eps 8/255 step 2/255, random start, batch {args.batch}, {args.images} images")
    print(f"{'implementation':30} {'seconds':>8} {'img/s':>8} {'vs ART':>7} {'vs torchattacks':>15} {'adv acc':>8}")
    for name, seconds, acc in results:
        print(f"{name:30} {seconds:8.2f} {args.images / seconds:8.0f} {art_s / seconds:6.2f}x "
              f"{ta_s / seconds:14.2f}x {acc:8.3f}")
    fgsm = AttackSpec(name="fgsm", eps=eps, step_size=1.25 * eps, random_start=True)
    estimator = fast.estimator(torch.device("cpu"))

    def art_fgm(x, y):
        from art.attacks.evasion import FastGradientMethod

        attack = FastGradientMethod(estimator, norm=float("inf"), eps=eps, eps_step=fgsm.step_size,
                                    num_random_init=1, batch_size=args.batch)
        with attack_guard(model):
            return torch.as_tensor(attack.generate(x.numpy(), y=y.numpy()))

    print(f"fast FGSM Linf eps 8/255, random start, step 1.25 eps configured, batch {args.batch}")
    print(f"{'implementation':30} {'seconds':>8} {'img/s':>8} {'vs ART':>7} {'on boundary':>12} {'adv acc':>8}")
    fgsm_results = []
    for name, fn in (("ART FastGradientMethod", art_fgm),
                     ("sepnet FGSM (ART PGD, 1 step)", lambda x, y: fast.generate(x, y, fgsm))):
        adv = fn(x_test[: args.images], y_test[: args.images])
        boundary = ((adv - x_test[: args.images]).abs() > eps - 1e-6).float().mean().item()
        _, seconds, acc = run(name, fn)
        fgsm_results.append(seconds)
        print(f"{name:30} {seconds:8.2f} {args.images / seconds:8.0f} {fgsm_results[0] / seconds:6.2f}x "
              f"{boundary:12.3f} {acc:8.3f}")
    model.train()
    adv_epoch = epoch(model, opt, x_train, y_train, 128, attack=lambda x, y: fast.generate(x, y, spec))
    print(f"one training epoch on {args.train} images: clean {clean_epoch:.1f} s, PGD-{steps} adversarial "
          f"{adv_epoch:.1f} s = {adv_epoch / clean_epoch:.1f}x ({steps} attack forward/backward passes, "
          "input gradient only, in eval mode, + 1 training pass)")


if __name__ == "__main__":
    main()
