"""Data sets for deep metric learning with object masks, and class-balanced batch sampling.

- :class:`SyntheticBackgrounds`: a built-in background-bias data set (no download), exact masks and exact
  background-swap variants.
- :class:`MPerClassBatchSampler`: a batch sampler of ``batch_size // m`` classes × ``m`` images, reproducible
  and split across DDP ranks (formerly ``MPerClassSampler``, a name that still works with a
  :class:`DeprecationWarning`; pytorch-metric-learning's index sampler is :class:`dml_bias.samplers.MPerClassSampler`).
- :class:`AttributeCompatibility`: a built-in attribute-compatibility task on the synthetic objects, pairs
  labelled by a logical rule over attribute matches (:func:`compatibility_labels`, :func:`attribute_match_gate`).
- Loaders for real data sets (CUB-200-2011, Cars196, SOP, In-Shop, Polyvore Outfits, Revisited
  Oxford/Paris), which read a folder the user prepared and never download anything.

Every sample is a dict that ``torchvision.transforms.v2`` transforms as a whole: ``{"image":
tv_tensors.Image, "mask": tv_tensors.Mask (where there is one), "label": int, "index": int, "meta": dict}``.
"""

from __future__ import annotations

from typing import Any

from dml_bias.datasets.compatibility import (
    RULES,
    AttributeCompatibility,
    CompatibilityPairs,
    attribute_match_gate,
    compatibility_labels,
)
from dml_bias.datasets.samplers import MPerClassBatchSampler
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
    "RULES",
    "VARIANTS",
    "AttributeCompatibility",
    "CompatibilityPairs",
    "MPerClassBatchSampler",
    "SyntheticBackgrounds",
    "attribute_match_gate",
    "compatibility_labels",
]


def __getattr__(name: str) -> Any:
    if name == "MPerClassSampler":  # the old name of MPerClassBatchSampler (deprecated)
        import warnings

        warnings.warn(
            "dml_bias.datasets.MPerClassSampler is renamed MPerClassBatchSampler (it is a batch sampler); "
            "dml_bias.samplers.MPerClassSampler is pytorch-metric-learning's index sampler",
            DeprecationWarning,
            stacklevel=2,
        )
        return MPerClassBatchSampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The real-data loaders live in their own modules; _real_exports re-exports them (if present).
try:
    from dml_bias.datasets import _real_exports
except ImportError as _error:  # pragma: no cover - only while the real loaders are not in the tree
    if getattr(_error, "name", None) != "dml_bias.datasets._real_exports":
        raise
else:
    from dml_bias.datasets._real_exports import *  # noqa: F403

    __all__ += [name for name in _real_exports.__all__ if name not in __all__]
