"""What the nearest-neighbour banks (hfguard.neighbours) cost per ``check`` call at ImageNet-size shapes, alone.

The model-families table fits its guards on 40 images (banks of a few rows per class), so this script times the
two default banks by themselves at the size a real fit gives them: a first watched layer of 256 pooled
features and the logits, ``neighbour_bank=500`` (50 rows per class at 10 classes, 2 per class at 1000), with
random rows (the cost does not depend on the values). Median of 200 calls on this machine's CPU.

Run:  python benchmarks/bank_cost.py
Writes benchmarks/results/bank-cost.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from hfguard.neighbours import NeighbourBank, bank_size


def _bank(k: int, dim: int) -> NeighbourBank:
    per, near = bank_size(k)
    near = min(near, per - 1)  # as fit sets it: one fewer than a class's rows
    bank = NeighbourBank(k, per, dim, near)
    bank.set_rows(torch.randn(k, per, dim), torch.ones(k, per, dtype=torch.bool))
    return bank


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for k, batch, first in ((10, 16, 256), (1000, 64, 256)):
        banks = [_bank(k, first), _bank(k, k)]
        feats = [torch.randn(batch, first), torch.randn(batch, k)]
        with torch.no_grad():
            for _ in range(5):
                [b(z) for b, z in zip(banks, feats)]
            times = []
            for _ in range(200):
                t = time.perf_counter()
                [b(z) for b, z in zip(banks, feats)]
                times.append(time.perf_counter() - t)
        macs = sum(b.bank.shape[0] * b.bank.shape[1] for b in banks)
        rows.append({"classes": k, "batch": batch, "rows_per_class": banks[0].per_class, "neighbours": banks[0].neighbours,
                     "multiply_adds_per_image": macs, "milliseconds_per_call": round(statistics.median(times) * 1e3, 3)})
        print(rows[-1], flush=True)
    out = {"command": "python " + " ".join(sys.argv), "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
           "banks": "first watched layer (256 features) and the logits", "rows": rows}
    (Path(__file__).resolve().parent / "results" / "bank-cost.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
