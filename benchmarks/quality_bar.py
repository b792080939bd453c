"""The core issue's quality bar on Fashion-MNIST (small CNN), with every number measured in one run.

Run:  python benchmarks/quality_bar.py --dataset fashion-mnist
Writes benchmarks/results/<dataset>-core.json, .md and -roc.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import hfguard
from hfguard.cli import _jsonable
from hfguard.data import cached_model, load_dataset
from hfguard.evaluate import adaptive_attacks, auroc, evaluate_guard, fit_cost, format_table, generate, latency, naive_mahalanobis, roc_plot, standard_attacks


def onnx_latency(guard, x, path: Path, threads: int, repeats: int = 40) -> dict:
    """onnxruntime (exported guard) vs torch eager ``guard.check``, interleaved in the same run."""
    import statistics

    guard.export_onnx(str(path), x[:8])
    og = hfguard.OnnxGuard(str(path), threads=threads)
    v, o = guard.check(x), og.check(x)
    te, to = [], []
    for i in range(repeats):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            t = time.perf_counter()
            guard.check(x) if which == 0 else og.check(x)
            (te if which == 0 else to).append(time.perf_counter() - t)
    path.unlink()
    return {"eager_check_s": statistics.median(te), "onnxruntime_check_s": statistics.median(to),
            "ratio_onnx_over_eager": statistics.median([b / a for a, b in zip(te, to)]),
            "max_abs_score_diff": float((o.score - v.score).abs().max()), "flags_identical": bool((o.flagged == v.flagged).all())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--n-adaptive", type=int, default=200)
    p.add_argument("--adaptive-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t_start = time.time()
    split = load_dataset(a.dataset)
    model = cached_model(a.dataset, "cnn", progress=True)
    eps = (0.1, 0.03) if a.dataset == "fashion-mnist" else (0.15, 0.05)
    res: dict = {"command": "python " + " ".join(sys.argv), "dataset": a.dataset, "torch": torch.__version__, "hfguard": hfguard.__version__,
                 "machine": f"{platform.machine()}, {a.threads} torch threads, CPU", "fit_data": f"all {len(split.x_train)} training images with labels"}
    # fit cost, and the guard we evaluate
    holder = {}

    def make():
        holder["g"] = hfguard.protect(model, progress=False)
        return holder["g"]

    res["fit_cost"] = fit_cost(make, split.x_train, split.y_train)
    guard = holder["g"]
    res["layers"], res["score_features"] = guard.layers, guard.fit_report["score_features"]
    res["fit_report"] = {k: v for k, v in guard.fit_report.items() if k not in ("calibration_evidence_mean",)}
    x, y = split.x_test[: a.n_test], split.y_test[: a.n_test]
    res["latency_batch256"] = latency(guard, split.x_test[:256])
    res["onnx_latency_batch256"] = onnx_latency(guard, split.x_test[:256], Path(a.out) / ".guard.onnx", a.threads)
    advs = generate(model, x, y, standard_attacks(a.dataset), progress=True)
    main_res = evaluate_guard(guard, x, y, advs, progress=True)
    roc_plot(main_res, str(Path(a.out) / f"{a.dataset}-core-roc.png"), f"hfguard (default score) on {a.dataset}, small CNN")
    res["hfguard"] = main_res
    # ablation: every evidence feature in the score; and the naive per-layer Mahalanobis sum
    allg = hfguard.protect(model, progress=False, score_features="all").fit((split.x_train, split.y_train))
    res["hfguard_all_features"] = evaluate_guard(allg, x, y, advs, progress=False)
    naive_clean = naive_mahalanobis(guard, x)
    correct = guard.check(x).predicted == y
    res["naive_mahalanobis_sum"] = {}
    for name, (xa, _) in advs.items():
        ok = correct & (model(xa).argmax(1) != y)
        res["naive_mahalanobis_sum"][name] = auroc(naive_clean, naive_mahalanobis(guard, xa[ok]))[0]
    res["adaptive"] = adaptive_attacks(guard, x[: a.n_adaptive], y[: a.n_adaptive], list(eps), steps=a.adaptive_steps, progress=True)
    res["seconds"] = time.time() - t_start
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.dataset}-core.json").write_text(json.dumps(_jsonable(res), indent=2))
    md = [f"# hfguard core quality bar: {a.dataset}", "", f"Command: `{res['command']}` ({res['machine']}, torch {res['torch']}, {res['seconds'] / 60:.1f} min).", "",
          f"Watched layers {res['layers']}; score features {res['score_features']}; fitted on {res['fit_data']}; test: first {a.n_test} test images.", "",
          "## Default guard", "", format_table(main_res), "",
          "## Ablation: all evidence features (every layer's distance and gap, logits, HF spectrum, margin)", "", format_table(res["hfguard_all_features"]), "",
          "## Naive per-layer Mahalanobis sum (same statistics, sum over layers of the distance to the nearest class)", "",
          "| attack | AUROC |", "|---|---|", *[f"| {k} | {v:.3f} |" for k, v in res["naive_mahalanobis_sum"].items()], "",
          f"## Adaptive attacks (first {a.n_adaptive} test images; evasion = misclassified by the defended pipeline and not flagged)", "",
          "| attack | evasion rate | misclassified rate |", "|---|---|---|",
          *[f"| {k} | {v['evasion_rate']:.3f} | {v['misclassified_rate']:.3f} |" for k, v in res["adaptive"].items() if isinstance(v, dict)], "",
          "## Cost", "",
          f"- `guard.check` latency, batch 256: {res['latency_batch256']['check_s'] * 1e3:.1f} ms vs bare `model(x)` {res['latency_batch256']['model_s'] * 1e3:.1f} ms: **{res['latency_batch256']['ratio']:.3f}x** (median of {res['latency_batch256']['repeats']} interleaved pairs; ratio of the fastest runs {res['latency_batch256']['ratio_of_minimums']:.3f}x)",
          f"- onnxruntime ({a.threads} threads) running the exported guard: {res['onnx_latency_batch256']['onnxruntime_check_s'] * 1e3:.1f} ms vs eager `guard.check` {res['onnx_latency_batch256']['eager_check_s'] * 1e3:.1f} ms: **{res['onnx_latency_batch256']['ratio_onnx_over_eager']:.3f}x** (max score difference {res['onnx_latency_batch256']['max_abs_score_diff']:.1e}, flags identical: {res['onnx_latency_batch256']['flags_identical']})",
          f"- `fit` on {res['fit_cost']['n']} images: {res['fit_cost']['fit_s']:.1f} s vs one inference pass {res['fit_cost']['inference_pass_s']:.1f} s: **{res['fit_cost']['ratio']:.2f}x**", ""]
    (out / f"{a.dataset}-core.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
