"""Command line: ``hfguard demo``, ``hfguard report`` and ``hfguard bench`` (also ``python -m hfguard ...``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from hfguard.evaluate import jsonable as _jsonable

__all__ = ["main", "run_demo", "run_bench_command"]


def run_demo(dataset: str = "digits", out: str = "hfguard-demo", *, n_test: int | None = None, progress: bool = True, cw_steps: int = 100, pgd_steps: int = 40) -> dict[str, Any]:
    """Trains (or loads the cached) demo model, fits a guard, attacks it, writes a table, JSON and ROC plot."""
    import torch

    import hfguard
    from hfguard.data import CALIBRATION_HOLDOUT, cached_model, load_dataset
    from hfguard.errors import SettingsError
    from hfguard.evaluate import evaluate_guard, format_table, roc_plot, standard_attacks

    torch.manual_seed(0)
    split = load_dataset(dataset)
    available = len(split.x_test)
    n = n_test if n_test is not None else (available if dataset == "digits" else 1000)
    if not 1 <= n <= available:  # checked before any training: 0 meant "all" and a negative count sliced from the end
        raise SettingsError(f"n_test must be between 1 and the {available} test images of {dataset}, got {n}")
    model = cached_model(dataset, "cnn", progress=progress)
    # the documented workflow: fit on the model's training data, calibrate on a split it never trained on
    train, validation = split.holdout(CALIBRATION_HOLDOUT[dataset])
    guard = hfguard.protect(model, progress=progress).fit(train, calibration_data=validation)
    x, y = split.x_test[:n], split.y_test[:n]
    result = evaluate_guard(guard, x, y, standard_attacks(dataset, cw_steps=cw_steps, pgd_steps=pgd_steps), progress=progress)
    result["dataset"] = dataset
    result["layers"] = guard.layers
    result["score_features"] = guard.fit_report["score_features"]
    result["calibration"] = guard.fit_report["calibration"]
    result["fit_seconds"] = guard.fit_report["seconds"]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    roc_plot(result, str(out_dir / f"roc-{dataset}.png"), f"hfguard on {dataset}: successful adversarials vs clean")
    (out_dir / f"demo-{dataset}.json").write_text(json.dumps(_jsonable(result), indent=2))
    result["table"] = format_table(result)
    return result


def run_bench_command(args: argparse.Namespace, command: str) -> int:
    """``hfguard bench``: runs :func:`hfguard.bench.run.run_bench` (or only redraws its plots) and prints the report."""
    from hfguard.bench.config import preset
    from hfguard.bench.run import replot, run_bench
    from hfguard.bench.tables import markdown
    from hfguard.errors import DatasetNotAvailableError, MissingDependencyError

    stem = f"{args.dataset}-{args.tag}" if args.tag else args.dataset
    if args.replot:
        replot(args.dataset, args.out, stem=stem)
        print(f"redrew the plots and the markdown of {stem} in {args.out}")
        return 0
    if not args.quiet:
        logging.getLogger("hfguard.bench").setLevel(logging.INFO)
    cfg = preset(args.dataset, tiny=args.tiny, threads=args.threads, checker=args.checker, peers=not args.no_peers, checker_init=args.checker_init)
    try:
        result = run_bench(args.dataset, args.out, archs=tuple(args.arch) if args.arch else None, cfg=cfg, progress=not args.quiet, command=command,
                           tag=args.tag)
    except (DatasetNotAvailableError, MissingDependencyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(result))
    print(f"\nwrote {Path(args.out) / (stem + '.json')}, {Path(args.out) / (stem + '.md')} and the plots ({result['seconds'] / 60:.1f} min)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from hfguard.bench.config import CHOICES  # light: the bench's extras are imported only when it runs

    parser = argparse.ArgumentParser(prog="hfguard", description="Protect a PyTorch image classifier against adversarial examples.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN, fit a guard, attack it, print the table and write a ROC plot")
    demo.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"], help="digits is embedded (scikit-learn); fashion-mnist needs the Debian package dataset-fashion-mnist")
    demo.add_argument("--out", default="hfguard-demo", help="folder for the ROC plot and the JSON of every number")
    demo.add_argument("--n-test", type=int, default=None, help="test images to attack (default: all for digits, 1000 for fashion-mnist)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    rep = sub.add_parser("report", help="measure the paper's three claims on the demo model: HTML page, PNG figures, JSON")
    rep.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"])
    rep.add_argument("--out", default="hfguard-report", help="folder for report.html, report.json and the figures")
    rep.add_argument("--n", type=int, default=None, help="test images (default: all for digits, 1000 for fashion-mnist)")
    rep.add_argument("--quiet", action="store_true", help="no progress bars")
    bench = sub.add_parser("bench", help="hfguard next to real peer detectors under own, torchattacks and adaptive attacks: JSON, Markdown, plots (needs hfguard[bench])")
    bench.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"], help="digits is embedded; fashion-mnist needs the Debian package dataset-fashion-mnist")
    bench.add_argument("--out", default="benchmarks/results", help="folder for <dataset>.json, <dataset>.md and the plots")
    bench.add_argument("--arch", action="append", choices=["cnn", "resnet"], help="architectures (default: cnn for digits, cnn and resnet for fashion-mnist)")
    bench.add_argument("--tiny", action="store_true", help="seconds-long smoke settings (what the tests run); numbers are meaningless")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    bench.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
    bench.add_argument("--checker", action="store_true", help="also fit and attack hfguard with a robust checker network (hfguard.checker; "
                       "by default a copy of each model fine-tuned against its softmax at half the largest eps for 12 epochs; the first run trains "
                       "them: about 45 minutes for the Fashion-MNIST CNN on 2 CPU cores, longer for the ResNet)")
    bench.add_argument("--checker-init", default="model", choices=CHOICES["checker_init"],
                       help="with --checker: 'model' fine-tunes a copy of each model (default); 'scratch' trains the dataset's small CNN "
                       "against the model's softmax (cheaper for a model costlier than that CNN, such as the Fashion-MNIST ResNet)")
    bench.add_argument("--no-peers", action="store_true", help="skip the peers and ablations (with --checker: attack only the checker variant)")
    bench.add_argument("--tag", default="", help="write <dataset>-<tag>.json, .md and plots instead of <dataset>.*")
    bench.add_argument("--replot", action="store_true", help="only redraw the plots and rewrite the markdown from the JSON and the saved scores in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from hfguard.errors import DatasetNotAvailableError, SettingsError

        try:
            result = run_demo(args.dataset, args.out, n_test=args.n_test, progress=not args.quiet)
        except (DatasetNotAvailableError, SettingsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"hfguard demo on {args.dataset}: watched layers {result['layers']}, score uses {result['score_features']}")
        print(result["table"])
        print(f"\nwrote {Path(args.out) / f'roc-{args.dataset}.png'} and {Path(args.out) / f'demo-{args.dataset}.json'}")
    if args.command == "bench":
        command = "hfguard " + " ".join(sys.argv[1:] if argv is None else argv)
        return run_bench_command(args, command)
    if args.command == "report":
        from hfguard.errors import DatasetNotAvailableError, SettingsError
        from hfguard.report import run_report

        try:
            res = run_report(args.dataset, args.out, n=args.n, progress=not args.quiet)
        except (DatasetNotAvailableError, SettingsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for key in ("claim1", "claim2", "claim3"):
            print(f"{key}: {res[key]['verdict']}. {res['summary'][key]}")
        print(f"\nwrote {Path(args.out) / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
