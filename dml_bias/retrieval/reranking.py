r"""Re-ranking of a global ranking by spatial verification, as DELG does :cite:`cao2020delg`.

:func:`~dml_bias.retrieval.rerank` verifies the top of every query's ranking with
:func:`~dml_bias.retrieval.spatial_verification` (batched RANSAC, one call per query) and sorts each row by
(inlier count, global score). The rules and numerics of the verification are described in
:mod:`dml_bias.retrieval.verification`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from dml_bias._checks import (
    check_dtype,
    check_finite,
    check_has_data,
    check_index_list,
    check_number,
    check_shape,
    check_tensor,
    describe,
)
from dml_bias.retrieval.verification import spatial_verification

__all__ = ["rerank"]


def _junk_ids(entry: Any, name: str) -> torch.Tensor:
    """One query's junk: an iterable of integer database indices (a 1-D integer tensor or array too) as int64."""
    ids = check_index_list(
        entry, name, what="integer database indices", hint=" (one per query: junk=[[5]], not junk=[5])"
    )
    return torch.tensor(ids, dtype=torch.long)


def _check_feature_sequence(value: Any, name: str, length: int | None, length_source: str) -> None:
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes, torch.Tensor)):
        raise TypeError(f"{name} must be a sequence of per-image tensors, got {describe(value)}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must have {length} entries ({length_source}), got {len(value)}")


def rerank(
    ranks: torch.Tensor,
    scores: torch.Tensor,
    query_locations: Sequence[torch.Tensor],
    query_descriptors: Sequence[torch.Tensor],
    index_locations: Sequence[torch.Tensor],
    index_descriptors: Sequence[torch.Tensor],
    *,
    num_to_rerank: int = 100,
    junk: Sequence[Iterable[int]] | None = None,
    return_inliers: bool = False,
    **verification_kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Re-rank a global ranking by spatial verification, as DELG does :cite:`cao2020delg`.

    For each query ``i``: the first ``num_to_rerank`` entries of ``ranks[i]`` that are not in ``junk[i]`` are
    verified against the query with :func:`spatial_verification`; every other entry (junk, and everything past
    them) counts as 0 inliers. The row is then sorted by (inliers, global score), both descending, with a
    stable sort, so entries with equal inliers and equal scores keep their order in ``ranks``. This is DELG's
    ``RerankByGeometricVerification``: verified images with at least one inlier come first, by inlier count; all
    the others (verified with 0 inliers, junk, not verified) follow by global score, i.e. in their original
    order when ``scores`` is sorted (as :func:`dml_bias.metrics.knn` returns it). Junk entries therefore stay in
    the row at their global-score position; :func:`dml_bias.metrics.revisited_map` ignores them anyway. DELG
    re-ranks separately per protocol (Medium, Hard), with that protocol's junk.

    The verification runs on the device of the query's features, one batched call per query.

    Args:
        ranks: ``(Q, R)`` integer database indices per query, best first (e.g. the indices of
            :func:`dml_bias.metrics.knn`, which returns ``(scores, indices)``).
        scores: ``(Q, R)`` floating global similarities of those entries (finite).
        query_locations: ``Q`` tensors ``(M_i, 2)``: the local feature locations of each query, in pixels.
        query_descriptors: ``Q`` tensors ``(M_i, d)``: their descriptors.
        index_locations: A sequence over the database (a list, a tuple or any ``collections.abc.Sequence``,
            e.g. one that loads features lazily: only the verified entries are read): ``(N_j, 2)`` tensors, at least
            ``ranks.max() + 1`` of them.
        index_descriptors: The same for the descriptors, ``(N_j, d)``.
        num_to_rerank: How many non-junk entries per row to verify, ``>= 1`` (DELG: 100).
        junk: ``None`` or one iterable of database indices per query, skipped when choosing the entries to verify.
        return_inliers: Also return the inlier counts.
        **verification_kwargs: Passed to :func:`spatial_verification` (``descriptor_threshold``,
            ``residual_threshold``, ``max_trials``, ``ratio_test``, ``seed``, ``trials_per_chunk``). Note the
            defaults there are DELG's (1.0, 20, 1000, no ratio test, seed 0).

    Returns:
        The re-ranked ``(Q, R)`` int64 database indices on the device of ``ranks``: the row layout of
        :func:`dml_bias.metrics.revisited_map`. With ``return_inliers=True``, also a ``(Q, R)`` int64 tensor
        aligned with it: the inlier count of each entry, ``-1`` for entries that were not verified.

    Raises:
        TypeError: If ``ranks`` is not an integer tensor, ``scores`` not a floating-point tensor, a feature
            argument not a sequence, or a verification keyword unknown.
        ValueError: On mismatched shapes or lengths, an index outside the database, non-finite scores,
            ``num_to_rerank < 1``, or invalid verification settings.

    Example:
        >>> import torch
        >>> from dml_bias.retrieval import rerank
        >>> g = torch.Generator().manual_seed(0)
        >>> locations = [torch.rand(20, 2, generator=g) * 100 for _ in range(3)]
        >>> descriptors = [torch.nn.functional.normalize(torch.randn(20, 64, generator=g), dim=1) for _ in range(3)]
        >>> query_loc, query_desc = [locations[2] + 5.0], [descriptors[2]]  # the query is a view of image 2
        >>> ranks, scores = torch.tensor([[0, 1, 2]]), torch.tensor([[0.9, 0.8, 0.7]])
        >>> out, inliers = rerank(ranks, scores, query_loc, query_desc, locations, descriptors, return_inliers=True)
        >>> out.tolist(), inliers.tolist()
        ([[2, 0, 1]], [[20, 0, 0]])
    """
    check_tensor(ranks, "ranks")
    check_dtype(ranks, "ranks", "integer")
    sizes = check_shape(ranks, "ranks", ("Q", "R"))
    check_tensor(scores, "scores")
    check_has_data(ranks=ranks, scores=scores)
    check_shape(scores, "scores", ("Q", "R"), sizes, sources={"Q": "ranks.shape[0]", "R": "ranks.shape[1]"})
    check_dtype(scores, "scores", "floating")
    check_finite(scores, "scores")
    check_number(num_to_rerank, "num_to_rerank", low=1, integer=True)
    if "index_lengths" in verification_kwargs:
        raise TypeError("rerank() takes per-image index features; index_lengths is not accepted")
    num_queries, width = sizes["Q"], sizes["R"]
    _check_feature_sequence(query_locations, "query_locations", num_queries, "ranks.shape[0]")
    _check_feature_sequence(query_descriptors, "query_descriptors", num_queries, "ranks.shape[0]")
    _check_feature_sequence(index_locations, "index_locations", None, "")
    _check_feature_sequence(index_descriptors, "index_descriptors", len(index_locations), "len(index_locations)")
    junk_lists: list[torch.Tensor] | None = None
    if junk is not None:
        if not isinstance(junk, Sequence) or isinstance(junk, (str, bytes)):
            raise TypeError(
                f"junk must be a sequence of one iterable of database indices per query, got {describe(junk)}"
            )
        if len(junk) != num_queries:
            raise ValueError(f"junk must have {num_queries} entries (ranks.shape[0]), got {len(junk)}")
        junk_lists = [_junk_ids(entry, f"junk[{q}]") for q, entry in enumerate(junk)]
    ranks_cpu = ranks.detach().to("cpu", torch.long)
    scores_cpu = scores.detach().to("cpu", torch.float64)
    if ranks_cpu.numel():
        low, high = int(ranks_cpu.min()), int(ranks_cpu.max())
        if low < 0 or high >= len(index_locations):
            raise ValueError(
                f"ranks must hold database indices in [0, {len(index_locations) - 1}] (len(index_locations)), "
                f"got values in [{low}, {high}]"
            )

    reranked = torch.empty_like(ranks_cpu)
    inliers_out = torch.empty_like(ranks_cpu)
    for q in range(num_queries):
        row = ranks_cpu[q]
        usable = torch.ones(width, dtype=torch.bool)
        if junk_lists is not None:
            junk_ids = junk_lists[q]
            usable = ~torch.isin(row, junk_ids)
        positions = usable.nonzero().flatten()[:num_to_rerank]
        ids = row[positions].tolist()
        counts = spatial_verification(
            query_locations[q],
            query_descriptors[q],
            [index_locations[j] for j in ids],
            [index_descriptors[j] for j in ids],
            **verification_kwargs,
        )
        inliers = torch.full((width,), -1, dtype=torch.long)
        inliers[positions] = counts.cpu()
        # Lexicographic (inliers, score), descending; two stable sorts keep equal pairs in row order.
        by_score = torch.sort(scores_cpu[q], descending=True, stable=True).indices
        by_inliers = torch.sort(inliers.clamp_min(0)[by_score], descending=True, stable=True).indices
        order = by_score[by_inliers]
        reranked[q] = row[order]
        inliers_out[q] = inliers[order]
    reranked = reranked.to(ranks.device)
    if return_inliers:
        return reranked, inliers_out.to(ranks.device)
    return reranked
