"""Tests of FITB accuracy and compatibility AUC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from dml_bias.metrics.outfits import compatibility_auc, fitb_accuracy


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
