"""What the default fit's self-attacks cost at ImageNet size on this CPU (issue 14's scale figures).

``model_families.py`` fits its guards with ``calibration="clean"`` to spare the self-attacks; this script measures
them. For each family (random weights made usable by :mod:`hfguard.bench.synthetic`: cost only, never detection
quality), at 224x224 with 10 classes, ``hfguard.selfattack.self_attacks`` runs each default family on the same
``--images`` correctly classified images (batch ``--batch``, the guard's attack batch), timed alone. Reported: seconds
per attacked image for each family, in units of one bare forward of one image as well, and the successes.

FGSM, PGD (8 steps, L-inf and L2) and CW-L2 (30 Adam steps) cost the same whatever the model; the minimal PGD stops at
each image's first misclassified iterate and the random search at its first misclassification (at most 200 queries),
so their cost depends on how easily the model is fooled, and a random-weight model is not a trained one: the
worst case (every image spends all its steps or queries) is reported next to the measurement.
The estimate for a default fit (``attack_size=2000``, the families taking turns) is the mean per-image cost of the
six families times 2000.

    python benchmarks/self_attack_cost.py      # writes benchmarks/results/self-attack-cost.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch

import hfguard
from hfguard.bench.synthetic import IMAGENET_NORMALIZE, random_model, usable_random_model
from hfguard.selfattack import CW_STEPS, DEFAULT_FAMILIES, SQUARE_QUERIES, self_attacks

#: worst-case passes per image, in forward-pass units (a backward pass counted as two forwards)
WORST_CASE = {"fgsm-linf": 3, "pgd-linf": 3 * 8 + 1, "pgd-l2": 3 * 8 + 1, "boundary-linf": 3 * (2 * 8 + 4) + 1, "cw-l2": 3 * CW_STEPS + 1,
              "square-linf": SQUARE_QUERIES + 1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="*", default=["resnet50", "mobilenet_v3_large"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    k = 10
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET_NORMALIZE)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(6 * k, 3, args.size, args.size, generator=g)
    labels = torch.arange(len(pixels)) % k
    defaults = ap.parse_args([])
    options = [f"--{a} {' '.join(map(str, v)) if isinstance(v, list) else v}" for a, v in vars(args).items() if v != getattr(defaults, a)]
    out = {"command": " ".join(["python benchmarks/self_attack_cost.py", *options]),
           "hfguard": hfguard.__version__, "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
           "size": args.size, "classes": k, "images_per_family": args.images, "batch": args.batch, "models": {}}
    lines = ["# Self-attack cost at ImageNet size on this CPU", "", f"Command: `{out['command']}` (hfguard {hfguard.__version__}; {out['machine']}). "
             f"Random weights made usable (cost only, never detection quality); {args.size}x{args.size}, {k} classes; each family attacks the same "
             f"{args.images} correctly classified images, batch {args.batch}. Seconds per attacked image, and the same in bare forwards of "
             "one image (at the full batch); the last-but-one column counts the passes if every image spent all its steps or queries (a backward "
             "as two forwards). The random search's queries run on the images not yet fooled, so its batches shrink and each query costs more "
             "per image than a full batch's forward.", ""]
    for name in args.families:
        torch.manual_seed(0)
        model = usable_random_model(random_model(name, k, args.size), (pixels - mean) / std, labels, k, batch_size=args.batch)

        def logits(p: torch.Tensor, model: torch.nn.Module = model) -> torch.Tensor:
            return model((p - mean) / std)

        with torch.no_grad():
            ok = logits(pixels).argmax(1) == labels
            x, y = pixels[ok][: args.images], labels[ok][: args.images]
            logits(x[: args.batch])
            t = time.perf_counter()
            logits(x[: args.batch])
            forward = (time.perf_counter() - t) / min(args.batch, len(x))
        rows = {}
        for family in DEFAULT_FAMILIES:
            t = time.perf_counter()
            with torch.enable_grad():
                res = self_attacks(logits, x, y, lo=0.0, hi=1.0, seed=0, batch_size=args.batch, families=[family])
            per_image = (time.perf_counter() - t) / len(x)
            rows[family] = {"seconds_per_image": per_image, "forwards_per_image": per_image / forward, "worst_case_forwards": WORST_CASE[family],
                            "succeeded": res.succeeded[family], "attempted": res.attempted[family]}
            print(name, family, {k2: round(v, 3) if isinstance(v, float) else v for k2, v in rows[family].items()}, flush=True)
        mean_cost = sum(r["seconds_per_image"] for r in rows.values()) / len(rows)
        worst = forward * sum(WORST_CASE.values()) / len(WORST_CASE)
        out["models"][name] = {"forward_seconds_per_image": forward, "images": len(x), "families": rows,
                               "default_fit_estimate_hours": 2000 * mean_cost / 3600, "default_fit_worst_case_hours": 2000 * worst / 3600}
        lines += [f"## {name} (bare forward {1000 * forward:.0f} ms per image; {len(x)} images)", "",
                  "| family | s per image | forwards per image | passes, all steps spent | successful / attacked |", "|---|---|---|---|---|"]
        lines += [f"| {f} | {r['seconds_per_image']:.2f} | {r['forwards_per_image']:.0f} | {r['worst_case_forwards']} | {r['succeeded']}/{r['attempted']} |"
                  for f, r in rows.items()]
        lines += ["", f"A default fit's self-attacks (`attack_size=2000`, the six families taking turns): about "
                  f"{2000 * mean_cost / 3600:.1f} h at these rates ({2000 * worst / 3600:.1f} h if every image spent all its steps, at full-batch speed), on top of one forward pass over "
                  "the fit and calibration data for the statistics.", ""]
    res_dir = Path(__file__).resolve().parent / "results"
    (res_dir / "self-attack-cost.json").write_text(json.dumps(out, indent=2))
    (res_dir / "self-attack-cost.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
