"""The background-bias study: train with and without masks, compare retrieval, report per class.

:func:`run_study` trains one embedding model per loss (Proxy-Anchor, Multi-Similarity) and training mode (no
mask, soft masks, hard masks, the mask as an extra channel, random backgrounds) and evaluates each on the original
test images and on background-swapped variants; :class:`StudyResult` prints the tables and the per-class bias
report and saves ``results.json``, ``per_class.csv``, ``report.md`` and figures. The command line
``dml-bias study`` does the same.

Example:
    >>> from dml_bias.bias import StudyConfig
    >>> StudyConfig().modes
    ('none', 'soft', 'hard', 'channel', 'bg_augment')
"""

from __future__ import annotations

from dml_bias.bias.models import EmbeddingHead, SmallCNN, build_resnet50
from dml_bias.bias.study import (
    DATASETS,
    LOSSES,
    METRIC_KEYS,
    MODES,
    VARIANTS,
    StudyConfig,
    StudyError,
    StudyResult,
    run_study,
)

__all__ = [
    "DATASETS",
    "LOSSES",
    "METRIC_KEYS",
    "MODES",
    "VARIANTS",
    "EmbeddingHead",
    "SmallCNN",
    "StudyConfig",
    "StudyError",
    "StudyResult",
    "build_resnet50",
    "run_study",
]
