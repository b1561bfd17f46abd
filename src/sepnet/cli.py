"""The LightningCLI behind run.py: config links, forced callbacks, and the checkpoint rules.

One run is one folder: `<save_dir>/<name>/version_N/` holds its TensorBoard events, config.yaml,
checkpoints/ (last.ckpt, best-*.ckpt) and test_report.json. `--ckpt_path last` means the newest
run of this experiment that has a last.ckpt; resuming continues that run's folder and version.
A checkpoint's model hyperparameters define the model: flags that contradict them are refused.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sepnet import metric_names as names
from sepnet.callbacks import ConstraintMonitor, EpochLine, EvalReport, RunWatch, last_checkpoint
from sepnet.measures import parameter_counts
from sepnet.data import VisionDataModule
from sepnet.module import ImageClassifier
from sepnet.objectives import Objective

log = logging.getLogger("sepnet")

LINKED = ("num_classes", "image_shape", "mean", "std")
# model settings that only say how validation attacks the model: a flag wins over the
# checkpoint's value (any other flag that contradicts the checkpoint is refused)
EVALUATION_KEYS = ("validation", "certificate", "fast_attacks")
# hyperparameters of older checkpoints and configs that no longer exist, and where their job went
REMOVED = {"robust_test_batches": "test image counts are --report.images"}
_SECTIONS = {
    "network": ("backbone", "backbone_kwargs", "head", "head_kwargs"),
    "constraint": ("condition_weight", "condition_form", "sparsity_weight", "sparsity_form", "tl1_a", "proximal"),
    "optimization": ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "scheduler", "milestones", "gamma"),
}
RENAMED = {
    **{key: f"{section}.{key}" for section, keys in _SECTIONS.items() for key in keys},
    "adv_training": "adversarial.loss (at | trades) and adversarial.attack.name",
    "adv_eps": "adversarial.attack.eps", "adv_step_size": "adversarial.attack.step_size",
    "adv_steps": "adversarial.attack.steps", "adv_norm": "adversarial.attack.norm",
    "adv_mix": "adversarial.mix", "trades_beta": "adversarial.trades_beta",
    "val_attacks": "validation.attacks", "robust_batches": "validation.batches",
    "robust_every_n_epochs": "validation.every_n_epochs",
}
# settings that moved between sections (sepnet 0.2.0): the old key -> the line that says where
MOVED = {"validation.certify_radii": "model.validation.certify_radii is now model.certificate.radii",
         "report.certify_images": "report.certify_images is now model.certificate.check_images"}


def _flat(config: dict, prefix: str = "") -> dict:
    """{"network.backbone": ...}: section fields as dotted keys; lists and the free-form
    *_kwargs dicts stay whole values."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and not key.endswith("_kwargs"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(value: Any) -> Any:
    """Config values comparable with a checkpoint's hyperparameters (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        return _plain(value.as_dict())
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    return value


def _run_folder(ckpt: Path) -> tuple[str, str, int] | None:
    """(save_dir, name, version) of a checkpoint inside <save_dir>/<name>/version_N/checkpoints/."""
    match = re.fullmatch(r"version_(\d+)", ckpt.parent.parent.name)
    if ckpt.parent.name != "checkpoints" or match is None:
        return None
    return str(ckpt.parents[3]), ckpt.parents[2].name, int(match.group(1))


class SepnetCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        for key in LINKED:
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")  # the best; last.ckpt beside it
        parser.add_lightning_class_args(ConstraintMonitor, "monitor")
        parser.add_lightning_class_args(EvalReport, "report")
        parser.add_lightning_class_args(RunWatch, "watch")
        parser.set_defaults({
            "checkpoint.dirpath": None,  # the run's folder: <save_dir>/<name>/version_N/checkpoints
            "checkpoint.filename": "best-{epoch:03d}",
            "checkpoint.monitor": names.robust_acc("val"),
            "checkpoint.mode": "max",
            "checkpoint.save_top_k": 1,
            "checkpoint.auto_insert_metric_name": False,
        })
        # the subcommand parsers are built in the order of subcommands(); their defaults (class
        # defaults and conf/default.yaml) tell which values a user set
        self.__dict__.setdefault("_sepnet_parsers", []).append(parser)

    # ------------------------------------------------------------------ checkpoint rules
    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        cfg = self.config[subcommand] if subcommand else self.config
        self._limits = _integer_limits(cfg.trainer, args if args is not None else sys.argv[1:])
        if subcommand:
            if subcommand == "fit":
                _check_run_length(cfg.trainer)
            self._resolve_checkpoint(subcommand)

    def _resolve_checkpoint(self, subcommand: str) -> None:
        """Before Lightning reads the checkpoint's hyperparameters: `last` becomes a file, the
        file is read once and checked, and the logger continues the checkpoint's run folder."""
        cfg = self.config[subcommand]
        self._checkpoint = None
        ckpt = cfg.get("ckpt_path")
        if ckpt in ("best", "hpc", "registry"):
            return
        if ckpt == "last":
            found = self._find_last(cfg)
            if found is None:
                where = self._experiment_folder(cfg)
                if subcommand != "fit":
                    raise ValueError(f"--ckpt_path last: no last.ckpt under {where}: expected a run of "
                                     "this experiment there (check --config / the logger's name)")
                log.info("--ckpt_path last: nothing to resume under %s; starting a fresh run", where)
                cfg.ckpt_path = ckpt = None
            else:
                cfg.ckpt_path = ckpt = str(found)
        self._check_folders(cfg, resuming=ckpt is not None and subcommand == "fit", fitting=subcommand == "fit")
        if ckpt is None:
            return
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist: expected a .ckpt file")
        try:
            self._checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            self._checkpoint["state_dict"]
        except Exception as err:  # truncated file, not a checkpoint, ...
            raise ValueError(f"checkpoint {ckpt} is unreadable ({type(err).__name__}): expected a "
                             "complete Lightning .ckpt file") from None
        self._check_hyperparameters(subcommand, ckpt)
        if subcommand == "fit":
            self._check_schedule(cfg, ckpt)
        run = _run_folder(path)
        logger = cfg.trainer.get("logger")
        if run and hasattr(logger, "init_args") and "version" in logger.init_args:
            # continue (fit) or report into (test, validate) the run the checkpoint belongs to
            logger.init_args.save_dir, logger.init_args.name, logger.init_args.version = run

    def _experiment_folder(self, cfg) -> Path:
        if cfg.checkpoint.dirpath:
            return Path(cfg.checkpoint.dirpath)
        logger = cfg.trainer.get("logger")
        root = Path(cfg.trainer.get("default_root_dir") or ".")
        if hasattr(logger, "init_args") and "save_dir" in logger.init_args:
            return Path(logger.init_args.save_dir) / (logger.init_args.get("name") or "")
        return root / ("lightning_logs" if logger in (True, None) else "checkpoints")

    def _find_last(self, cfg) -> Path | None:
        """The newest run's last.ckpt: <experiment>/version_N/checkpoints/last.ckpt with the largest
        N, or <dirpath>/last.ckpt where checkpoint.dirpath is set."""
        folder = self._experiment_folder(cfg)
        if cfg.checkpoint.dirpath or folder.name == "checkpoints":
            return folder / "last.ckpt" if (folder / "last.ckpt").is_file() else None
        runs = [(int(m.group(1)), p) for p in folder.glob("version_*/checkpoints/last.ckpt")
                if (m := re.fullmatch(r"version_(\d+)", p.parent.parent.name))]
        return max(runs)[1] if runs else None

    def _check_folders(self, cfg, resuming: bool, fitting: bool) -> None:
        """Folders that cannot be written, or, for a fit, a fixed checkpoint folder that already
        holds another run's last.ckpt (Lightning would write last-v1.ckpt beside it), fail before
        training. test / validate / predict write no checkpoint: they may read the folder's own."""
        logger = cfg.trainer.get("logger")
        folders = [("checkpoint.dirpath", cfg.checkpoint.dirpath)]
        if hasattr(logger, "init_args") and "save_dir" in logger.init_args:
            folders.append(("trainer.logger.save_dir", logger.init_args.save_dir))
        for key, folder in folders:
            for parent in [Path(folder or "."), *Path(folder or ".").parents]:
                if parent.exists() and not parent.is_dir():
                    raise ValueError(f"--{key} {folder}: {parent} is a file; expected a folder")
            existing = next(p for p in [Path(folder or "."), *Path(folder or ".").parents] if p.exists())
            if not _writable(existing):  # found before the first step, not when the first epoch's checkpoint fails
                raise ValueError(f"--{key} {folder}: {existing} is not writable; expected a folder this user can write")
        dirpath = cfg.checkpoint.dirpath
        if fitting and dirpath and not resuming and (Path(dirpath) / "last.ckpt").exists():
            raise ValueError(f"--checkpoint.dirpath {cfg.checkpoint.dirpath} already holds last.ckpt of "
                             "another run: expected --ckpt_path last to resume it, or a new folder")

    def _check_hyperparameters(self, subcommand: str, ckpt: str) -> None:
        """Flags and config values that contradict the checkpoint's model are refused."""
        hparams = {k: v for k, v in self._checkpoint.get("hyper_parameters", {}).items()
                   if not k.startswith("_")}
        for key, where in REMOVED.items():
            if key in hparams:
                raise ValueError(f"checkpoint {ckpt} has the removed hyperparameter {key} ({where}): "
                                 f"expected a checkpoint of this sepnet version; delete "
                                 f"hyper_parameters['{key}'] from it to load it")
        moved = [line for key, line in MOVED.items() if key.startswith("validation.")
                 and key.split(".")[1] in (hparams.get("validation") or {})]
        if moved:
            raise ValueError(f"checkpoint {ckpt} predates the certificate section ({moved[0]}): expected a "
                             "checkpoint of this sepnet version; move the value in its hyper_parameters")
        old = [key for key in hparams if key in RENAMED]
        if old:
            raise ValueError(f"checkpoint {ckpt} predates the model config sections ({old[0]} is now "
                             f"model.{RENAMED[old[0]]}): expected a checkpoint of this sepnet version; "
                             "retrain, or move its hyper_parameters into the sections")
        parser = self._sepnet_parsers[list(self.subcommands()).index(subcommand)]
        defaults = _flat(_plain(parser.get_defaults().get("model")))
        given = _flat(_plain(self.config[subcommand].get("model")))
        stored = _flat(_plain(hparams))
        self._evaluation_overrides = {}
        for key, value in given.items():
            if key.split(".")[0] in LINKED or key not in stored or value == defaults.get(key):
                continue
            if key.split(".")[0] in EVALUATION_KEYS:
                self._evaluation_overrides[key] = (self.config[subcommand].model[key], stored[key])
            elif value != stored[key]:
                raise ValueError(f"--model.{key} {value} contradicts the checkpoint {ckpt} ({key}: "
                                 f"{stored[key]}): expected no model flags with --ckpt_path "
                                 "(test attacks are --report.attacks; a new model needs a new run)")

    def _check_schedule(self, cfg, ckpt: str) -> None:
        """Resuming with another max_epochs would keep the old schedule's length: refused."""
        schedulers = self._checkpoint.get("lr_schedulers") or [{}]
        built_for = schedulers[0].get("T_max")
        max_epochs = cfg.trainer.get("max_epochs")
        if built_for is not None and max_epochs is not None and built_for != max(1, max_epochs):
            raise ValueError(f"--trainer.max_epochs {max_epochs}: checkpoint {ckpt} has a cosine schedule "
                             f"over {built_for} epochs; expected --trainer.max_epochs {built_for} to resume "
                             "(to train longer, start a new run)")

    def _check_checkpoint_shapes(self) -> None:
        """A checkpoint whose weights do not fit the model is a one-line error before loading."""
        if self._checkpoint is None:
            return
        state, ckpt = self._checkpoint["state_dict"], self.config[self.subcommand].get("ckpt_path")
        self._checkpoint = None  # Lightning loads it next; do not keep a second copy
        for key, value in self.model.state_dict().items():
            if key not in state or state[key].shape != value.shape:
                got = "missing" if key not in state else tuple(state[key].shape)
                raise ValueError(f"checkpoint {ckpt} does not fit this config: {key} is {got} in the "
                                 f"checkpoint, expected {tuple(value.shape)}")

    def instantiate_trainer(self, **kwargs):
        return super().instantiate_trainer(**{**getattr(self, "_limits", {}), **kwargs})

    # ------------------------------------------------------------------ hooks
    def before_instantiate_classes(self) -> None:
        """Lightning has merged the checkpoint's hyperparameters: evaluation flags win again, and
        the best checkpoint is judged only on epochs that run the robust evaluation."""
        if not self.subcommand:
            return
        cfg = self.config[self.subcommand]
        for key, (value, stored) in getattr(self, "_evaluation_overrides", {}).items():
            if _plain(value) != stored:
                log.info("--model.%s given: used instead of the checkpoint's value", key)
            cfg.model[key] = value
        if not cfg.get("ckpt_path"):
            self._data_threat_model(cfg)
        every = cfg.model.get("validation.every_n_epochs") or 1
        if cfg.checkpoint.get("every_n_epochs") in (None, 1) and str(cfg.checkpoint.monitor).startswith(names.robust_acc("val", "")):
            cfg.checkpoint.every_n_epochs = every

    def _data_threat_model(self, cfg) -> None:
        """A dataset switch brings the dataset's threat model. conf/default.yaml is the digits
        experiment (Linf eps 0.1 = 25.5/255); an attack left at its values takes the chosen data
        module's `threat_eps` (CIFAR, SVHN, class folders 8/255, ImageNet 4/255), its step size in
        proportion, and the run says so. An attack set by a flag or a config stays as it is."""
        module, _, name = str(cfg.data.get("class_path", "")).rpartition(".")
        try:
            data_class = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return  # jsonargparse has already refused an unknown class; nothing to adapt
        eps = getattr(data_class, "threat_eps", None)
        parser = self._sepnet_parsers[list(self.subcommands()).index(self.subcommand)]
        defaults = parser.get_defaults().get("model")
        objective = Objective.registry.get(cfg.model.adversarial.loss)  # an unknown one is refused when it is built
        uses_attack = objective is None or objective.uses_attack  # a certified model's attack is unused
        pairs = [(cfg.model.adversarial.attack, defaults.adversarial.attack)] if uses_attack else []
        pairs += list(zip(cfg.model.validation.attacks or [], defaults.validation.attacks or []))
        changed = []
        for spec, default in pairs:
            if eps is None or _plain(spec) != _plain(default) or spec.eps == eps:
                continue
            spec.step_size, spec.eps = spec.step_size * eps / spec.eps, eps
            changed.append(spec.name)
        if changed:
            log.info("threat model: Linf eps %.4f (%.1f/255), %s's, for %s (set model.adversarial.attack.eps "
                     "and model.validation.attacks for another)", eps, 255 * eps, name, ", ".join(changed))

    def before_fit(self) -> None:
        self._check_checkpoint_shapes()
        if self.trainer.checkpoint_callback is not None:
            self.trainer.callbacks.append(last_checkpoint(self.trainer.checkpoint_callback.dirpath))
        if self.trainer.loggers:
            self.trainer.callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        if self.trainer.progress_bar_callback is None:  # no terminal (a scheduler's log): a line an epoch
            self.trainer.callbacks.append(EpochLine())

    def before_validate(self) -> None:
        self._check_checkpoint_shapes()
        self._quiet_callback_warning()

    def _quiet_callback_warning(self) -> None:
        """Evaluating a checkpoint of a fit: the last-checkpoint callback that fit adds is
        attached here too (it saves nothing outside a fit), so Lightning does not warn that
        "callbacks used to create the checkpoint need to be provided"."""
        if self.trainer.checkpoint_callback is not None:
            self.trainer.callbacks.append(last_checkpoint(self.trainer.checkpoint_callback.dirpath))

    def before_test(self) -> None:
        self._check_checkpoint_shapes()
        self._quiet_callback_warning()
        self.datamodule.test_order_seed = self.config[self.subcommand].report.seed  # None: the data module's

    def after_fit(self) -> None:
        log_dir = self.trainer.log_dir  # a collective call under DDP: every rank makes it
        if not self.trainer.is_global_zero:
            return
        metrics = self.trainer.callback_metrics
        figures = [f"{k.split('/', 1)[1]} {float(metrics[k]):.4f}" for k in
                   (names.acc("val"), names.robust_acc("val")) if k in metrics]
        counts = parameter_counts(self.model)
        figures.append(f"{counts.nonzero:,} non-zero parameters ({counts.nonzero_compression:.1f}x)")
        print("final validation: " + ", ".join(figures))
        if log_dir and self.trainer.loggers:
            print(f"TensorBoard logs: {log_dir}  (tensorboard --logdir {Path(log_dir).parent})")
        best = self.trainer.checkpoint_callback
        last = [c.best_model_path for c in self.trainer.checkpoint_callbacks if c.monitor is None]
        if best is not None and not self.trainer.fast_dev_run:
            print(f"checkpoints: last {last[0] if last else '-'}; best {best.best_model_path or '-'}")


def _writable(folder: Path) -> bool:
    """Whether a file can be created in `folder` (a probe file, removed; permission bits alone
    say nothing for root or a read-only mount)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sepnet-probe-"):
            return True
    except OSError:
        return False


LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def _integer_limits(trainer, args: list[str]) -> dict[str, int]:
    """Lightning reads an int `limit_*_batches` as a batch count and a float as a fraction, but
    its signature (float first) makes jsonargparse read `1` as 1.0, which means every batch:
    the limits given as integers, on the command line or in a YAML file (they go to the Trainer
    as integers, `SepnetCLI.instantiate_trainer`)."""
    given: dict[str, object] = {}
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if not value and i + 1 < len(args):
            value = args[i + 1]
        if key in ("--config", "--trainer") and Path(value).is_file():
            section = yaml.safe_load(Path(value).read_text()) or {}
            section = section.get("trainer", section) if key == "--config" else section
            given.update({k: v for k, v in section.items() if k in LIMITS} if isinstance(section, dict) else {})
        elif key.startswith("--trainer.limit_") and key[len("--trainer."):] in LIMITS:
            given[key[len("--trainer."):]] = int(value) if value.strip().isdigit() else value
    return {key: value for key, value in given.items()
            if isinstance(value, int) and not isinstance(value, bool) and trainer.get(key) == value}


def _check_run_length(trainer) -> None:
    """A fit must train: max_epochs 0 trains nothing, and -1 (forever) only with max_steps or
    max_time to end it (it would also become the run `--ckpt_path last` resumes)."""
    epochs, steps, time_limit = trainer.get("max_epochs"), trainer.get("max_steps"), trainer.get("max_time")
    bounded = (steps is not None and steps > 0) or time_limit is not None
    if epochs == 0 or (epochs is not None and epochs < 0 and not bounded):
        raise ValueError(f"--trainer.max_epochs {epochs}: expected a positive number of epochs (-1 only with "
                         "--trainer.max_steps or --trainer.max_time to end the run)")


def _check_yaml(args: list[str]) -> None:
    """A config file that is not valid YAML: one line naming the file, line and column (the
    parser's own message names neither)."""
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        value = value or (args[i + 1] if i + 1 < len(args) else "")
        if key.startswith("--") and value.endswith((".yaml", ".yml")) and Path(value).is_file():
            try:
                yaml.safe_load(Path(value).read_text())
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
                raise ValueError(f"config {value}{where}: {getattr(err, 'problem', None) or err}; expected valid "
                                 "YAML") from None


def _one_line(err: BaseException) -> str:
    """The line that names the problem: the last line of a loader worker's re-raised traceback,
    the first reason of a jsonargparse union error, else the message's first line."""
    text = str(err).strip() or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    old = next((m.group(1) for m in re.finditer(r"model\.(\w+)", text) if m.group(1) in RENAMED), None)
    if old and ("not expected" in text or "unrecognized" in text):
        return (f"model.{old} is now model.{RENAMED[old]} (the model config has sections: network, "
                "constraint, adversarial, optimization, validation; see conf/)")
    moved = next((line for key, line in MOVED.items() if key.split(".")[1] in text), None)
    if moved and ("not expected" in text or "unrecognized" in text):
        return f"{moved} (see CHANGELOG.md)"
    key = re.match(r'Parser key "([\w.]+)":', lines[0]) if lines else None
    if key and len(lines) > 1 and "Expected a" in lines[1]:  # jsonargparse's type error: the key and the reason
        return f"--{key.group(1)}: {lines[1]}"
    if "Original Traceback" in text:
        return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])
    reasons = [line[2:] for line in lines[1:] if line.startswith("- ") and "NoneType" not in line]
    return reasons[0] if reasons else lines[0]


def fail(err: BaseException) -> None:
    """The end of a command that failed: one line on stderr, exit status 2 (SEPNET_DEBUG=1
    re-raises instead, with the traceback)."""
    if os.environ.get("SEPNET_DEBUG"):
        raise err
    print(f"error: {_one_line(err)}", file=sys.stderr)
    sys.exit(2)


def quiet_third_party() -> None:
    """Silence what is not ours to fix: Lightning's advertisement for its cloud logger at every
    run, and its own use of torch's deprecated LeafSpec."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "litlogger" not in record.getMessage())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("art").setLevel(logging.WARNING)


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_third_party()
    default_config = Path(__file__).resolve().parents[2] / "conf" / "default.yaml"
    defaults = [str(default_config)] if default_config.is_file() else []
    subcommands = ("fit", "validate", "test", "predict")
    try:
        _check_yaml(list(sys.argv[1:] if args is None else args))
        SepnetCLI(
            ImageClassifier,
            VisionDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"enable_progress_bar": sys.stderr.isatty()},
            parser_kwargs={"exit_on_error": False,
                           **{sub: {"default_config_files": defaults, "exit_on_error": False}
                              for sub in subcommands}},
            args=args,
        )
    except SIGTERMException:
        print("stopped by SIGTERM: resume with --ckpt_path last (from the end of the last finished epoch: the "
              "interrupted epoch runs again)", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 -- every failure is one line; SEPNET_DEBUG=1 re-raises
        fail(err)
    finally:  # a gloo group left to interpreter exit can abort it ("terminate called without an
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # active exception")
            torch.distributed.destroy_process_group()
