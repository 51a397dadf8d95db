"""Reading images and annotation files for the real-data loaders, with errors that name the file.

Every reader here raises an error whose message names the offending path (and, for text annotations,
the line number), so that a broken copy of a data set can be repaired without a debugger:

* a missing file or folder raises :class:`FileNotFoundError` with the path and the expected folder layout;
* an image PIL cannot decode raises :class:`CorruptImageError` (an :class:`OSError`) naming the path;
* a malformed annotation line raises :class:`AnnotationError` (a :class:`ValueError`) as ``file, line N: ...``.

The module also holds :class:`RealImageDataset`, the small base class of the real loaders: a list of image
paths with labels that decodes images lazily and returns the sample dict of the library
(``{"image", "label", "index", "meta", ...}``).

These helpers are private: their names and signatures may change between releases.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageFile
from torchvision import tv_tensors

__all__ = [
    "AnnotationError",
    "BoxSource",
    "CorruptImageError",
    "RealImageDataset",
    "check_box",
    "check_box_inside",
    "find_existing",
    "parse_int",
    "read_image",
    "read_lines",
    "read_mask",
    "read_table",
    "require_dir",
    "require_file",
]

PathLike = str | os.PathLike[str]


class AnnotationError(ValueError):
    """A malformed annotation file or line; the message reads ``<file>, line <n>: <problem>``.

    For files without lines (``.mat``, ``.json``, ``.pkl``) ``unit`` names the record instead, e.g.
    ``<file>, record 3: <problem>``; without a position the message is ``<file>: <problem>``. It is a
    :class:`ValueError`, so ``except ValueError`` catches it too.

    Args:
        path: The annotation file.
        line_no: The 1-based line (or record) number, or ``None``.
        problem: What is wrong.
        unit: The word for the position (``"line"``, ``"record"``, ``"query"``, ...).

    Attributes:
        path: The annotation file, as a :class:`~pathlib.Path`.
        line_no: The line (or record) number, or ``None``.

    Example:
        >>> from dml_bias.datasets import AnnotationError
        >>> err = AnnotationError("CUB_200_2011/images.txt", 12, "expected 2 columns, got 1")
        >>> print(err)
        CUB_200_2011/images.txt, line 12: expected 2 columns, got 1
        >>> isinstance(err, ValueError), err.line_no
        (True, 12)
    """

    def __init__(self, path: str | os.PathLike[str], line_no: int | None, problem: str, *, unit: str = "line") -> None:
        where = f"{path}, {unit} {line_no}" if line_no is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path = Path(path)
        self.line_no = line_no


class CorruptImageError(OSError):
    """An image file that exists but cannot be decoded; the message names the path.

    Raised by every loader of ``dml_bias.datasets`` when PIL cannot read an image (a damaged or truncated
    file, or one that is not an image). It is an :class:`OSError`.

    Example:
        >>> import os, tempfile
        >>> from dml_bias.datasets import CorruptImageError
        >>> from dml_bias.datasets._io import read_image
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "broken.jpg")
        ...     with open(path, "wb") as handle:
        ...         _ = handle.write(b"not a JPEG")
        ...     try:
        ...         read_image(path)
        ...     except CorruptImageError as err:
        ...         print(str(err).startswith("cannot decode image " + path))
        True
    """


def _layout_hint(layout: str | None) -> str:
    if not layout:
        return ""
    return "\nExpected layout:\n" + layout.rstrip("\n")


def require_file(path: PathLike, *, layout: str | None = None, what: str | None = None) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path`, or raise :class:`FileNotFoundError` naming it and the layout."""
    path = Path(path)
    if not path.is_file():
        label = f"{what} " if what else ""
        raise FileNotFoundError(f"missing {label}file {path}" + _layout_hint(layout))
    return path


def require_dir(path: PathLike, *, layout: str | None = None, what: str | None = None) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path`, or raise :class:`FileNotFoundError` naming it and the layout."""
    path = Path(path)
    if not path.is_dir():
        label = f"{what} " if what else ""
        raise FileNotFoundError(f"missing {label}folder {path}" + _layout_hint(layout))
    return path


def find_existing(
    candidates: Sequence[PathLike], *, kind: str = "file", layout: str | None = None, what: str | None = None
) -> Path:
    """Return the first of ``candidates`` that exists (as a file or a folder, see ``kind``).

    Raises:
        FileNotFoundError: None exists; the message lists every place that was searched and the layout.
    """
    test = Path.is_file if kind == "file" else Path.is_dir
    for candidate in candidates:
        if test(Path(candidate)):
            return Path(candidate)
    label = f"{what} " if what else ""
    tried = "\n".join(f"  {c}" for c in candidates)
    raise FileNotFoundError(f"missing {label}{kind}; looked for:\n{tried}" + _layout_hint(layout))


def read_lines(path: PathLike, *, layout: str | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, stripped_line)`` for every non-blank line of a text file (1-based numbers)."""
    path = require_file(path, layout=layout)
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            text = line.strip()
            if text:
                yield line_no, text


def read_table(
    path: PathLike,
    *,
    min_columns: int,
    max_columns: int | None = None,
    skip_lines: int = 0,
    layout: str | None = None,
    columns: str | None = None,
) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, tokens)`` for the whitespace-separated rows of an annotation file.

    Runs of spaces count as one separator; blank lines are skipped. ``skip_lines`` leading lines (headers)
    are skipped, counted before blank lines are dropped.

    Args:
        path: The text file.
        min_columns: Rows with fewer tokens raise :class:`AnnotationError`.
        max_columns: Rows with more tokens raise, unless ``None`` (extra tokens allowed).
        skip_lines: Number of header lines to skip.
        layout: The expected folder layout, quoted when the file is missing.
        columns: The column names, quoted when a row is malformed (e.g. ``"image_id class_id"``).
    """
    path = require_file(path, layout=layout)
    expect = f" ({columns})" if columns else ""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line_no <= skip_lines:
                continue
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) < min_columns or (max_columns is not None and len(tokens) > max_columns):
                want = f"{min_columns}" if max_columns == min_columns else f"at least {min_columns}"
                if max_columns is not None and max_columns != min_columns:
                    want = f"{min_columns} to {max_columns}"
                raise AnnotationError(
                    path, line_no, f"expected {want} columns{expect}, got {len(tokens)}: {line.rstrip()!r}"
                )
            yield line_no, tokens


def parse_int(token: str, path: PathLike, line_no: int, column: str) -> int:
    """Parse an integer annotation field, raising :class:`AnnotationError` with file and line if it is not one."""
    try:
        return int(token)
    except ValueError:
        raise AnnotationError(path, line_no, f"column {column} must be an integer, got {token!r}") from None


def parse_float(token: str, path: PathLike, line_no: int, column: str) -> float:
    """Parse a float annotation field, raising :class:`AnnotationError` with file and line if it is not one."""
    try:
        return float(token)
    except ValueError:
        raise AnnotationError(path, line_no, f"column {column} must be a number, got {token!r}") from None


class BoxSource(NamedTuple):
    """Where a bounding box was read: the annotation file and the position quoted by :class:`AnnotationError`."""

    path: Path
    line_no: int | None
    unit: str = "line"


#: Pixels a box may extend past the image border (1-based or inclusive pixel coordinates reach ``W`` or ``W + 1``).
BOX_TOLERANCE = 1.0


def check_box(box: Sequence[float], source: BoxSource) -> tuple[float, float, float, float]:
    """An ``(x1, y1, x2, y2)`` box as floats; :class:`AnnotationError` unless finite with ``x1 <= x2, y1 <= y2``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise AnnotationError(
            source.path,
            source.line_no,
            f"box must be finite, got (x1, y1, x2, y2) = {(x1, y1, x2, y2)}",
            unit=source.unit,
        )
    if not (x1 <= x2 and y1 <= y2):
        raise AnnotationError(
            source.path,
            source.line_no,
            f"box must have x1 <= x2 and y1 <= y2 (a non-negative width and height), got (x1, y1, x2, y2) = "
            f"{(x1, y1, x2, y2)}",
            unit=source.unit,
        )
    return x1, y1, x2, y2


def check_box_inside(box: Sequence[float], width: int, height: int, image: PathLike, source: BoxSource) -> None:
    """:class:`AnnotationError` unless the box lies inside a ``width x height`` image (``BOX_TOLERANCE`` pixels)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    tol = BOX_TOLERANCE
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise AnnotationError(
            source.path,
            source.line_no,
            f"box (x1, y1, x2, y2) = {(x1, y1, x2, y2)} lies outside the image {image} of {width}x{height} pixels",
            unit=source.unit,
        )


#: PIL modes of 16-bit (and 32-bit integer) grey images, whose ``convert("L")`` clips at 255 instead of scaling.
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_8_bit(pil: PILImage.Image) -> PILImage.Image:
    """A 16-bit grey image scaled to 8 bits (``round(v * 255 / 65535)``), as an ``"L"`` image."""
    values = np.asarray(pil).astype(np.int64)
    scaled = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
    return PILImage.fromarray(scaled.astype(np.uint8))  # a 2-D uint8 array gives mode "L"


@contextlib.contextmanager
def _truncated_ok(allow: bool) -> Iterator[None]:
    # PIL only offers a process-wide switch; restore it so that one data set's tolerance does not leak.
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = bool(allow) or old
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _open(
    path: PathLike,
    mode: str,
    box: Sequence[float] | None,
    allow_truncated: bool,
    box_source: BoxSource | None = None,
) -> PILImage.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing image file {path}")
    try:
        with _truncated_ok(allow_truncated), PILImage.open(path) as pil:
            pil.load()
            # 16-bit grey (e.g. a 16-bit PNG): PIL's convert clips every value above 255 to white; scale instead.
            source = _to_8_bit(pil) if pil.mode in _WIDE_GREY_MODES else pil
            converted = source.convert(mode)
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises all three for damaged files
        raise CorruptImageError(f"cannot decode image {path}: {err}") from err
    if box is not None and box_source is not None:
        check_box_inside(box, converted.size[0], converted.size[1], path, box_source)
    if box is not None:
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (x2 >= x1 and y2 >= y1):
            raise ValueError(f"crop box for {path} must satisfy x1 <= x2 and y1 <= y2, got {tuple(box)}")
        converted = converted.crop((x1, y1, x2, y2))  # PIL rounds the float box, as the reference code does
    return converted


def _to_tensor(pil: PILImage.Image, channels: int) -> torch.Tensor:
    width, height = pil.size
    data = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8)
    return data.view(height, width, channels).permute(2, 0, 1).contiguous()


def read_image(
    path: PathLike,
    *,
    box: Sequence[float] | None = None,
    allow_truncated: bool = False,
    box_source: BoxSource | None = None,
) -> tv_tensors.Image:
    """Decode an image file as an RGB ``tv_tensors.Image`` of shape (3, H, W) and dtype uint8.

    Any PIL mode (grey, palette, CMYK, RGBA, 16-bit) is converted to RGB; 16-bit grey values are scaled to 8 bits
    (``round(v * 255 / 65535)``), not clipped.

    Args:
        path: The image file.
        box: Optional crop box ``(x1, y1, x2, y2)`` in pixels, applied with ``PIL.Image.crop`` (which rounds).
        allow_truncated: Decode truncated files as far as possible instead of raising.
        box_source: Where ``box`` was read; given, a box outside the image raises :class:`AnnotationError`
            naming that file and position (instead of a crop padded with black).

    Raises:
        FileNotFoundError: The file does not exist (the message names it).
        CorruptImageError: PIL cannot decode the file (the message names it).
        AnnotationError: ``box`` lies outside the image (with ``box_source``).
    """
    return tv_tensors.Image(_to_tensor(_open(path, "RGB", box, allow_truncated, box_source), 3))


def read_mask(path: PathLike, *, box: Sequence[float] | None = None) -> tv_tensors.Mask:
    """Decode a grey-level mask file as a ``tv_tensors.Mask`` of shape (1, H, W) and dtype uint8.

    The file is converted with ``PIL.Image.convert("L")``, so soft grey levels are kept (255 = object); 16-bit
    grey files are scaled to 8 bits (``round(v * 255 / 65535)``).

    Raises:
        FileNotFoundError: The file does not exist (the message names it).
        CorruptImageError: PIL cannot decode the file (the message names it).
    """
    return tv_tensors.Mask(_to_tensor(_open(path, "L", box, False), 1))


class RealImageDataset(torch.utils.data.Dataset):
    """Base class of the real loaders: image paths + labels, decoded lazily into the library's sample dict.

    Subclasses fill ``_paths`` (one :class:`~pathlib.Path` per sample), ``_labels`` (long tensor),
    ``_class_names`` and ``_meta`` (one dict per sample) and may override :meth:`_extra` to add keys.
    """

    _allow_truncated: bool = False

    def __init__(self, transform: Callable[[dict[str, Any]], Any] | None = None) -> None:
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be a callable or None, got {type(transform).__name__}")
        self.transform = transform
        self._paths: list[Path] = []
        self._labels = torch.empty(0, dtype=torch.long)
        self._class_names: list[str] = []
        self._meta: list[dict[str, Any]] = []

    @property
    def labels(self) -> torch.Tensor:
        """1-D ``torch.long`` tensor with the label of every sample (a copy; editing it changes nothing)."""
        return self._labels.clone()

    @property
    def num_classes(self) -> int:
        """Number of classes in this split."""
        return len(self._class_names)

    @property
    def class_names(self) -> list[str]:
        """Name of every class, indexed by label."""
        return list(self._class_names)

    @property
    def paths(self) -> list[Path]:
        """The image file of every sample."""
        return list(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def _check_index(self, index: Any) -> int:
        if isinstance(index, bool):
            raise TypeError("index must be an integer, got bool")
        try:
            position = operator.index(index)  # int, numpy integers and 0-d integer tensors
        except TypeError:
            raise TypeError(f"index must be an integer, got {type(index).__name__}") from None
        n = len(self)
        if not -n <= position < n:
            raise IndexError(f"index {position} is out of range for a data set of {n} samples")
        return position % n

    def _crop_box(self, index: int) -> Sequence[float] | None:
        return None

    def _crop_box_source(self, index: int) -> BoxSource | None:
        """Where the crop box of sample ``index`` was read (checked against the image size), or ``None``."""
        return None

    def _extra(self, index: int, sample: dict[str, Any]) -> None:
        """Add data-set specific keys to ``sample`` (called before the transform)."""

    def __getitem__(self, index: Any) -> Any:
        index = self._check_index(index)
        image = read_image(
            self._paths[index],
            box=self._crop_box(index),
            allow_truncated=self._allow_truncated,
            box_source=self._crop_box_source(index),
        )
        sample: dict[str, Any] = {
            "image": image,
            "label": int(self._labels[index]),
            "index": index,
            "meta": dict(self._meta[index]),
        }
        self._extra(index, sample)
        return self.transform(sample) if self.transform is not None else sample

    def _extra_repr(self) -> str:
        """Extra text for ``repr`` (subclasses list their options)."""
        return ""

    def __repr__(self) -> str:
        extra = self._extra_repr()
        parts = [f"num_samples={len(self)}", f"num_classes={self.num_classes}"]
        if extra:
            parts.append(extra)
        if self.transform is not None:
            parts.append(f"transform={self.transform!r}")
        return f"{type(self).__name__}({', '.join(parts)})"
