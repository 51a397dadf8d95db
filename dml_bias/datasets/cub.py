"""CUB-200-2011 (Caltech-UCSD Birds) with segmentations, bounding boxes and the 312 attributes.

The loader reads the files of the official archives ``CUB_200_2011.tgz`` and ``segmentations.tgz``; it never
downloads anything. See :class:`CUB200` for the expected folder layout and the splits it offers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from dml_bias._checks import check_choice
from dml_bias.datasets._io import (
    AnnotationError,
    BoxSource,
    RealImageDataset,
    check_box,
    check_box_inside,
    find_existing,
    parse_float,
    parse_int,
    read_mask,
    read_table,
    require_dir,
    require_file,
)

__all__ = ["CUB200"]

CUB_LAYOUT = """\
<root>/
  attributes.txt                         (optional; also looked for in CUB_200_2011/ and CUB_200_2011/attributes/)
  CUB_200_2011/
    images.txt  image_class_labels.txt  classes.txt  train_test_split.txt  bounding_boxes.txt
    images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg  ...
    attributes/image_attribute_labels.txt
  segmentations/                         (masks=True; CUB_200_2011/segmentations/ is accepted too)
    001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.png  ..."""

#: Number of classes of the DML training split (class ids 1..100 train, 101..200 test).
_DML_TRAIN_CLASSES = 100
_PROTOCOLS = ("dml", "classification", "fewshot_base", "fewshot_val", "fewshot_novel")


def _locate_base(root: Path) -> Path:
    """The folder that holds ``images.txt``: ``<root>/CUB_200_2011`` or ``<root>`` itself."""
    require_dir(root, layout=CUB_LAYOUT, what="CUB-200-2011 root")
    for base in (root / "CUB_200_2011", root):
        if (base / "images.txt").is_file():
            return base
    raise FileNotFoundError(
        f"missing file {root / 'CUB_200_2011' / 'images.txt'} (also looked for {root / 'images.txt'})\n"
        f"Expected layout:\n{CUB_LAYOUT}"
    )


def _id_map(path: Path, columns: str, *, as_int: bool, allowed: tuple[int, ...] | None = None) -> dict[int, Any]:
    """Parse a ``<id> <value>`` file (names may contain spaces when ``as_int`` is False).

    ``allowed``: the only integer values the second column may hold (e.g. ``(0, 1)`` for a flag).
    """
    first = columns.split()[0]
    out: dict[int, Any] = {}
    for line_no, tokens in read_table(path, min_columns=2, layout=CUB_LAYOUT, columns=columns):
        key = parse_int(tokens[0], path, line_no, first)
        if key in out:
            raise AnnotationError(path, line_no, f"duplicate {first} {key}")
        if as_int:
            if len(tokens) != 2:
                raise AnnotationError(path, line_no, f"expected 2 columns ({columns}), got {len(tokens)}")
            value = parse_int(tokens[1], path, line_no, columns.split()[1])
            if allowed is not None and value not in allowed:
                raise AnnotationError(
                    path, line_no, f"column {columns.split()[1]} must be one of {list(allowed)}, got {value}"
                )
            out[key] = value
        else:
            out[key] = " ".join(tokens[1:])
    return out


def _valid_attribute_rows(table: np.ndarray) -> np.ndarray:
    image_id, attr_id, present, certainty = table.T
    return (image_id >= 1) & (attr_id >= 1) & ((present == 0) | (present == 1)) & (certainty >= 1) & (certainty <= 4)


class CUB200(RealImageDataset):
    """CUB-200-2011: 11,788 bird images of 200 species, with soft segmentations and 312 attributes.

    Nothing is downloaded: unpack ``CUB_200_2011.tgz`` (and ``segmentations.tgz`` for masks) into ``root``.
    ``root`` may be the folder that holds ``CUB_200_2011/`` or ``CUB_200_2011/`` itself. Expected layout::

        <root>/
          attributes.txt                 (optional; also found in CUB_200_2011/ or CUB_200_2011/attributes/)
          CUB_200_2011/
            images.txt  image_class_labels.txt  classes.txt
            train_test_split.txt         (protocol="classification")
            bounding_boxes.txt           (boxes=True)
            images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg  ...
            attributes/image_attribute_labels.txt                                  (attributes=True)
          segmentations/                 (masks=True; CUB_200_2011/segmentations/ works too)
            001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.png  ...

    Images are joined with their class, split flag, box and attributes by ``image_id`` (never by line
    position). The mask of ``images/<class>/<stem>.jpg`` is ``segmentations/<class>/<stem>.png``.

    Protocols and splits (``split="all"`` takes every image of the protocol's classes):

    * ``"dml"`` (default): the zero-shot deep-metric-learning split; class ids 1–100 are ``"train"``
      (5,864 images), 101–200 are ``"test"`` (5,924 images). ``train_test_split.txt`` is ignored.
    * ``"classification"``: the official per-image split of ``train_test_split.txt`` (5,994 / 5,794), all
      200 classes in both splits.
    * ``"fewshot_base"``, ``"fewshot_val"``, ``"fewshot_novel"``: the few-shot split used by PAN ("A Closer
      Look at Few-shot Classification"): the class folders sorted by name, 0-based position ``i``; base if
      ``i % 2 == 0`` (100 classes), val if ``i % 4 == 1`` (50), novel if ``i % 4 == 3`` (50). These are whole
      classes, so ``split`` must be ``"all"`` (the default for them).

    Labels are 0-based within the chosen subset, in class-id order; :attr:`class_ids` maps them back to
    the 1-based ids of ``classes.txt``.

    A sample is a dict that ``torchvision.transforms.v2`` transforms as a whole:

    * ``"image"``: ``tv_tensors.Image`` (3, H, W) uint8 RGB;
    * ``"mask"`` (``masks=True``): ``tv_tensors.Mask`` (1, H, W) uint8; the soft grey levels of the
      segmentation (255 = bird), not thresholded;
    * ``"boxes"`` (``boxes=True``): ``tv_tensors.BoundingBoxes`` (1, 4) float32, XYXY, from ``bounding_boxes.txt``;
    * ``"attributes"`` (``attributes=True``): (312,) uint8, 1 where the attribute is marked present;
    * ``"attribute_certainty"`` (``attributes=True``): (312,) uint8 certainty id, 1 = not visible, 2 = guessing,
      3 = probably, 4 = definitely (0 = no annotation line). PAN counts an attribute as certain if the id
      is > 2;
    * ``"label"`` (int), ``"index"`` (int), ``"meta"``: ``{"image_id": int, "class_id": int, "path": str}``
      (``path`` relative to ``images/``).

    ``image_attribute_labels.txt`` is known to hold a few lines with extra tokens; only the first four
    (``image_id attribute_id is_present certainty_id``) are read.

    Args:
        root: The folder described above.
        split: ``"train"``, ``"test"`` or ``"all"``; ``None`` means ``"train"`` for the ``"dml"`` and
            ``"classification"`` protocols and ``"all"`` for the few-shot ones.
        masks: Return the segmentation as ``"mask"``.
        attributes: Return ``"attributes"`` and ``"attribute_certainty"``.
        protocol: ``"dml"``, ``"classification"``, ``"fewshot_base"``, ``"fewshot_val"`` or ``"fewshot_novel"``.
        boxes: Return the bounding box as ``"boxes"``.
        transform: Callable applied to the whole sample dict.

    Raises:
        FileNotFoundError: A needed file or folder is missing; the message names it and shows the layout.
        AnnotationError: A malformed annotation line (a :class:`ValueError` naming the file and line number): a
            bad column count or number, an empty ``images.txt``, a ``train_test_split.txt`` flag other than 0/1,
            a box that is not finite or has a negative size, or (when the sample is read) a box outside its image.

    Example:
        >>> from dml_bias.datasets import CUB200
        >>> try:
        ...     CUB200("/no/such/folder", masks=True, attributes=True)
        ... except FileNotFoundError as err:
        ...     print(str(err).splitlines()[0])
        missing CUB-200-2011 root folder /no/such/folder
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | None = None,
        masks: bool = False,
        attributes: bool = False,
        protocol: str = "dml",
        *,
        boxes: bool = False,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        super().__init__(transform)
        check_choice(protocol, "protocol", _PROTOCOLS)
        fewshot = protocol.startswith("fewshot")
        if split is None:
            split = "all" if fewshot else "train"
        check_choice(split, "split", ("train", "test", "all"))
        if fewshot and split != "all":
            raise ValueError(
                f"split must be 'all' (or None) with protocol={protocol!r}: the few-shot subsets are whole "
                f"classes, got split={split!r}"
            )
        self.root = Path(root)
        self.split = split
        self.protocol = protocol
        self.masks = bool(masks)
        self.attributes_enabled = bool(attributes)
        self.boxes = bool(boxes)

        base = _locate_base(self.root)
        self._base = base
        images_dir = require_dir(base / "images", layout=CUB_LAYOUT, what="image")
        names = _id_map(base / "images.txt", "image_id image_name", as_int=False)
        if not names:
            raise AnnotationError(base / "images.txt", None, "lists no image (expected lines '<image_id> <path>')")
        class_of = _id_map(base / "image_class_labels.txt", "image_id class_id", as_int=True)
        classes = _id_map(base / "classes.txt", "class_id class_name", as_int=False)
        for image_id in names:
            if image_id not in class_of:
                raise AnnotationError(base / "image_class_labels.txt", None, f"no line for image_id {image_id}")
            if class_of[image_id] not in classes:
                raise AnnotationError(
                    base / "classes.txt", None, f"no line for class_id {class_of[image_id]} (used by image {image_id})"
                )

        chosen_classes = self._choose_classes(classes, protocol, split)
        image_ids = sorted(i for i in names if class_of[i] in chosen_classes)
        if protocol == "classification" and split != "all":
            is_train = _id_map(base / "train_test_split.txt", "image_id is_training_image", as_int=True, allowed=(0, 1))
            want = 1 if split == "train" else 0
            missing = [i for i in image_ids if i not in is_train]
            if missing:
                raise AnnotationError(base / "train_test_split.txt", None, f"no line for image_id {missing[0]}")
            image_ids = [i for i in image_ids if is_train[i] == want]

        self._class_ids = sorted(chosen_classes)
        label_of = {cid: k for k, cid in enumerate(self._class_ids)}
        self._class_names = [classes[cid] for cid in self._class_ids]
        self._image_ids = image_ids
        self._paths = [images_dir / names[i] for i in image_ids]
        self._labels = torch.tensor([label_of[class_of[i]] for i in image_ids], dtype=torch.long)
        self._meta = [{"image_id": i, "class_id": class_of[i], "path": names[i]} for i in image_ids]

        self._seg_dir: Path | None = None
        if self.masks:
            self._seg_dir = find_existing(
                [base.parent / "segmentations", base / "segmentations"],
                kind="dir",
                layout=CUB_LAYOUT,
                what="segmentations",
            )
        self._boxes: torch.Tensor | None = None
        self._box_sources: list[BoxSource] = []
        if self.boxes:
            self._boxes = self._read_boxes(base / "bounding_boxes.txt", image_ids)
        self._attributes: torch.Tensor | None = None
        self._certainty: torch.Tensor | None = None
        self._attribute_names: list[str] = []
        if self.attributes_enabled:
            self._read_attributes(image_ids)

    @staticmethod
    def _choose_classes(classes: dict[int, str], protocol: str, split: str) -> set[int]:
        if protocol == "dml":
            if split == "train":
                return {c for c in classes if c <= _DML_TRAIN_CLASSES}
            if split == "test":
                return {c for c in classes if c > _DML_TRAIN_CLASSES}
            return set(classes)
        if protocol == "classification":
            return set(classes)
        # Few-shot: position in the list of class folders sorted by name.
        by_name = sorted(classes, key=lambda c: classes[c])
        remainder = {"fewshot_base": (2, 0), "fewshot_val": (4, 1), "fewshot_novel": (4, 3)}[protocol]
        return {c for i, c in enumerate(by_name) if i % remainder[0] == remainder[1]}

    def _read_boxes(self, path: Path, image_ids: list[int]) -> torch.Tensor:
        """The ``(N, 4)`` XYXY boxes of ``image_ids``; finite, with non-negative sizes (checked for every line)."""
        columns = "image_id x y width height"
        table: dict[int, tuple[float, float, float, float]] = {}
        lines: dict[int, int] = {}
        for line_no, tokens in read_table(path, min_columns=5, max_columns=5, layout=CUB_LAYOUT, columns=columns):
            image_id = parse_int(tokens[0], path, line_no, "image_id")
            if image_id in table:
                raise AnnotationError(path, line_no, f"duplicate image_id {image_id} (first on line {lines[image_id]})")
            x, y, w, h = (
                parse_float(t, path, line_no, c) for t, c in zip(tokens[1:], columns.split()[1:], strict=True)
            )
            if w < 0 or h < 0:
                raise AnnotationError(path, line_no, f"width and height must be >= 0, got width={w}, height={h}")
            table[image_id] = check_box((x, y, x + w, y + h), BoxSource(path, line_no))
            lines[image_id] = line_no
        missing = [i for i in image_ids if i not in table]
        if missing:
            raise AnnotationError(path, None, f"no line for image_id {missing[0]}")
        self._box_sources = [BoxSource(path, lines[i]) for i in image_ids]
        return torch.tensor([table[i] for i in image_ids], dtype=torch.float32).reshape(-1, 4)

    @staticmethod
    def _attribute_table(path: Path) -> np.ndarray:
        """(L, 4) int64 ``image_id attribute_id is_present certainty_id`` rows of ``image_attribute_labels.txt``."""
        # Fast path (about 2 s for the 3.7 M lines): numpy reads the first four columns and ignores the extra
        # tokens that a few lines of the shipped file carry. On any problem, the slow path below re-reads the
        # file line by line to report the exact file and line.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an empty file warns; it is handled below
                table = np.loadtxt(path, usecols=(0, 1, 2, 3), dtype=np.int64, ndmin=2, comments=None)
            if len(table) == 0 or _valid_attribute_rows(table).all():
                return table.reshape(-1, 4)
        except ValueError:
            pass
        rows: list[tuple[int, int, int, int]] = []
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line_no, line in enumerate(handle, start=1):
                tokens = line.split(None, 4)
                if not tokens:
                    continue
                if len(tokens) < 4:
                    raise AnnotationError(
                        path,
                        line_no,
                        "expected at least 4 columns (image_id attribute_id is_present certainty_id [time]), "
                        f"got {len(tokens)}: {line.rstrip()!r}",
                    )
                try:
                    row = tuple(int(t) for t in tokens[:4])
                except ValueError:
                    raise AnnotationError(
                        path, line_no, f"the first four columns must be integers, got {line.rstrip()!r}"
                    ) from None
                if not _valid_attribute_rows(np.asarray([row])).all():
                    raise AnnotationError(
                        path,
                        line_no,
                        "expected image_id >= 1, attribute_id >= 1, is_present in {0, 1} and certainty_id in 1..4, "
                        f"got {line.rstrip()!r}",
                    )
                rows.append(row)  # type: ignore[arg-type]
        return np.asarray(rows, dtype=np.int64).reshape(-1, 4)

    def _read_attributes(self, image_ids: list[int]) -> None:
        base = self._base
        path = require_file(base / "attributes" / "image_attribute_labels.txt", layout=CUB_LAYOUT)
        table = self._attribute_table(path)
        row_of = np.full(int(table[:, 0].max(initial=0)) + 1, -1, dtype=np.int64)
        ids = np.asarray(image_ids, dtype=np.int64)
        known = (ids >= 0) & (ids < len(row_of))
        row_of[ids[known]] = np.arange(len(ids))[known]
        keep = row_of[table[:, 0]] >= 0
        rows, attrs = row_of[table[keep, 0]], table[keep, 1] - 1

        names_file = None
        for candidate in (
            base.parent / "attributes.txt",
            base / "attributes.txt",
            base / "attributes" / "attributes.txt",
        ):
            if candidate.is_file():
                names_file = candidate
                break
        names: dict[int, str] = {}
        if names_file is not None:
            names = _id_map(names_file, "attribute_id attribute_name", as_int=False)
        num_attributes = max(len(names), max(names, default=0), int(table[:, 1].max(initial=0)))
        present_matrix = np.zeros((len(image_ids), num_attributes), dtype=np.uint8)
        certainty_matrix = np.zeros((len(image_ids), num_attributes), dtype=np.uint8)
        present_matrix[rows, attrs] = table[keep, 2]
        certainty_matrix[rows, attrs] = table[keep, 3]
        self._attributes = torch.from_numpy(present_matrix)
        self._certainty = torch.from_numpy(certainty_matrix)
        self._attribute_names = [names.get(k + 1, f"attribute_{k + 1}") for k in range(num_attributes)]

    @property
    def class_ids(self) -> list[int]:
        """The 1-based ``classes.txt`` id of every label."""
        return list(self._class_ids)

    @property
    def image_ids(self) -> list[int]:
        """The 1-based ``images.txt`` id of every sample."""
        return list(self._image_ids)

    @property
    def attributes(self) -> torch.Tensor:
        """(N, 312) uint8 matrix, 1 where image n has attribute k (needs ``attributes=True``)."""
        if self._attributes is None:
            raise RuntimeError("attributes were not loaded: construct CUB200(..., attributes=True)")
        return self._attributes.clone()

    @property
    def attribute_certainty(self) -> torch.Tensor:
        """(N, 312) uint8 certainty ids 1..4 (0 = not annotated; needs ``attributes=True``)."""
        if self._certainty is None:
            raise RuntimeError("attributes were not loaded: construct CUB200(..., attributes=True)")
        return self._certainty.clone()

    @property
    def attribute_names(self) -> list[str]:
        """Names of the attributes from ``attributes.txt`` (``attribute_<id>`` when that file is absent)."""
        if self._attributes is None:
            raise RuntimeError("attributes were not loaded: construct CUB200(..., attributes=True)")
        return list(self._attribute_names)

    def mask_path(self, index: int) -> Path:
        """The segmentation file of sample ``index`` (needs ``masks=True``)."""
        if self._seg_dir is None:
            raise RuntimeError("masks were not requested: construct CUB200(..., masks=True)")
        index = self._check_index(index)
        return (self._seg_dir / str(self._meta[index]["path"])).with_suffix(".png")

    def _extra(self, index: int, sample: dict[str, Any]) -> None:
        image = sample["image"]
        height, width = image.shape[-2:]
        if self._seg_dir is not None:
            mask_path = self.mask_path(index)
            mask = read_mask(mask_path)
            if tuple(mask.shape[-2:]) != (height, width):
                raise ValueError(
                    f"segmentation {mask_path} has size {tuple(mask.shape[-2:])} (H, W) but image "
                    f"{self._paths[index]} has size {(height, width)}"
                )
            sample["mask"] = mask
        if self._boxes is not None:
            box = self._boxes[index].tolist()
            check_box_inside(box, width, height, self._paths[index], self._box_sources[index])
            sample["boxes"] = tv_tensors.BoundingBoxes(
                self._boxes[index : index + 1].clone(), format="XYXY", canvas_size=(height, width)
            )
        if self._attributes is not None and self._certainty is not None:
            sample["attributes"] = self._attributes[index].clone()
            sample["attribute_certainty"] = self._certainty[index].clone()

    def _extra_repr(self) -> str:
        """Split, protocol and options, for ``repr``."""
        return (
            f"split={self.split!r}, protocol={self.protocol!r}, masks={self.masks}, "
            f"attributes={self.attributes_enabled}, boxes={self.boxes}"
        )
