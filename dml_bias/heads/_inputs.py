"""The input policy of the heads: finite values, one device, and the parameters' dtype.

Every head checks its floating-point inputs the way the losses do (:mod:`dml_bias.losses._common`;
:func:`~dml_bias._checks.check_has_data`, re-exported here, rejects meta tensors):

* **finite**: NaN or infinite values raise :class:`ValueError` naming the argument (one reduction and one host
  sync, :func:`~dml_bias._checks.check_finite`), instead of flowing into a NaN descriptor or score;
* **device**: inputs on another device than the head's parameters raise :class:`ValueError` naming both, and
  so do meta tensors (they hold no values to check or compute with);
* **dtype** (reduced precision): outside :class:`torch.autocast`, an input whose dtype differs from the
  parameters' is cast to the parameters' dtype (a float16/bfloat16 map on a float32 head runs in float32, a
  float64 map on a float32 head in float32), so a head never fails with torch's "mat1 and mat2 must have the
  same dtype"; under autocast the input is left to autocast.

Nothing here is public; names and signatures may change.
"""

from __future__ import annotations

import torch

from dml_bias._checks import check_finite, check_has_data, check_same_device


def autocast_enabled(device: torch.device) -> bool:
    """Whether :class:`torch.autocast` is active for ``device``'s type."""
    return bool(torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type))


def to_parameter_dtype(x: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """``x`` in ``parameter``'s dtype, unless autocast is on for its device (then autocast picks the dtype)."""
    if x.dtype == parameter.dtype or autocast_enabled(x.device):
        return x
    return x.to(parameter.dtype)


def check_head_input(x: torch.Tensor, name: str, parameter: torch.Tensor) -> torch.Tensor:
    """Check that ``x`` is finite and on ``parameter``'s device; return it in the parameters' dtype (see above)."""
    check_same_device(**{"parameters": parameter, name: x})
    check_has_data(**{name: x})
    check_finite(x, name)
    return to_parameter_dtype(x, parameter)


def check_batch_statistics(
    shape: tuple[int, int, int], name: str, module: torch.nn.Module, *, what: str | None = None
) -> None:
    """In training mode a BatchNorm layer needs more than one value per channel: ``N * H * W >= 2``.

    Raises :class:`ValueError` naming ``name`` (instead of BatchNorm's own message, raised mid-forward) when
    ``module`` holds a BatchNorm layer in training mode and its input map ``(N, H, W) = shape`` has a single
    location in the whole batch. ``what`` describes the argument (default: its shape).
    """
    batch, height, width = shape
    if batch * height * width > 1:
        return
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules()):
        got = what if what is not None else f"N={batch}, H={height}, W={width}"
        raise ValueError(
            f"{name} must give more than one location per batch (N * H * W >= 2) in training mode, where "
            f"BatchNorm computes batch statistics, got {got}; pass a larger batch or call .eval() first"
        )
