r"""Exact label-based retrieval metrics: Recall@k (DML meaning), Precision@k, R-precision, MAP@R, full mAP, MRR.

Every metric here follows from the *ranks of the relevant items*: for a query :math:`q` with label
:math:`y_q`, the relevant items are the reference items labelled :math:`y_q` (the query itself left out when
it is part of the reference, and with groups the items of the query's group too), and the rank of a relevant
item :math:`j` is

.. math::

    \operatorname{rank}_q(j) = 1 + \#\{m \in L_q : s(q, m) > s(q, j)
    \text{ or } (s(q, m) = s(q, j) \text{ and } m < j)\},

i.e. its 1-based position in the query's list :math:`L_q` (the reference without the removed items) sorted by
decreasing similarity (increasing distance), ties by lower reference index.

**Each key costs what it needs** (``metrics=``; the default is Recall@k, MAP@R and R-precision):

* Recall@k and Precision@k read exact lists of the first :math:`\max(ks)` neighbours;
* MAP@R and R-precision read exact lists of the first :math:`R_q` neighbours (:math:`\max R_q` per block);
* the full ``"map"`` needs the rank of every relevant item: the *counting pass* below, which also gives every
  other key;
* ``"mrr"`` (without ``"map"``) is the counting pass against each query's best relevant item alone.

The lists come from :func:`~dml_bias.metrics.knn`'s candidate pass (a bulk GEMM, a selection, float64 re-scoring
of near-ties).

**The counting pass** builds no neighbour list. Per block of queries:

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
   placed by the tie rule. No sort of any row, extra memory within the budget. The number of bins follows a
   cost model: about 64 per relevant key (up to 65,536), so that when relevant items spread over the whole
   list (random labels, weak models, large classes) only a few percent of the items are compared one by one.
   When the sample shows that the tables would still be crowded (hundreds of relevant items per query over a
   narrow range of scores), the pass is a float64 GEMM instead, each score placed among the relevant ones by
   a sorted search;
3. the rank of the :math:`i`-th best relevant item is :math:`i` plus the number of items above it, which gives
   every key at once.

When the queries are the reference (leave-one-out), only the tiles on and above the diagonal of the symmetric
score matrix are computed. Every path gives identical values (the same float64 arithmetic on the same ranks).
See :doc:`/api/metrics` for the definitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dml_bias._checks import check_bool, check_labels, check_same_device, describe
from dml_bias.metrics._engine import (
    PerQuery,
    check_ks,
    check_not_meta,
    parse_metrics,
    per_query,
    require_evaluated,
    summarize,
)
from dml_bias.metrics._exact import Prepared, prepare, validate_chunk_size

__all__ = ["map_at_r", "mean_average_precision", "r_precision", "recall_at_k", "retrieval_metrics"]


def _check_same_rows(
    query: torch.Tensor, query_labels: torch.Tensor, reference: torch.Tensor, reference_labels: torch.Tensor
) -> None:
    """``exclude_self=True`` with a reference: the first ``Nq`` reference rows and labels must be the queries'."""
    nq = int(query.shape[0])
    q, r = query.detach(), reference.detach()[:nq]
    if q.dtype != r.dtype:
        q, r = q.to(torch.float64), r.to(torch.float64)
    same = (q == r).all(1) & (query_labels.detach().long() == reference_labels.detach()[:nq].long())
    if not bool(same.all()):
        row = int((~same).nonzero()[0, 0])
        raise ValueError(
            "exclude_self=True with a reference means query i is reference item i, so the first "
            f"{nq} rows of reference and reference_labels must equal query and query_labels; row {row} differs "
            "(pass exclude_self=False, or put the queries first in the reference)"
        )


def _check_groups(
    query_groups: Any, reference_groups: Any, reference: torch.Tensor | None, prep: Prepared, query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(query_groups, reference_groups)`` pair as int64 tensors, or ``None`` without groups."""
    if query_groups is None and reference_groups is None:
        return None
    if reference is None:
        if reference_groups is not None:
            raise ValueError("reference_groups must be None when reference is None (the query set is the reference)")
    elif query_groups is None or reference_groups is None:
        missing = "query_groups" if query_groups is None else "reference_groups"
        raise ValueError(f"{missing} must be given with the other groups argument (a group id per item), got None")
    check_labels(query_groups, "query_groups", length=prep.num_query, length_source="query.shape[0]")
    check_not_meta(query_groups=query_groups)
    check_same_device(query=query, query_groups=query_groups)
    qg = query_groups.detach().long()
    if reference is None:
        return qg, qg
    check_labels(reference_groups, "reference_groups", length=prep.num_reference, length_source="reference.shape[0]")
    check_not_meta(reference_groups=reference_groups)
    check_same_device(query=query, reference_groups=reference_groups)
    return qg, reference_groups.detach().long()


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
    check_not_meta(query=query, reference=reference)
    prep = prepare(query, reference, metric, exclude_self, normalize_embeddings)
    check_labels(query_labels, "query_labels", length=prep.num_query, length_source="query.shape[0]")
    check_same_device(query=query, query_labels=query_labels)
    check_not_meta(query_labels=query_labels)
    if reference_labels is None:
        reference_labels = query_labels
    else:
        check_labels(
            reference_labels, "reference_labels", length=prep.num_reference, length_source="reference.shape[0]"
        )
        check_same_device(query=query, reference_labels=reference_labels)
        if reference is not None and prep.exclude_self:
            _check_same_rows(query, query_labels, reference, reference_labels)
    return prep, query_labels.detach().long(), reference_labels.detach().long()


def _run(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None,
    reference_labels: torch.Tensor | None,
    ks: Any,
    keys: tuple[str, ...],
    *,
    exclude_self: bool | None,
    metric: str,
    normalize_embeddings: bool | None,
    chunk_size: int | None,
    query_groups: Any = None,
    reference_groups: Any = None,
    ks_name: str = "ks",
) -> tuple[PerQuery, tuple[int, ...]]:
    """Check the arguments, run the engine for ``keys`` and apply the lone-query policy."""
    prep, qlab, rlab = _setup(
        query, query_labels, reference, reference_labels, metric, exclude_self, normalize_embeddings, chunk_size
    )
    groups = _check_groups(query_groups, reference_groups, reference, prep, query)
    available = prep.num_reference - (1 if prep.exclude_self else 0)
    if available < 1:
        name = "query" if reference is None else "reference"
        raise ValueError(
            f"{name} must hold at least 2 rows with self exclusion (no other item is left to rank), got "
            f"{describe(query if reference is None else reference)}"
        )
    ks_t = check_ks(ks, available, ks_name)
    res = per_query(prep, qlab, rlab, ks_t, keys, chunk_size, groups)
    require_evaluated(res.evaluated, grouped=groups is not None)
    return res, ks_t


def _single_metric(
    key: str,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None,
    reference_labels: torch.Tensor | None,
    *,
    exclude_self: bool | None,
    metric: str,
    normalize_embeddings: bool | None,
    chunk_size: int | None,
    ks: tuple[int, ...] = (1,),
) -> float:
    """The body of the single-metric functions: only ``key``'s pass, the mean of its per-query values."""
    res, ks_t = _run(
        query,
        query_labels,
        reference,
        reference_labels,
        ks,
        (key,),
        exclude_self=exclude_self,
        metric=metric,
        normalize_embeddings=normalize_embeddings,
        chunk_size=chunk_size,
        ks_name="k",
    )
    return float(next(iter(summarize(res, ks_t, (key,), False).values())))


def retrieval_metrics(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    metrics: Sequence[str] | None = None,
    exclude_self: bool | None = None,
    query_groups: torch.Tensor | None = None,
    reference_groups: torch.Tensor | None = None,
    per_class: bool = False,
    metric: str = "cosine",
    normalize_embeddings: bool | None = None,
    chunk_size: int | None = None,
    full_map: bool | None = None,
) -> dict[str, Any]:
    r"""Recall@k, MAP@R and R-precision of a retrieval (full mAP, MRR and Precision@k on request), exactly.

    For query :math:`q` with :math:`R_q` relevant items whose ranks (see the module notes) are
    :math:`r_1 < r_2 < \dots < r_{R_q}`:

    .. math::

        \text{Recall@}k(q) = [r_1 \le k], \qquad
        \text{Precision@}k(q) = \frac{\#\{i : r_i \le k\}}{k}, \qquad
        \text{R-precision}(q) = \frac{\#\{i : r_i \le R_q\}}{R_q},

        \text{MAP@R}(q) = \frac{1}{R_q} \sum_{i : r_i \le R_q} \frac{i}{r_i}, \qquad
        \text{AP}(q) = \frac{1}{R_q} \sum_{i=1}^{R_q} \frac{i}{r_i}, \qquad
        \text{RR}(q) = \frac{1}{r_1}.

    Each value is the mean over the evaluated queries: queries with no relevant item ("lone" queries) are left
    out and counted in ``"num_lone_queries"``; when every query is lone a ``ValueError`` is raised (the policy of
    every label metric here). Recall@k is the DML hit rate (1 if any of the first ``k`` neighbours is relevant),
    MAP@R and R-precision follow :cite:`musgrave2020reality`, ``"map"`` is the average precision over the whole
    reference and ``"mrr"`` the mean reciprocal rank of the best relevant item.

    **Cost.** Only the requested keys are computed, each by the cheapest exact pass (module notes): Recall@k and
    Precision@k need the first :math:`\max(ks)` neighbours, MAP@R and R-precision the first :math:`R_q`, the full
    mAP ranks every relevant item (about 2-4x the default's time on the CPU, see :doc:`/benchmarks`). All paths
    give identical values.

    **Re-identification** (``query_groups`` / ``reference_groups``, e.g. camera or sequence ids): a reference
    item with the query's label *and* the query's group is removed from that query's list before anything is
    counted (the Market-1501 / DukeMTMC protocol, OML's ``sequence_ids``). Recall@k is then the CMC@k curve and
    ``"map"`` the re-ID mAP. Items of other labels from the query's group stay as negatives.

    Args:
        query: ``(Nq, D)`` floating-point embeddings.
        query_labels: ``(Nq,)`` integer labels.
        reference: ``(M, D)`` embeddings; ``None`` evaluates the query set against itself (leave-one-out).
        reference_labels: ``(M,)`` integer labels; required with ``reference``, ``None`` without.
        ks: The ``k`` of the Recall@k (and Precision@k) values, each in ``[1, M]`` (``M - 1`` with self
            exclusion).
        metrics: The keys to compute, from ``"recall@k"``, ``"precision@k"`` (one value per ``k``),
            ``"map@r"``, ``"r_precision"``, ``"map"`` and ``"mrr"``. ``None``: ``("recall@k", "map@r",
            "r_precision")``, the set that deep-metric-learning papers and pytorch-metric-learning report.
        exclude_self: As in :func:`~dml_bias.metrics.knn`: defaults to ``True`` without a reference; with a
            reference, ``True`` means query ``i`` is reference item ``i``, and a ``ValueError`` is raised unless
            the first ``Nq`` rows of ``reference`` and ``reference_labels`` equal ``query`` and ``query_labels``.
        query_groups: Optional ``(Nq,)`` integer group (camera, sequence) of each query.
        reference_groups: ``(M,)`` integer groups of the reference; required with ``reference`` when
            ``query_groups`` is given, ``None`` without a reference.
        per_class: Also return the metrics averaged per query label.
        metric: ``"cosine"``, ``"dot"``, ``"euclidean"`` or ``"squared_euclidean"``.
        normalize_embeddings: As in :func:`~dml_bias.metrics.knn`.
        chunk_size: Query rows per block; ``None`` picks it from a 2 GiB budget for the extra memory.
        full_map: Deprecated (a :class:`DeprecationWarning`): ``True`` is ``metrics=("recall@k", "map@r",
            "r_precision", "map")``, ``False`` the default set.

    Returns:
        A dict with floats ``"recall@{k}"`` / ``"precision@{k}"`` for each ``k``, ``"map@r"``,
        ``"r_precision"``, ``"map"``, ``"mrr"`` (those requested, in this order) and ints ``"num_queries"``
        (evaluated) and ``"num_lone_queries"``. With ``per_class=True`` also ``"per_class"``:
        ``{label: {"recall@1": ..., ..., "count": n}}`` for every label with at least one evaluated query
        (``count`` = its evaluated queries).

    Raises:
        ValueError: Bad shapes, values or devices (the argument is named), unknown metric names, a reference
            whose first rows are not the queries with ``exclude_self=True``, or every query lone.
        TypeError: Non-tensor inputs, floating-point labels or groups.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
        >>> y = torch.tensor([0, 0, 1, 1, 2])
        >>> res = retrieval_metrics(x, y, ks=(1, 2))
        >>> res["recall@1"], res["map@r"], res["num_queries"], res["num_lone_queries"]
        (1.0, 1.0, 4, 1)
        >>> retrieval_metrics(x, y, ks=(1,), metrics=("recall@k", "map"), per_class=True)["per_class"][0]
        {'recall@1': 1.0, 'map': 1.0, 'count': 2}

        Re-identification: item 1 shares query 0's label and camera, so it leaves query 0's list.

        >>> cams = torch.tensor([0, 0, 1, 1, 0])
        >>> q, g = x[:1], x[1:]
        >>> retrieval_metrics(q, y[:1], x, y, query_groups=cams[:1], reference_groups=cams, ks=(1,))
        Traceback (most recent call last):
        ...
        ValueError: query_labels must share a label with at least one other reference item for some query: ...
        >>> gl, gc = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 0])
        >>> res = retrieval_metrics(
        ...     q, y[:1], g, gl, query_groups=cams[:1], reference_groups=gc, ks=(1,), metrics=("recall@k", "map")
        ... )
        >>> res["recall@1"], res["map"]  # the list is g[3], g[2], g[1]: the true match ranks third
        (0.0, 0.3333333333333333)
    """
    check_bool(per_class, "per_class")
    keys = parse_metrics(metrics, full_map)
    if isinstance(ks, Sequence) and not isinstance(ks, str) and len(ks) == 0:
        raise ValueError("ks must hold at least one k (an empty ks would return no Recall@k), got an empty sequence")
    res, ks_t = _run(
        query,
        query_labels,
        reference,
        reference_labels,
        ks,
        keys,
        exclude_self=exclude_self,
        metric=metric,
        normalize_embeddings=normalize_embeddings,
        chunk_size=chunk_size,
        query_groups=query_groups,
        reference_groups=reference_groups,
    )
    return summarize(res, ks_t, keys, per_class)


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
        "recall@k",
        query,
        query_labels,
        reference,
        reference_labels,
        ks=(k,),
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
        "map@r",
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
        "r_precision",
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
        "map",
        query,
        query_labels,
        reference,
        reference_labels,
        exclude_self=exclude_self,
        metric=metric,
        normalize_embeddings=normalize_embeddings,
        chunk_size=chunk_size,
    )
