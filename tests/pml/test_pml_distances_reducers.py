"""Distances and reducers: values against pytorch-metric-learning (PML) and hand-computed cases.

Every loss takes ``distance=`` objects and ``reducer=`` objects; each combination gives PML's value on random
batches in float32 and float64. A string name and the equal distance object give bit-identical values.
"""

from __future__ import annotations

import math

import pytest
import torch

from dml_bias import distances as D
from dml_bias import losses as L
from dml_bias import reducers as R

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as PD  # noqa: E402
from pytorch_metric_learning import losses as PL  # noqa: E402
from pytorch_metric_learning import reducers as PR  # noqa: E402

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}

DISTANCES = {
    "lp": (lambda: D.LpDistance(), lambda: PD.LpDistance()),
    "lp_sq": (lambda: D.LpDistance(power=2), lambda: PD.LpDistance(power=2)),
    "lp_raw": (lambda: D.LpDistance(normalize_embeddings=False), lambda: PD.LpDistance(normalize_embeddings=False)),
    "lp1": (lambda: D.LpDistance(p=1), lambda: PD.LpDistance(p=1)),
    "cos": (lambda: D.CosineSimilarity(), lambda: PD.CosineSimilarity()),
    "dot": (lambda: D.DotProductSimilarity(), lambda: PD.DotProductSimilarity()),
    "dot_raw": (
        lambda: D.DotProductSimilarity(normalize_embeddings=False),
        lambda: PD.DotProductSimilarity(normalize_embeddings=False),
    ),
}

REDUCERS = {
    "mean": (R.MeanReducer, PR.MeanReducer),
    "avg_nonzero": (R.AvgNonZeroReducer, PR.AvgNonZeroReducer),
    "sum": (R.SumReducer, PR.SumReducer),
    "threshold": (lambda: R.ThresholdReducer(low=0.05, high=3.0), lambda: PR.ThresholdReducer(low=0.05, high=3.0)),
}


def batch(dtype: torch.dtype, n: int = 32, d: int = 16, classes: int = 4, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


# --------------------------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(DISTANCES))
@pytest.mark.parametrize("with_ref", [False, True])
def test_distance_matrix_equals_pml(name: str, dtype: torch.dtype, with_ref: bool) -> None:
    ours, theirs = (f() for f in DISTANCES[name])
    x, _ = batch(dtype, 12, 5)
    ref = batch(dtype, 7, 5, seed=1)[0] if with_ref else None
    torch.testing.assert_close(ours(x, ref), theirs(x, ref), **TOL[dtype])
    assert ours.is_inverted == theirs.is_inverted
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    torch.testing.assert_close(ours.margin(a, b), theirs.margin(a, b))
    torch.testing.assert_close(ours.pairwise_distance(x[:3], x[3:6]), theirs.pairwise_distance(x[:3], x[3:6]))


def test_distance_hand_values() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    torch.testing.assert_close(D.LpDistance(normalize_embeddings=False, p=1)(x), torch.tensor([[0.0, 6.0], [6.0, 0]]))
    torch.testing.assert_close(D.DotProductSimilarity(normalize_embeddings=False)(x)[0, 1], torch.tensor(4.0))
    torch.testing.assert_close(D.CosineSimilarity()(x)[0, 1], torch.tensor(0.8))
    torch.testing.assert_close(D.LpDistance(power=2)(x)[0, 1], torch.tensor(0.6**2 + 0.2**2))


def test_distance_metric_names() -> None:
    assert D.LpDistance().metric == "euclidean"
    assert D.LpDistance(power=2).metric == "squared_euclidean"
    assert D.LpDistance(p=1).metric is None
    assert D.LpDistance(normalize_embeddings=False).metric is None
    assert D.CosineSimilarity().metric == "cosine"
    assert D.DotProductSimilarity().metric == "cosine"
    assert D.DotProductSimilarity(normalize_embeddings=False).metric == "dot"
    assert D.CosineSimilarity(power=2).metric is None


def test_lp_distance_half_is_float32_rounded() -> None:
    x, _ = batch(torch.float32, 20, 8)
    got = D.LpDistance()(x.half())
    assert got.dtype == torch.float16
    xn = torch.nn.functional.normalize(x.half(), dim=1).float()  # normalised in float16, compared in float32
    torch.testing.assert_close(got, torch.cdist(xn, xn).half(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("loss_cls", "name", "obj"),
    [
        (L.TripletMarginLoss, "euclidean", D.LpDistance()),
        (L.ContrastiveLoss, "squared_euclidean", D.LpDistance(power=2)),
        (L.MultiSimilarityLoss, "cosine", D.CosineSimilarity()),
        (L.NTXentLoss, "dot", D.DotProductSimilarity(normalize_embeddings=False)),
        (L.SupConLoss, "cosine", D.DotProductSimilarity()),
    ],
)
def test_string_and_object_are_identical(loss_cls: type, name: str, obj: D.BaseDistance) -> None:
    x, y = batch(torch.float32)
    x.requires_grad_(True)
    a = loss_cls(distance=name)(x, y)
    (ga,) = torch.autograd.grad(a, x)
    b = loss_cls(distance=obj)(x, y)
    (gb,) = torch.autograd.grad(b, x)
    assert torch.equal(a, b)
    assert torch.equal(ga, gb)


# --------------------------------------------------------------------------------------------------------------
# Losses with distance objects and reducers, against PML
# --------------------------------------------------------------------------------------------------------------


def _pair_kwargs(loss: str, dist: str) -> dict:
    if loss == "ContrastiveLoss" and dist in ("cos", "dot", "dot_raw"):
        return {"pos_margin": 1.0, "neg_margin": 0.0}
    return {}


PAIR_LOSSES = ["ContrastiveLoss", "MultiSimilarityLoss", "TripletMarginLoss", "NTXentLoss", "SupConLoss"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", PAIR_LOSSES)
@pytest.mark.parametrize("reducer", [None, *REDUCERS])
@pytest.mark.parametrize("dist", ["lp", "lp_sq", "cos", "dot_raw", "lp1"])
def test_loss_with_distance_and_reducer_equals_pml(loss: str, reducer: str | None, dist: str, dtype) -> None:
    x, y = batch(dtype)
    x = x / 4  # keep raw dot products moderate
    kwargs = _pair_kwargs(loss, dist)
    ours_kw = dict(kwargs, distance=DISTANCES[dist][0]())
    theirs_kw = dict(kwargs, distance=DISTANCES[dist][1]())
    if reducer is not None:
        ours_kw["reducer"] = REDUCERS[reducer][0]()
        theirs_kw["reducer"] = REDUCERS[reducer][1]()
    xo, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = getattr(L, loss)(**ours_kw)(xo, y)
    theirs = getattr(PL, loss)(**theirs_kw)(xt, y)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), **TOL[dtype])
    ours.backward()
    theirs.backward()
    # Squared Euclidean: PML squares cdist, we use |x|^2 + |y|^2 - 2 x.y (float64 round-off ~1e-8 relative).
    scale = float(xt.grad.abs().max())
    grad_tol = dict(rtol=1e-4, atol=1e-5 * scale) if dtype == torch.float32 else dict(rtol=1e-7, atol=1e-9 * scale)
    torch.testing.assert_close(xo.grad, xt.grad, **grad_tol)


@pytest.mark.parametrize("reducer", [None, *REDUCERS])
def test_loss_with_reducer_and_indices_tuple_equals_pml(reducer: str | None) -> None:
    from pytorch_metric_learning import miners as PM

    x, y = batch(torch.float64)
    for loss in PAIR_LOSSES:
        idx = PM.MultiSimilarityMiner()(x, y) if loss != "TripletMarginLoss" else PM.TripletMarginMiner(0.3)(x, y)
        ours_kw, theirs_kw = {}, {}
        if reducer is not None:
            ours_kw["reducer"], theirs_kw["reducer"] = REDUCERS[reducer][0](), REDUCERS[reducer][1]()
        ours = getattr(L, loss)(**ours_kw)(x, y, idx)
        theirs = getattr(PL, loss)(**theirs_kw)(x, y, idx)
        torch.testing.assert_close(ours, theirs, **TOL[torch.float64], msg=loss)


@pytest.mark.parametrize("reducer", [None, "mean", "sum"])
def test_proxy_anchor_reducers_equal_pml(reducer: str | None) -> None:
    x, y = batch(torch.float64)
    kw_o = {} if reducer is None else {"reducer": REDUCERS[reducer][0]()}
    kw_t = {} if reducer is None else {"reducer": REDUCERS[reducer][1]()}
    ours = L.ProxyAnchorLoss(4, 16, **kw_o)
    theirs = PL.ProxyAnchorLoss(4, 16, **kw_t)
    with torch.no_grad():
        theirs.proxies.copy_(ours.proxies)
    torch.testing.assert_close(ours(x, y), theirs(x, y), **TOL[torch.float64])


def test_reference_values_from_pml_notes() -> None:
    """pml-notes §2.8: the fixed batch ``manual_seed(0); randn(32, 16); randint(0, 4, (32,))``."""
    torch.manual_seed(0)
    emb = torch.randn(32, 16)
    labels = torch.randint(0, 4, (32,))
    got = L.TripletMarginLoss(reducer=R.MeanReducer())(emb, labels)
    assert abs(got.item() - 0.1369687468) < 1e-6
    got = L.TripletMarginLoss(smooth_loss=True)(emb, labels)
    assert abs(got.item() - 0.7351460457) < 1e-6
    got = L.TripletMarginLoss(margin=0.2, distance=D.CosineSimilarity())(emb, labels)
    assert abs(got.item() - 0.3738237619) < 1e-6
    got = L.ContrastiveLoss(pos_margin=1, neg_margin=0, distance=D.CosineSimilarity())(emb, labels)
    assert abs(got.item() - 1.210906148) < 1e-6


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
def test_triplet_swap_and_smooth_equal_pml(swap: bool, smooth: bool) -> None:
    x, y = batch(torch.float64)
    ours = L.TripletMarginLoss(0.1, swap=swap, smooth_loss=smooth)(x, y)
    theirs = PL.TripletMarginLoss(0.1, swap=swap, smooth_loss=smooth)(x, y)
    torch.testing.assert_close(ours, theirs, **TOL[torch.float64])


# --------------------------------------------------------------------------------------------------------------
# Reducers by hand
# --------------------------------------------------------------------------------------------------------------


def _dict(values: list[float] | int, kind: str = "element") -> dict:
    losses = torch.tensor(values) if isinstance(values, list) else values
    return {"loss": {"losses": losses, "indices": None, "reduction_type": kind}}


def test_reducers_hand_values() -> None:
    emb = torch.zeros(2, 2)
    vals = [0.0, 0.5, 1.5, 4.0]
    assert R.MeanReducer()(_dict(vals), emb, None).item() == 1.5
    assert R.SumReducer()(_dict(vals, "triplet"), emb, None).item() == 6.0
    assert R.AvgNonZeroReducer()(_dict(vals, "pos_pair"), emb, None).item() == 2.0
    t = R.ThresholdReducer(low=0.5, high=4.0)
    assert t(_dict(vals, "neg_pair"), emb, None).item() == 1.5
    assert t.num_past_filter == 1
    assert R.ThresholdReducer(high=1.0)(_dict(vals), emb, None).item() == 0.25
    two = {"a": _dict([1.0, 3.0])["loss"], "b": _dict([10.0])["loss"]}
    assert R.MeanReducer()(two, emb, None).item() == 12.0
    assert R.DivisorReducer()({"x": dict(_dict([1.0, 3.0])["loss"], divisor=8)}, emb, None).item() == 0.5
    assert R.MeanReducer()(_dict([5.0], "already_reduced"), emb, None).item() == 5.0


@pytest.mark.parametrize("reducer", [R.MeanReducer(), R.SumReducer(), R.AvgNonZeroReducer(), R.ThresholdReducer(1)])
def test_zero_loss_keeps_graph(reducer: R.BaseReducer) -> None:
    emb = torch.randn(3, 2, requires_grad=True)
    for losses in (0, torch.zeros(0)):
        out = reducer(_dict(losses), emb, None)
        assert out.item() == 0.0
        assert not math.isnan(out.item())
        (g,) = torch.autograd.grad(out, emb)
        assert torch.equal(g, torch.zeros_like(emb))


def test_do_nothing_reducer_returns_per_element_losses() -> None:
    x, y = batch(torch.float64, 10, 4)
    out = L.TripletMarginLoss(0.3, reducer=R.DoNothingReducer())(x, y)
    theirs = PL.TripletMarginLoss(0.3, reducer=PR.DoNothingReducer())(x, y)
    torch.testing.assert_close(out["loss"]["losses"], theirs["loss"]["losses"].flatten())  # PML: (N, 1)
    for a, b in zip(out["loss"]["indices"], theirs["loss"]["indices"], strict=True):
        assert torch.equal(a, b)
    out = L.MultiSimilarityLoss(reducer=R.DoNothingReducer())(x, y)
    theirs = PL.MultiSimilarityLoss(reducer=PR.DoNothingReducer())(x, y)
    torch.testing.assert_close(out["loss"]["losses"], theirs["loss"]["losses"].flatten())  # PML: (N, 1)


def test_half_inputs_with_reducer_are_finite() -> None:
    x, y = batch(torch.float32)
    got = L.TripletMarginLoss(reducer=R.MeanReducer(), distance=D.CosineSimilarity())(x.half(), y)
    ref = L.TripletMarginLoss(reducer=R.MeanReducer(), distance=D.CosineSimilarity())(x.half().float(), y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)
