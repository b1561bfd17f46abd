import pytest
import torch
from PIL import Image

from conftest import write_cifar10, write_cifar100, write_image_folder, write_svhn
from sepnet.attacks import AttackSpec
from sepnet.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    SVHNDataModule,
)


def _first_batch(dm, loader="train_dataloader"):
    dm.setup("fit")
    return next(iter(getattr(dm, loader)()))


def _check(dm, n_classes, shape):
    x, y = _first_batch(dm)
    assert x.dtype == torch.float32 and x.shape[1:] == shape == dm.image_shape
    assert 0 <= x.min() and x.max() <= 1
    assert dm.num_classes == n_classes and 0 <= y.min() and y.max() < n_classes
    assert len(dm.mean) == len(dm.std) == shape[0]
    xt, _ = next(iter(dm.test_dataloader()))
    assert xt.shape[1:] == shape


def test_digits():
    dm = DigitsDataModule(batch_size=16)
    _check(dm, 10, (1, 8, 8))
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797


def test_validation_split_is_fixed_and_disjoint():
    a, b = DigitsDataModule(seed=3), DigitsDataModule(seed=3)
    a.setup(), b.setup()
    assert a.val_set.indices == b.val_set.indices
    assert not set(a.val_set.indices) & set(a.train_set.indices)


def test_cifar10_real_format_md5_handled(tmp_path):
    root = write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(root), batch_size=4, num_workers=0, download=False, verify=False)
    _check(dm, 10, (3, 32, 32))
    assert len(dm.train_set) + len(dm.val_set) == 40
    # with md5 verification on, the hand-made files are rejected with a one-line error
    strict = CIFAR10DataModule(root=str(root), num_workers=0, download=False, verify=True)
    with pytest.raises(FileNotFoundError, match="CIFAR10 not found under .*cifar-10-batches-py") as err:
        strict.setup()
    assert "\n" not in str(err.value)


def test_cifar100_and_svhn(tmp_path):
    dm = CIFAR100DataModule(root=str(write_cifar100(tmp_path / "c100")), batch_size=4,
                            num_workers=0, download=False, verify=False)
    _check(dm, 100, (3, 32, 32))
    svhn_root = write_svhn(tmp_path / "s")
    dm = SVHNDataModule(root=str(svhn_root), batch_size=4, num_workers=0, download=False,
                        verify=False, extra=True)
    _check(dm, 10, (3, 32, 32))
    assert len(dm.train_set) + len(dm.val_set) == 48


def test_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class=4)
    dm = ImageFolderDataModule(root=str(root), batch_size=4, num_workers=0, pin_memory=False)
    _check(dm, 3, (3, 32, 32))
    # the test set is stored sorted by class; its fixed shuffle makes any prefix a mixed sample
    first = [dm.test_set[i][1] for i in range(6)]
    assert len(set(first)) > 1
    assert [dm.test_set[i][1] for i in range(6)] == first
    big = ImageFolderDataModule(root=str(root), batch_size=4, num_workers=0, image_size=48)
    _check(big, 3, (3, 48, 48))
    # augmentation off: the training images are the eval transform's, twice the same; on: they vary
    for crop, flip in ((False, False), (True, True)):
        plain = ImageFolderDataModule(root=str(root), num_workers=0, image_size=40, crop=crop, flip=flip)
        image = Image.open(sorted(root.glob("train/*/*"))[0]).convert("RGB")
        views = [plain.train_transform()(image) for _ in range(8)]
        assert views[0].shape == (3, 40, 40)
        assert all(torch.equal(v, views[0]) for v in views) == (not crop)
        assert torch.equal(views[0], plain.eval_transform()(image)) or crop


def test_imagenet_class_folders(tmp_path):
    write_image_folder(tmp_path / "imagenet", classes=("n01", "n02"), per_class=3, size=40)
    (tmp_path / "imagenet" / "test").rename(tmp_path / "imagenet" / "val")
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=2, num_workers=0, image_size=32,
                            val_fraction=0.2)
    _check(dm, 2, (3, 32, 32))


def test_missing_data_is_a_one_line_error(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0, download=False)
    with pytest.raises(FileNotFoundError, match="put data_batch_1..5.*download is off") as err:
        dm.setup()
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no train folder under"):
        ImageFolderDataModule(root=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        DigitsDataModule(batch_size=0)


def test_shared_cifar10_jpeg_if_present():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
    if not root.is_dir():
        pytest.skip("shared CIFAR-10 JPEG folder not present")
    dm = ImageFolderDataModule(root=str(root), batch_size=8, num_workers=0)
    assert dm.num_classes == 10
    dm.setup()
    assert len(dm.test_set) == 10_000


@pytest.mark.parametrize("kind", ["digits", "cifar10", "cifar100", "svhn", "folder", "imagenet"])
def test_fast_dev_run_on_every_datamodule(kind, tmp_path):
    import lightning as L

    from sepnet.module import ImageClassifier

    common = dict(batch_size=4, num_workers=0, pin_memory=False)
    if kind == "digits":
        dm = DigitsDataModule(batch_size=4)
    elif kind == "cifar10":
        dm = CIFAR10DataModule(root=str(write_cifar10(tmp_path)), download=False, verify=False, **common)
    elif kind == "cifar100":
        dm = CIFAR100DataModule(root=str(write_cifar100(tmp_path)), download=False, verify=False, **common)
    elif kind == "svhn":
        dm = SVHNDataModule(root=str(write_svhn(tmp_path)), download=False, verify=False, **common)
    elif kind == "folder":
        dm = ImageFolderDataModule(root=str(write_image_folder(tmp_path / "f", per_class=3)), **common)
    else:
        write_image_folder(tmp_path / "imagenet", classes=("n01", "n02"), per_class=3, size=40)
        (tmp_path / "imagenet" / "test").rename(tmp_path / "imagenet" / "val")
        dm = ImageNetDataModule(root=str(tmp_path), image_size=32, val_fraction=0.3, **common)
    model = ImageClassifier(num_classes=dm.num_classes, image_shape=dm.image_shape, mean=dm.mean,
                            std=dm.std, network={"backbone": "mlp", "backbone_kwargs": {"hidden_shapes": [[2, 4, 4]]}},
                            adversarial={"loss": "at", "attack": {"name": "fgsm"}},
                            validation={"attacks": [{"steps": 1}], "batches": 1})
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", inference_mode=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    # what the loaders hand the model: float pixels in [0, 1] of the declared shape, valid labels
    x, y = next(iter(dm.test_dataloader()))
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == tuple(dm.image_shape)
    assert 0 <= x.min() and x.max() <= 1 and x.std() > 0
    assert y.dtype == torch.long and 0 <= y.min() and y.max() < dm.num_classes
    model.configure_test_suite([AttackSpec(steps=1)], images=4)
    trainer.test(model, dm)
    metrics = trainer.callback_metrics
    with torch.no_grad():  # the logged clean accuracy is the model's on that first batch
        expected = (model.eval()(x).argmax(1) == y).float().mean()
    assert torch.isclose(metrics["test/acc"], expected)
    assert 0 <= metrics["test/robust_acc/worst"] <= metrics["test/robust_acc/pgd_linf"] <= 1
