"""BackgroundSwap: the torchvision v2 transform around :func:`dml_bias.transforms.functional.swap_background`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dml_bias._checks import check_choice, check_number, describe
from dml_bias._compat import V2TransformHooks
from dml_bias.transforms._sample import find_mask, is_image_leaf
from dml_bias.transforms.functional import DONOR_RULES, FILLS, choose_donor, swap_background

__all__ = ["BackgroundSwap"]

_SEED_STRIDE = 1_000_003  # odd prime: (seed, index) pairs map to distinct generator seeds for any realistic size


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)
    return None


def _unpack(sample: Any, what: str) -> tuple[Any, Any, int | None]:
    """``(image, mask, label)`` of a dict sample or an ``(image, mask, label)`` tuple."""
    if isinstance(sample, Mapping):
        if "image" not in sample or "mask" not in sample:
            raise ValueError(f"{what} must hold 'image' and 'mask' keys, got keys {sorted(map(str, sample))}")
        return sample["image"], sample["mask"], _as_int(sample.get("label"))
    if isinstance(sample, (tuple, list)) and len(sample) >= 2:
        return sample[0], sample[1], _as_int(sample[2]) if len(sample) > 2 else None
    raise TypeError(
        f"{what} must be a dict with 'image', 'mask', 'label' or an (image, mask, label) tuple, got {describe(sample)}"
    )


def _to_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, PIL.Image.Image):
        return TF.pil_to_tensor(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"donor images and masks must be tensors or PIL images, got {describe(x)}")
    return x.as_subclass(torch.Tensor)


class BackgroundSwap(V2TransformHooks, v2.Transform):
    """Put the sample's object on the background of a donor sample, chosen by an ImageNet-9 class rule.

    A :class:`torchvision.transforms.v2.Transform` for samples holding one image, its
    :class:`torchvision.tv_tensors.Mask` and (for the class rules) a label: a dict ``{"image", "mask", "label",
    ...}`` as the ``dml_bias.datasets`` produce, or an ``(image, mask, label)`` tuple. With probability ``p``
    it picks a donor from ``donors`` (:func:`~dml_bias.transforms.functional.choose_donor`), erases the donor's
    object and composites the sample's object onto it
    (:func:`~dml_bias.transforms.functional.swap_background`). The mask and all other leaves come back
    unchanged: the object stays where it was. If the sample is a dict with a ``"meta"`` dict, the provenance is
    added to a copy of it: ``"variant"``, ``"donor_index"``, ``"donor_class"``, ``"fill"`` (the fill used) and
    ``"seed"`` (``-1`` when ``seed`` is ``None``).

    Use it as a test-time variant (``seed`` set: every sample always gets the same donor) or as a training
    augmentation (``seed=None``: new random backgrounds every epoch, the mitigation of
    :cite:`kobs2022background`). Donors are resized to the sample's size (bilinear with antialiasing for the
    image, nearest for the mask) and converted to its dtype, so the transform can follow crops and
    ``ToDtype``; put it before ``Normalize`` and before :class:`~dml_bias.transforms.BackgroundMask`.

    Randomness: with ``seed=None`` it draws from torch's global RNG, which the DataLoader seeds differently
    in every worker (``base_seed + worker_id``), so workers draw different donors and a run is reproducible
    under ``torch.manual_seed``. With an integer ``seed``, each call uses a fresh
    :class:`torch.Generator` seeded from ``seed`` and the sample's ``"index"`` (or, without one, a per-process
    call counter, which is not reproducible across worker layouts): the result then does not depend on the
    worker, the epoch or the order of calls.

    Args:
        donors: The donor pool: a sequence (e.g. a dataset with ``transform=None``) of dict samples or
            ``(image, mask, label)`` tuples. If it has a ``labels`` attribute that is used; otherwise every
            donor is read once here to collect the labels. A sample's ``"index"``, if present, is taken to be
            its position in ``donors`` and never chosen as its own donor.
        variant: Donor rule: ``"mixed_rand"`` (a different class), ``"mixed_same"`` (the same class),
            ``"mixed_next"`` (the next class) or ``"random"`` (any other sample; needs no label).
        fill: How the donor's object box is filled: ``"tile"``, ``"black"`` or ``"inpaint"``.
        p: Probability of swapping a sample, in ``[0, 1]``.
        seed: ``None`` (global RNG) or an integer (deterministic per sample).
        threshold: Object level above which a mask pixel is object, in ``[0, 1]``.
        dilation: Pixels added on each side of the donor's object box.

    Example:
        >>> import torch
        >>> from torchvision import tv_tensors
        >>> def sample(value, label, index):
        ...     mask = torch.zeros(1, 16, 16, dtype=torch.uint8)
        ...     mask[:, 2:5, 2:5] = 255
        ...     image = torch.full((3, 16, 16), value, dtype=torch.uint8)
        ...     return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask), "label": label,
        ...             "index": index, "meta": {}}
        >>> pool = [sample(10, 0, 0), sample(20, 1, 1), sample(30, 2, 2)]
        >>> swap = BackgroundSwap(pool, variant="mixed_next", seed=0)
        >>> out = swap(pool[0])
        >>> out["meta"]["donor_index"], out["meta"]["donor_class"], out["meta"]["fill"]
        (1, 1, 'tile')
        >>> int(out["image"][0, 3, 3]), int(out["image"][0, 15, 15])  # own object, donor's background
        (10, 20)
    """

    def __init__(
        self,
        donors: Sequence[Any],
        *,
        variant: Literal["mixed_rand", "mixed_same", "mixed_next", "random"] = "mixed_rand",
        fill: Literal["tile", "black", "inpaint"] = "tile",
        p: float = 1.0,
        seed: int | None = None,
        threshold: float = 0.5,
        dilation: int = 4,
    ) -> None:
        check_choice(variant, "variant", DONOR_RULES)
        check_choice(fill, "fill", FILLS)
        check_number(p, "p", low=0.0, high=1.0)
        if seed is not None:
            check_number(seed, "seed", low=0, integer=True)
        check_number(threshold, "threshold", low=0.0, high=1.0)
        check_number(dilation, "dilation", low=0, integer=True)
        if not hasattr(donors, "__getitem__") or not hasattr(donors, "__len__") or len(donors) == 0:
            raise ValueError(f"donors must be a non-empty sequence of samples, got {describe(donors)}")
        super().__init__()
        self.donors = donors
        self.variant = variant
        self.fill = fill
        self.p = float(p)
        self.seed = seed
        self.threshold = float(threshold)
        self.dilation = dilation
        self._donor_labels = self._collect_labels(donors)
        self._calls = 0
        self._context: tuple[int | None, int | None] = (None, None)
        self._provenance: dict[str, Any] | None = None

    @staticmethod
    def _collect_labels(donors: Sequence[Any]) -> torch.Tensor:
        labels = getattr(donors, "labels", None)
        if labels is None:
            labels = []
            for i in range(len(donors)):
                label = _unpack(donors[i], f"donors[{i}]")[2]
                if label is None:
                    raise ValueError(f"donors[{i}] has no integer label ('label' key or third tuple element)")
                labels.append(label)
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if labels.numel() != len(donors):
            raise ValueError(f"donors.labels must hold one label per donor ({len(donors)}), got {describe(labels)}")
        return labels

    def forward(self, *inputs: Any) -> Any:
        """Swap the sample's background; add the provenance to its ``"meta"`` dict, if it has one."""
        # The base class hands make_params only the tensor leaves, so the label and index (plain ints) are
        # read here, before the generic flatten/transform/unflatten of the base class runs.
        sample = inputs if len(inputs) > 1 else inputs[0]
        label = index = None
        if isinstance(sample, Mapping):
            label, index = _as_int(sample.get("label")), _as_int(sample.get("index"))
        elif isinstance(sample, (tuple, list)) and len(sample) > 2:
            label = _as_int(sample[2])
        self._context, self._provenance = (label, index), None
        out = super().forward(*inputs)
        provenance, self._provenance = self._provenance, None
        if provenance is not None and isinstance(out, dict) and isinstance(out.get("meta"), dict):
            out["meta"] = {**out["meta"], **provenance}
        return out

    def _generator(self, index: int | None) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = index if index is not None else self._calls
        return torch.Generator().manual_seed((self.seed * _SEED_STRIDE + key) % (2**63))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw whether to swap, the donor and the tiling offset; load the donor."""
        find_mask(flat_inputs, type(self).__name__)
        label, index = self._context
        generator = self._generator(index)
        self._calls += 1
        if float(torch.rand(1, generator=generator)) >= self.p:
            return {"swap": False}
        if label is None and self.variant != "random":
            raise ValueError(
                f"BackgroundSwap(variant={self.variant!r}) needs the sample's integer label (a 'label' key or the "
                "third element of an (image, mask, label) tuple); use variant='random' for unlabelled samples"
            )
        in_pool = index is not None and 0 <= index < len(self._donor_labels)
        donor_index = choose_donor(
            self.variant, self._donor_labels, index if in_pool else None, label=label, generator=generator
        )
        donor_image, donor_mask, _ = _unpack(self.donors[donor_index], f"donors[{donor_index}]")
        tile_seed = int(torch.randint(2**62, (1,), generator=generator))
        self._provenance = {
            "variant": self.variant,
            "donor_index": donor_index,
            "donor_class": int(self._donor_labels[donor_index]),
            "fill": self.fill,
            "seed": -1 if self.seed is None else self.seed,
        }
        return {
            "swap": True,
            "mask": find_mask(flat_inputs, type(self).__name__),
            "donor_image": _to_tensor(donor_image),
            "donor_mask": _to_tensor(donor_mask),
            "tile_seed": tile_seed,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Swap the background of one image leaf; return any other leaf as it is."""
        if not params["swap"] or not is_image_leaf(inpt):
            return inpt
        is_pil = isinstance(inpt, PIL.Image.Image)
        image = TF.pil_to_tensor(inpt) if is_pil else inpt.as_subclass(torch.Tensor)
        if image.ndim != 3:
            raise ValueError(f"BackgroundSwap works on (C, H, W) images, got {describe(image)}")
        donor_image, donor_mask = self._fit_donor(params["donor_image"], params["donor_mask"], image)
        out, info = swap_background(
            image,
            params["mask"].as_subclass(torch.Tensor),
            donor_image,
            donor_mask,
            fill=self.fill,
            threshold=self.threshold,
            dilation=self.dilation,
            generator=torch.Generator().manual_seed(params["tile_seed"]),
        )
        if self._provenance is not None:
            self._provenance["fill"] = info["fill"]
        if is_pil:
            return TF.to_pil_image(out, mode=inpt.mode)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out

    @staticmethod
    def _fit_donor(
        donor_image: torch.Tensor, donor_mask: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if donor_image.ndim != 3 or donor_image.shape[0] != image.shape[0]:
            raise ValueError(
                f"the donor image must be (C, H, W) with the sample's {image.shape[0]} channels, got "
                f"{describe(donor_image)} (sample image {describe(image)})"
            )
        if donor_mask.ndim == 2:
            donor_mask = donor_mask.unsqueeze(0)
        size = list(image.shape[-2:])
        if list(donor_image.shape[-2:]) != size:
            donor_image = TF.resize(donor_image, size, antialias=True)
        if list(donor_mask.shape[-2:]) != size:
            donor_mask = TF.resize(tv_tensors.Mask(donor_mask), size).as_subclass(torch.Tensor)
        if donor_image.dtype != image.dtype:
            donor_image = TF.to_dtype(donor_image, image.dtype, scale=True)
        return donor_image.to(image.device), donor_mask.to(image.device)

    def extra_repr(self) -> str:
        """The configuration (the donor pool by its size)."""
        return (
            f"donors={len(self.donors)}, variant={self.variant!r}, fill={self.fill!r}, p={self.p}, seed={self.seed}, "
            f"threshold={self.threshold}, dilation={self.dilation}"
        )
