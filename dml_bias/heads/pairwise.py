r"""Training pairs for a pair head and the encoder + pair-head model of PAN :cite:`mishra2021pan`.

A pair head such as :class:`dml_bias.heads.ConditionalSimilarity` scores *pairs* of embeddings, so it is
trained on sampled pairs:

* :func:`~dml_bias.heads.sample_pairs`: balanced same-class / different-class index pairs for training a pair
  head;
* :class:`~dml_bias.heads.PairwiseSimilarityModel`: an embedding network (``encoder``) followed by a pair head.

PAN's evaluation protocols (few-shot episodes, fill-in-the-blank, outfit compatibility) live with the metrics
they feed, in :mod:`dml_bias.metrics.protocols`. Their old names here (``few_shot_episodes``,
``few_shot_accuracy``, ``FewShotResult``, ``fitb_scores``, ``compatibility_scores``) still work, with a
:class:`DeprecationWarning`, until release 0.2.0.

``examples/pan_attributes.py`` compares PAN with single metric embeddings on the built-in attribute-compatibility
task (:class:`dml_bias.datasets.AttributeCompatibility`), and runs PAN's CUB protocol end to end (encoder,
standardised features, heads trained on :func:`~dml_bias.heads.sample_pairs`, 5-way 5-shot accuracy) on
:class:`dml_bias.datasets.SyntheticBackgrounds`, whose classes are attribute combinations, or on CUB.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from dml_bias._checks import check_generator, check_has_data, check_labels, check_number, describe
from dml_bias._compat import moved_name

__all__ = ["PairIndices", "PairwiseSimilarityModel", "sample_pairs"]

#: Public names that moved to :mod:`dml_bias.metrics.protocols`, with their new module.
MOVED: dict[str, str] = {
    name: "dml_bias.metrics"
    for name in ("FewShotResult", "compatibility_scores", "few_shot_accuracy", "few_shot_episodes", "fitb_scores")
}


def __getattr__(name: str) -> Any:
    return moved_name(__name__, name, MOVED)


# --------------------------------------------------------------------------------------------------- helpers


def _uniform_below(high: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One uniform integer in ``[0, high_i)`` for every entry of the (CPU, int64, positive) tensor ``high``."""
    u = torch.rand(high.shape, generator=generator, dtype=torch.float64)
    return torch.minimum((u * high.to(torch.float64)).long(), high - 1)


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
    check_generator(generator)
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
