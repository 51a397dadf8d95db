"""``dml_bias.similarity.pairwise`` against slow loop references."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, gradcheck

from dml_bias.similarity import is_similarity, pairwise


def _slow(x: torch.Tensor, y: torch.Tensor, metric: str, normalize: bool) -> torch.Tensor:
    x, y = x.double(), y.double()
    out = torch.empty(len(x), len(y), dtype=torch.float64)
    for i in range(len(x)):
        for j in range(len(y)):
            a, b = x[i], y[j]
            if normalize or metric == "cosine":
                a, b = a / max(a.norm().item(), 1e-12), b / max(b.norm().item(), 1e-12)
            if metric in ("cosine", "dot"):
                out[i, j] = sum(a[k] * b[k] for k in range(len(a)))
            else:
                d2 = sum((a[k] - b[k]) ** 2 for k in range(len(a)))
                out[i, j] = d2 if metric == "squared_euclidean" else math.sqrt(d2)
    return out


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared_euclidean"])
@pytest.mark.parametrize("normalize", [True, False])
def test_against_loops(metric: str, normalize: bool) -> None:
    x, y = torch.randn(5, 3), torch.randn(4, 3)
    assert_close(pairwise(x, y, metric, normalize_embeddings=normalize), _slow(x, y, metric, normalize), atol=1e-5)


def test_defaults_and_self() -> None:
    x = torch.randn(6, 4)
    assert_close(pairwise(x), _slow(x, x, "cosine", True), atol=1e-6)
    assert_close(pairwise(x, metric="dot"), x @ x.T)
    d = pairwise(x, metric="euclidean")
    assert (d >= 0).all()
    assert_close(d, _slow(x, x, "euclidean", True), atol=1e-3)


def test_euclidean_gradient_finite_at_zero_distance() -> None:
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]], requires_grad=True)
    pairwise(x, metric="euclidean", normalize_embeddings=False).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared_euclidean"])
def test_gradcheck(metric: str) -> None:
    x, y = torch.randn(3, 4), torch.randn(2, 4)
    assert gradcheck(lambda a, b: pairwise(a, b, metric), [x, y])


def test_is_similarity_and_bad_input() -> None:
    assert is_similarity("dot")
    assert not is_similarity("squared_euclidean")
    with pytest.raises(ValueError, match="metric must be one of"):
        pairwise(torch.randn(2, 2), metric="l1")
    with pytest.raises(ValueError, match=r"y must have size D=2 in dimension 1, got shape \(2, 3\)"):
        pairwise(torch.randn(2, 2), torch.randn(2, 3))
    with pytest.raises(ValueError, match="x must be a 2-D tensor"):
        pairwise(torch.randn(2))


def test_input_not_modified() -> None:
    x = torch.randn(3, 2)
    before = x.clone()
    pairwise(x, metric="euclidean")
    assert torch.equal(x, before)
