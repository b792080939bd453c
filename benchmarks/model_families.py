"""CPU cost of hfguard on torchvision families at ImageNet size (issue 14).

For each family (random weights made usable by :mod:`hfguard.bench.synthetic`: speed and size only,
never detection quality), at 224x224 and batch 16 on this machine's CPU:

* ``check()`` over the bare forward: median of per-pair ratios over interleaved pairs;
* peak resident memory of ``fit`` above the process before it (Linux ``VmHWM``, reset before the fit);
* the saved guard's size; the layers watched.

The guard is fitted with ``calibration="clean", score_features="all"``: ``check`` then computes every
source and feature, as the default self-attack guard does (the two differ only in the combiner's weights,
an (H, F) matrix product), without paying for self-attacks on a CPU at 224x224.

    python benchmarks/model_families.py        # writes benchmarks/results/model-families.json

With ``--compiled`` it measures, for each family, ``check`` over the forward with the eager maths and after
``guard.compile_scoring()`` (the guard's maths after the pass compiled by ``torch.compile``), the two ratios
interleaved with the same forward, plus the compile seconds and the largest score difference:

    python benchmarks/model_families.py --compiled --out benchmarks/results/model-families-compiled.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import torch
from memory import reset_peak, status_mb  # benchmarks/memory.py

import hfguard
from hfguard.bench.synthetic import FAMILIES, IMAGENET_NORMALIZE, random_model, usable_random_model
from hfguard.evaluate import relative_latency


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--out", default="benchmarks/results/model-families.json")
    ap.add_argument("--compiled", action="store_true", help="also time check after guard.compile_scoring()")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    k = 10
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET_NORMALIZE)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4 * k, 3, args.size, args.size, generator=g) - mean) / std
    y = torch.arange(len(x)) % k
    command = f"python benchmarks/model_families.py --size {args.size} --batch {args.batch} --repeats {args.repeats}" + (
        "" if args.families == list(FAMILIES) else " --families " + " ".join(args.families)) + (f" --compiled --out {args.out}" if args.compiled else "")
    out = {
        "command": command,
        "hfguard": hfguard.__version__,
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "note": "random weights (speed and size only); guard fitted with calibration='clean', score_features='all' (every source computed, as the default)",
        "families": {},
    }
    for name in args.families:
        model = usable_random_model(random_model(name, k, args.size), x, y, k, batch_size=8)
        reset_peak()
        before = status_mb("VmRSS")
        t = time.perf_counter()
        guard = hfguard.protect(model, normalize=IMAGENET_NORMALIZE, input_range=(0, 1), progress=False, batch_size=8,
                                calibration="clean", score_features="all").fit((x, y))
        fit_s = time.perf_counter() - t
        peak = status_mb("VmHWM") - before
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "g.safetensors")
            guard.save(path)
            size_mb = os.path.getsize(path) / 2**20
        xb = x[: args.batch]
        lat = relative_latency(lambda: model(xb), lambda: guard.check(xb), repeats=args.repeats, warmup=1)
        out["families"][name] = {
            "check_over_forward": lat["ratio"], "forward_s": lat["base_s"], "check_s": lat["other_s"],
            "fit_peak_rss_above_start_mb": peak, "fit_s_40_images": fit_s, "state_mb": size_mb,
            "layers": guard.layers, "feature_dims": guard.layout["dims"], "probes": guard.fit_report["probes"], "command": command,
        }
        if args.compiled:
            eager = guard.check(xb).score
            t = time.perf_counter()
            guard.compile_scoring()
            compile_s = time.perf_counter() - t
            compiled = relative_latency(lambda: model(xb), lambda: guard.check(xb), repeats=args.repeats, warmup=1)
            out["families"][name].update({
                "compile_s": compile_s,
                "check_over_forward_compiled": compiled["ratio"], "forward_s_compiled_run": compiled["base_s"], "check_s_compiled": compiled["other_s"],
                "compiled_max_score_difference_in_stds": float((guard.check(xb).score - eager).abs().max() / eager.std()),
            })
            guard.compile_scoring(False)
            again = relative_latency(lambda: model(xb), lambda: guard.check(xb), repeats=args.repeats, warmup=1)
            out["families"][name]["check_over_forward_eager_again"] = again["ratio"]
        print(name, json.dumps(out["families"][name]), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if args.families != list(FAMILIES) and os.path.exists(args.out):  # a subset: update those entries of the file
        with open(args.out) as f:
            old = json.load(f)
        for name, entry in old["families"].items():
            entry.setdefault("command", old["command"])
        old["families"].update(out["families"])
        out = {**old, "command": "see each family's command"}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
