"""Deprecated: spatial verification and re-ranking moved to :mod:`dml_bias.retrieval`.

``from dml_bias.heads.verification import rerank, spatial_verification`` still works, with a
:class:`DeprecationWarning`, until release 0.2.0; import them from :mod:`dml_bias.retrieval` instead.
"""

from __future__ import annotations

from typing import Any

from dml_bias._compat import moved_name

__all__: list[str] = []

#: Public names that moved, with their new module.
MOVED: dict[str, str] = {"rerank": "dml_bias.retrieval", "spatial_verification": "dml_bias.retrieval"}


def __getattr__(name: str) -> Any:
    return moved_name(__name__, name, MOVED)
