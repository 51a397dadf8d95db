r"""Training pairs, an encoder + pair-head model and the evaluation protocols of PAN :cite:`mishra2021pan`.

A pair head such as :class:`dml_bias.heads.ConditionalSimilarity` scores *pairs* of embeddings, so it is
trained on sampled pairs and evaluated by protocols built from pair scores:

* :func:`~dml_bias.heads.sample_pairs`: balanced same-class / different-class index pairs for training a pair
  head;
* :class:`~dml_bias.heads.PairwiseSimilarityModel`: an embedding network (``encoder``) followed by a pair head;
* :func:`~dml_bias.heads.few_shot_episodes` and :func:`~dml_bias.heads.few_shot_accuracy`: :math:`N`-way
  :math:`K`-shot classification, a query's class score being its **mean** pair score against the class's
  supports (PAN's CUB protocol);
* :func:`~dml_bias.heads.fitb_scores` and :func:`~dml_bias.heads.compatibility_scores`: Polyvore Outfits
  fill-in-the-blank and outfit compatibility, scored by mean pair scores; they feed
  :func:`dml_bias.metrics.fitb_accuracy` and :func:`dml_bias.metrics.compatibility_auc`.

Every evaluation function takes precomputed features ``(N, D)`` and runs without gradient tracking; call
``head.eval()`` first if the head has dropout. A head's pair score is read from ``head(h1, h2).score`` (a
plain ``(P,)`` tensor returned by ``head(h1, h2)`` is accepted too).

``examples/pan_attributes.py`` compares PAN with single metric embeddings on the built-in attribute-compatibility
task (:class:`dml_bias.datasets.AttributeCompatibility`), and runs PAN's CUB protocol end to end (encoder,
standardised features, heads trained on :func:`~dml_bias.heads.sample_pairs`, 5-way 5-shot accuracy) on
:class:`dml_bias.datasets.SyntheticBackgrounds`, whose classes are attribute combinations, or on CUB.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from dml_bias._checks import (
    check_embeddings,
    check_finite,
    check_labels,
    check_number,
    check_same_device,
    describe,
)
from dml_bias.heads._inputs import check_has_data

__all__ = [
    "FewShotResult",
    "PairIndices",
    "PairwiseSimilarityModel",
    "compatibility_scores",
    "few_shot_accuracy",
    "few_shot_episodes",
    "fitb_scores",
    "sample_pairs",
]


# --------------------------------------------------------------------------------------------------- helpers


def _check_generator(generator: Any, name: str = "generator") -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU torch.Generator (indices are drawn on the CPU), got {generator.device}")


def _uniform_below(high: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One uniform integer in ``[0, high_i)`` for every entry of the (CPU, int64, positive) tensor ``high``."""
    u = torch.rand(high.shape, generator=generator, dtype=torch.float64)
    return torch.minimum((u * high.to(torch.float64)).long(), high - 1)


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
    """A sequence of item indices (ints, a 1-D integer tensor or array) as a list of ints in ``[0, num_items)``."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value) if value.dtype.kind in "iu" else value.tolist()
    if isinstance(value, torch.Tensor):
        if value.ndim != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got {describe(value)}")
        items = [int(v) for v in value.tolist()]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = []
        for v in value:
            try:
                if isinstance(v, bool):
                    raise TypeError
                items.append(operator.index(v))  # Python and NumPy integers, 0-d integer tensors
            except TypeError:
                raise TypeError(f"{name} must hold integer sample indices, got an element {v!r}") from None
    else:
        raise TypeError(f"{name} must be a sequence of ints or a 1-D integer tensor, got {type(value).__name__}")
    for v in items:
        if not 0 <= v < num_items:
            raise ValueError(f"{name} must hold sample indices in [0, {num_items - 1}] (features.shape[0]), got {v}")
    return items


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


# --------------------------------------------------------------------------------------------------- pairs


class PairIndices(NamedTuple):
    """Index pairs returned by :func:`sample_pairs`.

    Attributes:
        first: ``(P,)`` int64 index of the first sample of every pair.
        second: ``(P,)`` int64 index of the second sample.
        target: ``(P,)`` float32, 1 for a same-class pair, 0 for a different-class pair.

    Example:
        >>> import torch
        >>> from dml_bias.heads import sample_pairs
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> first, second, target = sample_pairs(labels, 6, generator=torch.Generator().manual_seed(0))
        >>> first.shape, first.dtype, target.dtype
        (torch.Size([6]), torch.int64, torch.float32)
        >>> (labels[first] == labels[second]).float().equal(target)
        True
    """

    first: torch.Tensor
    second: torch.Tensor
    target: torch.Tensor


def sample_pairs(
    labels: torch.Tensor,
    num_pairs: int,
    *,
    positive_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> PairIndices:
    r"""Draw balanced same-class (positive) and different-class (negative) index pairs for a pair head.

    ``round(positive_fraction * num_pairs)`` pairs are positive and the rest negative. Positives are drawn
    uniformly from the ordered pairs :math:`(i, j)`, :math:`i \ne j`, of samples of one class (so a class with
    :math:`n_c` samples is drawn with probability :math:`\propto n_c (n_c - 1)`; never a self pair; classes with
    one sample never appear in a positive); negatives uniformly from the ordered pairs of samples of two
    different classes. Pairs are drawn **with replacement** (a pair may repeat) and returned in random order.

    PAN's CUB code (``CUB/extract_features.py``) instead enumerates every unordered same-class pair of the
    base split, keeps a random half of them (the other half are its graph encoder's edges) and draws **one**
    negative per kept positive: one end of the positive, chosen at random, and a sample of another class
    drawn uniformly. That gives a fixed set of distinct positives whose negatives' first ends follow the
    positives' class frequencies; here both kinds are i.i.d. draws of a chosen number of pairs.

    Args:
        labels: ``(N,)`` integer tensor, the class of every sample (any integer values).
        num_pairs: Number of pairs :math:`P \ge 1`.
        positive_fraction: Fraction of positive pairs, in ``[0, 1]``.
        generator: A CPU :class:`torch.Generator`; the same generator state gives the same pairs
            (``None``: torch's global generator).

    Returns:
        A :class:`PairIndices` ``(first, second, target)``: int64 index tensors and a float32 target, on the
        device of ``labels``. Gather a pair's attribute rows as ``attributes[pairs.first]`` and
        ``attributes[pairs.second]``.

    Raises:
        TypeError: ``labels`` is not an integer tensor, or ``generator`` is not a :class:`torch.Generator`.
        ValueError: Positives are requested but no class has two samples, negatives are requested but
            ``labels`` holds only one class, or an argument is out of range.
        MemoryError: ``num_pairs`` pairs (about 100 bytes each while drawing) do not fit in memory.

    Example:
        >>> import torch
        >>> from dml_bias.heads import sample_pairs
        >>> labels = torch.tensor([0, 0, 0, 1, 1, 2])
        >>> attributes = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [1, 1]])  # one row per sample
        >>> pairs = sample_pairs(labels, 8, generator=torch.Generator().manual_seed(0))
        >>> pairs.target.tolist()[:4], int(pairs.target.sum())
        ([1.0, 0.0, 1.0, 1.0], 4)
        >>> bool(((labels[pairs.first] == labels[pairs.second]) == pairs.target.bool()).all())
        True
        >>> a1, a2 = attributes[pairs.first], attributes[pairs.second]  # (8, 2) each, for PANLoss(a1=, a2=)
        >>> a1.shape
        torch.Size([8, 2])
    """
    check_labels(labels, "labels")
    check_has_data(labels=labels)
    check_number(num_pairs, "num_pairs", low=1, integer=True)
    check_number(positive_fraction, "positive_fraction", low=0.0, high=1.0)
    _check_generator(generator)
    try:
        return _sample_pairs(labels, num_pairs, positive_fraction, generator)
    except RuntimeError as err:  # torch reports a failed allocation as a RuntimeError
        if "allocate" not in str(err) and not isinstance(err, torch.OutOfMemoryError):
            raise
        raise MemoryError(
            f"num_pairs={num_pairs} pairs do not fit in memory (about {num_pairs * 100 / 2**30:.3g} GiB while "
            "drawing them); draw them in smaller batches"
        ) from err


def _sample_pairs(
    labels: torch.Tensor, num_pairs: int, positive_fraction: float, generator: torch.Generator | None
) -> PairIndices:
    """:func:`sample_pairs` after its argument checks."""
    num_positive = round(positive_fraction * num_pairs)
    num_negative = num_pairs - num_positive
    device = labels.device
    values = labels.detach().to("cpu", torch.long)
    n = values.numel()
    if n == 0:
        raise ValueError(f"labels must hold at least one sample, got {describe(labels)}")
    # Samples sorted by class: class c occupies the positions [start[c], start[c] + count[c]) of `order`.
    _, class_of, counts = torch.unique(values, return_inverse=True, return_counts=True)
    order = torch.argsort(class_of, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty(n, dtype=torch.long)
    position[order] = torch.arange(n)
    size_of = counts[class_of]  # class size of every sample

    firsts, seconds = [], []
    if num_positive > 0:
        weight = (size_of - 1).to(torch.float64)  # ordered same-class partners of every sample
        if not bool((weight > 0).any()):
            raise ValueError(
                f"labels must contain a class with at least 2 samples to draw {num_positive} positive pair(s) "
                f"(positive_fraction={positive_fraction}), got {counts.numel()} classes of 1 sample each"
            )
        i = torch.multinomial(weight, num_positive, replacement=True, generator=generator)
        c = class_of[i]
        # partner: uniform over the class's other samples, skipping i's own position
        r = _uniform_below(counts[c] - 1, generator)
        offset = position[i] - starts[c]
        j = order[starts[c] + r + (r >= offset).long()]
        firsts.append(i)
        seconds.append(j)
    if num_negative > 0:
        weight = (n - size_of).to(torch.float64)  # ordered different-class partners of every sample
        if counts.numel() < 2:
            raise ValueError(
                f"labels must contain at least 2 classes to draw {num_negative} negative pair(s) "
                f"(positive_fraction={positive_fraction}), got the single class {int(values[0])}"
            )
        i = torch.multinomial(weight, num_negative, replacement=True, generator=generator)
        c = class_of[i]
        # partner: uniform over the positions outside [start[c], start[c] + count[c])
        r = _uniform_below(n - counts[c], generator)
        j = order[r + counts[c] * (r >= starts[c]).long()]
        firsts.append(i)
        seconds.append(j)
    target = torch.cat([torch.ones(num_positive), torch.zeros(num_negative)])
    shuffle = torch.randperm(num_pairs, generator=generator)
    first = torch.cat(firsts)[shuffle]
    second = torch.cat(seconds)[shuffle]
    return PairIndices(first.to(device), second.to(device), target[shuffle].to(device))


# --------------------------------------------------------------------------------------------------- model


class PairwiseSimilarityModel(nn.Module):
    r"""An embedding network followed by a pair head: ``head(encoder(x1), encoder(x2))``.

    ``encoder`` is any :class:`torch.nn.Module` that maps a batch of inputs to ``(N, D)`` embeddings, with
    ``D`` the head's ``in_features``:

    * an image backbone, e.g. a torchvision ResNet with its classifier removed
      (``m = torchvision.models.resnet18(weights=None); m.fc = torch.nn.Identity()``, ``D = 512``; load local
      weights with ``m.load_state_dict(torch.load(path))``, nothing is downloaded);
    * a ``timm`` model created with ``num_classes=0`` (pooled features);
    * a frozen feature table, ``torch.nn.Embedding.from_pretrained(features, freeze=True)``, whose inputs are
      ``(N,)`` index tensors: the way PAN trains its head on precomputed, standardised features.

    The two inputs of :meth:`forward` are embedded by two separate ``encoder`` calls (so batch-norm statistics
    in training mode are those of each input batch).

    Args:
        encoder: The embedding network.
        head: The pair head, e.g. :class:`dml_bias.heads.ConditionalSimilarity`: ``head(h1, h2)`` scores
            ``(N, D)`` embedding pairs; :meth:`score_matrix` also needs ``head.score_matrix(query, gallery)``.
            If the head has an ``in_features`` attribute, embeddings are checked against it.

    Raises:
        TypeError: ``encoder`` or ``head`` is not a :class:`torch.nn.Module`.

    Example:
        >>> import torch
        >>> from dml_bias.heads import ConditionalSimilarity, PairwiseSimilarityModel
        >>> _ = torch.manual_seed(0)
        >>> features = torch.randn(10, 8)  # precomputed features of 10 samples
        >>> table = torch.nn.Embedding.from_pretrained(features, freeze=True)
        >>> model = PairwiseSimilarityModel(table, ConditionalSimilarity(8, 4))
        >>> out = model(torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]))  # pairs (0, 3), (1, 4), (2, 5)
        >>> out.score.shape, out.condition_scores.shape
        (torch.Size([3]), torch.Size([3, 4]))
        >>> model.score_matrix(torch.tensor([0, 1]), torch.arange(10)).shape
        torch.Size([2, 10])
    """

    def __init__(self, encoder: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        if not isinstance(head, nn.Module):
            raise TypeError(f"head must be a torch.nn.Module, got {type(head).__name__}")
        self.encoder = encoder
        self.head = head

    def embed(self, x: Any) -> torch.Tensor:
        """Embed a batch of inputs: ``encoder(x)``, checked to be ``(N, D)`` floating point.

        Args:
            x: A batch of encoder inputs (images, or indices for a feature table).

        Returns:
            ``(N, D)`` embeddings.

        Raises:
            ValueError: The encoder's output is not a 2-D tensor with ``D = head.in_features``.
        """
        h = self.encoder(x)
        dim = getattr(self.head, "in_features", None)
        if not isinstance(h, torch.Tensor) or h.ndim != 2:
            got = describe(h) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(
                f"encoder(x) must return (N, D) embeddings (D = head.in_features = {dim}); got {got}. Remove the "
                "classifier (e.g. fc = torch.nn.Identity()) or flatten the pooled features"
            )
        if not h.is_floating_point():
            raise TypeError(f"encoder(x) must return floating-point embeddings, got {describe(h)}")
        if isinstance(dim, int) and h.shape[1] != dim:
            raise ValueError(
                f"encoder(x) must return embeddings of size D = head.in_features = {dim} in dimension 1, "
                f"got {describe(h)}"
            )
        return h

    def forward(self, x1: Any, x2: Any) -> Any:
        """Score the pairs ``(x1[i], x2[i])``: ``head(embed(x1), embed(x2))``.

        Args:
            x1: First inputs of the pairs (a batch of ``N``).
            x2: Second inputs (a batch of ``N``).

        Returns:
            What the head returns (for :class:`dml_bias.heads.ConditionalSimilarity` its output tuple with
            ``score`` ``(N,)``).
        """
        return self.head(self.embed(x1), self.embed(x2))

    def score_matrix(self, query: Any, gallery: Any, **kwargs: Any) -> torch.Tensor:
        """Pair scores of every query against every gallery input: ``head.score_matrix(embed(q), embed(g))``.

        Args:
            query: ``Q`` encoder inputs.
            gallery: ``G`` encoder inputs.
            **kwargs: Passed to ``head.score_matrix`` (e.g. ``chunk_size``).

        Returns:
            ``(Q, G)`` scores.

        Raises:
            TypeError: The head has no ``score_matrix`` method.
        """
        method = getattr(self.head, "score_matrix", None)
        if not callable(method):
            raise TypeError(f"head must have a score_matrix(query, gallery) method, got {type(self.head).__name__}")
        result: torch.Tensor = method(self.embed(query), self.embed(gallery), **kwargs)
        return result


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
        >>> from dml_bias.heads import FewShotResult
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
        >>> from dml_bias.heads import few_shot_episodes
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
    _check_generator(generator)
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
        >>> from dml_bias.heads import ConditionalSimilarity, few_shot_accuracy
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


def _check_chunk_size(chunk_size: Any) -> None:
    check_number(chunk_size, "chunk_size", low=1, integer=True)


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
    :func:`dml_bias.metrics.fitb_accuracy` with the correct candidate positions.

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
        >>> from dml_bias.heads import ConditionalSimilarity, fitb_scores
        >>> from dml_bias.metrics import fitb_accuracy
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
    _check_pair_head(head)
    check_embeddings(features, "features")
    check_has_data(features=features)
    check_finite(features, "features")
    _check_chunk_size(chunk_size)
    if isinstance(questions, (str, bytes, Mapping)) or not isinstance(questions, Sequence):
        raise TypeError(f"questions must be a sequence of questions, got {type(questions).__name__}")
    if len(questions) == 0:
        raise ValueError("questions must hold at least one question, got an empty sequence")
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
    :func:`dml_bias.metrics.compatibility_auc` with the outfits' labels. An outfit with fewer than two items
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
        >>> from dml_bias.heads import ConditionalSimilarity, compatibility_scores
        >>> from dml_bias.metrics import compatibility_auc
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
    _check_pair_head(head)
    check_embeddings(features, "features")
    check_has_data(features=features)
    check_finite(features, "features")
    _check_chunk_size(chunk_size)
    if isinstance(outfits, (str, bytes, Mapping)) or not isinstance(outfits, Sequence):
        raise TypeError(f"outfits must be a sequence of outfits, got {type(outfits).__name__}")
    if len(outfits) == 0:
        raise ValueError("outfits must hold at least one outfit, got an empty sequence")
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
