"""Offline datasets and small demo models.

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images), always available.
* ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (idx ``.gz`` files).

Trained demo models are cached as safetensors under the user cache directory
(``$HFGUARD_CACHE`` or ``~/.cache/hfguard``).
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hfguard.errors import DatasetNotAvailableError

__all__ = ["Split", "load_dataset", "load_digits", "load_fashion_mnist", "small_cnn", "small_resnet", "train_classifier", "cached_model", "cache_dir", "DATASETS", "FASHION_DIRS", "CALIBRATION_HOLDOUT"]

logger = logging.getLogger("hfguard")

DATASETS = ("digits", "fashion-mnist")
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
#: training images the demo models never train on (the guard's calibration split), per dataset
CALIBRATION_HOLDOUT = {"digits": 300, "fashion-mnist": 5000}


@dataclass
class Split:
    """Images (N, C, H, W) float32 in [0, 1] and labels (N,) int64, train and test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    name: str
    num_classes: int = 10

    def holdout(self, n: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``((x, y) the model trains on, (x, y) the last n training images it never sees)``: a validation
        split for ``guard.fit(train, calibration_data=validation)``."""
        if not 0 < n < len(self.x_train):
            raise ValueError(f"holdout must be in (0, {len(self.x_train)}), got {n}")
        m = len(self.x_train) - n
        return (self.x_train[:m], self.y_train[:m]), (self.x_train[m:], self.y_train[m:])


def load_digits(seed: int = 0, test_fraction: float = 0.3) -> Split:
    """scikit-learn's 8x8 digits, scaled to [0, 1], shuffled and split with ``seed``."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return Split(x[tr], y[tr], x[te], y[te], "digits")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(root: str | os.PathLike | None = None) -> Split:
    """Fashion-MNIST from the Debian package (or ``root``/``$HFGUARD_FASHION_MNIST``).

    Raises:
        DatasetNotAvailableError: the idx files are not installed; the message says how to install them.
    """
    candidates = [Path(root)] if root else []
    if os.environ.get("HFGUARD_FASHION_MNIST"):
        candidates.append(Path(os.environ["HFGUARD_FASHION_MNIST"]))
    candidates += [Path(p) for p in FASHION_DIRS]
    for d in candidates:
        if (d / "train-images-idx3-ubyte.gz").is_file():
            def get(name: str) -> np.ndarray:
                return _read_idx(d / name)

            xtr = torch.tensor(get("train-images-idx3-ubyte.gz"), dtype=torch.float32)[:, None] / 255.0
            ytr = torch.tensor(get("train-labels-idx1-ubyte.gz").astype(np.int64))
            xte = torch.tensor(get("t10k-images-idx3-ubyte.gz"), dtype=torch.float32)[:, None] / 255.0
            yte = torch.tensor(get("t10k-labels-idx1-ubyte.gz").astype(np.int64))
            return Split(xtr, ytr, xte, yte, "fashion-mnist")
    raise DatasetNotAvailableError(
        f"Fashion-MNIST is not installed (looked in {[str(c) for c in candidates]}). "
        f"Install it with: {FASHION_INSTALL}  (or set HFGUARD_FASHION_MNIST to a folder with the four idx .gz files)"
    )


def load_dataset(name: str) -> Split:
    """``"digits"`` or ``"fashion-mnist"``."""
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist()
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def small_cnn(in_channels: int = 1, num_classes: int = 10, size: int = 28) -> nn.Sequential:
    """Conv32-ReLU-Pool, Conv64-ReLU-Pool, FC200-ReLU, FC (the model of MEASUREMENTS.md); for 8x8 inputs, 16/32 channels."""
    c1, c2, fc = (32, 64, 200) if size >= 16 else (16, 32, 64)
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (size // 4) ** 2, fc), nn.ReLU(), nn.Linear(fc, num_classes),
    )


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class SmallResNet(nn.Module):
    """A 3-stage ResNet (16/32/64 channels, one block per stage) for small grey images."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = _Block(16, 16, 1)
        self.layer2 = _Block(16, 32, 2)
        self.layer3 = _Block(32, 64, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def small_resnet(in_channels: int = 1, num_classes: int = 10) -> SmallResNet:
    """See :class:`SmallResNet`."""
    return SmallResNet(in_channels, num_classes)


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 3, lr: float = 1e-3, batch_size: int = 128, seed: int = 0, progress: bool = False) -> nn.Module:
    """Adam training with cross-entropy; returns the model in eval mode."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc="train demo model (epochs)", disable=not progress, leave=False):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def cache_dir() -> Path:
    """``$HFGUARD_CACHE`` or ``~/.cache/hfguard`` (created)."""
    d = Path(os.environ.get("HFGUARD_CACHE", Path.home() / ".cache" / "hfguard"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def cached_model(dataset: str, arch: str = "cnn", *, progress: bool = False, epochs: int | None = None, holdout: int | None = None) -> nn.Module:
    """A trained demo model for ``dataset``; trained once and cached as safetensors.

    The model trains on all training images but the last ``holdout`` (default
    ``CALIBRATION_HOLDOUT[dataset]``): those stay unseen, for the guard's ``calibration_data``
    (see :meth:`Split.holdout`).
    """
    from safetensors.torch import load_file, save_file

    split = load_dataset(dataset)
    size = split.x_train.shape[-1]
    if arch == "cnn":
        model: nn.Module = small_cnn(1, split.num_classes, size)
    elif arch == "resnet":
        model = small_resnet(1, split.num_classes)
    else:
        raise ValueError(f"arch must be 'cnn' or 'resnet', got {arch!r}")
    n_epochs = epochs if epochs is not None else (30 if dataset == "digits" else 3)
    n_hold = CALIBRATION_HOLDOUT[dataset] if holdout is None else int(holdout)
    (x_train, y_train), _ = split.holdout(n_hold) if n_hold else ((split.x_train, split.y_train), None)
    path = cache_dir() / f"{dataset}-{arch}-e{n_epochs}-h{n_hold}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    logger.info("training the %s %s model (%d epochs, %d images held out), cached at %s", dataset, arch, n_epochs, n_hold, path)
    train_classifier(model, x_train, y_train, epochs=n_epochs, seed=0, progress=progress)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()
