"""What defines a study run: the names of losses, modes, variants and data sets, and :class:`StudyConfig`.

The first step of the study's data path (config → train → evaluate → report → figures); see
:mod:`dml_bias.bias.study` for the whole protocol.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dml_bias._checks import check_choice, check_number

__all__ = [
    "DATASETS",
    "LOSSES",
    "METRIC_KEYS",
    "MODES",
    "VARIANTS",
    "RunSpec",
    "StudyConfig",
    "StudyError",
]

#: The training modes: no mask, soft mask, hard mask, mask as an extra channel, random backgrounds.
MODES: tuple[str, ...] = ("none", "soft", "hard", "channel", "bg_augment")
#: The losses: Proxy-Anchor and Multi-Similarity (with its miner).
LOSSES: tuple[str, ...] = ("proxy_anchor", "multi_similarity")
#: The test-image variants (ImageNet-9 names); ``"original"`` is the unchanged test set.
VARIANTS: tuple[str, ...] = ("original", "only_fg", "only_bg_t", "no_fg", "mixed_same", "mixed_rand", "mixed_next")
#: The data sets: the built-in synthetic one and CUB-200-2011 (local copy with segmentations).
DATASETS: tuple[str, ...] = ("synthetic", "cub")
#: The metrics stored per variant in ``metrics`` and ``metrics_raw``.
METRIC_KEYS: tuple[str, ...] = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")

_SWAPS = ("both", "queries")
# The recipes' optimiser and batch settings, used for every field the user leaves None. CUB: the official
# training code of Proxy-Anchor (ResNet-50) and of Multi-Similarity.
_SYNTHETIC_RECIPE: dict[str, Any] = {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 60, "m_per_class": 5}
_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "synthetic": {"proxy_anchor": _SYNTHETIC_RECIPE, "multi_similarity": _SYNTHETIC_RECIPE},
    "cub": {
        "proxy_anchor": {"lr": 1e-4, "weight_decay": 1e-4, "batch_size": 120, "m_per_class": 4},
        "multi_similarity": {"lr": 3e-5, "weight_decay": 5e-4, "batch_size": 80, "m_per_class": 5},
    },
}


class StudyError(Exception):
    """A problem with the study's input that the user must fix (data folder, output path, device).

    The command line prints its message on stderr and exits with status 2, without a traceback.

    Example:
        >>> import tempfile, pathlib
        >>> from dml_bias.bias import StudyConfig, run_study
        >>> file = pathlib.Path(tempfile.mkdtemp()) / "not_a_dir"
        >>> _ = file.write_text("x")
        >>> try:
        ...     run_study(StudyConfig(out_dir=str(file)))
        ... except StudyError as e:
        ...     print(str(e).endswith("exists and is not a directory"))
        True
    """


def usable_cpus() -> int:
    """The CPUs this process may use (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class RunSpec:
    """One model of the study: the loss it is trained with, its training mode and (soft mode only) its σ.

    :meth:`StudyConfig.run_specs` lists them; the study trains and evaluates one model per spec. In
    ``results.json`` a run keeps the plain fields ``"loss"``, ``"mode"`` and ``"sigma"`` (:meth:`to_dict`).

    Args:
        loss: One of :data:`LOSSES`.
        mode: One of :data:`MODES`.
        sigma: The soft mask's σ, a number in ``(0, 1)``, for ``mode="soft"`` (stored as a ``float``); ``None`` for
            every other mode.

    Raises:
        ValueError: An unknown loss or mode, a soft mode without a σ in ``(0, 1)``, or a σ for another mode.
        TypeError: A σ that is not a real number (such as the string ``"0.2"``).

    Example:
        >>> spec = RunSpec("proxy_anchor", "soft", 0.2)
        >>> spec.name, spec.to_dict()
        ('soft σ=0.2', {'loss': 'proxy_anchor', 'mode': 'soft', 'sigma': 0.2})
        >>> RunSpec("multi_similarity", "hard").name
        'hard'
    """

    loss: str
    mode: str
    sigma: float | None = None

    def __post_init__(self) -> None:
        check_choice(self.loss, "loss", LOSSES)
        check_choice(self.mode, "mode", MODES)
        if self.mode == "soft":
            if self.sigma is None:
                raise ValueError("sigma must be a number in (0, 1) when mode='soft', got None")
            check_number(self.sigma, "sigma", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
            object.__setattr__(self, "sigma", float(self.sigma))
        elif self.sigma is not None:
            raise ValueError(f"sigma must be None unless mode='soft', got {self.sigma!r} with mode={self.mode!r}")

    @property
    def name(self) -> str:
        """The run's display name, such as ``"none"``, ``"soft σ=0.2"`` or ``"hard"``."""
        return f"soft σ={self.sigma:g}" if self.mode == "soft" else self.mode

    def to_dict(self) -> dict[str, Any]:
        """``{"loss", "mode", "sigma"}``, the fields a run of ``results.json`` starts with."""
        return {"loss": self.loss, "mode": self.mode, "sigma": self.sigma}


@dataclass
class StudyConfig:
    """Everything that defines a study run; :meth:`StudyConfig.quick` gives the reduced CI configuration.

    The defaults are the default study: the built-in :class:`~dml_bias.datasets.SyntheticBackgrounds` data set
    (30 classes × 40 images of 32 × 32 px per split, home-background correlation 0.9, a pool of 16 backgrounds:
    15 classes have a distinctive home of their own, like ice for penguins, and 15 share one generic home, like
    foliage; see :meth:`resolved_homes`), a :class:`SmallCNN` of
    width 16 embedding 64-d, both losses, all modes (soft with σ = 0.2 and 0.5), 8 epochs, batches of 60 = 12
    classes × 5 images from :class:`~dml_bias.datasets.MPerClassBatchSampler`, AdamW with lr 1e-3 (Proxy-Anchor proxies
    at ``proxy_lr_mult`` × lr). With ``dataset="cub"`` the fields marked *synthetic* are ignored and the
    CUB-200-2011 recipe is used (see the study guide); its learning rate, weight decay and batch layout apply only to
    the fields left ``None`` (:meth:`resolved_training`).

    Args:
        dataset: ``"synthetic"`` or ``"cub"``.
        root: The CUB-200-2011 folder (``dataset="cub"`` only); it must contain ``segmentations/``.
        weights: Local ResNet-50 weights for ``dataset="cub"`` (nothing is downloaded); ``None``: random init.
        losses: Losses to train, a subset of :data:`LOSSES`.
        modes: Training modes, a subset of :data:`MODES`; ``"soft"`` trains one model per ``soft_sigmas`` entry.
        soft_sigmas: The σ values of the soft mask mode.
        variants: Test variants, a subset of :data:`VARIANTS` (``"original"`` is always evaluated).
        swap: ``"both"``: queries and gallery both use the variant (as Kobs & Hotho); ``"queries"``: only
            the queries use it and the gallery holds the original images (each query's own original is left out).
        epochs: Training epochs per model; ``None``: 8 (synthetic) or 60 (CUB).
        seed: Seed of the data, the initialisation, the sampler and the variants' donors, in ``[0, 2**32 - 1]``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, … (``"cpu:1"`` is rejected: there is one CPU device).
        num_workers: DataLoader worker processes for training batches; 0 (the default) loads them in the main
            process, which suits the synthetic data held in memory (workers would only add processes competing
            for the same cores); CUB, decoding JPEGs, may gain from a few.
        num_classes: *synthetic*: classes per split.
        images_per_class: *synthetic*: images per class.
        image_size: Side of the model's input images in pixels; ``None``: 32 (synthetic) or 224 (CUB: training crops
            of this size, test images resized to ``256/224 ×`` it and centre-cropped).
        background_correlation: *synthetic*: probability that an image shows its class's home background.
        num_backgrounds: *synthetic*: size of the background pool; fewer backgrounds than classes means some
            classes share a home background (less distinctive), so the per-class report has something to rank.
        unique_homes: *synthetic*: number of classes per split with a distinctive home of their own; the other
            classes share the remaining ``num_backgrounds − unique_homes`` generic homes evenly (see
            :class:`~dml_bias.datasets.SyntheticBackgrounds`). With both ``None`` (the default), half the classes
            (``num_classes // 2``) have a home of their own and the others share one generic home
            (:meth:`resolved_homes`); with only ``num_backgrounds`` set, homes are shared evenly (set it to
            ``num_classes`` for a home of its own per class); with only ``unique_homes`` set, the other classes
            share one generic home.
        embedding_size: Embedding length ``D``; ``None``: 64 (synthetic) or 512 (CUB).
        width: Width of the :class:`SmallCNN` (synthetic only).
        batch_size: Training batch size (a multiple of ``m_per_class``); ``None``: the recipe's (see
            :meth:`resolved_training`).
        m_per_class: Images per class in a training batch; ``None``: the recipe's.
        lr: Base learning rate of the model; ``None``: the recipe's.
        weight_decay: AdamW weight decay; ``None``: the recipe's.
        proxy_lr_mult: Proxy-Anchor proxies learn at ``proxy_lr_mult × lr``.
        report_variant: The variant the per-class bias report and the retrieval grid use.
        attribution_images: Test images per class (the first ones of each class) on which every model's
            attribution maps, foreground energy and background sensitivity are measured
            (:mod:`dml_bias.bias.attribution`); 0 switches these measures off.
        num_threads: torch's CPU (intra-op) threads during the study, restored afterwards; ``None``: 1 on the
            synthetic data, the CPUs this process may use on CUB, and torch's own setting when ``OMP_NUM_THREADS``
            is set (:meth:`resolved_threads`). The synthetic study's tiny models run ~1000 operations of ~16 µs
            per training step: more threads barely help on idle cores and, on cores that other processes also
            use, make every operation wait for a descheduled thread (measured 2–8× slower with 2 threads than
            with 1 on a busy 2-core machine; see the study guide).
        progress: Show tqdm progress bars (on stderr); ``True`` or ``False``.
        out_dir: If set (a non-empty path), ``results.json`` is written there after every completed run (so an
            interrupted study keeps its finished runs).
        save_models: Also save every trained model into ``out_dir/models/`` as TorchScript
            (``<loss>-<mode>.pt``, soft ones ``<loss>-soft<σ>.pt``) with a JSON sidecar of its preprocessing
            (mean/std, mask mode, σ, image size, the test data), which :func:`~dml_bias.bias.audit` and
            ``dml-bias audit`` read; needs ``out_dir``.

    Example:
        >>> cfg = StudyConfig.quick(losses=("proxy_anchor",), modes=("none", "hard"))
        >>> [(r.loss, r.mode) for r in cfg.run_specs()]
        [('proxy_anchor', 'none'), ('proxy_anchor', 'hard')]
    """

    dataset: str = "synthetic"
    root: str | None = None
    weights: str | None = None
    losses: tuple[str, ...] = LOSSES
    modes: tuple[str, ...] = MODES
    soft_sigmas: tuple[float, ...] = (0.2, 0.5)
    variants: tuple[str, ...] = VARIANTS
    swap: str = "both"
    epochs: int | None = None
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    num_classes: int = 30
    images_per_class: int = 40
    image_size: int | None = None
    background_correlation: float = 0.9
    num_backgrounds: int | None = None
    unique_homes: int | None = None
    embedding_size: int | None = None
    width: int = 16
    batch_size: int | None = None
    m_per_class: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    proxy_lr_mult: float = 100.0
    report_variant: str = "mixed_rand"
    attribution_images: int = 4
    num_threads: int | None = None
    progress: bool = True
    out_dir: str | None = None
    save_models: bool = False

    @classmethod
    def quick(cls, **overrides: Any) -> StudyConfig:
        """The ``--quick`` configuration: every mode and loss on a reduced data set and schedule (< 2 min, 2 CPUs).

        Args:
            **overrides: Fields to change from the quick configuration.

        Example:
            >>> StudyConfig.quick().num_classes
            16
        """
        base: dict[str, Any] = {
            "num_classes": 16,
            "images_per_class": 24,
            "image_size": 24,
            "epochs": 4,
            "width": 16,
            "embedding_size": 32,
            "batch_size": 40,
        }
        base.update(overrides)
        return cls(**base)

    def resolved_epochs(self) -> int:
        """The number of epochs actually used (``epochs`` or the data set's default)."""
        if self.epochs is not None:
            return self.epochs
        return 60 if self.dataset == "cub" else 8

    def resolved_image_size(self) -> int:
        """The input image side actually used (``image_size`` or the data set's default)."""
        if self.image_size is not None:
            return self.image_size
        return 224 if self.dataset == "cub" else 32

    def resolved_embedding_size(self) -> int:
        """The embedding length actually used (``embedding_size`` or the data set's default)."""
        if self.embedding_size is not None:
            return self.embedding_size
        return 512 if self.dataset == "cub" else 64

    def resolved_training(self, loss: str) -> dict[str, Any]:
        """The optimiser and batch settings used to train with ``loss``: the user's fields, else the recipe's.

        Every field left ``None`` takes the recipe's value: on the synthetic data lr 1e-3, weight decay 1e-4 and
        batches of 12 classes × 5 images for both losses; on CUB the published recipes (Proxy-Anchor: lr 1e-4,
        weight decay 1e-4, 30 classes × 4 images; Multi-Similarity: lr 3e-5, weight decay 5e-4, 16 classes × 5
        images). A field the user set always wins.

        Args:
            loss: One of :data:`LOSSES`.

        Returns:
            ``{"lr", "weight_decay", "batch_size", "m_per_class"}`` and ``"from_recipe"``: the names of the
            fields that took the recipe's value.

        Example:
            >>> cfg = StudyConfig(dataset="cub", root="CUB_200_2011", lr=1e-3)
            >>> s = cfg.resolved_training("proxy_anchor")
            >>> s["lr"], s["weight_decay"], s["batch_size"], s["from_recipe"]
            (0.001, 0.0001, 120, ['weight_decay', 'batch_size', 'm_per_class'])
        """
        check_choice(loss, "loss", LOSSES)
        recipe = _RECIPES[self.dataset if self.dataset in _RECIPES else "synthetic"][loss]
        out: dict[str, Any] = {}
        from_recipe = []
        for name in ("lr", "weight_decay", "batch_size", "m_per_class"):
            value = getattr(self, name)
            if value is None:
                value = recipe[name]
                from_recipe.append(name)
            out[name] = value
        out["from_recipe"] = from_recipe
        return out

    def resolved_threads(self) -> int | None:
        """The torch CPU threads the study sets: ``num_threads``, else the data set's default (``None``: torch's own).

        ``None`` when ``num_threads`` is ``None`` and ``OMP_NUM_THREADS`` is set (torch already follows it); else 1
        for the synthetic data (small operations, see ``num_threads``) and the usable CPUs for CUB (ResNet-50
        operations are large enough for threads to pay off).

        Example:
            >>> StudyConfig(num_threads=3).resolved_threads()
            3
        """
        if self.num_threads is not None:
            return self.num_threads
        if "OMP_NUM_THREADS" in os.environ:
            return None
        return usable_cpus() if self.dataset == "cub" else 1

    def resolved_homes(self) -> tuple[int, int | None]:
        """``(num_backgrounds, unique_homes)`` as passed to the synthetic data set (see the field docs).

        Example:
            >>> StudyConfig().resolved_homes(), StudyConfig(num_backgrounds=30).resolved_homes()
            ((16, 15), (30, None))
        """
        c, nb, u = self.num_classes, self.num_backgrounds, self.unique_homes
        if u is None and nb is None:
            u = c // 2
        if nb is None:
            nb = u + 1 if u is not None and u < c else c
        return nb, u

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field.

        Example:
            >>> StudyConfig(modes=("none", "blur")).validate()
            Traceback (most recent call last):
            ...
            ValueError: modes must be one of 'none', 'soft', 'hard', 'channel', 'bg_augment', got 'blur'
        """
        self._validate_names()
        self._validate_data()
        self._validate_training()
        self._validate_runtime()

    def _validate_names(self) -> None:
        """The data set, losses, modes, variants, σ values, swap protocol and report variant."""
        check_choice(self.dataset, "dataset", DATASETS)
        for name, values, choices in (
            ("losses", self.losses, LOSSES),
            ("modes", self.modes, MODES),
            ("variants", self.variants, VARIANTS),
        ):
            if isinstance(values, str) or not isinstance(values, Sequence) or len(values) == 0:
                raise ValueError(f"{name} must be a non-empty sequence of names from {choices}, got {values!r}")
            for v in values:
                check_choice(v, name, choices)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must not repeat a name, got {values!r}")
        check_choice(self.swap, "swap", _SWAPS)
        check_choice(self.report_variant, "report_variant", VARIANTS)
        if "soft" in self.modes:
            if len(self.soft_sigmas) == 0:
                raise ValueError("soft_sigmas must hold at least one σ when modes contains 'soft', got ()")
            for s in self.soft_sigmas:
                check_number(s, "soft_sigmas", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        if self.dataset == "cub" and not self.root:
            raise ValueError("root must be the CUB-200-2011 folder when dataset='cub', got None")

    def _validate_data(self) -> None:
        """The seed and the sizes of the data and of the model."""
        check_number(self.attribution_images, "attribution_images", low=0, integer=True)
        # The study derives further seeds as seed * 1000 + k, which torch.Generator takes up to 2**64 - 1.
        check_number(self.seed, "seed", low=0, high=2**32 - 1, integer=True)
        check_number(self.num_classes, "num_classes", low=2, integer=True)
        check_number(self.images_per_class, "images_per_class", low=2, integer=True)
        if self.image_size is not None:
            check_number(self.image_size, "image_size", low=8, integer=True)
        check_number(self.background_correlation, "background_correlation", low=0.0, high=1.0)
        if self.num_backgrounds is not None:
            check_number(self.num_backgrounds, "num_backgrounds", low=2, integer=True)
        if self.unique_homes is not None and self.dataset == "synthetic":
            check_number(self.unique_homes, "unique_homes", low=0, high=self.num_classes, integer=True)
            pool = self.resolved_homes()[0]
            if pool < self.unique_homes + (self.unique_homes < self.num_classes):
                raise ValueError(
                    f"num_backgrounds must exceed unique_homes={self.unique_homes} (a home of its own for each of "
                    "those classes and at least one shared home for the others), got "
                    f"num_backgrounds={pool}; lower unique_homes or raise num_backgrounds"
                )
        if self.embedding_size is not None:
            check_number(self.embedding_size, "embedding_size", low=1, integer=True)
        check_number(self.width, "width", low=1, integer=True)

    def _validate_training(self) -> None:
        """Epochs, batch layout, learning rates and weight decay (the resolved recipe of every loss)."""
        if self.epochs is not None:
            check_number(self.epochs, "epochs", low=1, integer=True)
        for name in ("m_per_class", "batch_size"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), name, low=2 if name == "m_per_class" else 1, integer=True)
        if self.lr is not None:
            check_number(self.lr, "lr", low=0.0, low_inclusive=False)
        if self.weight_decay is not None:
            check_number(self.weight_decay, "weight_decay", low=0.0)
        for loss in self.losses:
            settings = self.resolved_training(loss)
            batch, m = settings["batch_size"], settings["m_per_class"]
            if batch < m or batch % m:
                raise ValueError(f"batch_size must be a multiple of m_per_class={m}, got {batch}")
            if self.dataset == "synthetic" and batch // m > self.num_classes:
                raise ValueError(
                    f"batch_size // m_per_class must be at most num_classes={self.num_classes} (classes per batch), "
                    f"got batch_size={batch}, m_per_class={m}"
                )
        check_number(self.proxy_lr_mult, "proxy_lr_mult", low=0.0, low_inclusive=False)

    def _validate_runtime(self) -> None:
        """Device, threads, workers, progress bars and the output directory."""
        check_number(self.num_workers, "num_workers", low=0, integer=True)
        if self.num_threads is not None:
            check_number(self.num_threads, "num_threads", low=1, integer=True)
        if not isinstance(self.save_models, bool):
            raise TypeError(f"save_models must be True or False, got {type(self.save_models).__name__}")
        if self.save_models and self.out_dir is None:
            raise ValueError("save_models=True needs out_dir (the models go into out_dir/models/), got out_dir=None")
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a torch device string such as 'cpu' or 'cuda', got {self.device!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device must be a torch device string such as 'cpu' or 'cuda', got {self.device!r}"
            ) from exc
        if device.type == "cpu" and device.index not in (None, 0):
            raise ValueError(
                f"device must be 'cpu' (there is one CPU device) or a GPU such as 'cuda:1', got {self.device!r}"
            )
        if not isinstance(self.progress, bool):  # progress="no" is truthy: it would show the bars
            raise TypeError(f"progress must be True or False, got {self.progress!r}")
        if self.out_dir is not None:
            if not isinstance(self.out_dir, (str, os.PathLike)):
                raise TypeError(f"out_dir must be None or a directory path (str or os.PathLike), got {self.out_dir!r}")
            if not str(os.fspath(self.out_dir)).strip():
                raise ValueError(f"out_dir must name a directory (None: no files), got {self.out_dir!r}")

    def run_specs(self) -> list[RunSpec]:
        """One :class:`RunSpec` per model to train, losses outermost (one per σ for the soft mode).

        Example:
            >>> [spec.name for spec in StudyConfig(losses=("proxy_anchor",), soft_sigmas=(0.3,)).run_specs()]
            ['none', 'soft σ=0.3', 'hard', 'channel', 'bg_augment']
        """
        specs: list[RunSpec] = []
        for loss in self.losses:
            for mode in self.modes:
                if mode == "soft":
                    specs.extend(RunSpec(loss, mode, float(s)) for s in self.soft_sigmas)
                else:
                    specs.append(RunSpec(loss, mode))
        return specs

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready values (tuples become lists), with the resolved epochs."""
        d = dataclasses.asdict(self)
        d["epochs_resolved"] = self.resolved_epochs()
        d["embedding_size_resolved"] = self.resolved_embedding_size()
        d["image_size_resolved"] = self.resolved_image_size()
        d["num_backgrounds_resolved"], d["unique_homes_resolved"] = self.resolved_homes()
        d["num_threads_resolved"] = self.resolved_threads()
        d["training_resolved"] = {
            loss: {k: v for k, v in self.resolved_training(loss).items() if k != "from_recipe"}
            for loss in self.losses
            if loss in LOSSES
        }
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
