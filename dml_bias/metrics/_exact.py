"""The exact k-nearest-neighbour engine shared by the search, the retrieval metrics and the sharded search.

:func:`~dml_bias.metrics.knn` (its ``"torch"`` backend), :func:`~dml_bias.metrics.faiss_knn` (its fallback above
faiss' GPU ``k`` limit), :mod:`~dml_bias.metrics.retrieval` and :mod:`~dml_bias.metrics.sharded` all build on
the blocked passes here; the algorithm and its error bounds are described in :mod:`dml_bias.metrics.knn`.
The module is private to the package; its names carry no underscore because the modules above share them.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import torch

from dml_bias._checks import (
    check_bool,
    check_choice,
    check_finite,
    check_number,
    check_query_reference,
    describe,
)
from dml_bias._compat import ieee_fp32_matmul
from dml_bias.similarity import METRICS

__all__ = [
    "BF16_CPU",
    "FORCE_HALF",
    "FP16_CUDA",
    "MEMORY_BUDGET",
    "SYMMETRIC_DIM",
    "TILE",
    "GroupedInputs",
    "Prepared",
    "block_product",
    "block_rows",
    "bulk_keys",
    "candidates_grouped",
    "cpu_has_fast_bf16",
    "exact_keys",
    "exact_knn",
    "gamma",
    "group_low",
    "grouped_inputs",
    "half_dtype",
    "knn_prepared",
    "prepare",
    "row_grouping",
    "rows_of",
    "scratch",
    "self_candidates_grouped",
    "target_block",
    "topk_block",
    "topk_order",
    "validate_chunk_size",
]

#: Default bound, in bytes, on the extra memory used by one block of work.
MEMORY_BUDGET = 2 * 2**30

_U32 = 2.0**-24  # unit roundoff of float32 (round to nearest)
_U64 = 2.0**-53  # unit roundoff of float64


def topk_order(keys: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """``(Q, k)`` positions of each row's ``k`` largest ``keys``, equal keys by increasing ``ids`` (the tie rule).

    The merge step of every streamed or sharded top-k: candidates ``(Q, C)`` with their global ids, in any
    order. A stable sort by id, then a stable descending sort by key.
    """
    by_id = torch.sort(ids, dim=1, stable=True).indices
    by_key = torch.sort(keys.gather(1, by_id), dim=1, descending=True, stable=True).indices[:, :k]
    return by_id.gather(1, by_key)


def gamma(n: int, u: float) -> float:
    r"""Higham's :math:`\gamma_n = nu / (1 - nu)`: the relative error bound of an ``n``-term dot product."""
    return n * u / (1.0 - n * u)


@dataclass
class Prepared:
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
    # 16-bit candidate pass (cosine/dot): copies and the input part of its bound.
    query16: torch.Tensor | None = None  # bf16 (CPU) or float16 (CUDA)
    reference16: torch.Tensor | None = None
    half_u: float = 0.0  # unit roundoff of the 16-bit GEMM output
    eps16: torch.Tensor | None = None  # (Nq,) float64, without the output-rounding term
    # Reused block buffers: fresh multi-megabyte tensors per block cost page faults on every first touch.
    scratch: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_query(self) -> int:
        return int(self.query.shape[0])

    @property
    def num_reference(self) -> int:
        return int(self.reference.shape[0])


def prepare(
    query: torch.Tensor,
    reference: torch.Tensor | None,
    metric: str,
    exclude_self: bool | None,
    normalize_embeddings: bool | None,
) -> Prepared:
    check_choice(metric, "metric", METRICS)
    same = reference is None
    reference = check_query_reference(query, reference)
    if exclude_self is None:
        exclude_self = same
    check_bool(exclude_self, "exclude_self", allow_none=True)
    if exclude_self and query.shape[0] > reference.shape[0]:
        raise ValueError(
            "exclude_self=True means query i is reference i, so query must not have more rows than reference "
            f"({reference.shape[0]}), got query of {describe(query)}"
        )
    check_bool(normalize_embeddings, "normalize_embeddings", allow_none=True)
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
    wide = torch.float64 in (query.dtype, reference.dtype)  # finite narrower inputs stay finite in float32
    if wide and not (bool(torch.isfinite(q32).all()) and bool(torch.isfinite(r32).all())):
        raise ValueError("query and reference must fit in float32 for the bulk pass (values above 3.4e38 found)")
    qn = q64.norm(dim=1)
    rn = qn if same else r64.norm(dim=1)
    rmax = float(rn.max())
    dim = int(q64.shape[1])
    distance = metric in ("euclidean", "squared_euclidean")
    # |fl32(q32 . r32) - q64 . r64| <= c * |q| |r|: input rounding (2u + u^2), float32 accumulation over D
    # terms (IEEE round to nearest on the CPU; u doubled on accelerators to cover other rounding modes), and
    # the float64 re-scoring.
    u_acc = _U32 if q64.device.type == "cpu" else 2 * _U32
    c = 2 * _U32 + _U32**2 + gamma(dim, u_acc) * (1 + _U32) ** 2 + 2 * gamma(dim + 2, _U64)
    if distance:
        # bulk key = 2 fl(q.r) - |r|^2 (float32) - |q|^2 (float64), exact key = -|q - r|^2 (float64); the
        # float32 subtraction and the squared norms add at most 8u (|q| + |r|)^2.
        eps = 2 * c * qn * rmax + 8 * _U32 * (qn + rmax) ** 2 + 4 * gamma(dim + 2, _U64) * (qn + rmax) ** 2
    else:
        eps = c * qn * rmax
    out_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q16 = r16 = eps16 = None
    half = None if distance else half_dtype(q64.device)
    if half == torch.float16 and max(float(qn.max()), rmax) >= 2.0**7:
        half = None  # scores up to |q| |r| must stay far inside float16's range (65504)
    if half is not None:
        q16 = q32.to(half)
        r16 = q16 if same else r32.to(half)
        # |x16.y16 - x.y| <= |x16||r_y| + |r_x||y16| + |r_x||r_y| with r = x - x16 (exact, per row), plus the
        # float32 accumulation of D exact bf16 products and the float64 re-scoring.
        qh = q16.to(torch.float64)
        q_res, qhn = (q64 - qh).norm(dim=1), qh.norm(dim=1)
        del qh
        if same:
            r_res, rhn = q_res, float(qhn.max())
        else:
            rh = r16.to(torch.float64)
            r_res, rhn = (r64 - rh).norm(dim=1), float(rh.norm(dim=1).max())
            del rh
        rres = float(r_res.max())
        eps16 = (qhn * rres + q_res * rhn + q_res * rres + gamma(dim, 2 * _U32) * qhn * rhn) * (1 + 2**-20)
        eps16 = eps16 + 2 * gamma(dim + 2, _U64) * qn * rmax
    return Prepared(
        query=q64,
        reference=r64,
        query32=q32,
        reference32=r32,
        query_norm=qn,
        query_sqnorm=(q64 * q64).sum(1) if distance else qn[:0],
        reference_sqnorm32=(r32.to(torch.float64) ** 2).sum(1).to(torch.float32) if distance else q32[0, :0],
        distance=distance,
        exclude_self=exclude_self,
        eps=eps,
        out_dtype=out_dtype,
        query16=q16,
        reference16=r16,
        half_u=_HALF_UNIT[half] if half is not None else 0.0,
        eps16=eps16,
    )


#: Run the candidate pass of cosine/dot top-k in bf16 on the CPU (exact all the same: bf16 candidates, float32
#: re-scoring of the candidates, float64 for near-ties). ``None`` (default): on when the CPU has native bf16
#: dot products (AVX512-BF16 or AMX), where a bf16 GEMM runs about twice as fast as a float32 one; ``True`` /
#: ``False`` force it on (emulated, slowly, on other CPUs) or off. Tests set it to cover both paths.
BF16_CPU: bool | None = None

#: Run the candidate pass in float16 on CUDA devices (tensor cores; same bound with float16's unit roundoff).
FP16_CUDA = True

#: Test hook: force this 16-bit dtype for the candidate pass on any device (``None``: the rules above).
FORCE_HALF: torch.dtype | None = None

#: Unit roundoff (round to nearest) of the 16-bit formats, for the rounding of the GEMM output.
_HALF_UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (AVX512-BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def half_dtype(device: torch.device) -> torch.dtype | None:
    """The 16-bit dtype of the candidate pass on this device, or ``None`` for the float32 pass."""
    if FORCE_HALF is not None:
        return FORCE_HALF
    if device.type == "cpu":
        fast = cpu_has_fast_bf16() if BF16_CPU is None else BF16_CPU
        return torch.bfloat16 if fast else None
    if device.type == "cuda" and FP16_CUDA:
        return torch.float16
    return None


def rows_of(
    found: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Rows ``start:stop`` of candidates computed for all queries at once (``None`` stays ``None``)."""
    return None if found is None else (found[0][start:stop], found[1][start:stop], found[2][start:stop])


def _sampled_dot(query: torch.Tensor, reference: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``(query[rows[i]] * reference[cols[i]]).sum()`` for every pair (``rows`` sorted), by a sampled product."""
    nrow = int(query.shape[0])
    crow = torch.zeros(nrow + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=nrow), 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        zeros = torch.zeros(rows.shape[0], dtype=query.dtype, device=rows.device)
        size = (nrow, int(reference.shape[0]))
        pattern = torch.sparse_csr_tensor(crow, cols, zeros, size=size, check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, query, reference.T, beta=0.0).values()


def exact_keys(prep: Prepared, rows: torch.Tensor, cols: torch.Tensor, budget: int) -> torch.Tensor:
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
    if rows.device.type == "cpu" and not prep.distance:
        # One float64 dot product per pair (sampled dense-dense product): the same arithmetic for every pair,
        # whatever its position, so duplicated embeddings still get identical keys.
        order = torch.argsort(rows, stable=True)
        out[order] = _sampled_dot(prep.query, prep.reference, rows[order], cols[order])
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


def _key_to_score(prep: Prepared, keys: torch.Tensor, metric: str) -> torch.Tensor:
    """Turn exact keys back into the user-facing score (similarity or distance)."""
    if not prep.distance:
        return keys
    sq = -keys
    return sq if metric == "squared_euclidean" else sq.sqrt()


def scratch(prep: Prepared, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``shape`` buffer of ``dtype``, reused across the blocks of one call under ``name``."""
    size = math.prod(shape)
    key = f"{name}_{dtype}"
    buf = prep.scratch.get(key)
    if buf is None or buf.numel() < size:
        buf = prep.scratch[key] = torch.empty(size, dtype=dtype, device=prep.query.device)
    return buf[:size].view(shape)


def block_product(prep: Prepared, query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``query @ reference.T`` in IEEE precision, into a buffer reused across the blocks of one call.

    Large fresh tensors are page-faulted in on every first touch (about a third of the bf16 GEMM's time at
    N = 100,000 on the CPU); the caller must be done with the previous block's product.
    """
    out = scratch(prep, "product", (int(query.shape[0]), int(reference.shape[0])), query.dtype)
    with ieee_fp32_matmul():  # no TF32, no bf16 "medium" precision, no reduced-precision reductions
        torch.mm(query, reference.T, out=out)
    return out


def bulk_keys(prep: Prepared, start: int, stop: int) -> torch.Tensor:
    """Approximate keys ``(stop - start, M)`` in float32, with the query's own column at ``-inf``."""
    a = block_product(prep, prep.query32[start:stop], prep.reference32)
    if prep.distance:
        a = a.mul_(2.0).sub_(prep.reference_sqnorm32)
    if prep.exclude_self:
        rows = torch.arange(stop - start, device=a.device)
        a[rows, rows + start] = -math.inf
    return a


#: Preferred number of bulk scores per block (speed: the block stays in cache-friendly sizes).
_TARGET_BLOCK = 2**23


#: The same for the group-maximum passes, whose GEMM wants wider blocks (the selection runs on group maxima).
_TARGET_BLOCK_GROUPED = 2**25


def target_block(prep: Prepared) -> int:
    """Preferred number of bulk scores per block for this search."""
    return _TARGET_BLOCK if prep.distance else _TARGET_BLOCK_GROUPED


def block_rows(
    num_query: int,
    per_row_bytes: int,
    chunk_size: int | None,
    budget: int,
    width: int = 0,
    target: int = _TARGET_BLOCK,
) -> int:
    """Query rows per block: ``chunk_size`` if given, else what fits the budget (and a speed-friendly size)."""
    if chunk_size is not None:
        return min(chunk_size, num_query)
    rows = budget // max(per_row_bytes, 1)
    if width > 0:
        rows = min(rows, max(64, target // width))
    return max(1, min(num_query, rows))


def _grid_keys(prep: Prepared, start: int, cols: torch.Tensor, budget: int) -> torch.Tensor:
    """Float64 keys of query rows ``start + i`` against ``cols[i, j]`` (``(R, C)``), via batched GEMV (SDDMM on CPU).

    Used only for *returned values*: the order was fixed before, by the exact element-wise keys.
    """
    nrows, width = cols.shape
    dim = max(1, int(prep.reference.shape[1]))
    out = torch.empty(nrows, width, dtype=torch.float64, device=cols.device)
    if out.numel() == 0:
        return out
    if cols.device.type == "cpu" and not prep.distance:
        rows = torch.arange(start, start + nrows, device=cols.device).repeat_interleave(width)
        return _sampled_dot(prep.query, prep.reference, rows, cols.reshape(-1)).view(nrows, width)
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


#: Largest group of reference items summarised by one maximum in the 16-bit candidate pass.
_GROUP = 16


def _group_size(num_reference: int, k: int) -> int:
    """Items per group maximum in the group-maximum pass (``< 2``: the pass does not pay for this ``k``)."""
    return max(1, min(_GROUP, num_reference // (8 * k)))


@dataclass
class GroupedInputs:
    """Inputs of the group-maximum candidate pass: bulk copies, their bound, the output rounding."""

    query: torch.Tensor  # (Nq, D) bulk-dtype rows (bf16 / float16 / float32)
    reference: torch.Tensor  # (M, D)
    eps: torch.Tensor  # (Nq,) float64 bound on |accumulated bulk score - exact score|
    unit: float  # unit roundoff of the stored output (0: the output is the float32 accumulator itself)
    tiny: float  # absolute error of an underflowing output

    @property
    def rescore(self) -> bool:
        """Whether candidates need float32 scores of their own (16-bit bulk scores are too coarse)."""
        return self.unit > 0


def grouped_inputs(prep: Prepared) -> GroupedInputs | None:
    """The group-maximum pass' inputs for this search, or ``None`` (Euclidean metrics: the top-k float32 pass)."""
    if prep.distance:
        return None
    if prep.query16 is not None and prep.reference16 is not None and prep.eps16 is not None:
        tiny = 2.0**-24 if prep.half_u == _HALF_UNIT[torch.float16] else 2.0**-133
        return GroupedInputs(prep.query16, prep.reference16, prep.eps16, prep.half_u, tiny)
    dim = int(prep.query.shape[1])
    return GroupedInputs(prep.query32, prep.reference32, prep.eps, 0.0, dim * 2.0**-149)


def group_low(grouped: GroupedInputs, rows: slice | torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    r"""Float32 candidate thresholds from :math:`\theta` (see :func:`candidates_grouped`)."""
    theta = theta.to(torch.float64)
    e = grouped.eps[rows]
    u, tiny = grouped.unit, grouped.tiny
    v = theta - u / (1 - u) * theta.abs() - 2 * tiny - 2 * e
    low = v - u * v.abs() - tiny
    return _round_down_to(low - low.abs() * 2.0**-40, torch.float32)  # the margin covers float64 rounding


#: Reference size (bytes, float32) from which candidates are re-scored by reference item (the reference no
#: longer fits the CPU caches; with D >= 256, where a pair's dot product outweighs the extra sort and scatter).
_STREAM_BYTES = 2**23


def _rescore(
    prep: Prepared,
    start: int,
    nrow: int,
    rows: torch.Tensor,
    cols: torch.Tensor,
    budget: int,
    k: int,
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 scores of candidate pairs (``rows`` relative to ``start``, sorted), padded per row, best first.

    Rows keep at least their ``k`` best candidates and every one that may still matter (:func:`_best_first`).

    ``values``: the pairs' float32 bulk scores when they already carry the float32 bound; otherwise they are
    computed: on the CPU by a sampled dense-dense product (one float32 dot product per pair, no gathered
    copies), elsewhere by a gather of the candidate rows and a batched matrix-vector product, in chunks that
    fit the budget.
    """
    device = cols.device
    count = torch.bincount(rows, minlength=nrow)
    crow = torch.zeros(nrow + 1, dtype=torch.long, device=device)
    torch.cumsum(count, 0, out=crow[1:])
    width = int(count.max()) if nrow > 0 else 0
    # Flat positions in the padded (R, W) layout: pair i is the (i - crow[row])-th of its row.
    pos = torch.arange(cols.shape[0], device=device) + (rows * width - torch.index_select(crow, 0, rows))
    scores = torch.full((nrow, width), -math.inf, dtype=torch.float32, device=device)
    padded = torch.full((nrow, width), -1, dtype=torch.long, device=device)
    flat_scores = scores.view(-1)
    padded.view(-1).index_copy_(0, pos, cols)
    query = prep.query32[start : start + nrow]
    if values is not None:
        flat_scores.index_copy_(0, pos, values.to(torch.float32))
    elif device.type == "cpu" and prep.reference32.numel() * 4 >= _STREAM_BYTES and query.shape[1] >= 256:
        # By reference item (CSC): each reference row is read once per block and meets its queries, which stay
        # in cache; in query order every pair would fetch its reference row from memory again. The pairs are in
        # query order, so a stable sort by reference item gives (reference, query) order.
        narrow = torch.int32 if prep.num_reference < 2**31 else torch.long
        ref_rows, by_ref = torch.sort(cols.to(narrow), stable=True)
        by_pos = torch.index_select(pos, 0, by_ref)
        ref_rows, queries = ref_rows.long(), torch.div(by_pos, width, rounding_mode="floor")
        with ieee_fp32_matmul():
            flat_scores.index_copy_(0, by_pos, _sampled_dot(prep.reference32, query, ref_rows, queries))
    elif device.type == "cpu":
        with ieee_fp32_matmul():
            flat_scores.index_copy_(0, pos, _sampled_dot(query, prep.reference32, rows, cols))
    else:
        dim = max(1, int(query.shape[1]))
        step = max(1, min(nrow, budget // max(1, 4 * width * dim)))
        with ieee_fp32_matmul():
            for s0 in range(0, nrow, step):
                y = prep.reference32[padded[s0 : s0 + step].clamp_min(0)]  # (r, W, D)
                scores[s0 : s0 + step] = torch.bmm(y, query[s0 : s0 + step, :, None]).squeeze(-1)
        scores.masked_fill_(padded < 0, -math.inf)
    return _best_first(prep, start, k, scores, padded, count)


def _best_first(
    prep: Prepared, start: int, k: int, scores: torch.Tensor, cols: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates sorted best first; only the first ``k + max(8, k // 4)`` when the others cannot matter.

    A candidate whose float32 score lies more than ``2 eps`` below the ``k``-th best one's is outside the exact
    top-``k`` and outside every near-tie chain that reaches into it (see :func:`topk_block`), so dropping the
    rows' tails changes nothing. Where some row's tail is still within reach, every candidate is sorted.
    """
    width = int(scores.shape[1])
    keep = k + max(8, k // 4)
    ordered = _ordered_bits(scores)  # integer selections and sorts run faster than float32 ones on the CPU
    if k <= width and keep < width:
        order = torch.topk(ordered, keep, dim=1, largest=True, sorted=True).indices
        vals = scores.gather(1, order)
        kth = vals[:, k - 1].to(torch.float64)
        e = prep.eps[start : start + int(scores.shape[0])]
        low = kth - 2 * e - (kth.abs() + 2 * e) * 2.0**-20
        if bool((vals[:, -1].to(torch.float64) < low).all()):
            return vals, cols.gather(1, order), count.clamp_max(keep)
    order = torch.sort(ordered, dim=1, descending=True, stable=True).indices
    return scores.gather(1, order), cols.gather(1, order), count


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Float32 values as int32 keys in the same order (``-0`` just below ``+0``; no NaN expected).

    IEEE floats are sign-magnitude: the bit patterns of non-negative floats already order like the floats, and
    flipping the 31 magnitude bits of the negative ones puts them below, in the right order.
    """
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


#: Signed integers of each floating-point width: the bit patterns of non-negative floats order like the floats.
_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _positive_hits(
    body: torch.Tensor, grouped: GroupedInputs, rows: slice, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The row pass' maxima, threshold and hit groups on the scores' bit patterns, or ``None``.

    Returns ``(body, low, hq, hg)`` with ``body`` and ``low`` as signed integers of the scores' width (the caller
    compares members with them), or ``None`` where some row's threshold is not positive.

    IEEE floats are sign-magnitude: read as signed integers of the same width, non-negative floats keep their
    order, and every negative float (``-0`` and ``-inf`` included) reads as a negative integer. So for a positive
    threshold ``low``, ``x >= low`` exactly when ``bits(x) >= bits(low)``; a group's integer maximum is the bit
    pattern of its float maximum whenever that maximum is non-negative (and negative otherwise), so the ``k``-th
    largest union maximum of the integers is the float one whenever it is non-negative. Integer maxima,
    selections and comparisons run several times faster than 16-bit float ones on the CPU.
    """
    ibody = body.view(_SAME_WIDTH_INT[body.element_size()])
    gmax = ibody.amax(1)  # (R, G)
    ilow = _threshold_on_bits(gmax, grouped, rows, k, body.dtype)
    if ilow is None:
        return None
    hq, hg = (gmax >= ilow[:, None]).nonzero(as_tuple=True)
    return ibody, ilow, hq, hg


def _bulk_threshold(gmax: torch.Tensor, grouped: GroupedInputs, rows: slice | torch.Tensor, k: int) -> torch.Tensor:
    """Candidate thresholds in ``gmax``'s (float) dtype from float group maxima (see :func:`candidates_grouped`)."""
    return _round_down_to(group_low(grouped, rows, _kth_union_max(gmax, k)), gmax.dtype)


def _threshold_on_bits(
    gmax: torch.Tensor, grouped: GroupedInputs, rows: slice | torch.Tensor, k: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Candidate thresholds as integers from integer group maxima of ``dtype`` scores, or ``None``.

    ``None`` where some row's threshold is not positive (or not representable in ``dtype``): integer and float
    comparisons agree only above zero (see :func:`_positive_hits`).
    """
    theta = _kth_union_max(gmax, k)
    if not bool((theta >= 0).all()):
        return None
    low = _round_down_to(group_low(grouped, rows, theta.view(dtype)), dtype)
    if low.dtype != dtype or not bool((low > 0).all()):
        return None
    return low.view(gmax.dtype)


def candidates_grouped(
    prep: Prepared, start: int, stop: int, k: int, budget: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    r"""Candidates holding the exact top-``k`` of queries ``start:stop`` from one bulk GEMM, with float32 scores.

    Returns ``(scores, cols, count)``: ``(R, W)`` float32 scores of the candidates (float32 accuracy, the bound
    ``prep.eps``) sorted best first, their reference indices (``-1`` = padding), and the number per row; or
    ``None`` for the Euclidean metrics, when group maxima do not pay (``k`` above a sixteenth of the reference)
    or when the candidates would not fit the budget; the caller then uses the float32 top-k pass.

    The bound: every bulk score :math:`\hat s = \mathrm{fl}_{16}(z)` with :math:`|z - s| \le e` (``prep.eps16``:
    inputs rounded to bf16 on the CPU or float16 on CUDA, float32 accumulation) and :math:`|\hat s - z| \le
    u|z|` (``prep.half_u``: :math:`2^{-8}` for bf16, :math:`2^{-11}` for float16). With float32 bulk scores
    (no fast 16-bit products) :math:`u = 0`, :math:`e` is the float32 bound ``prep.eps``, and the candidates'
    bulk scores are returned as they are (no re-scoring).
    Let :math:`\theta` be the ``k``-th largest maximum of groups of reference items: ``k`` distinct items have
    :math:`\hat s \ge \theta`, so the ``k``-th best exact score is at least :math:`f = \theta - u'|\theta| - e`
    (:math:`u' = u / (1 - u)`; :math:`v - u'|v|` is increasing). An item of the exact top-``k`` has
    :math:`s \ge f`, so :math:`z \ge v = f - e` and, the rounding being monotone, :math:`\hat s \ge v - u|v|`:
    every item at or above that threshold is a candidate (disjoint groups: unions of groups, as
    :func:`row_grouping` forms them for the selection, are groups too). The group maxima are element-wise maxima
    of contiguous slices of the score rows (cheap), and the selection of :math:`\theta` runs on them or on their
    unions: up to sixteen times, and more at large ``M``, fewer values than the block.
    """
    grouped = grouped_inputs(prep)
    m = prep.num_reference
    group, ngroup, _ = row_grouping(m, k)
    if grouped is None or group < 2:
        return None
    nrow = stop - start
    device = prep.query.device
    st = block_product(prep, grouped.query[start:stop], _padded_reference(prep, grouped, ngroup * group))
    st[:, m:] = -math.inf
    if prep.exclude_self:
        own = torch.arange(start, min(stop, m), device=device)
        st[own - start, own] = -math.inf
    body = st.view(nrow, group, ngroup)
    found = _positive_hits(body, grouped, slice(start, stop), k)
    if found is None:  # some threshold at or below zero: compare the floating-point values themselves
        gmax = body.amax(1)  # (R, G)
        low = _bulk_threshold(gmax, grouped, slice(start, stop), k)
        hq, hg = (gmax >= low[:, None]).nonzero(as_tuple=True)
    else:
        body, low, hq, hg = found
    if hq.numel() * group * 128 > budget:  # about 128 bytes of index work per member; else the top-k pass
        return None
    members = body[hq, :, hg]  # (H, group): each hit group's values, read from one row of the block
    p, j = (members >= torch.index_select(low, 0, hq)[:, None]).nonzero(as_tuple=True)
    # Row-major: the rows are sorted (the CSR layout `_rescore` needs); the padding (-inf) never passes.
    rows, hit_group = torch.index_select(hq, 0, p), torch.index_select(hg, 0, p)
    cols = hit_group + j * ngroup
    values = None if grouped.rescore else st.view(nrow, group, ngroup)[rows, j, hit_group]
    return _rescore(prep, start, nrow, rows, cols, budget, k, values)


def row_grouping(num_reference: int, k: int) -> tuple[int, int, int]:
    """``(group, G, coarse)`` of the row pass: items per group, groups, groups per union for the threshold.

    Group ``j`` holds the columns ``j, j + G, j + 2G, ...``: its maximum is an element-wise maximum of ``group``
    contiguous slices of a score row. The reference is padded to ``G * group`` items (scores ``-inf``), so that
    every group is full and the candidates come out in query order (no sort). The threshold comes from unions
    of ``coarse`` groups (fewer values to select from; the ``G mod coarse`` last groups stay alone), as long as
    at least ``8 k`` unions remain: a slightly lower threshold, a few more hits, a cheaper selection.
    """
    group = _group_size(num_reference, k)
    ngroup = -(-num_reference // group)
    return group, ngroup, _union_size(ngroup, k)


def _union_size(width: int, k: int) -> int:
    """Columns of group maxima per union for the threshold's selection (at least ``8 k`` unions remain)."""
    return max(1, width // (8 * k))


def _kth_union_max(gmax: torch.Tensor, k: int) -> torch.Tensor:
    """``(R,)`` the ``k``-th largest maximum over unions of the columns of ``gmax`` (maxima of disjoint items).

    ``k`` distinct items score at least that much. Unions of :func:`_union_size` columns
    (``h, h + W', h + 2W', ...``; the last ``width mod size`` columns alone) leave fewer values to select from.
    """
    nrow, width = gmax.shape
    size = _union_size(width, k)
    if size > 1:
        whole = width // size * size
        gmax = torch.cat([gmax[:, :whole].view(nrow, size, width // size).amax(1), gmax[:, whole:]], 1)
    return torch.topk(gmax, k, dim=1, sorted=False).values.amin(1)


def _round_down_to(low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Thresholds as ``dtype`` values no larger, as close as possible (comparisons in ``dtype`` keep every candidate).

    Float64 to float32 for :func:`group_low`; float32 to the 16-bit bulk dtype for the passes' comparisons.
    """
    if dtype == low.dtype:
        return low
    y = low.to(dtype)
    try:
        down = torch.nextafter(y, torch.full_like(y, -math.inf))
    except RuntimeError:  # no 16-bit nextafter on this device in older torch: compare in float32 instead
        return low
    return torch.where(y.to(low.dtype) > low, down, y)


def _padded_reference(prep: Prepared, grouped: GroupedInputs, rows: int) -> torch.Tensor:
    """``grouped.reference`` with zero rows appended up to ``rows`` rows (kept for the blocks of one call)."""
    ref = grouped.reference
    extra = rows - int(ref.shape[0])
    if extra == 0:
        return ref
    key = f"padded_reference_{rows}_{ref.dtype}"
    buf = prep.scratch.get(key)
    if buf is None:
        buf = prep.scratch[key] = torch.cat([ref, ref.new_zeros(extra, ref.shape[1])])
    return buf


#: Bytes kept per candidate of the symmetric pass until a panel's are known (row, column, value, their sort).
_CANDIDATE_BYTES = 40

#: Rows (and columns) of one tile of the symmetric pass.
TILE = 2048

#: CPU cost model of the symmetric pass: it pays when ``D > a + b * h`` with ``(a, b) = SYMMETRIC_DIM`` and ``h``
#: the hit groups per row. It saves half of the bulk GEMM (work ``~ N^2 D``) but walks the transposed tiles for
#: the columns' maxima and candidates (work ``~ N^2``, more with more hits). Fitted to the bf16 pass on a 2-core
#: AVX512-BF16 CPU (A/B runs of both passes): ``k = 1`` on 10,000 points with about 4 hits per row (symmetric
#: faster at D = 128), classes of 50 at N = 20,000 with about 74 (row pass faster at D = 128, symmetric at 256
#: and 512) and random labels in classes of 200 with about 264 (row pass faster at D = 128 and 256, symmetric at
#: 512). Other devices keep the budget rule alone.
SYMMETRIC_DIM = (100.0, 1.0)


def _hits_per_row(gmax: torch.Tensor, grouped: GroupedInputs, k: int, rows: torch.Tensor | None = None) -> float:
    """Mean hit groups per row of these complete rows of group maxima (``rows``: their query rows)."""
    which = slice(0, gmax.shape[0]) if rows is None else rows
    low = _bulk_threshold(gmax, grouped, which, k)
    return int((gmax >= low[:, None]).sum()) / max(1, int(gmax.shape[0]))


def _expansion_too_large(hits_per_row: float, group: int, n: int, budget: int) -> bool:
    """Whether ``hits_per_row`` hit groups in each of ``n`` rows overflow the budget once expanded.

    The worst case counts: every member of a hit group may pass, at about :data:`_CANDIDATE_BYTES` each.
    """
    return hits_per_row * n * group * _CANDIDATE_BYTES > budget


def _symmetric_pays(hits_per_row: float, dim: int, device: torch.device) -> bool:
    """Whether the symmetric pass beats the row pass (:data:`SYMMETRIC_DIM`; always on other devices than CPUs)."""
    if device.type != "cpu":
        return True
    base, per_hit = SYMMETRIC_DIM
    return dim > base + per_hit * hits_per_row


#: Rows sampled (evenly spaced) to predict the symmetric pass' expansion before it computes any tile.
_SAMPLE_ROWS = 256


def _sampled_maxima(
    x: torch.Tensor,
    rows: torch.Tensor,
    panels: list[tuple[int, int]],
    ngroups: list[int],
    offsets: list[int],
    group: int,
) -> torch.Tensor:
    """The symmetric pass' group maxima of the query ``rows`` (self excluded), from their own score rows."""
    with ieee_fp32_matmul():
        t = x[rows] @ x.T
    t[torch.arange(rows.shape[0], device=x.device), rows] = -math.inf
    out = torch.empty(rows.shape[0], offsets[-1], dtype=x.dtype, device=x.device)
    for j, (b0, b1) in enumerate(panels):
        full = ngroups[j] * group
        part, dest = t[:, b0:b1], out[:, offsets[j] : offsets[j + 1]]
        if ngroups[j] > 0:
            torch.amax(part[:, :full].reshape(rows.shape[0], group, ngroups[j]), 1, out=dest[:, : ngroups[j]])
        dest[:, ngroups[j] :] = part[:, full:]
    return out


def self_candidates_grouped(
    prep: Prepared, k: int, budget: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`candidates_grouped` for all queries at once when the query set is the reference set (self excluded).

    The score matrix is symmetric, so only the tiles on and above the diagonal are computed (half the GEMM
    work); each tile gives the group maxima of its rows and, transposed, of its columns' rows. The tiles are
    kept until the thresholds are known, so this runs only when ``N^2`` bulk scores fit the budget (``None``
    otherwise), and, with more than one tile, only when the hits of :data:`_SAMPLE_ROWS` evenly spaced rows,
    computed first, fit the budget panel by panel and make the pass pay (:func:`_symmetric_pays`). Groups are
    strided within each panel of columns; the bound is the same. The candidates are expanded and re-scored one
    panel of query rows at a time (a tile is freed after its last use).
    """
    grouped = grouped_inputs(prep)
    n = prep.num_reference
    group = _group_size(n, k)
    if grouped is None or group < 2 or not prep.exclude_self or prep.num_query != n:
        return None
    if grouped.query is not grouped.reference:
        return None
    tile = min(TILE, n)
    if k * tile * group * _CANDIDATE_BYTES > budget:  # every row hits at least k groups: the bound below
        return None
    bounds = [*list(range(0, n, tile)), n]
    panels = list(itertools.pairwise(bounds))
    sizes = [b - a for a, b in panels]
    ngroups = [size // group for size in sizes]
    widths = [g + size - g * group for g, size in zip(ngroups, sizes, strict=True)]  # groups + singletons
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    x = grouped.query
    if (n * n + n * offsets[-1]) * x.element_size() > budget:
        return None
    device = prep.query.device
    if len(panels) > 1:  # a sample of rows, before any tile: their hits predict the expansion's size
        sample = torch.arange(0, n, max(1, n // _SAMPLE_ROWS), device=device)[:_SAMPLE_ROWS]
        sampled = _sampled_maxima(x, sample, panels, ngroups, offsets, group)
        hits_per_row = _hits_per_row(sampled, grouped, k, sample)
        if _expansion_too_large(hits_per_row, group, tile, budget):
            return None
        if not _symmetric_pays(hits_per_row, int(x.shape[1]), device):
            return None
    tiles: dict[tuple[int, int], torch.Tensor] = {}
    for i, (a0, a1) in enumerate(panels):
        for j in range(i, len(panels)):
            b0, b1 = panels[j]
            with ieee_fp32_matmul():
                t = x[a0:a1] @ x[b0:b1].T
            if i == j:
                diag = torch.arange(a1 - a0, device=device)
                t[diag, diag] = -math.inf
            tiles[(i, j)] = t
    # Maxima, threshold and hits on the bit patterns as integers (see _positive_hits), else on the floats.
    view = _SAME_WIDTH_INT[x.element_size()]
    gmax = _tile_maxima(tiles, panels, ngroups, offsets, group, view)
    low = _threshold_on_bits(gmax, grouped, slice(0, n), k, x.dtype)
    if low is None:
        view = x.dtype
        gmax = _tile_maxima(tiles, panels, ngroups, offsets, group, view)
        low = _bulk_threshold(gmax, grouped, slice(0, n), k)
    hits = gmax >= low[:, None]
    del gmax
    most = max(int(hits[a:b].sum()) / (b - a) for a, b in panels)
    if _expansion_too_large(most, group, tile, budget):  # the members are expanded panel by panel
        return None
    tiles = {key: t.view(view) for key, t in tiles.items()}
    found = []
    for qp, (q0, q1) in enumerate(panels):  # one panel of queries at a time: its candidates, then their scores
        rows_out, cols_out, vals_out = [], [], []
        for cp, (c0, _) in enumerate(panels):
            i, j = min(qp, cp), max(qp, cp)
            t = tiles.pop((i, j)) if cp <= qp else tiles[(i, j)]  # a tile's last use frees it
            ng, full = ngroups[cp], ngroups[cp] * group
            block = hits[q0:q1, offsets[cp] : offsets[cp + 1]]
            if qp == i:  # the tile's rows are the queries: a group's values sit in one row (cache-friendly)
                q, g = block[:, :ng].nonzero(as_tuple=True)
                vals = t[:, :full].view(q1 - q0, group, ng)[q, :, g]  # (H, group)
            else:  # the tile's columns are the queries: walk each group's rows query by query, group-major
                g, q = block[:, :ng].T.nonzero(as_tuple=True)
                vals = t[:full].view(group, ng, q1 - q0)[:, g, q].T  # (H, group)
            p, r = (vals >= low[q + q0][:, None]).nonzero(as_tuple=True)
            sq, sg = block[:, ng:].nonzero(as_tuple=True)  # groups of one: the hit is the candidate
            rows_out += [q[p], sq]
            cols_out += [g[p] + r * ng + c0, sg + full + c0]
            if not grouped.rescore:
                vals_out += [vals[p, r], t[sq, sg + full] if qp == i else t[sg + full, sq]]
        rows = torch.cat(rows_out)
        by_row = torch.sort(rows.to(torch.int32), stable=True).indices  # CSR layout: by query
        rows, cols = torch.index_select(rows, 0, by_row), torch.index_select(torch.cat(cols_out), 0, by_row)
        values = torch.index_select(torch.cat(vals_out), 0, by_row).view(x.dtype) if vals_out else None
        found.append(_rescore(prep, q0, q1 - q0, rows, cols, budget, k, values))
    del hits
    return _stack_rows(found)


def _tile_maxima(
    tiles: dict[tuple[int, int], torch.Tensor],
    panels: list[tuple[int, int]],
    ngroups: list[int],
    offsets: list[int],
    group: int,
    view: torch.dtype,
) -> torch.Tensor:
    """The symmetric pass' group maxima ``(N, groups + singletons)`` of every row, from the upper tiles.

    The tiles are read as ``view``: the bulk dtype, or a signed integer of its width (see :func:`_positive_hits`).
    """
    n = panels[-1][1]
    some = next(iter(tiles.values()))
    gmax = torch.empty(n, offsets[-1], dtype=view, device=some.device)
    for (i, j), t in tiles.items():
        t = t.view(view)
        (a0, a1), (b0, b1) = panels[i], panels[j]
        full_j = ngroups[j] * group
        out = gmax[a0:a1, offsets[j] : offsets[j + 1]]
        if ngroups[j] > 0:  # a short last panel may hold singletons only
            torch.amax(t[:, :full_j].view(a1 - a0, group, ngroups[j]), 1, out=out[:, : ngroups[j]])
        out[:, ngroups[j] :] = t[:, full_j:]
        if i < j:
            full_i = ngroups[i] * group
            out = gmax[b0:b1, offsets[i] : offsets[i + 1]]
            if ngroups[i] > 0:
                out[:, : ngroups[i]] = t[:full_i].view(group, ngroups[i], b1 - b0).amax(0).T
            out[:, ngroups[i] :] = t[full_i:].T
    return gmax


def _stack_rows(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates of consecutive row ranges as one ``(scores, cols, count)``, padded to the widest."""
    width = max(int(p[0].shape[1]) for p in parts)
    nrow = sum(int(p[0].shape[0]) for p in parts)
    scores, cols, _ = parts[0]
    out_s = scores.new_full((nrow, width), -math.inf)
    out_c = cols.new_full((nrow, width), -1)
    r0 = 0
    for s_part, c_part, _ in parts:
        r1 = r0 + int(s_part.shape[0])
        out_s[r0:r1, : s_part.shape[1]] = s_part
        out_c[r0:r1, : c_part.shape[1]] = c_part
        r0 = r1
    return out_s, out_c, torch.cat([p[2] for p in parts])


def topk_block(
    prep: Prepared,
    start: int,
    stop: int,
    k: int,
    budget: int,
    need_keys: bool = True,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
    found: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` keys (float64) and reference indices (int64) for queries ``start:stop``, best first.

    With ``need_keys=False`` only the order is exact; the returned keys may be the bulk approximations.
    With ``labels=(query_labels[start:stop], reference_labels)`` (and ``need_keys=False``) only the *label
    sequence* is exact: items that share the relevance to the query (same label or not) may swap places when
    their scores are too close to order without re-scoring, which changes no label-based metric.
    """
    if found is None and not prep.distance:
        found = candidates_grouped(prep, start, stop, k, budget)
    if found is not None:
        vals, cols, count = found
    else:
        a = bulk_keys(prep, start, stop)
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
    if labels is not None and not need_keys:
        return _label_order(prep, start, k, budget, approx, cols, close, tight, labels)
    keys = approx.clone()
    cr, cc = close.nonzero(as_tuple=True)
    if cr.numel() > 0:
        keys[cr, cc] = exact_keys(prep, cr + start, cols[cr, cc], budget)
    keys, cols, close = _tie_rule_order(keys, cols, valid, k, close)
    if need_keys:
        # Items ordered by their float32 key still need their exact value as output.
        exact = _grid_keys(prep, start, cols, budget)
        keys = torch.where(close, keys, exact)
    return keys, cols


def _tie_rule_order(
    keys: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor, k: int, *extra: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The first ``k`` of each row by (key descending, column ascending), with ``extra`` tensors in that order."""
    by_col = torch.argsort(cols.masked_fill(~valid, torch.iinfo(torch.long).max), dim=1)
    keys, cols = keys.gather(1, by_col), cols.gather(1, by_col)
    extra = tuple(x.gather(1, by_col) for x in extra)
    by_key = torch.argsort(keys, dim=1, descending=True, stable=True)[:, :k]
    return (keys.gather(1, by_key), cols.gather(1, by_key), *(x.gather(1, by_key) for x in extra))


def _label_order(
    prep: Prepared,
    start: int,
    k: int,
    budget: int,
    approx: torch.Tensor,
    cols: torch.Tensor,
    close: torch.Tensor,
    tight: torch.Tensor,
    labels: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The label mode's first ``k`` candidates: the bulk order, re-ordered only inside mixed near-tie chains.

    ``approx`` is sorted best first in every row; ``tight`` marks the gaps between neighbours too close to order
    by it, ``close`` the candidates next to such a gap. A chain (a run of candidates joined by tight gaps) whose
    items are all relevant, or all not, gives the same label sequence in any order; only the items of *mixed*
    chains get exact keys and are re-ordered among their chain's positions by (key descending, column
    ascending) (a chain's items stay within its positions: the gaps around it are safe). The returned keys are
    the bulk approximations except where exact keys were computed.
    """
    keys, out = approx[:, :k].clone(), cols[:, :k].clone()
    cr, cc = close.nonzero(as_tuple=True)  # row-major: grouped by chain, positions ascending within each
    if cr.numel() == 0:
        return keys, out
    width = int(cols.shape[1])
    device = cols.device
    # Chain id of a position: its row's offset plus the safe gaps before it in the row.
    safe = torch.cumsum(~tight, 1).view(-1)  # (R * (W - 1),): safe gaps among gaps 0..c
    before = torch.where(cc > 0, torch.index_select(safe, 0, cr * (width - 1) + (cc - 1).clamp_min(0)), 0)
    chain = cr * width + before
    c = torch.index_select(cols.reshape(-1), 0, cr * width + cc)
    rel = torch.index_select(labels[1], 0, c) == torch.index_select(labels[0], 0, cr)
    _, inverse, size = torch.unique_consecutive(chain, return_inverse=True, return_counts=True)
    num_rel = torch.zeros(size.shape[0], dtype=torch.long, device=device).index_add_(0, inverse, rel.long())
    mixed = torch.index_select((num_rel > 0) & (num_rel < size), 0, inverse).nonzero().squeeze(1)
    if mixed.numel() == 0:
        return keys, out
    cr, cc, c, chain = (torch.index_select(t, 0, mixed) for t in (cr, cc, c, chain))
    exact = exact_keys(prep, cr + start, c, budget)
    order = torch.argsort(c, stable=True)
    order = order[torch.argsort(exact[order], descending=True, stable=True)]
    order = order[torch.argsort(chain[order], stable=True)]
    first = cc < k  # the positions of the output; a chain may reach beyond it
    out[cr[first], cc[first]] = c[order][first]
    keys[cr[first], cc[first]] = exact[order][first]
    return keys, out


def validate_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None:
        check_number(chunk_size, "chunk_size", low=1, integer=True)


def knn_prepared(
    prep: Prepared, k: int, metric: str, chunk_size: int | None, budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    nq = prep.num_query
    device = prep.query.device
    scores = torch.empty(nq, k, dtype=prep.out_dtype, device=device)
    indices = torch.empty(nq, k, dtype=torch.long, device=device)
    per_row = prep.num_reference * 16 + k * 64
    step = block_rows(nq, per_row, chunk_size, budget, width=prep.num_reference, target=target_block(prep))
    pre = self_candidates_grouped(prep, k, budget) if chunk_size is None else None
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        keys, cols = topk_block(prep, start, stop, k, budget, found=rows_of(pre, start, stop))
        scores[start:stop] = _key_to_score(prep, keys, metric).to(prep.out_dtype)
        indices[start:stop] = cols
    return scores, indices


def exact_knn(
    query: torch.Tensor,
    reference: torch.Tensor | None,
    k: int,
    *,
    metric: str,
    exclude_self: bool | None,
    chunk_size: int | None,
    normalize_embeddings: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"torch"`` backend of :func:`~dml_bias.metrics.knn`: arguments checked, exact top-``k`` returned."""
    validate_chunk_size(chunk_size)
    prep = prepare(query, reference, metric, exclude_self, normalize_embeddings)
    available = prep.num_reference - (1 if prep.exclude_self else 0)
    check_number(k, "k", low=1, high=max(available, 1), integer=True)
    if available < 1:
        raise ValueError(f"k must be in [1, {available}] (reference size after self exclusion), got {k}")
    return knn_prepared(prep, k, metric, chunk_size, MEMORY_BUDGET)
