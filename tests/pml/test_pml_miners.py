"""TripletMarginMiner, PairMarginMiner and the miner counters against pytorch-metric-learning and a slow loop."""

from __future__ import annotations

import itertools

import pytest
import torch

from dml_bias import distances as D
from dml_bias import miners as M

pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as PD
from pytorch_metric_learning import miners as PM

TYPES = ["all", "hard", "semihard", "easy"]
DIST = {
    "lp": (D.LpDistance, PD.LpDistance),
    "cos": (D.CosineSimilarity, PD.CosineSimilarity),
    "lp_sq": (lambda: D.LpDistance(power=2), lambda: PD.LpDistance(power=2)),
}


def batch(dtype: torch.dtype, n: int = 24, seed: int = 0, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def slow_triplets(dist: torch.Tensor, labels, ref_labels, same: bool, lo, hi) -> list[tuple[int, int, int]]:
    out = []
    for a, p, n in itertools.product(range(dist.shape[0]), range(dist.shape[1]), range(dist.shape[1])):
        if labels[a] != ref_labels[p] or (same and a == p) or labels[a] == ref_labels[n]:
            continue
        t = float(dist[a, n] - dist[a, p])
        if (lo is None or t > lo) and (hi is None or t <= hi):
            out.append((a, p, n))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("dist", list(DIST))
@pytest.mark.parametrize("with_ref", [False, True])
def test_triplet_margin_miner_equals_pml(kind: str, dist: str, dtype: torch.dtype, with_ref: bool) -> None:
    x, y = batch(dtype)
    ref = batch(dtype, 15, seed=1) if with_ref else ()
    ours = M.TripletMarginMiner(0.1, kind, distance=DIST[dist][0]())
    theirs = PM.TripletMarginMiner(0.1, kind, distance=DIST[dist][1]())
    a = ours(x, y, *ref)
    b = theirs(x, y, *ref)
    assert len(a[0]) > 0
    for got, exp in zip(a, b, strict=True):
        assert torch.equal(got, exp)
    assert ours.num_triplets == theirs.num_triplets == len(a[0])
    assert ours.num_pos_pairs == ours.num_neg_pairs == 0


@pytest.mark.parametrize("kind", TYPES)
def test_triplet_margin_miner_slow_loop(kind: str) -> None:
    x, y = batch(torch.float64, 12)
    m = 0.15
    lo, hi = {"all": (None, m), "hard": (None, 0.0), "semihard": (0.0, m), "easy": (m, None)}[kind]
    dist = torch.cdist(torch.nn.functional.normalize(x), torch.nn.functional.normalize(x))
    a, p, n = M.TripletMarginMiner(m, kind)(x, y)
    assert list(zip(a.tolist(), p.tolist(), n.tolist(), strict=True)) == slow_triplets(dist, y, y, True, lo, hi)


def test_triplet_types_partition_all_triplets() -> None:
    x, y = batch(torch.float64, 16)
    sets = {k: set(zip(*(t.tolist() for t in M.TripletMarginMiner(0.2, k)(x, y)), strict=True)) for k in TYPES}
    assert sets["hard"] | sets["semihard"] == sets["all"]
    assert not sets["hard"] & sets["semihard"]
    assert not sets["all"] & sets["easy"]
    everything = set(zip(*(t.tolist() for t in M.TripletMarginMiner(1e9)(x, y)), strict=True))
    assert sets["all"] | sets["easy"] == everything


@pytest.mark.parametrize("dist", list(DIST))
@pytest.mark.parametrize("with_ref", [False, True])
def test_pair_margin_miner_equals_pml(dist: str, with_ref: bool) -> None:
    x, y = batch(torch.float32)
    ref = batch(torch.float32, 15, seed=1) if with_ref else ()
    margins = (0.4, 0.6) if dist == "cos" else (0.9, 1.3)
    ours = M.PairMarginMiner(*margins, distance=DIST[dist][0]())
    theirs = PM.PairMarginMiner(*margins, distance=DIST[dist][1]())
    a, b = ours(x, y, *ref), theirs(x, y, *ref)
    assert len(a[0]) > 0
    assert len(a[2]) > 0
    for got, exp in zip(a, b, strict=True):
        assert torch.equal(got, exp)
    assert (ours.num_pos_pairs, ours.num_neg_pairs) == (theirs.num_pos_pairs, theirs.num_neg_pairs)
    assert ours.num_triplets == 0


def test_pair_margin_miner_hand_case() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    a1, p, a2, n = M.PairMarginMiner(1.0, 1.0)(emb, torch.tensor([0, 0, 1, 1]))
    # positives (0,1),(1,0) are at distance sqrt(2) > 1; (2,3),(3,2) too; negatives closer than 1: (0,2),(1,3).
    assert list(zip(a1.tolist(), p.tolist(), strict=True)) == [(0, 1), (1, 0), (2, 3), (3, 2)]
    assert list(zip(a2.tolist(), n.tolist(), strict=True)) == [(0, 2), (1, 3), (2, 0), (3, 1)]


def test_counters_on_every_miner() -> None:
    x, y = batch(torch.float32)
    ms, pms = M.MultiSimilarityMiner(), PM.MultiSimilarityMiner()
    ms(x, y)
    pms(x, y)
    assert (ms.num_pos_pairs, ms.num_neg_pairs) == (pms.num_pos_pairs, pms.num_neg_pairs)
    assert ms.num_pos_pairs > 0
    bh, pbh = M.BatchHardMiner(), PM.BatchHardMiner()
    bh(x, y)
    pbh(x, y)
    assert bh.num_triplets == pbh.num_triplets == 24
    # counters are reset by the next call
    tm = M.TripletMarginMiner(0.2)
    tm(x, y)
    assert tm.num_triplets > 0
    tm(x, torch.arange(24))  # no positive pair: nothing
    assert tm.num_triplets == 0


def test_miners_accept_distance_objects_like_strings() -> None:
    x, y = batch(torch.float32)
    for obj, name in ((D.CosineSimilarity(), "cosine"), (D.LpDistance(), "euclidean")):
        for cls in (M.MultiSimilarityMiner, M.BatchHardMiner):
            a, b = cls(distance=obj)(x, y), cls(distance=name)(x, y)
            assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def test_mnist_notebook_combination_equals_pml() -> None:
    """The TripletMarginLossMNIST recipe: cosine, ThresholdReducer(low=0), semihard triplets, margin 0.2."""
    from pytorch_metric_learning import losses as PL
    from pytorch_metric_learning import reducers as PR

    from dml_bias import losses as L
    from dml_bias import reducers as R

    x, y = batch(torch.float32, 64, classes=10)
    miner = M.TripletMarginMiner(margin=0.2, distance=D.CosineSimilarity(), type_of_triplets="semihard")
    loss = L.TripletMarginLoss(margin=0.2, distance=D.CosineSimilarity(), reducer=R.ThresholdReducer(low=0))
    pminer = PM.TripletMarginMiner(margin=0.2, distance=PD.CosineSimilarity(), type_of_triplets="semihard")
    ploss = PL.TripletMarginLoss(margin=0.2, distance=PD.CosineSimilarity(), reducer=PR.ThresholdReducer(low=0))
    ours = loss(x, y, miner(x, y))
    theirs = ploss(x, y, pminer(x, y))
    assert miner.num_triplets == pminer.num_triplets > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
