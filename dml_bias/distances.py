r"""Distance objects with pytorch-metric-learning's names and meaning, accepted by every loss and miner.

Each object maps query embeddings ``(N, D)`` and reference embeddings ``(M, D)`` to an ``(N, M)`` matrix:
``dist(x)`` compares ``x`` with itself, ``dist(q, r)`` queries with references. ``is_inverted`` says whether
larger values mean closer (a similarity: :class:`CosineSimilarity`, :class:`DotProductSimilarity`) or farther
(a distance: :class:`LpDistance`). Pass one as ``distance=`` to a loss of :mod:`dml_bias.losses` or a miner of
:mod:`dml_bias.miners`; the string names (``"cosine"``, ``"dot"``, ``"euclidean"``, ``"squared_euclidean"``) keep
working, and an object equal to one of them (:attr:`BaseDistance.metric`) takes the same code path.

Departure from pytorch-metric-learning: :class:`LpDistance` on float16 inputs computes ``torch.cdist`` in float32
and rounds the result to float16, where PML indexes all :math:`N M` row pairs (an :math:`N M D` tensor).

Example:
    >>> import torch
    >>> from dml_bias.distances import CosineSimilarity, LpDistance
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> CosineSimilarity()(x)
    tensor([[1., 0.],
            [0., 1.]])
    >>> LpDistance(normalize_embeddings=False)(x, x[:1])
    tensor([[0.0000],
            [2.2361]])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dml_bias._checks import check_bool, check_embeddings, check_number, check_same_device

__all__ = ["BaseDistance", "CosineSimilarity", "DotProductSimilarity", "LpDistance"]


class BaseDistance(nn.Module):
    r"""Base of the distance objects: normalise (optionally), compute the matrix, raise it to ``power``.

    Subclasses implement :meth:`compute_mat` (the ``(N, M)`` matrix of already normalised inputs) and
    :meth:`pairwise_distance` (the values of matching rows).

    Args:
        normalize_embeddings: L2-normalise (with the ``p``-norm) the rows before comparing them.
        p: The norm's order (``p > 0``), of the normalisation and of :class:`LpDistance`.
        power: The matrix is raised to this power (``power > 0``; e.g. 2 for squared distances).
        is_inverted: ``True`` for similarities (larger is closer), ``False`` for distances.

    Example:
        >>> import torch
        >>> from dml_bias.distances import LpDistance
        >>> d = LpDistance(power=2)
        >>> d.is_inverted, d.metric
        (False, 'squared_euclidean')
        >>> d.margin(torch.tensor(1.0), torch.tensor(0.25))  # how far x lies beyond y
        tensor(0.7500)
    """

    def __init__(
        self, normalize_embeddings: bool = True, p: float = 2, power: float = 1, is_inverted: bool = False
    ) -> None:
        super().__init__()
        check_bool(normalize_embeddings, "normalize_embeddings")
        self.normalize_embeddings = normalize_embeddings
        check_number(p, "p", low=0.0, low_inclusive=False)
        check_number(power, "power", low=0.0, low_inclusive=False)
        self.p = p
        self.power = power
        check_bool(is_inverted, "is_inverted")
        self.is_inverted = is_inverted

    @property
    def metric(self) -> str | None:
        """The equivalent metric name of :func:`dml_bias.similarity.pairwise`, or ``None`` if there is none."""
        return None

    def forward(self, query_emb: torch.Tensor, ref_emb: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(N, M)`` matrix between ``query_emb`` ``(N, D)`` and ``ref_emb`` ``(M, D)`` (itself if ``None``)."""
        check_embeddings(query_emb, "query_emb")
        if ref_emb is not None:
            check_embeddings(ref_emb, "ref_emb", dim=query_emb.shape[1], dim_source="query_emb.shape[1]")
            check_same_device(query_emb=query_emb, ref_emb=ref_emb)
        q = self.maybe_normalize(query_emb)
        r = q if ref_emb is None else self.maybe_normalize(ref_emb)
        mat = self.compute_mat(q, r)
        if self.power != 1:
            mat = mat**self.power
        return mat

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        """The ``(N, M)`` matrix of (already normalised) inputs, before ``power``."""
        raise NotImplementedError(f"{type(self).__name__}.compute_mat must be implemented by a subclass")

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        """The ``(N,)`` values between row ``i`` of ``query_emb`` and row ``i`` of ``ref_emb`` (no normalisation)."""
        raise NotImplementedError(f"{type(self).__name__}.pairwise_distance must be implemented by a subclass")

    def margin(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """How much closer ``y`` is than ``x``: ``x - y`` for distances, ``y - x`` for similarities."""
        return y - x if self.is_inverted else x - y

    def smallest_dist(self, x: torch.Tensor, dim: int) -> Any:
        """The closest entries along ``dim`` (``max`` for similarities, ``min`` for distances)."""
        return torch.max(x, dim=dim) if self.is_inverted else torch.min(x, dim=dim)

    def largest_dist(self, x: torch.Tensor, dim: int) -> Any:
        """The farthest entries along ``dim`` (``min`` for similarities, ``max`` for distances)."""
        return torch.min(x, dim=dim) if self.is_inverted else torch.max(x, dim=dim)

    def normalize(self, embeddings: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Divide by the ``p``-norm along ``dim`` (``eps = 1e-12``)."""
        return F.normalize(embeddings, p=float(self.p), dim=dim)

    def maybe_normalize(self, embeddings: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """:meth:`normalize` if ``normalize_embeddings``, else the input itself."""
        return self.normalize(embeddings, dim) if self.normalize_embeddings else embeddings

    def get_norm(self, embeddings: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The ``p``-norm along ``dim``."""
        return torch.linalg.vector_norm(embeddings, ord=float(self.p), dim=dim)

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return f"normalize_embeddings={self.normalize_embeddings}, p={self.p}, power={self.power}"


class LpDistance(BaseDistance):
    r"""The :math:`L_p` distance :math:`\lVert \hat q - \hat r \rVert_p` (of normalised rows by default).

    The default (``p=2``, ``power=1``, normalised) is the Euclidean distance between L2-normalised embeddings,
    pytorch-metric-learning's default distance of the pair and triplet losses (``distance="euclidean"``).

    Args:
        normalize_embeddings: Normalise the rows first.
        p: The order of the norm (``p > 0``).
        power: Raise the distances to this power (``power=2``: squared Euclidean).

    Shape:
        ``query_emb`` ``(N, D)``, ``ref_emb`` ``(M, D)`` floating; output ``(N, M)`` in the input dtype (float16
        inputs are compared in float32 and the result rounded to float16).

    Example:
        >>> import torch
        >>> from dml_bias.distances import LpDistance
        >>> LpDistance(p=1, normalize_embeddings=False)(torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
        tensor([[0., 3.],
                [3., 0.]])
    """

    def __init__(self, normalize_embeddings: bool = True, p: float = 2, power: float = 1) -> None:
        super().__init__(normalize_embeddings=normalize_embeddings, p=p, power=power, is_inverted=False)

    @property
    def metric(self) -> str | None:
        """``"euclidean"`` / ``"squared_euclidean"`` for the normalised L2 distance (power 1 / 2), else ``None``."""
        if self.p != 2 or not self.normalize_embeddings:
            return None
        return {1: "euclidean", 2: "squared_euclidean"}.get(self.power)  # type: ignore[call-overload]

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        """``torch.cdist(query_emb, ref_emb, p)`` (in float32 for half-precision inputs)."""
        if query_emb.dtype in (torch.float16, torch.bfloat16) or ref_emb.dtype in (torch.float16, torch.bfloat16):
            out_dtype = torch.promote_types(query_emb.dtype, ref_emb.dtype)
            return torch.cdist(query_emb.float(), ref_emb.float(), p=float(self.p)).to(out_dtype)
        return torch.cdist(query_emb, ref_emb, p=float(self.p))

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        """``||query_emb[i] - ref_emb[i]||_p`` for every row ``i``."""
        return F.pairwise_distance(query_emb, ref_emb, p=float(self.p))


class DotProductSimilarity(BaseDistance):
    r"""The dot product :math:`\hat q^\top \hat r` of the (by default L2-normalised) rows, a similarity.

    As in pytorch-metric-learning the rows are normalised by default (then it equals :class:`CosineSimilarity`);
    pass ``normalize_embeddings=False`` for the raw dot product :math:`q^\top r` (``distance="dot"``).

    Args:
        normalize_embeddings: Normalise the rows first.
        p: The order of the normalising norm.
        power: Raise the similarities to this power.

    Shape:
        ``query_emb`` ``(N, D)``, ``ref_emb`` ``(M, D)`` floating; output ``(N, M)`` in the input dtype.

    Example:
        >>> import torch
        >>> from dml_bias.distances import DotProductSimilarity
        >>> sim = DotProductSimilarity(normalize_embeddings=False)
        >>> sim(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([[11.,  2.]])
    """

    def __init__(self, normalize_embeddings: bool = True, p: float = 2, power: float = 1) -> None:
        super().__init__(normalize_embeddings=normalize_embeddings, p=p, power=power, is_inverted=True)

    @property
    def metric(self) -> str | None:
        """``"dot"`` (``"cosine"`` when normalising) for ``power=1``, else ``None``."""
        if self.power != 1 or (self.normalize_embeddings and self.p != 2):
            return None
        return "cosine" if self.normalize_embeddings else "dot"

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        """``query_emb @ ref_emb.T``."""
        return query_emb @ ref_emb.transpose(-1, -2)

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        """``(query_emb[i] * ref_emb[i]).sum()`` for every row ``i``."""
        return (query_emb * ref_emb).sum(dim=1)


class CosineSimilarity(DotProductSimilarity):
    r"""The cosine similarity :math:`\hat q^\top \hat r` (``distance="cosine"``).

    Args:
        power: Raise the similarities to this power.

    Shape:
        ``query_emb`` ``(N, D)``, ``ref_emb`` ``(M, D)`` floating; output ``(N, M)`` in the input dtype.

    Example:
        >>> import torch
        >>> from dml_bias.distances import CosineSimilarity
        >>> CosineSimilarity()(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]]))
        tensor([[0.6000]])
    """

    def __init__(self, power: float = 1) -> None:
        super().__init__(normalize_embeddings=True, power=power)

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return f"power={self.power}"
