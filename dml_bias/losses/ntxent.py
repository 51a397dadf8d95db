r"""NT-Xent / InfoNCE loss :cite:`chen2020simclr`."""

from __future__ import annotations

from dml_bias.distances import BaseDistance
from dml_bias.losses._base import PairLossModule
from dml_bias.losses._common import check_metric, check_positive
from dml_bias.losses.functional import ntxent_loss
from dml_bias.reducers import BaseReducer, check_reducer

__all__ = ["NTXentLoss"]


class NTXentLoss(PairLossModule):
    r"""NT-Xent (InfoNCE) loss :cite:`chen2020simclr`, averaged over positive pairs (pytorch-metric-learning's form).

    For each ordered positive pair :math:`(a, p)` with negatives :math:`N_a` of its anchor:

    .. math::

        \ell_{ap} = -\log \frac{e^{s_{ap}/\tau}}{e^{s_{ap}/\tau} + \sum_{n \in N_a} e^{s_{an}/\tau}}
                  = \operatorname{softplus}\Big(\log\sum_{n \in N_a} e^{s_{an}/\tau} - s_{ap}/\tau\Big),
        \qquad L = \operatorname{mean}_{(a,p) \in P} \ell_{ap}

    Other positives of :math:`a` are not in the denominator (unlike :class:`SupConLoss`). A distance is negated.
    No positive pair gives 0.

    Departures from pytorch-metric-learning: PML adds ``finfo(dtype).tiny`` inside the log, which caps every
    pair's loss at :math:`-\log(\text{tiny})` (9.70 in fp16, where the reference batch gives 6.83 instead of
    7.55); here there is no cap and the math runs in float32. PML builds a (positive pairs × negative pairs)
    matrix; here one log-sum-exp per anchor is computed, so time and memory are :math:`O(NM)`. PML returns 0 when
    ``indices_tuple`` holds at most one pair of each kind; here such a tuple is used like any other.

    Args:
        temperature: :math:`\tau > 0` (0.07 as MoCo; SimCLR uses 0.5).
        distance: ``"cosine"`` (default), ``"dot"``, ``"euclidean"``, ``"squared_euclidean"`` or a
            :mod:`dml_bias.distances` object.
        reducer: a :mod:`dml_bias.reducers` reducer of the per-pair losses
            (``pos_pair``); ``None``: their mean (PML's ``MeanReducer``).

    Shape:
        ``embeddings`` ``(N, D)`` floating, ``labels`` ``(N,)`` integer (or ``None`` with ``indices_tuple``),
        ``ref_emb`` ``(M, D)``, ``ref_labels`` ``(M,)``; output a scalar (float32 for half inputs, else the
        input dtype).

    Example:
        >>> import torch
        >>> from dml_bias.losses import NTXentLoss
        >>> emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> NTXentLoss(temperature=1.0)(emb, torch.tensor([0, 0, 1]))
        tensor(0.3133)
    """

    _functional = staticmethod(ntxent_loss)
    _hyper = ("temperature", "distance", "reducer")

    def __init__(
        self, temperature: float = 0.07, *, distance: str | BaseDistance = "cosine", reducer: BaseReducer | None = None
    ) -> None:
        super().__init__()
        check_positive(temperature, "temperature")
        check_metric(distance)
        self.temperature = float(temperature)
        self.distance = distance
        check_reducer(reducer)
        self.reducer = reducer
