"""The one home of the collectives: rank, world size, gathers with known sizes, sums (private).

:mod:`dml_bias.distributed` (training: gathers with gradients, the loss and miner wrappers), the sharded metrics
and the evaluator call these. Every helper degrades to the single-process answer when :mod:`torch.distributed` is
unavailable or not initialised, so the callers need no separate code path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dml_bias._checks import describe

__all__ = [
    "all_gather_ints",
    "all_gather_objects",
    "all_gather_rows",
    "all_reduce_sum",
    "check_group",
    "comm_device",
    "is_initialized",
    "rank",
    "world_size",
]


def is_initialized() -> bool:
    """``True`` when :mod:`torch.distributed` is available and a default process group is initialised."""
    return bool(dist.is_available() and dist.is_initialized())


def check_group(group: Any) -> None:
    """Raise ``TypeError`` unless ``group`` is ``None`` or a process group (also outside a distributed run)."""
    process_group = getattr(dist, "ProcessGroup", None)
    if group is not None and (process_group is None or not isinstance(group, process_group)):
        raise TypeError(f"group must be None or a torch.distributed.ProcessGroup, got {describe(group)}")


def world_size(group: Any = None) -> int:
    """The number of ranks of ``group`` (1 when torch.distributed is not initialised)."""
    check_group(group)
    return int(dist.get_world_size(group)) if is_initialized() else 1


def rank(group: Any = None) -> int:
    """This process' rank in ``group`` (0 when torch.distributed is not initialised)."""
    check_group(group)
    return int(dist.get_rank(group)) if is_initialized() else 0


def comm_device(group: Any = None) -> torch.device:
    """The device the collectives of ``group`` need: the current CUDA device for NCCL, else the CPU."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Gather one small picklable object per rank, in rank order (``[obj]`` without torch.distributed)."""
    if world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_gather_ints(values: list[int], device: torch.device, group: Any = None) -> list[list[int]]:
    """All-gather a short list of ints (the same length on every rank): one list per rank, in rank order."""
    if world_size(group) == 1:
        return [list(values)]
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [t.tolist() for t in out]


def all_gather_rows(tensor: torch.Tensor, sizes: list[int], group: Any = None) -> list[torch.Tensor]:
    """Gather a tensor whose first dimension differs between ranks (``sizes[r]`` rows on rank ``r``), detached.

    All ranks pass the same trailing shape and dtype. Rows are padded to the largest size for the collective and
    trimmed afterwards (bool tensors travel as uint8, which every backend gathers); the parts come back on
    ``tensor``'s device, in rank order.
    """
    if world_size(group) == 1:
        return [tensor.detach()]
    longest = max(sizes)
    if longest == 0:
        return [tensor.detach()[:0] for _ in sizes]
    device = comm_device(group)
    wire = torch.uint8 if tensor.dtype == torch.bool else tensor.dtype
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=wire, device=device)
    padded[: tensor.shape[0]] = tensor.detach().to(device, wire)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return [part[:size].to(tensor.device, tensor.dtype) for part, size in zip(parts, sizes, strict=True)]


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the ranks (same shape and dtype on every rank).

    Without torch.distributed (or with one rank) this is ``tensor`` itself; otherwise a new tensor on ``tensor``'s
    device.
    """
    if world_size(group) == 1:
        return tensor
    out = tensor.to(comm_device(group), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.to(tensor.device)
