"""The masking core shared by :mod:`dml_bias.transforms.functional` and the mask transforms.

Argument checks of images, masks and masking options, the foreground of a mask, and the masking itself with
options already checked (the transforms check them once, at construction). Private to the package; the names
carry no underscore because two modules share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from dml_bias._checks import (
    check_bool,
    check_choice,
    check_dtype,
    check_number,
    check_same_device,
    check_tensor,
    describe,
)

__all__ = [
    "IMAGE_DTYPES",
    "MASK_MODES",
    "check_image",
    "check_mask_options",
    "check_mask_values",
    "foreground",
    "mask_background_checked",
    "prepare_mask",
    "reduce_dims",
    "round_to_uint8",
    "working_dtype",
]

#: The masking modes (documented as :data:`dml_bias.transforms.functional.MODES`).
MASK_MODES: tuple[str, ...] = ("hard", "soft", "channel")
#: The image dtypes the masking functions accept.
IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_mask_options(
    mode: str, sigma: float, threshold: float, background_ids: Sequence[int] | None, soft_alpha: bool
) -> tuple[int, ...] | None:
    """Validate the masking options; return ``background_ids`` as a tuple of ints (or ``None``)."""
    check_choice(mode, "mode", MASK_MODES)
    check_number(sigma, "sigma", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    check_number(threshold, "threshold", low=0.0, high=1.0)
    check_bool(soft_alpha, "soft_alpha")
    if background_ids is None:
        return None
    if isinstance(background_ids, torch.Tensor):
        background_ids = background_ids.flatten().tolist()
    if isinstance(background_ids, (str, bytes)) or not isinstance(background_ids, Sequence):
        raise TypeError(f"background_ids must be a sequence of ints or None, got {describe(background_ids)}")
    ids = tuple(background_ids)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"background_ids must be a non-empty sequence of ints, got {background_ids!r}")
    return ids


def check_image(image: Any, name: str = "image", *, min_ndim: int = 3, exact_ndim: int | None = None) -> None:
    check_tensor(image, name)
    if image.dtype not in IMAGE_DTYPES:  # checked here first: check_dtype formats its message eagerly
        check_dtype(image, name, IMAGE_DTYPES)
    if exact_ndim is not None and image.ndim != exact_ndim:
        raise ValueError(f"{name} must be a {exact_ndim}-D tensor of shape (C, H, W), got {describe(image)}")
    if image.ndim < min_ndim:
        raise ValueError(f"{name} must have shape (C, H, W) or (..., C, H, W), got {describe(image)}")
    if 0 in image.shape[-3:]:
        raise ValueError(f"{name} must have C, H and W >= 1 (an image with pixels), got {describe(image)}")


def prepare_mask(mask: Any, image: torch.Tensor, mask_name: str = "mask", image_name: str = "image") -> torch.Tensor:
    """Return ``mask`` as ``(..., 1, H, W)`` after checking it against ``image`` (``(..., C, H, W)``)."""
    check_tensor(mask, mask_name)
    if mask.dtype.is_complex:
        raise TypeError(f"{mask_name} must be a real (bool, integer or floating) tensor, got {describe(mask)}")
    if mask.ndim < 2:
        raise ValueError(f"{mask_name} must have shape (H, W) or (..., 1, H, W), got {describe(mask)}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.shape[-3] != 1:
        raise ValueError(
            f"{mask_name} must have a single channel (shape (H, W) or (..., 1, H, W)), got {describe(mask)}"
            f" with {mask.shape[-3]} channels"
        )
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"{mask_name} and {image_name} must have the same height and width, got {mask_name} shape "
            f"{tuple(mask.shape)} (H, W = {tuple(mask.shape[-2:])}) and {image_name} shape {tuple(image.shape)} "
            f"(H, W = {tuple(image.shape[-2:])})"
        )
    lead_m, lead_i = tuple(mask.shape[:-3]), tuple(image.shape[:-3])
    ok = len(lead_m) <= len(lead_i) and all(
        m in (1, i) for m, i in zip(reversed(lead_m), reversed(lead_i), strict=False)
    )
    if not ok:
        raise ValueError(
            f"{mask_name} batch dimensions {lead_m} do not broadcast to the {image_name} batch dimensions {lead_i}"
            f" ({mask_name} shape {tuple(mask.shape)}, {image_name} shape {tuple(image.shape)})"
        )
    check_same_device(**{image_name: image, mask_name: mask})
    return mask


def reduce_dims(mask: torch.Tensor) -> tuple[int, ...]:
    return (-3, -2, -1) if mask.ndim >= 3 else (-2, -1)


def check_mask_values(mask: torch.Tensor, name: str) -> int | None:
    """Range checks of float ([0, 1]) and integer ([0, 255]) masks; CPU tensors only (elsewhere: a host sync).

    Returns the maximum of a checked integer mask, else ``None``.
    """
    if mask.device.type != "cpu" or mask.numel() == 0 or mask.dtype == torch.bool:
        return None
    if mask.is_floating_point():
        lo, hi = float(mask.min()), float(mask.max())
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise ValueError(
                f"a floating-point {name} must hold values in [0, 1], got values in [{lo}, {hi}] ({describe(mask)})"
            )
        return None
    extremes = torch.aminmax(mask)
    low, high = int(extremes.min), int(extremes.max)
    if low < 0 or high > 255:
        raise ValueError(
            f"an integer {name} must hold values in [0, 255] ({{0, 1}}, {{0, 255}} or grey levels), got values in "
            f"[{low}, {high}] ({describe(mask)}); for a class-id map pass background_ids"
        )
    return high


def foreground(
    mask: torch.Tensor,
    threshold: float,
    background_ids: tuple[int, ...] | None,
    name: str = "mask",
    dtype: torch.dtype = torch.float32,
    need_level: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(foreground, level)``: the boolean object mask and the object level in [0, 1].

    ``level`` is ``None`` for bool masks and class-id maps (where it equals the foreground) and when not needed;
    integer levels are converted to ``dtype``.
    """
    if background_ids is not None:
        if mask.is_floating_point() or mask.dtype == torch.bool:
            raise TypeError(f"with background_ids, {name} must be an integer class-id map, got {describe(mask)}")
        ids = torch.tensor(background_ids, dtype=mask.dtype, device=mask.device)
        return ~torch.isin(mask, ids), None
    if mask.dtype == torch.bool:
        return mask, None
    high = check_mask_values(mask, name)
    if mask.is_floating_point():
        return mask > threshold, mask
    # For an integer m and scale s (255 for grey levels, 1 for {0, 1} masks), m / s > t  <=>  m > floor(s t):
    # one integer comparison, no float copy of the mask.
    cut_grey, cut_binary = math.floor(round(threshold * 255, 9)), math.floor(threshold)
    if high is not None and mask.ndim <= 3:  # one checked CPU sample: its maximum is already known
        scale = 255.0 if high > 1 else 1.0
        fg = mask > (cut_grey if high > 1 else cut_binary)
        return fg, mask.to(dtype) / scale if need_level else None
    # a batch, or a device tensor: {0, 1} and 0..255 are told apart per sample on the device, without a host sync
    grey = mask.amax(dim=reduce_dims(mask), keepdim=True) > 1
    fg = mask > torch.where(grey, cut_grey, cut_binary).to(mask.dtype)
    level = mask.to(dtype) / torch.where(grey, 255.0, 1.0) if need_level else None
    return fg, level


def mask_background_checked(
    image: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    sigma: float,
    threshold: float,
    ids: tuple[int, ...] | None,
    soft_alpha: bool,
) -> torch.Tensor:
    """:func:`mask_background` with the options already checked (the transform checks them once, at init)."""
    check_image(image)
    mask = prepare_mask(mask, image)
    # float64 images get float64 weights; everything else (uint8 included) computes them in float32
    fg, level = foreground(mask, threshold, ids, dtype=working_dtype(image), need_level=soft_alpha)
    weight = level if (soft_alpha and level is not None) else None
    is_uint8 = image.dtype == torch.uint8

    if mode == "channel":
        if weight is None:
            extra = fg.to(image.dtype) * 255 if is_uint8 else fg.to(image.dtype)
        else:
            extra = torch.round(weight * 255).to(torch.uint8) if is_uint8 else weight.to(image.dtype)
        extra = extra.expand(*image.shape[:-3], 1, *image.shape[-2:])
        return torch.cat([image, extra], dim=-3)

    if weight is not None:
        factor = weight if mode == "hard" else weight + (1 - weight) * sigma
        if is_uint8:
            return round_to_uint8(image.to(torch.float32) * factor)
        return image * factor.to(image.dtype)

    if is_uint8:
        # uint8 * bool and uint8 * float32 weights are exact here and several times faster than torch.where on CPU
        if mode == "hard":
            return image * fg
        return round_to_uint8(image * torch.where(fg, 1.0, sigma))
    if mode == "hard":
        return torch.where(fg, image, torch.zeros((), dtype=image.dtype, device=image.device))
    return torch.where(fg, image, image * sigma)


def working_dtype(image: torch.Tensor) -> torch.dtype:
    return torch.float64 if image.dtype == torch.float64 else torch.float32


def round_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Round half to even and saturate to [0, 255]; ``x`` is a fresh intermediate, rounded in place."""
    return x.round_().clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------------------------
# background swapping
# --------------------------------------------------------------------------------------------------------------
