"""Polyvore Outfits (Vasileva et al., 2018): fashion items grouped in outfits, with FITB and compatibility tasks.

The loader reads the files the user unpacked; it never downloads anything. See :class:`PolyvoreOutfits`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dml_bias._checks import check_choice
from dml_bias.datasets._io import AnnotationError, RealImageDataset, read_table, require_dir, require_file

__all__ = ["PolyvoreOutfits"]

POLYVORE_LAYOUT = """\
<root>/                                  (polyvore_outfits/ itself, or the folder that holds it)
  images/<item_id>.jpg
  polyvore_item_metadata.json
  nondisjoint/   and   disjoint/
    train.json  valid.json  test.json
    compatibility_{train,valid,test}.txt  fill_in_blank_{train,valid,test}.json
    fill_in_blank_{test,valid}_harder_new.json  fashion_compatibility_harder_{test,val}.txt   (optional, PAN)"""

_SPLITS = ("train", "valid", "test")
_HARDER_COMPAT = {"train": "train", "valid": "val", "test": "test"}


def _load_json(path: Path) -> Any:
    require_file(path, layout=POLYVORE_LAYOUT)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise AnnotationError(path, err.lineno, f"invalid JSON: {err.msg} (column {err.colno})") from None


class PolyvoreOutfits(RealImageDataset):
    """Polyvore Outfits: the items of one split's outfits, with the fill-in-the-blank and compatibility tasks.

    Nothing is downloaded. ``root`` is ``polyvore_outfits/`` or the folder that holds it::

        polyvore_outfits/
          images/<item_id>.jpg
          polyvore_item_metadata.json
          nondisjoint/   and   disjoint/
            train.json  valid.json  test.json
            compatibility_{train,valid,test}.txt  fill_in_blank_{train,valid,test}.json
            fill_in_blank_{test,valid}_harder_new.json          (optional; PAN's harder FITB)
            fashion_compatibility_harder_{test,val}.txt         (optional; PAN's harder compatibility)

    ``<split>.json`` lists the outfits as ``{"set_id": str, "items": [{"item_id": str, "index": int}, ...]}``.
    The samples of the data set are the distinct items of these outfits (in order of first appearance);
    the label is the item's ``semantic_category`` from ``polyvore_item_metadata.json`` (``tops``, ``shoes``, …;
    :attr:`class_names` holds every category of the metadata, sorted, so labels agree across splits).

    The task files address an item as ``<set_id>_<index>`` (``index`` 1-based, as in ``<split>.json``);
    :meth:`item_index` turns such a reference, or a plain ``item_id``, into a sample index, so a model can
    embed every item once and score any pair (PAN scores an FITB candidate by its mean edge probability
    against the question's items, and an outfit by the mean over its item pairs). :meth:`fitb_questions`
    and :meth:`compatibility_outfits` return the tasks in sample indices.

    A sample is ``{"image": tv_tensors.Image (3, H, W) uint8, "label", "index", "meta": {"item_id",
    "semantic_category", "category_id", "title"}}``; an empty ``title`` falls back to ``url_name``, as in the
    official code.

    Args:
        root: The folder described above.
        split: ``"train"``, ``"valid"`` (``"val"`` is accepted) or ``"test"``.
        variant: ``"nondisjoint"`` (53,306 / 5,000 / 10,000 outfits) or ``"disjoint"`` (16,995 / 3,000 / 15,145).
        transform: Callable applied to the whole sample dict.

    Raises:
        FileNotFoundError: A needed file is missing; the message names it and shows the layout.
        AnnotationError: A malformed entry (a :class:`ValueError` naming the file and the line or entry).

    Example:
        >>> from dml_bias.datasets import PolyvoreOutfits
        >>> try:
        ...     PolyvoreOutfits("/no/such/folder", "test")
        ... except FileNotFoundError as err:
        ...     print(str(err).splitlines()[0])
        missing Polyvore Outfits root folder /no/such/folder
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        variant: str = "nondisjoint",
        *,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        super().__init__(transform)
        split = "valid" if split == "val" else split
        check_choice(split, "split", _SPLITS)
        check_choice(variant, "variant", ("nondisjoint", "disjoint"))
        self.root = Path(root)
        self.split = split
        self.variant = variant
        require_dir(self.root, layout=POLYVORE_LAYOUT, what="Polyvore Outfits root")
        base = self.root
        if not (base / "polyvore_item_metadata.json").is_file() and (base / "polyvore_outfits").is_dir():
            base = base / "polyvore_outfits"
        self._base = base
        self._folder = require_dir(base / variant, layout=POLYVORE_LAYOUT, what=f"{variant!r} split")
        images = require_dir(base / "images", layout=POLYVORE_LAYOUT, what="image")

        outfit_file = self._folder / f"{split}.json"
        outfits = _load_json(outfit_file)
        if not isinstance(outfits, list):
            raise AnnotationError(outfit_file, None, f"expected a JSON list of outfits, got {type(outfits).__name__}")
        item_ids: list[str] = []
        position: dict[str, int] = {}
        self._refs: dict[str, int] = {}
        self._outfits: list[tuple[str, list[int]]] = []
        for n, outfit in enumerate(outfits, start=1):
            try:
                set_id = str(outfit["set_id"])
                members = [(str(it["item_id"]), int(it["index"])) for it in outfit["items"]]
            except (KeyError, TypeError, ValueError):
                raise AnnotationError(
                    outfit_file,
                    n,
                    'expected {"set_id": ..., "items": [{"item_id": ..., "index": int}, ...]}, '
                    f"got {json.dumps(outfit)[:200]}",
                    unit="outfit",
                ) from None
            indices = []
            for item_id, item_index in members:
                if item_id not in position:
                    position[item_id] = len(item_ids)
                    item_ids.append(item_id)
                self._refs[f"{set_id}_{item_index}"] = position[item_id]
                indices.append(position[item_id])
            self._outfits.append((set_id, indices))

        meta_file = base / "polyvore_item_metadata.json"
        metadata = _load_json(meta_file)
        if not isinstance(metadata, dict):
            raise AnnotationError(
                meta_file, None, f"expected a JSON object item_id -> metadata, got {type(metadata).__name__}"
            )
        categories = sorted(
            {
                str(m.get("semantic_category"))
                for m in metadata.values()
                if isinstance(m, dict) and m.get("semantic_category")
            }
        )
        label_of = {c: k for k, c in enumerate(categories)}
        labels, meta = [], []
        for item_id in item_ids:
            entry = metadata.get(item_id)
            if not isinstance(entry, dict) or not entry.get("semantic_category"):
                raise AnnotationError(meta_file, None, f"no entry with a semantic_category for item_id {item_id!r}")
            category = str(entry["semantic_category"])
            labels.append(label_of[category])
            meta.append(
                {
                    "item_id": item_id,
                    "semantic_category": category,
                    "category_id": str(entry.get("category_id", "")),
                    "title": str(entry.get("title") or entry.get("url_name") or ""),
                }
            )
        self._item_ids = item_ids
        self._position = position
        self._class_names = categories
        self._paths = [images / f"{item_id}.jpg" for item_id in item_ids]
        self._labels = torch.tensor(labels, dtype=torch.long)
        self._meta = meta

    @property
    def item_ids(self) -> list[str]:
        """The ``item_id`` of every sample."""
        return list(self._item_ids)

    @property
    def outfits(self) -> list[tuple[str, list[int]]]:
        """The outfits of the split as ``(set_id, [sample index of each item, in outfit order])``."""
        return [(set_id, list(indices)) for set_id, indices in self._outfits]

    def item_index(self, ref: str) -> int:
        """The sample index of an item given as ``"<set_id>_<index>"`` (as in the task files) or as an ``item_id``.

        Raises:
            KeyError: The reference names no item of this split.
        """
        ref = str(ref)
        if ref in self._refs:
            return self._refs[ref]
        if ref in self._position:
            return self._position[ref]
        raise KeyError(f"{ref!r} is neither '<set_id>_<index>' of an outfit nor an item_id of the {self.split!r} split")

    def _resolve(self, refs: Any, path: Path, entry: int, unit: str) -> list[int]:
        if not isinstance(refs, list) or not refs:
            raise AnnotationError(path, entry, f"expected a non-empty list of item references, got {refs!r}", unit=unit)
        out = []
        for ref in refs:
            try:
                out.append(self.item_index(str(ref)))
            except KeyError:
                raise AnnotationError(
                    path, entry, f"item {ref!r} is not in the outfits of {self.split}.json", unit=unit
                ) from None
        return out

    def _task_file(self, name: str) -> Path:
        return require_file(self._folder / name, layout=POLYVORE_LAYOUT)

    def fitb_questions(self, harder: bool = False) -> list[dict[str, Any]]:
        """The fill-in-the-blank questions of the split, in sample indices.

        Reads ``fill_in_blank_<split>.json`` (4 candidates per question), or PAN's
        ``fill_in_blank_<split>_harder_new.json`` (10 candidates) with ``harder=True``. The correct candidate
        is the one from the question's outfit (the same ``set_id``); its position is ``"correct"``.

        Args:
            harder: Read the harder resampled file.

        Returns:
            One dict per question: ``"question"`` (sample indices of the given items), ``"answers"`` (sample
            indices of the candidates, in file order), ``"correct"`` (int, position of the right candidate in
            ``"answers"``) and ``"blank_position"`` (int, 1-based position of the blank in the outfit).

        Raises:
            FileNotFoundError: The file is missing.
            AnnotationError: A malformed question, or not exactly one candidate from the question's outfit.
        """
        name = f"fill_in_blank_{self.split}_harder_new.json" if harder else f"fill_in_blank_{self.split}.json"
        path = self._task_file(name)
        data = _load_json(path)
        if not isinstance(data, list):
            raise AnnotationError(path, None, f"expected a JSON list of questions, got {type(data).__name__}")
        questions = []
        for n, entry in enumerate(data, start=1):
            if not isinstance(entry, dict) or "question" not in entry or "answers" not in entry:
                raise AnnotationError(path, n, 'expected {"question": [...], "answers": [...], ...}', unit="question")
            question = self._resolve(entry["question"], path, n, "question")
            answers = self._resolve(entry["answers"], path, n, "question")
            set_ids = {str(ref).rsplit("_", 1)[0] for ref in entry["question"]}
            matches = [k for k, ref in enumerate(entry["answers"]) if str(ref).rsplit("_", 1)[0] in set_ids]
            if len(matches) != 1:
                raise AnnotationError(
                    path,
                    n,
                    f"expected exactly one answer from the question's outfit {sorted(set_ids)}, found {len(matches)}",
                    unit="question",
                )
            try:
                blank = int(entry.get("blank_position", 0))
            except (TypeError, ValueError):
                raise AnnotationError(path, n, "blank_position must be an integer", unit="question") from None
            questions.append({"question": question, "answers": answers, "correct": matches[0], "blank_position": blank})
        return questions

    def compatibility_outfits(self, harder: bool = False) -> list[dict[str, Any]]:
        """The outfit-compatibility task of the split, in sample indices.

        Reads ``compatibility_<split>.txt``, or PAN's ``fashion_compatibility_harder_<test|val>.txt`` with
        ``harder=True``; each line is ``label ref ref ...`` with label 1 for a real outfit, 0 for a negative.

        Args:
            harder: Read the harder resampled file.

        Returns:
            One dict per line: ``"label"`` (0 or 1) and ``"items"`` (sample indices).

        Raises:
            FileNotFoundError: The file is missing.
            AnnotationError: A malformed line (names the file and line number).
        """
        if harder:
            name = f"fashion_compatibility_harder_{_HARDER_COMPAT[self.split]}.txt"
        else:
            name = f"compatibility_{self.split}.txt"
        path = self._task_file(name)
        outfits = []
        for line_no, tokens in read_table(path, min_columns=2, layout=POLYVORE_LAYOUT, columns="label item item ..."):
            if tokens[0] not in ("0", "1"):
                raise AnnotationError(path, line_no, f"the label must be 0 or 1, got {tokens[0]!r}")
            outfits.append({"label": int(tokens[0]), "items": self._resolve(tokens[1:], path, line_no, "line")})
        return outfits

    def _extra_repr(self) -> str:
        """Split and variant, for ``repr``."""
        return f"split={self.split!r}, variant={self.variant!r}, num_outfits={len(self._outfits)}"
