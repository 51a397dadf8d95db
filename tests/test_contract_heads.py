"""The test contract (``tests/contract.py``) for the heads (GeM, DELG, PAN), the pair protocols built on a head
(few-shot, FITB, compatibility) and retrieval post-processing (spatial verification, re-ranking)."""

from __future__ import annotations

import copy
import math
from typing import Any

import contract as C
import pytest
import torch
import torchvision
from contract import Call, Entry, call, instance, number, tensor
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from dml_bias import heads as H
from dml_bias import metrics as M

F64 = torch.float64


def rows(*shape: int, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def seeded_module(factory: Any) -> Any:
    """``make``: the module built from a fixed seed, in eval mode and in the dtype."""

    def make(dtype: torch.dtype) -> nn.Module:
        torch.manual_seed(0)
        return factory().double().to(dtype).eval()

    return make


# ------------------------------------------------------------------------------------------------ references


def gem_ref(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    n, c = x.shape[:2]
    out = torch.empty(n, c, dtype=F64)
    for i in range(n):
        for j in range(c):
            values = [max(float(v), eps) ** p for v in x[i, j].flatten()]
            out[i, j] = (sum(values) / len(values)) ** (1 / p)
    return out


def pan_ref(module: H.ConditionalSimilarity, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """The PAN score of each pair from the formula: sum_k softmax(r)_k * sigmoid(z_k), one pair at a time."""
    w_z, b_z = module.condition_layer.weight.detach().double(), module.condition_layer.bias.detach().double()
    w_r, b_r = module.relevance_layer.weight.detach().double(), module.relevance_layer.bias.detach().double()
    scores = []
    for a, b in zip(h1.double(), h2.double(), strict=True):
        j = (a - b).abs()
        z, r = w_z @ j + b_z, w_r @ j + b_r
        scores.append(sum(math.exp(float(rk)) * (1 / (1 + math.exp(-float(zk)))) for rk, zk in zip(r, z, strict=True)))
        scores[-1] /= sum(math.exp(float(rk)) for rk in r)
    return torch.tensor(scores, dtype=F64)


def pan_loss_ref(out: Any, target: torch.Tensor, a1: Any = None, a2: Any = None, *, lam: float = 1.0, **_: Any):
    """BCE of the pair score plus lam x the mean BCE of the supervised conditions against a1 | a2."""
    score, z = out.score.detach().double().tolist(), out.condition_logits.detach().double()
    y = target.double().tolist()
    total = -sum(float(yi * math.log(s) + (1 - yi) * math.log(1 - s)) for s, yi in zip(score, y, strict=True))
    loss = total / len(y)
    if a1 is not None:
        t = (a1.bool() | a2.bool()).double()
        per_row = []
        for zi, ti in zip(z, t, strict=True):
            probs = [1 / (1 + math.exp(-float(v))) for v in zi[: len(ti)]]
            per_row.append(
                -sum(tk * math.log(p) + (1 - tk) * math.log(1 - p) for p, tk in zip(probs, ti.tolist(), strict=True))
                / len(ti)
            )
        loss += lam * sum(per_row) / len(per_row)
    return torch.tensor(loss, dtype=F64)


def gate_ref(a1: torch.Tensor, a2: torch.Tensor, gate: str) -> torch.Tensor:
    ops = {"or": lambda x, y: x or y, "and": lambda x, y: x and y, "xor": lambda x, y: x != y}
    return torch.tensor(
        [
            [float(ops[gate](bool(x), bool(y))) for x, y in zip(r1, r2, strict=True)]
            for r1, r2 in zip(a1, a2, strict=True)
        ]
    )


def global_head_ref(head: H.DELGGlobalHead, x: torch.Tensor) -> torch.Tensor:
    pooled = gem_ref(x, float(head.pool.p), head.pool.eps)
    white = pooled @ head.whiten.weight.double().T + head.whiten.bias.double()
    return white / white.norm(dim=1, keepdim=True)


def local_head_ref(head: H.DELGLocalHead, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1x1 convolutions as einsums; BatchNorm in eval mode with its running statistics; softplus attention."""
    x = x.double()

    def conv(layer: Any, t: torch.Tensor) -> torch.Tensor:
        assert layer.bias is not None
        return torch.einsum("oc,nchw->nohw", layer.weight.double()[:, :, 0, 0], t) + layer.bias.double()[:, None, None]

    codes = conv(head.encoder, x)
    rec = conv(head.decoder[0], codes).clamp_min(0)
    bn: Any = head.attention[1]
    hidden = (conv(head.attention[0], rec) - bn.running_mean.double()[:, None, None]) / torch.sqrt(
        bn.running_var.double()[:, None, None] + bn.eps
    ) * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
    attention = torch.log1p(torch.exp(conv(head.attention[3], hidden.clamp_min(0))[:, 0]))
    return attention, codes, rec


def matrix_ref(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Every (query, gallery) score from the formula, pair by pair."""
    head = pan_head(F64)
    return torch.stack([pan_ref(head, q[i : i + 1].expand(len(g), -1), g) for i in range(len(q))])


def score_table(head: Any, features: torch.Tensor) -> list[list[float]]:
    n = len(features)
    with torch.no_grad():
        return [[float(head(features[i : i + 1], features[j : j + 1]).score[0]) for j in range(n)] for i in range(n)]


def fitb_ref(head: Any, features: torch.Tensor, questions: list[tuple[list[int], list[int]]], **_: Any):
    table = score_table(head, features)
    return torch.tensor(
        [[sum(table[c][i] for i in items) / len(items) for c in answers] for items, answers in questions], dtype=F64
    )


def compat_ref(head: Any, features: torch.Tensor, outfits: list[list[int]], **_: Any) -> torch.Tensor:
    table = score_table(head, features)
    out = []
    for items in outfits:
        pairs = [table[items[a]][items[b]] for a in range(len(items)) for b in range(a + 1, len(items))]
        out.append(sum(pairs) / len(pairs))
    return torch.tensor(out, dtype=F64)


def few_shot_ref(head: Any, features: torch.Tensor, labels: torch.Tensor, **kw: Any) -> float:
    """Explicit loops over the same episodes: a query goes to the class of highest mean support score."""
    table = score_table(head, features)
    episodes = M.few_shot_episodes(labels, **{k: v for k, v in kw.items() if k != "ddof"})
    accs = []
    for support, query in episodes:
        n_way, k_shot = support.shape
        correct = 0
        for true_w in range(n_way):
            for q in query[true_w].tolist():
                means = [sum(table[q][s] for s in support[w].tolist()) / k_shot for w in range(n_way)]
                correct += max(range(n_way), key=lambda w: (means[w], -w)) == true_w
        accs.append(correct / query.numel())
    return sum(accs) / len(accs)


# --------------------------------------------------------------------------------------------------- inputs


def pan_head(dtype: torch.dtype) -> H.ConditionalSimilarity:
    torch.manual_seed(0)  # drawn in float64 and rounded: the same head in every dtype
    return H.ConditionalSimilarity(4, 3, dtype=F64).to(dtype).eval()


def pan_loss_inputs(dtype: torch.dtype) -> Call:
    out = pan_head(dtype)(rows(5, 4, dtype=dtype, seed=1), rows(5, 4, dtype=dtype, seed=2))
    a1 = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1], [0, 0]])
    return call(out, torch.tensor([1, 0, 1, 0, 0]), a1, a1.flip(0), lam=0.5)


def local_view() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    locations = torch.rand(30, 2, generator=g, dtype=F64) * 1000
    descriptors = torch.nn.functional.normalize(torch.randn(30, 64, generator=g, dtype=F64), dim=1)
    moved = locations * 0.5 + torch.tensor([10.0, 20.0], dtype=F64)  # an exact affine view
    strangers = torch.nn.functional.normalize(torch.randn(30, 64, generator=g, dtype=F64), dim=1)
    return moved, descriptors, locations, strangers


def verification_inputs(dtype: torch.dtype) -> Call:
    moved, desc, loc, strangers = (t.to(dtype) for t in local_view())
    return call(moved, desc, [loc, loc.flip(0)], [desc, strangers], max_trials=50)


def rerank_inputs(dtype: torch.dtype) -> Call:
    moved, desc, loc, strangers = (t.to(dtype) for t in local_view())
    ranks, scores = torch.tensor([[1, 0, 2]]), torch.tensor([[0.9, 0.8, 0.7]], dtype=dtype)
    return call(ranks, scores, [moved], [desc], [loc, loc, loc], [strangers, strangers.flip(0), desc], max_trials=50)


SIX = torch.tensor([0, 0, 0, 1, 1, 2])
QUESTIONS = [([0, 1], [2, 3, 4]), ([5], [6, 7, 0])]
OUTFITS = [[0, 1, 2], [3, 4], [5, 0, 7]]
FEW_LABELS = torch.arange(4).repeat_interleave(4)
FEW_KW = {"n_way": 3, "k_shot": 2, "n_query": 2, "num_episodes": 4}


def few_shot_inputs(dtype: torch.dtype) -> Call:
    return call(
        pan_head(dtype),
        rows(16, 4, dtype=dtype, seed=5),
        FEW_LABELS.clone(),
        **FEW_KW,
        generator=torch.Generator().manual_seed(0),
    )


_BACKBONE: list[nn.Module] = []


def small_backbone() -> torchvision.models.ResNet:
    """A ResNet of one BasicBlock per stage (5.4M parameters, not 11M), built once and copied."""
    if not _BACKBONE:
        torch.manual_seed(0)
        _BACKBONE.append(ResNet(BasicBlock, [1, 1, 1, 1]))
    return copy.deepcopy(_BACKBONE[0])


def episode_invariants(episodes: Any) -> list[tuple[bool, bool, bool]]:
    """Per episode: one class per row (support and query alike), n_way distinct classes, no shared sample."""
    out = []
    for support, query in episodes:
        rows = [FEW_LABELS[s].tolist() + FEW_LABELS[q].tolist() for s, q in zip(support, query, strict=True)]
        one_class = all(len(set(row)) == 1 for row in rows)
        distinct = len({row[0] for row in rows}) == len(rows)
        disjoint = not set(support.flatten().tolist()) & set(query.flatten().tolist())
        out.append((one_class, distinct, disjoint))
    return out


def few_shot_expect(out: Any, dtype: torch.dtype) -> None:
    episodes = list(out)
    assert len(episodes) == 4
    for support, query in episodes:
        tensor((3, 2), torch.int64)(support, dtype)
        tensor((3, 2), torch.int64)(query, dtype)


NO_GRAD_RANKING = "scores a whole gallery for ranking (evaluation): forward's gradcheck covers the formula"
PROTOCOL = "a protocol over a trained head: its scores are not differentiated"
DELG_SKIP = {
    "gradcheck": "a ResNet backbone: too large for a float64 gradcheck; its heads are gradchecked on their own",
    "reference": "composed of the backbone and the two heads, whose values are checked against references here",
    "twin": C.NO_TWIN,
}

ENTRIES: list[Entry] = [
    Entry(
        "dml_bias.heads:gem",
        lambda dtype: call(rows(2, 3, 4, 4, dtype=dtype).abs() + 0.1, p=2.5),
        tensor((2, 3)),
        reference=lambda x, p: gem_ref(x, p),
        grad=(0,),
    ),
    Entry(
        "dml_bias.heads:GeM",
        lambda dtype: call(rows(2, 3, 4, 4, dtype=dtype).abs() + 0.1),
        tensor((2, 3)),
        make=seeded_module(lambda: H.GeM(p=2.5, learnable=True)),
        reference=lambda x: gem_ref(x, 2.5),
        twin=lambda pool: lambda x: H.gem(x, p=pool.p),
        grad=(0,),
    ),
    Entry(
        "dml_bias.heads:ConditionalSimilarity",
        lambda dtype: call(rows(5, 4, dtype=dtype, seed=1), rows(5, 4, dtype=dtype, seed=2)),
        instance(H.ConditionalSimilarityOutput, score=tensor((5,)), condition_scores=tensor((5, 3))),
        make=pan_head,
        out=lambda o: o.score,
        reference=lambda h1, h2: pan_ref(pan_head(F64), h1, h2),
        grad=(0, 1),
        skip={"twin": C.NO_TWIN},
    ),
    Entry(
        "dml_bias.heads:ConditionalSimilarity",
        lambda dtype: call(rows(3, 4, dtype=dtype, seed=1), rows(7, 4, dtype=dtype, seed=2), chunk_size=2),
        tensor((3, 7)),
        make=pan_head,
        invoke=lambda head, q, g, **kw: head.score_matrix(q, g, **kw),
        reference=lambda q, g, **_: matrix_ref(q, g),
        tag="score_matrix, chunked",
        skip={"twin": "its pairwise form is forward (the entry above): the reference", "gradcheck": NO_GRAD_RANKING},
    ),
    Entry(
        "dml_bias.heads:ConditionalSimilarity",
        lambda dtype: call(rows(3, 4, dtype=dtype, seed=1), rows(7, 4, dtype=dtype, seed=2), 2),
        lambda out, dtype: (tensor((3, 2))(out[0], dtype), tensor((3, 2), torch.int64)(out[1], dtype)) and None,
        make=pan_head,
        invoke=lambda head, q, g, k: head.topk(q, g, k),
        reference=lambda q, g, k: matrix_ref(q, g).topk(k, dim=1),
        out=tuple,
        tag="topk",
        skip={"twin": "score_matrix followed by torch.topk: the reference", "gradcheck": NO_GRAD_RANKING},
    ),
    Entry(
        "dml_bias.heads:pan_loss",
        pan_loss_inputs,
        tensor(()),
        reference=pan_loss_ref,
        skip={"gradcheck": "its input is a head's output tuple: the head's gradcheck covers the graph"},
    ),
    Entry(
        "dml_bias.heads:PANLoss",
        lambda dtype: call(*pan_loss_inputs(dtype).args[:4]),
        tensor(()),
        make=lambda dtype: H.PANLoss(lam=0.5),
        reference=lambda out, target, a1, a2: pan_loss_ref(out, target, a1, a2, lam=0.5),
        twin=lambda loss: lambda out, target, a1, a2: H.pan_loss(out, target, a1, a2, lam=loss.lam),
        skip={"gradcheck": "its input is a head's output tuple: the head's gradcheck covers the graph"},
    ),
    *[
        Entry(
            "dml_bias.heads:attribute_gate",
            lambda dtype, g=gate: call(
                torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]]), torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]]), g
            ),
            tensor((2, 4), torch.float32),
            reference=gate_ref,
            tag=gate,
            dtypes=(torch.float32,),
            skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": "binary attributes in, float32 gates out"},
        )
        for gate in ("or", "and", "xor")
    ],
    Entry(
        "dml_bias.heads:DELGGlobalHead",
        lambda dtype: call(rows(2, 16, 3, 3, dtype=dtype).abs()),
        tensor((2, 8)),
        make=seeded_module(lambda: H.DELGGlobalHead(in_channels=16, dim=8)),
        reference=lambda x: global_head_ref(seeded_module(lambda: H.DELGGlobalHead(16, 8))(F64), x),
        grad=(0,),
        skip={"twin": C.NO_TWIN},
    ),
    Entry(
        "dml_bias.heads:DELGLocalHead",
        lambda dtype: call(rows(2, 16, 3, 3, dtype=dtype).abs()),
        instance(H.LocalHeadOutput, attention=tensor((2, 3, 3)), descriptors=tensor((2, 4, 3, 3))),
        make=seeded_module(lambda: H.DELGLocalHead(in_channels=16, dim=4, hidden_channels=8)),
        out=tuple,
        reference=lambda x: local_head_ref(seeded_module(lambda: H.DELGLocalHead(16, 4, 8))(F64), x),
        skip={
            "twin": C.NO_TWIN,
            "gradcheck": "detaches its input by design (DELG's stop-gradient to the backbone): the gradient is 0",
        },
    ),
    Entry(
        "dml_bias.heads:DELG",
        lambda dtype: call(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=F64).to(dtype)),
        instance(H.DELGOutput, global_descriptor=tensor((2, 8)), attention=tensor(None)),
        make=seeded_module(lambda: H.DELG(small_backbone(), global_dim=8, local_dim=4)),
        out=lambda o: (o.global_descriptor, o.attention),
        skip=DELG_SKIP,
        tol=(1e-4, 1e-5),
    ),
    Entry(
        "dml_bias.heads:PairwiseSimilarityModel",
        lambda dtype: call(torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])),
        instance(H.ConditionalSimilarityOutput, score=tensor((3,), None)),
        make=lambda dtype: H.PairwiseSimilarityModel(
            nn.Embedding.from_pretrained(rows(6, 4, dtype=dtype, seed=3)), pan_head(dtype)
        ),
        out=lambda o: o.score,
        reference=lambda i, j: pan_ref(pan_head(F64), rows(6, 4, seed=3)[i], rows(6, 4, seed=3)[j]),
        skip={
            "gradcheck": "its inputs are indices; the head's gradcheck covers the graph",
            "twin": "its functional form is head(encoder(i), encoder(j)): the reference",
        },
    ),
    Entry(
        "dml_bias.metrics:fitb_scores",
        lambda dtype: call(pan_head(dtype), rows(8, 4, dtype=dtype, seed=4), QUESTIONS),
        tensor((2, 3)),
        reference=fitb_ref,
        skip={"gradcheck": PROTOCOL},
    ),
    Entry(
        "dml_bias.metrics:compatibility_scores",
        lambda dtype: call(pan_head(dtype), rows(8, 4, dtype=dtype, seed=4), OUTFITS),
        tensor((3,)),
        reference=compat_ref,
        skip={"gradcheck": PROTOCOL},
    ),
    Entry(
        "dml_bias.metrics:few_shot_accuracy",
        few_shot_inputs,
        instance(M.FewShotResult, mean=number(0, 1), accuracies=tensor((4,), F64)),
        out=lambda r: r.mean,
        reference=lambda head, f, y, **kw: few_shot_ref(head, f, y, **kw),
        skip={"gradcheck": PROTOCOL},
    ),
    Entry(
        "dml_bias.metrics:few_shot_episodes",
        lambda dtype: call(FEW_LABELS.clone(), **FEW_KW, generator=torch.Generator().manual_seed(0)),
        few_shot_expect,
        out=episode_invariants,
        reference=lambda labels, **kw: [(True, True, True)] * kw["num_episodes"],
        dtypes=(),
        skip={
            "gradcheck": C.NOT_DIFFERENTIABLE,
            "dtype": C.NOT_FLOAT,
        },
    ),
    Entry(
        "dml_bias.heads:sample_pairs",
        lambda dtype: call(SIX.clone(), 8, generator=torch.Generator().manual_seed(0)),
        instance(H.PairIndices, first=tensor((8,), torch.int64), target=tensor((8,), torch.float32)),
        out=lambda p: (int(p.target.sum()), SIX[p.first].eq(SIX[p.second]).float().equal(p.target)),
        reference=lambda labels, n, **_: (4, True),  # positive_fraction=0.5 of 8; target = same label
        dtypes=(),
        skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": C.NOT_FLOAT},
    ),
    Entry(
        "dml_bias.retrieval:spatial_verification",
        verification_inputs,
        tensor((2,), torch.int64),
        reference=lambda *_, **__: torch.tensor([30, 0]),  # every point of the exact view; no descriptor match
        skip={"gradcheck": C.NOT_DIFFERENTIABLE},
    ),
    Entry(
        "dml_bias.retrieval:rerank",
        rerank_inputs,
        tensor((1, 3), torch.int64),
        reference=lambda *_, **__: torch.tensor([[2, 1, 0]]),  # image 2 is the view: it moves to the top
        skip={"gradcheck": C.NOT_DIFFERENTIABLE},
    ),
]


@pytest.mark.parametrize(("entry", "check"), C.params(ENTRIES))
def test_contract(entry: Entry, check: str) -> None:
    C.run(entry, check)
