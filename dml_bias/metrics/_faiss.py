"""Optional faiss backend for the brute-force neighbour search (faiss is imported only when called).

Install it with ``pip install "dml-bias[faiss]"`` (CPU) or ``pip install "dml-bias[faiss-gpu]"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dml_bias._checks import (
    check_bool,
    check_choice,
    check_embeddings,
    check_finite,
    check_number,
    check_query_reference,
    describe,
)
from dml_bias.metrics._exact import exact_knn
from dml_bias.similarity import METRICS, normalize

__all__ = ["FAISS_GPU_MAX_K", "faiss_knn"]

#: The largest ``k`` faiss' GPU search accepts (``GPU_MAX_SELECTION_K`` of CUDA builds); above it
#: :func:`faiss_knn` falls back to the exact torch search.
FAISS_GPU_MAX_K: int = 2048

_GPU_RESOURCES: dict[int, Any] = {}


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            'faiss_knn needs faiss, which is not installed: pip install "dml-bias[faiss]" (CPU) or '
            'pip install "dml-bias[faiss-gpu]" (CUDA)'
        ) from error
    return faiss


def _faiss_gpu_usable(faiss: Any, device: torch.device, k: int) -> bool:
    """Whether faiss' GPU search can serve this call (a CUDA query, a GPU build of faiss, ``k <= 2048``)."""
    return device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and k <= FAISS_GPU_MAX_K


def faiss_knn(
    query: torch.Tensor,
    reference: torch.Tensor | None = None,
    k: int | None = None,
    *,
    metric: str = "cosine",
    exclude_self: bool | None = None,
    normalize_embeddings: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force top-``k`` search with faiss (``IndexFlat`` semantics): a fast cross-check of ``knn``.

    Same arguments and outputs as :func:`~dml_bias.metrics.knn`, computed by ``faiss.knn`` (CPU) or
    ``faiss.knn_gpu`` (CUDA inputs with a GPU build of faiss). faiss computes in float32 and does not define
    the order of tied neighbours, so unlike :func:`~dml_bias.metrics.knn` the result is **not** guaranteed to
    break ties by the lower index nor to be exact to the last bit. On the GPU faiss caps ``k`` at 2048
    (:data:`FAISS_GPU_MAX_K`); above it the call falls back to the exact torch search
    :func:`~dml_bias.metrics.knn`, so any ``k`` works. Inputs are copied to host float32 arrays.

    Args:
        query: ``(Q, D)`` floating-point queries, finite.
        reference: ``(N, D)`` reference set, or ``None`` for the query set itself.
        k: Number of neighbours, ``1 <= k <= N`` (``N - 1`` when excluding self).
        metric: ``"cosine"`` (rows normalised, inner product), ``"dot"``, ``"euclidean"`` or
            ``"squared_euclidean"``.
        exclude_self: Drop query ``i``'s own row ``i`` from its neighbours; ``None`` means ``True`` when
            ``reference`` is ``None``. Requires the query set to be the reference set.
        normalize_embeddings: L2-normalise the rows before a Euclidean or dot metric (``None``: ``True`` for the
            Euclidean metrics, ``False`` for ``"dot"``; cosine always normalises), as in
            :func:`~dml_bias.metrics.knn`.

    Returns:
        ``(scores, indices)``, both ``(Q, k)`` on ``query``'s device: float32 scores (similarities decreasing,
        distances increasing) and int64 reference indices.

    Raises:
        ImportError: If faiss is not installed (the message names the extra to install).

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
        >>> scores, indices = faiss_knn(x, k=1)  # each row against the others
        >>> indices.flatten().tolist()
        [1, 0, 1]
    """
    check_choice(metric, "metric", METRICS)
    check_embeddings(query, "query")  # before the other checks, which read its shape
    check_bool(normalize_embeddings, "normalize_embeddings", allow_none=True)
    if exclude_self is None:
        exclude_self = reference is None
    reference = check_query_reference(query, reference)
    if exclude_self and reference.shape[0] != query.shape[0]:
        raise ValueError(
            f"exclude_self=True needs the query set to be the reference set, got query {describe(query)} and "
            f"reference {describe(reference)}"
        )
    if k is None:
        raise TypeError("k must be given (the number of neighbours)")
    available = int(reference.shape[0]) - int(exclude_self)
    check_number(k, "k", low=1, high=max(1, available), integer=True)
    if k > available:
        raise ValueError(f"k must be at most {available} (reference rows available per query), got {k}")
    check_finite(query, "query")
    check_finite(reference, "reference")
    faiss = _import_faiss()
    device = query.device
    if device.type == "cuda" and not _faiss_gpu_usable(faiss, device, k + int(exclude_self)):
        # faiss' GPU selection stops at k = 2048 (or faiss has no GPU support): the torch path has no cap.
        return exact_knn(
            query,
            reference,
            k,
            metric=metric,
            exclude_self=exclude_self,
            chunk_size=None,
            normalize_embeddings=normalize_embeddings,
        )

    q = query.detach().to(torch.float32)
    r = reference.detach().to(torch.float32)
    if metric == "cosine" or (metric != "dot" if normalize_embeddings is None else normalize_embeddings):
        q, r = normalize(q), normalize(r)
    xq = np.ascontiguousarray(q.cpu().numpy())
    xb = xq if reference is query else np.ascontiguousarray(r.cpu().numpy())
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric in ("cosine", "dot") else faiss.METRIC_L2
    search_k = k + int(exclude_self)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        resources = _GPU_RESOURCES.setdefault(index, faiss.StandardGpuResources())
        distances, neighbours = faiss.knn_gpu(resources, xq, xb, search_k, metric=faiss_metric, device=index)
    else:
        distances, neighbours = faiss.knn(xq, xb, search_k, metric=faiss_metric)
    scores = torch.from_numpy(np.ascontiguousarray(distances))
    indices = torch.from_numpy(np.ascontiguousarray(neighbours)).to(torch.int64)
    if exclude_self:
        # Drop each row's own entry; where ties pushed it out of the list, drop the last (worst) entry instead.
        own = indices == torch.arange(indices.shape[0])[:, None]
        own[:, -1] |= ~own.any(dim=1)
        scores = scores[~own].view(-1, k)
        indices = indices[~own].view(-1, k)
    if metric == "euclidean":
        scores = scores.clamp_min(0.0).sqrt()
    elif metric == "squared_euclidean":
        scores = scores.clamp_min(0.0)
    return scores.to(device), indices.to(device)
