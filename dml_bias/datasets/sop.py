"""Stanford Online Products (SOP): 120,053 product images of 22,634 products in 12 categories.

The loader reads the lists the user unpacked; it never downloads anything. See :class:`StanfordOnlineProducts`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dml_bias._checks import check_choice
from dml_bias.datasets._io import AnnotationError, RealImageDataset, parse_int, read_table, require_dir

__all__ = ["StanfordOnlineProducts"]

SOP_LAYOUT = """\
<root>/                          (Stanford_Online_Products/ itself, or the folder that holds it)
  Ebay_train.txt  Ebay_test.txt  (header line "image_id class_id super_class_id path", then one row per image)
  bicycle_final/111085122871_0.JPG  cabinet_final/110715681235_0.JPG  ..."""

_COLUMNS = "image_id class_id super_class_id path"


def _locate_base(root: Path) -> Path:
    require_dir(root, layout=SOP_LAYOUT, what="Stanford Online Products root")
    for base in (root, root / "Stanford_Online_Products"):
        if (base / "Ebay_train.txt").is_file() or (base / "Ebay_test.txt").is_file():
            return base
    return root


class StanfordOnlineProducts(RealImageDataset):
    """Stanford Online Products (SOP): 120,053 images of 22,634 products (classes) in 12 super-classes.

    Nothing is downloaded. ``root`` is ``Stanford_Online_Products/`` or the folder that holds it::

        Stanford_Online_Products/
          Ebay_info.txt  Ebay_train.txt  Ebay_test.txt
          bicycle_final/111085122871_0.JPG  cabinet_final/110715681235_0.JPG  ...

    ``Ebay_<split>.txt`` starts with the header line ``image_id class_id super_class_id path``, then holds one
    space-separated row per image; ``path`` is relative to ``Stanford_Online_Products/`` and used verbatim
    (the extension is upper-case ``.JPG``). The standard DML split is the two files as shipped: ``"train"`` =
    classes 1–11,318 (59,551 images), ``"test"`` = classes 11,319–22,634 (60,502 images).

    Labels are the products, 0-based within the split in class-id order (:attr:`class_ids` maps back). A
    sample is ``{"image": tv_tensors.Image (3, H, W) uint8, "label", "super_label", "index", "meta":
    {"image_id", "class_id", "super_class_id", "path"}}``; ``super_label`` is the 0-based category
    (``super_class_id - 1``, the same in both splits), named by :attr:`super_class_names` after its folder
    (``bicycle_final`` → ``"bicycle"``). Grey images are converted to RGB.

    Args:
        root: The folder described above.
        split: ``"train"`` or ``"test"``.
        transform: Callable applied to the whole sample dict.

    Raises:
        FileNotFoundError: The list file is missing; the message names it and shows the layout.
        AnnotationError: A malformed row (a :class:`ValueError` naming the file and line number), a repeated
            ``image_id``, or a list without any sample (only the header).

    Example:
        >>> from dml_bias.datasets import StanfordOnlineProducts
        >>> try:
        ...     StanfordOnlineProducts("/no/such/folder", "train")
        ... except FileNotFoundError as err:
        ...     print(str(err).splitlines()[0])
        missing Stanford Online Products root folder /no/such/folder
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        *,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        super().__init__(transform)
        check_choice(split, "split", ("train", "test"))
        self.root = Path(root)
        self.split = split
        base = _locate_base(self.root)
        path = base / f"Ebay_{split}.txt"
        rows = []
        first_line: dict[int, int] = {}
        for line_no, tokens in read_table(path, min_columns=4, max_columns=4, layout=SOP_LAYOUT, columns=_COLUMNS):
            if line_no == 1 and not tokens[0].lstrip("-").isdigit():
                continue  # the header line
            image_id, class_id, super_id = (
                parse_int(tokens[k], path, line_no, name) for k, name in enumerate(_COLUMNS.split()[:3])
            )
            if class_id < 1 or super_id < 1:
                raise AnnotationError(path, line_no, f"class_id and super_class_id are 1-based, got {tokens[:3]}")
            if image_id in first_line:
                raise AnnotationError(
                    path, line_no, f"duplicate image_id {image_id} (first on line {first_line[image_id]})"
                )
            first_line[image_id] = line_no
            rows.append((image_id, class_id, super_id, tokens[3]))
        if not rows:
            raise AnnotationError(path, None, f"lists no image (expected rows '{_COLUMNS}' after the header)")

        class_ids = sorted({r[1] for r in rows})
        label_of = {c: k for k, c in enumerate(class_ids)}
        super_names: dict[int, str] = {}
        for _, _, super_id, rel in rows:
            folder = rel.split("/", 1)[0] if "/" in rel else ""
            super_names.setdefault(super_id, folder.removesuffix("_final") if folder else f"super_class_{super_id}")
        num_super = max(super_names, default=0)
        self._super_class_names = [super_names.get(s, f"super_class_{s}") for s in range(1, num_super + 1)]
        self._class_ids = class_ids
        self._class_names = [str(c) for c in class_ids]
        self._paths = [base / r[3] for r in rows]
        self._labels = torch.tensor([label_of[r[1]] for r in rows], dtype=torch.long)
        self._super_labels = torch.tensor([r[2] - 1 for r in rows], dtype=torch.long)
        self._meta = [{"image_id": r[0], "class_id": r[1], "super_class_id": r[2], "path": r[3]} for r in rows]

    @property
    def class_ids(self) -> list[int]:
        """The 1-based ``class_id`` of every label (the class names are these ids as strings)."""
        return list(self._class_ids)

    @property
    def super_labels(self) -> torch.Tensor:
        """1-D ``torch.long`` tensor, the 0-based category (``super_class_id - 1``) of every sample."""
        return self._super_labels.clone()

    @property
    def super_class_names(self) -> list[str]:
        """Category names indexed by super label (from the image folders, e.g. ``"bicycle"``)."""
        return list(self._super_class_names)

    def _extra(self, index: int, sample: dict[str, Any]) -> None:
        sample["super_label"] = int(self._super_labels[index])

    def _extra_repr(self) -> str:
        """The split, for ``repr``."""
        return f"split={self.split!r}"
