"""Figures of the background-bias study (matplotlib, Agg backend, PNG).

``recall_by_mode.png``: Recall@k per mask mode and loss (original images, and Recall@1 on ``mixed_rand``);
``per_class_failures.png``: the per-class failure scatter, no mask vs hard mask; ``retrieval_grid.png``: queries
with their top-5 for the no-mask and the hard-mask model, wrong results framed red. Usually called through
:meth:`~dml_bias.bias.study.StudyResult.plot`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from dml_bias.bias.study import StudyResult

__all__: list[str] = []


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


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
    return paths


def plot_recall_by_mode(result: StudyResult, path: Path) -> Path:
    """Grouped bars of Recall@1/2/4/8 on the original images per mode, one panel per loss; dots: ``mixed_rand``."""
    from dml_bias.bias.report import LOSS_TITLES

    plt = _pyplot()
    losses = list(dict.fromkeys(r["loss"] for r in result.runs))
    fig, axes = plt.subplots(1, len(losses), figsize=(6.0 * len(losses), 4.0), squeeze=False)
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
    plt.close(fig)
    return path


def plot_per_class(result: StudyResult, path: Path) -> Path:
    """Scatter of per-class Recall@1 failures: no-mask model (x) vs hard-mask model (y), one panel per loss."""
    from dml_bias.bias.report import LOSS_TITLES, per_class_rows

    plt = _pyplot()
    rows = per_class_rows(result)
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    fig, axes = plt.subplots(1, len(losses), figsize=(5.0 * len(losses), 4.5), squeeze=False)
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
    plt.close(fig)
    return path


def _to_hwc(image: torch.Tensor) -> Any:
    return image.permute(1, 2, 0).cpu().numpy()


def plot_retrieval_grid(result: StudyResult, path: Path) -> Path:
    """Rows: a query and its top-5 for the no-mask model, then for the hard-mask model; wrong results red."""
    plt = _pyplot()
    grid = result.grid
    assert grid is not None
    models = grid["models"]
    nq = int(grid["query_labels"].numel())
    k = max(int(m["neighbour_labels"].shape[1]) for m in models.values())
    fig, axes = plt.subplots(nq * len(models), k + 1, figsize=(1.3 * (k + 1), 1.3 * nq * len(models)), squeeze=False)
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
    plt.close(fig)
    return path
