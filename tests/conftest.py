"""Shared tiny, seeded fixtures: a digits CNN trained in about a second, and a guard fitted on it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hfguard
from hfguard.data import load_digits, small_cnn, train_classifier


@pytest.fixture(scope="session")
def digits():
    return load_digits()


@pytest.fixture(scope="session")
def digits_model(digits):
    torch.manual_seed(0)
    return train_classifier(small_cnn(1, 10, 8), digits.x_train, digits.y_train, epochs=15, seed=0)


@pytest.fixture(scope="session")
def fitted(digits_model, digits):
    return hfguard.protect(digits_model, progress=False).fit((digits.x_train, digits.y_train))


class CustomNet(nn.Module):
    """A custom module with functional ReLUs and an in-place ReLU after a watched conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class Normalized(nn.Module):
    """``inner`` behind an input normalisation: takes ``(pixels - mean) / std`` and feeds ``inner`` the pixels."""

    def __init__(self, inner: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.inner, self.mean, self.std = inner, mean, std

    def forward(self, z):
        return self.inner(z * self.std + self.mean)


@pytest.fixture()
def custom_net():
    torch.manual_seed(0)
    return CustomNet().eval()


def model_state(model: nn.Module):
    """Everything about a model that hfguard promises not to change."""
    return {
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def assert_same_state(before, after):
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["requires_grad"] == after["requires_grad"]
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)


def assert_equivalent_guards(a, b, x, rtol=1e-4, atol=1e-5):
    """Same learned state up to float summation order. A whitening matrix is unique only up to a
    rotation (eigenvectors of repeated eigenvalues), so it is compared through the precision
    ``W @ W.T``, and the whitened class means through the scores they produce."""
    sa, sb = a.guard_state(), b.guard_state()
    assert sa.keys() == sb.keys()
    for k in sa:
        v, w = sa[k].double(), sb[k].double()
        if k.endswith("white_means"):
            continue
        if k.endswith("whitener"):
            v, w = v @ v.T, w @ w.T
        scale = float(v.abs().max()) if v.numel() else 1.0
        assert torch.allclose(v, w, rtol=rtol, atol=atol * max(scale, 1.0)), k  # float32 storage: relative to magnitude
    assert abs(a.threshold - b.threshold) < 1e-4
    assert torch.allclose(a.score(x), b.score(x), atol=1e-4)
