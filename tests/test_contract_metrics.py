"""The test contract (``tests/contract.py``) for the metrics: k-NN, retrieval, revisited, sharded, outfits,
the evaluator and the PML-compatible accuracy calculator and testers, against slow loop references."""

from __future__ import annotations

import math
from typing import Any

import contract as C
import pytest
import torch
from contract import Call, Entry, call, instance, number, tensor

from dml_bias import metrics as M
from dml_bias.utils.accuracy_calculator import AccuracyCalculator

F64 = torch.float64
LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])  # every class has a positive: no lone query
KEYS = ("recall@1", "recall@2", "map@r", "r_precision")


def rows(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random rows drawn in float64 and rounded to ``dtype`` (the same values in every dtype)."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


# --------------------------------------------------------------------------------------------- slow references


def cosine(q: torch.Tensor, r: torch.Tensor) -> list[list[float]]:
    qs, rs = q.double().tolist(), r.double().tolist()

    def norm(v: list[float]) -> float:
        return math.sqrt(sum(a * a for a in v))

    return [[sum(a * b for a, b in zip(u, v, strict=True)) / (norm(u) * norm(v)) for v in rs] for u in qs]


def euclidean(q: torch.Tensor, r: torch.Tensor) -> list[list[float]]:
    """Minus the Euclidean distance (a similarity: larger is nearer)."""
    qs, rs = q.double().tolist(), r.double().tolist()
    return [[-math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v, strict=True))) for v in rs] for u in qs]


def ranking(
    q: torch.Tensor, r: torch.Tensor | None, exclude_self: bool, metric: str = "cosine"
) -> list[list[tuple[float, int]]]:
    """Per query: (score, reference index) from the most to the least similar."""
    sims = (cosine if metric == "cosine" else euclidean)(q, q if r is None else r)
    out = []
    for i, row in enumerate(sims):
        pairs = sorted(((s, j) for j, s in enumerate(row) if not (exclude_self and j == i)), key=lambda t: -t[0])
        out.append(pairs)
    return out


def knn_reference(q: torch.Tensor, r: torch.Tensor | None = None, k: int = 1, **_: Any) -> tuple[Any, Any]:
    ranked = ranking(q, r, exclude_self=r is None)
    scores = torch.tensor([[s for s, _ in row[:k]] for row in ranked], dtype=F64)
    indices = torch.tensor([[j for _, j in row[:k]] for row in ranked])
    return scores, indices


def relevance(q: torch.Tensor, ql: torch.Tensor, r: Any = None, rl: Any = None, metric: str = "cosine"):
    ranked = ranking(q, r, exclude_self=r is None, metric=metric)
    ref_labels = ql if rl is None else rl
    return [[int(ref_labels[j]) == int(ql[i]) for _, j in row] for i, row in enumerate(ranked)]


def precisions(rel: list[bool]) -> list[float]:
    hits, out = 0, []
    for i, r in enumerate(rel):
        hits += r
        out.append(hits / (i + 1))
    return out


def recall_ref(rels: list[list[bool]], k: int) -> float:
    return sum(any(rel[:k]) for rel in rels) / len(rels)


def r_precision_ref(rels: list[list[bool]]) -> float:
    return sum(sum(rel[: sum(rel)]) / sum(rel) for rel in rels) / len(rels)


def map_at_r_ref(rels: list[list[bool]]) -> float:
    total = 0.0
    for rel in rels:
        big_r = sum(rel)
        total += sum(p for p, hit in zip(precisions(rel[:big_r]), rel[:big_r], strict=True) if hit) / big_r
    return total / len(rels)


def map_ref(rels: list[list[bool]]) -> float:
    return sum(sum(p for p, hit in zip(precisions(rel), rel, strict=True) if hit) / sum(rel) for rel in rels) / len(
        rels
    )


def retrieval_ref(q: torch.Tensor, ql: torch.Tensor, r: Any = None, rl: Any = None, **_: Any) -> dict[str, float]:
    rels = relevance(q, ql, r, rl)
    return {
        "recall@1": recall_ref(rels, 1),
        "recall@2": recall_ref(rels, 2),
        "map@r": map_at_r_ref(rels),
        "r_precision": r_precision_ref(rels),
    }


def pick(*keys: str) -> Any:
    return lambda d: {k: d[k] for k in keys}


def revisited_ap_ref(positive_ranks: list[int], num_positives: int) -> float:
    """The trapezoid rule of Radenović et al.'s ``compute_ap``, written from the paper's definition."""
    ap = 0.0
    for j, rank in enumerate(sorted(positive_ranks)):
        before = 1.0 if rank == 0 else j / rank
        after = (j + 1) / (rank + 1)
        ap += (before + after) / (2 * num_positives)
    return ap


GND = [{"easy": [0, 4], "hard": [2], "junk": [5]}, {"easy": [3], "hard": [1, 0], "junk": []}]
RANKS = torch.tensor([[3, 5, 0, 1, 4, 2], [0, 2, 3, 5, 1, 4]])


def revisited_ref(ranks: torch.Tensor, gnd: list[dict[str, list[int]]], kappas: tuple[int, ...] = (1, 5, 10), **_: Any):
    """Easy: easy positives, hard ignored; medium: both; hard: hard positives, easy ignored (and junk always)."""
    protocols = {
        "easy": (("easy",), ("junk", "hard")),
        "medium": (("easy", "hard"), ("junk",)),
        "hard": (("hard",), ("junk", "easy")),
    }
    out: dict[str, dict[str, float]] = {}
    for name, (pos_keys, junk_keys) in protocols.items():
        aps: list[float] = []
        mps: dict[int, list[float]] = {k: [] for k in kappas}
        for row, g in zip(ranks.tolist(), gnd, strict=True):
            pos = {i for key in pos_keys for i in g.get(key, [])}
            junk = {i for key in junk_keys for i in g.get(key, [])}
            kept = [i for i in row if i not in junk]
            hits = [n for n, i in enumerate(kept) if i in pos]
            aps.append(revisited_ap_ref(hits, len(pos)))
            for k in kappas:
                mps[k].append(mp_ref(hits, k))
        out[name] = {"map": sum(aps) / len(aps), **{f"mp@{k}": sum(v) / len(v) for k, v in mps.items()}}
        out[name]["num_queries"] = len(aps)
    return out


def mp_ref(hits: list[int], k: int) -> float:
    """Radenović's mP@k: the precision among the top min(k, rank of the last positive) (1-based ranks)."""
    ranks = [n + 1 for n in hits]
    if not ranks:
        return 0.0
    cut = min(max(ranks), k)
    return sum(1 for r in ranks if r <= cut) / cut


# -------------------------------------------------------------------------------------------------- entries


def retrieval_inputs(dtype: torch.dtype) -> Call:
    return call(rows(10, 4, dtype), LABELS.clone())


def separate_inputs(dtype: torch.dtype) -> Call:
    return call(rows(6, 4, dtype, 1), LABELS[:6].clone(), rows(10, 4, dtype, 2), LABELS.clone())


def metric_value(ref_key: str, fn_name: str) -> Any:
    def reference(q: torch.Tensor, ql: torch.Tensor, r: Any = None, rl: Any = None, **kw: Any) -> float:
        rels = relevance(q, ql, r, rl)
        return {
            "recall": lambda: recall_ref(rels, kw.get("k", 1)),
            "r_precision": lambda: r_precision_ref(rels),
            "map@r": lambda: map_at_r_ref(rels),
            "map": lambda: map_ref(rels),
        }[ref_key]()

    return reference


NUMBER_IS_NOT_DIFF = {"gradcheck": C.NOT_DIFFERENTIABLE}
SCORES_NO_GRAD = "the k-NN search runs without autograd (scores are detached; it ranks, it does not train)"


def scalar_metric(name: str, ref_key: str, **kwargs: Any) -> list[Entry]:
    key = f"dml_bias.metrics:{name}"
    base = {"expect": number(0.0, 1.0), "reference": metric_value(ref_key, name), "skip": NUMBER_IS_NOT_DIFF}
    return [
        Entry(key, lambda dtype: call(*retrieval_inputs(dtype).args, **kwargs), **base),
        Entry(key, lambda dtype: call(*separate_inputs(dtype).args, **kwargs), tag="reference set", **base),
    ]


def evaluate(evaluator: Any, q: torch.Tensor, ql: torch.Tensor, r: Any = None, rl: Any = None) -> dict[str, Any]:
    evaluator.reset()
    evaluator.update(q[:4], ql[:4])
    evaluator.update(q[4:], ql[4:])
    if r is not None:
        evaluator.update(r, rl, reference=True)
    return evaluator.compute()


def accuracy(calculator: Any, q: torch.Tensor, ql: torch.Tensor, r: torch.Tensor, rl: torch.Tensor) -> Any:
    return calculator.get_accuracy(q, ql, r, rl)


def accuracy_ref(q: torch.Tensor, ql: torch.Tensor, r: torch.Tensor, rl: torch.Tensor) -> dict[str, float]:
    rels = relevance(q, ql, r, rl, metric="euclidean")  # PML's default: Euclidean k-NN on the raw rows
    return {
        "precision_at_1": recall_ref(rels, 1),
        "r_precision": r_precision_ref(rels),
        "mean_average_precision_at_r": map_at_r_ref(rels),
    }


def run_tester(tester: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
    data = torch.utils.data.TensorDataset(x, y)
    return tester.test({"val": data}, 0, torch.nn.Identity())["val"]


def embed(tester: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
    return tester.get_all_embeddings(torch.utils.data.TensorDataset(x, y), torch.nn.Identity())


def ref_tester(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    # normalize_embeddings=True: Euclidean on unit rows ranks as cosine does
    rels = relevance(x, y)
    return {"precision_at_1_level0": recall_ref(rels, 1), "r_precision_level0": r_precision_ref(rels)}


def mutual_info_ref(adjusted: bool) -> Any:
    def reference(a: list[int], b: list[int]) -> float:
        from sklearn import metrics as skm

        return float((skm.adjusted_mutual_info_score if adjusted else skm.normalized_mutual_info_score)(a, b))

    return reference


def knn_expect(k: int, n: int = 10, dtype: Any = C.SAME) -> Any:
    def check(out: Any, in_dtype: torch.dtype) -> None:
        scores, indices = out
        tensor((n, k), dtype)(scores, in_dtype)
        tensor((n, k), torch.int64)(indices, in_dtype)

    return check


def auc_ref(scores: torch.Tensor, labels: torch.Tensor) -> float:
    pos = [float(s) for s, y in zip(scores, labels, strict=True) if y]
    neg = [float(s) for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


ENTRIES: list[Entry] = [
    Entry(
        "dml_bias.metrics:knn",
        lambda dtype: call(rows(10, 4, dtype), k=3),
        knn_expect(3),
        reference=knn_reference,
        skip={"gradcheck": SCORES_NO_GRAD},
    ),
    Entry(
        "dml_bias.metrics:knn",
        lambda dtype: call(rows(5, 4, dtype, 1), rows(9, 4, dtype, 2), k=2, chunk_size=2),
        knn_expect(2, 5),
        reference=knn_reference,
        tag="reference set, chunked",
        skip={"gradcheck": SCORES_NO_GRAD},
    ),
    Entry(
        "dml_bias.metrics:faiss_knn",
        lambda dtype: call(rows(10, 4, dtype), k=3),
        knn_expect(3, dtype=torch.float32),
        reference=knn_reference,
        tol=(1e-5, 1e-6),
        skip={"gradcheck": SCORES_NO_GRAD, "device": "faiss-cpu: the CPU index (the GPU one is tested in test_knn)"},
    ),
    *scalar_metric("recall_at_k", "recall", k=2),
    *scalar_metric("r_precision", "r_precision"),
    *scalar_metric("map_at_r", "map@r"),
    *scalar_metric("mean_average_precision", "map"),
    Entry(
        "dml_bias.metrics:retrieval_metrics",
        lambda dtype: call(*retrieval_inputs(dtype).args, ks=(1, 2)),
        instance(dict, **{"recall@1": number(0, 1), "map@r": number(0, 1), "num_queries": number(10, 10)}),
        out=pick(*KEYS),
        reference=retrieval_ref,
        skip=NUMBER_IS_NOT_DIFF,
    ),
    Entry(
        "dml_bias.metrics:RetrievalEvaluator",
        lambda dtype: retrieval_inputs(dtype),
        instance(dict, **{"recall@1": number(0, 1), "num_queries": number(10, 10)}),
        make=lambda dtype: M.RetrievalEvaluator(ks=(1, 2)),
        invoke=evaluate,
        out=pick(*KEYS),
        reference=retrieval_ref,
        twin=lambda ev: lambda q, ql: M.retrieval_metrics(q, ql, ks=(1, 2)),
        skip=NUMBER_IS_NOT_DIFF,
    ),
    Entry(
        "dml_bias.metrics:RetrievalEvaluator",
        lambda dtype: separate_inputs(dtype),
        instance(dict, **{"recall@1": number(0, 1), "num_queries": number(6, 6)}),
        make=lambda dtype: M.RetrievalEvaluator(ks=(1, 2), separate_reference=True),
        invoke=evaluate,
        out=pick(*KEYS),
        reference=retrieval_ref,
        twin=lambda ev: lambda q, ql, r, rl: M.retrieval_metrics(q, ql, r, rl, ks=(1, 2)),
        tag="separate reference",
        skip=NUMBER_IS_NOT_DIFF,
    ),
    Entry(
        "dml_bias.metrics:sharded_knn",
        lambda dtype: call(rows(6, 4, dtype, 1), rows(9, 4, dtype, 2), 3, shard_offset=0),
        knn_expect(3, 6),
        reference=lambda q, r, k, **_: knn_reference(torch.cat([q, r])[: len(q)], r, k),
        skip={"gradcheck": SCORES_NO_GRAD},
    ),
    Entry(
        "dml_bias.metrics:sharded_retrieval_metrics",
        lambda dtype: call(
            rows(10, 4, dtype),
            LABELS.clone(),
            rows(10, 4, dtype),
            LABELS.clone(),
            ks=(1, 2),
            query_indices=torch.arange(10),
        ),
        instance(dict, **{"recall@1": number(0, 1), "num_queries": number(10, 10)}),
        out=pick(*KEYS),
        reference=lambda q, ql, *_, **__: retrieval_ref(q, ql),
        skip=NUMBER_IS_NOT_DIFF,
    ),
    Entry(
        "dml_bias.metrics:fitb_accuracy",
        lambda dtype: call(rows(5, 4, dtype, 3), torch.tensor([0, 1, 3, 2, 0])),
        number(0, 1),
        reference=lambda s, a: sum(int(s[i].argmax()) == int(a[i]) for i in range(len(a))) / len(a),
        skip=NUMBER_IS_NOT_DIFF,
    ),
    Entry(
        "dml_bias.metrics:compatibility_auc",
        lambda dtype: call(rows(1, 12, dtype, 4)[0], torch.tensor([1, 0] * 6)),
        number(0, 1),
        reference=auc_ref,
        skip=NUMBER_IS_NOT_DIFF,
    ),
    Entry(
        "dml_bias.metrics:revisited_average_precision",
        lambda dtype: call([0, 2, 5], 4),
        number(0, 1),
        reference=revisited_ap_ref,
        dtypes=(),
        skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": C.NOT_FLOAT, "device": "takes Python ranks"},
    ),
    Entry(
        "dml_bias.metrics:revisited_map",
        lambda dtype: call(RANKS.clone(), GND, kappas=(1, 2, 5)),
        instance(dict, easy=instance(dict), medium=instance(dict), hard=instance(dict)),
        reference=revisited_ref,
        dtypes=(),
        skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": C.NOT_FLOAT, "device": "ranks are read on the host"},
    ),
    Entry(
        "dml_bias.utils.accuracy_calculator:AccuracyCalculator",
        lambda dtype: call(*separate_inputs(dtype).args),
        instance(dict, precision_at_1=number(0, 1), r_precision=number(0, 1)),
        make=lambda dtype: AccuracyCalculator(
            include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k=10
        ),
        invoke=accuracy,
        reference=accuracy_ref,
        skip={"gradcheck": C.NOT_DIFFERENTIABLE, "twin": "its functional forms are the metrics' (see retrieval)"},
    ),
    Entry(
        "dml_bias.utils.accuracy_calculator:adjusted_mutual_info",
        lambda dtype: call([0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 2, 2]),
        number(-1, 1),
        reference=mutual_info_ref(adjusted=True),
        dtypes=(),
        skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": C.NOT_FLOAT, "device": "labels are read on the host"},
    ),
    Entry(
        "dml_bias.utils.accuracy_calculator:normalized_mutual_info",
        lambda dtype: call([0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 2, 2]),
        number(0, 1),
        reference=mutual_info_ref(adjusted=False),
        dtypes=(),
        skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": C.NOT_FLOAT, "device": "labels are read on the host"},
    ),
]

TESTER_SKIP = {
    "gradcheck": C.NOT_DIFFERENTIABLE,
    "twin": "its functional form is the AccuracyCalculator's",
    "device": "data_device is a constructor argument; the CUDA path is tested in tests/pml",
}


def make_tester(cls_name: str) -> Any:
    def make(dtype: torch.dtype) -> Any:
        from dml_bias import testers
        from dml_bias.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=("precision_at_1", "r_precision"), k=10)
        return getattr(testers, cls_name)(accuracy_calculator=calc, progress=False, dataloader_num_workers=0)

    return make


ENTRIES += [
    Entry(
        "dml_bias.testers:GlobalEmbeddingSpaceTester",
        lambda dtype: retrieval_inputs(dtype),
        instance(dict, precision_at_1_level0=number(0, 1)),
        make=make_tester("GlobalEmbeddingSpaceTester"),
        invoke=run_tester,
        out=pick("precision_at_1_level0", "r_precision_level0"),
        reference=ref_tester,
        skip=TESTER_SKIP,
    ),
    Entry(
        "dml_bias.testers:BaseTester",
        lambda dtype: retrieval_inputs(dtype),
        lambda out, dtype: (tensor((10, 4))(out[0], dtype), tensor((10, 1), torch.int64)(out[1], dtype)) and None,
        make=make_tester("BaseTester"),
        invoke=embed,
        reference=lambda x, y: (x / x.norm(dim=1, keepdim=True), y.unsqueeze(1)),
        skip=TESTER_SKIP,
    ),
]


@pytest.mark.parametrize(("entry", "check"), C.params(ENTRIES))
def test_contract(entry: Entry, check: str) -> None:
    C.run(entry, check)
