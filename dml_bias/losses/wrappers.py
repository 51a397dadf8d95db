r"""Loss wrappers with pytorch-metric-learning's names: :class:`CrossBatchMemory` and :class:`SelfSupervisedLoss`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dml_bias._checks import check_bool, check_embeddings, check_labels, check_number, describe
from dml_bias.losses._common import convert_to_triplets, label_masks

__all__ = ["CrossBatchMemory", "SelfSupervisedLoss"]


def _check_pair_loss(loss: Any, wrapper: str) -> None:
    from dml_bias.losses.arcface import AdditiveAngularMarginLoss, ArcFaceLoss
    from dml_bias.losses.proxy_anchor import ProxyAnchorLoss

    if not callable(loss):
        raise TypeError(f"loss must be a callable loss (e.g. TripletMarginLoss()), got {describe(loss)}")
    if isinstance(loss, (ProxyAnchorLoss, ArcFaceLoss, AdditiveAngularMarginLoss)):
        raise TypeError(
            f"{wrapper} needs a loss that compares embeddings with ref_emb (a pair or triplet loss), got "
            f"{type(loss).__name__}, which takes no ref_emb"
        )


class CrossBatchMemory(nn.Module):
    r"""Cross-batch memory (Wang et al., CVPR 2020): compare each batch with a queue of past embeddings (PML's wrapper).

    A ring buffer holds the last ``memory_size`` (detached) embeddings and labels. Each call first enqueues the
    batch, then returns ``loss(embeddings, labels, indices_tuple, E_mem, L_mem)``: anchors from the batch,
    positives and negatives from the memory, every (anchor, memory) pair (or the ``miner``'s tuples mined
    against the memory) except each anchor with its own memory copy. Gradients reach the batch as anchors only
    (the memory is detached). ``indices_tuple`` given to ``forward`` (batch × memory indices) is added to those
    pairs. With ``enqueue_mask`` (MoCo style) the masked rows are only enqueued and the others only anchors
    (no self-comparison to remove). This is PML's algorithm; values equal PML's.

    Under :class:`~dml_bias.distributed.DistributedLossWrapper` (or
    :class:`dml_bias.utils.distributed.DistributedLossWrapper`) every rank enqueues the same gathered batch in
    the same (rank) order, so the queues stay identical on all ranks and the gradients equal the single-process
    run on the concatenated batches (PML's wrapper gathers each rank's own rows first, so its queues differ per
    rank: PML issue 639).

    Args:
        loss: A pair or triplet loss taking ``ref_emb`` (e.g. :class:`~dml_bias.losses.ContrastiveLoss`,
            :class:`~dml_bias.losses.TripletMarginLoss`, :class:`~dml_bias.losses.MultiSimilarityLoss`,
            :class:`~dml_bias.losses.NTXentLoss`, :class:`~dml_bias.losses.SupConLoss`).
        embedding_size: The embedding size ``D``.
        memory_size: Number of embeddings the queue holds (``>= 1``).
        miner: Optional miner ``miner(embeddings, labels, E_mem, L_mem)``.

    Attributes:
        embedding_memory: Buffer ``(memory_size, D)``; it takes the embeddings' dtype and device.
        label_memory: Buffer ``(memory_size,)`` of labels.
        queue_idx: Where the next batch is written.
        has_been_filled: Whether the queue has wrapped around (then all of it is used).

    Shape:
        ``embeddings`` ``(N, D)`` with ``N <= memory_size`` (without ``enqueue_mask``), ``labels`` ``(N,)``
        integer, ``enqueue_mask`` ``(N,)`` bool; output: the loss's scalar.

    Example:
        >>> import torch
        >>> from dml_bias.losses import ContrastiveLoss, CrossBatchMemory
        >>> loss_fn = CrossBatchMemory(ContrastiveLoss(), embedding_size=2, memory_size=4)
        >>> labels = torch.tensor([0, 1])
        >>> loss_fn(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), labels)  # one negative pair each way
        tensor(0.1056)
        >>> loss_fn(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), labels), loss_fn.queue_idx  # the queue is full
        (tensor(0.9419), 0)
    """

    def __init__(
        self,
        loss: Callable[..., torch.Tensor],
        embedding_size: int,
        memory_size: int = 1024,
        miner: Callable[..., Sequence[torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        _check_pair_loss(loss, "CrossBatchMemory")
        check_number(embedding_size, "embedding_size", low=1, integer=True)
        check_number(memory_size, "memory_size", low=1, integer=True)
        if miner is not None and not callable(miner):
            raise TypeError(f"miner must be callable or None, got {describe(miner)}")
        self.loss = loss
        self.miner = miner
        self.embedding_size = int(embedding_size)
        self.memory_size = int(memory_size)
        self.reset_queue()

    embedding_memory: torch.Tensor
    label_memory: torch.Tensor

    def reset_queue(self) -> None:
        """Empty the queue (zeros, ``queue_idx = 0``)."""
        device = self.embedding_memory.device if hasattr(self, "embedding_memory") else None
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size, device=device))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long, device=device))
        self.has_been_filled = False
        self.queue_idx = 0

    def _enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Write the rows into the ring buffer; return their slots."""
        slots = torch.arange(self.queue_idx, self.queue_idx + len(embeddings), device=embeddings.device)
        slots = slots % self.memory_size
        with torch.no_grad():
            self.embedding_memory[slots] = embeddings.detach()
            self.label_memory[slots] = labels.detach()
        previous = self.queue_idx
        self.queue_idx = (self.queue_idx + len(embeddings)) % self.memory_size
        if not self.has_been_filled and self.queue_idx <= previous:
            self.has_been_filled = True
        return slots

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: Sequence[torch.Tensor] | None = None,
        enqueue_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Enqueue the batch and compute the loss against the memory; see the class docstring."""
        check_embeddings(embeddings, "embeddings", dim=self.embedding_size, dim_source="embedding_size")
        check_labels(labels, "labels", length=embeddings.shape[0], length_source="embeddings.shape[0]")
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive; pass one of them")
        if enqueue_mask is not None:
            if not isinstance(enqueue_mask, torch.Tensor) or enqueue_mask.dtype != torch.bool:
                raise TypeError(f"enqueue_mask must be a boolean tensor, got {describe(enqueue_mask)}")
            if enqueue_mask.shape != (embeddings.shape[0],):
                raise ValueError(
                    f"enqueue_mask must have shape ({embeddings.shape[0]},) (embeddings.shape[0]), got "
                    f"{tuple(enqueue_mask.shape)}"
                )
        elif embeddings.shape[0] > self.memory_size:
            raise ValueError(
                f"embeddings must have at most memory_size={self.memory_size} rows, got {embeddings.shape[0]}"
            )
        device = embeddings.device
        labels = labels.to(device)
        if self.embedding_memory.device != device or self.embedding_memory.dtype != embeddings.dtype:
            self.embedding_memory = self.embedding_memory.to(device=device, dtype=embeddings.dtype)
        if self.label_memory.device != device:
            self.label_memory = self.label_memory.to(device)

        if enqueue_mask is not None:
            enqueue_mask = enqueue_mask.to(device)
            slots = self._enqueue(embeddings[enqueue_mask], labels[enqueue_mask])
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
            remove_self = False
        else:
            slots = self._enqueue(embeddings, labels)
            remove_self = True
        filled = self.memory_size if self.has_been_filled else self.queue_idx
        mem_emb, mem_labels = self.embedding_memory[:filled], self.label_memory[:filled]

        if self.miner is not None:
            mined = tuple(self.miner(embeddings, labels, mem_emb, mem_labels))
        else:
            pos, neg = label_masks(labels, mem_labels, exclude_self=False)
            mined = (*torch.nonzero(pos, as_tuple=True), *torch.nonzero(neg, as_tuple=True))
        if remove_self:  # drop (anchor, its own memory copy); negatives never are
            keep = mined[1] != slots[mined[0]]
            mined = (mined[0][keep], mined[1][keep], *mined[2:]) if len(mined) == 4 else tuple(t[keep] for t in mined)
        if indices_tuple is not None:
            extra = tuple(indices_tuple)
            if len(extra) == 3 and len(mined) == 4:
                a, p, n = extra
                extra = (a, p, a, n)
            elif len(extra) == 4 and len(mined) == 3:
                extra = convert_to_triplets(tuple(t.long() for t in extra))
            mined = tuple(torch.cat([m, e.to(device).long()]) for m, e in zip(mined, extra, strict=True))
        return self.loss(embeddings, labels, mined, mem_emb, mem_labels)

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, queue_idx={self.queue_idx}"


class SelfSupervisedLoss(nn.Module):
    r"""A loss on two views of the same batch: row ``i`` of ``embeddings`` and of ``ref_emb`` are positives.

    Labels ``arange(N)`` are made for both views. With ``symmetric=True`` (PML's default) the loss sees the
    stacked ``[embeddings; ref_emb]`` (each row's positive is its other view; the other rows are negatives),
    otherwise ``loss(embeddings, labels, ref_emb=ref_emb, ref_labels=labels)`` (rows as anchors only).

    Args:
        loss: A pair or triplet loss (e.g. :class:`~dml_bias.losses.NTXentLoss`).
        symmetric: Use both views as anchors.

    Shape:
        ``embeddings`` and ``ref_emb`` ``(N, D)``; output: the loss's scalar.

    Example:
        >>> import torch
        >>> from dml_bias.losses import NTXentLoss, SelfSupervisedLoss
        >>> view1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> SelfSupervisedLoss(NTXentLoss(temperature=1.0))(view1, view1.clone())
        tensor(0.5514)
    """

    def __init__(self, loss: Callable[..., torch.Tensor], symmetric: bool = True) -> None:
        super().__init__()
        _check_pair_loss(loss, "SelfSupervisedLoss")
        check_bool(symmetric, "symmetric")
        self.loss = loss
        self.symmetric = symmetric

    def forward(self, embeddings: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        """The loss of the two views; see the class docstring."""
        check_embeddings(embeddings, "embeddings")
        check_embeddings(ref_emb, "ref_emb", dim=embeddings.shape[1], dim_source="embeddings.shape[1]")
        if ref_emb.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"ref_emb must have as many rows as embeddings ({embeddings.shape[0]}), got {ref_emb.shape[0]}"
            )
        labels = torch.arange(embeddings.shape[0], device=embeddings.device)
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb]), torch.cat([labels, labels]))
        return self.loss(embeddings, labels, ref_emb=ref_emb, ref_labels=labels.clone())

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return f"symmetric={self.symmetric}"
