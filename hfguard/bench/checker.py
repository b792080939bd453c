"""The bench's checker network (``hfguard bench --checker``): the dataset's small CNN, adversarially trained on the fit
images by :func:`hfguard.checker.adversarial_training`, trained once and cached (safetensors) under the user cache."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from hfguard.checker import adversarial_training
from hfguard.data import cache_dir, small_cnn

__all__ = ["cached_checker", "recipe", "checker_path", "load_checker", "save_checker"]


def recipe(steps: int) -> str:
    """The training recipe's name, part of the cache key (change it whenever the training changes). The strings are
    those of ``benchmarks/robust_checker.py``, which measured the recipe, so both share one cached checker."""
    if steps == 1:
        return "fgsm-rs step 1.25 eps, half clean half adversarial CE, Adam 1e-3, batch 128, small_cnn, v1"
    return f"pgd-{steps} step 2.5 eps/k random start, half clean half adversarial CE, Adam 1e-3, batch 128, small_cnn, v1"


def checker_path(dataset: str, name: str, x: Tensor, y: Tensor, *, eps: float, epochs: int, seed: int, kind: str) -> Path:
    """The cache file of a checker trained by recipe ``name``: its name digests the recipe, the seed and the training
    images and labels, so a change to any of them trains afresh (``kind`` only makes the name readable)."""
    h = hashlib.sha256(f"{name}|eps={eps!r}|epochs={epochs}|seed={seed}".encode())
    h.update(x.contiguous().numpy().tobytes())
    h.update(y.contiguous().numpy().tobytes())
    return cache_dir() / f"robust-checker-{dataset}-eps{eps:g}-e{epochs}{kind}-{h.hexdigest()[:16]}.safetensors"


def load_checker(path: Path, net: nn.Module) -> tuple[nn.Module, float]:
    """``(net with the cached weights, in eval mode and frozen; its training seconds)``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    net.load_state_dict(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        seconds = float(f.metadata()["training_seconds"])
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval(), seconds


def save_checker(path: Path, net: nn.Module, seconds: float) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: v.contiguous() for n, v in net.state_dict().items()}, str(path), metadata={"training_seconds": f"{seconds:.1f}"})


def cached_checker(dataset: str, x: Tensor, y: Tensor, *, eps: float, epochs: int, steps: int, seed: int = 0,
                   progress: bool = False) -> tuple[nn.Module, float, bool]:
    """``(checker, training seconds, loaded from the cache)``: ``small_cnn`` for ``x``'s shape, trained by
    :func:`~hfguard.checker.adversarial_training` on ``(x, y)`` (pixels in [0, 1]) and cached (:func:`checker_path`)."""
    c, side, k = x.shape[1], x.shape[-1], int(y.max()) + 1
    path = checker_path(dataset, recipe(steps), x, y, eps=eps, epochs=epochs, seed=seed, kind="" if steps == 1 else f"-pgd{steps}")
    if path.exists():
        return (*load_checker(path, small_cnn(c, k, side)), True)
    with torch.random.fork_rng(devices=[]):  # a trained or a cached checker leaves the global generator alike
        torch.manual_seed(seed)
        net = small_cnn(c, k, side)  # seeded as the measured recipe was
        t = time.perf_counter()
        adversarial_training(net, x, y, eps=eps, epochs=epochs, steps=steps, seed=seed, progress=progress)
        seconds = time.perf_counter() - t
    save_checker(path, net, seconds)
    return net, seconds, False
