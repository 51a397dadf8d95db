from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import pytest
import torch
from _builders import SOP_HEADER, build_sop
from PIL import Image

from dml_bias.datasets._io import AnnotationError, CorruptImageError
from dml_bias.datasets.sop import StanfordOnlineProducts


@pytest.fixture(scope="module")
def sop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("sop")
    return root, build_sop(root)


@pytest.mark.parametrize("use_base", [False, True])
def test_splits_labels_and_super_labels(sop: tuple[Path, dict], use_base: bool) -> None:
    root, info = sop
    where = info["base"] if use_base else root
    train, test = StanfordOnlineProducts(where, "train"), StanfordOnlineProducts(where, "test")
    assert len(train) == 5
    assert len(test) == 4
    assert train.labels.tolist() == [0, 0, 1, 1, 1]
    assert test.labels.tolist() == [0, 0, 1, 1]
    assert train.class_ids == [1, 2]
    assert test.class_ids == [3, 4]
    assert test.class_names == ["3", "4"]
    assert train.super_labels.tolist() == [0, 0, 1, 1, 1]
    assert train.super_class_names == ["bicycle", "cabinet"]
    assert [str(p.relative_to(info["base"])) for p in test.paths] == [r[3] for r in info["rows"]["test"]]


def test_sample(sop: tuple[Path, dict]) -> None:
    root, info = sop
    ds = StanfordOnlineProducts(root, "test")
    sample = ds[2]
    image_id, class_id, super_id, rel = info["rows"]["test"][2]
    assert sample["label"] == 1
    assert sample["super_label"] == super_id - 1
    assert sample["meta"] == {"image_id": image_id, "class_id": class_id, "super_class_id": super_id, "path": rel}
    with Image.open(info["base"] / rel) as ref:
        assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), np.asarray(ref.convert("RGB")))
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone.super_labels, ds.super_labels)


def test_missing_list_names_file_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing Stanford Online Products root folder"):
        StanfordOnlineProducts(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"missing file .*Ebay_train\.txt\nExpected layout:"):
        StanfordOnlineProducts(tmp_path)


def test_malformed_rows_name_file_and_line(tmp_path: Path) -> None:
    info = build_sop(tmp_path)
    path = info["base"] / "Ebay_train.txt"
    lines = path.read_text().splitlines()
    assert lines[0] == SOP_HEADER
    bad = [*lines[:3], "7 x 1 bicycle_final/1.JPG", *lines[3:]]
    path.write_text("\n".join(bad) + "\n")
    with pytest.raises(AnnotationError, match=r"Ebay_train\.txt, line 4: column class_id must be an integer, got 'x'"):
        StanfordOnlineProducts(tmp_path, "train")
    bad[3] = "7 3 1"
    path.write_text("\n".join(bad) + "\n")
    with pytest.raises(AnnotationError, match=r"Ebay_train\.txt, line 4: expected 4 columns"):
        StanfordOnlineProducts(tmp_path, "train")


def test_corrupt_image(tmp_path: Path) -> None:
    build_sop(tmp_path)
    ds = StanfordOnlineProducts(tmp_path, "train")
    ds.paths[3].write_bytes(b"JFIF?")
    with pytest.raises(CorruptImageError, match=re.escape(str(ds.paths[3]))):
        ds[3]


def test_bad_split(sop: tuple[Path, dict]) -> None:
    with pytest.raises(ValueError, match="split"):
        StanfordOnlineProducts(sop[0], "val")
