"""The background-bias study: train with and without masks, compare retrieval, report per class."""

from __future__ import annotations

__all__: list[str] = []
