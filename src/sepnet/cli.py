"""The LightningCLI behind run.py: config links, forced callbacks, checkpoint checks."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from sepnet.callbacks import BestAndLastCheckpoint, ConstraintMonitor, EvalReport
from sepnet.data import VisionDataModule
from sepnet.module import ImageClassifier

log = logging.getLogger("sepnet")


class SepnetCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        for key in ("num_classes", "image_shape", "mean", "std"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ConstraintMonitor, "monitor")
        parser.add_lightning_class_args(EvalReport, "report")
        parser.set_defaults({
            "checkpoint.dirpath": "checkpoints/default",
            "checkpoint.filename": "best-{epoch:03d}",
            "checkpoint.monitor": "val/robust_acc/pgd_linf",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.auto_insert_metric_name": False,
        })

    def _read_checkpoint_state(self) -> dict | None:
        """The checkpoint's state dict; a missing or unreadable file is a one-line error."""
        subcommand = self.config.get("subcommand")
        ckpt = (self.config.get(subcommand) or {}).get("ckpt_path") if subcommand else None
        if ckpt in (None, "last", "best", "hpc", "registry"):
            return None
        cached = getattr(self, "_checkpoint_state", None)
        if cached is not None and cached[0] == ckpt:  # read once, checked twice
            return cached[1]
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist: expected a .ckpt file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        except Exception as err:  # truncated file, not a checkpoint, ...
            raise ValueError(f"checkpoint {ckpt} is unreadable ({type(err).__name__}): expected a "
                             "complete Lightning .ckpt file") from None
        self._checkpoint_state = (ckpt, state)
        return state

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here, before any hook: check first
        self._read_checkpoint_state()
        super()._parse_ckpt_path()

    def _check_checkpoint(self) -> None:
        """An incompatible checkpoint is a one-line error before Lightning loads it."""
        state = self._read_checkpoint_state()
        self._checkpoint_state = None  # Lightning loads it next; do not keep a second copy
        if state is None:
            return
        ckpt = self.config[self.config["subcommand"]].get("ckpt_path")
        own = self.model.state_dict()
        for key, value in own.items():
            if key not in state or state[key].shape != value.shape:
                got = "missing" if key not in state else tuple(state[key].shape)
                raise ValueError(f"checkpoint {ckpt} does not fit this config: {key} is {got} in the "
                                 f"checkpoint, expected {tuple(value.shape)}")

    def _resume_logger_version(self) -> None:
        """Resuming continues the same TensorBoard run instead of opening a new version."""
        ckpt = self.config[self.config["subcommand"]].get("ckpt_path")
        logger = self.trainer.logger
        if not ckpt or not isinstance(logger, TensorBoardLogger):
            return
        path = Path(ckpt)
        if ckpt == "last":
            path = Path(self.trainer.checkpoint_callback.dirpath or "") / "last.ckpt"
        if path.is_file():
            version = torch.load(path, map_location="cpu", weights_only=False).get("logger_version")
            if version is not None:
                logger._version = version

    def before_fit(self) -> None:
        self._check_checkpoint()
        self._resume_logger_version()

    def before_validate(self) -> None:
        self._check_checkpoint()

    def before_test(self) -> None:
        self._check_checkpoint()

    def after_fit(self) -> None:
        ckpt = self.trainer.checkpoint_callback
        if self.trainer.log_dir and isinstance(self.trainer.logger, TensorBoardLogger):
            print(f"TensorBoard logs: {self.trainer.log_dir}  "
                  f"(tensorboard --logdir {Path(self.trainer.log_dir).parent})")
        if ckpt is not None and not self.trainer.fast_dev_run:
            print(f"checkpoints: last {ckpt.last_model_path or '-'}; best {ckpt.best_model_path or '-'}")


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("art").setLevel(logging.WARNING)
    default_config = Path(__file__).resolve().parents[2] / "conf" / "default.yaml"
    defaults = [str(default_config)] if default_config.is_file() else []
    try:
        SepnetCLI(
            ImageClassifier,
            VisionDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={sub: {"default_config_files": defaults}
                           for sub in ("fit", "validate", "test", "predict")},
            args=args,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
