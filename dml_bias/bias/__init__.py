"""The background-bias study: train with and without masks, compare retrieval, report per class.

:func:`run_study` trains one embedding model per loss (Proxy-Anchor, Multi-Similarity) and training mode (no
mask, soft masks, hard masks, the mask as an extra channel, random backgrounds) and evaluates each on the original
test images and on background-swapped variants; :class:`StudyResult` prints the tables and the per-class bias
report and saves ``results.json``, ``per_class.csv``, ``report.md`` and figures. The command line
``dml-bias study`` does the same.

:func:`audit` measures the background reliance of any trained model on the user's images and masks (the command
line ``dml-bias audit``), with bootstrap intervals and a verdict in plain words; :class:`AuditResult` saves its
report.

For one trained model, without retraining: :func:`similarity_decomposition` and :func:`similarity_attribution`
(what makes a query similar to its neighbour, per position or pixel), :func:`pairwise_decomposition` (which region
matches which), :func:`foreground_energy` (how much of that lies on the object) and
:func:`background_sensitivity` (how far the embedding moves when only the background changes).

Example:
    >>> from dml_bias.bias import StudyConfig
    >>> StudyConfig().modes
    ('none', 'soft', 'hard', 'channel', 'bg_augment')
"""

from __future__ import annotations

from dml_bias.bias.attribution import (
    ATTRIBUTION_METHODS,
    BackgroundSensitivity,
    ForegroundEnergy,
    PairwiseDecomposition,
    SimilarityDecomposition,
    background_sensitivity,
    foreground_energy,
    pairwise_decomposition,
    similarity_attribution,
    similarity_decomposition,
)
from dml_bias.bias.audit import MASK_INPUTS, AuditError, AuditResult, audit
from dml_bias.bias.config import DATASETS, LOSSES, METRIC_KEYS, MODES, VARIANTS, RunSpec, StudyConfig, StudyError
from dml_bias.bias.models import EmbeddingHead, SmallCNN, build_resnet50
from dml_bias.bias.result import StudyResult
from dml_bias.bias.study import run_study

__all__ = [
    "ATTRIBUTION_METHODS",
    "DATASETS",
    "LOSSES",
    "MASK_INPUTS",
    "METRIC_KEYS",
    "MODES",
    "VARIANTS",
    "AuditError",
    "AuditResult",
    "BackgroundSensitivity",
    "EmbeddingHead",
    "ForegroundEnergy",
    "PairwiseDecomposition",
    "RunSpec",
    "SimilarityDecomposition",
    "SmallCNN",
    "StudyConfig",
    "StudyError",
    "StudyResult",
    "audit",
    "background_sensitivity",
    "build_resnet50",
    "foreground_energy",
    "pairwise_decomposition",
    "run_study",
    "similarity_attribution",
    "similarity_decomposition",
]
