"""Same-machine A/B of ``check()`` over the bare forward between two hfguard versions (issue 14).

GPU ``check`` ratios move with the host: on a GPU the guard's extra kernels are cheap but each is launched from
the CPU, so a slower host makes ``check`` launch-bound while the bare forward stays GPU-bound. Ratios measured on
different machines of the same kind can therefore not say whether a version regressed. This script measures one
version in one process; run it for both versions, alternating, in one call on one machine:

    mkdir -p /tmp/v061 && git archive 0f39278 hfguard | tar -x -C /tmp/v061   # hfguard 0.6.1 (the previous GPU check)
    for r in 1 2; do for v in /tmp/v061 .; do PYTHONPATH=$v python benchmarks/gpu_version_ab.py; done; done

Each run: torchvision resnet50 (random weights made usable by :mod:`hfguard.bench.synthetic`: speed only) with
``classes`` classes at 224x224, a guard fitted with ``calibration="clean", score_features="all"`` (every source
computed; no self-attacks, to keep the run short) or, with ``--default-fit``, the default guard (its fit time by step
recorded), then ``check`` against the bare forward at batch 16 and 64
(median of interleaved pairs, each timed with ``torch.cuda.synchronize``), and the aten calls of one ``check``.
Prints one JSON line (the committed runs 2-4 named the bare forward's median ``forward_ms``; it is now
``bare_forward_ms``, as in ``gpu_check.py``, whose timing this script shares). Needs CUDA (``--cpu`` runs it on the CPU anyway, which at these sizes takes long).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from gpu_check import images, sync, timed_ratio  # benchmarks/gpu_check.py (its hfguard imports exist in 0.6.1 too)

import hfguard
from hfguard.bench.synthetic import IMAGENET_NORMALIZE, random_model, usable_random_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--default-fit", action="store_true", help="fit the default (self-attack) guard, and report its fit time by step")
    ap.add_argument("--cpu", action="store_true", help="run without CUDA (to check the script; slow at the default sizes)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.cpu:
        raise SystemExit("gpu_version_ab.py needs a CUDA device (or --cpu)")
    warnings.simplefilter("ignore")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    k = args.classes
    x, y = images(6 * k, args.size, k, dev, 0)
    torch.manual_seed(0)
    model = usable_random_model(random_model("resnet50", k, args.size).to(dev), x, y, k, batch_size=250)
    opts = {} if args.default_fit else {"calibration": "clean", "score_features": "all"}
    sync()
    t = time.perf_counter()
    guard = hfguard.protect(model, normalize=IMAGENET_NORMALIZE, input_range=(0, 1), progress=False, batch_size=250, **opts).fit((x, y))
    sync()
    out = {"hfguard": hfguard.__version__, "hfguard_path": hfguard.__file__, "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
           "torch": torch.__version__, "classes": k, "size": args.size, "guard": "default" if args.default_fit else "calibration='clean', score_features='all'",
           "fit_seconds": time.perf_counter() - t, "fit_seconds_by_step": guard.fit_report["seconds"]}
    for b in (16, 64):
        xb = x[:b].contiguous()
        out[f"batch{b}"] = timed_ratio(lambda: model(xb), lambda: guard.check(xb), args.repeats)
    from torch.profiler import profile

    with torch.no_grad():
        guard.check(x[:64])
        with profile() as prof:
            guard.check(x[:64])
    out["check_aten_calls"] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
