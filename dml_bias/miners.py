r"""Miners: pick informative pairs or triplets from a batch for the losses of :mod:`dml_bias.losses`.

A miner is called like pytorch-metric-learning's, ``miner(embeddings, labels, ref_emb=None, ref_labels=None)``,
runs under ``torch.no_grad()`` and returns ``long`` index tensors on the embeddings' device: pairs
``(a1, p, a2, n)`` (anchors index ``embeddings``; ``p``/``n`` index ``ref_emb``, or ``embeddings`` when it is
``None``) or triplets ``(a, p, n)``. Pass the result as ``indices_tuple`` to any loss.

Every miner takes ``distance=`` as a metric name or a :mod:`dml_bias.distances` object and, like
pytorch-metric-learning's, records the size of its last output in ``num_pos_pairs`` / ``num_neg_pairs`` (pair
miners) or ``num_triplets`` (triplet miners); the other counters are 0.

Example:
    >>> import torch
    >>> from dml_bias.miners import BatchHardMiner
    >>> a, p, n = BatchHardMiner()(torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2]))
    >>> a.shape == p.shape == n.shape
    True
"""

from __future__ import annotations

import torch
from torch import nn

from dml_bias._checks import check_choice, check_number
from dml_bias._compat import no_autocast
from dml_bias.distances import BaseDistance
from dml_bias.losses._common import (
    check_metric,
    check_nonnegative,
    distance_is_similarity,
    label_masks,
    prepare_batch,
    resolve_distance,
    similarity_sign,
)

__all__ = ["BaseMiner", "BatchHardMiner", "MultiSimilarityMiner", "PairMarginMiner", "TripletMarginMiner"]

#: ``type_of_triplets`` of :class:`TripletMarginMiner`.
TRIPLET_TYPES: tuple[str, ...] = ("all", "hard", "semihard", "easy")


def _mask_inputs(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    distance: str | BaseDistance,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate, then return the similarity matrix (larger = closer) and the positive/negative masks."""
    distance = resolve_distance(distance)
    batch = prepare_batch(embeddings, labels, None, ref_emb, ref_labels, distance=distance, labels_required=True)
    assert batch.labels is not None
    assert batch.ref_labels is not None
    if batch.y is not None and ref_labels is None:
        raise ValueError("ref_labels must be given with ref_emb (a 1-D integer tensor of length ref_emb.shape[0])")
    with no_autocast(embeddings.device):
        sim = similarity_sign(distance) * batch.matrix(distance)
    pos, neg = label_masks(batch.labels, batch.ref_labels, batch.exclude_self)
    return sim, pos, neg


class BaseMiner(nn.Module):
    """Base of the miners: runs ``mine`` under ``torch.no_grad()`` and records PML's counters.

    Attributes:
        num_pos_pairs: Positive pairs in the last output (pair miners; else 0).
        num_neg_pairs: Negative pairs in the last output (pair miners; else 0).
        num_triplets: Triplets in the last output (triplet miners; else 0).

    Example:
        >>> import torch
        >>> from dml_bias.miners import PairMarginMiner
        >>> miner = PairMarginMiner(pos_margin=0.0, neg_margin=2.0)
        >>> _ = miner(torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2]))
        >>> miner.num_pos_pairs, miner.num_neg_pairs, miner.num_triplets
        (6, 24, 0)
    """

    def __init__(self) -> None:
        super().__init__()
        self.num_pos_pairs = 0
        self.num_neg_pairs = 0
        self.num_triplets = 0

    def mine(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        """Return the mined index tuple (called under ``torch.no_grad()``)."""
        raise NotImplementedError(f"{type(self).__name__}.mine must be implemented by a subclass of BaseMiner")

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Mine pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``; see the class docstring."""
        self.num_pos_pairs = self.num_neg_pairs = self.num_triplets = 0
        with torch.no_grad():
            out = self.mine(embeddings, labels, ref_emb, ref_labels)
        if len(out) == 3:
            self.num_triplets = len(out[0])
        else:
            self.num_pos_pairs, self.num_neg_pairs = len(out[0]), len(out[2])
        return out


class MultiSimilarityMiner(BaseMiner):
    r"""The pair mining of the Multi-Similarity paper :cite:`wang2019multi` (pytorch-metric-learning's rule).

    For anchor :math:`i` with positives :math:`P_i` and negatives :math:`N_i` (self excluded), a pair is kept if

    .. math::

        \text{positive } (i, j):\ s_{ij} - \epsilon < \max_{k \in N_i} s_{ik}, \qquad
        \text{negative } (i, k):\ s_{ik} + \epsilon > \min_{j \in P_i} s_{ij}.

    An anchor without positives or without negatives keeps nothing; a batch with no positive or no negative pair
    gives four empty tensors. With a distance (``"euclidean"``, ``"squared_euclidean"``) the rule is applied to
    :math:`s = -d`, which is PML's rule for distances.

    Args:
        epsilon: :math:`\epsilon \ge 0`.
        distance: ``"cosine"`` (default), ``"dot"``, ``"euclidean"``, ``"squared_euclidean"`` or a
            :mod:`dml_bias.distances` object.

    Returns (from ``forward``):
        ``(a1, p, a2, n)``: 1-D ``long`` tensors on the embeddings' device; ``(a1[k], p[k])`` are the kept
        positive pairs and ``(a2[k], n[k])`` the kept negative pairs, in row-major order.

    Example:
        >>> import torch
        >>> from dml_bias.miners import MultiSimilarityMiner
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
        >>> a1, p, a2, n = MultiSimilarityMiner(epsilon=0.1)(emb, torch.tensor([0, 0, 1, 1]))
        >>> a1.tolist(), p.tolist(), a2.tolist(), n.tolist()
        ([0, 1, 2, 3], [1, 0, 3, 2], [0, 0, 1, 1, 2, 2, 3, 3], [2, 3, 2, 3, 0, 1, 0, 1])
    """

    def __init__(self, epsilon: float = 0.1, *, distance: str | BaseDistance = "cosine") -> None:
        super().__init__()
        check_nonnegative(epsilon, "epsilon")
        check_metric(distance)
        self.epsilon = float(epsilon)
        self.distance = distance

    def mine(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mine pairs; see the class docstring."""
        sim, pos, neg = _mask_inputs(embeddings, labels, ref_emb, ref_labels, self.distance)
        fmax, fmin = torch.finfo(sim.dtype).max, torch.finfo(sim.dtype).min
        hardest_neg = sim.masked_fill(~neg, fmin).amax(dim=1, keepdim=True)
        hardest_pos = sim.masked_fill(~pos, fmax).amin(dim=1, keepdim=True)
        keep_pos = pos & (sim - self.epsilon < hardest_neg)
        keep_neg = neg & (sim + self.epsilon > hardest_pos)
        # PML returns nothing at all when the batch has no positive pair or no negative pair.
        any_pairs = pos.any() & neg.any()
        keep_pos &= any_pairs
        keep_neg &= any_pairs
        a1, p = torch.nonzero(keep_pos, as_tuple=True)
        a2, n = torch.nonzero(keep_neg, as_tuple=True)
        return a1, p, a2, n

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return f"epsilon={self.epsilon}, distance={self.distance!r}"


class BatchHardMiner(BaseMiner):
    r"""Batch-hard triplet mining :cite:`hermans2017defense`: per anchor, its farthest positive and closest negative.

    .. math::

        p(i) = \arg\min_{j \in P_i} s_{ij}, \qquad n(i) = \arg\max_{k \in N_i} s_{ik}

    (with a distance: the largest / smallest distance). Anchors without a positive or a negative are skipped,
    so the triplets ``(a, p(a), n(a))`` are at most one per anchor. pytorch-metric-learning's ``BatchHardMiner``
    chooses the same triplets; ties are broken towards the lowest index.

    Args:
        distance: ``"euclidean"`` (default, on L2-normalised embeddings, as PML), ``"cosine"``, ``"dot"`` or
            ``"squared_euclidean"``, or a :mod:`dml_bias.distances` object.

    Returns (from ``forward``):
        ``(a, p, n)``: 1-D ``long`` tensors on the embeddings' device.

    Example:
        >>> import torch
        >>> from dml_bias.miners import BatchHardMiner
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
        >>> a, p, n = BatchHardMiner()(emb, torch.tensor([0, 0, 1, 1]))
        >>> a.tolist(), p.tolist(), n.tolist()
        ([0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1])
    """

    def __init__(self, *, distance: str | BaseDistance = "euclidean") -> None:
        super().__init__()
        check_metric(distance)
        self.distance = distance

    def mine(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mine triplets; see the class docstring."""
        sim, pos, neg = _mask_inputs(embeddings, labels, ref_emb, ref_labels, self.distance)
        fmax, fmin = torch.finfo(sim.dtype).max, torch.finfo(sim.dtype).min
        p = sim.masked_fill(~pos, fmax).argmin(dim=1)
        n = sim.masked_fill(~neg, fmin).argmax(dim=1)
        keep = pos.any(dim=1) & neg.any(dim=1)
        a = torch.nonzero(keep, as_tuple=True)[0]
        return a, p[a], n[a]

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return f"distance={self.distance!r}"


def triplets_in_range(
    dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, low: float | None, high: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Triplets ``(a, p, n)`` whose :math:`d_{an} - d_{ap}` lies in ``(low, high]`` (``None``: unbounded).

    ``dist`` is a distance matrix (larger = farther); ``pos``/``neg`` the masks. Triplets come in lexicographic
    ``(a, p, n)`` order, as pytorch-metric-learning lists them. Memory is (positive pairs × columns), never
    :math:`N M^2`.
    """
    a, p = torch.nonzero(pos, as_tuple=True)
    gap = dist[a] - dist[a, p].unsqueeze(1)  # (K, M): d_an - d_ap for every positive pair and column
    keep = neg[a]
    if low is not None:
        keep = keep & (gap > low)
    if high is not None:
        keep = keep & (gap <= high)
    k, n = torch.nonzero(keep, as_tuple=True)
    return a[k], p[k], n


class TripletMarginMiner(BaseMiner):
    r"""Triplets that violate (or, ``"easy"``, satisfy) the margin — pytorch-metric-learning's rule.

    With the triplet margin :math:`t = d_{an} - d_{ap}` (for a similarity :math:`t = s_{ap} - s_{an}`), over all
    triplets :math:`(a, p, n)` of the batch (:math:`y_p = y_a`, :math:`p \ne a`, :math:`y_n \ne y_a`):

    * ``"all"``: :math:`t \le m`; ``"hard"``: :math:`t \le 0` (the negative is at least as close as the
      positive); ``"semihard"``: :math:`0 < t \le m`; ``"easy"``: :math:`t > m`.

    Triplets are returned in lexicographic ``(a, p, n)`` order, exactly PML's output. The work is done per
    positive pair against all columns (memory :math:`O(|P| M)`), not on an :math:`N M^2` mask.

    Args:
        margin: :math:`m` (PML's default 0.2).
        type_of_triplets: ``"all"``, ``"hard"``, ``"semihard"`` or ``"easy"``.
        distance: ``"euclidean"`` (default, as PML's ``LpDistance()``), another metric name or a
            :mod:`dml_bias.distances` object.

    Returns (from ``forward``):
        ``(a, p, n)``: 1-D ``long`` tensors on the embeddings' device; ``num_triplets`` is their length.

    Example:
        >>> import torch
        >>> from dml_bias.distances import CosineSimilarity
        >>> from dml_bias.miners import TripletMarginMiner
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
        >>> miner = TripletMarginMiner(margin=0.2, type_of_triplets="semihard", distance=CosineSimilarity())
        >>> a, p, n = miner(emb, torch.tensor([0, 0, 1, 1]))
        >>> a.tolist(), p.tolist(), n.tolist(), miner.num_triplets
        ([2, 3], [3, 2], [1, 0], 2)
    """

    def __init__(
        self, margin: float = 0.2, type_of_triplets: str = "all", *, distance: str | BaseDistance = "euclidean"
    ) -> None:
        super().__init__()
        check_number(margin, "margin")
        check_choice(type_of_triplets, "type_of_triplets", TRIPLET_TYPES)
        check_metric(distance)
        self.margin = float(margin)
        self.type_of_triplets = type_of_triplets
        self.distance = distance

    def mine(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mine triplets; see the class docstring."""
        sim, pos, neg = _mask_inputs(embeddings, labels, ref_emb, ref_labels, self.distance)
        dist = -sim  # larger = farther: t = d_an - d_ap in both cases
        m = self.margin
        low, high = {"all": (None, m), "hard": (None, min(m, 0.0)), "semihard": (0.0, m), "easy": (m, None)}[
            self.type_of_triplets
        ]
        return triplets_in_range(dist, pos, neg, low, high)

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return f"margin={self.margin}, type_of_triplets={self.type_of_triplets!r}, distance={self.distance!r}"


class PairMarginMiner(BaseMiner):
    r"""Positive pairs farther than ``pos_margin`` and negative pairs closer than ``neg_margin`` (PML's rule).

    With a distance :math:`d`: positive :math:`(i, j)` is kept iff :math:`d_{ij} > m^+`, negative :math:`(i, k)`
    iff :math:`d_{ik} < m^-`. With a similarity :math:`s`: :math:`s_{ij} < m^+` and :math:`s_{ik} > m^-`.

    Args:
        pos_margin: :math:`m^+` (PML's default 0.2).
        neg_margin: :math:`m^-` (PML's default 0.8).
        distance: ``"euclidean"`` (default, as PML's ``LpDistance()``), another metric name or a
            :mod:`dml_bias.distances` object.

    Returns (from ``forward``):
        ``(a1, p, a2, n)`` in row-major order; ``num_pos_pairs`` and ``num_neg_pairs`` are their counts.

    Example:
        >>> import torch
        >>> from dml_bias.miners import PairMarginMiner
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
        >>> a1, p, a2, n = PairMarginMiner(pos_margin=0.5, neg_margin=0.5)(emb, torch.tensor([0, 0, 1, 1]))
        >>> a1.tolist(), p.tolist(), a2.tolist(), n.tolist()
        ([0, 1, 2, 3], [1, 0, 3, 2], [0, 1, 2, 3], [2, 3, 0, 1])
    """

    def __init__(
        self, pos_margin: float = 0.2, neg_margin: float = 0.8, *, distance: str | BaseDistance = "euclidean"
    ) -> None:
        super().__init__()
        check_number(pos_margin, "pos_margin")
        check_number(neg_margin, "neg_margin")
        check_metric(distance)
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)
        self.distance = distance

    def mine(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mine pairs; see the class docstring."""
        sim, pos, neg = _mask_inputs(embeddings, labels, ref_emb, ref_labels, self.distance)
        if distance_is_similarity(resolve_distance(self.distance)):
            keep_pos, keep_neg = pos & (sim < self.pos_margin), neg & (sim > self.neg_margin)
        else:  # sim = -d
            keep_pos, keep_neg = pos & (-sim > self.pos_margin), neg & (-sim < self.neg_margin)
        a1, p = torch.nonzero(keep_pos, as_tuple=True)
        a2, n = torch.nonzero(keep_neg, as_tuple=True)
        return a1, p, a2, n

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, distance={self.distance!r}"
