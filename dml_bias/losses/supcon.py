r"""Supervised contrastive loss :cite:`khosla2020supcon`."""

from __future__ import annotations

from dml_bias.distances import BaseDistance
from dml_bias.losses._base import PairLossModule
from dml_bias.losses._common import check_metric, check_positive
from dml_bias.losses.functional import supcon_loss
from dml_bias.reducers import BaseReducer, check_reducer

__all__ = ["SupConLoss"]


class SupConLoss(PairLossModule):
    r"""Supervised contrastive loss :cite:`khosla2020supcon` (the "out" form), as pytorch-metric-learning.

    For anchor :math:`i` with positives :math:`P_i` and the columns :math:`A_i = P_i \cup N_i` (self excluded):

    .. math::

        \ell_i = -\frac{1}{|P_i|} \sum_{p \in P_i}
            \Big(\frac{s_{ip}}{\tau} - \log \sum_{k \in A_i} e^{s_{ik}/\tau}\Big),
        \qquad L = \operatorname{mean}^{>0}_{i: P_i \ne \emptyset} \ell_i

    averaging the anchors with a positive loss. As in PML the loss is 0 when there is no positive pair or no
    negative pair at all. A distance is negated.

    Args:
        temperature: :math:`\tau > 0`.
        distance: ``"cosine"`` (default), ``"dot"``, ``"euclidean"``, ``"squared_euclidean"`` or a
            :mod:`dml_bias.distances` object.
        reducer: a :mod:`dml_bias.reducers` reducer of the per-anchor losses
            (``element``); ``None``: PML's ``AvgNonZeroReducer``.

    Shape:
        ``embeddings`` ``(N, D)`` floating, ``labels`` ``(N,)`` integer (or ``None`` with ``indices_tuple``),
        ``ref_emb`` ``(M, D)``, ``ref_labels`` ``(M,)``; output a scalar (float32 for half inputs, else the
        input dtype).

    Example:
        >>> import torch
        >>> from dml_bias.losses import SupConLoss
        >>> emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> SupConLoss(temperature=1.0)(emb, torch.tensor([0, 0, 1]))
        tensor(0.3133)
    """

    _functional = staticmethod(supcon_loss)
    _hyper = ("temperature", "distance", "reducer")

    def __init__(
        self, temperature: float = 0.1, *, distance: str | BaseDistance = "cosine", reducer: BaseReducer | None = None
    ) -> None:
        super().__init__()
        check_positive(temperature, "temperature")
        check_metric(distance)
        self.temperature = float(temperature)
        self.distance = distance
        check_reducer(reducer)
        self.reducer = reducer
