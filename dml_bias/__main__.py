"""Command-line entry point: ``python -m dml_bias`` and the ``dml-bias`` console script."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the ``dml-bias`` command line.

    Args:
        argv: The arguments without the program name; ``None`` reads :data:`sys.argv`.

    Returns:
        The process exit status (0 on success).
    """
    from dml_bias.bias.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
