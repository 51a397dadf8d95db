from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision import tv_tensors

from dml_bias.datasets._io import (
    AnnotationError,
    CorruptImageError,
    find_existing,
    parse_int,
    read_image,
    read_lines,
    read_mask,
    read_table,
    require_dir,
    require_file,
)


def _pattern(height: int = 7, width: int = 9) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 25, ys * 30, (xs + ys) * 10], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK", "I;16", "1", "LA"])
def test_read_image_converts_every_mode_to_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"im_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.fromarray(_pattern(), "RGB").convert(mode).save(path)
    with Image.open(path) as ref:
        expected = np.asarray(ref.convert("RGB"))
        if mode == "I;16":  # 16 bits are scaled to 8 (round(v * 255 / 65535)), where PIL's convert clips at 255
            scaled = (np.asarray(ref).astype(np.int64) * 255 + 32767) // 65535
            expected = np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=-1)
    image = read_image(path)
    assert isinstance(image, tv_tensors.Image)
    assert image.dtype == torch.uint8
    assert image.shape == (3, 7, 9)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_read_image_keeps_orientation(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    data = _pattern()
    Image.fromarray(data, "RGB").save(path)
    image = read_image(path)
    # channel c at row y, column x equals the written array at [y, x, c]
    for y, x, c in [(0, 0, 0), (6, 8, 0), (3, 5, 1), (6, 0, 2)]:
        assert image[c, y, x].item() == data[y, x, c]


def test_read_image_crop_box_rounds_like_pil(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    data = _pattern()
    Image.fromarray(data, "RGB").save(path)
    image = read_image(path, box=(1.4, 0.6, 5.5, 3.2))
    # PIL rounds the float box: (1, 1, 6, 3)  (5.5 rounds to 6, banker's rounding of 0.5 is avoided here)
    expected = np.asarray(Image.fromarray(data).crop((1.4, 0.6, 5.5, 3.2)))
    assert image.shape[1:] == expected.shape[:2]
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)
    with pytest.raises(ValueError, match="x1 <= x2"):
        read_image(path, box=(5, 0, 1, 3))


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "I;16"])
def test_read_mask_converts_to_grey(tmp_path: Path, mode: str) -> None:
    grey = np.array([[0, 17, 128], [200, 255, 3]], dtype=np.uint8)
    path = tmp_path / "m.png"
    Image.fromarray(grey, "L").convert(mode).save(path)
    with Image.open(path) as ref:
        expected = np.asarray(ref.convert("L"))
        if mode == "I;16":  # 16 bits are scaled to 8 (round(v * 255 / 65535)), where PIL's convert clips at 255
            expected = ((np.asarray(ref).astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    mask = read_mask(path)
    assert isinstance(mask, tv_tensors.Mask)
    assert mask.dtype == torch.uint8
    assert mask.shape == (1, 2, 3)
    assert np.array_equal(mask[0].numpy(), expected)
    if mode in ("L", "RGB"):
        assert mask[0].tolist() == grey.tolist()


def test_missing_and_corrupt_images_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.jpg"))):
        read_image(tmp_path / "none.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"GIF89a garbage")
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        read_image(bad)
    with pytest.raises(OSError, match=re.escape(str(bad))):
        read_mask(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(CorruptImageError, match="cannot decode image"):
        read_image(empty)


def test_truncated_images(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.tile(_pattern(), (8, 8, 1)), "RGB").save(buffer, format="JPEG", quality=95)
    path = tmp_path / "trunc.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    with pytest.raises(CorruptImageError, match=re.escape(str(path))):
        read_image(path)
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    image = read_image(path, allow_truncated=True)
    assert image.shape == (3, 56, 72)
    assert before == ImageFile.LOAD_TRUNCATED_IMAGES  # the global switch is restored


def test_read_table_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("header a b\n\n1   2  x\n3 4 y extra\n")
    rows = list(read_table(path, min_columns=3, skip_lines=1))
    assert rows == [(3, ["1", "2", "x"]), (4, ["3", "4", "y", "extra"])]
    with pytest.raises(AnnotationError, match=r"list\.txt, line 4: expected 3 columns \(a b c\), got 4") as err:
        list(read_table(path, min_columns=3, max_columns=3, skip_lines=1, columns="a b c"))
    assert err.value.line_no == 4
    assert err.value.path == path
    with pytest.raises(AnnotationError, match="line 1: expected at least 4 columns"):
        list(read_table(path, min_columns=4))
    with pytest.raises(AnnotationError, match=r"list\.txt, line 9: column a must be an integer, got 'x'"):
        parse_int("x", path, 9, "a")
    assert list(read_lines(path)) == [(1, "header a b"), (3, "1   2  x"), (4, "3 4 y extra")]


def test_require_and_find_existing(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    assert require_file(tmp_path / "f.txt") == tmp_path / "f.txt"
    with pytest.raises(FileNotFoundError, match=r"missing annotation file .*g\.txt\nExpected layout:\nroot/g\.txt"):
        require_file(tmp_path / "g.txt", layout="root/g.txt", what="annotation")
    with pytest.raises(FileNotFoundError, match="missing folder"):
        require_dir(tmp_path / "f.txt")
    assert find_existing([tmp_path / "a", tmp_path / "f.txt"]) == tmp_path / "f.txt"
    assert find_existing([tmp_path / "a", tmp_path], kind="dir") == tmp_path
    with pytest.raises(FileNotFoundError, match="looked for:") as err:
        find_existing([tmp_path / "a", tmp_path / "b"], layout="root/a")
    assert str(tmp_path / "a") in str(err.value)
    assert str(tmp_path / "b") in str(err.value)
