"""Figures of the background-bias study (matplotlib, PNG).

``recall_by_mode.png``: Recall@k per mask mode and loss (original images, and Recall@1 on ``mixed_rand``);
``per_class_failures.png``: the per-class failure scatter, no mask vs hard mask; ``retrieval_grid.png``: queries
with their top-5 for the no-mask and the hard-mask model, wrong results framed red; ``attribution_maps.png``:
query/neighbour pairs with the similarity attribution maps of every model of the first loss. Usually called
through :meth:`~dml_bias.bias.StudyResult.plot`.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with their own Agg canvas: matplotlib's global
backend (and ``pyplot``'s figure list) is left alone, so a notebook keeps its inline plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from dml_bias.bias.result import StudyResult

__all__: list[str] = []


def _subplots(nrows: int, ncols: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A figure with an Agg canvas of its own and its ``(nrows, ncols)`` array of axes (no pyplot, no backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_all(result: StudyResult, out_dir: Path) -> list[Path]:
    """Write every figure that the result has data for; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if result.runs:
        paths.append(plot_recall_by_mode(result, out_dir / "recall_by_mode.png"))
    from dml_bias.bias.report import per_class_rows

    if per_class_rows(result):
        paths.append(plot_per_class(result, out_dir / "per_class_failures.png"))
    if result.grid is not None and result.grid.get("models"):
        paths.append(plot_retrieval_grid(result, out_dir / "retrieval_grid.png"))
    if result.attribution_maps is not None and result.attribution_maps.get("models"):
        paths.append(plot_attribution(result, out_dir / "attribution_maps.png"))
    return paths


def plot_recall_by_mode(result: StudyResult, path: Path) -> Path:
    """Grouped bars of Recall@1/2/4/8 on the original images per mode, one panel per loss; dots: ``mixed_rand``."""
    from dml_bias.bias.report import LOSS_TITLES

    losses = list(dict.fromkeys(r["loss"] for r in result.runs))
    fig, axes = _subplots(1, len(losses), (6.0 * len(losses), 4.0))
    ks = ("recall@1", "recall@2", "recall@4", "recall@8")
    for ax, loss in zip(axes[0], losses, strict=True):
        runs = [r for r in result.runs if r["loss"] == loss]
        width = 0.8 / len(ks)
        for j, k in enumerate(ks):
            xs = [i + (j - 1.5) * width for i in range(len(runs))]
            ax.bar(xs, [r["metrics"]["original"][k] for r in runs], width, label=k.replace("recall", "R"))
        if "mixed_rand" in runs[0]["metrics"]:
            ax.plot(
                [i - 1.5 * width for i in range(len(runs))],
                [r["metrics"]["mixed_rand"]["recall@1"] for r in runs],
                "kv",
                label="R@1 mixed_rand",
            )
            ax.plot(
                [i - 1.5 * width for i in range(len(runs))],
                [r["metrics_raw"]["mixed_rand"]["recall@1"] for r in runs],
                "rx",
                label="R@1 mixed_rand (raw)",
            )
        ax.set_xticks(range(len(runs)), [r["name"] for r in runs], rotation=20)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Recall@k")
        ax.set_title(f"{LOSS_TITLES.get(loss, loss)} (own-mode evaluation)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_per_class(result: StudyResult, path: Path) -> Path:
    """Scatter of per-class Recall@1 failures: no-mask model (x) vs hard-mask model (y), one panel per loss."""
    from dml_bias.bias.report import LOSS_TITLES, per_class_rows

    rows = per_class_rows(result)
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    fig, axes = _subplots(1, len(losses), (5.0 * len(losses), 4.5))
    for ax, loss in zip(axes[0], losses, strict=True):
        lr = [r for r in rows if r["loss"] == loss]
        x = [r["failures_none"] for r in lr]
        y = [r["failures_hard"] for r in lr]
        dist = [r["background_distinctiveness"] for r in lr]
        if all(d is not None for d in dist):
            sc = ax.scatter(x, y, c=dist, cmap="viridis", s=30, edgecolors="k", linewidths=0.4)
            fig.colorbar(sc, ax=ax, label="home-background distinctiveness")
        else:
            ax.scatter(x, y, s=30, edgecolors="k", linewidths=0.4)
        for r in lr[:5]:
            ax.annotate(r["class_name"], (r["failures_none"], r["failures_hard"]), fontsize=7)
        hi = max([*x, *y, 1])
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_xlabel("failures, no mask")
        ax.set_ylabel("failures, hard mask")
        ax.set_title(f"{LOSS_TITLES.get(loss, loss)}: Recall@1 failures per class on {result.config.report_variant}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _to_hwc(image: torch.Tensor) -> Any:
    return image.permute(1, 2, 0).cpu().numpy()


def plot_retrieval_grid(result: StudyResult, path: Path) -> Path:
    """Rows: a query and its top-5 for the no-mask model, then for the hard-mask model; wrong results red."""
    grid = result.grid
    if grid is None or not grid.get("models"):
        raise ValueError("result.grid must hold the retrieval grid's images (a 'none' or 'hard' run), got none")
    models = grid["models"]
    nq = int(grid["query_labels"].numel())
    k = max(int(m["neighbour_labels"].shape[1]) for m in models.values())
    fig, axes = _subplots(nq * len(models), k + 1, (1.3 * (k + 1), 1.3 * nq * len(models)))
    names = result.dataset.get("class_names", [])
    for qi in range(nq):
        for mi, (mode, m) in enumerate(models.items()):
            row = axes[qi * len(models) + mi]
            query_label = int(grid["query_labels"][qi])
            row[0].imshow(_to_hwc(grid["query_images"][qi]))
            title = names[query_label] if query_label < len(names) else str(query_label)
            row[0].set_title(f"{mode}: {title}"[:24], fontsize=6)
            for j in range(k):
                ax = row[j + 1]
                ax.imshow(_to_hwc(m["neighbour_images"][qi, j]))
                ok = int(m["neighbour_labels"][qi, j]) == query_label
                for spine in ax.spines.values():
                    spine.set_edgecolor("limegreen" if ok else "red")
                    spine.set_linewidth(3)
            for ax in row:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle(f"{grid['loss']}: queries ({grid['variant']}) and their top-{k}; red = wrong class", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def attribution_pairs(result: StudyResult, count: int = 3) -> list[int]:
    """Positions (into the attribution subset) of the queries the attribution figure shows.

    The first image of each of the ``count`` classes that the per-class bias report ranks first for the figure's
    loss (the classes the no-mask model recognised by their background); without that report, of the first classes.
    """
    data = result.attribution_maps
    if data is None:
        return []
    from dml_bias.bias.report import per_class_rows

    labels = data["labels"].tolist()
    ranked = [r["label"] for r in per_class_rows(result) if r["loss"] == data["loss"]]
    order = ranked + [c for c in dict.fromkeys(labels) if c not in ranked]
    picks = [labels.index(c) for c in order if c in labels]
    return picks[:count]


def _overlay(ax: Any, image: torch.Tensor, heat: torch.Tensor) -> None:
    ax.imshow(_to_hwc(image))
    # Signed maps: red adds to the similarity, blue takes from it, on a scale symmetric around 0.
    top = float(heat.abs().max())
    ax.imshow((heat / top if top > 0 else heat).numpy(), cmap="RdBu_r", alpha=0.5, vmin=-1.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_attribution(
    result: StudyResult,
    path: Path,
    count: int = 3,
    method: str = "decomposition of the cosine similarity; red adds, blue takes away",
) -> Path:
    """Rows: the models of the first loss; columns: query/neighbour pairs with their similarity attribution maps.

    Each map (:func:`~dml_bias.bias.similarity_attribution`, the decomposition, divided by its largest absolute value;
    red adds to the similarity, blue takes from it) explains the similarity of
    the image to the other one of its pair: the query to its nearest neighbour among the original test images, and
    the neighbour to the query. The images are shown unmasked; the models saw them in their own mask mode. The
    query's title gives its foreground energy (the share of the map on the object).
    """
    data = result.attribution_maps
    if data is None or not data.get("models"):
        raise ValueError("result.attribution_maps must hold attribution maps (config.attribution_images > 0)")
    from dml_bias.bias.report import LOSS_TITLES

    picks = attribution_pairs(result, count)
    models = data["models"]
    names = result.dataset.get("class_names", [])
    fig, axes = _subplots(len(models), 2 * len(picks), (1.5 * 2 * len(picks), 1.6 * len(models)))
    for row, model in enumerate(models):
        for col, pos in enumerate(picks):
            query = int(data["indices"][pos])
            neighbour = int(model["neighbours"][pos])
            q_ax, n_ax = axes[row][2 * col], axes[row][2 * col + 1]
            _overlay(q_ax, data["images"][query], model["query_maps"][pos])
            _overlay(n_ax, data["images"][neighbour], model["neighbour_maps"][pos])
            ok = int(data["test_labels"][neighbour]) == int(data["test_labels"][query])
            for spine in n_ax.spines.values():
                spine.set_edgecolor("limegreen" if ok else "red")
                spine.set_linewidth(2)
            energy = float(model["foreground_energy"][pos])
            label = int(data["test_labels"][query])
            title = names[label] if label < len(names) else str(label)
            q_ax.set_title(f"{title[:14]}\nfg-energy {energy:.2f}", fontsize=5)
            n_ax.set_title("nearest neighbour", fontsize=5)
        axes[row][0].set_ylabel(model["name"], fontsize=7)
    fig.suptitle(
        f"{LOSS_TITLES.get(data['loss'], data['loss'])}: what makes a query similar to its nearest neighbour "
        f"({method}); neighbour framed red = wrong class",
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
