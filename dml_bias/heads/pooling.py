r"""Generalised-mean (GeM) pooling :cite:`radenovic2019gem`.

:func:`~dml_bias.heads.gem` is the function and :class:`~dml_bias.heads.GeM` its module.

GeM pools a feature map ``(N, C, H, W)`` to ``(N, C)`` with

.. math::

    f_c = \Big(\frac{1}{HW} \sum_{h, w} \max(x_{chw}, \varepsilon)^p\Big)^{1/p},

average pooling at :math:`p = 1` and max pooling as :math:`p \to \infty`. DELG :cite:`cao2020delg` uses a fixed
:math:`p = 3`; cirtorch learns it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dml_bias._checks import (
    check_bool,
    check_dtype,
    check_factory_kwargs,
    check_finite,
    check_number,
    check_shape,
    check_tensor,
    describe,
)
from dml_bias.heads._inputs import check_has_data

__all__ = ["GeM", "gem"]


@contextlib.contextmanager
def _autocast_off(device: torch.device) -> Iterator[None]:
    """Switch autocast off for ``device`` inside the block (GeM picks its own compute dtype)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def _check_power(p: Any) -> None:
    """``p`` must be a positive finite number or a one-element floating tensor holding one."""
    if isinstance(p, torch.Tensor):
        check_dtype(p, "p", "floating")
        check_has_data(p=p)
        if p.numel() != 1:
            raise ValueError(f"p must be a number or a one-element tensor, got {describe(p)}")
        value = float(p.detach().reshape(()))
        if not (math.isfinite(value) and value > 0.0):
            raise ValueError(f"p must be a positive finite number, got a tensor holding {value}")
    else:
        check_number(p, "p", low=0.0, low_inclusive=False)


def gem(x: torch.Tensor, p: float | torch.Tensor = 3.0, eps: float = 1e-6) -> torch.Tensor:
    r"""Generalised-mean pooling over the spatial dimensions :cite:`radenovic2019gem`.

    .. math::

        f_{nc} = \Big(\frac{1}{HW} \sum_{h, w} \max(x_{nchw}, \varepsilon)^p\Big)^{1/p}

    It is evaluated as :math:`m \cdot \big(\operatorname{mean}_{h,w} (\max(x, \varepsilon)/m)^p\big)^{1/p}` with
    :math:`m` the per-channel maximum of :math:`\max(x, \varepsilon)` (treated as a constant, which leaves the
    value and both gradients unchanged), so :math:`x^p` never overflows, whatever :math:`p` and the range of
    :math:`x`.

    Precision: the math runs in float32 (float64 if ``x`` or ``p`` is float64); fp16/bf16 inputs are upcast and
    autocast is switched off inside, so fp16 inputs whose cube overflows fp16 still pool exactly. The result is
    returned in **the dtype of** ``x``, also under :class:`torch.autocast` (where ``x`` is usually the fp16/bf16
    output of a convolution); it never exceeds ``x.max()``, so it fits that dtype.

    Args:
        x: ``(N, C, H, W)`` floating-point feature map with ``H * W >= 1``, finite; not modified.
        p: the power :math:`p > 0`: a number, or a one-element floating tensor (e.g. a learnable
            :class:`torch.nn.Parameter`; gradients flow into it). A tensor ``p`` is validated too, which reads its
            value (a device synchronisation on CUDA).
        eps: the clamp :math:`\varepsilon > 0` that keeps the base positive (ReLU maps hold zeros).

    Returns:
        ``(N, C)`` tensor in the dtype and on the device of ``x``.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor, or ``p`` is neither a number nor a floating tensor.
        ValueError: if ``x`` is not 4-D, has no spatial positions or holds NaN or infinite values, or ``p`` or
            ``eps`` is not positive.

    Example:
        >>> import torch
        >>> from dml_bias.heads import gem
        >>> x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        >>> gem(x, p=1.0)  # the mean
        tensor([[2.5000]])
        >>> gem(x, p=2.0)  # sqrt((1 + 4 + 9 + 16) / 4)
        tensor([[2.7386]])
    """
    check_tensor(x, "x")
    check_dtype(x, "x", "floating")
    check_shape(x, "x", ("N", "C", "H", "W"))
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"x must have at least one spatial position (H * W >= 1), got {describe(x)}")
    _check_power(p)
    check_number(eps, "eps", low=0.0, low_inclusive=False)
    check_has_data(x=x, p=p if isinstance(p, torch.Tensor) else None)
    check_finite(x, "x")  # a NaN would otherwise become the channel's peak and its pooled value
    compute = torch.promote_types(torch.float32, x.dtype)
    if isinstance(p, torch.Tensor):
        compute = torch.promote_types(compute, p.dtype)
    with _autocast_off(x.device):
        base = x.to(compute).clamp_min(eps)
        peak = base.detach().amax(dim=(2, 3), keepdim=True)
        power = p.to(device=x.device, dtype=compute).reshape(()) if isinstance(p, torch.Tensor) else float(p)
        pooled = (base / peak).pow(power).mean(dim=(2, 3)).pow(1.0 / power) * peak.flatten(1)
    return pooled.to(x.dtype)


class GeM(nn.Module):
    r"""Generalised-mean pooling :cite:`radenovic2019gem` ``(N, C, H, W) -> (N, C)``; see :func:`gem`.

    Args:
        p: the power :math:`p > 0` (3 in DELG and cirtorch).
        eps: the clamp :math:`\varepsilon > 0`.
        learnable: make :math:`p` a :class:`torch.nn.Parameter` of shape ``(1,)`` (cirtorch's choice); ``False``
            keeps it a Python float (DELG's choice).
        device: device of the learnable ``p``.
        dtype: dtype of the learnable ``p`` (float32 by default).

    Attributes:
        p: a float, or a :class:`torch.nn.Parameter` of shape ``(1,)`` when ``learnable``.

    Shape:
        input ``(N, C, H, W)`` floating; output ``(N, C)`` in the input's dtype (see :func:`gem` for the
        precision under :class:`torch.autocast`).

    Example:
        >>> import torch
        >>> from dml_bias.heads import GeM
        >>> pool = GeM(p=3.0, learnable=True)
        >>> pool
        GeM(p=3.0 (learnable), eps=1e-06)
        >>> pool(torch.full((2, 4, 3, 3), 2.0))
        tensor([[2., 2., 2., 2.],
                [2., 2., 2., 2.]], grad_fn=<MulBackward0>)
        >>> pool.p.shape
        torch.Size([1])
    """

    p: float | nn.Parameter

    def __init__(
        self,
        p: float = 3.0,
        eps: float = 1e-6,
        learnable: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_number(p, "p", low=0.0, low_inclusive=False)
        check_number(eps, "eps", low=0.0, low_inclusive=False)
        check_bool(learnable, "learnable")
        device = check_factory_kwargs(device, dtype)
        self.eps = float(eps)
        self.learnable = learnable
        if learnable:
            self.p = nn.Parameter(torch.full((1,), float(p), device=device, dtype=dtype))
        else:
            self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``x`` ``(N, C, H, W)`` to ``(N, C)``; see :func:`gem`."""
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``: the current ``p`` and ``eps``."""
        if isinstance(self.p, torch.Tensor):
            return f"p={round(float(self.p.detach().reshape(())), 4)} (learnable), eps={self.eps}"
        return f"p={self.p}, eps={self.eps}"
