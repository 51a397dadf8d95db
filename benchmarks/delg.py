"""Benchmark: DELG spatial verification (matching + RANSAC) against scikit-image and OpenCV loops, same run.

Case ``verify``: one query against ``--candidates`` (100) candidate images with ``--features`` (1,000) local
features each (128-d, L2-normalised), 1,000 RANSAC trials, DELG's thresholds (descriptor distance < 1.0, residual
< 20 px). A fifth of the candidates are true views of the query (an affine map of a share of its features, 3 px
noise, descriptors perturbed to distance ~0.4-0.6); the others share a varying number of look-alike descriptors
at random places, so the number of putative matches varies from a handful to several hundred per candidate.
The methods, each timed end to end (matching + RANSAC, inputs already in memory):

* ``ours``: :func:`dml_bias.retrieval.spatial_verification` on the padded batch (``--device cpu cuda``),
* ``skimage``: what DELG runs, a per-pair loop: ``scipy.spatial.cKDTree(index).query(query,
  distance_upper_bound=1.0)``, then ``skimage.measure.ransac((index_xy, query_xy), AffineTransform,
  min_samples=3, residual_threshold=20, max_trials=1000)`` (scikit-image stops early once its inlier ratio makes
  1000 trials unnecessary at ``stop_probability=1``; it then runs fewer trials than ours),
* ``opencv_conf0.99`` / ``opencv_conf1``: a per-pair loop of ``cv2.BFMatcher(NORM_L2).match`` (distance < 1.0) and
  ``cv2.estimateAffine2D(index_xy, query_xy, method=RANSAC, ransacReprojThreshold=20, maxIters=1000,
  refineIters=0)`` with OpenCV's default ``confidence=0.99`` (stops as soon as 99 % confidence is reached) and
  with the largest confidence below 1 (``1 - 2**-53``: all 1000 iterations run unless a candidate's inlier ratio
  is above ~1/3).

Each method runs in a fresh process; the time is the best of ``--repeat`` runs (scikit-image: ``--repeat-slow``,
default 1). Peak memory is the growth of the process's peak RSS (CPU) or ``torch.cuda.max_memory_allocated``
(CUDA). The inlier counts of the methods are compared per candidate (they use different random samples).

Case ``extract``: images/s of ``DELG("resnet50").extract_global`` (3 scales) and ``extract_local`` (7 scales,
up to 1,000 features) on a batch of ``--images`` (4) random 224 x 224 images; skipped with a message if
:class:`dml_bias.heads.DELG` is not importable.

Run: ``python benchmarks/delg.py [--device cpu cuda] [--cases verify extract] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import resource
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

DIM = 128
RESIDUAL = 20.0
DESCRIPTOR = 1.0
TRIALS = 1000


def make_data(
    num_candidates: int, num_features: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query ``(M, 2)``, ``(M, D)`` and padded candidates ``(B, N, 2)``, ``(B, N, D)`` (float32, CPU)."""
    g = torch.Generator().manual_seed(seed)
    query_xy = torch.rand(num_features, 2, generator=g) * torch.tensor([1024.0, 768.0])
    query_desc = torch.nn.functional.normalize(torch.randn(num_features, DIM, generator=g), dim=1)
    locations = torch.rand(num_candidates, num_features, 2, generator=g) * torch.tensor([1024.0, 768.0])
    descriptors = torch.nn.functional.normalize(torch.randn(num_candidates, num_features, DIM, generator=g), dim=2)
    for b in range(num_candidates):
        true_view = b % 5 == 0
        share = float(torch.rand(1, generator=g)) * (0.5 if true_view else 0.3)
        k = int(share * num_features)
        pick = torch.randperm(num_features, generator=g)[:k]
        # Descriptor noise of norm ~0.45: distance below 1.0, so these become putative matches.
        noise = torch.randn(k, DIM, generator=g) * (0.45 / math.sqrt(DIM))
        descriptors[b, :k] = torch.nn.functional.normalize(query_desc[pick] + noise, dim=1)
        if true_view:
            angle = float(torch.rand(1, generator=g)) * 0.6 - 0.3
            scale = 0.7 + 0.6 * float(torch.rand(1, generator=g))
            rot = scale * torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            inlier = torch.rand(k, generator=g) < 0.7  # 30 % of a true view's matches are wrong
            moved = query_xy[pick] @ rot.T + torch.tensor([40.0, -25.0]) + 3.0 * torch.randn(k, 2, generator=g)
            locations[b, :k] = torch.where(inlier[:, None], moved, locations[b, :k])
    return query_xy, query_desc, locations, descriptors


def skimage_loop(data: tuple[torch.Tensor, ...]) -> list[int]:
    from scipy.spatial import cKDTree
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    query_xy, query_desc, locations, descriptors = (t.numpy().astype(np.float64) for t in data)
    counts = []
    for b in range(locations.shape[0]):
        tree = cKDTree(descriptors[b])
        _, nearest = tree.query(query_desc, distance_upper_bound=DESCRIPTOR)
        found = nearest != descriptors.shape[1]
        if found.sum() <= 3:
            counts.append(0)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, inliers = ransac(
                (locations[b][nearest[found]], query_xy[found]),
                AffineTransform,
                min_samples=3,
                residual_threshold=RESIDUAL,
                max_trials=TRIALS,
                rng=0,
            )
        counts.append(0 if inliers is None else int(inliers.sum()))
    return counts


def opencv_loop(data: tuple[torch.Tensor, ...], confidence: float) -> list[int]:
    import cv2

    query_xy, query_desc, locations, descriptors = (np.ascontiguousarray(t.numpy()) for t in data)
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    counts = []
    for b in range(locations.shape[0]):
        matches = [m for m in matcher.match(query_desc, descriptors[b]) if m.distance < DESCRIPTOR]
        if len(matches) <= 3:
            counts.append(0)
            continue
        src = locations[b][[m.trainIdx for m in matches]]
        dst = query_xy[[m.queryIdx for m in matches]]
        _, inliers = cv2.estimateAffine2D(
            src,
            dst,
            method=cv2.RANSAC,
            ransacReprojThreshold=RESIDUAL,
            maxIters=TRIALS,
            confidence=confidence,
            refineIters=0,
        )
        counts.append(0 if inliers is None else int(inliers.sum()))
    return counts


def run_verify(name: str, device: str, args: argparse.Namespace, out: Any) -> None:
    torch.set_num_threads(args.threads)
    data = make_data(args.candidates, args.features)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    repeat = args.repeat_slow if name == "skimage" else args.repeat
    if name.startswith("opencv"):
        import cv2

        cv2.setNumThreads(args.threads)
    holder: dict[str, list[int]] = {}
    if name == "ours":
        from dml_bias.retrieval import spatial_verification

        moved = [t.to(device) for t in data]

        def fn() -> None:
            holder["counts"] = spatial_verification(*moved, max_trials=TRIALS).tolist()

        if device == "cuda":
            fn()  # warm-up: CUDA context, kernels
            torch.cuda.reset_peak_memory_stats()
    elif name == "skimage":

        def fn() -> None:
            holder["counts"] = skimage_loop(data)

    else:
        confidence = 0.99 if name == "opencv_conf0.99" else float(np.nextafter(1.0, 0.0))

        def fn() -> None:
            holder["counts"] = opencv_loop(data, confidence)

    base_cuda = torch.cuda.memory_allocated() if device == "cuda" else 0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = math.inf
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    out.put({"seconds": best, "peak_mib": peak, "counts": holder["counts"]})


def run_extract(name: str, device: str, args: argparse.Namespace, out: Any) -> None:
    torch.set_num_threads(args.threads)
    try:
        from dml_bias.heads import DELG
    except ImportError as error:
        out.put({"skipped": f"dml_bias.heads.DELG is not importable ({error})"})
        return
    model = DELG("resnet50").to(device).eval()
    images = torch.rand(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    call: Callable[[], Any] = (
        (lambda: model.extract_global(images)) if name == "delg_global" else (lambda: model.extract_local(images))
    )
    call()  # warm-up
    best = math.inf
    for _ in range(args.repeat):
        sync()
        start = time.perf_counter()
        call()
        sync()
        best = min(best, time.perf_counter() - start)
    out.put({"seconds": best, "images_per_s": args.images / best})


def measure(target: Callable[..., None], name: str, device: str, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(name, device, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def agreement(a: list[int], b: list[int]) -> str:
    x, y = np.array(a), np.array(b)
    diff = np.abs(x - y)
    close = np.mean(diff <= np.maximum(2, 0.1 * np.maximum(x, y)))
    return f"mean |diff| {diff.mean():6.2f}  max {diff.max():4d}  within max(2, 10%): {100 * close:5.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--cases", nargs="+", default=["verify", "extract"], choices=["verify", "extract"])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--features", type=int, default=1000)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="runs per method; the minimum time is reported")
    parser.add_argument("--repeat-slow", type=int, default=1, help="runs of the scikit-image loop")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and OpenCV threads")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {args.threads}")
    if "verify" in args.cases:
        rows: dict[str, dict[str, Any]] = {}
        for device in args.device:
            rows[f"ours[{device}]"] = measure(run_verify, "ours", device, args)
        for name in ("opencv_conf0.99", "opencv_conf1", "skimage"):
            rows[name] = measure(run_verify, name, "cpu", args)
        print(
            f"\n== verify: 1 query x {args.candidates} candidates x {args.features} features, d={DIM}, "
            f"{TRIALS} trials =="
        )
        sk = rows["skimage"]["seconds"]
        cv = rows["opencv_conf1"]["seconds"]
        print(f"{'method':18s} {'seconds':>9s} {'skimage/x':>10s} {'opencv_conf1/x':>15s} {'peak MiB':>9s}")
        for name, r in rows.items():
            seconds = r["seconds"]
            print(f"{name:18s} {seconds:9.3f} {sk / seconds:10.1f} {cv / seconds:15.2f} {r['peak_mib']:9.1f}")
        counts = {name: r["counts"] for name, r in rows.items()}
        ours = counts["ours[cpu]"] if "ours[cpu]" in counts else next(iter(counts.values()))
        true_views = list(range(0, args.candidates, 5))
        print(
            "\ninlier counts, true views (mean): "
            + ", ".join(f"{n} {np.mean([c[i] for i in true_views]):.1f}" for n, c in counts.items())
        )
        others = [i for i in range(args.candidates) if i % 5]
        print(
            "inlier counts, other candidates (mean): "
            + ", ".join(f"{n} {np.mean([c[i] for i in others]):.1f}" for n, c in counts.items())
        )
        for name, c in counts.items():
            if c is not ours:
                print(f"ours vs {name:16s} {agreement(ours, c)}")
    if "extract" in args.cases:
        print(f"\n== extract: DELG('resnet50'), {args.images} images of 224 x 224 ==")
        for device in args.device:
            for name in ("delg_global", "delg_local"):
                r = measure(run_extract, name, device, args)
                if "skipped" in r:
                    print(f"{name}[{device}]: skipped: {r['skipped']}")
                    break
                print(f"{name}[{device}]: {r['seconds']:.3f} s per batch, {r['images_per_s']:.2f} images/s")


if __name__ == "__main__":
    main()
