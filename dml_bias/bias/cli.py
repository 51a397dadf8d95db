"""The ``dml-bias`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the requested command; return the exit status.

    Example:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        dml-bias ...
        0
    """
    import dml_bias

    parser = argparse.ArgumentParser(prog="dml-bias", description="Background-bias tools for deep metric learning.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("study", help="run the background-bias study (not implemented yet)")
    args = parser.parse_args(argv)
    if args.version:
        print(f"dml-bias {dml_bias.__version__}")
        return 0
    if args.command == "study":
        print("dml-bias study: the background-bias study is not implemented yet.", file=sys.stderr)
        return 2
    parser.print_help()
    return 0
