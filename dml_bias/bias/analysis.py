r"""The numbers behind the background-bias reports: per-class rows, rank correlations with intervals, bootstraps.

The study's report (``dml_bias.bias.report``), its figures (``dml_bias.bias.plots``) and the audit
(:func:`~dml_bias.bias.audit`) take their analysis from here; those modules only turn it into text, tables and
pictures. Nothing here formats text for reading.

- :func:`per_class_rows`, :func:`per_class_summary`, :func:`attribution_summary`: the per-class analysis of a
  :class:`~dml_bias.bias.StudyResult` (which classes the no-mask model recognised by their background).
- :func:`spearman_ci`, :func:`correlation_reading`, :func:`correlation_readings`: a rank correlation over
  classes with its 95 % interval (Fisher *z*) and whether that many classes can support reading it at all.
- :func:`is_smoke_run`: whether a study configuration is the reduced ``--quick`` (smoke test) size.
- :func:`bootstrap_indices`, :func:`bootstrap_ci`, :func:`finite_ci`: the audit's percentile bootstrap over the
  queries; :func:`audit_class_rows`: the audit's per-class rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from dml_bias._checks import check_number, describe

if TYPE_CHECKING:  # pragma: no cover
    from dml_bias.bias.config import StudyConfig

__all__: list[str] = []


class StudyLike(Protocol):
    """What the analysis, the report and the figures read of a study: a :class:`~dml_bias.bias.StudyResult`.

    A structural type, so that these modules need not import the result (whose methods call them). Any object
    with these attributes, as :class:`~dml_bias.bias.StudyResult` documents them, will do.
    """

    config: StudyConfig
    runs: list[dict[str, Any]]
    dataset: dict[str, Any]
    versions: dict[str, str]
    timings: dict[str, float]
    interrupted: bool
    grid: dict[str, Any] | None
    attribution_maps: dict[str, Any] | None


#: Display titles of the study's losses.
LOSS_TITLES = {"proxy_anchor": "Proxy-Anchor", "multi_similarity": "Multi-Similarity"}

#: The keys of every row of :func:`per_class_rows`, in the order of ``per_class.csv``.
PER_CLASS_FIELDS = (
    "loss",
    "rank",
    "label",
    "class_name",
    "count",
    "home_background",
    "home_background_name",
    "background_distinctiveness",
    "variant",
    "failures_none",
    "failures_hard",
    "difference",
    "failures_none_original",
    "failures_hard_original",
    "difference_original",
    "reliance",
    "reliance_share",
    "background_alone_recall@1",
    "background_sensitivity_none",
    "background_sensitivity_hard",
    "foreground_energy_none",
    "foreground_energy_hard",
    "foreground_chance",
)

#: Fewer classes than this cannot support reading a rank correlation over classes, whatever its value.
MIN_CLASSES_FOR_CORRELATION = 50

#: Texture families of the built-in synthetic backgrounds (id ``b`` belongs to family ``b % 6``); a copy of
#: :data:`dml_bias.datasets.BACKGROUND_FAMILIES`, kept here so that the analysis loads no data set code.
_BACKGROUND_FAMILIES = ("stripes", "checks", "waves", "gradient", "dots", "rings")

# The data and schedule fields that StudyConfig.quick() reduces, with its values: a configuration no larger than
# these on every one of them is a smoke run.
_QUICK_SIZE = {
    "num_classes": 16,
    "images_per_class": 24,
    "image_size_resolved": 24,
    "epochs_resolved": 4,
    "embedding_size_resolved": 32,
}

_Z_975 = 1.959963984540054  # the 97.5 % quantile of the standard normal distribution


# ------------------------------------------------------------------------------------------- small helpers


def background_name(background: int | None) -> str | None:
    """The display name of a built-in synthetic background id: ``"<texture family> #<id>"``.

    Args:
        background: A background id of :class:`~dml_bias.datasets.SyntheticBackgrounds` (its ``home_backgrounds``),
            or ``None``.

    Returns:
        The name, e.g. ``"waves #8"`` (id 8 belongs to the texture family ``8 % 6 = 2``); ``None`` for ``None``.

    Example:
        >>> background_name(8), background_name(None)
        ('waves #8', None)
    """
    if background is None:
        return None
    check_number(background, "background", low=0, integer=True)
    return f"{_BACKGROUND_FAMILIES[int(background) % len(_BACKGROUND_FAMILIES)]} #{int(background)}"


def _attribution_of(run: dict[str, Any], label: str, key: str) -> float | None:
    """A per-class attribution measure of a run (``None`` without attribution or images of that class)."""
    values = run.get("attribution", {}).get("per_class", {}).get(label)
    return None if values is None else values[key]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 0.0 if either input is constant.

    Args:
        x: The first scores, one per item.
        y: The second scores, as many as ``x``.

    Example:
        >>> spearman([1, 2, 3, 4], [10, 30, 20, 40])
        0.8
    """
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    return float(spearmanr(x, y).statistic)


def spearman_ci(rho: float, n: int) -> tuple[float, float]:
    r"""The 95 % confidence interval of a Spearman correlation ``rho`` over ``n`` items, by Fisher's *z*.

    .. math::

        z = \operatorname{artanh} \rho, \qquad \text{se} = \sqrt{1.06 / (n - 3)}, \qquad
        [\tanh(z - 1.96\,\text{se}),\ \tanh(z + 1.96\,\text{se})],

    with the variance 1.06 / (n − 3) of Fieller, Hartley and Pearson (1957) for rank correlations (Pearson's
    would be 1 / (n − 3)). ``|rho|`` is clipped to ``1 − 1e-12`` so that a perfect correlation keeps a finite
    *z*. With ``n ≤ 3`` nothing is known: ``(-1.0, 1.0)``.

    Args:
        rho: The correlation, in ``[-1, 1]``.
        n: The number of items (classes) it was computed over.

    Returns:
        ``(low, high)``.

    Example:
        >>> low, high = spearman_ci(0.5, 12)
        >>> round(low, 3), round(high, 3)
        (-0.123, 0.84)
    """
    check_number(rho, "rho", low=-1.0, high=1.0)
    check_number(n, "n", low=0, integer=True)
    if n <= 3:
        return (-1.0, 1.0)
    z = math.atanh(max(-1.0 + 1e-12, min(1.0 - 1e-12, float(rho))))
    half = _Z_975 * math.sqrt(1.06 / (n - 3))
    return (math.tanh(z - half), math.tanh(z + half))


def correlation_reading(rho: float, n: int) -> dict[str, Any]:
    """A rank correlation over ``n`` classes with its interval, and whether it can be read at all.

    Args:
        rho: The Spearman correlation.
        n: The number of classes it was computed over.

    Returns:
        ``{"rho", "ci", "n", "readable", "warning"}``: ``ci`` = :func:`spearman_ci`; ``readable`` is ``False`` when
        ``n`` < :data:`MIN_CLASSES_FOR_CORRELATION` or the interval contains 0, and ``warning`` then says why
        (``None`` when readable).

    Example:
        >>> reading = correlation_reading(0.5, 12)
        >>> reading["readable"], reading["warning"]
        (False, 'only 12 classes (fewer than 50) and the 95 % interval contains 0: cannot be read')
    """
    ci = spearman_ci(rho, n)
    reasons = []
    if n < MIN_CLASSES_FOR_CORRELATION:
        reasons.append(f"only {n} classes (fewer than {MIN_CLASSES_FOR_CORRELATION})")
    if ci[0] <= 0.0 <= ci[1]:
        reasons.append("the 95 % interval contains 0")
    warning = None if not reasons else " and ".join(reasons) + ": cannot be read"
    return {"rho": float(rho), "ci": [ci[0], ci[1]], "n": int(n), "readable": not reasons, "warning": warning}


def correlation_readings(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A :func:`correlation_reading` of every ``spearman_*`` value of a summary over its ``num_classes`` classes.

    Args:
        summary: One loss's entry of :func:`per_class_summary` or :func:`attribution_summary`.

    Returns:
        ``{key: reading}`` for every ``spearman_*`` key whose value is not ``None``.

    Example:
        >>> readings = correlation_readings({"num_classes": 60, "spearman_x": 0.6, "spearman_y": None})
        >>> list(readings), readings["spearman_x"]["readable"]
        (['spearman_x'], True)
    """
    n = int(summary["num_classes"])
    return {
        key: correlation_reading(value, n)
        for key, value in summary.items()
        if key.startswith("spearman_") and value is not None
    }


def is_smoke_run(config: StudyConfig | dict[str, Any]) -> bool:
    """Whether a study configuration is a smoke run: the ``--quick`` size or smaller.

    The ``--quick`` size is that of :meth:`~dml_bias.bias.StudyConfig.quick`. A smoke run checks that the study
    runs end to end; its data (16 classes) and schedule (4 epochs) are too small for its numbers to mean anything.
    It is recognised by its values, so a ``results.json`` of any version is recognised too: synthetic data with no
    more classes, images per class, input pixels, epochs and embedding dimensions than the quick configuration
    has.

    Args:
        config: A :class:`~dml_bias.bias.StudyConfig` or its :meth:`~dml_bias.bias.StudyConfig.to_dict`.

    Example:
        >>> from dml_bias.bias import StudyConfig
        >>> is_smoke_run(StudyConfig.quick()), is_smoke_run(StudyConfig())
        (True, False)
    """
    if isinstance(config, dict):
        values = config
    elif callable(getattr(config, "to_dict", None)):
        values = config.to_dict()
    else:
        raise TypeError(f"config must be a StudyConfig or its to_dict(), got {describe(config)}")
    if values.get("dataset", "synthetic") != "synthetic":
        return False
    for key, limit in _QUICK_SIZE.items():
        value = values.get(key, values.get(key.removesuffix("_resolved")))
        if value is None or value > limit:
            return False
    return True


# ----------------------------------------------------------------------------------------- per-class study


def _failures(run: dict[str, Any], variant: str, label: str, count: int) -> int:
    """``round(count × (1 − Recall@1))``: the failed queries of a class on one variant."""
    return round(count * (1.0 - run["per_class_recall@1"]["metrics"][variant][label]))


def _class_row(
    result: StudyLike, loss: str, none: dict[str, Any], hard: dict[str, Any], label: str, count: int
) -> dict[str, Any]:
    """One row of :func:`per_class_rows` (without its rank)."""
    variant = result.config.report_variant
    names = result.dataset.get("class_names", [])
    homes = result.dataset.get("home_backgrounds")
    distinct = result.dataset.get("background_distinctiveness")
    index = int(label)
    fn, fh = _failures(none, variant, label, count), _failures(hard, variant, label, count)
    fno, fho = _failures(none, "original", label, count), _failures(hard, "original", label, count)
    home = homes[index] if homes is not None else None
    return {
        "loss": loss,
        "label": index,
        "class_name": names[index] if index < len(names) else str(index),
        "count": count,
        "home_background": home,
        "home_background_name": background_name(home),
        "background_distinctiveness": distinct[index] if distinct is not None else None,
        "variant": variant,
        "failures_none": fn,
        "failures_hard": fh,
        "difference": fn - fh,
        "failures_none_original": fno,
        "failures_hard_original": fho,
        "difference_original": fno - fho,
        "reliance": (fn - fno) - (fh - fho),
        "reliance_share": ((fn - fno) - (fh - fho)) / max(fn, 1),
        "background_alone_recall@1": none["per_class_recall@1"]["metrics"].get("only_bg_t", {}).get(label),
        "background_sensitivity_none": _attribution_of(none, label, "background_sensitivity"),
        "background_sensitivity_hard": _attribution_of(hard, label, "background_sensitivity"),
        "foreground_energy_none": _attribution_of(none, label, "foreground_energy"),
        "foreground_energy_hard": _attribution_of(hard, label, "foreground_energy"),
        "foreground_chance": _attribution_of(none, label, "foreground_chance"),
    }


def per_class_rows(result: StudyLike) -> list[dict[str, Any]]:
    r"""Per loss and test class: Recall@1 failures of the no-mask and hard-mask models, ranked by background reliance.

    The failures of a class are ``round(count × (1 − Recall@1))`` of its queries, each model evaluated in its
    own mode (the hard-mask model on masked test images), on ``config.report_variant`` (``failures_none``,
    ``failures_hard``, ``difference`` = none − hard) and on the original images (``…_original``).
    ``reliance`` = (no-mask failures added by swapping the backgrounds) − (hard-mask failures added by swapping
    them) = ``difference − difference_original``, and

    .. math::

        \text{reliance\_share} = \frac{\text{reliance}}{\max(\text{failures\_none}, 1)},

    the share of the no-mask model's failures on the swapped backgrounds that the class's own background had
    prevented. Rows are ranked per loss by ``reliance_share``, largest first (ties: ``reliance``, ``difference``,
    label): the classes the no-mask model recognised by their background. The share rather than the count ranks,
    because the count also grows with how hard the object itself is (classes whose objects resemble others' fail
    often on any background); the share divides that out. ``background_alone_recall@1`` is the no-mask model's
    Recall@1 of the class on ``only_bg_t`` (backgrounds without objects; ``None`` if not evaluated).
    ``home_background`` is the id of the class's home background in the synthetic data (``None`` on CUB) and
    ``home_background_name`` its :func:`background_name`. Losses without both a ``"none"`` and a ``"hard"`` run
    are skipped. Every row has the keys :data:`PER_CLASS_FIELDS`.

    Args:
        result: The study's outcome (its ``runs``, ``dataset`` facts and ``config.report_variant``).

    Returns:
        One dict per loss and class, ranked within each loss (``rank`` 1 first).

    Example:
        >>> from dml_bias.bias import StudyConfig, StudyResult
        >>> def run(mode, swapped):  # per-class Recall@1 of three classes, 10 queries each
        ...     rates = {"original": {"0": 1.0, "1": 1.0, "2": 0.5}, "mixed_rand": {"0": swapped, "1": 1.0, "2": 0.5}}
        ...     return {"loss": "proxy_anchor", "mode": mode, "class_counts": {"0": 10, "1": 10, "2": 10},
        ...             "per_class_recall@1": {"metrics": rates}}
        >>> result = StudyResult(StudyConfig(), runs=[run("none", 0.4), run("hard", 1.0)],
        ...                      dataset={"class_names": ["gull", "tern", "skua"], "home_backgrounds": [8, 3, 3]})
        >>> [(r["class_name"], r["failures_none"], r["reliance_share"]) for r in per_class_rows(result)]
        [('gull', 6, 1.0), ('tern', 0, 0.0), ('skua', 5, 0.0)]
        >>> per_class_rows(result)[0]["home_background_name"]
        'waves #8'
    """
    rows: list[dict[str, Any]] = []
    for loss in dict.fromkeys(r["loss"] for r in result.runs):
        by_mode = {r["mode"]: r for r in result.runs if r["loss"] == loss}
        if "none" not in by_mode or "hard" not in by_mode:
            continue
        none, hard = by_mode["none"], by_mode["hard"]
        loss_rows = [_class_row(result, loss, none, hard, c, n) for c, n in none["class_counts"].items()]
        loss_rows.sort(key=lambda r: (-r["reliance_share"], -r["reliance"], -r["difference"], r["label"]))
        for rank, row in enumerate(loss_rows, start=1):
            row["rank"] = rank
        rows.extend(loss_rows)
    return rows


def per_class_summary(result: StudyLike, top: int = 10) -> dict[str, dict[str, Any]]:
    """Per loss: how well the per-class ranking follows the home backgrounds' distinctiveness (synthetic data).

    For every loss of :func:`per_class_rows`: ``num_classes``, ``top``, the mean distinctiveness of the ``top``
    first-ranked classes and of all classes (``mean_distinctiveness_top``, ``mean_distinctiveness_all``), and
    Spearman's rank correlation with distinctiveness of the ranking score (``spearman_reliance_share``), of
    ``reliance``, of ``difference`` (the no-mask minus hard-mask failures on the report variant) and of the
    background-alone Recall@1 (``None`` where not evaluated); :func:`correlation_readings` adds their intervals.
    Empty when the data set has no distinctiveness (CUB) or no loss has both a ``"none"`` and a ``"hard"`` run.

    Args:
        result: The study's outcome.
        top: How many first-ranked classes ``mean_distinctiveness_top`` averages over.

    Example:
        >>> from dml_bias.bias import StudyConfig, StudyResult
        >>> def run(mode, swapped):  # the class with a home of its own (0) fails on swapped backgrounds
        ...     rates = {"original": {"0": 1.0, "1": 1.0, "2": 1.0}, "mixed_rand": {"0": swapped, "1": 1.0, "2": 1.0}}
        ...     return {"loss": "proxy_anchor", "mode": mode, "class_counts": {"0": 10, "1": 10, "2": 10},
        ...             "per_class_recall@1": {"metrics": rates}}
        >>> result = StudyResult(StudyConfig(), runs=[run("none", 0.4), run("hard", 1.0)],
        ...                      dataset={"background_distinctiveness": [1.0, 0.5, 0.5]})
        >>> summary = per_class_summary(result, top=1)["proxy_anchor"]
        >>> summary["num_classes"], summary["mean_distinctiveness_top"], summary["spearman_reliance_share"]
        (3, 1.0, 1.0)
    """
    rows = per_class_rows(result)
    out: dict[str, dict[str, Any]] = {}
    for loss in dict.fromkeys(r["loss"] for r in rows):
        class_rows = [r for r in rows if r["loss"] == loss]
        dists = [r["background_distinctiveness"] for r in class_rows]
        if any(d is None for d in dists):
            continue
        k = min(top, len(class_rows))
        alone = [r["background_alone_recall@1"] for r in class_rows]
        out[loss] = {
            "num_classes": len(class_rows),
            "top": k,
            "mean_distinctiveness_top": sum(dists[:k]) / k,
            "mean_distinctiveness_all": sum(dists) / len(dists),
            "spearman_reliance_share": spearman([r["reliance_share"] for r in class_rows], dists),
            "spearman_reliance": spearman([r["reliance"] for r in class_rows], dists),
            "spearman_difference": spearman([r["difference"] for r in class_rows], dists),
            "spearman_background_alone": None if any(b is None for b in alone) else spearman(alone, dists),
        }
    return out


def _attribution_correlations(
    per_class: dict[str, dict[str, float]], share: dict[str, float], distinct: Sequence[float] | None
) -> dict[str, Any]:
    """The four correlations of :func:`attribution_summary` for one loss."""
    summary: dict[str, Any] = {}
    for key, name in (("background_sensitivity", "sensitivity"), ("foreground_energy", "background_energy")):
        score = {
            c: (1.0 - v[key] if key == "foreground_energy" else v[key])
            for c, v in per_class.items()
            if v[key] == v[key]  # not NaN
        }
        targets = {
            "reliance_share": share or None,
            "distinctiveness": None if distinct is None else {c: distinct[int(c)] for c in score},
        }
        for target_name, target in targets.items():
            common = [c for c in score if c in (target or {})]
            summary[f"spearman_{name}_{target_name}"] = (
                spearman([score[c] for c in common], [target[c] for c in common])
                if target is not None and len(common) > 2
                else None
            )
    return summary


def attribution_summary(result: StudyLike) -> dict[str, dict[str, Any]]:
    """Per loss: do the retraining-free measures of the no-mask model find the classes the retraining test finds?

    For every loss with a ``"none"`` run that has attribution measures: the number of classes and Spearman's rank
    correlation, over the test classes, of the no-mask model's per-class background sensitivity
    (``spearman_sensitivity_reliance_share``) and of its background energy, one minus the foreground energy
    (``spearman_background_energy_reliance_share``), with the retraining-based reliance share of
    :func:`per_class_rows` (``None`` without a ``"hard"`` run), and of both with the home backgrounds'
    distinctiveness (``spearman_sensitivity_distinctiveness``, ``spearman_background_energy_distinctiveness``;
    ``None`` on data without it). Classes with a NaN measure are left out. :func:`correlation_readings` adds the
    correlations' intervals.

    Args:
        result: The study's outcome.

    Example:
        >>> from dml_bias.bias import StudyConfig, StudyResult
        >>> sensitivity = {"0": 0.9, "1": 0.2, "2": 0.5}  # the no-mask model's per-class background sensitivity
        >>> per_class = {c: {"background_sensitivity": s, "foreground_energy": 1 - s} for c, s in sensitivity.items()}
        >>> none = {"loss": "proxy_anchor", "mode": "none", "attribution": {"per_class": per_class}}
        >>> result = StudyResult(StudyConfig(), runs=[none], dataset={"background_distinctiveness": [1.0, 0.2, 0.5]})
        >>> summary = attribution_summary(result)["proxy_anchor"]
        >>> summary["spearman_sensitivity_distinctiveness"], summary["spearman_sensitivity_reliance_share"]
        (1.0, None)
    """
    distinct = result.dataset.get("background_distinctiveness")
    rows = per_class_rows(result)
    out: dict[str, dict[str, Any]] = {}
    for loss in dict.fromkeys(r["loss"] for r in result.runs):
        none = next((r for r in result.runs if r["loss"] == loss and r["mode"] == "none"), None)
        if none is None or "attribution" not in none:
            continue
        per_class = none["attribution"]["per_class"]
        share = {str(r["label"]): r["reliance_share"] for r in rows if r["loss"] == loss}
        out[loss] = {"num_classes": len(per_class), **_attribution_correlations(per_class, share, distinct)}
    return out


# ------------------------------------------------------------------------------------------ audit bootstrap


def bootstrap_indices(n: int, resamples: int, seed: int) -> torch.Tensor:
    """``(resamples, n)`` indices drawn with replacement from a CPU generator seeded with ``seed``.

    Example:
        >>> bootstrap_indices(3, 2, seed=0).shape
        torch.Size([2, 3])
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(n, (resamples, n), generator=gen)


def bootstrap_ci(values: torch.Tensor, indices: torch.Tensor) -> list[float]:
    """The 95 % percentile interval (2.5 and 97.5 %, linear interpolation) of the resampled means.

    Args:
        values: ``(N,)`` per-query values.
        indices: ``(B, N)`` resampling indices (:func:`bootstrap_indices`).

    Returns:
        ``[low, high]``; ``[nan, nan]`` without values or resamples.

    Example:
        >>> bootstrap_ci(torch.tensor([1.0, 1.0, 1.0]), bootstrap_indices(3, 10, seed=0))
        [1.0, 1.0]
    """
    if values.numel() == 0 or indices.numel() == 0:
        return [math.nan, math.nan]
    means = values.to(torch.float64)[indices].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [float(lo), float(hi)]


def finite_ci(values: torch.Tensor, resamples: int, seed: int) -> tuple[float, list[float], int]:
    """Mean and 95 % bootstrap interval of the finite entries (resampled among them) and their count.

    Example:
        >>> finite_ci(torch.tensor([2.0, float("nan"), 2.0]), 10, seed=0)
        (2.0, [2.0, 2.0], 2)
    """
    finite = values[~torch.isnan(values)].to(torch.float64)
    if finite.numel() == 0:
        return math.nan, [math.nan, math.nan], 0
    idx = bootstrap_indices(finite.numel(), resamples, seed)
    return float(finite.mean()), bootstrap_ci(finite, idx), int(finite.numel())


def audit_class_rows(
    labels: torch.Tensor,
    class_names: Sequence[str],
    per_class_recall: dict[str, dict[int, float]],
    sensitivity: torch.Tensor,
    energy: torch.Tensor,
    energy_labels: torch.Tensor,
) -> list[dict[str, Any]]:
    """The audit's per-class rows, most background-reliant first.

    Args:
        labels: ``(N,)`` class of every image.
        class_names: The name of every label.
        per_class_recall: ``{variant: {label: Recall@1}}``, at least ``original`` and ``mixed_rand``.
        sensitivity: ``(N,)`` background sensitivity of every image (NaN where undefined).
        energy: ``(M,)`` foreground energy of the explained images (NaN where undefined).
        energy_labels: ``(M,)`` their classes.

    Returns:
        One dict per class: ``label``, ``name``, ``count``, ``recall@1``, ``mixed_rand_recall@1``,
        ``recall@1_drop`` (their difference), ``background_sensitivity`` and ``foreground_energy`` (the class's mean
        over its defined values, NaN without any), sorted by the drop, largest first (ties: sensitivity, label).

    Example:
        >>> recall = {"original": {0: 1.0, 1: 1.0}, "mixed_rand": {0: 1.0, 1: 0.5}}
        >>> sensitivity = torch.tensor([0.1, 0.3, 0.6, float("nan")])
        >>> rows = audit_class_rows(
        ...     torch.tensor([0, 0, 1, 1]), ["cat", "dog"], recall, sensitivity, torch.tensor([0.9]), torch.tensor([1])
        ... )
        >>> [(r["name"], r["recall@1_drop"], r["background_sensitivity"]) for r in rows]
        [('dog', 0.5, 0.6000000238418579), ('cat', 0.0, 0.20000000298023224)]
    """
    counts = torch.bincount(labels)
    rows = []
    for c in torch.nonzero(counts).flatten().tolist():
        sc = sensitivity[labels == c]
        sc = sc[~torch.isnan(sc)]
        ev = energy[energy_labels == c]
        ev = ev[~torch.isnan(ev)]
        original = per_class_recall["original"].get(c, math.nan)
        swapped = per_class_recall["mixed_rand"].get(c, math.nan)
        rows.append(
            {
                "label": int(c),
                "name": class_names[c],
                "count": int(counts[c]),
                "recall@1": original,
                "mixed_rand_recall@1": swapped,
                "recall@1_drop": original - swapped,
                "background_sensitivity": float(sc.mean()) if sc.numel() else math.nan,
                "foreground_energy": float(ev.mean()) if ev.numel() else math.nan,
            }
        )
    rows.sort(key=lambda r: (-r["recall@1_drop"], -_or(r["background_sensitivity"], -1.0), r["label"]))
    return rows


def _or(x: float, default: float) -> float:
    return default if math.isnan(x) else x
