"""Revisited Oxford 5k / Paris 6k (Radenović et al., 2018): landmark retrieval with Easy / Medium / Hard ground truth.

The loader reads the files the user unpacked; it never downloads anything. See :class:`RevisitedOxfordParis`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision import tv_tensors

from dml_bias._checks import check_choice
from dml_bias.datasets._io import (
    AnnotationError,
    BoxSource,
    RealImageDataset,
    check_box,
    check_box_inside,
    read_lines,
    require_dir,
    require_file,
)

__all__ = ["RevisitedOxfordParis"]

REVISITED_LAYOUT = """\
<root>/datasets/                   (<root> may also be datasets/ itself)
  roxford5k/gnd_roxford5k.pkl   roxford5k/jpg/<name>.jpg
  rparis6k/gnd_rparis6k.pkl     rparis6k/jpg/<name>.jpg
  revisitop1m/revisitop1m.txt   revisitop1m/jpg/...          (distractors=True)"""


def _locate(root: Path, name: str) -> Path:
    """The folder holding ``name`` (``roxford5k``, ``rparis6k``, ``revisitop1m``)."""
    for base in (root / "datasets", root):
        if (base / name).is_dir():
            return base / name
    if root.name == name:
        return root
    raise FileNotFoundError(
        f"missing folder {root / 'datasets' / name} (also looked for {root / name})\n"
        f"Expected layout:\n{REVISITED_LAYOUT}"
    )


def _box(value: Any, path: Path, query: int) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in value)
        if len(box) != 4 or not (box[2] >= box[0] and box[3] >= box[1]):
            raise ValueError
    except (TypeError, ValueError):
        raise AnnotationError(
            path, query, f"bbx must be (x1, y1, x2, y2) with x1 <= x2, y1 <= y2, got {value!r}", unit="query"
        ) from None
    return check_box(box, BoxSource(path, query, "query"))  # and finite


class RevisitedOxfordParis(RealImageDataset):
    """Revisited Oxford 5k / Paris 6k: the database or the query images, with the ``gnd_*.pkl`` ground truth.

    Nothing is downloaded. Expected layout (the folders the official ``download.py`` writes)::

        <root>/datasets/                    (<root> may also be datasets/ itself)
          roxford5k/gnd_roxford5k.pkl   roxford5k/jpg/<name>.jpg
          rparis6k/gnd_rparis6k.pkl     rparis6k/jpg/<name>.jpg
          revisitop1m/revisitop1m.txt   revisitop1m/jpg/...          (distractors=True)

    ``gnd_<name>.pkl`` is a pickled dict: ``imlist`` (database image names without extension), ``qimlist``
    (query names; queries are not in the database) and ``gnd`` (one dict per query: ``easy``, ``hard``,
    ``junk`` as 0-based database indices and ``bbx`` = ``(x1, y1, x2, y2)``). The image list comes from
    ``imlist``/``qimlist``, never from globbing ``jpg/`` (the Paris archives hold corrupt extra files).
    Truncated JPEGs are decoded as far as possible, as the official readers do.

    Queries are cropped to ``bbx`` (``PIL.Image.crop``, which rounds the box) unless ``crop_queries=False``.
    There are no classes: a query's label is its query index (0..69), :attr:`class_names` are the query
    names, and database images have label ``-1``. Evaluate with :attr:`gnd` (pass it to
    ``dml_bias.metrics.revisited_map``); :meth:`positives` gives a protocol's positive and ignored lists.

    With ``distractors=True`` the database is followed by the R1M distractors listed in
    ``revisitop1m/revisitop1m.txt`` (paths relative to ``revisitop1m/jpg/``, extension included), label ``-1``;
    the ground-truth indices stay valid because the distractors come after ``imlist``.

    A sample is ``{"image": tv_tensors.Image (3, H, W) uint8, "label", "index", "meta": {"name", "kind"}}``
    (``kind`` is ``"query"``, ``"database"`` or ``"distractor"``); a query also has ``"bbx"``: with cropping,
    a float64 tensor (4,) with the box in the full image (a plain tensor, left alone by transforms); with
    ``crop_queries=False``, a ``tv_tensors.BoundingBoxes`` (1, 4) XYXY that geometric transforms move.

    Args:
        root: The folder described above.
        name: ``"roxford5k"`` or ``"rparis6k"``.
        split: ``"database"`` or ``"query"``.
        crop_queries: Crop the query images to their ``bbx``.
        distractors: Append the R1M distractors to the database.
        transform: Callable applied to the whole sample dict.

    Raises:
        FileNotFoundError: A needed file or folder is missing; the message names it and shows the layout.
        AnnotationError: A malformed ground truth (a :class:`ValueError` naming the file and the query),
            including a query box that is not finite, has ``x2 < x1`` or ``y2 < y1`` or (when the query is read)
            lies outside its image.

    Example:
        >>> from dml_bias.datasets import RevisitedOxfordParis
        >>> try:
        ...     RevisitedOxfordParis("/no/such/folder", "roxford5k", "query")
        ... except FileNotFoundError as err:
        ...     print(str(err).splitlines()[0])
        missing Revisited Oxford/Paris root folder /no/such/folder
    """

    _allow_truncated = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        name: str = "roxford5k",
        split: str = "database",
        *,
        crop_queries: bool = True,
        distractors: bool = False,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        super().__init__(transform)
        check_choice(name, "name", ("roxford5k", "rparis6k"))
        check_choice(split, "split", ("database", "query"))
        self.root = Path(root)
        self.name = name
        self.split = split
        self.crop_queries = bool(crop_queries)
        self.distractors = bool(distractors)
        require_dir(self.root, layout=REVISITED_LAYOUT, what="Revisited Oxford/Paris root")
        folder = _locate(self.root, name)
        gnd_path = require_file(folder / f"gnd_{name}.pkl", layout=REVISITED_LAYOUT)
        images = require_dir(folder / "jpg", layout=REVISITED_LAYOUT, what="image")
        imlist, qimlist, gnd = self._read_gnd(gnd_path)
        self._imlist, self._qimlist = imlist, qimlist
        self._gnd = gnd
        self._class_names = list(qimlist)
        self._boxes: list[tuple[float, float, float, float]] = []
        self._gnd_path = gnd_path
        if split == "query":
            self._paths = [images / f"{q}.jpg" for q in qimlist]
            self._labels = torch.arange(len(qimlist), dtype=torch.long)
            self._meta = [{"name": q, "kind": "query"} for q in qimlist]
            self._boxes = [g["bbx"] for g in gnd]
        else:
            self._paths = [images / f"{d}.jpg" for d in imlist]
            self._meta = [{"name": d, "kind": "database"} for d in imlist]
            if self.distractors:
                r1m = _locate(self.root, "revisitop1m")
                listing = require_file(r1m / "revisitop1m.txt", layout=REVISITED_LAYOUT)
                for _, entry in read_lines(listing):
                    self._paths.append(r1m / "jpg" / entry)
                    self._meta.append({"name": entry, "kind": "distractor"})
            self._labels = torch.full((len(self._paths),), -1, dtype=torch.long)

    @staticmethod
    def _read_gnd(path: Path) -> tuple[list[str], list[str], list[dict[str, Any]]]:
        try:
            with open(path, "rb") as handle:
                try:
                    data = pickle.load(handle)
                except UnicodeDecodeError:  # a ground truth pickled by Python 2 with numpy arrays
                    handle.seek(0)
                    data = pickle.load(handle, encoding="latin1")
        except Exception as err:  # pickle raises many types for a damaged file
            raise AnnotationError(path, None, f"cannot unpickle the ground truth: {err!r}") from err
        if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise AnnotationError(path, None, f"expected a dict with keys 'imlist', 'qimlist', 'gnd', got {keys}")
        imlist = [str(n) for n in data["imlist"]]
        qimlist = [str(n) for n in data["qimlist"]]
        if len(data["gnd"]) != len(qimlist):
            raise AnnotationError(path, None, f"'gnd' has {len(data['gnd'])} entries but 'qimlist' has {len(qimlist)}")
        gnd = []
        for q, entry in enumerate(data["gnd"]):
            if not isinstance(entry, dict) or "bbx" not in entry:
                raise AnnotationError(path, q, "expected a dict with 'bbx', 'easy', 'hard', 'junk'", unit="query")
            clean: dict[str, Any] = {"bbx": _box(entry["bbx"], path, q)}
            for key in ("easy", "hard", "junk"):
                try:
                    ids = [int(i) for i in entry.get(key, [])]
                except (TypeError, ValueError):
                    raise AnnotationError(path, q, f"{key!r} must be a list of integers", unit="query") from None
                bad = [i for i in ids if not 0 <= i < len(imlist)]
                if bad:
                    raise AnnotationError(
                        path, q, f"{key!r} holds {bad[0]}, outside the database of {len(imlist)} images", unit="query"
                    )
                clean[key] = ids
            gnd.append(clean)
        return imlist, qimlist, gnd

    @property
    def gnd(self) -> list[dict[str, Any]]:
        """The ground truth as a list with one dict per query.

        Keys: ``easy``, ``hard``, ``junk`` (lists of 0-based database indices) and ``bbx`` (the query box).
        """
        return [{k: (list(v) if isinstance(v, list) else v) for k, v in g.items()} for g in self._gnd]

    @property
    def database_names(self) -> list[str]:
        """The database image names (``imlist``, without extension)."""
        return list(self._imlist)

    @property
    def query_names(self) -> list[str]:
        """The query image names (``qimlist``, without extension)."""
        return list(self._qimlist)

    def positives(self, protocol: str = "medium") -> list[tuple[list[int], list[int]]]:
        """Per query, the positive and the ignored database indices of a protocol.

        Easy: positives = easy, ignored = junk + hard. Medium: positives = easy + hard, ignored = junk.
        Hard: positives = hard, ignored = junk + easy.

        Args:
            protocol: ``"easy"``, ``"medium"`` or ``"hard"``.

        Returns:
            A list with one ``(positives, ignored)`` pair of sorted index lists per query.
        """
        check_choice(protocol, "protocol", ("easy", "medium", "hard"))
        out = []
        for g in self._gnd:
            if protocol == "easy":
                ok, junk = g["easy"], g["junk"] + g["hard"]
            elif protocol == "medium":
                ok, junk = g["easy"] + g["hard"], g["junk"]
            else:
                ok, junk = g["hard"], g["junk"] + g["easy"]
            out.append((sorted(set(ok)), sorted(set(junk))))
        return out

    def _crop_box(self, index: int) -> Sequence[float] | None:
        if self.split == "query" and self.crop_queries:
            return self._boxes[index]
        return None

    def _crop_box_source(self, index: int) -> BoxSource | None:
        return BoxSource(self._gnd_path, index, "query") if self.split == "query" else None

    def _extra(self, index: int, sample: dict[str, Any]) -> None:
        if self.split != "query":
            return
        box = self._boxes[index]
        if self.crop_queries:
            sample["bbx"] = torch.tensor(box, dtype=torch.float64)
        else:
            height, width = sample["image"].shape[-2:]
            check_box_inside(box, width, height, self._paths[index], BoxSource(self._gnd_path, index, "query"))
            sample["bbx"] = tv_tensors.BoundingBoxes(
                torch.tensor([box], dtype=torch.float32), format="XYXY", canvas_size=(height, width)
            )

    def _extra_repr(self) -> str:
        """Name, split and options, for ``repr``."""
        return (
            f"name={self.name!r}, split={self.split!r}, crop_queries={self.crop_queries}, "
            f"distractors={self.distractors}"
        )
