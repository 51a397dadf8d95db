from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import pytest
import torch
from _builders import build_cub, write_mask
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from dml_bias.datasets._io import AnnotationError, CorruptImageError
from dml_bias.datasets.cub import CUB200


@pytest.fixture(scope="module")
def cub(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cub")
    return root, build_cub(root)


def test_dml_split_sizes_labels_and_names(cub: tuple[Path, dict]) -> None:
    root, info = cub
    train, test = CUB200(root, "train"), CUB200(root, "test")
    assert len(train) == 6
    assert len(test) == 6
    assert train.num_classes == 2
    assert test.num_classes == 2
    assert train.class_names == ["001.Bird_1", "002.Bird_2"]
    assert test.class_names == ["101.Bird_101", "102.Bird_102"]
    assert train.class_ids == [1, 2]
    assert test.class_ids == [101, 102]
    assert train.labels.dtype == torch.long
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # joined by image_id although images.txt is written in reverse order
    for ds in (train, test):
        for n in range(len(ds)):
            image_id = ds.image_ids[n]
            assert ds.paths[n] == info["base"] / "images" / info["names"][image_id]
            assert ds.class_ids[int(ds.labels[n])] == info["class_of"][image_id]
    assert set(train.image_ids).isdisjoint(test.image_ids)
    assert len(CUB200(root, "all")) == 12


def test_sample_structure_and_pixels(cub: tuple[Path, dict]) -> None:
    root, info = cub
    ds = CUB200(root, "test")
    sample = ds[4]
    assert set(sample) == {"image", "label", "index", "meta"}
    image = sample["image"]
    assert isinstance(image, tv_tensors.Image)
    assert image.dtype == torch.uint8
    assert image.shape[0] == 3
    with Image.open(ds.paths[4]) as ref:
        expected = np.asarray(ref.convert("RGB"))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)
    assert sample["label"] == 1
    assert sample["index"] == 4
    image_id = ds.image_ids[4]
    assert sample["meta"] == {"image_id": image_id, "class_id": 102, "path": info["names"][image_id]}
    assert ds[-2]["index"] == 4
    with pytest.raises(IndexError, match="out of range"):
        ds[6]


def test_masks_align_with_images(cub: tuple[Path, dict]) -> None:
    root, info = cub
    ds = CUB200(root, "train", masks=True)
    for n in range(len(ds)):
        sample = ds[n]
        mask = sample["mask"]
        assert isinstance(mask, tv_tensors.Mask)
        assert mask.dtype == torch.uint8
        assert mask.shape[0] == 1
        assert mask.shape[-2:] == sample["image"].shape[-2:]
        with Image.open(ds.mask_path(n)) as ref:
            expected = np.asarray(ref.convert("L"))
        assert np.array_equal(mask[0].numpy(), expected)
        # soft levels survive: 0, 128 + id % 100 and 255
        assert set(np.unique(mask.numpy()).tolist()) == {0, 128 + ds.image_ids[n] % 100, 255}
        assert ds.mask_path(n) == (info["seg_dir"] / info["names"][ds.image_ids[n]]).with_suffix(".png")


def test_masks_inside_cub_folder_and_other_pil_modes(tmp_path: Path) -> None:
    info = build_cub(tmp_path, class_ids=(1, 150), images_per_class=1, segmentations_inside=True)
    # Re-save one mask as RGB and one as palette: both must come back as the same grey levels.
    for n, mode in zip(sorted(info["names"]), ("RGB", "P"), strict=True):
        path = (info["seg_dir"] / info["names"][n]).with_suffix(".png")
        with Image.open(path) as im:
            size = im.size
        expected = write_mask(path, size, n, mode=mode)
        ds = CUB200(tmp_path, "all", masks=True)
        got = ds[ds.image_ids.index(n)]["mask"][0].numpy()
        assert np.array_equal(got, expected)


def test_root_may_be_the_cub_folder_itself(cub: tuple[Path, dict]) -> None:
    _root, info = cub
    ds = CUB200(info["base"], "train", masks=True)
    assert len(ds) == 6
    assert ds[0]["mask"].shape[0] == 1


def test_attributes_and_certainty(cub: tuple[Path, dict]) -> None:
    root, info = cub
    ds = CUB200(root, "test", attributes=True)
    assert ds.attributes.shape == (6, 6)
    assert ds.attributes.dtype == torch.uint8
    for n, image_id in enumerate(ds.image_ids):
        assert ds.attributes[n].tolist() == info["present"][image_id]
        assert ds.attribute_certainty[n].tolist() == info["certainty"][image_id]
        sample = ds[n]
        assert sample["attributes"].tolist() == info["present"][image_id]
        assert sample["attribute_certainty"].tolist() == info["certainty"][image_id]
    assert ds.attribute_names == info["attribute_names"]
    # the line with an extra token (image 1, attribute 2) is read
    train = CUB200(root, "train", attributes=True)
    assert train.attributes[train.image_ids.index(1), 1].item() == info["present"][1][1]


def test_attribute_slow_path_matches_fast_path(cub: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = cub
    fast = CUB200(root, "all", attributes=True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("forced slow path")

    monkeypatch.setattr(np, "loadtxt", refuse)
    slow = CUB200(root, "all", attributes=True)
    assert torch.equal(fast.attributes, slow.attributes)
    assert torch.equal(fast.attribute_certainty, slow.attribute_certainty)
    assert int((slow.attribute_certainty == 0).sum()) == 0  # every (image, attribute) pair was read


@pytest.mark.parametrize("where", ["base", "attributes"])
def test_attribute_names_found_in_other_places(tmp_path: Path, where: str) -> None:
    info = build_cub(tmp_path, class_ids=(1,), images_per_class=1, attributes_txt_at=where)
    assert CUB200(tmp_path, attributes=True).attribute_names == info["attribute_names"]


def test_attribute_names_fall_back_to_ids(tmp_path: Path) -> None:
    build_cub(tmp_path, class_ids=(1,), images_per_class=1, num_attributes=3)
    (tmp_path / "attributes.txt").unlink()
    assert CUB200(tmp_path, attributes=True).attribute_names == ["attribute_1", "attribute_2", "attribute_3"]


def test_classification_protocol(cub: tuple[Path, dict]) -> None:
    root, info = cub
    train = CUB200(root, "train", protocol="classification")
    test = CUB200(root, "test", protocol="classification")
    assert train.image_ids == sorted(i for i, t in info["is_train"].items() if t == 1)
    assert test.image_ids == sorted(i for i, t in info["is_train"].items() if t == 0)
    assert train.num_classes == test.num_classes == 4
    assert [train.class_ids[int(lab)] for lab in train.labels] == [info["class_of"][i] for i in train.image_ids]


def test_fewshot_protocol(cub: tuple[Path, dict]) -> None:
    root, _ = cub
    # class folders sorted by name: 001, 002, 101, 102 -> positions 0 base, 1 val, 2 base, 3 novel
    assert CUB200(root, protocol="fewshot_base").class_ids == [1, 101]
    assert CUB200(root, protocol="fewshot_val").class_ids == [2]
    assert CUB200(root, protocol="fewshot_novel").class_ids == [102]
    assert len(CUB200(root, protocol="fewshot_base")) == 6
    with pytest.raises(ValueError, match="split must be 'all'"):
        CUB200(root, "train", protocol="fewshot_base")


def test_boxes_follow_geometric_transforms(cub: tuple[Path, dict]) -> None:
    root, info = cub
    ds = CUB200(root, "train", masks=True, attributes=True, boxes=True)
    sample = ds[0]
    image_id = ds.image_ids[0]
    assert sample["boxes"].tolist() == [list(info["boxes"][image_id])]
    flipped = v2.RandomHorizontalFlip(p=1.0)(sample)
    width = sample["image"].shape[-1]
    assert torch.equal(flipped["image"], sample["image"].flip(-1))
    assert torch.equal(flipped["mask"], sample["mask"].flip(-1))
    x1, y1, x2, y2 = info["boxes"][image_id]
    assert flipped["boxes"].tolist() == [[width - x2, y1, width - x1, y2]]
    assert torch.equal(flipped["attributes"], sample["attributes"])  # plain tensors pass through
    assert flipped["label"] == sample["label"]
    assert flipped["meta"] == sample["meta"]


def test_transform_is_applied_and_dataset_pickles(cub: tuple[Path, dict]) -> None:
    root, _ = cub
    ds = CUB200(root, "train", masks=True, transform=v2.Resize((4, 4)))
    sample = ds[1]
    assert sample["image"].shape == (3, 4, 4)
    assert sample["mask"].shape == (1, 4, 4)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1]["image"], sample["image"])
    assert torch.equal(clone.labels, ds.labels)
    assert "CUB200(num_samples=6" in repr(ds)
    labels = ds.labels
    labels[0] = 99
    assert ds.labels[0] == 0  # .labels hands out a copy


def test_dataloader_with_workers_and_index_types(cub: tuple[Path, dict]) -> None:
    root, _ = cub
    ds = CUB200(root, "test", masks=True, attributes=True, transform=v2.Resize((6, 6)))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(4, 3, 6, 6), (2, 3, 6, 6)]
    assert batches[0]["mask"].shape == (4, 1, 6, 6)
    assert batches[0]["attributes"].shape == (4, 6)
    assert batches[0]["label"].tolist() == ds.labels[:4].tolist()
    assert batches[1]["meta"]["image_id"].tolist() == ds.image_ids[4:]
    assert ds[np.int64(2)]["index"] == ds[torch.tensor(2)]["index"] == 2
    with pytest.raises(TypeError, match="index must be an integer, got str"):
        ds["2"]
    with pytest.raises(TypeError, match="got bool"):
        ds[True]


def test_missing_root_and_files_name_the_file_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing CUB-200-2011 root folder") as err:
        CUB200(tmp_path / "nope")
    assert "Expected layout" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"images\.txt") as err:
        CUB200(tmp_path)
    assert "CUB_200_2011/" in str(err.value)
    assert "image_class_labels.txt" in str(err.value)
    build_cub(tmp_path, class_ids=(1,), images_per_class=1)
    (tmp_path / "CUB_200_2011" / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"classes\.txt") as err:
        CUB200(tmp_path)
    assert "Expected layout" in str(err.value)


def test_missing_segmentations(tmp_path: Path) -> None:
    info = build_cub(tmp_path, class_ids=(1,), images_per_class=2)
    ds = CUB200(tmp_path, masks=True)
    missing = ds.mask_path(0)
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ds[0]
    import shutil

    shutil.rmtree(info["seg_dir"])
    with pytest.raises(FileNotFoundError, match="segmentations") as err:
        CUB200(tmp_path, masks=True)
    assert str(tmp_path / "segmentations") in str(err.value)


def test_corrupt_image_names_the_path(tmp_path: Path) -> None:
    build_cub(tmp_path, class_ids=(1,), images_per_class=2)
    ds = CUB200(tmp_path)
    ds.paths[1].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(CorruptImageError, match=re.escape(str(ds.paths[1]))):
        ds[1]
    assert isinstance(ds[0]["image"], tv_tensors.Image)


def test_malformed_annotation_lines_name_file_and_line(tmp_path: Path) -> None:
    info = build_cub(tmp_path, class_ids=(1, 101), images_per_class=2)
    labels_file = info["base"] / "image_class_labels.txt"
    lines = labels_file.read_text().splitlines()
    lines[2] = "3 one"
    labels_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"image_class_labels\.txt, line 3: column class_id must be an integer"):
        CUB200(tmp_path)
    lines[2] = "3"
    labels_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"image_class_labels\.txt, line 3: expected at least 2 columns"):
        CUB200(tmp_path)


def test_malformed_attribute_line(tmp_path: Path) -> None:
    info = build_cub(tmp_path, class_ids=(1,), images_per_class=2, num_attributes=3)
    path = info["base"] / "attributes" / "image_attribute_labels.txt"
    lines = path.read_text().splitlines()
    lines[4] = "2 2 1"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"image_attribute_labels\.txt, line 5: expected at least 4 columns"):
        CUB200(tmp_path, attributes=True)
    lines[4] = "2 2 1 7 3.0"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"line 5: .*certainty_id in 1\.\.4"):
        CUB200(tmp_path, attributes=True)
    CUB200(tmp_path)  # attributes are only parsed when asked for


def test_bad_arguments(cub: tuple[Path, dict]) -> None:
    root, _ = cub
    with pytest.raises(ValueError, match="split"):
        CUB200(root, "val")
    with pytest.raises(ValueError, match="protocol"):
        CUB200(root, protocol="zeroshot")
    with pytest.raises(TypeError, match="transform"):
        CUB200(root, transform=3)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="attributes=True"):
        _ = CUB200(root).attributes
    with pytest.raises(RuntimeError, match="masks=True"):
        CUB200(root).mask_path(0)
