"""Forward + backward time and peak memory of dml_bias.losses against pytorch-metric-learning (PML), same run.

Usage::

    python benchmarks/losses.py                       # CPU (and CUDA if present), B = 128, 512, 2048
    python benchmarks/losses.py --sizes 512 --device cpu --repeat 10
    python benchmarks/losses.py --losses ms ms+miner ntxent

For each loss and batch size B (D = --dim, --classes classes, labels drawn uniformly) both libraries get the same
embeddings; the time is the best of --repeat forward+backward passes after one warm-up, ours and PML's
interleaved (best-of-N is the most stable statistic on a shared machine). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` above the inputs; on CPU the largest running total of the tensor
allocations recorded by the torch profiler (``profile_memory=True``) during one pass. Ratios are PML / ours
(> 1: ours is faster or smaller).

PML's NT-Xent builds a (positive pairs x negative pairs) matrix (B = 512: ~80 s and 11 GiB on 2 CPU cores) and
its all-triplets TripletMarginLoss a B^3 mask; they are skipped above --pml-ntxent-max-b (default 128) and
--pml-max-b (default 512), as printed. The default run takes about 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import dml_bias.losses as ours
from dml_bias.miners import MultiSimilarityMiner

LOSSES = (
    "ms",
    "ms+miner",
    "proxy_anchor",
    "contrastive",
    "triplet",
    "ntxent",
    "supcon",
    "arcface",
    # PML drop-in rows: reducer objects, the semihard TripletMarginMiner (PML's MNIST recipe), CrossBatchMemory
    "contrastive+sum",
    "triplet+mean",
    "semihard",
    "xbm",
)


def build(name: str, dim: int, classes: int, device: torch.device) -> tuple[Callable, Callable]:
    """(ours, pml) callables taking (embeddings, labels); parameters copied so both compute the same loss."""
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import miners as pm

    if name == "ms":
        return ours.MultiSimilarityLoss(), pl.MultiSimilarityLoss()
    if name == "ms+miner":
        lo, mo = ours.MultiSimilarityLoss(), MultiSimilarityMiner()
        lp, mp = pl.MultiSimilarityLoss(), pm.MultiSimilarityMiner()
        return (lambda e, y: lo(e, y, mo(e, y))), (lambda e, y: lp(e, y, mp(e, y)))
    if name == "proxy_anchor":
        a = ours.ProxyAnchorLoss(classes, dim).to(device)
        b = pl.ProxyAnchorLoss(classes, dim).to(device)
        with torch.no_grad():
            b.proxies.copy_(a.proxies)
        return a, b
    if name in ("contrastive+sum", "triplet+mean"):
        from pytorch_metric_learning import reducers as pr

        from dml_bias import reducers as our_reducers

        if name == "contrastive+sum":
            return ours.ContrastiveLoss(reducer=our_reducers.SumReducer()), pl.ContrastiveLoss(reducer=pr.SumReducer())
        return ours.TripletMarginLoss(reducer=our_reducers.MeanReducer()), pl.TripletMarginLoss(
            reducer=pr.MeanReducer()
        )
    if name == "semihard":
        from pytorch_metric_learning import distances as pd
        from pytorch_metric_learning import reducers as pr

        from dml_bias import distances as our_distances
        from dml_bias import reducers as our_reducers
        from dml_bias.miners import TripletMarginMiner

        d_o, d_p = our_distances.CosineSimilarity(), pd.CosineSimilarity()
        lo = ours.TripletMarginLoss(0.2, distance=d_o, reducer=our_reducers.ThresholdReducer(low=0))
        mo = TripletMarginMiner(0.2, "semihard", distance=d_o)
        lp = pl.TripletMarginLoss(0.2, distance=d_p, reducer=pr.ThresholdReducer(low=0))
        mp = pm.TripletMarginMiner(0.2, "semihard", distance=d_p)
        return (lambda e, y: lo(e, y, mo(e, y))), (lambda e, y: lp(e, y, mp(e, y)))
    if name == "xbm":
        # Each call gets the embeddings plus the call's own small noise (seeded by the call count), so the queue holds
        # distinct rows, as in training; both libraries are called equally often, so their queues hold the same rows.
        def feed(loss: Callable) -> Callable:
            calls = [0]

            def call(e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                calls[0] += 1
                noise = torch.randn(e.shape, generator=torch.Generator().manual_seed(calls[0])).to(e.device)
                return loss(e + 0.1 * noise, y)

            return call

        a = ours.CrossBatchMemory(ours.ContrastiveLoss(), dim, memory_size=1024).to(device)
        b = pl.CrossBatchMemory(pl.ContrastiveLoss(), dim, memory_size=1024).to(device)
        return feed(a), feed(b)
    if name == "arcface":
        a = ours.ArcFaceLoss(classes, dim).to(device)
        b = pl.ArcFaceLoss(classes, dim).to(device)
        with torch.no_grad():
            b.W.copy_(a.W)
        return a, b
    pairs = {
        "contrastive": (ours.ContrastiveLoss, pl.ContrastiveLoss),
        "triplet": (ours.TripletMarginLoss, pl.TripletMarginLoss),
        "ntxent": (ours.NTXentLoss, pl.NTXentLoss),
        "supcon": (ours.SupConLoss, pl.SupConLoss),
    }
    a_cls, b_cls = pairs[name]
    return a_cls(), b_cls()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_pass(fn: Callable, emb: torch.Tensor, labels: torch.Tensor) -> float:
    e = emb.detach().requires_grad_(True)
    loss = fn(e, labels)
    loss.backward()
    return float(loss.detach())


def timed(fn: Callable, emb: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    one_pass(fn, emb, labels)
    sync(device)
    return time.perf_counter() - t0


def time_pair(
    fns: list[Callable], emb: torch.Tensor, labels: torch.Tensor, repeats: list[int], device: torch.device
) -> list[float]:
    """Best-of-N time of each callable, runs interleaved so both see the same machine load (after a warm-up)."""
    for fn, rep in zip(fns, repeats, strict=True):
        if rep > 1:
            one_pass(fn, emb, labels)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(max(repeats)):
        for i, (fn, rep) in enumerate(zip(fns, repeats, strict=True)):
            if r < rep:
                times[i].append(timed(fn, emb, labels, device))
    return [min(t) for t in times]


def peak_memory(fn: Callable, emb: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """Peak bytes allocated during one forward+backward pass, above what existed before."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        one_pass(fn, emb, labels)
        sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        one_pass(fn, emb, labels)
    events = sorted(
        (evt.time_range.start, evt.self_cpu_memory_usage) for evt in prof.events() if evt.self_cpu_memory_usage
    )
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return float(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--pml-max-b", type=int, default=512, help="largest B for PML's all-triplets loss")
    parser.add_argument(
        "--pml-ntxent-max-b", type=int, default=128, help="largest B for PML's NT-Xent (B=512: ~80 s, 11 GiB)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    import pytorch_metric_learning

    print(
        f"torch {torch.__version__}, pytorch-metric-learning {pytorch_metric_learning.__version__}, "
        f"threads {torch.get_num_threads()}, D={args.dim}, classes={args.classes}, repeat={args.repeat}"
    )
    header = (
        f"{'device':6} {'loss':13} {'B':>5} {'ours ms':>9} {'PML ms':>9} {'time x':>7} "
        f"{'ours MiB':>9} {'PML MiB':>9} {'mem x':>6} {'|diff|/|PML|':>12}"
    )
    print(header)
    print("-" * len(header))
    for device in devices:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        for name in args.losses:
            for b in args.sizes:
                gen = torch.Generator().manual_seed(b)
                emb = torch.randn(b, args.dim, generator=gen).to(device)
                labels = torch.randint(0, args.classes, (b,), generator=gen).to(device)
                torch.manual_seed(0)
                fn_ours, fn_pml = build(name, args.dim, args.classes, device)
                limit = {
                    "triplet": args.pml_max_b,
                    "triplet+mean": args.pml_max_b,
                    "semihard": args.pml_max_b,
                    "ntxent": args.pml_ntxent_max_b,
                }.get(name, b)
                skip_pml = b > limit
                # PML's NT-Xent is very slow from B = 512 on: time it once, without warm-up.
                rep_pml = 0 if skip_pml else (1 if name == "ntxent" and b >= 512 else args.repeat)
                fns, reps = [fn_ours, fn_pml], [args.repeat, rep_pml]
                t_ours, t_pml = (
                    *time_pair(fns[: 1 + bool(rep_pml)], emb, labels, reps[: 1 + bool(rep_pml)], device),
                    0.0,
                )[:2]
                m_ours = float("nan") if args.no_memory else peak_memory(fn_ours, emb, labels, device)
                if skip_pml:
                    print(
                        f"{device.type:6} {name:13} {b:>5} {t_ours * 1e3:>9.2f} {'skipped':>9} {'':>7} "
                        f"{m_ours / 2**20:>9.1f} {'':>9} {'':>6} {'(PML too large)':>12}"
                    )
                    continue
                m_pml = float("nan") if args.no_memory else peak_memory(fn_pml, emb, labels, device)
                v_ours = one_pass(fn_ours, emb, labels)
                v_pml = one_pass(fn_pml, emb, labels)
                rel = abs(v_ours - v_pml) / max(abs(v_pml), 1e-12)
                print(
                    f"{device.type:6} {name:13} {b:>5} {t_ours * 1e3:>9.2f} {t_pml * 1e3:>9.2f} "
                    f"{t_pml / t_ours:>7.2f} {m_ours / 2**20:>9.1f} {m_pml / 2**20:>9.1f} "
                    f"{m_pml / m_ours if m_ours else float('nan'):>6.2f} {rel:>12.1e}"
                )


if __name__ == "__main__":
    main()
