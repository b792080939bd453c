"""ONNX export of the default guard on the Fashion-MNIST CNN: parity and onnxruntime vs eager ``check`` latency.

Run:  python benchmarks/onnx_latency.py
Writes benchmarks/results/onnx-latency.{json,md}. The guard is fitted as the README shows (training split,
``calibration_data`` = the 5000 training images the model never trained on).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import hfguard
from hfguard.data import CALIBRATION_HOLDOUT, cached_model, load_dataset
from hfguard.evaluate import jsonable, relative_latency


def main(threads: int = 2, repeats: int = 40) -> None:
    torch.set_num_threads(threads)
    split = load_dataset("fashion-mnist")
    train, validation = split.holdout(CALIBRATION_HOLDOUT["fashion-mnist"])
    model = cached_model("fashion-mnist", "cnn")
    t = time.perf_counter()
    guard = hfguard.protect(model, progress=False).fit(train, calibration_data=validation)
    fit_s = time.perf_counter() - t
    x = split.x_test[:256]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "guard.onnx"
        guard.export_onnx(str(path), x[:8])
        og = hfguard.OnnxGuard(str(path), threads=threads)
        v, o = guard.check(x), og.check(x)
        te, to = [], []
        for i in range(repeats):
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                t = time.perf_counter()
                guard.check(x) if which == 0 else og.check(x)
                (te if which == 0 else to).append(time.perf_counter() - t)
    res = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {threads} torch threads, CPU, torch {torch.__version__}",
        "fit_s": fit_s,
        "fit_report_seconds": guard.fit_report["seconds"],
        "batch": len(x),
        "eager_check_s": statistics.median(te),
        "onnxruntime_check_s": statistics.median(to),
        "ratio_onnx_over_eager": statistics.median([b / a for a, b in zip(te, to)]),
        "max_abs_score_diff": float((o.score - v.score).abs().max()),
        "flags_identical": bool((o.flagged == v.flagged).all()),
        "eager_check_over_bare_forward": relative_latency(lambda: model(x), lambda: guard.check(x), repeats=repeats),
    }
    out = Path("benchmarks/results")
    (out / "onnx-latency.json").write_text(json.dumps(jsonable(res), indent=2))
    md = [
        "# Default guard on the Fashion-MNIST CNN: fit cost, check cost, ONNX",
        "",
        f"Command: `{res['command']}` ({res['machine']}).",
        "",
        f"- `fit` on {len(train[0])} training images + {len(validation[0])} calibration images, self-attacks included: {fit_s:.1f} s "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in res['fit_report_seconds'].items())})",
        f"- `guard.check` over bare `model(x)`, batch {len(x)}: **{res['eager_check_over_bare_forward']['ratio']:.3f}x** "
        f"(median of {repeats} interleaved pairs)",
        f"- onnxruntime ({threads} threads) on the exported guard: {res['onnxruntime_check_s'] * 1e3:.1f} ms vs eager `guard.check` "
        f"{res['eager_check_s'] * 1e3:.1f} ms: **{res['ratio_onnx_over_eager']:.2f}x**; max score difference {res['max_abs_score_diff']:.1e}, "
        f"flags identical: {res['flags_identical']}",
        "",
    ]
    (out / "onnx-latency.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
