"""Reading a torchvision v2 sample, shared by the mask transforms: its one mask and its image leaves."""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch
from torchvision import tv_tensors

__all__ = ["find_mask", "is_image_leaf"]


def find_mask(flat_inputs: list[Any], transform_name: str) -> tv_tensors.Mask:
    masks = [x for x in flat_inputs if isinstance(x, tv_tensors.Mask)]
    if len(masks) != 1:
        shapes = ", ".join(str(tuple(m.shape)) for m in masks)
        found = f"{len(masks)} ({shapes})" if masks else "none"
        raise ValueError(
            f"{transform_name} needs exactly one tv_tensors.Mask in the sample, found {found}; leaves of the sample: "
            + ", ".join(type(x).__name__ for x in flat_inputs)
        )
    return masks[0]


def is_image_leaf(inpt: Any) -> bool:
    """Image leaves edited by the mask transforms: images, videos, PIL images and (per torchvision) pure tensors."""
    if isinstance(inpt, (tv_tensors.Image, tv_tensors.Video, PIL.Image.Image)):
        return True
    return type(inpt) is torch.Tensor
