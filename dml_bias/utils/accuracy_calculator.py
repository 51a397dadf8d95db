r"""pytorch-metric-learning's ``AccuracyCalculator``, on dml_bias' exact k-nearest-neighbour search.

``AccuracyCalculator(include, exclude, avg_of_avgs, return_per_class, k, device, knn_func)`` and
``get_accuracy(query, query_labels, reference=None, reference_labels=None, ref_includes_query=False)`` take PML's
arguments and return PML's keys with PML's definitions. For query :math:`q` with label :math:`y`, its ``k``
neighbours' labels :math:`\ell_1, \dots, \ell_k` (:math:`\text{rel}_i = [\ell_i = y]`) and :math:`R` the number of
reference items labelled :math:`y` (less the query itself when ``ref_includes_query``):

* ``precision_at_1`` :math:`= \text{rel}_1` (DML Recall@1);
* ``r_precision`` :math:`= \frac{1}{\min(k, R)} \sum_{i \le \min(k, R)} \text{rel}_i`;
* ``mean_average_precision_at_r`` :math:`= \frac{1}{R} \sum_{i \le \min(k, R)} P@i \cdot \text{rel}_i`;
* ``mean_average_precision`` :math:`= \frac{1}{R} \sum_{i \le k} P@i \cdot \text{rel}_i` (divided by :math:`R`
  even when :math:`k < R`: PML's definition, the usual AP only for :math:`k` large enough);
* ``mean_reciprocal_rank`` :math:`= 1 / (\text{rank of the first relevant neighbour})`, 0 if none within ``k``;
* ``NMI``, ``AMI``: normalised / adjusted mutual information (arithmetic normalisation, as scikit-learn's
  defaults) between the query labels and a k-means clustering of the query embeddings into as many clusters as
  there are query labels (faiss' ``Kmeans`` with ``niter=20`` when faiss is installed — PML's clustering —
  else a seeded Lloyd k-means in torch).

Queries whose label has :math:`R = 0` ("lone" queries) are left out of the kNN metrics; if every query is lone
the metrics are NaN. Every value is a Python float (a list with ``return_per_class``), as in PML.

**Differences from PML** (each with its reason):

* The neighbours come from :func:`dml_bias.metrics.knn`: exact Euclidean distances of the raw embeddings (the
  ranking of PML's faiss ``IndexFlatL2``), **ties broken by the lower reference index**; faiss leaves exact
  ties in an unspecified order, so values can differ only where distances tie exactly.
* Labels stay integers (PML casts labels to float32, so distinct labels :math:`\ge 2^{24}` can compare equal).
* ``k=None`` never holds an :math:`N \times N` matrix: the queries are processed in blocks (PML needs
  :math:`O(N^2)` memory, 4.2 GB at :math:`N = 8000`).
* ``device=None`` computes on the query's device (PML picks CUDA whenever available).
* Not provided: ``label_comparison_fn`` (custom label comparisons), ``kmeans_func``, ``get_accuracy``'s
  ``include``/``exclude`` overrides; subclassing with ``calculate_*`` methods is not supported.

Example:
    >>> import torch
    >>> from dml_bias.utils.accuracy_calculator import AccuracyCalculator
    >>> x = torch.tensor([[0.0], [0.1], [1.0], [1.2], [5.0]])
    >>> labels = torch.tensor([0, 0, 1, 0, 1])
    >>> calc = AccuracyCalculator(exclude=("NMI", "AMI"))
    >>> acc = calc.get_accuracy(x, labels)
    >>> acc["precision_at_1"], acc["mean_reciprocal_rank"]
    (0.4, 0.65)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from dml_bias._checks import check_bool, check_embeddings, check_labels, check_same_device, describe

__all__ = ["AccuracyCalculator", "adjusted_mutual_info", "normalized_mutual_info"]

#: The metrics AccuracyCalculator computes, in PML's (alphabetical) order.
METRICS: tuple[str, ...] = (
    "AMI",
    "NMI",
    "mean_average_precision",
    "mean_average_precision_at_r",
    "mean_reciprocal_rank",
    "precision_at_1",
    "r_precision",
)
_CLUSTERING = ("AMI", "NMI")

#: Entries of the (queries x k) block matrices held at once (bounds the memory of k=None).
_BLOCK_ENTRIES = 1 << 23


# ----------------------------------------------------------------------------------------------------------------
# Mutual-information scores (scikit-learn's definitions, in numpy/scipy)
# ----------------------------------------------------------------------------------------------------------------


def _as_int_array(labels: Any, name: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _contingency(labels_true: Any, labels_pred: Any) -> tuple[np.ndarray, int, int, int]:
    a = _as_int_array(labels_true, "labels_true")
    b = _as_int_array(labels_pred, "labels_pred")
    if a.shape != b.shape:
        raise ValueError(f"labels_true and labels_pred must have the same length, got {a.shape[0]} and {b.shape[0]}")
    classes, ai = np.unique(a, return_inverse=True)
    clusters, bi = np.unique(b, return_inverse=True)
    table = np.zeros((len(classes), len(clusters)), dtype=np.int64)
    np.add.at(table, (ai.reshape(-1), bi.reshape(-1)), 1)
    return table, len(classes), len(clusters), a.shape[0]


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0].astype(np.float64)
    total = p.sum()
    return float(-np.sum((p / total) * (np.log(p) - math.log(total))))


def _mutual_info(table: np.ndarray, n: int) -> float:
    nz = table > 0
    nij = table[nz].astype(np.float64)
    a = table.sum(1).astype(np.float64)
    b = table.sum(0).astype(np.float64)
    outer = np.outer(a, b)[nz]
    mi = np.sum(nij / n * (np.log(nij) + math.log(n) - np.log(outer)))
    return float(max(mi, 0.0))


def _expected_mutual_info(table: np.ndarray, n: int) -> float:
    """E[MI] under the hypergeometric model of random labellings with these marginals (Vinh et al., 2010)."""
    from scipy.special import gammaln

    a = table.sum(1).astype(np.int64)
    b = table.sum(0).astype(np.int64)
    log_n = math.log(n)
    g_n = gammaln(n + 1)
    emi = 0.0
    for ai in a:
        lo = np.maximum(1, ai + b - n)  # (C,) first nij of each pair
        hi = np.minimum(ai, b)
        span = int((hi - lo).max()) + 1 if len(b) else 0
        if span <= 0:
            continue
        nij = lo[:, None] + np.arange(span)[None, :]  # (C, span)
        valid = nij <= hi[:, None]
        nij = np.where(valid, nij, 1).astype(np.float64)
        bb = b[:, None].astype(np.float64)
        term1 = nij / n * (np.log(nij) + log_n - math.log(ai) - np.log(bb))
        log_p = (
            gammaln(ai + 1)
            + gammaln(bb + 1)
            + gammaln(n - ai + 1)
            + gammaln(n - bb + 1)
            - g_n
            - gammaln(nij + 1)
            - gammaln(ai - nij + 1)
            - gammaln(bb - nij + 1)
            - gammaln(n - ai - bb + nij + 1)
        )
        emi += float(np.sum(np.where(valid, term1 * np.exp(log_p), 0.0)))
    return emi


def normalized_mutual_info(labels_true: Any, labels_pred: Any) -> float:
    r"""Normalised mutual information :math:`\mathrm{MI} / \tfrac12 (H(U) + H(V))` (scikit-learn's default).

    Args:
        labels_true: ``(N,)`` class labels (tensor, array or sequence).
        labels_pred: ``(N,)`` cluster labels.

    Returns:
        A float in ``[0, 1]``; 1.0 when both labellings are a single (or no) group.

    Example:
        >>> normalized_mutual_info([0, 0, 1, 1], [1, 1, 0, 0]), normalized_mutual_info([0, 0, 0, 0], [0, 1, 2, 3])
        (1.0, 0.0)
    """
    table, nc, nk, n = _contingency(labels_true, labels_pred)
    if nc == nk == 1 or nc == nk == 0:
        return 1.0
    mi = _mutual_info(table, n)
    if mi == 0:
        return 0.0
    return float(mi / ((_entropy(table.sum(1)) + _entropy(table.sum(0))) / 2))


def adjusted_mutual_info(labels_true: Any, labels_pred: Any) -> float:
    r"""Adjusted mutual information :math:`(\mathrm{MI} - E[\mathrm{MI}]) / (\tfrac12(H(U)+H(V)) - E[\mathrm{MI}])`.

    The expectation is over random labellings with the same group sizes (Vinh et al., 2010); the normalisation
    is the arithmetic mean of the entropies, as scikit-learn's ``adjusted_mutual_info_score`` by default.

    Args:
        labels_true: ``(N,)`` class labels.
        labels_pred: ``(N,)`` cluster labels.

    Returns:
        A float (1.0 for identical partitions, about 0 for random ones).

    Example:
        >>> round(adjusted_mutual_info([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1]), 4)
        0.6154
    """
    table, nc, nk, n = _contingency(labels_true, labels_pred)
    if nc == nk == 1 or nc == nk == 0:
        return 1.0
    if nc == 1 or nk == 1:
        return 0.0
    mi = _mutual_info(table, n)
    emi = _expected_mutual_info(table, n)
    normalizer = (_entropy(table.sum(1)) + _entropy(table.sum(0))) / 2
    eps = float(np.finfo(np.float64).eps)
    denominator = normalizer - emi
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    numerator = mi - emi
    numerator = min(numerator, -eps) if numerator < 0 else max(numerator, eps)
    return float(numerator / denominator)


# ----------------------------------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------------------------------


def _kmeans(x: torch.Tensor, num_clusters: int, niter: int = 20, seed: int = 1234) -> torch.Tensor:
    """Cluster ids ``(N,)``: faiss' ``Kmeans`` (PML's clustering) if installed, else a seeded torch Lloyd k-means."""
    faiss: Any
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        data = np.ascontiguousarray(x.detach().cpu().to(torch.float32).numpy())
        km = faiss.Kmeans(data.shape[1], num_clusters, niter=niter, seed=seed)
        km.train(data)
        _, ids = km.index.search(data, 1)
        return torch.as_tensor(ids[:, 0].astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    points = x.detach().cpu().to(torch.float64)
    # k-means++ seeding, then Lloyd iterations; an empty cluster keeps its centre.
    centres = points[torch.randint(0, len(points), (1,), generator=g)]
    for _ in range(1, num_clusters):
        d2 = torch.cdist(points, centres).min(dim=1).values ** 2
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / len(d2))
        centres = torch.cat([centres, points[torch.multinomial(probs, 1, generator=g)]])
    ids = torch.cdist(points, centres).argmin(dim=1)
    for _ in range(niter):
        sums = torch.zeros_like(centres).index_add_(0, ids, points)
        counts = torch.bincount(ids, minlength=num_clusters).to(points.dtype)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        ids = torch.cdist(points, centres).argmin(dim=1)
    return ids


# ----------------------------------------------------------------------------------------------------------------
# kNN metrics
# ----------------------------------------------------------------------------------------------------------------


def _exact_knn(
    block: torch.Tensor, reference: torch.Tensor, k: int, offset: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean top-``k`` of raw embeddings for a block of queries (:func:`dml_bias.metrics.knn`).

    ``offset``: the block's queries are reference rows ``offset, offset + 1, ...`` and each row's own position is
    removed (PML's rule: a row without it, because exact duplicates rank first, drops its last column instead);
    ``None``: the queries are not in the reference.
    """
    from dml_bias.metrics import knn

    extra = 0 if offset is None else 1
    dist, idx = knn(
        block, reference, min(k + extra, reference.shape[0]), metric="euclidean", normalize_embeddings=False
    )
    if offset is None:
        return dist[:, :k], idx[:, :k]
    own = torch.arange(offset, offset + block.shape[0], device=idx.device).unsqueeze(1)
    drop = idx == own
    drop[~drop.any(dim=1), -1] = True
    rows = block.shape[0]
    return dist[~drop].reshape(rows, -1)[:, :k], idx[~drop].reshape(rows, -1)[:, :k]


def _per_query_knn_metrics(same: torch.Tensor, r: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query float64 values of PML's kNN metrics from the ``(B, k)`` relevance matrix and ``R`` per query."""
    k = same.shape[1]
    ranks = torch.arange(1, k + 1, device=same.device, dtype=torch.float64)
    rel = same.to(torch.float64)
    within_r = torch.arange(k, device=same.device).unsqueeze(0) < r.unsqueeze(1)  # the first min(k, R) columns
    rel_r = rel * within_r
    r64 = r.to(torch.float64)
    first = torch.where(same.any(dim=1), same.to(torch.int8).argmax(dim=1) + 1, torch.zeros_like(r))
    return {
        "precision_at_1": rel[:, 0],
        "r_precision": rel_r.sum(1) / within_r.sum(1).to(torch.float64),
        "mean_average_precision_at_r": (rel_r.cumsum(1) * rel_r / ranks).sum(1) / r64,
        "mean_average_precision": (rel.cumsum(1) * rel / ranks).sum(1) / r64,
        "mean_reciprocal_rank": torch.where(first > 0, 1.0 / first.clamp_min(1).to(torch.float64), 0.0),
    }


class AccuracyCalculator:
    r"""PML's ``AccuracyCalculator``: retrieval and clustering scores of query embeddings against a reference set.

    Args:
        include: Metric names to compute (empty: all of ``AMI``, ``NMI``, ``mean_average_precision``,
            ``mean_average_precision_at_r``, ``mean_reciprocal_rank``, ``precision_at_1``, ``r_precision``).
        exclude: Metric names to leave out.
        avg_of_avgs: Average per query label first, then over labels (macro average).
        return_per_class: Return, for each metric, the list of per-label averages (sorted labels of the
            non-lone queries); exclusive with ``avg_of_avgs``.
        k: Neighbours per query: an ``int >= 1``, ``None`` (every reference item: exact R-based metrics and the
            full average precision) or ``"max_bin_count"`` (the largest label count, enough for the R-based
            metrics). With an int below the largest label count the R-based metrics are truncated, and a warning
            says so (as in PML).
        device: Where the scores are computed (``None``: the query's device).
        knn_func: Optional ``knn_func(query, k, reference, ref_includes_query) -> (distances, indices)`` of shape
            ``(N, k)`` (PML's contract, e.g. PML's ``FaissKNN()``), with self excluded when
            ``ref_includes_query``; default: :func:`dml_bias.metrics.knn` (exact, Euclidean on raw embeddings,
            ties to the lower index).

    Example:
        >>> import torch
        >>> from dml_bias.utils.accuracy_calculator import AccuracyCalculator
        >>> query = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
        >>> reference = torch.tensor([[0.1, 0.0], [3.0, 2.9], [0.0, 0.2]])
        >>> calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k=2)
        >>> calc.get_accuracy(query, torch.tensor([0, 1]), reference, torch.tensor([0, 1, 0]))
        {'mean_average_precision_at_r': 1.0, 'precision_at_1': 1.0}
    """

    def __init__(
        self,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        avg_of_avgs: bool = False,
        return_per_class: bool = False,
        k: int | str | None = None,
        device: torch.device | str | None = None,
        knn_func: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        for name, value in (("include", include), ("exclude", exclude)):
            if not isinstance(value, (tuple, list)):
                raise TypeError(f"{name} must be a tuple or list of metric names, got {describe(value)}")
            unknown = [m for m in value if m not in METRICS]
            if unknown:
                raise ValueError(f"{name} must name metrics among {', '.join(METRICS)}; unknown: {unknown}")
        for flag_name, flag in (("avg_of_avgs", avg_of_avgs), ("return_per_class", return_per_class)):
            check_bool(flag, flag_name)
        if avg_of_avgs and return_per_class:
            raise ValueError("avg_of_avgs and return_per_class are mutually exclusive")
        if not (k is None or k == "max_bin_count" or (isinstance(k, int) and not isinstance(k, bool) and k >= 1)):
            raise ValueError(f"k must be an integer >= 1, None or 'max_bin_count', got {k!r}")
        if knn_func is not None and not callable(knn_func):
            raise TypeError(f"knn_func must be callable or None, got {describe(knn_func)}")
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.avg_of_avgs = avg_of_avgs
        self.return_per_class = return_per_class
        self.k = k
        self.device = None if device is None else torch.device(device)
        self.knn_func = knn_func

    def get_curr_metrics(self) -> list[str]:
        """The metric names this calculator returns, in order.

        Example:
            >>> from dml_bias.utils.accuracy_calculator import AccuracyCalculator
            >>> AccuracyCalculator(exclude=("AMI", "NMI")).get_curr_metrics()[:2]
            ['mean_average_precision', 'mean_average_precision_at_r']
        """
        chosen = self.include or METRICS
        return [m for m in METRICS if m in chosen and m not in self.exclude]

    def requires_clustering(self) -> list[str]:
        """The clustering metrics (``["NMI", "AMI"]``)."""
        return ["NMI", "AMI"]

    def requires_knn(self) -> list[str]:
        """The metrics computed from the neighbours."""
        return [m for m in METRICS if m not in _CLUSTERING]

    def _check(self, x: Any, name: str) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {describe(x)}")
        return x

    def _determine_k(self, max_count: int, num_reference: int, ref_includes_query: bool) -> int:
        self_count = int(ref_includes_query)
        if self.k == "max_bin_count":
            k = max_count - self_count
        elif self.k is None:
            k = num_reference - self_count
        else:
            k = int(self.k)
            if k < max_count and {"r_precision", "mean_average_precision_at_r"} & set(self.get_curr_metrics()):
                warnings.warn(
                    f"k={k} is below the largest label count ({max_count}): r_precision and "
                    "mean_average_precision_at_r are truncated at k",
                    UserWarning,
                    stacklevel=3,
                )
        return max(1, min(k, num_reference - self_count))  # PML passes larger k to faiss, which pads with -1

    def _reduce(self, values: torch.Tensor, labels: torch.Tensor) -> float | list[float]:
        if not (self.avg_of_avgs or self.return_per_class):
            return float(values.mean())
        classes, inverse = torch.unique(labels, return_inverse=True)
        sums = torch.zeros(len(classes), dtype=torch.float64, device=values.device).index_add_(0, inverse, values)
        per_class = sums / torch.bincount(inverse, minlength=len(classes)).to(torch.float64)
        return per_class.tolist() if self.return_per_class else float(per_class.mean())

    def get_accuracy(
        self,
        query: torch.Tensor,
        query_labels: torch.Tensor,
        reference: torch.Tensor | None = None,
        reference_labels: torch.Tensor | None = None,
        ref_includes_query: bool = False,
    ) -> dict[str, Any]:
        """Compute the metrics.

        Args:
            query: ``(Nq, D)`` floating-point embeddings (tensor or NumPy array).
            query_labels: ``(Nq,)`` integer labels (PML's ``(Nq, 1)`` column is accepted too).
            reference: ``(Nr, D)`` embeddings; ``None``: the query set, with ``ref_includes_query=True``.
            reference_labels: ``(Nr,)`` integer labels (required with ``reference``).
            ref_includes_query: The first ``Nq`` reference rows are the queries (each query's own row is left
                out of its neighbours).

        Returns:
            ``{metric: float}`` (``{metric: [float per label]}`` with ``return_per_class``).
        """
        check_bool(ref_includes_query, "ref_includes_query")
        query = self._check(query, "query")
        query_labels = self._check(query_labels, "query_labels")
        if query_labels.ndim == 2 and query_labels.shape[1] == 1:
            query_labels = query_labels[:, 0]
        if reference is None:
            if reference_labels is not None:
                raise ValueError("reference_labels was given without reference; pass both or neither")
            reference, reference_labels, ref_includes_query = query, query_labels, True
        else:
            reference = self._check(reference, "reference")
            if reference_labels is None:
                raise ValueError("reference_labels must be given with reference (a 1-D integer tensor)")
            reference_labels = self._check(reference_labels, "reference_labels")
            if reference_labels.ndim == 2 and reference_labels.shape[1] == 1:
                reference_labels = reference_labels[:, 0]
        check_embeddings(query, "query")
        check_embeddings(reference, "reference", dim=query.shape[1], dim_source="query.shape[1]")
        check_labels(query_labels, "query_labels", length=query.shape[0], length_source="query.shape[0]")
        check_labels(
            reference_labels, "reference_labels", length=reference.shape[0], length_source="reference.shape[0]"
        )
        device = self.device if self.device is not None else query.device
        query, reference = query.to(device), reference.to(device)
        query_labels, reference_labels = query_labels.to(device), reference_labels.to(device)
        check_same_device(query=query, reference=reference)
        if ref_includes_query:
            nq = query.shape[0]
            if reference.shape[0] < nq or not (
                torch.equal(reference[:nq], query) and torch.equal(reference_labels[:nq], query_labels)
            ):
                raise ValueError(
                    "with ref_includes_query=True the first len(query) rows of reference (and reference_labels) "
                    "must equal query (and query_labels)"
                )

        metrics = self.get_curr_metrics()
        out: dict[str, Any] = {}
        if any(m in _CLUSTERING for m in metrics):
            clusters = _kmeans(query, int(torch.unique(query_labels).numel()))
            truth = query_labels.cpu()
            if "AMI" in metrics:
                out["AMI"] = adjusted_mutual_info(truth, clusters)
            if "NMI" in metrics:
                out["NMI"] = normalized_mutual_info(truth, clusters)
        knn_metrics = [m for m in metrics if m not in _CLUSTERING]
        if knn_metrics:
            out.update(self._knn_metrics(query, query_labels, reference, reference_labels, ref_includes_query))
        return {m: out[m] for m in metrics}

    def _knn_metrics(
        self,
        query: torch.Tensor,
        query_labels: torch.Tensor,
        reference: torch.Tensor,
        reference_labels: torch.Tensor,
        ref_includes_query: bool,
    ) -> dict[str, Any]:
        ref_classes, ref_counts = torch.unique(reference_labels, return_counts=True)
        pos = torch.searchsorted(ref_classes, query_labels).clamp_max(len(ref_classes) - 1)
        r = torch.where(ref_classes[pos] == query_labels, ref_counts[pos], torch.zeros_like(pos))
        r = r - int(ref_includes_query)
        not_lone = r > 0
        names = [m for m in self.get_curr_metrics() if m not in _CLUSTERING]
        if not bool(not_lone.any()):
            warnings.warn("None of the query labels are in the reference set", UserWarning, stacklevel=3)
            nan: Any = [math.nan] * len(torch.unique(query_labels)) if self.return_per_class else math.nan
            return dict.fromkeys(names, nan)
        self_count = int(ref_includes_query)
        k = self._determine_k(int(r.max()) + self_count, reference.shape[0], ref_includes_query)
        values: dict[str, list[torch.Tensor]] = {m: [] for m in names}
        blocks: Iterable[tuple[int, int, torch.Tensor | None]]
        if self.knn_func is not None:  # PML's contract: one call with every query
            _, idx = self.knn_func(query, k, reference, ref_includes_query)
            blocks = [(0, query.shape[0], torch.as_tensor(idx, device=reference_labels.device).long())]
        elif query.shape[0] * k <= _BLOCK_ENTRIES:  # one exact search, self excluded by position
            from dml_bias.metrics import knn

            same = ref_includes_query and reference.shape[0] == query.shape[0]  # then knn may use the symmetry
            _, idx = knn(
                query,
                None if same else reference,
                k,
                metric="euclidean",
                exclude_self=ref_includes_query,
                normalize_embeddings=False,
            )
            blocks = [(0, query.shape[0], idx)]
        else:  # blocks of queries: O(block x k) memory, also for k = len(reference)
            step = max(1, _BLOCK_ENTRIES // k)
            blocks = ((s, min(s + step, query.shape[0]), None) for s in range(0, query.shape[0], step))
        for start, stop, given in blocks:
            if given is None:
                _, idx = _exact_knn(query[start:stop], reference, k, start if ref_includes_query else None)
            else:
                idx = given
            relevant = reference_labels[idx] == query_labels[start:stop].unsqueeze(1)
            per_query = _per_query_knn_metrics(relevant, r[start:stop])
            for m in names:
                values[m].append(per_query[m])
        keep = not_lone
        labels = query_labels[keep]
        return {m: self._reduce(torch.cat(values[m])[keep], labels) for m in names}
