"""PGD throughput: sepnet's ART-based PGD vs ART's stock estimator vs torchattacks, the cost
of an adversarial-training epoch, and fast FGSM: ART's FastGradientMethod vs sepnet's FGSM.

    python -m benchmarks.attacks [--images 1024] [--batch 256]
    python -m benchmarks.attacks --overhead [--threads 1]      # the training step: sepnet / plain torch
    python -m benchmarks.attacks --evaluation [--images 500]   # run.py test's suite: sepnet / ART stock / torchattacks

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
from sepnet.objectives import AdversarialTraining, build_objective
from sepnet.guards import eval_mode

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


# --------------------------------------------------------------------------- training step overhead
def plain_attack(net: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, eps: float, step: float,
                 steps: int) -> torch.Tensor:
    """The same arithmetic as sepnet's training attacks, in plain torch: eval mode, a random
    start in the ball (N-FGSM: noise of 2 eps, no projection), `steps` signed input-gradient
    steps with projection to the ball and [0, 1]; TRADES: KL to the clean prediction."""
    with eval_mode(net):
        if name == "trades":
            with torch.no_grad():
                target = net(x).softmax(-1)
        noise = 2 * eps if name == "nfgsm" else eps
        adv = (x + torch.empty_like(x).uniform_(-noise, noise)).clamp(0, 1)
        for _ in range(steps):
            adv = adv.detach().requires_grad_(True)
            with torch.enable_grad():
                out = net(adv)
                loss = (nn.functional.kl_div(out.log_softmax(-1), target, reduction="sum") if name == "trades"
                        else nn.functional.cross_entropy(out, y, reduction="sum"))
                (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + step * grad.sign()
            if name != "nfgsm":
                adv = x + (adv - x).clamp(-eps, eps)
            adv = adv.clamp(0, 1)
    return adv.detach()


def plain_step(net, opt, x, y, name, eps, step, steps) -> None:
    adv = plain_attack(net, x, y, name, eps, step, steps)
    opt.zero_grad(set_to_none=True)
    if name == "trades":
        logits = net(x)
        kl = nn.functional.kl_div(net(adv).log_softmax(-1), logits.softmax(-1), reduction="batchmean")
        loss = nn.functional.cross_entropy(logits, y) + 6.0 * kl
    else:
        loss = nn.functional.cross_entropy(net(adv), y)
    loss.backward()
    opt.step()


def sepnet_step(objective, opt, x, y) -> None:
    task = objective(x, y).loss
    opt.zero_grad(set_to_none=True)
    task.backward()
    opt.step()


OVERHEAD_ATTACKS = {  # name: (sepnet adversarial section, plain attack name, steps)
    "fgsm": ({"loss": "at", "attack": {"name": "fgsm", "step_size": 1.25 * 8 / 255}}, "fgsm", 1),
    "pgd10": ({"loss": "at", "attack": {"name": "pgd", "step_size": 2 / 255, "steps": 10}}, "pgd", 10),
    "nfgsm": ({"loss": "at", "attack": {"name": "nfgsm", "step_size": 8 / 255}}, "nfgsm", 1),
    "trades10": ({"loss": "trades", "attack": {"name": "pgd", "step_size": 2 / 255, "steps": 10}}, "trades", 10),
}


def overhead(batches: list[int], repeats: int, models: list[str], attacks: list[str]) -> None:
    """A training step through sepnet (its training objective: ART's attacks through the adapter,
    the guard, the estimator) against the plain-torch step with the same arithmetic, measured
    alternately in one run (median of `repeats`), on random CIFAR-shaped batches."""
    from sepnet.network import build_network

    builders = {
        "mlp": lambda: build_network(10, (3, 32, 32), backbone="mlp", backbone_kwargs={"hidden_shapes": [[4, 16, 16]]}),
        "vgg4": lambda: build_network(10, (3, 32, 32), backbone="vgg16", backbone_kwargs={"width": 0.25},
                                      head="dense", head_kwargs={"hidden": [512, 512], "dropout": 0.5}),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); training step fwd+bwd+SGD, "
          f"median of {repeats}, ms")
    print(f"{'model':6} {'attack':9} {'batch':>5} {'clean':>8} {'sepnet':>9} {'plain':>9} {'sepnet/plain':>12} "
          f"{'min/min':>9}")
    for model_name in models:
        for batch in batches:
            torch.manual_seed(0)
            net = builders[model_name]()
            opt = torch.optim.SGD(net.parameters(), lr=1e-3)
            x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
            attacker = Attacker(net, (3, 32, 32), 10)

            def clean():
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()

            for attack in attacks:
                section, plain_name, steps = OVERHEAD_ATTACKS[attack]
                config = AdversarialTraining(**{**section, "attack": AttackSpec(eps=8 / 255, **section["attack"])})
                spec, objective = config.attack, build_objective(config, net, attacker)
                runs = {"clean": clean, "sepnet": lambda: sepnet_step(objective, opt, x, y),
                        "plain": lambda: plain_step(net, opt, x, y, plain_name, spec.eps, spec.step_size, steps)}
                times = {k: [] for k in runs}
                net.train()
                for fn in runs.values():  # warm-up
                    fn()
                for _ in range(repeats):  # alternating: drift on a shared machine hits every column alike
                    for key, fn in runs.items():
                        start = time.perf_counter()
                        fn()
                        times[key].append(time.perf_counter() - start)
                med = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}
                # the ratio of each round (sepnet and plain back to back), then their median: a round
                # slowed by the shared machine moves both of its times, not one column's median
                ratios = sorted(a / b for a, b in zip(times["sepnet"], times["plain"]))
                fastest = min(times["sepnet"]) / min(times["plain"])
                print(f"{model_name:6} {attack:9} {batch:5} {med['clean']:8.1f} {med['sepnet']:9.1f} "
                      f"{med['plain']:9.1f} {ratios[len(ratios) // 2]:11.2f}x {fastest:8.2f}x", flush=True)


def evaluation_speed(images: int, batch: int, square_queries: int) -> None:
    """`run.py test`'s default suite (PGD-10, APGD-CE, APGD-DLR, Square; Linf 8/255, a cascade:
    each attack on the images the earlier ones left) on the compressor benchmark's dense VGG/4
    (after its first fast-FGSM epoch; benchmarks/compressors.py trains it), with sepnet's
    attacks, with ART stock (`Attacker(fast=False)`: stock estimator and ART's numpy APGD /
    Square, sepnet's evaluation path until 2026-12-03 for those two) and with torchattacks (a
    port of the reference AutoAttack code), on the same images: seconds per attack, and which
    images each leaves robust."""
    import numpy as np
    from compressors import DENSE, dense_start_path  # noqa: E402 (benchmarks/ is the script's folder)
    from reproduce import common_kwargs  # noqa: E402

    from sepnet.evaluation import correct, reduced_autoattack, unique_labels
    from sepnet.module import ImageClassifier

    path = dense_start_path(argparse.Namespace(results="benchmarks/results/compressors.jsonl", dense_epochs=1), "vgg", 0)
    if not path.is_file():
        raise SystemExit(f"{path}: missing; expected the compressor benchmark's dense start "
                         "(python -m benchmarks.compressors --model vgg --budget - --method dense --seed 0)")
    module = ImageClassifier(network=DENSE["vgg"], **common_kwargs("vgg"))
    module.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net = module.net.eval()
    x, y = load("test", images)
    eps = 8 / 255
    suite = reduced_autoattack(AttackSpec(name="pgd", eps=eps, step_size=2 / 255, steps=10), square_queries)
    labels = unique_labels(suite)
    ta = [torchattacks.PGD(net, eps=eps, alpha=2 / 255, steps=10, random_start=True),
          torchattacks.APGD(net, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
          torchattacks.APGD(net, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="dlr", seed=0),
          torchattacks.Square(net, norm="Linf", eps=eps, n_queries=square_queries, n_restarts=1, p_init=0.8, seed=0)]
    ours, stock = Attacker(net, (3, 32, 32), 10), Attacker(net, (3, 32, 32), 10, fast=False)
    runners = {
        "sepnet": [lambda a, b, s=s: ours.generate(a, b, s) for s in suite],
        "ART stock": [lambda a, b, s=s: stock.generate(a, b, s) for s in suite],
        "torchattacks": [lambda a, b, t=t: t(a, b) for t in ta],
    }
    for attacks in runners.values():  # warm-up: estimators built, kernels chosen
        with eval_mode(net):
            attacks[0](x[:8], y[:8])
    clean = correct(net, x, y)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; dense VGG/4 ({path.name}), "
          f"{images} test images, clean {float(clean.float().mean()):.3f}; suite {', '.join(labels)}, cascade, "
          f"batch {batch}")
    worst, seconds = {}, {}
    for name, attacks in runners.items():
        torch.manual_seed(0)
        np.random.seed(0)
        alive, seconds[name] = clean.clone(), {}
        for label, attack in zip(labels, attacks):
            begin = time.perf_counter()
            todo = alive.nonzero().flatten()
            with eval_mode(net):
                for chunk in todo.split(batch):
                    alive[chunk] = correct(net, attack(x[chunk], y[chunk]), y[chunk])
            seconds[name][label] = time.perf_counter() - begin
        worst[name] = alive
    print(f"{'implementation':14} " + " ".join(f"{label:>10}" for label in labels) + f" {'total s':>8} "
          f"{'vs ART':>7} {'vs t.a.':>8} {'robust':>7}")
    total = {name: sum(v.values()) for name, v in seconds.items()}
    for name in runners:
        print(f"{name:14} " + " ".join(f"{seconds[name][label]:10.1f}" for label in labels) +
              f" {total[name]:8.1f} {total['ART stock'] / total[name]:6.2f}x {total['torchattacks'] / total[name]:7.2f}x "
              f"{float(worst[name].float().mean()):7.3f}")
    for other in ("ART stock", "torchattacks"):
        print(f"robust masks, sepnet vs {other}: both {int((worst['sepnet'] & worst[other]).sum())}, "
              f"only sepnet {int((worst['sepnet'] & ~worst[other]).sum())}, "
              f"only {other} {int((~worst['sepnet'] & worst[other]).sum())}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--overhead", action="store_true", help="the training-step overhead table only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (the overhead table: 1)")
    parser.add_argument("--batches", type=int, nargs="*", default=[32, 128, 512])
    parser.add_argument("--models", nargs="*", default=["mlp", "vgg4"])
    parser.add_argument("--attacks", nargs="*", default=list(OVERHEAD_ATTACKS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--evaluation", action="store_true", help="run.py test's suite only: sepnet / ART / torchattacks")
    parser.add_argument("--square-queries", type=int, default=1000)
    args = parser.parse_args()
    if args.evaluation:
        if args.threads:
            torch.set_num_threads(args.threads)
        evaluation_speed(args.images, min(args.batch, 250), args.square_queries)
        return
    if args.overhead:
        torch.set_num_threads(args.threads or 1)
        overhead(args.batches, args.repeats, args.models, args.attacks)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
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
