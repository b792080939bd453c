"""Where does ``check``'s overhead go on a GPU, and would replaying the guard's maths as a CUDA graph remove it?
(issue 14; CUDA, one prepared run; follows ``gpu_compiled_scoring.py``)

For the launch-bound families of ``gpu-compiled-scoring.json`` (random weights made usable: speed only), 10
classes, batch 64, fitted as ``model_families.py`` fits them, each part of ``check`` is timed alone (median of
synchronised calls, interleaved): the bare forward, the forward with the guard's hooks, the input check, and the
maths after the pass (spectrum, distances, evidence, heads) three ways: eager, ``compile_scoring(mode=
"reduce-overhead")``, and a hand-captured ``torch.cuda.CUDAGraph`` of the eager maths (inputs copied into
static buffers, then one replay: a prototype, not the library). Then the whole ``check`` the three ways, and the
host-side profile of the eager and the compiled ``check``.

    python benchmarks/gpu_scoring_parts.py            # needs CUDA; writes benchmarks/results/gpu-scoring-parts.json
    python benchmarks/gpu_scoring_parts.py --smoke    # CPU, tiny, no graphs: checks the script; writes nothing
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import cuda_script, family_guard, images, profile_table, sync, write_results  # noqa: E402


def medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each synchronised call, the calls interleaved (order rotated each round)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for r in range(repeats + 3):
            for n in names[r % len(names):] + names[: r % len(names)]:
                sync()
                t = time.perf_counter()
                fns[n]()
                sync()
                if r >= 3:
                    times[n].append(1e3 * (time.perf_counter() - t))
    return {n: statistics.median(v) for n, v in times.items()}


def graphed_scoring(guard, x, layer_feats, logits, spectral: bool):
    """A CUDA graph of the guard's eager maths after the pass, for this batch's shapes; returns run(x, feats, logits)."""
    static_x, static_l = x.clone(), logits.clone()
    static_f = [None if f is None else f.clone() for f in layer_feats]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            guard._scoring_from_pass(static_x, static_f, static_l, spectral)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = guard._scoring_from_pass(static_x, static_f, static_l, spectral)

    def run(x, layer_feats, logits):
        static_x.copy_(x)
        static_l.copy_(logits)
        for s, f in zip(static_f, layer_feats):
            if s is not None:
                s.copy_(f)
        graph.replay()
        return out[0].clone(), out[1].clone()

    return run


def parts(model, guard, xb, repeats: int, cuda: bool) -> dict:
    needed = guard._features_needed()
    spectral = len(guard.layers) + 1 in needed
    out: dict = {}
    with guard._eval_model(), torch.no_grad():
        logits, feats = guard._layer_features(xb, needed)
        eager_score = guard._scoring_from_pass(xb, feats, logits, spectral)[0]
        fns = {
            "bare_forward": lambda: model(xb),
            "forward_with_hooks": lambda: guard._layer_features(xb, needed),
            "input_check": lambda: guard._check_input(xb),
            "maths_eager": lambda: guard._scoring_from_pass(xb, feats, logits, spectral),
        }
        if cuda:
            t = time.perf_counter()
            graphed = graphed_scoring(guard, xb, feats, logits, spectral)
            sync()
            out["graph_capture_seconds"] = time.perf_counter() - t
            out["graph_max_score_difference"] = float((graphed(xb, feats, logits)[0] - eager_score).abs().max())
            fns["maths_cuda_graph"] = lambda: graphed(xb, feats, logits)

            def check_graphed():
                x, _ = guard._check_input(xb)
                lg, lf = guard._layer_features(x, needed)
                return graphed(x, lf, lg)

            fns["check_with_cuda_graph_maths"] = check_graphed
        fns["check_eager"] = lambda: guard.check(xb)
        out["eager_and_graph_ms"] = medians(fns, repeats)
        out["profile_check_eager"] = profile_table(lambda: guard.check(xb), cuda)
        t = time.perf_counter()
        guard.compile_scoring(**({"mode": "reduce-overhead"} if cuda else {}))
        out["compile_seconds"] = time.perf_counter() - t
        compiled = guard._compiled.fn
        fns2 = {"bare_forward": fns["bare_forward"], "maths_compiled": lambda: compiled(xb, feats, logits, spectral),
                "check_compiled": lambda: guard.check(xb), "check_eager_again": fns["check_eager"]}
        if cuda:
            fns2["check_with_cuda_graph_maths"] = fns["check_with_cuda_graph_maths"]
    guard_check = guard.check  # the compiled one now; the eager "again" above uses the same guard: switch per call
    with torch.no_grad():
        def eager_check():
            c, guard._compiled = guard._compiled, None
            try:
                return guard_check(xb)
            finally:
                guard._compiled = c
        fns2["check_eager_again"] = eager_check
        out["compiled_ms"] = medians(fns2, repeats)
        out["profile_check_compiled"] = profile_table(lambda: guard.check(xb), cuda)
    guard.compile_scoring(False)
    return out


def main() -> None:
    args, cuda, dev, out = cuda_script("gpu_scoring_parts.py", "benchmarks/results/gpu-scoring-parts.json")
    size, k = (32, 10) if args.smoke else (224, 10)
    if args.smoke:
        args.repeats = 2
    xf, yf = images(40 if args.smoke else 64, size, k, dev, 4)
    for name in ("mobilenet_v3_large", "efficientnet_b0", "resnet50"):
        try:
            m, gf = family_guard(name, xf, yf, k, size, dev)
            out[name] = {"layers": gf.layers, **parts(m, gf, xf, args.repeats, cuda)}
        except Exception:
            out["sections_failed"][name] = traceback.format_exc()
        m = gf = None
        write_results(out, args.out, cuda)
    print("failed:", out["sections_failed"])


if __name__ == "__main__":
    main()
