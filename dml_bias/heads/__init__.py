"""Heads on top of an embedding network: PAN conditional similarity and DELG global/local features.

* :mod:`dml_bias.heads.pan`: the Concept-conditioned Similarity Module of PAN :cite:`mishra2021pan`
  (:class:`ConditionalSimilarity`), the logical attribute gates :func:`attribute_gate` and :class:`PANLoss`.
* :mod:`dml_bias.heads.pairwise`: training pairs (:func:`sample_pairs`) and :class:`PairwiseSimilarityModel`.
* :mod:`dml_bias.heads.pooling`: generalised-mean pooling (:class:`GeM`, :func:`gem`).
* :mod:`dml_bias.heads.delg`: DELG :cite:`cao2020delg` global and local heads and the :class:`DELG` model.

PAN's evaluation protocols moved to :mod:`dml_bias.metrics.protocols` and spatial verification and re-ranking
to :mod:`dml_bias.retrieval`; their old names here still work, with a :class:`DeprecationWarning`, until release
0.2.0.

Example:
    >>> import torch
    >>> from dml_bias.heads import GeM
    >>> GeM()(torch.ones(2, 8, 4, 4)).shape
    torch.Size([2, 8])
"""

from __future__ import annotations

from typing import Any

from dml_bias._compat import moved_name
from dml_bias.heads.delg import (
    DELG,
    DELGGlobalHead,
    DELGLocalHead,
    DELGOutput,
    LocalFeatures,
    LocalHeadLosses,
    LocalHeadOutput,
    ReceptiveField,
)
from dml_bias.heads.pairwise import PairIndices, PairwiseSimilarityModel, sample_pairs
from dml_bias.heads.pan import (
    GATES,
    JOINTS,
    ConditionalSimilarity,
    ConditionalSimilarityOutput,
    PANLoss,
    attribute_gate,
    pan_loss,
)
from dml_bias.heads.pooling import GeM, gem

__all__: list[str] = [
    "DELG",
    "GATES",
    "JOINTS",
    "ConditionalSimilarity",
    "ConditionalSimilarityOutput",
    "DELGGlobalHead",
    "DELGLocalHead",
    "DELGOutput",
    "GeM",
    "LocalFeatures",
    "LocalHeadLosses",
    "LocalHeadOutput",
    "PANLoss",
    "PairIndices",
    "PairwiseSimilarityModel",
    "ReceptiveField",
    "attribute_gate",
    "gem",
    "pan_loss",
    "sample_pairs",
]

#: Public names that moved out of :mod:`dml_bias.heads`, with their new module.
MOVED: dict[str, str] = {
    **{
        name: "dml_bias.metrics"
        for name in ("FewShotResult", "compatibility_scores", "few_shot_accuracy", "few_shot_episodes", "fitb_scores")
    },
    "rerank": "dml_bias.retrieval",
    "spatial_verification": "dml_bias.retrieval",
}


def __getattr__(name: str) -> Any:
    return moved_name(__name__, name, MOVED)
