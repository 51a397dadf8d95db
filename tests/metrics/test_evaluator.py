"""Tests of RetrievalEvaluator (single process; the 2-process sync is in test_sharded.py) and of the docs."""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

import pytest
import torch

from dml_bias.metrics import RetrievalEvaluator, retrieval_metrics
from dml_bias.metrics import _faiss as faiss_module
from dml_bias.metrics._faiss import faiss_knn

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api" / "metrics_extra.rst"


def data(n: int = 40, dim: int = 5, classes: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    embeddings = torch.randn(n, dim, generator=g)
    embeddings[7] = embeddings[30]  # a duplicate: ties
    labels = torch.randint(0, classes, (n,), generator=g)
    return embeddings, labels


@pytest.mark.parametrize(
    ("metric", "exclude_self", "per_class"),
    [("cosine", True, True), ("euclidean", True, False), ("dot", True, False), ("cosine", False, False)],
)
def test_equals_retrieval_metrics(metric: str, exclude_self: bool, per_class: bool) -> None:
    embeddings, labels = data()
    evaluator = RetrievalEvaluator(ks=(1, 3, 5), metric=metric, exclude_self=exclude_self, per_class=per_class)
    for batch in torch.arange(40).split(7):
        evaluator.update(embeddings[batch], labels[batch])
    reference = None if exclude_self else embeddings
    reference_labels = None if exclude_self else labels
    expected = retrieval_metrics(
        embeddings,
        labels,
        reference,
        reference_labels,
        ks=(1, 3, 5),
        metric=metric,
        exclude_self=exclude_self,
        per_class=per_class,
    )
    assert evaluator.compute() == expected
    assert len(evaluator) == 40
    if not exclude_self:
        # Every item finds itself first, except row 30, whose duplicate row 7 wins the tie by its lower index.
        assert expected["recall@1"] >= 39 / 40


def test_indices_deduplicate_and_order() -> None:
    embeddings, labels = data()
    expected = retrieval_metrics(embeddings, labels, ks=(1, 2))
    evaluator = RetrievalEvaluator(ks=(1, 2), device="cpu")
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    for batch in order.split(9):
        evaluator.update(embeddings[batch], labels[batch], batch)
    evaluator.update(embeddings[order[:3]], labels[order[:3]], order[:3])  # repeats, as a sampler pads
    gathered, gathered_labels, indices = evaluator.gathered()
    assert torch.equal(indices, torch.arange(40))
    assert torch.equal(gathered, embeddings)
    assert torch.equal(gathered_labels, labels)
    assert evaluator.compute() == expected
    assert len(evaluator) == 43


def test_stores_copies_and_resets() -> None:
    embeddings, labels = data()
    expected = retrieval_metrics(embeddings, labels, ks=(1,))
    evaluator = RetrievalEvaluator(ks=(1,))
    batch = embeddings.clone()
    evaluator.update(batch, labels)
    batch.fill_(0.0)  # the caller reuses its buffer
    assert evaluator.compute() == expected
    evaluator.reset()
    assert len(evaluator) == 0
    with pytest.raises(ValueError, match="needs at least one query sample"):
        evaluator.compute()
    assert "samples=0" in repr(evaluator)


def test_separate_reference_equals_retrieval_metrics() -> None:
    embeddings, labels = data()
    queries, gallery = torch.arange(0, 40, 3), torch.tensor([i for i in range(40) if i % 3])
    evaluator = RetrievalEvaluator(ks=(1, 2), separate_reference=True, per_class=True)
    for batch in gallery.split(6):
        evaluator.update(embeddings[batch], labels[batch], batch, reference=True)
    for batch in queries.split(5):
        evaluator.update(embeddings[batch], labels[batch], batch)
    expected = retrieval_metrics(
        embeddings[queries], labels[queries], embeddings[gallery], labels[gallery], ks=(1, 2), per_class=True
    )
    assert evaluator.compute() == expected
    assert torch.equal(evaluator.gathered(reference=True)[2], gallery)
    only_queries = RetrievalEvaluator(separate_reference=True)
    only_queries.update(embeddings, labels)
    with pytest.raises(ValueError, match="needs gallery samples"):
        only_queries.compute()
    with pytest.raises(ValueError, match=r"reference=True needs RetrievalEvaluator\(separate_reference=True\)"):
        RetrievalEvaluator().update(embeddings, labels, reference=True)


def test_bad_input_names_the_argument() -> None:
    embeddings, labels = data()
    evaluator = RetrievalEvaluator()
    evaluator.update(embeddings[:4], labels[:4], torch.arange(4))
    with pytest.raises(ValueError, match="indices must be given for every batch or for none"):
        evaluator.update(embeddings[4:8], labels[4:8])
    with pytest.raises(ValueError, match=r"embeddings must have size D=5 and dtype torch\.float32"):
        evaluator.update(embeddings[4:8, :3], labels[4:8], torch.arange(4, 8))
    with pytest.raises(TypeError, match="labels must be a 1-D integer tensor of length 4"):
        evaluator.update(embeddings[4:8], labels[4:8].float(), torch.arange(4, 8))
    with pytest.raises(ValueError, match="indices must be non-negative"):
        evaluator.update(embeddings[4:8], labels[4:8], torch.tensor([4, 5, -1, 7]))
    with pytest.raises(ValueError, match="embeddings must be finite"):
        evaluator.update(torch.full((1, 5), float("nan")), labels[:1], torch.tensor([9]))
    evaluator.update(embeddings[:2], (labels[:2] + 1) % 6, torch.arange(2))  # same indices, other labels
    with pytest.raises(ValueError, match="same dataset index was given with different labels"):
        evaluator.compute()
    with pytest.raises(ValueError, match=r"ks\[...\] must be an integer in \[1, inf\)"):
        RetrievalEvaluator(ks=(0,))
    with pytest.raises(TypeError, match="ks must be a non-empty sequence"):
        RetrievalEvaluator(ks=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric must be one of"):
        RetrievalEvaluator(metric="l1")
    with pytest.raises(TypeError, match="exclude_self must be a bool"):
        RetrievalEvaluator(exclude_self=None)  # type: ignore[arg-type]


# --- faiss backend ---------------------------------------------------------------------------------------------


def test_faiss_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r'pip install "dml-bias\[faiss\]".*"dml-bias\[faiss-gpu\]"'):
        faiss_knn(torch.randn(4, 3), k=1)


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared_euclidean"])
def test_faiss_matches_exact_knn_without_ties(metric: str) -> None:
    pytest.importorskip("faiss")
    from dml_bias.metrics import knn

    g = torch.Generator().manual_seed(5)
    query, reference = torch.randn(30, 16, generator=g), torch.randn(200, 16, generator=g)
    scores, indices = faiss_knn(query, reference, 10, metric=metric)
    expected_scores, expected_indices = knn(query, reference, 10, metric=metric)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    _own_scores, own = faiss_knn(reference, k=5, metric=metric)
    assert torch.equal(own, knn(reference, None, 5, metric=metric)[1])
    assert not bool((own == torch.arange(200)[:, None]).any())
    raw = faiss_knn(query, reference, 3, metric="euclidean", normalize_embeddings=False)
    exact = knn(query, reference, 3, metric="euclidean", normalize_embeddings=False)
    assert torch.equal(raw[1], exact[1])
    torch.testing.assert_close(raw[0], exact[0], rtol=1e-5, atol=1e-5)


def test_faiss_gpu_limit_and_bad_input() -> None:
    class FakeGpuFaiss:
        StandardGpuResources = object

    cuda = torch.device("cuda", 0)
    assert faiss_module._faiss_gpu_usable(FakeGpuFaiss, cuda, 2048)
    assert not faiss_module._faiss_gpu_usable(FakeGpuFaiss, cuda, 2049)  # falls back to the torch search
    assert not faiss_module._faiss_gpu_usable(object(), cuda, 10)  # a CPU-only faiss build
    with pytest.raises(ValueError, match="k must be an integer in"):
        faiss_knn(torch.randn(4, 3), k=4)
    with pytest.raises(TypeError, match="k must be given"):
        faiss_knn(torch.randn(4, 3))
    with pytest.raises(ValueError, match="exclude_self=True needs the query set to be the reference set"):
        faiss_knn(torch.randn(4, 3), torch.randn(5, 3), 1, exclude_self=True)


# --- the examples of docs/api/metrics_extra.rst run ------------------------------------------------------------


def test_docs_examples_run() -> None:
    failures, tried = doctest.testfile(str(DOCS), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert tried >= 8
    assert failures == 0


def test_groups_apply_the_reidentification_rule() -> None:
    """Groups (cameras) travel with the samples; compute() equals retrieval_metrics with the same groups."""
    embeddings, labels = data()
    cams = torch.arange(40) % 4
    keys = ("recall@k", "map@r", "map")
    for separate in (False, True):
        evaluator = RetrievalEvaluator(ks=(1, 3), metrics=keys, separate_reference=separate)
        for batch in torch.arange(40).split(7):
            is_gallery = separate and int(batch[0]) >= 14
            evaluator.update(embeddings[batch], labels[batch], reference=is_gallery, groups=cams[batch])
        if separate:
            q, g = slice(0, 14), slice(14, 40)
            want = retrieval_metrics(
                embeddings[q], labels[q], embeddings[g], labels[g], ks=(1, 3), metrics=keys,
                query_groups=cams[q], reference_groups=cams[g],
            )  # fmt: skip
        else:
            want = retrieval_metrics(embeddings, labels, ks=(1, 3), metrics=keys, query_groups=cams)
        got = evaluator.compute()
        assert got == want
        plain = RetrievalEvaluator(ks=(1, 3), metrics=keys, separate_reference=separate)
        for batch in torch.arange(40).split(7):
            plain.update(embeddings[batch], labels[batch], reference=separate and int(batch[0]) >= 14)
        assert plain.compute()["map"] != got["map"]  # the rule removes items: the values move


def test_groups_all_or_none() -> None:
    embeddings, labels = data()
    evaluator = RetrievalEvaluator(ks=(1,))
    evaluator.update(embeddings[:5], labels[:5], groups=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="groups must be given for every batch or for none"):
        evaluator.update(embeddings[5:10], labels[5:10])
    with pytest.raises(ValueError, match=r"groups must be a 1-D integer tensor of length 5 \(embeddings.shape\[0\]\)"):
        evaluator.update(embeddings[5:10], labels[5:10], groups=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="groups"):
        evaluator.update(embeddings[5:10], labels[5:10], groups=torch.zeros(5))
    inshop = RetrievalEvaluator(ks=(1,), separate_reference=True)
    inshop.update(embeddings[:5], labels[:5], groups=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="no groups after batches with them"):  # the gallery too
        inshop.update(embeddings[5:], labels[5:], reference=True)
