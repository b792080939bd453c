import gzip

import numpy as np
import pytest
import torch

import hfguard
from hfguard import data


def test_digits_split_shapes_and_range(digits):
    assert digits.x_train.shape[1:] == (1, 8, 8)
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert digits.x_train.min() >= 0 and digits.x_train.max() <= 1
    assert set(digits.y_train.tolist()) == set(range(10))


def test_fashion_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_DIRS", (str(tmp_path / "none"),))
    monkeypatch.delenv("HFGUARD_FASHION_MNIST", raising=False)
    with pytest.raises(hfguard.DatasetNotAvailableError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion_mnist()


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_reader_on_tiny_idx_files(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    labels = np.arange(5) % 10
    for split, n in (("train", 5), ("t10k", 5)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", imgs[:n])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[:n])
    s = data.load_fashion_mnist(tmp_path)
    assert s.x_train.shape == (5, 1, 28, 28) and s.y_test.dtype == torch.long
    assert torch.allclose(s.x_train[0, 0], torch.tensor(imgs[0] / 255.0, dtype=torch.float32))


def test_cached_model_trains_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HFGUARD_CACHE", str(tmp_path))
    m1 = data.cached_model("digits", epochs=2)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    m2 = data.cached_model("digits", epochs=2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_unknown_dataset():
    with pytest.raises(ValueError):
        data.load_dataset("cifar")
