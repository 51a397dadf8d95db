"""Throughput of the background-mask transforms in a realistic input pipeline.

1. Per-sample pipeline (decode-free uint8 tensors 3x256x256 with a mask, RandomResizedCrop(224), flip,
   ToDtype, Normalize) with and without BackgroundMask, timed in the main process and through a DataLoader
   with workers; in the main process also with a JPEG decode in front, as in a real pipeline. Goal: the mask
   adds at most 10 % to the pipeline.
2. Batched ``functional.mask_background`` on the device (CUDA if present, else CPU) against a per-sample loop
   on the CPU.

    python benchmarks/transforms.py [--samples 256] [--workers 2] [--batch 64] [--repeats 3] [--batched 128]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from dml_bias.transforms import BackgroundMask
from dml_bias.transforms.functional import mask_background

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class InMemory(Dataset):
    """Decode-free samples: uint8 images with an elliptic object mask, built once."""

    def __init__(self, n: int, size: int, transform: v2.Transform, jpeg: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        # optional JPEG round trip per sample, for a pipeline that decodes like a real one
        self.jpegs = [torchvision.io.encode_jpeg(im, quality=90) for im in self.images] if jpeg else None
        ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        centres = torch.rand(n, 2, generator=g) * size * 0.5 + size * 0.25
        dist = ((ys - centres[:, 0, None, None]) / (size * 0.3)) ** 2 + (
            (xs - centres[:, 1, None, None]) / (size * 0.2)
        ) ** 2
        self.masks = ((dist <= 1).to(torch.uint8) * 255)[:, None]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = self.images[i] if self.jpegs is None else torchvision.io.decode_jpeg(self.jpegs[i])
        sample = {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(self.masks[i]), "label": i % 10}
        return self.transform(sample)


def pipeline(mask: BackgroundMask | None, after_todtype: bool = False) -> v2.Compose:
    steps: list = [v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()]
    if mask is not None and not after_todtype:
        steps.append(mask)
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if mask is not None and after_todtype:
        steps.append(mask)
    steps.append(v2.Normalize(MEAN, STD))
    return v2.Compose(steps)


def time_main_process(datasets: dict[str, InMemory], rounds: int, chunk: int = 16) -> dict[str, float]:
    """Seconds per sample with the transforms run in this process: the best of ``rounds`` chunks per variant.

    The variants take turns chunk by chunk, so load changes on a shared machine hit all of them alike, and the
    minimum over many short chunks filters out the chunks that another process interrupted.
    """
    best = dict.fromkeys(datasets, float("inf"))
    for r in range(rounds):
        for name, dataset in datasets.items():
            torch.manual_seed(r)  # every variant sees the same crops in round r
            start = (r * chunk) % len(dataset)
            t0 = time.perf_counter()
            for i in range(start, start + chunk):
                dataset[i % len(dataset)]
            best[name] = min(best[name], (time.perf_counter() - t0) / chunk)
    return best


def time_loaders(datasets: dict[str, InMemory], workers: int, batch: int, repeats: int) -> dict[str, float]:
    """Median samples per second through a DataLoader per dataset; epochs alternate between the datasets."""
    loaders = {
        name: DataLoader(ds, batch_size=batch, num_workers=workers, persistent_workers=workers > 0)
        for name, ds in datasets.items()
    }
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for epoch in range(repeats + 1):
        for name, loader in loaders.items():
            t0 = time.perf_counter()
            for _ in loader:
                pass
            if epoch:  # the first epoch starts the workers: warm-up
                rates[name].append(len(loader.dataset) / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_batched(n: int, repeats: int) -> tuple[str, float, float]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=g)
    masks = (torch.rand(n, 1, 224, 224, generator=g) > 0.5).to(torch.uint8) * 255
    t_loop = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            mask_background(images[i], masks[i], "soft")
        t_loop = min(t_loop, time.perf_counter() - t0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images_d, masks_d = images.to(device), masks.to(device)
    mask_background(images_d, masks_d, "soft")  # warm-up
    sync(device)
    t_batch = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mask_background(images_d, masks_d, "soft")
        sync(device)
        t_batch = min(t_batch, time.perf_counter() - t0)
    return str(device), t_loop, t_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batched", type=int, default=128, help="images in the functional comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s) in the main process, CUDA: {torch.cuda.is_available()}"
    )
    print(f"{args.samples} samples 3x256x256 uint8 -> RandomResizedCrop(224), flip, ToDtype(float32), Normalize\n")

    variants = {
        "no mask": pipeline(None),
        "hard (uint8, before ToDtype)": pipeline(BackgroundMask("hard")),
        "soft (uint8, before ToDtype)": pipeline(BackgroundMask("soft")),
        "hard (float, after ToDtype)": pipeline(BackgroundMask("hard"), after_todtype=True),
    }
    datasets = {name: InMemory(args.samples, 256, transform) for name, transform in variants.items()}
    best = time_main_process(datasets, rounds=10 * args.repeats)
    jpeg_names = ("no mask", "hard (uint8, before ToDtype)")
    jpeg = {f"JPEG q90 + {n}": InMemory(args.samples, 256, variants[n], jpeg=True) for n in jpeg_names}
    best.update(time_main_process(jpeg, rounds=10 * args.repeats))
    print(f"{'pipeline':40s} {'ms/sample (main process, best chunk)':>38s} {'overhead':>9s}")
    for name, t in best.items():
        base = best["JPEG q90 + no mask" if name.startswith("JPEG") else "no mask"]
        print(f"{name:40s} {t * 1e3:38.3f} {100 * (t / base - 1):8.1f}%")

    print(f"\nDataLoader, {args.workers} workers, batch {args.batch} (median of {args.repeats} epochs after warm-up)")
    names = ("no mask", "hard (uint8, before ToDtype)")
    rates = time_loaders({n: datasets[n] for n in names}, args.workers, args.batch, args.repeats)
    for name in names:
        print(f"{name:40s} {rates[name]:10.1f} samples/s")
    print(f"{'mask overhead':40s} {100 * (rates[names[0]] / rates[names[1]] - 1):9.1f}%")

    device, t_loop, t_batch = time_batched(args.batched, args.repeats)
    print(f"\nmask_background('soft') on {args.batched} x 3x224x224 uint8")
    print(f"{'per-sample loop (cpu)':40s} {t_loop * 1e3:10.2f} ms")
    print(f"{'batched (' + device + ')':40s} {t_batch * 1e3:10.2f} ms")
    print(f"{'speed-up':40s} {t_loop / t_batch:10.2f}x")


if __name__ == "__main__":
    main()
