from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import pytest
from _builders import build_inshop, write_image
from PIL import Image

from dml_bias.datasets._io import AnnotationError, CorruptImageError
from dml_bias.datasets.inshop import InShop


@pytest.fixture(scope="module")
def inshop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("inshop")
    return root, build_inshop(root)


def test_split_sizes_and_shared_query_gallery_labels(inshop: tuple[Path, dict]) -> None:
    root, info = inshop
    train, query, gallery = (InShop(root, s) for s in ("train", "query", "gallery"))
    assert (len(train), len(query), len(gallery)) == (3, 2, 3)
    assert train.class_names == ["id_00000002", "id_00000005"]
    assert train.labels.tolist() == [0, 0, 1]
    # query and gallery are numbered together: 80 -> 0, 81 -> 1, 90 -> 2
    assert query.class_names == gallery.class_names == ["id_00000080", "id_00000081", "id_00000090"]
    assert query.labels.tolist() == [0, 1]
    assert gallery.labels.tolist() == [0, 1, 2]
    assert query.num_classes == 3
    names = [e[0] for e in info["entries"] if e[2] == "gallery"]
    assert [m["image_name"] for m in gallery._meta] == names
    assert [p.relative_to(root / "Img").as_posix() for p in gallery.paths] == names


def test_sample_pixels(inshop: tuple[Path, dict]) -> None:
    root, _ = inshop
    ds = InShop(root, "query")
    sample = ds[1]
    assert sample["meta"] == {
        "item_id": "id_00000081",
        "image_name": "img/WOMEN/Tees_Tanks/id_00000081/01_1_front.jpg",
        "split": "query",
    }
    with Image.open(ds.paths[1]) as ref:
        assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), np.asarray(ref.convert("RGB")))


def test_highres_and_img_folder_in_root(tmp_path: Path) -> None:
    info = build_inshop(tmp_path)
    for k, (name, _, _) in enumerate(info["entries"]):
        write_image(tmp_path / "Img" / ("img_highres" + name[3:]), 100 + k, (16, 16))
    ds = InShop(tmp_path, "gallery", highres=True)
    assert ds[0]["image"].shape == (3, 16, 16)
    assert ds.paths[0] == tmp_path / "Img" / "img_highres/MEN/Denim/id_00000080/02_4_full.jpg"
    shutil.move(tmp_path / "Img" / "img", tmp_path / "img")
    shutil.rmtree(tmp_path / "Img")
    assert InShop(tmp_path, "gallery")[0]["image"].shape == (3, 8, 8)
    shutil.rmtree(tmp_path / "img")
    with pytest.raises(FileNotFoundError, match=r"missing image folder .*Img/img or .*img"):
        InShop(tmp_path, "gallery")


def test_missing_partition_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing In-Shop root folder"):
        InShop(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"Eval/list_eval_partition\.txt\nExpected layout:"):
        InShop(tmp_path)


def test_malformed_lines(tmp_path: Path) -> None:
    build_inshop(tmp_path)
    path = tmp_path / "Eval" / "list_eval_partition.txt"
    lines = path.read_text().splitlines()
    original = list(lines)
    lines[4] = lines[4].replace("train", "training")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"list_eval_partition\.txt, line 5: evaluation_status must be one of"):
        InShop(tmp_path)
    lines = list(original)
    lines[3] = lines[3].replace("id_00000002", "item2")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"line 4: item_id must look like 'id_00000001', got 'item2'"):
        InShop(tmp_path)
    path.write_text("\n".join(original[:-1]) + "\n")  # truncated
    with pytest.raises(AnnotationError, match=r"line 1: line 1 declares 8 images but the file lists 7"):
        InShop(tmp_path)
    path.write_text("\n".join([*original[:6], "img/MEN/x.jpg id_00000001"]) + "\n")
    with pytest.raises(AnnotationError, match=r"line 7: expected 3 columns"):
        InShop(tmp_path)


def test_corrupt_image(tmp_path: Path) -> None:
    build_inshop(tmp_path)
    ds = InShop(tmp_path, "train")
    ds.paths[2].write_bytes(b"")
    with pytest.raises(CorruptImageError, match=re.escape(str(ds.paths[2]))):
        ds[2]
