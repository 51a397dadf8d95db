"""MultiSimilarityLoss: hand-computed values, slow reference, PML cross-check, gradients, numerics."""

from __future__ import annotations

import math

import loss_refs as R
import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_bias.losses import MultiSimilarityLoss
from dml_bias.losses.functional import multi_similarity_loss
from dml_bias.miners import MultiSimilarityMiner

# pml_reference.txt: torch.manual_seed(0); emb = torch.randn(32, 16); labels = torch.randint(0, 4, (32,))
PML_ALL_PAIRS = 1.580981731
PML_MINED = 1.580408812


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    emb = torch.randn(32, 16)
    labels = torch.randint(0, 4, (32,))
    return emb, labels


def test_hand_computed_2d() -> None:
    # s01 = 0, s02 = s12 = 1/sqrt(2); labels 0, 0, 1.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    c = 1 / math.sqrt(2)
    row01 = 0.5 * math.log(1 + math.exp(-2 * (0 - 0.5))) + math.log(1 + math.exp(50 * (c - 0.5))) / 50
    row2 = math.log(1 + 2 * math.exp(50 * (c - 0.5))) / 50
    expected = (2 * row01 + row2) / 3
    assert_close(multi_similarity_loss(emb, torch.tensor([0, 0, 1])), expected)


def test_pml_reference_values() -> None:
    emb, labels = fixed_batch()
    assert_close(MultiSimilarityLoss()(emb, labels), PML_ALL_PAIRS)
    pairs = MultiSimilarityMiner()(emb, labels)
    assert_close(MultiSimilarityLoss()(emb, labels, pairs), PML_MINED)
    assert_close(MultiSimilarityLoss()(emb.double(), labels), 1.580981769, rtol=1e-8, atol=0)


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared_euclidean"])
@pytest.mark.parametrize("mode", ["all", "miner", "ref", "triplets"])
def test_matches_slow_reference(metric: str, mode: str) -> None:
    emb = torch.randn(12, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (12,))
    kw = {"alpha": 2.0, "beta": 10.0, "base": 0.5 if metric != "dot" else 1.0}
    args: dict = {}
    if mode == "miner":
        args["indices_tuple"] = MultiSimilarityMiner(0.3)(emb, labels)
    elif mode == "ref":
        args["ref_emb"] = torch.randn(7, 5, dtype=torch.float64)
        args["ref_labels"] = torch.randint(0, 3, (7,))
    elif mode == "triplets":
        args["indices_tuple"] = (torch.tensor([0, 1, 1]), torch.tensor([2, 3, 3]), torch.tensor([4, 5, 6]))
    ours = multi_similarity_loss(emb, labels, distance=metric, **args, **kw)
    ref = R.ms_loss(emb, labels, metric=metric, **args, **kw)
    assert_close(ours, ref)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 8),
    num_classes=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    alpha=st.floats(0.5, 4.0),
    beta=st.floats(1.0, 60.0),
    base=st.floats(-0.5, 1.0),
)
def test_property_equals_slow_reference(n: int, num_classes: int, seed: int, alpha: float, beta: float, base: float):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    ours = multi_similarity_loss(emb, labels, alpha=alpha, beta=beta, base=base)
    assert_close(ours, R.ms_loss(emb, labels, alpha=alpha, beta=beta, base=base))


def test_cross_check_pml_euclidean() -> None:
    pml = R.import_pml()
    emb = torch.randn(40, 8)
    labels = torch.randint(0, 5, (40,))
    expected = pml.losses.MultiSimilarityLoss(base=1.0, distance=pml.distances.LpDistance())(emb, labels)
    assert_close(multi_similarity_loss(emb, labels, base=1.0, distance="euclidean"), expected, rtol=1e-5, atol=1e-6)


def test_fp16_extreme_exponent_is_finite() -> None:
    # beta * (s - base) = 50 * (1 - 0.5) = 25 for identical negatives; e^25 overflows fp16 if done naively.
    emb = torch.ones(4, 8, dtype=torch.float16, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3])
    loss = MultiSimilarityLoss()(emb, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()
    assert_close(loss, math.log(1 + 3 * math.exp(25.0)) / 50, rtol=1e-4, atol=1e-5)
