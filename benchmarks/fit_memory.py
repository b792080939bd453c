"""Peak memory of ``fit`` on a long stream: it must stay flat in the dataset size.

Run:  python benchmarks/fit_memory.py --images 500000
Writes benchmarks/results/fit-memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from memory import status_mb  # benchmarks/memory.py

import hfguard
from hfguard.data import small_cnn


def rss_mb() -> float:
    return status_mb("VmRSS")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=500_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = small_cnn(1, 10, 28).eval()
    checkpoints = {}
    start_rss = rss_mb()

    def stream():
        gen = torch.Generator().manual_seed(0)
        for i in range(0, a.images, a.batch):
            x = torch.rand(a.batch, 1, 28, 28, generator=gen)
            y = torch.arange(i, i + a.batch) % 10
            yield x, y
            done = i + a.batch
            if done in (10_000, 50_000, 100_000, 250_000, 500_000, a.images):
                checkpoints[done] = rss_mb()

    t = time.time()
    guard = hfguard.protect(model, progress=False).fit(stream())
    seconds = time.time() - t
    res = {
        "command": "python " + " ".join(sys.argv),
        "images": a.images,
        "rss_before_fit_mb": start_rss,
        "rss_mb_after_images": checkpoints,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "growth_10k_to_end_mb": checkpoints[max(checkpoints)] - checkpoints[min(checkpoints)],
        "fit_seconds": seconds,
        "samples_in_statistics": guard.fit_report["samples_in_statistics"],
        "samples_held_out": guard.fit_report["samples_held_out"],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit-memory.json").write_text(json.dumps(res, indent=2))
    lines = [
        "# fit memory on a stream of synthetic 28x28 images", "", f"Command: `{res['command']}` (2 CPU threads).", "",
        "| images streamed | RSS (MB) |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in sorted(checkpoints.items())], "",
        f"RSS growth from 10k to {a.images} images: {res['growth_10k_to_end_mb']:.1f} MB; peak RSS {res['peak_rss_mb']:.0f} MB; fit {seconds:.0f} s.", "",
    ]
    (out / "fit-memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
