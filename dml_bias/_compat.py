"""Shims for torch and torchvision APIs that differ between the supported releases.

* torch 2.9 replaced the global float32 matmul switches (``torch.set_float32_matmul_precision``, ``allow_tf32``)
  by per-backend ``fp32_precision`` settings, and newer releases refuse to read the legacy switches once the
  new ones were set: :func:`ieee_fp32_matmul` and :func:`reduced_precision_fp32_matmul` use whichever exists.
* torchvision 0.21 renamed the hooks of ``v2.Transform`` (``_get_params`` / ``_transform`` became the public
  ``make_params`` / ``transform``): :class:`V2TransformHooks` answers to both names.

:func:`moved_name` keeps a public name that moved to another module importable from its old place, with a
:class:`DeprecationWarning`, until the next minor release.

Everything here asks whether an attribute exists (or answers to every name), never which version is installed,
so a backport or a removal is handled the same way.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "REMOVAL_RELEASE",
    "V2TransformHooks",
    "compute_dtype",
    "ieee_fp32_matmul",
    "moved_name",
    "no_autocast",
    "reduced_precision_fp32_matmul",
]

#: The release that removes the old import paths of moved public names.
REMOVAL_RELEASE = "0.2.0"

#: cuBLAS switches that let float16/bf16 GEMMs reduce in lower precision (both are switched off for a search).
_REDUCED_PRECISION_REDUCTIONS = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")


def _has_setting(backend: Any, name: str) -> bool:
    # The backend objects answer unknown names with AttributeError, so this is a plain feature test.
    return backend is not None and hasattr(backend, name)


def _per_backend_switches() -> tuple[Any, Any] | None:
    """The cuda and mkldnn matmul settings objects where both have ``fp32_precision``, else ``None``."""
    cuda_mm = getattr(torch.backends.cuda, "matmul", None)
    mkldnn_mm = getattr(torch.backends.mkldnn, "matmul", None)
    if _has_setting(cuda_mm, "fp32_precision") and _has_setting(mkldnn_mm, "fp32_precision"):
        return cuda_mm, mkldnn_mm
    return None


@contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """Run float32 matmuls in full IEEE float32 (no TF32, no bf16), restoring the user's settings afterwards.

    With the per-backend ``fp32_precision`` switches (torch 2.9 and later) those are set to ``"ieee"``;
    without them the global ``torch.set_float32_matmul_precision("highest")`` does the same (on those releases
    it also drives cuBLAS' ``allow_tf32`` and the CPU's bf16 "medium" mode). The cuBLAS reduced-precision
    reductions are switched off where they exist. The two APIs are never mixed.
    """
    cuda_mm = torch.backends.cuda.matmul
    switches: list[tuple[Any, str, Any]] = [
        (cuda_mm, name, False) for name in _REDUCED_PRECISION_REDUCTIONS if _has_setting(cuda_mm, name)
    ]
    per_backend = _per_backend_switches()
    if per_backend is not None:
        switches += [(backend, "fp32_precision", "ieee") for backend in per_backend]
    saved = [getattr(backend, name) for backend, name, _ in switches]
    saved_global = None if per_backend is not None else torch.get_float32_matmul_precision()
    try:
        if saved_global is not None:
            torch.set_float32_matmul_precision("highest")
        for backend, name, value in switches:
            setattr(backend, name, value)
        yield
    finally:
        if saved_global is not None:
            torch.set_float32_matmul_precision(saved_global)
        for (backend, name, _), value in zip(switches, saved, strict=True):
            setattr(backend, name, value)


def reduced_precision_fp32_matmul(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` may currently run in TF32 or bf16 (the user's settings)."""
    per_backend = _per_backend_switches()
    if per_backend is not None:
        backend = per_backend[0] if device.type == "cuda" else per_backend[1]
        return backend.fp32_precision in ("tf32", "bf16")
    # Legacy releases: one global switch for every backend ("high": TF32, "medium": bf16), read as the
    # per-backend settings read it on newer releases (where "high" also shows as "tf32" on the CPU).
    return torch.get_float32_matmul_precision() != "highest"


class V2TransformHooks:
    """Mixin for ``torchvision.transforms.v2.Transform`` subclasses that override the public hooks.

    torchvision 0.21 and later call ``make_params(flat_inputs)`` and ``transform(inpt, params)``; earlier
    releases call the same hooks as ``_get_params`` and ``_transform``. Listed before ``v2.Transform`` among the
    bases, this mixin forwards the old names to the public ones (subclass overrides included), so one class works
    with both; newer releases never call the old names.
    """

    def _get_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return self.make_params(flat_inputs)  # type: ignore[attr-defined]

    def _transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self.transform(inpt, params)  # type: ignore[attr-defined]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the math runs in: float64 if any input is float64, else float32 (half inputs are upcast).

    Example:
        >>> import torch
        >>> compute_dtype(torch.zeros(1, dtype=torch.float16)), compute_dtype(torch.zeros(1, dtype=torch.float64))
        (torch.float32, torch.float64)
    """
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@contextmanager
def no_autocast(device: torch.device) -> Iterator[None]:
    """Switch autocast off for ``device`` so the math runs in the dtype the caller chose (float32 or float64)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def moved_name(module: str, name: str, moved: Mapping[str, str]) -> Any:
    """The body of a module-level ``__getattr__`` for public names that moved out of ``module``.

    Returns ``name`` from its new module ``moved[name]`` (the same object) with a :class:`DeprecationWarning`
    that names the new import path; raises :class:`AttributeError` as a module does for any other name.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     f = moved_name("old.place", "sqrt", {"sqrt": "math"})
        >>> import math
        >>> f is math.sqrt, str(caught[0].message).split(";")[0]
        (True, 'old.place.sqrt moved to math.sqrt')
    """
    if name not in moved:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new_module = moved[name]
    warnings.warn(
        f"{module}.{name} moved to {new_module}.{name}; import it from {new_module} (the old path is removed in "
        f"{REMOVAL_RELEASE})",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(new_module), name)
