"""Metric-learning losses with pytorch-metric-learning's call contract, exact values and fp16-safe numerics.

The names, arguments and defaults are pytorch-metric-learning's (``distance=`` and ``reducer=`` objects from
:mod:`dml_bias.distances` and :mod:`dml_bias.reducers` included; :class:`ArcFaceLoss` takes degrees and ``W`` of
shape ``(D, C)`` as PML does; :class:`AdditiveAngularMarginLoss` is the radians form). Every loss is a
``torch.nn.Module`` whose ``forward(embeddings, labels=None, indices_tuple=None, ref_emb=None,
ref_labels=None)`` returns a scalar, and has a functional twin in :mod:`dml_bias.losses.functional`.

Example:
    >>> import torch
    >>> from dml_bias.losses import MultiSimilarityLoss
    >>> loss = MultiSimilarityLoss()(torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    >>> loss.ndim
    0
"""

from __future__ import annotations

from dml_bias.losses import functional
from dml_bias.losses.arcface import AdditiveAngularMarginLoss, ArcFaceLoss
from dml_bias.losses.contrastive import ContrastiveLoss
from dml_bias.losses.multi_similarity import MultiSimilarityLoss
from dml_bias.losses.ntxent import NTXentLoss
from dml_bias.losses.proxy_anchor import ProxyAnchorLoss
from dml_bias.losses.supcon import SupConLoss
from dml_bias.losses.triplet import TripletMarginLoss
from dml_bias.losses.wrappers import CrossBatchMemory, SelfSupervisedLoss

__all__ = [
    "AdditiveAngularMarginLoss",
    "ArcFaceLoss",
    "ContrastiveLoss",
    "CrossBatchMemory",
    "MultiSimilarityLoss",
    "NTXentLoss",
    "ProxyAnchorLoss",
    "SelfSupervisedLoss",
    "SupConLoss",
    "TripletMarginLoss",
    "functional",
]
