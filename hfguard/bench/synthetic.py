"""Random-weight torchvision models made usable for shape, speed and plumbing checks (never for detection quality).

A freshly initialised network maps every image to almost the same features (its BatchNorm layers still
hold their initial statistics) and predicts one class for everything, so a guard cannot be fitted on it.
:func:`usable_random_model` fixes both without training: BatchNorm statistics are set from the given
images, and the last ``nn.Linear`` is solved by least squares so that the model classifies those images
as their labels (ridge regression).  Such a model has the architecture, sizes and speed of the real one; what it detects
says nothing about real data.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hfguard.bench.taps import last_linear

__all__ = ["FAMILIES", "random_model", "usable_random_model", "IMAGENET_NORMALIZE"]

#: torchvision families hfguard is tested on, with the smallest input each builds at in the test suite
FAMILIES: dict[str, dict[str, Any]] = {
    "resnet50": {"min_size": 32},
    "mobilenet_v3_small": {"min_size": 32},
    "mobilenet_v3_large": {"min_size": 32},
    "efficientnet_b0": {"min_size": 32},
    "convnext_tiny": {"min_size": 32},
    "vit_b_16": {"min_size": 32, "sized": True},  # the position embedding is built for one image size
    "swin_t": {"min_size": 64},
}
IMAGENET_NORMALIZE = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def random_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    """A random-weight torchvision ``name`` for ``image_size`` x ``image_size`` inputs, in eval mode."""
    import torchvision

    kwargs = {"image_size": image_size} if FAMILIES.get(name, {}).get("sized") else {}
    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs).eval()


def usable_random_model(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, *, batch_size: int = 64, ridge_fraction: float = 0.01, seed: int = 0) -> nn.Module:
    """Sets ``model``'s BatchNorm statistics from ``x`` and its last Linear so that it classifies ``x`` as ``y``
    (ridge regression on one-hot targets jittered by unit Gaussian noise drawn from ``seed``, with
    ``ridge_fraction`` of the mean feature energy as penalty).

    Returns the model (changed in place), in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    model.eval()
    for m in norms:
        m.momentum = 0.1
    linear = model.get_submodule(last_linear(model))
    feats = []
    handle = linear.register_forward_pre_hook(lambda _m, inp: feats.append(inp[0].detach().flatten(1)))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i : i + batch_size])
    finally:
        handle.remove()
    z = torch.cat(feats).double().cpu()
    z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
    # jittered targets and ridge, not an exact fit: interpolated logits would be identical within a class
    # (a degenerate covariance that turns float rounding into large score differences)
    noise = torch.randn(len(y), num_classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    target = F.one_hot(y.cpu(), num_classes).double() * 10.0 - 5.0 + noise
    gram = z.T @ z
    ridge = ridge_fraction * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    solution = torch.linalg.solve(gram + ridge, z.T @ target)
    with torch.no_grad():
        linear.weight.copy_(solution[:-1].T.to(linear.weight))
        linear.bias.copy_(solution[-1].to(linear.bias))
    return model
