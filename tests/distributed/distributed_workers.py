"""Code run inside the 2-process gloo job of ``test_distributed_gloo.py`` (and its single-process references).

It lives in its own module (not in the test file) so that ``torch.multiprocessing.spawn`` can pickle the worker
by name: the spawned interpreters inherit ``sys.path``, to which the test adds this folder.

Every scenario trains a tiny model (Linear 8 -> 4, float64) with Proxy-Anchor, or Multi-Similarity with its
miner, for a few SGD steps on a global batch of 8 samples split 5 / 3 over the two ranks, once in a single
process on the concatenated batch (``run_single``) and once on two ranks through ``DistributedLossWrapper``
(``run_rank``); the test compares the parameters and loss values.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dml_bias.distributed import (
    DistributedLossWrapper,
    average_gradients,
    gather_no_grad,
    gather_with_grad,
    get_rank,
    get_world_size,
)
from dml_bias.losses import MultiSimilarityLoss, ProxyAnchorLoss
from dml_bias.miners import MultiSimilarityMiner

SIZES = (5, 3)  # per-rank batch sizes (unequal on purpose)
REF_SIZES = (2, 4)  # per-rank reference batch sizes in the ref_emb scenario
STEPS = 3
D_IN, D_OUT, NUM_CLASSES = 8, 4, 3
LR, LOSS_LR = 0.1, 1.0

# --------------------------------------------------------------------------------------------------------------
# Losses and miners
# --------------------------------------------------------------------------------------------------------------


def build_loss(kind: str) -> nn.Module:
    """Proxy-Anchor (own parameters: the proxies) or Multi-Similarity (no parameters, pairs from a miner)."""
    if kind == "proxy":
        return ProxyAnchorLoss(NUM_CLASSES, D_OUT)
    if kind == "pair":
        return MultiSimilarityLoss()
    raise ValueError(kind)


def build_miner(kind: str) -> Any:
    return MultiSimilarityMiner()


# --------------------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------------------

#: name -> (loss kind, mining: None | "local" | "global", mode, use ref_emb, per-rank batch sizes). Modes:
#: "ddp" (model in DDP, loss outside), "ddp_both" (loss in DDP too), "avg" (no DDP, average_gradients on model
#: and loss), "sum" (no DDP, every gradient summed over the ranks, grad_reduction="sum").
SCENARIOS: dict[str, tuple[str, str | None, str, bool, tuple[int, ...]]] = {
    "proxy_ddp": ("proxy", None, "ddp", False, SIZES),
    "proxy_loss_in_ddp": ("proxy", None, "ddp_both", False, SIZES),
    "proxy_average_gradients": ("proxy", None, "avg", False, SIZES),
    "proxy_sum": ("proxy", None, "sum", False, SIZES),
    "proxy_ddp_empty_rank": ("proxy", None, "ddp", False, (8, 0)),
    "pair_global_miner": ("pair", "global", "ddp", False, SIZES),
    "pair_local_indices": ("pair", "local", "ddp", False, SIZES),
    "pair_ref_local_indices_sum": ("pair", "local", "sum", True, SIZES),
}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(sum(SIZES), D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (sum(SIZES),), generator=g)
    x_ref = torch.randn(sum(REF_SIZES), D_IN, generator=g, dtype=torch.float64)
    y_ref = torch.randint(0, NUM_CLASSES, (sum(REF_SIZES),), generator=g)
    return x, y, x_ref, y_ref


def bounds(sizes: tuple[int, ...], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def make(kind: str, loss_seed: int = 1) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = nn.Linear(D_IN, D_OUT).double()
    torch.manual_seed(loss_seed)
    return model, build_loss(kind).double()


class SGD:
    """Plain SGD, ``p -= lr * p.grad`` (``torch.optim`` would import torch._dynamo: seconds per process)."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        self.groups = [(list(model.parameters()), LR), (list(loss.parameters()), LOSS_LR)]

    def zero_grad(self) -> None:
        for params, _ in self.groups:
            for p in params:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for params, lr in self.groups:
            for p in params:
                p -= lr * p.grad


def snapshot(model: nn.Module, loss: nn.Module, values: list[float]) -> dict[str, Any]:
    return {
        "values": values,
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "loss": {k: v.detach().clone() for k, v in loss.state_dict().items()},
    }


def local_tuples(miner: Any, emb, y, ref, ref_y, use_ref: bool, sizes: tuple[int, ...]):
    """Mine each rank's chunk separately and shift to global indices (the single-process twin of local mining)."""
    parts = []
    for r in range(len(sizes)):
        sl = bounds(sizes, r)
        if use_ref:
            rl = bounds(REF_SIZES, r)
            t = miner(emb[sl], y[sl], ref[rl], ref_y[rl])
            shifts = (sl.start, rl.start, sl.start, rl.start)
        else:
            t = miner(emb[sl], y[sl])
            shifts = (sl.start,) * 4
        parts.append([i + s for i, s in zip(t, shifts, strict=True)])
    return tuple(torch.cat([p[i] for p in parts]) for i in range(4))


def run_single(name: str) -> dict[str, Any]:
    kind, mining, _mode, use_ref, sizes = SCENARIOS[name]
    model, loss = make(kind)
    miner = build_miner(kind)
    opt = SGD(model, loss)
    values = []
    for step in range(STEPS):
        x, y, x_ref, y_ref = batch(step)
        opt.zero_grad()
        emb = model(x)
        ref = model(x_ref) if use_ref else None
        kwargs: dict[str, Any] = {"ref_emb": ref, "ref_labels": y_ref} if use_ref else {}
        if mining == "local":
            kwargs["indices_tuple"] = local_tuples(miner, emb, y, ref, y_ref, use_ref, sizes)
        elif mining == "global":
            kwargs["indices_tuple"] = miner(emb, y)
        value = loss(emb, y, **kwargs)
        value.backward()
        opt.step()
        values.append(value.item())
    return snapshot(model, loss, values)


def run_rank(name: str, rank: int) -> dict[str, Any]:
    kind, mining, mode, use_ref, sizes = SCENARIOS[name]
    # Rank 1 starts from different loss parameters: the wrapper must broadcast rank 0's before the first step.
    model, loss = make(kind, loss_seed=1 + rank)
    miner = build_miner(kind)
    net = model if mode in ("sum", "avg") else DDP(model)
    wrapped = DistributedLossWrapper(
        DDP(loss) if mode == "ddp_both" else loss,
        miner=miner if mining == "global" else None,
        grad_reduction="sum" if mode == "sum" else "mean",
    )
    opt = SGD(model, loss)
    sl, rl = bounds(sizes, rank), bounds(REF_SIZES, rank)
    values = []
    for step in range(STEPS):
        x, y, x_ref, y_ref = batch(step)
        opt.zero_grad()
        emb = net(x[sl])
        ref = net(x_ref[rl]) if use_ref else None
        kwargs: dict[str, Any] = {"ref_emb": ref, "ref_labels": y_ref[rl]} if use_ref else {}
        if mining == "local":
            kwargs["indices_tuple"] = miner(emb, y[sl], ref, y_ref[rl]) if use_ref else miner(emb, y[sl])
        value = wrapped(emb, y[sl], **kwargs)
        value.backward()
        if mode == "sum":  # a job without DDP that sums every gradient over the ranks
            for p in [*model.parameters(), *loss.parameters()]:
                dist.all_reduce(p.grad)
        elif mode == "avg":  # a job without DDP that averages, as DDP would
            average_gradients(model)
            average_gradients(loss)
        opt.step()
        values.append(value.item())
    return snapshot(model, loss, values)


# --------------------------------------------------------------------------------------------------------------
# Unit checks of the gathers
# --------------------------------------------------------------------------------------------------------------


def emb_for_rank(rank: int) -> torch.Tensor:
    return torch.randn(sum(SIZES), D_OUT, generator=torch.Generator().manual_seed(7), dtype=torch.float64)[
        bounds(SIZES, rank)
    ]


def labels_for_rank(rank: int) -> torch.Tensor:
    return torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])[bounds(SIZES, rank)]


def gather_checks(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sizes = SIZES
    x = (torch.arange(sizes[rank] * 2, dtype=torch.float64).view(-1, 2) + 100 * rank).requires_grad_(True)
    y = gather_with_grad(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    (w * y * y).sum().backward()  # d/dx_r = sum over ranks of 2 * w_s * y, own rows
    out["gathered"] = y.detach().clone()
    out["grad"] = x.grad.clone()
    # A rank with no rows.
    e = torch.ones(4 if rank == 0 else 0, 3, dtype=torch.float64, requires_grad=True)
    ge = gather_with_grad(e)
    (ge * torch.arange(3, dtype=torch.float64)).sum().backward()
    out["empty_gathered_shape"] = tuple(ge.shape)
    out["empty_grad"] = e.grad.clone()
    # Integer, boolean and 3-D tensors without gradient.
    out["labels"] = gather_no_grad(torch.arange(sizes[rank]) + 10 * rank)
    out["bools"] = gather_no_grad(torch.tensor([rank == 0] * (rank + 1)))
    out["three_d"] = gather_no_grad(torch.full((rank + 1, 2, 3), float(rank)))
    for dtype in (torch.float16, torch.bfloat16):
        h = torch.full((rank + 1, 2), rank + 1.0, dtype=dtype, requires_grad=True)
        gh = gather_with_grad(h)
        (gh * gh).sum().backward()  # both ranks: d/dh = 2 * 2 * h
        out[f"half_{dtype}"] = (gh.detach().clone(), h.grad.clone())
    # Ranks that disagree: every rank must raise the same ValueError (and nothing may hang).
    errors = {}
    for what, t in {
        "trailing_shape": torch.zeros(2, 3 + rank),
        "dtype": torch.zeros(2, 3, dtype=torch.float32 if rank == 0 else torch.float64),
    }.items():
        try:
            gather_with_grad(t)
        except ValueError as exc:
            errors[what] = str(exc)
    labels = torch.zeros(2, dtype=torch.long) if rank == 0 else None
    try:
        DistributedLossWrapper(MultiSimilarityLoss())(torch.randn(2, 4), labels)
    except ValueError as exc:
        errors["wrapper_structure"] = str(exc)
    # Bad input on one rank only: that rank raises its own error, the other one a ValueError naming it.
    try:
        gather_with_grad(torch.zeros(2, 3, dtype=torch.float64 if rank == 0 else torch.int64))
    except (TypeError, ValueError) as exc:
        errors["gather_bad_rank"] = f"{type(exc).__name__}: {exc}"
    try:
        DistributedLossWrapper(MultiSimilarityLoss())(torch.randn(3, 4), torch.zeros(3 if rank == 1 else 2).long())
    except (TypeError, ValueError) as exc:
        errors["wrapper_bad_rank"] = f"{type(exc).__name__}: {exc}"
    out["errors"] = errors
    # ref_emb given as the embeddings themselves keeps its identity after gathering (self-pairs stay excluded).
    emb = emb_for_rank(rank)
    y = labels_for_rank(rank)
    out["ref_is_emb_value"] = DistributedLossWrapper(MultiSimilarityLoss())(emb, y, ref_emb=emb, ref_labels=y).item()
    out["ref_is_emb_identity"] = DistributedLossWrapper(
        lambda e, lab, ref_emb, ref_labels: torch.tensor(float(ref_emb is e and ref_labels is lab))
    )(emb, y, ref_emb=emb, ref_labels=y).item()
    out["world"] = (get_rank(), get_world_size())
    return out


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result: dict[str, Any] = {"gather": gather_checks(rank)}
        for name in SCENARIOS:
            result[name] = run_rank(name, rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
