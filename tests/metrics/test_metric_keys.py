"""``metrics=`` keys on request, their cost, re-identification protocols, exclude_self and the lone-query policy.

The reference below is written from the definitions alone (numpy float64, a Python sort per query): a query's
list is the reference without the query itself (``exclude_self``) and without the items of its label *and*
group (re-identification), sorted by decreasing score, ties by lower reference index. Integer embeddings with
the dot / squared Euclidean metric make every float64 score exact and full of ties.
"""

from __future__ import annotations

import importlib
import itertools
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dml_bias.metrics import (
    RetrievalEvaluator,
    map_at_r,
    mean_average_precision,
    r_precision,
    recall_at_k,
    retrieval_metrics,
    sharded_retrieval_metrics,
)

engine = importlib.import_module("dml_bias.metrics._engine")
sharded = importlib.import_module("dml_bias.metrics.sharded")

NAMES = ("recall@k", "precision@k", "map@r", "r_precision", "map", "mrr")


def reference_keys(
    query: torch.Tensor,
    qlab: torch.Tensor,
    reference: torch.Tensor | None,
    rlab: torch.Tensor | None,
    ks: tuple[int, ...],
    *,
    metric: str = "dot",
    exclude_self: bool | None = None,
    query_groups: torch.Tensor | None = None,
    reference_groups: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Every key of every query from its sorted list (``num_queries == 0`` when every query is lone)."""
    if exclude_self is None:
        exclude_self = reference is None
    q = query.double().numpy()
    r = q if reference is None else reference.double().numpy()
    yq = qlab.numpy()
    yr = yq if rlab is None else rlab.numpy()
    gq = None if query_groups is None else query_groups.numpy()
    gr = gq if reference_groups is None else reference_groups.numpy()
    per: dict[str, list[float]] = {}
    lone = 0
    for i in range(q.shape[0]):
        keys = []
        for j in range(r.shape[0]):
            if exclude_self and j == i:
                continue
            if gq is not None and gr is not None and yr[j] == yq[i] and gr[j] == gq[i]:
                continue  # junk: same identity, same camera
            if metric == "dot":
                key = float(sum(float(a) * float(b) for a, b in zip(q[i], r[j], strict=True)))
            else:
                key = -float(sum((float(a) - float(b)) ** 2 for a, b in zip(q[i], r[j], strict=True)))
            keys.append((-key, j))
        order = [j for _, j in sorted(keys)]
        ranks = [p + 1 for p, j in enumerate(order) if yr[j] == yq[i]]
        big_r = len(ranks)
        if big_r == 0:
            lone += 1
            continue
        row = {f"recall@{k}": float(ranks[0] <= k) for k in ks}
        row |= {f"precision@{k}": sum(rk <= k for rk in ranks) / k for k in ks}
        row["map@r"] = sum((n + 1) / rk for n, rk in enumerate(ranks) if rk <= big_r) / big_r
        row["r_precision"] = sum(rk <= big_r for rk in ranks) / big_r
        row["map"] = sum((n + 1) / rk for n, rk in enumerate(ranks)) / big_r
        row["mrr"] = 1.0 / ranks[0]
        for name, value in row.items():
            per.setdefault(name, []).append(value)
    out: dict[str, Any] = {name: float(np.mean(v)) for name, v in per.items()}
    out["num_queries"] = q.shape[0] - lone
    out["num_lone_queries"] = lone
    return out


def expected_for(want: dict[str, Any], keys: tuple[str, ...], ks: tuple[int, ...]) -> dict[str, Any]:
    """The reference restricted to ``keys``, in the output order."""
    out: dict[str, Any] = {}
    for name in NAMES:
        if name in keys:
            names = [f"{name[:-2]}@{k}" for k in ks] if name.endswith("@k") else [name]
            out |= {n: want[n] for n in names}
    out["num_queries"] = want["num_queries"]
    out["num_lone_queries"] = want["num_lone_queries"]
    return out


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    for name, value in want.items():
        assert math.isclose(got[name], value, rel_tol=1e-12, abs_tol=1e-12), (name, got[name], value)


@st.composite
def integer_case(draw: st.DrawFn) -> dict[str, Any]:
    """Small integer rows (exact scores, many ties), few labels and groups, optional separate reference."""
    n = draw(st.integers(3, 16))
    dim = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = np.random.default_rng(seed)
    x = torch.tensor(g.integers(-2, 3, size=(n, dim)), dtype=torch.float32)
    y = torch.tensor(g.integers(0, draw(st.integers(1, 4)), size=n))
    groups = torch.tensor(g.integers(0, draw(st.integers(1, 3)), size=n)) if draw(st.booleans()) else None
    split = draw(st.integers(0, n - 2))  # 0: leave-one-out; else queries x[:split] against x[split:]
    ks = tuple(sorted(set(draw(st.lists(st.integers(1, n - split - 1 if split else n - 1), min_size=1, max_size=3)))))
    keys = tuple(draw(st.sets(st.sampled_from(NAMES), min_size=1)))
    return {
        "x": x, "y": y, "groups": groups, "split": split, "ks": ks, "keys": keys,
        "metric": draw(st.sampled_from(["dot", "squared_euclidean"])), "chunk": draw(st.sampled_from([None, 1, 3])),
    }  # fmt: skip


@settings(max_examples=120, deadline=None)
@given(case=integer_case())
def test_every_key_alone_and_in_combination_matches_the_definition(case: dict[str, Any]) -> None:
    x, y, groups, split, ks, keys = (case[k] for k in ("x", "y", "groups", "split", "ks", "keys"))
    common: dict[str, Any] = {"metric": case["metric"], "normalize_embeddings": False, "chunk_size": case["chunk"]}
    if split == 0:
        args: tuple[Any, ...] = (x, y)
        group_kw = {} if groups is None else {"query_groups": groups}
        ref = reference_keys(x, y, None, None, ks, metric=case["metric"], query_groups=groups)
    else:
        args = (x[:split], y[:split], x[split:], y[split:])
        group_kw = {} if groups is None else {"query_groups": groups[:split], "reference_groups": groups[split:]}
        ref = reference_keys(*args, ks, metric=case["metric"], **group_kw)
    if ref["num_queries"] == 0:
        with pytest.raises(ValueError, match="every query is lone"):
            retrieval_metrics(*args, ks=ks, metrics=keys, **common, **group_kw)
        return
    got = retrieval_metrics(*args, ks=ks, metrics=keys, **common, **group_kw)
    assert_same(got, expected_for(ref, keys, ks))
    # Every key alone gives the value it has in the combination (the passes agree exactly).
    for key in keys:
        alone = retrieval_metrics(*args, ks=ks, metrics=(key,), **common, **group_kw)
        assert all(alone[name] == got[name] for name in alone), key


def test_reid_hand_case_with_ties_and_junk() -> None:
    # One query (label 7, camera 0) against 6 gallery items on a line: dot scores 5, 4, 4, 3, 2, 1.
    query = torch.tensor([[1.0]])
    gallery = torch.tensor([[5.0], [4.0], [4.0], [3.0], [2.0], [1.0]])
    labels = torch.tensor([7, 7, 1, 7, 7, 2])
    cams = torch.tensor([0, 1, 1, 0, 1, 1])
    # Item 0 (label 7, camera 0) and item 3 are junk; the list is items 1, 2, 4, 5 (1 ahead of 2 on the tie).
    got = retrieval_metrics(
        query, torch.tensor([7]), gallery, labels, query_groups=torch.tensor([0]), reference_groups=cams,
        ks=(1, 2, 3), metrics=NAMES, metric="dot",
    )  # fmt: skip
    assert got["recall@1"] == 1.0
    assert (got["precision@1"], got["precision@2"], got["precision@3"]) == (1.0, 0.5, 2 / 3)
    assert got["map"] == pytest.approx((1 / 1 + 2 / 3) / 2, abs=1e-15)  # true matches at ranks 1 and 3
    assert got["map@r"] == 0.5
    assert got["r_precision"] == 0.5
    assert got["mrr"] == 1.0
    # The tie the other way round: item 2 (another identity) has the lower index, so it ranks first.
    swapped = retrieval_metrics(
        query, torch.tensor([7]), gallery[[0, 2, 1, 3, 4, 5]], labels[[0, 2, 1, 3, 4, 5]],
        query_groups=torch.tensor([0]), reference_groups=cams[[0, 2, 1, 3, 4, 5]], ks=(1,), metrics=("recall@k", "mrr"),
        metric="dot",
    )  # fmt: skip
    assert (swapped["recall@1"], swapped["mrr"]) == (0.0, 0.5)
    # Without groups the junk items count: item 0 is the best match.
    plain = retrieval_metrics(query, torch.tensor([7]), gallery, labels, ks=(1,), metrics=("map",), metric="dot")
    assert plain["map"] == pytest.approx((1 + 2 / 2 + 3 / 4 + 4 / 5) / 4, abs=1e-15)


def test_reid_matches_a_numpy_argsort_evaluator() -> None:
    # The usual re-ID evaluation (Market-1501 code): argsort each query's distances, drop same id + same camera,
    # CMC and AP from the remaining list. Gaussian data, no ties; the lone query (no other-camera match) is skipped.
    g = torch.Generator().manual_seed(3)
    ids_g = torch.arange(60) % 12
    cams_g = torch.randint(0, 4, (60,), generator=g)
    centres = torch.randn(12, 16, generator=g)
    gallery = centres[ids_g] + 0.9 * torch.randn(60, 16, generator=g)
    ids_q = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 99])
    cams_q = torch.randint(0, 4, (10,), generator=g)
    query = torch.cat([centres[ids_q[:9]], torch.zeros(1, 16)]) + 0.9 * torch.randn(10, 16, generator=g)
    dist = torch.cdist(query.double(), gallery.double()).numpy()
    cmc, aps = np.zeros(10), []
    for i in range(10):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((ids_g.numpy()[order] == ids_q[i].item()) & (cams_g.numpy()[order] == cams_q[i].item()))
        match = (ids_g.numpy()[order] == ids_q[i].item())[keep]
        if not match.any():
            continue
        hits = np.flatnonzero(match)
        cmc[hits[0] :] += 1
        aps.append(np.mean((np.arange(len(hits)) + 1) / (hits + 1)))
    got = retrieval_metrics(
        query, ids_q, gallery, ids_g, query_groups=cams_q, reference_groups=cams_g, ks=(1, 5, 10),
        metrics=("recall@k", "map"), metric="euclidean", normalize_embeddings=False,
    )  # fmt: skip
    assert got["num_queries"] == len(aps)
    assert got["num_lone_queries"] == 10 - len(aps)
    assert got["map"] == pytest.approx(float(np.mean(aps)), abs=1e-12)
    for k in (1, 5, 10):
        assert got[f"recall@{k}"] == pytest.approx(cmc[k - 1] / len(aps), abs=1e-12)


@pytest.fixture
def k_spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the list length of every top-K pass; fail if a counting pass runs."""
    seen: list[int] = []
    topk, pre = engine.topk_block, engine.self_candidates_grouped

    def spy_topk(prep: Any, start: int, stop: int, k: int, *args: Any, **kwargs: Any) -> Any:
        seen.append(k)
        return topk(prep, start, stop, k, *args, **kwargs)

    def spy_pre(prep: Any, k: int, budget: int) -> Any:
        seen.append(k)
        return pre(prep, k, budget)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a counting pass ran")

    monkeypatch.setattr(engine, "topk_block", spy_topk)
    monkeypatch.setattr(engine, "self_candidates_grouped", spy_pre)
    monkeypatch.setattr(engine, "count_above", forbidden)
    monkeypatch.setattr(engine, "per_query_self", forbidden)
    return seen


def two_big_classes(n: int = 1200) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(8)
    labels = torch.arange(n) % 2
    return torch.randn(2, 8, generator=g)[labels] * 0.5 + torch.randn(n, 8, generator=g), labels


def test_recall_alone_never_builds_lists_longer_than_max_ks(k_spy: list[int]) -> None:
    x, y = two_big_classes()  # classes of 600: the MAP@R lists would be 599 long
    got = retrieval_metrics(x, y, ks=(1, 4), metrics=("recall@k", "precision@k"))
    assert k_spy
    assert max(k_spy) <= 4
    k_spy.clear()
    r1 = recall_at_k(x, y, k=1)
    assert k_spy
    assert max(k_spy) == 1
    k_spy.clear()
    evaluator = RetrievalEvaluator(ks=(2,), metrics=("recall@k",))
    evaluator.update(x, y)
    via_evaluator = evaluator.compute()
    assert k_spy
    assert max(k_spy) == 2
    k_spy.clear()
    with_reference = recall_at_k(x[:100], y[:100], x[100:], y[100:], k=3)
    assert k_spy
    assert max(k_spy) == 3
    k_spy.clear()
    # The default set needs the R_q-long lists of MAP@R: the spy sees them (it can fail).
    retrieval_metrics(x[:50], y[:50], ks=(1,))
    assert max(k_spy) == 24
    # Values equal those of the counting pass, which ranks every relevant item.
    full = retrieval_metrics(x, y, ks=(1, 2, 4), metrics=("recall@k", "precision@k", "map"))
    assert (got["recall@1"], got["recall@4"], got["precision@4"]) == (
        full["recall@1"],
        full["recall@4"],
        full["precision@4"],
    )
    assert r1 == full["recall@1"]
    assert via_evaluator["recall@2"] == full["recall@2"]
    assert (
        with_reference
        == retrieval_metrics(x[:100], y[:100], x[100:], y[100:], ks=(3,), metrics=("map", "recall@k"))["recall@3"]
    )


def test_sharded_recall_alone_merges_lists_of_max_ks(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = two_big_classes(400)
    seen: list[int] = []
    merge = sharded._search_and_merge

    def spy(query: Any, shard: Any, k: int, *args: Any, **kwargs: Any) -> Any:
        seen.append(k)
        return merge(query, shard, k, *args, **kwargs)

    monkeypatch.setattr(sharded, "_search_and_merge", spy)
    own = torch.arange(400)
    got = sharded_retrieval_metrics(x, y, x, y, ks=(1, 3), query_indices=own, metrics=("recall@k",))
    assert seen == [3]
    assert got == retrieval_metrics(x, y, ks=(1, 3), metrics=("recall@k",))
    default = sharded_retrieval_metrics(x, y, x, y, ks=(1, 3), query_indices=own)
    assert seen[-1] == 199
    assert default == retrieval_metrics(x, y, ks=(1, 3))


def test_mrr_alone_counts_against_one_key(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = two_big_classes(300)
    widths: list[int] = []
    count = engine.count_above

    def spy(prep: Any, bulk: Any, start: int, stop: int, rel_keys: torch.Tensor, *args: Any, **kw: Any) -> Any:
        widths.append(int(rel_keys.shape[1]))
        return count(prep, bulk, start, stop, rel_keys, *args, **kw)

    monkeypatch.setattr(engine, "count_above", spy)
    got = retrieval_metrics(x, y, metrics=("mrr",), chunk_size=100)
    assert widths == [1, 1, 1]
    assert got["mrr"] == retrieval_metrics(x, y, metrics=("map", "mrr"), chunk_size=100)["mrr"]


def test_lone_query_policy_is_the_same_everywhere() -> None:
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    lone = torch.arange(6)
    calls = [
        lambda: retrieval_metrics(x, lone, ks=(1,)),
        lambda: retrieval_metrics(x, lone, ks=(1,), metrics=("map", "mrr")),
        lambda: recall_at_k(x, lone),
        lambda: map_at_r(x, lone),
        lambda: r_precision(x, lone),
        lambda: mean_average_precision(x, lone),
        lambda: sharded_retrieval_metrics(x, lone, x, lone, ks=(1,), query_indices=torch.arange(6)),
        lambda: sharded_retrieval_metrics(x, lone, x, lone, ks=(1,), query_indices=torch.arange(6), metrics=("map",)),
    ]
    evaluator = RetrievalEvaluator(ks=(1,))
    evaluator.update(x, lone)
    calls.append(evaluator.compute)
    for call in calls:
        with pytest.raises(ValueError, match="every query is lone"):
            call()
    # Some lone queries: left out and counted, the same way by every function.
    y = torch.tensor([0, 0, 1, 1, 2, 3])
    for keys in (None, ("map", "mrr")):
        single = retrieval_metrics(x, y, ks=(1,), metrics=keys)
        split = sharded_retrieval_metrics(x, y, x, y, ks=(1,), query_indices=torch.arange(6), metrics=keys)
        assert single == split
        assert single["num_lone_queries"] == 2
        assert single["num_queries"] == 4


def test_exclude_self_with_a_reference_checks_that_query_i_is_reference_i() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 4, generator=g), torch.arange(20) % 4
    keys, ks = ("recall@k", "map"), (1, 3)
    good = retrieval_metrics(x[:5], y[:5], x, y, exclude_self=True, metrics=keys, ks=ks, metric="dot")
    want = reference_keys(x[:5], y[:5], x, y, ks, exclude_self=True)
    assert_same(good, expected_for(want, keys, ks))
    with pytest.raises(ValueError, match=r"query i is reference item i.*row 0 differs"):
        retrieval_metrics(x[:5], y[:5], x.flip(0), y.flip(0), exclude_self=True)
    other = x.clone()
    other[3] += 1.0
    with pytest.raises(ValueError, match="row 3 differs"):
        recall_at_k(x[:5], y[:5], other, y, exclude_self=True)
    relabelled = y.clone()
    relabelled[2] = 9
    with pytest.raises(ValueError, match="row 2 differs"):
        retrieval_metrics(x[:5], y[:5], x, relabelled, exclude_self=True)
    # The item the issue reported: other rows first gave Recall@1 = 1.0 silently; exclude_self=False is explicit.
    assert retrieval_metrics(x[:5], y[:5], x, y, exclude_self=False, ks=(1,))["recall@1"] == 1.0


def test_full_map_is_deprecated_and_maps_to_metrics() -> None:
    x, y = two_big_classes(80)
    with pytest.warns(DeprecationWarning, match="full_map= is deprecated"):
        old = retrieval_metrics(x, y, ks=(1,), full_map=True)
    assert old == retrieval_metrics(x, y, ks=(1,), metrics=("recall@k", "map@r", "r_precision", "map"))
    with pytest.warns(DeprecationWarning, match="full_map= is deprecated"):
        assert retrieval_metrics(x, y, ks=(1,), full_map=False) == retrieval_metrics(x, y, ks=(1,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "map" not in retrieval_metrics(x, y, ks=(1,))  # the default warns about nothing
    with pytest.raises(ValueError, match="full_map must be left out"):
        retrieval_metrics(x, y, metrics=("map",), full_map=True)


def test_bad_metric_names_and_groups() -> None:
    x, y = two_big_classes(20)
    with pytest.raises(ValueError, match=r"metrics must hold names from .*got 'ap'"):
        retrieval_metrics(x, y, metrics=("ap",))
    with pytest.raises(ValueError, match="metrics must name at least one"):
        retrieval_metrics(x, y, metrics=())
    with pytest.raises(TypeError, match="metrics must be a sequence"):
        retrieval_metrics(x, y, metrics=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reference_groups must be given"):
        retrieval_metrics(x, y, x, y, query_groups=y)
    with pytest.raises(ValueError, match="reference_groups must be None when reference is None"):
        retrieval_metrics(x, y, reference_groups=y)
    with pytest.raises(TypeError, match="query_groups must be a 1-D integer tensor of length 20"):
        retrieval_metrics(x, y, query_groups=y.float())
    with pytest.raises(ValueError, match="metrics must hold names"):
        RetrievalEvaluator(metrics=("recall@1",))
    assert retrieval_metrics(x, y, metrics="mrr").keys() == {"mrr", "num_queries", "num_lone_queries"}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1000))
def test_per_class_holds_the_requested_keys(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(30, 3, generator=g), torch.randint(0, 3, (30,), generator=g)
    for r in range(1, 4):
        for keys in itertools.combinations(NAMES, r):
            got = retrieval_metrics(x, y, ks=(1, 2), metrics=keys, per_class=True)
            entry = next(iter(got["per_class"].values()))
            assert list(entry) == [k for k in got if k not in ("num_queries", "num_lone_queries", "per_class")] + [
                "count"
            ]
            if r == 1 and keys[0] in ("map", "mrr"):
                weights = [v["count"] for v in got["per_class"].values()]
                mean = sum(v[keys[0]] * w for v, w in zip(got["per_class"].values(), weights, strict=True))
                assert mean / sum(weights) == pytest.approx(got[keys[0]], abs=1e-12)
