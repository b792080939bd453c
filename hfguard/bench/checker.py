"""The bench's checker network (``hfguard bench --checker``): a copy of the wrapped model (or the dataset's small CNN),
adversarially trained on the fit images by :func:`hfguard.checker.adversarial_training`, against the model's softmax
(robust distillation) or the true labels, trained once and cached (safetensors) under the user cache."""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from hfguard.checker import adversarial_training
from hfguard.data import cache_dir, small_cnn
from hfguard.errors import ModelError

__all__ = ["cached_checker", "model_softmax", "recipe", "recipe_kind", "weights_tag", "checker_path", "load_checker", "save_checker"]

#: the batch of :func:`model_softmax` (part of the soft targets' bytes, hence of the cache key: keep it fixed)
SOFTMAX_BATCH = 512


def model_softmax(model: nn.Module, x: Tensor) -> Tensor:
    """The model's softmax on ``x`` in eval mode (its mode restored), in batches of :data:`SOFTMAX_BATCH`: the soft
    targets of robust distillation. The bench and ``benchmarks/robust_checker.py`` both use it, so their targets
    agree bit for bit and they share a cached checker."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(x[i : i + SOFTMAX_BATCH]).softmax(1) for i in range(0, len(x), SOFTMAX_BATCH)])
    finally:
        model.train(was)


def weights_tag(net: nn.Module) -> str:
    """16 hex digits of SHA-256 over ``net``'s state (values in order): the starting weights of a fine-tuned checker."""
    raw = b"".join(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for v in net.state_dict().values())
    return hashlib.sha256(raw).hexdigest()[:16]


def recipe(steps: int, schedule: str = "constant", init: nn.Module | None = None) -> str:
    """The training recipe's name, part of the cache key (change it whenever the training changes). The strings are
    those of ``benchmarks/robust_checker.py``, which measured the recipes, so both share one cached checker. ``init``:
    the network whose copy is fine-tuned (its type and :func:`weights_tag` enter the name); None: a fresh small CNN."""
    if steps == 1:
        name = "fgsm-rs step 1.25 eps, half clean half adversarial CE, Adam 1e-3, batch 128, small_cnn, v1"
    else:
        name = f"pgd-{steps} step 2.5 eps/k random start, half clean half adversarial CE, Adam 1e-3, batch 128, small_cnn, v1"
    if schedule != "constant":
        name += f", {schedule} lr"
    if init is not None:
        name += f", initialised from {type(init).__name__} {weights_tag(init)}"
    return name


def recipe_kind(steps: int, schedule: str = "constant", init: nn.Module | None = None) -> str:
    """The readable part of the cache file's name for :func:`recipe`'s arguments (e.g. ``-pgd5-cosine-init``)."""
    return ("" if steps == 1 else f"-pgd{steps}") + ("" if schedule == "constant" else f"-{schedule}") + ("" if init is None else "-init")


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


def cached_checker(dataset: str, x: Tensor, y: Tensor, *, eps: float, epochs: int, steps: int, seed: int = 0, schedule: str = "constant",
                   init: nn.Module | None = None, progress: bool = False) -> tuple[nn.Module, float, bool]:
    """``(checker, training seconds, loaded from the cache)``: a copy of ``init`` (fine-tuned from its weights) or, when
    ``init`` is None, ``small_cnn`` for ``x``'s shape, trained by :func:`~hfguard.checker.adversarial_training` on
    ``(x, y)`` (pixels in [0, 1]; ``y`` labels, or (N, K) probabilities such as the model's softmax) with ``schedule``,
    and cached (:func:`checker_path`). ``init`` itself is never changed."""
    k = y.shape[1] if y.dim() == 2 else int(y.max()) + 1
    if init is not None:
        out = model_softmax(init, x[:1])
        if out.dim() != 2 or out.shape[1] != k:
            raise ModelError(f"the checker's starting network must return (N, {k}) logits for the {k} classes of the targets, got {tuple(out.shape)}")

    def fresh() -> nn.Module:
        return small_cnn(x.shape[1], k, x.shape[-1]) if init is None else copy.deepcopy(init).requires_grad_(True)

    path = checker_path(dataset, recipe(steps, schedule, init), x, y, eps=eps, epochs=epochs, seed=seed, kind=recipe_kind(steps, schedule, init))
    if path.exists():
        return (*load_checker(path, fresh()), True)
    with torch.random.fork_rng(devices=[]):  # a trained or a cached checker leaves the global generator alike
        torch.manual_seed(seed)
        net = fresh()  # seeded as the measured recipe was
        t = time.perf_counter()
        adversarial_training(net, x, y, eps=eps, epochs=epochs, steps=steps, seed=seed, schedule=schedule, progress=progress)
        seconds = time.perf_counter() - t
    save_checker(path, net, seconds)
    return net, seconds, False
