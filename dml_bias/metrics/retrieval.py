r"""Exact label-based retrieval metrics: Recall@k (DML meaning), R-precision, MAP@R and full mAP.

Every metric here follows from the *ranks of the relevant items*: for a query :math:`q` with label
:math:`y_q`, the relevant items are the reference items labelled :math:`y_q` (the query itself left out when
it is part of the reference), and the rank of a relevant item :math:`j` is

.. math::

    \operatorname{rank}_q(j) = 1 + \#\{m \ne q : s(q, m) > s(q, j)
    \text{ or } (s(q, m) = s(q, j) \text{ and } m < j)\},

i.e. its 1-based position in the neighbour list sorted by decreasing similarity (increasing distance), ties
by lower reference index. For the full mAP no neighbour list is built: per block of queries, one float64 GEMM
gives every score, each other item is placed among the sorted relevant scores with a sorted search, and
items within the GEMM's error bound of a relevant score are re-scored exactly (float64 element-wise) and
compared with the tie rule. Recall@k, R-precision and MAP@R alone come from exact top-K lists
(:func:`~dml_bias.metrics.knn`'s float32 path), which is faster. See :doc:`/api/metrics` for the definitions
and bounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dml_bias._checks import check_labels, check_number, check_same_device, describe
from dml_bias._compat import ieee_fp32_matmul
from dml_bias.metrics._exact import (
    MEMORY_BUDGET,
    Prepared,
    block_product,
    block_rows,
    exact_keys,
    grouped_inputs,
    prepare,
    rows_of,
    scratch,
    self_candidates_grouped,
    target_block,
    topk_block,
    validate_chunk_size,
)

__all__ = ["map_at_r", "mean_average_precision", "r_precision", "recall_at_k", "retrieval_metrics"]

_U64 = 2.0**-53


@dataclass
class _PerQuery:
    """Per-query metric values (NaN-free on ``evaluated`` rows) and bookkeeping."""

    recall: torch.Tensor  # (len(ks), Nq) float64
    map_at_r: torch.Tensor  # (Nq,)
    r_precision: torch.Tensor  # (Nq,)
    average_precision: torch.Tensor  # (Nq,)
    evaluated: torch.Tensor  # (Nq,) bool: the query has at least one relevant item
    labels: torch.Tensor  # (Nq,) query labels


def _check_ks(ks: Any, available: int, name: str = "ks") -> tuple[int, ...]:
    """``ks`` as a tuple of distinct ints in ``[1, available]``; ``name`` is the caller's argument (``k`` or ``ks``)."""
    if isinstance(ks, int) and not isinstance(ks, bool):
        ks = (ks,)
    if not isinstance(ks, Sequence) or isinstance(ks, str):
        raise TypeError(f"{name} must be a sequence of integers, got {describe(ks)}")
    out: list[int] = []
    for k in ks:
        check_number(k, name, low=1, high=max(available, 1), integer=True)
        if k > available:
            raise ValueError(f"{name} must be in [1, {available}] (reference size after self exclusion), got {k}")
        if k not in out:
            out.append(int(k))
    return tuple(out)


def _setup(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None,
    reference_labels: torch.Tensor | None,
    metric: str,
    exclude_self: bool | None,
    normalize_embeddings: bool | None,
    chunk_size: int | None,
) -> tuple[Prepared, torch.Tensor, torch.Tensor]:
    validate_chunk_size(chunk_size)
    if reference is None and reference_labels is not None:
        raise ValueError("reference_labels must be None when reference is None (the query set is the reference)")
    if reference is not None and reference_labels is None:
        raise ValueError(f"reference_labels must be given with reference (of {describe(reference)}), got None")
    prep = prepare(query, reference, metric, exclude_self, normalize_embeddings)
    check_labels(query_labels, "query_labels", length=prep.num_query, length_source="query.shape[0]")
    check_same_device(query=query, query_labels=query_labels)
    if reference_labels is None:
        reference_labels = query_labels
    else:
        check_labels(
            reference_labels, "reference_labels", length=prep.num_reference, length_source="reference.shape[0]"
        )
        check_same_device(query=query, reference_labels=reference_labels)
    return prep, query_labels.detach().long(), reference_labels.detach().long()


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    """Row sums in a fixed left-to-right order, so trailing zero padding (block-dependent) never changes them."""
    return x.cumsum(1)[:, -1] if x.shape[1] > 0 else x.sum(1)


#: Test hook: the bulk pass that counts the items above each relevant item for the full mAP. ``None``
#: (default): the 16-bit pass (bf16 on CPUs with native bf16, float16 on CUDA) when a sample of query rows shows
#: it leaves few items to re-score, else float32; ``"float32"`` / ``"half"`` force one (``"half"`` falls back to
#: float32 where the device has no 16-bit pass, and for the Euclidean metrics).
COUNT_BULK: str | None = None

#: The 16-bit counting pass is taken when at most this fraction of a sample's scores falls in an error band.
_HALF_BAND_FRACTION = 0.004

#: Query rows of the sample that decides between the 16-bit and the float32 counting pass.
_SAMPLE_ROWS = 64


@dataclass
class _Bulk:
    """The bulk scores of the counting pass: inputs, the per-query bound, the output rounding."""

    query: torch.Tensor  # (Nq, D) bulk-dtype rows
    reference: torch.Tensor  # (M, D)
    eps: torch.Tensor  # (Nq,) float64 bound on |bulk key before output rounding - exact key|
    unit: float  # u / (1 - u) of the stored output (0: float32 output, no extra rounding)
    tiny: float  # absolute error of an underflowing output
    rmax: float  # largest reference row norm (float64 inputs)


def _bulk_inputs(prep: Prepared, half: bool) -> _Bulk:
    """The inputs of the counting pass: 16-bit (``half``; cosine/dot only) or float32."""
    grouped = grouped_inputs(prep) if half else None
    rmax = float(prep.reference.norm(dim=1).max()) if prep.num_reference > 0 else 0.0
    if grouped is not None and grouped.unit > 0:
        u = grouped.unit
        return _Bulk(grouped.query, grouped.reference, grouped.eps, u / (1 - u), 2 * grouped.tiny, rmax)
    return _Bulk(prep.query32, prep.reference32, prep.eps, 0.0, 0.0, rmax)


def _row_bound(prep: Prepared, bulk: _Bulk, rows: slice | torch.Tensor) -> torch.Tensor:
    r"""``(R, 1)`` float64 bound :math:`w` per query: every exact key lies within :math:`w` of its bulk key.

    For the float32 pass :math:`w` is ``prep.eps``; for a 16-bit output :math:`\hat s = \mathrm{fl}_{16}(z)` it
    adds :math:`u|z| + \text{tiny}` with :math:`|z| \le |q|\,\max|r| + e` (Cauchy–Schwarz). A relative
    :math:`2^{-40}` and :math:`2^{-50}` of the largest key cover the float64 rounding of the comparisons.
    """
    e = bulk.eps[rows].to(torch.float64)[:, None]
    qn = prep.query_norm[rows][:, None]
    scale = (qn + bulk.rmax) ** 2 if prep.distance else qn * bulk.rmax
    w = e * (1 + 2.0**-40) + scale * 2.0**-50
    if bulk.unit > 0.0:
        w = w + bulk.unit * (scale + e) * (1 + 2.0**-20) + bulk.tiny
    return w


#: Most bins per query row of the counting pass' lookup table.
_BINS = 4096


@dataclass
class _Bins:
    r"""Per-query lookup tables of the counting pass (see :func:`_count_rows`), for ``R`` query rows.

    Row ``r`` splits the bulk keys into ``nbins`` equal bins :math:`[lo + kh, lo + (k + 1)h)` spanning its
    relevant keys; ``table[r * nbins + k]`` is the number of relevant keys below every item of bin ``k`` when no
    key's window :math:`[b_j - w, b_j + w]` reaches the bin, else ``-(1 + that number)``; ``first[r, j]`` is the
    first bin key ``j``'s window reaches (``nbins`` for padding).
    """

    keys: torch.Tensor  # (R, T) float64 relevant keys, ascending (ties: descending global index), +inf padding
    cols: torch.Tensor  # (R, T) int64 their global reference indices
    w: torch.Tensor  # (R,) float64 bound of the bulk keys
    lo: torch.Tensor  # (R,) float64
    inv: torch.Tensor  # (R,) float64, 1 / bin width
    first: torch.Tensor  # (R, T) int64
    table: torch.Tensor  # (R * nbins,) int32 or int64
    nbins: int

    def rows(self, r0: int, r1: int) -> _Bins:
        """The tables of rows ``r0:r1``."""
        table = self.table[r0 * self.nbins : r1 * self.nbins]
        return _Bins(
            self.keys[r0:r1], self.cols[r0:r1], self.w[r0:r1], self.lo[r0:r1], self.inv[r0:r1],
            self.first[r0:r1], table, self.nbins,
        )  # fmt: skip


def _make_bins(rel_keys: torch.Tensor, rel_cols: torch.Tensor, w: torch.Tensor, nbins: int) -> _Bins:
    r"""Build :class:`_Bins` for relevant keys ``(R, T)`` sorted as :func:`_sort_relevant` does, bound ``w (R, 1)``.

    The windows lie in bins ``2 .. nbins - 3``: items below the lowest bin (above the highest) are below (above)
    every window and take its count. Bin positions computed in float32 are within an eighth of a bin of
    :math:`(v - lo)/h` for the items that are not clamped, as :math:`h \ge 2^{-17}(|b_{min}| + w)` (float32
    rounding of :math:`v/h` and :math:`lo/h`); each window is widened by a quarter bin on both sides for that.
    """
    nb, width = rel_keys.shape
    device = rel_keys.device
    nvalid = (rel_keys < torch.inf).sum(1)
    has = nvalid > 0
    bmin = torch.where(has, rel_keys[:, 0], 0.0)
    bmax = torch.where(has, rel_keys.gather(1, (nvalid - 1).clamp_min(0)[:, None])[:, 0], 0.0)
    wr = w[:, 0]
    h = (bmax - bmin + 2 * wr) / (nbins - 8)
    h = torch.maximum(h, (bmin.abs() + wr) * 2.0**-17 + 2.0**-120)
    inv = 1.0 / h
    lo = bmin - wr - 4 * h
    valid = rel_keys < torch.inf
    first = ((rel_keys - w - lo[:, None]) * inv[:, None] - 0.25).floor_()
    last = ((rel_keys + w - lo[:, None]) * inv[:, None] + 0.25).floor_()
    first = torch.where(valid, first.clamp(0, nbins - 1), nbins).long()
    after = torch.where(valid, (last + 1).clamp(0, nbins), nbins).long()
    ones = torch.ones_like(first)
    below = torch.zeros(nb, nbins + 1, dtype=torch.long, device=device).scatter_add_(1, after, ones).cumsum_(1)
    reach = torch.zeros(nb, nbins + 1, dtype=torch.long, device=device).scatter_add_(1, first, ones).cumsum_(1)
    below, reach = below[:, :nbins], reach[:, :nbins]  # windows ended before bin k / begun by bin k
    index = torch.int32 if width < 2**30 else torch.long
    table = torch.where(reach > below, -1 - below, below).to(index).reshape(-1)
    return _Bins(rel_keys, rel_cols, wr, lo, inv, first, table, nbins)


def _count_rows(
    prep: Prepared,
    bins: _Bins,
    qstart: int,
    src: torch.Tensor,
    masked: torch.Tensor,
    cstart: int,
    col_offset: int,
    budget: int,
) -> torch.Tensor:
    r"""How many irrelevant items rank above exactly ``t`` relevant items, per query: ``(R, T + 1)`` int64.

    ``src`` (``(R, C)`` float32, or float64 for the Euclidean metrics) holds the bulk keys of queries
    ``qstart .. qstart + R`` against the local reference items ``cstart .. cstart + C`` (global index
    ``col_offset +`` local index); ``masked`` (``(R, C)`` bool) marks the items that are not counted (relevant
    items, the query itself). ``bins`` are the rows' tables (:func:`_make_bins`).

    An item with bulk key :math:`v` has its exact key in :math:`[v - w, v + w]` (:func:`_row_bound`): it is
    certainly above every relevant key below :math:`v - w` and below every key above :math:`v + w`. Its bin gives
    that count directly unless a key's window reaches the bin; the item is then compared with those few keys,
    and if one lies in :math:`[v - w, v + w]` it is re-scored exactly (float64 element-wise, the same arithmetic
    as the relevant keys) and placed by the tie rule (equal keys: the lower global index ranks first).
    """
    nb = int(src.shape[0])
    device = src.device
    width = int(bins.keys.shape[1])
    nbins = bins.nbins
    index = bins.table.dtype if nb * max(nbins, width + 1) < 2**31 else torch.long
    rows_b = torch.arange(nb, device=device)
    pos = scratch(prep, "count_pos", src.shape, src.dtype)
    scale = bins.inv.to(src.dtype)[:, None]
    torch.addcmul((-bins.lo * bins.inv).to(src.dtype)[:, None], src, scale, out=pos).clamp_(0, nbins - 1)
    code = scratch(prep, "count_code", src.shape, index)
    code.copy_(pos)
    code.add_((rows_b * nbins).to(index)[:, None])
    cnt = scratch(prep, "count_cnt", src.shape, index)
    torch.index_select(bins.table, 0, code.view(-1), out=cnt.view(-1))
    cnt.masked_fill_(masked, 0)
    er, ec = (cnt < 0).nonzero(as_tuple=True)
    if er.numel() > 0:
        v = src[er, ec].to(torch.float64)
        k = code[er, ec].long() - er * nbins  # the item's bin
        j0 = -1 - cnt[er, ec].long()  # keys whose window ended before the bin: certainly below the item
        count = j0.clone()
        near = torch.zeros_like(er, dtype=torch.bool)
        w = bins.w[er]
        lo_v, hi_v = v - w, v + w
        active = torch.ones_like(near)
        t = 0
        while bool(active.any()):  # the next keys, as long as their window reaches the item's bin
            j = (j0 + t).clamp_max(width - 1)
            active &= (j0 + t < width) & (bins.first[er, j] <= k)
            bj = bins.keys[er, j]
            count += active & (bj < lo_v)
            near |= active & (bj >= lo_v) & (bj <= hi_v)
            t += 1
        cnt[er, ec] = count.to(index)
        br, bc = er[near], ec[near]
        if br.numel() > 0:
            # Near-ties: the exact key of the item against the exact relevant keys, with the tie rule.
            exact = exact_keys(prep, br + qstart, bc + cstart, budget)
            gcol = bc + cstart + col_offset
            step = max(1, budget // (24 * max(width, 1)))
            for s in range(0, br.numel(), step):
                r_, g_, k_ = br[s : s + step], gcol[s : s + step], exact[s : s + step]
                rk, rc = bins.keys[r_], bins.cols[r_]
                ahead = (rk < k_[:, None]) | ((rk == k_[:, None]) & (g_[:, None] < rc))
                cnt[r_, bc[s : s + step]] = ahead.sum(1).to(index)
    cnt.add_((rows_b * (width + 1)).to(index)[:, None])
    hist = torch.bincount(cnt.view(-1), minlength=nb * (width + 1))
    return hist.view(nb, width + 1)


def _bulk_block(prep: Prepared, bulk: _Bulk, start: int, stop: int, cols: slice | None = None) -> torch.Tensor:
    """Bulk keys of queries ``start:stop`` against reference items ``cols`` (all by default) for :func:`_count_rows`.

    Float32 for cosine/dot (16-bit products are widened), float64 ``-|q - r|^2`` for the Euclidean metrics (from
    the float32 product and float32 squared norms of the reference, as the bound assumes).
    """
    cols = slice(None) if cols is None else cols
    product = block_product(prep, bulk.query[start:stop], bulk.reference[cols])
    if prep.distance:  # 2 q.r - |r|^2 - |q|^2 = -|q - r|^2
        src = scratch(prep, "count_keys", product.shape, torch.float64)
        src.copy_(product).mul_(2.0).sub_(prep.reference_sqnorm32[cols].to(torch.float64))
        return src.sub_(prep.query_sqnorm[start:stop, None])
    if product.dtype != torch.float32:
        src = scratch(prep, "count_keys", product.shape, torch.float32)
        return src.copy_(product)
    return product


def _nbins(num_rows: int, num_cols: int, budget: int) -> int:
    """Bins per row: up to ``_BINS``, at most a quarter of the row's items, tables within an eighth of the budget."""
    return int(max(64, min(_BINS, num_cols // 4, budget // (8 * 4 * max(num_rows, 1)))))


def _count_above(
    prep: Prepared,
    bulk: _Bulk,
    start: int,
    stop: int,
    rel_keys: torch.Tensor,
    rel_cols: torch.Tensor,
    masked: torch.Tensor,
    col_offset: int,
    budget: int,
) -> torch.Tensor:
    """:func:`_count_rows` for queries ``start:stop`` against every local reference item (one bulk GEMM)."""
    w = _row_bound(prep, bulk, slice(start, stop))
    bins = _make_bins(rel_keys, rel_cols, w, _nbins(stop - start, prep.num_reference, budget))
    src = _bulk_block(prep, bulk, start, stop)
    return _count_rows(prep, bins, start, src, masked, 0, col_offset, budget)


def _sort_relevant(keys: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevant keys per row in the order of :func:`_count_above` (ascending key, then descending index)."""
    keys = keys.masked_fill(~valid, torch.inf)
    cols = cols.masked_fill(~valid, -1)
    by_col = torch.argsort(cols, dim=1, descending=True, stable=True)
    keys, cols = keys.gather(1, by_col), cols.gather(1, by_col)
    by_key = torch.argsort(keys, dim=1, stable=True)
    return keys.gather(1, by_key), cols.gather(1, by_key)


def _ranks_to_metrics(
    hist: torch.Tensor, num_rel: torch.Tensor, ks: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recall@k ``(len(ks), R)``, MAP@R, R-precision and AP ``(R,)`` from :func:`_count_above`'s histograms.

    The relevant item at position ``d`` (0-based) of the best-first relevant list has ``d`` relevant items above
    it, and an irrelevant item ranks above it iff it is above at least ``num_rel - d`` relevant items.
    """
    device = hist.device
    nb, width = hist.shape[0], hist.shape[1] - 1
    above_from = hist.flip(1).cumsum(1).flip(1)  # above_from[:, t] = #items above >= t relevant ones
    d = torch.arange(width, device=device)[None, :].expand(nb, width)
    t = (num_rel[:, None] - d).clamp(0, width)
    irrelevant_above = torch.gather(above_from, 1, t)
    ranks = (1 + d + irrelevant_above).to(torch.float64)
    live = d < num_rel[:, None]
    r_f = num_rel.to(torch.float64).clamp_min(1.0)
    prec = (d + 1).to(torch.float64) / ranks
    in_r = live & (ranks <= num_rel[:, None])
    best = torch.where(live[:, 0], ranks[:, 0], torch.inf) if width > 0 else torch.full((nb,), torch.inf)
    kt = torch.tensor(ks, dtype=torch.float64, device=device)
    recall = (best[None, :].to(device) <= kt[:, None]).to(torch.float64)
    rprec = in_r.sum(1) / r_f
    map_r = _row_sum(torch.where(in_r, prec, 0.0)) / r_f
    ap = _row_sum(torch.where(live, prec, 0.0)) / r_f
    return recall, map_r, rprec, ap


def _choose_half(prep: Prepared, qlab: torch.Tensor, rlab: torch.Tensor) -> bool:
    """Whether the 16-bit counting pass pays on these inputs, decided on a sample of query rows.

    It pays when few items need re-scoring: at most ``_HALF_BAND_FRACTION`` of the sample's items may have a
    relevant score (float32 here) within the 16-bit bound of their 16-bit score. Where the relevant items spread
    over the bulk of the scores (typical of real embeddings) the 16-bit bound puts most items in a band and the
    float32 pass wins.
    """
    if COUNT_BULK is not None:
        return COUNT_BULK == "half"
    grouped = grouped_inputs(prep)
    if grouped is None or grouped.unit == 0.0 or prep.num_query == 0:
        return False
    nq = prep.num_query
    rows = torch.linspace(0, nq - 1, min(nq, _SAMPLE_ROWS), device=qlab.device).long().unique()
    rel = rlab[None, :] == qlab[rows, None]
    if prep.exclude_self:
        rel[torch.arange(rows.numel(), device=rows.device), rows] = False
    with ieee_fp32_matmul():
        s32 = torch.mm(prep.query32[rows], prep.reference32.T).to(torch.float64)
        s16 = torch.mm(grouped.query[rows], grouped.reference.T).to(torch.float64)
    keys = torch.sort(torch.where(rel, s32, torch.inf), dim=1).values
    w = _row_bound(prep, _bulk_inputs(prep, True), rows)
    lo = torch.searchsorted(keys, s16 - w)
    hi = torch.searchsorted(keys, s16 + w, right=True)
    band = (hi > lo) & ~rel
    return float(band.sum()) <= _HALF_BAND_FRACTION * band.numel()


def _per_query(
    prep: Prepared,
    qlab: torch.Tensor,
    rlab: torch.Tensor,
    ks: tuple[int, ...],
    chunk_size: int | None,
    budget: int = MEMORY_BUDGET,
) -> _PerQuery:
    """Exact per-query metrics, full AP included, from the ranks of the relevant items, a block of queries at a time.

    Per block: exact float64 keys of every query's relevant items (element-wise, ``sum(R_q) * D`` work), then one
    bulk GEMM (float32, or the 16-bit pass where it pays: see :func:`_choose_half`) whose scores only *count*,
    per query, the irrelevant items above each relevant item (:func:`_count_above`).
    """
    device = prep.query.device
    nq, m = prep.num_query, prep.num_reference
    # Class layout of the reference: items sorted by label (stable, so indices ascend within a class).
    order = torch.argsort(rlab, stable=True)
    classes, counts = torch.unique_consecutive(rlab[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.searchsorted(classes, qlab).clamp_max(classes.numel() - 1)
    found = classes[pos] == qlab
    n_class = torch.where(found, counts[pos], torch.zeros_like(pos))
    self_rel = torch.zeros(nq, dtype=torch.bool, device=device)
    if prep.exclude_self:
        self_rel = rlab[:nq] == qlab
    num_rel = n_class - self_rel.long()
    half = _choose_half(prep, qlab, rlab)
    bulk = _bulk_inputs(prep, half)

    recall = torch.zeros(len(ks), nq, dtype=torch.float64, device=device)
    map_r = torch.zeros(nq, dtype=torch.float64, device=device)
    rprec = torch.zeros(nq, dtype=torch.float64, device=device)
    ap = torch.zeros(nq, dtype=torch.float64, device=device)

    max_rel = int(n_class.max()) if nq > 0 else 0
    per_row = (12 if bulk.unit == 0.0 else 20) * m + 25 * m + 64 * max_rel
    step = block_rows(nq, per_row, chunk_size, budget, width=m)
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        nb = stop - start
        rows_b = torch.arange(nb, device=device)
        rm = int(n_class[start:stop].max())
        if rm == 0:
            continue
        ar = torch.arange(rm, device=device)
        idx = (starts[pos[start:stop]][:, None] + ar[None, :]).clamp_max(m - 1)
        relcols = order[idx]  # (nb, rm): the reference items of the query's label
        valid = ar[None, :] < n_class[start:stop, None]
        if prep.exclude_self:
            valid &= relcols != (rows_b + start)[:, None]
        vr, vc = valid.nonzero(as_tuple=True)
        rel_keys = torch.zeros(nb, rm, dtype=torch.float64, device=device)
        rel_keys[vr, vc] = exact_keys(prep, vr + start, relcols[vr, vc], budget)
        rel_keys, rel_cols = _sort_relevant(rel_keys, relcols, valid)
        masked = scratch(prep, "masked", (nb, m), torch.bool)
        torch.eq(rlab[None, :], qlab[start:stop, None], out=masked)
        if prep.exclude_self:
            masked[rows_b, rows_b + start] = True
        hist = _count_above(prep, bulk, start, stop, rel_keys, rel_cols, masked, 0, budget)
        vals = _ranks_to_metrics(hist, num_rel[start:stop], ks)
        recall[:, start:stop], map_r[start:stop], rprec[start:stop], ap[start:stop] = vals
    return _PerQuery(recall, map_r, rprec, ap, num_rel > 0, qlab)


def _per_query_topk(
    prep: Prepared,
    qlab: torch.Tensor,
    rlab: torch.Tensor,
    ks: tuple[int, ...],
    chunk_size: int | None,
    budget: int = MEMORY_BUDGET,
) -> _PerQuery:
    """Recall@k, R-precision and MAP@R from the exact top-K lists, K = max(R_q, max ks) per block.

    Faster than :func:`_per_query` (a float32 bulk GEMM, no search among the relevant scores) but without the
    full mAP, which needs the rank of every relevant item (``average_precision`` is left at NaN).
    """
    device = prep.query.device
    nq, m = prep.num_query, prep.num_reference
    order = torch.argsort(rlab, stable=True)
    classes, counts = torch.unique_consecutive(rlab[order], return_counts=True)
    pos = torch.searchsorted(classes, qlab).clamp_max(classes.numel() - 1)
    n_class = torch.where(classes[pos] == qlab, counts[pos], torch.zeros_like(pos))
    if prep.exclude_self:
        n_class = n_class - (rlab[:nq] == qlab).long()
    available = m - (1 if prep.exclude_self else 0)
    recall = torch.zeros(len(ks), nq, dtype=torch.float64, device=device)
    map_r = torch.zeros(nq, dtype=torch.float64, device=device)
    rprec = torch.zeros(nq, dtype=torch.float64, device=device)
    kmax = min(available, max([1, int(n_class.max()), *ks]))  # >= 1: every query may be lone
    step = block_rows(nq, 16 * m + 64 * kmax, chunk_size, budget, width=m, target=target_block(prep))
    pre = self_candidates_grouped(prep, kmax, budget) if chunk_size is None else None
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        nr = n_class[start:stop]
        kb = min(available, max([1, int(nr.max()), *ks]))
        found = rows_of(pre, start, stop)
        labels = (qlab[start:stop], rlab)
        _, cols = topk_block(prep, start, stop, kb, budget, need_keys=False, labels=labels, found=found)
        rel = rlab[cols] == qlab[start:stop, None]
        for i, k in enumerate(ks):
            recall[i, start:stop] = rel[:, :k].any(1).to(torch.float64)
        position = torch.arange(1, kb + 1, device=device, dtype=torch.float64)
        in_r = rel & (position[None, :] <= nr[:, None])
        hits = torch.cumsum(in_r, 1).to(torch.float64)
        r_f = nr.to(torch.float64).clamp_min(1.0)
        rprec[start:stop] = in_r.sum(1) / r_f
        map_r[start:stop] = _row_sum(torch.where(in_r, hits / position, 0.0)) / r_f
    ap = torch.full((nq,), torch.nan, dtype=torch.float64, device=device)
    return _PerQuery(recall, map_r, rprec, ap, n_class > 0, qlab)


def _mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float(values[mask].mean()) if bool(mask.any()) else float("nan")


def _run(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None,
    reference_labels: torch.Tensor | None,
    ks: Any,
    exclude_self: bool | None,
    metric: str,
    normalize_embeddings: bool | None,
    chunk_size: int | None,
    full_map: bool = True,
    ks_name: str = "ks",
) -> tuple[_PerQuery, tuple[int, ...]]:
    prep, qlab, rlab = _setup(
        query, query_labels, reference, reference_labels, metric, exclude_self, normalize_embeddings, chunk_size
    )
    available = prep.num_reference - (1 if prep.exclude_self else 0)
    if available < 1:
        name = "query" if reference is None else "reference"
        raise ValueError(
            f"{name} must hold at least 2 rows with self exclusion (no other item is left to rank), got "
            f"{describe(query if reference is None else reference)}"
        )
    ks_t = _check_ks(ks, available, ks_name)
    compute = _per_query if full_map else _per_query_topk
    res = compute(prep, qlab, rlab, ks_t, chunk_size)
    if not bool(res.evaluated.any()):
        raise ValueError(
            "query_labels must share a label with at least one other reference item for some query: every "
            f"query is lone (no other item of its label in the reference; {prep.num_query} queries)"
        )
    return res, ks_t


def _single_metric(
    pick: Callable[[_PerQuery], torch.Tensor],
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None,
    reference_labels: torch.Tensor | None,
    *,
    exclude_self: bool | None,
    metric: str,
    normalize_embeddings: bool | None,
    chunk_size: int | None,
    ks: tuple[int, ...] = (),
    full_map: bool = False,
    ks_name: str = "ks",
) -> float:
    """The body of the single-metric functions: one pass, the mean of the ``pick``-ed per-query values.

    ``full_map=True`` takes the pass that ranks every relevant item (needed for the full mAP); the others use
    the faster top-``K`` pass, which gives identical values for the metrics it computes.
    """
    res, _ = _run(
        query,
        query_labels,
        reference,
        reference_labels,
        ks,
        exclude_self,
        metric,
        normalize_embeddings,
        chunk_size,
        full_map=full_map,
        ks_name=ks_name,
    )
    return _mean(pick(res), res.evaluated)


def retrieval_metrics(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    exclude_self: bool | None = None,
    per_class: bool = False,
    metric: str = "cosine",
    normalize_embeddings: bool | None = None,
    chunk_size: int | None = None,
    full_map: bool = True,
) -> dict[str, Any]:
    r"""Recall@k, MAP@R, R-precision and full mAP of a retrieval, exactly, in one pass.

    For query :math:`q` with :math:`R_q` relevant items whose ranks (see the module notes) are
    :math:`r_1 < r_2 < \dots < r_{R_q}`:

    .. math::

        \text{Recall@}k(q) = [r_1 \le k], \qquad
        \text{R-precision}(q) = \frac{\#\{i : r_i \le R_q\}}{R_q},

        \text{MAP@R}(q) = \frac{1}{R_q} \sum_{i : r_i \le R_q} \frac{i}{r_i}, \qquad
        \text{AP}(q) = \frac{1}{R_q} \sum_{i=1}^{R_q} \frac{i}{r_i}.

    Each value is the mean over the evaluated queries: queries whose label has no other item in the
    reference ("lone" queries) are left out and counted in ``"num_lone_queries"``. Recall@k is the DML hit
    rate (1 if any of the first ``k`` neighbours shares the query's label), MAP@R and R-precision follow
    :cite:`musgrave2020reality`, and ``"map"`` is the average precision over the whole reference.

    Args:
        query: ``(Nq, D)`` floating-point embeddings.
        query_labels: ``(Nq,)`` integer labels.
        reference: ``(M, D)`` embeddings; ``None`` evaluates the query set against itself (leave-one-out).
        reference_labels: ``(M,)`` integer labels; required with ``reference``, ``None`` without.
        ks: The ``k`` of the Recall@k values, each in ``[1, M]`` (``M - 1`` with self exclusion).
        exclude_self: As in :func:`~dml_bias.metrics.knn`: defaults to ``True`` without a reference; with a
            reference, ``True`` means query ``i`` is reference item ``i``.
        per_class: Also return the metrics averaged per query label.
        metric: ``"cosine"``, ``"dot"``, ``"euclidean"`` or ``"squared_euclidean"``.
        normalize_embeddings: As in :func:`~dml_bias.metrics.knn`.
        chunk_size: Query rows per block; ``None`` picks it from a 2 GiB budget for the extra memory.
        full_map: Compute the full ``"map"`` (the rank of every relevant item: one float64 GEMM per block and a
            sorted search of every score). ``False`` leaves ``"map"`` out and takes the faster path of
            :func:`recall_at_k`, :func:`map_at_r` and :func:`r_precision`: exact top-``K`` lists from a float32
            GEMM, ``K`` the largest of the ``ks`` and of the :math:`R_q`. Both paths give identical values.

    Returns:
        A dict with floats ``"recall@{k}"`` for each ``k``, ``"map@r"``, ``"r_precision"``, ``"map"`` and ints
        ``"num_queries"`` (evaluated) and ``"num_lone_queries"``. With ``per_class=True`` also ``"per_class"``:
        ``{label: {"recall@1": ..., "map@r": ..., "r_precision": ..., "map": ..., "count": n}}`` for every
        label with at least one evaluated query (``count`` = its evaluated queries).

    Raises:
        ValueError: Bad shapes, values or devices (the argument is named), or every query lone.
        TypeError: Non-tensor inputs, floating-point labels.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
        >>> y = torch.tensor([0, 0, 1, 1, 2])
        >>> res = retrieval_metrics(x, y, ks=(1, 2))
        >>> res["recall@1"], res["map@r"], res["num_queries"], res["num_lone_queries"]
        (1.0, 1.0, 4, 1)
        >>> retrieval_metrics(x, y, ks=(1,), per_class=True)["per_class"][0]
        {'recall@1': 1.0, 'map@r': 1.0, 'r_precision': 1.0, 'map': 1.0, 'count': 2}
    """
    if not isinstance(per_class, bool):
        raise TypeError(f"per_class must be a bool, got {describe(per_class)}")
    if not isinstance(full_map, bool):
        raise TypeError(f"full_map must be a bool, got {describe(full_map)}")
    if isinstance(ks, Sequence) and not isinstance(ks, str) and len(ks) == 0:
        raise ValueError("ks must hold at least one k (an empty ks would return no Recall@k), got an empty sequence")
    res, ks_t = _run(
        query,
        query_labels,
        reference,
        reference_labels,
        ks,
        exclude_self,
        metric,
        normalize_embeddings,
        chunk_size,
        full_map=full_map,
    )
    ev = res.evaluated
    out: dict[str, Any] = {}
    for i, k in enumerate(ks_t):
        out[f"recall@{k}"] = _mean(res.recall[i], ev)
    out["map@r"] = _mean(res.map_at_r, ev)
    out["r_precision"] = _mean(res.r_precision, ev)
    if full_map:
        out["map"] = _mean(res.average_precision, ev)
    out["num_queries"] = int(ev.sum())
    out["num_lone_queries"] = int((~ev).sum())
    if per_class:
        out["per_class"] = _per_class(res, ks_t)
    return out


def _per_class(res: _PerQuery, ks: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    ev = res.evaluated
    labels = res.labels[ev]
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    n = classes.numel()

    def class_mean(v: torch.Tensor) -> list[float]:
        s = torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, inverse, v[ev])
        return (s / counts.to(torch.float64)).tolist()

    cols: dict[str, list[float]] = {f"recall@{k}": class_mean(res.recall[i]) for i, k in enumerate(ks)}
    cols["map@r"] = class_mean(res.map_at_r)
    cols["r_precision"] = class_mean(res.r_precision)
    if not bool(res.average_precision.isnan().any()):
        cols["map"] = class_mean(res.average_precision)
    out: dict[int, dict[str, Any]] = {}
    for j, c in enumerate(classes.tolist()):
        entry: dict[str, Any] = {name: vals[j] for name, vals in cols.items()}
        entry["count"] = int(counts[j])
        out[int(c)] = entry
    return out


def recall_at_k(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    *,
    k: int = 1,
    exclude_self: bool | None = None,
    metric: str = "cosine",
    normalize_embeddings: bool | None = None,
    chunk_size: int | None = None,
) -> float:
    r"""Recall@k in the DML sense: the fraction of queries with a same-label item among the first ``k``.

    .. math:: \text{Recall@}k = \frac{1}{|Q|} \sum_{q \in Q} [\operatorname{rank}_q(\text{best relevant}) \le k]

    over the non-lone queries :math:`Q` (see :func:`retrieval_metrics` for the arguments).

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.5]])
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> recall_at_k(x, y, k=1), recall_at_k(x, y, k=3)
        (0.75, 1.0)
    """
    return _single_metric(
        lambda res: res.recall[0],
        query,
        query_labels,
        reference,
        reference_labels,
        ks=(k,),
        ks_name="k",
        exclude_self=exclude_self,
        metric=metric,
        normalize_embeddings=normalize_embeddings,
        chunk_size=chunk_size,
    )


def map_at_r(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    *,
    exclude_self: bool | None = None,
    metric: str = "cosine",
    normalize_embeddings: bool | None = None,
    chunk_size: int | None = None,
) -> float:
    r"""MAP@R :cite:`musgrave2020reality`: average precision truncated at :math:`R_q`, divided by :math:`R_q`.

    .. math:: \text{MAP@R} = \frac{1}{|Q|} \sum_{q \in Q} \frac{1}{R_q} \sum_{i=1}^{R_q} P_q(i)\,\text{rel}_q(i)

    where :math:`P_q(i)` is the precision of the first :math:`i` neighbours and :math:`\text{rel}_q(i)` is 1
    if the :math:`i`-th neighbour is relevant (see :func:`retrieval_metrics` for the arguments).

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.5]])
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> map_at_r(x, y)
        0.75
    """
    return _single_metric(
        lambda res: res.map_at_r,
        query,
        query_labels,
        reference,
        reference_labels,
        exclude_self=exclude_self,
        metric=metric,
        normalize_embeddings=normalize_embeddings,
        chunk_size=chunk_size,
    )


def r_precision(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    *,
    exclude_self: bool | None = None,
    metric: str = "cosine",
    normalize_embeddings: bool | None = None,
    chunk_size: int | None = None,
) -> float:
    r"""R-precision: the fraction of relevant items among the first :math:`R_q` neighbours, averaged.

    .. math:: \text{R-precision} = \frac{1}{|Q|} \sum_{q \in Q} \frac{1}{R_q} \sum_{i=1}^{R_q} \text{rel}_q(i)

    (see :func:`retrieval_metrics` for the arguments).

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.5]])
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> r_precision(x, y)
        0.75
    """
    return _single_metric(
        lambda res: res.r_precision,
        query,
        query_labels,
        reference,
        reference_labels,
        exclude_self=exclude_self,
        metric=metric,
        normalize_embeddings=normalize_embeddings,
        chunk_size=chunk_size,
    )


def mean_average_precision(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    *,
    exclude_self: bool | None = None,
    metric: str = "cosine",
    normalize_embeddings: bool | None = None,
    chunk_size: int | None = None,
) -> float:
    r"""Mean average precision over the whole reference (every relevant item counted).

    .. math:: \text{mAP} = \frac{1}{|Q|} \sum_{q \in Q} \frac{1}{R_q} \sum_{i=1}^{R_q} \frac{i}{r_i}

    with :math:`r_i` the rank of the :math:`i`-th best relevant item; equal to scikit-learn's
    ``average_precision_score`` per query when no score ties a relevant with an irrelevant item
    (see :func:`retrieval_metrics` for the arguments).

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.5]])
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> round(mean_average_precision(x, y), 4)
        0.8333
    """
    return _single_metric(
        lambda res: res.average_precision,
        query,
        query_labels,
        reference,
        reference_labels,
        exclude_self=exclude_self,
        metric=metric,
        normalize_embeddings=normalize_embeddings,
        chunk_size=chunk_size,
        full_map=True,
    )
