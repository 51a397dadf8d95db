"""The study's data: the train split, the test split held in memory and its background variants.

The second step of the study's data path (config → **data** → train → evaluate → report → figures). Internal to
the study: the names here have no underscore because :mod:`~dml_bias.bias.training` and
:mod:`~dml_bias.bias.evaluation` use them, but they are not part of the public API (``__all__`` is empty).
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dml_bias.bias.config import VARIANTS, StudyConfig, StudyError

__all__: list[str] = []

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.25, 0.25, 0.25)


@dataclass
class Split:
    """A split held in memory at the model's input size: uint8 images/masks and labels."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    masks: torch.Tensor  # (N, 1, H, W) uint8, 255 = object
    labels: torch.Tensor  # (N,) long
    class_names: list[str]


class MemoryDataset(torch.utils.data.Dataset):
    """Samples (the interface's dict structure) from tensors in memory, with an optional v2 transform."""

    def __init__(self, split: Split, transform: Callable[[Any], Any] | None = None) -> None:
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


def collate(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack sample dicts into plain ``(images, masks, labels)`` tensors (the DataLoader's ``collate_fn``)."""
    images = torch.stack([torch.as_tensor(s["image"]) for s in samples])
    masks = torch.stack([torch.as_tensor(s["mask"]) for s in samples])
    labels = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    return images.as_subclass(torch.Tensor), masks.as_subclass(torch.Tensor), labels


def materialize(dataset: Any, desc: str, progress: bool) -> Split:
    """Read every sample of ``dataset`` (already resized to a common size) into a :class:`Split`."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False, collate_fn=collate)
    parts = [b for b in tqdm(loader, desc=desc, leave=False, disable=not progress, file=sys.stderr)]
    images = torch.cat([p[0] for p in parts])
    masks = torch.cat([p[1] for p in parts])
    labels = torch.cat([p[2] for p in parts])
    if masks.dtype != torch.uint8:
        scale = 255.0 if masks.dtype == torch.bool or masks.max() <= 1 else 1.0
        masks = (masks.float() * scale).round().to(torch.uint8)
    return Split(images.to(torch.uint8), masks, labels, list(dataset.class_names))


def render(dataset: Any) -> Split:
    """All samples of a :class:`~dml_bias.datasets.SyntheticBackgrounds` (vectorised ``render_all``)."""
    images, masks = dataset.render_all()
    return Split(images, masks, dataset.labels.clone(), list(dataset.class_names))


class StudyData:
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
        self.train: Split | None = render(self.train_dataset)
        self.test = render(self.test_dataset)
        self.mean, self.std = SYNTHETIC_MEAN, SYNTHETIC_STD
        homes = getattr(self.test_dataset, "home_backgrounds", None)
        if isinstance(homes, torch.Tensor):
            self.home_backgrounds = homes.long()
            self.background_distinctiveness = distinctiveness(homes.long())
        self._variant_cache: dict[str, Split] = {"original": self.test}

    def _synthetic_variant(self, name: str) -> Split:
        if name not in self._variant_cache:
            ds = self.test_dataset.with_variant(name, seed=self.config.seed)
            self._variant_cache[name] = render(ds)
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
        self.test = materialize(test_dataset, "load CUB test", c.progress)
        self.train = None
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def _real_variant(self, name: str) -> Split:
        """A variant of the real test set, built with :func:`~dml_bias.transforms.functional.make_variant`.

        Donors follow the ImageNet-9 class rules (:func:`~dml_bias.transforms.functional.choose_donor`, seeded
        by ``config.seed``); the donor's object box is tiled over with its own background (``fill="tile"``).
        """
        from dml_bias.transforms.functional import make_variant

        test = self.test
        if name == "original":
            return test
        donors = variant_donors(name, test.labels, self.config.seed) if name.startswith("mixed_") else None
        images = torch.empty_like(test.images)
        for i in range(test.labels.numel()):
            donor = None
            if donors is not None:
                d = int(donors[i])
                donor = (test.images[d], test.masks[d])
            images[i] = make_variant(name, test.images[i], test.masks[i], donor, fill="tile")[0]
        return Split(images, test.masks, test.labels, test.class_names)

    def variant(self, name: str) -> Split:
        """The test split rendered as variant ``name`` (masks stay the object's masks)."""
        if self.config.dataset == "synthetic":
            return self._synthetic_variant(name)
        return self._real_variant(name)

    # -- training batches ------------------------------------------------------------------------------
    def train_loader(self, mode: str, batch_size: int, m: int, seed: int) -> torch.utils.data.DataLoader:
        """Training batches ``(images uint8, masks uint8, labels)`` from :class:`MPerClassBatchSampler`."""
        from torchvision.transforms import v2

        from dml_bias.datasets import MPerClassBatchSampler
        from dml_bias.transforms import BackgroundSwap

        c = self.config
        steps: list[Any] = []
        if c.dataset == "cub":
            crop = v2.RandomResizedCrop(c.resolved_image_size(), scale=(0.16, 1.0), antialias=True)
            steps += [crop, v2.RandomHorizontalFlip()]
            donors: Any = self.donor_dataset
        else:
            steps += [v2.RandomHorizontalFlip()]
            donors = MemoryDataset(self.train) if self.train is not None else None
        if mode == "bg_augment":
            steps.append(BackgroundSwap(donors, variant="mixed_rand", fill="tile", p=1.0, seed=seed))
        transform = v2.Compose(steps)
        if c.dataset == "cub":
            # A shallow copy carries the training transform, so the data set object itself keeps its own.
            dataset: Any = copy.copy(self.train_dataset)
            dataset.transform = transform
            labels = torch.as_tensor(dataset.labels)
        else:
            dataset = MemoryDataset(self.train, transform) if self.train is not None else None
            labels = self.train.labels if self.train is not None else torch.empty(0, dtype=torch.long)
        sampler = MPerClassBatchSampler(labels, m, batch_size, generator=torch.Generator().manual_seed(seed))
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=c.num_workers,
            persistent_workers=c.num_workers > 0,
        )

    @property
    def num_train_classes(self) -> int:
        """Classes of the training split."""
        return int(self.train_dataset.num_classes)

    @property
    def num_train_images(self) -> int:
        """Images of the training split (one epoch)."""
        return int(self.train.labels.numel()) if self.train is not None else len(self.train_dataset)

    @property
    def input_size(self) -> int:
        """Side of the model's input images."""
        return int(self.test.images.shape[-1])


def variant_donors(name: str, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """The donor of every image for the mixed variant ``name`` of real data: ``(N,)`` long indices into ``labels``.

    Drawn in image order with :func:`~dml_bias.transforms.functional.choose_donor` from a generator seeded with
    ``seed * 1000 + VARIANTS.index(name)``: the study's test variants and the audit's use the same donors.
    """
    from dml_bias.transforms.functional import choose_donor

    gen = torch.Generator().manual_seed(seed * 1000 + VARIANTS.index(name))
    return torch.tensor([choose_donor(name, labels, i, generator=gen) for i in range(labels.numel())], dtype=torch.long)


def distinctiveness(homes: torch.Tensor) -> torch.Tensor:
    """Per class: ``1 / (number of classes sharing its home background)`` — 1.0 for a background of its own."""
    counts = torch.bincount(homes, minlength=int(homes.max()) + 1).to(torch.float64)
    return 1.0 / counts[homes]


def model_input(
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
