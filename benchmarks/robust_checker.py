"""Issue 12, idea 2: does a robust *checker* make hfguard harder to evade? (a VALIDATION run; not in the library)

Every evidence source of hfguard reads the undefended model's own activations, which the attacker moves at will;
adding heads trained on detector-aware attacks moved the CNN's best-of-four evasion at eps 0.1 only from 0.944 to
0.910 (``benchmarks/adaptive_rounds.py``). Tramer (ICML 2022) ties robust detection at eps to robust classification at
eps/2, and the one defence family that has survived adaptive evaluations is adversarial training. So this prototype
trains a small *checker* CNN with fast adversarial training (FGSM with a random start, Wong et al. 2020, half clean
and half adversarial loss) on the training split (fit-side data only: the user's clean images and attacks generated
on them), and adds one evidence term: the checker's cross-entropy on the label the wrapped model predicts (high when
the checker does not back the model's answer). Each term is put in units of its clean tail on the calibration split
((s - median) / (q99 - median)), the combined score is their maximum, and its threshold is the 0.95 quantile there.

Scored on Fashion-MNIST test images 5000-5999 (the bench reports on 0-999): standard attacks' AUROC and the clean
FPR on all 1000, and detector-aware attacks on the first 200 (100 steps; orthogonal and selective PGD with CE,
selective with the margin loss, and the per-image weighted sum of :func:`hfguard.attacks.weighted_pgd`), each run
against the detector it is scored on, with its true gradient (both terms are differentiable); evasion = misclassified
by the wrapped model and not flagged; the best of the four per image. Cost: the checker is one more forward pass of
a network as large as the wrapped CNN here, so ``check`` would cost about twice the bare forward: it could only be an
option, never the default.

``--joint`` scores only the combined detector, under the four attacks and a joint targeted one (both networks
pushed to the model's runner-up class from the first step while the combined score is lowered), for the best of five.

Run:  python benchmarks/robust_checker.py [--epochs 6] [--train-eps 0.1] [--arch cnn] [--joint]
Writes benchmarks/results/robust-checker[-joint].{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from combiner_validation import validation_split, write_results  # benchmarks/

import hfguard
from hfguard.attacks import cw_l2, detector_pgd, pgd, weighted_pgd
from hfguard.data import cached_model, small_cnn
from hfguard.evaluate import auroc

ATTACKS = {"orthogonal CE": ("orthogonal", "ce"), "selective CE": ("selective", "ce"), "selective margin": ("selective", "margin"),
           "per-image lambda CE": ("weighted", "ce")}
#: ``--joint``: targeted at the model's runner-up class, both networks pushed there from the first step while the
#: combined score is lowered (maximise -CE(model, t) - CE(checker, t) - score), keeping the first evading iterate
JOINT = "joint targeted (model and checker to the runner-up, minus the score)"


def fast_adversarial_training(x: torch.Tensor, y: torch.Tensor, eps: float, epochs: int, seed: int = 0) -> torch.nn.Module:
    """FGSM with a random start (step 1.25 eps), loss = half clean + half adversarial cross-entropy, Adam 1e-3."""
    torch.manual_seed(seed)
    net = small_cnn(1, 10, 28)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            xb, yb = x[perm[i : i + 128]], y[perm[i : i + 128]]
            delta = (torch.rand(xb.shape, generator=gen) * 2 - 1) * eps
            xr = (xb + delta).clamp(0, 1).requires_grad_(True)
            g = torch.autograd.grad(F.cross_entropy(net(xr), yb), xr)[0]
            xa = (xb + (xr.detach() - xb + 1.25 * eps * g.sign()).clamp(-eps, eps)).clamp(0, 1)
            opt.zero_grad()
            (0.5 * F.cross_entropy(net(xb), yb) + 0.5 * F.cross_entropy(net(xa), yb)).backward()
            opt.step()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


class Combined:
    """hfguard's score and the checker's disagreement, each in units of its clean tail, combined by their maximum."""

    def __init__(self, guard, checker: torch.nn.Module, x_cal: torch.Tensor) -> None:  # noqa: ANN001
        self.guard, self.checker = guard, checker
        with torch.no_grad():
            sg, sa = self._terms(x_cal)
        self.units = [(float(s.median()), float(s.quantile(0.99) - s.median())) for s in (sg, sa)]
        with torch.no_grad():
            self.threshold = float(self.score(x_cal).quantile(0.95))

    def _terms(self, x: torch.Tensor, logits_and_score=None) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        logits, sg = logits_and_score if logits_and_score is not None else self.guard.logits_and_score(x)
        sa = F.cross_entropy(self.checker(x), logits.argmax(1), reduction="none")
        return sg, sa

    def _combine(self, sg: torch.Tensor, sa: torch.Tensor) -> torch.Tensor:
        (mg, ug), (ma, ua) = self.units
        return torch.maximum((sg - mg) / ug, (sa - ma) / ua)

    def logits_and_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = self.guard.logits_and_score(x)
        return both[0], self._combine(*self._terms(x, both))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_score(x)[1]


class GuardAlone:
    def __init__(self, guard) -> None:  # noqa: ANN001
        self.guard, self.threshold = guard, float(guard.calibrated_threshold)
        self.logits_and_score, self.score = guard.logits_and_score, guard.score


def batched(fn, x: torch.Tensor, n: int = 500) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return torch.cat([fn(x[i : i + n]) for i in range(0, len(x), n)])


def adaptive(det, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, scale: float, joint: bool = False) -> dict[str, float]:  # noqa: ANN001
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    best, out = torch.zeros_like(ok), {}
    for name, (mode, loss) in ATTACKS.items():
        if mode == "weighted":
            xa = weighted_pgd(det.logits_and_score, x, y, eps, threshold=det.threshold, scale=scale, loss=loss, steps=steps)
        else:
            xa = detector_pgd(model, det.score, x, y, eps, threshold=det.threshold, mode=mode, loss=loss, steps=steps)
        with torch.no_grad():
            logits, s = det.logits_and_score(xa)
        ev = ok & (logits.argmax(1) != y) & (s <= det.threshold)
        out[name] = float(ev.sum() / ok.sum())
        best |= ev
    if joint and isinstance(det, Combined):
        with torch.no_grad():
            lg = model(x)
            t = lg.masked_fill(F.one_hot(y, lg.shape[1]).bool(), float("-inf")).argmax(1)

        def loss(logits: torch.Tensor, _t: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
            return -F.cross_entropy(logits, t, reduction="none") - F.cross_entropy(det.checker(xr), t, reduction="none") - det.score(xr)

        def evaded(logits: torch.Tensor, _t: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return (logits.argmax(1) != y) & (det.score(xr) <= det.threshold)

        xa = pgd(model, x, t, eps, steps=steps, loss_fn=loss, success=evaded)
        with torch.no_grad():
            logits, s = det.logits_and_score(xa)
        ev = ok & (logits.argmax(1) != y) & (s <= det.threshold)
        out[JOINT] = float(ev.sum() / ok.sum())
        best |= ev
    out["best of all"] = float(best.sum() / ok.sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="cnn")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train-eps", type=float, default=0.1)
    ap.add_argument("--eval-images", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--joint", action="store_true", help="add the joint targeted attack, score only the combined detector (adaptive attacks only)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    t0 = time.time()
    train, calibration, xv, yv = validation_split(1000)
    model = cached_model("fashion-mnist", args.arch)
    guard = hfguard.protect(model, progress=False).fit(train, calibration_data=calibration)
    t = time.time()
    checker = fast_adversarial_training(train[0], train[1], args.train_eps, args.epochs)
    train_seconds = time.time() - t
    combined = Combined(guard, checker, calibration[0])
    dets = {"hfguard": GuardAlone(guard), "hfguard + robust checker": combined}
    with torch.no_grad():
        pred_m, pred_c = batched(model, xv).argmax(1), batched(checker, xv).argmax(1)
    info = {"checker_clean_accuracy": float((pred_c == yv).float().mean()), "model_clean_accuracy": float((pred_m == yv).float().mean()),
            "agreement": float((pred_c == pred_m).float().mean()), "checker_training_seconds": train_seconds}
    xr, yr = xv[:500], yv[:500]
    for e in (0.1, 0.03):  # the checker's own robust accuracy (PGD 40 steps on the checker)
        info[f"checker_robust_accuracy_pgd_{e}"] = float((batched(checker, pgd(checker, xr, yr, e, steps=40)).argmax(1) == yr).float().mean())
    print(info, flush=True)
    correct = pred_m == yv
    std = {} if args.joint else {"PGD 0.1": pgd(model, xv, yv, 0.1), "PGD 0.03": pgd(model, xv, yv, 0.03), "L2 1.0": pgd(model, xv, yv, 1.0, norm="2"),
           "CW": cw_l2(model, xv, yv, steps=100)}
    rows: dict[str, dict] = {}
    if args.joint:
        dets, std = {"hfguard + robust checker": combined}, {}
    for name, det in dets.items():
        clean = batched(det.score, xv)
        row = {"clean FPR": float((clean > det.threshold).float().mean())}
        for a, xa in std.items():
            ok = correct & (batched(model, xa).argmax(1) != yv)
            s = batched(det.score, xa[ok])
            row[f"{a} AUROC"] = auroc(clean, s, bootstrap=0)[0]
            row[f"{a} TPR"] = float((s > det.threshold).float().mean())
        with torch.no_grad():
            scale = float(batched(det.score, calibration[0]).std())
        for eps in (0.1, 0.03):
            for k, v in adaptive(det, model, xv[: args.eval_images], yv[: args.eval_images], eps, args.steps, scale, joint=args.joint).items():
                row[f"eps {eps} {k}"] = v
        rows[name] = row
        print(name, {k: round(v, 3) for k, v in row.items()}, f"{time.time() - t0:.0f}s", flush=True)
    command = "python benchmarks/" + " ".join([sys.argv[0].split("/")[-1], *sys.argv[1:]])
    result = {"command": command, "hfguard": hfguard.__version__, "arch": args.arch, "checker": info, "detectors": rows,
              "settings": vars(args)}
    cols = list(next(iter(rows.values())))
    md = ["# A robust checker beside hfguard (issue 12, idea 2; validation split)", "", f"Command: `{command}`. "
          + __doc__.split("\n\n")[1].replace("\n", " ") + " " + __doc__.split("\n\n")[2].replace("\n", " "), "",
          "Checker: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()), "",
          "| detector | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    md += [f"| {n} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for n, r in rows.items()]
    write_results("robust-checker" + ("-joint" if args.joint else ""), result, md + [""], t0)


if __name__ == "__main__":
    main()
