"""AccuracyCalculator, testers and samplers against pytorch-metric-learning, a slow loop and scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_bias import samplers, testers
from dml_bias.utils.accuracy_calculator import AccuracyCalculator, adjusted_mutual_info, normalized_mutual_info

pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import samplers as PS
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator as PAC

KNN_METRICS = (
    "mean_average_precision",
    "mean_average_precision_at_r",
    "mean_reciprocal_rank",
    "precision_at_1",
    "r_precision",
)
CPU = torch.device("cpu")


def data(n: int, classes: int, seed: int, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def close(a, b, tol: float = 1e-9) -> None:
    """PML computes in float64 except mean_reciprocal_rank (float32 reciprocals): callers pass 1e-6 there."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol, equal_nan=True)


# --------------------------------------------------------------------------------------------------------------
# Against PML
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [None, 1, 7, "max_bin_count"])
@pytest.mark.parametrize("mode", ["plain", "avg_of_avgs", "return_per_class"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_knn_metrics_equal_pml(k, mode: str, with_ref: bool) -> None:
    q, ql = data(150, 9, 0)
    kwargs = {} if mode == "plain" else {mode: True}
    args = (q, ql, *data(120, 11, 1)) if with_ref else (q, ql)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = AccuracyCalculator(include=KNN_METRICS, k=k, **kwargs).get_accuracy(*args)
        theirs = PAC(include=KNN_METRICS, k=k, device=CPU, **kwargs).get_accuracy(*args)
    assert list(ours) == sorted(KNN_METRICS)
    for key in KNN_METRICS:
        close(ours[key], theirs[key], 1e-6 if key == "mean_reciprocal_rank" else 1e-9)


def test_ref_includes_query_with_extra_reference_rows() -> None:
    q, ql = data(80, 6, 2)
    extra, el = data(50, 6, 3)
    ref, rl = torch.cat([q, extra]), torch.cat([ql, el])
    ours = AccuracyCalculator(include=KNN_METRICS).get_accuracy(q, ql, ref, rl, ref_includes_query=True)
    theirs = PAC(include=KNN_METRICS, device=CPU).get_accuracy(q, ql, ref, rl, ref_includes_query=True)
    for key in KNN_METRICS:
        close(ours[key], theirs[key], 1e-6 if key == "mean_reciprocal_rank" else 1e-9)


def test_clustering_metrics_equal_pml() -> None:
    pytest.importorskip("faiss")
    q, ql = data(600, 5, 4)
    q = q + 3 * torch.nn.functional.one_hot(ql, 8).float()  # some structure to find
    ours = AccuracyCalculator(include=("NMI", "AMI")).get_accuracy(q, ql)
    theirs = PAC(include=("NMI", "AMI"), device=CPU).get_accuracy(q, ql)
    close(ours["NMI"], theirs["NMI"], 1e-12)
    close(ours["AMI"], theirs["AMI"], 1e-12)
    assert ours["NMI"] > 0.5


def test_torch_kmeans_fallback_finds_clear_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    labels = torch.arange(4).repeat_interleave(30)
    x = 10 * torch.nn.functional.one_hot(labels, 4).float() + 0.1 * torch.randn(120, 4)
    acc = AccuracyCalculator(include=("NMI", "AMI")).get_accuracy(x, labels)
    assert acc == pytest.approx({"AMI": 1.0, "NMI": 1.0}, abs=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Hand-computed cases and a slow loop
# --------------------------------------------------------------------------------------------------------------


def test_hand_computed_values() -> None:
    x = torch.tensor([[0.0], [0.1], [1.0], [1.2], [5.0]])
    labels = torch.tensor([0, 0, 1, 0, 1])
    acc = AccuracyCalculator(include=KNN_METRICS).get_accuracy(x, labels)
    # neighbours by |x - x_q| (self excluded):
    # q0: 0.1(0) 1.0(1) 1.2(0) 5(1)   R=2 -> ranks of relevant: 1, 3
    # q1: 0(0) 1.0(1) 1.2(0) 5(1)     R=2 -> 1, 3
    # q2: 1.2(0) 0.1(0) 0(0) 5(1)     R=1 -> 4
    # q3: 1.0(1) 0.1(0) 0(0) 5(1)     R=2 -> 2, 3
    # q4: 1.2(0) 1.0(1) 0.1 0         R=1 -> 2
    assert acc["precision_at_1"] == pytest.approx(2 / 5)
    assert acc["mean_reciprocal_rank"] == pytest.approx((1 + 1 + 1 / 4 + 1 / 2 + 1 / 2) / 5)
    ap = [(1 + 2 / 3) / 2, (1 + 2 / 3) / 2, 1 / 4, (1 / 2 + 2 / 3) / 2, 1 / 2]
    assert acc["mean_average_precision"] == pytest.approx(sum(ap) / 5)
    map_r = [1 / 2, 1 / 2, 0, 1 / 2 / 2, 0]  # only the first R neighbours count
    assert acc["mean_average_precision_at_r"] == pytest.approx(sum(map_r) / 5)
    assert acc["r_precision"] == pytest.approx((1 / 2 + 1 / 2 + 0 + 1 / 2 + 0) / 5)


def slow_metrics(q, ql, r, rl, k, includes):
    out = {m: [] for m in KNN_METRICS}
    for i in range(len(q)):
        d = ((r - q[i]) ** 2).sum(1).double()
        order = sorted(range(len(r)), key=lambda j: (float(d[j]), j))
        if includes:
            order.remove(i)
        big_r = int((rl == ql[i]).sum()) - int(includes)
        if big_r == 0:
            continue
        rel = [int(rl[j] == ql[i]) for j in order[:k]]
        hits = np.cumsum(rel)
        prec = [hits[t] / (t + 1) * rel[t] for t in range(len(rel))]
        within = min(k, big_r)
        out["precision_at_1"].append(rel[0])
        out["r_precision"].append(sum(rel[:within]) / within)
        out["mean_average_precision_at_r"].append(sum(prec[:within]) / big_r)
        out["mean_average_precision"].append(sum(prec) / big_r)
        out["mean_reciprocal_rank"].append(1 / (rel.index(1) + 1) if 1 in rel else 0.0)
    return {m: float(np.mean(v)) for m, v in out.items()}


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(3, 25),
    classes=st.integers(1, 5),
    k=st.integers(1, 30),
    seed=st.integers(0, 1000),
    ties=st.booleans(),
)
def test_property_against_slow_loop(n: int, classes: int, k: int, seed: int, ties: bool) -> None:
    q, ql = data(n, classes, seed, d=2)
    if ties:
        q = torch.round(q)  # many exact ties: ours breaks them by the lower index
    if not bool((torch.bincount(ql) > 1).any()):
        return
    k = min(k, n - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = AccuracyCalculator(include=KNN_METRICS, k=k).get_accuracy(q, ql)
    expected = slow_metrics(q, ql, q, ql, k, True)
    for key in KNN_METRICS:
        close(ours[key], expected[key], 1e-12)


def test_lone_queries_are_left_out_and_all_lone_is_nan() -> None:
    q = torch.tensor([[0.0], [1.0], [2.0]])
    acc = AccuracyCalculator(include=("precision_at_1",)).get_accuracy(q, torch.tensor([0, 0, 1]))
    assert acc["precision_at_1"] == 1.0  # the lone label-1 query is ignored
    with pytest.warns(UserWarning, match="None of the query labels"):
        acc = AccuracyCalculator(include=("precision_at_1",)).get_accuracy(q, torch.tensor([0, 1, 2]))
    assert math.isnan(acc["precision_at_1"])


def test_small_int_k_warns_for_r_metrics() -> None:
    q, ql = data(40, 2, 5)
    with pytest.warns(UserWarning, match="truncated"):
        AccuracyCalculator(include=("r_precision",), k=2).get_accuracy(q, ql)


def test_large_labels_stay_distinct() -> None:
    """PML casts labels to float32, where 2**24 and 2**24 + 1 are equal; ours keeps them apart."""
    q = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    labels = torch.tensor([2**24, 2**24 + 1, 2**24, 2**24 + 1])
    assert AccuracyCalculator(include=("precision_at_1",)).get_accuracy(q, labels)["precision_at_1"] == 0.0


def test_numpy_inputs_and_column_labels() -> None:
    q, ql = data(30, 3, 6)
    a = AccuracyCalculator(include=KNN_METRICS).get_accuracy(q.numpy(), ql.numpy()[:, None])
    b = AccuracyCalculator(include=KNN_METRICS).get_accuracy(q, ql)
    assert a == b


def test_blocks_do_not_change_values(monkeypatch: pytest.MonkeyPatch) -> None:
    import dml_bias.utils.accuracy_calculator as mod

    q, ql = data(90, 4, 7)
    full = AccuracyCalculator(include=KNN_METRICS).get_accuracy(q, ql)
    monkeypatch.setattr(mod, "_BLOCK_ENTRIES", 200)  # blocks of 2 queries
    assert AccuracyCalculator(include=KNN_METRICS).get_accuracy(q, ql) == full


def test_custom_knn_func_pml_contract() -> None:
    from pytorch_metric_learning.utils.inference import FaissKNN

    pytest.importorskip("faiss")
    q, ql = data(60, 4, 8)
    ours = AccuracyCalculator(include=KNN_METRICS, knn_func=FaissKNN()).get_accuracy(q, ql)
    theirs = PAC(include=KNN_METRICS, device=CPU).get_accuracy(q, ql)
    for key in KNN_METRICS:
        close(ours[key], theirs[key], 1e-6 if key == "mean_reciprocal_rank" else 1e-9)


@settings(max_examples=30, deadline=None)
@given(
    a=st.lists(st.integers(0, 4), min_size=1, max_size=40),
    seed=st.integers(0, 10_000),
)
def test_mutual_information_equals_sklearn(a: list[int], seed: int) -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 4, size=len(a)).tolist()
    assert normalized_mutual_info(a, b) == pytest.approx(sk.normalized_mutual_info_score(a, b), abs=1e-12)
    assert adjusted_mutual_info(a, b) == pytest.approx(sk.adjusted_mutual_info_score(a, b), abs=1e-10)


# --------------------------------------------------------------------------------------------------------------
# Testers and samplers
# --------------------------------------------------------------------------------------------------------------


def test_base_tester_equals_pml() -> None:
    from pytorch_metric_learning import testers as PT

    x, y = data(70, 5, 9)
    dataset = torch.utils.data.TensorDataset(x, y)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Dropout(0.5))
    ours = testers.BaseTester(dataloader_num_workers=0, progress=False).get_all_embeddings(dataset, model)
    theirs = PT.BaseTester(dataloader_num_workers=0, data_device=CPU).get_all_embeddings(dataset, model)
    assert not model.training  # evaluation mode, as PML
    torch.testing.assert_close(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1])
    assert ours[1].shape == (70, 1)


def test_global_embedding_space_tester_keys() -> None:
    x, y = data(40, 4, 10)
    ds = torch.utils.data.TensorDataset(x, y)
    calc = AccuracyCalculator(include=("precision_at_1",))
    tester = testers.GlobalEmbeddingSpaceTester(accuracy_calculator=calc, progress=False, dataloader_num_workers=0)
    out = tester.test({"train": ds, "val": ds}, 1, torch.nn.Identity(), splits_to_eval=[("val", ["train"])])
    expected = calc.get_accuracy(torch.nn.functional.normalize(x), y, torch.nn.functional.normalize(x), y)
    assert out == {"val": {"precision_at_1_level0": expected["precision_at_1"]}}


@pytest.mark.parametrize("batch_size", [None, 12])
def test_m_per_class_sampler_like_pml(batch_size: int | None) -> None:
    labels = torch.randint(0, 9, (200,), generator=torch.Generator().manual_seed(0))
    labels[:3] = 20  # one class with fewer than m samples: drawn with replacement
    ours = samplers.MPerClassSampler(labels, 4, batch_size, 1000, generator=torch.Generator().manual_seed(1))
    theirs = PS.MPerClassSampler(labels, 4, batch_size, 1000)
    assert len(ours) == len(theirs)
    idx = torch.tensor(list(ours))
    assert len(idx) == len(ours)
    step = batch_size or 40
    for start in range(0, len(idx) - step + 1, step):
        chunk = labels[idx[start : start + step]]
        counts = torch.unique(chunk, return_counts=True)[1]
        assert torch.all(counts == 4)  # m per class, distinct classes
        groups = idx[start : start + step].reshape(-1, 4)
        for g in groups:
            if int(labels[g[0]]) != 20:  # without replacement when the class is large enough
                assert len(set(g.tolist())) == 4


def test_m_per_class_sampler_reproducible_and_with_dataloader() -> None:
    labels = torch.arange(6).repeat(5)
    a = list(samplers.MPerClassSampler(labels, 2, 6, 60, generator=torch.Generator().manual_seed(3)))
    b = list(samplers.MPerClassSampler(labels, 2, 6, 60, generator=torch.Generator().manual_seed(3)))
    assert a == b
    torch.manual_seed(5)
    c = list(samplers.MPerClassSampler(labels, 2, 6, 60))
    torch.manual_seed(5)
    assert c == list(samplers.MPerClassSampler(labels, 2, 6, 60))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(labels), sampler=samplers.MPerClassSampler(labels, 2, 6, 60), batch_size=6
    )
    for (batch,) in loader:
        assert sorted(torch.bincount(batch).tolist())[-3:] == [2, 2, 2]


def test_batch_sampler_renamed_with_deprecated_alias() -> None:
    from dml_bias.datasets import MPerClassBatchSampler

    assert samplers.MPerClassBatchSampler is MPerClassBatchSampler
    with pytest.warns(DeprecationWarning, match="MPerClassBatchSampler"):
        from dml_bias.datasets import MPerClassSampler
    assert MPerClassSampler is MPerClassBatchSampler
    with pytest.warns(DeprecationWarning, match="MPerClassBatchSampler"):
        from dml_bias.datasets.samplers import MPerClassSampler as old
    assert old is MPerClassBatchSampler


def test_half_embeddings_give_the_values_of_their_float32_copies() -> None:
    q, ql = data(60, 4, 11)
    half = AccuracyCalculator(include=KNN_METRICS).get_accuracy(q.half(), ql)
    assert half == AccuracyCalculator(include=KNN_METRICS).get_accuracy(q.half().float(), ql)
