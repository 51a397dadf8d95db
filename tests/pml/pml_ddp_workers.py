"""Code run inside the 2-process gloo job of ``test_pml_wrappers.py`` (and its single-process reference).

A tiny float64 model (Linear 8 -> 4) trains for several SGD steps with ``CrossBatchMemory(ContrastiveLoss)``
(memory of 12, so it wraps around after two steps) on global batches of 8 samples split 5 / 3 over two ranks,
once in one process on the concatenated batches and once on two ranks through
``dml_bias.utils.distributed.DistributedLossWrapper`` (PML's import path) with DDP; a second scenario mines on
the gathered batch with ``DistributedMinerWrapper(TripletMarginMiner)``.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dml_bias.losses import ContrastiveLoss, CrossBatchMemory, TripletMarginLoss
from dml_bias.miners import TripletMarginMiner
from dml_bias.utils import distributed as pml_dist

SIZES = (5, 3)
STEPS = 4
D_IN, D_OUT, MEMORY = 8, 4, 12
LR = 0.1
SCENARIOS = ("xbm", "miner")


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        x = torch.randn(sum(SIZES), D_IN, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (sum(SIZES),), generator=g)
        out.append((x, y))
    return out


def model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(D_IN, D_OUT).double()


def loss_and_miner(name: str) -> tuple[Any, Any]:
    if name == "xbm":
        return CrossBatchMemory(ContrastiveLoss(pos_margin=0.1, neg_margin=0.9), D_OUT, MEMORY), None
    return TripletMarginLoss(0.2), TripletMarginMiner(0.3)


def run_single(name: str) -> dict[str, Any]:
    net = model()
    loss_fn, miner = loss_and_miner(name)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    values = []
    for x, y in batches():
        emb = net(x)
        value = loss_fn(emb, y, miner(emb, y)) if miner is not None else loss_fn(emb, y)
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(float(value.detach()))
    return {"values": values, "weight": net.weight.detach().clone(), "bias": net.bias.detach().clone()}


def run_rank(name: str, rank: int) -> dict[str, Any]:
    net = DDP(model())
    loss_fn, miner = loss_and_miner(name)
    loss_fn = pml_dist.DistributedLossWrapper(loss_fn)
    miner = None if miner is None else pml_dist.DistributedMinerWrapper(miner)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    start = sum(SIZES[:rank])
    values = []
    for x, y in batches():
        xs, ys = x[start : start + SIZES[rank]], y[start : start + SIZES[rank]]
        emb = net(xs)
        value = loss_fn(emb, ys, miner(emb, ys)) if miner is not None else loss_fn(emb, ys)
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(float(value.detach()))
    out = {"values": values, "weight": net.module.weight.detach().clone(), "bias": net.module.bias.detach().clone()}
    if name == "xbm":
        out["memory"] = loss_fn.loss.embedding_memory.clone()
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
        result = {name: run_rank(name, rank) for name in SCENARIOS}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
