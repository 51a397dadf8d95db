"""Slow, independent loop references for the losses and miners (float64, written from the formulas).

Nothing here calls dml_bias: every similarity is recomputed per pair with plain tensor ops.
"""

from __future__ import annotations

import math

import torch

SIMILARITIES = ("cosine", "dot")


def measure(u: torch.Tensor, v: torch.Tensor, metric: str) -> torch.Tensor:
    """One similarity/distance between two vectors, PML's conventions (normalise except for dot)."""
    if metric != "dot":
        u = u / u.norm().clamp_min(1e-12)
        v = v / v.norm().clamp_min(1e-12)
    if metric in SIMILARITIES:
        return (u * v).sum()
    sq = ((u - v) ** 2).sum()
    return sq if metric == "squared_euclidean" else sq.sqrt()


def all_pairs(labels: list[int], ref_labels: list[int] | None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Ordered positive/negative pairs; self-pairs dropped when there is no reference set."""
    same = ref_labels is None
    ref = labels if ref_labels is None else ref_labels
    pos = [(i, j) for i in range(len(labels)) for j in range(len(ref)) if labels[i] == ref[j] and not (same and i == j)]
    neg = [(i, j) for i in range(len(labels)) for j in range(len(ref)) if labels[i] != ref[j]]
    return pos, neg


def get_pairs(labels, ref_labels=None, indices_tuple=None):
    if indices_tuple is None:
        return all_pairs(labels.tolist(), None if ref_labels is None else ref_labels.tolist())
    if len(indices_tuple) == 3:
        a, p, n = (t.tolist() for t in indices_tuple)
        return list(zip(a, p, strict=True)), list(zip(a, n, strict=True))
    a1, p, a2, n = (t.tolist() for t in indices_tuple)
    return list(zip(a1, p, strict=True)), list(zip(a2, n, strict=True))


def ms_loss(
    emb,
    labels=None,
    indices_tuple=None,
    ref_emb=None,
    ref_labels=None,
    *,
    alpha=2.0,
    beta=50.0,
    base=0.5,
    metric="cosine",
):
    ref = emb if ref_emb is None else ref_emb
    pos, neg = get_pairs(labels, ref_labels if ref_emb is not None else None, indices_tuple)
    pos, neg = sorted(set(pos)), sorted(set(neg))
    sign = 1.0 if metric in SIMILARITIES else -1.0
    total = emb.new_zeros(())
    for i in range(emb.shape[0]):
        sp = [sign * (measure(emb[i], ref[j], metric) - base) for a, j in pos if a == i]
        sn = [sign * (measure(emb[i], ref[j], metric) - base) for a, j in neg if a == i]
        if sp:
            total = total + torch.log(1 + sum(torch.exp(-alpha * s) for s in sp)) / alpha
        if sn:
            total = total + torch.log(1 + sum(torch.exp(beta * s) for s in sn)) / beta
    return total / emb.shape[0]


def ms_mined_pairs(emb, labels, ref_emb=None, ref_labels=None, *, epsilon=0.1, metric="cosine"):
    """The Multi-Similarity mining rule, as sets of (anchor, column) pairs."""
    ref = emb if ref_emb is None else ref_emb
    pos, neg = get_pairs(labels, ref_labels if ref_emb is not None else None)
    if not pos or not neg:
        return set(), set()
    sign = 1.0 if metric in SIMILARITIES else -1.0
    keep_p, keep_n = set(), set()
    for i in range(emb.shape[0]):
        P = [j for a, j in pos if a == i]
        N = [j for a, j in neg if a == i]
        if not P or not N:
            continue
        s = {j: float(sign * measure(emb[i], ref[j], metric)) for j in P + N}
        hardest_neg = max(s[j] for j in N)
        hardest_pos = min(s[j] for j in P)
        keep_p |= {(i, j) for j in P if s[j] - epsilon < hardest_neg}
        keep_n |= {(i, j) for j in N if s[j] + epsilon > hardest_pos}
    return keep_p, keep_n


def proxy_anchor_loss(emb, labels, proxies, *, margin=0.1, alpha=32.0, weights=None, metric="cosine"):
    lab = labels.tolist()
    C = proxies.shape[0]
    w = [0.0] * len(lab) if weights is None else [float(v) - 1.0 for v in weights]
    sign = 1.0 if metric in SIMILARITIES else -1.0
    pos_terms, neg_total = [], emb.new_zeros(())
    for c in range(C):
        sp = [(sign * measure(emb[i], proxies[c], metric), w[i]) for i in range(len(lab)) if lab[i] == c]
        sn = [(sign * measure(emb[i], proxies[c], metric), w[i]) for i in range(len(lab)) if lab[i] != c]
        if sp:
            pos_terms.append(torch.log(1 + sum(torch.exp(-alpha * (s - sign * margin) + wi) for s, wi in sp)))
        if sn:
            neg_total = neg_total + torch.log(1 + sum(torch.exp(alpha * (s + sign * margin) + wi) for s, wi in sn))
    return sum(pos_terms) / len(pos_terms) + neg_total / C


def contrastive_loss(
    emb,
    labels=None,
    indices_tuple=None,
    ref_emb=None,
    ref_labels=None,
    *,
    pos_margin=0.0,
    neg_margin=1.0,
    metric="euclidean",
):
    ref = emb if ref_emb is None else ref_emb
    pos, neg = get_pairs(labels, ref_labels if ref_emb is not None else None, indices_tuple)
    sign = 1.0 if metric in SIMILARITIES else -1.0
    pl = [torch.relu(-sign * (measure(emb[i], ref[j], metric) - pos_margin)) for i, j in pos]
    nl = [torch.relu(sign * (measure(emb[i], ref[j], metric) - neg_margin)) for i, j in neg]
    pl = [v for v in pl if v > 0]
    nl = [v for v in nl if v > 0]
    return (sum(pl) / len(pl) if pl else 0.0) + (sum(nl) / len(nl) if nl else 0.0)


def triplet_loss(
    emb, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, margin=0.05, metric="euclidean"
):
    ref = emb if ref_emb is None else ref_emb
    sign = 1.0 if metric in SIMILARITIES else -1.0
    if indices_tuple is not None and len(indices_tuple) == 3:
        triplets = list(zip(*(t.tolist() for t in indices_tuple), strict=True))
    else:
        pos, neg = get_pairs(labels, ref_labels if ref_emb is not None else None, indices_tuple)
        triplets = [(a, p, n) for a, p in pos for b, n in neg if a == b]
    vals = [
        torch.relu(sign * (measure(emb[a], ref[n], metric) - measure(emb[a], ref[p], metric)) + margin)
        for a, p, n in triplets
    ]
    nz = [v for v in vals if v > 0]
    return sum(nz) / len(nz) if nz else 0.0


def ntxent_loss(
    emb, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, temperature=0.07, metric="cosine"
):
    ref = emb if ref_emb is None else ref_emb
    pos, neg = get_pairs(labels, ref_labels if ref_emb is not None else None, indices_tuple)
    sign = 1.0 if metric in SIMILARITIES else -1.0
    terms = []
    for a, p in pos:
        sp = sign * measure(emb[a], ref[p], metric) / temperature
        negs = [sign * measure(emb[a], ref[n], metric) / temperature for b, n in neg if b == a]
        den = torch.exp(sp) + sum(torch.exp(s) for s in negs)
        terms.append(-(sp - torch.log(den)))
    return sum(terms) / len(terms) if terms and neg else 0.0


def supcon_loss(
    emb, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, temperature=0.1, metric="cosine"
):
    ref = emb if ref_emb is None else ref_emb
    pos, neg = get_pairs(labels, ref_labels if ref_emb is not None else None, indices_tuple)
    pos, neg = sorted(set(pos)), sorted(set(neg))
    if not pos or not neg:
        return 0.0
    sign = 1.0 if metric in SIMILARITIES else -1.0
    vals = []
    for i in range(emb.shape[0]):
        P = [j for a, j in pos if a == i]
        if not P:
            continue
        cols = P + [j for a, j in neg if a == i]
        s = {j: sign * measure(emb[i], ref[j], metric) / temperature for j in cols}
        den = torch.log(sum(torch.exp(s[j]) for j in cols))
        vals.append(-sum(s[j] - den for j in P) / len(P))
    nz = [v for v in vals if v > 0]
    return sum(nz) / len(nz) if nz else 0.0


def arcface_loss(emb, labels, weight, *, margin=0.5, scale=64.0, weights=None):
    """Written with acos (the paper's form); weight is (C, D)."""
    total = emb.new_zeros(())
    n = emb.shape[0]
    for i in range(n):
        y = int(labels[i])
        logits = []
        for c in range(weight.shape[0]):
            cos = measure(emb[i], weight[c], "cosine")
            if c == y:
                theta = torch.acos(cos.clamp(-1, 1))
                cos = torch.cos(theta + margin) if theta <= math.pi - margin else cos - margin * math.sin(margin)
            logits.append(scale * cos)
        z = torch.stack(logits)
        li = torch.logsumexp(z, 0) - z[y]
        total = total + li * (1.0 if weights is None else float(weights[i]))
    return total / n


def import_pml():
    """pytorch-metric-learning with its losses/miners/distances sub-modules loaded (skip the test if missing)."""
    import pytest

    pml = pytest.importorskip("pytorch_metric_learning")
    for sub in ("losses", "miners", "distances", "reducers"):
        pytest.importorskip(f"pytorch_metric_learning.{sub}")
    return pml
