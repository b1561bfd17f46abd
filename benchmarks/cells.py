"""The compressor benchmark's cells, shared by its two protocols (benchmarks.compressors, the
3-epoch table; benchmarks.converged, the converged one): the models and budgets, each cell's
network and constraint sections, running a cell, the plan, the GPU configs, and the report
(tables and the Pareto figure)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from benchmarks.common import EPS, FIGURES, evaluate, exact_kappa, train
from benchmarks.reproduce import FAMILIES, VGG, VGG_DENSE_HEAD, VIT_DENSE, common_kwargs
from sepnet.callbacks import ConstraintMonitor
from sepnet.compress import remove_pruning_
from sepnet.measures import fc_parameter_counts, parameter_counts, separable_layers
from sepnet.module import ImageClassifier
from sepnet.network import build_network

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "compressors.jsonl"
DENSE = {
    "vgg": dict(VGG, head="dense", head_kwargs=VGG_DENSE_HEAD),
    "vit": VIT_DENSE,
}
SEP_LEVEL = {"fc11": "a", "fc84": "b", "fc226": "c"}  # FC budgets: the separable heads' non-zero counts
JOINT = dict(condition_weight=1e-3, condition_form="implied", sparsity_target=0.5)  # issue 12's "joint"
PRUNING = {"channel": ("channel", {}),  # structured: whole channels, a smaller dense network (issue 41)
           "magnitude": ("magnitude", {"scope": "layer"}), "magnitude_global": ("magnitude", {"scope": "global"}),
           "hydra": ("hydra", {"score_epochs": 1}), "deadwood": ("deadwood", {"kick_in": 0})}
METHODS = {
    # FC budgets (VGG): the separable head itself, TT, pruning of the dense head
    "fc": ["separable", "separable_joint", "tt", "magnitude", "magnitude_global", "hydra", "deadwood", "lowrank"],
    # whole-model budgets: VGG convs by joint SVD with a separable or TT head, or pruning everywhere;
    # "separable" (the head alone) shows that FC compression cannot reach them
    "vgg_model": ["jsvd_separable", "jsvd_tt", "magnitude", "magnitude_global", "hydra", "deadwood",
                  "separable", "ttconv_tt", "lowrank"],
    "vit_model": ["separable", "separable_joint", "tt", "magnitude", "magnitude_global", "hydra", "deadwood",
                  "lowrank"],
}
# The PGD-AT control rows: a method name "<method>+pgd7" is the same cell trained with PGD-7
# (Madry's CIFAR recipe: 7 steps of 2/255, random start) instead of fast FGSM, its dense start
# included ("dense+pgd7"); at the 10x whole-model budget, for the two best fast-FGSM methods
# of each model (VGG: global magnitude and dual pruning; ViT: TT and layer-wise magnitude, seed 0)
PGD_AT = {"name": "pgd", "eps": EPS, "step_size": 2 / 255, "steps": 7}
PGD_CONTROLS = {"vgg": ["magnitude_global", "deadwood"], "vit": ["tt", "magnitude"]}
# a second seed at the VGG's 30x whole-model budget for the leaders of seed 0 (TT-conv 4.8 worst-
# case points ahead of the best pruning, layer-wise and global magnitude), to pair them by seed
SECOND_SEED_VGG30 = ["ttconv_tt", "magnitude", "magnitude_global"]


# the GPU cells (conf/experiments/compressors/): full-width models, full CIFAR-10, PGD-10 AT
GPU_MODELS = {
    "vgg16": dict(backbone="vgg16", backbone_kwargs={"variant": "cifar", "batch_norm": True}, head="dense",
                  head_kwargs=VGG_DENSE_HEAD),
    "resnet34": dict(backbone="resnet34", backbone_kwargs={"stem": "cifar"}, head="dense"),
}
DENSE.update(GPU_MODELS)


def sep_network(model: str, level: str) -> dict:
    """The separable VGG head at `level` (reproduce.py's sep_a / sep_b / sep_c) on `model`."""
    network = dict(FAMILIES["vgg"][f"sep_{level}"]["network"])
    if model != "vgg":
        network.update(backbone=DENSE[model]["backbone"], backbone_kwargs=DENSE[model]["backbone_kwargs"])
    return network


def fc_budget(model: str, level: str) -> int:
    """Non-zero FC parameters of the separable VGG head at `level` on `model`."""
    return fc_parameter_counts(build_network(num_classes=10, **sep_network(model, level))).nonzero


def _weights_and_biases(net: nn.Module, prefix: str) -> tuple[int, int]:
    layers = [m for name, m in net.named_modules() if name.startswith(prefix) and isinstance(m, (nn.Linear, nn.Conv2d))]
    return (sum(m.weight.numel() for m in layers),
            sum(m.bias.numel() for m in layers if m.bias is not None))


def narrow_network(model: str, factor: float) -> dict:
    """The dense VGG with every width scaled by one factor s -- its convolutions' channels and its
    head's hidden units -- the largest s (bisection) whose network has at most 1/factor of the
    dense one's parameters: the plain way to spend a budget, trained from scratch."""
    if model != "vgg":
        raise ValueError(f"narrow: the VGG-16/4 only, got {model!r}")
    dense = DENSE[model]
    allowed = sum(p.numel() for p in build_network(num_classes=10, **dense).parameters()) / factor
    hidden = dense["head_kwargs"]["hidden"]

    def network(scale: float) -> dict:
        return dict(dense, backbone_kwargs={**dense["backbone_kwargs"], "width": dense["backbone_kwargs"]["width"] * scale},
                    head_kwargs={**dense["head_kwargs"], "hidden": [max(1, round(h * scale)) for h in hidden]})

    def size(scale: float) -> int:
        return sum(p.numel() for p in build_network(num_classes=10, **network(scale)).parameters())

    low, high = 0.01, 1.0
    for _ in range(14):
        middle = (low + high) / 2
        low, high = (middle, high) if size(middle) <= allowed else (low, middle)
    return network(low)


def cell_config(model: str, budget: str, method: str, dense_start: str | None, epochs: int,
                dense_epochs: int) -> tuple[dict, dict, bool]:
    """(network section, constraint section, starts from the dense run) of one cell."""
    dense = DENSE[model]
    if method == "narrow":  # the dense model made narrower to the budget, from scratch
        return narrow_network(model, float(budget[len("model"):])), {}, False
    joint = method == "separable_joint"
    pruning = PRUNING.get(method)
    tail = epochs - dense_epochs  # epochs after the dense start
    if pruning and pruning[0] == "deadwood":  # penalty over all but the last epoch, then the exact mask
        pruning = ("deadwood", {**pruning[1], "penalty_epochs": max(1, tail - 1)})
    if budget.startswith("fc"):
        level = SEP_LEVEL[budget]
        if method in ("separable", "separable_joint"):
            network = sep_network(model, level)
            if joint:  # twice the rank at half the entries: the same non-zero budget
                network["head_kwargs"] = {**network["head_kwargs"], "rank": 2 * network["head_kwargs"]["rank"]}
            return network, JOINT if joint else {}, False
        target = fc_budget(model, level)
        probe = build_network(num_classes=10, **dense)
        fc = fc_parameter_counts(probe)
        if method in ("tt", "lowrank"):  # the head factorized, from a random init
            return dict(dense, compression=[{"method": method, "targets": ["head.*"], "budget": fc.dense / target}]), {}, False
        weights, biases = _weights_and_biases(probe, "head")
        entry = {"method": pruning[0], "targets": ["head.*"], "budget": weights / (target - biases),
                 "options": pruning[1]}
        return dict(dense, init_from=dense_start, compression=[entry]), {}, True
    factor = float(budget[len("model"):])
    if pruning:
        entry = {"method": pruning[0], "targets": ["*"], "budget": factor, "budget_of": "model", "options": pruning[1]}
        return dict(dense, init_from=dense_start, compression=[entry]), {}, True
    if method == "lowrank":  # every conv (Tucker-2) but the RGB stem / patch embedding and every FC (U V), from scratch
        return dict(dense, compression=[{"method": "lowrank", "targets": ["*"], "budget": factor, "budget_of": "model",
                                         "exclude": ["backbone.0", "*patch_embed*"]}]), {}, False
    if model in ("vgg", "vgg16", "resnet34"):
        if method == "jsvd":  # ResNet: the convolutions carry it all (its FC layer is 5k parameters)
            return dict(dense, init_from=dense_start, compression=[
                {"method": "jsvd", "targets": ["backbone.*"], "budget": factor, "budget_of": "model"}]), {}, True
        if method == "separable":  # the separable head alone, everything else dense
            return dict(dense, compression=[{"method": "separable", "targets": ["head.*"], "budget": factor,
                                             "budget_of": "model"}]), {}, False
        if method == "ttconv_tt":  # every conv but the RGB stem as Garipov's TT-conv, and a TT head, from scratch
            convs = {"method": "tt_conv", "targets": ["backbone.*"], "exclude": ["backbone.0"], "budget": factor,
                     "budget_of": "model"}
            if model == "resnet34":  # its one 5k-parameter FC layer stays dense; the convolutions carry it all
                return dict(dense, compression=[convs]), {}, False
            return dict(dense, compression=[{"method": "tt", "targets": ["head.*"], "budget": 84}, convs]), {}, False
        # the head factorized from a random init: approximating the trained head (init
        # from_linear) at 84x started it at chance and it stayed there (loss 2.30 for 30 steps,
        # both separable and TT; seed-0 records *_from_linear), while a random init trains
        head = "separable" if method == "jsvd_separable" else "tt"
        return dict(dense, init_from=dense_start, compression=[
            {"method": head, "targets": ["head.*"], "budget": 84},
            {"method": "jsvd", "targets": ["backbone.*"], "budget": factor, "budget_of": "model"}]), {}, True
    # ViT: every linear layer, from scratch; 3 modes (128 -> 384 as 4x4x8 -> 4x8x12) so that
    # rank 1 fits the 30x budget, as TT's 3 cores do
    entry = {"method": "separable" if joint else method, "targets": ["*"], "budget": factor, "budget_of": "model",
             "options": {"modes": 2 if factor <= 10 else 3}}
    if joint:
        entry.update(budget=joint_budget(dense, entry, factor), budget_of="targets")
    return dict(dense, compression=[entry]), JOINT if joint else {}, False


def joint_budget(dense: dict, entry: dict, factor: float) -> float:
    """The stored budget (of the compressed layers) of a separable network under the joint
    constraint whose non-zero count, once the sparsity target has zeroed its share of the factor
    entries, is within the whole-model budget `factor`: the largest such network. The target
    leaves the biases and everything outside the linear layers (embeddings, norms) dense, and the
    layer's shape search rounds, so no closed form meets it; bisection over built networks."""
    allowed = sum(p.numel() for p in build_network(num_classes=10, **dense).parameters()) / factor

    def nonzero(budget: float) -> float:
        net = build_network(num_classes=10, **dict(dense, compression=[dict(entry, budget=budget, budget_of="targets")]))
        factors = sum(f.numel() for _, layer in separable_layers(net) for term in layer.factors for f in term)
        return sum(p.numel() for p in net.parameters()) - JOINT["sparsity_target"] * factors

    low, high = factor / 4, factor * 4  # nonzero(low) > allowed >= nonzero(high): checked below
    if not nonzero(low) > allowed >= nonzero(high):
        raise ValueError(f"joint budget at {factor:g}x: expected it between {low:g}x and {high:g}x of the layers")
    for _ in range(12):  # geometric bisection: the budget to 0.1%
        middle = (low * high) ** 0.5
        low, high = (middle, high) if nonzero(middle) > allowed else (low, middle)
    return high


class SaveAt(L.Callback):
    """The network's weights after `epoch` epochs (the pruning methods' dense start); `stop`
    ends the run there (the schedule stays the whole run's)."""

    def __init__(self, epoch: int, path: Path, stop: bool = False) -> None:
        self.epoch, self.path, self.stop = epoch, path, stop

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(pl_module.net.state_dict(), self.path)
            trainer.should_stop = self.stop


def split_method(method: str) -> tuple[str, str]:
    """("magnitude_global", "pgd7") for "magnitude_global+pgd7"; ("hydra", "") for "hydra"."""
    base, _, training = method.partition("+")
    if training not in ("", "pgd7"):
        raise ValueError(f"method {method!r}: unknown training {training!r}; expected '<method>' or '<method>+pgd7'")
    return base, training


def training_kwargs(model: str, training: str) -> dict:
    """The ImageClassifier arguments of a cell: reproduce.py's (fast FGSM), or PGD-7 AT for "pgd7"."""
    kwargs = common_kwargs(model)
    if training == "pgd7":
        kwargs["adversarial"] = {"loss": "at", "attack": PGD_AT}
    return kwargs


def dense_start_path(args, model: str, seed: int, training: str = "") -> Path:
    tag = f"dense{'_' + training if training else ''}"
    return Path(args.results).with_name(f"compressors_{model}_{tag}_e{args.dense_epochs}_s{seed}.pt")


def _key(r: dict) -> tuple:
    return r["model"], r["budget"], r["method"], r["seed"], r["epochs"], r["dense_epochs"]


def run_cell(model: str, budget: str, method: str, seed: int, args) -> dict:
    record = {"model": model, "budget": budget, "method": method, "seed": seed, "epochs": args.epochs,
              "dense_epochs": args.dense_epochs, "pgd_images": args.pgd_images, "aa_images": args.aa_images,
              "honesty_images": args.honesty_images}
    base, training = split_method(method)
    start = dense_start_path(args, model, seed, training)
    callbacks = [ConstraintMonitor(every_n_steps=50, histograms=False)]
    torch.manual_seed(seed)
    kwargs = training_kwargs(model, training)
    record["training"] = kwargs["adversarial"]["attack"]
    if base == "dense":
        network, constraint, from_dense = DENSE[model], {}, False
        callbacks.append(SaveAt(args.dense_epochs, start))
    else:
        network, constraint, from_dense = cell_config(model, budget, base, str(start), args.epochs,
                                                      args.dense_epochs)
        if from_dense and not start.is_file():  # the dense cell is recorded but its start file (git-ignored) is
            dense_start(model, seed, training, start, args)  # not here: the same seeded epochs again
    epochs = args.epochs - (args.dense_epochs if from_dense else 0)
    try:
        model_ = ImageClassifier(network=network, constraint=constraint, **kwargs)
    except ValueError as err:  # a budget the method cannot reach, said by the library
        record.update(status="unreachable", reason=str(err))
        return record
    record.update(status="ok", start=f"dense after {args.dense_epochs} epoch(s)" if from_dense else "scratch",
                  network=network, constraint=constraint, summary=model_.net.compression_summary)
    logger = TensorBoardLogger(args.tb, name=f"{model}/{budget}/{method}", version=f"seed{seed}")
    seconds, _ = train(model_, epochs, args.batch, callbacks=callbacks, logger=logger)
    remove_pruning_(model_.net)  # masks made permanent: the counts and the attacks see the pruned model
    whole, fc = parameter_counts(model_.net), fc_parameter_counts(model_.net)
    record.update(
        train_seconds=seconds,
        params_stored=whole.stored, params_nonzero=whole.nonzero, params_dense=whole.dense,
        model_compression=whole.dense / max(whole.nonzero, 1),
        fc_stored=fc.stored, fc_nonzero=fc.nonzero, fc_dense=fc.dense, fc_compression=fc.dense / max(fc.nonzero, 1),
        final_layer_kappa=[exact_kappa(layer) for _, layer in separable_layers(model_.net)])
    begin = time.perf_counter()
    record.update(evaluate(model_.net, model_.attacker, args.pgd_images, args.aa_images, args.honesty_images))
    record["eval_seconds"] = time.perf_counter() - begin
    return record


def dense_start(model: str, seed: int, training: str, path: Path, args) -> None:
    """The dense run's weights after --dense-epochs, trained again (same seed, data order and
    training as the dense cell) and saved to `path`: nothing evaluated, nothing recorded."""
    print(f"{path.name}: training the dense start ({args.dense_epochs} epoch(s), seed {seed})", flush=True)
    torch.manual_seed(seed)
    model_ = ImageClassifier(network=DENSE[model], **training_kwargs(model, training))
    train(model_, args.epochs, args.batch, callbacks=[SaveAt(args.dense_epochs, path, stop=True)], logger=False)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the dense start was not written")


def plan() -> list[tuple[str, str, str, int]]:
    """Every cell, in the order they run: the claims' cells first (VGG 226x FC and 10x whole
    model, the ViT at 10x), both seeds, then the PGD-AT controls, then the other budgets."""
    cells = [("vgg", "-", "dense", 0)]
    cells += [("vgg", "fc226", m, 0) for m in METHODS["fc"]]
    cells += [("vgg", "model10", m, 0) for m in METHODS["vgg_model"]]
    cells += [("vgg", "-", "dense", 1)] + [("vgg", b, m, 1) for b, ms in (("fc226", "fc"), ("model10", "vgg_model"))
                                           for m in METHODS[ms] if m != "separable" or b == "fc226"]
    for seed in (0, 1):
        cells += [("vit", "-", "dense", seed)] + [("vit", "model10", m, seed) for m in METHODS["vit_model"]]
    cells += [(model, budget, f"{m}+pgd7", 0) for model in ("vgg", "vit")
              for budget, m in [("-", "dense"), *(("model10", m) for m in PGD_CONTROLS[model])]]
    cells += [("vgg", b, m, 0) for b in ("fc84", "fc11") for m in METHODS["fc"]]
    cells += [("vgg", "model30", m, 0) for m in METHODS["vgg_model"]]
    cells += [("vgg", "model30", m, 1) for m in SECOND_SEED_VGG30]
    cells += [("vit", "model30", m, 0) for m in METHODS["vit_model"]]
    return cells


GPU_EPOCHS, GPU_DENSE_EPOCHS = 100, 50
GPU_CELLS = [("fc226", m) for m in METHODS["fc"] if m != "lowrank"] + [  # U V cannot reach 226x (rank 1 > budget)
    (b, m) for b in ("model10", "model30") for m in ("jsvd_separable", "magnitude_global", "hydra", "deadwood",
                                                     "ttconv_tt")]
PGD10 = {"name": "pgd", "eps": 8 / 255, "step_size": 2 / 255, "steps": 10}


def gpu_configs() -> dict[str, dict]:
    """One `run.py fit` config per GPU cell (conf/experiments/compressors/): the full-width
    VGG-16 and ResNet-34 (CIFAR stems), full CIFAR-10, PGD-10 AT, 100 epochs; the pruning and
    joint-SVD cells start from their model's dense run after 50 epochs (its `starts/`
    checkpoint) and train the other 50."""
    configs = {}
    for model in GPU_MODELS:
        cells = [("-", "dense")] + [(b, m.replace("jsvd_separable", "jsvd") if model == "resnet34" else m)
                                    for b, m in GPU_CELLS if model == "vgg16" or b.startswith("model")]
        start = f"logs/compressors/cifar10_{model}_dense/starts/dense-epoch={GPU_DENSE_EPOCHS - 1}.ckpt"
        for budget, method in cells:
            name = f"cifar10_{model}_dense" if method == "dense" else f"cifar10_{model}_{budget}_{method}"
            if method == "dense":
                network, constraint, from_dense = DENSE[model], {}, False
            else:
                network, constraint, from_dense = cell_config(model, budget, method, start, GPU_EPOCHS,
                                                              GPU_DENSE_EPOCHS)
            trainer = {"max_epochs": GPU_EPOCHS - (GPU_DENSE_EPOCHS if from_dense else 0),
                       "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": "logs/compressors", "name": name}}}
            if method == "dense":  # the pruning methods' start: the weights after GPU_DENSE_EPOCHS
                trainer["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                         "init_args": {"dirpath": f"logs/compressors/{name}/starts",
                                                       "filename": "dense-{epoch}", "every_n_epochs": GPU_DENSE_EPOCHS,
                                                       "save_top_k": -1, "save_on_train_epoch_end": True}}]
            model_section = {"network": network, "optimization": {
                "optimizer": "sgd", "lr": 0.01 if from_dense else 0.1, "weight_decay": 5e-4, "scheduler": "cosine"},
                "adversarial": {"loss": "at", "attack": PGD10}, "validation": {"batches": 8}}
            if constraint:
                model_section["constraint"] = constraint
            configs[name] = {"trainer": trainer, "model": model_section, "data": {
                "class_path": "sepnet.data.CIFAR10DataModule",
                "init_args": {"root": "data", "batch_size": 128, "num_workers": 8}}}
    return configs


def write_configs(folder: Path) -> None:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for name, config in gpu_configs().items():
        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=110)
        head = (f"# {name}: one cell of the compressor benchmark on a GPU; written by\n"
                "# python -m benchmarks.compressors --write-configs (edit there, not here).\n"
                f"# python run.py fit --config conf/experiments/compressors/{name}.yaml --trainer conf/trainer/gpu.yaml\n")
        if "init_from" in config["model"]["network"]:
            head += f"# needs the dense run first: {config['model']['network']['init_from']}\n"
        (folder / f"{name}.yaml").write_text(head + text)
    print(f"{len(gpu_configs())} configs in {folder}")


def done_keys(path: Path) -> set[tuple]:
    return {_key(json.loads(line)) for line in path.read_text().splitlines()} if path.is_file() else set()


def report(path: Path, figures: Path = FIGURES, name: str = "compressors.png",
           models: tuple[str, ...] = ("vgg", "vit"), kappa: bool = True) -> None:
    """One table per model and budget (the dense reference first), the paired difference of the
    two best methods where they share seeds, and the Pareto plot (`figures`/`name`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[tuple, dict[int, dict]] = {}  # (model, budget, method, epochs) -> seed -> latest record
    for line in path.read_text().splitlines():
        r = json.loads(line)
        runs.setdefault((r["model"], r["budget"], r["method"], r["epochs"]), {})[r["seed"]] = r
    keys = ("clean_acc", "pgd20_acc", "worst_acc")
    fig, axes = plt.subplots(1, len(models) + kappa, figsize=(6.3 * (len(models) + kappa), 6.2), squeeze=False)
    axes = axes[0]
    # one colour and marker per method, the same in both panels (more methods than a 10-colour cycle);
    # PGD-AT controls dashed
    names = sorted({split_method(method)[0] for (_, _, method, _) in runs if not method.startswith("dense")})
    style = {name: (plt.get_cmap("tab20")(i % 20), "os^Dv<>PXh"[i % 10]) for i, name in enumerate(names)}
    for model, ax in zip(models, axes):
        dense = {s: r for (m, b, method, _), seeds in runs.items() if m == model and method == "dense"
                 for s, r in seeds.items()}
        dense_seconds = {(s, split_method(method)[1]): r["train_seconds"] / r["epochs"]
                         for (m, _, method, _), seeds in runs.items() if m == model and method.startswith("dense")
                         for s, r in seeds.items() if r["status"] == "ok"}
        budgets = sorted({b for (m, b, _, _) in runs if m == model and b != "-"},
                         key=lambda b: (b[:2], float(b.strip("fcmodel"))))
        curves: dict[str, list] = {}
        for budget in budgets:
            print(f"\n### {model} {budget}\n")
            print("| method | seeds | non-zero params | model compression | FC compression | clean | PGD-20 | "
                  "worst case | train min (with dense start) | attacked images (AA / honesty) | flags |")
            print("|---" * 11 + "|")
            trainings = {split_method(method)[1] for (m, b, method, _) in runs if m == model and b == budget}
            rows = sorted(((method, seeds) for (m, b, method, _), seeds in runs.items()  # the dense rows of
                           if m == model and (b == budget or b == "-" and split_method(method)[1] in trainings)),
                          key=lambda kv: (not kv[0].startswith("dense"), split_method(kv[0])[1], kv[0]))
            scored = []
            for method, seeds in rows:
                ok = [r for r in seeds.values() if r["status"] == "ok"]
                if not ok:
                    reason = next(iter(seeds.values()))["reason"]
                    reason = reason.split(": ", 1)[-1]  # the library's message, less "compression <method>: "
                    print(f"| {method} | - | cannot reach it: {reason} |" + " |" * 8)
                    continue
                mean = {k: sum(r[k] for r in ok) / len(ok) for k in keys}
                spread = {k: (max(r[k] for r in ok) - min(r[k] for r in ok)) / 2 for k in keys}
                cell = {k: f"{mean[k]:.3f}" + (f" ±{spread[k]:.3f}" if len(ok) > 1 else "") for k in keys}
                kinds = [{_warning_kind(w) for w in r.get("honesty", {}).get("warnings", [])} for r in ok]
                warnings = [f"{k} ({sum(k in ks for ks in kinds)}/{len(ok)})" for k in sorted(set().union(*kinds))]
                collapsed = mean["clean_acc"] <= 0.11  # chance: a constant prediction "survives" attacks
                if collapsed:
                    warnings.insert(0, "**collapsed to chance** (left out of the best and the plot)")
                over = split_method(method)[0].endswith("_over_budget")  # renamed records of a cell past its budget
                if over:
                    warnings.insert(0, "**over budget** (left out of the best; plotted at its own count)")
                training = split_method(method)[1]
                minutes = sum(r["train_seconds"] + (r["dense_epochs"] * dense_seconds.get((r["seed"], training), 0)
                                                    if r.get("start", "scratch") != "scratch" else 0)
                              for r in ok) / len(ok) / 60
                images = f"{ok[0].get('aa_images', 1000)} / {ok[0].get('honesty_images', 256)}"
                print(f"| {method} | {len(ok)} | {ok[0]['params_nonzero']:,} | {ok[0]['model_compression']:.1f}x | "
                      f"{ok[0]['fc_compression']:.1f}x | {cell['clean_acc']} | {cell['pgd20_acc']} | "
                      f"{cell['worst_acc']} | {minutes:.1f} | {images} | {'; '.join(warnings) or '-'} |")
                if collapsed:
                    continue
                if not method.startswith("dense"):
                    if not training and not over:  # nor are the PGD-AT control rows: other training
                        scored.append((mean["worst_acc"], method, {r["seed"]: r["worst_acc"] for r in ok}))
                    curves.setdefault(method, []).append((ok[0]["params_nonzero"], mean["worst_acc"],
                                                          spread["worst_acc"]))
            scored.sort(reverse=True)
            if len(scored) > 1:
                (best, first, a), (_, second, b) = scored[:2]
                shared = sorted(set(a) & set(b))
                diffs = [a[s] - b[s] for s in shared]
                print(f"\nbest: {first} {best:.3f}; paired worst-case difference to {second} over seeds "
                      f"{shared}: {', '.join(f'{d:+.3f}' for d in diffs)}")
        if dense:
            r = next(iter(dense.values()))
            ax.scatter([r["params_nonzero"]], [sum(d["worst_acc"] for d in dense.values()) / len(dense)],
                       marker="*", s=150, color="black", label="dense", zorder=3)
        for method, points in sorted(curves.items()):
            points.sort()
            color, marker = style[split_method(method)[0]]
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                        color=color, marker=marker, markersize=5, capsize=3, label=method,
                        linestyle="--" if split_method(method)[1] else "-")
        if curves or dense:  # a log axis without data cannot be laid out
            ax.set(xscale="log", xlabel="non-zero parameters (whole model)", ylabel="worst-case accuracy (Linf 8/255)",
                   title=f"{model}: non-zero parameters vs worst-case robust accuracy")
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)  # below: no point hidden
        else:
            ax.set_title(f"{model}: no runs yet")
    if kappa:  # the conditioning study's scatter, beside the short protocol's panels
        kappa_scatter(axes[-1], path)
    fig.tight_layout()
    out = figures / name
    fig.savefig(out, dpi=120)
    print(f"\nplot: {out}")


def _warning_kind(warning: str) -> str:
    """An honesty check's warning, without its figures."""
    for needle, kind in (("Square", "Square beats PGD-20"), ("does not fall", "accuracy does not fall to 0"),
                         ("stronger", "stronger PGD beats PGD-20")):
        if needle in warning:
            return kind
    return warning.split(":")[0]


def kappa_scatter(ax, path: Path) -> None:
    """Issue 12: the largest final kappa of a run's separable layers (implied matrices, exact)
    vs its worst-case accuracy, over this study's separable runs and the constraint ablation's."""
    ablation = path.with_name("constraint_ablation.jsonl")
    points = []
    for source in (path, ablation):
        if not source.is_file():
            continue
        for line in source.read_text().splitlines():
            r = json.loads(line)
            kappas = [k for k in r.get("final_layer_kappa", [])]
            if (r.get("status", "ok") == "ok" and kappas and r.get("worst_acc") is not None
                    and r.get("clean_acc", 1) > 0.11):  # runs collapsed to chance say nothing here
                label = r.get("variant") or f"{r['model']} {r['budget']} {r['method']}"
                points.append((max(kappas), r["worst_acc"], label, source == ablation))
    for ablated, marker, name in ((False, "o", "compressor study (3 epochs)"), (True, "s", "constraint ablation (10 epochs)")):
        xs = [min(k, 1e12) for k, _, _, a in points if a == ablated]
        ax.scatter(xs, [w for _, w, _, a in points if a == ablated], marker=marker, label=name)
    for k, w, label, _ in points:
        ax.annotate(label.replace("sep_b_", ""), (min(k, 1e12), w), fontsize=6)
    ax.set(xlabel="largest final kappa of the separable layers (inf drawn at 1e12)",
           ylabel="worst-case accuracy", title="Conditioning vs robustness (issue 12)")
    if points:  # a log axis without data cannot be laid out
        ax.set_xscale("log")
        ax.legend(fontsize=7)


