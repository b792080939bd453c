"""Issue 12, idea 2: does a robust *checker* make hfguard harder to evade? (a VALIDATION run; not in the library)

Every evidence source of hfguard reads the undefended model's own activations, which the attacker moves at will;
adding heads trained on detector-aware attacks moved the CNN's best-of-four evasion at eps 0.1 only from 0.944 to
0.910 (``benchmarks/adaptive_rounds.py``). Tramer (ICML 2022) ties robust detection at eps to robust classification at
eps/2, and the one defence family that has survived adaptive evaluations is adversarial training. So this prototype
trains a small *checker* CNN adversarially (by default fast adversarial training: FGSM with a random start, Wong et
al. 2020, half clean and half adversarial loss; the options below change it, and each result's "Settings" line says
which ran) on the training split (fit-side data only: the user's clean images and attacks generated on them), and
adds one evidence term: by default the checker's cross-entropy on the label the wrapped model predicts (high when
the checker does not back the model's answer). Each term is put in units of its clean tail on the calibration split
((s - median) / (q - median), q the 99th percentile by default), the combined score is their maximum, and its
threshold is the 0.95 quantile there.

Scored on Fashion-MNIST test images 5000-5999 (the bench reports on 0-999): standard attacks' AUROC and the clean
FPR on all 1000, and detector-aware attacks on the first 200 (100 steps; orthogonal and selective PGD with CE,
selective with the margin loss, and the per-image weighted sum of :func:`hfguard.attacks.weighted_pgd`), each run
against the detector it is scored on, with its true gradient (both terms are differentiable; the ``gap`` term only almost everywhere); evasion = misclassified
by the wrapped model and not flagged; the best of the four per image. Cost: the checker is one more forward pass of
a network as large as the wrapped CNN here, so ``check`` would cost about twice the bare forward: it could only be an
option, never the default.

``--joint`` scores only the combined detector, under the four attacks and a joint targeted one (both networks
pushed to the model's runner-up class from the first step while the combined score is lowered), for the best of five.
``--stress`` scores only the combined detector, under those five, two more seeds of the two strongest with 300 steps,
and the gradient-free query check (random search with Square's proposals on "misclassified and not flagged", 1000
queries; what it evades on while no gradient attack did is the masking signal). It also measures the checker's own
robust accuracy under Square (1000 queries) beside PGD-40: a checker that masks its gradients would fall far lower.
The checker is trained once per setting and cached under the user cache directory. ``--per-class-units`` takes
the checker term's clean-tail units per class the model predicts; ``--combined-only`` skips hfguard alone.
``--train-steps K`` trains the checker with PGD-K (as Madry et al. 2018, but with the same half clean loss) instead
of FGSM with a random start, and ``--trades BETA`` with TRADES (Zhang et al. 2019, K > 1 steps on the KL term).
``--checker-term gap`` replaces the cross-entropy by the checker's top logit minus its logit for the model's answer
(flat where the two agree); ``--checker-term kl`` by KL(model softmax || checker softmax), which is the cross-entropy
where the model is confident and shrinks where the model itself is unsure (clean disagreements are mostly there); ``--guard-quantile Q`` makes hfguard's clean quantile Q one unit of its term (above 0.99
it leaves the checker term more of the false-alarm budget). ``--arch resnet`` wraps the small ResNet instead; the
checker (a fresh small CNN trained on the data, unless ``--init model``) is the same. ``--schedule cosine`` decays
the checker's learning rate to 0 (cosine); ``--init model`` trains a copy of the wrapped model instead of a fresh
small CNN (adversarial fine-tuning; with ``--arch resnet`` the checker is then a small ResNet). ``--train-labels soft`` trains it on the wrapped model's
softmax outputs (cross-entropy against them: robust distillation of the model). ``--train-labels model`` trains the checker on the wrapped
model's predictions for the training images instead of their labels (robust imitation: more agreement with the model).
``--extra-checker-eps E ...`` adds checkers of the same recipe at those radii, each its own term of the maximum with
its own clean tail (the "Checker" line describes the first; its training seconds are the sum over all of them).

Run:  python benchmarks/robust_checker.py [--epochs 6] [--train-eps 0.1] [--train-steps 1] [--trades 0] [--arch cnn] [--per-class-units]
      [--checker-term ce|gap|kl] [--guard-quantile 0.99] [--train-labels true|model|soft] [--schedule constant|cosine] [--init scratch|model] [--extra-checker-eps E ...] [--combined-only] [--joint | --stress] [--tag T]
Writes benchmarks/results/robust-checker[-joint|-stress][-T].{json,md}.
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
from hfguard.attacks import cw_l2, detector_pgd, evasion_loss, pgd, random_search, square_linf, weighted_pgd
from hfguard.bench.checker import cached_checker as bench_cached_checker
from hfguard.bench.checker import checker_path, load_checker, model_softmax, recipe, save_checker
from hfguard.checker import sign_steps
from hfguard.data import cached_model, small_cnn
from hfguard.evaluate import auroc

ATTACKS = {"orthogonal CE": ("orthogonal", "ce"), "selective CE": ("selective", "ce"), "selective margin": ("selective", "margin"),
           "per-image lambda CE": ("weighted", "ce")}
#: ``--joint``: targeted at the model's runner-up class, both networks pushed there from the first step while the
#: combined score is lowered (maximise -CE(model, t) - CE(checker, t) - score), keeping the first evading iterate
JOINT = "joint targeted (model and checker to the runner-up, minus the score)"


#: the recipes of FGSM-RS and PGD-K training are :func:`hfguard.bench.checker.recipe`'s (the library trains them);
#: ``--trades BETA``: TRADES (Zhang et al. 2019): K steps maximise KL(checker(x) || checker(x')) from x + 0.001 N(0, 1),
#: loss = CE(checker(x), y) + BETA KL
TRADES_RECIPE = "trades beta {beta} pgd-{k} on KL step 2.5 eps/k start 0.001 randn, Adam 1e-3, batch 128, small_cnn, v1"


def _recipe(steps: int, trades: float) -> str:
    return TRADES_RECIPE.format(beta=trades, k=steps) if trades else recipe(steps)


def cached_checker(x: torch.Tensor, y: torch.Tensor, eps: float, epochs: int, seed: int = 0, steps: int = 1,
                   trades: float = 0.0, schedule: str = "constant", init: torch.nn.Module | None = None) -> tuple[torch.nn.Module, float, bool]:
    """:func:`hfguard.bench.checker.cached_checker` (the library's training and cache), or :func:`trades_training` when
    ``trades`` > 0, trained once per setting and cached as safetensors with its training time (one cache: the bench's
    ``--checker`` shares the file of ``--train-eps 0.05 --train-steps 5 --init model --schedule cosine --train-labels soft``, its
    default since 0.8.3; 0.8.2's was the same at ``--train-eps 0.1``). ``init``: a network whose copy, weights included, is trained instead of a
    fresh ``small_cnn`` (the wrapped model: an adversarially fine-tuned copy of it). Returns ``(checker,
    training_seconds, loaded_from_cache)``.
    """
    if trades and (schedule != "constant" or init is not None):
        raise ValueError("TRADES training takes a fresh small CNN and a constant learning rate")
    if not trades:  # the library's cache and training (the bench's --checker shares the file)
        return bench_cached_checker("fashion-mnist", x, y, eps=eps, epochs=epochs, steps=steps, seed=seed, schedule=schedule, init=init)
    path = checker_path("fashion-mnist", _recipe(steps, trades), x, y, eps=eps, epochs=epochs, seed=seed, kind=f"-trades{trades:g}-k{steps}")
    if path.exists():
        return (*load_checker(path, small_cnn(1, 10, 28)), True)
    t = time.time()
    net = trades_training(x, y, eps, epochs, seed, steps, trades)
    seconds = time.time() - t
    save_checker(path, net, seconds)
    return net, seconds, False


def trades_training(x: torch.Tensor, y: torch.Tensor, eps: float, epochs: int, seed: int, steps: int, beta: float) -> torch.nn.Module:
    """TRADES: ``steps`` sign steps of 2.5 eps / steps on KL(checker(x) || checker(x')), loss = CE + beta KL, Adam 1e-3."""
    torch.manual_seed(seed)
    net = small_cnn(1, 10, 28)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    step = 2.5 * eps / steps
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            xb, yb = x[perm[i : i + 128]], y[perm[i : i + 128]]
            net.eval()
            with torch.no_grad():
                p_clean = F.softmax(net(xb), 1)
            start = (xb + 0.001 * torch.randn(xb.shape, generator=gen)).clamp(0, 1)
            xa = sign_steps(lambda xr: F.kl_div(F.log_softmax(net(xr), 1), p_clean, reduction="sum"), xb, start, eps, step, steps)  # noqa: B023
            net.train()
            opt.zero_grad()
            logits = net(xb)
            kl = F.kl_div(F.log_softmax(net(xa), 1), F.softmax(logits, 1), reduction="batchmean")
            (F.cross_entropy(logits, yb) + beta * kl).backward()
            opt.step()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


class Combined:
    """hfguard's score and the checker's disagreement, each in units of its clean tail, combined by their maximum.

    ``term``: ``"ce"``, the checker's cross-entropy on the model's answer, ``"gap"``, its top logit minus its logit
    for the model's answer (the attacker must make the model's wrong answer the checker's top, not only likely), or
    ``"kl"``, KL(model softmax || checker softmax).
    ``guard_quantile``: the clean quantile that is one unit of hfguard's term; above 0.99 it leaves the checker term
    more of the false-alarm budget.
    ``per_class``: the checker term's units (median and 99th percentile on the calibration split) are taken per class
    the model predicts, so a class the two networks rarely dispute gets a tight tail of its own.
    """

    def __init__(self, guard, checker: torch.nn.Module, x_cal: torch.Tensor, per_class: bool = False, term: str = "ce",
                 guard_quantile: float = 0.99, extra: tuple[torch.nn.Module, ...] = ()) -> None:  # noqa: ANN001
        self.guard, self.checker, self.term, self.extra = guard, checker, term, tuple(extra)
        with torch.no_grad():
            sg, sas, pred = self._terms(x_cal)
        self.per_class = per_class
        self.unit_g = (float(sg.median()), float(sg.quantile(guard_quantile) - sg.median()))
        key = self._key(pred)
        self.units_a = []
        for sa in sas:  # one clean tail per checker
            med = torch.stack([sa[key == c].median() for c in range(int(key.max()) + 1)])
            self.units_a.append((med, torch.stack([sa[key == c].quantile(0.99) for c in range(len(med))]) - med))
        with torch.no_grad():
            self.threshold = float(self.score(x_cal).quantile(0.95))

    def _term(self, net: torch.nn.Module, x: torch.Tensor, logits: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        c = net(x)
        if self.term == "gap":  # the checker's top logit over its logit for the model's answer: 0 when it agrees
            return c.max(1).values - c.gather(1, pred[:, None])[:, 0]
        if self.term == "kl":  # KL(model || checker): the cross-entropy on the model's answer where the model is confident
            return F.kl_div(F.log_softmax(c.float(), 1), F.log_softmax(logits.float(), 1), log_target=True, reduction="none").sum(1)
        return F.cross_entropy(c, pred, reduction="none")

    def _terms(self, x: torch.Tensor, logits_and_score=None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:  # noqa: ANN001
        """hfguard's score, each checker's term (the main checker first) and the model's predictions."""
        logits, sg = logits_and_score if logits_and_score is not None else self.guard.logits_and_score(x)
        pred = logits.argmax(1)
        return sg, [self._term(net, x, logits, pred) for net in (self.checker, *self.extra)], pred

    def _key(self, pred: torch.Tensor) -> torch.Tensor:
        """Which clean tail each image's checker term is measured against: its predicted class, or one shared tail."""
        return pred if self.per_class else torch.zeros_like(pred)

    def _combine(self, sg: torch.Tensor, sas: list[torch.Tensor], pred: torch.Tensor) -> torch.Tensor:
        mg, ug = self.unit_g
        k = self._key(pred)
        out = (sg - mg) / ug
        for sa, (ma, ua) in zip(sas, self.units_a):
            out = torch.maximum(out, (sa - ma[k]) / ua[k].clamp_min(1e-6))
        return out

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


def _evaded(det, xa: torch.Tensor, y: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        logits, s = det.logits_and_score(xa)
    return ok & (logits.argmax(1) != y) & (s <= det.threshold)


def _one(det, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, scale: float, mode: str, loss: str, seed: int = 0) -> torch.Tensor:  # noqa: ANN001
    if mode == "weighted":
        return weighted_pgd(det.logits_and_score, x, y, eps, threshold=det.threshold, scale=scale, loss=loss, steps=steps, seed=seed)
    return detector_pgd(model, det.score, x, y, eps, threshold=det.threshold, mode=mode, loss=loss, steps=steps, seed=seed)


def adaptive_masks(det, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, scale: float, joint: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001
    """Per attack, which correctly classified images it evades on (misclassified and not flagged)."""
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    out = {name: _evaded(det, _one(det, model, x, y, eps, steps, scale, mode, loss), y, ok) for name, (mode, loss) in ATTACKS.items()}
    if joint and isinstance(det, Combined):
        with torch.no_grad():
            lg = model(x)
            t = lg.masked_fill(F.one_hot(y, lg.shape[1]).bool(), float("-inf")).argmax(1)

        def loss(logits: torch.Tensor, _t: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
            pushed = sum(F.cross_entropy(net(xr), t, reduction="none") for net in (det.checker, *det.extra))
            return -F.cross_entropy(logits, t, reduction="none") - pushed - det.score(xr)

        def evaded(logits: torch.Tensor, _t: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return (logits.argmax(1) != y) & (det.score(xr) <= det.threshold)

        out[JOINT] = _evaded(det, pgd(model, x, t, eps, steps=steps, loss_fn=loss, success=evaded), y, ok)
    return ok, out


def rates(ok: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {k: float(m.sum() / ok.sum()) for k, m in masks.items()}
    out["best of all"] = float(torch.stack(list(masks.values())).any(0).sum() / ok.sum())
    return out


def adaptive(det, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, scale: float, joint: bool = False) -> dict[str, float]:  # noqa: ANN001
    return rates(*adaptive_masks(det, model, x, y, eps, steps, scale, joint))


def stress(det, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, args: argparse.Namespace, scale: float) -> dict[str, float]:  # noqa: ANN001
    """``--stress``: the five attacks, restarts of the two strongest with more steps, and the gradient-free query check."""
    ok, masks = adaptive_masks(det, model, x, y, eps, args.steps, scale, joint=True)
    for seed in range(1, args.restarts + 1):
        for name in ("selective margin", "per-image lambda CE"):
            mode, loss = ATTACKS[name]
            masks[f"{name}, {args.restart_steps} steps, seed {seed}"] = _evaded(det, _one(det, model, x, y, eps, args.restart_steps, scale, mode, loss, seed), y, ok)
    white_box = torch.stack(list(masks.values())).any(0)

    def objective(cand: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits, s = det.logits_and_score(cand)
        return evasion_loss(logits, y[rows], s, det.threshold, scale)

    query = f"query attack (gradient-free, {args.queries} queries)"
    masks[query] = _evaded(det, random_search(objective, x, eps, args.queries), y, ok)
    out = rates(ok, masks)
    out["evaded only without gradients"] = float((masks[query] & ~white_box).sum() / ok.sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="cnn")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train-eps", type=float, default=0.1)
    ap.add_argument("--train-steps", type=int, default=1, help="1: FGSM with a random start; K > 1: PGD-K adversarial training")
    ap.add_argument("--trades", type=float, default=0.0, help="BETA > 0: TRADES training with --train-steps steps on the KL term")
    ap.add_argument("--eval-images", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--joint", action="store_true", help="add the joint targeted attack, score only the combined detector (adaptive attacks only)")
    ap.add_argument("--stress", action="store_true", help="the combined detector under the five attacks, restarts and the query check; "
                    "the checker's own robust accuracy under a gradient-free attack")
    ap.add_argument("--restarts", type=int, default=2, help="--stress: extra seeds of the two strongest attacks")
    ap.add_argument("--restart-steps", type=int, default=300)
    ap.add_argument("--queries", type=int, default=1000, help="--stress: queries of the gradient-free attacks")
    ap.add_argument("--per-class-units", action="store_true", help="the checker term's clean-tail units per predicted class")
    ap.add_argument("--checker-term", choices=("ce", "gap", "kl"), default="ce", help="the checker's cross-entropy on the model's answer, "
                    "its top logit minus its logit for that answer, or KL(model softmax || checker softmax)")
    ap.add_argument("--guard-quantile", type=float, default=0.99, help="the clean quantile that is one unit of hfguard's term")
    ap.add_argument("--combined-only", action="store_true", help="skip hfguard alone (it does not depend on the checker)")
    ap.add_argument("--train-labels", choices=("true", "model", "soft"), default="true", help="the checker's training labels: the dataset's, "
                    "the wrapped model's predictions on the training images (a checker that imitates the model, robustly), or its softmax outputs")
    ap.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="the checker's learning rate: constant or cosine to 0")
    ap.add_argument("--init", choices=("scratch", "model"), default="scratch", help="train a fresh small CNN, or a copy of the wrapped model "
                    "(adversarial fine-tuning: the checker starts from the model's own answers)")
    ap.add_argument("--extra-checker-eps", type=float, nargs="*", default=[], help="more checkers, the same recipe at these radii, "
                    "each one more term of the maximum (units and threshold on the calibration split as for the first)")
    ap.add_argument("--tag", default="", help="suffix of the results' file names (e.g. for another checker setting)")
    args = ap.parse_args()
    if args.trades and args.train_steps < 2:
        ap.error("--trades needs --train-steps K with K > 1 (one step on the KL term is FGSM)")
    if args.trades and (args.init == "model" or args.schedule != "constant"):
        ap.error("--trades trains a fresh small CNN at a constant learning rate (no --init model, no --schedule)")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    t0 = time.time()
    train, calibration, xv, yv = validation_split(1000)
    model = cached_model("fashion-mnist", args.arch)
    guard = hfguard.protect(model, progress=False).fit(train, calibration_data=calibration)
    labels = {"true": lambda: train[1], "model": lambda: batched(model, train[0]).argmax(1),
              "soft": lambda: model_softmax(model, train[0])}[args.train_labels]()
    trained = [cached_checker(train[0], labels, e, args.epochs, steps=args.train_steps, trades=args.trades, schedule=args.schedule,
                              init=model if args.init == "model" else None) for e in (args.train_eps, *args.extra_checker_eps)]
    (checker, _, cached), train_seconds = trained[0], sum(t[1] for t in trained)
    combined = Combined(guard, checker, calibration[0], per_class=args.per_class_units, term=args.checker_term,
                        guard_quantile=args.guard_quantile, extra=[t[0] for t in trained[1:]])
    dets = {"hfguard": GuardAlone(guard), "hfguard + robust checker": combined}
    with torch.no_grad():
        pred_m, pred_c = batched(model, xv).argmax(1), batched(checker, xv).argmax(1)
    info = {"checker_clean_accuracy": float((pred_c == yv).float().mean()), "model_clean_accuracy": float((pred_m == yv).float().mean()),
            "agreement": float((pred_c == pred_m).float().mean()),
            # where the checker is already wrong, moving the model to its answer may need little attack on the checker
            # (hfguard's term still applies, and the checker's answer can change under the perturbation)
            "checker_wrong_where_model_right": float(((pred_c != yv) & (pred_m == yv)).sum() / (pred_m == yv).sum()),
            "checker_wrong_where_model_right_adaptive_images": float(((pred_c != yv) & (pred_m == yv))[: args.eval_images].sum()
                                                                       / (pred_m == yv)[: args.eval_images].sum()),
            "checker_training_seconds": train_seconds,
            "checker_loaded_from_cache": cached}
    xr, yr = xv[:500], yv[:500]
    for e in (0.1, 0.03):  # the checker's own robust accuracy (PGD 40 steps on the checker)
        info[f"checker_robust_accuracy_pgd_{e}"] = float((batched(checker, pgd(checker, xr, yr, e, steps=40)).argmax(1) == yr).float().mean())
        if args.stress:  # gradient masking in the checker itself (catastrophic overfitting) shows as a gap to this
            info[f"checker_robust_accuracy_square_{e}"] = float((batched(checker, square_linf(checker, xr, yr, e, queries=args.queries)).argmax(1) == yr).float().mean())
    print(info, flush=True)
    correct = pred_m == yv
    std = {} if args.joint or args.stress else {"PGD 0.1": pgd(model, xv, yv, 0.1), "PGD 0.03": pgd(model, xv, yv, 0.03), "L2 1.0": pgd(model, xv, yv, 1.0, norm="2"),
           "CW": cw_l2(model, xv, yv, steps=100)}
    rows: dict[str, dict] = {}
    if args.joint or args.stress:
        dets, std = {"hfguard + robust checker": combined}, {}
    elif args.combined_only:
        dets = {"hfguard + robust checker": combined}
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
            xe, ye = xv[: args.eval_images], yv[: args.eval_images]
            found = stress(det, model, xe, ye, eps, args, scale) if args.stress else adaptive(det, model, xe, ye, eps, args.steps, scale, joint=args.joint)
            for k, v in found.items():
                row[f"eps {eps} {k}"] = v
        rows[name] = row
        print(name, {k: round(v, 3) for k, v in row.items()}, f"{time.time() - t0:.0f}s", flush=True)
    command = "python benchmarks/" + " ".join([sys.argv[0].split("/")[-1], *sys.argv[1:]])
    result = {"command": command, "hfguard": hfguard.__version__, "arch": args.arch, "checker": info, "detectors": rows,
              "settings": vars(args)}
    cols = list(next(iter(rows.values())))
    md = ["# A robust checker beside hfguard (issue 12, idea 2; validation split)", "", f"Command: `{command}`. "
          + __doc__.split("\n\n")[1].replace("\n", " ") + " " + __doc__.split("\n\n")[2].replace("\n", " "), "",
          f"Settings: checker trained by {_recipe(args.train_steps, args.trades)} at eps {args.train_eps:g} for {args.epochs} epochs; "
          f"{ {'model': 'the model', 'soft': 'the model softmax', 'true': 'the true'}[args.train_labels]} labels; checker term {args.checker_term}, {'per-class' if args.per_class_units else 'shared'} units; hfguard unit quantile "
          f"{args.guard_quantile:g}; {args.arch}; learning rate {args.schedule}; "
          + "".join(f"another checker of the same recipe at eps {e:g} (its own term in the maximum); " for e in args.extra_checker_eps) +
          f"{'a copy of the wrapped model, fine-tuned' if args.init == 'model' else 'a fresh small CNN'}.", "",
          "Checker: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()), "",
          "| detector | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    if len(rows) == 1:  # one detector: a column of measures reads better than a row of twenty-five
        md[-2:] = [f"| measure | {next(iter(rows))} |", "|---|---|"]
        md += [f"| {c} | {v:.3f} |" for c, v in next(iter(rows.values())).items()]
    else:
        md += [f"| {n} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for n, r in rows.items()]
    stem = "robust-checker" + ("-stress" if args.stress else "-joint" if args.joint else "") + (f"-{args.tag}" if args.tag else "")
    write_results(stem, result, md + [""], t0)


if __name__ == "__main__":
    main()
