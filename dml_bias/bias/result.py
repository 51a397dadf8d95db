"""The outcome of a study: :class:`StudyResult`, its JSON form, and where its tables, report and figures are made.

The last steps of the study's data path (config → data → train → evaluate → **result → report → figures**): a
:class:`StudyResult` holds every number; :mod:`~dml_bias.bias.report` turns it into text and
:mod:`~dml_bias.bias.plots` into figures (both read it through :class:`~dml_bias.bias.analysis.StudyLike`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dml_bias.bias import plots, report
from dml_bias.bias.analysis import attribution_summary, per_class_rows, per_class_summary
from dml_bias.bias.config import StudyConfig, StudyError

__all__ = ["StudyResult"]


@dataclass
class StudyResult:
    """The outcome of :func:`run_study`: every number, JSON-ready, plus tables, the bias report and figures.

    Attributes:
        config: The :class:`StudyConfig` that produced it.
        runs: One dict per trained model: ``loss``, ``mode``, ``sigma``, ``name``, ``metrics`` and ``metrics_raw``
            (``{variant: {"recall@1", "recall@2", "recall@4", "recall@8", "map@r"}}``), ``background_gap`` and
            ``background_gap_raw`` (``mixed_same`` − ``mixed_rand`` Recall@1), ``worst_class``,
            ``per_class_recall@1`` (``{"metrics"|"metrics_raw": {variant: {class: R@1}}}``), ``loss_history``,
            ``training`` (the learning rate, weight decay, batch size, images per class and epochs actually
            used), ``attribution`` (mean foreground energy with its chance level, background and object shifts
            and background sensitivity on the attribution subset, also ``per_class``; see the study guide),
            ``train_seconds``, ``eval_seconds``.
        dataset: Facts about the data: sizes, class names, ``chance_recall@1``, home backgrounds (synthetic).
        versions: Python, torch, torchvision, numpy and dml_bias versions, platform and device.
        timings: Seconds spent: ``data``, ``total``.
        interrupted: ``True`` if the study stopped early (Ctrl-C); ``runs`` holds the completed ones.
        grid: Images and neighbours for the retrieval-grid figure (not saved to JSON); ``None`` without a
            ``"none"`` or ``"hard"`` run of the first loss.
        attribution_maps: Images and attribution maps of every model for the attribution figure (not
            saved to JSON); ``None`` when attribution is switched off (``config.attribution_images=0``).

    Results are reproducible for a given seed, device and number of CPU threads (a different thread count can
    change float reductions and hence, slightly, the trained models).

    Example:
        >>> from dml_bias.bias import StudyConfig, run_study
        >>> cfg = StudyConfig.quick(losses=("proxy_anchor",), modes=("none",), num_classes=4, images_per_class=6,
        ...                         image_size=16, batch_size=12, m_per_class=3, epochs=1,
        ...                         variants=("original", "mixed_rand"), progress=False)
        >>> result = run_study(cfg)
        >>> sorted(result.runs[0]["metrics"])
        ['mixed_rand', 'original']
        >>> "Recall@1" in result.table()
        True
    """

    config: StudyConfig
    runs: list[dict[str, Any]] = field(default_factory=list)
    dataset: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    grid: dict[str, Any] | None = field(default=None, repr=False)
    attribution_maps: dict[str, Any] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready values (what ``results.json`` holds)."""
        return {
            "config": self.config.to_dict(),
            "seed": self.config.seed,
            "swap": self.config.swap,
            "versions": self.versions,
            "timings": self.timings,
            "dataset": self.dataset,
            "interrupted": self.interrupted,
            "runs": self.runs,
            "per_class": per_class_rows(self),
            "per_class_summary": per_class_summary(self),
            "attribution_summary": attribution_summary(self),
        }

    def table(self, *, raw: bool | None = None) -> str:
        """The printed tables, per loss: Recall@k and MAP@R on the original images, then Recall@1 per variant.

        The second table also holds the background gap, background-alone retrieval against chance and the worst
        class.

        Args:
            raw: ``False``: only own-mode evaluation; ``True``: only raw images; ``None``: both.
        """
        return report.format_tables(self, raw=raw)

    def per_class_report(self, top: int = 10) -> str:
        """The per-class bias report: the ``top`` classes the no-mask model recognised most by their background.

        Per test class: Recall@1 failures of the no-mask and the hard-mask model (same loss) on
        ``config.report_variant`` and on the original images, their difference, and the ranking score, the
        reliance share (the no-mask failures added by swapping the backgrounds, net of the hard-mask model's, as a
        share of the no-mask failures on the swapped backgrounds); on synthetic data also the rank correlation of
        the ranking with the home backgrounds' distinctiveness (stored in ``results.json`` as
        ``per_class_summary``).
        """
        return report.format_per_class(self, top=top)

    def plot(self, out_dir: str | Path) -> list[Path]:
        """Write the figures (PNG) into ``out_dir``; return their paths."""
        return plots.plot_all(self, Path(out_dir))

    def save(self, out_dir: str | Path, *, figures: bool = True) -> dict[str, Path]:
        """Write ``results.json``, ``per_class.csv``, the figures and ``report.md`` into ``out_dir``.

        Returns:
            The written files by kind (``"results"``, ``"per_class"``, ``"report"``, ``"figure:<name>"``).
        """
        out = prepare_out_dir(out_dir)
        paths = {"results": self.save_json(out), "per_class": report.write_per_class_csv(self, out / "per_class.csv")}
        figs = self.plot(out) if figures else []
        for p in figs:
            paths[f"figure:{p.stem}"] = p
        paths["report"] = report.write_report_md(self, out / "report.md", figs)
        return paths

    def save_json(self, out_dir: str | Path) -> Path:
        """Write only ``results.json`` (atomically: a temporary file, then a rename)."""
        out = prepare_out_dir(out_dir)
        path = out / "results.json"
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=True) + "\n")
        os.replace(tmp, path)
        return path


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` if needed; raise :class:`StudyError` if it is a file or cannot be made."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise StudyError(f"the output directory {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudyError(f"cannot create the output directory {str(out)!r}: {exc.strerror or exc}") from exc
    return out
