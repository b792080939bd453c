"""Would richer evidence help? Feature variants of the guard compared on a VALIDATION split (never the bench's test images).

Each variant is a full ``fit`` (Fashion-MNIST training split, ``calibration_data`` = the 5000 held-out training
images, self-attack combiner with 0.5's five self-attack families, with which the committed results were
measured); each is scored on attacks of test images 5000-5999 (the bench reports on
0-999), so nothing here tunes on the reported numbers. Variants:

* ``default``: the layers ``layers="auto"`` picks, every source's evidence including the linear probes
  from each watched layer to the logits (``hfguard.probe``, since 0.5);
* ``without the linear probes``: ``score_features`` = every other feature (0.4's evidence);
* ``+ global pool``: the ResNet's global-average-pooled output (the penultimate features that the
  "Mahalanobis" peer uses) watched as a fourth layer;
* ``+ channel RMS`` / ``+ channel max``: every watched map also gives each channel's root-mean-square (or
  maximum) over all positions beside its average-pooled grid (an experiment: the pooling is patched here,
  not an option of the library).

Run:  python benchmarks/evidence_variants.py
Writes benchmarks/results/evidence-variants.{json,md}.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from collections.abc import Iterator

import torch
from combiner_validation import FAMILIES as FAMILIES_0_5  # benchmarks/combiner_validation.py: 0.5's five self-attack families
from combiner_validation import validation_attacks, validation_split, write_results

import hfguard
import hfguard.fitting as fitting
import hfguard.taps as taps
from hfguard.data import cached_model
from hfguard.evaluate import auroc
from hfguard.evidence import LOGITS, SPECTRUM, feature_names


@contextlib.contextmanager
def channel_statistic(kind: str | None) -> Iterator[None]:
    """Patches the map pooling to append each channel's RMS or maximum over all positions (``None``: no patch)."""
    if kind is None:
        yield
        return
    call, choose = taps.Pooling.__call__, fitting.choose_pooling

    def pooled(self: taps.Pooling, a: torch.Tensor) -> torch.Tensor:
        out = call(self, a)
        if self.kind == taps.MAP and a.dim() == 4 and self.channels == 0:
            extra = a.square().mean((2, 3)).sqrt() if kind == "rms" else a.amax((2, 3))
            out = torch.cat([out, extra.to(out.dtype)], 1)
        return out

    def chosen(shape, layer_kind, max_dim, input_hw=None):  # noqa: ANN001, ANN202
        p, d = choose(shape, layer_kind, max_dim, input_hw)
        return p, d + (shape[0] if p.kind == taps.MAP and p.channels == 0 else 0)

    taps.Pooling.__call__, fitting.choose_pooling = pooled, chosen
    try:
        yield
    finally:
        taps.Pooling.__call__, fitting.choose_pooling = call, choose


def main(n_val: int = 1000) -> None:
    torch.manual_seed(0)
    t0 = time.time()
    train, validation, xv, yv = validation_split(n_val)
    result = {"command": "python " + " ".join(sys.argv), "validation_images": f"test[5000:{5000 + n_val}]", "archs": {}}
    md = ["# Evidence variants compared on a validation split", "",
          f"Command: `{result['command']}`. Each variant is a full `fit` (training split, `calibration_data` = the 5000 held-out "
          f"training images); attacks of Fashion-MNIST test images 5000-{4999 + n_val} (the bench reports on 0-999). AUROC over "
          "successful adversarials; then the TPR on PGD 0.1 at the calibrated threshold and the clean FPR on the validation images.", ""]
    for arch in ("cnn", "resnet"):
        model = cached_model("fashion-mnist", arch)
        adv = validation_attacks(model, xv, yv)
        layers = {"cnn": ["1", "4", "8"], "resnet": ["layer1", "layer2", "layer3"]}[arch]  # what layers="auto" picks (asserted below)
        variants: dict[str, tuple[dict, str | None]] = {"default": ({}, None)}
        variants["without the linear probes (0.4's evidence)"] = ({"score_features": feature_names([*layers, LOGITS, SPECTRUM])}, None)
        if arch == "resnet":
            variants["+ global pool (penultimate) as a fourth layer"] = ({"layers": ["layer1", "layer2", "layer3", "pool"]}, None)
        variants["+ channel RMS of every watched map"] = ({}, "rms")
        variants["+ channel max of every watched map"] = ({}, "max")
        rows = {}
        for name, (options, stat) in variants.items():
            with warnings.catch_warnings(), channel_statistic(stat):
                warnings.simplefilter("ignore")
                t = time.time()
                g = hfguard.protect(model, progress=False, **{"attack_families": FAMILIES_0_5, **options}).fit(train, calibration_data=validation)
                fit_s = time.time() - t
                if name == "default" and g.layers != layers:
                    raise RuntimeError(f"layers='auto' now picks {g.layers} for the {arch}, not {layers}: update this script")

                def scores(x: torch.Tensor) -> torch.Tensor:
                    with torch.no_grad():
                        return torch.cat([g.check(x[i : i + 500]).score for i in range(0, len(x), 500)])

                clean = scores(xv)
                row = {k: auroc(clean, scores(v), bootstrap=0)[0] for k, v in adv.items()}
                row["TPR PGD 0.1"] = float((scores(adv["PGD 0.1"]) > g.threshold).float().mean())
                row["clean FPR"] = float((clean > g.threshold).float().mean())
                row["fit (s)"] = fit_s
            rows[name] = row
            print(arch, name, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
        result["archs"][arch] = {"n_successful": {k: len(v) for k, v in adv.items()}, "variants": rows}
        cols = list(next(iter(rows.values())))
        md += [f"## {arch} (successful validation adversarials {result['archs'][arch]['n_successful']})", "",
               "| variant | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        md += [f"| {n} | " + " | ".join(f"{v[c]:.1f}" if c == "fit (s)" else f"{v[c]:.3f}" for c in cols) + " |" for n, v in rows.items()]
        md.append("")
    write_results("evidence-variants", result, md, t0)


if __name__ == "__main__":
    main()
