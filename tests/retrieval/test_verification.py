"""Tests of the batched RANSAC spatial verification and DELG's re-ranking."""

from __future__ import annotations

import itertools
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

import dml_bias.retrieval.reranking as reranking_module
import dml_bias.retrieval.verification as verification_module
from dml_bias._compat import reduced_precision_fp32_matmul
from dml_bias.metrics import revisited_map
from dml_bias.retrieval import rerank, spatial_verification

AFFINE = np.array([[0.9, 0.2], [-0.15, 1.1]])
SHIFT = np.array([30.0, -20.0])


def one_hot(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Descriptors that match only themselves: distance 0 to the same row, sqrt(2) > 1 to any other."""
    return torch.eye(n, dtype=dtype)


def affine_case(
    rng: np.random.Generator, num_inliers: int, num_outliers: int, noise: float = 0.0, far: float = 100.0
) -> tuple[np.ndarray, np.ndarray]:
    """Index locations ``src`` and query locations ``dst``: inliers follow AFFINE/SHIFT (plus noise), outliers are
    at least ``far`` px from where the model puts them."""
    n = num_inliers + num_outliers
    src = rng.uniform(0, 500, (n, 2))
    dst = src @ AFFINE.T + SHIFT + rng.normal(0, noise, (n, 2)) * (noise > 0)
    angle = rng.uniform(0, 2 * np.pi, num_outliers)
    radius = rng.uniform(far, 3 * far, num_outliers)
    dst[num_inliers:] += np.stack([np.cos(angle), np.sin(angle)], 1) * radius[:, None]
    return src, dst


def verify_one(src: np.ndarray, dst: np.ndarray, **kw: object) -> int:
    """Our count for one candidate whose putative matches are exactly (src[i], dst[i])."""
    d = one_hot(len(src))
    return int(spatial_verification(torch.tensor(dst), d, [torch.tensor(src)], [d], **kw)[0])


def skimage_count(src: np.ndarray, dst: np.ndarray, max_trials: int, seed: int, threshold: float = 20.0) -> int:
    """What DELG computes: scikit-image's ransac inlier count (0 for at most 3 matches or no model)."""
    measure = pytest.importorskip("skimage.measure")
    transform = pytest.importorskip("skimage.transform")
    if len(src) <= 3:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, inliers = measure.ransac(
            (src, dst),
            transform.AffineTransform,
            min_samples=3,
            residual_threshold=threshold,
            max_trials=max_trials,
            rng=seed,
        )
    return 0 if inliers is None else int(inliers.sum())


# ---------------------------------------------------------------------------------------------- known answers


@pytest.mark.parametrize(("num_inliers", "num_outliers"), [(30, 0), (30, 30), (20, 40), (8, 2)])
def test_known_affine_gives_the_true_inliers(num_inliers: int, num_outliers: int) -> None:
    """Exact correspondences: every clean sample gives exactly the inliers (outliers are >= 100 px off).

    A clean sample has probability C(20, 3) / C(60, 3) = 0.033 in the worst case here, so 1000 trials miss one
    with probability (1 - 0.033)^1000 < 1e-14.
    """
    rng = np.random.default_rng(num_inliers + num_outliers)
    src, dst = affine_case(rng, num_inliers, num_outliers)
    assert verify_one(src, dst, max_trials=1000) == num_inliers


def fraction_max_inliers(src: list, dst: list, threshold: Fraction) -> int:
    """Exact-rational enumeration of every 3-point sample (the slow reference with no rounding at all)."""
    best = 0
    for i, j, k in itertools.combinations(range(len(src)), 3):
        (x0, y0), (x1, y1), (x2, y2) = src[i], src[j], src[k]
        e1, e2 = (x1 - x0, y1 - y0), (x2 - x0, y2 - y0)
        det = e1[0] * e2[1] - e1[1] * e2[0]
        if det == 0 or dst[i] == dst[j] == dst[k]:
            continue
        f1 = (dst[j][0] - dst[i][0], dst[j][1] - dst[i][1])
        f2 = (dst[k][0] - dst[i][0], dst[k][1] - dst[i][1])
        a = [[(f1[r] * e2[1] - f2[r] * e1[1]) / det, (f2[r] * e1[0] - f1[r] * e2[0]) / det] for r in range(2)]
        t = [dst[i][r] - a[r][0] * x0 - a[r][1] * y0 for r in range(2)]
        count = 0
        for (x, y), (u, v) in zip(src, dst, strict=True):
            rx, ry = a[0][0] * x + a[0][1] * y + t[0] - u, a[1][0] * x + a[1][1] * y + t[1] - v
            count += rx * rx + ry * ry < threshold * threshold
        best = max(best, count)
    return best


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_residual_threshold_is_strict(dtype: torch.dtype) -> None:
    """One match has a residual of exactly 20 px under the true model: out at 20 (strict <), in at 20.25.

    8 matches with integer coordinates: the per-candidate means are multiples of 1/8 and every intermediate value
    of the true model's residuals is exact in float32 too.
    """
    src = [(-50, -50), (50, -50), (-50, 50), (50, 50), (0, 0), (10, 30), (-400, 300), (390, -330)]
    shift = (10, 0)
    dst = [(x + shift[0], y + shift[1]) for x, y in src[:4]]
    dst += [(src[4][0] + shift[0] + 20, src[4][1]), (src[5][0] + shift[0], src[5][1] + 19)]  # residuals 20 and 19
    dst += [(src[6][0] + 200, src[6][1]), (src[7][0], src[7][1] - 200)]
    src_f = [(Fraction(x), Fraction(y)) for x, y in src]
    dst_f = [(Fraction(x), Fraction(y)) for x, y in dst]
    strict = fraction_max_inliers(src_f, dst_f, Fraction(20))
    wider = fraction_max_inliers(src_f, dst_f, Fraction(81, 4))
    assert (strict, wider) == (5, 6)  # the 4 corners + the 19 px match; the 20 px one joins at 20.25
    d = one_hot(8, dtype)
    args = (torch.tensor(dst, dtype=dtype), d, [torch.tensor(src, dtype=dtype)], [d])
    # C(8, 3) = 56 samples; 3000 trials miss a given one with probability (55/56)^3000 < 1e-23.
    assert int(spatial_verification(*args, residual_threshold=20.0, max_trials=3000)[0]) == strict
    assert int(spatial_verification(*args, residual_threshold=20.25, max_trials=3000)[0]) == wider


def test_at_most_three_matches_give_zero() -> None:
    rng = np.random.default_rng(0)
    src, dst = affine_case(rng, 4, 0)
    assert verify_one(src, dst) == 4  # 4 matches: verified
    assert verify_one(src[:3], dst[:3]) == 0  # 3 matches: 0 by DELG's rule, although they fit exactly
    assert verify_one(src[:1], dst[:1]) == 0


def test_descriptor_threshold_is_strict() -> None:
    """Each query feature's true partner is at descriptor distance exactly 0.5 (exact in float32)."""
    n = 6
    rng = np.random.default_rng(1)
    src, dst = affine_case(rng, n, 0)
    query_desc = 3.0 * torch.eye(n, 2 * n)
    index_desc = query_desc + 0.5 * torch.eye(n, 2 * n).roll(n, dims=1)
    args = (torch.tensor(dst), query_desc, [torch.tensor(src)], [index_desc])
    assert int(spatial_verification(*args, descriptor_threshold=0.5)[0]) == 0
    assert int(spatial_verification(*args, descriptor_threshold=0.5 + 1e-6)[0]) == n
    assert int(spatial_verification(*args, descriptor_threshold=0.0)[0]) == 0


def test_ratio_test_hand_case() -> None:
    """True partner at distance 0.5, a distractor (far away in the image) at exactly 1.0: ratio 0.5."""
    n = 6
    rng = np.random.default_rng(2)
    src, dst = affine_case(rng, n, 0)
    base = 3.0 * torch.eye(n, 3 * n)
    partner = base + 0.5 * torch.eye(n, 3 * n).roll(n, dims=1)
    distractor = base + 1.0 * torch.eye(n, 3 * n).roll(2 * n, dims=1)
    index_desc = torch.cat([partner, distractor])
    index_loc = torch.cat([torch.tensor(src), torch.tensor(src) + 1000.0])
    args = (torch.tensor(dst), base, [index_loc], [index_desc])
    assert int(spatial_verification(*args, descriptor_threshold=2.0, ratio_test=0.5)[0]) == 0  # 0.5 < 0.5: no
    assert int(spatial_verification(*args, descriptor_threshold=2.0, ratio_test=0.55)[0]) == n
    # The distance test still applies on top of the ratio test: 0.4 keeps no partner (at 0.5).
    assert int(spatial_verification(*args, descriptor_threshold=0.4, ratio_test=0.55)[0]) == 0
    # DELG's ratio-only mode: no distance test.
    assert int(spatial_verification(*args, descriptor_threshold=math.inf, ratio_test=0.55)[0]) == n
    # Without the ratio test every query feature takes its partner (the nearest).
    assert int(spatial_verification(*args, descriptor_threshold=2.0)[0]) == n


def test_ratio_test_with_a_single_index_descriptor_passes() -> None:
    """d2 = inf when the candidate has one descriptor (as cKDTree's k=2 query), so d1 < r * d2 holds."""
    query = torch.tensor([[0.0, 0.0], [0.0, 0.6]])
    index = torch.tensor([[[0.5, 0.0]]])
    nearest, accepted = verification_module._putative_matches(query, index, torch.tensor([1]), 1.0, 0.1)
    assert nearest.tolist() == [[0, 0]]
    assert accepted.tolist() == [[True, True]]
    _, accepted = verification_module._putative_matches(query, index, torch.tensor([1]), 0.7, 0.1)
    assert accepted.tolist() == [[True, False]]  # |(0.5, -0.6)| = 0.78 > 0.7


# ---------------------------------------------------------------------------------------------- references


def test_agrees_with_skimage_ransac() -> None:
    """50 seeded cases (4 to 120 matches, 0-50 % outliers, 3 px noise, 100 trials): counts agree with scikit-image.

    A clean sample has probability >= 0.5^3 per trial, so 100 trials miss one with probability < 2e-6 per case.

    Both draw their own samples, so single counts differ only by RANSAC's randomness with noisy inliers:
    we allow max(2, 10 %) per case and require most cases to agree exactly.
    """
    pytest.importorskip("skimage")
    rng = np.random.default_rng(123)
    diffs = []
    for case in range(50):
        n = int(rng.integers(4, 120))
        num_outliers = round(n * rng.uniform(0.0, 0.5))
        src, dst = affine_case(rng, n - num_outliers, num_outliers, noise=3.0, far=rng.uniform(0.0, 100.0))
        ours = verify_one(src, dst, max_trials=100, seed=case)
        theirs = skimage_count(src, dst, max_trials=100, seed=case)
        assert abs(ours - theirs) <= max(2, 0.1 * theirs), (case, ours, theirs)
        diffs.append(abs(ours - theirs))
    assert np.mean(np.array(diffs) == 0) >= 0.7
    assert np.mean(diffs) <= 0.5


def test_collinear_and_duplicate_points_match_skimage() -> None:
    pytest.importorskip("skimage")
    n = 12
    rng = np.random.default_rng(4)
    line = np.stack([np.arange(n) * 10.0, np.arange(n) * 20.0 + 5], 1)
    # All index locations collinear: every sample is degenerate, no model: 0 (scikit-image: no inliers).
    dst = rng.uniform(0, 300, (n, 2))
    assert verify_one(line, dst) == 0 == skimage_count(line, dst, 200, 0)
    # Intended difference: when the query locations are an exact affine image of the collinear index locations,
    # scikit-image's SVD solve returns one arbitrary map of the family that fits (here counting all 12 matches);
    # we skip every collinear sample, as the contract says.
    assert verify_one(line, line @ AFFINE.T + SHIFT) == 0
    # All index locations identical: 0.
    same = np.full((n, 2), 7.0)
    assert verify_one(same, dst) == 0 == skimage_count(same, dst, 200, 0)
    # Collinear *query* locations are fine (a singular linear part is a valid affine map).
    src = rng.uniform(0, 300, (n, 2))
    flat = np.stack([src[:, 0] + src[:, 1], 2 * (src[:, 0] + src[:, 1])], 1)
    assert verify_one(src, flat) == n == skimage_count(src, flat, 200, 0)
    # Every correspondence repeated: samples with a repeated point are skipped, the count includes repeats.
    src5, dst5 = affine_case(rng, 5, 0)
    twice_src, twice_dst = np.repeat(src5, 2, axis=0), np.repeat(dst5, 2, axis=0)
    assert verify_one(twice_src, twice_dst) == 10 == skimage_count(twice_src, twice_dst, 200, 0)


def reference_matches(
    query: np.ndarray, index: np.ndarray, threshold: float, ratio: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force float64 nearest neighbours, as cKDTree's (strict bound; d2 = inf for one descriptor)."""
    if index.shape[0] == 0:
        return np.zeros(len(query), dtype=np.int64), np.zeros(len(query), dtype=bool)
    dist = np.sqrt(((query[:, None, :] - index[None, :, :]) ** 2).sum(-1))
    order = np.argsort(dist, axis=1, kind="stable")
    d1 = dist[np.arange(len(query)), order[:, 0]]
    keep = d1 < threshold
    if ratio is not None:
        d2 = dist[np.arange(len(query)), order[:, 1]] if index.shape[0] > 1 else np.full(len(query), np.inf)
        keep &= d1 < ratio * d2
    return order[:, 0], keep


def reference_counts(
    query_loc: np.ndarray,
    query_desc: np.ndarray,
    index_loc: list[np.ndarray],
    index_desc: list[np.ndarray],
    max_trials: int,
    seed: int,
    threshold: float,
    ratio: float | None,
    residual_threshold: float,
) -> list[int]:
    """Loop over candidates and trials with the sample indices the implementation draws (same hook)."""
    matches = [reference_matches(query_desc, d, threshold, ratio) for d in index_desc]
    num_matches = torch.tensor([int(keep.sum()) for _, keep in matches])
    picks = verification_module._sample_indices(num_matches, max_trials, seed).numpy()
    counts = []
    for b, (nearest, keep) in enumerate(matches):
        dst = query_loc[keep]
        src = index_loc[b][nearest[keep]]
        if len(src) <= 3:
            counts.append(0)
            continue
        best = 0
        for trial in range(max_trials):
            i, j, k = picks[b, trial]
            assert len({i, j, k}) == 3
            assert max(i, j, k) < len(src)
            system = np.zeros((6, 6))
            rhs = np.zeros(6)
            for row, p in enumerate((i, j, k)):
                system[2 * row, :3] = [src[p, 0], src[p, 1], 1.0]
                system[2 * row + 1, 3:] = [src[p, 0], src[p, 1], 1.0]
                rhs[2 * row : 2 * row + 2] = dst[p]
            try:
                params = np.linalg.solve(system, rhs)
            except np.linalg.LinAlgError:
                continue
            model = params.reshape(2, 3)
            residual = np.linalg.norm(src @ model[:, :2].T + model[:, 2] - dst, axis=1)
            best = max(best, int((residual < residual_threshold).sum()))
        counts.append(best)
    return counts


@pytest.mark.parametrize("ratio", [None, 0.9])
def test_matches_slow_reference_with_the_same_samples(ratio: float | None) -> None:
    """End to end against a per-candidate, per-trial numpy loop given the same drawn sample indices (float64)."""
    rng = np.random.default_rng(7)
    dim, num_query = 16, 60
    query_desc = rng.normal(size=(num_query, dim))
    query_desc /= np.linalg.norm(query_desc, axis=1, keepdims=True)
    query_loc = rng.uniform(0, 400, (num_query, 2))
    index_loc, index_desc = [], []
    for b in range(7):
        n = int(rng.integers(1, 80)) if b != 3 else 0
        desc = rng.normal(size=(n, dim))
        loc = rng.uniform(0, 400, (n, 2))
        shared = min(n, int(rng.integers(0, num_query)))
        pick = rng.permutation(num_query)[:shared]
        desc[:shared] = query_desc[pick] + rng.normal(0, 0.15, (shared, dim))
        if b % 2 == 0:  # a true view: shared features moved by an affine map (index -> query is its inverse)
            loc[:shared] = (query_loc[pick] - SHIFT) @ np.linalg.inv(AFFINE).T + rng.normal(0, 4, (shared, 2))
        desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
        index_loc.append(loc)
        index_desc.append(desc)
    kw = {"max_trials": 200, "seed": 5, "descriptor_threshold": 0.8, "ratio_test": ratio, "residual_threshold": 15.0}
    ours = spatial_verification(
        torch.tensor(query_loc),
        torch.tensor(query_desc),
        [torch.tensor(x) for x in index_loc],
        [torch.tensor(x) for x in index_desc],
        **kw,
    )
    expected = reference_counts(
        query_loc, query_desc, index_loc, index_desc, 200, 5, 0.8, ratio, residual_threshold=15.0
    )
    assert ours.tolist() == expected
    assert max(expected) > 10  # the case really has verified candidates
    assert expected[3] == 0  # and an empty one


def test_sample_indices_are_distinct_and_uniform() -> None:
    """All 4 * 3 * 2 = 24 ordered triples of 4 matches appear about equally often; none repeats an index."""
    picks = verification_module._sample_indices(torch.tensor([4, 10, 0, 3]), 24_000, 0)
    assert picks.shape == (4, 24_000, 3)
    four = picks[0]
    assert bool((four[:, 0] != four[:, 1]).all() & (four[:, 1] != four[:, 2]).all() & (four[:, 0] != four[:, 2]).all())
    assert int(four.max()) == 3
    assert int(picks[1].max()) == 9
    codes = (four[:, 0] * 16 + four[:, 1] * 4 + four[:, 2]).tolist()
    freq = np.array([codes.count(c) for c in sorted(set(codes))])
    assert len(freq) == 24
    chi2 = float(((freq - 1000) ** 2 / 1000).sum())
    assert chi2 < 60  # 23 degrees of freedom: P(chi2 > 60) < 1e-4


# ---------------------------------------------------------------------------------------------- layout, seeds


def random_batch(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple:
    g = torch.Generator().manual_seed(seed)
    num_query, dim = 80, 32
    query_desc = torch.nn.functional.normalize(torch.randn(num_query, dim, generator=g), dim=1).to(dtype)
    query_loc = (torch.rand(num_query, 2, generator=g) * 500).to(dtype)
    locs, descs = [], []
    for b in range(9):
        n = [50, 0, 1, 120, 7, 60, 90, 3, 40][b]
        desc = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
        shared = min(n, 45)
        pick = torch.randperm(num_query, generator=g)[:shared]
        noise = 0.1 * torch.randn(shared, dim, generator=g)
        desc[:shared] = torch.nn.functional.normalize(query_desc[pick].float() + noise, dim=1)
        loc = torch.rand(n, 2, generator=g) * 500
        if b % 3 == 0:
            loc[:shared] = query_loc[pick].float() * 0.8 + 25 + 2 * torch.randn(shared, 2, generator=g)
        locs.append(loc.to(dtype))
        descs.append(desc.to(dtype))
    return query_loc, query_desc, locs, descs


def test_padded_input_equals_list_input_and_ignores_padding() -> None:
    query_loc, query_desc, locs, descs = random_batch()
    expected = spatial_verification(query_loc, query_desc, locs, descs)
    assert int(expected.max()) > 10
    assert expected.dtype == torch.int64
    assert expected.shape == (9,)
    width = max(x.shape[0] for x in locs) + 5
    padded_loc = torch.full((9, width, 2), math.nan)
    padded_desc = torch.full((9, width, query_desc.shape[1]), math.nan)
    for b, (loc, desc) in enumerate(zip(locs, descs, strict=True)):
        padded_loc[b, : loc.shape[0]] = loc
        padded_desc[b, : desc.shape[0]] = desc
    lengths = torch.tensor([x.shape[0] for x in locs])
    before = padded_desc.clone()
    got = spatial_verification(query_loc, query_desc, padded_loc, padded_desc, index_lengths=lengths)
    assert got.tolist() == expected.tolist()
    assert torch.equal(padded_desc.nan_to_num(), before.nan_to_num())  # the padding is ignored, not overwritten
    # Without index_lengths every row counts (here: no padding).
    full = spatial_verification(query_loc, query_desc, torch.stack(locs[:1]), torch.stack(descs[:1]))
    assert full.tolist() == expected[:1].tolist()


def test_same_seed_same_result_and_chunking_does_not_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    query_loc, query_desc, locs, descs = random_batch(1)
    first = spatial_verification(query_loc, query_desc, locs, descs, max_trials=300, seed=3)
    assert spatial_verification(query_loc, query_desc, locs, descs, max_trials=300, seed=3).tolist() == first.tolist()
    for chunk in (37, 300, 1000):
        got = spatial_verification(query_loc, query_desc, locs, descs, max_trials=300, seed=3, trials_per_chunk=chunk)
        assert got.tolist() == first.tolist()
    monkeypatch.setattr(verification_module, "_RANSAC_BLOCK_ELEMENTS", 20_000)
    monkeypatch.setattr(verification_module, "_MATCH_BLOCK_ELEMENTS", 500)
    monkeypatch.setattr(verification_module, "_RECHECK_BLOCK_ELEMENTS", 100)
    assert spatial_verification(query_loc, query_desc, locs, descs, max_trials=300, seed=3).tolist() == first.tolist()
    # Each candidate's result depends on its own inputs and position only, not on the others' features.
    alone = spatial_verification(query_loc, query_desc, locs[:1], descs[:1], max_trials=300, seed=3)
    assert alone.tolist() == first[:1].tolist()


def test_float32_and_float64_inputs_agree_and_inputs_are_not_modified() -> None:
    q32 = random_batch(2, torch.float32)
    q64 = random_batch(2, torch.float64)
    copies = [t.clone() for t in (q32[0], q32[1], *q32[2], *q32[3])]
    a = spatial_verification(*q32)
    b = spatial_verification(*q64)
    assert a.tolist() == b.tolist()
    for before, after in zip(copies, (q32[0], q32[1], *q32[2], *q32[3]), strict=True):
        assert torch.equal(before, after)
    half = spatial_verification(q32[0], q32[1].half(), q32[2], [d.half() for d in q32[3]])
    assert half.dtype == torch.int64
    assert int(half.max()) > 10


def test_empty_inputs_give_zero() -> None:
    d = torch.zeros(0, 4)
    loc = torch.zeros(0, 2)
    one_loc, one_desc = torch.rand(5, 2), torch.rand(5, 4)
    assert spatial_verification(loc, d, [one_loc], [one_desc]).tolist() == [0]  # empty query
    assert spatial_verification(one_loc, one_desc, [loc], [d]).tolist() == [0]  # empty candidate
    assert spatial_verification(one_loc, one_desc, [], []).shape == (0,)  # no candidates
    padded = spatial_verification(
        one_loc, one_desc, torch.zeros(2, 0, 2), torch.zeros(2, 0, 4), index_lengths=torch.zeros(2, dtype=torch.long)
    )
    assert padded.tolist() == [0, 0]
    assert spatial_verification(one_loc, one_desc, [one_loc], [one_desc], residual_threshold=0.0).tolist() == [0]


# ---------------------------------------------------------------------------------------------- validation


def test_bad_input_raises_naming_the_argument() -> None:
    loc, desc = torch.rand(5, 2), torch.rand(5, 4)
    ok = ([loc], [desc])
    cases: list[tuple[tuple, dict, type[Exception], str]] = [
        ((loc.numpy(), desc, *ok), {}, TypeError, "query_locations"),
        ((torch.rand(5, 3), desc, *ok), {}, ValueError, "query_locations"),
        ((loc, torch.rand(4, 4), *ok), {}, ValueError, "query_descriptors"),
        ((loc.long(), desc, *ok), {}, TypeError, "query_locations"),
        ((loc, desc, [loc], [torch.rand(5, 3)]), {}, ValueError, r"index_descriptors\[0\]"),
        ((loc, desc, [loc], [torch.rand(4, 4)]), {}, ValueError, r"index_descriptors\[0\]"),
        ((loc, desc, [loc, loc], [desc]), {}, ValueError, "index_descriptors"),
        ((loc, desc, [loc], desc[None]), {}, TypeError, "index_locations and index_descriptors"),
        ((loc, desc, *ok), {"index_lengths": torch.tensor([5])}, ValueError, "index_lengths"),
        ((loc, desc, loc[None], desc[None]), {"index_lengths": torch.tensor([6])}, ValueError, "index_lengths"),
        ((loc, desc, loc[None], desc[None]), {"index_lengths": torch.tensor([5.0])}, TypeError, "index_lengths"),
        ((loc, desc, loc[None], desc[None]), {"index_lengths": torch.tensor([5, 5])}, ValueError, "index_lengths"),
        ((loc, desc, loc[None], desc[None, :4]), {}, ValueError, "index_descriptors"),
        ((loc, desc, *ok), {"descriptor_threshold": -1.0}, ValueError, "descriptor_threshold"),
        ((loc, desc, *ok), {"residual_threshold": -0.5}, ValueError, "residual_threshold"),
        ((loc, desc, *ok), {"max_trials": 0}, ValueError, "max_trials"),
        ((loc, desc, *ok), {"max_trials": 2.5}, TypeError, "max_trials"),
        ((loc, desc, *ok), {"ratio_test": 0.0}, ValueError, "ratio_test"),
        ((loc, desc, *ok), {"ratio_test": 1.5}, ValueError, "ratio_test"),
        ((loc, desc, *ok), {"trials_per_chunk": 0}, ValueError, "trials_per_chunk"),
        ((loc, desc, *ok), {"seed": "a"}, TypeError, "seed"),
    ]
    for args, kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            spatial_verification(*args, **kwargs)
    # ratio_test = 1 is allowed.
    assert spatial_verification(loc, desc, *ok, ratio_test=1.0).shape == (1,)


def test_rerank_bad_input_raises() -> None:
    feats = [torch.rand(5, 2)] * 3, [torch.rand(5, 4)] * 3
    ranks, scores = torch.tensor([[0, 1, 2]]), torch.tensor([[0.9, 0.8, 0.7]])
    q = [feats[0][0]], [feats[1][0]]
    cases: list[tuple[tuple, dict, type[Exception], str]] = [
        ((ranks.float(), scores, *q, *feats), {}, TypeError, "ranks"),
        ((ranks, scores[:, :2], *q, *feats), {}, ValueError, "scores"),
        ((ranks, scores.long(), *q, *feats), {}, TypeError, "scores"),
        ((ranks, scores * math.nan, *q, *feats), {}, ValueError, "scores"),
        ((ranks + 5, scores, *q, *feats), {}, ValueError, "ranks"),
        ((ranks, scores, q[0] * 2, q[1], *feats), {}, ValueError, "query_locations"),
        ((ranks, scores, q[0][0], q[1], *feats), {}, TypeError, "query_locations"),
        ((ranks, scores, *q, feats[0], feats[1][:2]), {}, ValueError, "index_descriptors"),
        ((ranks, scores, *q, *feats), {"num_to_rerank": 0}, ValueError, "num_to_rerank"),
        ((ranks, scores, *q, *feats), {"junk": [[0], [1]]}, ValueError, "junk"),
        ((ranks, scores, *q, *feats), {"max_trials": 0}, ValueError, "max_trials"),
        ((ranks, scores, *q, *feats), {"index_lengths": torch.tensor([5])}, TypeError, "index_lengths"),
    ]
    for args, kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            rerank(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- rerank


def view_of(
    query_loc: torch.Tensor, query_desc: torch.Tensor, shared: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """An index image sharing ``shared`` query features (same descriptors, affinely moved) plus 20 unrelated."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.cat([query_loc[:shared] * 1.2 - 40.0, torch.rand(20, 2, generator=g) * 500])
    desc = torch.cat([query_desc[:shared], -query_desc[:20]])  # the negated ones are at distance 2 from any match
    return loc.to(query_loc.dtype), desc


def test_rerank_hand_case_with_junk_and_revisited_map() -> None:
    g = torch.Generator().manual_seed(0)
    query_loc = torch.rand(40, 2, generator=g) * 400
    query_desc = torch.nn.functional.normalize(torch.randn(40, 64, generator=g), dim=1)
    shared = {0: 0, 1: 30, 2: 12, 3: 25, 4: 0, 5: 35}  # database image -> features shared with the query
    database = [view_of(query_loc, query_desc, shared[j], j) for j in range(6)]
    index_loc, index_desc = [d[0] for d in database], [d[1] for d in database]
    ranks = torch.tensor([[0, 1, 2, 3, 4, 5]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]], dtype=torch.float64)
    # Junk {1}; the top 3 non-junk entries are 0, 2, 3; 5 (the best match) is past them and is not verified.
    out, inliers = rerank(
        ranks,
        scores,
        [query_loc],
        [query_desc],
        index_loc,
        index_desc,
        num_to_rerank=3,
        junk=[[1]],
        return_inliers=True,
    )
    assert out.tolist() == [[3, 2, 0, 1, 4, 5]]
    assert inliers.tolist() == [[25, 12, 0, -1, -1, -1]]
    assert out.dtype == torch.int64
    # Without junk, 1 is verified and wins.
    out = rerank(ranks, scores, [query_loc], [query_desc], index_loc, index_desc, num_to_rerank=3)
    assert out.tolist() == [[1, 2, 0, 3, 4, 5]]
    # The output is revisited_map's row layout: positives 3 and 2 move to the top.
    gnd = [{"easy": [3], "hard": [2], "junk": [1]}]
    before = revisited_map(ranks, gnd, kappas=(1,))["medium"]["map"]
    after_ranks = rerank(ranks, scores, [query_loc], [query_desc], index_loc, index_desc, num_to_rerank=3, junk=[[1]])
    after = revisited_map(after_ranks, gnd, kappas=(1,))["medium"]["map"]
    assert before == pytest.approx(((0 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2)  # positives at ranks 1, 2
    assert after == 1.0


def test_rerank_order_matches_delg_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against DELG's rule: sorted(all, key=(inliers, score), reverse=True), unverified = 0 inliers."""
    rng = np.random.default_rng(3)
    num_db, width, num_queries = 40, 30, 6
    inlier_table = rng.integers(0, 4, size=(num_queries, num_db)) * rng.integers(0, 2, size=(num_queries, num_db))
    current: dict[str, int] = {}

    def fake_verification(query_loc: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        ids = [int(x[0, 0]) for x in args[1]]  # the index "locations" carry their database id
        return torch.tensor([int(inlier_table[current["q"], j]) for j in ids])

    monkeypatch.setattr(reranking_module, "spatial_verification", fake_verification)
    index_loc = [torch.full((1, 2), float(j)) for j in range(num_db)]
    index_desc = [torch.zeros(1, 4) for _ in range(num_db)]
    rows, score_rows, junks = [], [], []
    for _ in range(num_queries):
        row = rng.permutation(num_db)[:width]
        score = np.sort(rng.choice(np.arange(8) / 8.0, width))[::-1].copy()  # sorted, with ties
        rows.append(row)
        score_rows.append(score)
        junks.append(set(rng.choice(num_db, 5, replace=False).tolist()))
    for q in range(num_queries):
        current["q"] = q
        out = rerank(
            torch.from_numpy(rows[q][None]),
            torch.from_numpy(score_rows[q][None]),
            [torch.zeros(1, 2)],
            [torch.zeros(1, 4)],
            index_loc,
            index_desc,
            num_to_rerank=10,
            junk=[junks[q]],
        )
        verified = [j for j in rows[q] if j not in junks[q]][:10]
        key = {
            j: (int(inlier_table[q, j]) if j in verified else 0, s) for j, s in zip(rows[q], score_rows[q], strict=True)
        }
        expected = sorted(rows[q].tolist(), key=lambda j: key[j], reverse=True)  # Python's sort is stable
        assert out[0].tolist() == expected


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    query_loc, query_desc, locs, descs = random_batch(4, dtype)
    cpu = spatial_verification(query_loc, query_desc, locs, descs, max_trials=500)
    cuda = spatial_verification(
        query_loc.cuda(), query_desc.cuda(), [x.cuda() for x in locs], [x.cuda() for x in descs], max_trials=500
    )
    assert cuda.device.type == "cuda"
    assert cuda.cpu().tolist() == cpu.tolist()
    assert int(cpu.max()) > 10


def test_fast_paths_decide_almost_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spies: the float64 re-checks run on a handful of rows/hypotheses, not as a fallback for everything."""
    rechecked = {"rows": 0, "hypotheses": 0}
    exact_rows, exact_counts = verification_module._exact_rows, verification_module._exact_counts

    def spy_rows(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rechecked["rows"] += args[3].numel()
        return exact_rows(*args)

    def spy_counts(*args: torch.Tensor) -> torch.Tensor:
        rechecked["hypotheses"] += args[6].numel()
        return exact_counts(*args)

    monkeypatch.setattr(verification_module, "_exact_rows", spy_rows)
    monkeypatch.setattr(verification_module, "_exact_counts", spy_counts)
    query_loc, query_desc, locs, descs = random_batch(5)
    counts = spatial_verification(query_loc, query_desc, locs, descs, max_trials=1000)
    verified = int((counts > 0).sum())
    assert verified >= 5
    assert rechecked["rows"] <= 2  # of 9 x 80 (candidate, query feature) rows
    assert verified <= rechecked["hypotheses"] <= 2 * verified  # of 9 x 1000 hypotheses


def test_reduced_precision_matmul_settings_do_not_change_counts() -> None:
    """With bf16 float32 matmuls switched on, the wider error bound sends rows to the float64 re-check instead."""
    query_loc, query_desc, locs, descs = random_batch(6)
    expected = spatial_verification(query_loc, query_desc, locs, descs, max_trials=300)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # bf16 on capable CPUs, on every supported torch
        assert reduced_precision_fp32_matmul(torch.device("cpu"))
        got = spatial_verification(query_loc, query_desc, locs, descs, max_trials=300)
    finally:
        torch.set_float32_matmul_precision(saved)
    assert got.tolist() == expected.tolist()
    assert int(expected.max()) > 10
