"""Draw the picture grid of the built-in data set for the docs: ``docs/_static/figures/synthetic_grid.png``.

Run from the repository root (deterministic: the same library version writes the same file)::

    python docs/make_dataset_figures.py [--out docs/_static/figures/synthetic_grid.png]

The top panel shows eight test classes (one image each) as the original image, its exact mask and the six
ImageNet-9 variants; the bottom panel shows twelve images of each of two classes, most of them on the class's
home background.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from dml_bias.datasets import SyntheticBackgrounds

DEFAULT_OUT = Path(__file__).resolve().parent / "_static" / "figures" / "synthetic_grid.png"
ROWS = ("original", "mask", "only_fg", "only_bg_t", "no_fg", "mixed_same", "mixed_rand", "mixed_next")


def _hwc(image: torch.Tensor) -> torch.Tensor:
    return image.permute(1, 2, 0) if image.shape[0] == 3 else image[0]


def main(out: Path) -> None:
    """Render the figure and write it to ``out``."""
    ds = SyntheticBackgrounds("test", num_classes=30, images_per_class=40, image_size=64, seed=0)
    columns = [c * ds.images_per_class for c in range(0, 16, 2)]  # the first image of 8 classes
    per_class = 12
    fig = plt.figure(figsize=(9.6, 11.8), dpi=100)
    grid = fig.add_gridspec(2, 1, height_ratios=[9.2, 2.2], hspace=0.06)
    top = grid[0].subgridspec(len(ROWS), len(columns), wspace=0.04, hspace=0.06)
    variants = {name: ds.with_variant(name, seed=0) for name in ROWS if name != "mask"}
    for r, row in enumerate(ROWS):
        for c, index in enumerate(columns):
            ax = fig.add_subplot(top[r, c])
            if row == "mask":
                ax.imshow(_hwc(ds[index]["mask"]), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(_hwc(variants[row][index]["image"]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row, fontsize=10)
            if r == 0:
                ax.set_title(f"class {int(ds.labels[index])}", fontsize=9)
    bottom = grid[1].subgridspec(2, per_class, wspace=0.04, hspace=0.25)
    for r, cls in enumerate((3, 7)):
        for c in range(per_class):
            index = cls * ds.images_per_class + c
            ax = fig.add_subplot(bottom[r, c])
            ax.imshow(_hwc(ds[index]["image"]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            home = int(ds.background_ids[index]) == int(ds.home_backgrounds[cls])
            ax.set_title("home" if home else "other", fontsize=7, color="black" if home else "crimson")
            if c == 0:
                ax.set_ylabel(f"class {cls}", fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    # no timestamp or software string in the file, so reruns give identical bytes
    fig.savefig(out, dpi=100, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the PNG")
    main(parser.parse_args().out)
