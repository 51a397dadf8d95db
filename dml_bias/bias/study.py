"""The background-bias study: train one model per (loss, mask mode), evaluate on background variants, report.

The protocol: train the same embedding model with no mask, soft masks (one run per σ), hard masks, the mask as
an extra input channel and random backgrounds during training (``"bg_augment"``, via
:class:`dml_bias.transforms.BackgroundSwap`), with Proxy-Anchor and with Multi-Similarity; then evaluate
Recall@1/2/4/8 and MAP@R on the test classes, on the original test images and on the ImageNet-9 background
variants (``only_fg``, ``only_bg_t``, ``no_fg``, ``mixed_same``, ``mixed_rand``, ``mixed_next``). Every model is
evaluated twice: with its own mask mode applied to the test images (``metrics``) and on the raw test images
(``metrics_raw``), and its attribution maps, foreground energy and background sensitivity are measured on a subset
of the test images (:mod:`dml_bias.bias.attribution`). The study only orchestrates: data sets, transforms, losses,
miner, sampler, metrics and attribution measures are the library's own.

The data path reads top to bottom through one module per step: :mod:`~dml_bias.bias.config` (what to run) →
:mod:`~dml_bias.bias.data` (train and test data, variants) → :mod:`~dml_bias.bias.training` (one model) →
:mod:`~dml_bias.bias.evaluation` (its numbers) → :mod:`~dml_bias.bias.result` (:class:`StudyResult`) →
:mod:`~dml_bias.bias.report` (tables, ``report.md``, ``per_class.csv``) and :mod:`~dml_bias.bias.plots`
(figures). This module runs them in that order.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dml_bias.bias.config import (
    DATASETS,
    LOSSES,
    METRIC_KEYS,
    MODES,
    VARIANTS,
    RunSpec,
    StudyConfig,
    StudyError,
)
from dml_bias.bias.data import StudyData
from dml_bias.bias.evaluation import (
    AttributionSubset,
    attribution_figure_data,
    attribution_subset,
    chance_recall_at_1,
    evaluate_attribution,
    evaluate_retrieval,
    grid_data,
)
from dml_bias.bias.result import StudyResult, prepare_out_dir
from dml_bias.bias.training import train_model

__all__ = [
    "DATASETS",
    "LOSSES",
    "METRIC_KEYS",
    "MODES",
    "VARIANTS",
    "StudyConfig",
    "StudyError",
    "StudyResult",
    "run_study",
]


def versions(device: torch.device) -> dict[str, str]:
    """Python, platform, library versions, the device's name and the torch threads, for ``results.json``."""
    import numpy
    import torchvision

    import dml_bias

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "dml_bias": dml_bias.__version__,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": str(torch.get_num_threads()),
    }


def resolve_device(name: str) -> torch.device:
    """``name`` as a device; :class:`StudyError` if it asks for CUDA on a machine without it."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StudyError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    return device


@dataclass(frozen=True)
class RunWork:
    """The expected work of one run in units of one image's evaluation forward pass (for the progress bar's ETA).

    Attributes:
        train_epoch: One training epoch: :data:`TRAIN_WEIGHT` per training image (forward, backward and
            optimiser step, loading and augmenting included), doubled for ``bg_augment`` (its background swaps).
        epochs: Training epochs.
        evaluation: Every evaluation pass over the test images: one per variant (plus the original gallery with
            ``swap="queries"``), for the model's own mode and, for masked modes, again on raw images.
        attribution: :data:`ATTRIBUTION_WEIGHT` per attribution image (maps: forward and backward, background
            sensitivity: three forwards) × 1.5, as the figure shows the neighbours' maps as well.
    """

    train_epoch: float
    epochs: int
    evaluation: float
    attribution: float

    @property
    def total(self) -> float:
        """All of the run's work."""
        return self.train_epoch * self.epochs + self.evaluation + self.attribution


#: Work of one training image in one epoch, relative to one image's evaluation pass (measured on the quick
#: study: 4 epochs over 384 images took about as long as 7–8 evaluation passes over 384 images).
TRAIN_WEIGHT = 2.0
#: Work of one attribution image (maps, then three forward passes for the background sensitivity); measured on
#: the quick study: 64 images took about as long as 330 images' evaluation passes.
ATTRIBUTION_WEIGHT = 5.0


def run_work(
    config: StudyConfig, spec: RunSpec, num_train: int, num_test: int, num_variants: int, num_attribution: int
) -> RunWork:
    """The expected work of the run ``spec`` (see :class:`RunWork`), from the sizes of the data.

    The study's outer progress bar advances by these amounts, so its ETA counts the models still to train *and*
    evaluate: a masked mode evaluates twice (own mode and raw), ``bg_augment`` trains slower, a CUB model trains
    for many epochs.
    """
    augment = 2.0 if spec.mode == "bg_augment" else 1.0
    passes = num_variants + (1 if config.swap == "queries" else 0)
    evaluations = 1 if spec.mode in ("none", "bg_augment") else 2
    maps = 1.5  # every model's neighbour maps are drawn too
    return RunWork(
        train_epoch=TRAIN_WEIGHT * augment * num_train,
        epochs=config.resolved_epochs(),
        evaluation=float(evaluations * passes * num_test),
        attribution=ATTRIBUTION_WEIGHT * maps * num_attribution,
    )


def run_study(config: StudyConfig | None = None) -> StudyResult:
    """Run the background-bias study described by ``config`` and return every number.

    For every :class:`RunSpec` of :meth:`StudyConfig.run_specs` a fresh model is trained (same seed), then its
    test embeddings are computed on every variant, twice: with the model's own mask mode applied to the test
    images (``metrics``) and on the raw images (``metrics_raw``). For ``"none"`` and ``"bg_augment"`` both are
    the same evaluation. For ``"channel"`` the raw evaluation feeds an all-object mask channel (255 everywhere),
    i.e. no mask information. With ``swap="both"`` queries and gallery come from the variant (self excluded);
    with ``swap="queries"`` only queries do and the gallery is the original test set (each query's own
    original left out). If ``config.out_dir`` is set, ``results.json`` is rewritten after every run.

    torch's CPU threads are set to :meth:`StudyConfig.resolved_threads` for the study and restored afterwards;
    torch's global random state is left as it was (each model is initialised and trained from ``config.seed``
    inside a forked random state; data, sampler and donors use their own generators).

    Args:
        config: The study; ``None`` runs the default :class:`StudyConfig`.

    Returns:
        A :class:`StudyResult`.

    Raises:
        ValueError: A bad configuration field (named in the message).
        StudyError: Unusable data folder or output directory.
        KeyboardInterrupt: Re-raised after saving the completed runs (when ``out_dir`` is set).

    Example:
        >>> cfg = StudyConfig.quick(losses=("multi_similarity",), modes=("hard",), num_classes=4,
        ...                         images_per_class=6, image_size=16, batch_size=12, m_per_class=3, epochs=1,
        ...                         progress=False)
        >>> res = run_study(cfg)
        >>> [r["mode"] for r in res.runs], sorted(res.runs[0]["metrics"]["original"])
        (['hard'], ['map@r', 'recall@1', 'recall@2', 'recall@4', 'recall@8'])
    """
    config = StudyConfig() if config is None else config
    if not isinstance(config, StudyConfig):
        raise TypeError(f"config must be a StudyConfig, got {type(config).__name__}")
    config.validate()
    device = resolve_device(config.device)
    if config.out_dir is not None:
        prepare_out_dir(config.out_dir)
    previous_threads = torch.get_num_threads()
    threads = config.resolved_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(config, device)
    finally:
        torch.set_num_threads(previous_threads)


def _dataset_facts(config: StudyConfig, data: StudyData, variants: list[str]) -> dict[str, Any]:
    """``result.dataset``: sizes, class names, chance Recall@1, variants and (synthetic) the home backgrounds."""
    test = data.test
    facts: dict[str, Any] = {
        "name": config.dataset,
        "num_train_classes": data.num_train_classes,
        "num_test_classes": len(test.class_names),
        "num_test_images": int(test.labels.numel()),
        "input_size": data.input_size,
        "class_names": list(test.class_names),
        "chance_recall@1": chance_recall_at_1(test.labels),
        "variants": variants,
    }
    if data.home_backgrounds is not None and data.background_distinctiveness is not None:
        facts["home_backgrounds"] = data.home_backgrounds.tolist()
        facts["background_distinctiveness"] = data.background_distinctiveness.tolist()
    return facts


@dataclass
class _Study:
    """What the runs share: the configuration, data, variants, attribution subset and what the figures collect."""

    config: StudyConfig
    data: StudyData
    device: torch.device
    variants: list[str]
    subset: AttributionSubset | None
    grid_embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    figure_models: list[dict[str, Any]] = field(default_factory=list)


def _run(config: StudyConfig, device: torch.device) -> StudyResult:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    result = StudyResult(config=config, versions=versions(device))
    data = StudyData(config)
    variants = list(dict.fromkeys(["original", *config.variants]))
    if config.report_variant not in variants:
        variants.append(config.report_variant)
    result.dataset = _dataset_facts(config, data, variants)
    for v in variants:  # render/build every variant once, before training
        data.variant(v)
    subset = attribution_subset(config, data)
    if subset is not None:
        result.dataset["attribution_images"] = {
            "per_class": config.attribution_images,
            "indices": subset.indices.tolist(),
            "donors": subset.donors.tolist(),
        }
    result.timings["data"] = time.perf_counter() - t0
    study = _Study(config, data, device, variants, subset)
    specs = config.run_specs()
    sizes = (data.num_train_images, int(data.test.labels.numel()), len(variants))
    works = [run_work(config, s, *sizes, 0 if subset is None else int(subset.indices.numel())) for s in specs]
    # The bar counts work, not models: its ETA covers the training and evaluation still to come.
    outer = tqdm(
        total=sum(w.total for w in works),
        desc="study",
        disable=not config.progress,
        file=sys.stderr,
        smoothing=0.0,
        bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}",
    )
    try:
        for i, (spec, work) in enumerate(zip(specs, works, strict=True)):
            outer.set_postfix_str(f"model {i + 1}/{len(specs)}: {spec.loss} / {spec.name}")
            result.runs.append(_run_one(study, spec, work, outer))
            result.timings["total"] = time.perf_counter() - t0
            if config.out_dir is not None:
                result.save_json(config.out_dir)
        outer.close()
    except KeyboardInterrupt:
        result.interrupted = True
        result.timings["total"] = time.perf_counter() - t0
        if config.out_dir is not None:
            result.save_json(config.out_dir)
        raise
    result.timings["total"] = time.perf_counter() - t0
    result.grid = grid_data(config, data, study.grid_embeddings)
    result.attribution_maps = attribution_figure_data(data, subset, study.figure_models, config.losses[0])
    return result


def _run_one(study: _Study, spec: RunSpec, work: RunWork, outer: Any) -> dict[str, Any]:
    """Train, evaluate and measure one model; advance ``outer`` by each step's share of ``work``."""
    config, data, device = study.config, study.data, study.device
    first_loss = config.losses[0]
    t_train = time.perf_counter()
    model, history, settings = train_model(
        config, data, spec, device, f"train {spec.loss} / {spec.name}", on_epoch=lambda: outer.update(work.train_epoch)
    )
    t_eval = time.perf_counter()
    run: dict[str, Any] = {**spec.to_dict(), "name": spec.name, "loss_history": history, "training": settings}
    retrieval, kept = evaluate_retrieval(config, data, model, spec, study.variants, device)
    outer.update(work.evaluation)
    run.update(retrieval)
    if spec.loss == first_loss and spec.mode in ("none", "hard"):
        study.grid_embeddings[spec.mode] = kept[config.report_variant]
    run["train_seconds"] = t_eval - t_train
    run["eval_seconds"] = time.perf_counter() - t_eval
    if study.subset is not None:
        t_attr = time.perf_counter()
        run["attribution"], maps = evaluate_attribution(
            model, spec, data, study.subset, kept["original"], device, keep_maps=True
        )
        outer.update(work.attribution)
        if maps is not None:
            study.figure_models.append(maps)
        run["attribution_seconds"] = time.perf_counter() - t_attr
    if config.save_models and config.out_dir is not None:
        from dml_bias.bias._model_spec import save_study_model

        run["model_file"] = str(save_study_model(model, config, data, spec.to_dict()))
    return run
