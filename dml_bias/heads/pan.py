r"""PAN's Concept-conditioned Similarity Module, its logical attribute gates and its loss :cite:`mishra2021pan`.

* :class:`~dml_bias.heads.ConditionalSimilarity` scores a pair of embeddings through ``K`` conditions: each
  condition has a score :math:`p_k = \sigma(z_k)` and a relevance :math:`w_k` (a softmax over the conditions),
  and the pair score is the convex combination :math:`p = \sum_k w_k p_k \in [0, 1]`. Besides the per-pair
  :meth:`~dml_bias.heads.ConditionalSimilarity.forward`, it ranks a gallery in bounded memory
  (:meth:`~dml_bias.heads.ConditionalSimilarity.score_matrix`, :meth:`~dml_bias.heads.ConditionalSimilarity.topk`).
* :func:`~dml_bias.heads.attribute_gate` turns the binary attributes of the two images of a pair into
  per-condition targets (AND, OR, XOR, XNOR, NOR, NAND, AND_XOR or a callable).
* :func:`~dml_bias.heads.pan_loss` / :class:`~dml_bias.heads.PANLoss`: binary cross-entropy of the pair score
  plus :math:`\lambda` times the masked cross-entropy of the supervised condition scores, in log space.

Matches the official code (github.com/samarth4149/PAN, ``CUB/models/pan.py`` and ``CUB/main_pan.py``) except
where a docstring says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dml_bias._checks import (
    check_choice,
    check_embeddings,
    check_factory_kwargs,
    check_finite,
    check_number,
    check_same_device,
    check_shape,
    check_tensor,
    describe,
)
from dml_bias._compat import compute_dtype, no_autocast
from dml_bias.heads._inputs import autocast_enabled, check_has_data
from dml_bias.metrics._exact import MEMORY_BUDGET, topk_order
from dml_bias.similarity import normalize

__all__ = [
    "GATES",
    "JOINTS",
    "ConditionalSimilarity",
    "ConditionalSimilarityOutput",
    "PANLoss",
    "attribute_gate",
    "pan_loss",
]

#: The joint pair features of :class:`ConditionalSimilarity`.
JOINTS: tuple[str, ...] = ("absdiff", "product", "concat")

#: The named logical gates of :func:`attribute_gate` (``"and_xor"`` doubles the width).
GATES: tuple[str, ...] = ("and", "or", "xor", "xnor", "nor", "nand", "and_xor")


#: Preferred size in bytes of one block of work, by device type: on the CPU a block that stays in the caches
#: (measured fastest for absdiff at D = 512, K = 50 on a 2-core Sapphire Rapids VM), on GPUs a larger one.
_TILE_TARGET: dict[str, int] = {"cpu": 8 * 2**20, "cuda": 512 * 2**20}
_TILE_TARGET_OTHER = 64 * 2**20

#: Most gallery columns of an absdiff tile (CPU timing at D = 512: tiles of 12 x 256 pairs beat 3 x 1000 and
#: 1 x 2500 ones by 5-50 %).
_ABSDIFF_COLUMNS = 256

#: Gallery columns projected per GEMM by the ``"concat"`` joint (one fixed shape for the whole call).
_PROJECTION_CHUNK = 256


class ConditionalSimilarityOutput(NamedTuple):
    r"""What :meth:`ConditionalSimilarity.forward` returns for ``N`` pairs and ``K`` conditions.

    Attributes:
        score: ``(N,)`` pair scores :math:`p = \sum_k w_k p_k` in ``[0, 1]``.
        condition_scores: ``(N, K)`` condition scores :math:`p_k = \sigma(z_k)`.
        relevance: ``(N, K)`` relevance weights :math:`w = \mathrm{softmax}(r)` (rows sum to 1).
        condition_logits: ``(N, K)`` the condition logits :math:`z`.
        log_relevance: ``(N, K)`` :math:`\log w = \mathrm{log\_softmax}(r)`.

    Example:
        >>> import torch
        >>> from dml_bias.heads import ConditionalSimilarity
        >>> out = ConditionalSimilarity(4, 2)(torch.randn(3, 4), torch.randn(3, 4))
        >>> out._fields
        ('score', 'condition_scores', 'relevance', 'condition_logits', 'log_relevance')
        >>> torch.allclose(out.score, (out.relevance * out.condition_scores).sum(1))
        True
    """

    score: torch.Tensor
    condition_scores: torch.Tensor
    relevance: torch.Tensor
    condition_logits: torch.Tensor
    log_relevance: torch.Tensor


@dataclass(frozen=True)
class _Plan:
    """How :meth:`ConditionalSimilarity.score_matrix` splits the work (exposed for tests and benchmarks).

    ``gallery_block`` columns are prepared at a time (cast, transposed or projected); inside a block, tiles of
    ``tile_query`` query rows by ``tile_gallery`` gallery columns are scored. ``"concat"`` projects the gallery
    ``projection_chunk`` columns at a time (0 for the other joints). ``nbytes`` is the estimated peak of the
    extra memory (gallery block, projection chunk, one tile and its temporaries).
    """

    gallery_block: int
    tile_query: int
    tile_gallery: int
    projection_chunk: int
    nbytes: int


def _joint(h1: torch.Tensor, h2: torch.Tensor, joint: str) -> torch.Tensor:
    """The joint pair feature ``(N, D)`` (``(N, 2D)`` for ``"concat"``)."""
    if joint == "absdiff":
        return (h1 - h2).abs()
    if joint == "product":
        return normalize(h1) * normalize(h2)
    return torch.cat([h1, h2], dim=1)


def _sum_conditions_(values: torch.Tensor) -> torch.Tensor:
    """Sum ``(B, K, M)`` over dim 1 by a fixed pairwise tree, in place; ``(B, M)``.

    Every pair ``(b, m)`` is summed in the same order, wherever it sits in the tensor and whatever its shape;
    torch's reductions are not (their vectorised and tail paths round differently), and identical gallery rows
    must get identical scores for the tie rule of :meth:`ConditionalSimilarity.topk`.
    """
    n = values.shape[1]
    while n > 1:
        half = (n + 1) // 2
        values[:, : n - half].add_(values[:, half:n])
        n = half
    return values[:, 0]


def _combine_(logits: torch.Tensor, num_conditions: int) -> torch.Tensor:
    r"""Pair scores from ``(B, 2K, M)`` stacked logits :math:`[-z; r]`, overwriting them; ``(B, M)``.

    :math:`\sum_k e^{r_k - m} / (1 + e^{-z_k}) \,/\, \sum_k e^{r_k - m}` with :math:`m = \max_k r_k`: the
    denominator is at least 1 and :math:`e^{-z} = \infty` gives a term of 0, so nothing overflows or divides by
    zero. The same value as the log-space form of :meth:`ConditionalSimilarity.forward` up to rounding, at a
    fraction of its cost; only element-wise operations and :func:`_sum_conditions_`, so a pair's score does not
    depend on its position (``torch.sigmoid``'s float32 tail path does, hence ``1 / (1 + e^{-z})``).
    """
    neg_z, r = logits[:, :num_conditions], logits[:, num_conditions:]
    r.sub_(r.amax(dim=1, keepdim=True)).exp_()
    neg_z.exp_().add_(1.0)
    terms = torch.div(r, neg_z, out=neg_z)  # e^{r - m} sigma(z)
    numerator = _sum_conditions_(terms)
    return numerator.div_(_sum_conditions_(r)).clamp_(0.0, 1.0)


def _balanced(total: int, largest: int) -> int:
    """The smallest tile size that covers ``total`` in as few tiles of at most ``largest`` as possible.

    Partial tiles are padded to full size, so 5000 columns in tiles of 3225 would waste 29 % of the work;
    ``_balanced(5000, 3225)`` is 2500.
    """
    count = -(-total // largest)
    return -(-total // count)


def _merge_bytes(dtype: torch.dtype) -> int:
    """Bytes per scored pair of a top-k merge: the concatenated scores and indices, sorted, and the gather."""
    return 3 * (torch.empty((), dtype=dtype).element_size() + 8)


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None:
        check_number(chunk_size, "chunk_size", low=1, integer=True)


def _wider_dtypes(dtype: torch.dtype) -> list[torch.dtype]:
    """``dtype`` and the wider floating dtypes to fall back on, narrowest first."""
    wider = [d for d in (torch.float32, torch.float64) if torch.finfo(d).bits > torch.finfo(dtype).bits]
    return [dtype, *wider]


class ConditionalSimilarity(nn.Module):
    r"""PAN's Concept-conditioned Similarity Module (CSM) :cite:`mishra2021pan`.

    For a pair of embeddings :math:`h_1, h_2 \in \mathbb{R}^D` and a joint feature :math:`j`:

    .. math::

        z = W_s j + b_s, \qquad r = W_r j + b_r, \qquad
        p_k = \sigma(z_k), \qquad w = \mathrm{softmax}(r), \qquad p = \sum_{k=1}^K w_k\, p_k \in [0, 1].

    Joint features (``joint=``):

    * ``"absdiff"`` (the official code's choice): :math:`j = |h_1 - h_2|`, symmetric in the two inputs.
    * ``"product"``: :math:`j = \hat h_1 \odot \hat h_2` with :math:`\hat h = h / \max(\lVert h\rVert_2, 10^{-12})`
      (option 2 of the official TensorFlow decoder, whose ``l2_normalize`` clamps the squared norm at
      :math:`10^{-12}` instead: the same except for near-zero rows); symmetric.
    * ``"concat"``: :math:`j = [h_1; h_2] \in \mathbb{R}^{2D}` (option 3); not symmetric.

    With ``K = 1`` the module is the plain ``sigmoid(linear(j))`` pair classifier (the CGAE baseline).

    The score is computed in log space, :math:`p = \exp(\mathrm{logsumexp}_k(\log w_k + \log\sigma(z_k)))`,
    clamped to at most 1 against rounding, so it never leaves ``[0, 1]`` (the official code clamps too).

    Precision: the linear layers run in the promoted dtype of the inputs and the parameters (a float32 head gives
    float32 logits for fp16/bf16 inputs and float64 ones for float64 inputs; under ``torch.autocast`` they follow
    autocast); the log-space part runs in at least float32, and every field is returned in that promoted dtype.

    Range: the inputs must be finite (NaN or infinite values raise :class:`ValueError`, as do non-finite
    parameters). Where the joint feature or the logits overflow the promoted dtype (e.g. ``h1 = 3e38``,
    ``h2 = -3e38`` in float32, whose difference overflows), the computation runs in a wider dtype (float32, then
    float64) and the fields are cast back: the scores are right, and only logits beyond the dtype's range
    saturate to ``±inf``. :meth:`forward` detects this from its logits (one small reduction and one device
    synchronisation per call) and recomputes; :meth:`score_matrix` and :meth:`topk` choose the dtype up front from
    a bound (the inputs' largest magnitude and the weights' row sums). Inputs too large even for float64 raise
    :class:`ValueError`. ``"product"`` normalises with :func:`dml_bias.similarity.normalize`,
    which does not overflow (rows of ``1e20`` are fine).

    Initialisation as the official PyTorch code: Xavier-uniform weights and :class:`torch.nn.Linear`'s default
    biases, :math:`\mathcal{U}(-1/\sqrt{\text{fan\_in}}, 1/\sqrt{\text{fan\_in}})` (the TensorFlow version
    starts the biases at zero and never uses the relevance bias).

    Dropout (``dropout > 0``, training mode only) is applied to ``h1`` and ``h2`` before the joint feature, where
    the official decoder drops its node features (both set it to 0). Each row gets its own mask: unlike the
    official graph code, a pair head does not know which rows are the same item.

    Args:
        in_features: The embedding size :math:`D`.
        num_conditions: The number of conditions :math:`K \ge 1`.
        joint: ``"absdiff"`` (default), ``"product"`` or ``"concat"``.
        dropout: Drop probability in ``[0, 1)`` on the inputs (training mode).
        device: Device of the parameters.
        dtype: Dtype of the parameters (float32 by default).

    Attributes:
        condition_layer: :class:`torch.nn.Linear` ``(D', K)`` giving the condition logits :math:`z`
            (:math:`D' = D`, or :math:`2D` for ``"concat"``).
        relevance_layer: :class:`torch.nn.Linear` ``(D', K)`` giving the relevance logits :math:`r`.

    Shape:
        ``h1``, ``h2``: ``(N, D)`` floating; output: a :class:`ConditionalSimilarityOutput` of ``(N,)`` and
        ``(N, K)`` tensors.

    Example:
        >>> import torch
        >>> from dml_bias.heads import ConditionalSimilarity
        >>> head = ConditionalSimilarity(8, num_conditions=4)
        >>> out = head(torch.randn(5, 8), torch.randn(5, 8))
        >>> out.score.shape, out.condition_scores.shape, out.relevance.sum(1)
        (torch.Size([5]), torch.Size([5, 4]), tensor([1.0000, 1.0000, 1.0000, 1.0000, 1.0000], grad_fn=...))
        >>> head.score_matrix(torch.randn(3, 8), torch.randn(7, 8)).shape
        torch.Size([3, 7])
    """

    def __init__(
        self,
        in_features: int,
        num_conditions: int,
        *,
        joint: str = "absdiff",
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_number(in_features, "in_features", low=1, integer=True)
        check_number(num_conditions, "num_conditions", low=1, integer=True)
        check_choice(joint, "joint", JOINTS)
        check_number(dropout, "dropout", low=0.0, high=1.0, high_inclusive=False)
        device = check_factory_kwargs(device, dtype)
        self.in_features = int(in_features)
        self.num_conditions = int(num_conditions)
        self.joint = joint
        self.dropout = float(dropout)
        width = 2 * self.in_features if joint == "concat" else self.in_features
        self.condition_layer = nn.Linear(width, self.num_conditions, device=device, dtype=dtype)
        self.relevance_layer = nn.Linear(width, self.num_conditions, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and :class:`torch.nn.Linear`'s default biases, as the official PyTorch code."""
        for layer in (self.condition_layer, self.relevance_layer):
            layer.reset_parameters()
            nn.init.xavier_uniform_(layer.weight)

    @staticmethod
    def _parameters_in(layer: nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's weight and bias in ``dtype`` (a differentiable cast only where the dtypes differ)."""
        return layer.weight.to(dtype), layer.bias.to(dtype)

    def _check_pair(self, h1: torch.Tensor, h2: torch.Tensor) -> None:
        check_embeddings(h1, "h1", dim=self.in_features)
        check_embeddings(h2, "h2", dim=self.in_features)
        check_shape(h2, "h2", ("N", "D"), {"N": h1.shape[0]}, sources={"N": "h1.shape[0]"})
        check_same_device(h1=h1, h2=h2, weight=self.condition_layer.weight)
        check_has_data(h1=h1, h2=h2)

    def _work_dtype(
        self, dtype: torch.dtype, first: torch.Tensor, second: torch.Tensor, names: tuple[str, str]
    ) -> tuple[torch.dtype, float]:
        r"""Check that the inputs and the parameters are finite; the narrowest dtype ``>= dtype`` that cannot overflow.

        Returns that dtype and the inputs' largest magnitude.

        One host sync for everything: the inputs' extremes (:func:`torch.aminmax`, no input-sized temporary) and
        the weights' largest row sum of magnitudes and largest bias. With :math:`J` a bound on the joint feature's
        magnitude (``absdiff``: the sum of the two inputs' largest magnitudes; ``concat``: the larger one;
        ``product``: 1), every logit and every partial sum of its GEMM is at most
        :math:`L = J \max_k \lVert W_k \rVert_1 + \max_k |b_k|`; a dtype is safe when :math:`4J` and
        :math:`4L` fit it (the margin covers rounding and the difference of two logits).
        """
        layers = (self.condition_layer, self.relevance_layer)
        weight = torch.cat([layer.weight.detach() for layer in layers])
        bias = torch.cat([layer.bias.detach() for layer in layers])
        parts = [*torch.aminmax(first.detach()), *torch.aminmax(second.detach())]
        parts += [weight.abs().sum(dim=1).amax(), bias.abs().amax()]
        values = torch.stack([t.to(torch.float64) for t in parts]).tolist()
        for name, tensor, pair in ((names[0], first, values[0:2]), (names[1], second, values[2:4])):
            if not all(math.isfinite(v) for v in pair):
                check_finite(tensor, name)
        row_sum, bias_max = values[4], values[5]
        if not (math.isfinite(row_sum) and math.isfinite(bias_max)):
            raise ValueError(
                "the parameters of ConditionalSimilarity (condition_layer, relevance_layer) must be finite, got NaN "
                "or infinite values (did the training diverge?)"
            )
        first_max, second_max = max(-values[0], values[1]), max(-values[2], values[3])
        if self.joint == "absdiff":
            joint_max = first_max + second_max
        elif self.joint == "concat":
            joint_max = max(first_max, second_max)
        else:  # the rows are normalised; their norms are computed without overflow (see normalize)
            joint_max = 1.0
        logit_max = joint_max * row_sum + bias_max
        for candidate in _wider_dtypes(dtype):
            limit = torch.finfo(candidate).max / 4
            if joint_max < limit and logit_max < limit:
                return candidate, max(first_max, second_max)
        raise ValueError(
            f"{names[0]} and {names[1]} must be small enough for the {self.joint!r} joint feature and the condition "
            f"logits to fit float64, got largest magnitudes {first_max:.3g} and {second_max:.3g} (logits up to "
            f"about {logit_max:.3g}); rescale the embeddings"
        )

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> ConditionalSimilarityOutput:
        """Score ``N`` pairs ``(h1[i], h2[i])``; see the class docstring.

        Args:
            h1: ``(N, D)`` floating-point embeddings of the first items.
            h2: ``(N, D)`` floating-point embeddings of the second items, on the same device.

        Returns:
            A :class:`ConditionalSimilarityOutput`.

        Raises:
            TypeError: Non-tensor or non-floating inputs.
            ValueError: Shapes that are not ``(N, in_features)`` for both, different devices, NaN or infinite
                values (in the inputs or the parameters), or inputs too large for float64 (see the class
                docstring).

        Example:
            >>> import torch
            >>> from dml_bias.heads import ConditionalSimilarity
            >>> head = ConditionalSimilarity(2, 1)
            >>> with torch.no_grad():
            ...     head.condition_layer.weight.fill_(1.0)
            ...     head.condition_layer.bias.zero_()
            Parameter containing: ...
            >>> head(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])).score  # sigmoid(1)
            tensor([0.7311], grad_fn=<ClampBackward1>)
        """
        self._check_pair(h1, h2)
        out_dtype = torch.promote_types(torch.promote_types(h1.dtype, h2.dtype), self.condition_layer.weight.dtype)
        # Finite logits (one small reduction and one sync) mean finite inputs and parameters and no overflow on the
        # way: a NaN or inf anywhere reaches them. Otherwise find the culprit, or redo the pairs in a wider dtype.
        for dtype in _wider_dtypes(out_dtype):
            z, r = self._logits(h1, h2, dtype)
            extremes = torch.stack([*torch.aminmax(z.detach()), *torch.aminmax(r.detach())])
            if all(math.isfinite(v) for v in extremes.double().tolist()):
                break
            self._work_dtype(dtype, h1, h2, ("h1", "h2"))  # raises for NaN/inf inputs or parameters
        else:
            self._work_dtype(torch.float64, h1, h2, ("h1", "h2"))  # raises: too large even for float64
            raise ValueError("h1 and h2 give condition logits that are not finite in float64; rescale the embeddings")
        work = compute_dtype(z, r)  # float32 for half logits, so the log-space math cannot underflow
        log_w = torch.log_softmax(r.to(work), dim=1)
        log_p = torch.logsumexp(log_w + F.logsigmoid(z.to(work)), dim=1)
        if not autocast_enabled(z.device):
            z = z.to(out_dtype)  # under autocast the logits keep autocast's dtype
        return ConditionalSimilarityOutput(
            score=log_p.exp().clamp(max=1.0).to(z.dtype),
            condition_scores=torch.sigmoid(z),
            relevance=log_w.exp().to(z.dtype),
            condition_logits=z,
            log_relevance=log_w.to(z.dtype),
        )

    def _logits(self, h1: torch.Tensor, h2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition and relevance logits ``(N, K)`` of the pairs, computed in ``dtype`` (dropout in training)."""
        x1, x2 = h1.to(dtype), h2.to(dtype)
        if self.dropout > 0.0 and self.training:
            x1, x2 = F.dropout(x1, self.dropout, True), F.dropout(x2, self.dropout, True)
        j = _joint(x1, x2, self.joint)
        z = F.linear(j, *self._parameters_in(self.condition_layer, dtype))
        r = F.linear(j, *self._parameters_in(self.relevance_layer, dtype))
        return z, r

    # ------------------------------------------------------------------------------------------------------------
    # Ranking a gallery

    def _check_sets(
        self, query: torch.Tensor, gallery: torch.Tensor, chunk_size: int | None
    ) -> tuple[torch.dtype, torch.dtype, bool]:
        """Validate the inputs; the result dtype, the compute dtype and whether norms need float64.

        The compute dtype is the result dtype, or a wider one where the logits could overflow; the gallery's norms
        (``"product"``) are taken in float64 where they could overflow the compute dtype.
        """
        check_embeddings(query, "query", dim=self.in_features)
        check_embeddings(gallery, "gallery", dim=self.in_features)
        check_same_device(query=query, gallery=gallery, weight=self.condition_layer.weight)
        check_has_data(query=query, gallery=gallery)
        _check_chunk_size(chunk_size)
        dtype = compute_dtype(query, gallery, self.condition_layer.weight)
        # Finite inputs and parameters (min/max first: no input-sized temporary unless it fails), and a dtype
        # in which nothing overflows.
        work, largest = self._work_dtype(dtype, query, gallery, ("query", "gallery"))
        wide_norms = largest * math.sqrt(self.in_features) >= math.sqrt(torch.finfo(work).max) / 2
        return dtype, work, wide_norms

    def _stacked(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(2K, D')`` weights and ``(2K,)`` biases giving ``[-z; r]``, detached, in ``dtype``.

        The condition rows are negated (exact), so the GEMMs yield :math:`-z` and :func:`_combine_` saves a pass.
        """
        weight = torch.cat([-self.condition_layer.weight, self.relevance_layer.weight]).detach().to(dtype)
        bias = torch.cat([-self.condition_layer.bias, self.relevance_layer.bias]).detach().to(dtype)
        return weight, bias

    def _plan(
        self,
        num_query: int,
        num_gallery: int,
        dtype: torch.dtype,
        device: torch.device,
        chunk_size: int | None,
        budget: int,
        extra_per_pair: int = 0,
    ) -> _Plan:
        """Choose the gallery block and tile sizes so that the extra memory stays within ``budget`` bytes.

        ``extra_per_pair``: bytes per scored pair that the caller keeps besides the tile (the top-k merge).
        """
        item = torch.empty((), dtype=dtype).element_size()
        dim, k2 = self.in_features, 2 * self.num_conditions
        # Memory that does not depend on the tiles: the stacked weights.
        width = 2 * dim if self.joint == "concat" else dim
        fixed = item * k2 * (width + 1)
        # Bytes per column of a prepared gallery block (its transposed copy, or its projection).
        per_column = item * (k2 if self.joint == "concat" else dim)
        # Bytes per scored pair of a tile, and per query row of a tile (the padded query tile).
        if self.joint == "absdiff":
            per_pair, per_query_row = item * (dim + k2 + 4), item * dim
        elif self.joint == "product":
            per_pair, per_query_row = item * (k2 + 4), item * (k2 * dim + dim + 1)
        else:
            per_pair, per_query_row = item * (k2 + 4), item * (dim + k2)
        per_pair += extra_per_pair
        free = max(budget - fixed, 1)
        max_block = max(1, min(num_gallery, (free // 4) // per_column))
        # concat projects the gallery in fixed-width chunks: (D, c) inputs and (2K, c) projections.
        chunk = min(_PROJECTION_CHUNK, max_block) if self.joint == "concat" else 0
        chunk_bytes = chunk * item * (dim + k2)
        room = free - max_block * per_column - chunk_bytes
        tile_bytes = max(1, min(_TILE_TARGET.get(device.type, _TILE_TARGET_OTHER), room))
        if chunk_size is not None:
            tile_query = min(chunk_size, num_query)
            tile_gallery = (tile_bytes - tile_query * per_query_row) // (tile_query * per_pair)
        else:
            # Wide tiles first (contiguous gallery columns), then as many query rows as the target allows;
            # absdiff reads its gallery columns once per tile, so a few query rows per tile pay off.
            tile_gallery = (tile_bytes - per_query_row) // per_pair
            if self.joint == "absdiff":
                tile_gallery = min(tile_gallery, _ABSDIFF_COLUMNS)
        tile_gallery = _balanced(min(num_gallery, max_block), max(1, min(max_block, tile_gallery)))
        if chunk_size is None:
            tile_query = max(1, min(num_query, tile_bytes // (per_query_row + tile_gallery * per_pair)))
            tile_query = _balanced(num_query, tile_query)
        # A block holds whole tiles (the last tile of a block is padded, so every GEMM has one shape).
        gallery_block = max_block // tile_gallery * tile_gallery
        tile = tile_query * (per_query_row + tile_gallery * per_pair)
        nbytes = fixed + gallery_block * per_column + chunk_bytes + tile
        return _Plan(gallery_block, tile_query, tile_gallery, chunk, nbytes)

    def _scored_tiles(
        self, query: torch.Tensor, gallery: torch.Tensor, dtype: torch.dtype, plan: _Plan, wide_norms: bool = False
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield ``(row, column, scores)`` tiles covering the ``(Q, G)`` score matrix, gallery columns in order.

        Every GEMM of one call has the same shape (partial tiles are padded with zeros and cut afterwards): BLAS
        results depend on the shape but not on a column's position, so identical gallery rows get identical
        scores.
        """
        num_k, dim = self.num_conditions, self.in_features
        tq, tg = plan.tile_query, plan.tile_gallery
        weight, bias = self._stacked(dtype)
        num_query, num_gallery = query.shape[0], gallery.shape[0]
        device = query.device
        # Buffers reused by every tile: one tile's memory at a time, and no page faults on fresh allocations.
        q_tile = torch.zeros(tq, dim, dtype=dtype, device=device)
        logits_buffer = torch.empty(tq * 2 * num_k * tg, dtype=dtype, device=device)
        if self.joint == "absdiff":
            diff = torch.empty(dim, tq, tg, dtype=dtype, device=device)
        elif self.joint == "product":
            scaled = torch.empty(tq, 2 * num_k, dim, dtype=dtype, device=device)
        for g0 in range(0, num_gallery, plan.gallery_block):
            rows = gallery[g0 : g0 + plan.gallery_block]
            num_cols = rows.shape[0]
            width = -(-num_cols // tg) * tg  # whole tiles
            if self.joint == "concat":
                prepared = torch.zeros(2 * num_k, width, dtype=dtype, device=device)
                step = plan.projection_chunk
                chunk = torch.zeros(dim, step, dtype=dtype, device=device)
                projected = torch.empty(2 * num_k, step, dtype=dtype, device=device)
                for c0 in range(0, num_cols, step):
                    part = rows[c0 : c0 + step]
                    chunk[:, : part.shape[0]].copy_(part.T)
                    chunk[:, part.shape[0] :] = 0
                    torch.mm(weight[:, dim:], chunk, out=projected)  # (2K, step): one shape for every chunk
                    prepared[:, c0 : c0 + part.shape[0]] = projected[:, : part.shape[0]]
                del chunk, projected
            else:
                prepared = torch.zeros(dim, width, dtype=dtype, device=device)  # (D, width): gallery columns
                prepared[:, :num_cols].copy_(rows.T)
                if self.joint == "product":
                    # With wide_norms in float64: the squares of a float32 row of 1e20 overflow float32.
                    norm_dtype = torch.float64 if wide_norms else dtype
                    norm = torch.linalg.vector_norm(rows, dim=1, dtype=norm_dtype).clamp_min_(1e-12)
                    prepared[:, :num_cols].div_(norm)
            for q0 in range(0, num_query, tq):
                nq = min(tq, num_query - q0)
                q_tile[:nq] = query[q0 : q0 + nq]
                q_tile[nq:] = 0
                if self.joint == "concat":
                    # z(q, g) = W_1 q + W_2 g + b: an outer sum of two projections.
                    query_logits = torch.addmm(bias, q_tile, weight[:, :dim].T)  # (tq, 2K)
                elif self.joint == "product":
                    torch.mul(normalize(q_tile)[:, None, :], weight[None], out=scaled)  # (tq, 2K, D)
                for c0 in range(0, num_cols, tg):
                    nc = min(tg, num_cols - c0)
                    columns = prepared[:, c0 : c0 + tg]
                    if self.joint == "absdiff":
                        torch.sub(q_tile.T[:, :, None], columns[:, None, :], out=diff).abs_()
                        logits = logits_buffer.view(2 * num_k, tq * tg)
                        torch.addmm(bias[:, None], weight, diff.view(dim, tq * tg), out=logits)
                        scores = _combine_(logits.view(1, 2 * num_k, tq * tg), num_k).view(tq, tg)
                    elif self.joint == "product":
                        logits = logits_buffer.view(tq * 2 * num_k, tg)
                        torch.mm(scaled.view(tq * 2 * num_k, dim), columns, out=logits)
                        logits = logits.view(tq, 2 * num_k, tg).add_(bias[None, :, None])
                        scores = _combine_(logits, num_k)
                    else:
                        logits = logits_buffer[: nq * 2 * num_k * nc].view(nq, 2 * num_k, nc)
                        torch.add(query_logits[:nq, :, None], columns[None, :, :nc], out=logits)
                        scores = _combine_(logits, num_k)
                    yield q0, g0 + c0, scores[:nq, :nc]
            del prepared, columns  # before the next block is prepared

    def score_matrix(
        self, query: torch.Tensor, gallery: torch.Tensor, *, chunk_size: int | None = None
    ) -> torch.Tensor:
        r"""Scores of every query against every gallery item, ``(Q, G)``, in bounded memory.

        Entry ``[i, j]`` equals ``forward(query[i:i+1], gallery[j:j+1]).score`` (up to rounding) in evaluation
        semantics: **dropout is never applied**, whatever the module's mode. It runs under
        :class:`torch.no_grad` and the result carries no gradient (train with :meth:`forward` on sampled pairs;
        a graph through ``Q x G`` joint features would not fit in memory).

        The ``Q x G x D`` joint features are never materialised:

        * ``"absdiff"``: tiles of query rows x gallery columns; each tile's ``(D, P)`` absolute differences
          (a few MiB, in cache) go through **one** GEMM with the stacked ``(2K, D)`` condition and relevance
          weights.
        * ``"product"``: condition ``k``'s logit is :math:`(\hat q \odot W_k) \cdot \hat g + b_k`, so each tile
          is one GEMM of the weighted queries ``(tq * 2K, D)`` with the normalised gallery.
        * ``"concat"``: :math:`z = W_1 q + W_2 g + b` is an outer sum of two projections (two GEMMs overall).

        The combination :math:`\sum_k e^{r_k - m} \sigma(z_k) / \sum_k e^{r_k - m}` (:math:`m = \max_k r_k`) is
        the same value as the forward's log-space one, computed in place. Every GEMM of a call has one shape
        (partial tiles are padded) and the sums over the conditions run in a fixed order, so identical gallery
        rows get bit-identical scores wherever they sit, and :meth:`topk` with the same ``chunk_size`` sees
        exactly these scores (checked on the CPU; on GPUs this relies on the BLAS giving position-independent
        results within one GEMM shape).

        Precision: float32, or float64 if the query, the gallery or the parameters are float64 (half inputs
        are upcast); matmuls follow torch's precision settings (TF32 if the user enabled it). Inputs large enough
        to overflow float32 logits (see the class docstring) are scored in float64 and returned in float32.

        Args:
            query: ``(Q, D)`` floating-point embeddings; must be finite.
            gallery: ``(G, D)`` floating-point embeddings on the same device; must be finite.
            chunk_size: Query rows per tile. ``None`` (default) derives the tiles from a 2 GiB budget for the
                extra memory (``dml_bias.heads.pan.MEMORY_BUDGET``; the returned matrix not counted) and a
                cache-sized target.
                A given ``chunk_size`` keeps at least one gallery column per tile, so the tile of a huge
                ``chunk_size`` may exceed the budget.

        Returns:
            ``(Q, G)`` scores in ``[0, 1]`` in the compute dtype above, without gradient.

        Raises:
            TypeError: Non-tensor or non-floating inputs; ``chunk_size`` not an integer.
            ValueError: Wrong shapes, ``D != in_features``, different devices, NaN/inf values (in the inputs or
                the parameters), inputs too large for float64, ``chunk_size < 1``.

        Example:
            >>> import torch
            >>> from dml_bias.heads import ConditionalSimilarity
            >>> head = ConditionalSimilarity(4, 3).eval()
            >>> q, g = torch.randn(2, 4), torch.randn(5, 4)
            >>> s = head.score_matrix(q, g)
            >>> torch.allclose(s[1, 3], head(q[1:2], g[3:4]).score[0])
            True
        """
        out_dtype, dtype, wide_norms = self._check_sets(query, gallery, chunk_size)
        # The same plan as topk (its merge memory included), so both see bit-identical scores.
        plan = self._plan(
            query.shape[0], gallery.shape[0], dtype, query.device, chunk_size, MEMORY_BUDGET, _merge_bytes(dtype)
        )
        out = torch.empty(query.shape[0], gallery.shape[0], dtype=dtype, device=query.device)
        with torch.no_grad():
            for q0, g0, scores in self._scored_tiles(query, gallery, dtype, plan, wide_norms):
                out[q0 : q0 + scores.shape[0], g0 : g0 + scores.shape[1]] = scores
        return out.to(out_dtype)

    def topk(
        self, query: torch.Tensor, gallery: torch.Tensor, k: int, *, chunk_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best-scoring gallery items of every query, best first, streaming over gallery blocks.

        The scores are those of :meth:`score_matrix` (evaluation semantics, no gradient); the ``Q x G`` matrix
        is never formed. Ties are broken by the lower gallery index, as in :func:`dml_bias.metrics.knn`: the
        gallery is visited in increasing order and each tile is merged into the running top-``k`` by a stable
        sort, so an equal score seen later (a higher index) never overtakes an earlier one.

        Args:
            query: ``(Q, D)`` floating-point embeddings; must be finite.
            gallery: ``(G, D)`` floating-point embeddings on the same device; must be finite.
            k: Number of items, ``1 <= k <= G``.
            chunk_size: Query rows per tile, as in :meth:`score_matrix` (``None``: from the 2 GiB budget).

        Returns:
            ``(scores, indices)``, both ``(Q, k)``: the scores (dtype as :meth:`score_matrix`) and the int64
            gallery indices, best first.

        Raises:
            TypeError: As :meth:`score_matrix`; ``k`` not an integer.
            ValueError: As :meth:`score_matrix`; ``k`` out of range.

        Example:
            >>> import torch
            >>> from dml_bias.heads import ConditionalSimilarity
            >>> head = ConditionalSimilarity(4, 3).eval()
            >>> g = torch.randn(3, 4)
            >>> scores, idx = head.topk(torch.randn(2, 4), torch.cat([g, g]), k=6)  # every item twice
            >>> scores.shape
            torch.Size([2, 6])
            >>> # each item's two copies tie and come next to each other, the lower index (the first copy) first
            >>> bool((scores[:, 0::2] == scores[:, 1::2]).all()), bool((idx[:, 0::2] + 3 == idx[:, 1::2]).all())
            (True, True)
        """
        out_dtype, dtype, wide_norms = self._check_sets(query, gallery, chunk_size)
        check_number(k, "k", low=1, high=gallery.shape[0], integer=True)
        num_query = query.shape[0]
        # The merge concatenates a tile's scores and indices with the running top-k and sorts them.
        plan = self._plan(
            num_query, gallery.shape[0], dtype, query.device, chunk_size, MEMORY_BUDGET, _merge_bytes(dtype)
        )
        # Sentinels (score -1, below every real score in [0, 1]) fill the lists until k items have been seen.
        best_scores = torch.full((num_query, k), -1.0, dtype=dtype, device=query.device)
        best_index = torch.full((num_query, k), -1, dtype=torch.long, device=query.device)
        with torch.no_grad():
            for q0, g0, scores in self._scored_tiles(query, gallery, dtype, plan, wide_norms):
                rows = slice(q0, q0 + scores.shape[0])
                index = torch.arange(g0, g0 + scores.shape[1], device=query.device).expand_as(scores)
                cand_scores = torch.cat([best_scores[rows], scores], dim=1)
                cand_index = torch.cat([best_index[rows], index], dim=1)
                order = topk_order(cand_scores, cand_index, k)
                best_scores[rows] = cand_scores.gather(1, order)
                best_index[rows] = cand_index.gather(1, order)
        return best_scores.to(out_dtype), best_index

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        return (
            f"in_features={self.in_features}, num_conditions={self.num_conditions}, joint={self.joint!r}, "
            f"dropout={self.dropout}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Attribute gates


def _as_binary(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x != 0`` as a bool tensor; raise unless every value is 0 or 1 (or ``x`` is bool)."""
    check_tensor(x, name)
    check_has_data(**{name: x})
    if x.dtype.is_complex:
        raise TypeError(f"{name} must be a bool, integer or floating tensor of 0/1 values, got {describe(x)}")
    if x.dtype == torch.bool:
        return x
    bad = (x != 0) & (x != 1)
    if bool(bad.any()):
        example = x[bad].flatten()[0].item()
        raise ValueError(
            f"{name} must hold binary values (bool, or 0 and 1 only), got {int(bad.sum())} other value(s) "
            f"such as {example!r} in a tensor of {describe(x)}"
        )
    return x != 0


def _gate_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The float dtype of the gate's output: the promoted floating dtype of the inputs, else float32."""
    floats = [t.dtype for t in tensors if t.dtype.is_floating_point]
    if not floats:
        return torch.float32
    dtype = floats[0]
    for other in floats[1:]:
        dtype = torch.promote_types(dtype, other)
    return dtype


def _check_gate(gate: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    if callable(gate):
        return
    if not isinstance(gate, str):
        raise TypeError(f"gate must be one of {', '.join(map(repr, GATES))} or a callable, got {describe(gate)}")
    check_choice(gate, "gate", GATES)


def attribute_gate(
    a1: torch.Tensor, a2: torch.Tensor, gate: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    r"""Per-condition targets of a pair from the binary attributes of its two items (PAN's :math:`f_a`).

    =============  ==================================================  ========
    ``gate``       target of attribute :math:`k`                       width
    =============  ==================================================  ========
    ``"and"``      :math:`a_{1k} \wedge a_{2k}` (both have it)          ``A``
    ``"or"``       :math:`a_{1k} \vee a_{2k}` (either has it)           ``A``
    ``"xor"``      :math:`a_{1k} \oplus a_{2k}` (they differ)           ``A``
    ``"xnor"``     :math:`\neg(a_{1k} \oplus a_{2k})` (they agree)      ``A``
    ``"nor"``      :math:`\neg(a_{1k} \vee a_{2k})` (neither has it)    ``A``
    ``"nand"``     :math:`\neg(a_{1k} \wedge a_{2k})`                   ``A``
    ``"and_xor"``  :math:`[a_1 \wedge a_2;\ a_1 \oplus a_2]`           ``2A``
    =============  ==================================================  ========

    OR is the default of both official codebases; AND_XOR (CUB code only) concatenates the AND block and the
    XOR block. NOR and NAND are not in the official code.

    Args:
        a1: ``(N, A)`` attributes of the first items: bool, or integer/floating holding only 0 and 1.
        a2: ``(N, A)`` attributes of the second items, same rules.
        gate: A name from :data:`GATES`, or a callable ``gate(a1_bool, a2_bool)`` receiving bool copies of the
            two inputs (so an in-place callable leaves ``a1`` and ``a2`` unchanged) and returning an ``(N, W)``
            tensor of binary values (any ``W >= 1``).

    Returns:
        ``(N, A)`` (``(N, 2A)`` for ``"and_xor"``, ``(N, W)`` for a callable) targets of 0.0 and 1.0, in the
        promoted floating dtype of ``a1`` and ``a2`` if either is floating, else float32.

    Raises:
        TypeError: Non-tensor inputs, a complex dtype, or a gate that is neither a name nor a callable.
        ValueError: Shapes that differ or are not 2-D, values other than 0 and 1, an unknown gate name, or a
            callable whose output is not an ``(N, W)`` binary tensor.

    Example:
        >>> import torch
        >>> from dml_bias.heads import attribute_gate
        >>> a1, a2 = torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 0, 1]])
        >>> attribute_gate(a1, a2, "or")
        tensor([[0., 1., 1., 1.]])
        >>> attribute_gate(a1, a2, "and_xor")
        tensor([[0., 0., 0., 1., 0., 1., 1., 0.]])
        >>> attribute_gate(a1.bool(), a2.bool(), lambda x, y: x & ~y)  # "has it, the other does not"
        tensor([[0., 0., 1., 0.]])
    """
    _check_gate(gate)
    check_tensor(a1, "a1")
    check_tensor(a2, "a2")
    sizes = check_shape(a1, "a1", ("N", "A"))
    check_shape(a2, "a2", ("N", "A"), sizes, sources={"N": "a1.shape[0]", "A": "a1.shape[1]"})
    check_same_device(a1=a1, a2=a2)
    x, y = _as_binary(a1, "a1"), _as_binary(a2, "a2")
    dtype = _gate_dtype(a1, a2)
    if callable(gate):
        out = gate(x.clone(), y.clone())  # copies: a bool a1 is x itself, and the callable may work in place
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0] or out.shape[1] < 1:
            got = describe(out)
            raise ValueError(f"gate(a1, a2) must return a tensor of shape ({x.shape[0]}, W) with W >= 1, got {got}")
        return _as_binary(out, "gate(a1, a2)").to(dtype)
    if gate == "and":
        out = x & y
    elif gate == "or":
        out = x | y
    elif gate == "xor":
        out = x ^ y
    elif gate == "xnor":
        out = ~(x ^ y)
    elif gate == "nor":
        out = ~(x | y)
    elif gate == "nand":
        out = ~(x & y)
    else:
        out = torch.cat([x & y, x ^ y], dim=1)
    return out.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Loss


def pan_loss(
    output: ConditionalSimilarityOutput,
    target: torch.Tensor,
    a1: torch.Tensor | None = None,
    a2: torch.Tensor | None = None,
    certain1: torch.Tensor | None = None,
    certain2: torch.Tensor | None = None,
    *,
    lam: float = 1.0,
    gate: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "or",
    reduction: str = "mean",
) -> torch.Tensor:
    r"""PAN's loss :cite:`mishra2021pan`; see :class:`PANLoss`.

    Args:
        output: The :class:`ConditionalSimilarityOutput` of ``N`` pairs and ``K`` conditions (only
            ``condition_logits`` and ``log_relevance`` are read).
        target: ``(N,)`` pair labels, 1 = similar/compatible, 0 = not (bool, integer or floating 0/1).
        a1: ``(N, A)`` binary attributes of the first items, or ``None`` (unsupervised).
        a2: ``(N, A)`` binary attributes of the second items (required with ``a1``).
        certain1: ``(N, A)`` certainty of ``a1`` (bool or 0/1), or ``None`` (all certain).
        certain2: ``(N, A)`` certainty of ``a2``, or ``None`` (all certain).
        lam: :math:`\lambda \ge 0`, the weight of the attribute term (0: unsupervised).
        gate: A gate name from :data:`GATES` or a callable, as in :func:`attribute_gate`.
        reduction: ``"mean"`` (default) or ``"sum"`` over pairs, or ``"none"``: the ``(N,)`` per-pair totals.

    Returns:
        A scalar (or ``(N,)``) tensor in float32, or float64 for float64 outputs.

    Raises:
        TypeError: ``output`` is not a :class:`ConditionalSimilarityOutput`; a bad dtype; a bad ``gate`` type.
        ValueError: ``lam < 0``, an unknown gate or reduction, shapes that do not match, NaN or infinite
            logits, non-binary labels, attributes or certainties, ``a1`` without ``a2`` (or certainties without
            attributes), or fewer conditions than targets (``K < A_t``).

    Example:
        >>> import torch
        >>> from dml_bias.heads import ConditionalSimilarity, pan_loss
        >>> head = ConditionalSimilarity(8, 6)
        >>> out = head(torch.randn(4, 8), torch.randn(4, 8))
        >>> a1, a2 = torch.randint(0, 2, (4, 5)), torch.randint(0, 2, (4, 5))
        >>> loss = pan_loss(out, torch.tensor([1, 0, 1, 0]), a1, a2, lam=10.0)  # 5 supervised + 1 free
        >>> loss.shape, bool(loss > 0)
        (torch.Size([]), True)
    """
    check_number(lam, "lam", low=0.0)
    _check_gate(gate)
    check_choice(reduction, "reduction", ("mean", "sum", "none"))
    if not isinstance(output, ConditionalSimilarityOutput):
        raise TypeError(
            f"output must be a ConditionalSimilarityOutput (what ConditionalSimilarity returns), got {describe(output)}"
        )
    logits, log_w = output.condition_logits, output.log_relevance
    for name, t in (("output.condition_logits", logits), ("output.log_relevance", log_w)):
        check_tensor(t, name)
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {describe(t)}")
    sizes = check_shape(logits, "output.condition_logits", ("N", "K"))
    sources = {"N": "output.condition_logits.shape[0]", "K": "output.condition_logits.shape[1]"}
    check_shape(log_w, "output.log_relevance", ("N", "K"), sizes, sources=sources)
    num_pairs, num_k = sizes["N"], sizes["K"]
    if num_pairs < 1:
        raise ValueError(f"output must hold at least one pair, got condition_logits of {describe(logits)}")
    check_same_device(condition_logits=logits, log_relevance=log_w)
    check_has_data(**{"output.condition_logits": logits, "output.log_relevance": log_w})
    check_finite(logits, "output.condition_logits")
    check_finite(log_w, "output.log_relevance")
    check_tensor(target, "target")
    check_shape(target, "target", ("N",), sizes, sources=sources)
    label = _as_binary(target, "target")
    if (a1 is None) != (a2 is None):
        raise ValueError(f"a1 and a2 must be given together, got a1={describe(a1)} and a2={describe(a2)}")
    if a1 is None and (certain1 is not None or certain2 is not None):
        raise ValueError("certain1/certain2 were given without attributes a1 and a2")
    check_same_device(condition_logits=logits, log_relevance=log_w, target=target, a1=a1, a2=a2)
    check_same_device(condition_logits=logits, certain1=certain1, certain2=certain2)
    supervised = None
    if a1 is not None and a2 is not None:
        targets = attribute_gate(a1, a2, gate)  # validates a1, a2 (shapes, binary values)
        if a1.shape[0] != num_pairs:
            raise ValueError(f"a1 must have N={num_pairs} rows (output.condition_logits.shape[0]), got {describe(a1)}")
        width, num_attr = targets.shape[1], a1.shape[1]
        if width > num_k:
            raise ValueError(
                f"output must have at least as many conditions as attribute targets (the first {width} conditions "
                f"are supervised; gate {gate if isinstance(gate, str) else 'callable'!r} on a1 of {describe(a1)}), "
                f"got K={num_k}"
            )
        certain = torch.ones(num_pairs, num_attr, dtype=torch.bool, device=logits.device)
        for name, c in (("certain1", certain1), ("certain2", certain2)):
            if c is not None:
                check_tensor(c, name)
                check_shape(c, name, ("N", "A"), {"N": num_pairs, "A": num_attr}, sources={"A": "a1.shape[1]"})
                certain = certain & _as_binary(c, name)
        if width != num_attr:
            if width % num_attr != 0 and (certain1 is not None or certain2 is not None):
                raise ValueError(
                    f"certain1/certain2 of width {num_attr} cannot mask {width} gate targets (not a multiple)"
                )
            certain = (
                certain.repeat(1, width // num_attr) if width % num_attr == 0 else certain[:, :1].expand(-1, width)
            )
        supervised = (targets > 0.5, certain)
    with no_autocast(logits.device):
        dtype = compute_dtype(logits, log_w)
        z, lw = logits.to(dtype), log_w.to(dtype)
        log_p = torch.logsumexp(lw + F.logsigmoid(z), dim=1)
        log_not_p = torch.logsumexp(lw + F.logsigmoid(-z), dim=1)
        total = -torch.where(label, log_p, log_not_p)
        if supervised is not None and lam > 0:
            positive, certain = supervised
            zs = z[:, : positive.shape[1]]
            per_condition = -torch.where(positive, F.logsigmoid(zs), F.logsigmoid(-zs))
            kept = torch.where(certain, per_condition, torch.zeros((), dtype=dtype, device=z.device))
            total = total + lam * kept.sum(dim=1) / certain.sum(dim=1).clamp_min(1).to(dtype)
        if reduction == "mean":
            return total.mean()
        if reduction == "sum":
            return total.sum()
        return total


class PANLoss(nn.Module):
    r"""PAN's loss :cite:`mishra2021pan`: pair BCE plus :math:`\lambda` times the masked attribute BCE.

    For pair :math:`i` with label :math:`y_i`, condition logits :math:`z_i`, relevance :math:`w_i`, attribute
    targets :math:`t_i = f_a(a_{1i}, a_{2i})` (:func:`attribute_gate`, width :math:`A_t`) and certainty mask
    :math:`m_i = c_{1i} \wedge c_{2i}` (repeated over both halves for ``"and_xor"``):

    .. math::

        L_i = -\big[y_i \log p_i + (1 - y_i) \log(1 - p_i)\big]
              + \lambda \frac{\sum_{k \le A_t} m_{ik}\, \ell_{ik}}{\max(1, \sum_{k \le A_t} m_{ik})},
        \qquad \ell_{ik} = -\big[t_{ik} \log \sigma(z_{ik}) + (1 - t_{ik}) \log \sigma(-z_{ik})\big],

    reduced over pairs by ``reduction`` (the mean over all ``N`` pairs by default, as the official code).

    * **Supervised conditions** are the first :math:`A_t` ones; with :math:`K > A_t` the rest are free (PAN's
      *hybrid* variant) and get no gradient from the attribute term. :math:`K < A_t` raises.
    * **Unsupervised**: ``lam = 0`` or no ``a1``/``a2``: only the pair term.
    * **Certainty**: a condition counts for a pair only where both items are certain (CUB: certainty id > 2).
      A pair with no certain condition contributes exactly 0 to the attribute term; the official code divides
      by :math:`\sum_k m_{ik} + 10^{-6}`, which differs by a relative :math:`10^{-6}/\sum_k m_{ik}` elsewhere.
    * **Log space**: :math:`\log p = \mathrm{logsumexp}_k(\log w_k + \log\sigma(z_k))` and
      :math:`\log(1-p) = \mathrm{logsumexp}_k(\log w_k + \log\sigma(-z_k))`, and :math:`\ell_{ik}` from
      :math:`\log\sigma(\pm z)`. Where the official code (BCE on probabilities clamped to [0, 1], logs clipped at
      -100) is finite and unclipped the values agree; at extreme logits this one stays exact and finite. The math
      runs in float32 (float64 for float64 outputs) with autocast off, so fp16/bf16 outputs are safe.

    Defaults used by the paper's code: :math:`\lambda = 10^{-5}` in every CUB README command (the argparse
    default is 1), :math:`\lambda = 10` hard-coded for Polyvore Outfits; gate OR in both.

    Args:
        lam: :math:`\lambda \ge 0`.
        gate: A name from :data:`GATES` or a callable ``gate(a1_bool, a2_bool) -> (N, W)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-pair totals).

    Shape:
        ``output``: a :class:`ConditionalSimilarityOutput` with ``(N, K)`` logits; ``target``: ``(N,)``;
        ``a1``, ``a2``, ``certain1``, ``certain2``: ``(N, A)``. Output: a scalar, or ``(N,)`` for ``"none"``.

    Example:
        >>> import torch
        >>> from dml_bias.heads import ConditionalSimilarity, PANLoss
        >>> head, loss_fn = ConditionalSimilarity(8, 4), PANLoss(lam=1.0, gate="or")
        >>> h1, h2 = torch.randn(6, 8), torch.randn(6, 8)
        >>> a1, a2 = torch.randint(0, 2, (6, 4)), torch.randint(0, 2, (6, 4))
        >>> loss = loss_fn(head(h1, h2), torch.tensor([1, 1, 1, 0, 0, 0]), a1, a2)
        >>> loss.backward()
        >>> head.condition_layer.weight.grad.shape
        torch.Size([4, 8])
    """

    def __init__(
        self,
        lam: float = 1.0,
        gate: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "or",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        check_number(lam, "lam", low=0.0)
        _check_gate(gate)
        check_choice(reduction, "reduction", ("mean", "sum", "none"))
        self.lam = float(lam)
        self.gate = gate
        self.reduction = reduction

    def forward(
        self,
        output: ConditionalSimilarityOutput,
        target: torch.Tensor,
        a1: torch.Tensor | None = None,
        a2: torch.Tensor | None = None,
        certain1: torch.Tensor | None = None,
        certain2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss; see :func:`pan_loss` for the arguments."""
        return pan_loss(
            output, target, a1, a2, certain1, certain2, lam=self.lam, gate=self.gate, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        """The configuration shown by ``repr``."""
        gate = self.gate if isinstance(self.gate, str) else getattr(self.gate, "__name__", "callable")
        return f"lam={self.lam}, gate={gate!r}, reduction={self.reduction!r}"
