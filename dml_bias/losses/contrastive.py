r"""Contrastive (pair hinge) loss :cite:`hadsell2006contrastive`."""

from __future__ import annotations

from dml_bias.distances import BaseDistance
from dml_bias.losses._base import PairLossModule
from dml_bias.losses._common import check_contrastive_margins
from dml_bias.losses.functional import contrastive_loss
from dml_bias.reducers import BaseReducer, check_reducer

__all__ = ["ContrastiveLoss"]


class ContrastiveLoss(PairLossModule):
    r"""Contrastive loss :cite:`hadsell2006contrastive` in pytorch-metric-learning's form (non-squared hinges).

    With :math:`d_{ij}` the distance between anchor :math:`i` and item :math:`j` (Euclidean distance of the
    L2-normalised embeddings by default), :math:`P` / :math:`N` the positive / negative pairs (all ordered pairs,
    or those in ``indices_tuple``, repeats counted):

    .. math::

        L = \operatorname{mean}^{>0}_{(i,j) \in P} \big[d_{ij} - m^+\big]_+
          + \operatorname{mean}^{>0}_{(i,j) \in N} \big[m^- - d_{ij}\big]_+

    where :math:`\operatorname{mean}^{>0}` averages only the non-zero terms (0 if none), as PML's
    ``AvgNonZeroReducer``. With a similarity (``"cosine"``, ``"dot"``) the hinges flip to
    :math:`[m^+ - s]_+` and :math:`[s - m^-]_+` (then use e.g. ``pos_margin=1, neg_margin=0``). With no positive
    pair the loss is the negative term alone, and vice versa.

    Args:
        pos_margin: :math:`m^+` (``>= 0`` with a distance).
        neg_margin: :math:`m^-` (``>= 0`` with a distance).
        distance: ``"euclidean"`` (default), ``"squared_euclidean"``, ``"cosine"``, ``"dot"`` or a
            :mod:`dml_bias.distances` object.
        reducer: a :mod:`dml_bias.reducers` reducer, applied to each of the
            sub-losses ``pos_loss`` (``pos_pair``) and ``neg_loss`` (``neg_pair``), which are then summed;
            ``None``: PML's ``AvgNonZeroReducer``.

    Shape:
        ``embeddings`` ``(N, D)`` floating, ``labels`` ``(N,)`` integer (or ``None`` with ``indices_tuple``),
        ``ref_emb`` ``(M, D)``, ``ref_labels`` ``(M,)``; output a scalar (float32 for half inputs, else the
        input dtype).

    Example:
        >>> import torch
        >>> from dml_bias.losses import ContrastiveLoss
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
        >>> ContrastiveLoss()(emb, torch.tensor([0, 0, 1]))
        tensor(2.4142)
    """

    _functional = staticmethod(contrastive_loss)
    _hyper = ("pos_margin", "neg_margin", "distance", "reducer")

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        *,
        distance: str | BaseDistance = "euclidean",
        reducer: BaseReducer | None = None,
    ) -> None:
        super().__init__()
        check_contrastive_margins(pos_margin, neg_margin, distance)
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)
        self.distance = distance
        check_reducer(reducer)
        self.reducer = reducer
