r"""Exact k-nearest-neighbour search in bounded memory.

:func:`knn` returns the exact top-``k`` reference items of every query, best first. "Exact" means: the order
is the order of the scores computed in float64 from the (float32, float16, ...) inputs, with ties broken by
the lower reference index, whatever matmul precision (TF32, bf16 "medium" precision on the CPU, reduced-
precision reductions) the user has switched on.

How it is computed (see :doc:`the metrics page </api/metrics>` for the error bounds):

1. A bulk pass computes approximate scores per block of queries, with a proven error bound. For cosine and
   dot scores it is one 16-bit GEMM (bf16 on CPUs with native bf16 dot products, float16 on CUDA; float32
   accumulation) or, elsewhere, one float32 GEMM; the ``k``-th largest of the *group maxima* of each row (a
   group is a strided set of up to 16 reference items; when a row has more than ``16 k`` groups, the maxima of
   several groups are merged first, so the selection runs on at least ``8 k`` values) gives a threshold below
   which no item of the exact top-``k`` can lie. When the query set is the reference set and ``N^2`` bulk
   scores fit the memory budget, only the tiles on and above the diagonal are computed (the scores are
   symmetric). For the Euclidean
   metrics (and ``k`` above a sixteenth of the reference) the bulk pass is one float32 GEMM per block and the
   candidates are the items within :math:`2\varepsilon` of the approximate ``k``-th best. TF32 and the CPU's
   bf16 "medium" precision are switched off during the call and the user's settings restored afterwards.
2. The candidates (which always hold the exact top-``k``) get float32 scores with their float32 bound.
3. Candidates whose float32 scores lie too close to another candidate's to be ordered safely are re-scored
   exactly in float64, and the candidates are sorted by (score, reference index). The list metrics of
   :func:`~dml_bias.metrics.retrieval_metrics` need only the sequence of relevant and other items: there only
   runs of near-tied candidates that mix both kinds are re-scored and re-ordered.

Extra memory is bounded by ``chunk_size`` query rows at a time, or by a memory budget (2 GiB by default)
from which the block size is derived; no ``N x N`` matrix is formed unless it fits the budget.
"""

from __future__ import annotations

import torch

from dml_bias._checks import check_choice
from dml_bias.metrics._exact import exact_knn
from dml_bias.metrics._faiss import faiss_knn

__all__ = ["knn"]


def knn(
    query: torch.Tensor,
    reference: torch.Tensor | None = None,
    k: int = 1,
    *,
    metric: str = "cosine",
    exclude_self: bool | None = None,
    chunk_size: int | None = None,
    normalize_embeddings: bool | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact ``k`` nearest reference items of every query, best first.

    The score of query :math:`q` and reference item :math:`r` is computed in float64 from the inputs:

    .. math::

        s(q, r) = \hat q^\top \hat r \;(\text{cosine}),\quad q^\top r \;(\text{dot}),\quad
        d(q, r) = \lVert q - r \rVert_2 \;(\text{euclidean}),\quad d(q, r)^2 \;(\text{squared\_euclidean})

    with :math:`\hat x = x / \max(\lVert x \rVert_2, 10^{-12})`. Neighbours are sorted by decreasing
    similarity (cosine, dot) or increasing distance (Euclidean); **ties are broken by the lower reference
    index, always**. The result does not depend on ``chunk_size``, on the order of the blocks, nor on the
    TF32 / float32-matmul-precision settings (these are pinned to IEEE float32 during the call and
    restored afterwards).

    Args:
        query: ``(Nq, D)`` floating-point embeddings; must be finite.
        reference: ``(M, D)`` floating-point embeddings on the same device. ``None`` searches the query set
            against itself, each query's own row excluded.
        k: Number of neighbours, ``1 <= k <= M`` (``M - 1`` when self is excluded). There is no other cap.
        metric: ``"cosine"``, ``"dot"``, ``"euclidean"`` or ``"squared_euclidean"``.
        exclude_self: Leave out reference item ``i`` from the neighbours of query ``i``. Defaults to ``True``
            when ``reference`` is ``None`` and ``False`` otherwise; with a reference given, ``True`` means
            query ``i`` is reference item ``i`` (``Nq <= M`` is then required).
        chunk_size: Number of query rows handled at a time. ``None`` derives it from a 2 GiB budget for the
            extra memory (roughly ``16 * M`` bytes per query row plus the candidates).
        normalize_embeddings: L2-normalise the rows before a Euclidean or dot metric, as in
            :func:`dml_bias.similarity.pairwise` (default there: ``True`` for the Euclidean metrics, ``False``
            for ``"dot"``; cosine always normalises).
        backend: ``"torch"`` (default: exact, as described above) or ``"faiss"``: brute-force search by faiss
            (:func:`~dml_bias.metrics.faiss_knn`; needs the ``faiss`` or ``faiss-gpu`` extra). faiss scores in
            float32 and does not define the order of near-ties; above faiss' GPU limit of ``k = 2048`` it falls
            back to the exact torch search.

    Returns:
        ``(scores, indices)``, both ``(Nq, k)``: the similarities or distances (float32, or float64 for
        float64 queries; rounded from the float64 values that define the order) and the int64 reference
        indices, best first.

    Raises:
        TypeError: Non-tensor or non-floating inputs.
        ValueError: Wrong dimensions, NaN/inf values, devices that differ, ``k`` out of range.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
        >>> scores, indices = knn(x, k=2)
        >>> indices
        tensor([[3, 1],
                [0, 3],
                [1, 0],
                [0, 1]])
        >>> scores[0]
        tensor([1.0000, 0.8000])
        >>> knn(x[:1], x, k=2, metric="euclidean")[1]
        tensor([[0, 3]])
    """
    check_choice(backend, "backend", ("torch", "faiss"))
    if backend == "faiss":
        return faiss_knn(
            query, reference, k, metric=metric, exclude_self=exclude_self, normalize_embeddings=normalize_embeddings
        )
    return exact_knn(
        query,
        reference,
        k,
        metric=metric,
        exclude_self=exclude_self,
        chunk_size=chunk_size,
        normalize_embeddings=normalize_embeddings,
    )
