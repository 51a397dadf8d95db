r"""One place that turns embeddings into similarity or distance matrices.

Losses, miners, metrics and heads call :func:`pairwise` rather than re-deriving these formulas.

Metrics (``metric=``):

* ``"cosine"``: :math:`s_{ij} = \\hat x_i^\\top \\hat y_j` with
  :math:`\\hat x = x / \\max(\\lVert x\\rVert_2, \\epsilon)`
  (a similarity: larger is closer).
* ``"dot"``: :math:`s_{ij} = x_i^\\top y_j` (a similarity, no normalisation by default).
* ``"euclidean"``: :math:`d_{ij} = \\lVert x_i - y_j \\rVert_2` (a distance: smaller is closer); embeddings are
  L2-normalised first by default, as in pytorch-metric-learning's ``LpDistance``.
* ``"squared_euclidean"``: :math:`d_{ij}^2` (a distance), normalised first by default.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from dml_bias._checks import check_choice, check_dtype, check_query_reference, check_tensor

__all__ = ["METRICS", "Metric", "is_similarity", "normalize", "pairwise"]

Metric = Literal["cosine", "dot", "euclidean", "squared_euclidean"]

#: The metric names accepted by :func:`pairwise`.
METRICS: tuple[str, ...] = ("cosine", "dot", "euclidean", "squared_euclidean")


def is_similarity(metric: str) -> bool:
    """Return ``True`` if larger values of ``metric`` mean closer (cosine, dot), ``False`` for distances.

    Example:
        >>> is_similarity("cosine"), is_similarity("euclidean")
        (True, False)
    """
    check_choice(metric, "metric", METRICS)
    return metric in ("cosine", "dot")


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r"""L2-normalise the rows of ``x`` (shape ``(N, D)``): :math:`x / \max(\lVert x \rVert_2, \epsilon)`.

    The value of :func:`torch.nn.functional.normalize` with ``p=2``, but each row is first divided by its largest
    magnitude :math:`s` (a constant for autograd: neither the value nor the gradient depends on it), so the
    squares never overflow or underflow: ``[[3e20, 4e20]]`` in float32 gives ``[[0.6, 0.8]]`` (where
    :func:`torch.nn.functional.normalize` squares ``3e20`` to ``inf`` and returns zeros). A row of zeros stays
    zero; rows of norm below ``eps`` are divided by ``eps``, as in torch.

    Args:
        x: ``(..., D)`` floating-point tensor; the last dimension is normalised. Not modified.
        eps: The floor of the norm.

    Returns:
        A tensor of the shape and dtype of ``x``.

    Example:
        >>> import torch
        >>> normalize(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
        >>> normalize(torch.tensor([[3e20, 4e20], [0.0, 0.0]]))
        tensor([[0.6000, 0.8000],
                [0.0000, 0.0000]])
    """
    check_tensor(x, "x")
    check_dtype(x, "x", "floating")
    if x.ndim == 0 or x.shape[-1] == 0 or x.numel() == 0:
        return F.normalize(x, p=2.0, dim=-1, eps=eps)
    detached = x.detach()
    # max |x| per row, without an |x| copy (and faster than vector_norm(ord=inf) on the CPU)
    peak = torch.maximum(detached.amax(dim=-1, keepdim=True), -detached.amin(dim=-1, keepdim=True))
    scale = torch.where(peak > 0, peak, torch.ones_like(peak))
    unit = x / scale  # largest magnitude 1: the squares below neither overflow nor underflow to 0
    # max(|x|, eps) / s == max(|x / s|, eps / s): the same value as torch's, with the same (detached) floor.
    return unit / torch.linalg.vector_norm(unit, dim=-1, keepdim=True).clamp_min(eps / scale)


def pairwise(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    metric: str = "cosine",
    *,
    normalize_embeddings: bool | None = None,
) -> torch.Tensor:
    """Compute the ``(N, M)`` matrix of similarities or distances between the rows of ``x`` and ``y``.

    Args:
        x: Embeddings of shape ``(N, D)``, floating point.
        y: Embeddings of shape ``(M, D)``; ``None`` means ``x`` itself.
        metric: One of :data:`METRICS`.
        normalize_embeddings: L2-normalise the rows first. ``None`` picks the default of the metric:
            ``True`` for ``"cosine"``, ``"euclidean"`` and ``"squared_euclidean"``, ``False`` for ``"dot"``.
            ``"cosine"`` always normalises.

    Returns:
        A tensor of shape ``(N, M)`` in the dtype of ``x``. Distances are never negative, and the gradient of
        the Euclidean distance at zero distance is zero rather than NaN.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> pairwise(x, metric="cosine")
        tensor([[1., 0.],
                [0., 1.]])
        >>> pairwise(x, metric="euclidean", normalize_embeddings=False)
        tensor([[0.0000, 2.2361],
                [2.2361, 0.0000]])
    """
    check_choice(metric, "metric", METRICS)
    y = check_query_reference(x, y, "x", "y")
    if normalize_embeddings is None:
        normalize_embeddings = metric != "dot"
    if metric == "cosine" or normalize_embeddings:
        same = y is x
        x = normalize(x)
        y = x if same else normalize(y)
    if metric in ("cosine", "dot"):
        return x @ y.transpose(0, 1)
    # |x - y|^2 = |x|^2 + |y|^2 - 2 x.y, clamped at 0 against round-off.
    sq = (x * x).sum(1, keepdim=True) + (y * y).sum(1).unsqueeze(0) - 2.0 * (x @ y.transpose(0, 1))
    sq = sq.clamp_min(0.0)
    if metric == "squared_euclidean":
        return sq
    positive = sq > 0
    # where() keeps the gradient finite at zero distance: the clamped branch has zero gradient there.
    return torch.where(positive, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), torch.zeros_like(sq))
