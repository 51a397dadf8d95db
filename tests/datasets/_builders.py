"""Builders of tiny copies of the real data sets, in their exact on-disk formats (for the loader tests).

Each builder writes a few small images with PIL and the annotation files with the real names, columns and
headers (see ``shared/docs/datasets.md``), and returns what it wrote so that tests can compare values.
Import with ``sys.path.insert(0, str(Path(__file__).parent))`` then ``from _builders import ...``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def pixel_value(key: int) -> tuple[int, int, int]:
    """A distinct RGB colour per key, so a test can tell which file an image came from."""
    return ((37 * key + 11) % 256, (71 * key + 5) % 256, (113 * key + 29) % 256)


def write_image(path: Path, key: int, size: tuple[int, int] = (12, 8), mode: str = "RGB") -> np.ndarray:
    """Write an image of size (W, H) whose top-left pixel encodes ``key``; return its RGB array (H, W, 3)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[...] = pixel_value(key)
    rgb[:, : width // 2, 0] = 200  # left half differs, to check orientation
    image = Image.fromarray(rgb, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    if path.suffix.lower() == ".png":
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=100)
    with Image.open(path) as saved:  # JPEG is lossy: return what a decoder reads back
        return np.asarray(saved.convert("RGB"))


def write_mask(path: Path, size: tuple[int, int], key: int, mode: str = "L") -> np.ndarray:
    """Write a soft grey mask (H, W) with levels 0, 128 + key and 255; return the 'L' array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    grey = np.zeros((height, width), dtype=np.uint8)
    grey[height // 4 :, width // 3 :] = 128 + key % 100
    grey[height // 2 :, width // 2 :] = 255
    image = Image.fromarray(grey, "L")
    if mode != "L":
        image = image.convert(mode)
    image.save(path, format="PNG")
    return np.asarray(image.convert("L"))


# ----------------------------------------------------------------------------------------------- CUB


def build_cub(
    root: Path,
    class_ids: tuple[int, ...] = (1, 2, 101, 102),
    images_per_class: int = 3,
    *,
    segmentations_inside: bool = False,
    num_attributes: int = 6,
    attributes_txt_at: str = "root",
) -> dict[str, Any]:
    """Write a tiny CUB_200_2011 tree under ``root``; return ids, classes, split flags, boxes and attributes."""
    base = root / "CUB_200_2011"
    seg = (base if segmentations_inside else root) / "segmentations"
    (base / "attributes").mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"names": {}, "class_of": {}, "is_train": {}, "boxes": {}, "present": {}, "certainty": {}}
    class_lines, image_lines, label_lines, split_lines, box_lines, attr_lines = [], [], [], [], [], []
    image_id = 0
    class_names = {}
    for cid in class_ids:
        folder = f"{cid:03d}.Bird_{cid}"
        class_names[cid] = folder
        class_lines.append(f"{cid} {folder}")
        for k in range(images_per_class):
            image_id += 1
            rel = f"{folder}/Bird_{cid}_{k:04d}_{image_id}.jpg"
            size = (10 + image_id % 3, 8 + image_id % 2)
            write_image(base / "images" / rel, image_id, size)
            write_mask((seg / rel).with_suffix(".png"), size, image_id)
            image_lines.append(f"{image_id} {rel}")
            label_lines.append(f"{image_id} {cid}")
            train = int(k % 2 == 0)
            split_lines.append(f"{image_id} {train}")
            box = (1.0 + image_id, 2.0, 5.5, 4.0)
            box_lines.append(f"{image_id} {box[0]} {box[1]} {box[2]} {box[3]}")
            info["names"][image_id] = rel
            info["class_of"][image_id] = cid
            info["is_train"][image_id] = train
            info["boxes"][image_id] = (box[0], box[1], box[0] + box[2], box[1] + box[3])
            present = [(image_id + a) % 2 for a in range(num_attributes)]
            certainty = [1 + (image_id * 3 + a) % 4 for a in range(num_attributes)]
            info["present"][image_id] = present
            info["certainty"][image_id] = certainty
            for a in range(num_attributes):
                attr_lines.append(f"{image_id} {a + 1} {present[a]} {certainty[a]} {12.5 + a:.4f}")
    # The real file has a few lines with an extra token; reproduce one.
    if attr_lines:
        attr_lines[1] = attr_lines[1] + " 0"
    info["class_names"] = class_names
    # Shuffle the order of images.txt lines to check that files are joined by id, not by position.
    (base / "images.txt").write_text("\n".join(reversed(image_lines)) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(label_lines) + "\n")
    (base / "classes.txt").write_text("\n".join(class_lines) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split_lines) + "\n")
    (base / "bounding_boxes.txt").write_text("\n".join(box_lines) + "\n")
    (base / "attributes" / "image_attribute_labels.txt").write_text("\n".join(attr_lines) + "\n")
    (base / "attributes" / "certainties.txt").write_text("1 not visible\n2 guessing\n3 probably\n4 definitely\n")
    names_dir = {"root": root, "base": base, "attributes": base / "attributes"}[attributes_txt_at]
    info["attribute_names"] = [f"has_part_{a}::colour_({a})" for a in range(num_attributes)]
    (names_dir / "attributes.txt").write_text(
        "\n".join(f"{a + 1} {n}" for a, n in enumerate(info["attribute_names"])) + "\n"
    )
    info["seg_dir"] = seg
    info["base"] = base
    return info


# ----------------------------------------------------------------------------------------------- Cars196


def build_cars(root: Path, class_ids: tuple[int, ...] = (1, 2, 99, 100), images_per_class: int = 2) -> dict[str, Any]:
    """Write ``cars_annos.mat`` + ``car_ims/`` in the DML layout, with scipy's savemat; return the records."""
    from scipy.io import savemat

    records = []
    image_no = 0
    for cid in class_ids:
        for k in range(images_per_class):
            image_no += 1
            rel = f"car_ims/{image_no:06d}.jpg"
            mode = "L" if image_no == 2 else "RGB"  # real Cars196 has grey images
            write_image(root / rel, image_no, (9, 7), mode=mode)
            records.append(
                {
                    "relative_im_path": rel,
                    "bbox_x1": 1 + image_no,
                    "bbox_y1": 2,
                    "bbox_x2": 6,
                    "bbox_y2": 5,
                    "class": cid,
                    "test": k % 2,
                }
            )
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    dtype = [(f, object) for f in fields]
    annotations = np.zeros((1, len(records)), dtype=dtype)
    for i, rec in enumerate(records):
        for f in fields:
            value = rec[f]
            annotations[0, i][f] = (
                np.array([value])
                if isinstance(value, str)
                else np.array([[value]], dtype=np.uint16 if f != "test" else np.uint8)
            )
    max_class = max(class_ids)
    class_names = np.empty((1, max_class), dtype=object)
    for c in range(max_class):
        class_names[0, c] = np.array([f"Make{c + 1} Model {2000 + c + 1}"])
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return {"records": records, "class_names": [f"Make{c + 1} Model {2000 + c + 1}" for c in range(max_class)]}


# ----------------------------------------------------------------------------------------------- SOP


SOP_HEADER = "image_id class_id super_class_id path"


def build_sop(root: Path) -> dict[str, Any]:
    """Write ``Stanford_Online_Products/`` with Ebay_train.txt / Ebay_test.txt (header line + rows)."""
    base = root / "Stanford_Online_Products"
    supers = {1: "bicycle_final", 2: "cabinet_final"}
    layout = {"train": [(1, 1), (1, 1), (2, 2), (2, 2), (2, 2)], "test": [(3, 1), (3, 1), (4, 2), (4, 2)]}
    rows: dict[str, list[tuple[int, int, int, str]]] = {}
    image_id = 0
    for split, entries in layout.items():
        rows[split] = []
        for class_id, super_id in entries:
            image_id += 1
            rel = f"{supers[super_id]}/{100000 + class_id}_{image_id}.JPG"
            write_image(base / rel, image_id, (8, 6))
            rows[split].append((image_id, class_id, super_id, rel))
        text = SOP_HEADER + "\n" + "\n".join(" ".join(map(str, r)) for r in rows[split]) + "\n"
        (base / f"Ebay_{split}.txt").write_text(text)
    info_rows = rows["train"] + rows["test"]
    (base / "Ebay_info.txt").write_text(SOP_HEADER + "\n" + "\n".join(" ".join(map(str, r)) for r in info_rows) + "\n")
    return {"base": base, "rows": rows, "supers": supers}


# ----------------------------------------------------------------------------------------------- In-Shop


def build_inshop(root: Path) -> dict[str, Any]:
    """Write ``Eval/list_eval_partition.txt`` (count line, header line, space-padded rows) and ``Img/img/``."""
    entries = [
        ("WOMEN/Dresses", 2, "01_1_front", "train"),
        ("WOMEN/Dresses", 2, "02_2_side", "train"),
        ("MEN/Denim", 5, "01_1_front", "train"),
        ("MEN/Denim", 80, "01_1_front", "query"),
        ("MEN/Denim", 80, "02_4_full", "gallery"),
        ("WOMEN/Tees_Tanks", 81, "01_1_front", "query"),
        ("WOMEN/Tees_Tanks", 81, "03_7_additional", "gallery"),
        ("WOMEN/Tees_Tanks", 90, "01_1_front", "gallery"),
    ]
    lines = [str(len(entries)), "image_name item_id evaluation_status"]
    written = []
    for k, (category, item, stem, status) in enumerate(entries):
        item_id = f"id_{item:08d}"
        name = f"img/{category}/{item_id}/{stem}.jpg"
        write_image(root / "Img" / name, k + 1, (8, 8))
        lines.append(f"{name:<70}{item_id:<15}{status}")
        written.append((name, item_id, status))
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return {"entries": written}


# ----------------------------------------------------------------------------------------------- Polyvore


def build_polyvore(root: Path, variant: str = "nondisjoint", *, harder: bool = True) -> dict[str, Any]:
    """Write ``polyvore_outfits/`` with metadata, outfits, FITB and compatibility files for one variant."""
    base = root / "polyvore_outfits"
    folder = base / variant
    folder.mkdir(parents=True, exist_ok=True)
    categories = {
        "11": ("tops", "tops"),
        "22": ("jeans", "bottoms"),
        "33": ("sneakers", "shoes"),
        "44": ("tote", "bags"),
    }
    outfits = {
        "train": [("100", ["1001", "1002", "1003"]), ("200", ["2001", "2002", "1003"])],
        "valid": [("300", ["3001", "3002"])],
        "test": [("400", ["4001", "4002", "4003"]), ("500", ["5001", "5002", "5003", "5004"])],
    }
    cats = list(categories)
    metadata = {}
    key = 0
    for split_outfits in outfits.values():
        for _, items in split_outfits:
            for item in items:
                if item in metadata:
                    continue
                key += 1
                cat = cats[int(item) % len(cats)]
                metadata[item] = {
                    "url_name": f"item {item}",
                    "description": "",
                    "catgeories": ["Women's Fashion", categories[cat][0]],
                    "title": "" if item == "1001" else f"title {item}",
                    "related": [],
                    "category_id": cat,
                    "semantic_category": categories[cat][1],
                }
                write_image(base / "images" / f"{item}.jpg", key, (8, 8))
    (base / "polyvore_item_metadata.json").write_text(json.dumps(metadata))
    (base / "polyvore_outfit_titles.json").write_text(json.dumps({"100": {"title": "outfit 100"}}))
    (base / "categories.csv").write_text("\n".join(f"{c},{f},{s}" for c, (f, s) in categories.items()) + "\n")
    for split, split_outfits in outfits.items():
        outfit_json = [
            {"set_id": sid, "items": [{"item_id": it, "index": i + 1} for i, it in enumerate(items)]}
            for sid, items in split_outfits
        ]
        (folder / f"{split}.json").write_text(json.dumps(outfit_json))
    # test FITB: question 400_1, 400_2 + blank at position 3; answers from other outfits + the right one.
    fitb_test = [
        {"question": ["400_1", "400_2"], "answers": ["500_1", "400_3", "500_2", "500_4"], "blank_position": 3},
        {"question": ["500_2", "500_3", "500_4"], "answers": ["500_1", "400_1", "400_2", "400_3"], "blank_position": 1},
    ]
    (folder / "fill_in_blank_test.json").write_text(json.dumps(fitb_test))
    (folder / "fill_in_blank_train.json").write_text(
        json.dumps([{"question": ["100_1", "100_2"], "answers": ["200_1", "100_3"], "blank_position": 3}])
    )
    (folder / "fill_in_blank_valid.json").write_text(json.dumps([]))
    compat_test = ["1 400_1 400_2 400_3", "0 400_1 500_2 500_3", "1 500_1 500_2 500_3 500_4"]
    (folder / "compatibility_test.txt").write_text("\n".join(compat_test) + "\n")
    (folder / "compatibility_train.txt").write_text("1 100_1 100_2 100_3\n")
    (folder / "compatibility_valid.txt").write_text("1 300_1 300_2\n")
    (folder / "typespaces.p").write_bytes(pickle.dumps([("tops", "bottoms")]))
    if harder:
        hard = [
            {
                "question": ["400_1", "400_2"],
                "answers": ["400_3", "500_1", "500_2", "500_3", "500_4", "500_1", "500_2", "500_3", "500_4", "500_1"],
                "blank_position": 3,
            }
        ]
        (folder / "fill_in_blank_test_harder_new.json").write_text(json.dumps(hard))
        (folder / "fashion_compatibility_harder_test.txt").write_text("0 400_1 500_1\n1 500_3 500_4\n")
    return {"base": base, "outfits": outfits, "metadata": metadata, "categories": categories}


# ----------------------------------------------------------------------------------------------- Revisited


def build_revisited(root: Path, name: str = "roxford5k", *, distractors: bool = False) -> dict[str, Any]:
    """Write ``datasets/<name>/gnd_<name>.pkl`` and ``jpg/`` (and optionally ``revisitop1m/``)."""
    folder = root / "datasets" / name
    imlist = [f"all_souls_{k:06d}" for k in range(5)]
    qimlist = ["all_souls_000013", "radcliffe_camera_000519"]
    for k, stem in enumerate(imlist + qimlist):
        write_image(folder / "jpg" / f"{stem}.jpg", k + 1, (20, 16))
    gnd = [
        {"bbx": [2.4, 1.6, 14.5, 12.0], "easy": [0, 2], "hard": [1], "junk": [4]},
        {"bbx": [0.0, 0.0, 20.0, 16.0], "easy": [], "hard": [3], "junk": []},
    ]
    with open(folder / f"gnd_{name}.pkl", "wb") as handle:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, handle)
    info: dict[str, Any] = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd, "folder": folder}
    if distractors:
        r1m = root / "datasets" / "revisitop1m"
        names = ["0/00/abc.jpg", "0/01/def.jpg"]
        for k, n in enumerate(names):
            write_image(r1m / "jpg" / n, 50 + k, (6, 6))
        (r1m / "revisitop1m.txt").write_text("\n".join(names) + "\n")
        info["distractors"] = names
    return info


def _mat_struct(records: list[dict[str, Any]], fields: list[str]) -> np.ndarray:
    """A 1 x N MATLAB struct array as ``scipy.io.savemat`` writes it (each field a nested array)."""
    annotations = np.zeros((1, len(records)), dtype=[(f, object) for f in fields])
    for i, rec in enumerate(records):
        for f in fields:
            value = rec[f]
            annotations[0, i][f] = np.array([value]) if isinstance(value, str) else np.array([[value]], dtype=np.uint16)
    return annotations


def build_cars_devkit(root: Path) -> dict[str, Any]:
    """Write the devkit layout: cars_train/, cars_test/, devkit/*.mat and cars_test_annos_withlabels.mat."""
    from scipy.io import savemat

    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    halves = {"cars_train": [1, 99, 2], "cars_test": [99, 1, 100]}
    written = {}
    key = 0
    for folder, classes in halves.items():
        records = []
        for n, cid in enumerate(classes, start=1):
            key += 1
            fname = f"{n:05d}.jpg"
            write_image(root / folder / fname, key, (9, 7))
            records.append({"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 5, "bbox_y2": 4, "class": cid, "fname": fname})
        written[folder] = records
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _mat_struct(written["cars_train"], fields)})
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _mat_struct(written["cars_test"], fields)})
    names = np.empty((1, 100), dtype=object)
    for c in range(100):
        names[0, c] = np.array([f"Car {c + 1}"])
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    return written
