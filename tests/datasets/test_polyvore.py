from __future__ import annotations

import json
import pickle
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import pytest
import torch
from _builders import build_polyvore
from PIL import Image

from dml_bias.datasets._io import AnnotationError, CorruptImageError
from dml_bias.datasets.polyvore import PolyvoreOutfits


@pytest.fixture(scope="module")
def polyvore(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("polyvore")
    return root, build_polyvore(root)


def test_items_labels_and_outfits(polyvore: tuple[Path, dict]) -> None:
    root, info = polyvore
    train = PolyvoreOutfits(root, "train")
    # distinct items in order of first appearance; 1003 is shared by two outfits
    assert train.item_ids == ["1001", "1002", "1003", "2001", "2002"]
    assert train.outfits == [("100", [0, 1, 2]), ("200", [3, 4, 2])]
    assert train.class_names == ["bags", "bottoms", "shoes", "tops"]
    expected = [train.class_names.index(info["metadata"][i]["semantic_category"]) for i in train.item_ids]
    assert train.labels.tolist() == expected
    assert train.num_classes == 4
    assert len(PolyvoreOutfits(info["base"], "val")) == 2  # root may be polyvore_outfits/ itself; val = valid
    assert len(PolyvoreOutfits(root, "test")) == 7


def test_item_index_and_sample(polyvore: tuple[Path, dict]) -> None:
    root, info = polyvore
    ds = PolyvoreOutfits(root, "train")
    assert ds.item_index("200_3") == ds.item_index("1003") == 2
    assert ds.item_index("100_1") == 0
    with pytest.raises(KeyError, match="'300_1' is neither"):
        ds.item_index("300_1")
    sample = ds[0]
    assert sample["meta"] == {
        "item_id": "1001",
        "semantic_category": info["metadata"]["1001"]["semantic_category"],
        "category_id": info["metadata"]["1001"]["category_id"],
        "title": "item 1001",  # empty title falls back to url_name
    }
    assert ds[3]["meta"]["title"] == "title 2001"
    with Image.open(info["base"] / "images" / "1002.jpg") as ref:
        assert np.array_equal(ds[1]["image"].permute(1, 2, 0).numpy(), np.asarray(ref.convert("RGB")))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.item_index("200_1") == 3
    assert torch.equal(clone.labels, ds.labels)


def test_fitb_questions(polyvore: tuple[Path, dict]) -> None:
    root, _ = polyvore
    ds = PolyvoreOutfits(root, "test")
    ix = ds.item_index
    questions = ds.fitb_questions()
    assert questions[0] == {
        "question": [ix("400_1"), ix("400_2")],
        "answers": [ix("500_1"), ix("400_3"), ix("500_2"), ix("500_4")],
        "correct": 1,
        "blank_position": 3,
    }
    assert questions[1]["correct"] == 0
    assert questions[1]["answers"][0] == ix("500_1")
    hard = ds.fitb_questions(harder=True)
    assert len(hard[0]["answers"]) == 10
    assert hard[0]["correct"] == 0


def test_compatibility_outfits(polyvore: tuple[Path, dict]) -> None:
    root, _ = polyvore
    ds = PolyvoreOutfits(root, "test")
    ix = ds.item_index
    outfits = ds.compatibility_outfits()
    assert [o["label"] for o in outfits] == [1, 0, 1]
    assert outfits[1]["items"] == [ix("400_1"), ix("500_2"), ix("500_3")]
    hard = ds.compatibility_outfits(harder=True)
    assert hard == [
        {"label": 0, "items": [ix("400_1"), ix("500_1")]},
        {"label": 1, "items": [ix("500_3"), ix("500_4")]},
    ]
    with pytest.raises(FileNotFoundError, match=r"fashion_compatibility_harder_train\.txt"):
        PolyvoreOutfits(root, "train").compatibility_outfits(harder=True)


def test_disjoint_variant_missing(polyvore: tuple[Path, dict]) -> None:
    root, _ = polyvore
    with pytest.raises(FileNotFoundError, match=r"missing 'disjoint' split folder .*disjoint\nExpected layout:"):
        PolyvoreOutfits(root, "train", variant="disjoint")


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing Polyvore Outfits root folder"):
        PolyvoreOutfits(tmp_path / "absent")
    info = build_polyvore(tmp_path, harder=False)
    (info["base"] / "polyvore_item_metadata.json").unlink()
    (tmp_path / "polyvore_outfits" / "nondisjoint" / "fill_in_blank_test.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"polyvore_item_metadata\.json\nExpected layout:"):
        PolyvoreOutfits(info["base"], "test")


def test_malformed_entries(tmp_path: Path) -> None:
    info = build_polyvore(tmp_path)
    folder = info["base"] / "nondisjoint"
    compat = folder / "compatibility_test.txt"
    compat.write_text("1 400_1 400_2\n2 400_1 400_3\n")
    ds = PolyvoreOutfits(tmp_path, "test")
    with pytest.raises(AnnotationError, match=r"compatibility_test\.txt, line 2: the label must be 0 or 1"):
        ds.compatibility_outfits()
    compat.write_text("1 400_1 400_2\n\n0 400_1 999_9\n")
    with pytest.raises(AnnotationError, match=r"compatibility_test\.txt, line 3: item '999_9' is not in"):
        ds.compatibility_outfits()
    fitb = folder / "fill_in_blank_test.json"
    fitb.write_text(json.dumps([{"question": ["400_1"], "answers": ["500_1", "500_2"], "blank_position": 2}]))
    with pytest.raises(AnnotationError, match=r"fill_in_blank_test\.json, question 1: expected exactly one answer"):
        ds.fitb_questions()
    fitb.write_text('[{"question": ["400_1"],\n "answers": ]')
    with pytest.raises(AnnotationError, match=r"fill_in_blank_test\.json, line 2: invalid JSON"):
        ds.fitb_questions()
    (folder / "test.json").write_text(json.dumps([{"set_id": "400", "items": [{"item_id": "4001"}]}]))
    with pytest.raises(AnnotationError, match=r"test\.json, outfit 1: expected"):
        PolyvoreOutfits(tmp_path, "test")


def test_corrupt_image(tmp_path: Path) -> None:
    info = build_polyvore(tmp_path, harder=False)
    (info["base"] / "images" / "3002.jpg").write_bytes(b"\xff\xd8broken")
    ds = PolyvoreOutfits(tmp_path, "valid")
    with pytest.raises(CorruptImageError, match=re.escape(str(info["base"] / "images" / "3002.jpg"))):
        ds[ds.item_index("3002")]


def test_bad_arguments(polyvore: tuple[Path, dict]) -> None:
    root, _ = polyvore
    with pytest.raises(ValueError, match="split"):
        PolyvoreOutfits(root, "dev")
    with pytest.raises(ValueError, match="variant"):
        PolyvoreOutfits(root, "test", variant="both")
