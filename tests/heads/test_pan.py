"""PAN's conditional similarity head, attribute gates and loss (dml_bias.heads.pan).

References are written here independently: the per-pair forward by hand (K = 2), direct formulas for the joints,
the official code's loss (``nn.BCELoss`` on clamped probabilities) for the log-space loss, and a sort of the full
score matrix for ``topk``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, gradcheck
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from dml_bias.heads import (
    GATES,
    ConditionalSimilarity,
    ConditionalSimilarityOutput,
    PANLoss,
    attribute_gate,
    pan_loss,
)

PAN: Any = sys.modules["dml_bias.heads.pan"]
JOINTS = ("absdiff", "product", "concat")


def head_with(weight_s: list[list[float]], bias_s: list[float], weight_r: list[list[float]], bias_r: list[float]):
    k, d = len(weight_s), len(weight_s[0])
    head = ConditionalSimilarity(d, k, dtype=torch.float64)
    with torch.no_grad():
        head.condition_layer.weight.copy_(torch.tensor(weight_s))
        head.condition_layer.bias.copy_(torch.tensor(bias_s))
        head.relevance_layer.weight.copy_(torch.tensor(weight_r))
        head.relevance_layer.bias.copy_(torch.tensor(bias_r))
    return head


def output_from_logits(z: torch.Tensor, r: torch.Tensor) -> ConditionalSimilarityOutput:
    """An output tuple built from raw logits (the loss reads condition_logits and log_relevance)."""
    log_w = torch.log_softmax(r, dim=1)
    score = (log_w.exp() * torch.sigmoid(z)).sum(1)
    return ConditionalSimilarityOutput(score, torch.sigmoid(z), log_w.exp(), z, log_w)


def official_loss(
    z: torch.Tensor,
    r: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor | None,
    m: torch.Tensor | None,
    lam: float,
    eps: float = 0.0,
) -> torch.Tensor:
    """The official CUB loss: nn.BCELoss on clamped probabilities, certainty-masked mean over the conditions.

    ``eps = 1e-6`` is the official denominator; ``eps = 0`` with empty masks giving 0 is ours.
    """
    attrs = torch.sigmoid(z).clamp(0, 1)
    imps = torch.softmax(r, dim=1)
    out = (attrs * imps).sum(1).clamp(0, 1)
    loss = F.binary_cross_entropy(out, y.double())
    if t is None or lam == 0:
        return loss
    width = t.shape[1]
    m = torch.ones_like(t) if m is None else m.double()
    per = F.binary_cross_entropy(attrs[:, :width], t, reduction="none")
    den = m.sum(1) + eps if eps > 0 else m.sum(1).clamp_min(1)
    return loss + lam * ((m * per).sum(1) / den).mean()


# ------------------------------------------------------------------------------------------------------------------
# The head


def test_hand_computed_k2() -> None:
    # j = |[1, 0] - [0, 2]| = [1, 2]; z = I j = [1, 2]; r = [[1, 0], [0, 0]] j = [1, 0].
    head = head_with([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0], [[1.0, 0.0], [0.0, 0.0]], [0.0, 0.0])
    out = head(torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 2.0]], dtype=torch.float64))
    # w = softmax([1, 0]) = [e / (e + 1), 1 / (e + 1)] = [0.7310585786, 0.2689414214]
    assert_close(out.relevance, [[0.7310585786300049, 0.2689414213699951]])
    assert_close(out.log_relevance, [[math.log(0.7310585786300049), math.log(0.2689414213699951)]])
    # p_k = sigmoid([1, 2]) = [0.7310585786, 0.8807970780]
    assert_close(out.condition_scores, [[0.7310585786300049, 0.8807970779778823]])
    assert_close(out.condition_logits, [[1.0, 2.0]])
    # p = 0.7310585786^2 + 0.2689414214 * 0.8807970780 = 0.7713294635
    assert_close(out.score, [0.7713294634784331])
    # Loss, y = 1: -log p = 0.2596396770. OR targets of a1 = [1, 0], a2 = [0, 0]: t = [1, 0];
    # BCE(p_1, 1) = -log sigmoid(1) = 0.3132616875, BCE(p_2, 0) = -log(1 - sigmoid(2)) = 2.1269280110.
    y = torch.tensor([1])
    a1, a2 = torch.tensor([[1, 0]]), torch.tensor([[0, 0]])
    assert_close(pan_loss(out, y, lam=0.0), 0.2596396770071797)
    assert_close(pan_loss(out, y, a1, a2), 0.2596396770071797 + (0.3132616875182228 + 2.1269280110429714) / 2)
    # Certainty: only attribute 1 is certain on both sides -> the mean is over that condition alone.
    c1, c2 = torch.tensor([[True, True]]), torch.tensor([[True, False]])
    assert_close(pan_loss(out, y, a1, a2, c1, c2), 0.2596396770071797 + 0.3132616875182228)
    assert_close(pan_loss(out, y, a1, a2, c1, c2, lam=2.0), 0.2596396770071797 + 2 * 0.3132616875182228)
    # y = 0: -log(1 - p) = 1.4754730165.
    assert_close(pan_loss(out, torch.tensor([0.0]), lam=0.0), 1.4754730165038599)
    # No certain condition at all: the attribute term is exactly 0.
    none_certain = torch.zeros(1, 2, dtype=torch.bool)
    assert pan_loss(out, y, a1, a2, none_certain, c2).item() == pan_loss(out, y, lam=0.0).item()


def test_initialisation_follows_official_code() -> None:
    torch.manual_seed(3)
    head = ConditionalSimilarity(300, 200)
    bound_w = math.sqrt(6.0 / (300 + 200))  # Xavier-uniform
    bound_b = 1.0 / math.sqrt(300)  # nn.Linear's default bias
    for layer in (head.condition_layer, head.relevance_layer):
        assert layer.weight.abs().max() <= bound_w
        assert layer.weight.abs().max() > 0.95 * bound_w  # not the default (Kaiming) bound 1/sqrt(300) = 0.058
        assert layer.bias.abs().max() <= bound_b
        assert layer.bias.abs().max() > 0.9 * bound_b
    assert "joint='absdiff'" in repr(head)
    assert ConditionalSimilarity(4, 3, joint="concat").condition_layer.weight.shape == (3, 8)


@pytest.mark.parametrize("joint", JOINTS)
def test_forward_gradcheck(joint: str) -> None:
    head = ConditionalSimilarity(4, 3, joint=joint, dtype=torch.float64)
    h1, h2 = torch.randn(3, 4), torch.randn(3, 4)

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.flatten() for t in head(a, b)])

    assert gradcheck(fn, [h1, h2], fast_mode=True)
    assert gradcheck(lambda a, b: head(a, b).score, [h1, h2])


def test_absdiff_and_product_are_symmetric_concat_is_not() -> None:
    h1, h2 = torch.randn(6, 8), torch.randn(6, 8)
    for joint in ("absdiff", "product"):
        head = ConditionalSimilarity(8, 5, joint=joint)
        for a, b in zip(head(h1, h2), head(h2, h1), strict=True):
            assert torch.equal(a, b)
    head = ConditionalSimilarity(8, 5, joint="concat")
    assert not torch.allclose(head(h1, h2).score, head(h2, h1).score)


def test_k1_is_sigmoid_of_a_linear_layer() -> None:
    head = ConditionalSimilarity(6, 1, dtype=torch.float64)
    h1, h2 = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    out = head(h1, h2)
    expected = torch.sigmoid(F.linear((h1 - h2).abs(), head.condition_layer.weight, head.condition_layer.bias))
    assert_close(out.score, expected[:, 0])
    assert_close(out.relevance, torch.ones(9, 1))


@pytest.mark.parametrize("joint", JOINTS)
def test_joints_against_direct_formulas(joint: str) -> None:
    head = ConditionalSimilarity(4, 3, joint=joint, dtype=torch.float64)
    h1, h2 = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    if joint == "absdiff":
        j = (h1 - h2).abs()
    elif joint == "product":
        j = (h1 / h1.norm(dim=1, keepdim=True)) * (h2 / h2.norm(dim=1, keepdim=True))
    else:
        j = torch.cat([h1, h2], 1)
    ws, bs = head.condition_layer.weight, head.condition_layer.bias
    wr, br = head.relevance_layer.weight, head.relevance_layer.bias
    z, r = j @ ws.T + bs, j @ wr.T + br
    w = torch.exp(r) / torch.exp(r).sum(1, keepdim=True)
    out = head(h1, h2)
    assert_close(out.score, (w / (1 + torch.exp(-z))).sum(1))
    assert_close(out.condition_logits, z)
    assert_close(out.relevance, w)


def test_score_is_stable_and_in_unit_interval_at_extreme_logits() -> None:
    head = head_with([[80.0], [-80.0]], [0.0, 0.0], [[90.0], [-90.0]], [0.0, 0.0])
    head = head.float()
    out = head(torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [0.0]]))
    assert torch.isfinite(out.log_relevance).all()
    assert out.score.min() >= 0
    assert out.score.max() <= 1
    assert_close(out.score, [1.0, 0.5])  # pair 0: w ~ [1, 0], p_1 = sigmoid(80) = 1; pair 1: z = 0


def test_dropout_on_the_inputs_in_training_only() -> None:
    head = ConditionalSimilarity(32, 4, dropout=0.5)
    h1, h2 = torch.randn(16, 32), torch.randn(16, 32)
    head.train()
    torch.manual_seed(1)
    trained = head(h1, h2).score
    torch.manual_seed(1)
    keep1 = F.dropout(torch.ones(16, 32), 0.5, True)
    keep2 = F.dropout(torch.ones(16, 32), 0.5, True)
    with torch.no_grad():
        assert_close(trained, ConditionalSimilarity.forward(head.eval(), h1 * keep1, h2 * keep2).score)
    head.eval()
    assert torch.equal(head(h1, h2).score, head(h1, h2).score)
    head.train()
    # score_matrix never applies dropout, whatever the mode.
    assert_close(head.score_matrix(h1[:3], h2[:5]), head.eval().score_matrix(h1[:3], h2[:5]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_head(dtype: torch.dtype) -> None:
    head = ConditionalSimilarity(16, 6, dtype=dtype)
    h1, h2 = torch.randn(10, 16, dtype=dtype), torch.randn(10, 16, dtype=dtype)
    out = head(h1, h2)
    assert all(t.dtype == dtype for t in out)
    assert out.score.min() >= 0
    assert out.score.max() <= 1
    ref = head.double()(h1.double(), h2.double()).score
    assert_close(out.score.double(), ref, rtol=2e-2, atol=2e-2)


def test_mixed_dtypes_promote() -> None:
    head = ConditionalSimilarity(6, 3)
    h = torch.randn(4, 6, dtype=torch.float64)
    out = head(h, h.flip(0))
    assert out.score.dtype == torch.float64
    assert_close(out.score, head.double()(h, h.flip(0)).score)
    head = head.float()
    assert head(h.bfloat16(), h.half()).score.dtype == torch.float32
    head.condition_layer.weight.grad = None
    head(h, h.flip(0)).score.sum().backward()
    assert head.condition_layer.weight.grad is not None
    assert head.condition_layer.weight.grad.dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    d=st.integers(1, 6),
    k=st.integers(1, 5),
    scale=st.floats(0.01, 50.0),
    seed=st.integers(0, 2**16),
    joint=st.sampled_from(JOINTS),
)
def test_property_score_in_unit_interval_and_symmetric(
    n: int, d: int, k: int, scale: float, seed: int, joint: str
) -> None:
    gen = torch.Generator().manual_seed(seed)
    head = ConditionalSimilarity(d, k, joint=joint)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(scale)
    h1, h2 = torch.randn(n, d, generator=gen) * scale, torch.randn(n, d, generator=gen) * scale
    out = head(h1, h2)
    assert out.score.min() >= 0
    assert out.score.max() <= 1
    assert torch.isfinite(out.log_relevance).all()
    assert_close(out.relevance.sum(1), torch.ones(n))
    if joint != "concat":
        assert torch.equal(out.score, head(h2, h1).score)
    matrix = head.score_matrix(h1, h2)
    assert matrix.min() >= 0
    assert matrix.max() <= 1
    assert_close(matrix.diagonal(), out.score, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Ranking a gallery


def pairwise_reference(head: ConditionalSimilarity, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return head(q.repeat_interleave(g.shape[0], 0), g.repeat(q.shape[0], 1)).score.view(q.shape[0], g.shape[0])


@pytest.mark.parametrize("joint", JOINTS)
@pytest.mark.parametrize("budget", [2 * 2**30, 20_000, 3_000])
def test_score_matrix_equals_forward(joint: str, budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PAN, "MEMORY_BUDGET", budget)
    head = ConditionalSimilarity(7, 5, joint=joint, dtype=torch.float64)
    q, g = torch.randn(13, 7, dtype=torch.float64), torch.randn(37, 7, dtype=torch.float64)
    ref = pairwise_reference(head, q, g)
    for chunk_size in (None, 1, 4, 13, 50):
        plan = head._plan(13, 37, torch.float64, q.device, chunk_size, budget, PAN._merge_bytes(torch.float64))
        if budget == 3_000:
            assert plan.gallery_block < 37 or plan.tile_gallery < 37  # the gallery really is split
        assert_close(head.score_matrix(q, g, chunk_size=chunk_size), ref)
    # float32 and half inputs: float32 results close to the float64 reference.
    head32 = head.float()
    s32 = head32.score_matrix(q.float(), g.half())
    assert s32.dtype == torch.float32
    assert_close(s32, pairwise_reference(head32.double(), q, g.half().double()), rtol=1e-5, atol=1e-6)


def test_score_matrix_runs_without_grad() -> None:
    head = ConditionalSimilarity(4, 3)
    q = torch.randn(3, 4, requires_grad=True)
    assert not head.score_matrix(q, torch.randn(5, 4)).requires_grad


def peak_allocated(fn: Any) -> tuple[int, Any]:
    """Largest running total of the CPU tensor allocations during ``fn()`` (the torch profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak, result


@pytest.mark.parametrize("joint", JOINTS)
@pytest.mark.parametrize("budget", [2**17])
def test_peak_memory_within_budget(joint: str, budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PAN, "MEMORY_BUDGET", budget)
    head = ConditionalSimilarity(64, 8, joint=joint).eval()
    q, g = torch.randn(80, 64), torch.randn(150, 64)
    naive_bytes = 80 * 150 * 64 * 4  # the (Q, G, D) joint features of the naive broadcast: 3.1 MB
    assert naive_bytes > 10 * budget
    peak, out = peak_allocated(lambda: head.score_matrix(q, g))
    assert 0 < peak - out.numel() * out.element_size() <= budget
    peak, (scores, idx) = peak_allocated(lambda: head.topk(q, g, 7))
    assert 0 < peak - scores.numel() * 4 - idx.numel() * 8 <= budget
    # The profiler really sees the tiles: the default budget uses far more memory on the same problem.
    monkeypatch.setattr(PAN, "MEMORY_BUDGET", 2 * 2**30)
    big, out = peak_allocated(lambda: head.score_matrix(q, g))
    assert big - out.numel() * 4 > budget / 4
    assert_close(head.score_matrix(q, g), out)


@pytest.mark.parametrize("joint", JOINTS)
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_topk_equals_sorted_matrix_with_ties(
    joint: str, chunk_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PAN, "MEMORY_BUDGET", 6_000)  # several gallery blocks and tiles
    head = ConditionalSimilarity(6, 4, joint=joint)
    base = torch.randn(11, 6)
    # Exact ties: gallery rows duplicated far apart (different blocks, different tile positions).
    gallery = torch.cat([base, base[:4], base, base[2:3], base[5:9]])
    query = torch.randn(9, 6)
    full = head.score_matrix(query, gallery, chunk_size=chunk_size)
    # Identical gallery rows get identical scores, wherever they are.
    assert torch.equal(full[:, :11], full[:, 15:26])
    assert torch.equal(full[:, :4], full[:, 11:15])
    order = torch.sort(full, dim=1, descending=True, stable=True)  # stable: ties keep the lower index first
    for k in (1, 5, 20, gallery.shape[0]):
        scores, idx = head.topk(query, gallery, k, chunk_size=chunk_size)
        assert torch.equal(idx, order.indices[:, :k])
        assert torch.equal(scores, order.values[:, :k])
    # Every first copy precedes its duplicates.
    _, idx = head.topk(query, gallery, gallery.shape[0], chunk_size=chunk_size)
    pos = torch.empty_like(idx)
    pos.scatter_(1, idx, torch.arange(idx.shape[1]).expand_as(idx))
    assert (pos[:, :11] < pos[:, 15:26]).all()
    assert (pos[:, :4] < pos[:, 11:15]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("joint", JOINTS)
def test_score_matrix_and_topk_cuda(joint: str) -> None:
    head = ConditionalSimilarity(32, 10, joint=joint, dtype=torch.float64)
    q, g = torch.randn(40, 32, dtype=torch.float64), torch.randn(70, 32, dtype=torch.float64)
    ref = pairwise_reference(head, q, g)
    cuda = head.cuda()
    assert_close(cuda.score_matrix(q.cuda(), g.cuda()).cpu(), ref)
    scores, idx = cuda.topk(q.cuda(), torch.cat([g, g]).cuda(), 5)
    assert (idx < 70).all()  # the first copy of every tie
    assert_close(scores.cpu(), torch.sort(ref, dim=1, descending=True).values[:, :5])


# ------------------------------------------------------------------------------------------------------------------
# Gates

TRUTH = {
    "and": [0, 0, 0, 1],
    "or": [0, 1, 1, 1],
    "xor": [0, 1, 1, 0],
    "xnor": [1, 0, 0, 1],
    "nor": [1, 0, 0, 0],
    "nand": [1, 1, 1, 0],
}
A1, A2 = [0, 0, 1, 1], [0, 1, 0, 1]


@pytest.mark.parametrize("gate", sorted(TRUTH))
@pytest.mark.parametrize("kind", [torch.bool, torch.int64, torch.float32, torch.float64])
def test_gate_truth_tables(gate: str, kind: torch.dtype) -> None:
    a1, a2 = torch.tensor([A1]).to(kind), torch.tensor([A2]).to(kind)
    out = attribute_gate(a1, a2, gate)
    assert out.dtype == (kind if kind.is_floating_point else torch.float32)
    assert out.tolist() == [[float(v) for v in TRUTH[gate]]]


def test_gate_and_xor_and_callable() -> None:
    a1, a2 = torch.tensor([A1, A2]), torch.tensor([A2, A2])
    out = attribute_gate(a1, a2, "and_xor")
    assert out.shape == (2, 8)
    assert out[0].tolist() == [0, 0, 0, 1, 0, 1, 1, 0]
    assert out[1].tolist() == [0, 1, 0, 1, 0, 0, 0, 0]
    assert attribute_gate(a1.half(), a2.bool(), "or").dtype == torch.float16
    seen = {}

    def first_only(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen["dtypes"] = (x.dtype, y.dtype)
        return x & ~y

    assert attribute_gate(a1, a2, first_only).tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    assert seen["dtypes"] == (torch.bool, torch.bool)
    with pytest.raises(ValueError, match=r"gate\(a1, a2\) must return a tensor of shape \(2, W\)"):
        attribute_gate(a1, a2, lambda x, y: (x & y)[0])
    with pytest.raises(ValueError, match=r"gate\(a1, a2\) must hold binary values"):
        attribute_gate(a1, a2, lambda x, y: x.long() + y.long())
    assert GATES == ("and", "or", "xor", "xnor", "nor", "nand", "and_xor")


def test_gate_bad_input() -> None:
    a = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="a1 must hold binary values"):
        attribute_gate(torch.tensor([[0, 2]]), a, "or")
    with pytest.raises(ValueError, match="a2 must hold binary values"):
        attribute_gate(a, torch.tensor([[0.5, 1.0]]), "or")
    with pytest.raises(ValueError, match="a2 must have size A=2"):
        attribute_gate(a, torch.tensor([[0, 1, 1]]), "or")
    with pytest.raises(ValueError, match="gate must be one of"):
        attribute_gate(a, a, "implies")
    with pytest.raises(TypeError, match="gate must be one of"):
        attribute_gate(a, a, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"a1 must be a torch\.Tensor"):
        attribute_gate([[0, 1]], a, "or")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------------
# Loss


def random_case(n: int, k: int, attrs: int, scale: float = 4.0, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "z": torch.randn(n, k, generator=gen, dtype=torch.float64) * scale,
        "r": torch.randn(n, k, generator=gen, dtype=torch.float64) * scale,
        "y": torch.randint(0, 2, (n,), generator=gen),
        "a1": torch.randint(0, 2, (n, attrs), generator=gen),
        "a2": torch.randint(0, 2, (n, attrs), generator=gen),
        "c1": torch.rand(n, attrs, generator=gen) < 0.7,
        "c2": torch.rand(n, attrs, generator=gen) < 0.7,
    }


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("setting", ["supervised", "hybrid", "unsupervised"])
def test_loss_equals_official_bce(gate: str, setting: str) -> None:
    attrs = 6
    width = 2 * attrs if gate == "and_xor" else attrs
    k = width + (5 if setting == "hybrid" else 0) if setting != "unsupervised" else 7
    c = random_case(40, k, attrs, seed=len(gate) + k)
    out = output_from_logits(c["z"], c["r"])
    if setting == "unsupervised":
        expected = official_loss(c["z"], c["r"], c["y"], None, None, 0.0)
        assert_close(pan_loss(out, c["y"]), expected)
        assert_close(pan_loss(out, c["y"], c["a1"], c["a2"], lam=0.0), expected)
        return
    t = attribute_gate(c["a1"], c["a2"], gate).double()
    mask = c["c1"] & c["c2"]
    mask = torch.cat([mask, mask], 1) if gate == "and_xor" else mask
    for lam in (1e-5, 1.0, 10.0):
        got = pan_loss(out, c["y"], c["a1"], c["a2"], c["c1"], c["c2"], lam=lam, gate=gate)
        assert_close(got, official_loss(c["z"], c["r"], c["y"], t, mask, lam))
        # The official 1e-6 in the denominator changes the value by a relative ~1e-6 only.
        assert_close(got, official_loss(c["z"], c["r"], c["y"], t, mask, lam, eps=1e-6), rtol=2e-6, atol=0)
    no_mask = pan_loss(out, c["y"], c["a1"], c["a2"], gate=gate)
    assert_close(no_mask, official_loss(c["z"], c["r"], c["y"], t, None, 1.0))
    per_pair = pan_loss(out, c["y"], c["a1"], c["a2"], gate=gate, reduction="none")
    assert per_pair.shape == (40,)
    assert_close(per_pair.mean(), no_mask)
    assert_close(pan_loss(out, c["y"], c["a1"], c["a2"], gate=gate, reduction="sum"), per_pair.sum())


def test_loss_gradcheck() -> None:
    c = random_case(6, 5, 3, scale=2.0)

    def fn(z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        out = output_from_logits(z, r)
        return pan_loss(out, c["y"], c["a1"], c["a2"], c["c1"], c["c2"], reduction="none")

    assert gradcheck(fn, [c["z"], c["r"]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_finite_in_half_precision_at_logits_30(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    sign = lambda: torch.randint(0, 2, (32, 6), generator=gen) * 2 - 1.0  # noqa: E731
    z = (30.0 * sign()).to(dtype).requires_grad_(True)
    r = (30.0 * sign()).to(dtype).requires_grad_(True)
    a1 = torch.randint(0, 2, (32, 4), generator=gen)
    a2 = torch.randint(0, 2, (32, 4), generator=gen)
    y = torch.randint(0, 2, (32,), generator=gen)
    out = output_from_logits(z, r)
    loss = pan_loss(out, y, a1, a2, lam=10.0)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert torch.isfinite(z.grad).all()
    assert torch.isfinite(r.grad).all()
    assert z.grad.abs().sum() > 0  # type: ignore[union-attr]
    # Exact value in float64 from the same half logits (log space there too).
    z64, r64 = z.detach().double(), r.detach().double()
    lw = torch.log_softmax(r64, 1)
    log_p, log_q = torch.logsumexp(lw + F.logsigmoid(z64), 1), torch.logsumexp(lw + F.logsigmoid(-z64), 1)
    t = (a1 | a2).bool()
    attr = -torch.where(t, F.logsigmoid(z64[:, :4]), F.logsigmoid(-z64[:, :4])).mean(1)
    expected = (-torch.where(y.bool(), log_p, log_q) + 10.0 * attr).mean()
    assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert expected > 30  # the naive clamped BCE would sit at its -100 log floor or overflow here


def test_hybrid_free_conditions_get_no_attribute_gradient() -> None:
    c = random_case(20, 9, 5)  # 5 supervised + 4 free
    z = c["z"].clone().requires_grad_(True)
    r = c["r"].clone().requires_grad_(True)
    out = output_from_logits(z, r)
    attr_only = pan_loss(out, c["y"], c["a1"], c["a2"], c["c1"], c["c2"]) - pan_loss(out, c["y"], lam=0.0)
    gz, gr = torch.autograd.grad(attr_only, [z, r])
    assert torch.equal(gz[:, 5:], torch.zeros(20, 4, dtype=torch.float64))
    assert torch.equal(gr, torch.zeros_like(gr))  # the attribute term ignores the relevance
    mask = (c["c1"] & c["c2"]).double()
    assert (gz[:, :5][mask == 0] == 0).all()  # uncertain conditions get none either
    assert (gz[:, :5][mask == 1] != 0).all()
    # The pair term does train the free conditions.
    gz_pair = torch.autograd.grad(pan_loss(out, c["y"], lam=0.0), z)[0]
    assert (gz_pair[:, 5:] != 0).any()


def test_module_equals_functional() -> None:
    c = random_case(10, 8, 4)
    out = output_from_logits(c["z"], c["r"])
    for kwargs in ({"lam": 0.5, "gate": "xnor"}, {"lam": 2.0, "gate": "and_xor", "reduction": "none"}, {}):
        module = PANLoss(**kwargs)  # type: ignore[arg-type]
        assert torch.equal(
            module(out, c["y"], c["a1"], c["a2"], c["c1"], c["c2"]),
            pan_loss(out, c["y"], c["a1"], c["a2"], c["c1"], c["c2"], **kwargs),  # type: ignore[arg-type]
        )
    assert repr(PANLoss(lam=10.0)) == "PANLoss(lam=10.0, gate='or', reduction='mean')"
    target = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    assert_close(pan_loss(out, target.bool()), pan_loss(out, target))


def test_bad_input_names_the_argument() -> None:
    head = ConditionalSimilarity(4, 3)
    h = torch.randn(5, 4)
    with pytest.raises(ValueError, match="h2 must have size N=5"):
        head(h, torch.randn(4, 4))
    with pytest.raises(ValueError, match="h1 must have size D=4"):
        head(torch.randn(5, 6), h)
    with pytest.raises(TypeError, match="h2 must be a floating-point tensor"):
        head(h, torch.ones(5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="gallery must have size D=4"):
        head.score_matrix(h, torch.randn(3, 5))
    with pytest.raises(ValueError, match="chunk_size must be an integer in"):
        head.score_matrix(h, h, chunk_size=0)
    with pytest.raises(ValueError, match="query must be finite"):
        head.score_matrix(torch.full((2, 4), float("nan")), h)
    with pytest.raises(ValueError, match="k must be an integer in"):
        head.topk(h, h, 6)
    with pytest.raises(ValueError, match="joint must be one of"):
        ConditionalSimilarity(4, 3, joint="sum")
    with pytest.raises(ValueError, match="dropout must be a number in"):
        ConditionalSimilarity(4, 3, dropout=1.0)
    with pytest.raises(ValueError, match="num_conditions must be an integer in"):
        ConditionalSimilarity(4, 0)

    out = head(h, h.flip(0))
    y, a = torch.tensor([1, 0, 1, 0, 1]), torch.randint(0, 2, (5, 3))
    with pytest.raises(ValueError, match="lam must be a number in"):
        pan_loss(out, y, lam=-1.0)
    with pytest.raises(ValueError, match="lam must be a number in"):
        PANLoss(lam=-0.1)
    with pytest.raises(ValueError, match="gate must be one of"):
        PANLoss(gate="implies")
    with pytest.raises(ValueError, match="reduction must be one of"):
        pan_loss(out, y, reduction="avg")
    with pytest.raises(ValueError, match="a2 must have size A=3"):
        pan_loss(out, y, a, torch.randint(0, 2, (5, 2)))
    with pytest.raises(ValueError, match="a1 must have N=5 rows"):
        pan_loss(out, y, a[:4], a[:4])
    with pytest.raises(ValueError, match="a1 and a2 must be given together"):
        pan_loss(out, y, a)
    with pytest.raises(ValueError, match="a1 must hold binary values"):
        pan_loss(out, y, a * 3, a)
    with pytest.raises(ValueError, match="certain1 must have size A=3"):
        pan_loss(out, y, a, a, torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="certain2 must hold binary values"):
        pan_loss(out, y, a, a, None, torch.full((5, 3), 0.5))
    with pytest.raises(ValueError, match="certain1/certain2 were given without attributes"):
        pan_loss(out, y, None, None, torch.ones(5, 3))
    with pytest.raises(ValueError, match=r"at least as many conditions as attribute targets.*got K=3"):
        pan_loss(out, y, a, a, gate="and_xor")
    with pytest.raises(ValueError, match="target must hold binary values"):
        pan_loss(out, torch.tensor([0.0, 0.3, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="target must have size N=5"):
        pan_loss(out, y[:3])
    with pytest.raises(TypeError, match="output must be a ConditionalSimilarityOutput"):
        pan_loss(out.score, y)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------------
# Learning


def synthetic_pairs(num_items: int, num_pairs: int, seed: int) -> dict[str, torch.Tensor]:
    """Items with 8 hidden binary attributes; embeddings are a noisy linear image of them (16-D)."""
    gen = torch.Generator().manual_seed(seed)
    attrs = (torch.rand(num_items, 8, generator=gen) < 0.4).long()
    mixing = torch.randn(8, 16, generator=torch.Generator().manual_seed(99))
    emb = (2.0 * attrs - 1.0) @ mixing + 0.1 * torch.randn(num_items, 16, generator=gen)
    i, j = torch.randint(0, num_items, (2, num_pairs), generator=gen)
    # Similar pairs: an OR (over attributes) of "both have it".
    y = (attrs[i] & attrs[j]).any(1).long()
    return {"h1": emb[i], "h2": emb[j], "a1": attrs[i], "a2": attrs[j], "y": y}


def test_supervised_head_recovers_or_attributes() -> None:
    torch.manual_seed(0)
    train, test = synthetic_pairs(300, 512, seed=1), synthetic_pairs(300, 2048, seed=2)
    # concat: OR of the two items' attributes is linear in [h1; h2] (|h1 - h2| cannot tell (1, 1) from (0, 0)).
    head = ConditionalSimilarity(16, 8, joint="concat")
    loss_fn = PANLoss(lam=10.0, gate="or")  # Polyvore's lambda
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(80):  # full-batch steps, as the official CUB code
        opt.zero_grad()
        loss_fn(head(train["h1"], train["h2"]), train["y"], train["a1"], train["a2"]).backward()
        opt.step()
    with torch.no_grad():
        out = head(test["h1"], test["h2"])
    target = (test["a1"] | test["a2"]).bool()
    accuracy = ((out.condition_scores > 0.5) == target).double().mean(0)
    assert accuracy.min() > 0.95, accuracy
    # An unsupervised head trained on the pair labels alone does not align its conditions with the attributes.
    free = ConditionalSimilarity(16, 8, joint="concat")
    opt = torch.optim.Adam(free.parameters(), lr=0.05)
    for _ in range(80):
        opt.zero_grad()
        PANLoss(lam=0.0)(free(train["h1"], train["h2"]), train["y"]).backward()
        opt.step()
    with torch.no_grad():
        free_acc = ((free(test["h1"], test["h2"]).condition_scores > 0.5) == target).double().mean(0)
    assert free_acc.min() < 0.9


def test_absdiff_head_learns_xor_attributes() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    attrs = (torch.rand(300, 8, generator=gen) < 0.5).long()
    # Each attribute owns two embedding dimensions, so |h1 - h2| sees each attribute's XOR separately.
    directions = torch.zeros(8, 16)
    directions[torch.arange(8), 2 * torch.arange(8)] = 1.0
    directions[torch.arange(8), 2 * torch.arange(8) + 1] = -0.5
    emb = attrs.float() @ directions + 0.05 * torch.randn(300, 16, generator=gen)
    i, j = torch.randint(0, 300, (2, 2048), generator=gen)
    y = ((attrs[i] ^ attrs[j]).sum(1) <= 2).long()  # similar: differ in at most two attributes
    head = ConditionalSimilarity(16, 8)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first, second = i[:1024], j[:1024]
    for _ in range(100):
        opt.zero_grad()
        pan_loss(head(emb[first], emb[second]), y[:1024], attrs[first], attrs[second], gate="xor", lam=10.0).backward()
        opt.step()
    with torch.no_grad():
        out = head(emb[i[1024:]], emb[j[1024:]])
    accuracy = ((out.condition_scores > 0.5) == (attrs[i[1024:]] ^ attrs[j[1024:]]).bool()).double().mean(0)
    assert accuracy.min() > 0.95, accuracy
