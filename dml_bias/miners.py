r"""Miners: pick informative pairs or triplets from a batch for the losses of :mod:`dml_bias.losses`.

A miner is called like pytorch-metric-learning's, ``miner(embeddings, labels, ref_emb=None, ref_labels=None)``,
runs under ``torch.no_grad()`` and returns ``long`` index tensors on the embeddings' device: pairs
``(a1, p, a2, n)`` (anchors index ``embeddings``; ``p``/``n`` index ``ref_emb``, or ``embeddings`` when it is
``None``) or triplets ``(a, p, n)``. Pass the result as ``indices_tuple`` to any loss.

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

from dml_bias.losses import _common as C

__all__ = ["BatchHardMiner", "MultiSimilarityMiner"]


def _mask_inputs(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    distance: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate, then return the similarity matrix (larger = closer) and the positive/negative masks."""
    batch = C.prepare_batch(embeddings, labels, None, ref_emb, ref_labels, distance=distance, labels_required=True)
    assert batch.labels is not None
    assert batch.ref_labels is not None
    if batch.y is not None and ref_labels is None:
        raise ValueError("ref_labels must be given with ref_emb (a 1-D integer tensor of length ref_emb.shape[0])")
    with C.no_autocast(embeddings.device):
        sim = C.similarity_sign(distance) * batch.matrix(distance)
    pos, neg = C.label_masks(batch.labels, batch.ref_labels, batch.exclude_self)
    return sim, pos, neg


class MultiSimilarityMiner(nn.Module):
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
        distance: ``"cosine"`` (default), ``"dot"``, ``"euclidean"`` or ``"squared_euclidean"``.

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

    def __init__(self, epsilon: float = 0.1, *, distance: str = "cosine") -> None:
        super().__init__()
        C.check_nonnegative(epsilon, "epsilon")
        C.check_metric(distance)
        self.epsilon = float(epsilon)
        self.distance = distance

    @torch.no_grad()
    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
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


class BatchHardMiner(nn.Module):
    r"""Batch-hard triplet mining :cite:`hermans2017defense`: per anchor, its farthest positive and closest negative.

    .. math::

        p(i) = \arg\min_{j \in P_i} s_{ij}, \qquad n(i) = \arg\max_{k \in N_i} s_{ik}

    (with a distance: the largest / smallest distance). Anchors without a positive or a negative are skipped,
    so the triplets ``(a, p(a), n(a))`` are at most one per anchor. pytorch-metric-learning's ``BatchHardMiner``
    chooses the same triplets; ties are broken towards the lowest index.

    Args:
        distance: ``"euclidean"`` (default, on L2-normalised embeddings, as PML), ``"cosine"``, ``"dot"`` or
            ``"squared_euclidean"``.

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

    def __init__(self, *, distance: str = "euclidean") -> None:
        super().__init__()
        C.check_metric(distance)
        self.distance = distance

    @torch.no_grad()
    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
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
