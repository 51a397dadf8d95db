"""Tests of the training pairs (sample_pairs) and the encoder + pair-head model (PairwiseSimilarityModel).

PAN's evaluation protocols are tested in tests/metrics/test_protocols.py.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from pair_heads import L1Head, Out, gen, pair_score, real_head
from torch import nn

from dml_bias.heads import ConditionalSimilarity, PairwiseSimilarityModel, PANLoss, sample_pairs
from dml_bias.metrics import few_shot_accuracy

# ------------------------------------------------------------------------------------------ sample_pairs


def check_pairs(labels: torch.Tensor, pairs: Any, num_pairs: int, num_positive: int) -> None:
    first, second, target = pairs
    assert first.shape == second.shape == target.shape == (num_pairs,)
    assert first.dtype == second.dtype == torch.int64
    assert target.dtype == torch.float32
    assert int(first.min()) >= 0
    assert int(first.max()) < len(labels)
    assert int(second.min()) >= 0
    assert int(second.max()) < len(labels)
    assert not bool((first == second).any())
    same = labels[first] == labels[second]
    assert torch.equal(same, target.bool())
    assert int(target.sum()) == num_positive


def test_sample_pairs_counts_targets_and_validity() -> None:
    labels = torch.tensor([5, 2, 5, 9, 2, 2, 7, 5, 9])  # unsorted, arbitrary values; class 7 has one sample
    pairs = sample_pairs(labels, 1001, positive_fraction=0.3, generator=gen(1))
    check_pairs(labels, pairs, 1001, round(0.3 * 1001))
    assert 6 not in pairs.first[pairs.target == 1].tolist()  # the single sample never forms a positive
    # pairs are shuffled: positives are not all in front
    assert 0 < int(pairs.target[:300].sum()) < 300
    check_pairs(labels, sample_pairs(labels, 10, generator=gen(0)), 10, 5)
    check_pairs(labels, sample_pairs(labels, 7, positive_fraction=1.0, generator=gen(0)), 7, 7)
    check_pairs(labels, sample_pairs(labels, 7, positive_fraction=0.0, generator=gen(0)), 7, 0)


def test_sample_pairs_uniform_over_ordered_pairs() -> None:
    labels = torch.tensor([1, 0, 1, 0, 1])  # class 1: 3 samples (6 ordered pairs), class 0: 2 (2 ordered pairs)
    pairs = sample_pairs(labels, 48000, generator=gen(3))
    for want_target, expected_pairs in ((1, 8), (0, 12)):
        keep = pairs.target == want_target
        codes = (pairs.first[keep] * 5 + pairs.second[keep]).tolist()
        counts: dict[int, int] = {}
        for c in codes:
            counts[c] = counts.get(c, 0) + 1
        assert len(counts) == expected_pairs  # every ordered pair of that kind occurs
        total = len(codes)
        p = 1.0 / expected_pairs
        sigma = math.sqrt(total * p * (1 - p))
        for c in counts.values():
            assert abs(c - total * p) < 5 * sigma


def test_sample_pairs_reproducible_and_device() -> None:
    labels = torch.arange(10).repeat_interleave(4)
    a = sample_pairs(labels, 64, generator=gen(7))
    b = sample_pairs(labels, 64, generator=gen(7))
    c = sample_pairs(labels, 64, generator=gen(8))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.first, c.first)
    g = gen(7)
    first_call = sample_pairs(labels, 16, generator=g)
    second_call = sample_pairs(labels, 16, generator=g)  # the generator advances
    assert not torch.equal(first_call.first, second_call.first)
    torch.manual_seed(0)
    d = sample_pairs(labels, 16)
    torch.manual_seed(0)
    assert torch.equal(d.first, sample_pairs(labels, 16).first)
    assert sample_pairs(labels.to(torch.int32), 4).first.dtype == torch.int64


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=2, max_size=30),
    st.integers(1, 60),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31),
)
def test_sample_pairs_properties(values: list[int], num_pairs: int, fraction: float, seed: int) -> None:
    labels = torch.tensor(values)
    num_positive = round(fraction * num_pairs)
    counts = torch.bincount(labels)
    has_pair_class = bool((counts >= 2).any())
    has_two_classes = int((counts > 0).sum()) >= 2
    if (num_positive > 0 and not has_pair_class) or (num_pairs - num_positive > 0 and not has_two_classes):
        with pytest.raises(ValueError, match="labels must contain"):
            sample_pairs(labels, num_pairs, positive_fraction=fraction, generator=gen(seed))
        return
    pairs = sample_pairs(labels, num_pairs, positive_fraction=fraction, generator=gen(seed))
    check_pairs(labels, pairs, num_pairs, num_positive)


def test_sample_pairs_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 samples"):
        sample_pairs(torch.arange(5), 4)
    sample_pairs(torch.arange(5), 4, positive_fraction=0.0)  # negatives only: fine
    with pytest.raises(ValueError, match="at least 2 classes"):
        sample_pairs(torch.zeros(5, dtype=torch.long), 4)
    sample_pairs(torch.zeros(5, dtype=torch.long), 4, positive_fraction=1.0)  # positives only: fine
    with pytest.raises(TypeError, match="labels must be a 1-D integer tensor"):
        sample_pairs(torch.zeros(5), 4)
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor"):
        sample_pairs(torch.zeros(5, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="labels must hold at least one sample"):
        sample_pairs(torch.zeros(0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="num_pairs"):
        sample_pairs(torch.tensor([0, 0, 1]), 0)
    with pytest.raises(TypeError, match="num_pairs"):
        sample_pairs(torch.tensor([0, 0, 1]), 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive_fraction"):
        sample_pairs(torch.tensor([0, 0, 1]), 2, positive_fraction=1.5)
    with pytest.raises(TypeError, match="generator"):
        sample_pairs(torch.tensor([0, 0, 1]), 2, generator=0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ model


def test_pairwise_model_with_feature_table() -> None:
    torch.manual_seed(0)
    features = torch.randn(12, 5)
    head = L1Head(5)
    model = PairwiseSimilarityModel(nn.Embedding.from_pretrained(features, freeze=True), head)
    i, j = torch.tensor([0, 3, 7, 11]), torch.tensor([1, 3, 2, 0])
    assert torch.equal(model(i, j).score, head(features[i], features[j]).score)
    assert torch.equal(model.embed(i), features[i])
    q, g = torch.tensor([2, 5]), torch.arange(12)
    matrix = model.score_matrix(q, g)
    assert matrix.shape == (2, 12)
    for a in range(2):
        for b in range(12):
            expected = math.exp(-float((features[q[a]] - features[g[b]]).abs().sum()))
            assert math.isclose(float(matrix[a, b]), expected, rel_tol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())  # the table is frozen


def test_pairwise_model_errors() -> None:
    features = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"size D = head.in_features = 5"):
        PairwiseSimilarityModel(nn.Embedding.from_pretrained(features), L1Head(5)).embed(torch.tensor([0]))
    conv = PairwiseSimilarityModel(nn.Conv2d(3, 5, 1), L1Head(5))
    with pytest.raises(ValueError, match=r"encoder\(x\) must return \(N, D\) embeddings"):
        conv(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    table = nn.Embedding.from_pretrained(torch.arange(8).view(4, 2))  # integer "features"
    with pytest.raises(TypeError, match="floating-point"):
        PairwiseSimilarityModel(table, L1Head(2)).embed(torch.tensor([1]))
    with pytest.raises(TypeError, match=r"encoder must be a torch\.nn\.Module"):
        PairwiseSimilarityModel(lambda x: x, L1Head(2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"head must be a torch\.nn\.Module"):
        PairwiseSimilarityModel(nn.Identity(), object())  # type: ignore[arg-type]

    class NoMatrix(nn.Module):
        def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
            return (h1 * h2).sum(1)

    with pytest.raises(TypeError, match="score_matrix"):
        PairwiseSimilarityModel(nn.Identity(), NoMatrix()).score_matrix(torch.randn(2, 2), torch.randn(3, 2))


def test_pairwise_model_trains_encoder_and_head() -> None:
    torch.manual_seed(0)
    encoder = nn.Linear(4, 3)
    head = nn.Module()

    class Bilinear(nn.Module):
        in_features = 3

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> Out:
            return Out((h1 * self.w * h2).sum(1))

    head = Bilinear()
    model = PairwiseSimilarityModel(encoder, head)
    model(torch.randn(5, 4), torch.randn(5, 4)).score.sum().backward()
    assert encoder.weight.grad is not None
    assert head.w.grad is not None
    assert {n for n, _ in model.named_parameters()} == {"encoder.weight", "encoder.bias", "head.w"}


# ------------------------------------------------------------------------------------------ with ConditionalSimilarity


def test_pairwise_model_with_conditional_similarity() -> None:
    torch.manual_seed(0)
    features = torch.randn(9, 6, dtype=torch.float64)
    head = real_head(6, 4)
    model = PairwiseSimilarityModel(nn.Embedding.from_pretrained(features, freeze=True), head)
    i, j = torch.tensor([0, 4, 8]), torch.tensor([3, 4, 1])
    out = model(i, j)
    reference = head(features[i], features[j])
    for name in ("score", "condition_scores", "relevance", "condition_logits", "log_relevance"):
        assert torch.equal(getattr(out, name), getattr(reference, name))
    matrix = model.score_matrix(torch.tensor([1, 2]), torch.arange(9), chunk_size=1)
    expected = torch.tensor([[pair_score(head, features, a, b) for b in range(9)] for a in (1, 2)])
    assert_close(matrix, expected)
    with pytest.raises(ValueError, match=r"head.in_features = 6"):
        PairwiseSimilarityModel(nn.Embedding.from_pretrained(features[:, :5]), head)(i, j)


def test_training_a_head_on_sampled_pairs_learns_the_classes() -> None:
    torch.manual_seed(0)
    labels = torch.arange(8).repeat_interleave(30)
    prototypes = torch.randn(8, 16)
    features = prototypes[labels] + 0.8 * torch.randn(240, 16)
    attributes = (prototypes[labels][:, :4] > 0).long()  # class-level binary attributes
    base, novel = labels < 5, labels >= 5
    pairs = sample_pairs(labels[base], 4000, generator=gen(0))
    base_features, base_attributes = features[base], attributes[base]
    head = ConditionalSimilarity(16, 6)
    loss_fn = PANLoss(lam=1.0, gate="xnor")
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    h1, h2 = base_features[pairs.first], base_features[pairs.second]
    a1, a2 = base_attributes[pairs.first], base_attributes[pairs.second]
    losses = []
    for _ in range(150):
        loss = loss_fn(head(h1, h2), pairs.target, a1, a2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]
    result = few_shot_accuracy(
        head.eval(),
        features[novel],
        labels[novel] - 5,
        n_way=3,
        k_shot=5,
        n_query=10,
        num_episodes=50,
        generator=gen(0),
    )
    assert result.mean > 0.7  # three novel classes: chance is 1/3 (observed: 0.85)
