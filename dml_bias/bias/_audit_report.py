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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dml_bias.bias._model_spec import write_json_atomic
from dml_bias.bias.config import VARIANTS
from dml_bias.bias.report import wrap_name
from dml_bias.bias.result import prepare_out_dir

if TYPE_CHECKING:  # pragma: no cover
    from dml_bias.bias.audit import AuditResult

__all__: list[str] = []

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
