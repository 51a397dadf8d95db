"""A built-in background-bias data set: fine-grained objects on textured "home" backgrounds.

:class:`SyntheticBackgrounds` is generated procedurally from a seed, needs no download and renders the
default data set in about a second on a CPU. Every class has a home background that most of its images
show (as penguins are photographed on ice), the object mask of every image is exact, and the data set can
draw any object on any background, so the ImageNet-9 background variants (``only_fg``, ``only_bg_t``,
``no_fg``, ``mixed_same``, ``mixed_rand``, ``mixed_next``) exist exactly, without in-painting.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dml_bias._checks import check_choice, check_number

__all__ = ["ATTRIBUTE_NAMES", "BACKGROUND_FAMILIES", "OBJECT_ATTRIBUTES", "VARIANTS", "SyntheticBackgrounds"]

#: The sample variants, with the names of ImageNet-9 (Xiao et al., 2021).
VARIANTS: tuple[str, ...] = ("original", "only_fg", "only_bg_t", "no_fg", "mixed_same", "mixed_rand", "mixed_next")

#: Texture families of the backgrounds; background id ``b`` belongs to family ``b % 6``.
BACKGROUND_FAMILIES: tuple[str, ...] = ("stripes", "checks", "waves", "gradient", "dots", "rings")

#: The attributes that define an object class and their values; a class is one combination.
OBJECT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("ellipse", "box", "diamond", "flower"),
    "colour": ("red", "orange", "yellow", "green", "blue", "purple"),
    "pattern": ("solid", "stripes", "spots", "two-tone"),
    "mark": ("front", "back", "top"),
    "secondary": ("dark", "light", "contrast"),
}

#: The names of the binary class attributes of :attr:`SyntheticBackgrounds.class_attributes`, ``"attribute=value"``
#: for every value of :data:`OBJECT_ATTRIBUTES` in order (20 columns).
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(
    f"{name}={value}" for name, values in OBJECT_ATTRIBUTES.items() for value in values
)

_BODY_HUES = np.array([0.0, 0.075, 0.15, 0.33, 0.6, 0.78])
_MARK_POSITIONS = np.array([[0.55, 0.0], [-0.55, 0.0], [0.0, 0.5]])
_NUM_COMBINATIONS = math.prod(len(v) for v in OBJECT_ATTRIBUTES.values())
_SPLIT_CODE = {"train": 0, "test": 1}
_DTYPE = torch.float32
_GENERATOR_VERSION = 1  # bump when the rendering changes, so on-disk caches are not reused
# Vectorised and scalar code paths of sin/atan2 may differ in the last bit, so a pixel could depend on where it
# falls in a batch. Per-pixel transcendental functions therefore run in float64 and are rounded to float32,
# where such a difference practically never survives; every other operation is exactly rounded (IEEE + - * /,
# sqrt). A pixel is then the same whether it is rendered alone or in a batch, which the exact variants need.


def _sin(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x.double()).float()


def _cos(x: torch.Tensor) -> torch.Tensor:
    return torch.cos(x.double()).float()


def _atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.atan2(y.double(), x.double()).float()


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs broadcast, values in [0, 1]; returns (..., 3)."""
    h = np.mod(h, 1.0)
    k = np.stack([np.mod(n + h * 6.0, 6.0) for n in (5.0, 3.0, 1.0)], axis=-1)
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _background_table(seed: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The fixed look of every background id: texture family, two colours, period and angle."""
    ids = np.asarray(ids, dtype=np.int64)
    out: dict[str, np.ndarray] = {
        "family": np.mod(ids, len(BACKGROUND_FAMILIES)),
        "colour1": np.zeros((len(ids), 3)),
        "colour2": np.zeros((len(ids), 3)),
        "period": np.zeros(len(ids)),
        "angle": np.zeros(len(ids)),
    }
    hue_offset = _rng(seed, 11).random()
    for row, b in enumerate(ids.tolist()):
        r = _rng(seed, 7, b)
        # golden-ratio hues spread the background colours evenly, so background ids are easy to tell apart
        hue = (hue_offset + 0.618034 * (b // len(BACKGROUND_FAMILIES)) + 0.29 * b) % 1.0
        s1, v1 = r.uniform(0.45, 0.95), r.uniform(0.35, 0.95)
        hue2 = hue + r.uniform(0.12, 0.5) * r.choice([-1.0, 1.0])
        s2, v2 = r.uniform(0.2, 0.9), (v1 + r.uniform(0.3, 0.55)) % 1.0
        out["colour1"][row] = _hsv_to_rgb(np.array(hue), np.array(s1), np.array(v1))
        out["colour2"][row] = _hsv_to_rgb(np.array(hue2), np.array(s2), np.array(max(v2, 0.15)))
        out["period"][row] = r.uniform(0.22, 0.55)
        out["angle"][row] = r.uniform(0.0, math.pi)
    return out


def _class_table(seed: int, split: str, num_classes: int) -> dict[str, np.ndarray]:
    """Attribute indices and fixed shape details of the classes of one split (disjoint between splits)."""
    combos = _rng(seed, 1).permutation(_NUM_COMBINATIONS)
    start = 0 if split == "train" else num_classes
    chosen = combos[start : start + num_classes]
    sizes = [len(v) for v in OBJECT_ATTRIBUTES.values()]
    attrs = np.stack(np.unravel_index(chosen, sizes), axis=1)  # (C, 5)
    global_ids = np.arange(start, start + num_classes)
    aspect = np.array([_rng(seed, 2, g).uniform(1.15, 1.55) for g in global_ids.tolist()])
    frequency = np.array([_rng(seed, 3, g).uniform(1.1, 1.7) for g in global_ids.tolist()])
    return {"attrs": attrs, "aspect": aspect, "frequency": frequency, "global_id": global_ids}


class _Params:
    """Per-sample generation parameters (numpy arrays, one row per sample); rendering reads them."""

    def __init__(self, **arrays: np.ndarray) -> None:
        self.arrays = arrays

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.arrays.items()}


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # pixel centres in [-1, 1]; y points down as in images
    coords = (torch.arange(size, dtype=_DTYPE) + 0.5) / size * 2.0 - 1.0
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x, y


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=_DTYPE)


def _render_backgrounds(bg: dict[str, np.ndarray], size: int) -> torch.Tensor:
    """Render backgrounds as float (N, 3, H, W) in [0, 1] from per-image background parameters."""
    n = len(bg["family"])
    x, y = _grid(size)
    out = torch.empty(n, 3, size, size, dtype=_DTYPE)
    families = bg["family"]
    for fam in np.unique(families).tolist():
        idx = np.nonzero(families == fam)[0]
        sel = torch.as_tensor(idx)
        angle = _t(bg["angle"][idx] + bg["angle_jitter"][idx])[:, None, None]
        period = _t(bg["period"][idx])[:, None, None]
        ph1 = _t(bg["phase1"][idx])[:, None, None]
        ph2 = _t(bg["phase2"][idx])[:, None, None]
        cos_a, sin_a = _cos(angle), _sin(angle)
        xr = x * cos_a + y * sin_a
        yr = -x * sin_a + y * cos_a
        name = BACKGROUND_FAMILIES[fam]
        if name == "stripes":
            t = (_sin(2 * math.pi * xr / period + ph1) > 0).float()
        elif name == "checks":
            t = (_sin(math.pi * xr / period + ph1) * _sin(math.pi * yr / period + ph2) > 0).float()
        elif name == "waves":
            t = 0.5 + 0.5 * _sin(2 * math.pi * xr / period + ph1 + 1.5 * _sin(math.pi * yr / period + ph2))
        elif name == "gradient":
            t = (0.5 + 0.6 * xr + 0.15 * _sin(ph1) + 0.1 * _sin(2 * math.pi * yr / (3 * period) + ph2)).clamp(0, 1)
        elif name == "dots":
            fx = torch.frac(xr / period + ph1 / (2 * math.pi) + 8.0) - 0.5
            fy = torch.frac(yr / period + ph2 / (2 * math.pi) + 8.0) - 0.5
            t = (fx * fx + fy * fy < 0.09).float()
        else:  # rings
            cx, cy = 0.6 * _cos(ph1), 0.6 * _sin(ph2)
            r = torch.sqrt((x - cx) * (x - cx) + (y - cy) * (y - cy))
            t = (_sin(2 * math.pi * r / period) > 0).float()
        c1 = _t(bg["colour1"][idx] + bg["colour_jitter"][idx]).clamp(0, 1)[:, :, None, None]
        c2 = _t(bg["colour2"][idx] + bg["colour_jitter"][idx]).clamp(0, 1)[:, :, None, None]
        out[sel] = c1 + (c2 - c1) * t[:, None]
    return out


def _render_objects(obj: dict[str, np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Render objects as float colours (N, 3, H, W) and a boolean mask (N, 1, H, W)."""
    x, y = _grid(size)
    cx, cy = _t(obj["cx"])[:, None, None], _t(obj["cy"])[:, None, None]
    angle, scale = _t(obj["angle"])[:, None, None], _t(obj["scale"])[:, None, None]
    aspect = _t(obj["aspect"])[:, None, None]
    dx, dy = x - cx, y - cy
    cos_a, sin_a = _cos(angle), _sin(angle)
    u = (dx * cos_a + dy * sin_a) / scale / aspect
    v = (-dx * sin_a + dy * cos_a) / scale
    shape = torch.as_tensor(obj["shape"])[:, None, None]
    inside = torch.where(
        shape == 0,
        u * u + v * v <= 1.0,
        torch.where(
            shape == 1,
            (u * u) * (u * u) + (v * v) * (v * v) <= 1.0,
            torch.where(
                shape == 2,
                u.abs() + v.abs() <= 1.2,
                torch.sqrt(u * u + v * v) <= 0.85 + 0.28 * _cos(5 * _atan2(v, u)),
            ),
        ),
    )
    pattern = torch.as_tensor(obj["pattern"])[:, None, None]
    freq, phase = _t(obj["frequency"])[:, None, None], _t(obj["pattern_phase"])[:, None, None]
    fu = torch.frac(u * 2 * freq + phase + 8.0) - 0.5
    fv = torch.frac(v * 2 * freq + 8.0) - 0.5
    secondary = torch.where(
        pattern == 1,
        _sin(2 * math.pi * freq * u + 2 * math.pi * phase) > 0,
        torch.where(pattern == 2, fu * fu + fv * fv < 0.07, (pattern == 3) & (v < 0.15 * _sin(6.0 * phase))),
    )
    mu, mv = _t(obj["mark_u"])[:, None, None], _t(obj["mark_v"])[:, None, None]
    mark = (u - mu) * (u - mu) + (v - mv) * (v - mv) <= 0.22**2
    body = _t(obj["body"])[:, :, None, None]
    sec = _t(obj["secondary"])[:, :, None, None]
    mark_colour = _t(obj["mark_colour"])[:, :, None, None]
    colour = torch.where(mark[:, None], mark_colour, torch.where(secondary[:, None], sec, body))
    return colour.clamp(0, 1), inside[:, None]


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


class SyntheticBackgrounds(torch.utils.data.Dataset):
    r"""Fine-grained objects composited onto textured backgrounds, with a "home" background per class.

    The data set is generated procedurally and deterministically from ``seed``; nothing is downloaded and
    the default data set (1,200 images per split) renders in about a second on a CPU.

    **Objects.** A class is one combination of five attributes (:data:`OBJECT_ATTRIBUTES`): a base shape
    (ellipse, box, diamond, five-lobed flower), a body colour (six hues), a pattern (solid, stripes, spots,
    two-tone), the position of a small mark (front, back, top) and the secondary colour used by the pattern
    (darker, lighter or contrasting). Classes are drawn without repetition from the 864 combinations, so two
    classes often differ in one detail only, as bird species do. Each class also fixes an aspect ratio and a
    pattern frequency. Within a class every image varies: rotation (±90°), scale (object radius 0.30–0.42 of
    the half-width), aspect (±5 %), position (±0.22 of the half-width), colour (hue ±0.05, saturation and
    value ±0.2) and the pattern's phase. The object covers 6–25 % of the image (14 % on average), so most
    pixels are background.

    **Backgrounds.** Background id :math:`b` is a texture of family ``b % 6`` (:data:`BACKGROUND_FAMILIES`:
    stripes, checks, waves, gradient, dots, rings) in two colours, with a period and an angle, all fixed by
    ``(seed, b)``; hues follow a golden-ratio sequence, so the ids of a pool look clearly different. Each
    image jitters its background slightly (phase, angle ±0.15 rad, colour ±0.04).

    **Home backgrounds.** The ``num_backgrounds`` ids ``0 … num_backgrounds-1`` form the pool of both
    splits. Every class has a home background (distinct homes while ``num_backgrounds >= num_classes``,
    otherwise shared evenly; with ``unique_homes=U``, ``U`` randomly chosen classes each get a *distinctive*
    home of their own and the others share the remaining ids evenly as *generic* homes, as penguins have ice
    while many songbirds share foliage); an image shows its class's home with probability ``background_correlation``
    and otherwise a background drawn uniformly from the other ids of the pool. This holds in both splits:
    the test classes have their own homes. A model that learns "this background means this class" therefore
    scores well on the original test images but loses on images whose backgrounds are swapped.

    **Splits.** ``"train"`` and ``"test"`` hold disjoint classes (the zero-shot protocol of deep metric
    learning); labels are ``0 … num_classes-1`` within each split.

    **Variants.** :meth:`with_variant` returns the same samples rendered as an ImageNet-9 variant
    (:data:`VARIANTS`), exactly, since the background under the object is known:

    - ``original``: the object on its own background;
    - ``only_fg``: the object on black;
    - ``only_bg_t``: the background alone, without the object;
    - ``no_fg``: the background with the object's silhouette in black;
    - ``mixed_same`` / ``mixed_rand`` / ``mixed_next``: the object on the background of another image
      (the donor) of the same class / of a random other class / of class ``(c + 1) % num_classes``
      (with one image per class, ``mixed_same`` uses the image itself; with one class, ``mixed_rand`` too).

    The label, the mask (always the object's mask) and the object stay those of the sample; ``meta``
    records the provenance. Donors are drawn from ``variant_seed``.

    **Samples** are dicts that ``torchvision.transforms.v2`` transforms as a whole::

        {"image": tv_tensors.Image (3, H, W) uint8, "mask": tv_tensors.Mask (1, H, W) uint8 (0 or 255),
         "label": int, "index": int,
         "meta": {"object_id", "background_id", "home_background", "variant", "donor_index",
                  "donor_class", "fill", "seed"}}

    ``meta["background_id"]`` is the background shown (``-1`` for ``only_fg``); ``donor_index`` and
    ``donor_class`` are ``-1`` for variants without a donor; ``fill`` is always ``"exact"``.

    Args:
        split: ``"train"`` or ``"test"``.
        num_classes: Classes per split (1 … 432).
        images_per_class: Images per class.
        image_size: Height and width of the images in pixels (at least 8).
        background_correlation: Probability that an image shows its class's home background, in [0, 1].
        num_backgrounds: Size of the background pool (default: ``num_classes``, so every class has a home
            of its own); at least 2 when ``background_correlation < 1``.
        unique_homes: ``None`` (homes as described above) or the number of classes (``0 … num_classes``) with
            a home of their own; the other classes share the other ``num_backgrounds − unique_homes`` ids, so
            ``num_backgrounds`` must exceed ``unique_homes`` unless every class is unique. Objects and the
            per-image draws do not depend on it.
        seed: Seed of everything random in the data set.
        variant: One of :data:`VARIANTS`.
        variant_seed: Seed of the donor choice of the ``mixed_*`` variants.
        transform: A callable applied to the whole sample dict (e.g. a ``torchvision.transforms.v2``
            pipeline).
        cache: ``None`` renders every sample on access; ``True`` renders the whole data set once on first
            access and keeps it in memory; a directory path does the same and also stores the rendered
            tensors there (``synthetic-<hash>.pt``) for later runs. With ``DataLoader`` workers, call
            :meth:`render_all` once before creating the loader, so the workers receive the rendered tensors
            instead of each rendering them again.

    Attributes:
        labels: ``(N,)`` long tensor, the class of every sample.
        object_ids: ``(N,)`` long tensor, the object drawn in every sample (the index of the sample whose
            object it is; the object never changes between variants).
        background_ids: ``(N,)`` long tensor, the background shown in this variant (``-1``: none).
        home_backgrounds: ``(num_classes,)`` long tensor, the home background id of every class.
        donor_indices: ``(N,)`` long tensor, the donor of the background (``-1``: none).
        class_names: ``list[str]``, e.g. ``"ellipse/red/stripes/front/dark"``.
        class_attributes: ``(num_classes, 20)`` uint8 tensor, the binary attribute vector of every class: one
            column per value of :data:`OBJECT_ATTRIBUTES` (named by :data:`ATTRIBUTE_NAMES`), 1 where the class
            has that value, so each row has exactly five ones. Attribute supervision by construction (e.g. for
            :class:`dml_bias.heads.PANLoss`); every attribute is certain.

    Example:
        >>> ds = SyntheticBackgrounds("train", num_classes=4, images_per_class=3, image_size=32)
        >>> len(ds), ds.num_classes
        (12, 4)
        >>> sample = ds[0]
        >>> sample["image"].shape, sample["image"].dtype, sample["mask"].shape
        (torch.Size([3, 32, 32]), torch.uint8, torch.Size([1, 32, 32]))
        >>> sample["label"], sorted(sample["meta"])[:3]
        (0, ['background_id', 'donor_class', 'donor_index'])
        >>> swapped = ds.with_variant("mixed_rand", seed=1)[0]
        >>> swapped["meta"]["donor_class"] != sample["label"]
        True
        >>> bool((swapped["mask"] == sample["mask"]).all())
        True
        >>> mixed = SyntheticBackgrounds("test", num_classes=6, images_per_class=1, num_backgrounds=4, unique_homes=3)
        >>> sorted(torch.bincount(mixed.home_backgrounds).tolist())  # 3 distinctive homes, 1 generic one
        [1, 1, 1, 3]
    """

    def __init__(
        self,
        split: str = "train",
        *,
        num_classes: int = 30,
        images_per_class: int = 40,
        image_size: int = 64,
        background_correlation: float = 0.9,
        num_backgrounds: int | None = None,
        unique_homes: int | None = None,
        seed: int = 0,
        variant: str = "original",
        variant_seed: int = 0,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        cache: bool | str | os.PathLike[str] | None = None,
    ) -> None:
        check_choice(split, "split", ("train", "test"))
        check_number(num_classes, "num_classes", low=1, high=_NUM_COMBINATIONS // 2, integer=True)
        check_number(images_per_class, "images_per_class", low=1, integer=True)
        check_number(image_size, "image_size", low=8, integer=True)
        check_number(background_correlation, "background_correlation", low=0.0, high=1.0)
        if num_backgrounds is None:
            num_backgrounds = num_classes
        check_number(num_backgrounds, "num_backgrounds", low=1, integer=True)
        if num_backgrounds < 2 and background_correlation < 1.0:
            raise ValueError(
                "num_backgrounds must be at least 2 when background_correlation < 1 (an image off its home "
                f"background needs another background), got num_backgrounds={num_backgrounds}"
            )
        if unique_homes is not None:
            check_number(unique_homes, "unique_homes", low=0, high=num_classes, integer=True)
            needed = unique_homes + (1 if unique_homes < num_classes else 0)
            if num_backgrounds < needed:
                raise ValueError(
                    f"num_backgrounds must be at least unique_homes{' + 1' if needed > unique_homes else ''} = "
                    f"{needed} (a home of its own for {unique_homes} classes"
                    + (", and at least one shared home for the others" if needed > unique_homes else "")
                    + f"), got num_backgrounds={num_backgrounds}"
                )
        check_number(seed, "seed", low=0, integer=True)
        check_choice(variant, "variant", VARIANTS)
        check_number(variant_seed, "variant_seed", low=0, integer=True)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        if cache is not None and not isinstance(cache, (bool, str, os.PathLike)):
            raise TypeError(f"cache must be None, a bool or a directory path, got {type(cache).__name__}")
        if isinstance(cache, (str, os.PathLike)) and Path(cache).exists() and not Path(cache).is_dir():
            raise ValueError(f"cache must be a directory, got the file {os.fspath(cache)!r}")

        self.split = split
        self.num_classes = int(num_classes)
        self.images_per_class = int(images_per_class)
        self.image_size = int(image_size)
        self.background_correlation = float(background_correlation)
        self.num_backgrounds = int(num_backgrounds)
        self.unique_homes = None if unique_homes is None else int(unique_homes)
        self.seed = int(seed)
        self.transform = transform
        self.cache = cache
        self._generate()
        self._set_variant(variant, int(variant_seed))

    # ------------------------------------------------------------------ generation
    def _generate(self) -> None:
        c, k, nb = self.num_classes, self.images_per_class, self.num_backgrounds
        split_code = _SPLIT_CODE[self.split]
        classes = _class_table(self.seed, self.split, c)
        self._class_attrs = classes["attrs"]
        offsets = np.cumsum([0, *(len(v) for v in OBJECT_ATTRIBUTES.values())])[:-1]
        one_hot = np.zeros((c, len(ATTRIBUTE_NAMES)), dtype=np.uint8)
        one_hot[np.arange(c)[:, None], classes["attrs"] + offsets] = 1
        self.class_attributes = torch.from_numpy(one_hot)
        self.class_names = [
            "/".join(values[i] for values, i in zip(OBJECT_ATTRIBUTES.values(), row, strict=True))
            for row in classes["attrs"]
        ]

        r = _rng(self.seed, 20 + split_code)
        perm = r.permutation(nb)
        if self.unique_homes is None:
            homes = perm[np.arange(c) % nb]  # distinct homes while nb >= c, else shared evenly
        else:
            # a separate stream picks the classes with a home of their own, so `r` draws as without the knob
            u = self.unique_homes
            order = _rng(self.seed, 25 + split_code).permutation(c)
            homes = np.empty(c, dtype=np.int64)
            homes[order[:u]] = perm[:u]  # distinctive homes: one class each
            homes[order[u:]] = perm[u + np.arange(c - u) % max(nb - u, 1)]  # generic homes, shared evenly
        self.home_backgrounds = torch.as_tensor(homes, dtype=torch.long)

        n = c * k
        labels = np.repeat(np.arange(c), k)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.object_ids = torch.arange(n)

        # backgrounds: home with probability background_correlation, else uniform over the other ids
        at_home = r.random(n) < self.background_correlation
        other = r.integers(0, max(nb - 1, 1), n)
        home_of = homes[labels]
        other = np.where(other >= home_of, other + 1, other) if nb > 1 else home_of
        bg_ids = np.where(at_home, home_of, other).astype(np.int64)
        self._own_background_ids = bg_ids
        self._bg_jitter = {
            "phase1": r.uniform(0, 2 * math.pi, n),
            "phase2": r.uniform(0, 2 * math.pi, n),
            "angle_jitter": r.uniform(-0.15, 0.15, n),
            "colour_jitter": r.uniform(-0.04, 0.04, (n, 3)),
        }

        # objects: class attributes plus per-image pose and colour jitter
        attrs = classes["attrs"][labels]
        shape, colour, pattern, mark, secondary = (attrs[:, i] for i in range(5))
        hue = _BODY_HUES[colour] + r.uniform(-0.05, 0.05, n)
        sat = np.clip(0.7 + r.uniform(-0.2, 0.2, n), 0, 1)
        val = np.clip(0.75 + r.uniform(-0.2, 0.2, n), 0, 1)
        body = _hsv_to_rgb(hue, sat, val)
        sec = np.where(
            (secondary == 0)[:, None],
            body * 0.4,
            np.where((secondary == 1)[:, None], body * 0.45 + 0.55, _hsv_to_rgb(hue + 0.5, sat, val)),
        )
        self._objects = _Params(
            shape=shape,
            pattern=pattern,
            aspect=classes["aspect"][labels] * r.uniform(0.95, 1.05, n),
            frequency=classes["frequency"][labels],
            pattern_phase=r.uniform(0, 1, n),
            mark_u=_MARK_POSITIONS[mark, 0],
            mark_v=_MARK_POSITIONS[mark, 1],
            body=body,
            secondary=sec,
            mark_colour=1.0 - body,
            angle=r.uniform(-1.57, 1.57, n),
            scale=r.uniform(0.3, 0.42, n),
            cx=r.uniform(-0.22, 0.22, n),
            cy=r.uniform(-0.22, 0.22, n),
        )

    def _set_variant(self, variant: str, variant_seed: int) -> None:
        check_choice(variant, "variant", VARIANTS)
        self.variant = variant
        self.variant_seed = variant_seed
        n, k, c = len(self.labels), self.images_per_class, self.num_classes
        labels = self.labels.numpy()
        donors = np.full(n, -1, dtype=np.int64)
        r = _rng(self.seed, 30 + _SPLIT_CODE[self.split], VARIANTS.index(variant), variant_seed)
        if variant == "mixed_same":
            offset = r.integers(1, max(k, 2), n) if k > 1 else np.zeros(n, dtype=np.int64)
            donors = labels * k + (np.arange(n) % k + offset) % k
        elif variant == "mixed_rand":
            other = (labels + r.integers(1, max(c, 2), n)) % c if c > 1 else labels
            donors = other * k + r.integers(0, k, n)
        elif variant == "mixed_next":
            donors = ((labels + 1) % c) * k + r.integers(0, k, n)
        self._donors = donors
        self.donor_indices = torch.as_tensor(donors, dtype=torch.long)
        source = np.where(donors >= 0, donors, np.arange(n))
        shown = self._own_background_ids[source]
        if variant == "only_fg":
            shown = np.full(n, -1, dtype=np.int64)
        self.background_ids = torch.as_tensor(shown, dtype=torch.long)
        self._rendered: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ public API
    def with_variant(self, name: str, seed: int = 0) -> SyntheticBackgrounds:
        """Return the same samples rendered as background variant ``name`` (see the class docstring).

        The returned data set shares the generation parameters (and ``transform``) with this one; this one
        is not changed.

        Args:
            name: One of :data:`VARIANTS`.
            seed: Seed of the donor choice of the ``mixed_*`` variants.

        Returns:
            A new :class:`SyntheticBackgrounds`.

        Example:
            >>> ds = SyntheticBackgrounds("test", num_classes=3, images_per_class=2, image_size=16)
            >>> fg = ds.with_variant("only_fg")
            >>> int(fg[0]["image"][:, fg[0]["mask"][0] == 0].max())
            0
        """
        check_choice(name, "name", VARIANTS)
        check_number(seed, "seed", low=0, integer=True)
        out = copy.copy(self)
        out._set_variant(name, int(seed))
        return out

    def __len__(self) -> int:
        return len(self.labels)

    def _background_params(self, ids: np.ndarray, jitter_from: np.ndarray | None) -> dict[str, np.ndarray]:
        table = _background_table(self.seed, ids)
        if jitter_from is None:
            m = len(ids)
            table.update(
                phase1=np.zeros(m), phase2=np.zeros(m), angle_jitter=np.zeros(m), colour_jitter=np.zeros((m, 3))
            )
        else:
            table.update({key: value[jitter_from] for key, value in self._bg_jitter.items()})
        return table

    def _render(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Render the samples ``index`` (1-D int array) of the current variant: uint8 images and masks."""
        size = self.image_size
        colour, inside = _render_objects(self._objects.take(index), size)
        mask = inside.to(torch.uint8) * 255
        variant = self.variant
        if variant == "only_fg":
            return _to_uint8(torch.where(inside, colour, torch.zeros(()))), mask
        donors = self._donors[index]
        source = np.where(donors >= 0, donors, index)
        background = _render_backgrounds(self._background_params(self._own_background_ids[source], source), size)
        if variant == "only_bg_t":
            return _to_uint8(background), mask
        if variant == "no_fg":
            return _to_uint8(torch.where(inside, torch.zeros(()), background)), mask
        return _to_uint8(torch.where(inside, colour, background)), mask

    def render_all(self, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Render every sample of this variant at once (without ``transform``).

        Args:
            batch_size: Samples rendered per vectorised step.

        Returns:
            ``(images, masks)``: uint8 tensors ``(N, 3, H, W)`` and ``(N, 1, H, W)`` (mask values 0 or 255).

        Example:
            >>> ds = SyntheticBackgrounds(num_classes=2, images_per_class=2, image_size=16)
            >>> images, masks = ds.render_all()
            >>> images.shape, masks.shape
            (torch.Size([4, 3, 16, 16]), torch.Size([4, 1, 16, 16]))
            >>> bool((images[1] == ds[1]["image"]).all())
            True
        """
        check_number(batch_size, "batch_size", low=1, integer=True)
        if self._rendered is not None:
            return self._rendered
        path = self._cache_path()
        if path is not None and path.exists():
            images, masks = torch.load(path, weights_only=True)
        else:
            starts = range(0, len(self), batch_size)
            parts = [self._render(np.arange(s, min(s + batch_size, len(self)))) for s in starts]
            images = torch.cat([p[0] for p in parts])
            masks = torch.cat([p[1] for p in parts])
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save((images, masks), tmp)
                os.replace(tmp, path)
        if self.cache is not None and self.cache is not False:
            self._rendered = (images, masks)
        return images, masks

    def _cache_path(self) -> Path | None:
        if not isinstance(self.cache, (str, os.PathLike)):
            return None
        key = repr(
            (
                _GENERATOR_VERSION,
                self.split,
                self.num_classes,
                self.images_per_class,
                self.image_size,
                self.background_correlation,
                self.num_backgrounds,
                self.unique_homes,
                self.seed,
                self.variant,
                self.variant_seed,
            )
        )
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return Path(self.cache) / f"synthetic-{digest}.pt"

    def render(
        self, object_index: int, background_id: int | None = None, *, background_from: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the object of sample ``object_index`` on any background.

        Args:
            object_index: The sample whose object is drawn (``0 … len(self)-1``), in its own pose.
            background_id: A background id (``>= 0``), drawn without the per-image jitter; ``-1`` for black.
                ``None`` (with ``background_from=None``): the object's own background, as in ``original``.
            background_from: Instead of ``background_id``: use the background of this sample, with its
                jitter, exactly as that sample shows it.

        Returns:
            ``(image, mask)``: uint8 tensors ``(3, H, W)`` and ``(1, H, W)`` (mask values 0 or 255).

        Example:
            >>> ds = SyntheticBackgrounds(num_classes=3, images_per_class=2, image_size=16)
            >>> image, mask = ds.render(0, background_id=2)
            >>> image.shape, mask.shape, image.dtype
            (torch.Size([3, 16, 16]), torch.Size([1, 16, 16]), torch.uint8)
            >>> bool((ds.render(0)[0] == ds[0]["image"]).all())
            True
        """
        n = len(self)
        check_number(object_index, "object_index", low=0, high=n - 1, integer=True)
        if background_id is not None and background_from is not None:
            raise ValueError("give background_id or background_from, not both")
        if background_id is not None:
            check_number(background_id, "background_id", low=-1, integer=True)
        if background_from is not None:
            check_number(background_from, "background_from", low=0, high=n - 1, integer=True)
        idx = np.array([object_index])
        colour, inside = _render_objects(self._objects.take(idx), self.image_size)
        mask = inside.to(torch.uint8)[0] * 255
        if background_id == -1:
            return _to_uint8(torch.where(inside, colour, torch.zeros(())))[0], mask
        if background_id is not None:
            params = self._background_params(np.array([background_id]), None)
        else:
            source = np.array([object_index if background_from is None else background_from])
            params = self._background_params(self._own_background_ids[source], source)
        background = _render_backgrounds(params, self.image_size)
        return _to_uint8(torch.where(inside, colour, background))[0], mask

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        if isinstance(index, torch.Tensor) and index.numel() == 1:
            index = int(index.item())
        if isinstance(index, np.integer):
            index = int(index)
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for a data set of {n} samples")
        index %= n
        from torchvision import tv_tensors

        if self.cache is not None and self.cache is not False:
            images, masks = self.render_all()
            image, mask = images[index], masks[index]
        else:
            image_b, mask_b = self._render(np.array([index]))
            image, mask = image_b[0], mask_b[0]
        donor = int(self._donors[index])
        sample = {
            "image": tv_tensors.Image(image),
            "mask": tv_tensors.Mask(mask),
            "label": int(self.labels[index]),
            "index": index,
            "meta": {
                "object_id": int(self.object_ids[index]),
                "background_id": int(self.background_ids[index]),
                "home_background": int(self.home_backgrounds[self.labels[index]]),
                "variant": self.variant,
                "donor_index": donor,
                "donor_class": int(self.labels[donor]) if donor >= 0 else -1,
                "fill": "exact",
                "seed": self.variant_seed,
            },
        }
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_classes={self.num_classes}, "
            f"images_per_class={self.images_per_class}, image_size={self.image_size}, "
            f"background_correlation={self.background_correlation}, num_backgrounds={self.num_backgrounds}, "
            f"unique_homes={self.unique_homes}, "
            f"seed={self.seed}, variant={self.variant!r}, variant_seed={self.variant_seed})"
        )
