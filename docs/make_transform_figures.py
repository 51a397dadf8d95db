"""Draw the figure of the background-masks guide: docs/_static/figures/transforms.png.

Deterministic (a procedural sample, no dataset, no randomness beyond a fixed seed); run it after changing
the transforms and commit the PNG:

    python docs/make_transform_figures.py
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from dml_bias.transforms import BackgroundMask
from dml_bias.transforms.functional import make_variant, swap_background

OUT = Path(__file__).parent / "_static" / "figures" / "transforms.png"
SIZE = 128


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    return ys, xs


def _soft_shape(distance: torch.Tensor, edge: float = 0.02) -> torch.Tensor:
    """Soft (anti-aliased) inside-ness of a shape given a signed distance (negative inside)."""
    return ((edge - distance) / (2 * edge)).clamp(0, 1)


def meadow_with_bird() -> tuple[torch.Tensor, torch.Tensor]:
    """A striped green meadow under a pale sky, with an orange 'bird' (ellipse + head) and a soft mask."""
    g = torch.Generator().manual_seed(0)
    ys, xs = _grid()
    grass = torch.stack([0.25 + 0.1 * torch.sin(40 * xs + 6 * ys), 0.55 + 0.15 * torch.sin(25 * ys), 0.2 + 0 * xs])
    sky = torch.stack([0.7 + 0.1 * ys, 0.85 + 0 * ys, 0.95 - 0.1 * ys])
    horizon = (ys > 0.45 + 0.03 * torch.sin(12 * xs)).float()
    background = horizon * grass + (1 - horizon) * sky
    background = background + 0.05 * torch.rand(3, SIZE, SIZE, generator=g)
    body = torch.sqrt(((xs - 0.5) / 0.22) ** 2 + ((ys - 0.55) / 0.14) ** 2) - 1
    head = torch.sqrt((xs - 0.7) ** 2 + (ys - 0.38) ** 2) / 0.08 - 1
    alpha = torch.maximum(_soft_shape(body * 0.15), _soft_shape(head * 0.08))
    bird = torch.stack([0.95 + 0 * xs, 0.5 + 0.2 * torch.sin(30 * xs) * torch.cos(20 * ys), 0.1 + 0 * xs])
    image = alpha * bird + (1 - alpha) * background
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), (alpha * 255).round().to(torch.uint8)[None]


def beach_with_box() -> tuple[torch.Tensor, torch.Tensor]:
    """A wavy blue sea over sand with a purple square (the donor's object)."""
    ys, xs = _grid()
    sea = torch.stack([0.1 + 0 * xs, 0.35 + 0.1 * torch.sin(30 * xs + 10 * ys), 0.7 + 0.1 * torch.cos(20 * ys)])
    sand = torch.stack([0.9 + 0 * xs, 0.8 + 0.05 * torch.sin(60 * xs * ys), 0.55 + 0 * xs])
    shore = (ys > 0.6 + 0.05 * torch.sin(2 * math.pi * xs)).float()
    background = shore * sand + (1 - shore) * sea
    box = torch.maximum((xs - 0.3).abs(), (ys - 0.7).abs()) / 0.14 - 1
    alpha = _soft_shape(box * 0.14, edge=0.01)
    image = alpha * torch.tensor([0.55, 0.2, 0.6])[:, None, None] + (1 - alpha) * background
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), (alpha * 255).round().to(torch.uint8)[None]


def main() -> None:
    image, mask = meadow_with_bird()
    donor, donor_mask = beach_with_box()
    sample = {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)}
    hard = BackgroundMask("hard")(sample)["image"]
    soft = BackgroundMask("soft", sigma=0.4)(sample)["image"]
    channel = BackgroundMask("channel")(sample)["image"]
    swapped = {
        fill: swap_background(image, mask, donor, donor_mask, fill=fill, dilation=3)[0]
        for fill in ("tile", "black", "inpaint")
    }
    donor_cleared, _ = make_variant("only_bg_t", donor, donor_mask, dilation=3)
    # the masks follow the crops: the same pipeline the bias study uses, on a fixed crop
    torch.manual_seed(0)
    cropped = v2.Compose([v2.RandomResizedCrop(SIZE, scale=(0.5, 0.7)), v2.RandomHorizontalFlip(1.0)])(sample)
    cropped_hard = BackgroundMask("hard")(cropped)["image"]

    panels = [
        ("original (no mask)", image),
        ("mask (soft edges)", mask),
        ('"hard": background → 0', hard),
        ('"soft": background × 0.4', soft),
        ('"channel": 4th channel', channel[3:]),
        ("crop + flip (image)", cropped["image"]),
        ("donor", donor),
        ("donor, object tiled over", donor_cleared),
        ("swap, fill=tile", swapped["tile"]),
        ("swap, fill=black", swapped["black"]),
        ("swap, fill=inpaint", swapped["inpaint"]),
        ("crop + flip, then hard", cropped_hard),
    ]
    fig, axes = plt.subplots(2, 6, figsize=(13.2, 5.0))
    for ax, (title, picture) in zip(axes.flat, panels, strict=True):
        array = picture.as_subclass(torch.Tensor).permute(1, 2, 0).numpy()
        ax.imshow(array[..., 0] if array.shape[-1] == 1 else array, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # no Software/date metadata: the PNG is byte-for-byte reproducible
    fig.savefig(OUT, dpi=80, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
