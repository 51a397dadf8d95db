"""AccuracyCalculator (PML's API) against our retrieval_metrics and PML's AccuracyCalculator, same run.

Usage::

    python benchmarks/accuracy_calculator.py                 # N = 20,000, D = 128, 50 items per class
    python benchmarks/accuracy_calculator.py --n 8000 --repeat 3

Times the same keys — Recall@1 (``precision_at_1``), R-precision and MAP@R — three ways on the same normalised
embeddings (query set = reference set, self excluded): ``dml_bias.utils.accuracy_calculator.AccuracyCalculator``
with ``k="max_bin_count"``, ``dml_bias.metrics.retrieval_metrics(full_map=False)`` (Euclidean on the raw rows, the
same ranking) and PML's ``AccuracyCalculator`` (faiss). NMI/AMI (k-means) are timed separately. Best of
``--repeat``, interleaved; ratios are other / ours (> 1: ours faster) and |difference| of the values.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

KEYS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def best_of(fns: dict[str, Callable[[], Any]], repeat: int) -> tuple[dict[str, float], dict[str, Any]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    out: dict[str, Any] = {}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-pml", action="store_true")
    args = parser.parse_args()

    from dml_bias.metrics import retrieval_metrics
    from dml_bias.utils.accuracy_calculator import AccuracyCalculator

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(args.n // args.per_class).repeat_interleave(args.per_class)
    centres = torch.randn(int(labels.max()) + 1, args.dim, generator=g)
    emb = torch.nn.functional.normalize(centres[labels] + 1.5 * torch.randn(len(labels), args.dim, generator=g))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, N={len(labels)}, D={args.dim}")

    ours = AccuracyCalculator(include=KEYS, k="max_bin_count")
    fns: dict[str, Callable[[], Any]] = {
        "AccuracyCalculator (ours)": lambda: ours.get_accuracy(emb, labels),
        "retrieval_metrics (ours)": lambda: retrieval_metrics(
            emb, labels, ks=(1,), full_map=False, metric="euclidean", normalize_embeddings=False
        ),
    }
    if not args.no_pml:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator as PAC

        theirs = PAC(include=KEYS, k="max_bin_count", device=torch.device("cpu"))
        fns["AccuracyCalculator (PML)"] = lambda: theirs.get_accuracy(emb, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times, out = best_of(fns, args.repeat)
    base = times["AccuracyCalculator (ours)"]
    ref = out["AccuracyCalculator (ours)"]
    rm = out["retrieval_metrics (ours)"]
    as_acc = {
        "precision_at_1": rm["recall@1"],
        "r_precision": rm["r_precision"],
        "mean_average_precision_at_r": rm["map@r"],
    }
    print(f"{'method':28} {'s':>8} {'x ours':>7} {'max |diff|':>11}")
    for name, t in times.items():
        vals = as_acc if name.startswith("retrieval") else out[name]
        diff = max(abs(vals[k] - ref[k]) for k in KEYS)
        print(f"{name:28} {t:>8.3f} {t / base:>7.2f} {diff:>11.1e}")

    cluster = AccuracyCalculator(include=("NMI", "AMI"))
    fns = {"NMI+AMI (ours)": lambda: cluster.get_accuracy(emb, labels)}
    if not args.no_pml:
        theirs_c = PAC(include=("NMI", "AMI"), device=torch.device("cpu"))
        fns["NMI+AMI (PML)"] = lambda: theirs_c.get_accuracy(emb, labels)
    times, out = best_of(fns, 1)
    for name, t in times.items():
        print(f"{name:28} {t:>8.3f}   NMI {out[name]['NMI']:.6f}  AMI {out[name]['AMI']:.6f}")


if __name__ == "__main__":
    main()
