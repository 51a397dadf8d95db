"""The counting pass behind the exact label metrics and the full mAP (private to :mod:`dml_bias.metrics`).

Every label metric follows from the ranks of the relevant items (see :mod:`dml_bias.metrics.retrieval`). Here:
the exact keys of each query's relevant items (:class:`ClassLayout`), lookup tables that place a bulk score
among them (:func:`make_bins`), the counting of a block of bulk scores (:func:`count_rows`), the symmetric
tiling of a self-retrieval (:func:`per_query_self`). The engine (:mod:`dml_bias.metrics._engine`) turns the
counts into metrics; it and :mod:`~dml_bias.metrics.sharded` share these, so their names carry no underscore.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from dml_bias._compat import ieee_fp32_matmul
from dml_bias.metrics._exact import (
    MEMORY_BUDGET,
    TILE,
    Prepared,
    block_product,
    exact_keys,
    gamma,
    grouped_inputs,
    scratch,
)

__all__ = [
    "COUNT_BULK",
    "Bins",
    "Bulk",
    "ClassLayout",
    "bins_for",
    "bulk_block",
    "bulk_inputs",
    "choose_bulk",
    "count_above",
    "count_rows",
    "make_bins",
    "pass_costs",
    "per_query_self",
    "row_bound",
    "row_sum",
    "sort_relevant",
]


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """Row sums in a fixed left-to-right order, so trailing zero padding (block-dependent) never changes them."""
    return x.cumsum(1)[:, -1] if x.shape[1] > 0 else x.sum(1)


#: Test hook: the bulk pass that counts the items above each relevant item for the full mAP. ``None``
#: (default): chosen by :func:`choose_bulk` from a sample of query rows; ``"half"`` (the 16-bit pass: bf16 on
#: CPUs, float16 on CUDA; falls back to float32 where the device has none and for the Euclidean metrics),
#: ``"float32"`` or ``"float64"`` force one.
COUNT_BULK: str | None = None

#: The 16-bit counting pass is taken when at most this fraction of a sample's scores falls in an error band.
_HALF_BAND_FRACTION = 0.004

#: Query rows of the sample that decides between the 16-bit and the float32 counting pass.
_SAMPLE_ROWS = 64


@dataclass
class Bulk:
    """The bulk scores of the counting pass: inputs, the per-query bound, the output rounding."""

    query: torch.Tensor  # (Nq, D) bulk-dtype rows
    reference: torch.Tensor  # (M, D)
    eps: torch.Tensor  # (Nq,) float64 bound on |bulk key before output rounding - exact key|
    unit: float  # u / (1 - u) of the stored output (0: float32 output, no extra rounding)
    tiny: float  # absolute error of an underflowing output
    rmax: float  # largest reference row norm (float64 inputs)
    ref_sqnorm: torch.Tensor  # (M,) float64 squared norms of the reference rows as the bulk pass sees them


def bulk_inputs(prep: Prepared, mode: str) -> Bulk:
    """The inputs of the counting pass: ``"half"`` (16-bit, cosine/dot only), ``"float32"`` or ``"float64"``."""
    rmax = float(prep.reference.norm(dim=1).max()) if prep.num_reference > 0 else 0.0
    if mode == "float64":
        dim = int(prep.query.shape[1])
        g = gamma(dim + 2, 2.0**-53)
        rn = prep.reference.norm(dim=1).max() if prep.num_reference > 0 else prep.query_norm.new_zeros(())
        # float64 GEMM and float64 exact keys each within gamma_D |q| |r| of the exact product (doubled: any
        # summation order), and for distances of the squared norms too.
        eps = 8 * g * (prep.query_norm + rn) ** 2 if prep.distance else 4 * g * prep.query_norm * rn
        sq = (prep.reference * prep.reference).sum(1) if prep.distance else prep.query_norm[:0]
        return Bulk(prep.query, prep.reference, eps, 0.0, 0.0, rmax, sq)
    sq = prep.reference_sqnorm32.to(torch.float64) if prep.distance else prep.query_norm[:0]
    grouped = grouped_inputs(prep) if mode == "half" else None
    if grouped is not None and grouped.unit > 0:
        u = grouped.unit
        return Bulk(grouped.query, grouped.reference, grouped.eps, u / (1 - u), 2 * grouped.tiny, rmax, sq)
    return Bulk(prep.query32, prep.reference32, prep.eps, 0.0, 0.0, rmax, sq)


def row_bound(prep: Prepared, bulk: Bulk, rows: slice | torch.Tensor) -> torch.Tensor:
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
_BINS = 2048


@dataclass
class Bins:
    r"""Per-query lookup tables of the counting pass (see :func:`count_rows`), for ``R`` query rows.

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

    def rows(self, r0: int, r1: int) -> Bins:
        """The tables of rows ``r0:r1``."""
        table = self.table[r0 * self.nbins : r1 * self.nbins]
        return Bins(
            self.keys[r0:r1], self.cols[r0:r1], self.w[r0:r1], self.lo[r0:r1], self.inv[r0:r1],
            self.first[r0:r1], table, self.nbins,
        )  # fmt: skip


def make_bins(rel_keys: torch.Tensor, rel_cols: torch.Tensor, w: torch.Tensor, nbins: int) -> Bins:
    r"""Build :class:`Bins` for relevant keys ``(R, T)`` sorted as :func:`sort_relevant` does, bound ``w (R, 1)``.

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
    index = torch.int32 if width < 2**30 else torch.long
    ones = torch.ones_like(first, dtype=index)
    below = torch.zeros(nb, nbins + 1, dtype=index, device=device).scatter_add_(1, after, ones)
    reach = torch.zeros(nb, nbins + 1, dtype=index, device=device).scatter_add_(1, first, ones)
    below = below[:, :nbins].cumsum(1, dtype=index)  # windows ended before bin k
    reach = reach[:, :nbins].cumsum(1, dtype=index)  # windows begun by bin k
    table = torch.where(reach > below, -1 - below, below).reshape(-1)
    return Bins(rel_keys, rel_cols, wr, lo, inv, first, table, nbins)


def count_rows(
    prep: Prepared,
    bins: Bins,
    qstart: int,
    src: torch.Tensor,
    query_labels: torch.Tensor,
    column_labels: torch.Tensor,
    skip: torch.Tensor | None,
    cstart: int,
    col_offset: int,
    budget: int,
    junk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""How many irrelevant items rank above exactly ``t`` relevant items, per query: ``(R, T + 1)`` int64.

    ``src`` (``(R, C)`` float32, or float64 for the Euclidean metrics; a transposed view is fine) holds the bulk
    keys of queries ``qstart .. qstart + R`` (labels ``query_labels``) against the local reference items
    ``cstart .. cstart + C`` (labels ``column_labels``; global index ``col_offset +`` local index). ``skip``
    (``(R,)``, or ``None``) is a column of ``src`` per query that is not counted (the query itself, or the item
    left out in a sharded evaluation; ``-1``: none). ``junk`` (``(rows, columns)`` of ``src``, or ``None``) are
    further pairs that are not counted (items of the query's label removed from its list by a re-identification
    protocol). ``bins`` are the rows' tables (:func:`make_bins`).

    An item with bulk key :math:`v` has its exact key in :math:`[v - w, v + w]` (:func:`row_bound`): it is
    certainly above every relevant key below :math:`v - w` and below every key above :math:`v + w`. Its bin gives
    that count directly unless a key's window reaches the bin; the item is then compared with those few keys,
    and if one lies in :math:`[v - w, v + w]` it is re-scored exactly (float64 element-wise, the same arithmetic
    as the relevant keys) and placed by the tie rule (equal keys: the lower global index ranks first). A relevant
    item lies in its own key's window, so it always takes the second route, where it is recognised by its label
    and left out: no mask of the block is needed.
    """
    nb, nc = int(src.shape[0]), int(src.shape[1])
    device = src.device
    width = int(bins.keys.shape[1])
    index = bins.table.dtype if nb * max(bins.nbins, width + 1) < 2**31 else torch.long
    rows_b = torch.arange(nb, device=device)
    # Items below the lowest bin are above no relevant item: they only feed column 0, which no metric reads. Where
    # most items are there (a good model: the relevant items lead the list), only the others are looked at.
    above = src.ge(_lowest_bin_top(bins)[:, None])
    if skip is not None:
        has = skip >= 0
        above[rows_b[has], skip[has]] = False
    if junk is not None:
        above[junk[0], junk[1]] = False
    if int(above.count_nonzero()) <= _COMPACT_FRACTION * max(1, nb * nc):
        er, ec = above.nonzero(as_tuple=True)
        v = _gather2d(src, er, ec).to(torch.float64)
        k = ((v - bins.lo.index_select(0, er)) * bins.inv.index_select(0, er)).clamp_(0, bins.nbins - 1).long()
        counts = bins.table.index_select(0, k + er * bins.nbins).long()
        ref = _Items(er, ec, v, k)
        counts = _place_near(prep, bins, qstart, cstart, col_offset, budget, ref, counts, query_labels, column_labels)
        hist = torch.bincount(er * (width + 1) + counts, minlength=nb * (width + 1))
        return hist.view(nb, width + 1)
    if src.dtype in (torch.float16, torch.bfloat16):  # widened (exactly) to float32 for the bin positions
        src = scratch(prep, "count_keys", src.shape, torch.float32).copy_(src)
    pos = scratch(prep, "count_pos", src.shape, src.dtype)
    scale = bins.inv.to(src.dtype)[:, None]
    torch.addcmul((-bins.lo * bins.inv).to(src.dtype)[:, None], src, scale, out=pos).clamp_(0, bins.nbins - 1)
    code = scratch(prep, "count_code", src.shape, index)
    code.copy_(pos)
    code.add_((rows_b * bins.nbins).to(index)[:, None])
    cnt = scratch(prep, "count_cnt", src.shape, index)
    flat_cnt = cnt.view(-1)
    torch.index_select(bins.table, 0, code.view(-1), out=flat_cnt)
    if skip is not None:
        cnt[rows_b[has], skip[has]] = 0
    if junk is not None:
        cnt[junk[0], junk[1]] = 0  # counted in column 0, which no metric reads
    flat = (flat_cnt < 0).nonzero().squeeze(1)
    if flat.numel() > 0:
        er, ec = flat.div(nc, rounding_mode="floor"), flat.remainder(nc)
        ref = _Items(
            er,
            ec,
            _gather2d(src, er, ec).to(torch.float64),
            code.view(-1).index_select(0, flat).long() - er * bins.nbins,
        )
        counts = flat_cnt.index_select(0, flat).long()
        counts = _place_near(prep, bins, qstart, cstart, col_offset, budget, ref, counts, query_labels, column_labels)
        flat_cnt.index_copy_(0, flat, counts.to(index))
    cnt.add_((rows_b * (width + 1)).to(index)[:, None])
    hist = torch.bincount(flat_cnt, minlength=nb * (width + 1))
    return hist.view(nb, width + 1)


#: :func:`count_rows` looks only at the items above each row's lowest bin when they are at most this share.
_COMPACT_FRACTION = 0.25


def _lowest_bin_top(bins: Bins) -> torch.Tensor:
    """``(R,)`` float32 values at or below half of each row's bin 0: a bulk key below it lies in bin 0.

    Bin 0 is below every key's window (they begin at bin 2), so its items are above no relevant item. The
    float32 value is rounded down, so the comparison with a float32 or 16-bit key (promoted exactly) is safe.
    """
    top = bins.lo + 0.5 / bins.inv
    top32 = top.to(torch.float32)
    return torch.where(top32.to(torch.float64) > top, torch.nextafter(top32, top32.new_tensor(-torch.inf)), top32)


@dataclass
class _Items:
    """Items of a block to place among the relevant keys: rows, columns, bulk keys (float64) and bins."""

    rows: torch.Tensor
    cols: torch.Tensor
    keys: torch.Tensor
    bins: torch.Tensor


def _place_near(
    prep: Prepared,
    bins: Bins,
    qstart: int,
    cstart: int,
    col_offset: int,
    budget: int,
    items: _Items,
    counts: torch.Tensor,
    query_labels: torch.Tensor,
    column_labels: torch.Tensor,
) -> torch.Tensor:
    """Counts (int64) of items whose table entry ``counts`` is known (``>= 0``) or reached by a window (``< 0``).

    A reached item is compared with the keys whose window reaches its bin (consecutive, about one or two per
    bin); if one lies within the bound it is re-scored exactly (float64 element-wise, the same arithmetic as the
    relevant keys) and placed by the tie rule. Items of the query's label (relevant, or junk) get count 0:
    they are recognised here, which spares masking the block.
    """
    reached = (counts < 0).nonzero().squeeze(1)
    if reached.numel() == 0:
        return counts
    width = int(bins.keys.shape[1])
    er, ec = items.rows.index_select(0, reached), items.cols.index_select(0, reached)
    v, k = items.keys.index_select(0, reached), items.bins.index_select(0, reached)
    relevant = query_labels.index_select(0, er) == column_labels.index_select(0, ec)
    j0 = -1 - counts.index_select(0, reached)  # keys whose window ended before the bin: below the item
    count = j0.clone()
    near = torch.zeros_like(relevant)
    w = bins.w.index_select(0, er)
    lo_v, hi_v = v - w, v + w
    # 1-D index_select into the row-major tables throughout: much cheaper than advanced indexing on the CPU.
    first_flat, keys_flat = bins.first.reshape(-1), bins.keys.reshape(-1)
    base = er * width
    active = torch.ones_like(relevant)
    t = 0
    while bool(active.any()):
        j = j0 + t
        active &= j < width
        at = base + j.clamp_max(width - 1)
        active &= first_flat.index_select(0, at) <= k
        bj = keys_flat.index_select(0, at)
        count += active & (bj < lo_v)
        near |= active & (bj >= lo_v) & (bj <= hi_v)
        t += 1
    count.masked_fill_(relevant, 0)
    near &= ~relevant
    br, bc = er[near], ec[near]
    if br.numel() > 0:
        # Near-ties: the exact key of the item against the exact relevant keys, with the tie rule.
        exact = exact_keys(prep, br + qstart, bc + cstart, budget)
        gcol = bc + cstart + col_offset
        placed = torch.empty_like(exact, dtype=torch.long)
        step = max(1, budget // (24 * max(width, 1)))
        for s in range(0, br.numel(), step):
            r_, g_, k_ = br[s : s + step], gcol[s : s + step], exact[s : s + step]
            rk, rc = bins.keys[r_], bins.cols[r_]
            ahead = (rk < k_[:, None]) | ((rk == k_[:, None]) & (g_[:, None] < rc))
            placed[s : s + step] = ahead.sum(1)
        count[near] = placed
    out = counts.clone()
    out.index_copy_(0, reached, count)
    return out


def _gather2d(src: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``src[rows, cols]`` by a 1-D ``index_select`` (``src`` a dense block or its transpose, as count_rows gets)."""
    if not (src.is_contiguous() or src.T.is_contiguous()):
        src = src.contiguous()
    flat = torch.as_strided(src, (src.numel(),), (1,))
    return flat.index_select(0, rows * src.stride(0) + cols * src.stride(1))


def bulk_block(prep: Prepared, bulk: Bulk, start: int, stop: int, cols: slice | None = None) -> torch.Tensor:
    """Bulk keys of queries ``start:stop`` against reference items ``cols`` (all by default) for :func:`count_rows`.

    The product's dtype for cosine/dot (float32, float64, or 16-bit: :func:`count_rows` widens what it needs), float64
    ``-|q - r|^2`` for the Euclidean metrics (from the product and the squared norms of the reference in the
    pass' precision, as the bound assumes).
    """
    cols = slice(None) if cols is None else cols
    product = block_product(prep, bulk.query[start:stop], bulk.reference[cols])
    if prep.distance:  # 2 q.r - |r|^2 - |q|^2 = -|q - r|^2
        src = scratch(prep, "count_keys", product.shape, torch.float64)
        src.copy_(product).mul_(2.0).sub_(bulk.ref_sqnorm[cols])
        return src.sub_(prep.query_sqnorm[start:stop, None])
    return product


def _slices(n: int, step: int) -> list[tuple[int, int]]:
    """``[(0, step), (step, 2 step), ...]`` covering ``range(n)``."""
    return [(s0, min(n, s0 + step)) for s0 in range(0, n, step)]


#: Bins per relevant key that :func:`bins_for` aims at, and the most bins per row.
_BINS_PER_KEY = 64
_MAX_BINS = 2**16


def bins_for(num_rows: int, num_cols: int, width: int, budget: int) -> int:
    """Bins per row of the lookup tables for ``num_rows`` queries with up to ``width`` relevant keys each.

    The cost model: an item whose bin a window reaches is compared one by one (tens of nanoseconds), the others
    cost a table lookup. A key's window spans about a bin and a half, so when the relevant items spread like
    the others (random labels, weak models, large classes) about ``1.5 width / nbins`` of the items land in a
    reached bin. Hence ``_BINS_PER_KEY`` bins per key (about 2.5 %, so that the sample of :func:`choose_bulk`,
    which counts a wider reach, stays below its 5 % for float32), at least ``_BINS`` (a table that stays in
    the first-level cache), at most ``_MAX_BINS`` and a quarter of the row's items, tables within a quarter of
    the budget.
    """
    want = max(_BINS, _BINS_PER_KEY * width)
    return int(max(64, min(want, _MAX_BINS, num_cols // 4, budget // (4 * 4 * max(num_rows, 1)))))


def count_above(
    prep: Prepared,
    bulk: Bulk,
    start: int,
    stop: int,
    rel_keys: torch.Tensor,
    rel_cols: torch.Tensor,
    query_labels: torch.Tensor,
    reference_labels: torch.Tensor,
    skip: torch.Tensor | None,
    col_offset: int,
    budget: int,
    junk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`count_rows` for queries ``start:stop`` against every local reference item (one bulk GEMM)."""
    w = row_bound(prep, bulk, slice(start, stop))
    nbins = bins_for(stop - start, prep.num_reference, int(rel_keys.shape[1]), budget)
    bins = make_bins(rel_keys, rel_cols, w, nbins)
    src = bulk_block(prep, bulk, start, stop)
    return count_rows(prep, bins, start, src, query_labels, reference_labels, skip, 0, col_offset, budget, junk)


def sort_relevant(keys: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevant keys per row in the order of :func:`count_above` (ascending key, then descending index)."""
    keys = keys.masked_fill(~valid, torch.inf)
    cols = cols.masked_fill(~valid, -1)
    by_col = torch.argsort(cols, dim=1, descending=True, stable=True)
    keys, cols = keys.gather(1, by_col), cols.gather(1, by_col)
    by_key = torch.argsort(keys, dim=1, stable=True)
    return keys.gather(1, by_key), cols.gather(1, by_key)


def choose_bulk(prep: Prepared, qlab: torch.Tensor, rlab: torch.Tensor) -> str:
    """The counting pass for these inputs, ``"half"``, ``"float32"`` or ``"float64"``, from a sample of query rows.

    A pass costs its GEMM plus the items it must compare one by one: those with a relevant score within its
    bound (and about a bin of its lookup table). On up to 64 evenly spaced query rows, the fraction of such
    items is measured for the 16-bit pass (where the device has one) and for float32, with float32 scores
    standing in for the exact ones. The 16-bit pass is taken when its fraction is at most
    ``_HALF_BAND_FRACTION``; otherwise the cost model of :func:`pass_costs` picks float32 or float64 (a float64
    GEMM and a sorted search of every score, whose bound of about 1e-13 leaves no such items) from the float32
    fraction and the number of relevant items. Where the relevant items spread over the bulk of the scores
    (typical of real embeddings) the 16-bit bound puts most items near one; with many items near a relevant
    key (random labels, large classes, hundreds of relevant items crowding the bins) the float64 pass wins.
    """
    if COUNT_BULK is not None:
        return COUNT_BULK
    nq = prep.num_query
    if nq == 0 or prep.num_reference == 0:
        return "float32"
    rows = torch.linspace(0, nq - 1, min(nq, _SAMPLE_ROWS), device=qlab.device).long().unique()
    rel = rlab[None, :] == qlab[rows, None]
    if prep.exclude_self:
        rel[torch.arange(rows.numel(), device=rows.device), rows] = False
    with ieee_fp32_matmul():
        s32 = torch.mm(prep.query32[rows], prep.reference32.T).to(torch.float64)
    if prep.distance:
        s32 = 2 * s32 - prep.reference_sqnorm32.to(torch.float64) - prep.query_sqnorm[rows, None]
    keys = torch.sort(torch.where(rel, s32, torch.inf), dim=1).values

    nvalid = rel.sum(1)
    bmin = torch.where(nvalid > 0, keys[:, 0], 0.0)
    bmax = torch.where(nvalid > 0, keys.gather(1, (nvalid - 1).clamp_min(0)[:, None])[:, 0], 0.0)

    nbins = bins_for(_SAMPLE_ROWS, prep.num_reference, int(nvalid.max()), MEMORY_BUDGET)

    def near_fraction(scores: torch.Tensor, mode: str) -> float:
        # Items that count_rows must compare one by one: a relevant score within the bound plus a bin or so.
        w = row_bound(prep, bulk_inputs(prep, mode), rows)[:, 0]
        reach = (w + 1.25 * (bmax - bmin + 2 * w) / (nbins - 8))[:, None]
        lo = torch.searchsorted(keys, scores - reach)
        hi = torch.searchsorted(keys, scores + reach, right=True)
        near = (hi > lo) & ~rel
        return float(near.sum()) / max(1, near.numel())

    grouped = grouped_inputs(prep)
    if grouped is not None and grouped.unit > 0.0:
        with ieee_fp32_matmul():
            s16 = torch.mm(grouped.query[rows], grouped.reference.T).to(torch.float64)
        if near_fraction(s16, "half") <= _HALF_BAND_FRACTION:
            return "half"
    cost32, cost64 = pass_costs(near_fraction(s32, "float32"), int(nvalid.max()))
    return "float32" if cost32 <= cost64 else "float64"


def pass_costs(near: float, width: int) -> tuple[float, float]:
    """Estimated cost per item of the float32 and the float64 counting pass (units of one table lookup).

    The float32 pass costs a lookup per item plus, for the fraction ``near`` of the items that lie near a
    relevant key (the sample's estimate), a comparison one by one and often an exact re-scoring; the float64
    pass costs a wider GEMM and a sorted search of every score among ``width`` keys. Calibrated on the 2-core
    CPU (CPU time, one process, random labels, D = 128): N = 20,000 in classes of 200 (15 % near) float64 is
    2.9x faster; N = 10,000 in classes of 80 (10 % near) float32 is 1.8x faster, which this model misses
    (it takes float64 there); clustered data (about 1 % near) takes float32.
    """
    return 1.0 + 60.0 * near, 1.8 + 0.25 * math.log2(width + 1)


@dataclass
class ClassLayout:
    """Where each query's relevant items sit: the reference sorted by label (stable: indices ascend in a class).

    With ``groups`` (re-identification: ``(query_groups, reference_groups)``) a reference item of the query's
    label *and* group is not relevant: it is "junk", removed from the query's list (as the query itself is).
    """

    order: torch.Tensor  # (M,) reference indices sorted by label
    starts: torch.Tensor  # (C,) first position of each class in ``order``
    pos: torch.Tensor  # (Nq,) the query's class
    n_class: torch.Tensor  # (Nq,) reference items of the query's label
    num_rel: torch.Tensor  # (Nq,) relevant items (the query itself and junk left out)
    groups: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def of(
        prep: Prepared,
        qlab: torch.Tensor,
        rlab: torch.Tensor,
        groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> ClassLayout:
        nq = prep.num_query
        order = torch.argsort(rlab, stable=True)
        classes, counts = torch.unique_consecutive(rlab[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.searchsorted(classes, qlab).clamp_max(classes.numel() - 1)
        n_class = torch.where(classes[pos] == qlab, counts[pos], torch.zeros_like(pos))
        if groups is not None:
            return ClassLayout(order, starts, pos, n_class, n_class - pair_counts(qlab, rlab, *groups), groups)
        self_rel = torch.zeros(nq, dtype=torch.bool, device=qlab.device)
        if prep.exclude_self:
            self_rel = rlab[:nq] == qlab
        return ClassLayout(order, starts, pos, n_class, n_class - self_rel.long())

    @property
    def num_junk(self) -> torch.Tensor:
        """``(Nq,)`` items of the query's label that are not relevant (the query itself, same-group items)."""
        return self.n_class - self.num_rel

    def members(self, start: int, stop: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, width)`` reference items of the label of queries ``start:stop`` and which are real (not padding)."""
        m = int(self.order.shape[0])
        ar = torch.arange(width, device=self.order.device)
        idx = (self.starts[self.pos[start:stop]][:, None] + ar[None, :]).clamp_max(m - 1)
        return self.order[idx], ar[None, :] < self.n_class[start:stop, None]

    def columns(self, prep: Prepared, start: int, stop: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, width)`` reference items of the label of queries ``start:stop`` and which of them are relevant."""
        relcols, valid = self.members(start, stop, width)
        if prep.exclude_self:
            valid &= relcols != torch.arange(start, stop, device=relcols.device)[:, None]
        if self.groups is not None:
            qg, rg = self.groups
            valid &= rg[relcols] != qg[start:stop, None]
        return relcols, valid

    def junk(self, prep: Prepared, start: int, stop: int, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rows, columns)`` of the items of queries ``start:stop``'s label that are not relevant, or ``None``."""
        if self.groups is None:
            return None
        relcols, valid = self.columns(prep, start, stop, width)
        _, member = self.members(start, stop, width)
        jr, jc = (member & ~valid).nonzero(as_tuple=True)
        return jr, relcols[jr, jc]

    def relevant(self, prep: Prepared, start: int, stop: int, width: int, budget: int) -> tuple[torch.Tensor, ...]:
        """Exact keys of the relevant items of queries ``start:stop``, sorted as :func:`count_rows` needs them."""
        device = self.order.device
        relcols, valid = self.columns(prep, start, stop, width)
        vr, vc = valid.nonzero(as_tuple=True)
        keys = torch.zeros(stop - start, width, dtype=torch.float64, device=device)
        keys[vr, vc] = exact_keys(prep, vr + start, relcols[vr, vc], budget)
        return sort_relevant(keys, relcols, valid)


def pair_counts(
    qlab: torch.Tensor, rlab: torch.Tensor, query_groups: torch.Tensor, reference_groups: torch.Tensor
) -> torch.Tensor:
    """``(Nq,)`` reference items with the query's label *and* group (int64)."""
    nq = int(qlab.shape[0])
    pairs = torch.stack([torch.cat([qlab, rlab]), torch.cat([query_groups, reference_groups])], 1)
    _, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    counts = torch.bincount(inverse[nq:], minlength=int(inverse.max()) + 1 if inverse.numel() else 0)
    return counts[inverse[:nq]]


def per_query_self(
    prep: Prepared, bulk: Bulk, layout: ClassLayout, labels: torch.Tensor, budget: int
) -> torch.Tensor | None:
    """The ``(N, max R + 1)`` counts of :func:`count_rows` when the queries are the reference (self excluded).

    The score matrix is symmetric, so only the tiles on and above the diagonal are computed; each tile is
    counted for its rows and, transposed, for its columns' rows: half the GEMM work. This needs every query's
    relevant keys and lookup tables at once, so it runs only when they fit a third of the budget (``None``
    otherwise), for cosine/dot and without groups.
    """
    n = prep.num_query
    if layout.groups is not None or prep.distance or not prep.exclude_self:
        return None
    if prep.query is not prep.reference or n != prep.num_reference:
        return None
    if bulk.query is not bulk.reference:
        return None
    rm = int(layout.n_class.max()) if n > 0 else 0
    # Every query's relevant keys (about 48 bytes each with the index work) and table (4 bytes a bin) at once,
    # within a third of the budget; the tiles of the pass take little.
    per_row = budget // 3 // max(n, 1) - rm * 48
    nbins = min(bins_for(n, n, rm, budget * 2), per_row // 4)
    if rm == 0 or nbins < 256:
        return None
    device = prep.query.device
    keys = torch.empty(n, rm, dtype=torch.float64, device=device)
    cols = torch.empty(n, rm, dtype=torch.long, device=device)
    step = max(1, min(budget // (8 * 64 * rm), budget // (16 * 4 * (nbins + 1))))
    for s0, s1 in _slices(n, step):
        keys[s0:s1], cols[s0:s1] = layout.relevant(prep, s0, s1, rm, budget)
    # The tables, built a slice of rows at a time (their temporaries are several times the table).
    w = row_bound(prep, bulk, slice(0, n))
    parts = [make_bins(keys[s0:s1], cols[s0:s1], w[s0:s1], nbins) for s0, s1 in _slices(n, step)]
    bins = Bins(
        keys, cols, w[:, 0], torch.cat([p.lo for p in parts]), torch.cat([p.inv for p in parts]),
        torch.cat([p.first for p in parts]), torch.cat([p.table for p in parts]), nbins,
    )  # fmt: skip
    del parts
    hist = torch.zeros(n, rm + 1, dtype=torch.long, device=device)
    bounds = [*range(0, n, TILE), n]
    panels = list(itertools.pairwise(bounds))
    for i, (a0, a1) in enumerate(panels):
        for b0, b1 in panels[i:]:
            src = bulk_block(prep, bulk, a0, a1, slice(b0, b1))
            la, lb = labels[a0:a1], labels[b0:b1]
            skip = torch.arange(a1 - a0, device=device) if a0 == b0 else None  # the query itself
            hist[a0:a1] += count_rows(prep, bins.rows(a0, a1), a0, src, la, lb, skip, b0, 0, budget)
            if a0 != b0:  # the same tile, transposed (a strided view: one pass reads it)
                hist[b0:b1] += count_rows(prep, bins.rows(b0, b1), b0, src.T, lb, la, None, a0, 0, budget)
    del bins
    return hist
