from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import pytest
import torch
from _builders import build_cars, build_cars_devkit
from PIL import Image
from torchvision import tv_tensors

from dml_bias.datasets._io import AnnotationError, CorruptImageError
from dml_bias.datasets.cars import Cars196


@pytest.fixture(scope="module")
def cars(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cars")
    return root, build_cars(root)


def test_dml_split_by_class(cars: tuple[Path, dict]) -> None:
    root, info = cars
    train, test = Cars196(root, "train"), Cars196(root, "test")
    assert len(train) == 4
    assert len(test) == 4
    assert train.class_ids == [1, 2]
    assert test.class_ids == [99, 100]
    assert train.labels.tolist() == [0, 0, 1, 1]
    assert test.labels.tolist() == [0, 0, 1, 1]
    assert train.class_names == ["Make1 Model 2001", "Make2 Model 2002"]
    assert test.class_names == ["Make99 Model 2099", "Make100 Model 2100"]
    records = info["records"]
    assert [str(p.relative_to(root)) for p in train.paths] == [r["relative_im_path"] for r in records[:4]]
    assert len(Cars196(root, "all")) == 8


def test_classification_protocol_uses_the_test_field(cars: tuple[Path, dict]) -> None:
    root, info = cars
    train = Cars196(root, "train", protocol="classification")
    test = Cars196(root, "test", protocol="classification")
    expected = [r["relative_im_path"] for r in info["records"] if r["test"] == 0]
    assert [m["path"] for m in train._meta] == expected
    assert len(test) == 4
    assert train.num_classes == test.num_classes == 4
    assert [train.class_ids[int(lab)] for lab in test.labels] == [r["class"] for r in info["records"] if r["test"]]


def test_samples_grey_images_and_boxes(cars: tuple[Path, dict]) -> None:
    root, info = cars
    ds = Cars196(root, "train", boxes=True)
    sample = ds[1]  # 000002.jpg was written in mode L
    assert isinstance(sample["image"], tv_tensors.Image)
    assert sample["image"].shape == (3, 7, 9)
    with Image.open(ds.paths[1]) as ref:
        assert ref.mode == "L"
        expected = np.asarray(ref.convert("RGB"))
    assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), expected)
    assert sample["meta"] == {"class_id": 1, "path": "car_ims/000002.jpg", "official_test": 1}
    rec = info["records"][1]
    assert sample["boxes"].tolist() == [[rec["bbox_x1"], rec["bbox_y1"], rec["bbox_x2"], rec["bbox_y2"]]]
    assert sample["boxes"].canvas_size == (7, 9)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1]["image"], sample["image"])


def test_devkit_layout(tmp_path: Path) -> None:
    written = build_cars_devkit(tmp_path)
    train, test = Cars196(tmp_path, "train"), Cars196(tmp_path, "test")
    assert [m["path"] for m in train._meta] == ["cars_train/00001.jpg", "cars_train/00003.jpg", "cars_test/00002.jpg"]
    assert train.labels.tolist() == [0, 1, 0]
    assert train.class_names == ["Car 1", "Car 2"]
    assert test.class_ids == [99, 100]
    official = Cars196(tmp_path, "test", protocol="classification")
    assert [m["path"] for m in official._meta] == [f"cars_test/{r['fname']}" for r in written["cars_test"]]
    assert official.class_ids == [1, 2, 99, 100]


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing Cars196 root folder"):
        Cars196(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"cars_annos\.mat \(DML layout\)") as err:
        Cars196(tmp_path)
    assert "car_ims/000001.jpg" in str(err.value)
    assert "devkit/cars_meta.mat" in str(err.value)
    build_cars(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "car_ims")
    with pytest.raises(FileNotFoundError, match=r"missing image folder .*car_ims"):
        Cars196(tmp_path)


def test_corrupt_image_names_path(tmp_path: Path) -> None:
    build_cars(tmp_path)
    ds = Cars196(tmp_path, "test")
    ds.paths[0].write_bytes(b"\x00" * 20)
    with pytest.raises(CorruptImageError, match=re.escape(str(ds.paths[0]))):
        ds[0]


def test_malformed_mat_names_file_and_record(tmp_path: Path) -> None:
    from scipy.io import loadmat, savemat

    build_cars(tmp_path)
    path = tmp_path / "cars_annos.mat"
    mat = loadmat(path)
    mat["annotations"][0, 2]["class"] = np.array(["seven"])
    savemat(path, {"annotations": mat["annotations"], "class_names": mat["class_names"]})
    with pytest.raises(AnnotationError, match=r"cars_annos\.mat, record 3: field 'class' must be one integer"):
        Cars196(tmp_path)
    savemat(path, {"boxes": np.zeros(3)})
    with pytest.raises(AnnotationError, match=r"no variable 'annotations' \(found \['boxes'\]\)"):
        Cars196(tmp_path)
    path.write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match=r"cars_annos\.mat: cannot read"):
        Cars196(tmp_path)


def test_bad_arguments(cars: tuple[Path, dict]) -> None:
    root, _ = cars
    with pytest.raises(ValueError, match="split"):
        Cars196(root, "val")
    with pytest.raises(ValueError, match="protocol"):
        Cars196(root, protocol="fewshot")
