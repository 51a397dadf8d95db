"""Text output of the background-bias study: the printed tables, the per-class bias report and ``report.md``.

These functions take a :class:`~dml_bias.bias.StudyResult`; the usual entry points are its methods
:meth:`~dml_bias.bias.StudyResult.table`, :meth:`~dml_bias.bias.StudyResult.per_class_report` and
:meth:`~dml_bias.bias.StudyResult.save`. (The result module imports this one; this one imports it only for type
checking.)
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from dml_bias.bias.result import StudyResult

__all__: list[str] = []

LOSS_TITLES = {"proxy_anchor": "Proxy-Anchor", "multi_similarity": "Multi-Similarity"}
_SHORT = {
    "original": "original",
    "only_fg": "only_fg",
    "only_bg_t": "only_bg_t",
    "no_fg": "no_fg",
    "mixed_same": "mix_same",
    "mixed_rand": "mix_rand",
    "mixed_next": "mix_next",
}
PER_CLASS_FIELDS = (
    "loss",
    "rank",
    "label",
    "class_name",
    "count",
    "home_background",
    "background_distinctiveness",
    "variant",
    "failures_none",
    "failures_hard",
    "difference",
    "failures_none_original",
    "failures_hard_original",
    "difference_original",
    "reliance",
    "reliance_share",
    "background_alone_recall@1",
    "background_sensitivity_none",
    "background_sensitivity_hard",
    "foreground_energy_none",
    "foreground_energy_hard",
    "foreground_chance",
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


def _rows(result: StudyResult, loss: str, raw: bool | None) -> list[tuple[dict[str, Any], str, str]]:
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


def _swap_text(result: StudyResult) -> str:
    return "queries and gallery swapped" if result.config.swap == "both" else "queries swapped, original gallery"


def format_tables(result: StudyResult, *, raw: bool | None = None) -> str:
    """The study's printed tables (see :meth:`~dml_bias.bias.study.StudyResult.table`)."""
    if not result.runs:
        return "(no completed runs)"
    chance = result.dataset.get("chance_recall@1")
    variants = [v for v in result.dataset.get("variants", []) if v in result.runs[0]["metrics"]]
    out: list[str] = []
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
    out.extend(notes)
    return "\n".join(out)


def per_class_rows(result: StudyResult) -> list[dict[str, Any]]:
    r"""Per loss and test class: Recall@1 failures of the no-mask and hard-mask models, ranked by background reliance.

    The failures of a class are ``round(count × (1 − Recall@1))`` of its queries, each model evaluated in its
    own mode (the hard-mask model on masked test images), on ``config.report_variant`` (``failures_none``,
    ``failures_hard``, ``difference`` = none − hard) and on the original images (``…_original``).
    ``reliance`` = (no-mask failures added by swapping the backgrounds) − (hard-mask failures added by swapping
    them) = ``difference − difference_original``, and

    .. math::

        \text{reliance\_share} = \frac{\text{reliance}}{\max(\text{failures\_none}, 1)},

    the share of the no-mask model's failures on the swapped backgrounds that the class's own background had
    prevented. Rows are ranked per loss by ``reliance_share``, largest first (ties: ``reliance``, ``difference``,
    label): the classes the no-mask model recognised by their background. The share rather than the count ranks,
    because the count also grows with how hard the object itself is (classes whose objects resemble others' fail
    often on any background); the share divides that out. ``background_alone_recall@1`` is the no-mask model's
    Recall@1 of the class on ``only_bg_t`` (backgrounds without objects; ``None`` if not evaluated). Losses
    without both a ``"none"`` and a ``"hard"`` run are skipped.
    """
    variant = result.config.report_variant
    names = result.dataset.get("class_names", [])
    homes = result.dataset.get("home_backgrounds")
    distinct = result.dataset.get("background_distinctiveness")
    rows: list[dict[str, Any]] = []
    losses = list(dict.fromkeys(r["loss"] for r in result.runs))
    for loss in losses:
        by_mode = {r["mode"]: r for r in result.runs if r["loss"] == loss}
        if "none" not in by_mode or "hard" not in by_mode:
            continue
        none, hard = by_mode["none"], by_mode["hard"]
        counts = none["class_counts"]

        def failures(run: dict[str, Any], v: str, c: str, n: int) -> int:
            return round(n * (1.0 - run["per_class_recall@1"]["metrics"][v][c]))

        loss_rows = []
        for c, n in counts.items():
            label = int(c)
            fn, fh = failures(none, variant, c, n), failures(hard, variant, c, n)
            fno, fho = failures(none, "original", c, n), failures(hard, "original", c, n)
            loss_rows.append(
                {
                    "loss": loss,
                    "label": label,
                    "class_name": names[label] if label < len(names) else str(label),
                    "count": n,
                    "home_background": homes[label] if homes is not None else None,
                    "background_distinctiveness": distinct[label] if distinct is not None else None,
                    "variant": variant,
                    "failures_none": fn,
                    "failures_hard": fh,
                    "difference": fn - fh,
                    "failures_none_original": fno,
                    "failures_hard_original": fho,
                    "difference_original": fno - fho,
                    "reliance": (fn - fno) - (fh - fho),
                    "reliance_share": ((fn - fno) - (fh - fho)) / max(fn, 1),
                    "background_alone_recall@1": none["per_class_recall@1"]["metrics"].get("only_bg_t", {}).get(c),
                    "background_sensitivity_none": _attribution_of(none, c, "background_sensitivity"),
                    "background_sensitivity_hard": _attribution_of(hard, c, "background_sensitivity"),
                    "foreground_energy_none": _attribution_of(none, c, "foreground_energy"),
                    "foreground_energy_hard": _attribution_of(hard, c, "foreground_energy"),
                    "foreground_chance": _attribution_of(none, c, "foreground_chance"),
                }
            )
        loss_rows.sort(key=lambda r: (-r["reliance_share"], -r["reliance"], -r["difference"], r["label"]))
        for rank, r in enumerate(loss_rows, start=1):
            r["rank"] = rank
        rows.extend(loss_rows)
    return rows


def _attribution_of(run: dict[str, Any], label: str, key: str) -> float | None:
    """A per-class attribution measure of a run (``None`` without attribution or images of that class)."""
    values = run.get("attribution", {}).get("per_class", {}).get(label)
    return None if values is None else values[key]


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 0.0 if either input is constant."""
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    return float(spearmanr(x, y).statistic)


def per_class_summary(result: StudyResult, top: int = 10) -> dict[str, dict[str, Any]]:
    """Per loss: how well the per-class ranking follows the home backgrounds' distinctiveness (synthetic data).

    For every loss of :func:`per_class_rows`: ``num_classes``, ``top``, the mean distinctiveness of the ``top``
    first-ranked classes and of all classes (``mean_distinctiveness_top``, ``mean_distinctiveness_all``), and
    Spearman's rank correlation with distinctiveness of the ranking score (``spearman_reliance_share``), of
    ``reliance``, of ``difference`` (the no-mask minus hard-mask failures on the report variant) and of the
    background-alone Recall@1 (``None`` where not evaluated). Empty when the data set has no distinctiveness
    (CUB) or no loss has both a ``"none"`` and a ``"hard"`` run.
    """
    rows = per_class_rows(result)
    out: dict[str, dict[str, Any]] = {}
    for loss in dict.fromkeys(r["loss"] for r in rows):
        lr = [r for r in rows if r["loss"] == loss]
        dists = [r["background_distinctiveness"] for r in lr]
        if any(d is None for d in dists):
            continue
        k = min(top, len(lr))
        bg = [r["background_alone_recall@1"] for r in lr]
        out[loss] = {
            "num_classes": len(lr),
            "top": k,
            "mean_distinctiveness_top": sum(dists[:k]) / k,
            "mean_distinctiveness_all": sum(dists) / len(dists),
            "spearman_reliance_share": _spearman([r["reliance_share"] for r in lr], dists),
            "spearman_reliance": _spearman([r["reliance"] for r in lr], dists),
            "spearman_difference": _spearman([r["difference"] for r in lr], dists),
            "spearman_background_alone": None if any(b is None for b in bg) else _spearman(bg, dists),
        }
    return out


def attribution_summary(result: StudyResult) -> dict[str, dict[str, Any]]:
    """Per loss: do the retraining-free measures of the no-mask model find the classes the retraining test finds?

    For every loss with a ``"none"`` run that has attribution measures: the number of classes and Spearman's rank
    correlation, over the test classes, of the no-mask model's per-class background sensitivity
    (``spearman_sensitivity_reliance_share``) and of its background energy, one minus the foreground energy
    (``spearman_background_energy_reliance_share``), with the retraining-based reliance share of
    :func:`per_class_rows` (``None`` without a ``"hard"`` run), and of both with the home backgrounds'
    distinctiveness (``spearman_sensitivity_distinctiveness``, ``spearman_background_energy_distinctiveness``;
    ``None`` on data without it). Classes with a NaN measure are left out.
    """
    distinct = result.dataset.get("background_distinctiveness")
    rows = per_class_rows(result)
    out: dict[str, dict[str, Any]] = {}
    for loss in dict.fromkeys(r["loss"] for r in result.runs):
        none = next((r for r in result.runs if r["loss"] == loss and r["mode"] == "none"), None)
        if none is None or "attribution" not in none:
            continue
        per_class = none["attribution"]["per_class"]
        share = {str(r["label"]): r["reliance_share"] for r in rows if r["loss"] == loss}
        summary: dict[str, Any] = {"num_classes": len(per_class)}
        for key, name in (("background_sensitivity", "sensitivity"), ("foreground_energy", "background_energy")):
            score = {
                c: (1.0 - v[key] if key == "foreground_energy" else v[key])
                for c, v in per_class.items()
                if v[key] == v[key]  # not NaN
            }
            targets = {
                "reliance_share": share or None,
                "distinctiveness": None if distinct is None else {c: distinct[int(c)] for c in score},
            }
            for target_name, target in targets.items():
                common = [c for c in score if c in (target or {})]
                summary[f"spearman_{name}_{target_name}"] = (
                    _spearman([score[c] for c in common], [target[c] for c in common])
                    if target is not None and len(common) > 2
                    else None
                )
        out[loss] = summary
    return out


def _attribution_lines(result: StudyResult, loss: str) -> list[str]:
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
    summary = attribution_summary(result).get(loss)
    if summary is not None:
        parts = []
        for name, title in (("sensitivity", "bg-sens"), ("background_energy", "1 − fg-energy")):
            for target, target_title in (("reliance_share", "reliance share"), ("distinctiveness", "distinctiveness")):
                value = summary[f"spearman_{name}_{target}"]
                if value is not None:
                    parts.append(f"{title} ~ {target_title} {value:+.2f}")
        if parts:
            out.append("  no-mask model, Spearman over classes: " + ", ".join(parts))
    return out


def format_per_class(result: StudyResult, top: int = 10) -> str:
    """The printed per-class bias report (see :meth:`~dml_bias.bias.study.StudyResult.per_class_report`)."""
    rows = per_class_rows(result)
    if not rows:
        return "Per-class bias report: needs a 'none' and a 'hard' run of the same loss."
    variant = result.config.report_variant
    out: list[str] = []
    for loss in dict.fromkeys(r["loss"] for r in rows):
        lr = [r for r in rows if r["loss"] == loss]
        out.append(
            f"{LOSS_TITLES.get(loss, loss)}: per-class Recall@1 failures, no mask vs hard mask, on {variant} and "
            f"original (top {min(top, len(lr))} of {len(lr)} classes by reliance share)"
        )
        out.append(
            f"  {'rank':>4} {'class':<26} {'n':>3} {'home bg':>7} {'distinct':>8} | {variant}: {'none':>4} {'hard':>4}"
            f" | original: {'none':>4} {'hard':>4} | {'reliance':>8} {'share':>5} | bg-alone R@1"
        )
        for r in lr[:top]:
            home = "—" if r["home_background"] is None else str(r["home_background"])
            dist = "—" if r["background_distinctiveness"] is None else f"{r['background_distinctiveness']:.2f}"
            out.append(
                f"  {r['rank']:>4} {r['class_name'][:26]:<26} {r['count']:>3} {home:>7} {dist:>8} | "
                f"{'':>{len(variant) + 1}} {r['failures_none']:>4} {r['failures_hard']:>4} | "
                f"{'':>9} {r['failures_none_original']:>4} {r['failures_hard_original']:>4} | {r['reliance']:>+8d} "
                f"{r['reliance_share']:>+5.2f} | "
                + ("—" if r["background_alone_recall@1"] is None else f"{r['background_alone_recall@1']:.2f}")
            )
        summary = per_class_summary(result, top=top).get(loss)
        if summary is not None and len(lr) > top:
            out.append(
                f"  mean home-background distinctiveness: top {summary['top']} "
                f"{summary['mean_distinctiveness_top']:.2f}, all classes {summary['mean_distinctiveness_all']:.2f}"
            )
            line = (
                f"  Spearman rank correlation with distinctiveness: reliance share (the ranking) "
                f"{summary['spearman_reliance_share']:+.2f}, reliance {summary['spearman_reliance']:+.2f}, "
                f"difference {summary['spearman_difference']:+.2f}"
            )
            if summary["spearman_background_alone"] is not None:
                line += f", background-alone Recall@1 {summary['spearman_background_alone']:+.2f}"
            out.append(line)
        out.append("")
    out.append(
        "reliance = (no-mask failures added by swapping backgrounds) − (hard-mask failures added); share = reliance ÷ "
        "no-mask failures on the swapped backgrounds (the ranking): the classes the no-mask model recognised by their "
        "background rank first. difference = no-mask − hard-mask failures. bg-alone R@1: the no-mask model's "
        "Recall@1 of the class on only_bg_t (background without object)."
    )
    if any(r["background_distinctiveness"] is not None for r in rows):
        out.append("distinct = 1 / (number of test classes sharing the class's home background).")
    return "\n".join(out).rstrip()


def write_per_class_csv(result: StudyResult, path: Path) -> Path:
    """Write every row of :func:`per_class_rows` to ``path`` (CSV with a header)."""
    rows = per_class_rows(result)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(PER_CLASS_FIELDS))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in PER_CLASS_FIELDS})
    return path


def _md_metric_table(result: StudyResult, loss: str) -> list[str]:
    variants = [v for v in result.dataset.get("variants", []) if v in result.runs[0]["metrics"]]
    lines = [f"| mode | eval | metric | {' | '.join(variants)} |", f"|---|---|---|{'---|' * len(variants)}"]
    for run, label, key in _rows(result, loss, None):
        for metric in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"):
            cells = " | ".join(f"{run[key][v][metric]:.3f}" for v in variants)
            lines.append(f"| {run['name']} | {label} | {metric} | {cells} |")
    return lines


def write_report_md(result: StudyResult, path: Path, figures: Sequence[Path] = ()) -> Path:
    """Write ``report.md``: the setup, the printed tables, the per-class report, full metric tables, figures."""
    cfg = result.config
    lines = [
        "# Background-bias study",
        "",
        f"Data set: **{cfg.dataset}** ({result.dataset.get('num_test_classes')} test classes, "
        f"{result.dataset.get('num_test_images')} test images, input {result.dataset.get('input_size')} px); "
        f"epochs {cfg.resolved_epochs()}; seed {cfg.seed}; swap: {_swap_text(result)}; "
        f"device {result.versions.get('device')}; total time {result.timings.get('total', 0.0):.1f} s"
        + (" — **interrupted**, only completed runs are shown" if result.interrupted else "")
        + ".",
        "",
        "## Tables",
        "",
        "```text",
        format_tables(result),
        "```",
        "",
        "## Per-class bias report",
        "",
        "```text",
        format_per_class(result, top=15),
        "```",
        "",
        "The whole list is in `per_class.csv`; every number is in `results.json`.",
        "",
    ]
    if any("attribution" in r for r in result.runs):
        lines += ["## Attribution (no retraining)", ""]
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
            summary = attribution_summary(result).get(loss, {})
            lines.append("")
            for key, value in summary.items():
                if key.startswith("spearman_") and value is not None:
                    lines.append(f"- `{key}`: {value:+.3f}")
            lines.append("")
    if result.runs:
        lines += ["## All metrics", ""]
        for loss in dict.fromkeys(r["loss"] for r in result.runs):
            lines += [f"### {LOSS_TITLES.get(loss, loss)}", "", *_md_metric_table(result, loss), ""]
    if figures:
        lines += ["## Figures", ""]
        for fig in figures:
            lines += [f"![{fig.stem}]({fig.name})", ""]
    path.write_text("\n".join(lines) + "\n")
    return path
