"""Benchmark: exact retrieval metrics and kNN of dml_bias against PML, faiss and a naive torch top-k.

In one run, for each N (default 20,000; ``--n 20000 100000``), D = 512, classes of ~50 (Gaussian clusters,
unit-normalised), on the CPU and on CUDA when available:

* PML ``AccuracyCalculator(k="max_bin_count")`` (MAP@R, R-precision, precision@1; faiss fp32 search inside),
* faiss ``IndexFlatIP`` search with k = max class size, and the metrics computed from its neighbours,
* a naive chunked torch top-k (float32 matmul + ``torch.topk``), metrics from its neighbours,
* PML with the full mAP (``mean_average_precision`` with ``k=None``: every reference item ranked; O(N^2)
  memory, so only at small N, e.g. ``--n 8000 --cases pml_full_map ours_default``),
* PML ``AccuracyCalculator(include=("precision_at_1",), k=1)`` (``pml_p1``: Recall@1 alone),
* ours: ``retrieval_metrics()`` with its defaults (``ours_default``: Recall@{1,2,4,8}, MAP@R, R-precision, exact
  lists of the first R_q neighbours), ``retrieval_metrics(ks=(1,))`` (``ours_metrics``: the metrics PML
  computes; the 16-bit candidate pass where the device has one), the same with the float32 bulk pass forced
  (``ours_metrics_fp32``), the full mAP on request (``ours_full_map``: ``metrics=(..., "map")``, the counting
  pass), ``recall_at_k(k=1)`` (``ours_recall1``: lists of one neighbour) and ``knn(k=max class size)``,
* Market-1501 size (``--market``): 3,368 queries x 15,913 gallery items, D = 2,048, 751 identities on 6
  cameras, unit-normalised features, same identity and camera removed: ``market_numpy`` (the usual re-ID
  evaluation: a float32 cosine GEMM, a NumPy argsort of each query's row, CMC and AP from the filtered list)
  against ``market_ours``
  (``retrieval_metrics(..., query_groups=, reference_groups=, metrics=("recall@k", "map"))``);
  ``--market-noise`` sets the model's quality (6.0, the default: a weak model, mAP 0.02; 3.2: a trained one,
  mAP 0.79),
* the floor: one N x N GEMM in float32 and bfloat16 (in blocks of 4096 rows).

Each case runs in a fresh process, ``--repeat`` times (default 3); the minimum time is reported.

Prints times, ratios to PML (and of the default call to the PML full-mAP run and to our no-mAP run), the peak
memory (CPU: peak RSS growth of a fresh subprocess; CUDA: peak
allocated) and whether the values agree with PML. Data: ``--labels clusters`` (default; Gaussian clusters, classes
of 50) or ``--labels random`` (random vectors, random labels in classes of 200: relevant items spread over the
whole list, the worst case of the full mAP); ``--dim`` sets D. Run: ``python benchmarks/metrics.py [--n 20000
100000] [--dim 128] [--labels random] [--device cpu cuda] [--skip-full-map] [--market]``.
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
LABELS = "clusters"
MARKET_NOISE = 6.0  # per-dimension noise around unit-variance identity centres (6: mAP 0.02; 3.2: mAP 0.79)
FULL = ("recall@k", "map@r", "r_precision", "map")


def make_data(n: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if LABELS == "two":  # two classes of n / 2: the class-size-bound lists of Recall@k's old pass
        labels = torch.arange(n) % 2
        x = torch.nn.functional.normalize(
            torch.randn(2, D, generator=g)[labels] + torch.randn(n, D, generator=g), dim=1
        )
        return x.to(device), labels.to(device)
    if LABELS == "random":  # no structure: relevant items spread over the whole list (classes of 200)
        labels = (torch.arange(n) // 200)[torch.randperm(n, generator=g)]
        x = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
        return x.to(device), labels.to(device)
    labels = torch.arange(n) // CLASS_SIZE
    labels = labels[torch.randperm(n, generator=g)]
    centres = torch.randn(int(labels.max()) + 1, D, generator=g)
    x = centres[labels] + 3.0 * torch.randn(n, D, generator=g)  # MAP@R ~0.3, Recall@1 ~0.9 (CUB-like)
    x = torch.nn.functional.normalize(x, dim=1)
    return x.to(device), labels.to(device)


def market_data(seed: int = 0, noise: float | None = None) -> tuple[torch.Tensor, ...]:
    """Market-1501-sized features: 751 identities, 6 cameras, 3,368 queries, 15,913 gallery items, D = 2,048.

    ``noise`` (default :data:`MARKET_NOISE`) sets the model's quality: 6.0 a weak model (mAP 0.02, relevant items
    spread over the whole list), 3.2 a trained one (mAP 0.79, Rank-1 0.997).
    """
    noise = MARKET_NOISE if noise is None else noise
    g = torch.Generator().manual_seed(seed)
    ids_g = torch.randint(0, 751, (15_913,), generator=g)
    ids_q = torch.randint(0, 751, (3_368,), generator=g)
    cams_g, cams_q = torch.randint(0, 6, (15_913,), generator=g), torch.randint(0, 6, (3_368,), generator=g)
    centres = torch.randn(751, 2048, generator=g)
    gallery = torch.nn.functional.normalize(centres[ids_g] + noise * torch.randn(15_913, 2048, generator=g), dim=1)
    query = torch.nn.functional.normalize(centres[ids_q] + noise * torch.randn(3_368, 2048, generator=g), dim=1)
    return query, ids_q, cams_q, gallery, ids_g, cams_g


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
    from dml_bias.metrics import knn, recall_at_k, retrieval_metrics

    if name.startswith("market"):
        x, y = make_data(2, device)  # unused
        market = market_data()
    else:
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
    elif name == "pml_p1":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=("precision_at_1",), k=1, device=torch.device(device))
        res = {}
        seconds = timed(lambda: res.update(calc.get_accuracy(x, y, x, y, ref_includes_query=True)))
        values = {"recall@1": res["precision_at_1"]}
    elif name == "ours_recall1":
        holder: dict[str, float] = {}
        seconds = timed(lambda: holder.update(r=recall_at_k(x, y, k=1)))
        values = {"recall@1": holder["r"]}
    elif name == "ours_full_map":
        res = {}
        seconds = timed(lambda: res.update(retrieval_metrics(x, y, ks=(1,), metrics=FULL)))
        values = {k: res[k] for k in ("map@r", "r_precision", "recall@1", "map")}
    elif name == "market_numpy":
        import numpy as np

        query, ids_q, cams_q, gallery, ids_g, cams_g = market
        out_v: dict[str, float] = {}

        def numpy_eval() -> None:
            q, gal = query.numpy(), gallery.numpy()
            dist = -(q @ gal.T)  # cosine distance up to a constant: the features are unit-normalised
            idg, cg = ids_g.numpy(), cams_g.numpy()
            aps, top1 = [], []
            for i in range(q.shape[0]):
                order = np.argsort(dist[i])
                keep = ~((idg[order] == int(ids_q[i])) & (cg[order] == int(cams_q[i])))
                match = (idg[order] == int(ids_q[i]))[keep]
                hits = np.flatnonzero(match)
                if hits.size:
                    aps.append(float(np.mean((np.arange(hits.size) + 1) / (hits + 1))))
                    top1.append(float(hits[0] == 0))
            out_v.update(map=float(np.mean(aps)), cmc1=float(np.mean(top1)))

        seconds = timed(numpy_eval)
        values = out_v
    elif name == "market_ours":
        query, ids_q, cams_q, gallery, ids_g, cams_g = market
        res = {}

        def ours_eval() -> None:
            res.update(
                retrieval_metrics(
                    query, ids_q, gallery, ids_g, query_groups=cams_q, reference_groups=cams_g, ks=(1,),
                    metrics=("recall@k", "map"), metric="cosine",
                )
            )  # fmt: skip

        seconds = timed(ours_eval)
        values = {"map": res["map"], "cmc1": res["recall@1"]}
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
        seconds = timed(lambda: res.update(retrieval_metrics(x, y, ks=(1,))))
        values = {k: res[k] for k in ("map@r", "r_precision", "recall@1")}
    elif name == "ours_metrics_fp32":
        import sys

        engine = sys.modules["dml_bias.metrics._exact"]
        engine.BF16_CPU = False  # the float32 bulk pass instead of the 16-bit candidate pass
        engine.FP16_CUDA = False
        res = {}
        seconds = timed(lambda: res.update(retrieval_metrics(x, y, ks=(1,))))
        values = {k: res[k] for k in ("map@r", "r_precision", "recall@1")}
    elif name == "ours_default":
        res = {}
        seconds = timed(lambda: res.update(retrieval_metrics(x, y)))
        values = {k: res[k] for k in ("map@r", "r_precision", "recall@1")}
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


def _configured(dim: int, labels: str, noise: float, *args: Any) -> None:
    """:func:`run_case` in a spawned process, with the data options of the parent."""
    global D, LABELS, MARKET_NOISE
    D, LABELS, MARKET_NOISE = dim, labels, noise
    run_case(*args)


def measure(name: str, n: int, device: str, repeat: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_configured, args=(D, LABELS, MARKET_NOISE, name, n, device, repeat, q))
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
    "ours_full_map",
    "pml_p1",
    "ours_recall1",
    "ours_knn",
]


def main() -> None:
    global D, LABELS, MARKET_NOISE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[20_000])
    parser.add_argument("--device", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--skip-full-map", action="store_true", help="skip the full-mAP cases (ours_default, PML's)")
    parser.add_argument("--cases", nargs="+", default=CASES)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the minimum time is reported")
    parser.add_argument("--dim", type=int, default=D, help="embedding size D")
    parser.add_argument("--labels", choices=("clusters", "random", "two"), default="clusters")
    parser.add_argument("--market", action="store_true", help="run the Market-1501-sized re-ID cases only")
    parser.add_argument("--market-noise", type=float, default=MARKET_NOISE, help="6: a weak model, 3.2: a trained one")
    args = parser.parse_args()
    D, LABELS, MARKET_NOISE = args.dim, args.labels, args.market_noise
    if args.market:
        rows = {name: measure(name, 0, "cpu", args.repeat) for name in ("market_numpy", "market_ours")}
        for name, r in rows.items():
            print(f"{name:13s} {r['seconds']:9.3f} s {r['peak_mib']:9.1f} MiB  {json.dumps(r['values'])}")
        ratio = rows["market_numpy"]["seconds"] / rows["market_ours"]["seconds"]
        diff = abs(rows["market_numpy"]["values"]["map"] - rows["market_ours"]["values"]["map"])
        print(f"full mAP at Market-1501 size: ours {ratio:.2f}x the NumPy evaluator, |mAP difference| {diff:.2e}")
        return
    size = "classes of 200, random labels" if LABELS == "random" else f"classes of {CLASS_SIZE}"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, D={D}, {size}")
    for device in args.device:
        for n in args.n:
            rows = {}
            for name in args.cases:
                if name in ("ours_full_map", "pml_full_map") and args.skip_full_map:
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
            for ours, other, label in (
                ("ours_default", "pml", "default call vs PML three metrics"),
                ("ours_full_map", "pml_full_map", "full mAP vs PML full mAP"),
                ("ours_full_map", "ours_default", "full mAP vs our default call (cost of the full mAP)"),
                ("ours_recall1", "pml_p1", "recall_at_k(k=1) vs PML precision_at_1"),
            ):
                if ours in rows and other in rows:
                    mine, theirs = rows[ours]["seconds"], rows[other]["seconds"]
                    print(f"{label}: {theirs / mine:.2f}x ({theirs:.3f} s / {mine:.3f} s)")
            if "pml_full_map" in rows and "ours_full_map" in rows:
                diff = abs(rows["pml_full_map"]["values"]["map"] - rows["ours_full_map"]["values"]["map"])
                print(f"|ours map - PML map|: {diff:.2e}")
            if "pml_p1" in rows and "ours_recall1" in rows:
                diff = abs(rows["pml_p1"]["values"]["recall@1"] - rows["ours_recall1"]["values"]["recall@1"])
                print(f"|ours Recall@1 - PML precision_at_1|: {diff:.2e}")
            for other in ("pml", "faiss", "naive_topk", "ours_default", "ours_full_map"):
                if other in rows and "ours_metrics" in rows:
                    diff = max(
                        abs(rows[other]["values"][k] - rows["ours_metrics"]["values"][k])
                        for k in ("map@r", "r_precision", "recall@1")
                    )
                    print(f"max |ours_metrics - {other}| over MAP@R, R-precision, Recall@1: {diff:.2e}")


if __name__ == "__main__":
    main()
