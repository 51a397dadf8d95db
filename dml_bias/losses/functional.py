r"""Functional forms of the losses; the :mod:`dml_bias.losses` modules store the configuration and call these.

Every function takes pytorch-metric-learning's arguments ``(embeddings, labels, indices_tuple, ref_emb,
ref_labels)`` with the same meaning (see :doc:`/api/losses`), plus the loss's hyper-parameters as keyword
arguments, and returns a scalar tensor.

Precision: the math runs in float32 (float64 if an input is float64); fp16/bf16 inputs are upcast and autocast
is switched off inside the loss, so the exponentials never overflow. The result has that compute dtype
(float32 for half inputs); gradients flow back to the inputs in their own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dml_bias._checks import check_bool, check_labels, check_number, checks_enabled
from dml_bias._compat import no_autocast
from dml_bias.losses._common import (
    Batch,
    Distance,
    all_triplets,
    check_contrastive_margins,
    check_nonnegative,
    check_positive,
    convert_to_pairs,
    convert_to_triplets,
    entries,
    masked_logsumexp,
    miner_weights,
    pair_masks,
    prepare_batch,
    resolve_distance,
    similarity_matrix,
    similarity_sign,
    zero_loss,
)
from dml_bias.reducers import BaseReducer, LossDict, check_reducer

__all__ = [
    "arcface_loss",
    "contrastive_loss",
    "multi_similarity_loss",
    "ntxent_loss",
    "proxy_anchor_loss",
    "supcon_loss",
    "triplet_margin_loss",
]

Indices = Sequence[torch.Tensor] | None


def _reduce(
    reducer: BaseReducer, loss_dict: LossDict, embeddings: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    """Apply a user's reducer; the zeros it makes keep the graph of the (original) embeddings."""
    return reducer(loss_dict, embeddings, labels)


def _entry(losses: torch.Tensor, indices: object, reduction_type: str, **extra: object) -> dict[str, object]:
    """One sub-loss of a loss dictionary; no element at all becomes PML's integer 0."""
    return {
        "losses": losses if losses.numel() > 0 else 0,
        "indices": indices,
        "reduction_type": reduction_type,
        **extra,
    }


def multi_similarity_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None = None,
    indices_tuple: Indices = None,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    distance: Distance = "cosine",
    reducer: BaseReducer | None = None,
) -> torch.Tensor:
    r"""Multi-Similarity loss :cite:`wang2019multi`; see :class:`~dml_bias.losses.MultiSimilarityLoss`.

    Args:
        embeddings: ``(N, D)`` floating-point anchors (rows).
        labels: ``(N,)`` integer labels; may be ``None`` when ``indices_tuple`` is given.
        indices_tuple: ``(a1, p, a2, n)`` pairs or ``(a, p, n)`` triplets (e.g. from a miner); ``None`` uses
            every pair.
        ref_emb: ``(M, D)`` reference embeddings (columns); ``None`` uses ``embeddings`` without self-pairs.
        ref_labels: ``(M,)`` labels of ``ref_emb``.
        alpha: positive scale :math:`\alpha > 0`.
        beta: negative scale :math:`\beta > 0`.
        base: the offset :math:`\lambda`.
        distance: ``"cosine"``, ``"dot"``, ``"euclidean"``, ``"squared_euclidean"`` or a
            :mod:`dml_bias.distances` object.
        reducer: a :mod:`dml_bias.reducers` reducer of the per-anchor losses (``element``); ``None``: their mean.

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> multi_similarity_loss(emb, torch.tensor([0, 0, 1]))
        tensor(0.6495)
    """
    check_positive(alpha, "alpha")
    check_positive(beta, "beta")
    check_number(base, "base")
    distance = resolve_distance(distance)
    check_reducer(reducer)
    batch = prepare_batch(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance=distance)
    with no_autocast(embeddings.device):
        pos_mask, neg_mask = pair_masks(batch)
        sim = similarity_sign(distance) * batch.matrix(distance)
        shifted = sim - (similarity_sign(distance) * base)
        pos = masked_logsumexp(-alpha * shifted, pos_mask, dim=1, add_one=True) / alpha
        neg = masked_logsumexp(beta * shifted, neg_mask, dim=1, add_one=True) / beta
        if reducer is not None:
            rows = torch.arange(pos.shape[0], device=pos.device)
            return _reduce(reducer, {"loss": _entry(pos + neg, rows, "element")}, embeddings, labels)
        return (pos + neg).mean()


def proxy_anchor_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    indices_tuple: Indices = None,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
    distance: Distance = "cosine",
    reducer: BaseReducer | None = None,
) -> torch.Tensor:
    r"""Proxy-Anchor loss :cite:`kim2020proxy`; see :class:`~dml_bias.losses.ProxyAnchorLoss`.

    Args:
        embeddings: ``(N, D)`` floating-point embeddings.
        labels: ``(N,)`` integer labels in ``[0, C)``.
        proxies: ``(C, D)`` floating-point proxies (not modified; cast to the compute dtype out of place).
        indices_tuple: optional miner output; as in pytorch-metric-learning each sample gets the weight
            ``count / max count`` and :math:`w - 1` is added inside both exponents.
        margin: :math:`\delta \ge 0`.
        alpha: :math:`\alpha > 0`.
        distance: ``"cosine"`` (default), another metric of :func:`dml_bias.similarity.pairwise` or a
            :mod:`dml_bias.distances` object.
        reducer: a :mod:`dml_bias.reducers` reducer (see :class:`~dml_bias.losses.ProxyAnchorLoss`).

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> proxy_anchor_loss(emb, torch.tensor([0, 1]), emb.clone(), alpha=1.0, margin=0.0)
        tensor(1.0064)
    """
    check_nonnegative(margin, "margin")
    check_positive(alpha, "alpha")
    distance = resolve_distance(distance)
    check_reducer(reducer)
    batch = prepare_batch(
        embeddings,
        labels,
        indices_tuple,
        None,
        None,
        distance=distance,
        labels_required=True,
        extra={"proxies": proxies},
    )
    assert batch.labels is not None
    num_classes = proxies.shape[0]
    if checks_enabled():  # a value check: one host sync (see dml_bias.set_checks)
        check_labels(batch.labels, "labels", num_classes=num_classes)
    with no_autocast(embeddings.device):
        p = batch.extra["proxies"]
        sign = similarity_sign(distance)
        sim = sign * similarity_matrix(batch.x, p, distance, embeddings.dtype, proxies.dtype)  # (N, C): larger=closer
        pos_mask = batch.labels.unsqueeze(1) == torch.arange(num_classes, device=p.device).unsqueeze(0)
        pos_exp = -alpha * (sim - sign * margin)
        neg_exp = alpha * (sim + sign * margin)
        if batch.indices_tuple is not None:
            w = miner_weights(batch.indices_tuple, batch.x.shape[0], batch.x.dtype).unsqueeze(1) - 1.0
            pos_exp, neg_exp = pos_exp + w, neg_exp + w
        pos_term = masked_logsumexp(pos_exp, pos_mask, dim=0, add_one=True)
        neg_term = masked_logsumexp(neg_exp, ~pos_mask, dim=0, add_one=True)
        num_pos_proxies = pos_mask.any(dim=0).sum().clamp_min(1)
        if reducer is not None:
            classes = torch.arange(num_classes, device=p.device)
            loss_dict = {
                "pos_loss": _entry(pos_term, classes, "element", divisor=num_pos_proxies),
                "neg_loss": _entry(neg_term, classes, "element", divisor=num_classes),
            }
            return _reduce(reducer, loss_dict, embeddings, labels)
        return pos_term.sum() / num_pos_proxies + neg_term.sum() / num_classes


def _avg_nonzero(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean of the (kept) entries that are > 0 (0 if none), keeping the graph; PML's ``AvgNonZeroReducer``."""
    positive = values > 0
    keep = positive if keep is None else keep & positive
    total = values.masked_fill(~keep, 0.0).sum()
    return total / keep.sum().clamp_min(1)


def contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None = None,
    indices_tuple: Indices = None,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    distance: Distance = "euclidean",
    reducer: BaseReducer | None = None,
) -> torch.Tensor:
    r"""Contrastive (pair hinge) loss :cite:`hadsell2006contrastive`; see :class:`~dml_bias.losses.ContrastiveLoss`.

    Args:
        embeddings: ``(N, D)`` floating-point anchors.
        labels: ``(N,)`` integer labels; may be ``None`` with ``indices_tuple``.
        indices_tuple: ``(a1, p, a2, n)`` or ``(a, p, n)``; each listed pair counts (repeats count again).
        ref_emb: ``(M, D)`` reference embeddings; ``None`` uses ``embeddings`` without self-pairs.
        ref_labels: ``(M,)`` labels of ``ref_emb``.
        pos_margin: :math:`m^+` (``>= 0`` with a distance).
        neg_margin: :math:`m^-` (``>= 0`` with a distance).
        distance: ``"euclidean"`` (default, on L2-normalised embeddings), another metric name or a
            :mod:`dml_bias.distances` object.
        reducer: a :mod:`dml_bias.reducers` reducer applied to the sub-losses ``pos_loss`` (``pos_pair``) and
            ``neg_loss`` (``neg_pair``), then summed; ``None``: PML's ``AvgNonZeroReducer``.

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
        >>> contrastive_loss(emb, torch.tensor([0, 0, 1]))
        tensor(2.4142)
    """
    check_contrastive_margins(pos_margin, neg_margin, distance)
    distance = resolve_distance(distance)
    check_reducer(reducer)
    batch = prepare_batch(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance=distance)
    with no_autocast(embeddings.device):
        mat = batch.matrix(distance)
        # PML's margin(): hinge on (d - m+) and (m- - d) for distances, flipped for similarities.
        sign = similarity_sign(distance)
        pairs = convert_to_pairs(batch)
        if reducer is not None:
            if pairs is None:  # every pair, in row-major order: masked_select saves only the boolean masks
                pos_mask, neg_mask = pair_masks(batch)
                a1, p = torch.nonzero(pos_mask, as_tuple=True)
                a2, n = torch.nonzero(neg_mask, as_tuple=True)
                pos_vals, neg_vals = torch.masked_select(mat, pos_mask), torch.masked_select(mat, neg_mask)
            else:
                a1, p, a2, n = pairs
                pos_vals, neg_vals = entries(mat, a1, p), entries(mat, a2, n)
            # PML's margin(): (d - m+) and (m- - d) for distances, flipped for similarities (one temporary each)
            pos_hinge = F.relu(pos_vals - pos_margin) if sign < 0 else F.relu(pos_margin - pos_vals)
            neg_hinge = F.relu(neg_margin - neg_vals) if sign < 0 else F.relu(neg_vals - neg_margin)
            loss_dict = {
                "pos_loss": _entry(pos_hinge, (a1, p), "pos_pair"),
                "neg_loss": _entry(neg_hinge, (a2, n), "neg_pair"),
            }
            return _reduce(reducer, loss_dict, embeddings, labels)
        if pairs is None:
            pos_mask, neg_mask = pair_masks(batch)
            # Positive pairs are few: gather them. Negatives are most of the matrix: stay dense.
            a1, p = torch.nonzero(pos_mask, as_tuple=True)
            pos_vals = F.relu(-sign * (entries(mat, a1, p) - pos_margin))
            neg_hinge = F.relu(sign * (mat - neg_margin))
            return _avg_nonzero(pos_vals, None) + _avg_nonzero(neg_hinge, neg_mask)
        a1, p, a2, n = pairs
        pos_vals = F.relu(-sign * (entries(mat, a1, p) - pos_margin))
        neg_vals = F.relu(sign * (entries(mat, a2, n) - neg_margin))
        return _avg_nonzero(pos_vals, None) + _avg_nonzero(neg_vals, None)


def triplet_margin_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None = None,
    indices_tuple: Indices = None,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    margin: float = 0.05,
    distance: Distance = "euclidean",
    reducer: BaseReducer | None = None,
    swap: bool = False,
    smooth_loss: bool = False,
) -> torch.Tensor:
    r"""Triplet margin loss :cite:`schroff2015facenet`; see :class:`~dml_bias.losses.TripletMarginLoss`.

    Without ``indices_tuple`` all triplets are used, but never materialised: for each anchor the negatives'
    distances are sorted once and every positive looks up how many negatives violate the margin and their sum
    (``searchsorted`` + a cumulative sum), which costs :math:`O(NM\log M)` time and :math:`O(NM)` memory instead
    of :math:`O(NM^2)`.

    Args:
        embeddings: ``(N, D)`` floating-point anchors.
        labels: ``(N,)`` integer labels; may be ``None`` with ``indices_tuple``.
        indices_tuple: ``(a, p, n)`` triplets, or ``(a1, p, a2, n)`` pairs (combined per shared anchor).
        ref_emb: ``(M, D)`` reference embeddings (positives/negatives); ``None`` uses ``embeddings``.
        ref_labels: ``(M,)`` labels of ``ref_emb``.
        margin: :math:`m \ge 0`.
        distance: ``"euclidean"`` (default, on L2-normalised embeddings), another metric name or a
            :mod:`dml_bias.distances` object.
        reducer: a :mod:`dml_bias.reducers` reducer of the per-triplet losses (reduction type ``"triplet"``);
            ``None``: the mean of the positive ones (PML's ``AvgNonZeroReducer``).
        swap: replace :math:`d_{an}` by :math:`\min(d_{an}, d_{pn})` (the distance swap of
            (Balntas et al., BMVC 2016)); not with ``ref_emb``.
        smooth_loss: use :math:`\operatorname{softplus}` instead of the hinge.

    Returns:
        A scalar tensor: the mean over triplets with a positive loss (0 if there is none), or the reducer's
        result.

    Example:
        >>> import torch
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
        >>> triplet_margin_loss(emb, torch.tensor([0, 0, 1]), margin=0.1)
        tensor(0.7934)
    """
    check_nonnegative(margin, "margin")
    distance = resolve_distance(distance)
    check_reducer(reducer)
    check_bool(swap, "swap")
    check_bool(smooth_loss, "smooth_loss")
    batch = prepare_batch(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance=distance)
    if swap and batch.y is not None:
        raise ValueError("swap=True compares positives with negatives of embeddings; it is not supported with ref_emb")
    with no_autocast(embeddings.device):
        # A "distance" in both cases: larger = farther.
        dist = -similarity_sign(distance) * batch.matrix(distance)
        pairs_or_triplets = batch.indices_tuple
        if reducer is not None or swap or smooth_loss:
            # Per-triplet losses (PML's form): every triplet is listed (one entry per triplet).
            if pairs_or_triplets is not None:
                a, p, n = convert_to_triplets(pairs_or_triplets)
            else:
                a, p, n = all_triplets(*pair_masks(batch))
            an = entries(dist, a, n)
            if swap:
                an = torch.minimum(an, entries(dist, p, n))
            violation = entries(dist, a, p) - an + margin
            losses = F.softplus(violation) if smooth_loss else F.relu(violation)
            if reducer is None:
                return _avg_nonzero(losses, None)
            return _reduce(reducer, {"loss": _entry(losses, (a, p, n), "triplet")}, embeddings, labels)
        if pairs_or_triplets is not None:
            a, p, n = convert_to_triplets(pairs_or_triplets)
            return _avg_nonzero(entries(dist, a, p) - entries(dist, a, n) + margin, None)
        pos_mask, neg_mask = pair_masks(batch)
        big = torch.finfo(dist.dtype).max
        neg_sorted, _ = torch.sort(dist.masked_fill(~neg_mask, big), dim=1)
        # cumsum with a leading 0; sentinel entries sit at the end and are never reached by the lookup.
        csum = torch.cat([dist.new_zeros(dist.shape[0], 1), neg_sorted.masked_fill(neg_sorted == big, 0).cumsum(1)], 1)
        thresh = dist + margin  # (N, M): a negative violates (a, p) iff d_an < d_ap + m
        with torch.no_grad():
            count = torch.searchsorted(neg_sorted.detach().contiguous(), thresh.detach().contiguous(), side="left")
        count = torch.where(pos_mask, count, torch.zeros_like(count))
        below = torch.gather(csum, 1, count)
        total = (count.to(dist.dtype) * thresh - below).masked_fill(~pos_mask, 0.0).sum()
        return total / count.sum().clamp_min(1).to(dist.dtype)


def _temperature_logits(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None,
    indices_tuple: Indices,
    ref_emb: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    temperature: float,
    distance: Distance,
) -> tuple[Batch, torch.Tensor]:
    """The checked batch and its ``(N, M)`` logits ``±similarity / temperature`` (compute dtype; NT-Xent, SupCon)."""
    check_positive(temperature, "temperature")
    resolved = resolve_distance(distance)
    batch = prepare_batch(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance=resolved)
    with no_autocast(embeddings.device):
        return batch, similarity_sign(resolved) * batch.matrix(resolved) / temperature


def ntxent_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None = None,
    indices_tuple: Indices = None,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    temperature: float = 0.07,
    distance: Distance = "cosine",
    reducer: BaseReducer | None = None,
) -> torch.Tensor:
    r"""NT-Xent / InfoNCE loss :cite:`chen2020simclr`; see :class:`~dml_bias.losses.NTXentLoss`.

    Computed per anchor as a log-sum-exp over its negatives, then one ``softplus`` per positive pair, so no
    (positive pairs × negative pairs) matrix is built and there is no ``finfo.tiny`` cap.

    Args:
        embeddings: ``(N, D)`` floating-point anchors.
        labels: ``(N,)`` integer labels; may be ``None`` with ``indices_tuple``.
        indices_tuple: ``(a1, p, a2, n)`` or ``(a, p, n)``; repeated pairs count again (as in PML).
        ref_emb: ``(M, D)`` reference embeddings; ``None`` uses ``embeddings`` without self-pairs.
        ref_labels: ``(M,)`` labels of ``ref_emb``.
        temperature: :math:`\tau > 0`.
        distance: ``"cosine"`` (default), another metric name or a :mod:`dml_bias.distances` object (a
            distance is negated).
        reducer: a :mod:`dml_bias.reducers` reducer of the per-pair losses (``pos_pair``); ``None``: their mean.

    Returns:
        A scalar tensor: the mean over positive pairs (0 if there is none).

    Example:
        >>> import torch
        >>> emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> ntxent_loss(emb, torch.tensor([0, 0, 1]), temperature=1.0)
        tensor(0.3133)
    """
    batch, logits = _temperature_logits(embeddings, labels, indices_tuple, ref_emb, ref_labels, temperature, distance)
    check_reducer(reducer)
    with no_autocast(embeddings.device):
        pairs = convert_to_pairs(batch)
        if pairs is None:
            pos_mask, neg_mask = pair_masks(batch)
            neg_lse = masked_logsumexp(logits, neg_mask, dim=1, add_one=False)
            neg_lse = neg_lse.masked_fill(~neg_mask.any(dim=1), torch.finfo(logits.dtype).min)
            # Only the positive pairs need the softplus: gather them rather than evaluate all N x M entries.
            a1, p = torch.nonzero(pos_mask, as_tuple=True)
        else:
            a1, p, a2, n = pairs
            # Multiplicity of each negative pair (a repeated pair counts again in the denominator, as in PML).
            ones = torch.ones_like(a2, dtype=logits.dtype)
            counts = torch.zeros_like(logits).index_put((a2, n), ones, accumulate=True)
            has = counts > 0
            weighted = logits + torch.log(counts.masked_fill(~has, 1.0))
            neg_lse = masked_logsumexp(weighted, has, dim=1, add_one=False)
            neg_lse = neg_lse.masked_fill(~has.any(dim=1), torch.finfo(logits.dtype).min)
        per_pair = F.softplus(neg_lse[a1] - entries(logits, a1, p))
        if reducer is not None:
            return _reduce(reducer, {"loss": _entry(per_pair, (a1, p), "pos_pair")}, embeddings, labels)
        if a1.numel() == 0:
            return zero_loss(embeddings, logits.dtype)
        return per_pair.mean()


def supcon_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None = None,
    indices_tuple: Indices = None,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    temperature: float = 0.1,
    distance: Distance = "cosine",
    reducer: BaseReducer | None = None,
) -> torch.Tensor:
    r"""Supervised contrastive loss :cite:`khosla2020supcon`; see :class:`~dml_bias.losses.SupConLoss`.

    Args:
        embeddings: ``(N, D)`` floating-point anchors.
        labels: ``(N,)`` integer labels; may be ``None`` with ``indices_tuple``.
        indices_tuple: ``(a1, p, a2, n)`` or ``(a, p, n)``: only the listed pairs enter (repeats collapse).
        ref_emb: ``(M, D)`` reference embeddings; ``None`` uses ``embeddings`` without self-pairs.
        ref_labels: ``(M,)`` labels of ``ref_emb``.
        temperature: :math:`\tau > 0`.
        distance: ``"cosine"`` (default), another metric name or a :mod:`dml_bias.distances` object (a
            distance is negated).
        reducer: a :mod:`dml_bias.reducers` reducer of the per-anchor losses (``element``); ``None``: the mean
            of the positive ones.

    Returns:
        A scalar tensor: the mean over anchors with a positive loss; 0 if the pairs hold no positive or no
        negative pair at all.

    Example:
        >>> import torch
        >>> emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> supcon_loss(emb, torch.tensor([0, 0, 1]), temperature=1.0)
        tensor(0.3133)
    """
    batch, logits = _temperature_logits(embeddings, labels, indices_tuple, ref_emb, ref_labels, temperature, distance)
    check_reducer(reducer)
    with no_autocast(embeddings.device):
        pos_mask, neg_mask = pair_masks(batch)
        denom = masked_logsumexp(logits, pos_mask | neg_mask, dim=1, add_one=False)
        log_prob = logits - denom.unsqueeze(1)
        num_pos = pos_mask.sum(dim=1)
        per_anchor = -torch.where(pos_mask, log_prob, torch.zeros_like(log_prob)).sum(1) / num_pos.clamp_min(1)
        active = pos_mask.any() & neg_mask.any()
        if reducer is not None:
            # PML: no positive or no negative pair at all is a zero loss; otherwise one loss per anchor.
            rows = torch.arange(per_anchor.shape[0], device=per_anchor.device)
            entry = _entry(per_anchor, rows, "element") if bool(active) else _entry(per_anchor[:0], rows, "element")
            return _reduce(reducer, {"loss": entry}, embeddings, labels)
        loss = _avg_nonzero(per_anchor, num_pos > 0)
        return torch.where(active, loss, loss * 0)


def arcface_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    indices_tuple: Indices = None,
    *,
    margin: float = 0.5,
    scale: float = 64.0,
    reducer: BaseReducer | None = None,
) -> torch.Tensor:
    r"""Additive angular margin (ArcFace) loss :cite:`deng2019arcface` (margin in radians, weight ``(C, D)``).

    See :class:`~dml_bias.losses.AdditiveAngularMarginLoss` (and :class:`~dml_bias.losses.ArcFaceLoss`, PML's form).

    Args:
        embeddings: ``(N, D)`` floating-point embeddings.
        labels: ``(N,)`` integer labels in ``[0, C)``.
        weight: ``(C, D)`` class weights (the layout of :class:`torch.nn.Linear`), not modified.
        indices_tuple: optional miner output; each sample's loss is multiplied by ``count / max count``.
        margin: the angular margin :math:`m` in **radians**, in ``[0, pi)``.
        scale: :math:`s > 0`.
        reducer: a :mod:`dml_bias.reducers` reducer of the per-sample losses (``element``); ``None``: their mean.

    Returns:
        A scalar tensor: the mean over the batch.

    Example:
        >>> import torch
        >>> emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> arcface_loss(emb, torch.tensor([0, 1]), emb.clone(), margin=0.0, scale=1.0)
        tensor(0.3133)
    """
    check_number(margin, "margin", low=0.0, high=math.pi, high_inclusive=False)
    check_positive(scale, "scale")
    check_reducer(reducer)
    batch = prepare_batch(
        embeddings, labels, indices_tuple, None, None, distance="cosine", labels_required=True, extra={"weight": weight}
    )
    assert batch.labels is not None
    if checks_enabled():  # a value check: one host sync (see dml_bias.set_checks)
        check_labels(batch.labels, "labels", num_classes=weight.shape[0])
    with no_autocast(embeddings.device):
        cos = similarity_matrix(batch.x, batch.extra["weight"], "cosine", embeddings.dtype, weight.dtype)  # (N, C)
        target = cos.gather(1, batch.labels.unsqueeze(1)).squeeze(1)
        # cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m), with sin(theta) = sqrt(1 - cos^2) replaced by
        # its chord v / sqrt(eps) for v = 1 - cos^2 < eps: exact at cos = +-1 and for v >= eps, and the gradient
        # stays finite (acos and sqrt have an infinite slope at cos = +-1). Where theta + m > pi, use
        # cos(theta) - m sin(m) as insightface / PML do, which keeps the target logit decreasing in theta.
        v = (1.0 - target * target).clamp_min(0.0)
        sin = torch.where(v >= _ARC_EPS, v.clamp_min(_ARC_EPS).sqrt(), v / math.sqrt(_ARC_EPS))
        with_margin = target * math.cos(margin) - sin * math.sin(margin)
        fallback = target - margin * math.sin(margin)
        new_target = torch.where(target >= -math.cos(margin), with_margin, fallback)
        onehot = F.one_hot(batch.labels, weight.shape[0]).to(cos.dtype)
        logits = scale * (cos + onehot * (new_target - target).unsqueeze(1))
        per_sample = F.cross_entropy(logits, batch.labels, reduction="none")
        w = miner_weights(batch.indices_tuple, batch.x.shape[0], batch.x.dtype)
        if reducer is not None:
            rows = torch.arange(per_sample.shape[0], device=per_sample.device)
            return _reduce(reducer, {"loss": _entry(per_sample * w, rows, "element")}, embeddings, labels)
        return (per_sample * w).mean()


#: Below this value of ``1 - cos^2``, ArcFace replaces ``sqrt`` by its chord (finite gradient at cos = +-1).
_ARC_EPS = 1e-7
