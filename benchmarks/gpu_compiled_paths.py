"""Does ``compile_scoring`` keep its promises on a GPU? (issue 14; CUDA, one prepared run; the CPU half is tested
in ``tests/test_compiled.py``)

On a random-weight ``mobilenet_v3_large`` made usable (10 classes, 224x224; speed and plumbing only), a guard
fitted as ``model_families.py`` fits them is compiled with ``mode="reduce-overhead"`` (CUDA graphs) and with the
default mode, and each time:

* batches of 64, 7, 64 again and 1 (new shapes record new graphs) against the eager scores and origins;
* a verdict kept across later calls still holds its own scores (CUDA graphs reuse their output memory);
* 4 threads checking at once against the serial results;
* a float16 copy of the model, and the float32 model under ``torch.autocast(float16)``, against the same eager
  path in that precision;
* ``score`` under autograd (eager maths) and the ONNX export while compiled.

    python benchmarks/gpu_compiled_paths.py           # needs CUDA; writes benchmarks/results/gpu-compiled-paths.json
    python benchmarks/gpu_compiled_paths.py --smoke   # CPU, tiny, default mode only; writes nothing
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import cuda_script, family_guard, images, write_results  # noqa: E402


def diff(a, b, spread: float) -> float:
    return float((a.float() - b.float()).abs().max()) / spread


def paths(guard, xs: dict[str, torch.Tensor], options: dict, spread: float) -> dict:
    out: dict = {}
    eager = {k: guard.check(x) for k, x in xs.items()}
    guard.compile_scoring(**options)
    kept = None
    for k, x in xs.items():
        v = guard.check(x)
        out[f"batch_{k}_max_score_difference_in_stds"] = diff(v.score, eager[k].score, spread)
        out[f"batch_{k}_max_abs_score_difference"] = float((v.score - eager[k].score).abs().max())
        out[f"batch_{k}_origins_equal"] = bool(torch.equal(v.origin, eager[k].origin))
        out[f"batch_{k}_flags_equal"] = bool(torch.equal(v.flagged, eager[k].flagged))
        if kept is None:
            kept, kept_key = v, k
    out["first_verdict_still_its_own_after_later_calls_in_stds"] = diff(kept.score, eager[kept_key].score, spread)
    x = xs["64"]
    slices = [x[i * 16 : (i + 1) * 16] for i in range(4)]
    c, guard._compiled = guard._compiled, None
    want = [guard.check(s) for s in slices]  # serial, eager, on the same batches of 16 as the threads
    guard._compiled = c
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                got[i] = guard.check(slices[i])
        except Exception:  # noqa: BLE001 (recorded)
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["threads_errors"] = errors
    if not errors:
        out["threads_vs_serial_eager_same_batches_max_score_difference_in_stds"] = max(diff(got[i].score, want[i].score, spread) for i in range(4))
        out["threads_vs_serial_eager_same_batches_max_abs_score_difference"] = max(float((got[i].score - want[i].score).abs().max()) for i in range(4))
        out["threads_flags_equal"] = all(bool(torch.equal(got[i].flagged, want[i].flagged)) for i in range(4))
    with torch.autocast("cuda" if x.is_cuda else "cpu", dtype=torch.float16 if x.is_cuda else torch.bfloat16):
        compiled_ac = guard.check(x).score
        c, guard._compiled = guard._compiled, None
        eager_ac = guard.check(x).score
        guard._compiled = c
    out["autocast_compiled_vs_eager_autocast_in_stds"] = diff(compiled_ac, eager_ac, spread)
    out["autocast_compiled_vs_eager_autocast_max_abs"] = float((compiled_ac.float() - eager_ac.float()).abs().max())
    xg = x[:8].clone().requires_grad_(True)
    guard.score(xg).sum().backward()
    out["score_gradient_finite_nonzero"] = bool(torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            guard.export_onnx(os.path.join(tmp, "g.onnx"), x[:2])
            out["onnx_export"] = "ok"
        except Exception:  # noqa: BLE001 (recorded)
            out["onnx_export"] = traceback.format_exc()[-1500:]
    guard.compile_scoring(False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="*", default=["reduce_overhead", "default"], help="compile modes to run (GPU)")
    ap.add_argument("--no-half", action="store_true", help="skip the float16 model")
    args, cuda, dev, out = cuda_script("gpu_compiled_paths.py", "benchmarks/results/gpu-compiled-paths.json", ap)
    size, k = (32, 10) if args.smoke else (224, 10)
    x, y = images(64, size, k, dev, 4)
    model, guard = family_guard("mobilenet_v3_large", x, y, k, size, dev)
    xt, _ = images(64, size, k, dev, 5)
    xs = {"64": xt, "7": xt[:7], "64_again": xt.flip(0), "1": xt[:1]}
    spread = float(guard.check(xt).score.std())
    out["clean_score_std"] = spread
    out["threshold"] = guard.threshold
    modes = {"reduce_overhead": {"mode": "reduce-overhead"}, "default": {}} if cuda else {"default": {}}
    modes = {m: o for m, o in modes.items() if m in args.modes or not cuda}
    out["command"] += "".join([" --modes " + " ".join(args.modes)] if args.modes != ["reduce_overhead", "default"] else []) + (" --no-half" if args.no_half else "")
    for name, options in modes.items():
        try:
            out[name] = paths(guard, xs, options, spread)
        except Exception:  # noqa: BLE001 (recorded)
            out["sections_failed"][name] = traceback.format_exc()
        write_results(out, args.out, cuda)  # each section as it ends
    try:  # a float16 copy of the model, its own guard fitted on it
        if args.no_half:
            raise StopIteration
        half = copy.deepcopy(model).to(torch.float16 if cuda else torch.bfloat16)
        _, gh = family_guard("mobilenet_v3_large", x.to(next(half.parameters()).dtype), y, k, size, dev, model=half)
        xh = xt.to(next(half.parameters()).dtype)
        spread_h = float(gh.check(xh).score.std())
        out["half_model"] = paths(gh, {"64": xh, "7": xh[:7], "64_again": xh.flip(0), "1": xh[:1]}, {"mode": "reduce-overhead"} if cuda else {}, spread_h)
    except StopIteration:
        pass
    except Exception:  # noqa: BLE001 (recorded)
        out["sections_failed"]["half_model"] = traceback.format_exc()
    write_results(out, args.out, cuda)

if __name__ == "__main__":
    main()
