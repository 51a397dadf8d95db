"""The background-bias study: train one model per (loss, mask mode), evaluate on background variants, report.

The protocol: train the same embedding model with no mask, soft masks (one run per σ), hard masks, the mask as
an extra input channel and random backgrounds during training (``"bg_augment"``, via
:class:`dml_bias.transforms.BackgroundSwap`), with Proxy-Anchor and with Multi-Similarity; then evaluate
Recall@1/2/4/8 and MAP@R on the test classes, on the original test images and on the ImageNet-9 background
variants (``only_fg``, ``only_bg_t``, ``no_fg``, ``mixed_same``, ``mixed_rand``, ``mixed_next``). Every model is
evaluated twice: with its own mask mode applied to the test images (``metrics``) and on the raw test images
(``metrics_raw``). The study only orchestrates: data sets, transforms, losses, miner, sampler and metrics are the
library's own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dml_bias._checks import check_choice, check_number

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
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
_SYNTHETIC_STD = (0.25, 0.25, 0.25)


class StudyError(Exception):
    """A problem with the study's input that the user must fix (data folder, output path, device).

    The command line prints its message on stderr and exits with status 2, without a traceback.

    Example:
        >>> import tempfile, pathlib
        >>> file = pathlib.Path(tempfile.mkdtemp()) / "not_a_dir"
        >>> _ = file.write_text("x")
        >>> try:
        ...     run_study(StudyConfig(out_dir=str(file)))
        ... except StudyError as e:
        ...     print(str(e).endswith("exists and is not a directory"))
        True
    """


@dataclass
class StudyConfig:
    """Everything that defines a study run; :meth:`StudyConfig.quick` gives the reduced CI configuration.

    The defaults are the default study: the built-in :class:`~dml_bias.datasets.SyntheticBackgrounds` data set
    (30 classes × 40 images of 32 × 32 px per split, home-background correlation 0.9, a pool of 16 backgrounds:
    15 classes have a distinctive home of their own, like ice for penguins, and 15 share one generic home, like
    foliage; see :meth:`resolved_homes`), a :class:`SmallCNN` of
    width 16 embedding 64-d, both losses, all modes (soft with σ = 0.2 and 0.5), 8 epochs, batches of 60 = 12
    classes × 5 images from :class:`~dml_bias.datasets.MPerClassSampler`, AdamW with lr 1e-3 (Proxy-Anchor proxies
    at ``proxy_lr_mult`` × lr). With ``dataset="cub"`` the fields marked *synthetic* are ignored and the
    CUB-200-2011 recipe is used (see the study guide).

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
        seed: Seed of the data, the initialisation, the sampler and the variants' donors.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ….
        num_workers: DataLoader worker processes for training batches.
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
        batch_size: Training batch size (a multiple of ``m_per_class``).
        m_per_class: Images per class in a training batch.
        lr: Base learning rate of the model.
        weight_decay: AdamW weight decay.
        proxy_lr_mult: Proxy-Anchor proxies learn at ``proxy_lr_mult × lr``.
        report_variant: The variant the per-class bias report and the retrieval grid use.
        num_threads: CPU threads for torch; ``None``: the CPUs this process may use (unless ``OMP_NUM_THREADS``
            is set), restored afterwards.
        progress: Show tqdm progress bars (on stderr).
        out_dir: If set, ``results.json`` is written there after every completed run (so an interrupted study
            keeps its finished runs).

    Example:
        >>> cfg = StudyConfig.quick(losses=("proxy_anchor",), modes=("none", "hard"))
        >>> [(r["loss"], r["mode"]) for r in cfg.run_specs()]
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
    batch_size: int = 60
    m_per_class: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    proxy_lr_mult: float = 100.0
    report_variant: str = "mixed_rand"
    num_threads: int | None = None
    progress: bool = True
    out_dir: str | None = None

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
                check_number(s, "soft_sigmas", low=0.0, low_inclusive=False)
        if self.epochs is not None:
            check_number(self.epochs, "epochs", low=1, integer=True)
        check_number(self.seed, "seed", low=0, integer=True)
        check_number(self.num_workers, "num_workers", low=0, integer=True)
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
        check_number(self.m_per_class, "m_per_class", low=2, integer=True)
        check_number(self.batch_size, "batch_size", low=self.m_per_class, integer=True)
        if self.batch_size % self.m_per_class:
            raise ValueError(f"batch_size must be a multiple of m_per_class={self.m_per_class}, got {self.batch_size}")
        if self.dataset == "synthetic" and self.batch_size // self.m_per_class > self.num_classes:
            raise ValueError(
                f"batch_size // m_per_class must be at most num_classes={self.num_classes} (classes per batch), got "
                f"batch_size={self.batch_size}, m_per_class={self.m_per_class}"
            )
        check_number(self.lr, "lr", low=0.0, low_inclusive=False)
        check_number(self.weight_decay, "weight_decay", low=0.0)
        check_number(self.proxy_lr_mult, "proxy_lr_mult", low=0.0, low_inclusive=False)
        if self.num_threads is not None:
            check_number(self.num_threads, "num_threads", low=1, integer=True)
        if self.dataset == "cub" and not self.root:
            raise ValueError("root must be the CUB-200-2011 folder when dataset='cub', got None")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device must be a torch device string such as 'cpu' or 'cuda', got {self.device!r}"
            ) from exc

    def run_specs(self) -> list[dict[str, Any]]:
        """One ``{"loss", "mode", "sigma"}`` dict per model to train, losses outermost (``sigma`` only for soft)."""
        specs: list[dict[str, Any]] = []
        for loss in self.losses:
            for mode in self.modes:
                if mode == "soft":
                    specs.extend({"loss": loss, "mode": mode, "sigma": float(s)} for s in self.soft_sigmas)
                else:
                    specs.append({"loss": loss, "mode": mode, "sigma": None})
        return specs

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready values (tuples become lists), with the resolved epochs."""
        d = dataclasses.asdict(self)
        d["epochs_resolved"] = self.resolved_epochs()
        d["embedding_size_resolved"] = self.resolved_embedding_size()
        d["image_size_resolved"] = self.resolved_image_size()
        d["num_backgrounds_resolved"], d["unique_homes_resolved"] = self.resolved_homes()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def run_name(run: dict[str, Any]) -> str:
    """A short display name for a run spec: ``"none"``, ``"soft σ=0.2"``, ``"hard"``, …."""
    return f"soft σ={run['sigma']:g}" if run["mode"] == "soft" else str(run["mode"])


# ----------------------------------------------------------------------------------------------------------- data


@dataclass
class _Split:
    """A split held in memory at the model's input size: uint8 images/masks and labels."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    masks: torch.Tensor  # (N, 1, H, W) uint8, 255 = object
    labels: torch.Tensor  # (N,) long
    class_names: list[str]


class _MemoryDataset(torch.utils.data.Dataset):
    """Samples (the interface's dict structure) from tensors in memory, with an optional v2 transform."""

    def __init__(self, split: _Split, transform: Callable[[Any], Any] | None = None) -> None:
        self.split = split
        self.transform = transform
        self.labels = split.labels

    def __len__(self) -> int:
        return int(self.split.labels.numel())

    def __getitem__(self, i: int) -> dict[str, Any]:
        from torchvision import tv_tensors

        sample = {
            "image": tv_tensors.Image(self.split.images[i]),
            "mask": tv_tensors.Mask(self.split.masks[i]),
            "label": int(self.split.labels[i]),
            "index": int(i),
        }
        return self.transform(sample) if self.transform is not None else sample


def _collate(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.as_tensor(s["image"]) for s in samples])
    masks = torch.stack([torch.as_tensor(s["mask"]) for s in samples])
    labels = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    return images.as_subclass(torch.Tensor), masks.as_subclass(torch.Tensor), labels


def _materialize(dataset: Any, desc: str, progress: bool) -> _Split:
    """Read every sample of ``dataset`` (already resized to a common size) into a :class:`_Split`."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False, collate_fn=_collate)
    parts = [b for b in tqdm(loader, desc=desc, leave=False, disable=not progress, file=sys.stderr)]
    images = torch.cat([p[0] for p in parts])
    masks = torch.cat([p[1] for p in parts])
    labels = torch.cat([p[2] for p in parts])
    if masks.dtype != torch.uint8:
        scale = 255.0 if masks.dtype == torch.bool or masks.max() <= 1 else 1.0
        masks = (masks.float() * scale).round().to(torch.uint8)
    return _Split(images.to(torch.uint8), masks, labels, list(dataset.class_names))


def _render(dataset: Any) -> _Split:
    """All samples of a :class:`~dml_bias.datasets.SyntheticBackgrounds` (vectorised ``render_all``)."""
    images, masks = dataset.render_all()
    return _Split(images, masks, dataset.labels.clone(), list(dataset.class_names))


class _Data:
    """The study's data: the train split (a dataset for the loader), the test split and its variants."""

    def __init__(self, config: StudyConfig) -> None:
        self.config = config
        self.home_backgrounds: torch.Tensor | None = None
        self.background_distinctiveness: torch.Tensor | None = None
        if config.dataset == "synthetic":
            self._init_synthetic()
        else:
            self._init_cub()

    # -- synthetic -------------------------------------------------------------------------------------
    def _init_synthetic(self) -> None:
        from dml_bias.datasets import SyntheticBackgrounds

        c = self.config
        kw: dict[str, Any] = {
            "num_classes": c.num_classes,
            "images_per_class": c.images_per_class,
            "image_size": c.resolved_image_size(),
            "background_correlation": c.background_correlation,
            "num_backgrounds": c.resolved_homes()[0],
            "unique_homes": c.resolved_homes()[1],
            "seed": c.seed,
        }
        self.train_dataset: Any = SyntheticBackgrounds("train", **kw)
        self.test_dataset = SyntheticBackgrounds("test", **kw)
        self.train: _Split | None = _render(self.train_dataset)
        self.test = _render(self.test_dataset)
        self.mean, self.std = _SYNTHETIC_MEAN, _SYNTHETIC_STD
        homes = getattr(self.test_dataset, "home_backgrounds", None)
        if isinstance(homes, torch.Tensor):
            self.home_backgrounds = homes.long()
            self.background_distinctiveness = _distinctiveness(homes.long())
        self._variant_cache: dict[str, _Split] = {"original": self.test}

    def _synthetic_variant(self, name: str) -> _Split:
        if name not in self._variant_cache:
            ds = self.test_dataset.with_variant(name, seed=self.config.seed)
            self._variant_cache[name] = _render(ds)
        return self._variant_cache[name]

    # -- CUB -------------------------------------------------------------------------------------------
    def _init_cub(self) -> None:
        from torchvision.transforms import v2

        from dml_bias.datasets import CUB200

        c = self.config
        root = Path(str(c.root))
        if not root.is_dir():
            raise StudyError(f"--root must be the CUB-200-2011 folder, got {str(root)!r}, which is not a directory")
        seg_candidates = (
            root / "segmentations",
            root / "CUB_200_2011" / "segmentations",
            root.parent / "segmentations",
        )
        if not any(p.is_dir() for p in seg_candidates):
            raise StudyError(
                f"--root {str(root)!r} has no 'segmentations' folder: the study needs the CUB-200-2011 "
                "segmentations (segmentations.tgz, unpacked next to CUB_200_2011/)"
            )
        size = c.resolved_image_size()
        test_tf = v2.Compose([v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)])
        try:
            self.train_dataset = CUB200(str(root), "train", masks=True)
            self.donor_dataset = CUB200(str(root), "train", masks=True, transform=test_tf)
            test_dataset = CUB200(str(root), "test", masks=True, transform=test_tf)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise StudyError(f"cannot read CUB-200-2011 from {str(root)!r}: {exc}") from exc
        if c.weights is None:
            warnings.warn(
                "no weights given: the ResNet-50 starts from a random initialisation, so the numbers will not be "
                "comparable with the published (ImageNet-pretrained) ones",
                UserWarning,
                stacklevel=3,
            )
        self.test = _materialize(test_dataset, "load CUB test", c.progress)
        self.train = None
        self.mean, self.std = _IMAGENET_MEAN, _IMAGENET_STD

    def _real_variant(self, name: str) -> _Split:
        """A variant of the real test set, built with :func:`~dml_bias.transforms.functional.make_variant`.

        Donors follow the ImageNet-9 class rules (:func:`~dml_bias.transforms.functional.choose_donor`, seeded
        by ``config.seed``); the donor's object box is tiled over with its own background (``fill="tile"``).
        """
        from dml_bias.transforms.functional import choose_donor, make_variant

        test = self.test
        if name == "original":
            return test
        gen = torch.Generator().manual_seed(self.config.seed * 1000 + VARIANTS.index(name))
        images = torch.empty_like(test.images)
        for i in range(test.labels.numel()):
            donor = None
            if name.startswith("mixed_"):
                d = choose_donor(name, test.labels, i, generator=gen)
                donor = (test.images[d], test.masks[d])
            images[i] = make_variant(name, test.images[i], test.masks[i], donor, fill="tile")[0]
        return _Split(images, test.masks, test.labels, test.class_names)

    def variant(self, name: str) -> _Split:
        """The test split rendered as variant ``name`` (masks stay the object's masks)."""
        if self.config.dataset == "synthetic":
            return self._synthetic_variant(name)
        return self._real_variant(name)

    # -- training batches ------------------------------------------------------------------------------
    def train_loader(self, mode: str, batch_size: int, m: int, seed: int) -> torch.utils.data.DataLoader:
        """Training batches ``(images uint8, masks uint8, labels)`` from :class:`MPerClassSampler`."""
        from torchvision.transforms import v2

        from dml_bias.datasets import MPerClassSampler
        from dml_bias.transforms import BackgroundSwap

        c = self.config
        steps: list[Any] = []
        if c.dataset == "cub":
            crop = v2.RandomResizedCrop(c.resolved_image_size(), scale=(0.16, 1.0), antialias=True)
            steps += [crop, v2.RandomHorizontalFlip()]
            donors: Any = self.donor_dataset
        else:
            steps += [v2.RandomHorizontalFlip()]
            donors = _MemoryDataset(self.train) if self.train is not None else None
        if mode == "bg_augment":
            steps.append(BackgroundSwap(donors, variant="mixed_rand", fill="tile", p=1.0, seed=seed))
        transform = v2.Compose(steps)
        if c.dataset == "cub":
            dataset: Any = self.train_dataset
            dataset.transform = transform
            labels = torch.as_tensor(dataset.labels)
        else:
            dataset = _MemoryDataset(self.train, transform) if self.train is not None else None
            labels = self.train.labels if self.train is not None else torch.empty(0, dtype=torch.long)
        sampler = MPerClassSampler(labels, m, batch_size, generator=torch.Generator().manual_seed(seed))
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=_collate,
            num_workers=c.num_workers,
            persistent_workers=c.num_workers > 0,
        )

    @property
    def num_train_classes(self) -> int:
        """Classes of the training split."""
        if self.config.dataset == "cub":
            return int(self.train_dataset.num_classes)
        return int(self.train_dataset.num_classes)

    @property
    def input_size(self) -> int:
        """Side of the model's input images."""
        return int(self.test.images.shape[-1])


def _distinctiveness(homes: torch.Tensor) -> torch.Tensor:
    """Per class: ``1 / (number of classes sharing its home background)`` — 1.0 for a background of its own."""
    counts = torch.bincount(homes, minlength=int(homes.max()) + 1).to(torch.float64)
    return 1.0 / counts[homes]


# ---------------------------------------------------------------------------------------------------- training


def _model_input(
    images: torch.Tensor,
    masks: torch.Tensor,
    mode: str,
    sigma: float | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 images and masks → the normalised float input of a model trained with ``mode``.

    ``none``/``bg_augment``: the image; ``soft``/``hard``: :func:`~dml_bias.transforms.functional.mask_background`;
    ``channel``: the image plus the mask as a 4th channel (in ``[0, 1]``, not normalised).
    """
    from dml_bias.transforms.functional import mask_background

    x = images.float() / 255.0
    if mode in ("soft", "hard"):
        x = mask_background(x, masks, mode="soft" if mode == "soft" else "hard", sigma=0.5 if sigma is None else sigma)
    elif mode == "channel":
        x = mask_background(x, masks, mode="channel")
    x = torch.as_tensor(x).as_subclass(torch.Tensor).float()
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    rgb = (x[:, :3] - m) / s
    return torch.cat([rgb, x[:, 3:]], dim=1) if x.shape[1] > 3 else rgb


def _build_model(config: StudyConfig, mode: str) -> nn.Module:
    from dml_bias.bias.models import SmallCNN, build_resnet50

    in_channels = 4 if mode == "channel" else 3
    if config.dataset == "cub":
        return build_resnet50(
            config.resolved_embedding_size(), in_channels=in_channels, weights=config.weights, warn=False
        )
    return SmallCNN(in_channels=in_channels, embedding_size=config.resolved_embedding_size(), width=config.width)


def _freeze_bn(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.eval()
            for p in mod.parameters():
                p.requires_grad_(False)


def _train(
    config: StudyConfig, data: _Data, spec: dict[str, Any], device: torch.device, bar_desc: str
) -> tuple[nn.Module, list[float]]:
    """Train one model; return it and the mean loss per epoch."""
    from tqdm.auto import tqdm

    from dml_bias.losses import MultiSimilarityLoss, ProxyAnchorLoss
    from dml_bias.miners import MultiSimilarityMiner

    mode, sigma, loss_name = spec["mode"], spec["sigma"], spec["loss"]
    torch.manual_seed(config.seed)
    model = _build_model(config, mode).to(device)
    cub = config.dataset == "cub"
    epochs = config.resolved_epochs()
    lr, wd, batch, m = config.lr, config.weight_decay, config.batch_size, config.m_per_class
    if cub:  # methods notes §D.2 (Proxy-Anchor, ResNet-50) and §C.4 (Multi-Similarity)
        lr, wd, batch, m = (1e-4, 1e-4, 120, 4) if loss_name == "proxy_anchor" else (3e-5, 5e-4, 80, 5)
        batch = m * min(batch // m, data.num_train_classes)  # a smaller copy of the data has fewer classes
    miner: Any = None
    if loss_name == "proxy_anchor":
        proxy_loss = ProxyAnchorLoss(data.num_train_classes, config.resolved_embedding_size()).to(device)
        loss_fn: nn.Module = proxy_loss
        groups = [{"params": list(model.parameters()), "lr": lr}, *proxy_loss.param_groups(lr, config.proxy_lr_mult)]
    else:
        loss_fn = MultiSimilarityLoss().to(device)
        miner = MultiSimilarityMiner()
        groups = [{"params": list(model.parameters()), "lr": lr}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    scheduler: Any = None
    warm = 0
    if cub:
        if loss_name == "proxy_anchor":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
            warm = min(5, epochs - 1)
        else:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=[int(0.4 * epochs), int(0.8 * epochs)], gamma=0.1
            )
    loader = data.train_loader(mode, batch, m, config.seed)
    params = [p for g in groups for p in g["params"]]
    history: list[float] = []
    bar = tqdm(range(epochs), desc=bar_desc, leave=False, disable=not config.progress, file=sys.stderr)
    for epoch in bar:
        model.train()
        if cub:
            # Warm-up (§D.2): only the embedding head and the proxies learn in the first `warm` epochs.
            for pname, p in model.named_parameters():
                if pname.startswith("trunk."):
                    p.requires_grad_(epoch >= warm)
            _freeze_bn(model)  # BatchNorm stays in eval mode with frozen affine parameters (§D.2)
        sampler: Any = loader.batch_sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        total, count = 0.0, 0
        for images, masks, labels in loader:
            images, masks, labels = images.to(device), masks.to(device), labels.to(device)
            emb = model(_model_input(images, masks, mode, sigma, data.mean, data.std))
            indices = miner(emb, labels) if miner is not None else None
            loss = loss_fn(emb, labels, indices) if indices is not None else loss_fn(emb, labels)
            if not torch.isfinite(loss):
                raise RuntimeError(f"the {loss_name} loss became {loss.item()} in epoch {epoch + 1} ({bar_desc})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(params, 10.0)
            optimizer.step()
            total += float(loss.detach())
            count += 1
        if scheduler is not None:
            scheduler.step()
        history.append(total / max(count, 1))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    bar.close()
    return model, history


# -------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _embed(
    model: nn.Module,
    split: _Split,
    mode: str,
    sigma: float | None,
    raw: bool,
    data: _Data,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, split.labels.numel(), batch_size):
        images = split.images[start : start + batch_size].to(device)
        masks = split.masks[start : start + batch_size].to(device)
        if raw and mode == "channel":
            # "Raw" = no mask information: the mask channel says "everything is object".
            masks = torch.full_like(masks, 255)
        eval_mode = "none" if raw and mode != "channel" else mode
        out.append(model(_model_input(images, masks, eval_mode, sigma, data.mean, data.std)).float().cpu())
    return torch.cat(out)


def _metrics(
    query: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    from dml_bias.metrics import retrieval_metrics

    # Recall@k with k at least the number of other items is the hit rate over everything: clamp k (tiny sets).
    largest = max(1, labels.numel() - 1)
    ks = sorted({min(k, largest) for k in (1, 2, 4, 8)})
    if reference is None:
        res = retrieval_metrics(query, labels, ks=ks, per_class=True, full_map=False)
    else:
        res = retrieval_metrics(
            query, labels, reference, labels, ks=ks, exclude_self=True, per_class=True, full_map=False
        )
    for k in (1, 2, 4, 8):
        res[f"recall@{k}"] = res[f"recall@{min(k, largest)}"]
        for values in res["per_class"].values():
            values[f"recall@{k}"] = values[f"recall@{min(k, largest)}"]
    summary = {k: float(res[k]) for k in METRIC_KEYS}
    per_class = {
        int(c): {"recall@1": float(v["recall@1"]), "count": int(v["count"])} for c, v in res["per_class"].items()
    }
    return summary, per_class


def _chance_recall_at_1(labels: torch.Tensor) -> float:
    """Expected Recall@1 of a random ranking: mean over queries of (same-class others) / (all others)."""
    counts = torch.bincount(labels).to(torch.float64)
    n = labels.numel()
    return float(((counts[labels] - 1) / (n - 1)).mean())


# ------------------------------------------------------------------------------------------------------- result


@dataclass
class StudyResult:
    """The outcome of :func:`run_study`: every number, JSON-ready, plus tables, the bias report and figures.

    Attributes:
        config: The :class:`StudyConfig` that produced it.
        runs: One dict per trained model: ``loss``, ``mode``, ``sigma``, ``name``, ``metrics`` and ``metrics_raw``
            (``{variant: {"recall@1", "recall@2", "recall@4", "recall@8", "map@r"}}``), ``background_gap`` and
            ``background_gap_raw`` (``mixed_same`` − ``mixed_rand`` Recall@1), ``worst_class``,
            ``per_class_recall@1`` (``{"metrics"|"metrics_raw": {variant: {class: R@1}}}``), ``loss_history``,
            ``train_seconds``, ``eval_seconds``.
        dataset: Facts about the data: sizes, class names, ``chance_recall@1``, home backgrounds (synthetic).
        versions: Python, torch, torchvision, numpy and dml_bias versions, platform and device.
        timings: Seconds spent: ``data``, ``total``.
        interrupted: ``True`` if the study stopped early (Ctrl-C); ``runs`` holds the completed ones.
        grid: Images and neighbours for the retrieval-grid figure (not saved to JSON); ``None`` without a
            ``"none"`` or ``"hard"`` run of the first loss.

    Results are reproducible for a given seed, device and number of CPU threads (a different thread count can
    change float reductions and hence, slightly, the trained models).

    Example:
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

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready values (what ``results.json`` holds)."""
        from dml_bias.bias.report import per_class_rows, per_class_summary

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
        }

    def table(self, *, raw: bool | None = None) -> str:
        """The printed tables, per loss: Recall@k and MAP@R on the original images, then Recall@1 per variant.

        The second table also holds the background gap, background-alone retrieval against chance and the worst
        class.

        Args:
            raw: ``False``: only own-mode evaluation; ``True``: only raw images; ``None``: both.
        """
        from dml_bias.bias.report import format_tables

        return format_tables(self, raw=raw)

    def per_class_report(self, top: int = 10) -> str:
        """The per-class bias report: the ``top`` classes the no-mask model recognised most by their background.

        Per test class: Recall@1 failures of the no-mask and the hard-mask model (same loss) on
        ``config.report_variant`` and on the original images, their difference, and the ranking score, the
        reliance share (the no-mask failures added by swapping the backgrounds, net of the hard-mask model's, as a
        share of the no-mask failures on the swapped backgrounds); on synthetic data also the rank correlation of
        the ranking with the home backgrounds' distinctiveness (stored in ``results.json`` as
        ``per_class_summary``).
        """
        from dml_bias.bias.report import format_per_class

        return format_per_class(self, top=top)

    def plot(self, out_dir: str | Path) -> list[Path]:
        """Write the figures (PNG) into ``out_dir``; return their paths."""
        from dml_bias.bias.plots import plot_all

        return plot_all(self, Path(out_dir))

    def save(self, out_dir: str | Path, *, figures: bool = True) -> dict[str, Path]:
        """Write ``results.json``, ``per_class.csv``, the figures and ``report.md`` into ``out_dir``.

        Returns:
            The written files by kind (``"results"``, ``"per_class"``, ``"report"``, ``"figure:<name>"``).
        """
        from dml_bias.bias.report import write_per_class_csv, write_report_md

        out = _prepare_out_dir(out_dir)
        paths = {"results": self.save_json(out), "per_class": write_per_class_csv(self, out / "per_class.csv")}
        figs = self.plot(out) if figures else []
        for p in figs:
            paths[f"figure:{p.stem}"] = p
        paths["report"] = write_report_md(self, out / "report.md", figs)
        return paths

    def save_json(self, out_dir: str | Path) -> Path:
        """Write only ``results.json`` (atomically: a temporary file, then a rename)."""
        out = _prepare_out_dir(out_dir)
        path = out / "results.json"
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=True) + "\n")
        os.replace(tmp, path)
        return path


def _prepare_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise StudyError(f"the output directory {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudyError(f"cannot create the output directory {str(out)!r}: {exc.strerror or exc}") from exc
    return out


def _versions(device: torch.device) -> dict[str, str]:
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


def _resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StudyError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    return device


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# -------------------------------------------------------------------------------------------------------- study


def run_study(config: StudyConfig | None = None) -> StudyResult:
    """Run the background-bias study described by ``config`` and return every number.

    For every (loss, mode) of :meth:`StudyConfig.run_specs` a fresh model is trained (same seed), then its
    test embeddings are computed on every variant, twice: with the model's own mask mode applied to the test
    images (``metrics``) and on the raw images (``metrics_raw``). For ``"none"`` and ``"bg_augment"`` both are
    the same evaluation. For ``"channel"`` the raw evaluation feeds an all-object mask channel (255 everywhere),
    i.e. no mask information. With ``swap="both"`` queries and gallery come from the variant (self excluded);
    with ``swap="queries"`` only queries do and the gallery is the original test set (each query's own
    original left out). If ``config.out_dir`` is set, ``results.json`` is rewritten after every run.

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
    device = _resolve_device(config.device)
    if config.out_dir is not None:
        _prepare_out_dir(config.out_dir)
    previous_threads = torch.get_num_threads()
    threads = config.num_threads
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = _default_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(config, device)
    finally:
        torch.set_num_threads(previous_threads)


def _run(config: StudyConfig, device: torch.device) -> StudyResult:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    result = StudyResult(config=config, versions=_versions(device))
    data = _Data(config)
    variants = list(dict.fromkeys(["original", *config.variants]))
    if config.report_variant not in variants:
        variants.append(config.report_variant)
    test = data.test
    result.dataset = {
        "name": config.dataset,
        "num_train_classes": data.num_train_classes,
        "num_test_classes": len(test.class_names),
        "num_test_images": int(test.labels.numel()),
        "input_size": data.input_size,
        "class_names": list(test.class_names),
        "chance_recall@1": _chance_recall_at_1(test.labels),
        "variants": variants,
    }
    if data.home_backgrounds is not None and data.background_distinctiveness is not None:
        result.dataset["home_backgrounds"] = data.home_backgrounds.tolist()
        result.dataset["background_distinctiveness"] = data.background_distinctiveness.tolist()
    for v in variants:  # render/build every variant once, before training
        data.variant(v)
    result.timings["data"] = time.perf_counter() - t0
    specs = config.run_specs()
    grid_embeddings: dict[str, dict[str, torch.Tensor]] = {}
    grid_loss = config.losses[0]
    try:
        outer = tqdm(specs, desc="study", disable=not config.progress, file=sys.stderr)
        for spec in outer:
            name = run_name(spec)
            outer.set_postfix_str(f"{spec['loss']} / {name}")
            t_train = time.perf_counter()
            model, history = _train(config, data, spec, device, f"train {spec['loss']} / {name}")
            t_eval = time.perf_counter()
            run = {**spec, "name": name, "loss_history": history}
            evaluations = [("metrics", False)]
            if spec["mode"] not in ("none", "bg_augment"):
                evaluations.append(("metrics_raw", True))
            per_class_all: dict[str, dict[str, dict[int, float]]] = {}
            for key, raw in evaluations:
                run[key], per_class_all[key] = {}, {}
                gallery = None
                if config.swap == "queries":
                    gallery = _embed(model, data.variant("original"), spec["mode"], spec["sigma"], raw, data, device)
                for v in variants:
                    emb = _embed(model, data.variant(v), spec["mode"], spec["sigma"], raw, data, device)
                    summary, per_class = _metrics(emb, test.labels, gallery)
                    run[key][v] = summary
                    per_class_all[key][v] = {c: pc["recall@1"] for c, pc in per_class.items()}
                    if v == "original":
                        run.setdefault("class_counts", {int(c): pc["count"] for c, pc in per_class.items()})
                    if (
                        key == "metrics"
                        and spec["loss"] == grid_loss
                        and spec["mode"] in ("none", "hard")
                        and v == config.report_variant
                    ):
                        grid_embeddings[spec["mode"]] = {"query": emb, "gallery": emb if gallery is None else gallery}
            if "metrics_raw" not in run:
                run["metrics_raw"] = run["metrics"]
                per_class_all["metrics_raw"] = per_class_all["metrics"]
            for key, gap_key in (("metrics", "background_gap"), ("metrics_raw", "background_gap_raw")):
                m = run[key]
                run[gap_key] = (
                    m["mixed_same"]["recall@1"] - m["mixed_rand"]["recall@1"]
                    if "mixed_same" in m and "mixed_rand" in m
                    else None
                )
            orig = per_class_all["metrics"]["original"]
            worst = min(orig, key=lambda c: (orig[c], c))
            run["worst_class"] = {"label": worst, "name": test.class_names[worst], "recall@1": orig[worst]}
            run["per_class_recall@1"] = {
                key: {v: {str(c): r for c, r in pcs.items()} for v, pcs in per_v.items()}
                for key, per_v in per_class_all.items()
            }
            run["class_counts"] = {str(c): n for c, n in run["class_counts"].items()}
            run["train_seconds"] = t_eval - t_train
            run["eval_seconds"] = time.perf_counter() - t_eval
            result.runs.append(run)
            result.timings["total"] = time.perf_counter() - t0
            if config.out_dir is not None:
                result.save_json(config.out_dir)
            del model
        outer.close()
    except KeyboardInterrupt:
        result.interrupted = True
        result.timings["total"] = time.perf_counter() - t0
        if config.out_dir is not None:
            result.save_json(config.out_dir)
        raise
    result.timings["total"] = time.perf_counter() - t0
    result.grid = _grid_data(config, data, grid_embeddings)
    return result


def _grid_data(
    config: StudyConfig, data: _Data, embeddings: dict[str, dict[str, torch.Tensor]]
) -> dict[str, Any] | None:
    """Queries and their top-5 neighbours for the no-mask and hard-mask models (first loss), for the figure."""
    if not embeddings:
        return None
    from dml_bias.metrics import knn

    variant = data.variant(config.report_variant)
    gallery_split = variant if config.swap == "both" else data.variant("original")
    labels = data.test.labels
    # One query per class from the first classes (deterministic), at most 6.
    classes = torch.unique(labels)[:6]
    queries = torch.stack([torch.nonzero(labels == c).flatten()[0] for c in classes])
    grid: dict[str, Any] = {
        "variant": config.report_variant,
        "loss": config.losses[0],
        "query_images": variant.images[queries],
        "query_masks": variant.masks[queries],
        "query_labels": labels[queries],
        "models": {},
    }
    for mode, emb in embeddings.items():
        k = min(5, labels.numel() - 1)
        # k + 1 neighbours, then each query's own item (same index) is left out.
        _, idx_all = knn(emb["query"][queries], emb["gallery"], k=k + 1, exclude_self=False)
        rows = []
        for qi, q in enumerate(queries.tolist()):
            row = [int(j) for j in idx_all[qi].tolist() if int(j) != q][:k]
            rows.append(row)
        neighbours = torch.tensor(rows, dtype=torch.long)
        grid["models"][mode] = {
            "neighbour_images": gallery_split.images[neighbours],
            "neighbour_masks": gallery_split.masks[neighbours],
            "neighbour_labels": labels[neighbours],
        }
    return grid
