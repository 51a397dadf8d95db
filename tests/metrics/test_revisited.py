"""Tests of the Revisited Oxford/Paris mAP (revisitop protocol)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dml_bias.metrics.revisited as revisited_module
from dml_bias.metrics.revisited import revisited_average_precision, revisited_map


def slow_compute_map(ranks_db_by_q: np.ndarray, gnd_ok: list[dict], kappas: tuple[int, ...]) -> tuple[float, list]:
    """Independent reference, written from the protocol text of revisitop's ``compute_map``.

    ``ranks_db_by_q`` is revisitop's layout (database × queries); ``gnd_ok`` holds ``ok`` and ``junk`` per query.
    A query with no retrieved positive gets precision 0 (revisitop's code fails there).
    """
    num_queries = ranks_db_by_q.shape[1]
    total_ap, total_pr, counted = 0.0, np.zeros(len(kappas)), 0
    for i in range(num_queries):
        ok = np.array(gnd_ok[i]["ok"], dtype=np.int64)
        if ok.shape[0] == 0:
            continue
        junk = np.array(gnd_ok[i]["junk"], dtype=np.int64)
        column = ranks_db_by_q[:, i]
        positions = np.arange(column.shape[0])
        pos = positions[np.isin(column, ok)]
        junk_pos = positions[np.isin(column, junk)]
        adjusted = []
        for p in pos:
            shift = 0
            for jp in junk_pos:
                if jp < p:
                    shift += 1
            adjusted.append(p - shift)
        ap = 0.0
        for j, r in enumerate(adjusted):
            left = 1.0 if r == 0 else j / r
            right = (j + 1) / (r + 1)
            ap += (left + right) / 2.0 / len(ok)
        total_ap += ap
        one_based = [r + 1 for r in adjusted]
        for t, kappa in enumerate(kappas):
            if not one_based:
                continue
            kq = min(max(one_based), kappa)
            total_pr[t] += sum(1 for r in one_based if r <= kq) / kq
        counted += 1
    return total_ap / counted, list(total_pr / counted)


def protocol_gnd(gnd: list[dict], protocol: str) -> list[dict]:
    out = []
    for g in gnd:
        easy, hard, junk = list(g["easy"]), list(g["hard"]), list(g.get("junk", []))
        if protocol == "easy":
            out.append({"ok": easy, "junk": junk + hard})
        elif protocol == "medium":
            out.append({"ok": easy + hard, "junk": junk})
        else:
            out.append({"ok": hard, "junk": junk + easy})
    return out


def random_case(rng: np.random.Generator, num_queries: int, num_db: int, truncate: int | None):
    ranks = np.stack([rng.permutation(num_db) for _ in range(num_queries)])
    if truncate is not None:
        ranks = ranks[:, :truncate]
    gnd = []
    for _ in range(num_queries):
        ids = rng.permutation(num_db)
        n_easy, n_hard, n_junk = rng.integers(0, 6), rng.integers(0, 6), rng.integers(0, 8)
        gnd.append(
            {
                "easy": ids[:n_easy].tolist(),
                "hard": ids[n_easy : n_easy + n_hard].tolist(),
                "junk": ids[n_easy + n_hard : n_easy + n_hard + n_junk].tolist(),
                "bbx": [0.0, 0.0, 1.0, 1.0],
            }
        )
    return ranks, gnd


# --- worked examples of methods.md §B' -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("positive_ranks", "num_positives", "expected"),
    [([0, 2], 2, 0.791667), ([1, 3], 2, 0.333333), ([0, 2], 3, 0.527778), ([], 4, 0.0), ([0], 1, 1.0)],
)
def test_average_precision_worked_examples(positive_ranks: list, num_positives: int, expected: float) -> None:
    assert revisited_average_precision(positive_ranks, num_positives) == pytest.approx(expected, abs=5e-7)
    as_tensor = torch.tensor(positive_ranks, dtype=torch.long)
    assert revisited_average_precision(as_tensor, num_positives) == pytest.approx(expected, abs=5e-7)


def test_worked_query_with_and_without_junk() -> None:
    ranks = torch.tensor([[3, 5, 0, 1, 4, 2]])
    with_junk = revisited_map(ranks, [{"easy": [0, 2], "hard": [], "junk": [5]}], kappas=(1, 2, 5), protocols=["easy"])
    assert with_junk["easy"]["map"] == pytest.approx(0.2875, abs=1e-12)
    assert [with_junk["easy"][f"mp@{k}"] for k in (1, 2, 5)] == pytest.approx([0.0, 0.5, 0.4], abs=1e-12)
    no_junk = revisited_map(ranks, [{"easy": [0, 2], "hard": []}], kappas=(1, 2, 5), protocols=["easy"])
    assert no_junk["easy"]["map"] == pytest.approx(0.216667, abs=5e-7)
    assert [no_junk["easy"][f"mp@{k}"] for k in (1, 2, 5)] == pytest.approx([0.0, 0.0, 0.2], abs=1e-12)
    assert no_junk["easy"]["num_queries"] == 1


def test_protocols_split_easy_hard_junk() -> None:
    # easy = {0}, hard = {2}, junk = {5}; ranking [3, 5, 0, 1, 4, 2].
    result = revisited_map(torch.tensor([[3, 5, 0, 1, 4, 2]]), [{"easy": [0], "hard": [2], "junk": [5]}], (1, 2, 5))
    # Easy: 0 at adjusted rank 1 (5 removed): AP = (0 + 1/2) / 2.
    assert result["easy"]["map"] == pytest.approx(0.25)
    # Medium: the worked example with junk.
    assert result["medium"]["map"] == pytest.approx(0.2875)
    # Hard: 2 at rank 5, junk {5, 0} before it -> adjusted 3: AP = (0 + 1/4) / 2.
    assert result["hard"]["map"] == pytest.approx(0.125)
    assert [result["hard"][f"mp@{k}"] for k in (1, 2, 5)] == pytest.approx([0.0, 0.0, 0.25])


# --- against the independent reference ------------------------------------------------------------------------


@pytest.mark.parametrize("truncate", [None, 15])
def test_matches_slow_reference_on_random_rankings(truncate: int | None) -> None:
    rng = np.random.default_rng(1)
    kappas = (1, 5, 10)
    ranks, gnd = random_case(rng, num_queries=25, num_db=40, truncate=truncate)
    ours = revisited_map(torch.from_numpy(ranks), gnd, kappas)
    for protocol in ("easy", "medium", "hard"):
        expected_map, expected_pr = slow_compute_map(ranks.T, protocol_gnd(gnd, protocol), kappas)
        assert ours[protocol]["map"] == pytest.approx(expected_map, abs=1e-12)
        assert [ours[protocol][f"mp@{k}"] for k in kappas] == pytest.approx(expected_pr, abs=1e-12)
        expected_count = sum(1 for g in protocol_gnd(gnd, protocol) if g["ok"])
        assert ours[protocol]["num_queries"] == expected_count


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_db=st.integers(1, 12), truncate=st.integers(1, 12))
def test_property_matches_reference_on_small_cases(seed: int, num_db: int, truncate: int) -> None:
    rng = np.random.default_rng(seed)
    ranks, gnd = random_case(rng, num_queries=3, num_db=num_db, truncate=min(truncate, num_db))
    if not any(g["easy"] for g in gnd):
        gnd[0]["easy"], gnd[0]["hard"] = [0], [h for h in gnd[0]["hard"] if h != 0]
        gnd[0]["junk"] = [j for j in gnd[0]["junk"] if j != 0]
    protocols = [p for p in ("easy", "medium", "hard") if any(protocol_gnd(gnd, p)[i]["ok"] for i in range(3))]
    ours = revisited_map(ranks, gnd, (1, 2, 4), protocols=protocols)
    for protocol in protocols:
        expected_map, expected_pr = slow_compute_map(ranks.T, protocol_gnd(gnd, protocol), (1, 2, 4))
        assert ours[protocol]["map"] == pytest.approx(expected_map, abs=1e-12)
        assert [ours[protocol][f"mp@{k}"] for k in (1, 2, 4)] == pytest.approx(expected_pr, abs=1e-12)


def test_query_blocks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    ranks, gnd = random_case(rng, num_queries=9, num_db=30, truncate=None)
    whole = revisited_map(ranks, gnd)  # a numpy array is accepted too
    monkeypatch.setattr(revisited_module, "_TABLE_BUDGET", 64)  # two queries per block
    blocked = revisited_map(torch.from_numpy(ranks), gnd)
    assert blocked == whole


def test_queries_without_positives_are_left_out() -> None:
    ranks = torch.tensor([[0, 1, 2], [2, 1, 0]])
    gnd = [{"easy": [1], "hard": [], "junk": []}, {"easy": [], "hard": [], "junk": [0]}]
    result = revisited_map(ranks, gnd, kappas=(1,), protocols=("easy", "medium"))
    # Only query 0 counts: its positive sits at rank 1, AP = (0/1 + 1/2) / 2.
    assert result["easy"] == {"map": 0.25, "mp@1": 0.0, "num_queries": 1}
    with pytest.raises(ValueError, match="'hard' protocol has no query with a positive"):
        revisited_map(ranks, gnd)


def test_positive_missing_from_truncated_ranking_counts_as_miss() -> None:
    # Positives 0 (rank 0) and 9 (not ranked): AP = 1/2, and mP uses only the retrieved ones.
    result = revisited_map(torch.tensor([[0, 1, 2]]), [{"easy": [0, 9], "hard": []}], kappas=(1, 3), protocols=["easy"])
    assert result["easy"]["map"] == pytest.approx(0.5)
    assert result["easy"]["mp@1"] == 1.0
    assert result["easy"]["mp@3"] == 1.0
    none_found = revisited_map(torch.tensor([[0, 1, 2]]), [{"easy": [7], "hard": []}], kappas=(1,), protocols=["easy"])
    assert none_found["easy"] == {"map": 0.0, "mp@1": 0.0, "num_queries": 1}


# --- bad input -------------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument() -> None:
    gnd = [{"easy": [0], "hard": [1], "junk": []}]
    with pytest.raises(TypeError, match=r"ranks must be an? integer"):
        revisited_map(torch.zeros(1, 3), gnd)
    with pytest.raises(ValueError, match="ranks must be a 2-D"):
        revisited_map(torch.tensor([0, 1, 2]), gnd)
    with pytest.raises(ValueError, match="gnd must have one entry per query"):
        revisited_map(torch.tensor([[0, 1, 2]]), gnd * 2)
    with pytest.raises(ValueError, match="repeat a database index within a row, row 0"):
        revisited_map(torch.tensor([[0, 1, 1]]), gnd)
    with pytest.raises(ValueError, match="ranks must hold non-negative"):
        revisited_map(torch.tensor([[0, -1, 2]]), gnd)
    with pytest.raises(ValueError, match=r"gnd\[0\]\['easy'\] and gnd\[0\]\['hard'\] must be disjoint"):
        revisited_map(torch.tensor([[0, 1, 2]]), [{"easy": [0, 1], "hard": [1]}])
    with pytest.raises(ValueError, match=r"gnd\[0\]\['junk'\] must not repeat"):
        revisited_map(torch.tensor([[0, 1, 2]]), [{"easy": [0], "hard": [], "junk": [2, 2]}])
    with pytest.raises(ValueError, match=r"gnd\[0\] must have the keys"):
        revisited_map(torch.tensor([[0, 1, 2]]), [{"easy": [0]}])
    with pytest.raises(TypeError, match=r"gnd\[0\]\['easy'\] must hold integer"):
        revisited_map(torch.tensor([[0, 1, 2]]), [{"easy": [0.5], "hard": []}])
    with pytest.raises(ValueError, match=r"kappas\[...\] must be an integer in \[1, inf\), got 0"):
        revisited_map(torch.tensor([[0, 1, 2]]), gnd, kappas=(0,))
    with pytest.raises(ValueError, match="protocols must be names"):
        revisited_map(torch.tensor([[0, 1, 2]]), gnd, protocols=("medium", "extreme"))
    with pytest.raises(ValueError, match="positive_ranks must be non-negative and strictly increasing"):
        revisited_average_precision([2, 1], 2)
    with pytest.raises(ValueError, match="num_positives must be an integer in"):
        revisited_average_precision([0, 1], 1)


def test_float_gnd_from_mat_files_is_accepted() -> None:
    ranks = torch.tensor([[3, 5, 0, 1, 4, 2]])
    as_float = [{"easy": np.array([[0.0, 2.0]]), "hard": np.zeros((1, 0)), "junk": np.array([5.0])}]
    result = revisited_map(ranks, as_float, kappas=(1, 2, 5), protocols=["easy"])
    assert result["easy"]["map"] == pytest.approx(0.2875)


def test_repeated_negative_only_shifts_ranks_like_the_reference() -> None:
    ranks = np.array([[4, 4, 0, 3, 1, 2]])  # 4 is neither positive nor junk
    gnd = [{"easy": [0, 2], "hard": [], "junk": [3]}]
    ours = revisited_map(ranks, gnd, kappas=(1, 3), protocols=["easy"])
    expected_map, expected_pr = slow_compute_map(ranks.T, protocol_gnd(gnd, "easy"), (1, 3))
    assert ours["easy"]["map"] == pytest.approx(expected_map, abs=1e-12)
    assert [ours["easy"]["mp@1"], ours["easy"]["mp@3"]] == pytest.approx(expected_pr, abs=1e-12)
