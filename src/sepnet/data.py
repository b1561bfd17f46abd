"""DataModules. Each exposes what the model needs: num_classes, image_shape, mean and std.

Images leave the loaders as float tensors in [0, 1]; normalization happens inside the model.
The validation split is a fixed-seed slice of the training set with the evaluation transform.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets
from torchvision import transforms as T

log = logging.getLogger(__name__)

__all__ = [
    "VisionDataModule", "DigitsDataModule", "CIFAR10DataModule", "CIFAR100DataModule",
    "SVHNDataModule", "ImageNetDataModule", "ImageFolderDataModule",
]


@dataclass(frozen=True)
class TestOrder:
    """The test set's order: `indices` (into the dataset as stored), the seed and the rule."""

    indices: list[int]
    seed: int
    rule: str


class VisionDataModule(L.LightningDataModule):
    """Shared loaders and the fixed-seed train/val split.

    Args:
        root: dataset folder.
        batch_size: per-device batch size.
        num_workers: loader worker processes.
        pin_memory: pin host memory (GPU runs).
        val_fraction: fraction of the training set held out for validation.
        seed: seed of the validation split.

    threat_eps is the dataset's standard Linf threat model in pixel units: `run.py` gives it to
    attacks left at the default experiment's values (sepnet.cli), so switching the dataset
    switches the threat model too. The test set is read in a fixed random order (`test_order`:
    seed + 2, or `test_order_seed` where set, e.g. by `run.py test --report.seed`), so its first
    images, which the attacks take, are a random sample that a report can name.
    """

    threat_eps: float = 8 / 255
    num_classes: int = 10
    image_shape: tuple[int, int, int] = (3, 32, 32)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __init__(self, root: str = "data", batch_size: int = 128, num_workers: int = 0,
                 pin_memory: bool = False, val_fraction: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.root = Path(root)
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.val_fraction, self.seed = val_fraction, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.test_order_seed: int | None = None  # None: seed + 2
        self.test_order: TestOrder | None = None

    def val_size(self, n: int) -> int:
        """How many of `n` training images are held out for validation."""
        return max(1, int(round(self.val_fraction * n)))

    # subclasses return (train set with train transform, same set with eval transform, test set)
    def build(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_aug, train_eval, test = self.build()
        n = len(train_aug)
        n_val = self.val_size(n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.train_set = Subset(train_aug, order[n_val:])
        self.val_set = Subset(train_eval, order[:n_val])
        # a fixed shuffle of the test set: metrics over the whole set are unchanged, and the
        # first batches (attacked subsets, honesty checks) are a random sample, not one class
        # (class-folder datasets are stored sorted by class)
        seed = self.seed + 2 if self.test_order_seed is None else self.test_order_seed
        indices = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed)).tolist()
        self.test_order = TestOrder(indices, seed, f"torch.randperm({len(test)}, generator=torch.Generator()"
                                                   f".manual_seed({seed}))")
        self.test_set = Subset(test, indices)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class DigitsDataModule(VisionDataModule):
    """The offline default: scikit-learn's 8x8 digits (1,797 images, shipped with the package);
    20% test and `val_fraction` of the rest for validation, both by fixed seed."""

    threat_eps = 0.1
    num_classes = 10
    image_shape = (1, 8, 8)
    mean = (0.3,)
    std = (0.38,)

    def __init__(self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False,
                 val_fraction: float = 0.1, seed: int = 0) -> None:
        super().__init__("data", batch_size, num_workers, pin_memory, val_fraction, seed)

    def build(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed + 1))
        n_test = len(y) // 5
        test, train = order[:n_test], order[n_test:]
        train_set = TensorDataset(x[train], y[train])
        return train_set, train_set, TensorDataset(x[test], y[test])


# --------------------------------------------------------------------------- torchvision datasets
def _files_only(dataset_cls):
    """A torchvision dataset class that checks that its files exist instead of comparing their
    md5 sums (for re-encoded or hand-made copies; see `verify`). torchvision's check_integrity
    tests existence alone when the md5 is None, so the subclass only clears the sums."""

    def unsummed(entries):
        return [[name, None] for name, _ in entries]

    attrs = {}
    for key in ("train_list", "test_list"):
        if hasattr(dataset_cls, key):
            attrs[key] = unsummed(getattr(dataset_cls, key))
    if hasattr(dataset_cls, "meta"):
        attrs["meta"] = {**dataset_cls.meta, "md5": None}
    if hasattr(dataset_cls, "split_list"):
        attrs["split_list"] = {k: [url, name, None] for k, (url, name, _) in dataset_cls.split_list.items()}
    return type(f"Unverified{dataset_cls.__name__}", (dataset_cls,), attrs)


def _open(make: Callable[[], Dataset], what: str, where: Path, files: str, download: bool) -> Dataset:
    """Build a torchvision dataset; turn 'not found' and offline download failures into one line."""
    try:
        return make()
    except (RuntimeError, OSError) as err:
        how = ("the download failed (offline?)" if download else "download is off (--data.download true)")
        raise FileNotFoundError(
            f"{what} not found under {where}: put {files} there; {how} [{type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}]"
        ) from None


class _TorchvisionModule(VisionDataModule):
    """Args (besides VisionDataModule's): download: fetch on first use when online;
    verify: check torchvision's md5 sums (off for re-encoded or hand-made copies)."""

    def __init__(self, root: str = "data", batch_size: int = 128, num_workers: int = 4,
                 pin_memory: bool = True, val_fraction: float = 0.1, seed: int = 0,
                 download: bool = True, verify: bool = True) -> None:
        super().__init__(root, batch_size, num_workers, pin_memory, val_fraction, seed)
        self.download, self.verify = download, verify

    def train_transform(self):
        return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])

    def eval_transform(self):
        return T.ToTensor()

    def _opened(self, factory: Callable[[], Dataset], where: Path, files: str) -> Dataset:
        """factory() with a missing or unreadable dataset as a one-line error naming its files."""
        return _open(factory, type(self).__name__.replace("DataModule", ""), where, files, self.download)


class CIFAR10DataModule(_TorchvisionModule):
    """CIFAR-10 (torchvision's python pickles in <root>/cifar-10-batches-py); crop + flip."""

    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    dataset_cls = datasets.CIFAR10
    files = "data_batch_1..5, test_batch and batches.meta of cifar-10-batches-py"

    def build(self):
        cls = self.dataset_cls if self.verify else _files_only(self.dataset_cls)
        where = self.root / cls.base_folder

        def make(train: bool, transform):
            return self._opened(lambda: cls(str(self.root), train=train, transform=transform, download=self.download),
                                where, self.files)

        return (make(True, self.train_transform()), make(True, self.eval_transform()),
                make(False, self.eval_transform()))


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (<root>/cifar-100-python); crop + flip."""

    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    dataset_cls = datasets.CIFAR100
    files = "train, test and meta of cifar-100-python"


class SVHNDataModule(_TorchvisionModule):
    """SVHN (<root>/svhn/{train,test,extra}_32x32.mat); crop without flip (digits are not
    mirror-symmetric). Args: extra: add the 531k 'extra' images to training."""

    num_classes = 10
    mean = (0.4377, 0.4438, 0.4728)
    std = (0.1980, 0.2010, 0.1970)

    def __init__(self, root: str = "data", batch_size: int = 128, num_workers: int = 4,
                 pin_memory: bool = True, val_fraction: float = 0.05, seed: int = 0,
                 download: bool = True, verify: bool = True, extra: bool = False) -> None:
        super().__init__(root, batch_size, num_workers, pin_memory, val_fraction, seed, download, verify)
        self.extra = extra

    def train_transform(self):
        return T.Compose([T.RandomCrop(32, padding=4), T.ToTensor()])

    def build(self):
        cls = datasets.SVHN if self.verify else _files_only(datasets.SVHN)
        where = self.root / "svhn"

        def make(split: str, transform):
            return self._opened(lambda: cls(str(where), split=split, transform=transform, download=self.download),
                                where, f"{split}_32x32.mat")

        splits = ["train", "extra"] if self.extra else ["train"]
        train_aug = torch.utils.data.ConcatDataset([make(s, self.train_transform()) for s in splits])
        train_eval = torch.utils.data.ConcatDataset([make(s, self.eval_transform()) for s in splits])
        return train_aug, train_eval, make("test", self.eval_transform())


class ImageFolderDataModule(VisionDataModule):
    """Any class-folder dataset: <root>/train/<class>/*.jpg and <root>/test (or val)/<class>/.

    Args (besides VisionDataModule's): image_size: side after resizing; mean, std: channel
    statistics for the model's normalization layer; crop: random crops (padded by 1/8 of the
    side up to 64 px, RandomResizedCrop above; off: the eval transform's resize and center crop);
    flip: random horizontal flips.
    """

    def __init__(self, root: str = "../shared/data/cifar10-jpeg", batch_size: int = 128,
                 num_workers: int = 4, pin_memory: bool = True, val_fraction: float = 0.1,
                 seed: int = 0, image_size: int = 32, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.25, 0.25, 0.25), crop: bool = True, flip: bool = True) -> None:
        super().__init__(root, batch_size, num_workers, pin_memory, val_fraction, seed)
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.image_size, self.crop, self.flip = image_size, crop, flip
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_shape = (3, image_size, image_size)
        self.num_classes = len(self._classes(self._split_dir("train")))

    def _split_dir(self, split: str) -> Path:
        names = [split] if split == "train" else ["test", "val"]
        for name in names:
            if (self.root / name).is_dir():
                return self.root / name
        raise FileNotFoundError(
            f"no {' or '.join(names)} folder under {self.root}: expected "
            f"{self.root}/{names[0]}/<class>/<image>")

    @staticmethod
    def _classes(folder: Path) -> list[str]:
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise FileNotFoundError(f"no class folders in {folder}: expected {folder}/<class>/<image>")
        return classes

    def train_transform(self):
        s = self.image_size
        if not self.crop:
            ops = self.eval_transform().transforms[:-1]  # resize, center crop; ToTensor below
        elif s <= 64:
            ops = [T.Resize(s), T.CenterCrop(s), T.RandomCrop(s, padding=s // 8)]
        else:
            ops = [T.RandomResizedCrop(s)]
        return T.Compose(ops + ([T.RandomHorizontalFlip()] if self.flip else []) + [T.ToTensor()])

    def eval_transform(self):
        s = self.image_size
        resize = s if s <= 64 else int(round(s * 256 / 224))
        return T.Compose([T.Resize(resize), T.CenterCrop(s), T.ToTensor()])

    def build(self):
        train_dir, test_dir = self._split_dir("train"), self._split_dir("test")
        return (datasets.ImageFolder(str(train_dir), self.train_transform(), loader=read_image),
                datasets.ImageFolder(str(train_dir), self.eval_transform(), loader=read_image),
                datasets.ImageFolder(str(test_dir), self.eval_transform(), loader=read_image))


def read_image(path: str):
    """torchvision's default loader (PIL, RGB), with an unreadable file named in the error."""
    try:
        return datasets.folder.default_loader(path)
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated/corrupt files
        raise ValueError(f"cannot read image {path} ({type(err).__name__}: {err}): expected a valid "
                         "image file") from None


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet: class folders under <root>/imagenet/{train,val}; RandomResizedCrop + flip for
    training, resize 256 + center crop 224 for evaluation. (torchvision's ImageNet class builds
    exactly these folders from the official archives: run it once to unpack them.)"""

    threat_eps = 4 / 255

    def __init__(self, root: str = "data", batch_size: int = 256, num_workers: int = 8,
                 pin_memory: bool = True, val_fraction: float = 0.01, seed: int = 0,
                 image_size: int = 224) -> None:
        super().__init__(str(Path(root) / "imagenet"), batch_size, num_workers, pin_memory,
                         val_fraction, seed, image_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
