"""Benchmark: exact retrieval metrics and kNN of dml_bias against PML, faiss and a naive torch top-k.

In one run, for each N (default 20,000; ``--n 20000 100000``), D = 512, classes of ~50 (Gaussian clusters,
unit-normalised), on the CPU and on CUDA when available:

* PML ``AccuracyCalculator(k="max_bin_count")`` (MAP@R, R-precision, precision@1; faiss fp32 search inside),
* faiss ``IndexFlatIP`` search with k = max class size, and the metrics computed from its neighbours,
* a naive chunked torch top-k (float32 matmul + ``torch.topk``), metrics from its neighbours,
* PML with the full mAP (``mean_average_precision`` with ``k=None``: every reference item ranked; O(N^2)
  memory, so only at small N, e.g. ``--n 8000 --cases pml_full_map ours_default``),
* ours: ``retrieval_metrics()`` with its defaults (``ours_default``: Recall@{1,2,4,8}, MAP@R, R-precision and
  the full mAP, exact, one counting pass), ``retrieval_metrics(full_map=False)`` (``ours_metrics``: the same
  metrics as PML, no full mAP; the 16-bit candidate pass where the device has one), the same with the float32
  bulk pass forced (``ours_metrics_fp32``), and ``knn(k=max class size)``,
* the floor: one N x N GEMM in float32 and bfloat16 (in blocks of 4096 rows).

Each case runs in a fresh process, ``--repeat`` times (default 3); the minimum time is reported.

Prints times, ratios to PML (and of the default call to the PML full-mAP run and to our no-mAP run), the peak
memory (CPU: peak RSS growth of a fresh subprocess; CUDA: peak
allocated) and whether the values agree with PML. Run: ``python benchmarks/metrics.py [--n 20000 100000]
[--device cpu cuda] [--skip-full-map]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from collections.abc import Callable
from typing import Any

import torch

D = 512
CLASS_SIZE = 50


def make_data(n: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) // CLASS_SIZE
    labels = labels[torch.randperm(n, generator=g)]
    centres = torch.randn(int(labels.max()) + 1, D, generator=g)
    x = centres[labels] + 3.0 * torch.randn(n, D, generator=g)  # MAP@R ~0.3, Recall@1 ~0.9 (CUB-like)
    x = torch.nn.functional.normalize(x, dim=1)
    return x.to(device), labels.to(device)


def metrics_from_neighbours(labels: torch.Tensor, nbr: torch.Tensor) -> dict[str, float]:
    """MAP@R, R-precision, Recall@1 from neighbour lists (self already removed)."""
    counts = torch.bincount(labels)
    r = counts[labels] - 1
    rel = labels[nbr] == labels[:, None]
    pos = torch.arange(1, nbr.shape[1] + 1, device=nbr.device, dtype=torch.float64)
    in_r = rel & (pos[None, :] <= r[:, None])
    hits = torch.cumsum(in_r, 1).double()
    keep = r > 0
    rf = r.double().clamp_min(1)
    return {
        "map@r": float((torch.where(in_r, hits / pos, 0.0).sum(1) / rf)[keep].mean()),
        "r_precision": float((in_r.sum(1) / rf)[keep].mean()),
        "recall@1": float(rel[:, 0].double()[keep].mean()),
    }


def run_case(name: str, n: int, device: str, repeat: int, out: Any) -> None:
    """Run one case in this (fresh) process and report time, peak memory and values."""
    from dml_bias.metrics import knn, retrieval_metrics

    x, y = make_data(n, device)
    kmax = int(torch.bincount(y).max()) - 1
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    values: dict[str, float] = {}

    def timed(fn: Callable[[], Any]) -> float:
        best = float("inf")
        for _ in range(repeat):  # the minimum of a few runs: the machine may be shared
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    if name == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(
            include=("mean_average_precision_at_r", "r_precision", "precision_at_1"),
            k="max_bin_count",
            device=torch.device(device),
        )
        res: dict[str, Any] = {}
        seconds = timed(lambda: res.update(calc.get_accuracy(x, y, x, y, ref_includes_query=True)))
        values = {
            "map@r": res["mean_average_precision_at_r"],
            "r_precision": res["r_precision"],
            "recall@1": res["precision_at_1"],
        }
    elif name == "pml_full_map":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(
            include=("mean_average_precision", "mean_average_precision_at_r", "r_precision", "precision_at_1"),
            k=None,
            device=torch.device(device),
        )
        res = {}
        seconds = timed(lambda: res.update(calc.get_accuracy(x, y, x, y, ref_includes_query=True)))
        values = {
            "map@r": res["mean_average_precision_at_r"],
            "r_precision": res["r_precision"],
            "recall@1": res["precision_at_1"],
            "map": res["mean_average_precision"],
        }
    elif name == "faiss":
        import faiss

        xn = x.cpu().numpy()
        holder: dict[str, Any] = {}

        def search() -> None:
            index = faiss.IndexFlatIP(D)
            index.add(xn)
            _, idx = index.search(xn, kmax + 1)
            holder["idx"] = idx

        seconds = timed(search)
        idx = torch.from_numpy(holder["idx"])
        own = idx == torch.arange(n)[:, None]
        # Drop self (or the last column where self is missing because of ties), as PML does.
        drop = torch.where(own.any(1), own.int().argmax(1), torch.full((n,), kmax))
        keep = torch.ones_like(idx, dtype=torch.bool)
        keep[torch.arange(n), drop] = False
        values = metrics_from_neighbours(y.cpu(), idx[keep].view(n, kmax))
    elif name == "naive_topk":
        holder = {}

        def naive() -> None:
            parts = []
            for s in range(0, n, 2048):
                sim = x[s : s + 2048] @ x.T
                sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -torch.inf
                parts.append(torch.topk(sim, kmax, dim=1).indices)
            holder["nbr"] = torch.cat(parts)

        seconds = timed(naive)
        values = metrics_from_neighbours(y, holder["nbr"])
    elif name == "ours_metrics":
        res = {}
        seconds = timed(lambda: res.update(retrieval_metrics(x, y, ks=(1,), full_map=False)))
        values = {k: res[k] for k in ("map@r", "r_precision", "recall@1")}
    elif name == "ours_metrics_fp32":
        import sys

        engine = sys.modules["dml_bias.metrics._exact"]
        engine.BF16_CPU = False  # the float32 bulk pass instead of the 16-bit candidate pass
        engine.FP16_CUDA = False
        res = {}
        seconds = timed(lambda: res.update(retrieval_metrics(x, y, ks=(1,), full_map=False)))
        values = {k: res[k] for k in ("map@r", "r_precision", "recall@1")}
    elif name == "ours_default":
        res = {}
        seconds = timed(lambda: res.update(retrieval_metrics(x, y)))
        values = {k: res[k] for k in ("map@r", "r_precision", "recall@1", "map")}
    elif name == "ours_knn":
        seconds = timed(lambda: knn(x, k=kmax))
    elif name in ("gemm_fp32", "gemm_bf16"):
        a = x if name == "gemm_fp32" else x.bfloat16()
        torch.set_float32_matmul_precision("highest")

        def gemm() -> None:
            for s in range(0, n, 4096):
                a[s : s + 4096] @ a.T  # one block at a time: the floor, not an N x N allocation

        seconds = timed(gemm)
    else:
        raise ValueError(name)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    out.put({"seconds": seconds, "peak_mib": peak, "values": values})


def measure(name: str, n: int, device: str, repeat: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=run_case, args=(name, n, device, repeat, q))
    p.start()
    result = q.get()
    p.join()
    return result


CASES = [
    "gemm_fp32",
    "gemm_bf16",
    "pml",
    "pml_full_map",
    "faiss",
    "naive_topk",
    "ours_metrics",
    "ours_metrics_fp32",
    "ours_default",
    "ours_knn",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[20_000])
    parser.add_argument("--device", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--skip-full-map", action="store_true", help="skip the full-mAP cases (ours_default, PML's)")
    parser.add_argument("--cases", nargs="+", default=CASES)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the minimum time is reported")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, D={D}, classes of {CLASS_SIZE}")
    for device in args.device:
        for n in args.n:
            rows = {}
            for name in args.cases:
                if name in ("ours_default", "pml_full_map") and args.skip_full_map:
                    continue
                if name == "faiss" and device == "cuda":
                    continue
                rows[name] = measure(name, n, device, args.repeat)
            pml = rows.get("pml", {}).get("seconds")
            print(f"\n== device={device} N={n} ==")
            print(f"{'case':15s} {'seconds':>9s} {'PML/x':>7s} {'peak MiB':>9s}  values")
            for name, r in rows.items():
                ratio = f"{pml / r['seconds']:7.2f}" if pml else "      -"
                vals = json.dumps({k: round(v, 8) for k, v in r["values"].items()})
                print(f"{name:15s} {r['seconds']:9.3f} {ratio} {r['peak_mib']:9.1f}  {vals}")
            default = rows.get("ours_default", {}).get("seconds")
            if default:
                for other, label in (("pml", "PML three metrics"), ("pml_full_map", "PML full mAP"),
                                     ("ours_metrics", "ours without map")):  # fmt: skip
                    if other in rows:
                        ratio = rows[other]["seconds"] / default
                        other_s = rows[other]["seconds"]
                        print(f"default call vs {label}: {ratio:.2f}x ({other_s:.3f} s / {default:.3f} s)")
            if "pml_full_map" in rows and "ours_default" in rows:
                diff = abs(rows["pml_full_map"]["values"]["map"] - rows["ours_default"]["values"]["map"])
                print(f"|ours map - PML map|: {diff:.2e}")
            for other in ("pml", "faiss", "naive_topk", "ours_default"):
                if other in rows and "ours_metrics" in rows:
                    diff = max(
                        abs(rows[other]["values"][k] - rows["ours_metrics"]["values"][k])
                        for k in ("map@r", "r_precision", "recall@1")
                    )
                    print(f"max |ours_metrics - {other}| over MAP@R, R-precision, Recall@1: {diff:.2e}")


if __name__ == "__main__":
    main()
