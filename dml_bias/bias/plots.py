"""Figures of the background-bias study (matplotlib, PNG), drawn to be read at a glance at their default size.

- ``recall_by_mode.png``: per loss (rows), Recall@1 beside MAP@R on the original test images for every training
  mode, with Recall@1 on ``mixed_rand`` (own-mode evaluation and raw images) marked on it (left), and Recall@1/2/4/8
  (right); one legend outside the panels.
- ``per_class_failures.png``: per loss, the Recall@1 failures of every class for the no-mask (x) and the
  hard-mask model (y) on ``config.report_variant``, coloured by how many classes share the class's home
  background (one discrete colour per count, with a legend); the classes the per-class report ranks first are
  numbered and listed below the panel by their full (wrapped) names.
- ``retrieval_grid.png``: queries with their top-5 for the no-mask and the hard-mask model, every image shown as
  that model saw it (masked for the hard-mask model); frames: green = same class, red dashed = wrong class.
- ``attribution_maps.png``: one row per model of every loss (labelled by loss and mode), query/neighbour pairs
  with their signed similarity attribution maps over the images as the model saw them (hard: background zeroed,
  soft: background weighted by σ, channel: the image with the mask's outline), and a colour bar from −1 (takes
  from the similarity) to +1 (adds to it).

Usually called through :meth:`~dml_bias.bias.StudyResult.plot`. :func:`figures` returns the figures without
saving them. Figures are drawn on :class:`matplotlib.figure.Figure` objects with their own Agg canvas and a
constrained layout: matplotlib's global backend (and ``pyplot``'s figure list) is left alone, so a notebook keeps
its inline plots.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dml_bias.bias.analysis import LOSS_TITLES, StudyLike, is_smoke_run, per_class_rows
from dml_bias.transforms.functional import foreground_mask, mask_background

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


__all__: list[str] = []

#: Resolution of the saved PNGs.
DPI = 110
#: Font size of titles and labels (points); nothing in a figure is smaller than :data:`SMALL`.
FONT = 8
SMALL = 7
#: Opacity of an attribution map where its value is ±1 (its largest magnitude); 0 where it is 0.
HEAT_ALPHA = 0.75
KS = ("recall@1", "recall@2", "recall@4", "recall@8")
#: Colours of the per-class figure's home-background counts (one per distinct count, colour-blind safe).
COUNT_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure with a constrained layout and an Agg canvas of its own (no pyplot, no backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _panels(fig: Figure, heights: list[float], ncols: int, legend_height: float) -> tuple[list[list[Any]], Any]:
    """Rows of ``ncols`` axes (``heights``: their height ratios) above an axis-less strip across the bottom.

    The strip holds the figure's legend, so that the constrained layout makes room for it (matplotlib 3.6 cannot
    place a figure legend outside the axes).
    """
    grid = fig.add_gridspec(len(heights) + 1, ncols, height_ratios=[*heights, legend_height])
    axes = [[fig.add_subplot(grid[i, j]) for j in range(ncols)] for i in range(len(heights))]
    strip = fig.add_subplot(grid[len(heights), :])
    strip.axis("off")
    return axes, strip


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def wrap_name(name: str, width: int = 18) -> str:
    """A class name in full on lines of at most ``width`` characters, broken after ``/``, ``_``, ``-`` or spaces.

    Only whitespace is ever replaced (by line breaks): removing the line breaks and spaces gives back the name
    without its spaces. A piece longer than ``width`` without a break point is split inside.

    Args:
        name: The class name.
        width: The longest line, in characters (at least 1).

    Returns:
        The name on one or more lines (joined by line breaks).

    Example:
        >>> print(wrap_name("ellipse/blue/solid/back/contrast", 18))
        ellipse/blue/
        solid/back/
        contrast
    """
    # textwrap breaks only at whitespace and hyphens: a marked space after each "/" and "_" becomes a break point,
    # and the marked spaces that did not become line breaks are taken out again.
    spaced = re.sub(r"([/_])(?=\S)", "\\1\x00 ", name)
    lines = textwrap.wrap(spaced, width, break_long_words=True, break_on_hyphens=True)
    return "\n".join(line.replace("\x00 ", "").replace("\x00", "") for line in lines) or name


def _title(result: StudyLike, text: str) -> str:
    """``text``, marked as a smoke run when the study is the ``--quick`` size."""
    if is_smoke_run(result.config):
        text += " — quick smoke run: too small for its differences to mean anything"
    return text


def figures(result: StudyLike) -> dict[str, Figure]:
    """Every figure that the result has data for, by file stem (not saved).

    Example:
        >>> from dml_bias.bias import StudyConfig, run_study
        >>> cfg = StudyConfig.quick(losses=("proxy_anchor",), modes=("none", "hard"), num_classes=4,
        ...                         images_per_class=6, image_size=16, batch_size=12, m_per_class=3, epochs=1,
        ...                         variants=("original", "mixed_rand"), progress=False, num_threads=1)
        >>> sorted(figures(run_study(cfg)))
        ['attribution_maps', 'per_class_failures', 'recall_by_mode', 'retrieval_grid']
    """
    out: dict[str, Figure] = {}
    if result.runs:
        out["recall_by_mode"] = recall_by_mode_figure(result)
    if per_class_rows(result):
        out["per_class_failures"] = per_class_figure(result)
    if result.grid is not None and result.grid.get("models"):
        out["retrieval_grid"] = retrieval_grid_figure(result)
    if result.attribution_maps is not None and result.attribution_maps.get("models"):
        out["attribution_maps"] = attribution_figure(result)
    return out


def plot_all(result: StudyLike, out_dir: Path) -> list[Path]:
    """Write every figure that the result has data for (``<stem>.png``, see :func:`figures`); return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_save(fig, out_dir / f"{name}.png") for name, fig in figures(result).items()]


# ------------------------------------------------------------------------------------------- recall by mode


def plot_recall_by_mode(result: StudyLike, path: Path) -> Path:
    """Write :func:`recall_by_mode_figure` to ``path``."""
    return _save(recall_by_mode_figure(result), path)


def recall_by_mode_figure(result: StudyLike) -> Figure:
    """Per loss (rows): Recall@1 beside MAP@R per training mode (left), Recall@1/2/4/8 (right), original images.

    Every model is evaluated in its own mode (a hard-mask model on masked test images). On the left, triangles
    mark Recall@1 on ``mixed_rand`` (random backgrounds) in the model's own mode, crosses the same on raw images
    (no test-time mask). One legend, outside the panels.
    """
    losses = list(dict.fromkeys(r["loss"] for r in result.runs))
    fig = _figure((11.5, 0.8 + 3.0 * len(losses)))
    axes, strip = _panels(fig, [1.0] * len(losses), 2, 0.16)
    colours = {"recall@1": "C0", "map@r": "0.35", "recall@2": "C1", "recall@4": "C2", "recall@8": "C3"}
    names = {"recall@1": "Recall@1", "map@r": "MAP@R", "recall@2": "Recall@2", "recall@4": "Recall@4"}
    names["recall@8"] = "Recall@8"
    for (left, right), loss in zip(axes, losses, strict=True):
        runs = [r for r in result.runs if r["loss"] == loss]
        xs = range(len(runs))
        for j, key in enumerate(("recall@1", "map@r")):
            values = [r["metrics"]["original"][key] for r in runs]
            left.bar([i + (j - 0.5) * 0.38 for i in xs], values, 0.38, color=colours[key], label=names[key])
        if all("mixed_rand" in r["metrics"] for r in runs):
            at = [i - 0.19 for i in xs]
            own = [r["metrics"]["mixed_rand"]["recall@1"] for r in runs]
            raw = [r["metrics_raw"]["mixed_rand"]["recall@1"] for r in runs]
            left.plot(at, own, "kv", ms=6, label="Recall@1 on mixed_rand (own mode)")
            left.plot(at, raw, "x", color="red", ms=6, mew=1.5, label="Recall@1 on mixed_rand (raw images)")
        for j, key in enumerate(KS):
            values = [r["metrics"]["original"][key] for r in runs]
            right.bar([i + (j - 1.5) * 0.2 for i in xs], values, 0.2, color=colours[key], label=names[key])
        title = LOSS_TITLES.get(loss, loss)
        left.set_title(f"{title}: Recall@1 and MAP@R", fontsize=FONT + 1)
        right.set_title(f"{title}: Recall@k", fontsize=FONT + 1)
        for ax in (left, right):
            ax.set_xticks(list(xs), [r["name"] for r in runs], fontsize=FONT)
            ax.tick_params(axis="y", labelsize=FONT)
            ax.set_ylim(0, 1.02)
            ax.set_ylabel("score", fontsize=FONT)
            ax.grid(axis="y", alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    strip.legend(list(handles.values()), list(handles), loc="center", ncols=4, fontsize=FONT)
    text = "Retrieval on the original test images per training mode, each model evaluated in its own mask mode"
    fig.suptitle(textwrap.fill(_title(result, text), 110), fontsize=FONT + 1)
    return fig


# --------------------------------------------------------------------------------------- per-class failures


def plot_per_class(result: StudyLike, path: Path) -> Path:
    """Write :func:`per_class_figure` to ``path``."""
    return _save(per_class_figure(result), path)


def spread(points: list[tuple[int, int]], radius: float) -> list[tuple[float, float]]:
    """Drawing positions that keep classes with equal counts apart, ``radius`` around their common spot.

    The ``n > 1`` points on one spot sit evenly on a circle of ``radius`` around it (the first to its right); a
    point of its own stays where it is.

    Example:
        >>> [(round(x, 3), round(y, 3)) for x, y in spread([(2, 3), (2, 3), (5, 1)], 0.25)]
        [(2.25, 3.0), (1.75, 3.0), (5.0, 1.0)]
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(points):
        groups.setdefault(p, []).append(i)
    out = [(float(x), float(y)) for x, y in points]
    for (x, y), members in groups.items():
        if len(members) > 1:
            for j, i in enumerate(members):
                angle = 2.0 * math.pi * j / len(members)
                out[i] = (x + radius * math.cos(angle), y + radius * math.sin(angle))
    return out


def _count_colours(n: int) -> list[Any]:
    """``n`` distinct colours: :data:`COUNT_COLOURS`, or matplotlib's ``tab20`` where more are needed."""
    from matplotlib import colormaps

    if n <= len(COUNT_COLOURS):
        return list(COUNT_COLOURS[:n])
    return [colormaps["tab20"](i % 20) for i in range(n)]


def _sharing(row: dict[str, Any]) -> int | None:
    """How many classes share the row's home background (``1 / distinctiveness``), or ``None`` if unknown."""
    d = row.get("background_distinctiveness")
    return None if d is None or d <= 0 else round(1.0 / d)


def _separate(fig: Figure, texts: list[Any]) -> None:
    """Move annotations up (in steps of their height) until none overlaps an earlier one."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    placed: list[Any] = []
    for t in texts:
        for _ in range(20):
            box = t.get_window_extent(renderer)
            if not any(box.overlaps(p) for p in placed):
                break
            x, y = t.get_position()
            t.set_position((x, y + box.height * 72.0 / fig.dpi + 1))
        placed.append(t.get_window_extent(renderer))


def per_class_figure(result: StudyLike, top: int = 5) -> Figure:
    """Per loss: Recall@1 failures per class, no-mask (x) vs hard-mask model (y), on ``config.report_variant``.

    Colours: how many classes share the class's home background (synthetic data; one colour per count, listed in
    the legend). The ``top`` classes that the per-class report ranks first (recognised by their background) are
    numbered by rank at their points and listed by full name below the panel. Points below the dashed diagonal
    are classes on which the hard-mask model fails less often. Classes with equal counts are drawn side by side
    (:func:`spread`, less than half a failure from their counts) instead of hiding each other.
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.lines import Line2D

    rows = per_class_rows(result)
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    fig = _figure((5.0 * len(losses) + 0.4, 6.0))
    axes, strip = _panels(fig, [3.0, 1.0], len(losses), 0.12)
    levels = sorted({n for n in map(_sharing, rows) if n is not None})
    cmap = ListedColormap(_count_colours(max(len(levels), 1)))
    norm = BoundaryNorm([i - 0.5 for i in range(len(levels) + 1)], cmap.N) if levels else None
    hi = max([*(r["failures_none"] for r in rows), *(r["failures_hard"] for r in rows), 1])
    for col, loss in enumerate(losses):
        ax, key = axes[0][col], axes[1][col]
        loss_rows = [r for r in rows if r["loss"] == loss]
        # Classes with equal counts are drawn side by side (less than half a failure apart), not on top of each other.
        at = spread([(r["failures_none"], r["failures_hard"]) for r in loss_rows], min(0.45, 0.1 + 0.02 * hi))
        x, y = [p[0] for p in at], [p[1] for p in at]
        if levels and all(_sharing(r) is not None for r in loss_rows):
            colour = [levels.index(_sharing(r) or 0) for r in loss_rows]
            ax.scatter(x, y, c=colour, cmap=cmap, norm=norm, s=36, edgecolors="k", linewidths=0.4, zorder=3)
        else:
            ax.scatter(x, y, s=36, color=COUNT_COLOURS[0], edgecolors="k", linewidths=0.4, zorder=3)
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        top_rows = sorted(loss_rows, key=lambda r: r["rank"])[:top]
        style = {"xytext": (4, 3), "textcoords": "offset points", "fontsize": FONT, "weight": "bold"}
        notes = [ax.annotate(str(r["rank"]), at[loss_rows.index(r)], **style) for r in top_rows]
        _separate(fig, notes)
        ax.set_xlim(-1.0, hi * 1.12 + 1)
        ax.set_ylim(-1.0, hi * 1.12 + 1)
        ax.set_xlabel("failures of the no-mask model", fontsize=FONT)
        ax.set_ylabel("failures of the hard-mask model", fontsize=FONT)
        ax.tick_params(labelsize=FONT)
        ax.set_title(LOSS_TITLES.get(loss, loss), fontsize=FONT + 1)
        listing = [f"{r['rank']}. " + wrap_name(r["class_name"], 44).replace("\n", "\n     ") for r in top_rows]
        key.axis("off")
        head = "Ranked first by background reliance\n(classes with equal counts are drawn side by side):"
        key.text(0.0, 1.0, "\n".join([head, *listing]), va="top", ha="left", fontsize=FONT, transform=key.transAxes)
    diagonal = "equal failures (below: the hard-mask model fails less)"
    handles = [Line2D([], [], color="k", ls="--", lw=0.8, label=diagonal)]
    for i, n in enumerate(levels):
        label = "own home background" if n == 1 else f"home shared by {n} classes"
        handles.append(Line2D([], [], ls="", marker="o", mfc=cmap(i), mec="k", mew=0.4, label=label))
    strip.legend(handles=handles, loc="center", ncols=min(len(handles), 4), fontsize=FONT)
    text = f"Recall@1 failures per class on {result.config.report_variant}: no mask vs hard mask"
    fig.suptitle(textwrap.fill(_title(result, text), 90), fontsize=FONT + 1)
    return fig


# ------------------------------------------------------------------------------------------- retrieval grid


def as_seen(image: torch.Tensor, mask: torch.Tensor, mode: str, sigma: float | None) -> torch.Tensor:
    """The ``(3, H, W)`` uint8 image as a model of mask mode ``mode`` sees it (before normalisation).

    ``hard``: the background zeroed, ``soft``: the background weighted by ``sigma`` (both with
    :func:`~dml_bias.transforms.functional.mask_background`, as the study's models get them); other modes: the
    image itself (a ``channel`` model gets the mask as a 4th channel: the figures outline it). The inputs are
    not modified.

    Args:
        image: ``(3, H, W)`` uint8 image.
        mask: Its ``(1, H, W)`` mask (formats: :func:`~dml_bias.transforms.functional.foreground_mask`).
        mode: The model's mask mode, one of :data:`~dml_bias.bias.MODES`.
        sigma: The soft mode's σ (``None``: 0.5).

    Example:
        >>> image = torch.full((3, 1, 2), 200, dtype=torch.uint8)
        >>> mask = torch.tensor([[[255, 0]]], dtype=torch.uint8)
        >>> as_seen(image, mask, "hard", None)[0].tolist(), as_seen(image, mask, "soft", 0.25)[0].tolist()
        ([[200, 0]], [[200, 50]])
    """
    if mode == "hard":
        return mask_background(image, mask, mode="hard")
    if mode == "soft":
        return mask_background(image, mask, mode="soft", sigma=0.5 if sigma is None else sigma)
    return image


def _show(ax: Any, image: torch.Tensor, mask: torch.Tensor, mode: str, sigma: float | None) -> None:
    """The image as the model saw it; for a ``channel`` model with the outline of its mask."""
    ax.imshow(as_seen(image, mask, mode, sigma).permute(1, 2, 0).cpu().numpy())
    if mode == "channel":
        fg = foreground_mask(mask).reshape(mask.shape[-2:]).float().cpu().numpy()
        if 0 < fg.sum() < fg.size:
            limits = ax.get_xlim(), ax.get_ylim()
            ax.contour(fg, levels=[0.5], colors="yellow", linewidths=1.0)
            ax.set_xlim(limits[0])
            ax.set_ylim(limits[1])
    ax.set_xticks([])
    ax.set_yticks([])


def _frame(ax: Any, ok: bool) -> None:
    """Green solid frame for a neighbour of the query's class, red dashed for a wrong one."""
    for spine in ax.spines.values():
        spine.set_edgecolor("limegreen" if ok else "red")
        spine.set_linestyle("-" if ok else "--")
        spine.set_linewidth(3)


def plot_retrieval_grid(result: StudyLike, path: Path) -> Path:
    """Write :func:`retrieval_grid_figure` to ``path``."""
    return _save(retrieval_grid_figure(result), path)


def retrieval_grid_figure(result: StudyLike) -> Figure:
    """Rows: a query and its top-5 for the no-mask model, then for the hard-mask model, as each model saw them.

    Each row is labelled by the model and the query's full (wrapped) class name; neighbours of the query's class
    are framed green, wrong ones red and dashed.
    """
    grid = result.grid
    if grid is None or not grid.get("models"):
        raise ValueError("result.grid must hold the retrieval grid's images (a 'none' or 'hard' run), got none")
    models = grid["models"]
    nq = int(grid["query_labels"].numel())
    k = max(int(m["neighbour_labels"].shape[1]) for m in models.values())
    fig = _figure((1.1 * (k + 1) + 1.6, 1.15 * nq * len(models) + 0.8))
    axes = fig.subplots(nq * len(models), k + 1, squeeze=False)
    names = result.dataset.get("class_names", [])
    for qi in range(nq):
        query_label = int(grid["query_labels"][qi])
        name = names[query_label] if query_label < len(names) else str(query_label)
        for mi, (mode, m) in enumerate(models.items()):
            row = axes[qi * len(models) + mi]
            _show(row[0], grid["query_images"][qi], grid["query_masks"][qi], mode, None)
            label = f"{mode} model\n{wrap_name(name, 16)}"
            row[0].set_ylabel(label, fontsize=SMALL, rotation=0, ha="right", va="center", labelpad=4)
            for j in range(k):
                _show(row[j + 1], m["neighbour_images"][qi, j], m["neighbour_masks"][qi, j], mode, None)
                _frame(row[j + 1], int(m["neighbour_labels"][qi, j]) == query_label)
    axes[0][0].set_title("query", fontsize=FONT)
    for j in range(k):
        axes[0][j + 1].set_title(f"neighbour {j + 1}", fontsize=FONT)
    loss = LOSS_TITLES.get(grid["loss"], grid["loss"])
    text = f"{loss}: queries on {grid['variant']} and their top {k}, as each model saw them (green = same class, "
    text += "red dashed = wrong class)"
    fig.suptitle(textwrap.fill(_title(result, text), 70), fontsize=FONT)
    return fig


# --------------------------------------------------------------------------------------------- attribution


def attribution_pairs(result: StudyLike, count: int = 3) -> list[int]:
    """Positions (into the attribution subset) of the queries the attribution figure shows.

    The first image of each of the ``count`` classes that the per-class bias report ranks first for the figure's
    loss (the classes the no-mask model recognised by their background); without that report, of the first classes.
    """
    data = result.attribution_maps
    if data is None:
        return []
    labels = data["labels"].tolist()
    ranked = [r["label"] for r in per_class_rows(result) if r["loss"] == data["loss"]]
    order = ranked + [c for c in dict.fromkeys(labels) if c not in ranked]
    picks = [labels.index(c) for c in order if c in labels]
    return picks[:count]


def model_spec(result: StudyLike, model: dict[str, Any]) -> tuple[str, str, float | None]:
    """``(loss, mode, sigma)`` of a model of ``result.attribution_maps["models"]``.

    Taken from the entry itself, or (entries without them) from the run of the figure's loss with the same name.
    """
    data = result.attribution_maps or {}
    loss = str(model.get("loss", data.get("loss")))
    if "mode" in model:
        return loss, model["mode"], model.get("sigma")
    for run in result.runs:
        if run["loss"] == loss and run["name"] == model["name"]:
            return loss, run["mode"], run.get("sigma")
    raise ValueError(f"attribution model {model['name']!r} of loss {loss!r} has no mode and no run of that name")


def _overlay(ax: Any, image: torch.Tensor, mask: torch.Tensor, heat: torch.Tensor, spec: tuple[Any, ...]) -> None:
    """The image as the model saw it, under its map divided by its largest absolute value (red +, blue −).

    The map's opacity grows with its magnitude (:data:`HEAT_ALPHA` at ±1), so that the image shows where the map is
    near 0 (a masked background stays black instead of turning grey under a white veil).
    """
    from matplotlib import colormaps

    _show(ax, image, mask, spec[1], spec[2])
    top = float(heat.abs().max())
    scaled = (heat / top if top > 0 else heat).double().cpu().numpy()
    rgba = colormaps["RdBu_r"]((scaled + 1.0) / 2.0)
    rgba[..., 3] = HEAT_ALPHA * abs(scaled)
    ax.imshow(rgba)


def plot_attribution(
    result: StudyLike, path: Path, count: int = 3, method: str = "decomposition of the cosine similarity"
) -> Path:
    """Write :func:`attribution_figure` to ``path``."""
    return _save(attribution_figure(result, count, method), path)


def attribution_figure(
    result: StudyLike, count: int = 3, method: str = "decomposition of the cosine similarity"
) -> Figure:
    """Rows: every model of ``result.attribution_maps`` (all losses); columns: query/neighbour pairs with their maps.

    Each map (:func:`~dml_bias.bias.similarity_attribution`, the decomposition of the cosine similarity, divided
    by its largest absolute value; red adds to the similarity, blue takes from it, see the colour bar) explains the
    similarity of the image to the other one of its pair: the query to its nearest neighbour among the original
    test images, and the neighbour to the query. Images are shown as the row's model saw them (see
    :func:`as_seen`; ``channel`` models: the mask's outline in yellow). Rows are labelled by loss and model, columns
    by the query's full class name; each query's title gives its foreground energy (the share of its map on the
    object). A neighbour of another class is framed red and dashed. ``method`` names the attribution method in the
    title.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    data = result.attribution_maps
    if data is None or not data.get("models"):
        raise ValueError("result.attribution_maps must hold attribution maps (config.attribution_images > 0)")
    picks = attribution_pairs(result, count)
    models = data["models"]
    names = result.dataset.get("class_names", [])
    fig = _figure((1.3 * 2 * len(picks) + 1.6, 1.25 * len(models) + 2.2))
    axes = fig.subplots(len(models), 2 * len(picks), squeeze=False)
    for row, model in enumerate(models):
        spec = model_spec(result, model)
        for col, pos in enumerate(picks):
            query, neighbour = int(data["indices"][pos]), int(model["neighbours"][pos])
            q_ax, n_ax = axes[row][2 * col], axes[row][2 * col + 1]
            _overlay(q_ax, data["images"][query], data["masks"][query], model["query_maps"][pos], spec)
            _overlay(n_ax, data["images"][neighbour], data["masks"][neighbour], model["neighbour_maps"][pos], spec)
            _frame(n_ax, int(data["test_labels"][neighbour]) == int(data["test_labels"][query]))
            energy = f"fg-energy {float(model['foreground_energy'][pos]):.2f}"
            if row == 0:
                label = int(data["test_labels"][query])
                name = wrap_name(names[label] if label < len(names) else str(label), 24)
                q_ax.set_title(f"query: {name}\n{energy}", fontsize=SMALL, loc="left")
                n_ax.set_title("its nearest\nneighbour", fontsize=SMALL)
            else:
                q_ax.set_title(energy, fontsize=SMALL)
        axes[row][0].set_ylabel(f"{LOSS_TITLES.get(spec[0], spec[0])}\n{model['name']}", fontsize=FONT)
    bar = fig.colorbar(
        ScalarMappable(Normalize(-1.0, 1.0), "RdBu_r"), ax=axes, location="bottom", shrink=0.7, aspect=40, pad=0.01
    )
    bar.set_ticks([-1.0, -0.5, 0.0, 0.5, 1.0])
    bar.ax.tick_params(labelsize=SMALL)
    scale = "attribution ÷ its largest |value| in the map (more opaque = larger):  −1 takes from the similarity,  "
    scale += "+1 adds to it"
    bar.set_label(scale, fontsize=FONT)
    text = f"What makes a query similar to its nearest neighbour: similarity attribution ({method}) over the "
    text += "images as each model saw them; neighbour framed red and dashed = wrong class"
    fig.suptitle(textwrap.fill(_title(result, text), 80), fontsize=FONT)
    return fig
