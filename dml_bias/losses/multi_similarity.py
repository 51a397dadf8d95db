r"""Multi-Similarity loss :cite:`wang2019multi`."""

from __future__ import annotations

from dml_bias._checks import check_number
from dml_bias.distances import BaseDistance
from dml_bias.losses._base import PairLossModule
from dml_bias.losses._common import check_metric, check_positive
from dml_bias.losses.functional import multi_similarity_loss
from dml_bias.reducers import BaseReducer, check_reducer

__all__ = ["MultiSimilarityLoss"]


class MultiSimilarityLoss(PairLossModule):
    r"""Multi-Similarity loss :cite:`wang2019multi`, with pytorch-metric-learning's defaults and call contract.

    With :math:`s_{ik}` the similarity of anchor :math:`i` (a row of ``embeddings``) and item :math:`k` (a row
    of ``ref_emb``, or of ``embeddings`` without :math:`k = i`), :math:`P_i` / :math:`N_i` its positive /
    negative pairs (all of them, or those in ``indices_tuple``):

    .. math::

        L = \frac{1}{N} \sum_{i=1}^{N} \Big[
            \frac{1}{\alpha} \log\Big(1 + \sum_{k \in P_i} e^{-\alpha (s_{ik} - \lambda)}\Big)
          + \frac{1}{\beta} \log\Big(1 + \sum_{k \in N_i} e^{\beta (s_{ik} - \lambda)}\Big) \Big]

    An empty :math:`P_i` or :math:`N_i` contributes 0, and the mean runs over all :math:`N` anchors. With a
    distance :math:`d` (``"euclidean"``, ``"squared_euclidean"``) the exponents become :math:`\alpha(d-\lambda)`
    and :math:`-\beta(d-\lambda)`, as in pytorch-metric-learning. The paper's pair mining is the separate
    :class:`~dml_bias.miners.MultiSimilarityMiner`; the paper's text uses :math:`\lambda = 1`, its code and PML
    :math:`\lambda = 0.5`.

    Both log terms are masked log-sum-exps with ``finfo.min`` sentinels and an appended zero column, computed in
    float32 for half inputs, so :math:`\beta(s - \lambda) = 25` is safe in fp16.

    Args:
        alpha: :math:`\alpha > 0`, the scale of the positive term.
        beta: :math:`\beta > 0`, the scale of the negative term.
        base: :math:`\lambda`, the similarity offset.
        distance: ``"cosine"`` (default), ``"dot"``, ``"euclidean"``, ``"squared_euclidean"`` or a
            :mod:`dml_bias.distances` object.
        reducer: a :mod:`dml_bias.reducers` reducer of the per-anchor losses (``element``); ``None``: their
            mean (PML's ``MeanReducer``).

    Shape:
        ``embeddings`` ``(N, D)`` floating, ``labels`` ``(N,)`` integer, ``ref_emb`` ``(M, D)``,
        ``ref_labels`` ``(M,)``; output a scalar (float32 for half inputs, else the input dtype).

    Example:
        >>> import torch
        >>> from dml_bias.losses import MultiSimilarityLoss
        >>> from dml_bias.miners import MultiSimilarityMiner
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1])
        >>> loss_fn = MultiSimilarityLoss()
        >>> loss_fn(emb, labels)
        tensor(0.6495, grad_fn=<MeanBackward0>)
        >>> loss_fn(emb, labels, MultiSimilarityMiner()(emb, labels)).backward()
    """

    _functional = staticmethod(multi_similarity_loss)
    _hyper = ("alpha", "beta", "base", "distance", "reducer")

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        *,
        distance: str | BaseDistance = "cosine",
        reducer: BaseReducer | None = None,
    ) -> None:
        super().__init__()
        check_positive(alpha, "alpha")
        check_positive(beta, "beta")
        check_number(base, "base")
        check_metric(distance)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)
        self.distance = distance
        check_reducer(reducer)
        self.reducer = reducer
