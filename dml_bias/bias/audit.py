r"""The background-bias audit of any trained embedding model, on the user's images and masks.

:func:`audit` measures how much of a model's retrieval comes from backgrounds, without retraining: Recall@1 and
MAP@R on the original images and on the ImageNet-9 background variants built on the fly (``only_fg``,
``only_bg_t``, ``no_fg``, ``mixed_same``, ``mixed_rand``, ``mixed_next``), the BG-gap
(Recall@1 of ``mixed_same`` − ``mixed_rand``), background-alone retrieval against chance, the background
sensitivity of every image (:func:`~dml_bias.bias.background_sensitivity`) and the foreground energy of the
similarity attribution (:func:`~dml_bias.bias.similarity_attribution`, :func:`~dml_bias.bias.foreground_energy`)
on a subset; every figure with a 95 % bootstrap interval over the queries, per class too, and a verdict in plain
words. :class:`AuditResult` prints the table and writes ``results.json``, ``per_class.csv``, ``report.md``,
figures and a self-contained ``report.html``. The command line ``dml-bias audit`` does the same.

The audit composes the study's parts: the variants use the study's donors
(:func:`~dml_bias.transforms.functional.choose_donor`, seeded as the study seeds them) and are made in batches on
the device; the metrics are the study's (:func:`~dml_bias.metrics.retrieval_metrics`), so the audit of a model
saved by ``dml-bias study --save-models`` reproduces the study's numbers for that model exactly.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dml_bias._checks import check_choice, check_number, describe
from dml_bias.bias._audit_report import AuditResult
from dml_bias.bias._model_spec import AuditError, ExportedModule
from dml_bias.bias._modes import eval_mode
from dml_bias.bias.analysis import audit_class_rows, bootstrap_ci, bootstrap_indices, finite_ci
from dml_bias.bias.config import VARIANTS
from dml_bias.bias.data import IMAGENET_MEAN, IMAGENET_STD, model_input, variant_donors

__all__ = ["MASK_INPUTS", "AuditError", "AuditResult", "audit"]

#: How the model takes the mask: not at all, background set to 0, background scaled by σ, or a 4th channel.
MASK_INPUTS: tuple[str, ...] = ("none", "hard", "soft", "channel")
_MIXED = ("mixed_same", "mixed_rand", "mixed_next")
_SHOWN_QUERIES = 4
_SHOWN_MAPS = 6


# ------------------------------------------------------------------------------------------- samples, batches


class _Prepared(torch.utils.data.Dataset):
    """Samples of the user's dataset as uint8 ``(3, S, S)`` images and ``(1, S, S)`` masks, with donors."""

    def __init__(
        self,
        dataset: Any,
        image_size: int | None,
        resize: int | None,
        need_masks: bool,
        donors: torch.Tensor | None = None,
    ) -> None:
        self.dataset = dataset
        self.image_size = image_size
        self.resize = resize
        self.need_masks = need_masks
        self.donors = donors

    def __len__(self) -> int:
        return len(self.dataset)

    def _where(self, i: int) -> str:
        paths = getattr(self.dataset, "paths", None)
        if isinstance(paths, list) and i < len(paths):
            return f"sample {i} ({paths[i]})"
        return f"sample {i}"

    def one(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        sample = self.dataset[i]
        if not isinstance(sample, dict) or "image" not in sample or "label" not in sample:
            raise AuditError(
                f"dataset {self._where(i)} must be a dict with 'image', 'mask' and 'label', got {describe(sample)}"
            )
        image = sample["image"]
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise AuditError(
                f"dataset {self._where(i)}: 'image' must be a (3, H, W) uint8 tensor, got {describe(image)}"
            )
        mask = sample.get("mask")
        if self.need_masks:
            if mask is None:
                raise AuditError(f"dataset {self._where(i)} has no 'mask'; give masks_from (--masks-from) instead")
            mask = _mask_to_uint8(mask, image.shape[-2:], self._where(i))
        else:
            mask = None
        image, mask = _resize_crop(image, mask, self.image_size, self.resize)
        return image, mask, int(sample["label"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, mask, label = self.one(i)
        out: dict[str, Any] = {"image": image, "mask": mask, "label": label, "index": i, "donors": []}
        if self.donors is not None:
            for d in self.donors[i].tolist():
                d_image, d_mask, _ = self.one(int(d))
                out["donors"].append((d_image, d_mask))
        return out


def _resize_crop(
    image: torch.Tensor, mask: torch.Tensor | None, image_size: int | None, resize: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize the shorter side to ``resize`` (default ``image_size``; antialiased, masks nearest) and centre-crop.

    Images already ``image_size`` square with no larger ``resize`` are left as they are; works on one image or a batch.
    """
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as TF

    if image_size is not None:
        side = resize or image_size
        if tuple(image.shape[-2:]) != (image_size, image_size) or side != image_size:
            image = TF.center_crop(TF.resize(tv_tensors.Image(image), [side], antialias=True), [image_size])
            if mask is not None:
                mask = TF.center_crop(TF.resize(tv_tensors.Mask(mask), [side]), [image_size])
    image = torch.as_tensor(image).as_subclass(torch.Tensor)
    if mask is not None:
        mask = torch.as_tensor(mask).as_subclass(torch.Tensor)
    return image, mask


def _mask_to_uint8(mask: Any, size: Any, where: str) -> torch.Tensor:
    """A ``(1, H, W)`` uint8 mask, 255 = object (bool, {0, 1}, grey levels, or floats in [0, 1])."""
    if not isinstance(mask, torch.Tensor):
        raise AuditError(f"dataset {where}: 'mask' must be a tensor, got {describe(mask)}")
    m = mask.as_subclass(torch.Tensor)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[0] != 1:
        raise AuditError(f"dataset {where}: 'mask' must have shape (H, W) or (1, H, W), got {describe(mask)}")
    if tuple(m.shape[-2:]) != tuple(size):
        raise AuditError(
            f"dataset {where}: the mask has size {tuple(m.shape[-2:])} but the image {tuple(size)}; "
            "a mask must have its image's size"
        )
    if m.dtype == torch.bool:
        return m.to(torch.uint8) * 255
    if m.is_floating_point():
        if m.numel() and not (float(m.min()) >= 0 and float(m.max()) <= 1):
            raise AuditError(f"dataset {where}: a floating-point mask must lie in [0, 1], got {describe(mask)}")
        return (m.float() * 255).round().to(torch.uint8)
    lo, hi = (int(m.min()), int(m.max())) if m.numel() else (0, 0)
    if lo < 0 or hi > 255:
        raise AuditError(f"dataset {where}: an integer mask must lie in 0..255 (255 = object), got {lo}..{hi}")
    m = m.to(torch.uint8)
    return m * 255 if hi <= 1 else m


def _rendered_batches(
    dataset: Any,
    donors: torch.Tensor | None,
    batch_size: int,
    indices: list[int] | None,
    image_size: int | None,
    resize: int | None,
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]],
    key: str | None,
) -> Iterator[dict[str, Any]]:
    """Batches of a dataset that renders itself at once (``render_all``, vectorised: the synthetic data).

    The rendered variant (small images) is held while its batches are made; batches are as :func:`_collate` makes.
    The ``original`` and ``mixed_rand`` renders, used again by the attribution and the examples, stay in ``cache``.
    """
    if key is not None and key in cache:
        images, masks = cache[key]
    else:
        images, masks = dataset.render_all()
        if key in ("original", "mixed_rand"):
            cache[key] = (images, masks)
    labels = torch.as_tensor(dataset.labels).long()
    order = torch.arange(labels.numel()) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    for start in range(0, order.numel(), batch_size):
        sel = order[start : start + batch_size]
        image, mask = _resize_crop(images[sel], masks[sel], image_size, resize)
        pairs = []
        if donors is not None:
            for k in range(donors.shape[1]):
                pairs.append(_resize_crop(images[donors[sel, k]], masks[donors[sel, k]], image_size, resize))
        yield {"images": image, "masks": mask, "labels": labels[sel], "index": sel, "donors": pairs}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    images = torch.stack([s["image"] for s in samples])
    masks = torch.stack([s["mask"] for s in samples]) if samples[0]["mask"] is not None else None
    donors = []
    for k in range(len(samples[0]["donors"])):
        d_images = torch.stack([s["donors"][k][0] for s in samples])
        d_masks = torch.stack([s["donors"][k][1] for s in samples]) if samples[0]["donors"][k][1] is not None else None
        donors.append((d_images, d_masks))
    labels = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    index = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    return {"images": images, "masks": masks, "labels": labels, "index": index, "donors": donors}


def _predicted_masks(masks_from: Callable[[torch.Tensor], Any], images: torch.Tensor) -> torch.Tensor:
    """``masks_from(images)`` (object probabilities ``(N, H, W)`` in [0, 1]) as ``(N, 1, H, W)`` uint8 masks."""
    n, _, h, w = images.shape
    with torch.no_grad():
        out = masks_from(images)
    if not isinstance(out, torch.Tensor):
        raise AuditError(f"masks_from must return an (N, H, W) tensor of object probabilities, got {describe(out)}")
    if out.ndim == 4 and out.shape[1] == 1:
        out = out[:, 0]
    if tuple(out.shape) != (n, h, w):
        raise AuditError(f"masks_from must return shape ({n}, {h}, {w}) for a batch of {n} images, got {describe(out)}")
    out = out.detach().as_subclass(torch.Tensor)
    if out.dtype == torch.bool:
        return out[:, None].to(torch.uint8) * 255
    out = out.float()
    if not bool(((out >= 0) & (out <= 1)).all()):
        raise AuditError(f"masks_from must return object probabilities in [0, 1], got {describe(out)}")
    return (out[:, None] * 255).round().to(torch.uint8).to(images.device)


# --------------------------------------------------------------------------------------------------- numbers


def _per_query(emb: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per query (self excluded): Recall@1 (0/1) and MAP@R, float64 ``(N,)``."""
    from dml_bias.metrics import knn

    counts = torch.bincount(labels)
    r = (counts[labels] - 1).to(torch.float64)
    k = int(counts.max()) - 1
    _, nbr = knn(emb, k=k)
    rel = (labels[nbr] == labels[:, None]).to(torch.float64)
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    within = ranks[None, :] <= r[:, None]
    precision = rel.cumsum(dim=1) / ranks
    map_r = (precision * rel * within).sum(dim=1) / r
    return {"recall@1": rel[:, 0].clone(), "map@r": map_r}


# ----------------------------------------------------------------------------------------------------- audit


def _check_args(
    model: Any,
    dataset: Any,
    image_size: Any,
    resize: Any,
    mean: Any,
    std: Any,
    mask_input: Any,
    sigma: Any,
    layer: Any,
    masks_from: Any,
    bootstrap: Any,
    attribution_images: Any,
    seed: Any,
    batch_size: Any,
    num_workers: Any,
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module mapping images to (N, D) embeddings, got {describe(model)}")
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(
            f"dataset must be a map-style dataset yielding {{'image', 'mask', 'label'}}, got {describe(dataset)}"
        )
    if image_size is not None:
        check_number(image_size, "image_size", low=8, integer=True)
    if resize is not None:
        check_number(resize, "resize", low=8, integer=True)
        if image_size is None or resize < image_size:
            raise ValueError(f"resize must be at least image_size (and needs image_size), got resize={resize}")
    for name, values in (("mean", mean), ("std", std)):
        if not (isinstance(values, Sequence) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)):
            raise ValueError(f"{name} must be three numbers (R, G, B), got {values!r}")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name} must be three finite numbers, got {values!r}")
    if not all(v > 0 for v in std):
        raise ValueError(f"std must be three positive numbers, got {std!r}")
    check_choice(mask_input, "mask_input", MASK_INPUTS)
    check_number(sigma, "sigma", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"layer must be a sub-module name, 'input' or None, got {describe(layer)}")
    if masks_from is not None and not callable(masks_from):
        raise TypeError(
            f"masks_from must be a callable images -> (N, H, W) probabilities or None, got {describe(masks_from)}"
        )
    check_number(bootstrap, "bootstrap", low=1, integer=True)
    check_number(attribution_images, "attribution_images", low=0, integer=True)
    check_number(seed, "seed", low=0, high=2**32 - 1, integer=True)  # donors are drawn from seed * 1000 + k
    check_number(batch_size, "batch_size", low=1, integer=True)
    check_number(num_workers, "num_workers", low=0, integer=True)


def _labels_of(dataset: Any) -> torch.Tensor:
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor) and labels.ndim == 1 and labels.numel() == len(dataset):
        return labels.long().clone()
    return torch.tensor([int(dataset[i]["label"]) for i in range(len(dataset))], dtype=torch.long)


def audit(
    model: nn.Module,
    dataset: Any,
    *,
    image_size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    mask_input: str = "none",
    sigma: float = 0.5,
    layer: str | None = None,
    masks_from: Callable[[torch.Tensor], torch.Tensor] | None = None,
    bootstrap: int = 1000,
    attribution_images: int = 4,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    model_name: str | None = None,
    data_name: str | None = None,
) -> AuditResult:
    r"""Audit a trained embedding model for background reliance on a dataset of images with object masks.

    The images stream through a :class:`~torch.utils.data.DataLoader` in batches (memory: ``batch_size`` images
    and their donors, plus ``N × D`` embeddings per variant). For each batch the seven variants of
    :data:`~dml_bias.bias.VARIANTS` are made on ``device`` (the mixed ones from donors drawn as the study draws
    them: :func:`~dml_bias.transforms.functional.choose_donor` with a generator seeded by
    ``seed · 1000 + VARIANTS.index(name)``; a dataset with a ``with_variant(name, seed)`` method, such as
    :class:`~dml_bias.datasets.SyntheticBackgrounds`, renders its own exact variants instead) and embedded; the
    background sensitivity of every image uses its ``mixed_rand`` donor. Retrieval is leave-one-out within each
    variant (queries and gallery both show it, as the study's ``swap="both"``), with the study's metrics.
    Foreground energy: for the first ``attribution_images`` images of every class, the attribution map of its
    similarity to its nearest original neighbour, scored against its mask (object where above half).

    Intervals: 95 % percentile bootstrap over the queries (``bootstrap`` resamples, seeded by ``seed``; one set
    of resamples for every retrieval figure, so differences such as the BG-gap are paired); the background
    sensitivity and the foreground energy are resampled among the images where they are defined (seeds
    ``seed + 1`` and ``seed + 2``), and the count of the others is reported.

    Args:
        model: Maps ``(N, C, H, W)`` float inputs to ``(N, D)`` embeddings, on ``device`` (it is not moved). It
            runs in eval mode; every sub-module's training flag is restored afterwards.
        dataset: A map-style dataset of dicts ``{"image": (3, H, W) uint8, "mask": (1, H, W) or (H, W) (bool,
            0/1, 0–255 with 255 = object, or floats in [0, 1]), "label": int}``, at least two images per class
            (e.g. :class:`~dml_bias.datasets.MaskedFolder`, :class:`~dml_bias.datasets.CUB200` with
            ``masks=True``, :class:`~dml_bias.datasets.SyntheticBackgrounds`).
        image_size: Resize (shorter side to ``resize``) and centre-crop every image and mask to this side;
            ``None``: the images are used as they are (they must then all have one size).
        resize: The shorter side before the crop; ``None``: ``image_size``.
        mean: Per-channel mean of the input normalisation.
        std: Per-channel standard deviation of the input normalisation.
        mask_input: How the model takes the mask (:data:`MASK_INPUTS`): ``"none"``, ``"hard"`` (background set
            to 0), ``"soft"`` (background scaled by ``sigma``) or ``"channel"`` (a 4th input channel), as the
            study's mask modes.
        sigma: The background factor of ``mask_input="soft"``, in ``(0, 1)``.
        layer: The sub-module whose output the attribution explains; ``"input"``: the input pixels; ``None``: the
            last module with a 4-D output found by a dry run, or the input for models that cannot be hooked
            (TorchScript, ``torch.export``).
        masks_from: Instead of the dataset's masks: a callable mapping a batch of uint8 images ``(N, 3, S, S)``
            (on ``device``, as the model sees them) to ``(N, S, S)`` object probabilities in ``[0, 1]``.
        bootstrap: Bootstrap resamples (``>= 1``).
        attribution_images: Images per class explained by the attribution (``0``: no foreground energy).
        seed: Seed of the donors and of the bootstrap.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes.
        device: Where the model runs and the variants are made.
        progress: Show a progress bar per stage (on stderr).
        model_name: The model's name in the report; ``None``: its class name.
        data_name: The data's name in the report; ``None``: the dataset's class name.

    Returns:
        An :class:`AuditResult`.

    Raises:
        TypeError: A wrong type of argument (named in the message).
        ValueError: A bad value (named in the message).
        AuditError: Unusable data: a class with one image, a mask of another size, an image that is not a uint8
            tensor, a layer without a 4-D output, …

    Example:
        >>> from dml_bias.bias import SmallCNN, audit
        >>> from dml_bias.datasets import SyntheticBackgrounds
        >>> data = SyntheticBackgrounds("test", num_classes=3, images_per_class=4, image_size=16)
        >>> model = SmallCNN(embedding_size=8, width=4)
        >>> result = audit(model, data, bootstrap=50, attribution_images=1, progress=False)
        >>> sorted(result.variants) == sorted(VARIANTS), result.num_images, result.settings["layer"]
        (True, 12, 'features')
    """
    from dml_bias.bias.evaluation import chance_recall_at_1

    _check_args(
        model, dataset, image_size, resize, mean, std, mask_input, sigma, layer, masks_from, bootstrap,
        attribution_images, seed, batch_size, num_workers,
    )  # fmt: skip
    dev = _device(device)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    labels = _labels_of(dataset)
    counts = _check_classes(dataset, labels)
    n = labels.numel()
    inp = _Inputs.create(
        model, dataset, dev, labels, image_size, resize, mean, std, mask_input, sigma, masks_from, seed,
        batch_size, num_workers, progress,
    )  # fmt: skip
    embedded = _embed_variants(inp)
    timings["variants_and_sensitivity"] = time.perf_counter() - t0
    if embedded.empty_masks:
        warnings.warn(
            f"{embedded.empty_masks} of {n} images have an all-background mask (no object pixel): their object-only "
            "variants are black and their background swaps change nothing",
            UserWarning,
            stacklevel=2,
        )
    t1 = time.perf_counter()
    emb = {v: torch.cat(parts) for v, parts in embedded.embeddings.items()}
    retrieval = _retrieval_numbers(emb, labels, bootstrap, seed)
    sens = {k: torch.cat(v) for k, v in embedded.shifts.items()}
    sensitivity = _sensitivity_numbers(sens, bootstrap, seed, n)
    timings["metrics"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    layer_used, energy, energy_values, energy_labels, overlays = _attribution_step(
        inp, emb["original"], attribution_images, layer, embedded.size_seen, bootstrap
    )
    timings["attribution"] = time.perf_counter() - t2
    per_class = audit_class_rows(
        labels, _class_names(dataset, labels), retrieval["per_class_recall@1"], sens["score"], energy_values,
        energy_labels,
    )  # fmt: skip
    examples = _neighbour_changes(emb["original"], emb["mixed_rand"], labels)
    example_images = None if examples is None else _example_images(examples, inp)
    timings["total"] = time.perf_counter() - t0
    return AuditResult(
        model=model_name or type(model).__name__,
        data=data_name or type(dataset).__name__,
        num_images=n,
        num_classes=int((counts > 0).sum()),
        variants=retrieval["variants"],
        bg_gap=retrieval["bg_gap"],
        background_drop=retrieval["drop"],
        chance_recall_at_1=chance_recall_at_1(labels),
        background_sensitivity=sensitivity,
        foreground_energy=energy,
        per_class=per_class,
        settings=inp.settings(layer_used, bootstrap, attribution_images, embedded),
        timings=timings,
        per_query=retrieval["per_query"],
        examples=example_images,
        overlays=overlays,
    )


# ------------------------------------------------------------------------------------------------ audit steps


def _device(device: str | torch.device) -> torch.device:
    """The device argument as a :class:`torch.device` (``ValueError`` if it is none, ``AuditError`` without CUDA)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AuditError(f"device {str(dev)!r} was asked for but CUDA is not available")
    return dev


def _check_classes(dataset: Any, labels: torch.Tensor) -> torch.Tensor:
    """Images per label; ``AuditError`` unless there are two images or more of every class and two classes."""
    n = labels.numel()
    if n < 2:
        raise AuditError(f"the dataset must hold at least two images, got {n}")
    counts = torch.bincount(labels)
    lonely = [int(c) for c in torch.nonzero((counts > 0) & (counts < 2)).flatten().tolist()]
    if lonely:
        names = _class_names(dataset, labels)
        raise AuditError(
            f"class {names[lonely[0]]!r} has a single image; every class needs at least two (a query needs another "
            f"image of its class); {len(lonely)} such class(es)"
        )
    if int((counts > 0).sum()) < 2:
        raise AuditError("the dataset must hold at least two classes")
    return counts


@dataclass
class _Inputs:
    """The audit's validated inputs and what every step shares: how batches are loaded, masked and fed."""

    model: nn.Module
    dataset: Any
    dev: torch.device
    labels: torch.Tensor
    image_size: int | None
    resize: int | None
    mean: Sequence[float]
    std: Sequence[float]
    mask_input: str
    mode_sigma: float | None
    masks_from: Callable[[torch.Tensor], Any] | None
    seed: int
    batch_size: int
    num_workers: int
    progress: bool
    exact: bool
    donors: torch.Tensor
    donor_names: list[str]
    rendered: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        model: nn.Module,
        dataset: Any,
        dev: torch.device,
        labels: torch.Tensor,
        image_size: int | None,
        resize: int | None,
        mean: Sequence[float],
        std: Sequence[float],
        mask_input: str,
        sigma: float,
        masks_from: Callable[[torch.Tensor], Any] | None,
        seed: int,
        batch_size: int,
        num_workers: int,
        progress: bool,
    ) -> _Inputs:
        """The inputs with the donors of the mixed variants (the dataset's own, for exact variants)."""
        exact = callable(getattr(dataset, "with_variant", None)) and masks_from is None
        if exact:
            rand = dataset.with_variant("mixed_rand", seed=seed)
            donor_table = {"mixed_rand": torch.as_tensor(rand.donor_indices).long()}
        else:
            donor_table = {v: variant_donors(v, labels, seed) for v in _MIXED}
        donor_names = ["mixed_rand"] if exact else list(_MIXED)
        donors = torch.stack([donor_table[v] for v in donor_names], dim=1)
        mode_sigma = sigma if mask_input == "soft" else None
        return cls(
            model, dataset, dev, labels, image_size, resize, mean, std, mask_input, mode_sigma, masks_from, seed,
            batch_size, num_workers, progress, exact, donors, donor_names,
        )  # fmt: skip

    def settings(
        self, layer: str | None, bootstrap: int, attribution_images: int, embedded: _Embedded
    ) -> dict[str, Any]:
        """The ``settings`` entry of the result: what the audit used."""
        size = self.image_size
        return {
            "image_size": size if size is not None else (list(embedded.size_seen) if embedded.size_seen else None),
            "resize": self.resize,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "mask_input": self.mask_input,
            "sigma": self.mode_sigma,
            "mask_source": "masks_from" if self.masks_from is not None else "dataset",
            "layer": layer,
            "variants_from": "dataset (exact)" if self.exact else "composited on the fly",
            "bootstrap": bootstrap,
            "attribution_images": attribution_images,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "device": str(self.dev),
            "empty_masks": embedded.empty_masks,
        }

    def model_in(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """uint8 images and masks → the model's input on the device."""
        return model_input(
            images.to(self.dev), masks.to(self.dev), self.mask_input, self.mode_sigma, self.mean, self.std
        )

    def loader(
        self,
        ds: Any,
        don: torch.Tensor | None,
        bs: int | None = None,
        indices: list[int] | None = None,
        key: str = "original",
    ) -> Any:
        """Batches of ``ds`` (with the donors ``don``), rendered at once where the dataset can."""
        bs = self.batch_size if bs is None else bs
        if self.exact and callable(getattr(ds, "render_all", None)):
            return _rendered_batches(ds, don, bs, indices, self.image_size, self.resize, self.rendered, key)
        prepared: Any = _Prepared(ds, self.image_size, self.resize, self.masks_from is None, don)
        if indices is not None:
            prepared = torch.utils.data.Subset(prepared, indices)
        return torch.utils.data.DataLoader(
            prepared, batch_size=bs, shuffle=False, num_workers=self.num_workers, collate_fn=_collate
        )

    def masks_of(self, batch: dict[str, Any]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The batch's masks and its donor (image, mask) pairs on the device, predicted if ``masks_from`` is set."""
        images = batch["images"].to(self.dev)
        if self.masks_from is not None:
            masks = _predicted_masks(self.masks_from, images)
            pairs = [(di.to(self.dev), _predicted_masks(self.masks_from, di.to(self.dev))) for di, _ in batch["donors"]]
        else:
            masks = batch["masks"].to(self.dev)
            pairs = [(di.to(self.dev), dm.to(self.dev)) for di, dm in batch["donors"]]
        return masks, pairs


@dataclass
class _Embedded:
    """The embeddings of every variant (per batch), the background-sensitivity shifts and what was seen."""

    embeddings: dict[str, list[torch.Tensor]]
    shifts: dict[str, list[torch.Tensor]]
    empty_masks: int = 0
    size_seen: tuple[int, ...] | None = None


def _attribution_step(
    inp: _Inputs,
    original: torch.Tensor,
    attribution_images: int,
    layer: str | None,
    size_seen: tuple[int, ...] | None,
    bootstrap: int,
) -> tuple[str | None, dict[str, Any], torch.Tensor, torch.Tensor, dict[str, Any] | None]:
    """The layer explained, the foreground-energy summary, the per-image energies and labels, and the overlays."""
    layer_used = None
    energy_values = torch.empty(0, dtype=torch.float64)
    energy_chance = torch.empty(0, dtype=torch.float64)
    energy_labels = torch.empty(0, dtype=torch.long)
    overlays: dict[str, Any] | None = None
    if attribution_images > 0:
        layer_used = _resolve_layer(inp.model, layer, inp.mask_input, size_seen, inp.dev)
        energy_values, energy_chance, energy_labels, overlays = _attribution(
            inp, original, attribution_images, layer_used
        )
    energy = _energy_numbers(energy_values, energy_chance, bootstrap, inp.seed)
    return layer_used, energy, energy_values, energy_labels, overlays


def _embed_variants(inp: _Inputs) -> _Embedded:
    """Embed every variant of every image and measure its background sensitivity, batch by batch."""
    from tqdm.auto import tqdm

    out = _Embedded({v: [] for v in VARIANTS}, {"background": [], "object": [], "score": []})
    n = inp.labels.numel()
    with eval_mode(inp.model), torch.no_grad():
        bar = tqdm(total=n, desc="audit: variants", disable=not inp.progress, file=sys.stderr, leave=False)
        for batch in inp.loader(inp.dataset, inp.donors):
            _embed_batch(inp, batch, out)
            bar.update(batch["images"].shape[0])
        bar.close()
        if inp.exact:
            for v in VARIANTS[1:]:
                bar = tqdm(total=n, desc=f"audit: {v}", disable=not inp.progress, file=sys.stderr, leave=False)
                for batch in inp.loader(inp.dataset.with_variant(v, seed=inp.seed), None, key=v):
                    masks, _ = inp.masks_of(batch)
                    out.embeddings[v].append(_embed(inp.model, inp.model_in(batch["images"].to(inp.dev), masks)))
                    bar.update(batch["images"].shape[0])
                bar.close()
    return out


def _embed_batch(inp: _Inputs, batch: dict[str, Any], out: _Embedded) -> None:
    """One batch of :func:`_embed_variants`: its variants (all but the exact ones) and its sensitivity."""
    from dml_bias.bias._variants import make_batch_variants
    from dml_bias.bias.attribution import background_sensitivity
    from dml_bias.transforms.functional import foreground_mask

    images = batch["images"].to(inp.dev)
    masks, donor_pairs = inp.masks_of(batch)
    out.size_seen = tuple(images.shape[-2:])
    out.empty_masks += int((~foreground_mask(masks).flatten(1).any(dim=1)).sum())
    if inp.exact:
        made = {"original": images}
    else:
        made = make_batch_variants(VARIANTS, images, masks, dict(zip(inp.donor_names, donor_pairs, strict=True)))
    for v, imgs in made.items():
        out.embeddings[v].append(_embed(inp.model, inp.model_in(imgs, masks)))
    rand_images, rand_masks = donor_pairs[inp.donor_names.index("mixed_rand")]
    s = background_sensitivity(
        inp.model,
        images,
        masks,
        donors=(rand_images, rand_masks),
        input_fn=inp.model_in,
        batch_size=images.shape[0],
        embeddings=out.embeddings["original"][-1],  # the same batch: one forward pass saved
        # its background swap is the mixed_rand variant (same donors, fill and dilation): a second one
        background_embeddings=None if inp.exact else out.embeddings["mixed_rand"][-1],
    )
    for key in out.shifts:
        out.shifts[key].append(getattr(s, key).cpu())


def _retrieval_numbers(emb: dict[str, torch.Tensor], labels: torch.Tensor, bootstrap: int, seed: int) -> dict[str, Any]:
    """Recall@1 and MAP@R per variant with paired bootstrap intervals, the BG-gap, the drop, per class and query."""
    from dml_bias.bias.evaluation import retrieval_summary

    idx = bootstrap_indices(labels.numel(), bootstrap, seed)
    variants: dict[str, dict[str, Any]] = {}
    per_query: dict[str, dict[str, torch.Tensor]] = {}
    per_class_r1: dict[str, dict[int, float]] = {}
    for v in VARIANTS:
        summary, per_class = retrieval_summary(emb[v], labels, None)
        pq = _per_query(emb[v], labels)
        per_query[v] = pq
        per_class_r1[v] = {c: pc["recall@1"] for c, pc in per_class.items()}
        variants[v] = {
            "recall@1": summary["recall@1"],
            "recall@1_ci": bootstrap_ci(pq["recall@1"], idx),
            "map@r": summary["map@r"],
            "map@r_ci": bootstrap_ci(pq["map@r"], idx),
        }
    gap_values = per_query["mixed_same"]["recall@1"] - per_query["mixed_rand"]["recall@1"]
    drop_values = per_query["original"]["recall@1"] - per_query["mixed_rand"]["recall@1"]
    return {
        "variants": variants,
        "per_query": per_query,
        "per_class_recall@1": per_class_r1,
        "bg_gap": {
            "value": variants["mixed_same"]["recall@1"] - variants["mixed_rand"]["recall@1"],
            "ci": bootstrap_ci(gap_values, idx),
        },
        "drop": {
            "value": variants["original"]["recall@1"] - variants["mixed_rand"]["recall@1"],
            "ci": bootstrap_ci(drop_values, idx),
        },
    }


def _sensitivity_numbers(sens: dict[str, torch.Tensor], bootstrap: int, seed: int, n: int) -> dict[str, Any]:
    """Mean background sensitivity with its interval (seed + 1), the mean shifts and the undefined count."""
    s_mean, s_ci, s_count = finite_ci(sens["score"], bootstrap, seed + 1)
    return {
        "mean": s_mean,
        "ci": s_ci,
        "background_shift": float(sens["background"].mean()),
        "object_shift": float(sens["object"].mean()),
        "num_images": s_count,
        "num_undefined": n - s_count,
    }


def _energy_numbers(values: torch.Tensor, chance: torch.Tensor, bootstrap: int, seed: int) -> dict[str, Any]:
    """Mean foreground energy with its interval (seed + 2), its chance level and the count of empty maps."""
    e_mean, e_ci, e_count = finite_ci(values, bootstrap, seed + 2)
    return {
        "mean": e_mean,
        "chance": float(chance.mean()) if chance.numel() else math.nan,
        "ci": e_ci,
        "num_images": int(values.numel()),
        "num_empty": int(values.numel()) - e_count,
    }


def _resolve_layer(
    model: nn.Module, layer: str | None, mask_input: str, size_seen: tuple[int, ...] | None, dev: torch.device
) -> str:
    """The layer the attribution explains: the one asked for (checked), else found by a dry run, else the input."""
    if layer is None:
        if not _hookable(model):
            return "input"
        from dml_bias.bias._model_spec import find_layer

        c = 4 if mask_input == "channel" else 3
        side = size_seen or (16, 16)
        example = torch.zeros(2, c, *side, device=dev)
        with eval_mode(model):
            return find_layer(model, example)
    if layer != "input" and not _hookable(model):
        raise AuditError(
            f"layer {layer!r}: this model (TorchScript or torch.export) cannot be hooked; it is explained at "
            "the input (layer='input')"
        )
    if layer != "input" and layer not in dict(model.named_modules()):
        names = [nm for nm, _ in model.named_modules() if nm][-8:]
        raise AuditError(f"layer {layer!r} is not a sub-module of the model; e.g. {', '.join(names)}")
    return layer


def _class_names(dataset: Any, labels: torch.Tensor) -> list[str]:
    names = getattr(dataset, "class_names", None)
    num = int(labels.max()) + 1
    if isinstance(names, Sequence) and len(names) >= num:
        return [str(x) for x in names]
    return [str(c) for c in range(num)]


def _hookable(model: nn.Module) -> bool:
    if any(isinstance(m, (torch.jit.ScriptModule, ExportedModule)) for m in model.modules()):
        return False
    return type(model).__module__.split(".")[0] != "torch" or not hasattr(model, "graph")


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    try:
        out = model(x)
    except (RuntimeError, AssertionError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AuditError(
            f"the model failed on a batch of inputs of shape {tuple(x.shape)} (check --image-size, --mask-input, "
            f"or export the model with a dynamic batch size): {type(exc).__name__}: {first}"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise AuditError(f"the model must map a batch of {x.shape[0]} inputs to (N, D) embeddings, got {describe(out)}")
    out = out.float().cpu()
    bad = int((~torch.isfinite(out)).any(dim=1).sum())
    if bad:
        raise AuditError(
            f"the model returned NaN or infinite embeddings for {bad} of {x.shape[0]} inputs of shape {tuple(x.shape)}"
        )
    return out


def _attribution(
    inp: _Inputs, original: torch.Tensor, per_class: int, layer: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Foreground energy of the first ``per_class`` images of every class, and the first maps for the figures."""
    from tqdm.auto import tqdm

    from dml_bias.metrics import knn

    labels = inp.labels
    picked = [torch.nonzero(labels == c).flatten()[:per_class] for c in torch.unique(labels)]
    idx = torch.cat(picked).sort().values
    _, nn_idx = knn(original[idx], original, k=2, exclude_self=False)
    neighbours = torch.where(nn_idx[:, 0] == idx, nn_idx[:, 1], nn_idx[:, 0])
    values, chance = [], []
    shown: dict[str, list[Any]] = {"images": [], "masks": [], "maps": [], "labels": [], "energy": []}
    bar = tqdm(
        total=int(idx.numel()), desc="audit: attribution", disable=not inp.progress, file=sys.stderr, leave=False
    )
    start = 0
    with eval_mode(inp.model):
        for batch in inp.loader(inp.dataset, None, bs=32, indices=idx.tolist()):
            b = batch["images"].shape[0]
            energies, energy_chance = _attribution_batch(
                inp, batch, original[neighbours[start : start + b]], layer, shown
            )
            values.append(energies)
            chance.append(energy_chance)
            start += b
            bar.update(b)
    bar.close()
    return torch.cat(values), torch.cat(chance), labels[idx], shown


def _attribution_batch(
    inp: _Inputs, batch: dict[str, Any], neighbours: torch.Tensor, layer: str, shown: dict[str, list[Any]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of :func:`_attribution`: foreground energies and chance levels; the first maps go to ``shown``."""
    from dml_bias.bias.attribution import foreground_energy, similarity_attribution
    from dml_bias.transforms.functional import foreground_mask

    images = batch["images"].to(inp.dev)
    masks, _ = inp.masks_of(batch)
    ref = neighbours.to(inp.dev)
    maps = similarity_attribution(
        inp.model, inp.model_in(images, masks), ref, layer=None if layer == "input" else layer
    ).detach()
    fe = foreground_energy(maps.float(), foreground_mask(masks))
    valid = getattr(fe, "valid", ~torch.isnan(fe.energy))
    energies = torch.where(valid, fe.energy, torch.nan).double().cpu()
    room = _SHOWN_MAPS - len(shown["images"])
    if room > 0:
        seen = images[:room]
        if inp.mask_input in ("hard", "soft"):  # the images as the model sees them
            from dml_bias.transforms.functional import mask_background

            how: Any = inp.mask_input
            sigma = inp.mode_sigma
            seen = mask_background(seen, masks[:room], how, sigma=0.5 if sigma is None else sigma)
        shown["images"].extend(seen.cpu())
        shown["masks"].extend(masks[:room].cpu())
        shown["maps"].extend(maps[:room].float().cpu())
        shown["labels"].extend(batch["labels"][:room].tolist())
        shown["energy"].extend(energies[:room].tolist())
    return energies, fe.chance.double().cpu()


def _neighbour_changes(
    original: torch.Tensor, swapped: torch.Tensor, labels: torch.Tensor, k: int = 5
) -> dict[str, torch.Tensor] | None:
    """The queries whose top-``k`` lose most correct neighbours when backgrounds are swapped (``mixed_rand``)."""
    from dml_bias.metrics import knn

    k = min(k, labels.numel() - 1)
    if k < 1:
        return None
    _, before = knn(original, k=k)
    _, after = knn(swapped, k=k)
    right_before = (labels[before] == labels[:, None]).sum(dim=1)
    right_after = (labels[after] == labels[:, None]).sum(dim=1)
    overlap = (before[:, :, None] == after[:, None, :]).any(dim=2).sum(dim=1)
    score = (right_before - right_after).double() + (k - overlap).double() / (k + 1)
    order = torch.argsort(-score, stable=True)[:_SHOWN_QUERIES]
    return {"queries": order, "before": before[order], "after": after[order], "score": score[order]}


def _example_images(examples: dict[str, torch.Tensor], inp: _Inputs) -> dict[str, Any]:
    """uint8 images of the shown queries and neighbours: originals before, ``mixed_rand`` after."""
    from dml_bias.bias._variants import make_batch_variants

    q = examples["queries"]
    orig_ids = torch.cat([q, examples["before"].flatten()]).tolist()
    swap_ids = torch.cat([q, examples["after"].flatten()]).tolist()

    def fetch(ids: list[int], swapped: bool) -> torch.Tensor:
        if swapped and inp.exact:
            variant = inp.dataset.with_variant("mixed_rand", seed=inp.seed)
            batch = next(iter(inp.loader(variant, None, bs=len(ids), indices=ids, key="mixed_rand")))
            return batch["images"]
        batch = next(iter(inp.loader(inp.dataset, inp.donors if swapped else None, bs=len(ids), indices=ids)))
        if not swapped:
            return batch["images"]
        masks, pairs = inp.masks_of(batch)
        made = make_batch_variants(
            ["mixed_rand"], batch["images"].to(masks.device), masks, dict(zip(inp.donor_names, pairs, strict=True))
        )
        return made["mixed_rand"].cpu()

    return {
        "labels": inp.labels,
        "queries": q,
        "before": examples["before"],
        "after": examples["after"],
        "original_images": fetch(orig_ids, False),
        "swapped_images": fetch(swap_ids, True),
    }


# ----------------------------------------------------------------------------------------------------- result


def open_data(spec: str, sidecar: dict[str, Any] | None, *, with_masks: bool) -> tuple[Any, str]:
    """The dataset of a ``--data`` spec: ``synthetic``, ``cub:ROOT`` or a folder; and its display name.

    ``synthetic`` is the built-in test split: the saved study model's (from its sidecar) or the default study's.
    """
    from dml_bias.datasets import CUB200, MaskedFolder, SyntheticBackgrounds

    if spec == "synthetic":
        params = dict((sidecar or {}).get("synthetic") or {})
        if not params:
            from dml_bias.bias.config import StudyConfig

            cfg = StudyConfig()
            homes = cfg.resolved_homes()
            params = {
                "num_classes": cfg.num_classes,
                "images_per_class": cfg.images_per_class,
                "image_size": cfg.resolved_image_size(),
                "background_correlation": cfg.background_correlation,
                "num_backgrounds": homes[0],
                "unique_homes": homes[1],
                "seed": cfg.seed,
            }
        return SyntheticBackgrounds("test", **params), "synthetic test split"
    try:
        if spec.startswith("cub:"):
            root = spec[4:]
            if not with_masks:
                return CUB200(root, "test"), f"CUB-200-2011 test classes ({root})"
            return CUB200(root, "test", masks=True), f"CUB-200-2011 test classes ({root})"
        return MaskedFolder(spec, masks=with_masks), spec
    except FileNotFoundError as exc:
        raise AuditError(str(exc).splitlines()[0]) from None
    except (ValueError, OSError) as exc:
        raise AuditError(str(exc).splitlines()[0]) from None


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """``module.path:callable`` → the callable (an :class:`AuditError` naming ``what`` if it cannot be found)."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AuditError(f"{what} must be module.path:callable, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise AuditError(f"{what} {spec!r}: cannot import {module_name!r} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AuditError(f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise AuditError(f"{what} {spec!r} is not callable")
    return obj
