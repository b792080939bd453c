"""Issue 12: why does the robust checker stop near 0.2 evasion at eps 0.03? Each evading image, classified (VALIDATION run).

``benchmarks/robust_checker.py`` measured the combined detector (hfguard + a PGD-5 checker, per-class units) at
0.472 / 0.242 best-of-four evasion (eps 0.1 / 0.03) on the CNN's validation split, and 0.489 / 0.202 with a checker
fine-tuned from the model with a cosine learning rate (``--init model --schedule cosine``; a third column trains
that one on the model's softmax outputs, ``--train-labels soft``; the fourth and fifth train that at eps 0.05 for 6 and
12 epochs, the bench's checkers of 0.8.3 and 0.8.4; ``--checkers`` picks columns by position). The model is whichever
``cached_model("fashion-mnist", "cnn")`` holds, so runs on different machines may differ. This script reruns the same four detector-aware attacks on
the same 200 validation images (Fashion-MNIST test 5000-5199) and, for each image some attack evades on (the first
evading attack's image, in the suite's order), asks what the checker does there:

* **checker fooled too**: its answer on the adversarial image is the model's wrong answer, and was not on the
  clean image (the checker's own robust error; only a more robust checker closes it);
* **checker right, its doubt tolerated**: the checker still answers the true class, but its cross-entropy on the
  model's wrong answer stays inside the clean tail of that class (a more confident checker, or tighter tails, would
  close it);
* **checker wrong on the clean image already**: the model was moved to the checker's (wrong) answer on the clean
  image, which the checker keeps (clean agreement closes it);
* other (the checker answers a third class).

It also measures, on the 5000 clean calibration images (the same rows that set the units and the threshold, so
in-sample), the share of them where the two networks disagree, and the share of them where they disagree and the
combined detector does not flag (with more disagreement than the 5 % false-alarm budget, some must pass), and the
checker's mean confidence (top softmax probability) on the 1000 clean validation images.

Run:  python benchmarks/checker_floor.py [--checkers I ...] [--tag T]   (the cached checkers of robust_checker.py; trains them if absent)
Writes benchmarks/results/checker-floor[-T].{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from combiner_validation import validation_split, write_results  # benchmarks/
from robust_checker import ATTACKS, Combined, _one, batched, cached_checker

import hfguard
from hfguard.bench.checker import model_softmax
from hfguard.data import cached_model

#: name -> cached_checker keywords (robust_checker.py's runs: ``--train-steps 5``, with ``--init model --schedule cosine``, with
#: ``--train-labels soft`` too, and that at ``--train-eps 0.05`` for 6 and 12 epochs; eps 0.1 and 6 epochs unless given)
CHECKERS = {"PGD-5, fresh small CNN (the bench's before 0.8.2)": {}, "PGD-5, fine-tuned copy of the model, cosine lr": {"init": True, "schedule": "cosine"},
            "the same, on the model's softmax": {"init": True, "schedule": "cosine", "soft": True},
            "the same at eps 0.05 (the bench's in 0.8.3)": {"init": True, "schedule": "cosine", "soft": True, "eps": 0.05},
            "the same, 12 epochs (the bench's since 0.8.4)": {"init": True, "schedule": "cosine", "soft": True, "eps": 0.05, "epochs": 12}}
EPS = (0.1, 0.03)
CASES = ("checker fooled too", "checker right, its doubt tolerated", "checker wrong on the clean image already", "other")


def classify(det: Combined, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, scale: float) -> dict[str, float]:
    """Runs the four attacks at ``eps`` and classifies each evaded image (rates over the model's correct images)."""
    with torch.no_grad():
        ok = model(x).argmax(1) == y
        clean_c = det.checker(x).argmax(1)
    first = torch.zeros_like(x)
    m_adv = y.clone()  # the model's answer on each image's first evading adversarial, as judged when it evaded
    evaded = torch.zeros_like(ok)
    for mode, loss in ATTACKS.values():
        xa = _one(det, model, x, y, eps, 100, scale, mode, loss)
        with torch.no_grad():
            logits, s = det.logits_and_score(xa)
        new = ok & (logits.argmax(1) != y) & (s <= det.threshold) & ~evaded
        first[new], m_adv[new], evaded = xa[new], logits.argmax(1)[new], evaded | new
    with torch.no_grad():
        c_logits = det.checker(first)
        c_adv = c_logits.argmax(1)
        term = F.cross_entropy(c_logits, m_adv, reduction="none")
        units = (term - det.units_a[0][0][m_adv]) / det.units_a[0][1][m_adv].clamp_min(1e-6)
    cases = {CASES[0]: (c_adv == m_adv) & (clean_c != m_adv), CASES[1]: c_adv == y, CASES[2]: (c_adv == m_adv) & (clean_c == m_adv)}
    cases[CASES[3]] = ~(cases[CASES[0]] | cases[CASES[1]] | cases[CASES[2]])
    n = float(ok.sum())
    out = {"evaded": float(evaded.sum()) / n}
    out.update({k: float((v & evaded).sum()) / n for k, v in cases.items()})
    out["checker term of the evaders, in units (median)"] = float(units[evaded].median()) if bool(evaded.any()) else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkers", type=int, nargs="*", default=list(range(len(CHECKERS))),
                    help="which of the checkers, by position (0-based) in: " + "; ".join(CHECKERS))
    ap.add_argument("--tag", default="", help="suffix of the results' file names")
    args = ap.parse_args()
    if not all(0 <= i < len(CHECKERS) for i in args.checkers):
        ap.error(f"--checkers takes positions 0 to {len(CHECKERS) - 1}, got {args.checkers}")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    t0 = time.time()
    train, calibration, xv, yv = validation_split(1000)
    model = cached_model("fashion-mnist", "cnn")
    guard = hfguard.protect(model, progress=False).fit(train, calibration_data=calibration)
    rows = {}
    for name, kw in [list(CHECKERS.items())[i] for i in args.checkers]:
        labels = model_softmax(model, train[0]) if kw.get("soft") else train[1]
        checker, _, cached = cached_checker(train[0], labels, kw.get("eps", 0.1), kw.get("epochs", 6), steps=5, schedule=kw.get("schedule", "constant"),
                                            init=model if kw.get("init") else None)
        det = Combined(guard, checker, calibration[0], per_class=True)
        with torch.no_grad():
            s = batched(det.score, calibration[0])
            disagree = batched(checker, calibration[0]).argmax(1) != batched(model, calibration[0]).argmax(1)
            conf = F.softmax(batched(checker, xv), 1).max(1).values
        row = {"checker loaded from cache": cached, "clean disagreement (calibration)": float(disagree.float().mean()),
               "disagreeing and not flagged (share of all calibration images)": float((disagree & (s <= det.threshold)).float().mean()),
               "checker mean confidence (validation)": float(conf.mean())}
        for eps in EPS:
            row.update({f"eps {eps} {k}": v for k, v in classify(det, model, xv[:200], yv[:200], eps, float(s.std())).items()})
        rows[name] = row
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, f"{time.time() - t0:.0f}s", flush=True)
    command = "python benchmarks/" + " ".join([sys.argv[0].split("/")[-1], *sys.argv[1:]])
    cols = list(next(iter(rows.values())))
    md = ["# Why the checker's evasion stops near 0.2 at eps 0.03 (issue 12; validation split)", "", f"Command: `{command}`.", "",
          __doc__.split("\n\n", 1)[1].split("\n\nRun:")[0], "",
          "The eps rows are rates over the model's correctly classified images among the 200 adaptive images (one image is about "
          "0.0056); the first rows are over the 5000 calibration or the 1000 validation images, as named.", "",
          "| measure | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    md += [f"| {c} | " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for r in rows.values()) + " |" for c in cols]
    write_results("checker-floor" + (f"-{args.tag}" if args.tag else ""), {"command": command, "hfguard": hfguard.__version__, "rows": rows}, md + [""], t0)


if __name__ == "__main__":
    main()
