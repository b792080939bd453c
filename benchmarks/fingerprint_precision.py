"""How far a model's fingerprint moves when the same model runs in another precision (``load``'s weights check).

:mod:`hfguard.fingerprint` compares a model's logits on two fixed probe images with those recorded at fit time,
in units of their spread, and refuses the model above ``TOLERANCE``. This measures the distance for float16,
bfloat16 and float64 copies of the same model (which must pass) and for the same architecture with other
weights (which must not): the digits demo CNN (trained) and a random-weight torchvision resnet50 at 64x64; then
the bench's trained Fashion-MNIST CNN and ResNet (their "other weights" is the other architecture, same input and
classes), and a resnet50 made usable by :func:`hfguard.bench.synthetic.usable_random_model` (BatchNorm statistics
and a ridge-fitted head, as the speed benchmarks use it) with 10 and with 1000 classes at 64x64. For those the
root-mean-square difference (same units) and the correlation of the two fingerprints are given too: they tell a
fingerprint that moved as a whole from one whose largest entry did.

Run:  python benchmarks/fingerprint_precision.py
Writes benchmarks/results/fingerprint-precision.json.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torchvision
from gpu_check import images  # benchmarks/gpu_check.py: normalised uniform images, labels cycling over the classes

import hfguard
from hfguard.bench.synthetic import IMAGENET_NORMALIZE, random_model, usable_random_model
from hfguard.data import CALIBRATION_HOLDOUT, cached_model, small_cnn
from hfguard.fingerprint import TOLERANCE, fingerprint_distance, model_fingerprint


def distances(model: torch.nn.Module, other: torch.nn.Module, guard, shape: tuple[int, ...]) -> dict[str, float]:
    ref = model_fingerprint(model, guard, shape, guard.input_range)
    out = {str(dt).replace("torch.", ""): fingerprint_distance(ref, model_fingerprint(copy.deepcopy(model).to(dt), guard, shape, guard.input_range))
           for dt in (torch.float16, torch.bfloat16, torch.float64)}
    out["other weights"] = fingerprint_distance(ref, model_fingerprint(other, guard, shape, guard.input_range))
    return out


def _detailed(model: torch.nn.Module, other: torch.nn.Module, guard, shape: tuple[int, ...]) -> dict[str, dict[str, float]]:
    ref = torch.tensor(model_fingerprint(model, guard, shape, guard.input_range), dtype=torch.float64)

    def row(m: torch.nn.Module) -> dict[str, float]:
        now = torch.tensor(model_fingerprint(m, guard, shape, guard.input_range), dtype=torch.float64)
        spread = float(ref.std())
        return {"distance": fingerprint_distance(ref.tolist(), now.tolist()), "rms": float((ref - now).square().mean().sqrt()) / spread,
                "correlation": float(torch.corrcoef(torch.stack([ref, now]))[0, 1])}

    out = {str(dt).replace("torch.", ""): row(copy.deepcopy(model).to(dt)) for dt in (torch.float16, torch.bfloat16)}
    out["other weights"] = row(other)
    return out


def _usable_resnet50(k: int, size: int, n: int, seed: int) -> torch.nn.Module:
    x, y = images(n, size, k, "cpu", 0)
    torch.manual_seed(seed)
    return usable_random_model(random_model("resnet50", k, size), x, y, k, batch_size=250)


def main() -> None:
    torch.manual_seed(0)
    cnn = cached_model("digits", "cnn")
    other_cnn = small_cnn(1, 10, 8).eval()
    r50 = torchvision.models.resnet50(num_classes=1000).eval()
    other_r50 = torchvision.models.resnet50(num_classes=1000).eval()
    result = {
        "command": "python " + " ".join(sys.argv),
        "tolerance": TOLERANCE,
        "distance in units of the fingerprint's logit spread": {
            "digits CNN (trained)": distances(cnn, other_cnn, hfguard.protect(cnn), (1, 8, 8)),
            "resnet50 (random weights), 64x64": distances(r50, other_r50, hfguard.protect(r50, normalize=IMAGENET_NORMALIZE), (3, 64, 64)),
        },
        "distance, rms and correlation": {},
    }
    fashion = {arch: cached_model("fashion-mnist", arch, holdout=CALIBRATION_HOLDOUT["fashion-mnist"]).eval() for arch in ("cnn", "resnet")}
    for arch, model in fashion.items():
        other = fashion["resnet" if arch == "cnn" else "cnn"]
        result["distance, rms and correlation"][f"Fashion-MNIST {arch} (trained; other weights: the other architecture)"] = _detailed(
            model, other, hfguard.protect(model), (1, 28, 28))
    for k, n in ((10, 200), (1000, 3000)):
        model, other = _usable_resnet50(k, 64, n, 0), _usable_resnet50(k, 64, n, 1)
        guard = hfguard.protect(model, normalize=IMAGENET_NORMALIZE, input_range=(0, 1))
        result["distance, rms and correlation"][f"resnet50 made usable, {k} classes, 64x64"] = _detailed(model, other, guard, (3, 64, 64))
    print(json.dumps(result, indent=2))
    (Path(__file__).resolve().parent / "results" / "fingerprint-precision.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
