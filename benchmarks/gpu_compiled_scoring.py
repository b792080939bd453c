"""Does ``guard.compile_scoring()`` lower the guard's cost on a GPU? (issue 14; CUDA, one prepared run)

On a GPU the guard's own work after the forward (HF spectrum, class distances, evidence, heads) is hundreds of
small kernels launched from the host, so ``check`` roughly doubles a launch-bound forward (``gpu-check.json``).
This script fits the guards that ``benchmarks/gpu_check.py`` fits (random weights made usable: speed only, never
detection quality) and times, interleaved in one process, the bare forward against ``check`` with the eager
maths, with ``compile_scoring()`` (inductor's fused kernels) and with ``compile_scoring(mode="reduce-overhead")``
(the same, replayed as CUDA graphs):

* ``resnet50`` with 1000 classes, the default guard fitted on 6 images per class, float32, batches 16, 64, 256;
* ``mobilenet_v3_large``, ``efficientnet_b0`` and ``convnext_tiny`` with 10 classes (as ``model_families.py``
  fits them), batch 64;
* compile seconds, and how far the compiled scores are from the eager ones (in clean-score standard deviations).

Each section is written to the JSON as soon as it ends, so a run cut short keeps what it measured.

    python benchmarks/gpu_compiled_scoring.py                 # needs CUDA; benchmarks/results/gpu-compiled-scoring.json
    python benchmarks/gpu_compiled_scoring.py --smoke         # tiny sizes on the CPU, to check the script; writes nothing
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch

import hfguard
from hfguard.bench.synthetic import IMAGENET_NORMALIZE, random_model, usable_random_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import cuda_script, family_guard, images, sync, timed_ratio, write_results  # noqa: E402

MODES = {"compiled": {}, "compiled_reduce_overhead": {"mode": "reduce-overhead"}}


def compare(model, guard, batches: dict[int, torch.Tensor], repeats: int, cuda: bool) -> dict:
    """Eager, then each compiled mode: check over the bare forward per batch, compile seconds, score differences."""
    out: dict = {}
    eager = {b: guard.check(xb).score for b, xb in batches.items()}
    for b, xb in batches.items():
        out[f"eager_batch{b}"] = timed_ratio(lambda: model(xb), lambda: guard.check(xb), repeats)
    spread = max(float(s.std()) for s in eager.values())
    for name, options in MODES.items():
        if not cuda and options:
            continue
        t = time.perf_counter()
        guard.compile_scoring(**options)
        sync()
        out[f"{name}_compile_seconds"] = time.perf_counter() - t
        for b, xb in batches.items():
            v = guard.check(xb)
            out[f"{name}_batch{b}_max_score_difference_in_stds"] = float((v.score - eager[b]).abs().max()) / spread
            out[f"{name}_batch{b}_origin_agreement"] = float((v.origin == guard.inspect(xb).origin).float().mean())
            out[f"{name}_batch{b}"] = timed_ratio(lambda: model(xb), lambda: guard.check(xb), repeats)
        guard.compile_scoring(False)
    for b, xb in batches.items():  # eager again, after: how much the machine itself moved during the section
        out[f"eager_again_batch{b}"] = timed_ratio(lambda: model(xb), lambda: guard.check(xb), repeats)
    return out


def main() -> None:
    args, cuda, dev, out = cuda_script("gpu_compiled_scoring.py", "benchmarks/results/gpu-compiled-scoring.json")

    def write() -> None:
        write_results(out, args.out, cuda)

    if args.smoke:
        args.repeats = 2
    size = 32 if args.smoke else 224
    try:
        k = 20 if args.smoke else 1000
        x, y = images(6 * k, size, k, dev, 0)
        model = usable_random_model(random_model("resnet50", k, size).to(dev), x, y, k, batch_size=250)
        t = time.perf_counter()
        guard = hfguard.protect(model, normalize=IMAGENET_NORMALIZE, input_range=(0, 1), progress=False, batch_size=250).fit((x, y))
        sync()
        x = y = None
        batches = {b: images(b, size, k, dev, 10 + b)[0] for b in ((4, 8) if args.smoke else (16, 64, 256))}
        out["resnet50_1000_classes"] = {"fit_seconds": time.perf_counter() - t, **compare(model, guard, batches, args.repeats, cuda)}
    except Exception:
        out["sections_failed"]["resnet50_1000_classes"] = traceback.format_exc()
    model = guard = None
    if cuda:
        torch.cuda.empty_cache()
    write()
    k = 10
    xf, yf = images(40 if args.smoke else 64, size, k, dev, 4)
    for name in ("mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"):
        try:
            m, gf = family_guard(name, xf, yf, k, size, dev)
            out[name] = {"layers": gf.layers, **compare(m, gf, {len(xf): xf}, max(2, args.repeats // 2), cuda)}
        except Exception:
            out["sections_failed"][name] = traceback.format_exc()
        m = gf = None
        write()


if __name__ == "__main__":
    main()
