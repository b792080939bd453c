"""Issue 14: can the HF spectrum hide behind the model's forward on a CPU? (a probe of one idea; not in the library)

On ``mobilenet_v3_small`` at 224x224 (random weights made usable, as ``benchmarks/check_parts.py``), batch 16, the
guard's spectrum is the largest part of what ``check`` adds. This times, interleaved in one process (median of 25
rounds after a warm-up, inference mode; ``spectrum_cost.timed``): the bare forward, the spectrum alone, both one after the other, and both at once (the
spectrum on a second Python thread while the main thread runs the forward; torch releases the GIL inside its ops),
and ``check``. If "threaded" came out near the forward alone, ``check`` could overlap them.

Run:  python benchmarks/spectrum_overlap.py
Writes benchmarks/results/spectrum-overlap.json.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import torch
from check_parts import _synthetic  # benchmarks/
from spectrum_cost import timed

import hfguard


def main(rounds: int = 25) -> None:
    model, guard, _, x = _synthetic("mobilenet_v3_small", 224, 16)

    def threaded() -> None:
        def spectrum_here() -> None:
            with torch.inference_mode():  # inference mode is per thread
                guard._spectral(x)

        t = threading.Thread(target=spectrum_here)
        t.start()
        model(x)
        t.join()

    fns = {"forward": lambda: model(x), "spectrum": lambda: guard._spectral(x), "serial": lambda: (model(x), guard._spectral(x)),
           "threaded": threaded, "check": lambda: guard.check(x)}
    with torch.inference_mode():
        ms = timed(fns, rounds)
    result = {"command": "python benchmarks/" + " ".join([sys.argv[0].split("/")[-1], *sys.argv[1:]]), "hfguard": hfguard.__version__,
              "machine": f"{torch.get_num_threads()} torch threads, torch {torch.__version__}", "family": "mobilenet_v3_small", "input": list(x.shape),
              "median_ms": ms, "rounds": rounds}
    print(json.dumps(result, indent=1))
    (Path(__file__).resolve().parent / "results" / "spectrum-overlap.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
