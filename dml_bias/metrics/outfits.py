"""Deprecated: the outfit metrics moved to :mod:`dml_bias.metrics.protocols`, beside the protocols that feed them.

``from dml_bias.metrics.outfits import fitb_accuracy, compatibility_auc`` still works, with a
:class:`DeprecationWarning`, until release 0.2.0; import them from :mod:`dml_bias.metrics` instead.
"""

from __future__ import annotations

from typing import Any

from dml_bias._compat import moved_name

__all__: list[str] = []

#: Public names that moved, with their new module.
MOVED: dict[str, str] = {"compatibility_auc": "dml_bias.metrics", "fitb_accuracy": "dml_bias.metrics"}


def __getattr__(name: str) -> Any:
    return moved_name(__name__, name, MOVED)
