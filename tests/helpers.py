"""Helpers for the tests: dtype-aware ``assert_close``, a float64 ``gradcheck``, a tiny study schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

#: (rtol, atol) per dtype, loose enough for round-off and tight enough to catch a wrong formula.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
}


#: The smallest study schedule the bias tests train (6 classes of 6 images of 16 px, one epoch of a 4-wide CNN);
#: each test adds its own losses, modes, threads and attribution settings.
TINY_SCHEDULE: dict[str, Any] = {
    "num_classes": 6,
    "images_per_class": 6,
    "num_backgrounds": 4,
    "unique_homes": 3,
    "image_size": 16,
    "epochs": 1,
    "width": 4,
    "embedding_size": 8,
    "batch_size": 12,
    "m_per_class": 3,
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES.get(dtype, (0.0, 0.0))


def assert_close(
    actual: Any, expected: Any, *, rtol: float | None = None, atol: float | None = None, **kw: Any
) -> None:
    """``torch.testing.assert_close`` with tolerances taken from the (lower-precision) dtype of the two."""
    if not isinstance(actual, torch.Tensor):
        actual = torch.as_tensor(actual)
    if not isinstance(expected, torch.Tensor):
        expected = torch.as_tensor(expected, dtype=actual.dtype if actual.is_floating_point() else None)
    low = actual.dtype if actual.dtype in TOLERANCES else expected.dtype
    if expected.dtype in TOLERANCES and TOLERANCES[expected.dtype] > TOLERANCES.get(low, (0, 0)):
        low = expected.dtype
    d_rtol, d_atol = tolerance(low)
    torch.testing.assert_close(
        actual,
        expected.to(device=actual.device),
        rtol=d_rtol if rtol is None else rtol,
        atol=d_atol if atol is None else atol,
        check_dtype=False,
        **kw,
    )


def gradcheck(fn: Callable[..., torch.Tensor], inputs: Sequence[Any], **kw: Any) -> bool:
    """Run :func:`torch.autograd.gradcheck` in float64: floating inputs are cast and require grad."""
    cast = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            cast.append(x.detach().to(torch.float64).requires_grad_(True))
        else:
            cast.append(x)
    kw.setdefault("eps", 1e-6)
    kw.setdefault("atol", 1e-5)
    kw.setdefault("rtol", 1e-4)
    return torch.autograd.gradcheck(fn, tuple(cast), **kw)
