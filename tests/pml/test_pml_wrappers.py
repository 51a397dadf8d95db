"""CrossBatchMemory, SelfSupervisedLoss and PML's ArcFaceLoss form against pytorch-metric-learning; CrossBatchMemory
under a 2-process gloo DistributedLossWrapper against the single-process run."""

from __future__ import annotations

import math
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dml_bias import distances as D
from dml_bias import losses as L
from dml_bias import miners as M
from dml_bias import reducers as R

sys.path.insert(0, str(Path(__file__).parent))

import pml_ddp_workers as W  # (needs the sys.path entry above, also in the spawned children)

pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as PL
from pytorch_metric_learning import miners as PM


def data(n: int, seed: int, d: int = 6, classes: int = 4, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


# --------------------------------------------------------------------------------------------------------------
# CrossBatchMemory
# --------------------------------------------------------------------------------------------------------------

XBM_LOSSES = {
    "contrastive": (L.ContrastiveLoss, PL.ContrastiveLoss),
    "triplet": (lambda: L.TripletMarginLoss(0.1), lambda: PL.TripletMarginLoss(0.1)),
    "ms": (L.MultiSimilarityLoss, PL.MultiSimilarityLoss),
    "ntxent": (lambda: L.NTXentLoss(0.5), lambda: PL.NTXentLoss(0.5)),
    "supcon": (L.SupConLoss, PL.SupConLoss),
}


@pytest.mark.parametrize("loss", list(XBM_LOSSES))
@pytest.mark.parametrize("miner", [None, "ms", "triplet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_batch_memory_equals_pml_over_steps(loss: str, miner: str | None, dtype: torch.dtype) -> None:
    """Seven steps of 10 into a memory of 32: the queue wraps around twice; values and gradients every step."""
    miners = {
        "ms": (M.MultiSimilarityMiner, PM.MultiSimilarityMiner),
        "triplet": (lambda: M.TripletMarginMiner(0.2), lambda: PM.TripletMarginMiner(0.2)),
    }
    ours = L.CrossBatchMemory(XBM_LOSSES[loss][0](), 6, 32, miner=miners[miner][0]() if miner else None)
    theirs = PL.CrossBatchMemory(XBM_LOSSES[loss][1](), 6, 32, miner=miners[miner][1]() if miner else None)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for step in range(7):
        x, y = data(10, step, dtype=dtype)
        xo, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        a, b = ours(xo, y), theirs(xt, y)
        torch.testing.assert_close(a, b.to(a.dtype), **tol)
        a.backward()
        b.backward()
        # MS's beta = 50 amplifies the round-off of the two libraries' different (exact) formulations
        scale = float(xt.grad.abs().max())
        grad_tol = dict(rtol=1e-4, atol=1e-5 * scale) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-10 * scale)
        torch.testing.assert_close(xo.grad, xt.grad, **grad_tol)
        assert ours.queue_idx == theirs.queue_idx
        assert ours.has_been_filled == theirs.has_been_filled
    torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory.to(ours.embedding_memory.dtype))
    assert torch.equal(ours.label_memory, theirs.label_memory)


def test_cross_batch_memory_enqueue_mask_and_indices_tuple_equal_pml() -> None:
    ours = L.CrossBatchMemory(L.ContrastiveLoss(), 6, 16)
    theirs = PL.CrossBatchMemory(PL.ContrastiveLoss(), 6, 16)
    for step in range(4):
        x, y = data(8, 10 + step)
        mask = torch.arange(8) % 2 == 0
        torch.testing.assert_close(ours(x, y, enqueue_mask=mask), theirs(x, y, enqueue_mask=mask))
    x, y = data(8, 20)
    idx = PM.TripletMarginMiner(0.5)(x, y)
    torch.testing.assert_close(ours(x, y, idx), theirs(x, y, idx))


def test_cross_batch_memory_first_step_equals_loss_with_self_as_ref() -> None:
    """Step one: the memory is the batch itself, the own copies removed: the plain loss on the batch."""
    x, y = data(12, 0)
    xbm = L.CrossBatchMemory(L.TripletMarginLoss(0.1), 6, 100)
    torch.testing.assert_close(xbm(x, y), L.TripletMarginLoss(0.1)(x, y))


def test_self_supervised_loss_equals_pml() -> None:
    x, _ = data(10, 1)
    v = x + 0.1 * data(10, 2)[0]
    for sym in (True, False):
        for ours, theirs in ((L.NTXentLoss(0.2), PL.NTXentLoss(0.2)), (L.TripletMarginLoss(), PL.TripletMarginLoss())):
            torch.testing.assert_close(
                L.SelfSupervisedLoss(ours, symmetric=sym)(x, v), PL.SelfSupervisedLoss(theirs, symmetric=sym)(x, v)
            )


# --------------------------------------------------------------------------------------------------------------
# ArcFaceLoss in PML's form
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [28.6, 10.0, 0.0])
@pytest.mark.parametrize("reducer", [None, "sum"])
def test_arcface_pml_form_equals_pml(margin: float, reducer: str | None) -> None:
    x, y = data(20, 3, d=16)
    kw_o = {} if reducer is None else {"reducer": R.SumReducer()}
    from pytorch_metric_learning import reducers as PR

    kw_t = {} if reducer is None else {"reducer": PR.SumReducer()}
    theirs = PL.ArcFaceLoss(4, 16, margin=margin, scale=16, **kw_t)
    ours = L.ArcFaceLoss(4, 16, margin=margin, scale=16, **kw_o)
    ours.load_state_dict(theirs.state_dict())  # a PML checkpoint loads as it is
    assert ours.W.shape == (16, 4)
    assert torch.equal(ours.W, theirs.W)
    xo, xt = x.float().requires_grad_(True), x.float().requires_grad_(True)
    a, b = ours(xo, y), theirs(xt, y)
    torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5)
    a.backward()
    b.backward()
    torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.W.grad, theirs.W.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.get_logits(x.float()), theirs.get_logits(x.float()))


def test_arcface_pml_form_equals_radians_form() -> None:
    x, y = data(10, 4, d=8, classes=3)
    pml_form = L.ArcFaceLoss(3, 8, margin=20.0, scale=10.0, dtype=torch.float64)
    radians = L.AdditiveAngularMarginLoss(3, 8, margin=math.radians(20.0), scale=10.0, dtype=torch.float64)
    with torch.no_grad():
        radians.weight.copy_(pml_form.W.t())
    torch.testing.assert_close(pml_form(x, y), radians(x, y), rtol=1e-14, atol=1e-14)  # W.T vs weight layout


def test_arcface_pml_reference_value() -> None:
    """pml-notes §2.8: ArcFaceLoss(4, 16) on the fixed batch with W = randn(16, 4, seed 2): 45.70742416."""
    torch.manual_seed(0)
    emb = torch.randn(32, 16)
    labels = torch.randint(0, 4, (32,))
    loss = L.ArcFaceLoss(4, 16)
    with torch.no_grad():
        loss.W.copy_(torch.randn(16, 4, generator=torch.Generator().manual_seed(2)))
    assert abs(loss(emb, labels).item() - 45.70742416) < 1e-4


def test_arcface_rejects_other_distances() -> None:
    with pytest.raises(ValueError, match="cosine"):
        L.ArcFaceLoss(3, 4, distance=D.LpDistance())


# --------------------------------------------------------------------------------------------------------------
# Two gloo processes
# --------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    out_dir = tmp_path_factory.mktemp("pml_ddp")
    mp.spawn(W.worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=True)
    return {r: torch.load(out_dir / f"rank{r}.pt") for r in range(2)}


@pytest.mark.parametrize("name", W.SCENARIOS)
def test_ddp_training_equals_single_process(ddp_results: dict[int, dict[str, Any]], name: str) -> None:
    ref = W.run_single(name)
    assert any(v > 0 for v in ref["values"])
    for rank in range(2):
        got = ddp_results[rank][name]
        torch.testing.assert_close(torch.tensor(got["values"]), torch.tensor(ref["values"]), rtol=0, atol=1e-10)
        torch.testing.assert_close(got["weight"], ref["weight"], rtol=0, atol=1e-10)
        torch.testing.assert_close(got["bias"], ref["bias"], rtol=0, atol=1e-10)
    if name == "xbm":  # the queues are identical on both ranks (PML's differ: its issue 639)
        assert torch.equal(ddp_results[0]["xbm"]["memory"], ddp_results[1]["xbm"]["memory"])


def test_cross_batch_memory_half_inputs_equal_float32_of_the_rounded_inputs() -> None:
    """fp16 embeddings: the memory takes float16, the loss computes in float32 — the same values as float32 inputs
    holding the same (rounded) numbers, and a finite float16 gradient."""
    half = L.CrossBatchMemory(L.TripletMarginLoss(0.1), 8, 32)
    full = L.CrossBatchMemory(L.TripletMarginLoss(0.1), 8, 32)
    labels = torch.arange(16) % 4
    for step in range(4):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step)).half().requires_grad_(True)
        a, b = half(x, labels), full(x.detach().float(), labels)
        a.backward()
        assert a.dtype == torch.float32
        assert half.embedding_memory.dtype == torch.float16
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert x.grad is not None
        assert x.grad.dtype == torch.float16
        assert bool(torch.isfinite(x.grad).all())
