from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "datasets"))

from _builders import build_polyvore
from helpers import assert_close

from dml_bias.datasets import PolyvoreOutfits
from dml_bias.heads import (
    ConditionalSimilarity,
    FewShotResult,
    PairwiseSimilarityModel,
    PANLoss,
    compatibility_scores,
    few_shot_accuracy,
    few_shot_episodes,
    fitb_scores,
    sample_pairs,
)
from dml_bias.metrics import compatibility_auc, fitb_accuracy

# ------------------------------------------------------------------------------------------ hand-made heads


class Out(NamedTuple):
    score: torch.Tensor


class LookupHead(nn.Module):
    """Asymmetric pair head on 1-D "features" holding a sample id: score(i, j) = table[i, j]."""

    in_features = 1

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.calls = 0
        self.matrix_calls = 0

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> Out:
        self.calls += 1
        return Out(self.table[h1[:, 0].long(), h2[:, 0].long()])

    def score_matrix(self, query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        self.matrix_calls += 1
        return self.table[query[:, 0].long()][:, gallery[:, 0].long()]


class L1Head(nn.Module):
    """score = exp(-||h1 - h2||_1), in (0, 1]."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> Out:
        return Out(torch.exp(-(h1 - h2).abs().sum(dim=1)))

    def score_matrix(self, query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(query[:, None, :] - gallery[None, :, :]).abs().sum(dim=2))


def id_features(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)[:, None]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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


# ------------------------------------------------------------------------------------------ few-shot


def test_few_shot_episodes_shapes_and_disjointness() -> None:
    labels = torch.cat([torch.arange(8).repeat_interleave(12), torch.tensor([8, 8, 8])])[torch.randperm(99)]
    episodes = list(few_shot_episodes(labels, n_way=4, k_shot=3, n_query=5, num_episodes=25, generator=gen(0)))
    assert len(episodes) == 25
    seen_classes = set()
    for support, query in episodes:
        assert support.shape == (4, 3)
        assert query.shape == (4, 5)
        assert support.dtype == query.dtype == torch.int64
        all_idx = torch.cat([support, query], dim=1)
        assert len(set(all_idx.flatten().tolist())) == 4 * 8  # distinct samples, support and query disjoint
        row_classes = labels[all_idx]
        assert bool((row_classes == row_classes[:, :1]).all())  # each row one class
        classes = row_classes[:, 0].tolist()
        assert len(set(classes)) == 4
        seen_classes.update(classes)
    assert 8 not in seen_classes  # class 8 has only 3 < 8 samples
    assert seen_classes == set(range(8))
    again = list(few_shot_episodes(labels, n_way=4, k_shot=3, n_query=5, num_episodes=25, generator=gen(0)))
    other = list(few_shot_episodes(labels, n_way=4, k_shot=3, n_query=5, num_episodes=25, generator=gen(1)))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(episodes, again, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(episodes, other, strict=True))


def test_few_shot_episodes_errors_are_eager() -> None:
    labels = torch.arange(4).repeat_interleave(6)
    with pytest.raises(ValueError, match=r"at least n_way=5 classes with k_shot \+ n_query = 6 samples, got 4"):
        few_shot_episodes(labels, n_way=5, k_shot=2, n_query=4)  # raises before iterating
    with pytest.raises(ValueError, match="got 0 such class"):
        few_shot_episodes(labels, n_way=2, k_shot=2, n_query=5)
    with pytest.raises(ValueError, match="k_shot"):
        few_shot_episodes(labels, k_shot=0)
    with pytest.raises(ValueError, match="num_episodes"):
        few_shot_episodes(labels, n_way=2, k_shot=1, n_query=1, num_episodes=0)
    with pytest.raises(TypeError, match="labels"):
        few_shot_episodes(labels.float(), n_way=2, k_shot=1, n_query=1)


def slow_few_shot(table: torch.Tensor, labels: torch.Tensor, episodes: list[Any], n_query: int) -> list[float]:
    """Independent reference: explicit loops over episodes, queries and classes, mean of pair scores."""
    accuracies = []
    for support, query in episodes:
        n_way, k_shot = support.shape
        correct = 0
        for true_w in range(n_way):
            for qi in range(n_query):
                q = int(query[true_w, qi])
                best_w, best = -1, -math.inf
                for w in range(n_way):
                    mean = sum(float(table[q, int(support[w, k])]) for k in range(k_shot)) / k_shot
                    if mean > best:  # strict: ties keep the lowest class position
                        best_w, best = w, mean
                correct += best_w == true_w
        accuracies.append(correct / (n_way * n_query))
    return accuracies


def test_few_shot_accuracy_matches_slow_loop_with_ties() -> None:
    torch.manual_seed(0)
    labels = torch.arange(7).repeat_interleave(9)
    n = labels.numel()
    # scores from a coarse grid plus a class bonus, so ties between class means happen
    table = (torch.randint(0, 3, (n, n)) / 2.0 + 0.5 * (labels[:, None] == labels[None, :]).float()).double()
    head = LookupHead(table)
    kw = {"n_way": 5, "k_shot": 2, "n_query": 4, "num_episodes": 60}
    result = few_shot_accuracy(head, id_features(n), labels, generator=gen(11), **kw)
    assert isinstance(result, FewShotResult)
    assert head.matrix_calls == 60  # one batched score_matrix call per episode
    assert head.calls == 0
    episodes = list(few_shot_episodes(labels, generator=gen(11), **kw))
    expected = slow_few_shot(table, labels, episodes, n_query=4)
    assert result.accuracies.dtype == torch.float64
    assert result.accuracies.shape == (60,)
    assert result.accuracies.tolist() == pytest.approx(expected, abs=1e-12)
    acc = np.array(expected)
    assert result.mean == pytest.approx(acc.mean())
    assert result.ci95 == pytest.approx(1.96 * np.std(acc, ddof=1) / math.sqrt(60))
    result0 = few_shot_accuracy(head, id_features(n), labels, generator=gen(11), ddof=0, **kw)
    assert result0.ci95 == pytest.approx(1.96 * np.std(acc) / math.sqrt(60))
    assert len(set(expected)) > 1  # the interval checks above compare a real spread, not 0 with 0


def test_few_shot_accuracy_tie_goes_to_lowest_class_position() -> None:
    labels = torch.arange(3).repeat_interleave(2)
    table = torch.ones(6, 6)  # every class mean ties: every query is predicted as the class at position 0
    result = few_shot_accuracy(
        LookupHead(table), id_features(6), labels, n_way=3, k_shot=1, n_query=1, num_episodes=5, generator=gen(0)
    )
    assert result.accuracies.tolist() == pytest.approx([1 / 3] * 5)
    assert result.ci95 == 0.0


def test_few_shot_accuracy_separable_features_and_chance() -> None:
    torch.manual_seed(0)
    labels = torch.arange(8).repeat_interleave(25)
    features = 10.0 * nn.functional.one_hot(labels, 8).float() + 0.1 * torch.rand(200, 8)
    result = few_shot_accuracy(L1Head(8), features, labels, num_episodes=30, generator=gen(0))
    assert result.mean == 1.0
    assert result.ci95 == 0.0
    noise = few_shot_accuracy(L1Head(8), torch.randn(200, 8), labels, num_episodes=200, generator=gen(0))
    assert abs(noise.mean - 0.2) < 0.05  # random features: 5-way chance
    single = few_shot_accuracy(L1Head(8), features, labels, num_episodes=1, generator=gen(0))
    assert single.ci95 == 0.0
    assert single.accuracies.shape == (1,)


def test_few_shot_accuracy_errors() -> None:
    labels = torch.arange(5).repeat_interleave(4)
    features = torch.randn(20, 3)

    class NoMatrix:
        def __call__(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
            return h1.sum(1)

    with pytest.raises(TypeError, match="head must have a score_matrix"):
        few_shot_accuracy(NoMatrix(), features, labels, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match=r"labels must be a 1-D integer tensor of length 20 \(features.shape\[0\]\)"):
        few_shot_accuracy(L1Head(3), features, labels[:-1], k_shot=1, n_query=1)
    with pytest.raises(ValueError, match="features must be a 2-D tensor"):
        few_shot_accuracy(L1Head(3), features[:, 0], labels, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match="ddof"):
        few_shot_accuracy(L1Head(3), features, labels, k_shot=1, n_query=1, ddof=2)

    class BadShape(L1Head):
        def score_matrix(self, query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
            return super().score_matrix(query, gallery).T

    with pytest.raises(ValueError, match=r"must return a tensor of shape \(5, 10\)"):
        few_shot_accuracy(BadShape(3), features, labels, k_shot=2, n_query=1, num_episodes=1)


# ------------------------------------------------------------------------------------------ outfits


def slow_fitb(table: torch.Tensor, questions: list[tuple[list[int], list[int]]]) -> list[list[float]]:
    out = []
    for items, candidates in questions:
        out.append([sum(float(table[c, i]) for i in items) / len(items) for c in candidates])
    return out


def slow_compat(table: torch.Tensor, outfits: list[list[int]]) -> list[float]:
    out = []
    for items in outfits:
        pair_scores = [float(table[items[a], items[b]]) for a in range(len(items)) for b in range(a + 1, len(items))]
        out.append(sum(pair_scores) / len(pair_scores))
    return out


def test_fitb_scores_matches_slow_loop_all_formats() -> None:
    torch.manual_seed(0)
    table = torch.rand(12, 12, dtype=torch.float64)  # asymmetric: the candidate is the first input
    raw = [([0, 1, 2], [3, 4, 5, 6]), ([7], [8, 9, 10, 11]), ([1, 11, 4, 5, 9], [0, 2, 3, 7])]
    expected = torch.tensor(slow_fitb(table, raw), dtype=torch.float64)
    head = LookupHead(table)
    as_dicts = [{"question": q, "answers": a, "correct": 0, "blank_position": 1} for q, a in raw]
    as_tensors = [(torch.tensor(q), torch.tensor(a)) for q, a in raw]
    as_numpy = [(np.array(q), list(np.array(a))) for q, a in raw]  # NumPy arrays and NumPy integers
    for questions in (raw, as_dicts, as_tensors, as_numpy):
        scores = fitb_scores(head, id_features(12), questions)  # type: ignore[arg-type]
        assert scores.shape == (3, 4)
        assert scores.dtype == torch.float64
        assert_close(scores, expected)
    head.calls = 0
    chunked = fitb_scores(head, id_features(12), raw, chunk_size=5)  # 12 + 4 + 20 = 36 pairs -> 8 chunks
    assert head.calls == 8
    assert_close(chunked, expected)
    answers = torch.tensor([1, 0, 3])
    assert fitb_accuracy(chunked, answers) == fitb_accuracy(expected, answers)


def test_fitb_scores_errors() -> None:
    head, feats = LookupHead(torch.rand(6, 6)), id_features(6)
    with pytest.raises(ValueError, match="at least one question"):
        fitb_scores(head, feats, [])
    with pytest.raises(ValueError, match=r"questions\[0\] must have at least one outfit item"):
        fitb_scores(head, feats, [([], [1, 2])])
    with pytest.raises(ValueError, match=r"questions\[1\] must have 2 candidates \(as questions\[0\]\), got 3"):
        fitb_scores(head, feats, [([0], [1, 2]), ([0], [1, 2, 3])])
    with pytest.raises(ValueError, match=r"questions\[0\] candidates must hold sample indices in \[0, 5\]"):
        fitb_scores(head, feats, [([0], [1, 6])])
    with pytest.raises(ValueError, match='must have the keys "question" and "answers"'):
        fitb_scores(head, feats, [{"question": [0]}])
    with pytest.raises(TypeError, match="integer sample indices"):
        fitb_scores(head, feats, [([0.5], [1])])
    with pytest.raises(TypeError, match="1-D integer tensor"):
        fitb_scores(head, feats, [(torch.tensor([0.0]), [1])])
    with pytest.raises(TypeError, match="questions must be a sequence"):
        fitb_scores(head, feats, {"question": [0], "answers": [1]})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        fitb_scores(head, feats, [([0], [1])], chunk_size=0)

    class NoScore(nn.Module):
        def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(h1), 2)

    with pytest.raises(ValueError, match=r"\.score tensor of shape \(2,\)"):
        fitb_scores(NoScore(), feats, [([0, 1], [2])])


def test_compatibility_scores_matches_slow_loop() -> None:
    torch.manual_seed(1)
    table = torch.rand(10, 10, dtype=torch.float64)
    outfits = [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9], [9, 0]]
    expected = torch.tensor(slow_compat(table, outfits), dtype=torch.float64)
    head = LookupHead(table)
    labels = torch.tensor([1, 0, 1, 0])
    for fmt in (outfits, [{"label": int(y), "items": o} for o, y in zip(outfits, labels, strict=True)]):
        scores = compatibility_scores(head, id_features(10), fmt)  # type: ignore[arg-type]
        assert scores.shape == (4,)
        assert_close(scores, expected)
    head.calls = 0
    chunked = compatibility_scores(head, id_features(10), [torch.tensor(o) for o in outfits], chunk_size=4)
    assert head.calls == math.ceil((3 + 1 + 10 + 1) / 4)
    assert_close(chunked, expected)
    assert compatibility_auc(chunked, labels) == compatibility_auc(expected, labels)


def test_compatibility_scores_errors() -> None:
    head, feats = LookupHead(torch.rand(6, 6)), id_features(6)
    with pytest.raises(ValueError, match=r"outfits\[1\] must have at least 2 items to form a pair, got 1"):
        compatibility_scores(head, feats, [[0, 1], [2]])
    with pytest.raises(ValueError, match="at least one outfit"):
        compatibility_scores(head, feats, [])
    with pytest.raises(ValueError, match=r"outfits\[0\] must hold sample indices"):
        compatibility_scores(head, feats, [[0, -1]])
    with pytest.raises(ValueError, match='must have the key "items"'):
        compatibility_scores(head, feats, [{"label": 1}])
    with pytest.raises(ValueError, match="features must be a 2-D tensor"):
        compatibility_scores(head, torch.zeros(6), [[0, 1]])
    with pytest.raises(TypeError, match="head must be a callable"):
        compatibility_scores(object(), feats, [[0, 1]])


def test_outfit_tasks_with_a_polyvore_folder(tmp_path: Path) -> None:
    build_polyvore(tmp_path)
    test = PolyvoreOutfits(tmp_path, "test")
    n = len(test)
    torch.manual_seed(2)
    table = torch.rand(n, n, dtype=torch.float64)
    head = LookupHead(table)
    for harder in (False, True):
        questions = test.fitb_questions(harder=harder)
        scores = fitb_scores(head, id_features(n), questions)
        raw = [(q["question"], q["answers"]) for q in questions]
        assert_close(scores, torch.tensor(slow_fitb(table, raw), dtype=torch.float64))
        answers = torch.tensor([q["correct"] for q in questions])
        correct = sum(
            max(range(len(row)), key=lambda c, row=row: (row[c], -c)) == a
            for row, a in zip(slow_fitb(table, raw), answers.tolist(), strict=True)
        )
        assert fitb_accuracy(scores, answers) == pytest.approx(correct / len(questions))
        outfits = test.compatibility_outfits(harder=harder)
        compat = compatibility_scores(head, id_features(n), outfits)
        assert_close(compat, torch.tensor(slow_compat(table, [o["items"] for o in outfits]), dtype=torch.float64))
        labels = torch.tensor([o["label"] for o in outfits])
        assert compatibility_auc(compat, labels) == pytest.approx(roc_auc_score(labels.numpy(), compat.numpy()))
    # the real answer is the candidate from the question's own outfit: a head that knows outfits gets it right
    same_outfit = torch.zeros(n, n, dtype=torch.float64)
    for _, items in test.outfits:
        for a in items:
            for b in items:
                same_outfit[a, b] = 1.0
    questions = test.fitb_questions()
    perfect = fitb_scores(LookupHead(same_outfit), id_features(n), questions)
    assert fitb_accuracy(perfect, torch.tensor([q["correct"] for q in questions])) == 1.0


# ------------------------------------------------------------------------------------------ with ConditionalSimilarity


def real_head(d: int, k: int, seed: int = 0, joint: str = "absdiff") -> ConditionalSimilarity:
    torch.manual_seed(seed)
    return ConditionalSimilarity(d, k, joint=joint, dtype=torch.float64).eval()


def pair_score(head: ConditionalSimilarity, features: torch.Tensor, i: int, j: int) -> float:
    with torch.no_grad():
        return float(head(features[i : i + 1], features[j : j + 1]).score[0])


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


@pytest.mark.parametrize("joint", ["absdiff", "concat"])
def test_protocols_with_conditional_similarity_match_slow_loops(joint: str) -> None:
    torch.manual_seed(1)
    labels = torch.arange(6).repeat_interleave(7)
    features = torch.randn(42, 5, dtype=torch.float64) + 0.7 * nn.functional.one_hot(labels, 5 + 1)[:, :5]
    head = real_head(5, 3, seed=2, joint=joint)  # "concat" is not symmetric: the argument order matters
    table = torch.tensor([[pair_score(head, features, a, b) for b in range(42)] for a in range(42)])
    kw = {"n_way": 4, "k_shot": 3, "n_query": 4, "num_episodes": 25}
    result = few_shot_accuracy(head, features, labels, generator=gen(5), **kw)
    episodes = list(few_shot_episodes(labels, generator=gen(5), **kw))
    assert result.accuracies.tolist() == pytest.approx(slow_few_shot(table, labels, episodes, n_query=4), abs=1e-12)
    questions = [([0, 7, 14], [21, 1, 28]), ([35, 36], [2, 37, 8]), ([5], [40, 41, 6])]
    assert_close(fitb_scores(head, features, questions, chunk_size=4), torch.tensor(slow_fitb(table, questions)))
    outfits = [[0, 1, 2, 3], [10, 20], [41, 5, 17]]
    assert_close(compatibility_scores(head, features, outfits), torch.tensor(slow_compat(table, outfits)))


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
