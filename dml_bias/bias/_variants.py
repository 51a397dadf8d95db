"""The ImageNet-9 background variants of a whole batch at once, on the batch's device.

:func:`make_batch_variants` gives, image for image, exactly what
:func:`~dml_bias.transforms.functional.make_variant` gives one image at a time (with ``fill="tile"``, the default
threshold and dilation, and no generator, as the study builds its variants of real data), without a Python loop
over the images: object boxes, the tiling rectangles and the composites are tensor operations. The audit makes
its variants with it. Internal (``__all__`` is empty).
"""

from __future__ import annotations

import torch

from dml_bias.transforms.functional import foreground_mask, mask_background

__all__: list[str] = []

#: The variants that take a donor's background.
MIXED = ("mixed_same", "mixed_rand", "mixed_next")


def _levels(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground ``(N, H, W)`` bool and object level ``(N, 1, H, W)`` float32 of uint8 ``(N, 1, H, W)`` masks.

    A sample whose maximum is at most 1 is a {0, 1} mask, otherwise grey levels (the rule of
    :func:`~dml_bias.transforms.functional.foreground_mask`, applied per sample).
    """
    fg = foreground_mask(masks)
    grey = masks.amax(dim=(1, 2, 3), keepdim=True) > 1
    level = masks.to(torch.float32) / torch.where(grey, 255.0, 1.0)
    return fg[:, 0], level


def _remove_objects(images: torch.Tensor, fg: torch.Tensor, dilation: int) -> torch.Tensor:
    """Every image's dilated object box tiled from its largest object-free strip (black if there is none)."""
    n, _, h, w = images.shape
    dev = images.device
    rows_any, cols_any = fg.any(dim=2), fg.any(dim=1)  # (N, H), (N, W)
    has = rows_any.any(dim=1)
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    first_row = torch.where(rows_any, ar_h, h).amin(dim=1)
    last_row = torch.where(rows_any, ar_h, -1).amax(dim=1)
    first_col = torch.where(cols_any, ar_w, w).amin(dim=1)
    last_col = torch.where(cols_any, ar_w, -1).amax(dim=1)
    top = (first_row - dilation).clamp_min(0)
    bottom = (last_row + 1 + dilation).clamp_max(h)
    left = (first_col - dilation).clamp_min(0)
    right = (last_col + 1 + dilation).clamp_max(w)
    # The four strips around the box: top, bottom, left, right (ties go to the first, as in make_variant).
    zeros, hs, ws = torch.zeros_like(top), torch.full_like(top, h), torch.full_like(top, w)
    strips = torch.stack(
        [
            torch.stack([zeros, top, zeros, ws], 1),
            torch.stack([bottom, hs, zeros, ws], 1),
            torch.stack([zeros, hs, zeros, left], 1),
            torch.stack([zeros, hs, right, ws], 1),
        ],
        1,
    )  # (N, 4, 4) as (top, bottom, left, right)
    areas = (strips[:, :, 1] - strips[:, :, 0]) * (strips[:, :, 3] - strips[:, :, 2])
    best = areas.argmax(dim=1)
    source = strips[torch.arange(n, device=dev), best]  # (N, 4)
    tiled = areas.amax(dim=1) > 0
    sh = (source[:, 1] - source[:, 0]).clamp_min(1)
    sw = (source[:, 3] - source[:, 2]).clamp_min(1)
    in_rows = (ar_h >= top[:, None]) & (ar_h < bottom[:, None]) & has[:, None]  # (N, H)
    in_cols = (ar_w >= left[:, None]) & (ar_w < right[:, None]) & has[:, None]  # (N, W)
    row_src = torch.where(in_rows, (ar_h - top[:, None]) % sh[:, None] + source[:, 0:1], ar_h)
    col_src = torch.where(in_cols, (ar_w - left[:, None]) % sw[:, None] + source[:, 2:3], ar_w)
    batch = torch.arange(n, device=dev)[:, None, None]
    filled = images.permute(0, 2, 3, 1)[batch, row_src[:, :, None], col_src[:, None, :]].permute(0, 3, 1, 2)
    in_box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (N, 1, H, W)
    black = in_box & ~tiled[:, None, None, None]
    out = torch.where(in_box, filled, images)
    return torch.where(black, torch.zeros((), dtype=images.dtype, device=dev), out)


def make_batch_variants(
    names: tuple[str, ...] | list[str],
    images: torch.Tensor,
    masks: torch.Tensor,
    donors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    dilation: int = 4,
) -> dict[str, torch.Tensor]:
    """The variants ``names`` of a batch: ``{name: (N, 3, H, W) uint8}``.

    Args:
        names: Variant names (``original``, ``only_fg``, ``only_bg_t``, ``no_fg`` and the mixed ones).
        images: ``(N, 3, H, W)`` uint8 images.
        masks: ``(N, 1, H, W)`` uint8 object masks (0/1 or grey levels, 255 = object).
        donors: For every mixed variant in ``names``: the donors' ``(images, masks)`` in the same formats.
        dilation: Pixels added on each side of object boxes (as in ``make_variant``).
    """
    fg, level = _levels(masks)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "original":
            out[name] = images
        elif name == "only_fg":
            out[name] = mask_background(images, masks, "hard")
        elif name == "no_fg":
            out[name] = torch.where(fg[:, None], torch.zeros((), dtype=images.dtype, device=images.device), images)
        elif name == "only_bg_t":
            out[name] = _remove_objects(images, fg, dilation)
        elif name in MIXED:
            donor_images, donor_masks = donors[name]
            background = _remove_objects(donor_images, foreground_mask(donor_masks)[:, 0], dilation)
            mixed = images.to(torch.float32) * level + background.to(torch.float32) * (1 - level)
            out[name] = mixed.round_().clamp_(0, 255).to(torch.uint8)
        else:
            raise ValueError(f"unknown variant {name!r}")
    return out
