"""Tests of PAN's protocols (dml_bias.metrics.protocols): few-shot episodes and accuracy, FITB scores and accuracy,
compatibility scores and AUC."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).parents[1] / "datasets"))

from _builders import build_polyvore
from helpers import assert_close
from pair_heads import L1Head, LookupHead, gen, id_features, pair_score, real_head
from torch import nn

from dml_bias.datasets import PolyvoreOutfits
from dml_bias.metrics import (
    FewShotResult,
    compatibility_auc,
    compatibility_scores,
    few_shot_accuracy,
    few_shot_episodes,
    fitb_accuracy,
    fitb_scores,
)

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


# ------------------------------------------------------------------------------------------ metrics


def slow_auc(scores: list[float], labels: list[int]) -> float:
    """Pairwise definition: P(score of a positive > score of a negative), ties counted one half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


# --- FITB ------------------------------------------------------------------------------------------------------


def test_fitb_hand_cases_and_first_index_on_ties(device: torch.device) -> None:
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.3, 0.2],  # clear winner 0
            [0.5, 0.5, 0.1, 0.0],  # tie 0/1 -> 0
            [0.1, 0.2, 0.7, 0.7],  # tie 2/3 -> 2
            [0.3, 0.3, 0.3, 0.3],  # all tied -> 0
            [-1.0, -3.0, -0.5, -2.0],  # winner 2
        ],
        device=device,
    )
    answers = torch.tensor([0, 1, 2, 0, 2], device=device)
    assert fitb_accuracy(scores, answers) == pytest.approx(4 / 5)
    assert fitb_accuracy(scores, torch.tensor([0, 0, 3, 1, 1], device=device)) == pytest.approx(2 / 5)
    assert fitb_accuracy(scores.double(), answers) == pytest.approx(4 / 5)


def test_fitb_matches_numpy_argmax_on_random_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(200, 10)).astype(np.float32)  # many ties
    answers = rng.integers(0, 10, size=200)
    expected = float(np.mean(np.argmax(scores, axis=1) == answers))  # numpy documents "first occurrence"
    assert fitb_accuracy(torch.from_numpy(scores), torch.from_numpy(answers)) == pytest.approx(expected)


def test_fitb_bad_input() -> None:
    scores = torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"answers must lie in \[0, 3\]"):
        fitb_accuracy(scores, torch.tensor([0, 1, 4]))
    with pytest.raises(TypeError, match="answers must be a 1-D integer tensor of length 3"):
        fitb_accuracy(scores, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="answers must be a 1-D integer tensor of length 3"):
        fitb_accuracy(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="scores must be a 2-D tensor"):
        fitb_accuracy(torch.rand(3), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="scores must be a floating-point tensor"):
        fitb_accuracy(torch.ones(3, 4, dtype=torch.long), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="scores must be finite"):
        fitb_accuracy(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="at least one question"):
        fitb_accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))


# --- compatibility AUC -----------------------------------------------------------------------------------------


def test_auc_hand_case() -> None:
    # Positives 0.9, 0.4; negatives 0.4, 0.1: pairs 1 + 1 + 1/2 + 1 = 3.5 of 4.
    assert compatibility_auc(torch.tensor([0.9, 0.4, 0.4, 0.1]), torch.tensor([1, 1, 0, 0])) == 0.875
    assert compatibility_auc(torch.tensor([0.1, 0.9]), torch.tensor([True, False])) == 0.0
    assert compatibility_auc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1, 0, 1])) == 0.5


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=60),
    scale=st.sampled_from([1.0, 1e-3, 1e6]),
)
def test_auc_equals_sklearn_with_ties(values: list[tuple[int, bool]], scale: float) -> None:
    labels = [int(y) for _, y in values]
    if len(set(labels)) < 2:
        labels[0] = 1 - labels[0]
    scores = [s * scale for s, _ in values]
    ours = compatibility_auc(torch.tensor(scores, dtype=torch.float64), torch.tensor(labels))
    assert ours == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ours == pytest.approx(slow_auc(scores, labels), abs=1e-12)


def test_auc_large_random_against_sklearn() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=5000), 2).astype(np.float32)  # rounded: many ties
    labels = rng.integers(0, 2, size=5000)
    ours = compatibility_auc(torch.from_numpy(scores), torch.from_numpy(labels))
    assert ours == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_bad_input() -> None:
    with pytest.raises(ValueError, match="labels must contain both classes 0 and 1"):
        compatibility_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        compatibility_auc(torch.tensor([0.1, 0.2]), torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="labels must be a 1-D integer tensor of length 2"):
        compatibility_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor of length 2"):
        compatibility_auc(torch.tensor([0.1, 0.2]), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="scores must be a 1-D tensor"):
        compatibility_auc(torch.rand(2, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="scores must be finite"):
        compatibility_auc(torch.tensor([0.1, float("inf")]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"scores must be a torch\.Tensor"):
        compatibility_auc([0.1, 0.2], torch.tensor([0, 1]))  # type: ignore[arg-type]
