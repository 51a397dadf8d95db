"""dml_bias: deep metric learning for PyTorch that takes what the model looks at seriously.

The sub-packages are imported lazily (PEP 562), so ``import dml_bias`` costs little more than
``import torch``; ``dml_bias.losses`` and friends are loaded on first access. The modules named as in
pytorch-metric-learning (``distances``, ``reducers``, ``losses``, ``miners``, ``samplers``, ``testers``,
``utils.accuracy_calculator``, ``utils.distributed``) make ``from dml_bias import distances, losses`` work as
``from pytorch_metric_learning import distances, losses`` does.

:func:`set_checks` and :func:`checks_enabled` (also loaded lazily) switch off and query the value checks that
synchronise the host in the losses and miners; the environment variable ``DML_BIAS_CHECKS=0`` does the same.

Example:
    >>> import dml_bias
    >>> isinstance(dml_bias.__version__, str)
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

#: Sub-packages and modules that are loaded on first attribute access.
_LAZY_SUBMODULES: tuple[str, ...] = (
    "bias",
    "datasets",
    "distances",
    "distributed",
    "heads",
    "losses",
    "metrics",
    "miners",
    "reducers",
    "retrieval",
    "samplers",
    "similarity",
    "testers",
    "transforms",
    "utils",
)

#: Functions loaded on first attribute access, with the private module that defines them.
_LAZY_FUNCTIONS: dict[str, str] = {"checks_enabled": "_checks", "set_checks": "_checks"}

__all__ = ["__version__", *_LAZY_SUBMODULES, *_LAZY_FUNCTIONS]

if TYPE_CHECKING:  # pragma: no cover - for static type checkers only
    from dml_bias import similarity as similarity
    from dml_bias._checks import checks_enabled as checks_enabled
    from dml_bias._checks import set_checks as set_checks


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    if name in _LAZY_FUNCTIONS:
        function = getattr(importlib.import_module(f"{__name__}.{_LAZY_FUNCTIONS[name]}"), name)
        globals()[name] = function
        return function
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES) | set(_LAZY_FUNCTIONS))
