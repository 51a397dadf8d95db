"""Class-balanced batch sampling for deep metric learning.

:class:`MPerClassBatchSampler` is a *batch* sampler (``DataLoader(batch_sampler=...)``). It was called
``MPerClassSampler`` before; that name still works here and in :mod:`dml_bias.datasets` with a
:class:`DeprecationWarning`, because pytorch-metric-learning's ``MPerClassSampler`` — an *index* sampler for
``DataLoader(sampler=..., batch_size=...)`` — is :class:`dml_bias.samplers.MPerClassSampler`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dml_bias._checks import check_bool, check_generator, check_labels, check_number

__all__ = ["MPerClassBatchSampler"]

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) that spreads epochs over the seed space


class MPerClassBatchSampler(torch.utils.data.Sampler[list[int]]):
    r"""A batch sampler whose every batch holds ``batch_size // m`` classes with ``m`` images each.

    Pass it to ``DataLoader(dataset, batch_sampler=sampler)`` (not ``sampler=``, and without a
    ``batch_size``): it yields lists of dataset indices, one list per batch. (Formerly ``MPerClassSampler``;
    pytorch-metric-learning's index sampler of that name is :class:`dml_bias.samplers.MPerClassSampler`.)

    **One epoch.** Every class's indices are shuffled and cut into chunks of ``m``; the last, shorter chunk
    of a class is completed with other indices of the same class (no index twice in a chunk). A class with
    fewer than ``m`` samples gives one chunk of all its samples plus ``m - n_c`` of them again (drawn at
    random) — the only case where a batch repeats an index. Batches are then assembled from one chunk each of ``K``
    distinct classes: the classes with the most unused chunks, ties broken at random. So consecutive batches
    cycle through the classes before repeating one, and the epoch visits every sample about once. There are

    .. math::

        B = \left\lfloor \frac{1}{K} \sum_c \max\!\left(1, \left\lceil \frac{n_c}{m} \right\rceil\right)
            \right\rfloor, \qquad K = \frac{\text{batch\_size}}{m}

    batches per epoch in total. With ``drop_last=False`` there are
    :math:`\max(\lceil\cdot\rceil, \max_c \lceil n_c / m \rceil)` instead and every sample is visited (the
    last batches are completed with fresh chunks of random classes). Each of the
    ``num_replicas`` ranks gets every ``num_replicas``-th of them (``drop_last=True`` drops the batches
    that do not divide evenly; ``drop_last=False`` adds batches so that every rank has the same number).
    Ranks never share a batch.

    **Reproducibility.** The order depends only on the base seed and the epoch: the base seed is drawn
    once, at construction, from ``generator`` (or, without one, from torch's global generator on a single
    process and fixed to ``0`` under DDP, so that all ranks agree); :meth:`set_epoch` mixes the epoch into
    it, as ``DistributedSampler`` does. Under DDP pass identically seeded generators on every rank (or
    none) and call ``set_epoch`` each epoch.

    Args:
        labels: 1-D integer tensor (or sequence) with the label of every sample.
        m: Samples per class in a batch (``>= 1``).
        batch_size: Samples per batch; a multiple of ``m`` and at least ``m``.
        generator: A ``torch.Generator`` the base seed is drawn from.
        num_replicas: Number of DDP ranks (default: the world size if ``torch.distributed`` is
            initialised, else 1).
        rank: This process's rank (default: from ``torch.distributed``, else 0).
        drop_last: Drop the incomplete batches at the end of the epoch (see above).

    Raises:
        TypeError: ``labels`` is not integer, or a count is not an ``int``.
        ValueError: ``m < 1``, ``m > batch_size``, ``batch_size % m != 0``, fewer distinct labels than
            ``batch_size // m``, a rank out of range, or no batch per rank.

    Example:
        >>> import torch
        >>> labels = torch.arange(6).repeat_interleave(4)  # 6 classes x 4 samples
        >>> sampler = MPerClassBatchSampler(labels, m=2, batch_size=6, generator=torch.Generator().manual_seed(0))
        >>> len(sampler)
        4
        >>> batch = next(iter(sampler))
        >>> len(batch), sorted(torch.bincount(labels[batch]).tolist())[-3:]
        (6, [2, 2, 2])
        >>> sampler.set_epoch(1)
        >>> sum(len(b) for b in sampler)
        24
    """

    def __init__(
        self,
        labels: torch.Tensor | Sequence[int] | Any,
        m: int,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = True,
    ) -> None:
        if not isinstance(labels, torch.Tensor):
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError) as error:
                raise TypeError(
                    f"labels must be a 1-D integer tensor or sequence, got {type(labels).__name__}"
                ) from error
        check_labels(labels, "labels")
        check_number(m, "m", low=1, integer=True)
        check_number(batch_size, "batch_size", low=1, integer=True)
        if m > batch_size:
            raise ValueError(f"m must not exceed batch_size, got m={m} and batch_size={batch_size}")
        if batch_size % m != 0:
            raise ValueError(f"batch_size must be a multiple of m, got batch_size={batch_size} and m={m}")
        check_generator(generator)
        check_bool(drop_last, "drop_last")
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if dist_on else 1
        check_number(num_replicas, "num_replicas", low=1, integer=True)
        if rank is None:
            rank = torch.distributed.get_rank() if dist_on else 0
        check_number(rank, "rank", low=0, high=num_replicas - 1, integer=True)

        labels = labels.detach().to("cpu", torch.long)
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        self.classes_per_batch = batch_size // m
        if len(classes) < self.classes_per_batch:
            raise ValueError(
                f"a batch needs batch_size // m = {self.classes_per_batch} distinct classes, but labels has only "
                f"{len(classes)}"
            )
        self.m = int(m)
        self.batch_size = int(batch_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = drop_last
        self.epoch = 0
        self._inverse = inverse  # class position (0 … C-1) of every sample
        self._counts = counts
        self._starts = torch.cumsum(counts, 0) - counts  # where each class begins in class-sorted order
        self._chunks_per_class = torch.clamp((counts + m - 1) // m, min=1)
        total_chunks = int(self._chunks_per_class.sum())
        k = self.classes_per_batch
        max_chunks = int(self._chunks_per_class.max())
        total = total_chunks // k if drop_last else max(-(-total_chunks // k), max_chunks)
        per_rank = total // self.num_replicas if drop_last else -(-total // self.num_replicas)
        if per_rank == 0:
            raise ValueError(
                f"labels give only {total} batch(es) of {k} classes x {m} per epoch, fewer than num_replicas="
                f"{self.num_replicas}; use drop_last=False or a smaller batch"
            )
        self._num_batches = per_rank
        if generator is not None:
            self.seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        elif self.num_replicas > 1:
            self.seed = 0
        else:
            self.seed = int(torch.randint(0, 2**62, (1,)))

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, which is mixed into the seed (call it before iterating each epoch, on every rank).

        Args:
            epoch: A non-negative epoch number.

        Example:
            >>> import torch
            >>> s = MPerClassBatchSampler(torch.arange(8).repeat(3), 3, 6, generator=torch.Generator().manual_seed(1))
            >>> s.set_epoch(0); a = list(s); s.set_epoch(1); b = list(s); s.set_epoch(0)
            >>> a == list(s), a == b
            (True, False)
        """
        check_number(epoch, "epoch", low=0, integer=True)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._num_batches

    def _epoch_generator(self) -> torch.Generator:
        seed = (self.seed + _MIX * (self.epoch + 1)) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def _class_sorted_shuffle(self, g: torch.Generator) -> torch.Tensor:
        """All indices, grouped by class (in class order), shuffled within each class."""
        keys = torch.rand(len(self._inverse), generator=g, dtype=torch.float64)
        order = torch.argsort(keys)
        return order[torch.argsort(self._inverse[order], stable=True)]

    def _epoch_chunks(self, shuffled: torch.Tensor) -> torch.Tensor:
        """The chunks of one epoch, ``(total_chunks, m)``, grouped by class.

        Chunk ``j`` of a class with ``n`` shuffled indices takes positions ``j·m … j·m + m - 1`` modulo ``n``:
        the last, short chunk wraps around to the first indices of the class (distinct from its own when
        ``n >= m``), and a class with ``n < m`` repeats some of its indices (the only repeats).
        """
        m = self.m
        chunk_class = torch.repeat_interleave(torch.arange(len(self._counts)), self._chunks_per_class)
        first_chunk = torch.cumsum(self._chunks_per_class, 0) - self._chunks_per_class
        j = torch.arange(len(chunk_class)) - first_chunk[chunk_class]
        n = self._counts[chunk_class][:, None]
        positions = (j[:, None] * m + torch.arange(m)) % n
        return shuffled[self._starts[chunk_class][:, None] + positions]

    def _fresh_chunk(self, c: int, shuffled: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A new chunk of ``m`` indices of class ``c`` (with replacement only if the class is small)."""
        start, n = int(self._starts[c]), int(self._counts[c])
        if n >= self.m:
            picked = torch.randperm(n, generator=g)[: self.m]
        else:
            extra = torch.randint(0, n, (self.m - n,), generator=g)
            picked = torch.cat([torch.arange(n), extra])
        return shuffled[start + picked]

    def __iter__(self) -> Iterator[list[int]]:
        g = self._epoch_generator()
        shuffled = self._class_sorted_shuffle(g)
        chunks = self._epoch_chunks(shuffled)
        first_chunk = torch.cumsum(self._chunks_per_class, 0) - self._chunks_per_class
        remaining = self._chunks_per_class.clone()
        k = self.classes_per_batch
        total = self._num_batches * self.num_replicas
        for b in range(total):
            # the k classes with the most unused chunks, random tie-breaks; taking the largest first is what
            # lets the batches use up every chunk whenever that is possible. Classes without unused chunks
            # (score < 1) give fresh chunks.
            score = remaining + torch.rand(len(remaining), generator=g, dtype=torch.float64)
            chosen = torch.topk(score, k).indices
            has_chunk = remaining[chosen] > 0
            used = chosen[has_chunk]
            remaining[used] -= 1
            parts = [chunks[first_chunk[used] + remaining[used]]]
            if not bool(has_chunk.all()):
                parts += [self._fresh_chunk(c, shuffled, g)[None] for c in chosen[~has_chunk].tolist()]
            if b % self.num_replicas == self.rank:
                yield torch.cat(parts).flatten().tolist()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(m={self.m}, batch_size={self.batch_size}, num_replicas={self.num_replicas}, "
            f"rank={self.rank}, drop_last={self.drop_last}, batches={len(self)})"
        )


def __getattr__(name: str) -> Any:
    if name == "MPerClassSampler":
        import warnings

        warnings.warn(
            "dml_bias.datasets.MPerClassSampler is renamed MPerClassBatchSampler (it is a batch sampler); "
            "dml_bias.samplers.MPerClassSampler is pytorch-metric-learning's index sampler",
            DeprecationWarning,
            stacklevel=2,
        )
        return MPerClassBatchSampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
