r"""Exact k-nearest-neighbour search in bounded memory.

:func:`knn` returns the exact top-``k`` reference items of every query, best first. "Exact" means: the order
is the order of the scores computed in float64 from the (float32, float16, ...) inputs, with ties broken by
the lower reference index, whatever matmul precision (TF32, bf16 "medium" precision on the CPU, reduced-
precision reductions) the user has switched on.

How it is computed (see :doc:`the metrics page </api/metrics>` for the error bound):

1. A bulk pass computes approximate scores with one float32 GEMM per block of queries (TF32 and the CPU's
   bf16 "medium" precision are switched off during the call and the user's settings restored afterwards).
2. The bulk scores carry a proven error bound :math:`\varepsilon`; every item whose approximate score lies
   within :math:`2\varepsilon` of the approximate ``k``-th best is a candidate. The candidates always hold
   the exact top-``k``.
3. Candidates whose approximate scores lie too close to another candidate's to be ordered safely are
   re-scored exactly in float64, and the candidates are sorted by (score, reference index).

Extra memory is bounded by ``chunk_size`` query rows at a time, or by a memory budget (2 GiB by default)
from which the block size is derived; an ``N x N`` matrix is never formed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dml_bias._checks import (
    check_choice,
    check_finite,
    check_number,
    check_query_reference,
    describe,
)
from dml_bias.similarity import METRICS

__all__ = ["knn"]

#: Default bound, in bytes, on the extra memory used by one block of work.
MEMORY_BUDGET = 2 * 2**30

_U32 = 2.0**-24  # unit roundoff of float32 (round to nearest)
_U64 = 2.0**-53  # unit roundoff of float64


def _gamma(n: int, u: float) -> float:
    r"""Higham's :math:`\gamma_n = nu / (1 - nu)`: the relative error bound of an ``n``-term dot product."""
    return n * u / (1.0 - n * u)


@contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """Run float32 matmuls in full IEEE float32 (no TF32, no bf16), restoring the user's settings afterwards."""
    cuda_mm = torch.backends.cuda.matmul
    mkldnn_mm = torch.backends.mkldnn.matmul  # type: ignore[attr-defined]
    saved = (
        cuda_mm.fp32_precision,
        mkldnn_mm.fp32_precision,
        cuda_mm.allow_fp16_reduced_precision_reduction,
        cuda_mm.allow_bf16_reduced_precision_reduction,
    )
    try:
        cuda_mm.fp32_precision = "ieee"
        mkldnn_mm.fp32_precision = "ieee"
        cuda_mm.allow_fp16_reduced_precision_reduction = False
        cuda_mm.allow_bf16_reduced_precision_reduction = False
        yield
    finally:
        cuda_mm.fp32_precision = saved[0]
        mkldnn_mm.fp32_precision = saved[1]
        cuda_mm.allow_fp16_reduced_precision_reduction = saved[2]
        cuda_mm.allow_bf16_reduced_precision_reduction = saved[3]


@dataclass
class _Prepared:
    """Validated inputs in the canonical float64 form, plus what every block needs."""

    query: torch.Tensor  # (Nq, D) float64, normalised if the metric asks for it
    reference: torch.Tensor  # (M, D) float64
    query32: torch.Tensor  # (Nq, D) float32 copies for the bulk GEMM
    reference32: torch.Tensor  # (M, D) float32
    query_norm: torch.Tensor  # (Nq,) float64 row norms
    query_sqnorm: torch.Tensor  # (Nq,) float64 squared row norms (distance keys)
    reference_sqnorm32: torch.Tensor  # (M,) float32 squared norms (Euclidean bulk scores)
    distance: bool  # True for the Euclidean metrics
    exclude_self: bool
    eps: torch.Tensor  # (Nq,) float64 bound on |bulk key - exact key|
    out_dtype: torch.dtype
    # bf16 candidate pass (cosine/dot on CPUs with native bf16): copies and the input part of its bound.
    query16: torch.Tensor | None = None
    reference16: torch.Tensor | None = None
    eps16: torch.Tensor | None = None  # (Nq,) float64, without the output-rounding term

    @property
    def num_query(self) -> int:
        return int(self.query.shape[0])

    @property
    def num_reference(self) -> int:
        return int(self.reference.shape[0])


def _prepare(
    query: torch.Tensor,
    reference: torch.Tensor | None,
    metric: str,
    exclude_self: bool | None,
    normalize_embeddings: bool | None,
) -> _Prepared:
    check_choice(metric, "metric", METRICS)
    same = reference is None
    reference = check_query_reference(query, reference)
    if exclude_self is None:
        exclude_self = same
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool or None, got {describe(exclude_self)}")
    if exclude_self and query.shape[0] > reference.shape[0]:
        raise ValueError(
            "exclude_self=True means query i is reference i, so query must not have more rows than reference "
            f"({reference.shape[0]}), got query of {describe(query)}"
        )
    if normalize_embeddings is not None and not isinstance(normalize_embeddings, bool):
        raise TypeError(f"normalize_embeddings must be a bool or None, got {describe(normalize_embeddings)}")
    check_finite(query, "query")
    if not same:
        check_finite(reference, "reference")
    normalise = metric == "cosine" or (metric != "dot" if normalize_embeddings is None else normalize_embeddings)
    q64 = query.detach().to(torch.float64)
    r64 = q64 if same else reference.detach().to(torch.float64)
    if normalise:
        q64 = q64 / q64.norm(dim=1, keepdim=True).clamp_min(1e-12)
        r64 = q64 if same else r64 / r64.norm(dim=1, keepdim=True).clamp_min(1e-12)
    q32 = q64.to(torch.float32)
    r32 = q32 if same else r64.to(torch.float32)
    if not (bool(torch.isfinite(q32).all()) and bool(torch.isfinite(r32).all())):
        raise ValueError("query and reference must fit in float32 for the bulk pass (values above 3.4e38 found)")
    qn = q64.norm(dim=1)
    rn = r64.norm(dim=1)
    rmax = float(rn.max())
    dim = int(q64.shape[1])
    distance = metric in ("euclidean", "squared_euclidean")
    # |fl32(q32 . r32) - q64 . r64| <= c * |q| |r|: input rounding (2u + u^2), float32 accumulation over D
    # terms (IEEE round to nearest on the CPU; u doubled on accelerators to cover other rounding modes), and
    # the float64 re-scoring.
    u_acc = _U32 if q64.device.type == "cpu" else 2 * _U32
    c = 2 * _U32 + _U32**2 + _gamma(dim, u_acc) * (1 + _U32) ** 2 + 2 * _gamma(dim + 2, _U64)
    if distance:
        # bulk key = 2 fl(q.r) - |r|^2 (float32) - |q|^2 (float64), exact key = -|q - r|^2 (float64); the
        # float32 subtraction and the squared norms add at most 8u (|q| + |r|)^2.
        eps = 2 * c * qn * rmax + 8 * _U32 * (qn + rmax) ** 2 + 4 * _gamma(dim + 2, _U64) * (qn + rmax) ** 2
    else:
        eps = c * qn * rmax
    out_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q16 = r16 = eps16 = None
    if not distance and _use_bf16(q64.device):
        q16 = q32.to(torch.bfloat16)
        r16 = q16 if same else r32.to(torch.bfloat16)
        # |x16.y16 - x.y| <= |x16||r_y| + |r_x||y16| + |r_x||r_y| with r = x - x16 (exact, per row), plus the
        # float32 accumulation of D exact bf16 products and the float64 re-scoring.
        qh, rh = q16.to(torch.float64), r16.to(torch.float64)
        q_res, r_res = (q64 - qh).norm(dim=1), (r64 - rh).norm(dim=1)
        qhn, rhn = qh.norm(dim=1), float(rh.norm(dim=1).max())
        rres = float(r_res.max())
        eps16 = (qhn * rres + q_res * rhn + q_res * rres + _gamma(dim, 2 * _U32) * qhn * rhn) * (1 + 2**-20)
        eps16 = eps16 + 2 * _gamma(dim + 2, _U64) * qn * rmax
    return _Prepared(
        query=q64,
        reference=r64,
        query32=q32,
        reference32=r32,
        query_norm=qn,
        query_sqnorm=(q64 * q64).sum(1),
        reference_sqnorm32=(r32.to(torch.float64) ** 2).sum(1).to(torch.float32),
        distance=distance,
        exclude_self=exclude_self,
        eps=eps,
        out_dtype=out_dtype,
        query16=q16,
        reference16=r16,
        eps16=eps16,
    )


#: Run the candidate pass of cosine/dot top-k in bf16 on the CPU (exact all the same: bf16 candidates, float32
#: re-scoring, float64 for near-ties). Off by default: on a shared 2-core AVX512-BF16 machine the bf16 GEMM is
#: 2-3x faster but the end-to-end gain after conversion, selection and re-scoring was not reliable.
_BF16_CPU = False


def _use_bf16(device: torch.device) -> bool:
    """Whether the candidate pass runs in bf16 (CPU only, when :data:`_BF16_CPU` is set)."""
    return device.type == "cpu" and _BF16_CPU


def _exact_keys(prep: _Prepared, rows: torch.Tensor, cols: torch.Tensor, budget: int) -> torch.Tensor:
    """Exact float64 keys (larger is closer) of the pairs ``(rows[i], cols[i])``, chunked to the budget.

    The key of a pair depends only on the two rows (an element-wise product or difference summed over the
    last dimension), so duplicated embeddings get identical keys and the tie rule applies to them.
    For distances the key is ``-|q - r|^2`` (larger is closer); the bulk key minus ``|q|^2`` approximates it.
    """
    dim = max(1, int(prep.query.shape[1]))
    n = int(rows.shape[0])
    out = torch.empty(n, dtype=torch.float64, device=rows.device)
    if n == 0:
        return out
    # Small chunks into reused buffers: the pairs are scattered, and fresh large temporaries cost page faults.
    step = max(1, min(n, budget // (2 * 8 * dim), 2**21 // dim))
    qbuf = torch.empty(step, dim, dtype=torch.float64, device=rows.device)
    ybuf = torch.empty(step, dim, dtype=torch.float64, device=rows.device)
    for s in range(0, n, step):
        r, c = rows[s : s + step], cols[s : s + step]
        q, y = qbuf[: r.shape[0]], ybuf[: r.shape[0]]
        torch.index_select(prep.query, 0, r, out=q)
        torch.index_select(prep.reference, 0, c, out=y)
        if prep.distance:
            q.sub_(y).square_()
            torch.sum(q, 1, out=out[s : s + step]).neg_()
        else:
            q.mul_(y)
            torch.sum(q, 1, out=out[s : s + step])
    return out


def _key_to_score(prep: _Prepared, keys: torch.Tensor, metric: str) -> torch.Tensor:
    """Turn exact keys back into the user-facing score (similarity or distance)."""
    if not prep.distance:
        return keys
    sq = -keys
    return sq if metric == "squared_euclidean" else sq.sqrt()


def _bulk_keys(prep: _Prepared, start: int, stop: int) -> torch.Tensor:
    """Approximate keys ``(stop - start, M)`` in float32, with the query's own column at ``-inf``."""
    with _ieee_fp32_matmul():
        a = prep.query32[start:stop] @ prep.reference32.T
    if prep.distance:
        a = a.mul_(2.0).sub_(prep.reference_sqnorm32)
    if prep.exclude_self:
        rows = torch.arange(stop - start, device=a.device)
        a[rows, rows + start] = -math.inf
    return a


#: Preferred number of bulk scores per block (speed: the block stays in cache-friendly sizes).
_TARGET_BLOCK = 2**23


def _block_rows(num_query: int, per_row_bytes: int, chunk_size: int | None, budget: int, width: int = 0) -> int:
    """Query rows per block: ``chunk_size`` if given, else what fits the budget (and a speed-friendly size)."""
    if chunk_size is not None:
        return min(chunk_size, num_query)
    rows = budget // max(per_row_bytes, 1)
    if width > 0:
        rows = min(rows, max(64, _TARGET_BLOCK // width))
    return max(1, min(num_query, rows))


def _grid_keys(prep: _Prepared, start: int, cols: torch.Tensor, budget: int) -> torch.Tensor:
    """Float64 keys of query rows ``start + i`` against ``cols[i, j]`` (``(R, C)``), via batched GEMV.

    Used only for *returned values*: the order was fixed before, by the exact element-wise keys.
    """
    nrows, width = cols.shape
    dim = max(1, int(prep.reference.shape[1]))
    out = torch.empty(nrows, width, dtype=torch.float64, device=cols.device)
    if out.numel() == 0:
        return out
    step = max(1, min(nrows, min(budget, 2**24) // (width * dim * 8)))
    ybuf = torch.empty(step * width, dim, dtype=torch.float64, device=cols.device)
    for s in range(0, nrows, step):
        c = cols[s : s + step]
        y = ybuf[: c.numel()]
        torch.index_select(prep.reference, 0, c.reshape(-1), out=y)
        y3 = y.view(c.shape[0], width, dim)
        q = prep.query[start + s : start + s + c.shape[0]]
        if prep.distance:
            out[s : s + step] = -(y3.sub_(q[:, None, :]).square_().sum(-1))
        else:
            out[s : s + step] = torch.bmm(y3, q[:, :, None]).squeeze(-1)
    return out


def _candidates_bf16(prep: _Prepared, start: int, stop: int, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Candidate columns ``(R, W)`` (``-1`` = padding) and counts holding the exact top-``k``, from a bf16 GEMM.

    Returns ``None`` when the bound cannot be certified cheaply (then the caller uses the float32 pass).
    """
    assert prep.query16 is not None
    assert prep.reference16 is not None
    assert prep.eps16 is not None
    a = (prep.query16[start:stop] @ prep.reference16.T).to(torch.float32)  # bf16 output, exact in float32
    rows = torch.arange(stop - start, device=a.device)
    if prep.exclude_self:
        a[rows, rows + start] = -math.inf
    k2 = min(a.shape[1], 2 * k + 16)
    vals, cols = torch.topk(a, k2, dim=1, largest=True, sorted=True)
    top = vals[:, 0].to(torch.float64)
    kth = vals[:, k - 1].to(torch.float64)
    # Output rounding to bf16: |fl(z) - z| <= c |fl(z)|, c = 2^-8 / (1 - 2^-8). Every score that matters
    # (between the k-th bound and the best) has |fl(z)| <= bound = max(|top|, |kth|) + 2 (eps_in + 2^-7).
    c = 2.0**-8 / (1 - 2.0**-8)
    e_in = prep.eps16[start:stop]
    bound = torch.maximum(top.abs(), kth.abs()) + 2 * (e_in + 2.0**-7)
    eps = e_in + c * bound
    if not bool((bound >= torch.maximum(top.abs(), kth.abs()) + 2 * eps).all()):
        return None
    low = (kth - 2 * eps - (kth.abs() + 2 * eps) * 2.0**-20).to(torch.float32)
    if k2 < a.shape[1] and not bool((vals[:, -1] < low).all()):
        cand = a >= low[:, None]
        count = cand.sum(1)
        vals, cols = torch.topk(a.masked_fill_(~cand, -math.inf), int(count.max()), dim=1, sorted=True)
    else:
        count = (vals >= low[:, None]).sum(1)
    width = int(count.max())
    cols = cols[:, :width].masked_fill(torch.arange(width, device=a.device)[None, :] >= count[:, None], -1)
    return cols, count


def _topk_block(
    prep: _Prepared, start: int, stop: int, k: int, budget: int, need_keys: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` keys (float64) and reference indices (int64) for queries ``start:stop``, best first.

    With ``need_keys=False`` only the order is exact; the returned keys may be the bulk approximations.
    """
    found = _candidates_bf16(prep, start, stop, k) if prep.query16 is not None else None
    if found is not None:
        # bf16 candidates, then float32 scores of the candidates (same bound as the float32 GEMM).
        cols = found[0]
        pad = cols < 0
        safe = cols.clamp_min(0)
        with _ieee_fp32_matmul():
            sc = torch.empty(cols.shape, dtype=torch.float32, device=cols.device)
            step = max(1, 2**24 // max(1, cols.shape[1] * prep.query32.shape[1]))
            for s in range(0, cols.shape[0], step):
                y = prep.reference32[safe[s : s + step]]
                q = prep.query32[start + s : start + s + y.shape[0], :, None]
                sc[s : s + step] = torch.bmm(y, q).squeeze(-1)
        sc.masked_fill_(pad, -math.inf)
        vals, order = torch.sort(sc, dim=1, descending=True)
        cols = cols.gather(1, order)
        count = (~pad).sum(1)
    else:
        a = _bulk_keys(prep, start, stop)
        eps32 = prep.eps[start:stop].to(torch.float32)
        # A few more than k at once: the candidates almost always fit, which saves a pass over the block.
        k2 = min(a.shape[1], k + max(8, k // 4))
        vals, cols = torch.topk(a, k2, dim=1, largest=True, sorted=True)
        kth = vals[:, k - 1]
        # float32 rounding of the threshold itself is covered by widening the band by a relative 2^-22.
        low = kth - 2 * eps32 - (kth.abs() + 2 * eps32) * 2.0**-22
        if k2 < a.shape[1] and not bool((vals[:, -1] < low).all()):
            count = (a >= low[:, None]).sum(1)  # some row has more candidates: take them all, best first
            vals, cols = torch.topk(a, int(count.max()), dim=1, largest=True, sorted=True)
        else:
            count = (vals >= low[:, None]).sum(1)
        del a
    device = cols.device
    width = cols.shape[1]
    valid = torch.arange(width, device=device)[None, :] < count[:, None]
    approx = vals.to(torch.float64)
    if prep.distance:
        approx -= prep.query_sqnorm[start:stop, None]
    approx = approx.masked_fill(~valid, -torch.inf)
    # Candidates not safely ordered with respect to a neighbour in this order (gap <= 2 eps) are re-scored
    # exactly; the others keep their float32 key, which orders them correctly against every other candidate.
    e = prep.eps[start:stop, None].to(torch.float64)
    tight = (approx[:, :-1] - approx[:, 1:] <= 2 * e + approx[:, :-1].abs() * 2.0**-22) & valid[:, 1:]
    close = torch.zeros_like(valid)
    close[:, 1:] |= tight
    close[:, :-1] |= tight
    keys = approx.clone()
    cr, cc = close.nonzero(as_tuple=True)
    if cr.numel() > 0:
        keys[cr, cc] = _exact_keys(prep, cr + start, cols[cr, cc], budget)
    # Order by (key descending, column ascending): sort columns first, then a stable sort by key.
    by_col = torch.argsort(cols.masked_fill(~valid, torch.iinfo(torch.long).max), dim=1)
    keys, cols, close = keys.gather(1, by_col), cols.gather(1, by_col), close.gather(1, by_col)
    by_key = torch.argsort(keys, dim=1, descending=True, stable=True)[:, :k]
    keys, cols, close = keys.gather(1, by_key), cols.gather(1, by_key), close.gather(1, by_key)
    if need_keys:
        # Items ordered by their float32 key still need their exact value as output.
        exact = _grid_keys(prep, start, cols, budget)
        keys = torch.where(close, keys, exact)
    return keys, cols


def _validate_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None:
        check_number(chunk_size, "chunk_size", low=1, integer=True)


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
        from dml_bias.metrics._faiss import faiss_knn

        return faiss_knn(
            query, reference, k, metric=metric, exclude_self=exclude_self, normalize_embeddings=normalize_embeddings
        )
    _validate_chunk_size(chunk_size)
    prep = _prepare(query, reference, metric, exclude_self, normalize_embeddings)
    available = prep.num_reference - (1 if prep.exclude_self else 0)
    check_number(k, "k", low=1, high=max(available, 1), integer=True)
    if available < 1:
        raise ValueError(f"k must be in [1, {available}] (reference size after self exclusion), got {k}")
    return _knn_prepared(prep, k, metric, chunk_size, MEMORY_BUDGET)


def _knn_prepared(
    prep: _Prepared, k: int, metric: str, chunk_size: int | None, budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    nq = prep.num_query
    device = prep.query.device
    scores = torch.empty(nq, k, dtype=prep.out_dtype, device=device)
    indices = torch.empty(nq, k, dtype=torch.long, device=device)
    per_row = prep.num_reference * 16 + k * 64
    step = _block_rows(nq, per_row, chunk_size, budget, width=prep.num_reference)
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        keys, cols = _topk_block(prep, start, stop, k, budget)
        scores[start:stop] = _key_to_score(prep, keys, metric).to(prep.out_dtype)
        indices[start:stop] = cols
    return scores, indices
