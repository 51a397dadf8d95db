"""Cars196 (Stanford Cars): 16,185 images of 196 car models, read from the official ``.mat`` annotations.

The loader reads the files the user unpacked; it never downloads anything. See :class:`Cars196`.
"""

from __future__ import annotations

import os
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
    require_dir,
)

__all__ = ["Cars196"]

CARS_LAYOUT = """\
DML layout (car_ims.tgz + cars_annos.mat):
<root>/
  cars_annos.mat
  car_ims/000001.jpg ... 016185.jpg
or the devkit layout of the classification release:
<root>/
  cars_train/00001.jpg ...   cars_test/00001.jpg ...
  cars_test_annos_withlabels.mat      (or devkit/cars_test_annos_withlabels.mat)
  devkit/cars_meta.mat  devkit/cars_train_annos.mat"""

#: Number of classes of the DML training split (class ids 1..98 train, 99..196 test).
_DML_TRAIN_CLASSES = 98


def _loadmat(path: Path) -> dict[str, Any]:
    from scipy.io import loadmat  # scipy is imported only when a .mat file is read

    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as err:  # scipy raises several types (ValueError, TypeError, MatReadError) for bad files
        raise AnnotationError(path, None, f"cannot read the .mat file: {err}") from err


def _records(path: Path, mat: dict[str, Any], needed: tuple[str, ...]) -> np.ndarray:
    if "annotations" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise AnnotationError(path, None, f"no variable 'annotations' (found {found})")
    annotations = np.atleast_1d(mat["annotations"])
    fields = annotations.dtype.names or ()
    missing = [f for f in needed if f not in fields]
    if missing:
        raise AnnotationError(path, None, f"'annotations' has no field(s) {missing}; its fields are {list(fields)}")
    return annotations


def _as_int(value: Any, path: Path, record: int, field: str) -> int:
    try:
        array = np.asarray(value).reshape(-1)
        if array.size != 1:
            raise ValueError
        out = int(array[0])
        if out != array[0]:
            raise ValueError
        return out
    except (ValueError, TypeError):
        raise AnnotationError(
            path, record, f"field {field!r} must be one integer, got {value!r}", unit="record"
        ) from None


def _class_id(value: Any, path: Path, record: int) -> int:
    class_id = _as_int(value, path, record, "class")
    if class_id < 1:
        raise AnnotationError(path, record, f"field 'class' is 1-based, got {class_id}", unit="record")
    return class_id


def _test_flag(value: Any, path: Path, record: int) -> int:
    """The ``test`` field: 1 for an official test image, 0 for a training image."""
    flag = _as_int(value, path, record, "test")
    if flag not in (0, 1):
        raise AnnotationError(path, record, f"field 'test' must be 0 or 1, got {flag}", unit="record")
    return flag


def _as_float(value: Any, path: Path, record: int, field: str) -> float:
    try:
        array = np.asarray(value, dtype=np.float64).reshape(-1)
        if array.size != 1:
            raise ValueError
        return float(array[0])
    except (ValueError, TypeError):
        raise AnnotationError(
            path, record, f"field {field!r} must be one number, got {value!r}", unit="record"
        ) from None


def _as_str(value: Any, path: Path, record: int, field: str) -> str:
    array = np.asarray(value).reshape(-1)
    if array.size != 1 or not isinstance(array[0], str) or not array[0]:
        raise AnnotationError(path, record, f"field {field!r} must be a file name, got {value!r}", unit="record")
    return str(array[0])


def _class_names(mat: dict[str, Any]) -> list[str] | None:
    if "class_names" not in mat:
        return None
    names = np.atleast_1d(mat["class_names"]).reshape(-1)
    return [str(np.asarray(n).reshape(-1)[0]) if np.asarray(n).size else "" for n in names]


class Cars196(RealImageDataset):
    """Cars196 (Stanford Cars): 16,185 images of 196 car models.

    Nothing is downloaded. Two layouts are read; the DML one is looked for first::

        <root>/                              DML layout (car_ims.tgz + cars_annos.mat)
          cars_annos.mat
          car_ims/000001.jpg ... 016185.jpg

        <root>/                              devkit layout (classification release)
          cars_train/00001.jpg ...   cars_test/00001.jpg ...
          cars_test_annos_withlabels.mat     (or devkit/cars_test_annos_withlabels.mat)
          devkit/cars_meta.mat  devkit/cars_train_annos.mat

    ``cars_annos.mat`` holds the struct array ``annotations`` with the fields ``relative_im_path`` (relative to
    the folder of the ``.mat``), ``bbox_x1``, ``bbox_y1``, ``bbox_x2``, ``bbox_y2``, ``class`` (1..196) and
    ``test`` (1 = official test image); fields are read by name, never by position. Class names come from
    its ``class_names`` variable, else from ``devkit/cars_meta.mat``, else are ``"class_<id>"``.
    The ``.mat`` files are read with ``scipy.io.loadmat`` (imported on first use).

    Protocols (``split="all"`` takes every image of the protocol):

    * ``"dml"`` (default): the zero-shot split by class, class ids 1–98 ``"train"`` (8,054 images) and
      99–196 ``"test"`` (8,131 images). It needs the labels of both official halves.
    * ``"classification"``: the official per-image split (8,144 / 8,041), all 196 classes in both.

    Labels are 0-based within the split, in class-id order (:attr:`class_ids` maps back). A sample is
    ``{"image": tv_tensors.Image (3, H, W) uint8, "label", "index", "meta": {"class_id", "path",
    "official_test"}}`` plus ``"boxes"`` (``tv_tensors.BoundingBoxes`` (1, 4) float32, XYXY) with
    ``boxes=True``. Grey images are converted to RGB.

    Args:
        root: The folder described above.
        split: ``"train"``, ``"test"`` or ``"all"``.
        protocol: ``"dml"`` or ``"classification"``.
        boxes: Return the bounding box as ``"boxes"``.
        transform: Callable applied to the whole sample dict.

    Raises:
        FileNotFoundError: No annotation file, or a missing image folder; the message shows the layouts.
        AnnotationError: A malformed ``.mat`` (a :class:`ValueError` naming the file and the record): a missing
            field, a ``test`` flag other than 0/1, a box of the split that is not finite or has ``x2 < x1`` or
            ``y2 < y1``, or (when the sample is read) a box outside its image.

    Example:
        >>> from dml_bias.datasets import Cars196
        >>> try:
        ...     Cars196("/no/such/folder", "train")
        ... except FileNotFoundError as err:
        ...     print(str(err).splitlines()[0])
        missing Cars196 root folder /no/such/folder
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        protocol: str = "dml",
        *,
        boxes: bool = False,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        super().__init__(transform)
        check_choice(split, "split", ("train", "test", "all"))
        check_choice(protocol, "protocol", ("dml", "classification"))
        self.root = Path(root)
        self.split = split
        self.protocol = protocol
        self.boxes = bool(boxes)
        require_dir(self.root, layout=CARS_LAYOUT, what="Cars196 root")

        records = self._read_records()
        if protocol == "dml":
            if split == "train":
                records = [r for r in records if r["class_id"] <= _DML_TRAIN_CLASSES]
            elif split == "test":
                records = [r for r in records if r["class_id"] > _DML_TRAIN_CLASSES]
        elif split != "all":
            records = [r for r in records if r["official_test"] == int(split == "test")]

        class_ids = sorted({r["class_id"] for r in records}) if protocol == "dml" else sorted(self._all_class_ids)
        label_of = {c: k for k, c in enumerate(class_ids)}
        self._class_ids = class_ids
        self._class_names = [self._names.get(c, f"class_{c}") for c in class_ids]
        self._paths = [r["file"] for r in records]
        self._labels = torch.tensor([label_of[r["class_id"]] for r in records], dtype=torch.long)
        self._meta = [
            {"class_id": r["class_id"], "path": r["path"], "official_test": r["official_test"]} for r in records
        ]
        # The boxes of this split only: finite and ordered here, inside the image when a sample is read.
        self._box_sources = [r["source"] for r in records] if self.boxes else []
        self._boxes = (
            torch.tensor([check_box(r["box"], r["source"]) for r in records], dtype=torch.float32).reshape(-1, 4)
            if self.boxes
            else None
        )

    def _read_records(self) -> list[dict[str, Any]]:
        root = self.root
        box_fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2") if self.boxes else ()
        self._names: dict[int, str] = {}
        records: list[dict[str, Any]] = []
        dml_mat = root / "cars_annos.mat"
        if dml_mat.is_file():
            mat = _loadmat(dml_mat)
            annotations = _records(dml_mat, mat, ("relative_im_path", "class", "test", *box_fields))
            for n, rec in enumerate(annotations, start=1):
                rel = _as_str(rec["relative_im_path"], dml_mat, n, "relative_im_path")
                records.append(
                    {
                        "path": rel,
                        "file": root / rel,
                        "class_id": _class_id(rec["class"], dml_mat, n),
                        "official_test": _test_flag(rec["test"], dml_mat, n),
                        "box": [_as_float(rec[f], dml_mat, n, f) for f in box_fields],
                        "source": BoxSource(dml_mat, n, "record"),
                    }
                )
            names = _class_names(mat)
            if names is None and (root / "devkit" / "cars_meta.mat").is_file():
                names = _class_names(_loadmat(root / "devkit" / "cars_meta.mat"))
            image_dir = root / "car_ims"
        else:
            train_mat = root / "devkit" / "cars_train_annos.mat"
            test_candidates = [
                root / "cars_test_annos_withlabels.mat",
                root / "devkit" / "cars_test_annos_withlabels.mat",
            ]
            test_mat = next((p for p in test_candidates if p.is_file()), None)
            if not train_mat.is_file() or test_mat is None:
                raise FileNotFoundError(
                    f"missing Cars196 annotations: neither {dml_mat} (DML layout) nor {train_mat} and "
                    f"{test_candidates[0]} (devkit layout) exist\nExpected layout:\n{CARS_LAYOUT}"
                )
            for official_test, mat_path, folder in ((0, train_mat, "cars_train"), (1, test_mat, "cars_test")):
                annotations = _records(mat_path, _loadmat(mat_path), ("fname", "class", *box_fields))
                require_dir(root / folder, layout=CARS_LAYOUT, what="image")
                for n, rec in enumerate(annotations, start=1):
                    rel = f"{folder}/{_as_str(rec['fname'], mat_path, n, 'fname')}"
                    records.append(
                        {
                            "path": rel,
                            "file": root / rel,
                            "class_id": _class_id(rec["class"], mat_path, n),
                            "official_test": official_test,
                            "box": [_as_float(rec[f], mat_path, n, f) for f in box_fields],
                            "source": BoxSource(mat_path, n, "record"),
                        }
                    )
            meta = root / "devkit" / "cars_meta.mat"
            names = _class_names(_loadmat(meta)) if meta.is_file() else None
            image_dir = root / "cars_train"
        require_dir(image_dir, layout=CARS_LAYOUT, what="image")
        if names is not None:
            self._names = {k + 1: name for k, name in enumerate(names)}
        self._all_class_ids = {r["class_id"] for r in records}
        return records

    @property
    def class_ids(self) -> list[int]:
        """The 1-based class id of every label."""
        return list(self._class_ids)

    def _extra(self, index: int, sample: dict[str, Any]) -> None:
        if self._boxes is not None:
            height, width = sample["image"].shape[-2:]
            box = self._boxes[index].tolist()
            check_box_inside(box, width, height, self._paths[index], self._box_sources[index])
            sample["boxes"] = tv_tensors.BoundingBoxes(
                self._boxes[index : index + 1].clone(), format="XYXY", canvas_size=(height, width)
            )

    def _extra_repr(self) -> str:
        """Split, protocol and options, for ``repr``."""
        return f"split={self.split!r}, protocol={self.protocol!r}, boxes={self.boxes}"
