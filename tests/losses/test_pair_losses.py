"""Contrastive, Triplet, NT-Xent, SupCon and ArcFace: hand-computed 2-D cases, PML reference values, specifics."""

from __future__ import annotations

import math

import loss_refs as R
import pytest
import torch
from helpers import assert_close

from dml_bias import losses as L
from dml_bias.losses import functional as F
from dml_bias.miners import BatchHardMiner

F64 = torch.float64
LABELS_001 = torch.tensor([0, 0, 1])


def test_contrastive_hand_computed() -> None:
    # Normalised distances: d01 = sqrt(2), d02 = 0, d12 = sqrt(2). Positives (0,1), (1,0): hinge sqrt(2) each.
    # Negatives (0,2), (2,0): 1 - 0 = 1; (1,2), (2,1): 1 - sqrt(2) < 0, left out of the non-zero mean.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=F64)
    assert_close(L.ContrastiveLoss()(emb, LABELS_001), math.sqrt(2) + 1.0)
    # Cosine with PML's suggested margins: positives relu(1 - 0) = 1; negatives relu(s - 0): 1 (twice) and 0.
    assert_close(L.ContrastiveLoss(1.0, 0.0, distance="cosine")(emb, LABELS_001), 1.0 + 1.0)


def test_triplet_hand_computed() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]], dtype=F64)
    n = 1 / math.sqrt(1.01)
    d02 = math.sqrt(2 - 2 * n)
    d12 = math.sqrt(2 - 2 * 0.1 * n)
    expected = ((math.sqrt(2) - d02 + 0.1) + (math.sqrt(2) - d12 + 0.1)) / 2  # triplets (0,1,2), (1,0,2)
    assert_close(L.TripletMarginLoss(margin=0.1)(emb, LABELS_001), expected)
    # Only (1,0,2) violates a margin of 0.1 with the cosine similarity: s02 - s01 + m > 0, s12 - s10 + m = 0.1n + 0.1.
    s = L.TripletMarginLoss(margin=0.1, distance="cosine")(emb, LABELS_001)
    assert_close(s, ((n - 0 + 0.1) + (0.1 * n + 0.1)) / 2)


def test_ntxent_and_supcon_hand_computed() -> None:
    # Positive pairs (0,1), (1,0) with s = 1; each anchor's only negative has s = 0.
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    expected = math.log(1 + math.exp(-1.0))
    assert_close(L.NTXentLoss(temperature=1.0)(emb, LABELS_001), expected)
    assert_close(L.SupConLoss(temperature=1.0)(emb, LABELS_001), expected)
    # With two positives, SupCon puts the other positive in the denominator, NT-Xent does not.
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=F64)
    labels = torch.tensor([0, 0, 0, 1])
    # NT-Xent pairs: (0,1), (1,0): log(1 + 1/e); (0,2), (1,2): negative 3 has s = 0, log 2; (2,0), (2,1): log(1 + e).
    nt = (2 * math.log(1 + 1 / math.e) + 2 * math.log(2) + 2 * math.log(1 + math.e)) / 6
    assert_close(L.NTXentLoss(temperature=1.0)(emb, labels), nt)
    # Anchor 0: P = {1 (s=1), 2 (s=0)}, A = {1, 2, 3 (s=0)}; anchor 2: P = {0, 1} (s=0), A adds 3 (s=1).
    lse01 = math.log(math.e + 2)
    lse2 = math.log(2 + math.e)
    sc = [-((1 - lse01) + (0 - lse01)) / 2] * 2 + [-((0 - lse2) + (0 - lse2)) / 2]
    assert_close(L.SupConLoss(temperature=1.0)(emb, labels), sum(sc) / 3)


def test_arcface_hand_computed() -> None:
    module = L.AdditiveAngularMarginLoss(2, 2, margin=0.5, scale=2.0, dtype=F64)
    with torch.no_grad():
        module.weight.copy_(torch.eye(2))
    # cos(target) = 1 -> theta = 0 -> logit cos(0.5); the other logit is cos = 0.
    loss = module(torch.tensor([[3.0, 0.0]], dtype=F64), torch.tensor([0]))
    assert_close(loss, math.log(1 + math.exp(-2 * math.cos(0.5))))
    # cos(target) = -1 -> theta = pi > pi - m -> logit -1 - m sin(m); the other logit is 0.
    loss = module(torch.tensor([[-1.0, 0.0]], dtype=F64), torch.tensor([0]))
    assert_close(loss, math.log(1 + math.exp(2 * (1 + 0.5 * math.sin(0.5)))))
    # A generic angle: theta = 60 degrees to class 0.
    x = torch.tensor([[0.5, math.sqrt(3) / 2]], dtype=F64)
    target = math.cos(math.pi / 3 + 0.5)
    other = math.sqrt(3) / 2
    assert_close(module(x, torch.tensor([0])), -2 * target + math.log(math.exp(2 * target) + math.exp(2 * other)))
    assert_close(module.get_logits(x), torch.tensor([[2 * 0.5, 2 * other]], dtype=F64))


# pml_reference.txt section 1 (float32): the fixed batch with PML's default hyper-parameters.
PML_VALUES = [
    (lambda: L.ContrastiveLoss(), 1.458787203),
    (lambda: L.ContrastiveLoss(pos_margin=1, neg_margin=0, distance="cosine"), 1.210906148),
    (lambda: L.TripletMarginLoss(), 0.2289425582),
    (lambda: L.TripletMarginLoss(margin=0.2, distance="cosine"), 0.3738237619),
    (lambda: L.NTXentLoss(), 7.549339771),
    (lambda: L.NTXentLoss(temperature=0.5), 3.360349894),
    (lambda: L.SupConLoss(), 5.980278969),
]


@pytest.mark.parametrize(("make", "expected"), PML_VALUES)
def test_pml_reference_values(make, expected: float) -> None:
    torch.manual_seed(0)
    emb = torch.randn(32, 16)
    labels = torch.randint(0, 4, (32,))
    assert_close(make()(emb, labels), expected)


def test_pml_reference_arcface() -> None:
    torch.manual_seed(0)
    emb = torch.randn(32, 16)
    labels = torch.randint(0, 4, (32,))
    module = L.AdditiveAngularMarginLoss(4, 16, margin=math.radians(28.6))
    with torch.no_grad():
        module.weight.copy_(torch.randn(16, 4, generator=torch.Generator().manual_seed(2)).t())
    assert_close(module(emb, labels), 45.70742416)


def test_ntxent_fp16_has_no_tiny_cap() -> None:
    # PML in fp16 caps each pair at -log(finfo(fp16).tiny) = 9.70 and gives 6.828 on the reference batch; the
    # uncapped value (fp32) is 7.549.
    torch.manual_seed(0)
    emb = torch.randn(32, 16)
    labels = torch.randint(0, 4, (32,))
    loss16 = L.NTXentLoss()(emb.half(), labels)
    assert_close(loss16, 7.549339771, rtol=2e-3, atol=0)
    pml = R.import_pml()
    assert pml.losses.NTXentLoss()(emb.half(), labels).item() < 7.0  # the documented PML departure


def test_triplet_all_triplets_large_batch_matches_direct() -> None:
    # The sort + cumsum path against the explicit (a, p, n) enumeration, with many ties in the distances.
    emb = torch.randn(64, 8, dtype=F64).round(decimals=1)
    labels = torch.randint(0, 6, (64,))
    pos = (labels[:, None] == labels[None]) & ~torch.eye(64, dtype=torch.bool)
    neg = labels[:, None] != labels[None]
    a, p, n = torch.where(pos[:, :, None] & neg[:, None, :])
    for margin in (0.0, 0.05, 0.5):
        for metric in ("euclidean", "cosine", "squared_euclidean"):
            fast = F.triplet_margin_loss(emb, labels, margin=margin, distance=metric)
            direct = F.triplet_margin_loss(emb, None, (a, p, n), margin=margin, distance=metric)
            assert_close(fast, direct)


def test_triplet_with_batch_hard_miner_and_pairs() -> None:
    emb = torch.randn(16, 5, dtype=F64)
    labels = torch.randint(0, 3, (16,))
    idx = BatchHardMiner()(emb, labels)
    assert_close(L.TripletMarginLoss(0.3)(emb, labels, idx), R.triplet_loss(emb, labels, idx, margin=0.3))
    pml = R.import_pml()
    e32 = emb.float()
    assert_close(
        L.TripletMarginLoss(0.3)(e32, labels, idx), pml.losses.TripletMarginLoss(0.3)(e32, labels, idx), atol=1e-6
    )
    pairs = (torch.tensor([0, 0, 1]), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1]), torch.tensor([4, 5, 6]))
    assert_close(
        L.TripletMarginLoss(0.3)(e32, labels, pairs), pml.losses.TripletMarginLoss(0.3)(e32, labels, pairs), atol=1e-6
    )
