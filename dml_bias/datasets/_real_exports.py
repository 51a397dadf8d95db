"""The real-data loaders, re-exported by :mod:`dml_bias.datasets` (``from ._real_exports import *``)."""

from __future__ import annotations

from dml_bias.datasets._io import AnnotationError, CorruptImageError
from dml_bias.datasets.cars import Cars196
from dml_bias.datasets.cub import CUB200
from dml_bias.datasets.inshop import InShop
from dml_bias.datasets.masked_folder import MaskedFolder
from dml_bias.datasets.polyvore import PolyvoreOutfits
from dml_bias.datasets.revisited import RevisitedOxfordParis
from dml_bias.datasets.sop import StanfordOnlineProducts

__all__ = [
    "CUB200",
    "AnnotationError",
    "Cars196",
    "CorruptImageError",
    "InShop",
    "MaskedFolder",
    "PolyvoreOutfits",
    "RevisitedOxfordParis",
    "StanfordOnlineProducts",
]
