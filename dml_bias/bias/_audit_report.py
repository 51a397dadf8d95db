"""The audit's files: ``results.json``, ``per_class.csv``, ``report.md``, PNG figures and a self-contained HTML page.

Every file is written atomically (a temporary file in the same folder, then :func:`os.replace`). The HTML page
inlines its figures as base64 PNG and its style sheet; it refers to nothing outside itself (no script, style
sheet, font or image file). Internal (``__all__`` is empty).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dml_bias.bias._model_spec import write_json_atomic
from dml_bias.bias.config import VARIANTS
from dml_bias.bias.report import wrap_name
from dml_bias.bias.result import prepare_out_dir

__all__: list[str] = []

#: The ``schema`` entry of ``results.json``.
SCHEMA = "dml_bias.audit/1"


def _clean(x: Any) -> Any:
    """JSON-ready: NaN → None, tuples → lists."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _f2(x: float | None) -> str:
    """``.80`` style (two decimals, no leading zero), ``–`` for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    text = f"{x:.2f}"
    return text.replace("0.", ".", 1) if text.startswith(("0.", "-0.")) else text


@dataclass
class AuditResult:
    """The outcome of :func:`~dml_bias.bias.audit`: every number, JSON-ready, the verdict, table and report files.

    Attributes:
        model: The model's name.
        data: The data's name.
        num_images: Images audited.
        num_classes: Their classes.
        variants: ``{variant: {"recall@1", "recall@1_ci", "map@r", "map@r_ci"}}`` for the seven variants.
        bg_gap: ``{"value", "ci"}``: Recall@1 of ``mixed_same`` minus ``mixed_rand``.
        background_drop: ``{"value", "ci"}``: Recall@1 of ``original`` minus ``mixed_rand`` (the verdict's drop).
        chance_recall_at_1: Recall@1 of a random ranking.
        background_sensitivity: ``{"mean", "ci", "background_shift", "object_shift", "num_images",
            "num_undefined"}`` (see :func:`~dml_bias.bias.background_sensitivity`).
        foreground_energy: ``{"mean", "chance", "ci", "num_images", "num_empty"}`` (maps without positive
            attribution are left out of the mean and counted in ``num_empty``).
        per_class: One dict per class (``label``, ``name``, ``count``, ``recall@1``, ``mixed_rand_recall@1``,
            ``recall@1_drop``, ``background_sensitivity``, ``foreground_energy``), most background-reliant first.
        settings: Preprocessing, mask source, explained layer, bootstrap, seed, device, count of empty masks.
        timings: Seconds per stage.
        per_query: Per-query Recall@1 and MAP@R per variant (not saved to JSON).
        examples: Images of the queries whose neighbours change most (not saved to JSON).
        overlays: Images and attribution maps of the first explained queries (not saved to JSON).

    Example:
        >>> import textwrap
        >>> r = AuditResult("m", "d", 4, 2, {v: {"recall@1": 1.0, "recall@1_ci": [1.0, 1.0], "map@r": 1.0,
        ...                 "map@r_ci": [1.0, 1.0]} for v in VARIANTS}, {"value": 0.0, "ci": [0.0, 0.0]},
        ...                 {"value": 0.0, "ci": [0.0, 0.0]}, 0.33, {"mean": 0.1, "ci": [0.0, 0.2]},
        ...                 {"mean": 0.9, "chance": 0.2, "ci": [0.8, 1.0]}, [])
        >>> print(textwrap.fill(r.verdict(), 100))
        Recall@1 stays at 1.00 [1.00, 1.00] when backgrounds are swapped (1.00 [1.00, 1.00]): no measurable
        part of this model's retrieval comes from backgrounds.
    """

    model: str
    data: str
    num_images: int
    num_classes: int
    variants: dict[str, dict[str, Any]]
    bg_gap: dict[str, Any]
    background_drop: dict[str, Any]
    chance_recall_at_1: float
    background_sensitivity: dict[str, Any]
    foreground_energy: dict[str, Any]
    per_class: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    examples: dict[str, Any] | None = field(default=None, repr=False)
    overlays: dict[str, Any] | None = field(default=None, repr=False)

    def verdict(self) -> str:
        """The finding in plain words: how far Recall@1 falls when backgrounds are swapped, with intervals."""
        o, s = self.variants["original"], self.variants["mixed_rand"]
        lo, hi = self.background_drop.get("ci", [math.nan, math.nan])
        points = round(100 * self.background_drop["value"])
        before = f"{_f2(o['recall@1'])} [{_f2(o['recall@1_ci'][0])}, {_f2(o['recall@1_ci'][1])}]"
        after = f"{_f2(s['recall@1'])} [{_f2(s['recall@1_ci'][0])}, {_f2(s['recall@1_ci'][1])}]"
        if hi is not None and not math.isnan(hi) and hi < 0:
            return (
                f"Recall@1 rises from {before} to {after} when backgrounds are swapped: this model's retrieval does "
                "not rely on its images' own backgrounds."
            )
        if not (lo is not None and not math.isnan(lo) and lo > 0) or points <= 0:
            if abs(points) < 1:
                return (
                    f"Recall@1 stays at {before} when backgrounds are swapped ({after}): no measurable part of this "
                    "model's retrieval comes from backgrounds."
                )
            return (
                f"Recall@1 is {before} on the original images and {after} when backgrounds are swapped; the drop, "
                f"{points} points [{100 * lo:.0f}, {100 * hi:.0f}], is not distinguishable from zero."
            )
        return (
            f"Recall@1 falls from {before} to {after} when backgrounds are swapped: {points} points of this "
            "model's retrieval come from backgrounds."
        )

    def details(self) -> list[str]:
        """The verdict's supporting sentences: background-alone retrieval, sensitivity, foreground energy."""
        bg = self.variants["only_bg_t"]
        lines = [
            f"On backgrounds alone (only_bg_t) Recall@1 is {_f2(bg['recall@1'])} [{_f2(bg['recall@1_ci'][0])}, "
            f"{_f2(bg['recall@1_ci'][1])}] against {_f2(self.chance_recall_at_1)} by chance; BG-gap (mixed_same − "
            f"mixed_rand) {_f2(self.bg_gap['value'])} [{_f2(self.bg_gap['ci'][0])}, {_f2(self.bg_gap['ci'][1])}].",
        ]
        s = self.background_sensitivity
        lines.append(
            f"Background sensitivity {_f2(s.get('mean'))} [{_f2(s['ci'][0])}, {_f2(s['ci'][1])}] (0: only the object "
            "moves the embedding, 1: only the background)."
        )
        e = self.foreground_energy
        if e.get("num_images", 1):
            lines.append(
                f"Foreground energy {_f2(e.get('mean'))} [{_f2(e['ci'][0])}, {_f2(e['ci'][1])}] of the attribution "
                "lies "
                f"on the object, against {_f2(e.get('chance'))} for a uniform map"
                + (f" ({e['num_empty']} maps without positive attribution left out)." if e.get("num_empty") else ".")
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready values (what ``results.json`` holds; NaN becomes ``null``)."""
        return _clean(
            {
                "schema": SCHEMA,
                "model": self.model,
                "data": self.data,
                "num_images": self.num_images,
                "num_classes": self.num_classes,
                "variants": self.variants,
                "bg_gap": self.bg_gap,
                "background_drop": self.background_drop,
                "chance_recall@1": self.chance_recall_at_1,
                "background_sensitivity": self.background_sensitivity,
                "foreground_energy": self.foreground_energy,
                "per_class": self.per_class,
                "verdict": self.verdict(),
                "settings": self.settings,
                "timings": self.timings,
            }
        )

    def table(self) -> str:
        """The printed summary: the verdict, Recall@1 and MAP@R with intervals per variant, and the measures."""
        lines = [f"Audit of {self.model} on {self.data}: {self.num_images} images, {self.num_classes} classes", ""]
        lines.append(self.verdict())
        lines.extend(self.details())
        lines.append("")
        lines.append(f"{'variant':<11} {'Recall@1':>8} {'95% CI':>14} {'MAP@R':>7} {'95% CI':>14}")
        for v in VARIANTS:
            m = self.variants[v]
            lines.append(
                f"{v:<11} {m['recall@1']:>8.3f} [{m['recall@1_ci'][0]:.3f}, {m['recall@1_ci'][1]:.3f}] "
                f"{m['map@r']:>7.3f} [{m['map@r_ci'][0]:.3f}, {m['map@r_ci'][1]:.3f}]"
            )
        return "\n".join(lines)

    def save(self, out_dir: str | Path, *, figures: bool = True) -> dict[str, Path]:
        """Write ``results.json``, ``per_class.csv``, ``report.md``, the figures and ``report.html`` into ``out_dir``.

        Every file is written to a temporary file in ``out_dir`` and renamed into place, so an interrupted save
        leaves no half-written file.

        Returns:
            The written files by kind (``"results"``, ``"per_class"``, ``"report"``, ``"html"``,
            ``"figure:<name>"``).
        """
        return save(self, Path(out_dir), figures=figures)


# ------------------------------------------------------------------------------------- command-line helpers


CSV_COLUMNS = (
    "label",
    "name",
    "count",
    "recall@1",
    "mixed_rand_recall@1",
    "recall@1_drop",
    "background_sensitivity",
    "foreground_energy",
)


def _atomic_bytes(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _num(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def per_class_csv(result: AuditResult) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in result.per_class:
        writer.writerow([_num(row[c]) if isinstance(row[c], float) else row[c] for c in CSV_COLUMNS])
    return buffer.getvalue().encode()


def _ci(ci: Any) -> str:
    return f"[{_num(ci[0], 3)}, {_num(ci[1], 3)}]"


#: The legend under the retrieval table (markdown and HTML).
VARIANT_LEGEND = (
    "Variants (ImageNet-9 names): original; only_fg = the object on black; only_bg_t = the background with the "
    "object's region filled; no_fg = the background with the object blacked out; mixed_same / mixed_rand / "
    "mixed_next = the object on the background of another image of the same class / of a random other class / of "
    "the next class. Recall@1 and MAP@R are leave-one-out within each variant; the intervals are 95 % bootstrap "
    "intervals over the queries."
)
#: The legend under the per-class table (markdown and HTML).
CLASS_LEGEND = (
    "mixed_rand = the class's Recall@1 with every background swapped for a random other class's; drop = Recall@1 "
    "− mixed_rand (how much of the class's retrieval the backgrounds carried; the ranking); bg sensitivity = the "
    "class's mean background sensitivity, bg-shift ÷ (bg-shift + obj-shift), where bg-shift / obj-shift = 1 − cos "
    "of the embedding before and after replacing only the background / only the object (0: only the object moves "
    "the embedding, 1: only the background); fg energy = the class's mean share of the positive similarity "
    "attribution on the object (its chance level, the object's area share, is in the summary). Empty: not defined "
    "for any image of the class."
)


def report_md(result: AuditResult, figures: dict[str, Path]) -> str:
    lines = [f"# Background-bias audit: {result.model} on {result.data}", ""]
    lines += [f"**{result.verdict()}**", ""]
    lines += [f"- {d}" for d in result.details()]
    s = result.settings
    lines += [
        "",
        f"{result.num_images} images in {result.num_classes} classes; masks from {s.get('mask_source', 'dataset')}; "
        f"variants {s.get('variants_from', '')}; explained layer: {s.get('layer') or '–'}; "
        f"95 % bootstrap intervals over the queries ({s.get('bootstrap')} resamples, seed {s.get('seed')}).",
        "",
        "## Retrieval per variant",
        "",
        "| variant | Recall@1 | 95 % CI | MAP@R | 95 % CI |",
        "|---|---:|---|---:|---|",
    ]
    for v in VARIANTS:
        m = result.variants[v]
        lines.append(
            f"| {v} | {m['recall@1']:.3f} | {_ci(m['recall@1_ci'])} | {m['map@r']:.3f} | {_ci(m['map@r_ci'])} |"
        )
    lines += [
        "",
        VARIANT_LEGEND,
        "",
        f"BG-gap (mixed_same − mixed_rand): {result.bg_gap['value']:.3f} {_ci(result.bg_gap['ci'])}; "
        f"drop (original − mixed_rand): {result.background_drop['value']:.3f} {_ci(result.background_drop['ci'])}; "
        f"chance Recall@1: {result.chance_recall_at_1:.3f}.",
        "",
        "## Classes, most background-reliant first",
        "",
        "| class | images | Recall@1 | mixed_rand | drop | bg sensitivity | fg energy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.per_class:
        lines.append(
            f"| {r['name']} | {r['count']} | {_num(r['recall@1'], 3)} | {_num(r['mixed_rand_recall@1'], 3)} | "
            f"{_num(r['recall@1_drop'], 3)} | {_num(r['background_sensitivity'], 3)} | "
            f"{_num(r['foreground_energy'], 3)} |"
        )
    lines += ["", CLASS_LEGEND]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{name}]({path.name})" for name, path in figures.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- figures


def _figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def variants_png(result: AuditResult) -> bytes:
    fig, axes = _figure(1, 1, (7.5, 3.6))
    ax = axes[0, 0]
    xs = range(len(VARIANTS))
    values = [result.variants[v]["recall@1"] for v in VARIANTS]
    lo = [values[i] - result.variants[v]["recall@1_ci"][0] for i, v in enumerate(VARIANTS)]
    hi = [result.variants[v]["recall@1_ci"][1] - values[i] for i, v in enumerate(VARIANTS)]
    colours = ["#4c72b0" if v in ("original", "only_fg", "mixed_same") else "#dd8452" for v in VARIANTS]
    ax.bar(xs, values, yerr=[lo, hi], capsize=4, color=colours)
    ax.axhline(result.chance_recall_at_1, color="grey", linestyle="--", label="chance")
    ax.set_xticks(list(xs), list(VARIANTS), rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Recall@1 (95 % CI)")
    ax.legend(loc="upper right")
    ax.set_title("Recall@1 per background variant")
    return _png(fig)


def per_class_png(result: AuditResult, top: int = 20) -> bytes:
    rows = result.per_class[:top]
    names = ["\n".join(wrap_name(str(r["name"]), 30)) for r in rows]  # wrapped, never cut
    lines = max((name.count("\n") + 1 for name in names), default=1)
    fig, axes = _figure(1, 1, (7.5, (0.15 + 0.15 * lines) * len(rows) + 1.2))
    ax = axes[0, 0]
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [r["recall@1"] for r in rows], color="#c9d6ea", label="original")
    ax.barh(ys, [r["mixed_rand_recall@1"] for r in rows], color="#dd8452", height=0.45, label="mixed_rand")
    ax.set_yticks(ys, names, fontsize=7)
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("Recall@1")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title("Classes ranked by Recall@1 lost to swapped backgrounds")
    return _png(fig)


def _show(ax: Any, image: torch.Tensor, colour: str | None = None) -> None:
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])
    if colour is not None:
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)


def neighbours_png(result: AuditResult) -> bytes | None:
    ex = result.examples
    if ex is None:
        return None
    q = ex["queries"].tolist()
    k = ex["before"].shape[1]
    labels = ex["labels"]
    fig, axes = _figure(2 * len(q), k + 1, (1.3 * (k + 1), 2.7 * len(q)))
    nq = len(q)
    for row, query in enumerate(q):
        for half, (key, images, nbrs) in enumerate(
            (("original", ex["original_images"], ex["before"]), ("mixed_rand", ex["swapped_images"], ex["after"]))
        ):
            r = 2 * row + half
            _show(axes[r, 0], images[row], "#333333")
            axes[r, 0].set_title(f"query ({key})", fontsize=7)
            for j in range(k):
                nb = int(nbrs[row, j])
                right = int(labels[nb]) == int(labels[query])
                _show(axes[r, j + 1], images[nq + row * k + j], "#2ca02c" if right else "#d62728")
    fig.suptitle("Neighbours before (originals) and after the background swap; green: same class, red: other")
    return _png(fig)


def attribution_png(result: AuditResult) -> bytes | None:
    ov = result.overlays
    if not ov or not ov.get("images"):
        return None
    n = len(ov["images"])
    fig, axes = _figure(2, n, (1.8 * n, 3.8))
    for i in range(n):
        _show(axes[0, i], ov["images"][i])
        energy = ov["energy"][i]
        axes[0, i].set_title("fg energy " + ("–" if math.isnan(energy) else f"{energy:.2f}"), fontsize=7)
        _show(axes[1, i], ov["images"][i])
        attribution = ov["maps"][i].clamp_min(0)
        peak = float(attribution.max())
        axes[1, i].imshow(
            (attribution / peak if peak > 0 else attribution).numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1
        )
        axes[1, i].contour(ov["masks"][i][0].numpy(), levels=[127.5], colors="white", linewidths=0.8)
    fig.suptitle("Positive similarity attribution on the images as the model sees them (white: object outline)")
    return _png(fig)


# ------------------------------------------------------------------------------------------------------- html

_STYLE = """
body { font-family: sans-serif; max-width: 980px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.verdict { font-size: 1.15em; background: #fff4e5; border-left: 5px solid #dd8452; padding: .6em 1em; }
table { border-collapse: collapse; font-size: .9em; } td, th { border: 1px solid #ccc; padding: .25em .6em; }
td.n { text-align: right; } td.name { max-width: 24em; overflow-wrap: anywhere; } img { max-width: 100%; }
p.legend { font-size: .85em; color: #444; max-width: 60em; }
"""


def report_html(result: AuditResult, pngs: dict[str, bytes]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Background-bias audit: {html.escape(result.model)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Background-bias audit: {html.escape(result.model)} on {html.escape(result.data)}</h1>",
        f'<p class="verdict">{html.escape(result.verdict())}</p>',
        "<ul>" + "".join(f"<li>{html.escape(d)}</li>" for d in result.details()) + "</ul>",
        f"<p>{result.num_images} images, {result.num_classes} classes; masks from "
        f"{html.escape(str(result.settings.get('mask_source', 'dataset')))}; explained layer "
        f"{html.escape(str(result.settings.get('layer') or '–'))}; 95 % bootstrap intervals over the queries.</p>",
        "<h2>Retrieval per variant</h2>",
        "<table><tr><th>variant</th><th>Recall@1</th><th>95 % CI</th><th>MAP@R</th><th>95 % CI</th></tr>",
    ]
    for v in VARIANTS:
        m = result.variants[v]
        parts.append(
            f'<tr><td>{v}</td><td class="n">{m["recall@1"]:.3f}</td><td>{_ci(m["recall@1_ci"])}</td>'
            f'<td class="n">{m["map@r"]:.3f}</td><td>{_ci(m["map@r_ci"])}</td></tr>'
        )
    parts.append("</table>")
    parts.append(f'<p class="legend">{html.escape(VARIANT_LEGEND)}</p>')
    titles = {
        "variants": "Recall@1 per variant",
        "per_class": "Classes ranked by background reliance",
        "neighbours": "Queries whose neighbours change most when backgrounds are swapped",
        "attribution": "Attribution overlays",
    }
    for key, title in titles.items():
        if key in pngs:
            data = base64.b64encode(pngs[key]).decode("ascii")
            parts.append(f"<h2>{title}</h2>")
            parts.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">')
    parts.append("<h2>Classes</h2>")
    parts.append(
        "<table><tr><th>class</th><th>images</th><th>Recall@1</th><th>mixed_rand</th><th>drop</th>"
        "<th>bg sensitivity</th><th>fg energy</th></tr>"
    )
    for r in result.per_class:
        parts.append(
            f'<tr><td class="name">{html.escape(str(r["name"]))}</td><td class="n">{r["count"]}</td>'
            + "".join(
                f'<td class="n">{_num(r[c], 3)}</td>'
                for c in (
                    "recall@1",
                    "mixed_rand_recall@1",
                    "recall@1_drop",
                    "background_sensitivity",
                    "foreground_energy",
                )
            )
            + "</tr>"
        )
    parts.append("</table>")
    parts.append(f'<p class="legend">{html.escape(CLASS_LEGEND)}</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def save(result: AuditResult, out_dir: Path, *, figures: bool = True) -> dict[str, Path]:
    out = prepare_out_dir(out_dir)
    paths: dict[str, Path] = {"results": write_json_atomic(out / "results.json", result.to_dict())}
    paths["per_class"] = _atomic_bytes(out / "per_class.csv", per_class_csv(result))
    pngs: dict[str, bytes] = {}
    figure_paths: dict[str, Path] = {}
    if figures:
        makers = {
            "variants": variants_png,
            "per_class": per_class_png,
            "neighbours": neighbours_png,
            "attribution": attribution_png,
        }
        for name, make in makers.items():
            data = make(result)
            if data is not None:
                pngs[name] = data
                figure_paths[name] = _atomic_bytes(out / f"audit_{name}.png", data)
                paths[f"figure:audit_{name}"] = figure_paths[name]
    paths["report"] = _atomic_bytes(out / "report.md", report_md(result, figure_paths).encode())
    paths["html"] = _atomic_bytes(out / "report.html", report_html(result, pngs).encode())
    return paths
