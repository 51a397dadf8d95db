"""The ``dml-bias`` command line (also ``python -m dml_bias``).

``dml-bias study`` runs the background-bias study (:func:`dml_bias.bias.run_study`), prints its tables and the
per-class bias report, and writes ``results.json``, ``per_class.csv``, ``report.md`` and the figures into
``--out`` (default ``./dml_bias_study``). User mistakes (an unknown mode, a data folder without segmentations,
an output path that is a file, …) print one ``dml-bias: error: …`` line on stderr and exit with status 2;
Ctrl-C exits with status 130 and keeps the completed runs in ``results.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_OUT = "dml_bias_study"


def _csv(kind: str, choices: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind} from {', '.join(choices)}")
        bad = [v for v in values if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(repr(b) for b in bad)}; choose from {', '.join(choices)}"
            )
        return values

    return parse


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.2,0.5, got {text!r}") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers between 0 and 1 (exclusive) such as 0.2,0.5, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dml-bias`` (with its ``study`` sub-command)."""
    from dml_bias.bias.study import DATASETS, LOSSES, MODES, VARIANTS

    parser = argparse.ArgumentParser(prog="dml-bias", description="Background-bias tools for deep metric learning.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    study = sub.add_parser(
        "study",
        help="run the background-bias study",
        description=(
            "Train one model per loss and mask mode (none, soft σ, hard, mask channel, random backgrounds), "
            "evaluate Recall@1/2/4/8 and MAP@R on the original test images and on background-swapped variants, "
            "print tables and a per-class bias report, and save results.json, per_class.csv, report.md and "
            "PNG figures. Without arguments: the built-in synthetic data set and a small CNN on the CPU "
            "(under 10 minutes on 2 cores; --quick: under 2 minutes)."
        ),
    )
    study.add_argument("--quick", action="store_true", help="reduced data set and schedule (CI smoke run)")
    study.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: ./{DEFAULT_OUT})")
    study.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    study.add_argument(
        "--losses", type=_csv("losses", LOSSES), default=LOSSES, help=f"comma-separated, from {','.join(LOSSES)}"
    )
    study.add_argument(
        "--modes", type=_csv("modes", MODES), default=MODES, help=f"comma-separated, from {','.join(MODES)}"
    )
    study.add_argument(
        "--sigmas", type=_floats, default=(0.2, 0.5), help="σ values of the soft mode, in (0, 1) (default 0.2,0.5)"
    )
    study.add_argument(
        "--variants",
        type=_csv("variants", VARIANTS),
        default=VARIANTS,
        help=f"test variants, comma-separated, from {','.join(VARIANTS)}",
    )
    study.add_argument("--epochs", type=_positive_int, default=None, help="epochs per model (default: 8; CUB 60)")
    study.add_argument("--seed", type=_non_negative_int, default=0, help="seed (default: 0)")
    study.add_argument("--dataset", choices=DATASETS, default="synthetic", help="data set (default: synthetic)")
    study.add_argument("--root", default=None, help="CUB-200-2011 folder with segmentations/ (--dataset cub)")
    study.add_argument("--weights", default=None, help="local ResNet-50 weights file (--dataset cub); never downloads")
    study.add_argument(
        "--swap",
        choices=("both", "queries"),
        default="both",
        help="variants for queries and gallery (both, default, as Kobs & Hotho) or queries only",
    )
    study.add_argument("--num-workers", type=_non_negative_int, default=0, help="DataLoader workers (default: 0)")
    study.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: all usable)")
    study.add_argument("--top", type=_positive_int, default=10, help="classes shown in the per-class report")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    study.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    return parser


def _error(message: str, status: int = 2) -> int:
    print(f"dml-bias: error: {message}", file=sys.stderr)
    return status


def _study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dml_bias.bias.study import StudyConfig, StudyError, run_study

    if args.dataset == "cub" and not args.root:
        return _error("--dataset cub needs --root PATH (the CUB-200-2011 folder with its segmentations)")
    if args.dataset != "cub" and (args.root or args.weights):
        return _error("--root and --weights are only used with --dataset cub")
    if args.weights is not None and not Path(args.weights).is_file():
        return _error(f"--weights {args.weights!r} is not a file")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _error(f"--out {args.out!r} exists and is not a directory")
    fields: dict[str, Any] = {
        "dataset": args.dataset,
        "root": args.root,
        "weights": args.weights,
        "losses": tuple(args.losses),
        "modes": tuple(args.modes),
        "soft_sigmas": tuple(args.sigmas),
        "variants": tuple(args.variants),
        "swap": args.swap,
        "seed": args.seed,
        "device": args.device,
        "num_workers": args.num_workers,
        "num_threads": args.threads,
        "progress": not args.no_progress,
        "out_dir": str(out),
    }
    if args.epochs is not None:
        fields["epochs"] = args.epochs
    try:
        config = StudyConfig.quick(**fields) if args.quick else StudyConfig(**fields)
        config.validate()
    except (TypeError, ValueError) as exc:
        return _error(str(exc))
    start = time.perf_counter()
    try:
        result = run_study(config)
    except StudyError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        print(
            f"\ndml-bias: interrupted; the completed runs are in {out / 'results.json'}",
            file=sys.stderr,
        )
        return 130
    print(result.table())
    print()
    print(result.per_class_report(top=args.top))
    try:
        paths = result.save(out, figures=not args.no_figures)
    except StudyError as exc:
        return _error(str(exc))
    print()
    print(f"wall time {time.perf_counter() - start:.1f} s; results in {out}/:")
    print("  " + ", ".join(sorted(p.name for p in paths.values())))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the requested command; return the exit status.

    Example:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        dml-bias ...
        0
    """
    import dml_bias

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage and the message
        return int(exc.code) if isinstance(exc.code, int) else 2
    if args.version:
        print(f"dml-bias {dml_bias.__version__}")
        return 0
    if args.command == "study":
        return _study(args)
    parser.print_help()
    return 0
