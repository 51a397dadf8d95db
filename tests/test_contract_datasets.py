"""The test contract (``tests/contract.py``) for the data sets (on tiny copies in the real on-disk formats,
written by ``tests/datasets/_builders.py``) and the attribute-compatibility task."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import contract as C
import numpy as np
import pytest
import torch
from contract import Entry, call, instance, tensor
from PIL import Image
from torchvision import tv_tensors

from dml_bias import datasets as DS

sys.path.insert(0, str(Path(__file__).parent / "datasets"))
import _builders as build

_ROOTS: dict[str, Path] = {}


@pytest.fixture(autouse=True, scope="module")
def _cleanup() -> Iterator[None]:
    yield
    for root in _ROOTS.values():
        shutil.rmtree(root, ignore_errors=True)
    _ROOTS.clear()


def root_of(name: str, builder: Callable[[Path], Any]) -> Path:
    """A tiny copy of the data set, written once per test module."""
    if name not in _ROOTS:
        _ROOTS[name] = Path(tempfile.mkdtemp(prefix=f"dml_contract_{name}_"))
        builder(_ROOTS[name])
    return _ROOTS[name]


def masked_folder(root: Path) -> None:
    for c in ("cat", "dog"):
        for i in range(2):
            (root / "images" / c).mkdir(parents=True, exist_ok=True)
            (root / "masks" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((6, 8, 3), 40 * i + 10, dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
            Image.new("L", (8, 6), 255).save(root / "masks" / c / f"{i}.png")


def file_name(meta: dict[str, Any]) -> str:
    for key in ("path", "image_name"):
        if key in meta:
            return Path(meta[key]).name
    return f"{meta.get('item_id', meta.get('name'))}.jpg"


def decoded(root: Path) -> Callable[[dict[str, Any]], torch.Tensor]:
    """The reference: the sample's file found on disk by name and decoded by PIL (RGB, (C, H, W) uint8)."""

    def reference(sample: dict[str, Any]) -> torch.Tensor:
        name = file_name(sample["meta"]) if "meta" in sample else None
        (path,) = [p for p in root.rglob(name or "*") if p.is_file()][:1]
        with Image.open(path) as img:
            return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)

    return reference


def sample_expect(out: Any, _: torch.dtype) -> None:
    instance(dict, image=tensor(None, torch.uint8, kind=tv_tensors.Image))(out, _)
    assert isinstance(out["label"], int)


FILES = "reads image files on the host: the loader gives uint8 images"
DATASET_SKIP = {
    "gradcheck": C.NOT_DIFFERENTIABLE,
    "dtype": FILES,
    "device": C.CPU_ONLY,
    "twin": "a Dataset: indexing is its only form",
}

LOADERS = [
    ("CUB200", DS.CUB200, build.build_cub),
    ("Cars196", DS.Cars196, build.build_cars),
    ("StanfordOnlineProducts", DS.StanfordOnlineProducts, build.build_sop),
    ("InShop", DS.InShop, build.build_inshop),
    ("PolyvoreOutfits", DS.PolyvoreOutfits, build.build_polyvore),
    ("RevisitedOxfordParis", DS.RevisitedOxfordParis, build.build_revisited),
]


def loader_entry(name: str, cls: Any, builder: Callable[[Path], Any]) -> Entry:
    return Entry(
        f"dml_bias.datasets:{name}",
        lambda dtype: call(1),
        sample_expect,
        make=lambda dtype: cls(root_of(name, builder)),
        invoke=lambda ds, i: ds[i],
        out=lambda s: (s["image"].as_subclass(torch.Tensor), s["meta"]),
        reference=lambda i: (
            decoded(root_of(name, builder))(cls(root_of(name, builder))[i]),
            cls(root_of(name, builder))[i]["meta"],
        ),
        dtypes=(),
        skip=DATASET_SKIP,
    )


def gate_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Three pairs of one-hot attribute rows: identical; another shape; another mark and secondary colour."""
    a1 = torch.zeros(3, 20, dtype=torch.long)
    a1[:, [0, 4, 10, 14, 17]] = 1  # shape 0, colour 0, pattern 0, mark 0, secondary 0
    a2 = a1.clone()
    a2[1, 0], a2[1, 1] = 0, 1  # another shape
    a2[2, 14], a2[2, 15], a2[2, 17], a2[2, 19] = 0, 1, 0, 1  # another mark, another secondary colour
    return a1, a2


def gate_ref(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """An attribute matches when its whole one-hot group agrees (group sizes from OBJECT_ATTRIBUTES)."""
    sizes = [len(values) for values in DS.OBJECT_ATTRIBUTES.values()]
    out = []
    for r1, r2 in zip(a1.tolist(), a2.tolist(), strict=True):
        start, row = 0, []
        for size in sizes:
            row.append(r1[start : start + size] == r2[start : start + size])
            start += size
        out.append(row)
    return torch.tensor(out)


CS = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])  # (colour, shape) of four items


def attribute_or_ref(n: int) -> torch.Tensor:
    """Clean target of rule 'or': the two items share their colour or their shape (from the task's values)."""
    task = DS.AttributeCompatibility("train", rule="or", num_classes=8, images_per_class=3, image_size=8)
    pairs = task.pairs(n, generator=torch.Generator().manual_seed(0))
    same = task.values[pairs.first][:, [1, 0]] == task.values[pairs.second][:, [1, 0]]
    return same.any(dim=1).float()


ENTRIES: list[Entry] = [loader_entry(*row) for row in LOADERS]

ENTRIES += [
    Entry(
        "dml_bias.datasets:MaskedFolder",
        lambda dtype: call(3),
        lambda out, _: instance(dict, image=tensor((3, 6, 8), torch.uint8), mask=tensor((1, 6, 8), None))(out, _),
        make=lambda dtype: DS.MaskedFolder(root_of("masked", masked_folder)),
        invoke=lambda ds, i: ds[i],
        out=lambda s: (s["image"].as_subclass(torch.Tensor), s["label"]),
        reference=lambda i: (torch.full((3, 6, 8), 50, dtype=torch.uint8), 1),  # dog/1.png: the value 40 + 10
        dtypes=(),
        skip=DATASET_SKIP,
    ),
    Entry(
        "dml_bias.datasets:SyntheticBackgrounds",
        lambda dtype: call(5),
        lambda out, _: instance(dict, image=tensor((3, 16, 16), None), mask=tensor(None, None))(out, _),
        make=lambda dtype: DS.SyntheticBackgrounds("train", num_classes=3, images_per_class=2, image_size=16),
        invoke=lambda ds, i: ds[i],
        out=lambda s: (s["label"], s["image"].as_subclass(torch.Tensor)),
        reference=lambda i: (
            2,  # class-major order: index 5 = class 2
            DS.SyntheticBackgrounds("train", num_classes=3, images_per_class=2, image_size=16)[i]["image"],
        ),
        dtypes=(),
        skip={**DATASET_SKIP, "dtype": "generates uint8 images"},
    ),
    Entry(
        "dml_bias.datasets:AttributeCompatibility",
        lambda dtype: call(6, generator=torch.Generator().manual_seed(0)),
        lambda out, _: instance(DS.CompatibilityPairs, first=tensor((6,), torch.int64))(out, _),
        make=lambda dtype: DS.AttributeCompatibility(
            "train", rule="or", num_classes=8, images_per_class=3, image_size=8
        ),
        invoke=lambda task, n, **kw: (task, task.pairs(n, **kw))[1],
        out=lambda p: p.clean,
        reference=lambda n, generator: attribute_or_ref(n),
        dtypes=(),
        skip={**DATASET_SKIP, "dtype": "integer attributes in, pairs of indices out"},
    ),
    Entry(
        "dml_bias.datasets:compatibility_labels",
        lambda dtype: call(CS[[0, 0, 0, 0]], CS[[0, 1, 2, 3]], "xnor"),
        tensor((4,), None),
        reference=lambda v1, v2, rule: torch.tensor(
            [
                float(
                    all(a == b for a, b in zip(r1, r2, strict=True)) or all(a != b for a, b in zip(r1, r2, strict=True))
                )
                for r1, r2 in zip(v1, v2, strict=True)
            ]
        ),
        dtypes=(),
        skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": C.NOT_FLOAT},
    ),
    Entry(
        "dml_bias.datasets:attribute_match_gate",
        lambda dtype: call(*gate_rows()),
        tensor((3, 5), torch.bool),
        reference=gate_ref,
        dtypes=(),
        skip={"gradcheck": C.NOT_DIFFERENTIABLE, "dtype": "binary attributes in, bool matches out"},
    ),
]


@pytest.mark.parametrize(("entry", "check"), C.params(ENTRIES))
def test_contract(entry: Entry, check: str) -> None:
    C.run(entry, check)
