r"""Reducers with pytorch-metric-learning's names and meaning: how a loss turns its per-element losses into a scalar.

A loss given ``reducer=`` computes a *loss dictionary* (:data:`LossDict`) — one entry per sub-loss, each holding
the per-element ``"losses"``, their ``"indices"`` in the batch and a ``"reduction_type"`` (``"element"``,
``"pos_pair"``, ``"neg_pair"``, ``"triplet"`` or ``"already_reduced"``) — and calls
``reducer(loss_dict, embeddings, labels)``. Each sub-loss is reduced on its own and the results are summed (PML's
``MultipleReducers``). A sub-loss whose ``"losses"`` is the integer ``0`` (nothing to compare) reduces to a zero
that keeps the graph of ``embeddings``, so ``backward()`` works.

Without ``reducer=`` each loss uses its default reduction (PML's default reducer), computed on a faster path that
gives the same value.

Departures from pytorch-metric-learning: :class:`DoNothingReducer` returns the whole dictionary of a loss with
several sub-losses (PML fails there); an empty ``"losses"`` tensor reduces to a graph-keeping zero in every
reducer (PML's :class:`MeanReducer` returns NaN).

Example:
    >>> import torch
    >>> from dml_bias.losses import TripletMarginLoss
    >>> from dml_bias.reducers import MeanReducer, ThresholdReducer
    >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.2, 1.0]])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> TripletMarginLoss(margin=0.1, reducer=MeanReducer())(emb, labels)
    tensor(0.6817)
    >>> TripletMarginLoss(margin=0.1, reducer=ThresholdReducer(low=0.5))(emb, labels)
    tensor(1.2534)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dml_bias._checks import check_number, describe

__all__ = [
    "AvgNonZeroReducer",
    "BaseReducer",
    "DivisorReducer",
    "DoNothingReducer",
    "LossDict",
    "MeanReducer",
    "SumReducer",
    "ThresholdReducer",
]

#: ``{sub_loss_name: {"losses": Tensor | 0, "indices": ..., "reduction_type": str[, "divisor": number]}}``.
LossDict = dict[str, dict[str, Any]]

#: The reduction types a loss may emit.
REDUCTION_TYPES: tuple[str, ...] = ("element", "pos_pair", "neg_pair", "triplet", "already_reduced")


def zero_like_graph(embeddings: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to ``embeddings``' graph (``backward()`` gives zero gradients)."""
    return (embeddings * 0).sum()


class BaseReducer(nn.Module):
    r"""Base of the reducers: the sum over the sub-losses of ``reduce`` of each.

    Subclasses implement :meth:`reduce` for one sub-loss (a 1-D tensor of per-element losses).

    Example:
        >>> import torch
        >>> from dml_bias.reducers import SumReducer
        >>> d = {"loss": {"losses": torch.tensor([1.0, 2.0]), "indices": torch.arange(2),
        ...               "reduction_type": "element"}}
        >>> SumReducer()(d, torch.zeros(2, 3), torch.tensor([0, 1]))
        tensor(3.)
    """

    def forward(self, loss_dict: LossDict, embeddings: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Reduce every sub-loss of ``loss_dict`` and return their sum (a scalar).

        Args:
            loss_dict: The loss dictionary (:data:`LossDict`).
            embeddings: ``(N, D)`` the loss's embeddings (for a zero that keeps the graph).
            labels: ``(N,)`` the loss's labels or ``None`` (unused by these reducers).
        """
        check_loss_dict(loss_dict)
        total: torch.Tensor | None = None
        for info in loss_dict.values():
            value = self.reduce_one(info, embeddings)
            total = value if total is None else total + value
        assert total is not None
        return total

    def reduce_one(self, info: dict[str, Any], embeddings: torch.Tensor) -> torch.Tensor:
        """Reduce one sub-loss entry."""
        losses = info["losses"]
        if not isinstance(losses, torch.Tensor) or losses.numel() == 0:
            return zero_like_graph(embeddings)
        if info["reduction_type"] == "already_reduced":
            return losses.reshape(())
        return self.reduce(losses.reshape(-1), info)

    def reduce(self, losses: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
        """Reduce the non-empty 1-D ``losses`` of one sub-loss to a scalar."""
        raise NotImplementedError(f"{type(self).__name__}.reduce must be implemented by a subclass of BaseReducer")


def check_loss_dict(loss_dict: Any) -> None:
    """Raise a clear error unless ``loss_dict`` is a :data:`LossDict`."""
    if not isinstance(loss_dict, dict) or not loss_dict:
        raise TypeError(f"loss_dict must be a non-empty dict of sub-loss dicts, got {describe(loss_dict)}")
    for name, info in loss_dict.items():
        if not isinstance(info, dict) or "losses" not in info or "reduction_type" not in info:
            raise TypeError(
                f"loss_dict[{name!r}] must be a dict with 'losses', 'indices' and 'reduction_type', got "
                f"{describe(info)}"
            )
        if info["reduction_type"] not in REDUCTION_TYPES:
            raise ValueError(
                f"loss_dict[{name!r}]['reduction_type'] must be one of {', '.join(map(repr, REDUCTION_TYPES))}, "
                f"got {info['reduction_type']!r}"
            )
        losses = info["losses"]
        if not isinstance(losses, torch.Tensor) and not (isinstance(losses, int) and losses == 0):
            raise TypeError(f"loss_dict[{name!r}]['losses'] must be a tensor or the integer 0, got {describe(losses)}")


class MeanReducer(BaseReducer):
    """The mean of all per-element losses (PML's base default).

    Example:
        >>> import torch
        >>> from dml_bias.reducers import MeanReducer
        >>> d = {"loss": {"losses": torch.tensor([0.0, 1.0, 2.0]), "indices": None, "reduction_type": "element"}}
        >>> MeanReducer()(d, torch.zeros(3, 2), None)
        tensor(1.)
    """

    def reduce(self, losses: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
        """``losses.mean()``."""
        return losses.mean()


class SumReducer(BaseReducer):
    """The sum of all per-element losses.

    Example:
        >>> import torch
        >>> from dml_bias.reducers import SumReducer
        >>> d = {"loss": {"losses": torch.tensor([0.0, 1.0, 2.0]), "indices": None, "reduction_type": "triplet"}}
        >>> SumReducer()(d, torch.zeros(3, 2), None)
        tensor(3.)
    """

    def reduce(self, losses: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
        """``losses.sum()``."""
        return losses.sum()


class ThresholdReducer(BaseReducer):
    r"""The mean of the losses strictly inside ``(low, high)``; 0 (graph kept) if none is.

    Args:
        low: Keep losses ``> low`` (``None``: no lower bound).
        high: Keep losses ``< high`` (``None``: no upper bound). At least one bound must be given.

    Attributes:
        num_past_filter: How many losses passed the filter in the last call (summed over sub-losses).

    Example:
        >>> import torch
        >>> from dml_bias.reducers import ThresholdReducer
        >>> d = {"loss": {"losses": torch.tensor([0.0, 1.0, 2.0, 5.0]), "indices": None,
        ...               "reduction_type": "element"}}
        >>> ThresholdReducer(low=0, high=4)(d, torch.zeros(4, 2), None)
        tensor(1.5000)
    """

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        super().__init__()
        if low is None and high is None:
            raise ValueError("ThresholdReducer needs low or high (or both), got low=None and high=None")
        if low is not None:
            check_number(low, "low")
        if high is not None:
            check_number(high, "high")
        if low is not None and high is not None and not low < high:
            raise ValueError(f"low must be < high, got low={low} and high={high}")
        self.low = None if low is None else float(low)
        self.high = None if high is None else float(high)
        self.num_past_filter = 0

    def forward(self, loss_dict: LossDict, embeddings: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Reduce every sub-loss (see :meth:`BaseReducer.forward`), counting the kept losses."""
        self.num_past_filter = 0
        return super().forward(loss_dict, embeddings, labels)

    def reduce(self, losses: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
        """The mean over ``low < losses < high`` (0 keeping the graph if none)."""
        keep = torch.ones_like(losses, dtype=torch.bool)
        if self.low is not None:
            keep &= losses > self.low
        if self.high is not None:
            keep &= losses < self.high
        count = keep.sum()
        self.num_past_filter += int(count)
        return losses.masked_fill(~keep, 0.0).sum() / count.clamp_min(1).to(losses.dtype)

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return f"low={self.low}, high={self.high}"


class AvgNonZeroReducer(ThresholdReducer):
    """The mean of the losses ``> 0`` (``ThresholdReducer(low=0)``); 0 if none.

    Example:
        >>> import torch
        >>> from dml_bias.reducers import AvgNonZeroReducer
        >>> d = {"loss": {"losses": torch.tensor([0.0, 1.0, 2.0]), "indices": None, "reduction_type": "element"}}
        >>> AvgNonZeroReducer()(d, torch.zeros(3, 2), None)
        tensor(1.5000)
    """

    def __init__(self) -> None:
        super().__init__(low=0)

    def extra_repr(self) -> str:
        """The configuration shown by ``repr`` (none)."""
        return ""


class DivisorReducer(BaseReducer):
    """The sum of the losses divided by the sub-loss's ``"divisor"`` (Proxy-Anchor's default reduction).

    Example:
        >>> import torch
        >>> from dml_bias.reducers import DivisorReducer
        >>> d = {"loss": {"losses": torch.tensor([1.0, 2.0]), "indices": None, "reduction_type": "element",
        ...               "divisor": 4}}
        >>> DivisorReducer()(d, torch.zeros(2, 2), None)
        tensor(0.7500)
    """

    def reduce(self, losses: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
        """``losses.sum() / info["divisor"]``."""
        if "divisor" not in info:
            raise ValueError("DivisorReducer needs a 'divisor' in the loss dictionary; this loss gives none")
        divisor = info["divisor"]
        return losses.sum() / (divisor.to(losses.dtype) if isinstance(divisor, torch.Tensor) else float(divisor))


class DoNothingReducer(BaseReducer):
    """Return the loss dictionary itself (per-element losses, e.g. for custom weighting).

    Example:
        >>> import torch
        >>> from dml_bias.losses import ContrastiveLoss
        >>> from dml_bias.reducers import DoNothingReducer
        >>> out = ContrastiveLoss(reducer=DoNothingReducer())(torch.eye(3), torch.tensor([0, 0, 1]))
        >>> sorted(out), out["pos_loss"]["reduction_type"], out["pos_loss"]["losses"]
        (['neg_loss', 'pos_loss'], 'pos_pair', tensor([1.4142, 1.4142]))
    """

    def forward(  # type: ignore[override]
        self, loss_dict: LossDict, embeddings: torch.Tensor, labels: torch.Tensor | None
    ) -> LossDict:
        """Return ``loss_dict`` unchanged."""
        check_loss_dict(loss_dict)
        return loss_dict


def check_reducer(reducer: Any) -> None:
    """Raise ``TypeError`` unless ``reducer`` is ``None`` or a :class:`BaseReducer`."""
    if reducer is not None and not isinstance(reducer, BaseReducer):
        raise TypeError(
            f"reducer must be a dml_bias.reducers reducer (e.g. MeanReducer()) or None, got {describe(reducer)}"
        )
