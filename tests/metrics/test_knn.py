"""Tests of dml_bias.metrics.knn against a numpy-loop reference, faiss, and under hostile settings."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_bias.metrics import knn

sys.path.insert(0, os.path.dirname(__file__))
from test_retrieval_reference import clustered, ref_knn

METRICS = ["cosine", "dot", "euclidean", "squared_euclidean"]
ENGINE = sys.modules["dml_bias.metrics._exact"]


@pytest.fixture(params=["bf16", "fp32"])
def bulk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the bf16 candidate pass forced on (emulated where the CPU lacks it) and off."""
    monkeypatch.setattr(ENGINE, "BF16_CPU", request.param == "bf16")
    return str(request.param)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", ["self", "reference", "reference_exclude"])
def test_matches_reference(metric: str, mode: str, bulk: str) -> None:
    x, _ = clustered(50, 6, 4, seed=1)
    r, _ = clustered(37, 6, 4, seed=2)
    if mode == "self":
        args, kw, k = (x, None), {}, 49
    elif mode == "reference":
        args, kw, k = (x, r), {}, 37
    else:
        args, kw, k = (x[:30], x), {"exclude_self": True}, 12
    scores, indices = knn(*args, k=k, metric=metric, chunk_size=7, **kw)
    ref_s, ref_i = ref_knn(*args, k=k, metric=metric, exclude_self=kw.get("exclude_self"))
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=1e-6, atol=1e-6)
    assert scores.dtype == torch.float32
    assert indices.dtype == torch.long


def test_hand_case_and_tie_rule() -> None:
    # Rows 0 and 3 are duplicates, so query 1 sees two equal scores: the lower index comes first.
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    scores, indices = knn(x, k=3)
    assert indices.tolist() == [[3, 1, 2], [0, 3, 2], [1, 0, 3], [0, 1, 2]]
    torch.testing.assert_close(scores[1], torch.tensor([0.8, 0.8, 0.6]))
    # Distances ascend.
    d, i = knn(
        torch.tensor([[0.0]]),
        torch.tensor([[2.0], [-1.0], [1.0], [-2.0]]),
        k=4,
        metric="euclidean",
        normalize_embeddings=False,
    )
    assert i.tolist() == [[1, 2, 0, 3]]
    assert d.tolist() == [[1.0, 1.0, 2.0, 2.0]]


@settings(max_examples=40, deadline=None)
@given(
    bf16=st.booleans(),
    data=st.data(),
    n=st.integers(2, 12),
    m=st.integers(1, 12),
    dim=st.integers(1, 3),
    metric=st.sampled_from(["dot", "cosine", "euclidean", "squared_euclidean"]),
    use_ref=st.booleans(),
)
def test_ties_exact_on_integer_data(
    bf16: bool, data: st.DataObject, n: int, m: int, dim: int, metric: str, use_ref: bool
) -> None:
    # Small integers: every score is exact in float64, so the tie rule is tested bit for bit.
    ints = st.lists(st.integers(-2, 2), min_size=dim, max_size=dim)
    x = torch.tensor(data.draw(st.lists(ints, min_size=n, max_size=n)), dtype=torch.float32)
    r = torch.tensor(data.draw(st.lists(ints, min_size=m, max_size=m)), dtype=torch.float32) if use_ref else None
    size = m if use_ref else n - 1
    k = data.draw(st.integers(1, size))
    old = ENGINE.BF16_CPU
    ENGINE.BF16_CPU = bf16
    try:
        chunk = data.draw(st.integers(1, 5))
        scores, indices = knn(x, r, k=k, metric=metric, normalize_embeddings=False, chunk_size=chunk)
    finally:
        ENGINE.BF16_CPU = old
    ref_s, ref_i = ref_knn(x, r, k, metric=metric, normalize=False)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=1e-6)


def test_near_ties_below_float32_resolution(bulk: str) -> None:
    # Reference rows differ from each other by one float32 ulp: a float32 GEMM cannot order them, the
    # float64 re-scoring must.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 64, generator=g)
    rows = base.repeat(40, 1)
    for j in range(40):
        c = j % 64
        rows[j, c] = torch.nextafter(rows[j, c], torch.tensor(np.inf if j % 2 else -np.inf))
    q = torch.randn(5, 64, generator=g) + base
    for metric in ("dot", "euclidean"):
        _, indices = knn(q, rows, k=40, metric=metric, normalize_embeddings=False)
        _, ref_i = ref_knn(q, rows, 40, metric=metric, normalize=False)
        np.testing.assert_array_equal(indices.numpy(), ref_i)


def test_duplicates_and_constant_vectors(bulk: str) -> None:
    x = torch.ones(6, 5)
    _, indices = knn(x, k=5)
    assert indices.tolist() == [[j for j in range(6) if j != i] for i in range(6)]
    zero = torch.zeros(3, 4)  # cosine of zero vectors is 0, not NaN
    s, i = knn(zero, k=2)
    assert torch.equal(s, torch.zeros(3, 2))
    assert i.tolist() == [[1, 2], [0, 2], [0, 1]]


@pytest.mark.parametrize("chunk", [1, 2, 5, None])
def test_chunk_size_does_not_change_result(chunk: int | None) -> None:
    x, _ = clustered(41, 16, 5, seed=3)
    full = knn(x, k=40)
    got = knn(x, k=40, chunk_size=chunk)
    assert torch.equal(full[0], got[0])
    assert torch.equal(full[1], got[1])


def mkldnn_fp32_precision() -> str | None:
    """The CPU's per-backend float32 matmul setting, or ``None`` on torch releases without it (before 2.9)."""
    return getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)


@pytest.mark.parametrize("precision", ["medium", "high"])
def test_matmul_precision_setting_does_not_change_result(precision: str, bulk: str) -> None:
    x, _ = clustered(300, 64, 10, seed=4)
    expected = knn(x, k=20, metric="dot")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)  # "medium" is bf16 on the CPU, "high" TF32
    try:
        mkldnn_setting = mkldnn_fp32_precision()
        got = knn(x, k=20, metric="dot")
        assert mkldnn_fp32_precision() == mkldnn_setting  # restored
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(expected[1], got[1])
    assert torch.equal(expected[0], got[0])


class LegacyCublasSettings:
    """``torch.backends.cuda.matmul`` as torch releases before 2.9 have it: no ``fp32_precision`` switch."""

    LEGACY = ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")

    def __init__(self, real: object) -> None:
        object.__setattr__(self, "real", real)

    def __getattr__(self, name: str) -> object:
        if name in self.LEGACY:
            return getattr(self.real, name)
        raise AttributeError(f"Unknown attribute {name}")

    def __setattr__(self, name: str, value: object) -> None:
        if name not in self.LEGACY:
            raise AttributeError(f"Unknown attribute {name}")
        setattr(self.real, name, value)


@pytest.mark.parametrize("metric", ["dot", "euclidean"])
def test_works_and_stays_exact_without_per_backend_fp32_precision(
    metric: str, bulk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Older torch: no torch.backends.{cuda,mkldnn}.matmul.fp32_precision. knn must fall back to the global
    # set_float32_matmul_precision switch (pinned to "highest" during the call, the user's value restored).
    x, _ = clustered(300, 64, 10, seed=4)
    r, _ = clustered(200, 64, 10, seed=5)
    expected = knn(x, r, k=20, metric=metric)
    monkeypatch.setattr(torch.backends.cuda, "matmul", LegacyCublasSettings(torch.backends.cuda.matmul))
    monkeypatch.delattr(type(torch.backends.mkldnn), "matmul", raising=False)
    monkeypatch.delattr(type(torch.backends.mkldnn), "fp32_precision", raising=False)
    assert mkldnn_fp32_precision() is None
    set_precision = torch.set_float32_matmul_precision
    calls: list[str] = []

    def spy(value: str) -> None:
        calls.append(value)
        set_precision(value)

    monkeypatch.setattr(torch, "set_float32_matmul_precision", spy)
    set_precision("medium")  # the user's choice: bf16 on capable CPUs
    try:
        got = knn(x, r, k=20, metric=metric)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        set_precision("highest")
    assert calls[0] == "highest"
    assert calls[-1] == "medium"
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[0], expected[0])
    ref_s, ref_i = ref_knn(x, r, k=20, metric=metric)
    np.testing.assert_array_equal(got[1].numpy(), ref_i)
    np.testing.assert_allclose(got[0].double().numpy(), ref_s, rtol=1e-6, atol=1e-6)


def test_inputs_not_modified_and_dtypes() -> None:
    x, _ = clustered(20, 8, 3, seed=5)
    r = x.clone() * 3
    x0, r0 = x.clone(), r.clone()
    knn(x, r, k=19, metric="euclidean", exclude_self=True)
    assert torch.equal(x, x0)
    assert torch.equal(r, r0)
    s64, _ = knn(x.double(), k=3)
    assert s64.dtype == torch.float64
    for half in (torch.float16, torch.bfloat16):
        s, i = knn(x.to(half), k=3)
        _, ref_i = ref_knn(x.to(half), None, 3)
        assert s.dtype == torch.float32
        np.testing.assert_array_equal(i.numpy(), ref_i)


def test_k_equal_to_reference_size_and_no_cap() -> None:
    x, _ = clustered(30, 4, 3, seed=6)
    _, i = knn(x, x, k=30)
    assert sorted(i[0].tolist()) == list(range(30))
    _, i = knn(x, k=29)
    assert all(row not in set(i[row].tolist()) for row in range(30))


def test_faiss_flat_cross_check(bulk: str) -> None:
    faiss = pytest.importorskip("faiss")
    x, _ = clustered(400, 32, 20, seed=7)
    xn = torch.nn.functional.normalize(x, dim=1)
    index = faiss.IndexFlatIP(32)
    index.add(xn.numpy())
    fs, fi = index.search(xn.numpy(), 11)
    s, i = knn(x, k=10)
    # faiss keeps self first (score 1); drop it and compare where the next gap is resolvable in float32.
    fi, fs = fi[:, 1:], fs[:, 1:]
    np.testing.assert_allclose(s.numpy(), fs, atol=1e-5)
    gaps = np.diff(fs, axis=1)
    resolved = np.concatenate([np.abs(gaps) > 1e-5, np.ones((400, 1), bool)], axis=1)
    resolved[:, 1:] &= np.abs(gaps) > 1e-5
    assert (i.numpy()[resolved] == fi[resolved]).mean() == 1.0


def test_bad_inputs() -> None:
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="query must be a 2-D"):
        knn(torch.randn(5), k=1)
    with pytest.raises(TypeError, match="query must be a floating-point"):
        knn(torch.ones(5, 3, dtype=torch.long), k=1)
    with pytest.raises(ValueError, match="reference must have size D=3"):
        knn(x, torch.randn(4, 2), k=1)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 4\]"):
        knn(x, k=5)
    with pytest.raises(ValueError, match="k must be"):
        knn(x, k=0)
    with pytest.raises(TypeError, match="k must be"):
        knn(x, k=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="query must be finite"):
        knn(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), k=1)
    with pytest.raises(ValueError, match="reference must be finite"):
        knn(x, torch.tensor([[0.0, float("inf"), 1.0]]), k=1)
    with pytest.raises(ValueError, match="reference must be on the same device"):
        knn(x, torch.randn(4, 3, device="meta"), k=1)
    with pytest.raises(ValueError, match="metric must be one of"):
        knn(x, k=1, metric="manhattan")
    with pytest.raises(ValueError, match="chunk_size must be"):
        knn(x, k=1, chunk_size=0)
    with pytest.raises(ValueError, match="exclude_self=True"):
        knn(torch.randn(6, 3), x, k=1, exclude_self=True)
    with pytest.raises(ValueError, match="k must be"):
        knn(torch.randn(1, 3), k=1)  # a single row has no neighbour but itself


def test_tiny_memory_budget_gives_the_same_result() -> None:
    # The block size comes from the budget: with a budget of a few bytes every block is a single query row.
    x, _ = clustered(23, 8, 3, seed=8)
    prep = ENGINE.prepare(x, None, "cosine", None, None)
    assert ENGINE.block_rows(23, 16 * 23, None, 64) == 1
    small = ENGINE.knn_prepared(prep, 22, "cosine", None, 64)
    full = knn(x, k=22)
    assert torch.equal(small[0], full[0])
    assert torch.equal(small[1], full[1])


@pytest.mark.parametrize("metric", ["dot", "cosine", "euclidean"])
def test_bulk_error_bound_holds(metric: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The float32 bulk keys (and the bf16 ones) stay within the bound used to pick candidates.
    monkeypatch.setattr(ENGINE, "BF16_CPU", True)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 300, generator=g) * torch.rand(64, 1, generator=g) * 50
    prep = ENGINE.prepare(x, None, metric, False, None)
    exact = prep.query @ prep.reference.T
    if prep.distance:
        exact = -(torch.cdist(prep.query, prep.reference) ** 2)
    bulk = ENGINE.bulk_keys(prep, 0, 64).double()
    if prep.distance:
        bulk -= prep.query_sqnorm[:, None]
    assert bool(((bulk - exact).abs() <= prep.eps[:, None]).all())
    if prep.query16 is not None:
        low = (prep.query16 @ prep.reference16.T).double()
        out = 2.0**-8 / (1 - 2.0**-8) * low.abs()
        assert bool(((low - exact).abs() <= prep.eps16[:, None] + out).all())


def test_faiss_backend_matches_torch_backend() -> None:
    pytest.importorskip("faiss")
    from dml_bias.metrics import knn as knn_fn

    gen = torch.Generator().manual_seed(3)
    q, r = torch.randn(40, 16, generator=gen), torch.randn(300, 16, generator=gen)
    for metric in ("cosine", "euclidean"):
        s_t, i_t = knn_fn(q, r, k=7, metric=metric)
        s_f, i_f = knn_fn(q, r, k=7, metric=metric, backend="faiss")
        assert torch.equal(i_t, i_f)  # random data: no near-ties at float32 resolution
        torch.testing.assert_close(s_f, s_t, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of 'torch', 'faiss', got 'annoy'"):
        knn_fn(q, r, k=1, backend="annoy")
