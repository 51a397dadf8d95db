r"""Samplers with pytorch-metric-learning's names: :class:`MPerClassSampler` (an index sampler) and the batch sampler.

* :class:`MPerClassSampler` is PML's sampler: a flat stream of dataset indices for
  ``DataLoader(dataset, sampler=sampler, batch_size=batch_size)``; every consecutive ``batch_size`` indices hold
  ``batch_size // m`` classes × ``m`` samples (the DataLoader's ``batch_size`` must equal the sampler's).
* ``MPerClassBatchSampler`` (:class:`dml_bias.datasets.MPerClassBatchSampler`, re-exported here) yields whole
  batches for ``DataLoader(dataset, batch_sampler=sampler)``; it covers every sample about once per epoch, is
  reproducible from a ``torch.Generator`` and splits batches across DDP ranks. Prefer it for new code and DDP.

Example:
    >>> import torch
    >>> from dml_bias.samplers import MPerClassSampler
    >>> labels = torch.arange(5).repeat_interleave(3)  # 5 classes x 3 samples
    >>> sampler = MPerClassSampler(labels, m=2, batch_size=4, length_before_new_iter=8,
    ...                            generator=torch.Generator().manual_seed(0))
    >>> indices = list(sampler)
    >>> len(indices), [sorted(torch.bincount(labels[indices[i:i + 4]]).tolist())[-2:] for i in (0, 4)]
    (8, [[2, 2], [2, 2]])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dml_bias._checks import check_generator, check_labels, check_number, describe
from dml_bias.datasets.samplers import MPerClassBatchSampler

__all__ = ["MPerClassBatchSampler", "MPerClassSampler"]

#: Largest number of random keys drawn at once for the without-replacement choices of one class.
_KEY_BUDGET = 1 << 22


def _as_labels(labels: Any) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"labels must be a 1-D integer tensor, array or sequence, got {describe(labels)}"
            ) from error
    check_labels(labels, "labels")
    return labels.detach().to("cpu", torch.long)


class MPerClassSampler(torch.utils.data.Sampler[int]):
    r"""pytorch-metric-learning's ``MPerClassSampler``: ``m`` samples from each of ``batch_size // m`` classes.

    The index list (of length ``len(sampler)``) is built in *rounds*: each round shuffles the classes and takes
    the first ``batch_size // m`` (all classes if ``batch_size`` is ``None``), then appends ``m`` indices of each
    class, drawn without replacement (with replacement if the class has fewer than ``m`` samples). So with
    ``DataLoader(..., sampler=sampler, batch_size=batch_size)`` every batch holds ``batch_size // m`` distinct
    classes × ``m`` samples. The length is ``length_before_new_iter`` rounded down to a multiple of
    ``batch_size`` (or of ``m × classes`` without ``batch_size``, when that is smaller), as in PML.

    Departures from PML: the random numbers come from ``generator`` (or torch's global generator), not NumPy's
    global state, so ``torch.manual_seed`` makes the order reproducible (the order itself differs from PML's);
    invalid arguments raise ``ValueError``/``TypeError`` instead of ``AssertionError``; without ``batch_size``
    and with ``m × classes > length_before_new_iter`` the list has exactly ``length_before_new_iter`` indices
    (PML's grows to ``m × classes``, more than its ``len()``). Not DDP-aware (neither is PML's): under DDP use
    :class:`~dml_bias.datasets.MPerClassBatchSampler`.

    Args:
        labels: ``(N,)`` integer labels of the dataset (tensor, NumPy array or sequence).
        m: Samples per class in a batch (``>= 1``).
        batch_size: The DataLoader's batch size: a multiple of ``m`` with ``batch_size <= m × classes``;
            ``None``: every round takes every class.
        length_before_new_iter: Length of the index list of one epoch (before rounding down).
        generator: Optional ``torch.Generator`` for the random draws.

    Example:
        >>> import torch
        >>> from dml_bias.samplers import MPerClassSampler
        >>> labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
        >>> sampler = MPerClassSampler(labels, m=2, length_before_new_iter=20)
        >>> len(sampler)  # 20 rounded down to a multiple of m x classes = 6
        18
        >>> loader = torch.utils.data.DataLoader(list(range(9)), sampler=sampler, batch_size=6)
        >>> [sorted(labels[b].tolist()) for b in loader][0]
        [0, 0, 1, 1, 2, 2]
    """

    def __init__(
        self,
        labels: torch.Tensor | Sequence[int] | Any,
        m: int,
        batch_size: int | None = None,
        length_before_new_iter: int = 100000,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        labels = _as_labels(labels)
        check_number(m, "m", low=1, integer=True)
        if batch_size is not None:
            check_number(batch_size, "batch_size", low=1, integer=True)
        check_number(length_before_new_iter, "length_before_new_iter", low=1, integer=True)
        check_generator(generator)
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if len(classes) == 0:
            raise ValueError("labels must hold at least one sample, got an empty tensor")
        self.m_per_class = int(m)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.generator = generator
        self.labels = classes
        self.length_of_single_pass = self.m_per_class * len(classes)
        size = int(length_before_new_iter)
        if self.batch_size is None:
            if self.length_of_single_pass < size:
                size -= size % self.length_of_single_pass
        else:
            if self.batch_size % self.m_per_class != 0:
                raise ValueError(f"batch_size must be a multiple of m, got batch_size={batch_size} and m={m}")
            if self.length_of_single_pass < self.batch_size:
                raise ValueError(
                    f"batch_size must be <= m x (number of classes) = {self.length_of_single_pass}, got {batch_size}"
                )
            if size < self.batch_size:
                raise ValueError(
                    f"length_before_new_iter must be >= batch_size={batch_size}, got {length_before_new_iter}"
                )
            size -= size % self.batch_size
        self.list_size = size
        order = torch.argsort(inverse, stable=True)
        self._sorted = order  # sample indices grouped by class
        self._counts = counts
        self._starts = torch.cumsum(counts, 0) - counts

    def __len__(self) -> int:
        return self.list_size

    def calculate_num_iters(self) -> int:
        """Number of rounds of one epoch (PML's ``calculate_num_iters``)."""
        divisor = self.length_of_single_pass if self.batch_size is None else self.batch_size
        return self.list_size // divisor if divisor < self.list_size else 1

    def _draw(self, cls: torch.Tensor) -> torch.Tensor:
        """``m`` indices of each class in ``cls`` (``(R,)`` class positions) -> ``(R, m)`` dataset indices."""
        m, g = self.m_per_class, self.generator
        out = torch.empty(len(cls), m, dtype=torch.long)
        for c in torch.unique(cls).tolist():
            rows = torch.nonzero(cls == c, as_tuple=True)[0]
            n, start = int(self._counts[c]), int(self._starts[c])
            if n < m:  # with replacement
                pos = torch.randint(0, n, (len(rows), m), generator=g)
            else:  # without replacement: the m smallest of random keys, in blocks that fit the budget
                block = max(1, _KEY_BUDGET // n)
                pos = torch.cat(
                    [
                        torch.rand(len(rows[i : i + block]), n, generator=g).topk(m, dim=1, largest=False).indices
                        for i in range(0, len(rows), block)
                    ]
                )
            out[rows] = self._sorted[start + pos]
        return out

    def __iter__(self) -> Iterator[int]:
        num_classes = len(self.labels)
        per_round = num_classes if self.batch_size is None else self.batch_size // self.m_per_class
        rounds = self.calculate_num_iters()
        keys = torch.rand(rounds, num_classes, generator=self.generator)
        chosen = keys.argsort(dim=1)[:, :per_round].reshape(-1)  # the shuffled classes of each round
        indices = self._draw(chosen).reshape(-1)[: self.list_size]
        return iter(indices.tolist())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(m={self.m_per_class}, batch_size={self.batch_size}, "
            f"length_before_new_iter={self.list_size}, classes={len(self.labels)})"
        )
