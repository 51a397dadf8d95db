r"""Train with ``torch.distributed`` on the global batch, with exactly the single-process gradients.

Metric-learning losses compare every embedding of a batch with every other one (or with every proxy), so the
loss of a data-parallel job should be computed on the **global** batch, gathered from all ranks. This module
gives the pieces:

* :func:`is_distributed`, :func:`get_rank`, :func:`get_world_size`: work with or without an initialised
  process group (``False``, ``0`` and ``1`` without one).
* :func:`gather_with_grad`: all-gather a floating-point tensor along its first dimension (sizes may differ
  between ranks), with a gradient that flows back to every rank's own slice.
* :func:`gather_no_grad`: the same for any dtype (labels, indices), without gradient.
* :class:`DistributedLossWrapper`: computes a loss on the global batch so that, after the usual gradient
  averaging of :class:`~torch.nn.parallel.DistributedDataParallel`, the model's parameters **and** the loss's
  own parameters (Proxy-Anchor proxies, ArcFace weights) hold exactly the single-process gradients, and returns
  the global loss value.
* :func:`average_gradients` and :func:`broadcast_parameters`: the two collectives a job without DDP needs.

The order of the gathered rows is the rank order (rank 0's rows first), identical on every rank, so every
rank sees the very same global batch as the single-process run on the concatenated per-rank batches.

Gradient convention (the maths is in :class:`DistributedLossWrapper`): rank :math:`r` of :math:`R` holds
:math:`N_r` embeddings :math:`z_r = f_\theta(x_r)`; the gathered batch is :math:`Z = [z_0; \dots; z_{R-1}]`.
The backward pass of :func:`gather_with_grad` sums the gradients that all ranks' losses send to the gathered
tensor and hands each rank the rows of its own slice:

.. math::

    \frac{\partial}{\partial z_r} \sum_{s=0}^{R-1} L_s(Z) \;=\; \Bigl[\sum_{s} \frac{\partial L_s}{\partial Z}
    \Bigr]_{\text{rows of } r}.

When every rank computes the same :math:`L` (as :class:`DistributedLossWrapper` does), this is
:math:`R \cdot \partial L / \partial z_r`, so DDP's *average* over ranks gives exactly
:math:`\partial L / \partial \theta`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from dml_bias._checks import (
    check_bool,
    check_choice,
    check_dtype,
    check_embeddings,
    check_labels,
    check_number,
    check_tensor,
    describe,
)
from dml_bias._collectives import all_gather_ints, all_gather_rows, comm_device, is_initialized, rank, world_size

__all__ = [
    "DistributedLossWrapper",
    "average_gradients",
    "broadcast_parameters",
    "gather_no_grad",
    "gather_with_grad",
    "get_rank",
    "get_world_size",
    "is_distributed",
]

#: Dtypes with a stable code in the metadata that ranks exchange before gathering (``-1``: any other dtype).
_DTYPE_CODES: tuple[torch.dtype, ...] = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
)

#: Largest number of dimensions a gathered tensor may have (the metadata has a fixed length on every rank).
_MAX_NDIM = 8

_GRAD_REDUCTIONS: tuple[str, ...] = ("mean", "sum")


# --------------------------------------------------------------------------------------------------------------
# Rank and world helpers
# --------------------------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """Return ``True`` if :mod:`torch.distributed` is available and a default process group is initialised.

    Example:
        >>> is_distributed()  # a plain single-process run
        False
    """
    return is_initialized()


def get_world_size(group: Any = None) -> int:
    """Return the number of ranks in ``group`` (the default group if ``None``), or ``1`` when not distributed.

    Args:
        group: A ``torch.distributed`` process group, or ``None`` for the default group.

    Raises:
        TypeError: ``group`` is neither ``None`` nor a process group (checked also outside a distributed run).

    Example:
        >>> get_world_size()
        1
    """
    return world_size(group)


def get_rank(group: Any = None) -> int:
    """Return this process's rank within ``group`` (the default group if ``None``), or ``0`` when not distributed.

    Args:
        group: A ``torch.distributed`` process group, or ``None`` for the default group.

    Raises:
        TypeError: ``group`` is neither ``None`` nor a process group (checked also outside a distributed run).

    Example:
        >>> get_rank()
        0
    """
    return rank(group)


# --------------------------------------------------------------------------------------------------------------
# Collectives (private helpers)
# --------------------------------------------------------------------------------------------------------------


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES.index(dtype) if dtype in _DTYPE_CODES else -1


def _shape_meta(x: torch.Tensor) -> list[int]:
    """``[ndim, dtype code, size_0, ..., size_{ndim-1}, -1, ...]`` padded to a fixed length."""
    dims = list(x.shape) + [-1] * (_MAX_NDIM - x.ndim)
    return [x.ndim, _dtype_code(x.dtype), *dims]


def _check_gatherable(x: Any, name: str, *, floating: bool) -> list[int]:
    """Validate a tensor to gather; return its metadata (see :func:`_shape_meta`)."""
    check_tensor(x, name)
    if x.ndim < 1 or x.ndim > _MAX_NDIM:
        raise ValueError(f"{name} must have between 1 and {_MAX_NDIM} dimensions (N, ...), got {describe(x)}")
    if x.is_sparse:
        raise ValueError(f"{name} must be a dense (strided) tensor, got a sparse tensor of {describe(x)}")
    if floating:
        check_dtype(x, name, "floating")
    return _shape_meta(x)


def _meta_device(x: Any, group: Any) -> torch.device:
    """Where this rank's metadata tensor lives: the data's device, or the backend's natural device."""
    return x.device if isinstance(x, torch.Tensor) else comm_device(group)


def _exchange_checked(
    check: Callable[[], list[int]], length: int, device: Callable[[], torch.device], group: Any, name: str
) -> list[list[int]]:
    """Validate this rank's arguments with ``check`` and all-gather every rank's metadata (``length`` ints).

    ``device()`` (called after ``check``) gives the device of the metadata tensor.

    A rank whose ``check`` raises still takes part in the exchange, so that every rank stops with an error
    instead of leaving the others waiting in a collective: the failing rank re-raises its own error, the other
    ranks raise a :class:`ValueError` naming it.
    """
    error: TypeError | ValueError | None = None
    try:
        meta = check()
    except (TypeError, ValueError) as exc:
        error, meta = exc, [0] * length
    if len(meta) != length:  # pragma: no cover - a bug here would desynchronise the ranks
        raise RuntimeError(f"internal error: metadata of length {len(meta)}, expected {length}")
    metas = all_gather_ints([int(error is not None), *meta], device(), group)
    if error is not None:
        raise error
    failed = [r for r, m in enumerate(metas) if m[0]]
    if failed:
        raise ValueError(
            f"{name}: rank(s) {failed} rejected their arguments (see the error raised there); every rank stops "
            "so that none waits forever in a collective"
        )
    return [m[1:] for m in metas]


def _exchange_sizes(x: Any, name: str, group: Any, *, floating: bool, caller: str) -> list[int]:
    """Check ``x`` on every rank and gather every rank's first-dimension size (dtype, trailing shape must agree).

    Every rank sees the same gathered metadata, so an error is raised on every rank (no hang).
    """
    metas = _exchange_checked(
        lambda: _check_gatherable(x, name, floating=floating),
        2 + _MAX_NDIM,
        lambda: _meta_device(x, group),
        group,
        caller,
    )
    _raise_if_ranks_disagree(metas, name, skip=(2,), what="the same dtype and the same shape after dimension 0")
    return [m[2] for m in metas]


def _raise_if_ranks_disagree(metas: list[list[int]], name: str, *, skip: Iterable[int], what: str) -> None:
    skipped = set(skip)
    keys = [[v for i, v in enumerate(m) if i not in skipped] for m in metas]
    if any(k != keys[0] for k in keys[1:]):
        bad = next(r for r, k in enumerate(keys) if k != keys[0])
        raise ValueError(
            f"{name} must have {what} on every rank; rank 0 and rank {bad} differ (metadata per rank: {metas})"
        )


def _all_gather_known_sizes(x: torch.Tensor, sizes: Sequence[int], group: Any) -> torch.Tensor:
    """Concatenate every rank's ``x`` (first-dimension sizes ``sizes``, in rank order), detached."""
    return torch.cat(all_gather_rows(x, list(sizes), group))


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dimension 0.

    Backward with ``local_scale=None``: all-reduce (sum) the incoming gradient and keep the own rows, the gradient
    of the sum of all ranks' objectives. With ``local_scale=c``: ``c`` times the own rows of the incoming gradient,
    no communication; equal to the former with ``c = world size`` when every rank computes the same objective
    (what :class:`DistributedLossWrapper` guarantees), and one collective cheaper.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, sizes: list[int], rank: int, group: Any, local_scale: float | None
    ) -> torch.Tensor:
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        ctx.group = group
        ctx.local_scale = local_scale
        return _all_gather_known_sizes(x, sizes, group)

    @staticmethod
    @once_differentiable  # the all-reduce is not itself differentiable: refuse double backward loudly
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        if ctx.local_scale is not None:
            return grad_output[ctx.start : ctx.stop] * ctx.local_scale, None, None, None, None
        # A fresh contiguous copy: all_reduce works in place and autograd's buffer must not be touched.
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.stop], None, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output * ctx.scale, None


# --------------------------------------------------------------------------------------------------------------
# Public gathers
# --------------------------------------------------------------------------------------------------------------


def gather_with_grad(tensor: torch.Tensor, *, group: Any = None) -> torch.Tensor:
    r"""All-gather ``tensor`` from every rank along dimension 0, keeping the autograd graph.

    Every rank passes a tensor of shape ``(N_r, *)``; the sizes ``N_r`` may differ (also be zero), the dtype
    and the trailing shape ``*`` must agree (otherwise every rank raises the same :class:`ValueError`). The
    result, identical on every rank, is the concatenation in rank order, shape ``(sum_r N_r, *)``.

    Backward: each rank receives, for its own rows, the **sum over all ranks** of the gradients sent to the
    gathered tensor:

    .. math::

        \frac{\partial \mathcal{L}}{\partial x_r} = \Bigl[\sum_{s=0}^{R-1} \frac{\partial L_s}{\partial Y}
        \Bigr]_{\text{rows } o_r, \dots, o_r + N_r - 1},
        \qquad \mathcal{L} = \sum_s L_s,\quad o_r = \sum_{s<r} N_s,

    i.e. the true gradient of the sum of all ranks' objectives (the same convention as an all-gather followed
    by a reduce-scatter). If every rank computes the *same* loss :math:`L` of the gathered tensor, each rank's
    gradient is :math:`R \cdot \partial L / \partial x_r`, and averaging the parameter gradients over ranks
    (what :class:`~torch.nn.parallel.DistributedDataParallel` does) yields exactly :math:`\partial L/\partial
    \theta`. :class:`DistributedLossWrapper` builds on this.

    Every rank must call this function the same number of times, and every rank whose result takes part in a
    backward pass must run it (the backward pass is a collective too). Bad input on one rank raises on every
    rank (the others raise a :class:`ValueError` naming the rank), so no rank is left waiting.

    Args:
        tensor: A floating-point tensor of shape ``(N_r, *)`` with 1 to 8 dimensions, on a device the
            process group's backend supports (CPU for gloo, CUDA for NCCL).
        group: The process group (``None``: the default group).

    Returns:
        The gathered tensor of shape ``(sum_r N_r, *)``. Without an initialised process group, or with a
        single rank, ``tensor`` itself is returned.

    Raises:
        TypeError: ``tensor`` is not a floating-point tensor.
        ValueError: ``tensor`` has no dimension, or the ranks disagree on dtype or trailing shape.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> gather_with_grad(x) is x  # single process: nothing to gather
        True
    """
    if get_world_size(group) == 1:
        _check_gatherable(tensor, "tensor", floating=True)
        return tensor
    sizes = _exchange_sizes(tensor, "tensor", group, floating=True, caller="gather_with_grad")
    out: torch.Tensor = _GatherWithGrad.apply(tensor, sizes, get_rank(group), group, None)
    return out


def gather_no_grad(tensor: torch.Tensor, *, group: Any = None) -> torch.Tensor:
    """All-gather ``tensor`` (any dtype: labels, indices, masks) along dimension 0, without gradient.

    Like :func:`gather_with_grad` (unequal sizes, rank order, identical result on every rank) but the result is
    detached; use it for integer and boolean tensors.

    Args:
        tensor: A tensor of shape ``(N_r, *)`` with 1 to 8 dimensions.
        group: The process group (``None``: the default group).

    Returns:
        The gathered tensor of shape ``(sum_r N_r, *)``, detached. Without an initialised process group, or with
        a single rank, ``tensor.detach()`` (no copy).

    Raises:
        TypeError: ``tensor`` is not a tensor.
        ValueError: ``tensor`` has no dimension, or the ranks disagree on dtype or trailing shape.

    Example:
        >>> import torch
        >>> gather_no_grad(torch.tensor([3, 1, 2]))
        tensor([3, 1, 2])
    """
    if get_world_size(group) == 1:
        _check_gatherable(tensor, "tensor", floating=False)
        return tensor.detach()
    sizes = _exchange_sizes(tensor, "tensor", group, floating=False, caller="gather_no_grad")
    with torch.no_grad():
        return _all_gather_known_sizes(tensor, sizes, group)


# --------------------------------------------------------------------------------------------------------------
# Parameter helpers for jobs without DistributedDataParallel
# --------------------------------------------------------------------------------------------------------------


def _as_parameter_list(parameters: nn.Module | Iterable[torch.Tensor], name: str) -> list[torch.Tensor]:
    if isinstance(parameters, nn.Module):
        return list(parameters.parameters())
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    try:
        items = list(parameters)
    except TypeError:
        raise TypeError(
            f"{name} must be an nn.Module or an iterable of tensors, got {type(parameters).__name__}"
        ) from None
    for i, p in enumerate(items):
        check_tensor(p, f"{name}[{i}]")
    return items


def average_gradients(parameters: nn.Module | Iterable[torch.Tensor], *, group: Any = None) -> None:
    r"""Replace every ``.grad`` by its average over the ranks (in place), as DDP does after ``backward()``.

    For jobs that do not wrap the model in :class:`~torch.nn.parallel.DistributedDataParallel`: call it after
    ``loss.backward()`` and before ``optimizer.step()`` on the model's parameters, and it leaves the same
    gradients DDP would. It is a no-op without an initialised process group or with one rank. Parameters
    without a gradient are skipped; every rank must hold gradients for the same parameters (checked: every rank
    raises the same :class:`ValueError` otherwise). The gradients are flattened into one buffer per dtype, so
    the cost is one all-reduce per dtype.

    Args:
        parameters (torch.nn.Module | collections.abc.Iterable[torch.Tensor]): A module (all its parameters) or
            an iterable of tensors.
        group: The process group (``None``: the default group).

    Raises:
        TypeError: ``parameters`` is neither a module nor an iterable of tensors.
        ValueError: a gradient is sparse, or the ranks hold gradients of different parameters or sizes.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 1)
        >>> layer(torch.ones(1, 2)).sum().backward()
        >>> average_gradients(layer)  # single process: nothing changes
        >>> layer.weight.grad
        tensor([[1., 1.]])
    """
    box: dict[str, list[torch.Tensor]] = {}

    def check() -> list[int]:
        params = _as_parameter_list(parameters, "parameters")
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
            if g.is_sparse:
                raise ValueError(
                    f"average_gradients supports dense gradients only, got a sparse gradient of {describe(g)}"
                )
        box["grads"] = grads
        return [len(params), len(grads), sum(g.numel() for g in grads)]

    world = get_world_size(group)
    if world == 1:
        check()
        return
    metas = _exchange_checked(
        check, 3, lambda: _meta_device(box["grads"][0] if box.get("grads") else None, group), group, "average_gradients"
    )
    _raise_if_ranks_disagree(
        metas, "parameters", skip=(), what="gradients for the same number of parameters and elements"
    )
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for g in box["grads"]:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_parameters(module: nn.Module, *, src: int = 0, group: Any = None) -> None:
    """Copy the parameters and buffers of ``module`` from rank ``src`` to every rank (in place).

    DDP does this for the model when it is constructed; the loss's own parameters (proxies, class weights) live
    outside DDP and must start equal on every rank too. :class:`DistributedLossWrapper` calls this on its loss
    before the first distributed forward pass (``sync_parameters=True``). A no-op without an initialised
    process group or with one rank.

    Args:
        module (torch.nn.Module): The module whose parameters and buffers are overwritten with rank ``src``'s
            values.
        src: The *global* rank to copy from.
        group: The process group (``None``: the default group).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or ``group`` is not a process group.
        ValueError: ``src`` is not a non-negative integer.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 1)
        >>> before = layer.weight.detach().clone()
        >>> broadcast_parameters(layer)  # single process: nothing changes
        >>> torch.equal(layer.weight, before)
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    check_number(src, "src", low=0, integer=True)
    if get_world_size(group) == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src, group=group)


# --------------------------------------------------------------------------------------------------------------
# The loss wrapper
# --------------------------------------------------------------------------------------------------------------

#: Positions of anchors (index rows of ``embeddings``) in an indices tuple; the others index the references.
_ANCHOR_POSITIONS: dict[int, tuple[int, ...]] = {3: (0,), 4: (0, 2)}


def _check_indices_tuple(indices_tuple: Any, n: int, m: int, ref_name: str) -> tuple[torch.Tensor, ...]:
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise TypeError(
            "indices_tuple must be a tuple of 3 (anchor, positive, negative) or 4 (anchor1, positive, anchor2, "
            f"negative) 1-D integer tensors, got {describe(indices_tuple)}"
        )
    k = len(indices_tuple)
    for i, t in enumerate(indices_tuple):
        check_labels(t, f"indices_tuple[{i}]")
    lengths = [int(t.shape[0]) for t in indices_tuple]
    groups = [(0, 1, 2)] if k == 3 else [(0, 1), (2, 3)]
    for grp in groups:
        if len({lengths[i] for i in grp}) != 1:
            raise ValueError(
                f"indices_tuple[{grp[0]}..{grp[-1]}] must have equal lengths, got lengths {[lengths[i] for i in grp]}"
            )
    for i, t in enumerate(indices_tuple):
        bound, what = (n, "embeddings") if i in _ANCHOR_POSITIONS[k] else (m, ref_name)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
            raise ValueError(
                f"indices_tuple[{i}] must index the local rows of {what}, i.e. lie in [0, {bound - 1}], "
                f"got values in [{int(t.min())}, {int(t.max())}]"
            )
    return tuple(indices_tuple)


#: Layout of the metadata the wrapper exchanges: 12 structure fields that must agree on every rank, then the
#: sizes (N_r, M_r and the 4 tuple lengths) that may differ.
_WRAPPER_META_SIZES = range(12, 18)
_WRAPPER_META_LEN = 18


def _local_meta(
    embeddings: Any, labels: Any, indices_tuple: Any, ref_emb: Any, ref_labels: Any
) -> tuple[list[int], tuple[torch.Tensor, ...] | None]:
    """Validate one rank's wrapper arguments; return its metadata and its checked indices tuple."""
    check_embeddings(embeddings, "embeddings", allow_empty=True)
    n, d = int(embeddings.shape[0]), int(embeddings.shape[1])
    if labels is not None:
        check_labels(labels, "labels", length=n, length_source="embeddings.shape[0]")
    if ref_emb is not None:
        check_embeddings(ref_emb, "ref_emb", dim=d, allow_empty=True)
    elif ref_labels is not None:
        raise ValueError("ref_labels was given without ref_emb; pass both or neither")
    m = int(ref_emb.shape[0]) if ref_emb is not None else n
    if ref_labels is not None:
        check_labels(ref_labels, "ref_labels", length=m, length_source="ref_emb.shape[0]")
    local_tuple = None
    if indices_tuple is not None:
        local_tuple = _check_indices_tuple(indices_tuple, n, m, "ref_emb" if ref_emb is not None else "embeddings")

    def code(t: torch.Tensor | None) -> int:
        return -2 if t is None else _dtype_code(t.dtype)

    lengths = [int(t.shape[0]) for t in local_tuple] if local_tuple is not None else []
    structure = [
        d,
        code(embeddings),
        code(labels),
        code(ref_emb),
        code(ref_labels),
        int(ref_emb is embeddings),
        int(ref_labels is not None and ref_labels is labels),
        len(lengths),
        *[code(t) for t in (local_tuple or ())],
        *([-2] * (4 - len(lengths))),
    ]
    sizes = [n, m, *lengths, *([0] * (4 - len(lengths)))]
    return structure + sizes, local_tuple


class DistributedLossWrapper(nn.Module):
    r"""Compute a metric-learning loss on the global batch gathered from all ranks, with exact gradients.

    Drop-in for a loss with the forward signature
    ``loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``: each rank passes its
    *local* batch, the wrapper gathers embeddings (with gradient), labels, reference embeddings and labels from
    all ranks in rank order, and every rank evaluates the same loss :math:`L` of the global batch. It returns
    :math:`L` itself (not :math:`R \cdot L`), the value the single-process run on the concatenated batch
    returns.

    **Gradients.** Let rank :math:`r` of :math:`R` hold :math:`N_r` embeddings :math:`z_r = f_\theta(x_r)`, let
    :math:`Z` be the gathered batch and :math:`\phi` the loss's own parameters (proxies, class weights).
    Single-process training on the concatenated batch needs

    .. math::

        \nabla_\theta L = \sum_{r} J_\theta(z_r)^\top \frac{\partial L}{\partial z_r},
        \qquad \nabla_\phi L = \frac{\partial L}{\partial \phi}.

    With ``grad_reduction="mean"`` (the default; the convention of
    :class:`~torch.nn.parallel.DistributedDataParallel`, which *averages* gradients over ranks):

    * the embeddings are gathered with gradient, and the backward pass gives rank :math:`r` its own rows of
      :math:`\partial L/\partial Z` times :math:`R` (the same as the all-reduce of :func:`gather_with_grad`,
      since all :math:`R` ranks compute the same :math:`\partial L/\partial Z`, but without communication),
      so rank :math:`r`'s model receives :math:`g_r = R\, J_\theta(z_r)^\top \partial L/\partial z_r`; DDP's
      average :math:`\frac1R \sum_r g_r` is exactly :math:`\nabla_\theta L`;
    * the loss's own parameters get :math:`\partial L/\partial \phi` on every rank, already exact, because
      the loss value is **not** multiplied by :math:`R`. Keep them outside DDP (no reduction needed, as every
      rank computes the same gradient), or wrap them in DDP too (the average of identical gradients changes
      nothing), or call :func:`average_gradients` on them (same).

    Without DDP, call :func:`average_gradients` on the model (and, optionally, the loss) after ``backward()``.
    pytorch-metric-learning's wrapper instead multiplies the loss by :math:`R`, which fixes the model's
    gradient but gives the loss's parameters :math:`R\times` their gradient and returns :math:`R \cdot L`.

    With ``grad_reduction="sum"`` (for jobs that *sum* gradients over ranks, e.g. a manual
    ``all_reduce(SUM)`` of every parameter's gradient, loss parameters included): the returned value is still
    :math:`L`, but its backward pass starts from :math:`1/R`, so rank :math:`r` gets
    :math:`J_\theta(z_r)^\top \partial L/\partial z_r` for the model and :math:`\frac1R \partial L/\partial
    \phi` for the loss's parameters; the sums over ranks are again exactly the single-process gradients.

    **Mining.** ``indices_tuple`` passed to ``forward`` holds *local* indices (e.g. from a miner run on the local
    batch): anchors index the local ``embeddings``, positives and negatives the local ``ref_emb`` (or
    ``embeddings``). The wrapper shifts them by the rank's offset in the gathered batch and concatenates every
    rank's tuples in rank order, so the loss sees exactly the tuples of the single-process run that mines each
    rank's chunk separately. Give ``miner=`` instead to mine on the **global** batch (the same tuples on every
    rank, as a single-process miner on the concatenated batch).

    **Parameters of the loss.** Before its first distributed forward pass the wrapper copies the loss's
    parameters and buffers from the group's first rank to all ranks (:func:`broadcast_parameters`; turn off
    with ``sync_parameters=False``), as DDP does for the model. Afterwards they stay equal because every rank
    computes the same gradient. On GPUs whose kernels are not bit-for-bit deterministic they may drift apart by
    rounding over many steps; :func:`average_gradients` on the loss after ``backward()`` prevents it.

    Every rank must therefore compute the same loss: a loss or miner that draws random numbers must use the
    same seed on every rank (the loss's parameters would drift apart otherwise anyway).

    Without an initialised process group, or with a single rank, ``forward`` is exactly the bare loss (with the
    miner's tuples if ``miner`` is given).

    Every rank must call ``forward`` with the same kind of arguments (labels or not, ``ref_emb`` or not, pairs
    or triplets), the same embedding size and dtypes; otherwise every rank raises the same
    :class:`ValueError`. Invalid arguments on one rank raise there and make the other ranks raise a
    :class:`ValueError` naming that rank, so no rank waits forever in a collective. Per-rank batch sizes may
    differ and may be zero. Passing ``ref_emb=embeddings`` (the same object) hands the loss the same gathered
    object twice, so losses that exclude self-pairs when ``ref_emb is embeddings`` still do.

    Args:
        loss: The loss, a module or callable with the forward signature above (any callable that accepts
            ``(embeddings, labels)`` works when the other arguments are not used). A module's parameters become
            parameters of the wrapper (``wrapper.loss``).
        miner: Optional callable ``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` returning an
            indices tuple, run on the gathered batch.
        grad_reduction: ``"mean"`` if gradients are averaged over ranks (DDP, :func:`average_gradients`),
            ``"sum"`` if they are summed.
        sync_parameters: Broadcast the loss's parameters and buffers before the first distributed forward.
        group: The process group (``None``: the default group).

    Shape:
        - embeddings: ``(N_r, D)`` floating point, the local batch; ``N_r`` may differ between ranks.
        - labels: ``(N_r,)`` integer, or ``None``.
        - indices_tuple: 3 or 4 ``(K_r,)`` integer tensors of local indices, or ``None``.
        - ref_emb: ``(M_r, D)``, ref_labels: ``(M_r,)``, or ``None``.
        - output: the scalar the loss returns for the global batch.

    Raises:
        TypeError: ``loss`` or ``miner`` is not callable, or a forward argument has the wrong type or dtype.
        ValueError: a bad ``grad_reduction``; both ``indices_tuple`` and ``miner``; shapes or indices that do
            not fit the local batch; ranks that disagree on the kind of arguments.

    Example:
        >>> import torch
        >>> from dml_bias.losses import ProxyAnchorLoss
        >>> loss = ProxyAnchorLoss(num_classes=4, embedding_size=8)
        >>> wrapped = DistributedLossWrapper(loss)
        >>> embeddings, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1])
        >>> torch.equal(wrapped(embeddings, labels), loss(embeddings, labels))  # single process: the bare loss
        True
        >>> [name for name, _ in wrapped.named_parameters()]  # the proxies, for the optimizer
        ['loss.proxies']

        In a job started with ``torchrun`` (one process per GPU), the training step reads::

            model = DistributedDataParallel(backbone.cuda(), device_ids=[local_rank])
            criterion = DistributedLossWrapper(ProxyAnchorLoss(num_classes, 512).cuda())
            optimizer = torch.optim.AdamW([*model.parameters(), *criterion.parameters()])
            value = criterion(model(images), labels)  # the global loss, the same on every rank
            value.backward()  # model: exact after DDP's average; proxies: exact on every rank
            optimizer.step()
    """

    def __init__(
        self,
        loss: Callable[..., torch.Tensor],
        *,
        miner: Callable[..., Sequence[torch.Tensor]] | None = None,
        grad_reduction: str = "mean",
        sync_parameters: bool = True,
        group: Any = None,
    ) -> None:
        super().__init__()
        if not callable(loss):
            raise TypeError(f"loss must be a callable (e.g. an nn.Module loss), got {type(loss).__name__}")
        if miner is not None and not callable(miner):
            raise TypeError(f"miner must be a callable or None, got {type(miner).__name__}")
        check_choice(grad_reduction, "grad_reduction", _GRAD_REDUCTIONS)
        check_bool(sync_parameters, "sync_parameters")
        self.loss = loss
        self.miner = miner
        self.grad_reduction = grad_reduction
        self.sync_parameters = sync_parameters
        self.group = group
        self._synced = False

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return f"grad_reduction={self.grad_reduction!r}, sync_parameters={self.sync_parameters}"

    def _check_no_conflict(self, indices_tuple: Any) -> None:
        if indices_tuple is not None and self.miner is not None:
            raise ValueError(
                "pass either indices_tuple (local indices) or a miner (mining on the gathered batch), not both"
            )

    def _call_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: Sequence[torch.Tensor] | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.miner is not None:
            refs = {k: v for k, v in (("ref_emb", ref_emb), ("ref_labels", ref_labels)) if v is not None}
            indices_tuple = tuple(self.miner(embeddings, labels, **refs))
        optional = (("indices_tuple", indices_tuple), ("ref_emb", ref_emb), ("ref_labels", ref_labels))
        kwargs = {k: v for k, v in optional if v is not None}
        if labels is None:
            return self.loss(embeddings, **kwargs)
        return self.loss(embeddings, labels, **kwargs)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: Sequence[torch.Tensor] | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the loss of the global batch (see the class docstring for the arguments and gradients)."""
        group = self.group
        world = get_world_size(group)
        if world == 1:
            self._check_no_conflict(indices_tuple)
            return self._call_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)

        # One small collective carries every rank's sizes and the structure of its arguments; a rank whose
        # arguments are invalid takes part too, so that every rank raises instead of hanging.
        local: dict[str, Any] = {}

        def check() -> list[int]:
            self._check_no_conflict(indices_tuple)
            meta, local["tuple"] = _local_meta(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            return meta

        metas = _exchange_checked(
            check, _WRAPPER_META_LEN, lambda: _meta_device(embeddings, group), group, "DistributedLossWrapper"
        )
        _raise_if_ranks_disagree(
            metas,
            "the arguments of DistributedLossWrapper.forward",
            skip=_WRAPPER_META_SIZES,
            what=(
                "the same structure (labels, indices_tuple, ref_emb and ref_labels given or not, ref_emb being "
                "embeddings or not, pairs or triplets), the same embedding size and the same dtypes"
            ),
        )
        sizes_n = [meta_r[_WRAPPER_META_SIZES.start] for meta_r in metas]
        sizes_m = [meta_r[_WRAPPER_META_SIZES.start + 1] for meta_r in metas]

        if self.sync_parameters and not self._synced:
            if isinstance(self.loss, nn.Module):
                src = 0 if group is None else int(dist.get_global_rank(group, 0))
                broadcast_parameters(self.loss, src=src, group=group)
            self._synced = True

        rank = get_rank(group)
        device = embeddings.device
        all_emb: torch.Tensor = _GatherWithGrad.apply(embeddings, sizes_n, rank, group, float(world))
        all_labels = None if labels is None else _all_gather_known_sizes(labels.to(device), sizes_n, group)
        # ``ref_emb is embeddings`` keeps its identity after gathering (losses exclude self-pairs on identity).
        all_ref: torch.Tensor | None
        if ref_emb is None or ref_emb is embeddings:
            all_ref = None if ref_emb is None else all_emb
        else:
            all_ref = _GatherWithGrad.apply(ref_emb, sizes_m, rank, group, float(world))
        all_ref_labels: torch.Tensor | None
        if ref_labels is None or (ref_labels is labels and ref_emb is embeddings):
            all_ref_labels = None if ref_labels is None else all_labels
        else:
            all_ref_labels = _all_gather_known_sizes(ref_labels.to(device), sizes_m, group)

        global_tuple = None
        local_tuple = local["tuple"]
        if local_tuple is not None:
            k = len(local_tuple)
            offset_n = sum(sizes_n[:rank])
            offset_m = sum(sizes_m[:rank])
            global_tuple = tuple(
                _all_gather_known_sizes(
                    t.to(device) + (offset_n if i in _ANCHOR_POSITIONS[k] else offset_m),
                    [meta_r[_WRAPPER_META_SIZES.start + 2 + i] for meta_r in metas],
                    group,
                )
                for i, t in enumerate(local_tuple)
            )

        value = self._call_loss(all_emb, all_labels, global_tuple, all_ref, all_ref_labels)
        if self.grad_reduction == "sum":
            value = _ScaleGrad.apply(value, 1.0 / world)
        return value
