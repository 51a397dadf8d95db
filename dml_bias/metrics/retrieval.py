r"""Exact label-based retrieval metrics: Recall@k (DML meaning), R-precision, MAP@R and full mAP.

Every metric here follows from the *ranks of the relevant items*: for a query :math:`q` with label
:math:`y_q`, the relevant items are the reference items labelled :math:`y_q` (the query itself left out when
it is part of the reference), and the rank of a relevant item :math:`j` is

.. math::

    \operatorname{rank}_q(j) = 1 + \#\{m \ne q : s(q, m) > s(q, j)
    \text{ or } (s(q, m) = s(q, j) \text{ and } m < j)\},

i.e. its 1-based position in the neighbour list sorted by decreasing similarity (increasing distance), ties
by lower reference index.

**The default pass (every key, full mAP included)** builds no neighbour list. Per block of queries:

1. the exact float64 keys :math:`b_1 \le \dots \le b_R` of the query's relevant items (element-wise dot
   products, :math:`\sum_q R_q \cdot D` work, the same arithmetic for every pair so duplicated rows tie);
2. one bulk GEMM (float32; the 16-bit pass — bf16 on CPUs with native bf16, float16 on CUDA — when a sample of
   rows shows that few items fall in its wider error band) whose scores only *count*: an item with bulk key
   :math:`v` has its exact key in :math:`[v - w, v + w]`, :math:`w` the proven bound of the pass (float32
   accumulation of float32 or 16-bit products, the rounding of a 16-bit output, the float64 rounding of the
   comparisons), so it is certainly above every relevant key below :math:`v - w` and below every key above
   :math:`v + w`. A per-query lookup table over equal bins of bulk keys gives that count for every item whose
   bin no window :math:`[b_j - w, b_j + w]` reaches; the other items are compared with the few keys whose
   window reaches their bin, and an item with a key inside :math:`[v - w, v + w]` is re-scored exactly and
   placed by the tie rule. No sort of any row, extra memory within the budget. When the sample shows that the
   tables would be crowded (hundreds of relevant items per query over the bulk of the scores), the pass is a
   float64 GEMM instead, each score placed among the relevant ones by a sorted search;
3. the rank of the :math:`i`-th best relevant item is :math:`i` plus the number of items above it, which gives
   Recall@k, R-precision, MAP@R and AP at once.

When the queries are the reference (leave-one-out), only the tiles on and above the diagonal of the symmetric
score matrix are computed. ``full_map=False`` takes the top-:math:`K` pass instead (exact top-:math:`K` lists
from :func:`~dml_bias.metrics.knn`'s candidate pass, :math:`K = \max R_q`), which has no full mAP but is faster
when relevant items rank deep. See :doc:`/api/metrics` for the definitions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dml_bias._checks import check_labels, check_number, check_same_device, describe
from dml_bias.metrics._counting import (
    ClassLayout,
    PerQuery,
    bulk_inputs,
    choose_bulk,
    count_above,
    per_class_means,
    per_query_self,
    ranks_to_metrics,
    row_sum,
)
from dml_bias.metrics._exact import (
    MEMORY_BUDGET,
    Prepared,
    block_product,
    block_rows,
    exact_keys,
    prepare,
    rows_of,
    scratch,
    self_candidates_grouped,
    target_block,
    topk_block,
    validate_chunk_size,
)

__all__ = ["map_at_r", "mean_average_precision", "r_precision", "recall_at_k", "retrieval_metrics"]


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


def _per_query(
    prep: Prepared,
    qlab: torch.Tensor,
    rlab: torch.Tensor,
    ks: tuple[int, ...],
    chunk_size: int | None,
    budget: int = MEMORY_BUDGET,
) -> PerQuery:
    """Exact per-query metrics, full AP included, from the ranks of the relevant items, a block of queries at a time.

    Per block: exact float64 keys of every query's relevant items (element-wise, ``sum(R_q) * D`` work), then one
    bulk GEMM (float32, the 16-bit pass or float64, as :func:`choose_bulk` decides) whose scores only *count*,
    per query, the irrelevant items above each relevant item (:func:`count_above`).
    """
    device = prep.query.device
    nq, m = prep.num_query, prep.num_reference
    mode = choose_bulk(prep, qlab, rlab)
    if mode == "float64":
        return _per_query_float64(prep, qlab, rlab, ks, chunk_size, budget)
    layout = ClassLayout.of(prep, qlab, rlab)
    n_class, num_rel = layout.n_class, layout.num_rel
    bulk = bulk_inputs(prep, mode)
    if chunk_size is None:
        res = per_query_self(prep, bulk, layout, qlab, ks, budget)
        if res is not None:
            return res
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
        rel_keys, rel_cols = layout.relevant(prep, start, stop, rm, budget)
        skip = rows_b + start if prep.exclude_self else None  # the query itself
        hist = count_above(prep, bulk, start, stop, rel_keys, rel_cols, qlab[start:stop], rlab, skip, 0, budget)
        vals = ranks_to_metrics(hist, num_rel[start:stop], ks)
        recall[:, start:stop], map_r[start:stop], rprec[start:stop], ap[start:stop] = vals
    return PerQuery(recall, map_r, rprec, ap, num_rel > 0, qlab)


def _per_query_float64(
    prep: Prepared,
    qlab: torch.Tensor,
    rlab: torch.Tensor,
    ks: tuple[int, ...],
    chunk_size: int | None,
    budget: int = MEMORY_BUDGET,
) -> PerQuery:
    """The counting pass on a float64 GEMM with a sorted search of every score (bound about 1e-13 per score).

    Taken when a sample shows that too many items would fall in the float32 bound of a relevant score (many
    relevant items per query over a narrow range of scores), where re-scoring them one by one would cost more
    than a float64 GEMM: per block, every item is placed among the sorted relevant scores with a sorted search
    and items within the float64 bound of one are re-scored exactly and compared with the tie rule.
    """
    device = prep.query.device
    nq, m = prep.num_query, prep.num_reference
    layout = ClassLayout.of(prep, qlab, rlab)
    n_class, num_rel = layout.n_class, layout.num_rel
    bulk = bulk_inputs(prep, "float64")  # the float64 GEMM's bound (and the exact keys') per query
    eps = bulk.eps
    ref_sq = bulk.ref_sqnorm if prep.distance else None

    recall = torch.zeros(len(ks), nq, dtype=torch.float64, device=device)
    map_r = torch.zeros(nq, dtype=torch.float64, device=device)
    rprec = torch.zeros(nq, dtype=torch.float64, device=device)
    ap = torch.zeros(nq, dtype=torch.float64, device=device)

    max_rel = int(n_class.max()) if nq > 0 else 0
    step = block_rows(nq, 56 * m + 64 * max_rel, chunk_size, budget, width=m)
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        nb = stop - start
        rows_b = torch.arange(nb, device=device)
        rm = int(n_class[start:stop].max())
        if rm == 0:
            continue
        # Bulk keys in float64 (larger is closer), self and relevant columns set to -inf.
        a = block_product(prep, prep.query[start:stop], prep.reference)
        if ref_sq is not None:
            a.mul_(2.0).sub_(ref_sq).sub_(prep.query_sqnorm[start:stop, None])
        if prep.exclude_self:
            a[rows_b, rows_b + start] = -torch.inf
        relcols, valid = layout.columns(prep, start, stop, rm)  # (nb, rm)
        # Relevant keys from the same GEMM (each within eps of its exact value), then masked out of `a`.
        relkeys = torch.gather(a, 1, relcols).masked_fill_(~valid, torch.inf)
        vr, vc = valid.nonzero(as_tuple=True)
        a[vr, relcols[vr, vc]] = -torch.inf
        # Place every other item among the sorted relevant keys: both sides carry an error <= eps, so an
        # item more than 2 eps away from a relevant key is on the right side of it for sure.
        b = torch.sort(relkeys, dim=1).values  # ascending, invalid (+inf) last
        e = 2 * eps[start:stop][:, None]
        # Block-sized temporaries go to buffers reused across blocks (fresh ones are page-faulted in each time).
        shifted = scratch(prep, "shifted", a.shape, a.dtype)
        cnt = scratch(prep, "count", a.shape, torch.long)
        torch.searchsorted(b, torch.sub(a, e, out=shifted), out=cnt)  # relevant keys certainly below the item
        b_ext = torch.cat([b, torch.full((nb, 1), torch.inf, dtype=b.dtype, device=device)], 1)
        nearest = torch.gather(b_ext, 1, cnt, out=shifted)  # the next relevant key above (or +inf)
        band = scratch(prep, "band", a.shape, torch.bool)
        torch.le(nearest, a.add_(e), out=band)
        band &= a > -torch.inf
        br, bc = band.nonzero(as_tuple=True)
        del band, a, nearest, shifted
        if br.numel() > 0:
            # Near-ties: exact keys for the item and for the relevant items of its row, then the tie rule.
            bkeys = exact_keys(prep, br + start, bc, budget)
            band_rows = torch.unique(br)
            vr, vc = valid[band_rows].nonzero(as_tuple=True)
            exact_rel = torch.full((band_rows.numel(), rm), torch.inf, dtype=torch.float64, device=device)
            exact_rel[vr, vc] = exact_keys(prep, band_rows[vr] + start, relcols[band_rows[vr], vc], budget)
            slot = torch.searchsorted(band_rows, br)
            bstep = max(1, budget // (16 * rm))
            for s in range(0, br.numel(), bstep):
                r_, c_, k_, t_ = br[s : s + bstep], bc[s : s + bstep], bkeys[s : s + bstep], slot[s : s + bstep]
                rk, rc = exact_rel[t_], relcols[r_]
                above = (rk < k_[:, None]) | ((rk == k_[:, None]) & (c_[:, None] < rc))
                cnt[r_, c_] = (above & valid[r_]).sum(1)
        hist = torch.bincount(cnt.add_(rows_b[:, None] * (rm + 1)).view(-1), minlength=nb * (rm + 1))
        del cnt
        vals = ranks_to_metrics(hist.view(nb, rm + 1), num_rel[start:stop], ks)
        recall[:, start:stop], map_r[start:stop], rprec[start:stop], ap[start:stop] = vals
    return PerQuery(recall, map_r, rprec, ap, num_rel > 0, qlab)


def _per_query_topk(
    prep: Prepared,
    qlab: torch.Tensor,
    rlab: torch.Tensor,
    ks: tuple[int, ...],
    chunk_size: int | None,
    budget: int = MEMORY_BUDGET,
) -> PerQuery:
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
        map_r[start:stop] = row_sum(torch.where(in_r, hits / position, 0.0)) / r_f
    ap = torch.full((nq,), torch.nan, dtype=torch.float64, device=device)
    return PerQuery(recall, map_r, rprec, ap, n_class > 0, qlab)


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
) -> tuple[PerQuery, tuple[int, ...]]:
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
    pick: Callable[[PerQuery], torch.Tensor],
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
        full_map: Compute the full ``"map"`` (default): the counting pass of the module notes, which ranks every
            relevant item. ``False`` leaves ``"map"`` out and takes the path of :func:`recall_at_k`,
            :func:`map_at_r` and :func:`r_precision`: exact top-``K`` lists from the candidate pass, ``K`` the
            largest of the ``ks`` and of the :math:`R_q`; it is faster when relevant items rank deep (about 4x
            on the CPU at N = 8,000 to 20,000 with classes of 50, see :doc:`/benchmarks`). Both paths give
            identical values.

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
        out["per_class"] = per_class_means(res, ks_t)
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
