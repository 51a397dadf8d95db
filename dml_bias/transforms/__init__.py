"""Background-mask transforms for ``torchvision.transforms.v2``, background swapping, and a conv widener.

* :class:`BackgroundMask`: hide (``"hard"``), weaken (``"soft"``) or flag (``"channel"``) the background of
  a sample with its segmentation mask, anywhere in a :class:`~torchvision.transforms.v2.Compose`.
* :class:`BackgroundSwap`: put the sample's object on the background of another sample (ImageNet-9's mixed
  variants), as a test-time variant or a training augmentation.
* :func:`adapt_input_conv`: widen a (pretrained) first convolution for the extra mask channel.
* :mod:`dml_bias.transforms.functional`: the same operations on plain (batched, GPU) tensors.

Importing this module imports ``torchvision``; ``import dml_bias`` alone does not.

Example:
    >>> import torch
    >>> from torchvision import tv_tensors
    >>> from dml_bias.transforms import BackgroundMask
    >>> mask = tv_tensors.Mask(torch.tensor([[[0, 255]]], dtype=torch.uint8))
    >>> image = tv_tensors.Image(torch.tensor([[[7, 9]]], dtype=torch.uint8))
    >>> BackgroundMask("hard")({"image": image, "mask": mask})["image"]
    Image([[[0, 9]]], dtype=torch.uint8, )
"""

from __future__ import annotations

from dml_bias.transforms import functional
from dml_bias.transforms._conv import adapt_input_conv
from dml_bias.transforms._mask import BackgroundMask
from dml_bias.transforms._swap import BackgroundSwap

__all__ = ["BackgroundMask", "BackgroundSwap", "adapt_input_conv", "functional"]
