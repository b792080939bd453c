"""Where the time of ``check()`` goes on an ImageNet-size model (issue 14: mobilenet_v3_small is the worst case).

For one torchvision family (random weights made usable by :mod:`hfguard.bench.synthetic`: speed only), at 224x224
and batch 16 on this machine's CPU, interleaved medians in one process (each part timed in a shuffled order every
round) of:

* the bare forward;
* the forward with the guard's hooks pooling every watched layer;
* the HF spectrum of the batch (``_spectral``);
* the evidence maths (class distances of every source, evidence, standardisation, heads), and within it the
  nearest-neighbour banks (:mod:`hfguard.neighbours`; with the synthetic families' 40 fit images they hold only a few
  rows per class, with ``--fashion`` the default 500);
* the input check (shape, dtype, range and finiteness, one read-back);
* ``check()`` itself, and ``check()`` of a guard whose score leaves the spectrum out (``score_features`` without
  ``spectrum:*``, so the spectrum is never computed): what the paper's HF source costs on this model.

With ``--fashion cnn`` (or ``resnet``) the same parts for the bench's trained Fashion-MNIST model, its guard fitted
as the bench fits it (default settings, ``calibration_data`` = the 5000 held-out training images; the fit data is
the first 20000 training images, which changes no cost) and test images at the bench's latency batch of 256.

Run:  python benchmarks/check_parts.py [--family mobilenet_v3_small] [--rounds 30]
      python benchmarks/check_parts.py --fashion cnn --batch 256
Writes benchmarks/results/check-parts.json (check-parts-fashion-<arch>.json with --fashion).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import hfguard
from hfguard.bench.synthetic import IMAGENET_NORMALIZE, random_model, usable_random_model
from hfguard.data import CALIBRATION_HOLDOUT, cached_model, load_dataset
from hfguard.taps import capture


def _synthetic(family: str, size: int, batch: int) -> tuple:
    """A random-weight torchvision ``family`` made usable, its guard (every feature) and one without the spectrum."""
    k = 10
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET_NORMALIZE)
    x = (torch.rand(4 * k, 3, size, size, generator=torch.Generator().manual_seed(0)) - mean) / std
    y = torch.arange(len(x)) % k
    model = usable_random_model(random_model(family, k, size), x, y, k, batch_size=8).eval()
    opts = dict(normalize=IMAGENET_NORMALIZE, input_range=(0, 1), progress=False, batch_size=8, calibration="clean")
    guard = hfguard.protect(model, score_features="all", **opts).fit((x, y))
    no_hf = [f for f in guard.fit_report["feature_names"] if not f.startswith("spectrum:")]
    guard_no_hf = hfguard.protect(model, score_features=no_hf, **opts).fit((x, y))
    return model, guard, guard_no_hf, x[:batch].clone()


def _fashion(arch: str, batch: int) -> tuple:
    """The bench's Fashion-MNIST ``arch``, its default guard and one without the spectrum, and ``batch`` test images."""
    split = load_dataset("fashion-mnist")
    (x, y), calibration = split.holdout(CALIBRATION_HOLDOUT["fashion-mnist"])
    model = cached_model("fashion-mnist", arch, holdout=CALIBRATION_HOLDOUT["fashion-mnist"]).eval()
    data = (x[:20000], y[:20000])
    guard = hfguard.protect(model, progress=False).fit(data, calibration_data=calibration)
    no_hf = [f for f in guard.layout["score_features"] if not f.startswith("spectrum:")]
    guard_no_hf = hfguard.protect(model, progress=False, score_features=no_hf).fit(data, calibration_data=calibration)
    return model, guard, guard_no_hf, split.x_test[:batch].clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="mobilenet_v3_small")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--fashion", choices=("cnn", "resnet"), default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    random.seed(0)
    torch.manual_seed(0)
    if args.fashion:
        model, guard, guard_no_hf, xb = _fashion(args.fashion, args.batch)
    else:
        model, guard, guard_no_hf, xb = _synthetic(args.family, args.size, args.batch)
    modules = guard._watched_modules()
    with torch.no_grad():
        logits, feats = guard._features(xb)

    def hooked() -> None:
        with capture(modules, guard.poolings):
            model(xb)

    def maths() -> torch.Tensor:
        return guard._score_evidence(guard._evidence(logits, guard._source_distances(feats)), logits.argmax(1))

    def banks() -> list[torch.Tensor]:
        return [b(feats[i]) for b, i in zip(guard.banks, guard.neighboured)]

    parts = {
        "bare forward": lambda: model(xb),
        "forward with the hooks pooling every watched layer": hooked,
        "HF spectrum": lambda: guard._spectral(xb),
        "evidence maths (distances, evidence, heads)": maths,
        "nearest-neighbour banks (part of the evidence maths)": banks,
        "input check": lambda: guard._check_input(xb),
        "check()": lambda: guard.check(xb),
        "check() without the spectrum source": lambda: guard_no_hf.check(xb),
    }
    times: dict[str, list[float]] = {p: [] for p in parts}
    order = list(parts)
    with torch.no_grad():
        for f in parts.values():
            f()
            f()
        for _ in range(args.rounds):
            random.shuffle(order)
            for p in order:
                t = time.perf_counter()
                parts[p]()
                times[p].append(time.perf_counter() - t)
    ms = {p: round(statistics.median(v) * 1e3, 2) for p, v in times.items()}
    bare = ms["bare forward"]
    out = {
        "command": "python " + " ".join(sys.argv),
        "hfguard": hfguard.__version__,
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "family": f"fashion-mnist {args.fashion} (trained)" if args.fashion else args.family, "input": list(xb.shape), "layers": guard.layers,
        "score_features": guard.layout["score_features"],
        "bank rows per banked source (filled)": [int(torch.isfinite(b.bank_sq).sum()) for b in guard.banks],
        "milliseconds (median)": ms,
        "over bare forward": {p: round(v / bare, 3) for p, v in ms.items() if p.startswith("check")},
        "hooks and pooling (forward with hooks - bare)": round(ms["forward with the hooks pooling every watched layer"] - bare, 2),
    }
    print(json.dumps(out, indent=2))
    name = f"check-parts-fashion-{args.fashion}.json" if args.fashion else "check-parts.json"
    (Path(__file__).resolve().parent / "results" / name).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
