"""The analysis module of the bias study and audit: rank correlations with Fisher-z intervals (hand-computed), the
smoke-run test, background names, the bootstrap helpers, and one home for every moved name."""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_bias.bias import StudyConfig, analysis, report
from dml_bias.bias.analysis import (
    MIN_CLASSES_FOR_CORRELATION,
    background_name,
    bootstrap_ci,
    bootstrap_indices,
    correlation_reading,
    correlation_readings,
    finite_ci,
    is_smoke_run,
    spearman,
    spearman_ci,
)


def test_moved_names_stay_importable_from_their_old_homes() -> None:
    for name in ("LOSS_TITLES", "PER_CLASS_FIELDS", "per_class_rows", "per_class_summary", "attribution_summary"):
        assert getattr(report, name) is getattr(analysis, name)
    audit_module = importlib.import_module("dml_bias.bias.audit")  # `dml_bias.bias.audit` is also the function
    for name in ("bootstrap_ci", "bootstrap_indices"):
        assert getattr(audit_module, name) is getattr(analysis, name)


def test_spearman_and_its_interval_hand_computed() -> None:
    # ranks 1..7 against 2,1,4,3,6,5,7: d² = 6, rho = 1 − 6·6 / (7·(49 − 1)) = 1 − 36/336
    rho = spearman([1, 2, 3, 4, 5, 6, 7], [2, 1, 4, 3, 6, 5, 7])
    assert rho == pytest.approx(1 - 36 / 336)
    # z = artanh(0.892857) = ½ ln(1.892857 / 0.107143) = 1.435840; se = √(1.06 / 4) = 0.514782;
    # z ± 1.959964 · se = 0.426887 … 2.444793; tanh of those:
    low, high = spearman_ci(rho, 7)
    assert low == pytest.approx(0.402716, abs=1e-6)
    assert high == pytest.approx(0.985063, abs=1e-6)
    # rho = 0: the interval is symmetric, tanh(± 1.959964 · √(1.06 / 97)) = ± 0.2018…
    low, high = spearman_ci(0.0, 100)
    assert high == pytest.approx(math.tanh(1.959964 * math.sqrt(1.06 / 97)), abs=1e-6)
    assert low == pytest.approx(-high)


def test_spearman_constant_input_is_zero_and_tiny_n_knows_nothing() -> None:
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0
    assert spearman_ci(0.9, 3) == (-1.0, 1.0)
    low, high = spearman_ci(1.0, 10)  # a perfect correlation keeps a finite z
    assert 0.99 < low <= high <= 1.0


@settings(max_examples=60, deadline=None)
@given(st.floats(-0.999, 0.999), st.integers(4, 500))
def test_interval_contains_rho_shrinks_with_n_and_mirrors(rho: float, n: int) -> None:
    low, high = spearman_ci(rho, n)
    assert -1.0 <= low <= rho <= high <= 1.0
    mirrored = spearman_ci(-rho, n)
    assert mirrored[0] == pytest.approx(-high, abs=1e-12)
    assert mirrored[1] == pytest.approx(-low, abs=1e-12)
    wider = spearman_ci(rho, n + 10)
    assert wider[1] - wider[0] <= high - low + 1e-12


def test_correlation_reading_says_when_it_cannot_be_read() -> None:
    strong = correlation_reading(0.6, 60)
    assert strong["readable"]
    assert strong["warning"] is None
    assert strong["n"] == 60
    assert strong["ci"][0] > 0
    weak = correlation_reading(0.1, 60)  # interval ≈ [−0.16, 0.35] contains 0
    assert not weak["readable"]
    assert weak["warning"] == "the 95 % interval contains 0: cannot be read"
    few = correlation_reading(0.99, MIN_CLASSES_FOR_CORRELATION - 1)  # interval far from 0, but too few classes
    assert few["ci"][0] > 0.9
    assert few["warning"] == f"only {MIN_CLASSES_FOR_CORRELATION - 1} classes (fewer than 50): cannot be read"
    readings = correlation_readings({"num_classes": 60, "top": 10, "spearman_a": 0.6, "spearman_b": None})
    assert list(readings) == ["spearman_a"]
    assert readings["spearman_a"] == strong


def test_is_smoke_run() -> None:
    assert is_smoke_run(StudyConfig.quick())
    assert is_smoke_run(StudyConfig.quick(num_classes=4, epochs=1))  # smaller still
    assert is_smoke_run(StudyConfig.quick().to_dict())  # results.json's config
    assert not is_smoke_run(StudyConfig())  # the default study
    assert not is_smoke_run(StudyConfig.quick(epochs=8))  # trained as long as the default: not a smoke test
    assert not is_smoke_run(StudyConfig.quick(num_classes=30))
    assert not is_smoke_run({**StudyConfig.quick().to_dict(), "dataset": "cub"})


def test_background_names() -> None:
    # id b belongs to family b % 6 of stripes, checks, waves, gradient, dots, rings
    assert [background_name(b) for b in (0, 1, 2, 3, 4, 5, 6, 15)] == [
        "stripes #0",
        "checks #1",
        "waves #2",
        "gradient #3",
        "dots #4",
        "rings #5",
        "stripes #6",
        "gradient #15",
    ]
    assert background_name(None) is None
    from dml_bias.datasets.synthetic import BACKGROUND_FAMILIES

    for b in range(2 * len(BACKGROUND_FAMILIES)):  # the analysis's copy of the families stays in step with the data
        assert background_name(b) == f"{BACKGROUND_FAMILIES[b % len(BACKGROUND_FAMILIES)]} #{b}"


def test_bootstrap_helpers() -> None:
    idx = bootstrap_indices(4, 3, seed=5)
    assert idx.shape == (3, 4)
    assert idx.dtype == torch.long
    assert torch.equal(idx, bootstrap_indices(4, 3, seed=5))
    # resampled means of [0, 1] over two hand-set resamples: 0.0 and 1.0 → percentiles 0.025 and 0.975
    values = torch.tensor([0.0, 1.0])
    assert bootstrap_ci(values, torch.tensor([[0, 0], [1, 1]])) == pytest.approx([0.025, 0.975])
    assert all(math.isnan(v) for v in bootstrap_ci(torch.empty(0), idx))
    mean, ci, count = finite_ci(torch.tensor([1.0, float("nan"), 3.0]), 200, seed=0)
    assert (mean, count) == (2.0, 2)
    assert 1.0 <= ci[0] <= ci[1] <= 3.0
    mean, ci, count = finite_ci(torch.tensor([float("nan")]), 10, seed=0)
    assert math.isnan(mean)
    assert count == 0


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: spearman_ci(1.5, 10), ValueError, "rho"),
        (lambda: spearman_ci("0.5", 10), TypeError, "rho"),  # type: ignore[arg-type]
        (lambda: spearman_ci(0.5, 2.5), TypeError, "n"),  # type: ignore[arg-type]
        (lambda: spearman_ci(0.5, -1), ValueError, "n"),
        (lambda: correlation_reading(float("nan"), 60), ValueError, "rho"),
        (lambda: background_name(-1), ValueError, "background"),
        (lambda: background_name("waves"), TypeError, "background"),  # type: ignore[arg-type]
        (lambda: is_smoke_run("quick"), TypeError, "config"),  # type: ignore[arg-type]
    ],
)
def test_bad_input_names_the_argument(call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()
