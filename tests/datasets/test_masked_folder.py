"""MaskedFolder: the audit's generic images + masks format, and the ImageFolder layout without masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dml_bias.datasets import CorruptImageError, MaskedFolder


def _write(root: Path, classes: dict[str, int], size: tuple[int, int] = (10, 8), masks: bool = True) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        for i in range(count):
            folder = root / "images" / name if masks else root / name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i}.png")
            if masks:
                (root / "masks" / name).mkdir(parents=True, exist_ok=True)
                m = np.zeros((size[1], size[0]), dtype=np.uint8)
                m[2:5, 3:7] = 1 if i % 2 else 255  # 0/1 and 0/255 masks both mean object
                Image.fromarray(m).save(root / "masks" / name / f"img{i}.png")


def test_reads_images_masks_and_labels(tmp_path: Path) -> None:
    _write(tmp_path, {"b_class": 2, "a_class": 3})
    ds = MaskedFolder(tmp_path)
    assert ds.class_names == ["a_class", "b_class"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    s = ds[1]
    assert s["image"].shape == (3, 8, 10)
    assert s["image"].dtype == torch.uint8
    expected = np.asarray(Image.open(tmp_path / "images" / "a_class" / "img1.png"))
    assert torch.equal(s["image"].permute(1, 2, 0), torch.from_numpy(expected.copy()))
    for i in (0, 1):  # 0/255 and 0/1 masks read the same
        m = ds[i]["mask"]
        assert m.shape == (1, 8, 10)
        assert m.dtype == torch.uint8
        assert int(m.sum()) == 255 * 12
        assert int(m[0, 2:5, 3:7].min()) == 255
    assert s["meta"] == {"path": "a_class/img1.png", "class": "a_class"}
    assert ds.mask_path(0) == tmp_path / "masks" / "a_class" / "img0.png"


def test_image_folder_layout_without_masks(tmp_path: Path) -> None:
    _write(tmp_path, {"x": 2, "y": 2}, masks=False)
    ds = MaskedFolder(tmp_path, masks=False)
    assert len(ds) == 4
    assert "mask" not in ds[0]
    assert ds[3]["label"] == 1
    with pytest.raises(RuntimeError, match="masks=False"):
        ds.mask_path(0)


def test_missing_mask_names_the_file(tmp_path: Path) -> None:
    _write(tmp_path, {"x": 2, "y": 2})
    (tmp_path / "masks" / "y" / "img1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing mask file .*y/img1\.png"):
        MaskedFolder(tmp_path)


def test_mask_of_another_size(tmp_path: Path) -> None:
    _write(tmp_path, {"x": 2, "y": 2})
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(tmp_path / "masks" / "x" / "img0.png")
    ds = MaskedFolder(tmp_path)
    with pytest.raises(ValueError, match=r"mask .*x/img0\.png has size \(5, 5\).*\(8, 10\)"):
        ds[0]


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    _write(tmp_path, {"x": 2, "y": 2})
    (tmp_path / "images" / "y" / "img0.png").write_bytes(b"not a png")
    ds = MaskedFolder(tmp_path)
    with pytest.raises(CorruptImageError, match=r"y/img0\.png"):
        ds[2]


def test_class_with_one_image(tmp_path: Path) -> None:
    _write(tmp_path, {"x": 2, "lonely": 1})
    with pytest.raises(ValueError, match=r"lonely holds 1 image\(s\); every class needs at least 2"):
        MaskedFolder(tmp_path)


def test_missing_folders_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing images folder"):
        MaskedFolder(tmp_path)
    with pytest.raises(TypeError, match="root must be a folder path"):
        MaskedFolder(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="masks must be True or False"):
        MaskedFolder(tmp_path, masks="yes")  # type: ignore[arg-type]
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(ValueError, match="holds no class folder"):
        MaskedFolder(tmp_path)
