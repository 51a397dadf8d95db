"""The test contract (``tests/contract.py``) for the PML-compatible pieces (distances, reducers, miners,
samplers), ``dml_bias.similarity`` and the distributed helpers in single-process mode."""

from __future__ import annotations

import math
from typing import Any

import contract as C
import pytest
import torch
from contract import Call, Entry, call, instance, nothing, tensor
from torch import nn

from dml_bias import distances as D
from dml_bias import distributed as dist
from dml_bias import miners as Mi
from dml_bias import reducers as R
from dml_bias import similarity as S
from dml_bias.datasets import MPerClassBatchSampler
from dml_bias.losses import ContrastiveLoss, ProxyAnchorLoss
from dml_bias.samplers import MPerClassSampler
from dml_bias.utils import distributed as udist

F64 = torch.float64
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])


def rows(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def import_pml() -> Any:
    pml = pytest.importorskip("pytorch_metric_learning")
    import pytorch_metric_learning.distances
    import pytorch_metric_learning.miners  # noqa: F401

    return pml


# ------------------------------------------------------------------------------- subclasses of the base classes


class L1Distance(D.BaseDistance):
    """A user's distance: the L1 distance (what BaseDistance's subclassing contract asks for)."""

    def __init__(self) -> None:
        super().__init__(normalize_embeddings=False, p=1, is_inverted=False)

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return (query_emb[:, None, :] - ref_emb[None, :, :]).abs().sum(-1)

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return (query_emb - ref_emb).abs().sum(-1)


class FirstPairsMiner(Mi.BaseMiner):
    """A user's miner: the first positive and negative partner of anchor 0."""

    def mine(self, embeddings: Any, labels: Any, ref_emb: Any, ref_labels: Any) -> tuple[torch.Tensor, ...]:
        ref_labels = labels if ref_labels is None else ref_labels
        pos = [j for j in range(len(ref_labels)) if ref_labels[j] == labels[0] and (ref_emb is not None or j)]
        neg = [j for j in range(len(ref_labels)) if ref_labels[j] != labels[0]]
        zero = torch.zeros(1, dtype=torch.long)
        return zero, torch.tensor(pos[:1]), zero, torch.tensor(neg[:1])


class MaxReducer(R.BaseReducer):
    """A user's reducer: the largest loss."""

    def reduce(self, losses: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
        return losses.max()


# ------------------------------------------------------------------------------------------------ references


def cos_ref(x: torch.Tensor, y: torch.Tensor | None = None, *_: Any, **__: Any) -> torch.Tensor:
    y = x if y is None else y
    return torch.tensor(
        [[float(a @ b) / math.sqrt(float(a @ a) * float(b @ b)) for b in y.double()] for a in x.double()], dtype=F64
    )


def lp_ref(x: torch.Tensor, y: torch.Tensor | None = None, normalize: bool = True, p: float = 2) -> torch.Tensor:
    y = x if y is None else y
    x, y = x.double(), y.double()
    if normalize:
        x, y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    return torch.tensor([[float(((a - b).abs() ** p).sum()) ** (1 / p) for b in y] for a in x], dtype=F64)


def loss_dict(dtype: torch.dtype, kind: str = "element", **extra: Any) -> Call:
    losses = torch.tensor([0.0, 1.5, 0.25, 4.0, 0.0, 2.0], dtype=dtype)
    info = {"losses": losses, "indices": None, "reduction_type": kind, **extra}
    return call({"loss": info}, rows(6, 2, dtype), None)


def reduce_ref(fn: Any) -> Any:
    return lambda d, *_: torch.tensor(fn(d["loss"]["losses"].double().tolist()), dtype=F64)


def miner_ref(pml_name: str, **kw: Any) -> Any:
    """The peer: PML's miner of the same configuration, on the same float64 rows."""

    def reference(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pml = import_pml()
        distance = kw.pop("distance", None)
        pml_kw = dict(kw)
        if distance == "euclidean":
            pml_kw["distance"] = pml.distances.LpDistance()
        return tuple(getattr(pml.miners, pml_name)(**pml_kw)(emb, labels))

    return reference


def sorted_tuple(idx: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Index tuples as sets of triplets, or of positive and negative pairs (their order is not the contract)."""
    groups = [idx] if len(idx) == 3 else [idx[:2], idx[2:]]
    out: list[torch.Tensor] = []
    for group in groups:
        rows_ = sorted(zip(*(t.long().tolist() for t in group), strict=True))
        out += [torch.tensor([r[i] for r in rows_], dtype=torch.long) for i in range(len(group))]
    return tuple(out)


def index_tuple(length: int) -> Any:
    def check(out: Any, _: torch.dtype) -> None:
        assert isinstance(out, tuple), f"expected a tuple, got {type(out).__name__}"
        assert len(out) == length
        for t in out:
            tensor(None, torch.int64)(t, _)

    return check


def class_counts(labels: torch.Tensor, batch_size: int) -> Any:
    """Per batch of the sampled order: how many samples each class got."""

    def pick(indices: list[int]) -> list[list[int]]:
        batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        return [sorted(torch.bincount(labels[b]).tolist()) for b in batches]

    return pick


SAMPLER_LABELS = torch.arange(3).repeat_interleave(4)  # 3 classes x 4 samples
SAMPLER_SKIP = {
    "gradcheck": C.NOT_DIFFERENTIABLE,
    "dtype": C.NOT_FLOAT,
    "device": C.CPU_ONLY,
    "twin": "a torch.utils.data.Sampler: it has no functional form",
}
NO_GRAD_INDICES = "returns indices (mined under no_grad)"
SINGLE = "single process: the identity, checked by the reference"

ENTRIES: list[Entry] = [
    # -------------------------------------------------------------------------------------------- similarity
    Entry(
        "dml_bias.similarity:normalize",
        lambda dtype: call(rows(5, 3, dtype)),
        tensor((5, 3)),
        reference=lambda x: x.double() / x.double().norm(dim=1, keepdim=True),
        grad=(0,),
    ),
    *[
        Entry(
            "dml_bias.similarity:pairwise",
            lambda dtype, m=metric: call(rows(4, 3, dtype), rows(5, 3, dtype, 1), m),
            tensor((4, 5)),
            reference=ref,
            grad=(0, 1),
            tag=metric,
        )
        for metric, ref in [
            ("cosine", cos_ref),
            ("euclidean", lambda x, y, m: lp_ref(x, y)),
            ("dot", lambda x, y, m: x.double() @ y.double().T),
        ]
    ],
    Entry(
        "dml_bias.similarity:is_similarity",
        lambda dtype: call("dot"),
        lambda out, _: None if out is True else pytest.fail(f"expected True, got {out!r}"),
        reference=lambda metric: metric in ("cosine", "dot"),
        dtypes=(),
        skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": C.NOT_FLOAT, "unchanged": "takes a string"},
    ),
    # ------------------------------------------------------------------------------------- the checks switch
    Entry(
        "dml_bias:set_checks",
        lambda dtype: call(True),  # switching on what is on: the process state is left as it was
        lambda out, _: None if out is True else pytest.fail(f"expected the previous setting True, got {out!r}"),
        reference=lambda enabled: True,
        dtypes=(),
        skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": C.NOT_FLOAT, "device": "process state, no tensors"},
    ),
    Entry(
        "dml_bias:checks_enabled",
        lambda dtype: call(),
        lambda out, _: None if out is True else pytest.fail(f"expected True (the default), got {out!r}"),
        reference=lambda: True,
        dtypes=(),
        skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": C.NOT_FLOAT, "device": "process state, no tensors"},
    ),
    # -------------------------------------------------------------------------------------------- distances
    Entry(
        "dml_bias.distances:CosineSimilarity",
        lambda dtype: call(rows(4, 3, dtype), rows(5, 3, dtype, 1)),
        tensor((4, 5)),
        make=lambda dtype: D.CosineSimilarity(),
        reference=cos_ref,
        twin=lambda d: lambda x, y: S.pairwise(x, y, "cosine"),
        grad=(0, 1),
    ),
    Entry(
        "dml_bias.distances:DotProductSimilarity",
        lambda dtype: call(rows(4, 3, dtype), rows(5, 3, dtype, 1)),
        tensor((4, 5)),
        make=lambda dtype: D.DotProductSimilarity(normalize_embeddings=False),
        reference=lambda x, y: x.double() @ y.double().T,
        twin=lambda d: lambda x, y: S.pairwise(x, y, "dot", normalize_embeddings=False),
        grad=(0, 1),
    ),
    Entry(
        "dml_bias.distances:LpDistance",
        lambda dtype: call(rows(4, 3, dtype), rows(5, 3, dtype, 1)),
        tensor((4, 5)),
        make=lambda dtype: D.LpDistance(),
        reference=lambda x, y: lp_ref(x, y),
        twin=lambda d: lambda x, y: S.pairwise(x, y, "euclidean"),
        grad=(0, 1),
    ),
    Entry(
        "dml_bias.distances:LpDistance",
        lambda dtype: call(rows(4, 3, dtype), rows(5, 3, dtype, 1)),
        tensor((4, 5)),
        make=lambda dtype: D.LpDistance(p=1, normalize_embeddings=False),
        reference=lambda x, y: lp_ref(x, y, normalize=False, p=1),
        grad=(0, 1),
        tag="p=1, raw",
        skip={"twin": "similarity.pairwise has no L1 metric"},
    ),
    Entry(
        "dml_bias.distances:BaseDistance",
        lambda dtype: call(rows(4, 3, dtype), rows(5, 3, dtype, 1)),
        tensor((4, 5)),
        make=lambda dtype: L1Distance(),
        reference=lambda x, y: lp_ref(x, y, normalize=False, p=1),
        twin=lambda d: lambda x, y: D.LpDistance(p=1, normalize_embeddings=False)(x, y),
        grad=(0, 1),
        tag="a subclass",
    ),
    # --------------------------------------------------------------------------------------------- reducers
    *[
        Entry(
            f"dml_bias.reducers:{name}",
            lambda dtype, kw=kw: loss_dict(dtype, **kw),
            tensor(()),
            make=make,
            reference=reduce_ref(fn),
            skip={
                "gradcheck": "a sum, mean or selection of the losses: exercised by every loss's gradcheck",
                "twin": "a reducer has no functional twin: its functional form is the reference",
            },
            tag=tag,
        )
        for name, make, fn, kw, tag in [
            ("MeanReducer", lambda dtype: R.MeanReducer(), lambda v: sum(v) / len(v), {}, ""),
            ("SumReducer", lambda dtype: R.SumReducer(), sum, {}, ""),
            (
                "AvgNonZeroReducer",
                lambda dtype: R.AvgNonZeroReducer(),
                lambda v: sum(v) / sum(x > 0 for x in v),
                {},
                "",
            ),
            ("DivisorReducer", lambda dtype: R.DivisorReducer(), lambda v: sum(v) / 4, {"divisor": 4}, ""),
            (
                "ThresholdReducer",
                lambda dtype: R.ThresholdReducer(low=0.1, high=3.0),
                lambda v: sum(x for x in v if 0.1 < x < 3.0) / sum(0.1 < x < 3.0 for x in v),
                {},
                "",
            ),
            ("BaseReducer", lambda dtype: MaxReducer(), max, {}, "a subclass"),
        ]
    ],
    Entry(
        "dml_bias.reducers:DoNothingReducer",
        loss_dict,
        instance(dict, loss=instance(dict, losses=tensor((6,)))),
        make=lambda dtype: R.DoNothingReducer(),
        out=lambda d: d["loss"]["losses"],
        reference=lambda d, *_: d["loss"]["losses"].double(),
        skip={"gradcheck": "returns the losses as they are", "twin": "the identity has no twin"},
    ),
    # ----------------------------------------------------------------------------------------------- miners
    *[
        Entry(
            f"dml_bias.miners:{name}",
            lambda dtype: call(rows(8, 3, dtype, 2), LABELS.clone()),
            index_tuple(length),
            make=make,
            out=sorted_tuple,
            reference=lambda e, y, ref=ref: sorted_tuple(ref(e, y)),
            skip={"gradcheck": NO_GRAD_INDICES, "twin": "a miner has no functional twin: PML's miner is the peer"},
        )
        for name, make, ref, length in [
            ("BatchHardMiner", lambda dtype: Mi.BatchHardMiner(), miner_ref("BatchHardMiner", distance="euclidean"), 3),
            (
                "MultiSimilarityMiner",
                lambda dtype: Mi.MultiSimilarityMiner(0.1),
                miner_ref("MultiSimilarityMiner", epsilon=0.1),
                4,
            ),
            (
                "PairMarginMiner",
                lambda dtype: Mi.PairMarginMiner(0.2, 0.8),
                miner_ref("PairMarginMiner", pos_margin=0.2, neg_margin=0.8, distance="euclidean"),
                4,
            ),
            (
                "TripletMarginMiner",
                lambda dtype: Mi.TripletMarginMiner(0.2, "semihard"),
                miner_ref("TripletMarginMiner", margin=0.2, type_of_triplets="semihard", distance="euclidean"),
                3,
            ),
        ]
    ],
    Entry(
        "dml_bias.miners:BaseMiner",
        lambda dtype: call(rows(8, 3, dtype, 2), LABELS.clone()),
        index_tuple(4),
        make=lambda dtype: FirstPairsMiner(),
        reference=lambda e, y: (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2])),
        tag="a subclass",
        skip={"gradcheck": NO_GRAD_INDICES, "twin": "a miner has no functional twin"},
    ),
    # --------------------------------------------------------------------------------------------- samplers
    Entry(
        "dml_bias.samplers:MPerClassSampler",
        lambda dtype: call(),
        lambda out, _: tensor((12,), torch.int64)(torch.tensor(out), _),
        make=lambda dtype: MPerClassSampler(
            SAMPLER_LABELS, m=2, length_before_new_iter=12, generator=torch.Generator().manual_seed(0)
        ),
        invoke=lambda sampler: list(iter(sampler)),
        out=class_counts(SAMPLER_LABELS, 6),
        reference=lambda: [[2, 2, 2], [2, 2, 2]],  # m=2 of each of the 3 classes per batch of 6
        dtypes=(),
        skip=SAMPLER_SKIP,
    ),
    Entry(
        "dml_bias.datasets:MPerClassBatchSampler",
        lambda dtype: call(),
        lambda out, _: None if all(len(b) == 6 for b in out) else pytest.fail("batches of 6 expected"),
        make=lambda dtype: MPerClassBatchSampler(
            SAMPLER_LABELS, m=2, batch_size=6, generator=torch.Generator().manual_seed(0)
        ),
        invoke=lambda sampler: list(iter(sampler)),
        out=lambda batches: class_counts(SAMPLER_LABELS, 6)([i for b in batches for i in b]),
        reference=lambda: [[2, 2, 2], [2, 2, 2]],
        dtypes=(),
        skip=SAMPLER_SKIP,
    ),
    # ---------------------------------------------------------------------------------- distributed, 1 process
    Entry(
        "dml_bias.distributed:gather_with_grad",
        lambda dtype: call(rows(4, 3, dtype)),
        tensor((4, 3)),
        reference=lambda x: x.double(),
        grad=(0,),
    ),
    Entry(
        "dml_bias.distributed:gather_no_grad",
        lambda dtype: call(rows(4, 3, dtype)),
        tensor((4, 3)),
        reference=lambda x: x.double(),
        skip={"gradcheck": "gathers without autograd by definition"},
    ),
    *[
        Entry(
            f"dml_bias.distributed:{name}",
            lambda dtype: call(),
            lambda out, _, v=value: None if out == v else pytest.fail(f"expected {v!r}, got {out!r}"),
            reference=lambda v=value: v,
            dtypes=(),
            skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": C.NOT_FLOAT, "device": "no tensors involved"},
        )
        for name, value in [("get_rank", 0), ("get_world_size", 1), ("is_distributed", False)]
    ],
    *[
        Entry(
            f"dml_bias.distributed:{name}",
            lambda dtype: call(linear_with_grad(dtype)),
            nothing,
            out=lambda _: None,
            reference=lambda *_: None,
            skip={"gradcheck": "acts on a module's parameters or gradients", "dtype": SINGLE},
        )
        for name in ("average_gradients", "broadcast_parameters")
    ],
    Entry(
        "dml_bias.distributed:DistributedLossWrapper",
        lambda dtype: call(rows(8, 4, dtype), LABELS.clone()),
        tensor((), torch.float32),
        make=lambda dtype: dist.DistributedLossWrapper(proxy_loss()),
        twin=lambda wrapped: proxy_loss(),
        reference=lambda e, y: proxy_loss()(e, y),
        grad=(0,),
        skip={"dtype": "the proxies' dtype (float32) sets the loss dtype"},
    ),
    Entry(
        "dml_bias.utils.distributed:DistributedLossWrapper",
        lambda dtype: call(rows(8, 4, dtype), LABELS.clone()),
        tensor(()),
        make=lambda dtype: udist.DistributedLossWrapper(ContrastiveLoss(), efficient=False),
        twin=lambda wrapped: ContrastiveLoss(),
        reference=lambda e, y: ContrastiveLoss()(e, y),
        grad=(0,),
        tag="PML's",
    ),
    Entry(
        "dml_bias.utils.distributed:DistributedMinerWrapper",
        lambda dtype: call(rows(8, 3, dtype, 2), LABELS.clone()),
        index_tuple(3),
        make=lambda dtype: udist.DistributedMinerWrapper(Mi.BatchHardMiner()),
        out=lambda idx: tuple(idx),
        twin=lambda wrapped: Mi.BatchHardMiner(),
        reference=lambda e, y: tuple(Mi.BatchHardMiner()(e, y)),
        skip={"gradcheck": NO_GRAD_INDICES},
    ),
]


def proxy_loss() -> ProxyAnchorLoss:
    torch.manual_seed(0)
    return ProxyAnchorLoss(3, 4)


def linear_with_grad(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).to(dtype)
    layer(torch.ones(1, 3, dtype=dtype)).sum().backward()
    return layer


@pytest.mark.parametrize(("entry", "check"), C.params(ENTRIES))
def test_contract(entry: Entry, check: str) -> None:
    C.run(entry, check)
