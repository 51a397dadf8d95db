"""Property tests of the full mAP (and of every other key computed with it) against a slow float64 reference.

The full mAP counts, per relevant item, the irrelevant items ranked above it: a bulk pass (float32, or a 16-bit
pass forced through ``_counting.COUNT_BULK = "half"``) decides the clear cases and the items within its error
bound of a relevant key are re-scored exactly and ordered by the tie rule (equal score: lower reference index
first). The data here are built to make that band crowded: small-integer embeddings, duplicated rows across
labels, scalar multiples (cosine ties), constant and zero rows, lone labels. Every float64 score of these data
is exact (integers for ``"dot"`` and unnormalised distances, dyadic rationals after the normalisation for
``"cosine"`` and normalised distances), so the reference's ties are the true ties whatever the summation order.
Gaussian rows with near-copies (inside the bulk error band, far apart in float64) and exact copies check the
re-scoring of the band, and a clustered case (600 rows, relevant items ranked deep) checks it at scale.

The reference below is written from the definitions alone (numpy, float64 loops) and shares no code with the
library or with ``test_retrieval_reference.py``.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dml_bias import metrics as _metrics
from dml_bias.metrics import mean_average_precision

retrieval_module = importlib.import_module("dml_bias.metrics._counting")  # the COUNT_BULK test hook

#: The keys this module checks: the counting pass (full mAP) gives them all.
FULL = ("recall@k", "map@r", "r_precision", "map")


def retrieval_metrics(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`dml_bias.metrics.retrieval_metrics` asked for the full mAP (the counting pass) unless told otherwise."""
    return _metrics.retrieval_metrics(*args, **{"metrics": FULL, **kwargs})


def sharded_retrieval_metrics(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`dml_bias.metrics.sharded_retrieval_metrics` asked for the full mAP unless told otherwise."""
    return _metrics.sharded_retrieval_metrics(*args, **{"metrics": FULL, **kwargs})


TOL = 1e-12
#: Metric and ``normalize_embeddings`` per kind of data, so that every float64 score of the data is exact
#: ("integer", "dyadic") or ties come only from bitwise-equal normalised rows ("gaussian").
METRIC_CHOICES: dict[str, list[tuple[str, bool | None]]] = {
    "integer": [("dot", None), ("euclidean", False), ("squared_euclidean", False), ("dot", False)],
    "dyadic": [("cosine", None), ("euclidean", None), ("squared_euclidean", True)],
    "gaussian": [("cosine", None), ("dot", None), ("euclidean", None), ("squared_euclidean", False)],
}
PROPERTY_SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --------------------------------------------------------------------------------------------- the reference


def _float64_rows(x: torch.Tensor, metric: str, normalize: bool | None) -> np.ndarray:
    """The float64 rows the scores are defined on: the inputs widened, L2-normalised in float64 when asked."""
    x64 = x.detach().to(torch.float64)
    if metric == "cosine" or (metric != "dot" if normalize is None else normalize):
        x64 = x64 / x64.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x64.cpu().numpy()


def _scores(q: np.ndarray, r: np.ndarray, metric: str) -> np.ndarray:
    """Scores of one query row against every reference row (larger is closer), summed left to right."""
    out = np.zeros(r.shape[0], dtype=np.float64)
    for k in range(q.shape[0]):
        if metric in ("cosine", "dot"):
            out += q[k] * r[:, k]
        else:
            out -= (q[k] - r[:, k]) ** 2
    return out


def reference_ranks(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None,
    reference_labels: torch.Tensor | None,
    metric: str,
    normalize: bool | None = None,
    exclude_self: bool | None = None,
) -> list[np.ndarray]:
    """Per query, the sorted 1-based ranks of its relevant items (empty for a lone query)."""
    same = reference is None
    q = _float64_rows(query, metric, normalize)
    r = q if same else _float64_rows(reference, metric, normalize)
    ql = query_labels.cpu().numpy()
    rl = ql if same else reference_labels.cpu().numpy()  # type: ignore[union-attr]
    excl = same if exclude_self is None else exclude_self
    out = []
    for i in range(q.shape[0]):
        s = _scores(q[i], r, metric)
        idx = np.arange(r.shape[0])
        keep = idx != i if excl else np.ones(r.shape[0], dtype=bool)
        s, idx = s[keep], idx[keep]
        order = idx[np.lexsort((idx, -s))]  # by decreasing score, then increasing reference index
        out.append(np.flatnonzero(rl[order] == ql[i]) + 1)
    return out


def per_query_values(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Recall@k, R-precision, MAP@R and AP of one non-lone query from the ranks of its relevant items."""
    big_r = len(ranks)
    i = np.arange(1, big_r + 1)
    in_r = ranks <= big_r
    out = {f"recall@{k}": float(ranks[0] <= k) for k in ks}
    out["map@r"] = float(np.sum(i[in_r] / ranks[in_r]) / big_r)
    out["r_precision"] = float(np.sum(in_r) / big_r)
    out["map"] = float(np.sum(i / ranks) / big_r)
    return out


def reference_metrics(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    *,
    ks: tuple[int, ...] = (1, 2, 4, 8),
    metric: str = "cosine",
    normalize: bool | None = None,
    exclude_self: bool | None = None,
) -> dict[str, Any]:
    """All keys of ``retrieval_metrics(..., per_class=True)``; ``num_queries == 0`` when every query is lone."""
    ranks = reference_ranks(query, query_labels, reference, reference_labels, metric, normalize, exclude_self)
    labels = query_labels.cpu().numpy()
    rows = [(int(labels[i]), per_query_values(rk, ks)) for i, rk in enumerate(ranks) if len(rk) > 0]
    names = [f"recall@{k}" for k in ks] + ["map@r", "r_precision", "map"]
    out: dict[str, Any] = {name: float(np.mean([v[name] for _, v in rows])) if rows else math.nan for name in names}
    out["num_queries"] = len(rows)
    out["num_lone_queries"] = len(ranks) - len(rows)
    per_class: dict[int, dict[str, Any]] = {}
    for label in sorted({lab for lab, _ in rows}):
        mine = [v for lab, v in rows if lab == label]
        entry: dict[str, Any] = {name: float(np.mean([v[name] for v in mine])) for name in names}
        entry["count"] = len(mine)
        per_class[label] = entry
    out["per_class"] = per_class
    return out


def assert_same(got: dict[str, Any], want: dict[str, Any], keys: set[str] | None = None) -> None:
    """Same key set, same integer counts, floats within TOL (relative and absolute); recursive for per_class."""
    keys = set(want) if keys is None else keys
    assert set(got) == keys, f"keys {sorted(got)} != {sorted(keys)}"
    for key in keys:
        g, w = got[key], want[key]
        if isinstance(w, dict):
            assert set(g) == set(w), f"{key}: labels {sorted(g)} != {sorted(w)}"
            for label in w:
                assert_same(g[label], w[label])
        elif isinstance(w, int):
            assert g == w, f"{key}: {g} != {w}"
            assert isinstance(g, int), f"{key}: {g!r} is not an int"
        else:
            assert math.isclose(g, w, rel_tol=TOL, abs_tol=TOL), f"{key}: {g!r} != {w!r} (diff {g - w:.3e})"


# ------------------------------------------------------------------------------------------------ the data


def _dyadic_row(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A random nonzero integer row with entries in {-2, ..., 2} and squared norm 1, 4, 16 or 64.

    Its norm is a power of 2, so the float64 normalisation (of the row and of its integer multiples) is exact and
    every cosine or normalised distance between such rows is an exact dyadic rational.
    """
    options = [(a, t - 4 * a) for t in (1, 4, 16, 64) for a in range(t // 4 + 1) if a + (t - 4 * a) <= dim]
    twos, ones = options[rng.integers(len(options))]
    row = np.zeros(dim)
    pos = rng.permutation(dim)[: twos + ones]
    row[pos[:twos]] = 2.0
    row[pos[twos:]] = 1.0
    return row * rng.choice([-1.0, 1.0], size=dim)


def tie_heavy(seed: int, num_rows: int, dim: int, num_labels: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_rows`` float32 rows full of ties, and their labels (a few of them lone labels).

    ``kind="integer"``: entries in {-2, ..., 2} (exact scores for ``"dot"`` and unnormalised distances).
    ``kind="dyadic"``: rows of power-of-2 norm and integer multiples of them (exact after normalisation).
    ``kind="gaussian"``: Gaussian rows and near-copies of them (a relative 1e-5 apart: inside the bulk error
    band, yet far apart in float64), multiples by powers of 2 only (exact ties after normalisation).
    Then rows are copied onto others (whatever the labels), scaled copies, constant and zero rows are written.
    """
    rng = np.random.default_rng(seed)
    if kind == "dyadic":
        x = np.stack([_dyadic_row(rng, dim) for _ in range(num_rows)])
    elif kind == "integer":
        x = rng.integers(-2, 3, size=(num_rows, dim)).astype(np.float64)
    else:
        x = rng.standard_normal((num_rows, dim))
        for _ in range(rng.integers(0, num_rows // 2 + 1)):  # near-ties: in the bulk band, not exact ties
            i, j = rng.integers(num_rows, size=2)
            x[j] = x[i] * (1 + 1e-5 * rng.standard_normal(dim))
    for _ in range(rng.integers(0, num_rows // 2 + 1)):  # duplicates, across labels
        i, j = rng.integers(num_rows, size=2)
        x[j] = x[i]
    for _ in range(rng.integers(0, num_rows // 4 + 1)):  # scalar multiples: cosine ties, "dot" non-ties
        i, j = rng.integers(num_rows, size=2)
        x[j] = rng.choice([-1.0, 0.5, 2.0, 4.0] if kind == "gaussian" else [-1.0, 2.0, 3.0, 4.0]) * x[i]
    constant_ok = kind != "dyadic" or dim in (1, 4, 16, 64)  # the constant row's norm must be a power of 2
    for _ in range(rng.integers(0, 3) if constant_ok else 0):
        x[rng.integers(num_rows)] = rng.choice([-1.0, 1.0, 2.0])
    # A zero row stays zero after the normalisation, so its normalised distance to a Gaussian row is that row's
    # norm, 1 up to the rounding: ties decided by the summation order only. Zero rows only with exact scores.
    for _ in range(rng.integers(0, 2) if kind != "gaussian" else 0):
        x[rng.integers(num_rows)] = 0.0
    labels = rng.integers(0, num_labels, size=num_rows)
    for lone in range(rng.integers(0, 3)):
        labels[rng.integers(num_rows)] = 100 + lone
    return torch.from_numpy(x).to(torch.float32), torch.from_numpy(labels)


def clustered(
    seed: int, num_rows: int, dim: int, spread: float = 0.8, duplicates: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters of 5-15 items whose centres are close to the noise level, so relevant items rank deep.

    ``duplicates`` rows are also copied onto random other rows (mostly of other labels): exact ties in the band.
    """
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    while sum(sizes) < num_rows:
        sizes.append(int(rng.integers(5, 16)))
    labels = np.repeat(np.arange(len(sizes)), sizes)[:num_rows]
    centres = rng.standard_normal((len(sizes), dim)) * spread
    x = centres[labels] + rng.standard_normal((num_rows, dim))
    for _ in range(duplicates):
        i, j = rng.integers(num_rows, size=2)
        x[j] = x[i]
    perm = rng.permutation(num_rows)
    return torch.from_numpy(x[perm]).to(torch.float32), torch.from_numpy(labels[perm])


# -------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["float32", "half", "float64"])
def count_bulk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force the counting pass of the full mAP to float32 or to the 16-bit pass (bf16 on the CPU)."""
    monkeypatch.setattr(retrieval_module, "COUNT_BULK", request.param, raising=False)
    return str(request.param)


@pytest.fixture(params=["dense", "compact"])
def count_layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force how a block is counted: every item through the lookup table, or only the items above each row's
    lowest bin (otherwise chosen per block from their share)."""
    monkeypatch.setattr(retrieval_module, "_COMPACT_FRACTION", 1.0 if request.param == "compact" else -1.0)
    return str(request.param)


@pytest.fixture(params=["highest", "medium"])
def matmul_precision(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run with ``torch.set_float32_matmul_precision`` set (a reduced precision must not change any value)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(request.param)
    try:
        yield str(request.param)
    finally:
        torch.set_float32_matmul_precision(old)


def _ks(available: int, extra: list[int]) -> tuple[int, ...]:
    return tuple(sorted({1, *[k for k in extra if k <= available], available}))


def check_against_reference(
    query: torch.Tensor,
    qlab: torch.Tensor,
    reference: torch.Tensor | None,
    rlab: torch.Tensor | None,
    *,
    ks: tuple[int, ...],
    metric: str,
    normalize: bool | None,
    exclude_self: bool | None,
    chunk_size: int | None,
) -> dict[str, Any]:
    want = reference_metrics(
        query, qlab, reference, rlab, ks=ks, metric=metric, normalize=normalize, exclude_self=exclude_self
    )
    kwargs: dict[str, Any] = {
        "ks": ks,
        "metric": metric,
        "normalize_embeddings": normalize,
        "exclude_self": exclude_self,
        "chunk_size": chunk_size,
    }
    if want["num_queries"] == 0:
        with pytest.raises(ValueError, match="lone"):
            retrieval_metrics(query, qlab, reference, rlab, **kwargs)
        return want
    got = retrieval_metrics(query, qlab, reference, rlab, per_class=True, **kwargs)
    assert_same(got, want)
    plain = retrieval_metrics(query, qlab, reference, rlab, **kwargs)
    assert_same(plain, want, keys=set(want) - {"per_class"})
    return want


@st.composite
def tie_cases(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """Sizes, seed and options of one tie-heavy case (the rows themselves come from :func:`tie_heavy`)."""
    dim = draw(st.sampled_from([1, 2, 3, 8, 64]))
    num_query = draw(st.integers(2, 60))
    with_reference = draw(st.booleans())
    num_reference = draw(st.integers(1, 60)) if with_reference else 0
    exclude_self: bool | None = None
    if with_reference and num_query <= num_reference and num_reference >= 2:
        exclude_self = draw(st.sampled_from([None, True]))
    metric, normalize = draw(st.sampled_from(METRIC_CHOICES[kind]))
    return {
        "dim": dim,
        "num_query": num_query,
        "num_reference": num_reference,
        "num_labels": draw(st.integers(1, 4)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "metric": metric,
        "normalize": normalize,
        "exclude_self": exclude_self,
        "extra_ks": draw(st.lists(st.integers(2, 12), max_size=3)),
    }


def _run_case(case: dict[str, Any], kind: str, chunk_size: int | None) -> None:
    nq, nr = case["num_query"], case["num_reference"]
    x, y = tie_heavy(case["seed"], nq + nr, case["dim"], case["num_labels"], kind)
    query, qlab = x[:nq], y[:nq]
    reference, rlab = (x[nq:], y[nq:]) if nr > 0 else (None, None)
    if case["exclude_self"] and reference is not None and rlab is not None:
        # Query i is reference item i: the reference starts with the queries (checked by retrieval_metrics).
        reference, rlab = torch.cat([query, reference[nq:]]), torch.cat([qlab, rlab[nq:]])
    excl = reference is None if case["exclude_self"] is None else case["exclude_self"]
    available = (nr if nr > 0 else nq) - (1 if excl else 0)
    check_against_reference(
        query,
        qlab,
        reference,
        rlab,
        ks=_ks(available, case["extra_ks"]),
        metric=case["metric"],
        normalize=case["normalize"],
        exclude_self=case["exclude_self"],
        chunk_size=chunk_size,
    )


# ------------------------------------------------------------------------------------------------------ tests


def test_count_bulk_hook_defaults_to_automatic() -> None:
    """The test hook exists and is ``None`` (automatic choice of the counting pass) unless a test sets it."""
    assert hasattr(retrieval_module, "COUNT_BULK"), "dml_bias.metrics._counting.COUNT_BULK is missing"
    assert retrieval_module.COUNT_BULK is None


def test_reference_on_a_hand_computed_case() -> None:
    """The reference itself, on a case worked out by hand: ties broken by index, a lone label, R = 1 and 2."""
    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, -1.0]])
    y = torch.tensor([0, 0, 1, 0, 1, 9])
    ranks = reference_ranks(x, y, None, None, "dot")
    assert [r.tolist() for r in ranks] == [[1, 4], [1, 4], [3], [2, 3], [3], []]
    want = reference_metrics(x, y, ks=(1, 2), metric="dot")
    assert want["map"] == pytest.approx(33 / 60, abs=1e-15)
    assert want["map@r"] == pytest.approx(0.25, abs=1e-15)
    assert want["r_precision"] == pytest.approx(0.3, abs=1e-15)
    assert (want["recall@1"], want["recall@2"]) == (pytest.approx(0.4), pytest.approx(0.6))
    assert (want["num_queries"], want["num_lone_queries"]) == (5, 1)
    assert want["per_class"][0] == pytest.approx(
        {"recall@1": 2 / 3, "recall@2": 1.0, "map@r": 5 / 12, "r_precision": 0.5, "map": 25 / 36, "count": 3}
    )
    assert want["per_class"][1] == pytest.approx(
        {"recall@1": 0.0, "recall@2": 0.0, "map@r": 0.0, "r_precision": 0.0, "map": 1 / 3, "count": 2}
    )
    assert set(want["per_class"]) == {0, 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hand_computed_case(count_bulk: str, dtype: torch.dtype) -> None:
    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, -1.0]], dtype=dtype)
    y = torch.tensor([0, 0, 1, 0, 1, 9])
    got = retrieval_metrics(x, y, ks=(1, 2), metric="dot", per_class=True)
    assert_same(got, reference_metrics(x, y, ks=(1, 2), metric="dot"))
    assert got["map"] == pytest.approx(33 / 60, abs=1e-15)
    assert mean_average_precision(x, y, metric="dot") == pytest.approx(33 / 60, abs=1e-15)


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@PROPERTY_SETTINGS
@given(case=tie_cases(kind="integer"))
def test_integer_data_all_keys_match_reference(
    count_bulk: str, matmul_precision: str, chunk_size: int | None, case: dict[str, Any]
) -> None:
    """``"dot"`` and unnormalised distances on small-integer rows with duplicates, multiples, constants."""
    _run_case(case, kind="integer", chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@PROPERTY_SETTINGS
@given(case=tie_cases(kind="dyadic"))
def test_normalised_data_all_keys_match_reference(
    count_bulk: str, matmul_precision: str, chunk_size: int | None, case: dict[str, Any]
) -> None:
    """``"cosine"`` and normalised distances on rows whose normalisation is exact: scalar multiples tie exactly."""
    _run_case(case, kind="dyadic", chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
@PROPERTY_SETTINGS
@given(case=tie_cases(kind="gaussian"))
def test_gaussian_data_with_near_ties_all_keys_match_reference(
    count_bulk: str, matmul_precision: str, chunk_size: int | None, case: dict[str, Any]
) -> None:
    """Gaussian rows, near-copies inside the bulk error band and exact copies: the re-scoring decides."""
    _run_case(case, kind="gaussian", chunk_size=chunk_size)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_scalar_multiples_tie_under_cosine(count_bulk: str, count_layout: str, metric: str) -> None:
    """Multiples of one row are exact ties: the lower index wins, whatever the label or the scale."""
    base = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    other = torch.tensor([[1.0, 1.0, 1.0, -1.0]])  # cosine 0 with base
    scales = torch.tensor([[1.0], [3.0], [0.5], [2.0], [4.0], [6.0]])
    x = torch.cat([scales * base, 2 * other, other])
    y = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    got = retrieval_metrics(x, y, ks=(1, 3), metric=metric, per_class=True)
    want = reference_metrics(x, y, ks=(1, 3), metric=metric)
    assert_same(got, want)
    # Query 0 (label 1) sees its multiples 1..5 tied, in index order: relevant at ranks 2, 4, then 6 (row 6).
    assert reference_ranks(x, y, None, None, metric)[0].tolist() == [2, 4, 6]
    assert want["num_queries"] == 8


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    num_rows=st.integers(3, 60),
    dim=st.sampled_from([1, 2, 3, 8, 64]),
    metric=st.sampled_from(["cosine", "dot", "euclidean"]),
)
def test_mean_average_precision_is_the_map_key(
    count_bulk: str, count_layout: str, seed: int, num_rows: int, dim: int, metric: str
) -> None:
    x, y = tie_heavy(seed, num_rows, dim, 3, kind="integer" if metric == "dot" else "dyadic")
    want = reference_metrics(x, y, ks=(1,), metric=metric)
    if want["num_queries"] == 0:
        with pytest.raises(ValueError, match="lone"):
            mean_average_precision(x, y, metric=metric)
        return
    value = mean_average_precision(x, y, metric=metric)
    assert isinstance(value, float)
    assert value == retrieval_metrics(x, y, metric=metric, ks=(1,))["map"]
    assert math.isclose(value, want["map"], rel_tol=TOL, abs_tol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("metric", "with_reference"), [("cosine", False), ("euclidean", False), ("dot", True), ("cosine", True)]
)
def test_clustered_deep_ranks_match_reference(
    count_bulk: str, count_layout: str, metric: str, with_reference: bool
) -> None:
    """600 rows in 32 dimensions, ~10 per class, clusters overlapping: many relevant items rank deep."""
    x, y = clustered(seed=7, num_rows=600, dim=32)
    if with_reference:
        query, qlab, reference, rlab = x[:150], y[:150], x, y
        excl: bool | None = True
    else:
        query, qlab, reference, rlab, excl = x, y, None, None, None
    want = check_against_reference(
        query, qlab, reference, rlab, ks=(1, 5, 20), metric=metric, normalize=None, exclude_self=excl, chunk_size=None
    )
    # The case is hard enough that the full mAP needs ranks far down the list, and differs from MAP@R.
    assert 0.15 < want["map"] < 0.85
    assert want["map"] - want["map@r"] > 0.05
    ranks = reference_ranks(query, qlab, reference, rlab, metric, exclude_self=excl)
    assert max(int(r[-1]) for r in ranks if len(r) > 0) > 200


def test_clustered_with_chunks_and_reduced_matmul_precision(
    count_bulk: str, count_layout: str, matmul_precision: str
) -> None:
    x, y = clustered(seed=3, num_rows=240, dim=32, duplicates=30)
    check_against_reference(
        x, y, None, None, ks=(1, 4), metric="cosine", normalize=None, exclude_self=None, chunk_size=13
    )


@pytest.mark.parametrize(
    ("metric", "with_reference"), list(itertools.product(["cosine", "dot", "euclidean"], [False, True]))
)
def test_inputs_are_not_modified(count_bulk: str, metric: str, with_reference: bool) -> None:
    x, y = clustered(seed=1, num_rows=80, dim=8, duplicates=10)
    x = x * 3.0 + 0.5  # not normalised: an in-place normalisation would show
    query, qlab = x[:50], y[:50]
    reference, rlab = (x, y) if with_reference else (None, None)
    before = [t.clone() for t in (query, qlab)] + ([reference.clone(), rlab.clone()] if with_reference else [])
    result = retrieval_metrics(query, qlab, reference, rlab, metric=metric, per_class=True)
    value = mean_average_precision(query, qlab, reference, rlab, metric=metric)
    after = [query, qlab] + ([reference, rlab] if with_reference else [])
    for old, new in zip(before, after, strict=True):
        assert old.dtype == new.dtype
        assert torch.equal(old, new)
    assert value == result["map"]
    want = reference_metrics(query, qlab, reference, rlab, metric=metric)
    assert math.isclose(value, want["map"], rel_tol=TOL, abs_tol=TOL)


# ------------------------------------------------------------------------------ sharded API (single process)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), num_rows=st.integers(3, 40), dim=st.sampled_from([1, 3, 8]))
def test_sharded_retrieval_metrics_map(count_bulk: str, seed: int, num_rows: int, dim: int) -> None:
    """One process, one shard holding everything: ``"map"`` is the exact full mAP, like ``retrieval_metrics``."""
    x, y = tie_heavy(seed, num_rows, dim, 3, kind="integer")
    want = reference_metrics(x, y, ks=(1, 2), metric="dot")
    if want["num_queries"] == 0:
        return
    got = sharded_retrieval_metrics(x, y, x, y, ks=(1, 2), metric="dot", query_indices=torch.arange(num_rows))
    assert_same(got, want, keys=set(want) - {"per_class"})


def test_sharded_retrieval_metrics_per_class(count_bulk: str) -> None:
    x, y = tie_heavy(11, 40, 8, 3, kind="dyadic")
    reference, rlab = x[10:], y[10:]
    want = reference_metrics(x[:10], y[:10], reference, rlab, ks=(1, 3), metric="cosine")
    assert want["num_queries"] > 0
    got = sharded_retrieval_metrics(x[:10], y[:10], reference, rlab, ks=(1, 3), per_class=True)
    assert_same(got, want)
    plain = sharded_retrieval_metrics(x[:10], y[:10], reference, rlab, ks=(1, 3))
    assert "per_class" not in plain
    assert_same(plain, want, keys=set(want) - {"per_class"})


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["float32", "half"])
def test_cuda_counting_pass_matches_reference(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU: the float32 pass (IEEE, no TF32) and the float16 pass (tensor cores, float16 output), the
    # symmetric tiles (self-retrieval) and the row blocks (chunk_size, separate reference), all exact.
    monkeypatch.setattr(retrieval_module, "COUNT_BULK", mode)
    x, y = clustered(31, 600, 32)
    want = reference_metrics(x, y)
    xc, yc = x.cuda(), y.cuda()
    assert_same(retrieval_metrics(xc, yc, per_class=True), want)
    assert_same(retrieval_metrics(xc, yc, per_class=True, chunk_size=100), want)
    want_sep = reference_metrics(x[:200], y[:200], x, y, exclude_self=True)
    got_sep = retrieval_metrics(xc[:200], yc[:200], xc, yc, exclude_self=True, per_class=True)
    assert_same(got_sep, want_sep)


def test_choose_bulk_takes_float64_when_relevant_scores_are_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two classes of 400 with weak centres: every item has hundreds of relevant scores within the float32 bound
    # of its own, so the sample picks the float64 pass, and stays exact.
    counting = importlib.import_module("dml_bias.metrics._counting")
    engine = importlib.import_module("dml_bias.metrics._exact")
    monkeypatch.setattr(engine, "BF16_CPU", False)  # no 16-bit pass: the choice is float32 or float64
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(800) % 2
    dense = torch.randn(2, 64, generator=g)[labels] * 0.3 + torch.randn(800, 64, generator=g)
    prep = engine.prepare(dense, None, "cosine", None, None)
    assert counting.choose_bulk(prep, labels, labels) == "float64"
    assert_same(retrieval_metrics(dense, labels, per_class=True), reference_metrics(dense, labels))
    # Clustered data with classes of ~10: few items near a relevant key, float32.
    x, y = clustered(3, 2000, 32)
    assert counting.choose_bulk(engine.prepare(x, None, "cosine", None, None), y, y) == "float32"
    # Random labels in classes of 200 (relevant items spread over the whole list): float64, measured 2.9x faster.
    g = torch.Generator().manual_seed(0)
    spread, spread_labels = torch.randn(4000, 128, generator=g), torch.arange(4000) // 200
    assert counting.choose_bulk(engine.prepare(spread, None, "cosine", None, None), spread_labels, spread_labels) == (
        "float64"
    )
