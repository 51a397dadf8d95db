r"""pytorch-metric-learning's ``utils.distributed``: ``DistributedLossWrapper`` and ``DistributedMinerWrapper``.

``from dml_bias.utils import distributed as pml_dist`` then ``pml_dist.DistributedLossWrapper(loss)`` and
``pml_dist.DistributedMinerWrapper(miner)`` work as in PML:

.. code-block:: python

    loss_func = pml_dist.DistributedLossWrapper(loss_func)
    miner = pml_dist.DistributedMinerWrapper(miner)
    indices_tuple = miner(embeddings, labels)  # mined on the batch gathered from all ranks
    loss = loss_func(embeddings, labels, indices_tuple)

The loss wrapper is :class:`dml_bias.distributed.DistributedLossWrapper` (exact gradients for the model **and**
the loss's own parameters, the global loss value returned, the same gathered order on every rank — so
``CrossBatchMemory`` keeps identical queues on every rank). Differences from PML's wrappers: PML multiplies the
loss by the world size (its loss parameters get world-size × their gradient and the logged value is
world-size × the loss); PML gathers each rank's own rows first, so the order differs per rank (its issue 639);
``efficient=True`` is not provided.

Example:
    >>> import torch
    >>> from dml_bias import losses, miners
    >>> from dml_bias.utils import distributed as pml_dist
    >>> loss_func = pml_dist.DistributedLossWrapper(losses.TripletMarginLoss())
    >>> miner = pml_dist.DistributedMinerWrapper(miners.TripletMarginMiner(0.2))
    >>> emb, labels = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    >>> indices = miner(emb, labels)  # a single process: the bare miner
    >>> torch.equal(loss_func(emb, labels, indices), losses.TripletMarginLoss()(emb, labels, indices))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dml_bias._checks import check_bool, describe
from dml_bias.distributed import DistributedLossWrapper as _ExactLossWrapper
from dml_bias.distributed import gather_no_grad, get_world_size

__all__ = ["DistributedLossWrapper", "DistributedMinerWrapper", "GatheredIndices"]


class GatheredIndices(tuple):  # type: ignore[type-arg]
    """An indices tuple that indexes the batch gathered from all ranks (returned by :class:`DistributedMinerWrapper`).

    :class:`DistributedLossWrapper` uses such a tuple as it is, where a plain tuple holds local indices.

    Example:
        >>> import torch
        >>> GatheredIndices((torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))[2]
        tensor([2])
    """


def _check_efficient(efficient: Any) -> None:
    check_bool(efficient, "efficient")
    if efficient:
        raise ValueError(
            "efficient=True is not provided: its gradients differ from the single-process run; the default "
            "(efficient=False) gives the exact gradients"
        )


class DistributedLossWrapper(_ExactLossWrapper):
    r"""PML's constructor ``DistributedLossWrapper(loss, efficient=False)`` for the exact wrapper.

    Everything is :class:`dml_bias.distributed.DistributedLossWrapper` (see there for the gradients); in
    addition, an ``indices_tuple`` returned by :class:`DistributedMinerWrapper` (global indices) is used as it is.

    Args:
        loss: The loss (e.g. a :mod:`dml_bias.losses` loss or ``CrossBatchMemory``).
        efficient: Only ``False`` (PML's default).
        **kwargs: ``miner``, ``grad_reduction``, ``sync_parameters``, ``group`` of the exact wrapper.

    Example:
        >>> import torch
        >>> from dml_bias.losses import ContrastiveLoss
        >>> from dml_bias.utils.distributed import DistributedLossWrapper
        >>> wrapped = DistributedLossWrapper(ContrastiveLoss(), efficient=False)
        >>> emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
        >>> torch.equal(wrapped(emb, labels), ContrastiveLoss()(emb, labels))
        True
    """

    def __init__(self, loss: Callable[..., torch.Tensor], efficient: bool = False, **kwargs: Any) -> None:
        _check_efficient(efficient)
        super().__init__(loss, **kwargs)
        self.efficient = efficient

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: Sequence[torch.Tensor] | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of the global batch; a :class:`GatheredIndices` tuple indexes the gathered batch."""
        if not isinstance(indices_tuple, GatheredIndices) or get_world_size(self.group) == 1:
            return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if self.miner is not None:
            raise ValueError("pass either indices_tuple or a miner, not both")
        mined = tuple(indices_tuple)
        self.miner = lambda *args, **kwargs: mined  # the gathered batch's tuple, handed to the loss as is
        try:
            return super().forward(embeddings, labels, None, ref_emb, ref_labels)
        finally:
            self.miner = None


class DistributedMinerWrapper(nn.Module):
    r"""Run a miner on the batch gathered from all ranks (PML's ``DistributedMinerWrapper(miner, efficient=False)``).

    Every rank gathers the embeddings and labels of all ranks in rank order (sizes may differ) and runs the miner
    on them, so every rank gets the same tuple of indices into the gathered batch (a :class:`GatheredIndices`),
    which :class:`DistributedLossWrapper` uses as it is. Without an initialised process group it is the bare
    miner.

    Args:
        miner: A miner ``miner(embeddings, labels, ref_emb=None, ref_labels=None)``.
        efficient: Only ``False`` (PML's default).

    Example:
        >>> import torch
        >>> from dml_bias.miners import BatchHardMiner
        >>> from dml_bias.utils.distributed import DistributedMinerWrapper
        >>> a, p, n = DistributedMinerWrapper(BatchHardMiner())(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
        >>> len(a)
        4
    """

    def __init__(self, miner: Callable[..., Sequence[torch.Tensor]], efficient: bool = False) -> None:
        super().__init__()
        if not callable(miner):
            raise TypeError(f"miner must be callable (e.g. a dml_bias.miners miner), got {describe(miner)}")
        _check_efficient(efficient)
        self.miner = miner
        self.efficient = efficient

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Mine on the gathered batch; see the class docstring."""
        if get_world_size() == 1:
            return tuple(self.miner(embeddings, labels, ref_emb, ref_labels))
        with torch.no_grad():
            all_emb = gather_no_grad(embeddings.detach())
            all_labels = gather_no_grad(labels)
            all_ref = None if ref_emb is None else gather_no_grad(ref_emb.detach())
            all_ref_labels = None if ref_labels is None else gather_no_grad(ref_labels)
        return GatheredIndices(self.miner(all_emb, all_labels, all_ref, all_ref_labels))
