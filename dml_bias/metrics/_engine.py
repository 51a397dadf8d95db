"""The per-query engine of the label metrics (private to :mod:`dml_bias.metrics`).

:func:`~dml_bias.metrics.retrieval_metrics`, its single-metric twins, :class:`~dml_bias.metrics.RetrievalEvaluator`
and :func:`~dml_bias.metrics.sharded_retrieval_metrics` all go through here:

* :func:`parse_metrics` turns ``metrics=`` (and the deprecated ``full_map=``) into the keys to compute;
* :func:`per_query` runs the cheapest passes that give those keys: exact neighbour lists as long as the keys
  need (:func:`listed`: ``max(ks)`` for Recall@k and Precision@k, :math:`R_q` for MAP@R and R-precision), the
  counting pass of :mod:`~dml_bias.metrics._counting` for the full mAP (:func:`counted`), and a counting pass
  against the best relevant item alone for the MRR (:func:`best_rank`);
* :func:`list_metrics` and :func:`hist_metrics` compute the values from a list or from the counts, with the same
  float64 arithmetic, so every path gives identical values;
* :func:`summarize` builds the result dictionary and applies the one lone-query policy
  (:func:`require_evaluated`: a ``ValueError`` when every query is lone).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dml_bias._checks import check_bool, check_number, describe
from dml_bias.metrics._counting import (
    ClassLayout,
    bulk_inputs,
    choose_bulk,
    count_above,
    per_query_self,
    row_sum,
)
from dml_bias.metrics._exact import (
    MEMORY_BUDGET,
    Prepared,
    block_product,
    block_rows,
    exact_keys,
    rows_of,
    scratch,
    self_candidates_grouped,
    target_block,
    topk_block,
)

__all__ = [
    "DEFAULT_METRICS",
    "METRIC_NAMES",
    "PerQuery",
    "best_rank",
    "check_device_arg",
    "check_ks",
    "check_not_meta",
    "counted",
    "hist_metrics",
    "list_depth",
    "list_metrics",
    "listed",
    "parse_metrics",
    "per_query",
    "require_evaluated",
    "summarize",
]

#: Every key ``metrics=`` may name; ``"recall@k"`` and ``"precision@k"`` give one value per ``k`` of ``ks``.
METRIC_NAMES = ("recall@k", "precision@k", "map@r", "r_precision", "map", "mrr")

#: The keys computed by default: the standard deep-metric-learning set (Recall@k, MAP@R, R-precision).
DEFAULT_METRICS = ("recall@k", "map@r", "r_precision")


def parse_metrics(metrics: Any, full_map: Any = None, stacklevel: int = 3) -> tuple[str, ...]:
    """The keys to compute, in the order of :data:`METRIC_NAMES`, from ``metrics=`` and the deprecated ``full_map=``."""
    if full_map is not None:
        check_bool(full_map, "full_map")
        if metrics is not None:
            raise ValueError("full_map must be left out when metrics is given (full_map is deprecated)")
        warnings.warn(
            "full_map= is deprecated: name the keys instead, metrics=('recall@k', 'map@r', 'r_precision', 'map') "
            "for full_map=True, or leave both out for the default set without the full mAP",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return (*DEFAULT_METRICS, "map") if full_map else DEFAULT_METRICS
    if metrics is None:
        return DEFAULT_METRICS
    if isinstance(metrics, str):
        metrics = (metrics,)
    if not isinstance(metrics, Sequence):
        raise TypeError(f"metrics must be a sequence of metric names, got {describe(metrics)}")
    if len(metrics) == 0:
        raise ValueError(f"metrics must name at least one of {list(METRIC_NAMES)}, got an empty sequence")
    for name in metrics:
        if name not in METRIC_NAMES:
            raise ValueError(f"metrics must hold names from {list(METRIC_NAMES)}, got {name!r}")
    return tuple(name for name in METRIC_NAMES if name in metrics)


def check_ks(ks: Any, available: int, name: str = "ks") -> tuple[int, ...]:
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


def check_not_meta(**tensors: Any) -> None:
    """Raise a ``ValueError`` naming the first tensor on the meta device (it holds no values to evaluate)."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            raise ValueError(f"{name} must hold values (a tensor on a real device), got {describe(value)}")


def check_device_arg(device: Any, name: str = "device") -> torch.device | None:
    """``device`` as a :class:`torch.device` (``None`` stays ``None``), or a clear error naming ``name``."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(
            f"{name} must be a torch.device, a device string such as 'cpu' or 'cuda:0', or None, got {describe(device)}"
        )
    try:
        return torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name} must name a device such as 'cpu', 'cuda' or 'cuda:0', got {device!r}") from None


@dataclass
class PerQuery:
    """Per-query values of the requested keys (NaN-free on ``evaluated`` rows) and bookkeeping.

    ``values["recall@k"]`` and ``values["precision@k"]`` are ``(len(ks), Nq)``, the others ``(Nq,)``, all float64.
    """

    values: dict[str, torch.Tensor]
    evaluated: torch.Tensor  # (Nq,) bool: the query has at least one relevant item
    labels: torch.Tensor  # (Nq,) query labels


def require_evaluated(evaluated: torch.Tensor, grouped: bool = False) -> None:
    """The lone-query policy of every label metric: a ``ValueError`` when no query has a relevant item."""
    if not bool(evaluated.any()):
        rule = "of its label and another group" if grouped else "of its label"
        raise ValueError(
            f"query_labels must share a label with at least one other reference item for some query: every "
            f"query is lone (no other item {rule} in the reference; {int(evaluated.numel())} queries)"
        )


def _mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float(values[mask].mean()) if bool(mask.any()) else float("nan")


def _names(keys: tuple[str, ...], ks: tuple[int, ...]) -> list[tuple[str, str, int | None]]:
    """``(output name, key, row of ks)`` of every output value, in output order."""
    out: list[tuple[str, str, int | None]] = []
    for key in keys:
        if key.endswith("@k"):
            out += [(f"{key[:-2]}@{k}", key, i) for i, k in enumerate(ks)]
        else:
            out.append((key, key, None))
    return out


def summarize(res: PerQuery, ks: tuple[int, ...], keys: tuple[str, ...], per_class: bool) -> dict[str, Any]:
    """The result dictionary: the means over evaluated queries, the counts and (if asked) the per-class means."""
    ev = res.evaluated
    out: dict[str, Any] = {}
    names = _names(keys, ks)
    for name, key, row in names:
        v = res.values[key]
        out[name] = _mean(v[row] if row is not None else v, ev)
    out["num_queries"] = int(ev.sum())
    out["num_lone_queries"] = int((~ev).sum())
    if per_class:
        out["per_class"] = _per_class_means(res, names)
    return out


def _per_class_means(res: PerQuery, names: list[tuple[str, str, int | None]]) -> dict[int, dict[str, Any]]:
    ev = res.evaluated
    labels = res.labels[ev]
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    n = classes.numel()

    def class_mean(v: torch.Tensor) -> list[float]:
        s = torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, inverse, v[ev])
        return (s / counts.to(torch.float64)).tolist()

    cols = {name: class_mean(res.values[key][row] if row is not None else res.values[key]) for name, key, row in names}
    out: dict[int, dict[str, Any]] = {}
    for j, c in enumerate(classes.tolist()):
        entry: dict[str, Any] = {name: vals[j] for name, vals in cols.items()}
        entry["count"] = int(counts[j])
        out[int(c)] = entry
    return out


def hist_metrics(
    hist: torch.Tensor, num_rel: torch.Tensor, ks: tuple[int, ...], keys: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The requested keys of a block of queries from the counts of :func:`~dml_bias.metrics._counting.count_rows`.

    The relevant item at position ``d`` (0-based) of the best-first relevant list has ``d`` relevant items above
    it, and an irrelevant item ranks above it iff it is above at least ``num_rel - d`` relevant items; its rank
    is ``1 + d +`` those items.
    """
    device = hist.device
    nb, width = hist.shape[0], hist.shape[1] - 1
    above_from = hist.flip(1).cumsum(1).flip(1)  # above_from[:, t] = #items above >= t relevant ones
    d = torch.arange(width, device=device)[None, :].expand(nb, width)
    t = (num_rel[:, None] - d).clamp(0, width)
    ranks = (1 + d + torch.gather(above_from, 1, t)).to(torch.float64)
    live = d < num_rel[:, None]
    return _rank_metrics(ranks, live, num_rel, ks, keys)


def _rank_metrics(
    ranks: torch.Tensor, live: torch.Tensor, num_rel: torch.Tensor, ks: tuple[int, ...], keys: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The keys from ``(B, W)`` float64 ranks of the best-first relevant items (``live``: real entries)."""
    device = ranks.device
    nb, width = ranks.shape
    r_f = num_rel.to(torch.float64).clamp_min(1.0)
    pos = torch.arange(1, width + 1, device=device, dtype=torch.float64)[None, :]
    prec = pos / ranks
    out: dict[str, torch.Tensor] = {}
    kt = torch.tensor(ks, dtype=torch.float64, device=device)
    if "recall@k" in keys or "mrr" in keys:
        best = torch.where(live[:, 0], ranks[:, 0], torch.inf) if width > 0 else torch.full((nb,), torch.inf)
        best = best.to(device)
        if "recall@k" in keys:
            out["recall@k"] = (best[None, :] <= kt[:, None]).to(torch.float64)
        if "mrr" in keys:
            out["mrr"] = 1.0 / best
    if "precision@k" in keys:
        hits = ((ranks[None, :, :] <= kt[:, None, None]) & live[None]).sum(2)
        out["precision@k"] = hits.to(torch.float64) / kt[:, None]
    in_r = live & (ranks <= num_rel[:, None])
    if "r_precision" in keys:
        out["r_precision"] = in_r.sum(1) / r_f
    if "map@r" in keys:
        out["map@r"] = row_sum(torch.where(in_r, prec, 0.0)) / r_f
    if "map" in keys:
        out["map"] = row_sum(torch.where(live, prec, 0.0)) / r_f
    return out


def list_metrics(
    rel: torch.Tensor, num_rel: torch.Tensor, ks: tuple[int, ...], keys: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The keys (all but ``"map"`` and ``"mrr"``) from ``(B, K)`` relevance flags of exact best-first lists.

    The relevant items of a list give their ranks; items below the list's end are below every cut-off the keys
    use (:func:`list_depth`), so the same arithmetic as :func:`hist_metrics` gives the same values.
    """
    nb, width = rel.shape
    device = rel.device
    position = torch.arange(1, width + 1, device=device, dtype=torch.float64)[None, :].expand(nb, width)
    # The ranks of the relevant items of each list, best first, padded with +inf.
    order = torch.argsort((~rel).to(torch.int8), dim=1, stable=True)
    ranks = torch.where(rel, position, torch.inf).gather(1, order)
    live = ranks < torch.inf
    return _rank_metrics(ranks, live, num_rel, ks, tuple(k for k in keys if k not in ("map", "mrr")))


def list_depth(keys: tuple[str, ...], ks: tuple[int, ...], num_rel: torch.Tensor) -> int:
    """The list length ``keys`` need: ``max(ks)`` for the ``@k`` keys, ``max R_q`` for MAP@R and R-precision."""
    depth = 1
    if "recall@k" in keys or "precision@k" in keys:
        depth = max(depth, *ks)
    if "map@r" in keys or "r_precision" in keys:
        depth = max(depth, int(num_rel.max()) if num_rel.numel() else 1)
    return depth


def per_query(
    prep: Prepared,
    qlab: torch.Tensor,
    rlab: torch.Tensor,
    ks: tuple[int, ...],
    keys: tuple[str, ...],
    chunk_size: int | None,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    budget: int = MEMORY_BUDGET,
) -> PerQuery:
    """The requested keys per query, each from the cheapest pass that gives it (see the module notes)."""
    layout = ClassLayout.of(prep, qlab, rlab, groups)
    if "map" in keys:
        return counted(prep, qlab, rlab, ks, keys, chunk_size, layout, budget)
    list_keys = tuple(k for k in keys if k != "mrr")
    values: dict[str, torch.Tensor] = {}
    if list_keys:
        values.update(listed(prep, qlab, rlab, ks, list_keys, chunk_size, layout, budget))
    if "mrr" in keys:
        values["mrr"] = best_rank(prep, qlab, rlab, chunk_size, layout, budget)
    return PerQuery(values, layout.num_rel > 0, qlab)


def _empty(keys: tuple[str, ...], ks: tuple[int, ...], nq: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        key: torch.zeros((len(ks), nq) if key.endswith("@k") else (nq,), dtype=torch.float64, device=device)
        for key in keys
    }


def _store(values: dict[str, torch.Tensor], block: dict[str, torch.Tensor], start: int, stop: int) -> None:
    for key, v in block.items():
        values[key][..., start:stop] = v


def counted(
    prep: Prepared,
    qlab: torch.Tensor,
    rlab: torch.Tensor,
    ks: tuple[int, ...],
    keys: tuple[str, ...],
    chunk_size: int | None,
    layout: ClassLayout,
    budget: int = MEMORY_BUDGET,
) -> PerQuery:
    """Every key, the full mAP included, from the ranks of all relevant items, a block of queries at a time.

    Per block: exact float64 keys of every query's relevant items (element-wise, ``sum(R_q) * D`` work), then one
    bulk GEMM (float32, the 16-bit pass or float64, as :func:`~dml_bias.metrics._counting.choose_bulk` decides
    from a sample) whose scores only *count*, per query, the irrelevant items above each relevant item.
    """
    device = prep.query.device
    nq, m = prep.num_query, prep.num_reference
    mode = choose_bulk(prep, qlab, rlab)
    if mode == "float64":
        return _counted_float64(prep, qlab, ks, keys, chunk_size, layout, budget)
    n_class, num_rel = layout.n_class, layout.num_rel
    bulk = bulk_inputs(prep, mode)
    if chunk_size is None:
        hist = per_query_self(prep, bulk, layout, qlab, budget)
        if hist is not None:
            return PerQuery(hist_metrics(hist, num_rel, ks, keys), num_rel > 0, qlab)
    values = _empty(keys, ks, nq, device)
    max_rel = int(n_class.max()) if nq > 0 else 0
    per_row = (12 if bulk.unit == 0.0 else 20) * m + 25 * m + 64 * max_rel
    step = block_rows(nq, per_row, chunk_size, budget, width=m)
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        rm = int(n_class[start:stop].max())
        if rm == 0:
            continue
        rel_keys, rel_cols = layout.relevant(prep, start, stop, rm, budget)
        skip = torch.arange(start, stop, device=device) if prep.exclude_self else None  # the query itself
        junk = layout.junk(prep, start, stop, rm)
        hist = count_above(prep, bulk, start, stop, rel_keys, rel_cols, qlab[start:stop], rlab, skip, 0, budget, junk)
        _store(values, hist_metrics(hist, num_rel[start:stop], ks, keys), start, stop)
    return PerQuery(values, num_rel > 0, qlab)


def _counted_float64(
    prep: Prepared,
    qlab: torch.Tensor,
    ks: tuple[int, ...],
    keys: tuple[str, ...],
    chunk_size: int | None,
    layout: ClassLayout,
    budget: int = MEMORY_BUDGET,
) -> PerQuery:
    """:func:`counted` on a float64 GEMM with a sorted search of every score (bound about 1e-13 per score).

    Taken when a sample shows that too many items would fall in the float32 bound of a relevant score (many
    relevant items per query over a narrow range of scores), where re-scoring them one by one would cost more
    than a float64 GEMM: per block, every item is placed among the sorted relevant scores with a sorted search
    and items within the float64 bound of one are re-scored exactly and compared with the tie rule.
    """
    device = prep.query.device
    nq, m = prep.num_query, prep.num_reference
    n_class, num_rel = layout.n_class, layout.num_rel
    bulk = bulk_inputs(prep, "float64")  # the float64 GEMM's bound (and the exact keys') per query
    eps = bulk.eps
    ref_sq = bulk.ref_sqnorm if prep.distance else None
    values = _empty(keys, ks, nq, device)
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
        # Relevant keys from the same GEMM (each within eps of its exact value), then every item of the query's
        # label (relevant, or removed from the list as junk) masked out of `a`.
        relkeys = torch.gather(a, 1, relcols).masked_fill_(~valid, torch.inf)
        _, member = layout.members(start, stop, rm)
        vr, vc = member.nonzero(as_tuple=True)
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
        _store(values, hist_metrics(hist.view(nb, rm + 1), num_rel[start:stop], ks, keys), start, stop)
    return PerQuery(values, num_rel > 0, qlab)


def listed(
    prep: Prepared,
    qlab: torch.Tensor,
    rlab: torch.Tensor,
    ks: tuple[int, ...],
    keys: tuple[str, ...],
    chunk_size: int | None,
    layout: ClassLayout,
    budget: int = MEMORY_BUDGET,
) -> dict[str, torch.Tensor]:
    """The list keys from exact best-first lists of ``K`` = :func:`list_depth` neighbours (plus each block's junk).

    The lists come from :func:`~dml_bias.metrics._exact.topk_block` in its label mode: the sequence of
    same-label / other-label items is exact (items of one kind may swap where their scores are too close to
    order without re-scoring). Junk items (same label and group) are dropped from the lists afterwards; being of
    the query's label, a swap between a junk and a relevant item leaves the filtered sequence unchanged.
    """
    device = prep.query.device
    nq, m = prep.num_query, prep.num_reference
    num_rel, num_junk = layout.num_rel, layout.num_junk
    available = m - (1 if prep.exclude_self else 0)
    junk_max = int(num_junk.max()) if layout.groups is not None and nq > 0 else 0
    kmax = min(available, list_depth(keys, ks, num_rel) + junk_max)
    values = _empty(keys, ks, nq, device)
    step = block_rows(nq, 16 * m + 64 * kmax, chunk_size, budget, width=m, target=target_block(prep))
    pre = self_candidates_grouped(prep, kmax, budget) if chunk_size is None else None
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        nr = num_rel[start:stop]
        depth = list_depth(keys, ks, nr)
        extra = int(num_junk[start:stop].max()) if junk_max > 0 else 0
        kb = min(available, depth + extra)
        found = rows_of(pre, start, stop)
        labels = (qlab[start:stop], rlab)
        _, cols = topk_block(prep, start, stop, kb, budget, need_keys=False, labels=labels, found=found)
        rel = rlab[cols] == qlab[start:stop, None]
        if layout.groups is not None:
            qg, rg = layout.groups
            junk = rel & (rg[cols] == qg[start:stop, None])
            # Each list without its junk (moved to the end, as no item): at least `depth` items remain, or the
            # whole reference when the list is capped by its size.
            keep = torch.argsort(junk.to(torch.int8), dim=1, stable=True)
            rel = (rel & ~junk).gather(1, keep)
        _store(values, list_metrics(rel[:, : max(1, depth)], nr, ks, keys), start, stop)
    return values


def best_rank(
    prep: Prepared,
    qlab: torch.Tensor,
    rlab: torch.Tensor,
    chunk_size: int | None,
    layout: ClassLayout,
    budget: int = MEMORY_BUDGET,
) -> torch.Tensor:
    """``(Nq,)`` float64 reciprocal rank of each query's best relevant item (0 for lone queries).

    The counting pass against one key per query, the best relevant item's (float32 bulk scores: a single key per
    row leaves few items within its bound): its rank is one plus the items above it.
    """
    device = prep.query.device
    nq, m = prep.num_query, prep.num_reference
    num_rel = layout.num_rel
    bulk = bulk_inputs(prep, "float32")
    out = torch.zeros(nq, dtype=torch.float64, device=device)
    max_rel = int(layout.n_class.max()) if nq > 0 else 0
    step = block_rows(nq, 37 * m + 64 * max_rel, chunk_size, budget, width=m)
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        rm = int(layout.n_class[start:stop].max())
        if rm == 0:
            continue
        rel_keys, rel_cols = layout.relevant(prep, start, stop, rm, budget)
        # The best relevant item is the last valid one of the ascending order (ties: the lower index last).
        last = ((rel_keys < torch.inf).sum(1) - 1).clamp_min(0)[:, None]
        best_key, best_col = rel_keys.gather(1, last), rel_cols.gather(1, last)
        has = num_rel[start:stop] > 0
        best_key = best_key.masked_fill(~has[:, None], torch.inf)
        skip = torch.arange(start, stop, device=device) if prep.exclude_self else None
        junk = layout.junk(prep, start, stop, rm)
        hist = count_above(prep, bulk, start, stop, best_key, best_col, qlab[start:stop], rlab, skip, 0, budget, junk)
        rank = 1.0 + hist[:, 1].to(torch.float64)
        out[start:stop] = torch.where(has, 1.0 / rank, 0.0)
    return out
