"""DeepFashion In-Shop Clothes Retrieval: 52,712 images of 7,982 clothing items, train / query / gallery.

The loader reads the partition file the user unpacked; it never downloads anything. See :class:`InShop`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dml_bias._checks import check_choice
from dml_bias.datasets._io import AnnotationError, RealImageDataset, read_lines, require_dir, require_file

__all__ = ["InShop"]

INSHOP_LAYOUT = """\
<root>/                                   ("In-shop Clothes Retrieval Benchmark")
  Eval/list_eval_partition.txt
  Img/img/{MEN,WOMEN}/<Category>/id_<8 digits>/<NN>_<k>_<view>.jpg   (img.zip unpacked inside Img/)
  Img/img_highres/...                     (highres=True; img_highres.zip unpacked inside Img/)"""

_SPLITS = ("train", "query", "gallery")


def _item_number(item_id: str, path: Path, line_no: int) -> int:
    digits = item_id.removeprefix("id_")
    if not item_id.startswith("id_") or not digits.isdigit():
        raise AnnotationError(path, line_no, f"item_id must look like 'id_00000001', got {item_id!r}")
    return int(digits)


class InShop(RealImageDataset):
    """DeepFashion In-Shop Clothes Retrieval: 52,712 images of 7,982 items; ``train`` / ``query`` / ``gallery``.

    Nothing is downloaded. Expected layout::

        <root>/                                   ("In-shop Clothes Retrieval Benchmark")
          Eval/list_eval_partition.txt
          Img/img/{MEN,WOMEN}/<Category>/id_<8 digits>/<NN>_<k>_<view>.jpg   (img.zip unpacked in Img/)
          Img/img_highres/...                     (highres=True)

    ``list_eval_partition.txt``: line 1 is the number of images, line 2 the column names
    ``image_name item_id evaluation_status``, then one row per image, columns padded with runs of spaces.
    ``image_name`` (``img/...``) is relative to ``Img/``; an ``img/`` folder directly in ``root`` is accepted too.

    The standard protocol trains on ``"train"`` (25,882 images, 3,997 items) and retrieves each ``"query"``
    image (14,218) against the ``"gallery"`` (12,612) only. Labels are 0-based item indices, numbered
    separately for ``train`` and for ``query`` ∪ ``gallery``, so a query and its gallery matches share a label.
    A sample is ``{"image": tv_tensors.Image (3, H, W) uint8, "label", "index", "meta": {"item_id",
    "image_name", "split"}}``; the class names are the item ids (``"id_00000080"``).

    Args:
        root: The folder described above.
        split: ``"train"``, ``"query"`` or ``"gallery"``.
        highres: Read the images of ``Img/img_highres/`` instead of ``Img/img/`` (256 × 256).
        transform: Callable applied to the whole sample dict.

    Raises:
        FileNotFoundError: The partition file or image folder is missing; the message names it.
        AnnotationError: A malformed line (a :class:`ValueError` naming the file and line number).

    Example:
        >>> from dml_bias.datasets import InShop
        >>> try:
        ...     InShop("/no/such/folder", "query")
        ... except FileNotFoundError as err:
        ...     print(str(err).splitlines()[0])
        missing In-Shop root folder /no/such/folder
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        *,
        highres: bool = False,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        super().__init__(transform)
        check_choice(split, "split", _SPLITS)
        self.root = Path(root)
        self.split = split
        self.highres = bool(highres)
        require_dir(self.root, layout=INSHOP_LAYOUT, what="In-Shop root")
        path = require_file(self.root / "Eval" / "list_eval_partition.txt", layout=INSHOP_LAYOUT)
        rows = self._parse(path)

        folder = "img_highres" if self.highres else "img"
        candidates = [self.root / "Img" / folder, self.root / folder]
        image_root = next((c.parent for c in candidates if c.is_dir()), None)
        if image_root is None:
            tried = " or ".join(str(c) for c in candidates)
            raise FileNotFoundError(f"missing image folder {tried}\nExpected layout:\n{INSHOP_LAYOUT}")

        group = ("train",) if split == "train" else ("query", "gallery")
        items = sorted({r[1] for r in rows if r[2] in group}, key=lambda item: int(item[3:]))
        label_of = {item: k for k, item in enumerate(items)}
        chosen = [r for r in rows if r[2] == split]
        self._class_names = items
        self._paths = [image_root / (folder + r[0][3:] if self.highres else r[0]) for r in chosen]
        self._labels = torch.tensor([label_of[r[1]] for r in chosen], dtype=torch.long)
        self._meta = [{"item_id": r[1], "image_name": r[0], "split": r[2]} for r in chosen]

    @staticmethod
    def _parse(path: Path) -> list[tuple[str, str, str]]:
        rows: list[tuple[str, str, str]] = []
        declared: int | None = None
        header_seen = False
        for line_no, text in read_lines(path):
            tokens = text.split()
            if declared is None and not header_seen and len(tokens) == 1 and tokens[0].isdigit():
                declared = int(tokens[0])
                continue
            if not header_seen and tokens[:1] == ["image_name"]:
                header_seen = True
                continue
            if len(tokens) != 3:
                raise AnnotationError(
                    path,
                    line_no,
                    f"expected 3 columns (image_name item_id evaluation_status), got {len(tokens)}: {text!r}",
                )
            name, item_id, status = tokens
            if status not in _SPLITS:
                raise AnnotationError(path, line_no, f"evaluation_status must be one of {_SPLITS}, got {status!r}")
            if not name.startswith("img/"):
                raise AnnotationError(path, line_no, f"image_name must start with 'img/', got {name!r}")
            _item_number(item_id, path, line_no)
            rows.append((name, item_id, status))
        if declared is not None and declared != len(rows):
            raise AnnotationError(
                path, 1, f"line 1 declares {declared} images but the file lists {len(rows)} (truncated copy?)"
            )
        return rows

    def _extra_repr(self) -> str:
        """Split and options, for ``repr``."""
        return f"split={self.split!r}, highres={self.highres}"
