"""Data sets for deep metric learning with object masks, and class-balanced batch sampling.

- :class:`SyntheticBackgrounds`: a built-in background-bias data set (no download), exact masks and exact
  background-swap variants.
- :class:`MPerClassSampler`: a batch sampler of ``batch_size // m`` classes × ``m`` images, reproducible and
  split across DDP ranks.
- Loaders for real data sets (CUB-200-2011, Cars196, SOP, In-Shop, Polyvore Outfits, Revisited
  Oxford/Paris), which read a folder the user prepared and never download anything.

Every sample is a dict that ``torchvision.transforms.v2`` transforms as a whole: ``{"image":
tv_tensors.Image, "mask": tv_tensors.Mask (where there is one), "label": int, "index": int, "meta": dict}``.
"""

from __future__ import annotations

from dml_bias.datasets.samplers import MPerClassSampler
from dml_bias.datasets.synthetic import (
    ATTRIBUTE_NAMES,
    BACKGROUND_FAMILIES,
    OBJECT_ATTRIBUTES,
    VARIANTS,
    SyntheticBackgrounds,
)

__all__ = [
    "ATTRIBUTE_NAMES",
    "BACKGROUND_FAMILIES",
    "OBJECT_ATTRIBUTES",
    "VARIANTS",
    "MPerClassSampler",
    "SyntheticBackgrounds",
]

# The real-data loaders live in their own modules; _real_exports re-exports them (if present).
try:
    from dml_bias.datasets import _real_exports
except ImportError as _error:  # pragma: no cover - only while the real loaders are not in the tree
    if getattr(_error, "name", None) != "dml_bias.datasets._real_exports":
        raise
else:
    from dml_bias.datasets._real_exports import *  # noqa: F403

    __all__ += [name for name in _real_exports.__all__ if name not in __all__]
