"""Every study figure reads at its default size: no text on other text, nothing off the canvas, legends off the bars.

Each figure of :func:`dml_bias.bias.plots.figures` is drawn (Agg) from a small real :class:`StudyResult` with both
losses and every masking mode, then the window extents of its text artists (titles, axis and tick labels, legend
texts, colourbar labels, annotations, the suptitle) are compared pairwise.
"""

from __future__ import annotations

from itertools import combinations, product
from typing import Any

import pytest
from helpers import TINY_SCHEDULE
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from dml_bias.bias import StudyConfig, StudyResult, plots, run_study

#: Both losses, a model of every mask treatment (none, soft, hard, channel), a tiny schedule.
LAYOUT_STUDY = {
    "losses": ("proxy_anchor", "multi_similarity"),
    "modes": ("none", "soft", "hard", "channel"),
    "soft_sigmas": (0.5,),
    "variants": ("original", "mixed_rand"),
    **TINY_SCHEDULE,
    "attribution_images": 1,
    "progress": False,
    "num_threads": 1,
}
#: Pixels two boxes may share (anti-aliasing, rounding) before they count as overlapping.
TOLERANCE = 1.0
#: The smallest font size (points) a figure may use.
MIN_FONT = 7.0


def small_study() -> StudyResult:
    """A real study result; its attribution data holds every model of both losses (with loss, mode and σ)."""
    return run_study(StudyConfig(**LAYOUT_STUDY))


@pytest.fixture(scope="module")
def drawn() -> dict[str, tuple[Figure, Any]]:
    result = small_study()
    out = {}
    for name, fig in plots.figures(result).items():
        fig.canvas.draw()
        out[name] = (fig, fig.canvas.get_renderer())
    return out


def _tick_labels(ax: Axes) -> list[Text]:
    """The tick labels matplotlib actually draws (ticks inside the view interval, non-empty)."""
    labels = []
    for axis in (ax.xaxis, ax.yaxis):
        if not axis.get_visible():
            continue
        lo, hi = sorted(axis.get_view_interval())
        span = max(hi - lo, 1e-12)
        for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
            if not lo - 1e-9 * span <= tick.get_loc() <= hi + 1e-9 * span:
                continue
            labels.extend(t for t in (tick.label1, tick.label2) if t.get_visible())
        if axis.offsetText.get_visible():
            labels.append(axis.offsetText)
    return labels


def text_artists(fig: Figure) -> list[tuple[str, Text, Axes | None]]:
    """Every visible, non-empty text of the figure: a description (which axes, what kind), the text, its axes."""
    found: list[tuple[str, Text, Axes | None]] = [("figure text", t, None) for t in fig.texts]
    for legend in fig.legends:
        found += [("figure legend", t, None) for t in [*legend.get_texts(), legend.get_title()]]
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        where = f"axes {i} ({ax.get_label() or ax.get_title() or 'untitled'!r})"
        found += [(f"{where} title", t, ax) for t in (ax.title, ax._left_title, ax._right_title)]
        if ax.axison:
            found += [(f"{where} axis label", t, ax) for t in (ax.xaxis.label, ax.yaxis.label)]
            found += [(f"{where} tick label", t, ax) for t in _tick_labels(ax)]
        found += [(f"{where} text", t, ax) for t in ax.texts]
        legend = ax.get_legend()
        if legend is not None and legend.get_visible():
            found += [(f"{where} legend", t, ax) for t in [*legend.get_texts(), legend.get_title()]]
    return [(d, t, ax) for d, t, ax in found if t.get_visible() and t.get_text().strip()]


def overlap(a: Bbox, b: Bbox, tolerance: float = TOLERANCE) -> bool:
    """Whether two display boxes share more than ``tolerance`` pixels in both directions."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width > tolerance and height > tolerance


def layout_problems(fig: Figure, renderer: Any) -> list[str]:
    """Text on text, off the canvas, on another axes or too small, and legends on bars, as readable lines."""
    problems = []
    width, height = fig.canvas.get_width_height()
    boxes = [(d, t, ax, t.get_window_extent(renderer)) for d, t, ax in text_artists(fig)]
    panels = [(ax, ax.get_window_extent(renderer)) for ax in fig.axes if ax.get_visible()]
    for d, t, owner, box in boxes:
        if box.x0 < -TOLERANCE or box.y0 < -TOLERANCE or box.x1 > width + TOLERANCE or box.y1 > height + TOLERANCE:
            problems.append(f"{d} {t.get_text()!r} leaves the {width}x{height} canvas: {box.bounds}")
        if t.get_fontsize() < MIN_FONT:
            problems.append(f"{d} {t.get_text()!r} is {t.get_fontsize()} pt, below {MIN_FONT} pt")
        for ax, panel in panels:
            if ax is not owner and overlap(box, panel):
                problems.append(f"{d} {t.get_text()!r} lies on another axes ({ax.get_title()!r})")
    for (d1, t1, _, b1), (d2, t2, _, b2) in combinations(boxes, 2):
        if overlap(b1, b2):
            problems.append(f"{d1} {t1.get_text()!r} overlaps {d2} {t2.get_text()!r}")
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    for ax, legend in product(fig.axes, legends):  # on the bars of any axes, its own included
        box = legend.get_window_extent(renderer)
        for patch in ax.patches:
            if patch.get_visible() and overlap(box, patch.get_window_extent(renderer)):
                labels = [t.get_text() for t in legend.get_texts()]
                problems.append(f"the legend {labels} covers a bar of {ax.get_title()!r}")
                break
    return problems


EXPECTED = ("recall_by_mode", "per_class_failures", "retrieval_grid", "attribution_maps")


def test_every_study_figure_is_drawn(drawn: dict[str, tuple[Figure, Any]]) -> None:
    assert set(drawn) == set(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_no_text_overlaps_or_leaves_the_canvas(drawn: dict[str, tuple[Figure, Any]], name: str) -> None:
    fig, renderer = drawn[name]
    assert len(text_artists(fig)) > 3  # the check sees the figure's texts
    problems = layout_problems(fig, renderer)
    assert not problems, "\n".join(problems)


def test_the_checker_sees_overlaps_clipping_and_covered_bars() -> None:
    """The checks can fail: two texts on one spot, a title off the canvas, a legend over the bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.bar([0, 1, 2], [1.0, 1.0, 1.0], label="bars")
    ax.text(0.5, 0.5, "first")
    ax.text(0.5, 0.5, "second")
    ax.set_title("a title far too long for a figure three inches wide, so it leaves the canvas")
    ax.legend(loc="center")
    fig.canvas.draw()
    problems = layout_problems(fig, fig.canvas.get_renderer())
    assert any("'first' overlaps" in p and "'second'" in p for p in problems)
    assert any("leaves the" in p and "far too long" in p for p in problems)
    assert any("covers a bar" in p for p in problems)
    fig2 = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig2)
    ax2 = fig2.subplots()
    ax2.bar([0, 1], [0.5, 1.0], label="bars")
    ax2.set_title("short")
    ax2.legend(loc="upper left")
    fig2.tight_layout()
    fig2.canvas.draw()
    assert layout_problems(fig2, fig2.canvas.get_renderer()) == []
