"""The ``dml-bias`` command line (also ``python -m dml_bias``).

``dml-bias study`` runs the background-bias study (:func:`dml_bias.bias.run_study`), prints its tables and the
per-class bias report, and writes ``results.json``, ``per_class.csv``, ``report.md`` and the figures into
``--out`` (default ``./dml_bias_study``). User mistakes (an unknown mode, a data folder without segmentations,
an output path that is a file, …) print one ``dml-bias: error: …`` line on stderr and exit with status 2;
Ctrl-C exits with status 130 and keeps the completed runs in ``results.json``. With ``--save-models`` every
trained model is also saved as TorchScript with a preprocessing sidecar in ``--out/models/``.

``dml-bias audit --model SPEC --data SPEC`` audits any trained model for background reliance
(:func:`dml_bias.bias.audit`) and writes ``results.json``, ``per_class.csv``, ``report.md``, figures and
``report.html`` into ``--out`` (default ``./dml_bias_audit``); its input errors are one ``dml-bias: error:`` line
with status 2 as well.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_OUT = "dml_bias_study"
DEFAULT_AUDIT_OUT = "dml_bias_audit"


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


def _seed(text: str) -> int:
    value = _non_negative_int(text)
    if value > 2**32 - 1:  # StudyConfig's range: the study derives seeds as seed * 1000 + k
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 4294967295], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dml-bias`` (with its ``study`` and ``audit`` sub-commands)."""
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
    study.add_argument("--seed", type=_seed, default=0, help="seed in [0, 2**32 - 1] (default: 0)")
    study.add_argument("--dataset", choices=DATASETS, default="synthetic", help="data set (default: synthetic)")
    study.add_argument("--root", default=None, help="CUB-200-2011 folder with segmentations/ (--dataset cub)")
    study.add_argument("--weights", default=None, help="local ResNet-50 weights file (--dataset cub); never downloads")
    study.add_argument(
        "--swap",
        choices=("both", "queries"),
        default="both",
        help="variants for queries and gallery (both, default, as Kobs & Hotho) or queries only",
    )
    study.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=0,
        help="DataLoader worker processes for training batches (default: 0, i.e. in the main process: the synthetic "
        "data is in memory)",
    )
    study.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: 1 on the synthetic data, whose small operations run slower with more "
        "threads when other processes share the cores; all usable CPUs with --dataset cub; OMP_NUM_THREADS, if "
        "set, is respected)",
    )
    study.add_argument("--top", type=_positive_int, default=10, help="classes shown in the per-class report")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    study.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    study.add_argument(
        "--save-models",
        action="store_true",
        help="also save every trained model as TorchScript with a JSON preprocessing sidecar in OUT/models/ "
        "(for dml-bias audit)",
    )
    _add_audit_parser(sub)
    return parser


def _floats3(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _mask_input(text: str) -> tuple[str, float | None]:
    if text in ("none", "hard", "channel"):
        return text, None
    if text.startswith("soft:"):
        try:
            sigma = float(text[5:])
        except ValueError:
            sigma = -1.0
        if 0 < sigma < 1:
            return "soft", sigma
    raise argparse.ArgumentTypeError(f"expected none, hard, soft:σ (0 < σ < 1) or channel, got {text!r}")


def _add_audit_parser(sub: Any) -> None:
    audit = sub.add_parser(
        "audit",
        help="audit any trained model for background reliance",
        description=(
            "Measure how much of a trained embedding model's retrieval comes from backgrounds: Recall@1 and MAP@R "
            "on the original images and on background-swapped variants, BG-gap, background sensitivity and "
            "foreground energy, with 95%% bootstrap intervals, per class and in plain words; writes results.json, "
            "per_class.csv, report.md, figures and a self-contained report.html into --out."
        ),
    )
    audit.add_argument(
        "--model",
        required=True,
        help="a TorchScript file (e.g. from study --save-models), a torch.export .pt2 file, module.path:callable "
        "or torchvision:NAME",
    )
    audit.add_argument("--weights", default=None, help="state_dict file for module.path:callable or torchvision:NAME")
    audit.add_argument(
        "--data",
        required=True,
        help="synthetic (the built-in test split), cub:ROOT, or a folder ROOT/images/<class>/… + ROOT/masks/<class>/…",
    )
    audit.add_argument(
        "--masks-from",
        default=None,
        help="module.path:callable mapping a batch of uint8 images (N, 3, H, W) to (N, H, W) object probabilities; "
        "--data is then a folder of images without masks (ROOT/<class>/<file>)",
    )
    audit.add_argument("--out", default=DEFAULT_AUDIT_OUT, help=f"output directory (default: ./{DEFAULT_AUDIT_OUT})")
    audit.add_argument("--image-size", type=_positive_int, default=None, help="resize + centre-crop side in pixels")
    audit.add_argument("--mean", type=_floats3, nargs=3, default=None, metavar=("R", "G", "B"), help="input mean")
    audit.add_argument("--std", type=_floats3, nargs=3, default=None, metavar=("R", "G", "B"), help="input std")
    audit.add_argument(
        "--mask-input",
        type=_mask_input,
        default=None,
        help="how the model takes the mask: none, hard, soft:σ or channel (default: none, or the saved model's)",
    )
    audit.add_argument("--layer", default=None, help="sub-module to explain, or 'input' (default: found by a dry run)")
    audit.add_argument("--bootstrap", type=_positive_int, default=1000, help="bootstrap resamples (default: 1000)")
    audit.add_argument(
        "--attribution-images", type=_non_negative_int, default=None, help="images per class explained (default: 4)"
    )
    audit.add_argument("--seed", type=_non_negative_int, default=None, help="seed of donors and bootstrap (default 0)")
    audit.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda (default: cpu)")
    audit.add_argument("--batch-size", type=_positive_int, default=256, help="images per batch (default: 256)")
    audit.add_argument("--workers", type=_non_negative_int, default=0, help="DataLoader workers (default: 0)")
    audit.add_argument("--no-progress", action="store_true", help="no progress bars")
    audit.add_argument("--no-figures", action="store_true", help="skip the figures (report.html keeps its tables)")


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
    if not args.out.strip():
        return _error(f"--out must name a directory, got {args.out!r}")  # Path('') would be the working directory
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
        "save_models": bool(args.save_models),
    }
    if args.epochs is not None:
        fields["epochs"] = args.epochs
    try:
        config = StudyConfig.quick(**fields) if args.quick else StudyConfig(**fields)
        config.validate()
    except (TypeError, ValueError) as exc:
        return _error(str(exc))
    problem = _unwritable(out)  # before hours of training, not when the first result is written
    if problem:
        return _error(f"--out {args.out!r} {problem}")
    start = time.perf_counter()
    try:
        result = run_study(config)
    except (StudyError, OSError) as exc:  # OSError: a file that cannot be read or written mid-study
        return _error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
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
    except (StudyError, OSError) as exc:
        return _error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    print()
    print(f"wall time {time.perf_counter() - start:.1f} s; results in {out}/:")
    print("  " + ", ".join(sorted(p.name for p in paths.values())))
    return 0


def _unwritable(out: Any) -> str | None:
    """Why files cannot be written into the directory ``out`` (creating it if needed), or ``None`` if they can.

    A probe file is created and removed: permission bits alone miss read-only file systems and ``/proc``.
    """
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        return f"is not a writable directory: {exc.strerror or exc}"
    return None


def _audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dml_bias.bias._model_spec import load_model
    from dml_bias.bias.audit import AuditError, audit, load_callable, open_data

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _error(f"--out {args.out!r} exists and is not a directory")
    start = time.perf_counter()
    try:
        loaded = load_model(args.model, args.weights)
        side = loaded.sidecar or {}
        masks_from = load_callable(args.masks_from, "--masks-from") if args.masks_from else None
        dataset, data_name = open_data(args.data, side, with_masks=masks_from is None)
        if args.mask_input is not None:
            mask_input, sigma = args.mask_input
        else:
            mask_input, sigma = side.get("mask_input", "none"), side.get("sigma")
        image_size = args.image_size if args.image_size is not None else side.get("image_size")
        resize = None if args.image_size is not None else side.get("resize")
        try:
            module = loaded.module.to(args.device)
        except (RuntimeError, TypeError, ValueError) as exc:
            return _error(f"--device {args.device!r} cannot be used: {str(exc).splitlines()[0]}")
        result = audit(
            module,
            dataset,
            image_size=image_size,
            resize=resize,
            mean=tuple(args.mean) if args.mean is not None else tuple(side.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(args.std) if args.std is not None else tuple(side.get("std", (0.229, 0.224, 0.225))),
            mask_input=mask_input,
            sigma=0.5 if sigma is None else sigma,
            layer=args.layer,
            masks_from=masks_from,
            bootstrap=args.bootstrap,
            attribution_images=(
                args.attribution_images if args.attribution_images is not None else side.get("attribution_images", 4)
            ),
            seed=args.seed if args.seed is not None else side.get("seed", 0),
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=args.device,
            progress=not args.no_progress,
            model_name=loaded.name,
            data_name=data_name,
        )
        result.settings["model_spec"] = args.model
        result.settings["model_kind"] = loaded.kind
        if args.masks_from:
            result.settings["mask_source"] = f"masks_from {args.masks_from}"
        paths = result.save(out, figures=not args.no_figures)
    except (AuditError, TypeError, ValueError) as exc:
        return _error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        print("\ndml-bias: interrupted; no audit file was half-written", file=sys.stderr)
        return 130
    print(result.table())
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
    if args.command == "audit":
        return _audit(args)
    parser.print_help()
    return 0
