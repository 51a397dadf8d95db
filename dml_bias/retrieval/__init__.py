"""Post-processing of ranked retrieval lists: spatial verification and re-ranking.

* :mod:`dml_bias.retrieval.verification`: :func:`spatial_verification`, the RANSAC inlier counts (affine model)
  of one query image's local features against a batch of candidate images, batched over candidates and
  hypotheses, on any device (DELG's geometric verification :cite:`cao2020delg`).
* :mod:`dml_bias.retrieval.reranking`: :func:`rerank`, which re-ranks the top of a global ranking (e.g. the
  indices of :func:`dml_bias.metrics.knn`) by those inlier counts, as DELG does.

The local features typically come from :class:`dml_bias.heads.DELG`
(:meth:`~dml_bias.heads.DELG.extract_local`), but any ``(N, 2)`` locations and ``(N, d)`` descriptors work.

Example:
    >>> import torch
    >>> from dml_bias.retrieval import rerank
    >>> g = torch.Generator().manual_seed(0)
    >>> locations = [torch.rand(20, 2, generator=g) * 100 for _ in range(2)]
    >>> descriptors = [torch.nn.functional.normalize(torch.randn(20, 32, generator=g), dim=1) for _ in range(2)]
    >>> ranks, scores = torch.tensor([[0, 1]]), torch.tensor([[0.9, 0.8]])
    >>> rerank(ranks, scores, [locations[1] + 3.0], [descriptors[1]], locations, descriptors).tolist()
    [[1, 0]]
"""

from __future__ import annotations

from dml_bias.retrieval.reranking import rerank
from dml_bias.retrieval.verification import spatial_verification

__all__ = ["rerank", "spatial_verification"]
