"""A generic folder of images with object masks: the format of the background-bias audit.

:class:`MaskedFolder` reads two layouts, both with one sub-folder per class (classes sorted by name get labels
``0, 1, …``; files sorted by name):

* with masks (``masks=True``, the default)::

      ROOT/images/<class>/<file>          any image PIL reads (.jpg, .png, …)
      ROOT/masks/<class>/<stem>.png       its object mask: same size, 0 = background, 1 or 255 = object

* without masks (``masks=False``), the ``torchvision`` ImageFolder layout ``ROOT/<class>/<file>`` (or
  ``ROOT/images/<class>/<file>``); masks then come from elsewhere, e.g. a segmenter
  (``dml-bias audit --masks-from``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dml_bias.datasets._io import RealImageDataset, read_mask, require_dir

__all__ = ["IMAGE_EXTENSIONS", "MaskedFolder"]

#: File name endings read as images (compared in lower case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

_LAYOUT = """ROOT/images/<class>/<file>      (images, one folder per class)
ROOT/masks/<class>/<stem>.png    (object masks: same size as the image, 0 = background, 1 or 255 = object)"""
_LAYOUT_NO_MASKS = "ROOT/<class>/<file>              (images, one folder per class)"


class MaskedFolder(RealImageDataset):
    """Images in one folder per class, with an object mask per image (the audit's generic data format).

    Samples are the library's dicts: ``{"image": tv_tensors.Image (3, H, W) uint8, "mask": tv_tensors.Mask
    (1, H, W) uint8 (255 = object), "label": int, "index": int, "meta": {"path", "class"}}`` (no ``"mask"`` with
    ``masks=False``). A mask's grey levels are kept (a soft mask: object where above half); 0/1 masks are scaled
    to 0/255.

    Checked when the folder is opened: the folders exist, every class holds at least two images (a retrieval
    query needs another image of its class) and every image has its mask. Checked when a sample is read: the
    image decodes (:class:`~dml_bias.datasets.CorruptImageError` names the path) and the mask has the image's
    size (:class:`ValueError` names both files).

    Args:
        root: The folder (see the module notes for the layouts).
        masks: Read ``ROOT/masks/``; ``False``: images only (the ImageFolder layout).
        transform: A callable applied to the whole sample dict (e.g. a ``torchvision.transforms.v2`` pipeline).

    Attributes:
        labels: ``(N,)`` long tensor, the class of every sample.
        class_names: The class folder names, indexed by label.
        paths: The image file of every sample.

    Raises:
        FileNotFoundError: A missing folder or mask file (the message names it and shows the layout).
        ValueError: A class with fewer than two images, or no image at all.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for c in ("cat", "dog"):
        ...     for i in range(2):
        ...         (root / "images" / c).mkdir(parents=True, exist_ok=True)
        ...         (root / "masks" / c).mkdir(parents=True, exist_ok=True)
        ...         Image.new("RGB", (8, 6)).save(root / "images" / c / f"{i}.jpg")
        ...         Image.new("L", (8, 6), 255).save(root / "masks" / c / f"{i}.png")
        >>> ds = MaskedFolder(root)
        >>> len(ds), ds.class_names, ds[3]["label"]
        (4, ['cat', 'dog'], 1)
        >>> ds[0]["image"].shape, ds[0]["mask"].shape, int(ds[0]["mask"].max())
        (torch.Size([3, 6, 8]), torch.Size([1, 6, 8]), 255)
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        masks: bool = True,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        super().__init__(transform)
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a folder path (str or pathlib.Path), got {type(root).__name__}")
        if not isinstance(masks, bool):
            raise TypeError(f"masks must be True or False, got {type(masks).__name__}")
        self.root = Path(root)
        self.masks = masks
        layout = _LAYOUT if masks else _LAYOUT_NO_MASKS
        require_dir(self.root, layout=layout, what="data")
        if masks:
            image_dir = require_dir(self.root / "images", layout=layout, what="images")
            self._mask_dir: Path | None = require_dir(self.root / "masks", layout=layout, what="masks")
        else:
            image_dir = self.root / "images" if (self.root / "images").is_dir() else self.root
            self._mask_dir = None
        self.image_dir = image_dir
        classes = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ValueError(f"{image_dir} holds no class folder; expected layout:\n{layout}")
        paths: list[Path] = []
        labels: list[int] = []
        meta: list[dict[str, Any]] = []
        for label, name in enumerate(classes):
            files = sorted(
                p
                for p in (image_dir / name).iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if len(files) < 2:
                raise ValueError(
                    f"class folder {image_dir / name} holds {len(files)} image(s); every class needs at least 2 "
                    "(a query needs another image of its class)"
                )
            for path in files:
                if self._mask_dir is not None:
                    mask_path = self._mask_dir / name / f"{path.stem}.png"
                    if not mask_path.is_file():
                        raise FileNotFoundError(
                            f"missing mask file {mask_path} for image {path}\nExpected layout:\n{layout}"
                        )
                paths.append(path)
                labels.append(label)
                meta.append({"path": str(path.relative_to(image_dir)), "class": name})
        self._paths = paths
        self._labels = torch.tensor(labels, dtype=torch.long)
        self._class_names = classes
        self._meta = meta

    def mask_path(self, index: int) -> Path:
        """The mask file of sample ``index`` (``masks=True`` only)."""
        if self._mask_dir is None:
            raise RuntimeError("this MaskedFolder was opened with masks=False: it has no mask files")
        index = self._check_index(index)
        path = self._paths[index]
        return self._mask_dir / path.parent.name / f"{path.stem}.png"

    def _extra(self, index: int, sample: dict[str, Any]) -> None:
        if self._mask_dir is None:
            return
        from torchvision import tv_tensors

        mask_path = self.mask_path(index)
        mask = read_mask(mask_path)
        height, width = sample["image"].shape[-2:]
        if tuple(mask.shape[-2:]) != (height, width):
            raise ValueError(
                f"mask {mask_path} has size {tuple(mask.shape[-2:])} (H, W) but its image {self._paths[index]} has "
                f"size {(height, width)}; a mask must have its image's size"
            )
        if int(mask.max()) <= 1:
            mask = tv_tensors.Mask(mask * 255)
        sample["mask"] = mask

    def _extra_repr(self) -> str:
        return f"root={str(self.root)!r}, masks={self.masks}"
