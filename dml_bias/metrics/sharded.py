r"""Exact nearest-neighbour search over a reference set sharded across :mod:`torch.distributed` ranks.

When the gallery does not fit one device, every rank keeps a contiguous shard of it (rows
``shard_offset : shard_offset + len(shard)`` of the global reference set) and all ranks hold the same queries.
:func:`~dml_bias.metrics.sharded_knn` then

1. searches the local shard with :func:`~dml_bias.metrics.knn` (the local top-:math:`k`, exact);
2. takes the float64 sort keys that order :func:`~dml_bias.metrics.knn`'s result for those :math:`k`
   candidates (scores computed in float64 from the inputs, so they do not depend on how the reference set
   is split);
3. gathers ``(key, global id, score)`` of the :math:`k` candidates of every rank (``all_gather``, :math:`O(Qk)`
   per rank) and merges them by the total order "better key first, lower global index on ties".

Every item of the global top-:math:`k` lies in the local top-:math:`k` of its shard under the same order, so
the merge is exact: the result equals a single-process search of the whole reference set. Unlike the per-shard
cap of faiss' GPU search (:math:`k \le 2048`), nothing limits :math:`k` here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dml_bias._checks import (
    check_bool,
    check_choice,
    check_dtype,
    check_embeddings,
    check_finite,
    check_labels,
    check_number,
    check_same_device,
    check_shape,
    check_tensor,
    describe,
)
from dml_bias._collectives import all_gather_objects, all_gather_rows, all_reduce_sum, rank, world_size
from dml_bias.metrics._counting import bulk_inputs, choose_bulk, count_above, pair_counts, sort_relevant
from dml_bias.metrics._engine import (
    PerQuery,
    check_not_meta,
    hist_metrics,
    list_depth,
    list_metrics,
    parse_metrics,
    require_evaluated,
    summarize,
)
from dml_bias.metrics._exact import MEMORY_BUDGET, block_rows, exact_keys, knn_prepared, prepare, topk_order
from dml_bias.similarity import METRICS

__all__ = ["sharded_knn", "sharded_retrieval_metrics"]


def sharded_knn(
    query: torch.Tensor,
    reference_shard: torch.Tensor,
    k: int,
    *,
    shard_offset: int | None = None,
    metric: str = "cosine",
    exclude_indices: torch.Tensor | None = None,
    chunk_size: int | None = None,
    group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact top-:math:`k` of ``query`` against a reference set sharded across the ranks of ``group``.

    Every rank calls it with the **same** ``query`` (and ``k``, ``metric``, ``exclude_indices``) and its own
    ``reference_shard``; every rank gets the same result, equal to
    ``knn(query, torch.cat(all shards in global order), k, metric=metric)``: neighbours sorted best first, ties
    broken by the lower global index. The order is decided on float64 scores of the float32 inputs, so the
    result does not depend on how the reference set is split. Without :mod:`torch.distributed` (or with one
    rank) it searches ``reference_shard`` alone.

    Communication: one ``all_gather_object`` of shard sizes and three ``all_gather`` of ``(Q, k)`` tensors.
    Memory: each rank holds the candidates of all ranks, ``world_size × Q × k`` entries (split the queries into
    batches if that is too much).

    Args:
        query: ``(Q, D)`` floating-point queries, identical on every rank, finite.
        reference_shard: ``(M_r, D)`` this rank's part of the reference set (``M_r`` may be 0), same device and
            dtype as ``query``.
        k: Number of neighbours, ``1 <= k <= N`` with ``N`` the total reference size over all ranks
            (``k <= N - 1`` with ``exclude_indices``).
        shard_offset: The global index of the shard's first row. ``None``: the shards are consecutive in rank
            order (rank 0 first), so the offset is the total size of the shards of the lower ranks.
            Shards must not overlap.
        metric: ``"cosine"``, ``"dot"``, ``"euclidean"`` or ``"squared_euclidean"`` (see
            :func:`dml_bias.similarity.pairwise`; similarities are sorted in decreasing, distances in increasing
            order).
        exclude_indices: Optional ``(Q,)`` integer tensor: the global reference index each query must not
            retrieve (its own, when the queries are the reference set), or ``-1`` for none.
        chunk_size: Passed to :func:`~dml_bias.metrics.knn` for the local search.
        group: The process group; ``None`` is the default group.

    Returns:
        ``(scores, indices)``, both ``(Q, k)``: the scores as :func:`~dml_bias.metrics.knn` returns them and
        the **global** reference indices (int64), best first.

    Example:
        >>> import torch
        >>> query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> shard = torch.tensor([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0]])  # rows 10, 11, 12 of the global set
        >>> scores, indices = sharded_knn(query, shard, 2, shard_offset=10)
        >>> indices
        tensor([[12, 11],
                [10, 11]])
    """
    check_choice(metric, "metric", METRICS)
    check_embeddings(query, "query")
    check_embeddings(reference_shard, "reference_shard", dim=query.shape[1], allow_empty=True)
    check_same_device(query=query, reference_shard=reference_shard, exclude_indices=exclude_indices)
    if reference_shard.dtype != query.dtype:
        raise TypeError(
            f"reference_shard must have the dtype of query ({query.dtype}), got {describe(reference_shard)}"
        )
    check_number(k, "k", low=1, integer=True)
    if shard_offset is not None:
        check_number(shard_offset, "shard_offset", low=0, integer=True)
    if chunk_size is not None:
        check_number(chunk_size, "chunk_size", low=1, integer=True)
    num_queries = int(query.shape[0])
    if exclude_indices is not None:
        check_tensor(exclude_indices, "exclude_indices")
        check_dtype(exclude_indices, "exclude_indices", "integer")
        check_shape(exclude_indices, "exclude_indices", ("Q",), {"Q": num_queries}, sources={"Q": "query.shape[0]"})
        if exclude_indices.numel() and int(exclude_indices.min()) < -1:
            raise ValueError(f"exclude_indices must be global indices or -1, got minimum {int(exclude_indices.min())}")
    check_finite(query, "query")
    check_finite(reference_shard, "reference_shard")

    layout = _shard_layout(
        reference_shard,
        shard_offset,
        (num_queries, int(query.shape[1]), int(k), metric, exclude_indices is not None),
        group,
    )
    excluding = exclude_indices is not None
    _check_k(k, layout.total, excluding, "k")
    scores, ids, _ = _search_and_merge(query, reference_shard, k, layout, metric, exclude_indices, chunk_size, group)
    return scores, ids


@dataclass
class _Layout:
    """Where every rank's shard sits in the global reference set."""

    sizes: list[int]
    offsets: list[int]
    offset: int  # this rank's offset
    total: int


def _shard_layout(reference_shard: torch.Tensor, shard_offset: int | None, same: tuple, group: Any) -> _Layout:
    """Gather the shard sizes/offsets (and check that ``same`` agrees on every rank and the shards are disjoint)."""
    meta = (int(reference_shard.shape[0]), shard_offset, same)
    metas = all_gather_objects(meta, group)
    for r, other in enumerate(metas):
        if other[2] != same:
            raise ValueError(
                "the query shape, k and the other options must be the same on every rank, got "
                f"{same} here and {other[2]} on rank {r}"
            )
    if len({m[1] is None for m in metas}) > 1:
        raise ValueError("shard_offset must be given on every rank or on none")
    sizes = [m[0] for m in metas]
    offsets = [m[1] for m in metas]
    if offsets[0] is None:
        offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    spans = sorted((o, o + s) for o, s in zip(offsets, sizes, strict=True) if s > 0)
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise ValueError(f"the reference shards must not overlap, got the global spans {spans}")
    return _Layout(sizes=sizes, offsets=offsets, offset=int(offsets[rank(group)]), total=sum(sizes))


def _check_k(k: int, total: int, excluding: bool, name: str) -> None:
    if k > total - int(excluding):
        limit = "N - 1" if excluding else "N"
        raise ValueError(
            f"{name} must be at most {limit} = {total - int(excluding)} (reference rows over all ranks"
            f"{', one excluded per query' if excluding else ''}), got {k}"
        )


def _search_and_merge(
    query: torch.Tensor,
    reference_shard: torch.Tensor,
    k: int,
    layout: _Layout,
    metric: str,
    exclude_indices: torch.Tensor | None,
    chunk_size: int | None,
    group: Any,
    payload: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Local exact top-k, all-gather of (key, global id, score[, payload]) and the exact merge."""
    num_queries = int(query.shape[0])
    excluding = exclude_indices is not None
    shard_size = int(reference_shard.shape[0])
    # Every rank contributes `width` candidate columns: enough that the excluded one can be dropped.
    width = min(k + int(excluding), max(layout.sizes))
    local_k = min(k + int(excluding), shard_size)
    device = query.device
    keys = torch.full((num_queries, width), -torch.inf, dtype=torch.float64, device=device)
    ids = torch.full((num_queries, width), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    out_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32  # as knn() returns
    scores = torch.zeros(num_queries, width, dtype=out_dtype, device=device)
    extra = None if payload is None else torch.zeros(num_queries, width, dtype=payload.dtype, device=device)
    if local_k > 0:
        # The local search and its float64 sort keys come from the same prepared inputs as knn() uses, so the
        # keys are exactly those that order knn()'s result (larger is closer; |q|^2 - |q - r|^2 for distances).
        prep = prepare(query, reference_shard, metric, False, None)
        local_scores, local_ids = knn_prepared(prep, local_k, metric, chunk_size, MEMORY_BUDGET)
        rows = torch.arange(num_queries, device=device)[:, None].expand_as(local_ids).reshape(-1)
        local_keys = exact_keys(prep, rows, local_ids.reshape(-1), MEMORY_BUDGET)
        keys[:, :local_k] = local_keys.view(num_queries, local_k)
        ids[:, :local_k] = local_ids.to(torch.int64) + layout.offset
        scores[:, :local_k] = local_scores.to(scores.dtype)
        if extra is not None and payload is not None:
            extra[:, :local_k] = payload[local_ids]
        if exclude_indices is not None:
            own = ids[:, :local_k] == exclude_indices.to(torch.int64)[:, None]
            keys[:, :local_k] = keys[:, :local_k].masked_fill(own, -torch.inf)
            ids[:, :local_k] = ids[:, :local_k].masked_fill(own, torch.iinfo(torch.int64).max)

    if world_size(group) > 1:
        widths = [width] * len(layout.sizes)
        keys = torch.cat(all_gather_rows(keys.T.contiguous(), widths, group)).T
        ids = torch.cat(all_gather_rows(ids.T.contiguous(), widths, group)).T
        scores = torch.cat(all_gather_rows(scores.T.contiguous(), widths, group)).T
        if extra is not None:
            extra = torch.cat(all_gather_rows(extra.T.contiguous(), widths, group)).T

    order = topk_order(keys, ids, k)  # equal keys in increasing global id order
    picked_extra = None if extra is None else extra.gather(1, order)
    return scores.gather(1, order), ids.gather(1, order), picked_extra


def sharded_retrieval_metrics(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference_shard: torch.Tensor,
    reference_shard_labels: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    metrics: Sequence[str] | None = None,
    shard_offset: int | None = None,
    query_indices: torch.Tensor | None = None,
    per_class: bool = False,
    metric: str = "cosine",
    chunk_size: int | None = None,
    group: Any = None,
    query_groups: torch.Tensor | None = None,
    reference_shard_groups: torch.Tensor | None = None,
) -> dict[str, Any]:
    r"""Recall@k, R-precision, MAP@R (full mAP, MRR, Precision@k on request) over a sharded reference set, exactly.

    The values equal those of :func:`~dml_bias.metrics.retrieval_metrics` on the whole reference set, with the
    same keys (``metrics=``, default ``("recall@k", "map@r", "r_precision")``), the same ``"num_queries"``,
    ``"num_lone_queries"``, ``"per_class"`` and the same lone-query policy (a ``ValueError`` when every query is
    lone, on every rank). Every rank passes the same queries and its own shard.

    Without ``"map"`` and ``"mrr"`` the keys come from exact neighbour lists as long as they need (``max(ks)``
    for Recall@k / Precision@k, :math:`R_q` for MAP@R / R-precision): the merge of :func:`sharded_knn`, which
    gathers ``(Q, K)`` candidates from every rank. With ``"map"`` or ``"mrr"`` every key follows from the ranks of
    the relevant items (see :func:`~dml_bias.metrics.retrieval_metrics`), found without moving any embedding
    between ranks: per block of queries,

    1. each rank computes the exact float64 keys of the relevant items in its shard (same label, the query's own
       item left out), and all ranks gather them: :math:`\sum_q R_q` keys with their global indices;
    2. each rank counts, per query, how many items of its shard rank above each relevant item — the exact
       counting pass of the single-process metrics (a bulk GEMM whose error band around each relevant key is
       re-scored exactly, ties by the lower global index);
    3. the counts are summed over the ranks (``all_reduce``), which gives every relevant item its global rank
       :math:`r_i` and so

    .. math::

        \text{Recall@}k(q) = [r_1 \le k], \qquad
        \text{R-precision}(q) = \frac{\#\{i : r_i \le R_q\}}{R_q}, \qquad
        \text{MAP@R}(q) = \frac{1}{R_q}\sum_{i : r_i \le R_q} \frac{i}{r_i}, \qquad
        \text{AP}(q) = \frac{1}{R_q}\sum_{i=1}^{R_q} \frac{i}{r_i},

    averaged over the queries with :math:`R_q \ge 1` (the others are counted in ``"num_lone_queries"``).
    :math:`R_q` is the number of items of the query's label in the whole reference set, the query itself left
    out. Communication per block: the relevant keys (``O(sum R_q)``) and one ``(Q_block, max R_q + 1)`` count
    matrix; memory per rank as for :func:`~dml_bias.metrics.retrieval_metrics` on the shard.

    Args:
        query: ``(Q, D)`` floating-point queries, the same on every rank.
        query_labels: ``(Q,)`` integer labels of the queries, the same on every rank.
        reference_shard: ``(M_r, D)`` this rank's part of the reference set.
        reference_shard_labels: ``(M_r,)`` integer labels of the shard.
        ks: The ``k`` of Recall@k, each at most the reference size (minus one with ``query_indices``).
        metrics: The keys to compute, as for :func:`~dml_bias.metrics.retrieval_metrics`.
        shard_offset: Global index of the shard's first row (``None``: consecutive shards in rank order).
        query_indices: Optional ``(Q,)`` global reference index of each query (``-1``: not in the reference),
            below the total reference size: that item is left out of the query's neighbours and relevant items
            (leave-one-out evaluation).
        per_class: Also return the metrics averaged per query label, as
            :func:`~dml_bias.metrics.retrieval_metrics` does.
        metric: ``"cosine"``, ``"dot"``, ``"euclidean"`` or ``"squared_euclidean"``.
        chunk_size: Query rows per block (the same on every rank); ``None`` picks it from a 2 GiB budget.
        group: The process group; ``None`` is the default group.
        query_groups: Optional ``(Q,)`` integer group ids (cameras, sequences) of the queries, the same on every
            rank: the re-identification rule of :func:`~dml_bias.metrics.retrieval_metrics` — a reference item
            with the query's label *and* group is left out of its list. The keys then come from the counting pass.
        reference_shard_groups: ``(M_r,)`` integer group ids of the shard; given exactly when ``query_groups`` is.

    Returns:
        A dict of floats (and the two integer counts, and ``"per_class"`` if asked), the same on every rank.

    Raises:
        ValueError: Bad shapes, values, devices or indices (the argument is named), or every query lone.
        TypeError: Non-tensor inputs, floating-point labels, non-integer ``ks`` or ``chunk_size``.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
        >>> labels = torch.tensor([0, 0, 1, 1, 1])
        >>> result = sharded_retrieval_metrics(x, labels, x, labels, ks=(1,), query_indices=torch.arange(5))
        >>> result["recall@1"], result["r_precision"], result["num_queries"]  # row 4: rows 1 and 3 tie, 1 wins
        (0.8, 0.9, 5)
    """
    check_choice(metric, "metric", METRICS)
    check_bool(per_class, "per_class")
    keys = parse_metrics(metrics)
    if chunk_size is not None:
        check_number(chunk_size, "chunk_size", low=1, integer=True)
    ks = _check_sharded_inputs(query, query_labels, reference_shard, reference_shard_labels, query_indices, ks)
    groups = _check_shard_groups(query_groups, reference_shard_groups, query, reference_shard)
    excluding = query_indices is not None
    same = (int(query.shape[0]), int(query.shape[1]), ks, metric, excluding)
    layout = _shard_layout(reference_shard, shard_offset, same, group)
    for k in ks:
        _check_k(k, layout.total, excluding, "ks")
    if query_indices is not None and query_indices.numel() and int(query_indices.max()) >= layout.total:
        raise ValueError(
            f"query_indices must be global reference indices below {layout.total} (the reference rows over all "
            f"ranks) or -1, got maximum {int(query_indices.max())}"
        )
    qlab = query_labels.detach().long()
    rlab = reference_shard_labels.detach().long()
    num_rel = _relevant_counts(qlab, rlab, query_indices, layout.offset, group, groups)
    require_evaluated(num_rel > 0)
    if "map" in keys or "mrr" in keys or groups is not None:
        res = _count_sharded(
            query, qlab, reference_shard, rlab, layout, metric, query_indices, num_rel, ks, keys, chunk_size, group,
            groups,
        )  # fmt: skip
    else:
        res = _list_sharded(
            query, qlab, reference_shard, rlab, layout, metric, query_indices, num_rel, ks, keys, chunk_size, group
        )
    return summarize(res, ks, keys, per_class)


def _check_sharded_inputs(
    query: Any,
    query_labels: Any,
    reference_shard: Any,
    reference_shard_labels: Any,
    query_indices: Any,
    ks: Any,
) -> tuple[int, ...]:
    """Check this rank's tensors (shapes, dtypes, devices, finiteness) and return ``ks`` as distinct ints."""
    check_not_meta(
        query=query,
        query_labels=query_labels,
        reference_shard=reference_shard,
        reference_shard_labels=reference_shard_labels,
        query_indices=query_indices,
    )
    check_embeddings(query, "query")
    check_embeddings(reference_shard, "reference_shard", dim=query.shape[1], allow_empty=True)
    num_queries = int(query.shape[0])
    check_labels(query_labels, "query_labels", length=num_queries, length_source="query.shape[0]")
    check_labels(
        reference_shard_labels,
        "reference_shard_labels",
        length=int(reference_shard.shape[0]),
        length_source="reference_shard.shape[0]",
    )
    check_same_device(
        query=query,
        query_labels=query_labels,
        reference_shard=reference_shard,
        reference_shard_labels=reference_shard_labels,
        query_indices=query_indices,
    )
    if isinstance(ks, (int, str)) or not isinstance(ks, Sequence) or len(ks) == 0:
        raise TypeError(f"ks must be a non-empty sequence of positive integers, got {describe(ks)}")
    for k in ks:
        check_number(k, "ks[...]", low=1, integer=True)
    if query_indices is not None:
        check_tensor(query_indices, "query_indices")
        check_dtype(query_indices, "query_indices", "integer")
        check_shape(query_indices, "query_indices", ("Q",), {"Q": num_queries}, sources={"Q": "query.shape[0]"})
        if query_indices.numel() and int(query_indices.min()) < -1:
            raise ValueError(f"query_indices must be global indices or -1, got minimum {int(query_indices.min())}")
    check_finite(query, "query")
    check_finite(reference_shard, "reference_shard")
    return tuple(dict.fromkeys(int(k) for k in ks))


def _check_shard_groups(
    query_groups: Any, reference_shard_groups: Any, query: torch.Tensor, reference_shard: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(query_groups, reference_shard_groups)`` pair as int64 tensors, or ``None`` without groups."""
    if query_groups is None and reference_shard_groups is None:
        return None
    if query_groups is None or reference_shard_groups is None:
        missing = "query_groups" if query_groups is None else "reference_shard_groups"
        raise ValueError(f"{missing} must be given with the other groups argument (a group id per item), got None")
    check_not_meta(query_groups=query_groups, reference_shard_groups=reference_shard_groups)
    check_labels(query_groups, "query_groups", length=int(query.shape[0]), length_source="query.shape[0]")
    check_labels(
        reference_shard_groups,
        "reference_shard_groups",
        length=int(reference_shard.shape[0]),
        length_source="reference_shard.shape[0]",
    )
    check_same_device(query=query, query_groups=query_groups, reference_shard_groups=reference_shard_groups)
    return query_groups.detach().long(), reference_shard_groups.detach().long()


def _relevant_counts(
    qlab: torch.Tensor,
    rlab: torch.Tensor,
    query_indices: torch.Tensor | None,
    offset: int,
    group: Any,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(Q,)`` relevant reference items of each query over all shards, the left-out item not counted.

    Relevant: the query's label (and, with ``groups``, another group).
    """
    classes, counts = torch.unique(rlab, return_counts=True)
    if classes.numel():
        slot = torch.searchsorted(classes, qlab).clamp_max(classes.numel() - 1)
        local = torch.where(classes[slot] == qlab, counts[slot], torch.zeros_like(qlab))
    else:
        local = torch.zeros_like(qlab)
    if groups is not None and rlab.numel():
        local = local - pair_counts(qlab, rlab, *groups)  # same label and same group: junk, not relevant
    if query_indices is not None:
        # The left-out item is relevant to its own query when it is: its owner says so.
        qi = query_indices.to(torch.long)
        inside = (qi >= offset) & (qi < offset + int(rlab.shape[0]))
        own = rlab[qi[inside] - offset] == qlab[inside]
        if groups is not None:
            own &= groups[1][qi[inside] - offset] != groups[0][inside]
        local = local.clone()
        local[inside] -= own.long()
    return all_reduce_sum(local, group)


def _list_sharded(
    query: torch.Tensor,
    qlab: torch.Tensor,
    reference_shard: torch.Tensor,
    rlab: torch.Tensor,
    layout: _Layout,
    metric: str,
    query_indices: torch.Tensor | None,
    num_rel: torch.Tensor,
    ks: tuple[int, ...],
    keys: tuple[str, ...],
    chunk_size: int | None,
    group: Any,
) -> PerQuery:
    """The list keys from the exact merged top-``K`` (:func:`sharded_knn`'s merge, labels as payload)."""
    excluding = query_indices is not None
    depth = min(layout.total - int(excluding), list_depth(keys, ks, num_rel))
    _, _, labels = _search_and_merge(
        query, reference_shard, depth, layout, metric, query_indices, chunk_size, group, payload=rlab
    )
    assert labels is not None
    values = list_metrics(labels == qlab[:, None], num_rel, ks, keys)
    return PerQuery(values, num_rel > 0, qlab)


def _count_sharded(
    query: torch.Tensor,
    qlab: torch.Tensor,
    reference_shard: torch.Tensor,
    rlab: torch.Tensor,
    layout: _Layout,
    metric: str,
    query_indices: torch.Tensor | None,
    num_rel: torch.Tensor,
    ks: tuple[int, ...],
    names: tuple[str, ...],
    chunk_size: int | None,
    group: Any,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PerQuery:
    """Per-query metrics (full AP included) from the ranks of the relevant items of every shard.

    Per block of queries: each rank computes the exact float64 keys of its own relevant items, all ranks gather
    them (``sum(R_q)`` keys), each counts the items of its shard above each relevant item (the single-process
    counting pass, exact), and the counts are summed over the ranks. The block size depends only on values
    that every rank shares, so the collectives line up.
    """
    device = query.device
    nq = int(query.shape[0])
    m = int(reference_shard.shape[0])
    nranks = len(layout.sizes)
    prep = prepare(query, reference_shard, metric, False, None) if m > 0 else None
    bulk = bulk_inputs(prep, choose_bulk(prep, qlab, rlab)) if prep is not None else None
    values: dict[str, torch.Tensor] = {}
    widest = max(layout.sizes)
    max_rel = int(num_rel.max())
    step = block_rows(nq, 45 * widest + 64 * max_rel * nranks, chunk_size, MEMORY_BUDGET, width=widest)
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        nb = stop - start
        rows_b = torch.arange(nb, device=device)
        rel = torch.zeros(nb, m, dtype=torch.bool, device=device)
        skip = None
        if m > 0:
            torch.eq(rlab[None, :], qlab[start:stop, None], out=rel)
        if query_indices is not None:
            local = query_indices[start:stop].to(torch.long) - layout.offset
            inside = (local >= 0) & (local < m)
            skip = torch.where(inside, local, -1)  # the query's own item: neither relevant nor counted
            rel[rows_b[inside], local[inside]] = False
        junk: tuple[torch.Tensor, torch.Tensor] | None = None
        if groups is not None and m > 0:
            same_group = groups[1][None, :] == groups[0][start:stop, None]
            junk_mask = rel & same_group  # the query's label and group: left out of its list
            rel &= ~same_group
            junk_rows, junk_cols = junk_mask.nonzero(as_tuple=True)
            junk = (junk_rows, junk_cols)
        vr, vc = rel.nonzero(as_tuple=True)
        keys = exact_keys(prep, vr + start, vc, MEMORY_BUDGET) if prep is not None else vr.to(torch.float64)
        ids = torch.stack([vr, vc + layout.offset], 1)
        if world_size(group) > 1:
            sizes = [int(n) for n in all_gather_objects(int(vr.numel()), group)]
            keys = torch.cat(all_gather_rows(keys, sizes, group))
            ids = torch.cat(all_gather_rows(ids, sizes, group))
        # Lay the relevant keys out per query (rank order, so the tie order is reproducible), then sort them.
        by_row = torch.argsort(ids[:, 0], stable=True)
        keys, ids = keys[by_row], ids[by_row]
        per_row = torch.bincount(ids[:, 0], minlength=nb)
        width = int(per_row.max()) if nb > 0 else 0
        slot = torch.arange(ids.shape[0], device=device) - (torch.cumsum(per_row, 0) - per_row)[ids[:, 0]]
        key_mat = torch.zeros(nb, width, dtype=torch.float64, device=device)
        col_mat = torch.zeros(nb, width, dtype=torch.long, device=device)
        valid = torch.zeros(nb, width, dtype=torch.bool, device=device)
        key_mat[ids[:, 0], slot] = keys
        col_mat[ids[:, 0], slot] = ids[:, 1]
        valid[ids[:, 0], slot] = True
        key_mat, col_mat = sort_relevant(key_mat, col_mat, valid)
        if prep is not None and bulk is not None:
            hist = count_above(
                prep, bulk, start, stop, key_mat, col_mat, qlab[start:stop], rlab, skip, layout.offset, MEMORY_BUDGET,
                junk,
            )  # fmt: skip
        else:
            hist = torch.zeros(nb, width + 1, dtype=torch.long, device=device)
        hist = all_reduce_sum(hist, group)
        for key, v in hist_metrics(hist, num_rel[start:stop], ks, names).items():
            if key not in values:
                values[key] = torch.zeros((*v.shape[:-1], nq), dtype=torch.float64, device=device)
            values[key][..., start:stop] = v
    return PerQuery(values, num_rel > 0, qlab)
