"""Background masking and background swapping on plain tensors: the functional twins of the transforms.

:func:`mask_background` and :func:`foreground_mask` work on one image ``(C, H, W)`` or any batch ``(..., C, H,
W)`` on any device, with no Python loop over samples and no host-device synchronisation (the value checks
that would need one run only on CPU tensors). :func:`swap_background`, :func:`make_variant` and
:func:`choose_donor` build the ImageNet-9 style background variants :cite:`xiao2021noise` one sample at a time.

The functions here use only ``torch`` operations; the ``torchvision`` transforms built on them live in
:mod:`dml_bias.transforms`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from dml_bias._checks import check_choice, check_number, check_same_device, check_tensor, describe
from dml_bias.transforms._masking import (
    MASK_MODES,
    check_image,
    check_mask_options,
    foreground,
    mask_background_checked,
    prepare_mask,
    round_to_uint8,
    working_dtype,
)

__all__ = [
    "DONOR_RULES",
    "FILLS",
    "MODES",
    "VARIANTS",
    "choose_donor",
    "foreground_mask",
    "make_variant",
    "mask_background",
    "swap_background",
]

#: The masking modes of :func:`mask_background` and :class:`~dml_bias.transforms.BackgroundMask`.
MODES: tuple[str, ...] = MASK_MODES
#: How :func:`swap_background` fills the donor's object region.
FILLS: tuple[str, ...] = ("tile", "black", "inpaint")
#: The ImageNet-9 background variants built by :func:`make_variant`.
VARIANTS: tuple[str, ...] = (
    "original",
    "only_fg",
    "only_bg_b",
    "only_bg_t",
    "no_fg",
    "mixed_same",
    "mixed_rand",
    "mixed_next",
)
#: The donor rules of :func:`choose_donor` (the three mixed variants plus ``"random"``: any other sample).
DONOR_RULES: tuple[str, ...] = ("mixed_same", "mixed_rand", "mixed_next", "random")


def foreground_mask(
    mask: torch.Tensor, threshold: float = 0.5, background_ids: Sequence[int] | None = None
) -> torch.Tensor:
    r"""The boolean object (foreground) mask of any supported mask format.

    The formats, and how each becomes foreground:

    * ``bool``: used as is (``threshold`` is ignored).
    * floating point with values in ``[0, 1]`` (binary or soft): ``mask > threshold``.
    * integer with values in ``{0, 1}``: ``mask > threshold`` (so 1 is object for any ``threshold < 1``).
    * integer grey levels ``0..255`` (``{0, 255}`` or a soft segmentation, e.g. CUB's): ``mask / 255 >
      threshold``. A sample whose maximum is at most 1 is read as ``{0, 1}``, one whose maximum is above 1 as
      grey levels; the choice is made per sample (per ``(1, H, W)`` slice) on the device, without a host sync.
    * a class-id map (any integer values) with ``background_ids``: foreground is every pixel whose id is *not*
      in ``background_ids``; ``threshold`` is ignored.

    The comparison is strict: ``threshold=0`` makes every non-zero pixel object, ``threshold=1`` none.
    Values outside the allowed ranges raise ``ValueError`` for CPU tensors; on other devices they are not
    checked (that would need a host sync).

    Args:
        mask: ``(H, W)``, ``(1, H, W)`` or ``(..., 1, H, W)`` mask of any format above.
        threshold: Object level above which a pixel is foreground, in ``[0, 1]``.
        background_ids: Class ids that are background, for class-id maps; ``None`` for object masks.

    Returns:
        A ``bool`` tensor of the mask's shape, ``True`` on the object.

    Example:
        >>> import torch
        >>> foreground_mask(torch.tensor([[0, 100, 200, 255]], dtype=torch.uint8))
        tensor([[False, False,  True,  True]])
        >>> foreground_mask(torch.tensor([[0, 1]], dtype=torch.uint8))
        tensor([[False,  True]])
        >>> foreground_mask(torch.tensor([[0, 3, 7]]), background_ids=[0, 7])
        tensor([[False,  True, False]])
    """
    ids = check_mask_options("hard", 0.5, threshold, background_ids, False)
    check_tensor(mask, "mask")
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be a real (bool, integer or floating) tensor, got {describe(mask)}")
    if mask.ndim < 2:
        raise ValueError(f"mask must have shape (H, W) or (..., 1, H, W), got {describe(mask)}")
    return foreground(mask, threshold, ids)[0]


def mask_background(
    image: torch.Tensor,
    mask: torch.Tensor,
    mode: Literal["hard", "soft", "channel"] = "hard",
    sigma: float = 0.5,
    threshold: float = 0.5,
    background_ids: Sequence[int] | None = None,
    soft_alpha: bool = False,
) -> torch.Tensor:
    r"""Hide or weaken an image's background with its segmentation mask, or append the mask as a channel.

    With :math:`f \in \{0, 1\}` the foreground (:func:`foreground_mask`) and :math:`x` a pixel:

    .. math::

        \text{hard: } y = f\,x, \qquad
        \text{soft: } y = f\,x + (1 - f)\,\sigma x, \qquad
        \text{channel: } y = [x;\ s f]

    where :math:`s` is 255 for ``uint8`` images and 1 for floating-point ones. With ``soft_alpha=True`` the
    continuous object level :math:`a \in [0, 1]` of the mask (e.g. a soft segmentation's grey level / 255)
    replaces :math:`f`: hard gives :math:`a\,x`, soft :math:`x\,(a + (1 - a)\,\sigma)`, channel :math:`[x;\ s a]`
    (``threshold`` is then not used; for ``bool`` masks and class-id maps :math:`a = f`).

    Floating-point images stay in their dtype: hard mode gives exactly 0 and soft mode exactly ``x * sigma``
    (computed in the image's dtype) on the background, and the object pixels are copied. ``uint8`` images
    stay ``uint8``: weighted values are computed in float32 and rounded to the nearest integer with ties
    to even (``torch.round``), e.g. ``sigma=0.5`` maps 3 to 2 and 5 to 2. "0" is the value 0 of whatever
    the image holds: black before normalisation, the dataset mean colour after ``Normalize`` (see the guide).

    The result is a new tensor (the inputs are not modified). No Python loop over samples and no host sync:
    it runs batched on the GPU.

    Args:
        image: ``(C, H, W)`` or ``(..., C, H, W)`` image, ``uint8`` or floating point.
        mask: ``(H, W)``, ``(1, H, W)`` or ``(..., 1, H, W)`` mask (formats: :func:`foreground_mask`) whose
            batch dimensions broadcast to the image's; same device and same ``H, W`` as the image.
        mode: ``"hard"``, ``"soft"`` or ``"channel"``.
        sigma: Background factor of the soft mode, in ``(0, 1)``; checked but unused by the other modes.
        threshold: Object level above which a pixel is foreground, in ``[0, 1]``.
        background_ids: Class ids that are background when ``mask`` is a class-id map.
        soft_alpha: Use the mask's continuous object level as the weight instead of the thresholded mask.

    Returns:
        A tensor of the image's dtype and shape, except in channel mode: ``(..., C + 1, H, W)`` with the mask
        last (0/255 for ``uint8`` images, 0/1 for floating ones).

    Example:
        >>> import torch
        >>> image = torch.tensor([[[10, 20], [30, 40]]], dtype=torch.uint8)  # (1, 2, 2)
        >>> mask = torch.tensor([[255, 0], [0, 255]], dtype=torch.uint8)
        >>> mask_background(image, mask, "hard")
        tensor([[[10,  0],
                 [ 0, 40]]], dtype=torch.uint8)
        >>> mask_background(image, mask, "soft", sigma=0.25)
        tensor([[[10,  5],
                 [ 8, 40]]], dtype=torch.uint8)
        >>> mask_background(image.float() / 255, mask, "channel").shape
        torch.Size([2, 2, 2])
    """
    ids = check_mask_options(mode, sigma, threshold, background_ids, soft_alpha)
    return mask_background_checked(image, mask, mode, sigma, threshold, ids, soft_alpha)


Box = tuple[int, int, int, int]


def _object_box(fg: torch.Tensor, dilation: int) -> Box | None:
    """``(top, bottom, left, right)`` (bottom/right exclusive) of the ``(H, W)`` foreground, dilated; or None."""
    rows = torch.nonzero(fg.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(fg.any(dim=0)).flatten()
    h, w = fg.shape
    return (
        max(int(rows[0]) - dilation, 0),
        min(int(rows[-1]) + 1 + dilation, h),
        max(int(cols[0]) - dilation, 0),
        min(int(cols[-1]) + 1 + dilation, w),
    )


def _largest_free_rectangle(box: Box, h: int, w: int) -> Box | None:
    """The largest axis-aligned rectangle of an ``h x w`` image that does not meet ``box``.

    Every pixel outside a single box lies in one of the four full-width or full-height strips around it, and
    each of those is a rectangle, so the largest of the four is the answer (ties: top, bottom, left, right).
    """
    top, bottom, left, right = box
    strips = [(0, top, 0, w), (bottom, h, 0, w), (0, h, 0, left), (0, h, right, w)]
    best = max(strips, key=lambda r: (r[1] - r[0]) * (r[3] - r[2]))
    return best if (best[1] - best[0]) * (best[3] - best[2]) > 0 else None


def _tile(image: torch.Tensor, box: Box, source: Box, offset: tuple[int, int]) -> torch.Tensor:
    top, bottom, left, right = box
    s_top, s_bottom, s_left, s_right = source
    sh, sw = s_bottom - s_top, s_right - s_left
    rows = (torch.arange(bottom - top, device=image.device) + offset[0]) % sh + s_top
    cols = (torch.arange(right - left, device=image.device) + offset[1]) % sw + s_left
    out = image.clone()
    out[:, top:bottom, left:right] = image[:, rows][:, :, cols]
    return out


def _inpaint(image: torch.Tensor, box: Box) -> torch.Tensor:
    """Onion-peel mean in-painting of ``box``.

    From the border inwards, each unknown pixel next to known ones takes the mean of its known 8-neighbours.
    """
    top, bottom, left, right = box
    work_dtype = working_dtype(image)
    values = image.to(work_dtype).clone().unsqueeze(0)
    channels = values.shape[1]
    known = torch.ones(1, 1, *image.shape[-2:], dtype=work_dtype, device=image.device)
    known[..., top:bottom, left:right] = 0
    values[..., top:bottom, left:right] = 0
    kernel = torch.ones(1, 1, 3, 3, dtype=work_dtype, device=image.device)
    for _ in range(max(bottom - top, right - left)):
        total = F.conv2d(values * known, kernel.expand(channels, 1, 3, 3), padding=1, groups=channels)
        count = F.conv2d(known, kernel, padding=1)
        new = (known == 0) & (count > 0)
        if not bool(new.any()):
            break
        values = torch.where(new, total / count.clamp(min=1), values)
        known = torch.where(new, 1.0, known)
    out = values.squeeze(0)
    return round_to_uint8(out) if image.dtype == torch.uint8 else out.to(image.dtype)


def _remove_object(
    image: torch.Tensor, fg: torch.Tensor, fill: str, dilation: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Fill the dilated object box of ``image`` (``(C, H, W)``; ``fg`` is ``(H, W)`` bool)."""
    info: dict[str, Any] = {"fill": fill, "box": None, "tile_source": None, "tile_offset": None}
    box = _object_box(fg, dilation)
    if box is None:
        info["fill"] = "none"
        return image.clone(), info
    info["box"] = box
    h, w = image.shape[-2:]
    if fill == "tile":
        source = _largest_free_rectangle(box, h, w)
        if source is None:
            fill = "black"  # the box covers the whole image: nothing object-free to tile from
        else:
            sh, sw = source[1] - source[0], source[3] - source[2]
            offset = (0, 0)
            if generator is not None:
                draw = torch.randint(0, sh * sw, (1,), generator=generator, device=generator.device)
                offset = (int(draw) // sw, int(draw) % sw)
            info.update(tile_source=source, tile_offset=offset)
            return _tile(image, box, source, offset), info
    if fill == "inpaint" and box != (0, h, 0, w):
        return _inpaint(image, box), info
    info["fill"] = "black"
    out = image.clone()
    out[:, box[0] : box[1], box[2] : box[3]] = 0
    return out, info


def _check_single(image: Any, mask: Any, image_name: str, mask_name: str) -> torch.Tensor:
    check_image(image, image_name, exact_ndim=3)
    mask = prepare_mask(mask, image, mask_name, image_name)
    if mask.ndim != 3:
        raise ValueError(f"{mask_name} must have shape (H, W) or (1, H, W), got {describe(mask)}")
    return mask


def _check_swap_options(fill: str, threshold: float, dilation: int) -> None:
    check_choice(fill, "fill", FILLS)
    check_number(threshold, "threshold", low=0.0, high=1.0)
    check_number(dilation, "dilation", low=0, integer=True)


def _composite(image: torch.Tensor, level: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint8:
        return round_to_uint8(image.to(torch.float32) * level + background.to(torch.float32) * (1 - level))
    level = level.to(image.dtype)
    return image * level + background * (1 - level)


def swap_background(
    image: torch.Tensor,
    mask: torch.Tensor,
    donor_image: torch.Tensor,
    donor_mask: torch.Tensor,
    *,
    fill: Literal["tile", "black", "inpaint"] = "tile",
    threshold: float = 0.5,
    dilation: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    r"""Paste the object of ``image`` onto the background of ``donor_image``, with the donor's object removed.

    First the donor's object is erased: its foreground (``donor_mask`` thresholded as in
    :func:`foreground_mask`) is enclosed in a bounding box grown by ``dilation`` pixels on every side (so soft
    edges and shadows go too), and the whole box is filled:

    * ``"tile"`` (default, as the ImageNet-9 Backgrounds Challenge :cite:`xiao2021noise` built its variants):
      the box is tiled with the largest axis-aligned rectangle of the donor that does not meet the box (one of
      the four strips around it), repeated from the box's top-left corner shifted by ``tile_offset``. If the
      box covers the whole image, black is used instead (recorded in ``info["fill"]``).
    * ``"black"``: the box is set to 0.
    * ``"inpaint"``: onion-peel mean in-painting; from the box border inwards each pixel takes the mean of its
      already-filled 8-neighbours: a smooth, texture-free fill.

    Then the object is composited with the mask's object level :math:`m \in [0, 1]` as alpha (exactly
    binary for binary masks; soft segmentations blend their edges, as in Waterbirds and :cite:`kobs2022background`):

    .. math::

        y = x\,m + b\,(1 - m)

    where :math:`x` is ``image`` and :math:`b` the filled donor. Floating-point images compute this in their
    dtype; ``uint8`` images in float32, rounded half to even. No pixel of the donor's object survives where
    the result shows background: every such pixel lies inside the filled box.

    Args:
        image: ``(C, H, W)`` image whose object is kept, ``uint8`` or floating point.
        mask: ``(H, W)`` or ``(1, H, W)`` object mask of ``image`` (formats: :func:`foreground_mask`).
        donor_image: ``(C, H, W)`` image whose background is used; same shape, dtype and device as ``image``.
        donor_mask: Object mask of ``donor_image``.
        fill: How the donor's object box is filled: ``"tile"``, ``"black"`` or ``"inpaint"``.
        threshold: Object level above which a donor pixel is object, in ``[0, 1]``.
        dilation: Pixels added on each side of the donor's object box (``>= 0``).
        generator (torch.Generator | None): If given, the tiling offset is drawn from it (so repeated swaps do
            not all show the same seams); ``None`` gives offset ``(0, 0)``: the result is then deterministic.

    Returns:
        ``(result, info)``: the composited image (``image``'s shape and dtype) and a dict with ``"fill"`` (the
        fill actually used: ``"tile"``, ``"black"``, ``"inpaint"`` or ``"none"`` if the donor has no object),
        ``"requested_fill"``, ``"box"`` (the filled ``(top, bottom, left, right)`` box, or ``None``),
        ``"tile_source"`` and ``"tile_offset"`` (``None`` unless tiled), ``"threshold"`` and ``"dilation"``.

    Example:
        >>> import torch
        >>> image = torch.full((3, 8, 8), 200, dtype=torch.uint8)
        >>> mask = torch.zeros(1, 8, 8, dtype=torch.uint8)
        >>> mask[:, 2:4, 2:4] = 255
        >>> donor = torch.zeros(3, 8, 8, dtype=torch.uint8)
        >>> donor[0, 5:, 5:] = 255  # a red donor object in the bottom-right corner
        >>> out, info = swap_background(image, mask, donor, (donor > 0)[:1], dilation=1)
        >>> info["fill"], info["box"], info["tile_source"]
        ('tile', (4, 8, 4, 8), (0, 4, 0, 8))
        >>> int(out[0, 2, 2]), int(out[0, 6, 6])  # the object is kept, the donor's object is gone
        (200, 0)
    """
    _check_swap_options(fill, threshold, dilation)
    mask = _check_single(image, mask, "image", "mask")
    donor_mask = _check_single(donor_image, donor_mask, "donor_image", "donor_mask")
    if donor_image.shape != image.shape or donor_image.dtype != image.dtype:
        raise ValueError(
            f"donor_image must have the shape and dtype of image, got donor_image {describe(donor_image)} and "
            f"image {describe(image)}"
        )
    check_same_device(image=image, donor_image=donor_image)
    donor_fg = foreground(donor_mask, threshold, None, "donor_mask")[0][0]
    background, info = _remove_object(donor_image, donor_fg, fill, dilation, generator)
    fg, level = foreground(mask, threshold, None, dtype=working_dtype(image), need_level=True)
    alpha = fg.to(working_dtype(image)) if level is None else level
    info.update(requested_fill=fill, threshold=threshold, dilation=dilation)
    return _composite(image, alpha, background), info


def make_variant(
    name: str,
    image: torch.Tensor,
    mask: torch.Tensor,
    donor: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    fill: Literal["tile", "black", "inpaint"] = "tile",
    threshold: float = 0.5,
    dilation: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Render one sample as an ImageNet-9 background variant :cite:`xiao2021noise`.

    * ``"original"``: the image unchanged (a copy).
    * ``"only_fg"``: the object on black (:func:`mask_background`, hard mode).
    * ``"only_bg_b"``: the object's dilated box set to black (``fill`` is ignored).
    * ``"only_bg_t"``: the object's dilated box filled from the image's own background with ``fill``
      (default: tiled, as in ImageNet-9).
    * ``"no_fg"``: the object's silhouette (its foreground pixels) set to black.
    * ``"mixed_same"``, ``"mixed_rand"``, ``"mixed_next"``: the object on the background of ``donor``
      (:func:`swap_background`); pick the donor with :func:`choose_donor`.

    Args:
        name: One of :data:`VARIANTS`.
        image: ``(C, H, W)`` image, ``uint8`` or floating point.
        mask: ``(H, W)`` or ``(1, H, W)`` object mask (formats: :func:`foreground_mask`).
        donor: ``(donor_image, donor_mask)``, required by the mixed variants and unused otherwise.
        fill: Fill of ``only_bg_t`` and of the donor's object box in the mixed variants.
        threshold: Object level above which a pixel is object, in ``[0, 1]``.
        dilation: Pixels added on each side of object boxes (``>= 0``).
        generator (torch.Generator | None): Draws the tiling offset (see :func:`swap_background`).

    Returns:
        ``(result, info)``: the variant image and a dict with ``"variant"`` and the fill details of
        :func:`swap_background` (``"fill"`` is ``"none"`` for variants that fill nothing).

    Example:
        >>> import torch
        >>> image = torch.full((3, 6, 6), 100, dtype=torch.uint8)
        >>> mask = torch.zeros(1, 6, 6, dtype=torch.bool)
        >>> mask[:, 1:3, 1:3] = True
        >>> out, info = make_variant("no_fg", image, mask)
        >>> int(out[0, 1, 1]), int(out[0, 5, 5]), info["variant"]
        (0, 100, 'no_fg')
        >>> out, info = make_variant("only_bg_b", image, mask, dilation=1)
        >>> info["box"], int(out[:, :4, :4].max())
        ((0, 4, 0, 4), 0)
    """
    check_choice(name, "name", VARIANTS)
    _check_swap_options(fill, threshold, dilation)
    mask = _check_single(image, mask, "image", "mask")
    info: dict[str, Any] = {"variant": name, "fill": "none", "box": None, "tile_source": None, "tile_offset": None}
    if name in ("mixed_same", "mixed_rand", "mixed_next"):
        if not (isinstance(donor, (tuple, list)) and len(donor) == 2):
            raise ValueError(f"variant {name!r} needs donor=(donor_image, donor_mask), got {describe(donor)}")
        out, swap_info = swap_background(
            image, mask, donor[0], donor[1], fill=fill, threshold=threshold, dilation=dilation, generator=generator
        )
        info.update(swap_info)
        return out, info
    if name == "original":
        return image.clone(), info
    if name == "only_fg":
        return mask_background(image, mask, "hard", threshold=threshold), info
    fg = foreground(mask, threshold, None)[0]
    if name == "no_fg":
        return torch.where(fg, torch.zeros((), dtype=image.dtype, device=image.device), image), info
    out, fill_info = _remove_object(image, fg[0], "black" if name == "only_bg_b" else fill, dilation, generator)
    info.update(fill_info)
    return out, info


def choose_donor(
    rule: str,
    labels: torch.Tensor | Sequence[int],
    index: int | None = None,
    *,
    label: int | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the index of a background donor for a sample, by the ImageNet-9 class rule.

    * ``"mixed_same"``: another sample of the same class.
    * ``"mixed_rand"``: a sample of a different class.
    * ``"mixed_next"``: a sample of the next class: the next larger label present in ``labels``, wrapping
      from the largest to the smallest (``(c + 1) mod C`` for labels ``0..C-1``).
    * ``"random"``: any other sample.

    The candidates are drawn uniformly, excluding ``index`` itself.

    Args:
        rule: One of :data:`DONOR_RULES`.
        labels: ``(M,)`` integer labels of the donor pool.
        index: The sample's own position in the pool (excluded from the candidates), or ``None`` if the sample
            is not in the pool.
        label: The sample's class; default ``labels[index]`` (not needed by ``"random"``).
        generator (torch.Generator | None): Random generator (CPU); ``None`` uses torch's global RNG.

    Returns:
        The donor's index into ``labels``.

    Raises:
        ValueError: If no sample satisfies the rule (e.g. ``mixed_same`` for a class with a single sample).

    Example:
        >>> import torch
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> g = torch.Generator().manual_seed(0)
        >>> int(labels[choose_donor("mixed_next", labels, 5, generator=g)])
        0
        >>> choose_donor("mixed_same", labels, 2, generator=g)
        3
    """
    check_choice(rule, "rule", DONOR_RULES)
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(list(labels), dtype=torch.long)
    if labels.ndim != 1 or labels.numel() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a non-empty 1-D integer tensor, got {describe(labels)}")
    labels = labels.cpu()
    if index is not None:
        check_number(index, "index", low=0, high=labels.numel() - 1, integer=True)
    if label is None and index is not None:
        label = int(labels[index])
    if rule != "random":
        if label is None:
            raise ValueError(f"choose_donor with rule {rule!r} needs index or label, got neither")
        check_number(label, "label", integer=True)
    candidates = torch.ones_like(labels, dtype=torch.bool)
    c = -1 if label is None else label  # only the "random" rule gets here without a label, and ignores it
    if rule == "mixed_same":
        candidates = labels == c
    elif rule == "mixed_rand":
        candidates = labels != c
    elif rule == "mixed_next":
        classes = torch.unique(labels)
        later = classes[classes > c]
        target = later[0] if later.numel() else classes[0]
        candidates = labels == target
    if index is not None:
        candidates[index] = False
    pool = torch.nonzero(candidates).flatten()
    if pool.numel() == 0:
        raise ValueError(f"no donor satisfies rule {rule!r} for label {label} (index {index}) among {describe(labels)}")
    return int(pool[torch.randint(pool.numel(), (1,), generator=generator)])
