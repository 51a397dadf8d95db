r"""Proxy-Anchor loss :cite:`kim2020proxy`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dml_bias._checks import check_embeddings, check_number
from dml_bias.distances import BaseDistance
from dml_bias.losses._common import (
    check_classification_call,
    check_metric,
    check_nonnegative,
    check_positive,
    class_parameter,
)
from dml_bias.losses.functional import Indices, proxy_anchor_loss
from dml_bias.reducers import BaseReducer, check_reducer

__all__ = ["ProxyAnchorLoss"]


class ProxyAnchorLoss(nn.Module):
    r"""Proxy-Anchor loss :cite:`kim2020proxy` with one learnable proxy per class.

    With :math:`s_{ic}` the cosine similarity of embedding :math:`i` and proxy :math:`p_c`, :math:`X_c^+` the
    batch samples of class :math:`c`, :math:`X_c^-` the others, and :math:`P^+` the classes present in the batch:

    .. math::

        L = \frac{1}{|P^+|} \sum_{c \in P^+} \log\Big(1 + \sum_{i \in X_c^+} e^{-\alpha (s_{ic} - \delta)}\Big)
          + \frac{1}{C} \sum_{c=1}^{C} \log\Big(1 + \sum_{i \in X_c^-} e^{\alpha (s_{ic} + \delta)}\Big)

    The negative term runs over **all** :math:`C` proxies. With a miner's ``indices_tuple`` each sample gets
    pytorch-metric-learning's weight :math:`w_i = \text{count}_i / \max_j \text{count}_j` and :math:`w_i - 1` is
    added inside both exponents (un-mined samples are damped by :math:`e^{-1}`, not dropped).

    Departures from pytorch-metric-learning: ``forward`` never changes the dtype or device of :attr:`proxies`
    (PML replaces ``proxies.data`` by a copy in the embeddings' dtype); the math runs in float32 (float64 if the
    embeddings or proxies are float64) and the exponentials are masked log-sum-exps, so
    :math:`\alpha(1+\delta) = 35.2` is safe for fp16 inputs.

    **Learning rate.** The paper's code trains the proxies with 100 × the model's learning rate. Build the
    optimiser from the model's parameter group plus :meth:`param_groups`::

        optimizer = torch.optim.AdamW(
            [{"params": model.parameters(), "lr": 1e-4}, *loss_fn.param_groups(lr=1e-4)], weight_decay=1e-4
        )

    Args:
        num_classes: the number of classes :math:`C` (labels must lie in ``[0, C)``).
        embedding_size: the embedding size :math:`D`.
        margin: :math:`\delta \ge 0`.
        alpha: :math:`\alpha > 0`.
        distance: ``"cosine"`` (default), another metric of :func:`dml_bias.similarity.pairwise` or a
            :mod:`dml_bias.distances` object.
        reducer: a :mod:`dml_bias.reducers` reducer of the per-class terms (sub-losses ``pos_loss`` and
            ``neg_loss``, ``element``, summed); ``None``: each term summed and divided by its number of classes
            (PML's ``DivisorReducer``).
        device: device of the proxies.
        dtype: dtype of the proxies (float32 by default).

    Attributes:
        proxies: :class:`torch.nn.Parameter` of shape ``(num_classes, embedding_size)``, initialised with
            ``kaiming_normal_(mode="fan_out")``, i.e. :math:`\mathcal{N}(0, 2/C)` as in the paper's code.

    Shape:
        ``embeddings`` ``(N, D)`` floating, ``labels`` ``(N,)`` integer; output a scalar. ``ref_emb`` is not
        supported (``ValueError``), as in pytorch-metric-learning.

    Example:
        >>> import torch
        >>> from dml_bias.losses import ProxyAnchorLoss
        >>> loss_fn = ProxyAnchorLoss(num_classes=3, embedding_size=2)
        >>> with torch.no_grad():
        ...     loss_fn.proxies.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
        Parameter containing: ...
        >>> loss_fn(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
        tensor(3.2400, grad_fn=<AddBackward0>)
        >>> [g["lr"] for g in loss_fn.param_groups(lr=1e-4)]
        [0.01]
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32.0,
        *,
        distance: str | BaseDistance = "cosine",
        reducer: BaseReducer | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_number(num_classes, "num_classes", low=1, integer=True)
        check_number(embedding_size, "embedding_size", low=1, integer=True)
        check_nonnegative(margin, "margin")
        check_positive(alpha, "alpha")
        check_metric(distance)
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.margin = float(margin)
        self.alpha = float(alpha)
        self.distance = distance
        check_reducer(reducer)
        self.reducer = reducer
        self.proxies = class_parameter(self.num_classes, self.embedding_size, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise :attr:`proxies` with ``kaiming_normal_(mode="fan_out")`` (the paper's code)."""
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def param_groups(self, lr: float, proxy_lr_mult: float = 100.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups for the proxies only: ``[{"params": [proxies], "lr": lr * proxy_lr_mult}]``.

        Add the model's own group yourself, e.g. ``[{"params": model.parameters(), "lr": lr}, *groups]``. Other
        options (weight decay, momentum) come from the optimiser's defaults unless you add them to the dict.

        Args:
            lr: the base learning rate (the model's).
            proxy_lr_mult: the factor for the proxies (100 in the paper's code).

        Example:
            >>> from dml_bias.losses import ProxyAnchorLoss
            >>> ProxyAnchorLoss(10, 4).param_groups(lr=0.001, proxy_lr_mult=10.0)[0]["lr"]
            0.01
        """
        check_positive(lr, "lr")
        check_positive(proxy_lr_mult, "proxy_lr_mult")
        return [{"params": [self.proxies], "lr": float(lr) * float(proxy_lr_mult)}]

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: Indices = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss; see the class docstring."""
        labels = check_classification_call(type(self).__name__, labels, ref_emb, ref_labels)
        # The parameter is ours: a width mismatch is the embeddings' (the functional twin blames the parameter).
        check_embeddings(embeddings, "embeddings", dim=self.embedding_size, dim_source="embedding_size")
        return proxy_anchor_loss(
            embeddings,
            labels,
            self.proxies,
            indices_tuple,
            margin=self.margin,
            alpha=self.alpha,
            distance=self.distance,
            reducer=self.reducer,
        )

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
            f"alpha={self.alpha}, distance={self.distance!r}"
        )
