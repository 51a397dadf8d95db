"""Retrieval evaluation: exact k-nearest neighbours and retrieval metrics.

* :func:`knn`: exact top-k neighbours in bounded memory, ties by lower reference index (optional faiss backend).
* :func:`retrieval_metrics`: Recall@k (DML meaning), MAP@R, R-precision and full mAP in one pass, optionally
  per class; single-metric twins :func:`recall_at_k`, :func:`map_at_r`, :func:`r_precision`,
  :func:`mean_average_precision`.
* :func:`revisited_map`: the Revisited Oxford/Paris protocol (Easy/Medium/Hard mAP and mP@k).
* PAN's protocols (:mod:`dml_bias.metrics.protocols`): :func:`few_shot_episodes` / :func:`few_shot_accuracy`
  (N-way K-shot classification), :func:`fitb_scores` / :func:`fitb_accuracy` (Polyvore Outfits fill-in-the-blank)
  and :func:`compatibility_scores` / :func:`compatibility_auc` (outfit compatibility).
* :class:`RetrievalEvaluator`: accumulates embeddings over batches (and ranks) and computes the metrics.
* :func:`sharded_knn` / :func:`sharded_retrieval_metrics`: exact search over a reference set sharded across
  ``torch.distributed`` ranks.
"""

from __future__ import annotations

from dml_bias.metrics._faiss import FAISS_GPU_MAX_K, faiss_knn
from dml_bias.metrics.evaluator import RetrievalEvaluator
from dml_bias.metrics.knn import knn
from dml_bias.metrics.protocols import (
    FewShotResult,
    compatibility_auc,
    compatibility_scores,
    few_shot_accuracy,
    few_shot_episodes,
    fitb_accuracy,
    fitb_scores,
)
from dml_bias.metrics.retrieval import (
    map_at_r,
    mean_average_precision,
    r_precision,
    recall_at_k,
    retrieval_metrics,
)
from dml_bias.metrics.revisited import REVISITED_PROTOCOLS, revisited_average_precision, revisited_map
from dml_bias.metrics.sharded import sharded_knn, sharded_retrieval_metrics

__all__ = [
    "FAISS_GPU_MAX_K",
    "REVISITED_PROTOCOLS",
    "FewShotResult",
    "RetrievalEvaluator",
    "compatibility_auc",
    "compatibility_scores",
    "faiss_knn",
    "few_shot_accuracy",
    "few_shot_episodes",
    "fitb_accuracy",
    "fitb_scores",
    "knn",
    "map_at_r",
    "mean_average_precision",
    "r_precision",
    "recall_at_k",
    "retrieval_metrics",
    "revisited_average_precision",
    "revisited_map",
    "sharded_knn",
    "sharded_retrieval_metrics",
]
