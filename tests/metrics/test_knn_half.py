"""The 16-bit candidate passes of the exact search (bf16 on the CPU, float16 on CUDA; row blocks and the symmetric
self pass) against float64 loops.

Sizes are chosen so that these passes actually run (a group maximum needs ``M >= 16 k``); spies assert it, so
none of these tests can pass by silently falling back to the float32 pass.
"""

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

from dml_bias.metrics import knn, retrieval_metrics

sys.path.insert(0, os.path.dirname(__file__))
from test_retrieval_reference import clustered, ref_knn, ref_metrics

ENGINE: Any = sys.modules["dml_bias.metrics._exact"]
DETECT = ENGINE.cpu_has_fast_bf16


@pytest.fixture(autouse=True)
def symmetric_pass_always_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """The small dimensions here would fail the CPU cost model of the symmetric pass; the tests need that pass."""
    monkeypatch.setattr(ENGINE, "SYMMETRIC_DIM", (-1.0, 0.0))


class Spy:
    """Counts the calls of a candidate pass that returned candidates (not ``None``)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.used = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        self.used += out is not None
        return out


@pytest.fixture(params=["bf16", "fp32"])
def spies(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, Spy]:
    """Spy on both candidate passes, with bf16 bulk scores (rescored) or float32 ones (used as they are)."""
    monkeypatch.setattr(ENGINE, "BF16_CPU", request.param == "bf16")
    rows, self_pass = Spy(ENGINE.candidates_grouped), Spy(ENGINE.self_candidates_grouped)
    monkeypatch.setattr(ENGINE, "candidates_grouped", rows)
    monkeypatch.setattr(ENGINE, "self_candidates_grouped", self_pass)
    retrieval = sys.modules["dml_bias.metrics._engine"]
    monkeypatch.setattr(retrieval, "self_candidates_grouped", self_pass)
    return {"rows": rows, "self": self_pass}


def with_duplicates(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Copy a few rows onto others, so exact ties between different reference items occur."""
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    src = torch.randint(0, x.shape[0], (x.shape[0] // 6,), generator=g)
    dst = torch.randint(0, x.shape[0], (x.shape[0] // 6,), generator=g)
    x[dst] = x[src]
    return x


@pytest.mark.parametrize("tile", [32, 64, 2048])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_self_pass_matches_float64_loop(
    spies: dict[str, Spy], monkeypatch: pytest.MonkeyPatch, tile: int, k: int
) -> None:
    # 300 items in tiles of 32/64 (last one partial) or one tile; groups of up to 16 plus singletons per panel.
    monkeypatch.setattr(ENGINE, "TILE", tile)
    x, _ = clustered(300, 24, 6, seed=k)
    x = with_duplicates(x, seed=tile)
    scores, indices = knn(x, k=k)
    assert spies["self"].used == 1
    ref_s, ref_i = ref_knn(x, None, k)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=0, atol=2e-7)


@pytest.mark.parametrize("mode", ["reference", "reference_exclude", "chunked_self"])
def test_row_pass_matches_float64_loop(spies: dict[str, Spy], mode: str) -> None:
    x, _ = clustered(90, 20, 5, seed=3)
    r, _ = clustered(611, 20, 5, seed=4)  # 611 = 38 groups of 16 + 3 items (a padded 39th group) at k = 4
    r = with_duplicates(r, seed=1)
    k = 4
    if mode == "reference":
        scores, indices = knn(x, r, k=k, chunk_size=37)
        ref_s, ref_i = ref_knn(x, r, k)
    elif mode == "reference_exclude":
        scores, indices = knn(r[:90], r, k=k, exclude_self=True, chunk_size=50)
        ref_s, ref_i = ref_knn(r[:90], r, k, exclude_self=True)
    else:  # chunk_size given: no symmetric pass (it holds N^2 scores), row blocks instead
        scores, indices = knn(r, k=k, chunk_size=200)
        ref_s, ref_i = ref_knn(r, None, k)
    assert spies["rows"].used > 0
    assert spies["self"].used == 0
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=0, atol=2e-7)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(130, 260),
    dim=st.sampled_from([2, 5, 33]),
    k=st.integers(1, 4),
    tile=st.sampled_from([17, 40, 2048]),
    seed=st.integers(0, 2**16),
    ints=st.booleans(),
)
def test_self_pass_property(n: int, dim: int, k: int, tile: int, seed: int, ints: bool) -> None:
    # Small-integer data: every score is exact and ties abound (the tie rule is checked bit for bit);
    # Gaussian data: near-ties at float32 resolution. Both through the symmetric bf16 pass.
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, dim), generator=g).float() if ints else torch.randn(n, dim, generator=g)
    x[0] = x[1]
    old = (ENGINE.BF16_CPU, ENGINE.TILE)
    spy = Spy(ENGINE.self_candidates_grouped)
    fn = ENGINE.self_candidates_grouped
    ENGINE.BF16_CPU, ENGINE.TILE, ENGINE.self_candidates_grouped = True, tile, spy
    try:
        scores, indices = knn(x, k=k, metric="dot")
    finally:
        ENGINE.BF16_CPU, ENGINE.TILE = old
        ENGINE.self_candidates_grouped = fn
    assert spy.used == 1
    ref_s, ref_i = ref_knn(x, None, k, metric="dot", normalize=False)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=1e-6, atol=1e-6)


def test_retrieval_metrics_through_both_bf16_passes(spies: dict[str, Spy], monkeypatch: pytest.MonkeyPatch) -> None:
    # The label-aware shortcut (near-ties of same-relevance items are not re-scored) must not change a value.
    monkeypatch.setattr(ENGINE, "TILE", 64)
    x, y = clustered(800, 16, 50, seed=5, spread=1.5)  # classes of ~16: 8 K still fits in N
    x = with_duplicates(x, seed=2)
    ks = (1, 2, 4, 8)
    expected, _, _ = ref_metrics(x, y, None, None, ks)
    got = retrieval_metrics(x, y, ks=ks)
    assert spies["self"].used == 1
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"):
        assert math.isclose(got[key], expected[key], rel_tol=1e-12, abs_tol=1e-12), key
    got_rows = retrieval_metrics(x[:150], y[:150], x, y, ks=ks, exclude_self=True)
    assert spies["rows"].used > 0
    exp_rows, _, _ = ref_metrics(x[:150], y[:150], x, y, ks, exclude_self=True)
    for key in ("recall@1", "map@r", "r_precision"):
        assert math.isclose(got_rows[key], exp_rows[key], rel_tol=1e-12, abs_tol=1e-12), key


def test_threshold_keeps_every_exact_top_k_item(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bound behind both passes, checked directly on the bf16 GEMM: with theta the k-th largest bf16 score,
    # every item of the exact top-k has a bf16 score at or above the threshold; and the band is narrow.
    monkeypatch.setattr(ENGINE, "BF16_CPU", True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 512, generator=g) * torch.rand(500, 1, generator=g) * 3
    prep = ENGINE.prepare(x, None, "dot", None, None)
    assert prep.query16 is not None
    assert prep.eps16 is not None
    bulk = (prep.query16 @ prep.reference16.T).double()  # bf16 output, as in the passes
    exact = prep.query @ prep.query.T
    bulk.fill_diagonal_(-math.inf)
    exact.fill_diagonal_(-math.inf)
    for k in (1, 10, 30):
        theta = torch.topk(bulk, k, dim=1).values[:, -1]
        low = ENGINE.group_low(ENGINE.grouped_inputs(prep), slice(0, 500), theta).double()
        top = torch.topk(exact, k, dim=1).indices
        assert bool((bulk.gather(1, top) >= low[:, None]).all())
        assert bool((theta - low <= 4.1 * prep.eps16 + 3 * 2.0**-8 * theta.abs()).all())


def test_budget_too_small_falls_back_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ENGINE, "BF16_CPU", True)
    x, _ = clustered(300, 12, 4, seed=8)
    prep = ENGINE.prepare(x, None, "cosine", None, None)
    assert ENGINE.self_candidates_grouped(prep, 3, budget=300 * 300) is None  # N^2 bf16 scores do not fit
    assert ENGINE.self_candidates_grouped(prep, 3, budget=2**30) is not None
    assert ENGINE.self_candidates_grouped(prep, 40, budget=2**30) is None  # k above N / 16: no group maxima
    small = ENGINE.knn_prepared(prep, 3, "cosine", None, 300 * 300)
    _ref_s, ref_i = ref_knn(x, None, 3)
    np.testing.assert_array_equal(small[1].numpy(), ref_i)


def test_auto_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ENGINE, "BF16_CPU", None)
    for fast in (True, False):
        monkeypatch.setattr(ENGINE, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert ENGINE.half_dtype(torch.device("cpu")) == (torch.bfloat16 if fast else None)
    assert ENGINE.half_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(ENGINE, "FP16_CUDA", False)
    assert ENGINE.half_dtype(torch.device("cuda")) is None
    monkeypatch.setattr(ENGINE, "BF16_CPU", False)
    assert ENGINE.half_dtype(torch.device("cpu")) is None
    monkeypatch.setattr(ENGINE, "FORCE_HALF", torch.float16)
    assert ENGINE.half_dtype(torch.device("cpu")) == torch.float16
    assert isinstance(DETECT(), bool)


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_float16_pass_matches_float64_loop(monkeypatch: pytest.MonkeyPatch, metric: str) -> None:
    # The CUDA pass (float16 inputs and output, u = 2^-11), run on the CPU through the test hook.
    monkeypatch.setattr(ENGINE, "FORCE_HALF", torch.float16)
    monkeypatch.setattr(ENGINE, "TILE", 64)
    spy = Spy(ENGINE.self_candidates_grouped)
    monkeypatch.setattr(ENGINE, "self_candidates_grouped", spy)
    x, _ = clustered(300, 24, 6, seed=11)
    x = with_duplicates(x, seed=3)
    prep = ENGINE.prepare(x, None, metric, None, None)
    assert prep.query16.dtype == torch.float16
    assert prep.half_u == 2.0**-11
    scores, indices = knn(x, k=5, metric=metric)
    assert spy.used == 1
    ref_s, ref_i = ref_knn(x, None, 5, metric=metric)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=1e-6, atol=2e-7)
    r, _ = clustered(500, 24, 6, seed=12)
    _, indices = knn(x[:40], r, k=5, metric=metric)
    np.testing.assert_array_equal(indices.numpy(), ref_knn(x[:40], r, 5, metric=metric)[1])


def test_float16_pass_is_skipped_for_large_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    # Dot scores of long vectors could overflow float16 (65504): the float32 pass runs instead.
    monkeypatch.setattr(ENGINE, "FORCE_HALF", torch.float16)
    x = torch.randn(50, 8) * 100
    assert ENGINE.prepare(x, None, "dot", None, None).query16 is None
    assert ENGINE.prepare(x, None, "cosine", None, None).query16 is not None


@pytest.mark.parametrize("precision", ["medium", "high"])
def test_matmul_precision_cannot_change_the_16bit_passes(spies: dict[str, Spy], precision: str) -> None:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)  # "medium" would run float32 matmuls in bf16 on the CPU
    try:
        x, _ = clustered(300, 24, 6, seed=4)
        _, indices = knn(x, k=3)
        _, rows = knn(x[:30], x, k=3, exclude_self=True)
    finally:
        torch.set_float32_matmul_precision(before)
    assert spies["self"].used == 1
    assert spies["rows"].used == 1
    np.testing.assert_array_equal(indices.numpy(), ref_knn(x, None, 3)[1])
    np.testing.assert_array_equal(rows.numpy(), ref_knn(x[:30], x, 3, exclude_self=True)[1])


@pytest.mark.cuda
def test_cuda_float16_passes_match_float64_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Both 16-bit passes on a GPU (tensor cores, float16 output): the same exact answer as the float64 loop.
    monkeypatch.setattr(ENGINE, "TILE", 64)
    x, y = clustered(600, 32, 40, seed=6)
    x = with_duplicates(x, seed=4)
    xc, yc = x.cuda(), y.cuda()
    assert ENGINE.prepare(xc, None, "cosine", None, None).query16.dtype == torch.float16
    _, indices = knn(xc, k=6)
    np.testing.assert_array_equal(indices.cpu().numpy(), ref_knn(x, None, 6)[1])
    _, rows = knn(xc[:50], xc, k=6, exclude_self=True, chunk_size=16)
    np.testing.assert_array_equal(rows.cpu().numpy(), ref_knn(x[:50], x, 6, exclude_self=True)[1])
    got = retrieval_metrics(xc, yc)
    expected, _, _ = ref_metrics(x, y, None, None, (1, 2, 4, 8))
    for key in ("recall@1", "recall@8", "map@r", "r_precision"):
        assert math.isclose(got[key], expected[key], rel_tol=1e-12, abs_tol=1e-12), key


def test_self_pass_stops_before_any_tile_when_sampled_rows_predict_an_overflow(
    spies: dict[str, Spy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With tiles of 64 rows, the hits of evenly spaced sampled rows, scaled to all rows, decide before any tile
    is computed: a budget between the two sizes makes the self pass give up (the row pass then runs), and the
    result stays exact."""
    monkeypatch.setattr(ENGINE, "TILE", 64)
    x, _ = clustered(300, 24, 6, seed=3)
    k = 3
    grouped = ENGINE.grouped_inputs(ENGINE.prepare(x, None, "cosine", True, None))
    assert grouped is not None
    calls: list[bool] = []
    real = ENGINE._expansion_too_large

    def always_too_large(*args: Any, **kwargs: Any) -> bool:
        calls.append(real(*args, **kwargs))
        return True

    monkeypatch.setattr(ENGINE, "_expansion_too_large", always_too_large)
    tiles: list[int] = []
    real_maxima = ENGINE._sampled_maxima
    monkeypatch.setattr(ENGINE, "_sampled_maxima", lambda *a: tiles.append(1) or real_maxima(*a))
    scores, indices = knn(x, k=k)
    assert calls == [False]  # consulted once, on the sampled rows (the real budget would have allowed it)
    assert tiles == [1]
    assert spies["self"].used == 0
    assert spies["rows"].used > 0
    ref_s, ref_i = ref_knn(x, None, k)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=0, atol=2e-7)
    assert real(10.0, 4, 300, 10 * 4 * 300 * ENGINE._CANDIDATE_BYTES) is False
    assert real(10.0, 4, 300, 10 * 4 * 300 * ENGINE._CANDIDATE_BYTES - 1) is True
    gmax = torch.randn(64, 40)
    assert 3 <= ENGINE._hits_per_row(gmax, grouped, k) <= 40  # at least k hit groups per row


@pytest.mark.parametrize("stream", [False, True])
def test_row_pass_with_coarse_threshold_and_rescoring_by_reference(
    spies: dict[str, Spy], monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    # M = 2,001: groups of 16, 126 of them (125 full, the last one padded); for the threshold at k = 3 unions of
    # 5 groups (25 unions and one lone group), at k = 2 unions of 7 (18 unions), at k = 4 (Recall@4 lists and
    # classes of about 3) unions of 3. Candidates re-scored by reference item (the reference "does not fit the
    # caches") or by query.
    monkeypatch.setattr(ENGINE, "_STREAM_BYTES", 0 if stream else 2**62)
    assert ENGINE.row_grouping(2001, 3) == (16, 126, 5)
    assert ENGINE.row_grouping(2001, 2) == (16, 126, 7)
    assert ENGINE.row_grouping(2001, 4) == (16, 126, 3)
    x, _ = clustered(120, 40, 6, seed=7)
    r, _ = clustered(2001, 40, 6, seed=8)
    r = with_duplicates(r, seed=3)
    for k in (2, 3):
        scores, indices = knn(x, r, k=k)
        ref_s, ref_i = ref_knn(x, r, k)
        np.testing.assert_array_equal(indices.numpy(), ref_i)
        np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=0, atol=2e-7)
    assert spies["rows"].used > 0
    g = torch.Generator().manual_seed(4)
    yr = torch.randint(0, 667, (2001,), generator=g)
    got = retrieval_metrics(r[:150], yr[:150], r, yr, ks=(1, 2, 4), exclude_self=True)
    expected, _, _ = ref_metrics(r[:150], yr[:150], r, yr, (1, 2, 4), exclude_self=True)
    for key in ("recall@1", "recall@2", "recall@4", "map@r", "r_precision"):
        assert math.isclose(got[key], expected[key], rel_tol=1e-12, abs_tol=1e-12), key


@settings(max_examples=200, deadline=None)
@given(m=st.integers(2, 10**7), k=st.integers(1, 5000))
def test_row_grouping_pads_less_than_one_group_and_keeps_8k_unions(m: int, k: int) -> None:
    # The reference is padded to `ngroup * group` items for the GEMM: at most one group more than M (a rounding of
    # the unions up to whole groups once cost 12 % more GEMM at k = 1); the threshold's selection keeps >= 8 k
    # values whenever it merges groups.
    group, ngroup, coarse = ENGINE.row_grouping(m, k)
    assert 1 <= group <= 16
    assert 0 <= ngroup * group - m < group
    assert coarse >= 1
    if coarse > 1:
        assert ngroup // coarse + ngroup % coarse >= 8 * k


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=50),
    half=st.sampled_from(["bfloat16", "float16"]),
)
def test_thresholds_round_down_to_the_bulk_dtype(values: list[float], half: str) -> None:
    # A candidate threshold compared in the bulk dtype must never exceed the float32 one (no candidate lost), and
    # must be the largest such value (no looser than needed).
    dtype = getattr(torch, half)
    low = torch.tensor(values, dtype=torch.float32)  # scores: far inside either format's range
    low = low.clamp(-60000.0, 60000.0) if dtype == torch.float16 else low.clamp(-1e30, 1e30)
    got = ENGINE._round_down_to(low, dtype)
    assert got.dtype == dtype
    back = got.to(torch.float32)
    assert bool((back <= low).all())
    above = torch.nextafter(got, torch.full_like(got, float("inf"))).to(torch.float32)
    assert bool((above > low).all())
    assert ENGINE._round_down_to(low, torch.float32) is low


def test_thresholds_stay_float32_without_a_16_bit_nextafter(monkeypatch: pytest.MonkeyPatch) -> None:
    # Older torch builds lack nextafter for 16-bit dtypes on some devices: the thresholds then stay float32 (the
    # comparison promotes; every candidate is kept), and the search is still exact.
    def no_half(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dtype in (torch.bfloat16, torch.float16):
            raise RuntimeError('"nextafter_cpu" not implemented for this dtype')
        return real(a, b)

    real = torch.nextafter
    monkeypatch.setattr(torch, "nextafter", no_half)
    low = torch.tensor([0.3, -0.3])
    assert ENGINE._round_down_to(low, torch.bfloat16) is low
    monkeypatch.setattr(ENGINE, "BF16_CPU", True)
    x, _ = clustered(120, 40, 6, seed=9)
    r, _ = clustered(700, 40, 6, seed=10)
    scores, indices = knn(x, r, k=3)
    ref_s, ref_i = ref_knn(x, r, 3)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=0, atol=2e-7)


class HitsSpy:
    """Counts the row blocks whose hits came from the bit patterns (``used``) or from the floats (``fallback``)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.used = self.fallback = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        self.used += out is not None
        self.fallback += out is None
        return out


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("sign", ["positive", "negative", "mixed"])
def test_row_pass_on_bit_patterns_and_on_floats(monkeypatch: pytest.MonkeyPatch, bf16: bool, sign: str) -> None:
    # Positive thresholds: maxima, selection and comparisons on the scores' bit patterns (int16 / int32). With the
    # dot product against a negated reference every score is negative (and with a mixed reference some rows'
    # thresholds are): the floats themselves are compared. Both give the float64 loop's lists, ties included.
    monkeypatch.setattr(ENGINE, "BF16_CPU", bf16)
    spy = HitsSpy(ENGINE._positive_hits)
    monkeypatch.setattr(ENGINE, "_positive_hits", spy)
    x, _ = clustered(60, 12, 4, seed=5)
    r, _ = clustered(700, 12, 4, seed=6)
    r = with_duplicates(r, seed=2)
    u = torch.zeros(12)
    u[0] = 5.0
    x, r = x + u, r + u  # scores near +25
    if sign == "negative":
        x = -x  # every score near -25: thresholds below zero
    elif sign == "mixed":
        x = torch.cat([x[:30], -x[30:]])  # one block; half of its rows have negative thresholds
    k = 5
    scores, indices = knn(x, r, k=k, metric="dot", chunk_size=60)
    ref_s, ref_i = ref_knn(x, r, k, metric="dot")
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=0, atol=1e-5)
    if sign == "positive":
        assert (spy.used, spy.fallback) == (1, 0)
    else:
        assert (spy.used, spy.fallback) == (0, 1)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=40),
    low=st.floats(2.0**-100, 1e4, allow_nan=False, width=32),
    half=st.sampled_from(["bf16", "fp16", "fp32"]),
)
def test_bit_patterns_compare_like_floats_above_a_positive_threshold(
    values: list[float], low: float, half: str
) -> None:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[half]
    x = torch.tensor([*values, -0.0, 0.0, -math.inf, math.inf]).to(dtype)
    t = torch.tensor([low]).to(dtype)
    if not bool(t > 0):
        return  # rounded to zero in this dtype: the pass falls back to the floats
    itype = ENGINE._SAME_WIDTH_INT[x.element_size()]
    assert torch.equal(x.view(itype) >= t.view(itype), x >= t)
    positive = x[x >= 0]
    if positive.numel() > 0:  # the integer maximum of a set with a non-negative member is the float maximum's
        assert x.view(itype).amax().view(dtype) == positive.max()


def test_rows_drop_only_candidates_that_cannot_matter() -> None:
    # k = 4 keeps 12 of 20 candidates per row when the 12th lies more than 2 eps below the 4th best; a row whose
    # candidates are all within 2 eps of each other (one long near-tie chain) keeps all of them.
    prep = ENGINE.prepare(torch.randn(2, 8), torch.randn(30, 8), "cosine", False, None)
    eps = float(prep.eps.max())
    spread = torch.linspace(1.0, 0.0, 20)[None, :].repeat(2, 1)  # gaps of 1/19, far above 2 eps
    cols = torch.arange(20)[None, :].repeat(2, 1).flip(1)
    count = torch.tensor([20, 20])
    vals, out, kept = ENGINE._best_first(prep, 0, 4, spread, cols, count)
    assert vals.shape == (2, 12)
    assert kept.tolist() == [12, 12]
    np.testing.assert_array_equal(out.numpy(), cols[:, :12].numpy())
    chain = 0.5 + torch.arange(20, 0, -1, dtype=torch.float32)[None, :].repeat(2, 1) * (eps / 4)
    chain[0] = spread[0]  # row 0 could drop its tail, row 1 cannot: nothing is dropped
    vals, out, kept = ENGINE._best_first(prep, 0, 4, chain, cols, count)
    assert vals.shape == (2, 20)
    assert kept.tolist() == [20, 20]
    np.testing.assert_array_equal(vals.numpy(), chain.numpy())


@pytest.mark.parametrize("model", ["default", "pays"])
def test_symmetric_pass_follows_its_cost_model(
    spies: dict[str, Spy], monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    # D = 24 with a few hits per row: the fitted CPU model (D > 100 + h) prefers the row pass; a model that
    # always pays keeps the symmetric pass. Both exact.
    monkeypatch.setattr(ENGINE, "TILE", 64)
    if model == "default":
        monkeypatch.setattr(ENGINE, "SYMMETRIC_DIM", (100.0, 1.0))
    x, _ = clustered(300, 24, 6, seed=4)
    scores, indices = knn(x, k=3)
    assert spies["self"].used == (model == "pays")
    assert spies["rows"].used == (model == "default")
    ref_s, ref_i = ref_knn(x, None, 3)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=0, atol=2e-7)
    assert ENGINE._symmetric_pays(10.0, 100, torch.device("cpu")) is (model == "pays")  # 100 < 100 + 10
    assert ENGINE._symmetric_pays(300.0, 256, torch.device("meta")) is True  # other devices: the budget alone


def test_symmetric_pass_falls_back_to_float_maxima(spies: dict[str, Spy], monkeypatch: pytest.MonkeyPatch) -> None:
    # A threshold that is not positive on the bit patterns sends the symmetric pass back to the float maxima
    # (a lower threshold than the true one is still a valid one: only more candidates).
    real = ENGINE._kth_union_max
    dtypes: list[torch.dtype] = []

    def lowered(gmax: torch.Tensor, k: int) -> torch.Tensor:
        dtypes.append(gmax.dtype)
        out = real(gmax, k)
        if not gmax.is_floating_point():
            out[0] = -1
        return out

    monkeypatch.setattr(ENGINE, "_kth_union_max", lowered)
    monkeypatch.setattr(ENGINE, "TILE", 64)
    x, _ = clustered(300, 24, 6, seed=5)
    x = with_duplicates(x, seed=3)
    scores, indices = knn(x, k=3)
    assert spies["self"].used == 1
    assert any(not d.is_floating_point for d in dtypes)
    assert dtypes[-1].is_floating_point
    ref_s, ref_i = ref_knn(x, None, 3)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=0, atol=2e-7)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=50))
def test_ordered_bits_order_like_the_floats(values: list[float]) -> None:
    x = torch.tensor([*values, -0.0, 0.0, -math.inf, math.inf], dtype=torch.float32)
    keys = ENGINE._ordered_bits(x)
    a, b = x[:, None], x[None, :]
    ka, kb = keys[:, None], keys[None, :]
    differ = a != b  # different floats: the keys order them the same way
    assert torch.equal((ka < kb)[differ], (a < b)[differ])
    same_bits = x.view(torch.int32)[:, None] == x.view(torch.int32)[None, :]
    assert torch.equal((ka == kb), same_bits)  # equal keys only for equal bit patterns (-0 and +0 differ)
