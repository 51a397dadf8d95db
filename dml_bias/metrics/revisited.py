r"""Mean average precision on Revisited Oxford and Paris (the revisitop protocol).

Landmark retrieval benchmarks (ROxford5k, RParis6k, optionally with the R1M distractors) are scored with the
protocol of :cite:`radenovic2018revisiting`, implemented in ``revisitop/python/evaluate.py``. Each query has
three lists of database indices, ``easy``, ``hard`` and ``junk``, which the three protocols read as

============  =====================  ===========================
protocol      positives (``ok``)     ignored (``junk``)
============  =====================  ===========================
``easy``      easy                   junk ∪ hard
``medium``    easy ∪ hard            junk
``hard``      hard                   junk ∪ easy
============  =====================  ===========================

Ignored images are deleted from the ranking: every positive moves up by the number of ignored images ranked
before it. With the adjusted 0-based rank :math:`r_j` of the :math:`j`-th retrieved positive
(:math:`j = 0, 1, \dots`) and :math:`n` the number of positives of the query (**all** of them, so positives missing
from a truncated ranking count as misses), the average precision uses the trapezoid rule

.. math::

    \mathrm{AP} = \frac{1}{n} \sum_j \frac{1}{2}\Big(P^{\text{left}}_j + \frac{j + 1}{r_j + 1}\Big),
    \qquad P^{\text{left}}_j = \begin{cases} 1 & r_j = 0 \\ j / r_j & r_j > 0. \end{cases}

The mean precision at :math:`\kappa` uses the 1-based adjusted ranks :math:`\rho_j = r_j + 1`: with
:math:`\kappa_q = \min(\max_j \rho_j, \kappa)`,
:math:`\mathrm{P@}\kappa = \#\{j : \rho_j \le \kappa_q\} / \kappa_q`. Queries without positives in a protocol are
left out of that protocol's means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dml_bias._checks import check_dtype, check_number, check_shape, check_tensor, describe

__all__ = ["REVISITED_PROTOCOLS", "revisited_average_precision", "revisited_map"]

#: The protocol names of :func:`revisited_map`, in the order of the paper.
REVISITED_PROTOCOLS: tuple[str, ...] = ("easy", "medium", "hard")

# Bit flags of the per-query category table.
_EASY, _HARD, _JUNK = 1, 2, 4
# (positives, ignored) as bit masks, per protocol.
_PROTOCOL_MASKS: dict[str, tuple[int, int]] = {
    "easy": (_EASY, _JUNK | _HARD),
    "medium": (_EASY | _HARD, _JUNK),
    "hard": (_HARD, _JUNK | _EASY),
}
# Largest number of (query, database id) cells of the category table held at once (bounds memory).
_TABLE_BUDGET = 1 << 24


def _trapezoid_terms(j: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per-positive trapezoid terms (P_left + P_right) / 2 for float64 ``j`` (index) and ``r`` (0-based rank)."""
    left = torch.where(r > 0, j / r.clamp_min(1.0), torch.ones_like(r))
    return 0.5 * (left + (j + 1.0) / (r + 1.0))


def revisited_average_precision(positive_ranks: Any, num_positives: int) -> float:
    r"""Average precision of one query by the trapezoid rule of the revisitop protocol.

    .. math::

        \mathrm{AP} = \frac{1}{n} \sum_{j} \frac{1}{2}\Big(P^{\text{left}}_j + \frac{j + 1}{r_j + 1}\Big),
        \qquad P^{\text{left}}_j = \begin{cases} 1 & r_j = 0 \\ j / r_j & r_j > 0 \end{cases}

    Args:
        positive_ranks: The 0-based ranks :math:`r_j` of the retrieved positives (after junk removal), strictly
            increasing; a 1-D integer tensor, array or sequence (may be empty).
        num_positives: :math:`n`, the number of positives of the query, retrieved or not; at least
            ``len(positive_ranks)`` and at least 1.

    Returns:
        The average precision, a float in :math:`[0, 1]`.

    Example:
        >>> revisited_average_precision([0, 2], 2)
        0.7916666666666666
        >>> round(revisited_average_precision([0, 2], 3), 6)  # one positive never retrieved
        0.527778
    """
    if isinstance(positive_ranks, torch.Tensor):
        ranks = positive_ranks.detach().cpu()
    else:
        ranks = torch.from_numpy(np.ascontiguousarray(np.asarray(positive_ranks)))
    if ranks.ndim != 1:
        raise ValueError(f"positive_ranks must be 1-D, got {describe(ranks)}")
    if ranks.numel() > 0:
        check_dtype(ranks, "positive_ranks", "integer")
    ranks = ranks.to(torch.float64)
    check_number(num_positives, "num_positives", low=max(1, ranks.numel()), integer=True)
    if ranks.numel() > 0:
        if float(ranks[0]) < 0 or bool((ranks[1:] <= ranks[:-1]).any()):
            raise ValueError(f"positive_ranks must be non-negative and strictly increasing, got {ranks.tolist()}")
        # A rank below the positive's index is impossible (j positives precede it).
        if bool((ranks < torch.arange(ranks.numel(), dtype=torch.float64)).any()):
            raise ValueError(f"positive_ranks must satisfy r_j >= j, got {ranks.tolist()}")
    j = torch.arange(ranks.numel(), dtype=torch.float64)
    return float(_trapezoid_terms(j, ranks).sum()) / num_positives


def _as_id_tensor(value: Any, name: str) -> torch.Tensor:
    """Turn a list/array/tensor of database ids into a 1-D int64 CPU tensor (validated)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
    else:
        arr = np.asarray(value)
        if arr.size == 0:
            return torch.zeros(0, dtype=torch.long)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t.reshape(-1) if t.ndim == 2 and 1 in t.shape else t  # (1, n) / (n, 1) arrays from .mat files
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if t.ndim != 1:
        raise ValueError(f"{name} must be a 1-D list of database indices, got {describe(t)}")
    if t.is_floating_point():
        # Ground truth loaded from .mat files is often stored as float; accept whole numbers only.
        if not bool((t == t.round()).all()):
            raise TypeError(f"{name} must hold integer database indices, got non-integer values {describe(t)}")
    elif t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold integer database indices, got {describe(t)}")
    t = t.to(torch.long)
    if int(t.min()) < 0:
        raise ValueError(f"{name} must hold non-negative database indices, got minimum {int(t.min())}")
    if torch.unique(t).numel() != t.numel():
        raise ValueError(f"{name} must not repeat a database index, got {t.numel()} entries with duplicates")
    return t


def _parse_gnd(gnd: Any, num_queries: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    if not isinstance(gnd, Sequence) or isinstance(gnd, (str, bytes)):
        raise TypeError(f"gnd must be a list of dicts with 'easy', 'hard' and 'junk' lists, got {describe(gnd)}")
    if len(gnd) != num_queries:
        raise ValueError(f"gnd must have one entry per query, i.e. {num_queries} (ranks.shape[0]), got {len(gnd)}")
    parsed = []
    for i, entry in enumerate(gnd):
        if not isinstance(entry, Mapping):
            raise TypeError(f"gnd[{i}] must be a dict with 'easy', 'hard' and 'junk' lists, got {describe(entry)}")
        missing = [key for key in ("easy", "hard") if key not in entry]
        if missing:
            raise ValueError(
                f"gnd[{i}] must have the keys 'easy' and 'hard' (and optionally 'junk'), missing {missing}"
            )
        easy = _as_id_tensor(entry["easy"], f"gnd[{i}]['easy']")
        hard = _as_id_tensor(entry["hard"], f"gnd[{i}]['hard']")
        junk = _as_id_tensor(entry.get("junk", []), f"gnd[{i}]['junk']")
        if easy.numel() and hard.numel() and bool(torch.isin(easy, hard).any()):
            raise ValueError(f"gnd[{i}]['easy'] and gnd[{i}]['hard'] must be disjoint, got a shared database index")
        parsed.append((easy, hard, junk))
    return parsed


def revisited_map(
    ranks: Any,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
    *,
    protocols: Sequence[str] = REVISITED_PROTOCOLS,
) -> dict[str, dict[str, float]]:
    r"""Mean average precision and mean precision at :math:`\kappa` of the Revisited Oxford/Paris protocols.

    Exactly the computation of revisitop's ``compute_map`` for the Easy, Medium and Hard protocols (see the
    module documentation for the formulas), vectorised over the ranking positions.

    Args:
        ranks: ``(num_queries, num_ranked)`` integer tensor or array: row ``i`` holds the database indices for
            query ``i``, best first. **Note** this is the transpose of revisitop's ``db × queries`` matrix (pass
            ``ranks.T`` for a matrix built for revisitop). Rows may be truncated (``num_ranked`` smaller than the
            database): positives not in a row count as misses. Indices must not repeat within a row (a repeated
            positive or junk index raises; other repeats only shift the ranks, as in revisitop).
        gnd: One dict per query with the database index lists ``"easy"``, ``"hard"`` and optionally
            ``"junk"`` (lists, arrays or tensors; other keys such as ``"bbx"`` are ignored) — the ``gnd`` list of
            revisitop's ``gnd_roxford5k.pkl``.
        kappas: The cut-offs :math:`\kappa` of the mean precision, positive integers.
        protocols: The protocols to evaluate, a subset of :data:`REVISITED_PROTOCOLS`.

    Returns:
        ``{protocol: {"map": float, "mp@1": float, "mp@5": float, "mp@10": float, "num_queries": int}}`` with the
        values as fractions in :math:`[0, 1]` (revisitop prints them ×100), one ``"mp@{k}"`` per entry of
        ``kappas``, and ``"num_queries"`` the number of queries with at least one positive (the others are left
        out of the means). A query whose positives are all missing from its (truncated) row has AP 0 and mP 0
        (revisitop's code fails on such a query).

    Raises:
        ValueError: If a requested protocol has no query with a positive, or on malformed input (negative
            indices, a repeated positive or junk index in a row, ``easy`` and ``hard`` sharing an index, a
            length mismatch).

    Example:
        >>> import torch
        >>> ranks = torch.tensor([[3, 5, 0, 1, 4, 2]])
        >>> gnd = [{"easy": [0], "hard": [2], "junk": [5]}]
        >>> result = revisited_map(ranks, gnd, kappas=(1, 2, 5))
        >>> round(result["medium"]["map"], 4), [result["medium"][f"mp@{k}"] for k in (1, 2, 5)]
        (0.2875, [0.0, 0.5, 0.4])
        >>> result["easy"]["map"]  # junk = {5} ∪ hard {2}; the easy positive 0 moves from rank 2 to rank 1
        0.25
    """
    ranks = _check_ranks(ranks)
    _check_kappas_protocols(kappas, protocols)
    num_queries, num_ranked = ranks.shape
    parsed = _parse_gnd(gnd, num_queries)
    num_db = _database_size(ranks, parsed)
    device = ranks.device
    kappa_t = torch.tensor([int(k) for k in kappas], dtype=torch.float64, device=device)
    # Per-query values, summed once at the end so that the query blocking cannot change the rounding.
    ap_all = {p: torch.zeros(num_queries, dtype=torch.float64, device=device) for p in protocols}
    mp_all = {p: torch.zeros(num_queries, len(kappas), dtype=torch.float64, device=device) for p in protocols}
    valid_all = {p: torch.zeros(num_queries, dtype=torch.bool, device=device) for p in protocols}
    block = max(1, _TABLE_BUDGET // max(num_db, num_ranked, 1))
    for start in range(0, num_queries, block):
        stop = min(num_queries, start + block)
        flagged = _flagged(ranks[start:stop], parsed[start:stop], num_db, start)
        for name in protocols:
            ap, mp, valid = _protocol_block(flagged, parsed[start:stop], name, kappa_t)
            ap_all[name][start:stop] = ap
            mp_all[name][start:stop] = mp
            valid_all[name][start:stop] = valid
    return {name: _protocol_means(name, ap_all[name], mp_all[name], valid_all[name], kappas) for name in protocols}


def _check_ranks(ranks: Any) -> torch.Tensor:
    """``ranks`` as a non-empty ``(num_queries, num_ranked)`` int64 tensor of non-negative indices."""
    if isinstance(ranks, np.ndarray):
        ranks = torch.from_numpy(np.ascontiguousarray(ranks))
    check_tensor(ranks, "ranks")
    check_dtype(ranks, "ranks", "integer")
    check_shape(ranks, "ranks", ("num_queries", "num_ranked"))
    if ranks.shape[0] == 0:
        raise ValueError(f"ranks must hold at least one query, got {describe(ranks)}")
    ranks = ranks.to(torch.long)  # no copy for int64 input
    if ranks.shape[1] > 0 and int(ranks.min()) < 0:
        raise ValueError(f"ranks must hold non-negative database indices, got minimum {int(ranks.min())}")
    return ranks


def _check_kappas_protocols(kappas: Any, protocols: Any) -> None:
    if isinstance(kappas, (int, str)) or not isinstance(kappas, Sequence) or len(kappas) == 0:
        raise TypeError(f"kappas must be a non-empty sequence of positive integers, got {describe(kappas)}")
    for kappa in kappas:
        check_number(kappa, "kappas[...]", low=1, integer=True)
    if isinstance(protocols, str) or not isinstance(protocols, Sequence) or len(protocols) == 0:
        raise TypeError(
            f"protocols must be a non-empty sequence of names from {REVISITED_PROTOCOLS}, got {protocols!r}"
        )
    for name in protocols:
        if name not in _PROTOCOL_MASKS:
            raise ValueError(f"protocols must be names from {REVISITED_PROTOCOLS}, got {name!r}")


def _database_size(ranks: torch.Tensor, parsed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> int:
    """One more than the largest database index in ``ranks`` or the ground truth (at least 1)."""
    num_db = int(ranks.max()) + 1 if ranks.shape[1] > 0 else 0
    for easy, hard, junk in parsed:
        for ids in (easy, hard, junk):
            if ids.numel():
                num_db = max(num_db, int(ids.max()) + 1)
    return max(num_db, 1)


@dataclass
class _Flagged:
    """The positions of a block's rankings that hold a positive or junk item of some protocol (row-major)."""

    rows: torch.Tensor  # (F,) query row within the block
    cols: torch.Tensor  # (F,) position in the ranking, increasing within each row
    bits: torch.Tensor  # (F,) uint8 category bits (_EASY, _HARD, _JUNK)
    row_start: torch.Tensor  # (qb,) index of each row's first flagged entry
    num_rows: int


def _flagged(
    rows: torch.Tensor, parsed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_db: int, start: int
) -> _Flagged:
    """Category bits of every (query, database id) of the block gathered along each ranking, flagged ones kept."""
    qb, device = int(rows.shape[0]), rows.device
    table = torch.zeros(qb, num_db, dtype=torch.uint8, device=device)
    for offset, (easy, hard, junk) in enumerate(parsed):
        for ids, bit in ((easy, _EASY), (hard, _HARD), (junk, _JUNK)):
            if ids.numel():
                table[offset, ids.to(device)] |= bit
    categories = table.gather(1, rows)  # (qb, num_ranked)
    del table
    f_row, f_col = categories.nonzero(as_tuple=True)  # row-major: increasing column within each row
    f_bits = categories[f_row, f_col]
    # A flagged id repeated within a row would be counted twice: reject it (revisitop assumes a permutation).
    pair = f_row * num_db + rows[f_row, f_col]
    if torch.unique(pair).numel() != pair.numel():
        sorted_pair = torch.sort(pair).values
        bad = int(sorted_pair[1:][sorted_pair[1:] == sorted_pair[:-1]][0]) // num_db + start
        raise ValueError(f"ranks must not repeat a database index within a row, row {bad} does")
    counts = torch.bincount(f_row, minlength=qb)
    return _Flagged(f_row, f_col, f_bits, torch.cumsum(counts, 0) - counts, qb)


def _protocol_block(
    flagged: _Flagged, parsed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], name: str, kappa_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ap (qb,), mp (qb, K), valid (qb,))`` of one protocol on one block of queries (float64)."""
    qb, device = flagged.num_rows, flagged.rows.device
    f_row, f_col, f_bits = flagged.rows, flagged.cols, flagged.bits
    ok_bits, junk_bits = _PROTOCOL_MASKS[name]
    num_pos = torch.tensor(
        [(e.numel() if ok_bits & _EASY else 0) + (h.numel() if ok_bits & _HARD else 0) for e, h, _ in parsed],
        dtype=torch.float64,
        device=device,
    )
    is_pos = (f_bits & ok_bits) != 0
    is_junk = (f_bits & junk_bits) != 0
    # Junk and positives strictly before each flagged entry, within its row: exclusive cumulative sums over the
    # flagged list minus their value at the row's first entry.
    junk_excl = torch.cumsum(is_junk, 0) - is_junk.long()
    pos_excl = torch.cumsum(is_pos, 0) - is_pos.long()
    base = flagged.row_start[f_row]
    junk_before = junk_excl - junk_excl[base] if junk_excl.numel() else junk_excl
    pos_before = pos_excl - pos_excl[base] if pos_excl.numel() else pos_excl
    q_idx = f_row[is_pos]
    r = (f_col[is_pos] - junk_before[is_pos]).to(torch.float64)
    j = pos_before[is_pos].to(torch.float64)
    ap = torch.zeros(qb, dtype=torch.float64, device=device).index_add_(0, q_idx, _trapezoid_terms(j, r))
    ap = ap / num_pos.clamp_min(1.0)
    # mP@kappa: 1-based adjusted ranks; kq = min(largest positive rank, kappa).
    rho = r + 1.0
    found = torch.bincount(q_idx, minlength=qb)
    # Positives are listed row by row in increasing rank order: a row's last one has the largest rank.
    last = (torch.cumsum(found, 0) - 1).clamp_min(0)
    max_rho = rho[last] if rho.numel() else torch.ones(qb, dtype=torch.float64, device=device)
    kq = torch.minimum(max_rho[:, None], kappa_t[None, :]).clamp_min(1.0)  # (qb, K)
    hits = torch.zeros(qb, kappa_t.numel(), dtype=torch.float64, device=device).index_add_(
        0, q_idx, (rho[:, None] <= kq[q_idx]).to(torch.float64)
    )
    mp = torch.where(found[:, None] > 0, hits / kq, torch.zeros_like(hits))
    return ap, mp, num_pos > 0


def _protocol_means(
    name: str, ap: torch.Tensor, mp: torch.Tensor, valid: torch.Tensor, kappas: Sequence[int]
) -> dict[str, float]:
    """The means over the queries with a positive: ``{"map", "mp@k"..., "num_queries"}``."""
    counted = int(valid.sum())
    if counted == 0:
        raise ValueError(
            f"the {name!r} protocol has no query with a positive in gnd; leave it out of protocols to skip it"
        )
    entry: dict[str, float] = {"map": float(ap[valid].sum()) / counted}
    for kappa, value in zip(kappas, (mp[valid].sum(dim=0) / counted).tolist(), strict=True):
        entry[f"mp@{int(kappa)}"] = value
    entry["num_queries"] = counted
    return entry
