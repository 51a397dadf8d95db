"""Tests of the retrieval metrics against numpy-loop references, scikit-learn and pytorch-metric-learning."""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_bias.metrics import map_at_r, mean_average_precision, r_precision, recall_at_k, retrieval_metrics

sys.path.insert(0, os.path.dirname(__file__))
from test_retrieval_reference import clustered, ref_metrics

ENGINE = sys.modules["dml_bias.metrics._exact"]
#: The keys of the old default call (full mAP included), which the reference computes.
FULL = ("recall@k", "map@r", "r_precision", "map")


@pytest.fixture(params=["bf16", "fp32"])
def bulk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the bf16 candidate pass of the top-K path forced on and off."""
    monkeypatch.setattr(ENGINE, "BF16_CPU", request.param == "bf16")
    return str(request.param)


def assert_same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_same(got[key], value)
        else:
            assert math.isclose(got[key], value, rel_tol=1e-12, abs_tol=1e-12), (key, got[key], value)


def test_methods_md_hand_case() -> None:
    # R = 3, relevance of the first neighbours [1, 0, 1, 0, 1]: MAP@R = (1/1 + 2/3) / 3, R-precision 2/3.
    query = torch.tensor([[1.0]])
    reference = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5]])
    res = retrieval_metrics(
        query, torch.tensor([0]), reference, torch.tensor([0, 1, 0, 1, 0]), ks=(1, 2, 5), metric="dot", metrics=FULL
    )
    assert res["map@r"] == pytest.approx((1 + 2 / 3) / 3)
    assert round(res["map@r"], 4) == 0.5556
    assert res["r_precision"] == pytest.approx(2 / 3)
    assert res["map"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert (res["recall@1"], res["recall@2"], res["recall@5"]) == (1.0, 1.0, 1.0)
    assert (res["num_queries"], res["num_lone_queries"]) == (1, 0)


def test_tie_rule_lower_index_first() -> None:
    # Both reference items score 1.0; the irrelevant one has the lower index, so it ranks first.
    res = retrieval_metrics(
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([0]),
        torch.tensor([[1.0, 0.0], [2.0, 0.0]]),
        torch.tensor([1, 0]),
        ks=(1, 2),
        metrics=FULL,
    )
    assert (res["recall@1"], res["recall@2"], res["map"]) == (0.0, 1.0, 0.5)
    swapped = retrieval_metrics(
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([0]),
        torch.tensor([[1.0, 0.0], [2.0, 0.0]]),
        torch.tensor([0, 1]),
        ks=(1,),
    )
    assert swapped["recall@1"] == 1.0


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared_euclidean"])
@pytest.mark.parametrize("mode", ["self", "reference", "reference_exclude"])
def test_matches_reference(metric: str, mode: str, bulk: str) -> None:
    x, lx = clustered(70, 8, 6, seed=11, spread=1.5)
    r, lr = clustered(50, 8, 7, seed=12, spread=1.5)
    if mode == "self":
        args: tuple[Any, ...] = (x, lx, None, None)
        kw: dict[str, Any] = {}
    elif mode == "reference":
        args, kw = (x, lx, r, lr), {}
    else:
        args, kw = (x[:45], lx[:45], x, lx), {"exclude_self": True}
    ks = (1, 2, 4, 8, 16)
    overall, per_class, _ = ref_metrics(*args, ks, metric=metric, exclude_self=kw.get("exclude_self"))
    got = retrieval_metrics(*args, ks=ks, metric=metric, per_class=True, chunk_size=9, metrics=FULL, **kw)
    assert_same(got, {**overall, "per_class": per_class})
    fast = retrieval_metrics(*args, ks=ks, metric=metric, per_class=True, **kw)
    overall.pop("map")
    for entry in per_class.values():
        entry.pop("map")
    assert_same(fast, {**overall, "per_class": per_class})
    assert recall_at_k(*args, k=2, metric=metric, **kw) == pytest.approx(overall["recall@2"], abs=1e-12)
    assert map_at_r(*args, metric=metric, **kw) == pytest.approx(overall["map@r"], abs=1e-12)
    assert r_precision(*args, metric=metric, **kw) == pytest.approx(overall["r_precision"], abs=1e-12)
    assert mean_average_precision(*args, metric=metric, **kw) == pytest.approx(got["map"], abs=1e-12)


def test_map_equals_sklearn_average_precision() -> None:
    from sklearn.metrics import average_precision_score

    x, lx = clustered(120, 16, 8, seed=13, spread=2.0)
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    sims = (xn @ xn.T).numpy()
    aps = []
    for i in range(120):
        keep = np.arange(120) != i
        rel = (lx.numpy()[keep] == lx.numpy()[i]).astype(int)
        if rel.sum():
            aps.append(average_precision_score(rel, sims[i, keep]))
    assert mean_average_precision(x, lx) == pytest.approx(float(np.mean(aps)), abs=1e-12)


def test_pml_accuracy_calculator_cross_check(bulk: str) -> None:
    pytest.importorskip("faiss")
    acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    x, lx = clustered(600, 32, 12, seed=14, spread=3.0)
    xn = torch.nn.functional.normalize(x, dim=1)  # PML uses L2 on raw inputs: normalise so the orders agree
    calc = acc.AccuracyCalculator(
        include=("mean_average_precision_at_r", "r_precision", "precision_at_1"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    pml = calc.get_accuracy(xn, lx, xn, lx, ref_includes_query=True)
    ours = retrieval_metrics(x, lx, ks=(1,))
    assert {k: v for k, v in retrieval_metrics(x, lx, ks=(1,), metrics=FULL).items() if k != "map"} == ours
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), n=st.integers(2, 14), dim=st.integers(1, 3), num_labels=st.integers(1, 4))
def test_integer_data_with_ties_lone_labels_and_one_class(
    data: st.DataObject, n: int, dim: int, num_labels: int
) -> None:
    # Small integer embeddings with the dot metric: scores exact, many ties, lone labels, maybe one class.
    ints = st.lists(st.integers(-2, 2), min_size=dim, max_size=dim)
    x = torch.tensor(data.draw(st.lists(ints, min_size=n, max_size=n)), dtype=torch.float32)
    labels = torch.tensor(data.draw(st.lists(st.integers(0, num_labels - 1), min_size=n, max_size=n)))
    ks = tuple(sorted(set(data.draw(st.lists(st.integers(1, n - 1), min_size=1, max_size=3)))))
    metric = data.draw(st.sampled_from(["dot", "squared_euclidean"]))
    overall, per_class, _ = ref_metrics(x, labels, None, None, ks, metric=metric, normalize=False)
    if overall["num_queries"] == 0:
        with pytest.raises(ValueError, match="lone"):
            retrieval_metrics(x, labels, ks=ks, metric=metric, normalize_embeddings=False)
        return
    got = retrieval_metrics(
        x,
        labels,
        ks=ks,
        metric=metric,
        normalize_embeddings=False,
        per_class=True,
        chunk_size=data.draw(st.integers(1, 4)),
        metrics=FULL,
    )
    assert_same(got, {**overall, "per_class": per_class})
    fast = retrieval_metrics(x, labels, ks=ks, metric=metric, normalize_embeddings=False)
    got.pop("map")
    got.pop("per_class")
    assert_same(fast, got)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), dup=st.booleans())
def test_reference_permutation_and_duplicates(seed: int, dup: bool) -> None:
    q, lq = clustered(25, 6, 4, seed=seed, spread=2.0)
    r, lr = clustered(40, 6, 5, seed=seed + 1, spread=2.0)
    if dup:  # duplicated reference rows: ties between copies, which are permuted together
        r, lr = torch.cat([r, r[:10]]), torch.cat([lr, lr[:10]])
    base = retrieval_metrics(q, lq, r, lr, ks=(1, 3, 9), per_class=True, metrics=FULL)
    perm = torch.randperm(r.shape[0], generator=torch.Generator().manual_seed(seed))
    permuted = retrieval_metrics(q, lq, r[perm], lr[perm], ks=(1, 3, 9), per_class=True, metrics=FULL)
    # Ties between copies share a label, so the tie order cannot change any metric.
    assert_same(permuted, base)
    overall, _, _ = ref_metrics(q, lq, r, lr, (1, 3, 9))
    base.pop("per_class")
    assert_same(base, overall)


def test_one_class_and_k_larger_than_class() -> None:
    x, _ = clustered(12, 4, 1, seed=15)
    res = retrieval_metrics(x, torch.zeros(12, dtype=torch.long), ks=(1, 11), metrics=FULL)
    assert {k: v for k, v in res.items() if k.startswith(("recall", "map", "r_"))} == {
        "recall@1": 1.0,
        "recall@11": 1.0,
        "map@r": 1.0,
        "r_precision": 1.0,
        "map": 1.0,
    }
    y = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2])  # class 0 has R = 1 < k = 8; label 2 is lone
    overall, per_class, _ = ref_metrics(x, y, None, None, (1, 8))
    got = retrieval_metrics(x, y, ks=(1, 8), per_class=True, metrics=FULL)
    assert_same(got, {**overall, "per_class": per_class})
    assert got["num_lone_queries"] == 1
    assert 2 not in got["per_class"]


@pytest.mark.parametrize("precision", ["medium", "high"])
def test_matmul_precision_and_chunks_do_not_change_result(precision: str) -> None:
    x, lx = clustered(200, 32, 10, seed=16, spread=3.0)
    expected = retrieval_metrics(x, lx, per_class=True, metrics=FULL)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        got = retrieval_metrics(x, lx, per_class=True, chunk_size=17, metrics=FULL)
    finally:
        torch.set_float32_matmul_precision(before)
    assert got == expected


def test_inputs_not_modified() -> None:
    x, lx = clustered(30, 5, 3, seed=17)
    r, lr = clustered(20, 5, 3, seed=18)
    saved = [t.clone() for t in (x, lx, r, lr)]
    retrieval_metrics(x, lx, r, lr, ks=(1, 2), metric="euclidean", per_class=True)
    for before, after in zip(saved, (x, lx, r, lr), strict=True):
        assert torch.equal(before, after)


def test_bad_inputs() -> None:
    x = torch.randn(6, 3)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(TypeError, match="query_labels must be a 1-D integer tensor"):
        retrieval_metrics(x, y.float())
    with pytest.raises(ValueError, match=r"query_labels must be a 1-D integer tensor of length 6 \(query.shape\[0\]\)"):
        retrieval_metrics(x, y[:5])
    with pytest.raises(ValueError, match="reference_labels must be given"):
        retrieval_metrics(x, y, x)
    with pytest.raises(ValueError, match="reference_labels must be None"):
        retrieval_metrics(x, y, None, y)
    with pytest.raises(ValueError, match="reference_labels must be a 1-D integer tensor of length 4"):
        retrieval_metrics(x, y, x[:4], y)
    with pytest.raises(ValueError, match=r"ks must be an integer in \[1, 5\]"):
        retrieval_metrics(x, y, ks=(1, 6))
    with pytest.raises(ValueError, match="ks must be"):
        retrieval_metrics(x, y, ks=(0,))
    with pytest.raises(TypeError, match="ks must be a sequence"):
        retrieval_metrics(x, y, ks="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="query must be finite"):
        retrieval_metrics(torch.full((6, 3), float("nan")), y)
    with pytest.raises(ValueError, match="query must be a 2-D"):
        retrieval_metrics(torch.randn(6), y)
    with pytest.raises(ValueError, match="lone"):
        retrieval_metrics(x, torch.arange(6), ks=(1,))
    with pytest.raises(ValueError, match="query_labels must be on the same device"):
        retrieval_metrics(x, y.to("meta"))
    with pytest.raises(TypeError, match="per_class must be a bool"):
        retrieval_metrics(x, y, per_class=1)  # type: ignore[arg-type]


def test_tiny_memory_budget_gives_the_same_result() -> None:
    engine = sys.modules["dml_bias.metrics._engine"]
    counting = sys.modules["dml_bias.metrics._counting"]
    x, lx = clustered(40, 8, 4, seed=19, spread=2.0)
    prep = ENGINE.prepare(x, None, "cosine", None, None)
    layout = counting.ClassLayout.of(prep, lx, lx)
    keys = ("recall@k", "precision@k", "map@r", "r_precision", "map", "mrr")
    full = engine.counted(prep, lx, lx, (1, 2), keys, None, layout).values
    tiny = engine.counted(prep, lx, lx, (1, 2), keys, None, layout, budget=64).values
    fast = engine.listed(prep, lx, lx, (1, 2), keys[:4], None, layout, budget=64)
    best = engine.best_rank(prep, lx, lx, None, layout, budget=64)
    for name in keys:
        assert torch.equal(full[name], tiny[name])
    for name in keys[:4]:
        assert torch.equal(full[name], fast[name])
    assert torch.equal(torch.where(layout.num_rel > 0, full["mrr"], 0.0), best)
