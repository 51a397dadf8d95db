"""pytorch-metric-learning's ``utils`` import paths: ``accuracy_calculator`` and ``distributed``.

``from dml_bias.utils.accuracy_calculator import AccuracyCalculator`` and ``from dml_bias.utils import distributed
as pml_dist`` work as the same lines with ``pytorch_metric_learning``. The sub-modules are loaded on first use.

Example:
    >>> from dml_bias.utils.accuracy_calculator import AccuracyCalculator
    >>> AccuracyCalculator(k=1).k
    1
"""

from __future__ import annotations

import importlib
from typing import Any

__all__: list[str] = []

_LAZY_SUBMODULES: tuple[str, ...] = ("accuracy_calculator", "distributed")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
