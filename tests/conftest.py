"""Tiny datasets written in the real on-disk formats torchvision reads."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

# One intra-op thread: the suite's models are tiny, and OpenMP threads that spin on shared cores
# (another job on the machine) made single tests 25x slower (6 s -> 150 s); subprocess tests
# (the CLI's) keep torch's default.
torch.set_num_threads(1)


def matrix_and_product_paths_agree(layer, x, autocast: bool) -> None:
    """A factorized layer's output and every gradient (input and parameters) are the same by its
    implied weight and by its structured products (`implied_path` "always" / "never"), in fp32 or
    under bf16 autocast (relative error of the whole tensor)."""
    results = []
    for path in ("always", "never"):
        layer.implied_path = path
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(xi)
        y.float().square().sum().backward()
        results.append([y.detach().float(), xi.grad] + [p.grad.clone() for p in layer.parameters()])
        layer.zero_grad()
    layer.implied_path = "auto"
    for a, b in zip(*results):
        assert (a - b).norm() / b.norm() < (5e-2 if autocast else 1e-5)


def fit_briefly(model, loader, epochs: int, lr: float):
    """A few epochs of Adam on cross-entropy: the small trained models the attack tests use."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def _cifar_batch(n, labels_key, num_classes, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    # the real batches are Python 2 pickles whose str keys load as str with encoding="latin1"
    return {"data": data, labels_key: rng.integers(0, num_classes, n).tolist(), "batch_label": "x"}


def write_cifar10(root: Path, per_batch: int = 8) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        with open(folder / name, "wb") as f:
            pickle.dump(_cifar_batch(per_batch, "labels", 10, i), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return root


def write_cifar100(root: Path, n: int = 24) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for i, name in enumerate(["train", "test"]):
        batch = _cifar_batch(n, "fine_labels", 100, i)
        batch["coarse_labels"] = [0] * n
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    return root


def write_svhn(root: Path, n: int = 24) -> Path:
    folder = root / "svhn"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test", "extra"):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # SVHN stores digit 0 as label 10
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
    return root


def write_image_folder(root: Path, classes=("cat", "dog", "ship"), per_class: int = 6, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture
def cifar10_root(tmp_path):
    return write_cifar10(tmp_path)


@pytest.fixture
def image_folder_root(tmp_path):
    return write_image_folder(tmp_path / "folders")
