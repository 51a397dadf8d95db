"""The study's text report: full (wrapped) class names, correlations with intervals and their warning, the
smoke-run label, named backgrounds and the legends that explain every derived column."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_bias.bias import StudyConfig, StudyResult
from dml_bias.bias.analysis import PER_CLASS_FIELDS, per_class_summary
from dml_bias.bias.report import (
    CSV_LEGEND,
    SMOKE_RUN_NOTE,
    format_per_class,
    format_tables,
    wrap_name,
    write_per_class_csv,
    write_report_md,
)

LONG = "Black_footed_Albatross_with_a_really_long_name/and/more/parts/than/fit"


def _result(
    none: dict[str, list[float]],
    hard: dict[str, list[float]],
    *,
    names: list[str] | None = None,
    homes: list[int] | None = None,
    config: StudyConfig | None = None,
    attribution: dict[str, list[float]] | None = None,
) -> StudyResult:
    """A hand-set result: per-class Recall@1 of a 'none' and a 'hard' run (10 queries per class)."""
    n = len(none["original"])
    runs = []
    for mode, per_variant in (("none", none), ("hard", hard)):
        pcs = {v: {str(c): r for c, r in enumerate(vals)} for v, vals in per_variant.items()}
        run: dict[str, Any] = {
            "loss": "proxy_anchor",
            "mode": mode,
            "sigma": None,
            "name": mode,
            "class_counts": {str(c): 10 for c in range(n)},
            "per_class_recall@1": {"metrics": pcs, "metrics_raw": pcs},
        }
        metrics = {
            v: {k: sum(vals) / n for k in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")}
            for v, vals in per_variant.items()
        }
        run.update(
            metrics=metrics,
            metrics_raw=metrics,
            background_gap=0.0,
            background_gap_raw=0.0,
            worst_class={"name": "class0", "recall@1": 0.0},
        )
        if attribution is not None:
            sens = attribution[mode]
            run["attribution"] = {
                "num_images": 3 * n,
                "layer": "features",
                "foreground_energy": 0.5,
                "foreground_chance": 0.3,
                "background_shift": 0.2,
                "object_shift": 0.4,
                "background_sensitivity": 0.33,
                "per_class": {
                    str(c): {"background_sensitivity": s, "foreground_energy": 1.0 - s, "foreground_chance": 0.3}
                    for c, s in enumerate(sens)
                },
            }
        runs.append(run)
    homes = list(range(n)) if homes is None else homes
    dataset: dict[str, Any] = {
        "class_names": names or [f"class{c}" for c in range(n)],
        "home_backgrounds": homes,
        "background_distinctiveness": [1 / homes.count(h) for h in homes],
        "variants": ["original", "mixed_rand"],
    }
    cfg = config or StudyConfig(losses=("proxy_anchor",), modes=("none", "hard"))
    return StudyResult(config=cfg, runs=runs, dataset=dataset)


def _three_classes(**kw: Any) -> StudyResult:
    return _result(
        {"original": [1.0, 0.9, 0.5], "mixed_rand": [0.2, 0.8, 0.4]},
        {"original": [0.7, 0.7, 0.6], "mixed_rand": [0.7, 0.7, 0.5]},
        **kw,
    )


def _many_classes(n: int, strength: float) -> StudyResult:
    """``n`` classes whose background reliance grows with their home's distinctiveness when ``strength`` > 0.

    Classes 0 … n/2 − 1 have a home of their own, the others share home ``n``; the own-home classes lose
    ``strength`` of their Recall@1 to the swap, the shared-home ones nothing.
    """
    half = n // 2
    homes = list(range(half)) + [n] * (n - half)
    orig = [1.0] * n
    swapped = [1.0 - strength if c < half else 1.0 for c in range(n)]
    flat = {"original": orig, "mixed_rand": orig}
    return _result({"original": orig, "mixed_rand": swapped}, flat, homes=homes)


def test_wrap_name_hand_cases() -> None:
    assert wrap_name("ellipse/red/stripes/front/dark", 12) == ["ellipse/red/", "stripes/", "front/dark"]
    assert wrap_name("short", 26) == ["short"]
    assert wrap_name("abcdefghij", 4) == ["abcd", "efgh", "ij"]  # no break point: broken inside the word
    assert wrap_name("Laysan Albatross", 8) == ["Laysan", "Albatross"[:8], "s"]


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet="ab/_-", min_size=1, max_size=80), st.integers(1, 30))
def test_wrap_name_never_cuts(name: str, width: int) -> None:
    lines = wrap_name(name, width)
    assert "".join(lines) == name  # nothing lost (no spaces in this alphabet)
    assert all(1 <= len(line) <= width for line in lines)


def test_long_class_names_are_wrapped_not_cut() -> None:
    result = _three_classes(names=[LONG, "b", "c"])
    text = format_per_class(result, top=3)
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.lstrip().startswith("1 "))
    # the name column is 26 wide: the name continues on the following lines, under the class column
    pieces = [lines[first][7:33].rstrip()] + [line[7:].rstrip() for line in lines[first + 1 : first + 3]]
    assert "".join(pieces) == LONG
    assert LONG[:26] + " " not in text  # not cut at 26 characters


def test_backgrounds_are_named_in_the_table_and_the_csv(tmp_path: Path) -> None:
    result = _three_classes(homes=[8, 15, 15])
    text = format_per_class(result, top=3)
    assert "waves #8" in text
    assert "gradient #15" in text
    path = write_per_class_csv(result, tmp_path / "per_class.csv")
    rows = list(csv.DictReader(path.open()))
    assert {r["label"]: (r["home_background"], r["home_background_name"]) for r in rows} == {
        "0": ("8", "waves #8"),
        "1": ("15", "gradient #15"),
        "2": ("15", "gradient #15"),
    }


def test_legend_explains_why_hard_failures_match() -> None:
    text = format_per_class(_three_classes(), top=3)
    # hard: mixed_rand [0.7, 0.7, 0.5] vs original [0.7, 0.7, 0.6]: 3, 3, 5 failures vs 3, 3, 4 → 2 of 3 equal
    assert "hard on mixed_rand equals hard on original for 2 of 3 rows" in " ".join(text.split())
    assert "background-free reference" in text
    for words in ("reliance = (no-mask failures added by swapping", "share = reliance ÷", "bg-alone R@1 = "):
        assert words in " ".join(text.split())


def test_every_csv_column_has_a_legend_line() -> None:
    explained = [name.strip() for names, _ in CSV_LEGEND for name in names.split(",")]
    assert sorted(explained) == sorted(PER_CLASS_FIELDS)


def test_correlations_with_interval_and_no_warning_when_readable() -> None:
    result = _many_classes(60, 0.5)
    summary = per_class_summary(result)["proxy_anchor"]
    # shares are 1 for the own-home classes and 0 for the others: perfectly ordered with distinctiveness, the
    # rank correlation of two two-level variables split 30/30 is 1
    assert summary["spearman_reliance_share"] == pytest.approx(1.0)
    text = " ".join(format_per_class(result, top=10).split())
    assert "Spearman rank correlation with distinctiveness over 60 classes (95 % intervals, Fisher z):" in text
    assert "reliance share (the ranking) +1.00 [+1.00, +1.00]" in text
    assert "Warning" not in text


def test_correlations_over_few_classes_carry_a_warning() -> None:
    result = _many_classes(12, 0.5)
    text = " ".join(format_per_class(result, top=3).split())
    assert "over 12 classes" in text
    assert "Warning: none of these correlations can be read: only 12 classes" in text
    assert "interval contains 0" not in text  # a perfect ordering: the intervals lie far from 0
    none_at_all = " ".join(format_per_class(_many_classes(12, 0.0), top=3).split())
    assert "only 12 classes (a correlation over classes needs at least 50;" in none_at_all
    assert "and every 95 % interval contains 0." in none_at_all
    # 60 classes with no effect: constant shares → rho 0, its interval contains 0
    flat = " ".join(format_per_class(_many_classes(60, 0.0), top=10).split())
    assert "reliance share (the ranking) +0.00 [-0.26, +0.26]" in flat
    assert "Warning: reliance share (the ranking), reliance, difference cannot be read: the 95 % interval" in flat


def test_smoke_run_is_labelled(tmp_path: Path) -> None:
    quick = _three_classes(config=StudyConfig.quick(losses=("proxy_anchor",), modes=("none", "hard")))
    assert format_per_class(quick).startswith("Smoke run (the --quick size)")
    assert format_tables(quick).startswith("Smoke run (the --quick size)")  # what the command line prints first
    md = write_report_md(quick, tmp_path / "quick.md").read_text()
    assert md.startswith("# Background-bias study — smoke run\n")
    assert f"> **{SMOKE_RUN_NOTE}**" in md
    assert md.count("Smoke run (the --quick size)") == 1  # said once, in the header
    full = _three_classes()
    assert not format_per_class(full).startswith("Smoke run")
    assert not format_tables(full).startswith("Smoke run")
    md = write_report_md(full, tmp_path / "full.md").read_text()
    assert md.startswith("# Background-bias study\n")
    assert "smoke run" not in md.lower()


def test_report_md_attribution_correlations_have_intervals(tmp_path: Path) -> None:
    # bg-sens of the no-mask model follows the reliance share exactly over 3 classes: rho = 1, but too few classes
    result = _three_classes(attribution={"none": [0.9, 0.5, 0.1], "hard": [0.0, 0.0, 0.0]})
    md = write_report_md(result, tmp_path / "report.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("- `spearman_sensitivity_reliance_share`"))
    assert line == (
        "- `spearman_sensitivity_reliance_share`: +1.000 (95 % interval [-1.000, +1.000], Fisher z, 3 classes) — "
        "only 3 classes (fewer than 50) and the 95 % interval contains 0: cannot be read"
    )
    assert "`per_class.csv`: " not in md  # the legend lists columns, one per line
    assert "- `home_background, home_background_name`:" in md


# ---------------------------------------------------------------------------------------------------- the audit


class _LongNames(torch.utils.data.Dataset):
    """Synthetic images and masks under class names too long for any column (composited variants)."""

    def __init__(self) -> None:
        from dml_bias.datasets import SyntheticBackgrounds

        self.data = SyntheticBackgrounds("test", num_classes=3, images_per_class=3, image_size=16)
        self.class_names = [f"{LONG}_{c}" for c in range(3)]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.data[index]
        return {"image": sample["image"], "mask": sample["mask"], "label": sample["label"]}


@pytest.fixture(scope="module")
def long_audit() -> Any:
    from dml_bias.bias import SmallCNN, audit

    torch.manual_seed(0)
    return audit(SmallCNN(embedding_size=8, width=4), _LongNames(), bootstrap=10, attribution_images=0, progress=False)


def test_audit_report_keeps_full_names_and_explains_its_columns(long_audit: Any) -> None:
    from dml_bias.bias import _audit_report

    md = _audit_report.report_md(long_audit, {})
    for c in range(3):
        assert f"| {LONG}_{c} |" in md
    assert _audit_report.CLASS_LEGEND in md
    assert _audit_report.VARIANT_LEGEND in md
    assert "drop = Recall@1 − mixed_rand" in _audit_report.CLASS_LEGEND
    page = _audit_report.report_html(long_audit, {})
    assert f'<td class="name">{LONG}_0</td>' in page
    assert "overflow-wrap: anywhere" in page  # long names wrap inside their cell
    assert page.count('<p class="legend">') == 2


def test_audit_class_figure_wraps_names(long_audit: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from dml_bias.bias import _audit_report

    seen: list[Any] = []

    def keep(fig: Any) -> bytes:
        seen.append(fig)
        return b""

    monkeypatch.setattr(_audit_report, "_png", keep)
    _audit_report.per_class_png(long_audit)
    labels = [t.get_text() for t in seen[0].axes[0].get_yticklabels()]
    assert sorted(label.replace("\n", "") for label in labels) == [f"{LONG}_{c}" for c in range(3)]
    assert all(max(len(line) for line in label.split("\n")) <= 30 for label in labels)
