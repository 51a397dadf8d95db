"""Heads on top of an embedding network: PAN conditional similarity and DELG global/local features.

* :mod:`dml_bias.heads.pan`: the Concept-conditioned Similarity Module of PAN :cite:`mishra2021pan`
  (:class:`ConditionalSimilarity`), the logical attribute gates :func:`attribute_gate` and :class:`PANLoss`.
* :mod:`dml_bias.heads.pairwise`: training pairs, :class:`PairwiseSimilarityModel` and the evaluation
  protocols of PAN (few-shot episodes, fill-in-the-blank, outfit compatibility).
* :mod:`dml_bias.heads.pooling`: generalised-mean pooling (:class:`GeM`, :func:`gem`).
* :mod:`dml_bias.heads.delg`: DELG :cite:`cao2020delg` global and local heads and the :class:`DELG` model.
* :mod:`dml_bias.heads.verification`: batched RANSAC spatial verification and re-ranking.

Example:
    >>> import torch
    >>> from dml_bias.heads import GeM
    >>> GeM()(torch.ones(2, 8, 4, 4)).shape
    torch.Size([2, 8])
"""

from __future__ import annotations

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
from dml_bias.heads.pairwise import (
    FewShotResult,
    PairIndices,
    PairwiseSimilarityModel,
    compatibility_scores,
    few_shot_accuracy,
    few_shot_episodes,
    fitb_scores,
    sample_pairs,
)
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
from dml_bias.heads.verification import rerank, spatial_verification

__all__: list[str] = [
    "DELG",
    "GATES",
    "JOINTS",
    "ConditionalSimilarity",
    "ConditionalSimilarityOutput",
    "DELGGlobalHead",
    "DELGLocalHead",
    "DELGOutput",
    "FewShotResult",
    "GeM",
    "LocalFeatures",
    "LocalHeadLosses",
    "LocalHeadOutput",
    "PANLoss",
    "PairIndices",
    "PairwiseSimilarityModel",
    "ReceptiveField",
    "attribute_gate",
    "compatibility_scores",
    "few_shot_accuracy",
    "few_shot_episodes",
    "fitb_scores",
    "gem",
    "pan_loss",
    "rerank",
    "sample_pairs",
    "spatial_verification",
]
