from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import pytest
import torch
from _builders import build_revisited
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from dml_bias.datasets._io import AnnotationError, CorruptImageError
from dml_bias.datasets.revisited import RevisitedOxfordParis


@pytest.fixture(scope="module")
def revisited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("revisited")
    return root, build_revisited(root, distractors=True)


def test_database_and_queries(revisited: tuple[Path, dict]) -> None:
    root, info = revisited
    db = RevisitedOxfordParis(root, "roxford5k", "database")
    queries = RevisitedOxfordParis(root, "roxford5k", "query")
    assert len(db) == 5
    assert len(queries) == 2
    assert db.labels.tolist() == [-1] * 5
    assert queries.labels.tolist() == [0, 1]
    assert queries.class_names == info["qimlist"]
    assert db.database_names == info["imlist"]
    assert [p.name for p in db.paths] == [f"{n}.jpg" for n in info["imlist"]]
    assert db.gnd == [{k: (list(v) if k != "bbx" else tuple(v)) for k, v in g.items()} for g in info["gnd"]]
    assert db[3]["meta"] == {"name": "all_souls_000003", "kind": "database"}
    assert "bbx" not in db[0]
    # root may be the datasets/ folder or the roxford5k/ folder itself
    assert len(RevisitedOxfordParis(root / "datasets", "roxford5k", "query")) == 2
    assert len(RevisitedOxfordParis(info["folder"], "roxford5k", "query")) == 2


def test_query_crop_matches_pil(revisited: tuple[Path, dict]) -> None:
    root, info = revisited
    queries = RevisitedOxfordParis(root, "roxford5k", "query")
    sample = queries[0]
    box = info["gnd"][0]["bbx"]
    with Image.open(info["folder"] / "jpg" / "all_souls_000013.jpg") as ref:
        expected = np.asarray(ref.convert("RGB").crop(box))
    assert sample["image"].shape == (3, 10, 12)  # (2.4, 1.6, 14.5, 12.0) rounds to (2, 2, 14, 12)
    assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), expected)
    assert sample["bbx"].dtype == torch.float64
    assert sample["bbx"].tolist() == box
    resized = v2.Resize((5, 6))(sample)
    assert resized["image"].shape == (3, 5, 6)
    assert resized["bbx"].tolist() == box  # the provenance box is a plain tensor, left alone
    uncropped = RevisitedOxfordParis(root, "roxford5k", "query", crop_queries=False)[0]
    assert uncropped["image"].shape == (3, 16, 20)
    assert isinstance(uncropped["bbx"], tv_tensors.BoundingBoxes)
    flipped = v2.RandomHorizontalFlip(p=1.0)(uncropped)
    assert flipped["bbx"][0].tolist() == pytest.approx([20 - box[2], box[1], 20 - box[0], box[3]])


def test_positives_per_protocol(revisited: tuple[Path, dict]) -> None:
    root, _ = revisited
    ds = RevisitedOxfordParis(root, "roxford5k", "query")
    assert ds.positives("easy") == [([0, 2], [1, 4]), ([], [3])]
    assert ds.positives("medium") == [([0, 1, 2], [4]), ([3], [])]
    assert ds.positives("hard") == [([1], [0, 2, 4]), ([3], [])]
    with pytest.raises(ValueError, match="protocol"):
        ds.positives("extreme")


def test_distractors_follow_the_database(revisited: tuple[Path, dict]) -> None:
    root, info = revisited
    db = RevisitedOxfordParis(root, "roxford5k", "database", distractors=True)
    assert len(db) == 7
    assert db[5]["meta"] == {"name": info["distractors"][0], "kind": "distractor"}
    assert db.paths[6] == root / "datasets" / "revisitop1m" / "jpg" / info["distractors"][1]
    assert db[6]["image"].shape == (3, 6, 6)
    assert db.labels.tolist() == [-1] * 7
    clone = pickle.loads(pickle.dumps(db))
    assert torch.equal(clone[6]["image"], db[6]["image"])


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing Revisited Oxford/Paris root folder"):
        RevisitedOxfordParis(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"missing folder .*datasets/rparis6k \(also looked for") as err:
        RevisitedOxfordParis(tmp_path, "rparis6k")
    assert "gnd_rparis6k.pkl" in str(err.value)
    info = build_revisited(tmp_path, "rparis6k")
    with pytest.raises(FileNotFoundError, match="revisitop1m"):
        RevisitedOxfordParis(tmp_path, "rparis6k", distractors=True)
    (info["folder"] / "gnd_rparis6k.pkl").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing file .*gnd_rparis6k\.pkl\nExpected layout:"):
        RevisitedOxfordParis(tmp_path, "rparis6k")


def test_malformed_ground_truth(tmp_path: Path) -> None:
    info = build_revisited(tmp_path)
    path = info["folder"] / "gnd_roxford5k.pkl"
    data = {"imlist": info["imlist"], "qimlist": info["qimlist"], "gnd": [dict(g) for g in info["gnd"]]}
    data["gnd"][1]["hard"] = [7]
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(AnnotationError, match=r"gnd_roxford5k\.pkl, query 1: 'hard' holds 7, outside the database"):
        RevisitedOxfordParis(tmp_path)
    data["gnd"][1]["hard"] = [3]
    data["gnd"][0]["bbx"] = [5, 5, 1, 1]
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(AnnotationError, match=r"query 0: bbx must be"):
        RevisitedOxfordParis(tmp_path)
    path.write_bytes(pickle.dumps({"imlist": []}))
    with pytest.raises(AnnotationError, match="expected a dict with keys"):
        RevisitedOxfordParis(tmp_path)
    path.write_bytes(b"garbage")
    with pytest.raises(AnnotationError, match="cannot unpickle"):
        RevisitedOxfordParis(tmp_path)


def test_corrupt_image(tmp_path: Path) -> None:
    info = build_revisited(tmp_path)
    bad = info["folder"] / "jpg" / "all_souls_000002.jpg"
    bad.write_bytes(b"not an image at all")
    ds = RevisitedOxfordParis(tmp_path)
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        ds[2]


def test_bad_arguments(revisited: tuple[Path, dict]) -> None:
    root, _ = revisited
    with pytest.raises(ValueError, match="name"):
        RevisitedOxfordParis(root, "oxford5k")
    with pytest.raises(ValueError, match="split"):
        RevisitedOxfordParis(root, "roxford5k", "gallery")
