"""Bad input, as a new user gives it: every case exits non-zero with at most 2 lines of output,
the last one naming the bad value and what was expected, and leaves the earlier run (its files,
byte for byte) and the run folders as they were."""

import hashlib
import shutil
from pathlib import Path

import pytest

from sepnet.cli import main

pytestmark = pytest.mark.cli

FAST = ["--model.network.backbone_kwargs", '{"hidden_shapes": [[4, 8, 8]]}', "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--model.validation.batches", "1", "--trainer.max_epochs", "1",
        "--trainer.enable_model_summary", "false"]
MLP_COMPRESSION = "--model.network.compression"
CASES = [  # (subcommand, arguments, what the one line says)
    ("fit", ["--model.network.backbone", "alexnet"], "unknown backbone 'alexnet'"),
    ("fit", ["--model.network.head", "tiny"], "unknown head 'tiny'"),
    ("fit", ["--model.constraint.condition_weight", "-1"], "condition_weight must be >= 0"),
    ("fit", ["--model.optimization.optimizer", "rmsprop"],
     "--model.optimization.optimizer: Expected a typing.Literal['sgd', 'adamw']. Got value: rmsprop"),
    ("fit", ["--model.optimization.lr", "-0.1"], "optimization.lr must be >= 0"),
    ("fit", ["--model.optimization.scheduler", "exponential"], "Got value: exponential"),
    ("fit", ["--model.adversarial.loss", "pgd_at"], "adversarial.loss 'pgd_at': expected one of"),
    ("fit", ["--model.adversarial.mix", "2"], "adversarial.mix must be in [0, 1], got 2"),
    ("fit", ["--model.adversarial.attack.name", "bogus"], "unknown attack 'bogus'"),
    ("fit", ["--model.adversarial.attack.norm", "l3"], "unknown attack norm 'l3'"),
    ("fit", ["--model.adversarial.attack.eps", "8"], "attack eps 8 is above 1: eps is in pixel units"),
    ("fit", ["--model.adversarial.attack.steps", "0"], "attack steps must be >= 1, got 0"),
    ("fit", ["--model.adversarial", '{"loss": "lipschitz_margin"}'], "lipschitz_margin needs a network with a Lipschitz bound"),
    ("fit", ["--model.adversarial", '{"loss": "trades", "attack": {"name": "nfgsm"}}'], "cannot serve loss 'trades'"),
    ("fit", ["--model.validation.attacks", '[{"name": "nfgsm"}]'], "nfgsm is a training attack"),
    ("fit", ["--model.validation.batches", "-1"], "validation.batches must be >= 0"),
    ("fit", ["--model.validation.every_n_epochs", "0"], "validation.every_n_epochs must be >= 1"),
    ("fit", ["--model.certificate.radii", "[-0.1]"], "certificate.radii must be > 0"),
    ("fit", [MLP_COMPRESSION, '[{"method": "svd"}]'], "unknown compression method 'svd'"),
    ("fit", [MLP_COMPRESSION, '[{"method": "tt", "budget": 0.5}]'], "expected a compression factor > 1"),
    ("fit", [MLP_COMPRESSION, '[{"method": "tt", "targets": ["nothing.*"], "budget": 4}]'], "match no Linear layer"),
    ("fit", ["--model.network.backbone_kwargs", '{"hidden_shapes": [[4, 8, 8]], "dense": true}',
             "--model.network.head", "dense", MLP_COMPRESSION,
             '[{"method": "magnitude", "budget": 4, "options": {"scope": "all"}}]'], "scope 'all'; expected 'layer' or 'global'"),
    ("fit", [MLP_COMPRESSION, '[{"method": "tt", "budget": 4, "options": {"modes": 3, "depth": 2}}]'],
     "unknown option 'depth'"),
    ("fit", ["--model.network.init_from", "missing.pt"], "network.init_from missing.pt does not exist"),
    ("fit", ["--model.network.init_from", "garbage.pt"], "network.init_from garbage.pt is unreadable"),
    ("fit", ["--model.network.backbone_kwargs", '{"hidden_shapes": [[3, 3]]}'],
     "out_shape (3, 3) must have the same number of modes"),
    ("fit", ["--data.init_args.batch_size", "0"], "batch_size must be >= 1, got 0"),
    ("fit", ["--data.init_args.val_fraction", "1.5"], "val_fraction must be in (0, 1), got 1.5"),
    ("fit", ["--data", "sepnet.data.ImageFolderDataModule", "--data.root", "missing_folder"],
     "no train folder under missing_folder"),
    ("fit", ["--trainer.max_epochs", "0"], "--trainer.max_epochs 0: expected a positive number of epochs"),
    ("fit", ["--trainer.max_epochs", "-1"], "-1 only with --trainer.max_steps or --trainer.max_time"),
    ("fit", ["--checkpoint.dirpath", "/proc/sepnet_checkpoints"], "/proc is not writable"),
    ("fit", ["--trainer.logger.init_args.save_dir", "/proc/sepnet_logs"], "/proc is not writable"),
    ("fit", ["--checkpoint.dirpath", "a_file/checkpoints"], "a_file is a file; expected a folder"),
    ("fit", ["--config", "broken.yaml"], "config broken.yaml line 3 column 1"),
    ("fit", ["--config", "missing.yaml"], "missing.yaml"),
    ("fit", ["--model.adv_eps", "0.1"], "model.adv_eps is now model.adversarial.attack.eps"),
    ("fit", ["--model.validation.certify_radii", "[0.1]"], "model.validation.certify_radii is now model.certificate.radii"),
    ("fit", ["--nonsense", "3"], "unrecognized arguments: --nonsense 3"),
    ("fit", ["--ckpt_path", "nowhere.ckpt"], "checkpoint nowhere.ckpt does not exist"),
    ("test", ["--ckpt_path", "garbage.ckpt"], "checkpoint garbage.ckpt is unreadable"),
    ("test", ["--report.certify_images", "5", "--ckpt_path", "last"], "report.certify_images is now model.certificate.check_images"),
    ("test", ["--report.images", "-1", "--ckpt_path", "last"], "report: images and honesty_images must be >= 0"),
    ("test", ["--report.attacks", '[{"name": "pgd", "eps": 2}]', "--ckpt_path", "last"], "attack eps 2 is above 1"),
    ("test", ["--model.optimization.lr", "0.5", "--ckpt_path", "last"], "contradicts the checkpoint"),
    ("validate", ["--ckpt_path", "last", "--trainer.logger.init_args.name", "nothing_here"], "no last.ckpt under"),
]


def _fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with an earlier run of the default experiment and the files the cases name."""
    root = tmp_path_factory.mktemp("bad_input")
    import os

    here = os.getcwd()
    os.chdir(root)
    try:
        main(["fit", *FAST])
    except SystemExit as err:
        assert err.code in (0, None)
    finally:
        os.chdir(here)
    (root / "a_file").write_text("x")
    (root / "garbage.pt").write_text("not a torch file")
    (root / "garbage.ckpt").write_bytes(b"\x00" * 100)
    (root / "broken.yaml").write_text("trainer:\n  max_epochs: {3, 4\n")
    assert (root / "logs/default/version_0/checkpoints/last.ckpt").is_file()
    return root


def test_the_cases_are_at_least_forty():
    assert len(CASES) >= 40


@pytest.mark.parametrize("subcommand,args,message", CASES, ids=[f"{c[0]} {' '.join(c[1])[:60]}" for c in CASES])
def test_bad_input_is_one_line_nonzero_and_changes_nothing(subcommand, args, message, workspace, monkeypatch, capfd):
    monkeypatch.chdir(workspace)
    capfd.readouterr()
    before = _fingerprint(workspace / "logs")
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *FAST, *args] if subcommand == "fit" else [subcommand, *FAST[:2], *args])
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert exit_info.value.code not in (0, None)
    assert len(lines) <= 2, lines
    assert lines[-1].startswith("error: ") and message in lines[-1], lines
    assert _fingerprint(workspace / "logs") == before  # the earlier run, byte for byte; no new run folder
    assert not any(p.name.endswith(".tmp") for p in workspace.rglob("*"))
    shutil.rmtree(workspace / "lightning_logs", ignore_errors=True)
