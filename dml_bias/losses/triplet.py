r"""Triplet margin loss :cite:`schroff2015facenet`."""

from __future__ import annotations

from dml_bias._checks import check_bool
from dml_bias.distances import BaseDistance
from dml_bias.losses._base import PairLossModule
from dml_bias.losses._common import check_metric, check_nonnegative
from dml_bias.losses.functional import triplet_margin_loss
from dml_bias.reducers import BaseReducer, check_reducer

__all__ = ["TripletMarginLoss"]


class TripletMarginLoss(PairLossModule):
    r"""Triplet margin loss :cite:`schroff2015facenet` over all triplets (or the given ones), PML's defaults.

    For triplets :math:`(a, p, n)` with :math:`y_p = y_a`, :math:`p \ne a`, :math:`y_n \ne y_a` (every such
    triplet, or those in ``indices_tuple``; pairs are combined per shared anchor):

    .. math::

        L = \operatorname{mean}^{>0}_{(a,p,n)} \big[d_{ap} - d_{an} + m\big]_+

    averaging only the triplets with a positive loss (0 if none), as PML's ``AvgNonZeroReducer``. With a
    similarity the hinge is :math:`[s_{an} - s_{ap} + m]_+`. All triplets are handled with a sort and a
    cumulative sum per anchor (:math:`O(NM\log M)`), never an :math:`N \times M \times M` tensor. Use
    :class:`~dml_bias.miners.BatchHardMiner` for batch-hard mining :cite:`hermans2017defense`, or
    :class:`~dml_bias.miners.TripletMarginMiner` for PML's margin-based mining.

    With ``reducer=``, ``swap=True`` or ``smooth_loss=True`` the per-triplet losses are listed as PML does (all
    triplets of the batch, one value per triplet, without ``indices_tuple``).

    Args:
        margin: :math:`m \ge 0`.
        swap: replace :math:`d_{an}` by :math:`\min(d_{an}, d_{pn})` (PML's ``swap``; not with ``ref_emb``).
        smooth_loss: :math:`\operatorname{softplus}` instead of the hinge (PML's ``smooth_loss``).
        triplets_per_anchor: only ``"all"`` (PML's default); PML's random sampling of an integer number of
            triplets per anchor is not provided (mine with :class:`~dml_bias.miners.TripletMarginMiner`).
        distance: ``"euclidean"`` (default), ``"squared_euclidean"``, ``"cosine"``, ``"dot"`` or a
            :mod:`dml_bias.distances` object.
        reducer: a :mod:`dml_bias.reducers` reducer of the per-triplet losses
            (``triplet``); ``None``: PML's ``AvgNonZeroReducer``.

    Shape:
        ``embeddings`` ``(N, D)`` floating, ``labels`` ``(N,)`` integer (or ``None`` with ``indices_tuple``),
        ``ref_emb`` ``(M, D)``, ``ref_labels`` ``(M,)``; output a scalar (float32 for half inputs, else the
        input dtype).

    Example:
        >>> import torch
        >>> from dml_bias.losses import TripletMarginLoss
        >>> from dml_bias.miners import BatchHardMiner
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
        >>> labels = torch.tensor([0, 0, 1])
        >>> TripletMarginLoss(margin=0.1)(emb, labels)
        tensor(0.7934)
        >>> TripletMarginLoss(margin=0.1)(emb, labels, BatchHardMiner()(emb, labels))
        tensor(0.7934)
    """

    _functional = staticmethod(triplet_margin_loss)
    _hyper = ("margin", "distance", "reducer", "swap", "smooth_loss")

    def __init__(
        self,
        margin: float = 0.05,
        swap: bool = False,
        smooth_loss: bool = False,
        triplets_per_anchor: str = "all",
        *,
        distance: str | BaseDistance = "euclidean",
        reducer: BaseReducer | None = None,
    ) -> None:
        super().__init__()
        check_nonnegative(margin, "margin")
        check_metric(distance)
        check_bool(swap, "swap")
        check_bool(smooth_loss, "smooth_loss")
        if triplets_per_anchor != "all":
            raise ValueError(
                f"triplets_per_anchor must be 'all' (sampling triplets per anchor is not provided; use a "
                f"TripletMarginMiner), got {triplets_per_anchor!r}"
            )
        self.margin = float(margin)
        self.swap = swap
        self.smooth_loss = smooth_loss
        self.distance = distance
        check_reducer(reducer)
        self.reducer = reducer
