r"""PAN's evaluation protocols :cite:`mishra2021pan`: few-shot classification, fill-in-the-blank, compatibility.

One home for the protocols that evaluate a pair head (a model that scores *pairs* of embeddings, such as
:class:`dml_bias.heads.ConditionalSimilarity`) and the metrics they feed:

* :func:`~dml_bias.metrics.few_shot_episodes` and :func:`~dml_bias.metrics.few_shot_accuracy`: :math:`N`-way
  :math:`K`-shot classification, a query's class score being its **mean** pair score against the class's
  supports (PAN's CUB protocol), with the mean episode accuracy and its 95 % interval
  (:class:`~dml_bias.metrics.FewShotResult`);
* :func:`~dml_bias.metrics.fitb_scores` and :func:`~dml_bias.metrics.fitb_accuracy`: Polyvore Outfits
  fill-in-the-blank. Each question is a partial outfit with :math:`C` candidate items; a candidate's score is its
  mean pair score against the outfit's items, the prediction is the highest-scoring candidate (ties: the first),
  and the metric is the fraction of questions answered correctly;
* :func:`~dml_bias.metrics.compatibility_scores` and :func:`~dml_bias.metrics.compatibility_auc`: Polyvore
  Outfits compatibility. Each outfit gets the mean pair score over its items and a label (1 compatible, 0 not);
  the metric is the area under the ROC curve.

The scoring functions take precomputed features ``(N, D)`` and run without gradient tracking; call
``head.eval()`` first if the head has dropout. A head's pair score is read from ``head(h1, h2).score`` (a plain
``(P,)`` tensor returned by ``head(h1, h2)`` is accepted too). The metrics take any scores, e.g. those of single
metric embeddings.

``examples/pan_attributes.py`` runs these protocols end to end; training pairs and the encoder + pair-head model
live in :mod:`dml_bias.heads.pairwise`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from dml_bias._checks import (
    check_dtype,
    check_embeddings,
    check_finite,
    check_generator,
    check_has_data,
    check_index_list,
    check_labels,
    check_number,
    check_same_device,
    check_shape,
    check_tensor,
    describe,
)

__all__ = [
    "FewShotResult",
    "compatibility_auc",
    "compatibility_scores",
    "few_shot_accuracy",
    "few_shot_episodes",
    "fitb_accuracy",
    "fitb_scores",
]


# --------------------------------------------------------------------------------------------------- helpers


def _pair_scores(head: Any, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``head(first, second)`` as a ``(P,)`` tensor: its ``.score`` or the tensor it returns."""
    out = head(first, second)
    score = out if isinstance(out, torch.Tensor) else getattr(out, "score", None)
    if not isinstance(score, torch.Tensor) or score.shape != (first.shape[0],):
        got = describe(score) if isinstance(score, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"head(h1, h2) must return an object with a .score tensor of shape ({first.shape[0]},) (or that "
            f"tensor itself), got {got}"
        )
    return score


def _check_pair_head(head: Any) -> None:
    if not callable(head):
        raise TypeError(f"head must be a callable pair head (head(h1, h2).score), got {type(head).__name__}")


def _lowest_argmax(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of ``(R, C)`` with ties going to the lowest column, on every backend."""
    best = scores.max(dim=1, keepdim=True).values
    column = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    return torch.where(scores == best, column, scores.shape[1]).min(dim=1).values


def _index_list(value: Any, name: str, num_items: int) -> list[int]:
    """Item indices (ints, a 1-D integer tensor or array) as a list of ints in ``[0, num_items)``."""
    items = check_index_list(value, name, what="integer sample indices")
    for v in items:
        if not 0 <= v < num_items:
            raise ValueError(f"{name} must hold sample indices in [0, {num_items - 1}] (features.shape[0]), got {v}")
    return items


def _check_scoring_call(head: Any, features: Any, chunk_size: Any, entries: Any, name: str) -> None:
    """The common checks of :func:`fitb_scores` and :func:`compatibility_scores` (``entries``: questions/outfits)."""
    _check_pair_head(head)
    check_embeddings(features, "features")
    check_has_data(features=features)
    check_finite(features, "features")
    check_number(chunk_size, "chunk_size", low=1, integer=True)
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
        raise TypeError(f"{name} must be a sequence of {name}, got {type(entries).__name__}")
    if len(entries) == 0:
        raise ValueError(f"{name} must hold at least one {name[:-1]}, got an empty sequence")


def _padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as a ``(R, L)`` int64 tensor padded with 0 and its ``(R,)`` lengths."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max()) if rows else 0
    table = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return table.to(device), lengths.to(device)


def _segment_mean(
    head: Any,
    features: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    segment: torch.Tensor,
    num_segments: int,
    chunk_size: int,
) -> torch.Tensor:
    """Mean of ``head(features[first], features[second])`` over the pairs of every segment, chunk by chunk."""
    sums: torch.Tensor | None = None
    for start in range(0, first.shape[0], chunk_size):
        stop = start + chunk_size
        scores = _pair_scores(head, features[first[start:stop]], features[second[start:stop]])
        if sums is None:
            dtype = torch.promote_types(scores.dtype, torch.float32)
            sums = torch.zeros(num_segments, dtype=dtype, device=scores.device)
        sums.index_add_(0, segment[start:stop].to(scores.device), scores.to(sums.dtype))
    if sums is None:  # the callers give every segment at least one pair, so there is at least one chunk
        raise RuntimeError(f"internal error: no pairs to score for {num_segments} segments")
    check_finite(sums, "the scores of head(h1, h2)")  # one sync for all chunks: a NaN score, not a NaN result
    counts = torch.bincount(segment, minlength=num_segments).to(device=sums.device, dtype=sums.dtype)
    return sums / counts


# --------------------------------------------------------------------------------------------------- few-shot


class FewShotResult(NamedTuple):
    """Result of :func:`few_shot_accuracy`.

    Attributes:
        mean: Mean episode accuracy, in ``[0, 1]`` (papers report it ×100).
        ci95: Half-width of the 95 % confidence interval, ``1.96 · std / sqrt(num_episodes)``.
        accuracies: ``(num_episodes,)`` float64 tensor (CPU), the accuracy of every episode.

    Example:
        >>> import math
        >>> import torch
        >>> from dml_bias.metrics import FewShotResult
        >>> accuracies = torch.tensor([0.8, 0.9, 1.0], dtype=torch.float64)
        >>> result = FewShotResult(float(accuracies.mean()), 1.96 * float(accuracies.std()) / math.sqrt(3), accuracies)
        >>> round(result.mean, 3), round(result.ci95, 4)
        (0.9, 0.1132)
    """

    mean: float
    ci95: float
    accuracies: torch.Tensor


def _check_episode_sizes(n_way: Any, k_shot: Any, n_query: Any, num_episodes: Any) -> None:
    check_number(n_way, "n_way", low=1, integer=True)
    check_number(k_shot, "k_shot", low=1, integer=True)
    check_number(n_query, "n_query", low=1, integer=True)
    check_number(num_episodes, "num_episodes", low=1, integer=True)


def few_shot_episodes(
    labels: torch.Tensor,
    *,
    n_way: int = 5,
    k_shot: int = 5,
    n_query: int = 16,
    num_episodes: int = 600,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Draw :math:`N`-way :math:`K`-shot episodes: support and query sample indices per class.

    Each episode draws ``n_way`` distinct classes uniformly among the classes with at least
    ``k_shot + n_query`` samples (the others are never drawn), then for every class ``k_shot + n_query``
    distinct samples uniformly: the first ``k_shot`` are the supports, the rest the queries (as PAN's
    ``ValDataset`` and "A Closer Look at Few-shot Classification" do). Row ``w`` of both tensors is the
    episode's class at position ``w``, and classes come in random order.

    Arguments are checked when this function is called; the episodes are drawn lazily, one per iteration.

    Args:
        labels: ``(N,)`` integer tensor, the class of every sample.
        n_way: Classes per episode.
        k_shot: Supports per class.
        n_query: Queries per class.
        num_episodes: Number of episodes.
        generator: A CPU :class:`torch.Generator`; the same state gives the same episodes (``None``: torch's
            global generator).

    Returns:
        An iterator over ``num_episodes`` pairs ``(support, query)`` of int64 index tensors into ``labels``, of
        shapes ``(n_way, k_shot)`` and ``(n_way, n_query)``, on the device of ``labels``.

    Raises:
        ValueError: Fewer than ``n_way`` classes have ``k_shot + n_query`` samples, or a size is not positive.

    Example:
        >>> import torch
        >>> from dml_bias.metrics import few_shot_episodes
        >>> labels = torch.arange(4).repeat_interleave(5)  # 4 classes of 5 samples
        >>> episodes = few_shot_episodes(labels, n_way=3, k_shot=2, n_query=3, num_episodes=2,
        ...                              generator=torch.Generator().manual_seed(0))
        >>> support, query = next(episodes)
        >>> support.shape, query.shape
        (torch.Size([3, 2]), torch.Size([3, 3]))
        >>> bool((labels[support][:, :1] == labels[query]).all())  # row w: one class
        True
    """
    check_labels(labels, "labels")
    check_has_data(labels=labels)
    _check_episode_sizes(n_way, k_shot, n_query, num_episodes)
    check_generator(generator)
    per_class = k_shot + n_query
    values = labels.detach().to("cpu", torch.long)
    classes, counts = torch.unique(values, return_counts=True)
    eligible = classes[counts >= per_class]
    if eligible.numel() < n_way:
        raise ValueError(
            f"labels must have at least n_way={n_way} classes with k_shot + n_query = {per_class} samples, got "
            f"{eligible.numel()} such class(es) among {classes.numel()} (largest class: "
            f"{int(counts.max()) if counts.numel() else 0} samples)"
        )
    members = [torch.nonzero(values == c).flatten() for c in eligible.tolist()]
    return _episodes(members, n_way, k_shot, per_class, num_episodes, generator, labels.device)


def _episodes(
    members: list[torch.Tensor],
    n_way: int,
    k_shot: int,
    per_class: int,
    num_episodes: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for _ in range(num_episodes):
        chosen = torch.randperm(len(members), generator=generator)[:n_way].tolist()
        rows = []
        for c in chosen:
            pool = members[c]
            rows.append(pool[torch.randperm(pool.numel(), generator=generator)[:per_class]])
        episode = torch.stack(rows).to(device)
        yield episode[:, :k_shot], episode[:, k_shot:]


def few_shot_accuracy(
    head: Any,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_way: int = 5,
    k_shot: int = 5,
    n_query: int = 16,
    num_episodes: int = 600,
    generator: torch.Generator | None = None,
    ddof: int = 1,
) -> FewShotResult:
    r"""Few-shot classification accuracy of a pair head over random episodes (PAN's CUB protocol).

    In every episode of :func:`few_shot_episodes`, a query :math:`q` gets the class score
    :math:`\bar s_w(q) = \frac{1}{K} \sum_{k} s(q, x_{wk})`, the **mean** pair score against the ``k_shot``
    supports of class :math:`w`; the prediction is :math:`\arg\max_w \bar s_w(q)`, ties going to the lowest
    class position. An episode's accuracy is the fraction of its ``n_way · n_query`` queries classified
    correctly. The scores of an episode come from one ``head.score_matrix(queries, supports)`` call.

    Returns the mean episode accuracy and the half-width :math:`1.96\,\sigma / \sqrt{E}` of its 95 %
    confidence interval over :math:`E` episodes. PAN's code computes :math:`\sigma` with ``torch.std``
    (unbiased, ``ddof=1``, the default here); "A Closer Look at Few-shot Classification" uses ``np.std``
    (``ddof=0``). With 600 episodes the two differ by 0.08 %.

    Args:
        head: The pair head, anything with ``score_matrix(query, gallery) -> (Q, G)`` scores, larger meaning
            more similar (e.g. :class:`dml_bias.heads.ConditionalSimilarity`, in ``eval()`` mode).
        features: ``(N, D)`` floating-point features of the samples (e.g. standardised encoder features).
        labels: ``(N,)`` integer tensor, the class of every sample.
        n_way: Classes per episode.
        k_shot: Supports per class.
        n_query: Queries per class.
        num_episodes: Number of episodes :math:`E` (600 in PAN's test).
        generator: A CPU :class:`torch.Generator` for the episodes (``None``: torch's global generator).
        ddof: Delta degrees of freedom of the standard deviation (1 or 0); with one episode the
            interval is 0.

    Returns:
        A :class:`FewShotResult` ``(mean, ci95, accuracies)``.

    Raises:
        TypeError: ``head`` has no ``score_matrix`` method, or a tensor has the wrong dtype.
        ValueError: Bad shapes, devices or sizes (see :func:`few_shot_episodes`), NaN or infinite features, or
            ``score_matrix`` returns a tensor of the wrong shape.

    Example:
        >>> import torch
        >>> from dml_bias.heads import ConditionalSimilarity
        >>> from dml_bias.metrics import few_shot_accuracy
        >>> _ = torch.manual_seed(0)
        >>> labels = torch.arange(6).repeat_interleave(8)
        >>> features = torch.nn.functional.one_hot(labels, 6).float() + 0.1 * torch.randn(48, 6)
        >>> head = ConditionalSimilarity(6, 3).eval()
        >>> result = few_shot_accuracy(head, features, labels, n_way=3, k_shot=2, n_query=4, num_episodes=20,
        ...                            generator=torch.Generator().manual_seed(0))
        >>> result.accuracies.shape, 0.0 <= result.mean <= 1.0
        (torch.Size([20]), True)
    """
    method = getattr(head, "score_matrix", None)
    if not callable(method):
        raise TypeError(f"head must have a score_matrix(query, gallery) method, got {type(head).__name__}")
    check_embeddings(features, "features")
    check_has_data(features=features)
    check_finite(features, "features")
    check_labels(labels, "labels", length=features.shape[0], length_source="features.shape[0]")
    check_same_device(features=features, labels=labels)
    if ddof not in (0, 1) or isinstance(ddof, bool):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    episodes = few_shot_episodes(
        labels, n_way=n_way, k_shot=k_shot, n_query=n_query, num_episodes=num_episodes, generator=generator
    )
    truth = torch.arange(n_way, device=features.device).repeat_interleave(n_query)
    correct = []
    with torch.no_grad():
        for support, query in episodes:
            scores = method(features[query.reshape(-1)], features[support.reshape(-1)])
            expected = (n_way * n_query, n_way * k_shot)
            if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
                got = describe(scores) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise ValueError(
                    f"head.score_matrix(query, gallery) must return a tensor of shape {expected}, got {got}"
                )
            class_scores = scores.reshape(n_way * n_query, n_way, k_shot).to(torch.float64).mean(dim=2)
            correct.append((_lowest_argmax(class_scores) == truth.to(scores.device)).sum())
    accuracies = torch.stack(correct).to("cpu", torch.float64) / (n_way * n_query)
    mean = float(accuracies.mean())
    if num_episodes > ddof:
        std = float(accuracies.std(correction=ddof))
        ci95 = 1.96 * std / math.sqrt(num_episodes)
    else:
        ci95 = 0.0
    return FewShotResult(mean, ci95, accuracies)


# --------------------------------------------------------------------------------------------------- outfits


def fitb_scores(
    head: Any,
    features: torch.Tensor,
    questions: Sequence[Mapping[str, Any] | Sequence[Any]],
    *,
    chunk_size: int = 65536,
) -> torch.Tensor:
    r"""Fill-in-the-blank candidate scores: a candidate's mean pair score against the question's items.

    .. math::

        s_{qc} = \frac{1}{|O_q|} \sum_{o \in O_q} \mathrm{head}(h_{a_{qc}}, h_o)

    for question :math:`q` with partial outfit :math:`O_q` and candidates :math:`a_{q1}, \dots, a_{qC}` (PAN's
    FITB score). All pairs of all questions are gathered and scored in chunks of ``chunk_size`` pairs (one
    ``head`` call per chunk), the candidate being the first input of each pair. Feed the result to
    :func:`fitb_accuracy` with the correct candidate positions.

    Args:
        head: The pair head: ``head(h1, h2).score`` (or ``head(h1, h2)`` itself) is a ``(P,)`` tensor.
        features: ``(N, D)`` floating-point features of the items.
        questions: One entry per question, either a mapping with keys ``"question"`` (the outfit's item
            indices) and ``"answers"`` (the candidates' indices), as returned by
            :meth:`dml_bias.datasets.PolyvoreOutfits.fitb_questions` (other keys are ignored), or a pair
            ``(items, candidates)``. Indices are ints, 1-D integer tensors or NumPy arrays, in ``[0, N)``;
            every question needs at least one item and the same number :math:`C \ge 1` of candidates.
        chunk_size: Pairs per ``head`` call.

    Returns:
        ``(Q, C)`` scores, in the head's dtype (at least float32), on its output device.

    Raises:
        TypeError: A question is neither a mapping nor a pair, or holds non-integer indices.
        ValueError: No questions, an empty partial outfit, an index out of range, questions with different
            numbers of candidates, or NaN or infinite features or head scores.

    Example:
        >>> import torch
        >>> from dml_bias.heads import ConditionalSimilarity
        >>> from dml_bias.metrics import fitb_accuracy, fitb_scores
        >>> _ = torch.manual_seed(0)
        >>> features, head = torch.randn(8, 4), ConditionalSimilarity(4, 2).eval()
        >>> questions = [{"question": [0, 1], "answers": [2, 3, 4], "correct": 0}, ([5], [6, 7, 0])]
        >>> scores = fitb_scores(head, features, questions)
        >>> scores.shape
        torch.Size([2, 3])
        >>> expected = head(features[[3, 3]], features[[0, 1]]).score.mean()  # question 0, candidate 1
        >>> torch.allclose(scores[0, 1], expected)
        True
        >>> 0.0 <= fitb_accuracy(scores, torch.tensor([0, 0])) <= 1.0
        True
    """
    _check_scoring_call(head, features, chunk_size, questions, "questions")
    n = features.shape[0]
    items_rows: list[list[int]] = []
    candidate_rows: list[list[int]] = []
    for q, entry in enumerate(questions):
        if isinstance(entry, Mapping):
            if "question" not in entry or "answers" not in entry:
                raise ValueError(f'questions[{q}] must have the keys "question" and "answers", got {sorted(entry)}')
            raw_items, raw_candidates = entry["question"], entry["answers"]
        elif isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)) and len(entry) == 2:
            raw_items, raw_candidates = entry
        else:
            raise TypeError(
                f"questions[{q}] must be a mapping with 'question' and 'answers' or a pair (items, candidates), "
                f"got {type(entry).__name__}"
            )
        items = _index_list(raw_items, f"questions[{q}] items", n)
        candidates = _index_list(raw_candidates, f"questions[{q}] candidates", n)
        if not items:
            raise ValueError(f"questions[{q}] must have at least one outfit item to compare the candidates with")
        if not candidates or (candidate_rows and len(candidates) != len(candidate_rows[0])):
            want = len(candidate_rows[0]) if candidate_rows else "at least 1"
            raise ValueError(f"questions[{q}] must have {want} candidates (as questions[0]), got {len(candidates)}")
        items_rows.append(items)
        candidate_rows.append(candidates)
    num_q, num_c = len(candidate_rows), len(candidate_rows[0])
    device = features.device
    item_table, lengths = _padded(items_rows, device)  # (Q, L)
    candidate_table = torch.tensor(candidate_rows, dtype=torch.long, device=device)  # (Q, C)
    width = item_table.shape[1]
    valid = (torch.arange(width, device=device) < lengths[:, None])[:, None, :].expand(num_q, num_c, width)
    first = candidate_table[:, :, None].expand(num_q, num_c, width)[valid]
    second = item_table[:, None, :].expand(num_q, num_c, width)[valid]
    segment = torch.arange(num_q * num_c, device=device).view(num_q, num_c, 1).expand(num_q, num_c, width)[valid]
    with torch.no_grad():
        means = _segment_mean(head, features, first, second, segment, num_q * num_c, chunk_size)
    return means.view(num_q, num_c)


def compatibility_scores(
    head: Any,
    features: torch.Tensor,
    outfits: Sequence[Mapping[str, Any] | Sequence[int] | torch.Tensor],
    *,
    chunk_size: int = 65536,
) -> torch.Tensor:
    r"""Outfit compatibility scores: the mean pair score over all unordered item pairs of every outfit.

    .. math::

        s_o = \binom{n_o}{2}^{-1} \sum_{i < j} \mathrm{head}(h_{o_i}, h_{o_j})

    (PAN's compatibility score), the earlier item of the outfit being the first input of a pair. All pairs are
    gathered and scored in chunks of ``chunk_size`` (one ``head`` call per chunk). Feed the result to
    :func:`compatibility_auc` with the outfits' labels. An outfit with fewer than two items
    has no pair and raises :class:`ValueError` (a NaN score would only fail later, in the AUC).

    Args:
        head: The pair head: ``head(h1, h2).score`` (or ``head(h1, h2)`` itself) is a ``(P,)`` tensor.
        features: ``(N, D)`` floating-point features of the items.
        outfits: One entry per outfit: a mapping with an ``"items"`` key, as returned by
            :meth:`dml_bias.datasets.PolyvoreOutfits.compatibility_outfits` (other keys are ignored), or the item
            indices themselves (a sequence of ints, a 1-D integer tensor or a NumPy array), in ``[0, N)``.
        chunk_size: Pairs per ``head`` call.

    Returns:
        ``(O,)`` scores, in the head's dtype (at least float32), on its output device.

    Raises:
        TypeError: An outfit is not a mapping or a sequence of integer indices.
        ValueError: No outfits, an outfit with fewer than 2 items, an index out of range, or NaN or infinite
            features or head scores.

    Example:
        >>> import torch
        >>> from dml_bias.heads import ConditionalSimilarity
        >>> from dml_bias.metrics import compatibility_auc, compatibility_scores
        >>> _ = torch.manual_seed(0)
        >>> features, head = torch.randn(6, 4), ConditionalSimilarity(4, 2).eval()
        >>> outfits = [{"label": 1, "items": [0, 1, 2]}, {"label": 0, "items": [3, 4]}, [5, 0]]
        >>> scores = compatibility_scores(head, features, outfits)
        >>> expected = head(features[[0, 0, 1]], features[[1, 2, 2]]).score.mean()  # pairs of outfit 0
        >>> scores.shape, torch.allclose(scores[0], expected)
        (torch.Size([3]), True)
        >>> 0.0 <= compatibility_auc(scores, torch.tensor([1, 0, 0])) <= 1.0
        True
    """
    _check_scoring_call(head, features, chunk_size, outfits, "outfits")
    n = features.shape[0]
    rows = []
    for o, entry in enumerate(outfits):
        if isinstance(entry, Mapping):
            if "items" not in entry:
                raise ValueError(f'outfits[{o}] must have the key "items", got {sorted(entry)}')
            entry = entry["items"]
        items = _index_list(entry, f"outfits[{o}]", n)
        if len(items) < 2:
            raise ValueError(f"outfits[{o}] must have at least 2 items to form a pair, got {len(items)}")
        rows.append(items)
    device = features.device
    items_table, lengths = _padded(rows, device)  # (O, L)
    width = items_table.shape[1]
    i, j = torch.triu_indices(width, width, offset=1, device=device)  # all pairs i < j of the widest outfit
    valid = j[None, :] < lengths[:, None]  # (O, T): both positions inside the outfit (i < j)
    first = items_table[:, i][valid]
    second = items_table[:, j][valid]
    segment = torch.arange(len(rows), device=device)[:, None].expand_as(valid)[valid]
    with torch.no_grad():
        return _segment_mean(head, features, first, second, segment, len(rows), chunk_size)


# --------------------------------------------------------------------------------------------------- metrics


def fitb_accuracy(scores: torch.Tensor, answers: torch.Tensor) -> float:
    r"""Fill-in-the-blank accuracy: the fraction of questions whose highest-scoring candidate is the answer.

    .. math::

        \mathrm{FITB} = \frac{1}{Q} \sum_{q=1}^{Q} \big[\hat c_q = a_q\big], \qquad
        \hat c_q = \min\,\operatorname*{arg\,max}_{c} s_{qc}

    Ties go to the **first** (lowest-index) tied candidate, on every device.

    Args:
        scores: ``(Q, C)`` floating-point tensor, the score of each candidate of each question (larger is
            better), finite.
        answers: ``(Q,)`` integer tensor, the index in ``[0, C)`` of the correct candidate of each question
            (Polyvore's files list the correct one first: pass ``torch.zeros(Q, dtype=torch.long)``).

    Returns:
        The accuracy as a float in :math:`[0, 1]`.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.5, 0.5, 0.1, 0.0], [0.1, 0.2, 0.7, 0.7]])
        >>> fitb_accuracy(scores, torch.tensor([0, 1, 3]))  # ties pick candidates 0 and 2: only question 0 is right
        0.3333333333333333
    """
    check_tensor(scores, "scores")
    check_dtype(scores, "scores", "floating")
    sizes = check_shape(scores, "scores", ("Q", "C"))
    if sizes["Q"] == 0 or sizes["C"] == 0:
        raise ValueError(f"scores must hold at least one question and one candidate, got {describe(scores)}")
    check_labels(answers, "answers", length=sizes["Q"], length_source="scores.shape[0]", num_classes=sizes["C"])
    if answers.device != scores.device:
        raise ValueError(f"answers must be on the same device as scores ({scores.device}), got device {answers.device}")
    check_finite(scores, "scores")
    prediction = _lowest_argmax(scores)  # ties: the first candidate, on every backend
    return float((prediction == answers).to(torch.float64).mean())


def compatibility_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    r"""Area under the ROC curve of outfit compatibility scores, ties counted one half.

    The Mann–Whitney form, computed from average ranks in :math:`O(n \log n)`:

    .. math::

        \mathrm{AUC} = \frac{1}{n_+ n_-} \sum_{i: y_i = 1} \sum_{j: y_j = 0}
            \Big([s_i > s_j] + \tfrac{1}{2}[s_i = s_j]\Big)
        = \frac{\sum_{i: y_i = 1} \operatorname{rank}(s_i) - n_+(n_+ + 1)/2}{n_+ n_-}

    with 1-based ranks in increasing score order and tied scores given their average rank. This equals
    scikit-learn's ``roc_auc_score(labels, scores)`` (up to floating-point rounding).

    Args:
        scores: ``(N,)`` floating-point tensor of outfit scores (larger means more compatible), finite.
        labels: ``(N,)`` boolean or integer tensor with values in ``{0, 1}`` (1 = compatible).

    Returns:
        The AUC as a float in :math:`[0, 1]`.

    Raises:
        ValueError: If ``labels`` holds only one class (the AUC is undefined) or values other than 0 and 1.

    Example:
        >>> import torch
        >>> compatibility_auc(torch.tensor([0.9, 0.4, 0.4, 0.1]), torch.tensor([1, 1, 0, 0]))
        0.875
    """
    check_tensor(scores, "scores")
    check_dtype(scores, "scores", "floating")
    sizes = check_shape(scores, "scores", ("N",))
    check_tensor(labels, "labels")
    if labels.dtype == torch.bool:
        labels = labels.long()
    check_labels(labels, "labels", length=sizes["N"], length_source="scores.shape[0]", num_classes=2)
    if labels.device != scores.device:
        raise ValueError(f"labels must be on the same device as scores ({scores.device}), got device {labels.device}")
    check_finite(scores, "scores")
    num_pos = int(labels.sum())
    num_neg = sizes["N"] - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"labels must contain both classes 0 and 1 for the AUC to be defined, got {num_pos} positive(s) "
            f"and {num_neg} negative(s)"
        )
    values = scores.to(torch.float64)
    sorted_values, order = torch.sort(values)
    _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    # Average 1-based rank of each group of tied scores: start + (count + 1) / 2.
    ends = torch.cumsum(counts, 0).to(torch.float64)
    group_rank = ends - (counts.to(torch.float64) - 1.0) / 2.0
    ranks_sorted = torch.repeat_interleave(group_rank, counts)
    positive_rank_sum = float((ranks_sorted * labels[order].to(torch.float64)).sum())
    return (positive_rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)
