r"""Additive angular margin (ArcFace) loss :cite:`deng2019arcface`."""

from __future__ import annotations

import math

import torch
from torch import nn

from dml_bias._checks import check_embeddings, check_number
from dml_bias._compat import compute_dtype, no_autocast
from dml_bias.distances import BaseDistance
from dml_bias.losses._common import (
    check_classification_call,
    check_metric,
    check_positive,
    class_parameter,
    resolve_distance,
)
from dml_bias.losses.functional import Indices, arcface_loss
from dml_bias.reducers import BaseReducer, check_reducer
from dml_bias.similarity import pairwise

__all__ = ["AdditiveAngularMarginLoss", "ArcFaceLoss"]


def _cosine_logits(embeddings: torch.Tensor, weight: torch.Tensor, scale: float, dim: int) -> torch.Tensor:
    """``scale * cos(embeddings, weight rows)`` ``(N, C)`` in the compute dtype, outside autocast."""
    check_embeddings(embeddings, "embeddings", dim=dim)
    dtype = compute_dtype(embeddings, weight)
    with no_autocast(embeddings.device):
        return scale * pairwise(embeddings.to(dtype), weight.to(dtype), "cosine")


class AdditiveAngularMarginLoss(nn.Module):
    r"""ArcFace :cite:`deng2019arcface` with the margin in radians and ``weight`` laid out as ``nn.Linear``'s.

    The same loss as :class:`ArcFaceLoss` (pytorch-metric-learning's form: margin in degrees, ``W`` of shape
    ``(D, C)``); this form takes the margin in **radians** and holds ``weight`` of shape ``(C, D)``, as
    insightface and :class:`torch.nn.Linear` do. (It was called ``ArcFaceLoss`` before version 0.1.)

    With :math:`c_{ik} = \cos\theta_{ik}` the cosine of embedding :math:`i` and class weight :math:`w_k`:

    .. math::

        L = \frac{1}{N} \sum_i w_i \Big[-\log
            \frac{e^{s\,\psi(\theta_{i y_i})}}{e^{s\,\psi(\theta_{i y_i})} + \sum_{k \ne y_i} e^{s\,c_{ik}}}\Big],
        \qquad
        \psi(\theta) = \begin{cases} \cos(\theta + m) & \theta \le \pi - m \\
                                     \cos\theta - m \sin m & \text{otherwise} \end{cases}

    with miner weights :math:`w_i = \text{count}_i / \max_j \text{count}_j` when ``indices_tuple`` is given
    (1 otherwise), as in pytorch-metric-learning. The second branch (insightface's "easy margin" fallback, also
    PML's) keeps the target logit decreasing in :math:`\theta` where :math:`\theta + m` would pass :math:`\pi`.

    Departures from pytorch-metric-learning: ``margin`` is in **radians** (PML takes degrees: its default 28.6°
    is 0.499 rad; use :class:`ArcFaceLoss` for PML's form); :attr:`weight` has :class:`torch.nn.Linear`'s layout
    ``(num_classes, embedding_size)`` (PML's ``W`` is its transpose); :math:`\cos(\theta+m)` is computed as
    :math:`c\cos m - \sin\theta\,\sin m` with :math:`\sin\theta = \sqrt{1-c^2}` instead of through ``acos``,
    and for :math:`0 < 1-c^2 < 10^{-7}` the square root is replaced by its chord :math:`(1-c^2)/\sqrt{10^{-7}}`,
    so the gradient stays finite at :math:`c = \pm 1` (PML's ``acos`` gives NaN or unbounded gradients there).
    Values are exact except in that sliver (:math:`\theta < 3.2\cdot 10^{-4}` or within that of :math:`\pi`),
    where they differ by at most :math:`8\cdot 10^{-5}\,s\sin m`.
    ``forward`` never changes the dtype or device of :attr:`weight`.

    Args:
        num_classes: the number of classes :math:`C`.
        embedding_size: the embedding size :math:`D`.
        margin: the angular margin :math:`m` in radians, in ``[0, pi)``.
        scale: the logit scale :math:`s > 0`.
        reducer: a :mod:`dml_bias.reducers` reducer of the per-sample losses (``element``); ``None``: their mean
            (PML's ``MeanReducer``).
        device: device of the weight.
        dtype: dtype of the weight (float32 by default).

    Attributes:
        weight: :class:`torch.nn.Parameter` of shape ``(num_classes, embedding_size)``, initialised from
            :math:`\mathcal{N}(0, 1)` as in PML (only its direction matters).

    Shape:
        ``embeddings`` ``(N, D)`` floating, ``labels`` ``(N,)`` integer in ``[0, C)``; output a scalar. ``ref_emb``
        is not supported (``ValueError``).

    Example:
        >>> import torch
        >>> from dml_bias.losses import AdditiveAngularMarginLoss
        >>> loss_fn = AdditiveAngularMarginLoss(num_classes=2, embedding_size=2, margin=0.0, scale=1.0)
        >>> with torch.no_grad():
        ...     loss_fn.weight.copy_(torch.eye(2))
        Parameter containing: ...
        >>> loss_fn(torch.eye(2), torch.tensor([0, 1]))
        tensor(0.3133, grad_fn=<MeanBackward0>)
        >>> loss_fn.get_logits(torch.eye(2))
        tensor([[1., 0.],
                [0., 1.]], grad_fn=<MulBackward0>)
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.5,
        scale: float = 64.0,
        *,
        reducer: BaseReducer | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_number(num_classes, "num_classes", low=1, integer=True)
        check_number(embedding_size, "embedding_size", low=1, integer=True)
        check_number(margin, "margin", low=0.0, high=math.pi, high_inclusive=False)
        check_positive(scale, "scale")
        check_reducer(reducer)
        self.reducer = reducer
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.margin = float(margin)
        self.scale = float(scale)
        self.weight = class_parameter(self.num_classes, self.embedding_size, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Re-initialise :attr:`weight` from :math:`\mathcal{N}(0, 1)`."""
        nn.init.normal_(self.weight)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits ``scale * cos(embeddings, weight)`` of shape ``(N, C)``, without margin.

        Example:
            >>> import torch
            >>> from dml_bias.losses import AdditiveAngularMarginLoss
            >>> AdditiveAngularMarginLoss(5, 3).get_logits(torch.randn(4, 3)).shape
            torch.Size([4, 5])
        """
        return _cosine_logits(embeddings, self.weight, self.scale, self.embedding_size)

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
        return arcface_loss(
            embeddings, labels, self.weight, indices_tuple, margin=self.margin, scale=self.scale, reducer=self.reducer
        )

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
            f"scale={self.scale}"
        )


class ArcFaceLoss(nn.Module):
    r"""ArcFace :cite:`deng2019arcface` in pytorch-metric-learning's form: margin in degrees, ``W`` of shape ``(D, C)``.

    ``ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)`` takes PML's arguments with PML's meaning
    and holds PML's parameter :attr:`W` of shape ``(embedding_size, num_classes)``, so PML code and PML
    checkpoints (``state_dict`` key ``"W"``) carry over unchanged. The loss is :class:`AdditiveAngularMarginLoss`
    (see there for the formula) with margin ``math.radians(margin)`` and ``weight = W.T``; it differs from
    PML's only where PML's ``acos`` is not differentiable (:math:`\cos\theta = \pm 1`, where PML's gradient is
    NaN and ours finite) and in never changing the dtype/device of :attr:`W` inside ``forward``.

    Args:
        num_classes: The number of classes :math:`C`.
        embedding_size: The embedding size :math:`D`.
        margin: The angular margin in **degrees**, in ``[0, 180)`` (PML's default 28.6° ≈ 0.499 rad).
        scale: The logit scale :math:`s > 0` (PML's default 64).
        distance: Only a cosine similarity (``"cosine"`` or :class:`~dml_bias.distances.CosineSimilarity`), as in
            PML.
        reducer: A :mod:`dml_bias.reducers` reducer of the per-sample losses; ``None``: their mean.
        device: Device of :attr:`W`.
        dtype: Dtype of :attr:`W` (float32 by default).

    Attributes:
        W: :class:`torch.nn.Parameter` of shape ``(embedding_size, num_classes)``, initialised from
            :math:`\mathcal{N}(0, 1)` as in PML.
        margin: The margin in degrees, as given (PML's attribute holds radians after construction).

    Shape:
        ``embeddings`` ``(N, D)`` floating, ``labels`` ``(N,)`` integer in ``[0, C)``; output a scalar.

    Example:
        >>> import torch
        >>> from dml_bias.losses import ArcFaceLoss
        >>> loss_fn = ArcFaceLoss(num_classes=2, embedding_size=2, margin=0.0, scale=1.0)
        >>> loss_fn.W.shape
        torch.Size([2, 2])
        >>> with torch.no_grad():
        ...     loss_fn.W.copy_(torch.eye(2))
        Parameter containing: ...
        >>> loss_fn(torch.eye(2), torch.tensor([0, 1]))
        tensor(0.3133, grad_fn=<MeanBackward0>)
        >>> loss_fn.get_logits(torch.tensor([[1.0, 1.0]]))
        tensor([[0.7071, 0.7071]], grad_fn=<MulBackward0>)
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64.0,
        *,
        distance: str | BaseDistance = "cosine",
        reducer: BaseReducer | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_number(num_classes, "num_classes", low=1, integer=True)
        check_number(embedding_size, "embedding_size", low=1, integer=True)
        check_number(margin, "margin", low=0.0, high=180.0, high_inclusive=False)
        check_positive(scale, "scale")
        check_metric(distance)
        if resolve_distance(distance) != "cosine":
            raise ValueError(f"distance must be a cosine similarity for ArcFaceLoss, got {distance!r}")
        check_reducer(reducer)
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.margin = float(margin)
        self.scale = float(scale)
        self.distance = distance
        self.reducer = reducer
        self.W = class_parameter(self.embedding_size, self.num_classes, device, dtype)  # (D, C), as PML's
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Re-initialise :attr:`W` from :math:`\mathcal{N}(0, 1)`."""
        nn.init.normal_(self.W)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits ``scale * cos(embeddings, W columns)`` of shape ``(N, C)``, without margin.

        Example:
            >>> import torch
            >>> from dml_bias.losses import ArcFaceLoss
            >>> ArcFaceLoss(5, 3).get_logits(torch.randn(4, 3)).shape
            torch.Size([4, 5])
        """
        return _cosine_logits(embeddings, self.W.t(), self.scale, self.embedding_size)

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
        check_embeddings(embeddings, "embeddings", dim=self.embedding_size, dim_source="embedding_size")
        return arcface_loss(
            embeddings,
            labels,
            self.W.t(),
            indices_tuple,
            margin=math.radians(self.margin),
            scale=self.scale,
            reducer=self.reducer,
        )

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
            f"scale={self.scale}"
        )
