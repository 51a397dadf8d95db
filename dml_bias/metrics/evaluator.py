"""An accumulating retrieval evaluator that gives the same result on one process and across ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dml_bias._checks import (
    check_bool,
    check_choice,
    check_embeddings,
    check_finite,
    check_labels,
    check_number,
    check_same_device,
    describe,
)
from dml_bias._collectives import all_gather_objects, all_gather_rows, world_size
from dml_bias.metrics._engine import check_device_arg, check_not_meta, parse_metrics
from dml_bias.similarity import METRICS

__all__ = ["RetrievalEvaluator"]


class RetrievalEvaluator:
    """Accumulate embeddings batch by batch, then compute :func:`~dml_bias.metrics.retrieval_metrics` on all.

    By default every sample is both a query and a reference item (the CUB/Cars/SOP protocol): ``compute()`` calls
    ``retrieval_metrics(embeddings, labels, ks=ks, metrics=metrics, metric=metric, exclude_self=exclude_self,
    per_class=per_class)`` on everything accumulated since the last :meth:`reset` (plus ``normalize_embeddings``
    and ``chunk_size``), so it computes only the requested keys, each at the cost of its own pass.
    With ``separate_reference=True`` (the In-Shop protocol: a query set searched against a gallery) batches
    passed with ``update(..., reference=True)`` form the gallery, the others the queries, and ``compute()`` calls
    ``retrieval_metrics(queries, query_labels, gallery, gallery_labels, exclude_self=False, ...)``.

    **Storage.** :meth:`update` stores detached copies of its inputs (never views of them) on ``device``, or on the
    device of the inputs when ``device`` is ``None``; move them to the CPU with ``device="cpu"`` when the
    accelerator is short of memory. ``compute`` runs on the storage device.

    **Distributed.** When :mod:`torch.distributed` is initialised with more than one rank in ``group``,
    ``compute`` gathers every rank's samples (ranks may hold different numbers of samples, also none) and every
    rank returns the same result. A :class:`~torch.utils.data.distributed.DistributedSampler` pads the dataset
    with repeated samples so that every rank gets as many; pass the dataset ``indices`` of each batch to
    :meth:`update` and the gathered set is reduced to the first occurrence of each index, ordered by index
    (separately for queries and gallery). The result then equals the single-process evaluation of the dataset in
    its own order (which matters for ties, broken by the lower reference index). Without ``indices`` the samples
    are concatenated in rank order and padded repeats stay in. On NCCL the tensors travel through the current
    CUDA device; on Gloo through the CPU.

    **Re-identification.** Pass each sample's camera (or sequence) id as ``update(..., groups=...)`` and
    ``compute`` applies the re-identification rule of :func:`~dml_bias.metrics.retrieval_metrics`: a reference item
    with the query's label *and* group is left out of that query's list (``query_groups`` /
    ``reference_groups``). Give groups for every batch (queries and gallery) or for none.

    Args:
        ks: The cut-offs of Recall@k.
        metrics: The keys to compute (see :func:`~dml_bias.metrics.retrieval_metrics`); ``None``: Recall@k,
            MAP@R and R-precision.
        metric: ``"cosine"``, ``"dot"``, ``"euclidean"`` or ``"squared_euclidean"`` (see
            :func:`dml_bias.similarity.pairwise`).
        exclude_self: Leave each query out of its own neighbours (the usual DML protocol). With ``False`` the
            accumulated set is searched with itself included. Ignored with ``separate_reference=True``.
        per_class: Also return the metrics per query label (key ``"per_class"``).
        separate_reference: Keep queries and gallery apart (see above).
        normalize_embeddings: Passed to :func:`~dml_bias.metrics.retrieval_metrics` (``None``: the metric's
            default).
        chunk_size: Passed to :func:`~dml_bias.metrics.retrieval_metrics` (query rows per block; ``None``: from
            the memory budget).
        device: Where :meth:`update` stores its copies (a :class:`torch.device` or a string such as ``"cpu"``);
            ``None`` keeps the device of the inputs.
        group: The :mod:`torch.distributed` process group to gather over; ``None`` is the default group.

    Example:
        >>> import torch
        >>> evaluator = RetrievalEvaluator(ks=(1, 2))
        >>> emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> evaluator.update(emb[:2], torch.tensor([0, 0]), indices=torch.tensor([0, 1]))
        >>> evaluator.update(emb[2:], torch.tensor([1, 1]), indices=torch.tensor([2, 3]))
        >>> result = evaluator.compute()
        >>> result["recall@1"], result["num_queries"]
        (1.0, 4)
        >>> evaluator.reset()
        >>> len(evaluator)
        0
        >>> inshop = RetrievalEvaluator(ks=(1,), separate_reference=True)
        >>> inshop.update(emb[[0, 2]], torch.tensor([0, 1]))  # queries
        >>> inshop.update(emb[[3, 1]], torch.tensor([1, 0]), reference=True)  # gallery
        >>> inshop.compute()["recall@1"]
        1.0
        >>> reid = RetrievalEvaluator(ks=(1,), separate_reference=True, metrics=("recall@k", "map"))
        >>> reid.update(emb[[0]], torch.tensor([0]), groups=torch.tensor([5]))  # query seen by camera 5
        >>> reid.update(emb[[1, 2, 3]], torch.tensor([0, 0, 1]), reference=True, groups=torch.tensor([5, 6, 6]))
        >>> reid.compute()["map"]  # the same-camera match (row 1) is left out; the other ranks 2nd: AP 1/2
        0.5
    """

    def __init__(
        self,
        *,
        ks: Sequence[int] = (1, 2, 4, 8),
        metrics: Sequence[str] | None = None,
        metric: str = "cosine",
        exclude_self: bool = True,
        per_class: bool = False,
        separate_reference: bool = False,
        normalize_embeddings: bool | None = None,
        chunk_size: int | None = None,
        device: torch.device | str | None = None,
        group: Any = None,
    ) -> None:
        if isinstance(ks, (int, str)) or not isinstance(ks, Sequence) or len(ks) == 0:
            raise TypeError(f"ks must be a non-empty sequence of positive integers, got {describe(ks)}")
        for k in ks:
            check_number(k, "ks[...]", low=1, integer=True)
        check_choice(metric, "metric", METRICS)
        for name, flag in (
            ("exclude_self", exclude_self),
            ("per_class", per_class),
            ("separate_reference", separate_reference),
        ):
            check_bool(flag, name)
        check_bool(normalize_embeddings, "normalize_embeddings", allow_none=True)
        if chunk_size is not None:
            check_number(chunk_size, "chunk_size", low=1, integer=True)
        self.ks = tuple(int(k) for k in ks)
        self.metrics = parse_metrics(metrics)
        self.metric = metric
        self.exclude_self = exclude_self
        self.per_class = per_class
        self.separate_reference = separate_reference
        self.normalize_embeddings = normalize_embeddings
        self.chunk_size = chunk_size
        self.device = check_device_arg(device, "device")
        self.group = group
        self._parts: dict[bool, _Part] = {False: _Part(), True: _Part()}

    def __len__(self) -> int:
        """The number of samples (queries and gallery) accumulated on this process."""
        return sum(int(e.shape[0]) for part in self._parts.values() for e in part.embeddings)

    def __repr__(self) -> str:
        """Show the configuration and how many samples are held."""
        return (
            f"{type(self).__name__}(ks={self.ks}, metrics={self.metrics}, metric={self.metric!r}, "
            f"exclude_self={self.exclude_self}, "
            f"per_class={self.per_class}, separate_reference={self.separate_reference}, device={self.device}, "
            f"samples={len(self)})"
        )

    def reset(self) -> None:
        """Forget every accumulated sample (call it before each evaluation epoch)."""
        self._parts = {False: _Part(), True: _Part()}

    def update(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor | None = None,
        *,
        reference: bool = False,
        groups: torch.Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            embeddings: ``(B, D)`` floating-point tensor, finite; ``D`` and the dtype must match earlier batches.
            labels: ``(B,)`` integer tensor of class labels.
            indices: Optional ``(B,)`` integer tensor of dataset indices (the sample's ``"index"``). Give it for
                every batch or for none.
            reference: With ``separate_reference=True``: the batch belongs to the gallery (else to the queries).
            groups: Optional ``(B,)`` integer tensor of group ids (cameras, sequences) for the re-identification
                rule (see the class documentation). Give it for every batch or for none.
        """
        check_bool(reference, "reference")
        if reference and not self.separate_reference:
            raise ValueError("reference=True needs RetrievalEvaluator(separate_reference=True)")
        check_not_meta(embeddings=embeddings, labels=labels, indices=indices)
        check_embeddings(embeddings, "embeddings", allow_empty=True)
        check_labels(labels, "labels", length=embeddings.shape[0], length_source="embeddings.shape[0]")
        check_not_meta(groups=groups)
        check_same_device(embeddings=embeddings, labels=labels, indices=indices, groups=groups)
        if groups is not None:
            check_labels(groups, "groups", length=embeddings.shape[0], length_source="embeddings.shape[0]")
        with_groups = groups is not None
        group_modes = {part.with_groups for part in self._parts.values()} - {None}
        if group_modes and with_groups not in group_modes:
            raise ValueError(
                "groups must be given for every batch or for none since the last reset(), got "
                + ("groups after batches without them" if with_groups else "no groups after batches with them")
            )
        if indices is not None:
            check_labels(indices, "indices", length=embeddings.shape[0], length_source="embeddings.shape[0]")
            if indices.numel() and int(indices.min()) < 0:
                raise ValueError(f"indices must be non-negative dataset indices, got minimum {int(indices.min())}")
        with_indices = indices is not None
        modes = {part.with_indices for part in self._parts.values()} - {None}
        if modes and with_indices not in modes:
            raise ValueError(
                "indices must be given for every batch or for none since the last reset(), got "
                + ("indices after batches without them" if with_indices else "no indices after batches with them")
            )
        held = [part.embeddings[0] for part in self._parts.values() if part.embeddings]
        if held and (embeddings.shape[1] != held[0].shape[1] or embeddings.dtype != held[0].dtype):
            raise ValueError(
                f"embeddings must have size D={held[0].shape[1]} and dtype {held[0].dtype} like the earlier "
                f"batches, got {describe(embeddings)}"
            )
        check_finite(embeddings, "embeddings")
        device = self.device if self.device is not None else embeddings.device
        part = self._parts[reference]
        part.with_indices = with_indices
        part.with_groups = with_groups
        if groups is not None:
            part.groups.append(groups.detach().to(device=device, dtype=torch.long, copy=True))
        part.embeddings.append(embeddings.detach().to(device, copy=True))
        part.labels.append(labels.detach().to(device=device, dtype=torch.long, copy=True))
        if indices is not None:
            part.indices.append(indices.detach().to(device=device, dtype=torch.long, copy=True))

    def gathered(self, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Everything accumulated, gathered across ranks and de-duplicated by index as ``compute`` sees it.

        Args:
            reference: Return the gallery (with ``separate_reference=True``) instead of the queries.

        Returns:
            ``(embeddings (N, D), labels (N,), indices (N,) or None)``, on the storage device.
        """
        embeddings, labels, indices, _ = self._collected(reference)
        return embeddings, labels, indices

    def _collected(
        self, reference: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`gathered` plus the group ids (or ``None``)."""
        part = self._parts[reference]
        embeddings, labels, indices, groups = part.local(self.device)
        if world_size(self.group) > 1:
            embeddings, labels, indices = _gather(part, embeddings, labels, indices, group=self.group)
            groups = _gather_groups(part, groups, labels, self.group)
        if indices is not None:
            keep = _first_by_index(labels, indices)
            embeddings, labels, indices = embeddings[keep], labels[keep], indices[keep]
            groups = None if groups is None else groups[keep]
        return embeddings, labels, indices, groups

    def compute(self) -> dict[str, Any]:
        """Compute the retrieval metrics over everything accumulated (on all ranks).

        Returns:
            The dictionary of :func:`~dml_bias.metrics.retrieval_metrics`.
        """
        from dml_bias.metrics.retrieval import retrieval_metrics

        embeddings, labels, _, groups = self._collected(False)
        if embeddings.shape[0] == 0:
            raise ValueError("RetrievalEvaluator.compute() needs at least one query sample; call update() first")
        options: dict[str, Any] = {
            "ks": self.ks,
            "metrics": self.metrics,
            "per_class": self.per_class,
            "metric": self.metric,
            "normalize_embeddings": self.normalize_embeddings,
            "chunk_size": self.chunk_size,
        }
        if self.separate_reference:
            gallery, gallery_labels, _, gallery_groups = self._collected(True)
            if gallery.shape[0] == 0:
                raise ValueError("RetrievalEvaluator.compute() needs gallery samples; call update(..., reference=True)")
            if (groups is None) != (gallery_groups is None):
                raise ValueError("groups must be given for the queries and the gallery alike, got them for one only")
            options.update(query_groups=groups, reference_groups=gallery_groups)
            return retrieval_metrics(embeddings, labels, gallery, gallery_labels, exclude_self=False, **options)
        if self.exclude_self:
            return retrieval_metrics(embeddings, labels, exclude_self=True, query_groups=groups, **options)
        options.update(query_groups=groups, reference_groups=groups)
        return retrieval_metrics(embeddings, labels, embeddings, labels, exclude_self=False, **options)


class _Part:
    """The batches of one split (queries or gallery) held by this process."""

    def __init__(self) -> None:
        self.embeddings: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self.groups: list[torch.Tensor] = []
        self.with_indices: bool | None = None
        self.with_groups: bool | None = None

    def local(
        self, device: torch.device | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if not self.embeddings:
            # No dtype/size known yet: placeholders that a gather fills in from the other ranks.
            device = device if device is not None else torch.device("cpu")
            return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device), None, None
        embeddings = torch.cat(self.embeddings)
        labels = torch.cat(self.labels)
        indices = torch.cat(self.indices) if self.with_indices else None
        groups = torch.cat(self.groups) if self.with_groups else None
        return embeddings, labels, indices, groups


def _gather(
    part: _Part, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None, *, group: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """All-gather one split's samples (unequal sizes; ranks without samples take dtype and size from others)."""
    held = bool(part.embeddings)
    meta = (
        int(embeddings.shape[0]),
        int(embeddings.shape[1]) if held else -1,
        str(embeddings.dtype) if held else "",
        None if not held else indices is not None,
    )
    metas = all_gather_objects(meta, group)
    holders = [m for m in metas if m[0] > 0]
    if not holders:
        return embeddings, labels, indices
    dims = {m[1] for m in holders}
    dtypes = {m[2] for m in holders}
    modes = {m[3] for m in holders}
    if len(dims) > 1 or len(dtypes) > 1:
        raise ValueError(
            f"embeddings must have the same size D and dtype on every rank, got {sorted(dims)} and {sorted(dtypes)}"
        )
    if len(modes) > 1:
        raise ValueError("indices must be given on every rank or on none, got a mix")
    dim = dims.pop()
    dtype = getattr(torch, dtypes.pop().replace("torch.", ""))
    if not held:
        embeddings = embeddings.new_zeros((0, dim), dtype=dtype)
    sizes = [m[0] for m in metas]
    all_embeddings = torch.cat(all_gather_rows(embeddings, sizes, group))
    all_labels = torch.cat(all_gather_rows(labels, sizes, group))
    all_indices = None
    if modes.pop():
        local_indices = indices if indices is not None else labels.new_zeros(0)
        all_indices = torch.cat(all_gather_rows(local_indices, sizes, group))
    return all_embeddings, all_labels, all_indices


def _gather_groups(part: _Part, groups: torch.Tensor | None, labels: torch.Tensor, group: Any) -> torch.Tensor | None:
    """All-gather one split's group ids (``None`` when no rank gave any; a mix raises on every rank).

    ``labels`` are the split's gathered labels: the group ids come back beside them, on their device.
    """
    held = bool(part.embeddings)
    mine = (0 if groups is None else int(groups.shape[0]), None if not held else groups is not None)
    metas = all_gather_objects(mine, group)
    modes = {m[1] for m in metas} - {None}
    if len(modes) > 1:
        raise ValueError("groups must be given on every rank or on none, got a mix")
    if not modes or not modes.pop():
        return None
    local = groups if groups is not None else labels.new_zeros(0)
    out = torch.cat(all_gather_rows(local, [m[0] for m in metas], group)).to(labels.device)
    if out.shape[0] != labels.shape[0]:  # pragma: no cover - sizes come from the same batches as the labels
        raise RuntimeError(f"internal error: {out.shape[0]} group ids for {labels.shape[0]} samples")
    return out


def _first_by_index(labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each dataset index, ordered by index; repeats must agree on the label."""
    order = torch.sort(indices, stable=True).indices
    sorted_indices = indices[order]
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    # Every repeat must carry the label of its first occurrence.
    group_id = torch.cumsum(first.long(), 0) - 1
    keep = order[first]
    if not bool((labels[order] == labels[keep][group_id]).all()):
        raise ValueError("indices must identify samples: the same dataset index was given with different labels")
    return keep
