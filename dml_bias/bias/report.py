"""Text output of the background-bias study: the printed tables, the per-class bias report and ``report.md``.

These functions take a :class:`~dml_bias.bias.StudyResult`; the usual entry points are its methods
:meth:`~dml_bias.bias.StudyResult.table`, :meth:`~dml_bias.bias.StudyResult.per_class_report` and
:meth:`~dml_bias.bias.StudyResult.save`. (The result module imports this one; this one reads the result
through the structural type :class:`~dml_bias.bias.analysis.StudyLike`, so no import runs back.)
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dml_bias.bias.analysis import (
    LOSS_TITLES,
    MIN_CLASSES_FOR_CORRELATION,
    PER_CLASS_FIELDS,
    StudyLike,
    attribution_summary,
    correlation_readings,
    is_smoke_run,
    per_class_rows,
    per_class_summary,
)

__all__: list[str] = []

_SHORT = {
    "original": "original",
    "only_fg": "only_fg",
    "only_bg_t": "only_bg_t",
    "no_fg": "no_fg",
    "mixed_same": "mix_same",
    "mixed_rand": "mix_rand",
    "mixed_next": "mix_next",
}
#: The line that labels a smoke run (the ``--quick`` size) at the top of the per-class report and ``report.md``.
SMOKE_RUN_NOTE = (
    "Smoke run (the --quick size): it checks that the study runs end to end. Its data and schedule are too small "
    "for its numbers to be read; run the default study for results."
)
#: The attribution measures per run (``run["attribution"]``), with their column titles.
ATTRIBUTION_COLUMNS = (
    ("foreground_energy", "fg-energy"),
    ("foreground_chance", "chance"),
    ("background_shift", "bg-shift"),
    ("object_shift", "obj-shift"),
    ("background_sensitivity", "bg-sens"),
)


def _fmt(x: float | None, width: int = 6) -> str:
    return f"{'—':>{width}}" if x is None else f"{x:>{width}.3f}"


def _rows(result: StudyLike, loss: str, raw: bool | None) -> list[tuple[dict[str, Any], str, str]]:
    """(run, eval label, metrics key) rows of one loss; runs whose raw evaluation is their own appear once."""
    rows = []
    for run in result.runs:
        if run["loss"] != loss:
            continue
        same = run["mode"] in ("none", "bg_augment")
        if raw is not True:
            rows.append((run, "both" if same else "own", "metrics"))
        if raw is not False and not same:
            rows.append((run, "raw", "metrics_raw"))
        if raw is True and same:
            rows.append((run, "both", "metrics"))
    return rows


def _swap_text(result: StudyLike) -> str:
    return "queries and gallery swapped" if result.config.swap == "both" else "queries swapped, original gallery"


def format_tables(result: StudyLike, *, raw: bool | None = None, smoke_note: bool = True) -> str:
    """The study's printed tables (see :meth:`~dml_bias.bias.StudyResult.table`).

    A smoke run (:func:`~dml_bias.bias.analysis.is_smoke_run`) starts with :data:`SMOKE_RUN_NOTE` unless
    ``smoke_note`` is ``False``.
    """
    if not result.runs:
        return "(no completed runs)"
    chance = result.dataset.get("chance_recall@1")
    variants = [v for v in result.dataset.get("variants", []) if v in result.runs[0]["metrics"]]
    out: list[str] = [*_wrap_text(SMOKE_RUN_NOTE), ""] if smoke_note and is_smoke_run(result.config) else []
    losses = list(dict.fromkeys(r["loss"] for r in result.runs))
    for loss in losses:
        title = LOSS_TITLES.get(loss, loss)
        rows = _rows(result, loss, raw)
        out.append(f"{title}: Recall@k and MAP@R on the original test images")
        out.append(f"  {'mode':<12} {'eval':<5} {'Recall@1':>8} {'R@2':>6} {'R@4':>6} {'R@8':>6} {'MAP@R':>6}")
        for run, label, key in rows:
            m = run[key]["original"]
            out.append(
                f"  {run['name']:<12} {label:<5} {m['recall@1']:>8.3f} {_fmt(m['recall@2'])} {_fmt(m['recall@4'])} "
                f"{_fmt(m['recall@8'])} {_fmt(m['map@r'])}"
            )
        out.append("")
        out.append(f"{title}: Recall@1 per test variant ({_swap_text(result)})")
        head = "".join(f" {_SHORT[v]:>9}" for v in variants)
        out.append(f"  {'mode':<12} {'eval':<5}{head} {'BG-gap':>7} {'bg/chance':>9}  worst class (R@1)")
        for run, label, key in rows:
            m = run[key]
            cells = "".join(f" {m[v]['recall@1']:>9.3f}" for v in variants)
            gap = run["background_gap" if key == "metrics" else "background_gap_raw"]
            ratio = None
            if chance and "only_bg_t" in m:
                ratio = m["only_bg_t"]["recall@1"] / chance
            worst = run["worst_class"]
            out.append(
                f"  {run['name']:<12} {label:<5}{cells} {_fmt(gap, 7)} "
                f"{('—' if ratio is None else f'{ratio:.1f}×'):>9}  {worst['name']} ({worst['recall@1']:.2f})"
            )
        out.append("")
        attribution = _attribution_lines(result, loss)
        if attribution:
            out.extend([*attribution, ""])
    notes = [
        "eval: own = test images with the model's own mask mode; raw = unmasked test images (channel mode: an "
        "all-object mask channel); both = the mode has no test-time mask (none, bg_augment).",
        "BG-gap = Recall@1 mixed_same − mixed_rand (large: the model uses the background).",
    ]
    if any("attribution" in r for r in result.runs):
        notes.append(
            "fg-energy = share of the positive similarity decomposition (query vs its nearest neighbour) on the "
            "object; chance = the object's area share. bg-shift / obj-shift = 1 − cos of the embedding before and "
            "after replacing only the background / only the object; bg-sens = bg-shift ÷ (bg-shift + obj-shift), 0 … 1."
        )
    if chance is not None:
        notes.append(
            f"bg/chance = only_bg_t Recall@1 ÷ chance Recall@1 ({chance:.3f}); well above 1× means the background "
            "alone identifies the class. Worst class: lowest Recall@1 on the original images (own eval)."
        )
    out.extend(line for note in notes for line in _wrap_text(note))
    return "\n".join(out)


def _attribution_lines(result: StudyLike, loss: str) -> list[str]:
    """The attribution table of one loss (empty without attribution measures)."""
    runs = [r for r in result.runs if r["loss"] == loss and "attribution" in r]
    if not runs:
        return []
    first = runs[0]["attribution"]
    per_class = result.config.attribution_images
    out = [
        f"{LOSS_TITLES.get(loss, loss)}: attribution on {first['num_images']} test images ({per_class} per class, "
        f"own mask mode; maps at {first['layer']!r})",
        f"  {'mode':<12} " + " ".join(f"{title:>9}" for _, title in ATTRIBUTION_COLUMNS),
    ]
    for run in runs:
        a = run["attribution"]
        out.append(f"  {run['name']:<12} " + " ".join(_fmt(a[key], 9) for key, _ in ATTRIBUTION_COLUMNS))
    summary = attribution_summary(result).get(loss) or {"num_classes": 0}
    readings = correlation_readings(summary)
    if readings:
        out.append(f"  no-mask model, Spearman over {summary['num_classes']} classes (95 % intervals, Fisher z):")
        out += _wrap_items([f"{_ATTRIBUTION_TITLES[key]} {_ci_text(r)}" for key, r in readings.items()], indent=4)
        warning = _correlation_warning(readings, _ATTRIBUTION_TITLES)
        if warning is not None:
            out += _wrap_text(warning, indent=2)
    return out


_ATTRIBUTION_TITLES = {
    "spearman_sensitivity_reliance_share": "bg-sens ~ reliance share",
    "spearman_sensitivity_distinctiveness": "bg-sens ~ distinctiveness",
    "spearman_background_energy_reliance_share": "1 − fg-energy ~ reliance share",
    "spearman_background_energy_distinctiveness": "1 − fg-energy ~ distinctiveness",
}


def wrap_name(name: str, width: int) -> list[str]:
    """A class name broken into lines of at most ``width`` characters, never cut.

    Lines break after a ``/``, space, ``-`` or ``_`` where one falls within the width, else inside a word.

    Args:
        name: The name.
        width: The longest line, at least 1.

    Example:
        >>> wrap_name("ellipse/red/stripes/front/dark", 12)
        ['ellipse/red/', 'stripes/', 'front/dark']
    """
    lines: list[str] = []
    rest = name
    while len(rest) > width:
        cut = max(rest.rfind(sep, 0, width) for sep in "/ -_") + 1
        if cut <= 0:
            cut = width
        lines.append(rest[:cut].rstrip(" "))
        rest = rest[cut:].lstrip(" ")
    return [*lines, rest]


_TEXT_WIDTH = 110


def _wrap_text(text: str, indent: int = 0) -> list[str]:
    """A paragraph wrapped to the report's text width, every line indented by ``indent`` spaces."""
    import textwrap

    pad = " " * indent
    return textwrap.wrap(text, _TEXT_WIDTH, initial_indent=pad, subsequent_indent=pad, break_on_hyphens=False)


def _wrap_items(items: list[str], indent: int) -> list[str]:
    """Comma-separated items on lines of the report's text width; an item is never broken."""
    lines = [" " * indent]
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if lines[-1].strip() and len(lines[-1]) + 1 + len(piece) > _TEXT_WIDTH:
            lines.append(" " * indent)
        lines[-1] += (" " if lines[-1].strip() else "") + piece
    return lines


def _ci_text(reading: dict[str, Any]) -> str:
    low, high = reading["ci"]
    return f"{reading['rho']:+.2f} [{low:+.2f}, {high:+.2f}]"


def _correlation_warning(readings: dict[str, dict[str, Any]], titles: dict[str, str]) -> str | None:
    """One warning for a group of correlations over the same classes; ``None`` when all can be read."""
    if not readings or all(r["readable"] for r in readings.values()):
        return None
    n = next(iter(readings.values()))["n"]
    crossing = [titles.get(k, k) for k, r in readings.items() if r["ci"][0] <= 0.0 <= r["ci"][1]]
    if n < MIN_CLASSES_FOR_CORRELATION:
        text = (
            f"Warning: none of these correlations can be read: only {n} classes (a correlation over classes needs "
            f"at least {MIN_CLASSES_FOR_CORRELATION}; with fewer, its sign can flip from one run or loss to the next)"
        )
        if len(crossing) == len(readings):
            text += ", and every 95 % interval contains 0"
        elif crossing:
            text += f", and the 95 % interval contains 0 for {', '.join(crossing)}"
        return text + "."
    return f"Warning: {', '.join(crossing)} cannot be read: the 95 % interval contains 0."


_SUMMARY_TITLES = {
    "spearman_reliance_share": "reliance share (the ranking)",
    "spearman_reliance": "reliance",
    "spearman_difference": "difference",
    "spearman_background_alone": "background-alone Recall@1",
}


def _per_class_legend(rows: list[dict[str, Any]]) -> str:
    """The legend under the per-class tables: every column that is derived rather than measured."""
    variant = rows[0]["variant"]
    same = sum(r["failures_hard"] == r["failures_hard_original"] for r in rows)
    parts = ["n = test images (queries) of the class."]
    if any(r["home_background"] is not None for r in rows):
        parts.append(
            "home bg = the class's home background in the synthetic data: its texture family and id (classes with "
            "the same id share it). distinct = 1 / (number of test classes sharing that home background); 1.00 = a "
            "home of its own."
        )
    parts += [
        f"none / hard = failed queries of the class, round(n × (1 − Recall@1)), of the no-mask and the hard-mask "
        f"model, on {variant} (backgrounds swapped) and on the original images.",
        f"hard on {variant} equals hard on original for {same} of {len(rows)} rows: the hard-mask model sees "
        "masked images, whose background (the only thing the swap changes) is set to zero, so its input and its "
        "failures stay the same (only the object's blended edge pixels can differ). It is the background-free "
        "reference.",
        "reliance = (no-mask failures added by swapping the backgrounds) − (hard-mask failures added) = difference − "
        "difference on original, where difference = no-mask − hard-mask failures. share = reliance ÷ no-mask "
        "failures on the swapped backgrounds (the ranking): the classes the no-mask model recognised by their "
        "background rank first.",
        "bg-alone R@1 = the no-mask model's Recall@1 of the class on only_bg_t (the background without the object).",
    ]
    return "\n".join(line for part in parts for line in _wrap_text(part))


_NAME_WIDTH = 26


def _per_class_table(class_rows: list[dict[str, Any]], variant: str, top: int) -> list[str]:
    """The per-class table of one loss: header and the first ``top`` rows, class names wrapped (never cut)."""
    lines = [
        f"  {'rank':>4} {'class':<{_NAME_WIDTH}} {'n':>3} {'home bg':<13} {'distinct':>8} | {variant}: "
        f"{'none':>4} {'hard':>4} | original: {'none':>4} {'hard':>4} | {'reliance':>8} {'share':>5} | bg-alone R@1"
    ]
    for row in class_rows[:top]:
        home = row["home_background_name"] or ("—" if row["home_background"] is None else str(row["home_background"]))
        dist = "—" if row["background_distinctiveness"] is None else f"{row['background_distinctiveness']:.2f}"
        alone = row["background_alone_recall@1"]
        name_lines = wrap_name(str(row["class_name"]), _NAME_WIDTH)
        lines.append(
            f"  {row['rank']:>4} {name_lines[0]:<{_NAME_WIDTH}} {row['count']:>3} {home:<13} {dist:>8} | "
            f"{'':>{len(variant) + 1}} {row['failures_none']:>4} {row['failures_hard']:>4} | "
            f"{'':>9} {row['failures_none_original']:>4} {row['failures_hard_original']:>4} | "
            f"{row['reliance']:>+8d} {row['reliance_share']:>+5.2f} | " + ("—" if alone is None else f"{alone:.2f}")
        )
        lines.extend(f"  {'':>4} {more}" for more in name_lines[1:])
    return lines


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    """The distinctiveness means and the correlations (with 95 % intervals and a warning) under a per-class table."""
    readings = correlation_readings(summary)
    lines = [
        f"  mean home-background distinctiveness: top {summary['top']} "
        f"{summary['mean_distinctiveness_top']:.2f}, all classes {summary['mean_distinctiveness_all']:.2f}",
        f"  Spearman rank correlation with distinctiveness over {summary['num_classes']} classes "
        "(95 % intervals, Fisher z):",
        *_wrap_items([f"{_SUMMARY_TITLES.get(key, key)} {_ci_text(r)}" for key, r in readings.items()], indent=4),
    ]
    warning = _correlation_warning(readings, _SUMMARY_TITLES)
    if warning is not None:
        lines += _wrap_text(warning, indent=2)
    return lines


def format_per_class(result: StudyLike, top: int = 10, *, smoke_note: bool = True) -> str:
    """The printed per-class bias report (see :meth:`~dml_bias.bias.StudyResult.per_class_report`).

    A smoke run (:func:`~dml_bias.bias.analysis.is_smoke_run`) starts with :data:`SMOKE_RUN_NOTE` unless
    ``smoke_note`` is ``False``.
    """
    rows = per_class_rows(result)
    if not rows:
        return "Per-class bias report: needs a 'none' and a 'hard' run of the same loss."
    variant = result.config.report_variant
    out: list[str] = [*_wrap_text(SMOKE_RUN_NOTE), ""] if smoke_note and is_smoke_run(result.config) else []
    summaries = per_class_summary(result, top=top)
    for loss in dict.fromkeys(r["loss"] for r in rows):
        class_rows = [r for r in rows if r["loss"] == loss]
        out.append(
            f"{LOSS_TITLES.get(loss, loss)}: per-class Recall@1 failures, no mask vs hard mask, on {variant} and "
            f"original (top {min(top, len(class_rows))} of {len(class_rows)} classes by reliance share)"
        )
        out += _per_class_table(class_rows, variant, top)
        summary = summaries.get(loss)
        if summary is not None and len(class_rows) > top:
            out += _summary_lines(summary)
        out.append("")
    out.append(_per_class_legend(rows))
    return "\n".join(out).rstrip()


def write_per_class_csv(result: StudyLike, path: Path) -> Path:
    """Write every row of :func:`per_class_rows` to ``path`` (CSV with a header)."""
    rows = per_class_rows(result)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(PER_CLASS_FIELDS))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in PER_CLASS_FIELDS})
    return path


def _md_metric_table(result: StudyLike, loss: str) -> list[str]:
    variants = [v for v in result.dataset.get("variants", []) if v in result.runs[0]["metrics"]]
    lines = [f"| mode | eval | metric | {' | '.join(variants)} |", f"|---|---|---|{'---|' * len(variants)}"]
    for run, label, key in _rows(result, loss, None):
        for metric in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"):
            cells = " | ".join(f"{run[key][v][metric]:.3f}" for v in variants)
            lines.append(f"| {run['name']} | {label} | {metric} | {cells} |")
    return lines


#: What every column of ``per_class.csv`` means (the derived ones say how they are derived).
CSV_LEGEND = (
    ("loss", "the loss both models were trained with"),
    ("rank", "position in the loss's ranking by reliance_share (1 = most background-reliant)"),
    ("label, class_name", "the test class and its full name"),
    ("count", "test images (queries) of the class"),
    (
        "home_background, home_background_name",
        "the id of the class's home background (synthetic data) and its texture family with that id; empty on CUB",
    ),
    ("background_distinctiveness", "1 / (number of test classes sharing the home background)"),
    ("variant", "the report variant (backgrounds swapped) of the failures_* columns"),
    (
        "failures_none, failures_hard",
        "failed queries, round(count × (1 − Recall@1)), of the no-mask and the hard-mask model on the report variant",
    ),
    (
        "failures_none_original, failures_hard_original",
        "the same on the original images. failures_hard equals "
        "failures_hard_original (up to the object's blended edge pixels): the hard-mask model sees the background "
        "set to zero, so swapping it changes nothing the model sees",
    ),
    ("difference, difference_original", "failures_none − failures_hard on the report variant and on the originals"),
    (
        "reliance",
        "difference − difference_original: the no-mask failures added by the swap beyond the hard-mask model's",
    ),
    ("reliance_share", "reliance ÷ max(failures_none, 1), the ranking"),
    ("background_alone_recall@1", "the no-mask model's Recall@1 of the class on only_bg_t (no object)"),
    (
        "background_sensitivity_none, background_sensitivity_hard",
        "the class's mean background sensitivity, bg-shift ÷ (bg-shift + obj-shift), of the no-mask / hard-mask model",
    ),
    (
        "foreground_energy_none, foreground_energy_hard, foreground_chance",
        "the class's mean share of the similarity attribution on "
        "the object, and the object's area share (its chance level)",
    ),
)


def _md_header(result: StudyLike) -> list[str]:
    """The title and setup of ``report.md``; a smoke run is labelled as one."""
    cfg = result.config
    smoke = is_smoke_run(cfg)
    lines = ["# Background-bias study" + (" — smoke run" if smoke else ""), ""]
    if smoke:
        lines += [f"> **{SMOKE_RUN_NOTE}**", ""]
    lines += [
        f"Data set: **{cfg.dataset}** ({result.dataset.get('num_test_classes')} test classes, "
        f"{result.dataset.get('num_test_images')} test images, input {result.dataset.get('input_size')} px); "
        f"epochs {cfg.resolved_epochs()}; seed {cfg.seed}; swap: {_swap_text(result)}; "
        f"device {result.versions.get('device')}; total time {result.timings.get('total', 0.0):.1f} s"
        + (" — **interrupted**, only completed runs are shown" if result.interrupted else "")
        + ".",
        "",
    ]
    return lines


def _md_attribution(result: StudyLike) -> list[str]:
    """The attribution section of ``report.md``: a table per loss and its correlations with 95 % intervals."""
    lines = ["## Attribution (no retraining)", ""]
    summaries = attribution_summary(result)
    for loss in dict.fromkeys(r["loss"] for r in result.runs):
        runs = [r for r in result.runs if r["loss"] == loss and "attribution" in r]
        if not runs:
            continue
        lines += [
            f"### {LOSS_TITLES.get(loss, loss)}",
            "",
            "| mode | " + " | ".join(key for key, _ in ATTRIBUTION_COLUMNS) + " |",
            "|---|" + "---|" * len(ATTRIBUTION_COLUMNS),
        ]
        for run in runs:
            cells = " | ".join(f"{run['attribution'][key]:.3f}" for key, _ in ATTRIBUTION_COLUMNS)
            lines.append(f"| {run['name']} | {cells} |")
        readings = correlation_readings(summaries.get(loss) or {"num_classes": 0})
        lines.append("")
        for key, r in readings.items():
            low, high = r["ci"]
            lines.append(
                f"- `{key}`: {r['rho']:+.3f} (95 % interval [{low:+.3f}, {high:+.3f}], Fisher z, {r['n']} classes)"
                + ("" if r["readable"] else f" — {r['warning']}")
            )
        lines.append("")
    lines += [
        "Columns: foreground_energy = share of the positive similarity attribution (query vs its nearest "
        "neighbour) on the object; foreground_chance = the object's area share, the value of an attribution "
        "blind to the object; background_shift / object_shift = 1 − cos of the embedding before and after "
        "replacing only the background / only the object; background_sensitivity = background_shift ÷ "
        "(background_shift + object_shift), 0 … 1. A correlation over fewer than "
        f"{MIN_CLASSES_FOR_CORRELATION} classes, or whose interval contains 0, cannot be read.",
        "",
    ]
    return lines


def write_report_md(result: StudyLike, path: Path, figures: Sequence[Path] = ()) -> Path:
    """Write ``report.md``: the setup, the printed tables, the per-class report, full metric tables, figures."""
    lines = [
        *_md_header(result),
        "## Tables",
        "",
        "```text",
        format_tables(result, smoke_note=False),  # the header says it once
        "```",
        "",
        "## Per-class bias report",
        "",
        "```text",
        format_per_class(result, top=15, smoke_note=False),
        "```",
        "",
        "The whole list is in `per_class.csv`; every number is in `results.json`. The columns of `per_class.csv`:",
        "",
        *(f"- `{names}`: {meaning}" for names, meaning in CSV_LEGEND),
        "",
    ]
    if any("attribution" in r for r in result.runs):
        lines += _md_attribution(result)
    if result.runs:
        lines += ["## All metrics", ""]
        for loss in dict.fromkeys(r["loss"] for r in result.runs):
            lines += [f"### {LOSS_TITLES.get(loss, loss)}", "", *_md_metric_table(result, loss), ""]
        lines += [
            "eval: own = the test images in the model's own mask mode; raw = unmasked test images; both = the "
            "mode has no test-time mask. map@r = MAP@R (mean average precision at R, R = the class's other "
            "images).",
            "",
        ]
    if figures:
        lines += ["## Figures", ""]
        for fig in figures:
            lines += [f"![{fig.stem}]({fig.name})", ""]
    path.write_text("\n".join(lines) + "\n")
    return path
