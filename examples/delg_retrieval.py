"""DELG end to end on a tiny Revisited-format data set built on the fly: train, extract, retrieve, re-rank, mAP.

Nothing is downloaded. The script

1. builds synthetic "landmarks" from :class:`dml_bias.datasets.SyntheticBackgrounds` objects: a landmark is a
   fixed arrangement of four objects; a *view* of it is a random affine warp of that arrangement (rotation,
   scale, shear, translation) pasted onto a background texture drawn afresh for every view, so the background
   says nothing about the landmark and the geometry of the objects says everything;
2. writes the test landmarks to disk in the layout of the Revisited Oxford/Paris archives
   (``datasets/roxford5k/jpg/*.jpg`` and ``gnd_roxford5k.pkl`` with ``easy`` / ``hard`` / ``junk`` lists and a
   query ``bbx``) and reads them back with :class:`dml_bias.datasets.RevisitedOxfordParis` (queries cropped to
   their box, as the protocol wants);
3. trains :class:`dml_bias.heads.DELG` on a small ResNet (torchvision ``resnet18(weights=None)``) on views of
   the *training* landmarks (disjoint from the test ones) with its ArcFace + reconstruction + attention losses;
4. extracts multi-scale global descriptors and local features, ranks the database by the global descriptor,
   re-ranks the top of every ranking by spatial verification (:func:`dml_bias.retrieval.rerank`) and prints the
   Medium and Hard mAP (:func:`dml_bias.metrics.revisited_map`) before and after re-ranking.

Views: *easy* = a mild warp (rotation ≤ 15°, scale 0.85–1.15), *hard* = a strong one (rotation 25–45°, scale
0.6–0.75 or 1.3–1.45, shear), *junk* = a view of which most is cut off by the image border.

Run ``python examples/delg_retrieval.py`` (about 5.5 minutes on 2 CPU cores) or ``--quick`` (CI-sized, about 7 s).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dml_bias.datasets import RevisitedOxfordParis, SyntheticBackgrounds
from dml_bias.heads import DELG
from dml_bias.metrics import knn, revisited_map
from dml_bias.retrieval import rerank

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class Config:
    image_size: int = 192
    train_landmarks: int = 16
    test_landmarks: int = 10
    easy_per_landmark: int = 3
    hard_per_landmark: int = 3
    junk_per_landmark: int = 1
    steps: int = 300
    batch_size: int = 16
    lr: float = 0.01
    num_to_rerank: int = 30
    max_features: int = 300
    seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(
            image_size=128,
            train_landmarks=6,
            test_landmarks=4,
            easy_per_landmark=2,
            hard_per_landmark=1,
            junk_per_landmark=1,
            steps=8,
            batch_size=8,
            num_to_rerank=10,
            max_features=100,
        )


class Landmarks:
    """Landmarks (four objects in a fixed arrangement) and their views on random backgrounds."""

    def __init__(self, split: str, num_landmarks: int, image_size: int, seed: int) -> None:
        self.size = image_size
        tile = image_size // 3
        # four distinct classes' objects per landmark, rendered on black with their masks
        objects = SyntheticBackgrounds(
            split, num_classes=4 * num_landmarks, images_per_class=1, image_size=tile, seed=seed
        )
        backgrounds = SyntheticBackgrounds(
            split, num_classes=8, images_per_class=16, image_size=image_size, seed=seed + 1, variant="only_bg_t"
        )
        self.backgrounds = backgrounds.render_all()[0]  # (128, 3, S, S) uint8, rendered once
        self.rgb = torch.zeros(num_landmarks, 3, image_size, image_size)
        self.mask = torch.zeros(num_landmarks, 1, image_size, image_size)
        rng = np.random.default_rng([seed, 7])
        for lm in range(num_landmarks):
            # a jittered 2x2 layout around the centre, fixed per landmark
            for slot in range(4):
                image, mask = objects.render(4 * lm + slot, background_id=-1)
                oy = image_size // 2 - tile + (slot // 2) * tile + int(rng.integers(-tile // 6, tile // 6 + 1))
                ox = image_size // 2 - tile + (slot % 2) * tile + int(rng.integers(-tile // 6, tile // 6 + 1))
                inside = mask.float() / 255
                self.rgb[lm, :, oy : oy + tile, ox : ox + tile] = image.float() / 255 * inside
                self.mask[lm, :, oy : oy + tile, ox : ox + tile] = torch.maximum(
                    self.mask[lm, :, oy : oy + tile, ox : ox + tile], inside
                )
        self.num_landmarks = num_landmarks

    def view(self, landmark: int, kind: str, rng: np.random.Generator) -> tuple[torch.Tensor, list[float]]:
        """A ``(3, S, S)`` float image in [0, 1] of ``landmark`` and the box ``[x1, y1, x2, y2]`` of its objects."""
        if kind == "easy":
            angle, scale, shear = rng.uniform(-15, 15), rng.uniform(0.85, 1.15), (0.0, 0.0)
            shift = rng.uniform(-0.08, 0.08, 2)
        elif kind == "hard":
            angle = rng.choice([-1, 1]) * rng.uniform(25, 45)
            scale = rng.uniform(0.6, 0.75) if rng.random() < 0.5 else rng.uniform(1.3, 1.45)
            shear, shift = tuple(rng.uniform(-12, 12, 2)), rng.uniform(-0.1, 0.1, 2)
        elif kind == "junk":
            angle, scale, shear = rng.uniform(-15, 15), rng.uniform(0.9, 1.1), (0.0, 0.0)
            shift = rng.choice([-1, 1], 2) * rng.uniform(0.38, 0.45, 2)
        else:  # "query": nearly frontal
            angle, scale, shear = rng.uniform(-5, 5), rng.uniform(0.95, 1.05), (0.0, 0.0)
            shift = rng.uniform(-0.03, 0.03, 2)
        translate = [float(shift[0] * self.size), float(shift[1] * self.size)]
        params = {"angle": float(angle), "translate": translate, "scale": float(scale), "shear": list(shear)}
        rgb = TF.affine(self.rgb[landmark], **params, interpolation=TF.InterpolationMode.BILINEAR)
        mask = TF.affine(self.mask[landmark], **params, interpolation=TF.InterpolationMode.BILINEAR)
        background = self.backgrounds[int(rng.integers(len(self.backgrounds)))].float() / 255
        image = rgb + (1 - mask) * background
        ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)] if len(xs) else []
        return image.clamp(0, 1), box


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - MEAN) / STD


def write_revisited(root: Path, landmarks: Landmarks, cfg: Config) -> None:
    """Write the test landmarks as ``root/datasets/roxford5k`` (jpg/ + gnd_roxford5k.pkl)."""
    folder = root / "datasets" / "roxford5k"
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 11])
    imlist: list[str] = []
    kinds: list[tuple[int, str]] = []
    for lm in range(landmarks.num_landmarks):
        counts = (("easy", cfg.easy_per_landmark), ("hard", cfg.hard_per_landmark), ("junk", cfg.junk_per_landmark))
        for kind, count in counts:
            kinds += [(lm, kind)] * count
    order = rng.permutation(len(kinds))  # database order unrelated to the landmarks
    for position, k in enumerate(order.tolist()):
        lm, kind = kinds[k]
        image, _ = landmarks.view(lm, kind, rng)
        name = f"db_{position:04d}"
        save_jpg(image, folder / "jpg" / f"{name}.jpg")
        imlist.append(name)
    qimlist, gnd = [], []
    for lm in range(landmarks.num_landmarks):
        image, box = landmarks.view(lm, "query", rng)
        name = f"query_{lm:03d}"
        save_jpg(image, folder / "jpg" / f"{name}.jpg")
        qimlist.append(name)
        members = {
            kind: [p for p, k in enumerate(order.tolist()) if kinds[k] == (lm, kind)]
            for kind in ("easy", "hard", "junk")
        }
        gnd.append({"bbx": box, **members})
    with open(folder / "gnd_roxford5k.pkl", "wb") as handle:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, handle)


def save_jpg(image: torch.Tensor, path: Path) -> None:
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path, quality=95)


def load(dataset: RevisitedOxfordParis, size: int) -> torch.Tensor:
    """All images of ``dataset`` as one float batch, each resized (keeping its aspect) into a padded square."""
    batch = torch.zeros(len(dataset), 3, size, size)
    for i in range(len(dataset)):
        image = dataset[i]["image"].float() / 255
        h, w = image.shape[1:]
        f = size / max(h, w)
        image = TF.resize(image, [max(1, round(h * f)), max(1, round(w * f))], antialias=True)
        batch[i, :, : image.shape[1], : image.shape[2]] = image
    return batch


def train(model: DELG, landmarks: Landmarks, cfg: Config) -> list[float]:
    rng = np.random.default_rng([cfg.seed, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(cfg.steps, 1))
    model.train()
    losses = []
    for _ in range(cfg.steps):
        labels = torch.as_tensor(rng.integers(0, landmarks.num_landmarks, cfg.batch_size))
        kinds = rng.choice(["easy", "hard", "query"], cfg.batch_size)
        views = [landmarks.view(int(lm), str(kind), rng)[0] for lm, kind in zip(labels, kinds, strict=True)]
        images = torch.stack(views)
        out = model(normalise(images), labels)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        schedule.step()
        losses.append(float(out.loss.detach()))
    return losses


def unpad(features, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(features.lengths[i])
    return features.locations[i, :n], features.descriptors[i, :n]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a CI-sized run (seconds)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="where to write the data set (default: a temporary folder)")
    args = parser.parse_args(argv)
    cfg = Config.quick() if args.quick else Config()
    if args.steps is not None:
        cfg.steps = args.steps
    cfg.seed = args.seed
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()

    train_landmarks = Landmarks("train", cfg.train_landmarks, cfg.image_size, cfg.seed)
    test_landmarks = Landmarks("test", cfg.test_landmarks, cfg.image_size, cfg.seed)
    backbone = torchvision.models.resnet18(weights=None)
    model = DELG(backbone, num_classes=cfg.train_landmarks, global_dim=128, local_dim=64)
    losses = train(model, train_landmarks, cfg)
    print(f"trained {cfg.steps} steps: loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        write_revisited(root, test_landmarks, cfg)
        queries = RevisitedOxfordParis(root, "roxford5k", "query")
        database = RevisitedOxfordParis(root, "roxford5k", "database")
        q_images, db_images = load(queries, cfg.image_size), load(database, cfg.image_size)
        gnd = database.gnd

    model.eval()
    q_global, db_global = model.extract_global(normalise(q_images)), model.extract_global(normalise(db_images))
    q_local = model.extract_local(normalise(q_images), max_features=cfg.max_features)
    db_local = model.extract_local(normalise(db_images), max_features=cfg.max_features)

    scores, ranks = knn(q_global, db_global, k=len(database))
    before = revisited_map(ranks, gnd, protocols=("medium", "hard"))
    q_loc, q_desc = zip(*(unpad(q_local, i) for i in range(len(queries))), strict=True)
    db_loc, db_desc = zip(*(unpad(db_local, i) for i in range(len(database))), strict=True)
    results = {"global": {}, "reranked": {}}
    for protocol in ("medium", "hard"):
        junk = [sorted(set(g.get("junk", [])) | (set(g["easy"]) if protocol == "hard" else set())) for g in gnd]
        reranked = rerank(ranks, scores, q_loc, q_desc, db_loc, db_desc, num_to_rerank=cfg.num_to_rerank, junk=junk)
        after = revisited_map(reranked, gnd, protocols=(protocol,))
        results["global"][protocol] = before[protocol]["map"]
        results["reranked"][protocol] = after[protocol]["map"]

    print(
        f"\n{len(queries)} queries, {len(database)} database images, {cfg.image_size}px, "
        f"re-ranking the top {cfg.num_to_rerank}"
    )
    print(f"{'':>22} {'Medium mAP':>11} {'Hard mAP':>9}")
    for name, label in (("global", "global descriptor"), ("reranked", "+ spatial verif.")):
        print(f"{label:>22} {100 * results[name]['medium']:11.1f} {100 * results[name]['hard']:9.1f}")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
