"""The guard's maths one source at a time (the CPU default) against grouped (the default off a CPU), on this CPU.

For the Fashion-MNIST CNN's default guard (fitted on 10000 training images, batch 256) and a random-weight
torchvision resnet50 guard (10 classes, 64x64, batch 64; speed only): interleaved medians of the maths from the
pooled features to the score (class distances of every source, evidence, heads), each way, and the number of
aten operations each way (what a GPU pays a launch for). On a GPU the same comparison is in
``benchmarks/gpu_check.py`` (``*_per_source_maths``).

Run:  python benchmarks/grouped_maths.py
Writes benchmarks/results/grouped-maths-cpu.json.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import hfguard
from hfguard.bench.synthetic import IMAGENET_NORMALIZE, random_model, usable_random_model
from hfguard.data import cached_model, load_dataset


def maths_of(guard, x):
    with torch.no_grad():
        logits, feats = guard._features(x, guard._features_needed())

    def run() -> torch.Tensor:
        dists = guard._source_distances(feats)
        return guard._score_evidence(guard._evidence(logits, dists), logits.argmax(1))

    return run


def aten_ops(f) -> int:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        f()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def compare(guard, x, rounds: int = 60) -> dict:
    runs = {}
    for way, flag in (("per source", False), ("grouped", True)):
        guard._grouped = flag
        runs[way] = maths_of(guard, x)
    ops = {}
    for way, flag in (("per source", False), ("grouped", True)):
        guard._grouped = flag
        ops[way] = aten_ops(runs[way])
    times: dict[str, list[float]] = {w: [] for w in runs}
    order = list(runs)
    with torch.no_grad():
        for _ in range(3):
            for w in order:
                guard._grouped = w == "grouped"
                runs[w]()
        for _ in range(rounds):
            random.shuffle(order)
            for w in order:
                guard._grouped = w == "grouped"
                t = time.perf_counter()
                runs[w]()
                times[w].append(time.perf_counter() - t)
    guard._grouped = None
    ms = {w: round(1e3 * statistics.median(v), 3) for w, v in times.items()}
    return {"batch": len(x), "milliseconds (median)": ms, "grouped / per source": round(ms["grouped"] / ms["per source"], 3), "top-level aten ops": ops}


def main() -> None:
    warnings.simplefilter("ignore")
    random.seed(0)
    out = {"command": "python " + " ".join(sys.argv), "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads", "hfguard": hfguard.__version__}
    split = load_dataset("fashion-mnist")
    cnn = cached_model("fashion-mnist", "cnn", progress=False, holdout=5000).eval()
    guard = hfguard.protect(cnn, progress=False).fit((split.x_train[:10000], split.y_train[:10000]))
    out["fashion-mnist cnn"] = compare(guard, split.x_test[:256])
    k, size = 10, 64
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET_NORMALIZE)
    x = (torch.rand(200, 3, size, size, generator=torch.Generator().manual_seed(0)) - mean) / std
    y = torch.arange(len(x)) % k
    model = usable_random_model(random_model("resnet50", k, size), x, y, k, batch_size=64).eval()
    guard = hfguard.protect(model, normalize=IMAGENET_NORMALIZE, input_range=(0, 1), progress=False, batch_size=64).fit((x, y))
    out["resnet50 (random weights, 64x64)"] = compare(guard, x[:64])
    print(json.dumps(out, indent=2))
    (Path(__file__).resolve().parent / "results" / "grouped-maths-cpu.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
