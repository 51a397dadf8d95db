"""Slow, independent references for the kNN and retrieval-metric tests (numpy loops, float64; no tests here).

Written from the definitions: neighbours sorted by (score descending / distance ascending, index ascending),
Recall@k = any relevant in the first k, R-precision and MAP@R from the first R neighbours, AP over all.
"""

from __future__ import annotations

import numpy as np
import torch


def prepare(x: torch.Tensor, metric: str, normalize: bool | None) -> np.ndarray:
    """Float64 rows, normalised exactly as the library does (so mathematically tied rows stay tied)."""
    x64 = x.detach().to(torch.float64)
    norm = metric == "cosine" or (metric != "dot" if normalize is None else normalize)
    if norm:
        x64 = x64 / x64.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x64.cpu().numpy()


def neighbour_order(q: np.ndarray, r: np.ndarray, metric: str, exclude: int | None) -> tuple[list[int], list[float]]:
    """All reference indices for one query row, best first, with their scores."""
    items = []
    for j in range(r.shape[0]):
        if exclude is not None and j == exclude:
            continue
        if metric in ("cosine", "dot"):
            s = float(np.sum(q * r[j]))
            items.append((-s, j, s))
        else:
            d2 = float(np.sum((q - r[j]) ** 2))
            s = d2 if metric == "squared_euclidean" else float(np.sqrt(d2))
            items.append((d2, j, s))
    items.sort(key=lambda t: (t[0], t[1]))
    return [t[1] for t in items], [t[2] for t in items]


def ref_knn(
    query: torch.Tensor,
    reference: torch.Tensor | None,
    k: int,
    metric: str = "cosine",
    exclude_self: bool | None = None,
    normalize: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    same = reference is None
    q = prepare(query, metric, normalize)
    r = q if same else prepare(reference, metric, normalize)
    excl = same if exclude_self is None else exclude_self
    idx, sc = [], []
    for i in range(q.shape[0]):
        order, scores = neighbour_order(q[i], r, metric, i if excl else None)
        idx.append(order[:k])
        sc.append(scores[:k])
    return np.array(sc), np.array(idx)


def ref_metrics(
    query: torch.Tensor,
    qlab: torch.Tensor,
    reference: torch.Tensor | None,
    rlab: torch.Tensor | None,
    ks: tuple[int, ...],
    metric: str = "cosine",
    exclude_self: bool | None = None,
    normalize: bool | None = None,
) -> tuple[dict[str, float], dict[int, dict[str, float]], list[dict[str, float]]]:
    """Overall means, per-class means and per-query values (None for lone queries)."""
    same = reference is None
    q = prepare(query, metric, normalize)
    r = q if same else prepare(reference, metric, normalize)
    ql = qlab.cpu().numpy()
    rl = ql if same else rlab.cpu().numpy()  # type: ignore[union-attr]
    excl = same if exclude_self is None else exclude_self
    rows: list[dict[str, float]] = []
    for i in range(q.shape[0]):
        order, _ = neighbour_order(q[i], r, metric, i if excl else None)
        rel = [int(rl[j] == ql[i]) for j in order]
        big_r = sum(rel)
        if big_r == 0:
            rows.append({})
            continue
        row: dict[str, float] = {}
        for k in ks:
            row[f"recall@{k}"] = float(any(rel[:k]))
        hits = 0
        map_r = 0.0
        for pos in range(big_r):
            if rel[pos]:
                hits += 1
                map_r += hits / (pos + 1)
        row["map@r"] = map_r / big_r
        row["r_precision"] = sum(rel[:big_r]) / big_r
        hits = 0
        ap = 0.0
        for pos, v in enumerate(rel):
            if v:
                hits += 1
                ap += hits / (pos + 1)
        row["map"] = ap / big_r
        rows.append(row)
    names = [f"recall@{k}" for k in ks] + ["map@r", "r_precision", "map"]
    ev = [i for i, row in enumerate(rows) if row]
    overall = {n: float(np.mean([rows[i][n] for i in ev])) if ev else float("nan") for n in names}
    overall["num_queries"] = len(ev)
    overall["num_lone_queries"] = len(rows) - len(ev)
    per_class: dict[int, dict[str, float]] = {}
    for c in sorted({int(ql[i]) for i in ev}):
        members = [i for i in ev if int(ql[i]) == c]
        entry = {n: float(np.mean([rows[i][n] for i in members])) for n in names}
        entry["count"] = len(members)
        per_class[c] = entry
    return overall, per_class, rows


def clustered(n: int, dim: int, num_classes: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class clusters (float32) and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    centres = torch.randn(num_classes, dim, generator=g)
    x = centres[labels] + spread * torch.randn(n, dim, generator=g)
    return x, labels
