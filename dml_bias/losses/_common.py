"""Private building blocks shared by the losses and miners.

* :func:`prepare_batch` validates the PML-style call ``(embeddings, labels, indices_tuple, ref_emb, ref_labels)``
  and returns float32/float64 copies of the embeddings (half inputs are upcast, so the exponent math never runs
  in fp16/bf16) together with the self-pair rule.
* :func:`normalize_rows` and :func:`similarity_matrix` L2-normalise with :func:`norm_eps` of the input's dtype.
* :func:`masked_logsumexp` is the numerically safe ``log(1 + sum(exp(x)))`` over a mask, with
  ``finfo(dtype).min`` sentinels (never ``inf``) and an appended zero column.
* :func:`pair_masks`, :func:`convert_to_pairs`, :func:`convert_to_triplets` and :func:`miner_weights` reproduce
  pytorch-metric-learning's meaning of ``indices_tuple``.

Nothing here is public; names and signatures may change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from dml_bias._checks import (
    check_choice,
    check_embeddings,
    check_factory_kwargs,
    check_labels,
    check_number,
    check_rows_finite,
    check_same_device,
    check_tensor,
    checks_enabled,
    describe,
)
from dml_bias._compat import compute_dtype
from dml_bias.distances import BaseDistance
from dml_bias.similarity import METRICS, is_similarity, normalize, pairwise

IndicesTuple = tuple[torch.Tensor, ...]

#: What ``distance=`` accepts: a metric name of :data:`~dml_bias.similarity.METRICS` or a distance object.
Distance = str | BaseDistance


def resolve_distance(distance: Distance) -> Distance:
    """Validate ``distance=``; a distance object equal to a metric name becomes that name (the same code path)."""
    check_metric(distance)
    if isinstance(distance, BaseDistance):
        return distance.metric or distance
    return distance


def needs_nonzero_rows(distance: Distance) -> bool:
    """Whether the metric normalises the rows (a zero row then has no direction)."""
    if isinstance(distance, BaseDistance):
        return distance.normalize_embeddings
    return distance != "dot"


#: The normalisation floor of float16 inputs: ``2**-9``. See :func:`norm_eps`.
FLOAT16_NORM_EPS = 2.0**-9


def norm_eps(dtype: torch.dtype) -> float:
    r"""The ``eps`` of the L2 normalisation :math:`x / \max(\lVert x \rVert, \epsilon)` for inputs of ``dtype``.

    The gradient through the normalisation is :math:`(I - \hat x \hat x^\top) g / \lVert x \rVert` (at most
    :math:`\lVert g \rVert / \epsilon`). The math runs in float32, but the gradient is returned in the input's
    dtype: for a float16 input (largest value 65504) it overflows to ``inf`` for rows of norm below about
    :math:`10^{-3}`, so float16 rows are normalised with :data:`FLOAT16_NORM_EPS` (``2**-9``; rows of smaller norm
    are divided by it instead, and the gradient stays below :math:`512 \lVert g \rVert`). Every other dtype
    (bfloat16 has float32's range) keeps ``1e-12``, the default of :func:`torch.nn.functional.normalize` and
    pytorch-metric-learning.
    """
    return FLOAT16_NORM_EPS if dtype == torch.float16 else 1e-12


def normalize_rows(x: torch.Tensor, source_dtype: torch.dtype) -> torch.Tensor:
    """L2-normalise the rows of the (upcast) ``x`` with the ``eps`` of the dtype the caller passed in."""
    return normalize(x, eps=norm_eps(source_dtype))


def similarity_matrix(
    x: torch.Tensor,
    y: torch.Tensor | None,
    distance: Distance,
    x_dtype: torch.dtype,
    y_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`~dml_bias.similarity.pairwise` (``y=None``: ``x`` itself) with :func:`norm_eps` of the source dtypes.

    ``x``/``y`` are the upcast tensors; ``x_dtype``/``y_dtype`` the dtypes the caller passed them in. Identical to
    ``pairwise(x, y, distance)`` for float32/float64/bfloat16 inputs.
    """
    if isinstance(distance, BaseDistance):
        return distance(x, y)
    if distance == "dot":
        return pairwise(x, y, "dot")
    xn = normalize_rows(x, x_dtype)
    yn = None if y is None else normalize_rows(y, x_dtype if y_dtype is None else y_dtype)
    # "dot" of the normalised rows is the cosine; pairwise's "cosine" would normalise again with eps=1e-12.
    return pairwise(xn, yn, "dot" if distance == "cosine" else distance, normalize_embeddings=False)


def check_metric(distance: Distance) -> None:
    """Validate the ``distance=`` argument: a metric name or a :mod:`dml_bias.distances` object."""
    if isinstance(distance, BaseDistance):
        return
    if not isinstance(distance, str):
        raise TypeError(
            f"distance must be one of {', '.join(map(repr, METRICS))} or a dml_bias.distances object (e.g. "
            f"CosineSimilarity()), got {describe(distance)}"
        )
    check_choice(distance, "distance", METRICS)


def distance_is_similarity(distance: Distance) -> bool:
    """Whether larger values of ``distance`` mean closer."""
    if isinstance(distance, BaseDistance):
        return distance.is_inverted
    return is_similarity(distance)


def check_positive(value: float, name: str) -> None:
    """A strictly positive finite number (temperatures, scales, alpha/beta)."""
    check_number(value, name, low=0.0, low_inclusive=False)


def check_nonnegative(value: float, name: str) -> None:
    """A finite number ``>= 0`` (margins where a negative value is meaningless)."""
    check_number(value, name, low=0.0)


def check_contrastive_margins(pos_margin: float, neg_margin: float, distance: Distance) -> None:
    """Contrastive margins: finite, and ordered as the hinges need.

    With a distance: ``0 <= pos_margin <= neg_margin`` (positives are pulled inside ``pos_margin``, negatives pushed
    beyond ``neg_margin``). With a similarity, where larger is closer: ``pos_margin >= neg_margin``.
    """
    check_metric(distance)
    if distance_is_similarity(distance):
        check_number(pos_margin, "pos_margin")
        check_number(neg_margin, "neg_margin")
        if pos_margin < neg_margin:
            raise ValueError(
                f"pos_margin must be >= neg_margin with the similarity distance={distance!r} (positives are pulled "
                f"above pos_margin, negatives pushed below neg_margin), got pos_margin={pos_margin} and "
                f"neg_margin={neg_margin}"
            )
    else:
        check_nonnegative(pos_margin, "pos_margin")
        check_nonnegative(neg_margin, "neg_margin")
        if pos_margin > neg_margin:
            raise ValueError(
                f"pos_margin must be <= neg_margin with the distance distance={distance!r} (positives are pulled "
                f"within pos_margin, negatives pushed beyond neg_margin), got pos_margin={pos_margin} and "
                f"neg_margin={neg_margin}"
            )


def class_parameter(
    num_classes: int, embedding_size: int, device: torch.device | str | None, dtype: torch.dtype | None
) -> torch.nn.Parameter:
    """The uninitialised ``(num_classes, embedding_size)`` parameter of a class-weight loss (factory kwargs checked)."""
    device = check_factory_kwargs(device, dtype)
    return torch.nn.Parameter(torch.empty(num_classes, embedding_size, device=device, dtype=dtype))


def check_classification_call(
    loss_name: str, labels: torch.Tensor | None, ref_emb: torch.Tensor | None, ref_labels: torch.Tensor | None
) -> torch.Tensor:
    """The call checks of the class-weight losses (Proxy-Anchor, ArcFace): labels required (returned), no reference."""
    if ref_emb is not None or ref_labels is not None:
        raise ValueError(f"{loss_name} does not support ref_emb/ref_labels; got ref_emb or ref_labels")
    if labels is None:
        raise ValueError("labels must be given (a 1-D integer tensor of length embeddings.shape[0]), got None")
    return labels


def check_indices_tuple(
    indices_tuple: Sequence[torch.Tensor], num_rows: int, num_cols: int, device: torch.device
) -> IndicesTuple:
    """Validate a ``(a1, p, a2, n)`` pairs or ``(a, p, n)`` triplets tuple of 1-D integer index tensors.

    Anchors index the rows (``embeddings``); positives/negatives index the columns (``ref_emb`` or
    ``embeddings``).
    """
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise TypeError(
            "indices_tuple must be a tuple (a1, p, a2, n) of pair indices or (a, p, n) of triplet indices, "
            f"got {describe(indices_tuple) if not isinstance(indices_tuple, (tuple, list)) else len(indices_tuple)}"
            + (" tensors" if isinstance(indices_tuple, (tuple, list)) else "")
        )
    names = ("a1", "p", "a2", "n") if len(indices_tuple) == 4 else ("a", "p", "n")
    out = []
    for name, idx in zip(names, indices_tuple, strict=True):
        full = f"indices_tuple[{names.index(name)}] ({name})"
        check_tensor(idx, full)
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool or idx.ndim != 1:
            raise TypeError(f"{full} must be a 1-D integer tensor, got {describe(idx)}")
        if idx.device != device:
            raise ValueError(f"{full} must be on the same device as embeddings ({device}), got device {idx.device}")
        bound = num_rows if name in ("a", "a1", "a2") else num_cols
        if idx.numel() > 0 and checks_enabled():  # a value check: one host sync (see dml_bias.set_checks)
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= bound:
                raise ValueError(f"{full} must hold indices in [0, {bound - 1}], got values in [{lo}, {hi}]")
        out.append(idx.long())
    if len(out) == 4:
        if out[0].shape != out[1].shape or out[2].shape != out[3].shape:
            raise ValueError(
                "indices_tuple (a1, p, a2, n) must have len(a1) == len(p) and len(a2) == len(n), got lengths "
                f"{[len(t) for t in out]}"
            )
    elif not out[0].shape == out[1].shape == out[2].shape:
        raise ValueError(f"indices_tuple (a, p, n) must hold three tensors of one length, got {[len(t) for t in out]}")
    return tuple(out)


@dataclass
class Batch:
    """A validated loss input: embeddings upcast to the compute dtype, and the pair bookkeeping."""

    x: torch.Tensor
    y: torch.Tensor | None  # None: the columns are the rows themselves (self-pairs excluded)
    labels: torch.Tensor | None
    ref_labels: torch.Tensor | None
    indices_tuple: IndicesTuple | None
    anchor_source: torch.Tensor  # the original embeddings (for a zero that keeps the graph)
    y_dtype: torch.dtype  # the dtype ref_emb was passed in (the embeddings' without ref_emb)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. proxies, upcast to x's dtype

    @property
    def x_dtype(self) -> torch.dtype:
        """The dtype the embeddings were passed in (it sets the normalisation's ``eps``)."""
        return self.anchor_source.dtype

    @property
    def exclude_self(self) -> bool:
        return self.y is None

    @property
    def num_cols(self) -> int:
        return self.x.shape[0] if self.y is None else self.y.shape[0]

    def matrix(self, distance: Distance) -> torch.Tensor:
        """The ``(N, M)`` similarity/distance matrix in the compute dtype."""
        if isinstance(distance, BaseDistance):
            return distance(self.x, self.y)
        if distance == "euclidean":
            # A fused fast path: torch.cdist has its own backward kernel (zero gradient at zero distance, like
            # pairwise), which is ~1.6x faster on CPU at N = 2048 than autograd through pairwise's expanded
            # form, and it is what pytorch-metric-learning uses, so the values agree more closely.
            x = normalize_rows(self.x, self.x_dtype)
            y = x if self.y is None else normalize_rows(self.y, self.y_dtype)
            return torch.cdist(x, y)
        return similarity_matrix(self.x, self.y, distance, self.x_dtype, self.y_dtype)


def prepare_batch(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None,
    indices_tuple: Sequence[torch.Tensor] | None,
    ref_emb: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    *,
    distance: Distance,
    labels_required: bool = False,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Batch:
    """Validate the PML-style loss arguments and upcast the embeddings.

    The embeddings (and ``extra``) must be finite and, for every ``distance`` but ``"dot"``, have no row of zero
    norm (:func:`~dml_bias._checks.check_rows_finite`: one host sync), and the indices of ``indices_tuple`` must
    lie inside the batch; these value checks are skipped when :func:`dml_bias.set_checks` switched them off.

    Args:
        embeddings: ``(N, D)`` floating.
        labels: ``(N,)`` integer or ``None`` (then ``indices_tuple`` is needed, unless ``labels_required``).
        indices_tuple: pairs or triplets, or ``None``.
        ref_emb: ``(M, D)`` floating or ``None`` (then the columns are ``embeddings``, self-pairs excluded).
        ref_labels: ``(M,)`` integer, required with ``ref_emb`` when labels are used.
        distance: the metric the loss uses (``"dot"`` accepts zero rows: nothing is normalised).
        labels_required: the loss always needs labels.
        extra: other ``(C, D)`` tensors by argument name (e.g. ``{"proxies": proxies}``), checked like the
            embeddings (same ``D``, same device, finite), taking part in the dtype promotion and returned upcast
            in :attr:`Batch.extra`.
    """
    extra = {} if extra is None else dict(extra)
    check_embeddings(embeddings, "embeddings")
    n, d = embeddings.shape
    if labels is not None:
        check_labels(labels, "labels", length=n, length_source="embeddings.shape[0]")
    elif labels_required:
        raise ValueError("labels must be given (a 1-D integer tensor of length embeddings.shape[0]), got None")
    elif indices_tuple is None:
        raise ValueError("labels must be given when indices_tuple is None, got labels=None and indices_tuple=None")
    if ref_labels is not None and ref_emb is None:
        raise ValueError("ref_labels was given without ref_emb; pass both or neither")
    same = ref_emb is None or (ref_emb is embeddings and (ref_labels is None or ref_labels is labels))
    if ref_emb is not None:
        check_embeddings(ref_emb, "ref_emb", dim=d)
        if ref_labels is None and labels is not None and not same:
            raise ValueError("ref_labels must be given with ref_emb (a 1-D integer tensor of length ref_emb.shape[0])")
        if ref_labels is not None:
            check_labels(ref_labels, "ref_labels", length=ref_emb.shape[0], length_source="ref_emb.shape[0]")
    for name, t in extra.items():
        check_embeddings(t, name, dim=d, dim_source="embeddings.shape[1]")
    check_same_device(embeddings=embeddings, labels=labels, ref_emb=ref_emb, ref_labels=ref_labels, **extra)
    dtype = compute_dtype(embeddings, *(t for t in (ref_emb, *extra.values()) if t is not None))
    x = embeddings.to(dtype)
    y = None if same or ref_emb is None else ref_emb.to(dtype)
    upcast = {name: t.to(dtype) for name, t in extra.items()}
    check_metric(distance)
    if checks_enabled():  # the one host sync of a loss call; dml_bias.set_checks(False) skips it
        # On the upcast copies: no float16 norm overflow, and no extra copy (a float32 input is used as it is).
        check_rows_finite(
            {"embeddings": x, **({} if y is None else {"ref_emb": y}), **upcast},
            nonzero=needs_nonzero_rows(distance),
            originals={"embeddings": embeddings, **({} if ref_emb is None else {"ref_emb": ref_emb}), **extra},
        )
    m = n if y is None else y.shape[0]
    idx = None
    if indices_tuple is not None:
        idx = check_indices_tuple(indices_tuple, n, m, embeddings.device)
    return Batch(
        x=x,
        y=y,
        labels=labels,
        ref_labels=labels if y is None else ref_labels,
        indices_tuple=idx,
        anchor_source=embeddings,
        y_dtype=embeddings.dtype if ref_emb is None else ref_emb.dtype,
        extra=upcast,
    )


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor, *, dim: int, add_one: bool) -> torch.Tensor:
    r"""``log(add_one + sum_{mask} exp(x))`` along ``dim``; ``0`` where nothing is kept.

    Masked entries are replaced by ``finfo(x.dtype).min`` (not ``-inf``: ``exp`` of it is exactly 0 and its
    gradient is 0, with no ``inf - inf``). With ``add_one`` the result is :math:`\log(1 + \sum_k e^{x_k})`,
    computed as ``softplus(logsumexp(x))`` -- the same value as appending a zero column, without copying the
    matrix; a row with nothing kept has ``logsumexp = finfo.min + log(n)`` and gives exactly 0.
    """
    x = x.masked_fill(~mask, torch.finfo(x.dtype).min)
    if add_one:
        return torch.nn.functional.softplus(torch.logsumexp(x, dim=dim))
    out = torch.logsumexp(x, dim=dim)
    return out.masked_fill(~mask.any(dim=dim), 0.0)


def zero_loss(source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scalar 0 connected to ``source``'s graph (so ``backward()`` works and gives zero gradients)."""
    return (source.to(dtype) * 0).sum()  # multiply first: a half-precision sum could overflow to inf


def label_masks(
    labels: torch.Tensor, ref_labels: torch.Tensor, exclude_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(N, M)`` masks of positive (same label; diagonal excluded if asked) and negative pairs."""
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    neg = ~same
    if exclude_self:
        same = same & ~torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
    return same, neg


def convert_to_pairs(batch: Batch) -> IndicesTuple | None:
    """``(a1, p, a2, n)`` from ``batch.indices_tuple`` (a triplet gives pairs (a, p) and (a, n)); None: all pairs."""
    idx = batch.indices_tuple
    if idx is None:
        return None
    if len(idx) == 4:
        return idx
    a, p, n = idx
    return a, p, a, n


def pair_masks(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, M)`` boolean masks of the positive and negative pairs to use (all pairs or the given ones)."""
    pairs = convert_to_pairs(batch)
    if pairs is None:
        assert batch.labels is not None
        assert batch.ref_labels is not None
        return label_masks(batch.labels, batch.ref_labels, batch.exclude_self)
    a1, p, a2, n = pairs
    shape = (batch.x.shape[0], batch.num_cols)
    pos = torch.zeros(shape, dtype=torch.bool, device=batch.x.device)
    neg = torch.zeros(shape, dtype=torch.bool, device=batch.x.device)
    pos[a1, p] = True
    neg[a2, n] = True
    return pos, neg


def entries(mat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``mat[rows, cols]`` as a flat ``gather``, whose backward is a ``scatter_add``.

    On the CPU that is about 7x faster than the accumulating ``index_put`` that advanced indexing back-propagates
    through (2 ms against 13.5 ms for 500k pairs of a 512 x 1024 matrix, fp32, one thread).
    """
    flat = rows * mat.shape[1]
    flat += cols  # in place: one index-sized temporary
    return torch.gather(mat.reshape(-1), 0, flat)


def all_triplets(pos: torch.Tensor, neg: torch.Tensor) -> IndicesTuple:
    """Every triplet ``(a, p, n)`` of the ``(N, M)`` masks, in lexicographic order, in O(|P| M) memory."""
    a, p = torch.nonzero(pos, as_tuple=True)
    k, n = torch.nonzero(neg[a], as_tuple=True)
    return a[k], p[k], n


def convert_to_triplets(pairs: IndicesTuple) -> IndicesTuple:
    """Triplets from pairs: each positive pair (a, p) with every negative pair (a, n) of the same anchor."""
    if len(pairs) == 3:
        return pairs
    a1, p, a2, n = pairs
    pi, ni = torch.where(a1.unsqueeze(1) == a2.unsqueeze(0))
    return a1[pi], p[pi], n[ni]


def miner_weights(indices_tuple: IndicesTuple | None, num_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample weights from a miner's output, as pytorch-metric-learning's classification losses use them.

    Every index of every tensor in the tuple is counted; the weight of a sample is its count divided by the
    largest count (so in ``[0, 1]``). Without a tuple (or an empty one) every weight is 1.
    """
    device = indices_tuple[0].device if indices_tuple else None
    if indices_tuple is None or all(t.numel() == 0 for t in indices_tuple):
        return torch.ones(num_rows, dtype=dtype, device=device)
    counts = torch.bincount(torch.cat(list(indices_tuple)), minlength=num_rows).to(dtype)
    return counts / counts.max()


def similarity_sign(distance: Distance) -> float:
    """``+1`` for similarities (larger is closer), ``-1`` for distances: ``sign * mat`` is a similarity."""
    return 1.0 if distance_is_similarity(distance) else -1.0
