"""Two CPU processes (gloo) train through DistributedLossWrapper and must match the single-process run exactly.

One ``torch.multiprocessing.spawn`` job (module-scoped fixture) runs every scenario of ``distributed_workers`` on
2 ranks with unequal batch sizes (5 and 3) and writes each rank's results to a temporary folder; the tests below
compare them with single-process runs on the concatenated batches, computed here.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

import distributed_workers as W  # (needs the sys.path entry above, also in the spawned children)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD = 2
ATOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(W.worker, args=(WORLD, free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return {r: torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)}


# --------------------------------------------------------------------------------------------------------------
# Training scenarios: parameters and loss values equal the single-process run
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_training_matches_single_process(results: dict[int, dict[str, Any]], name: str) -> None:
    ref = W.run_single(name)
    init_model, init_loss = W.make(W.SCENARIOS[name][0])
    assert len(W.SCENARIOS[name][4]) == WORLD
    for rank in range(WORLD):
        got = results[rank][name]
        torch.testing.assert_close(torch.tensor(got["values"]), torch.tensor(ref["values"]), rtol=0, atol=ATOL)
        for part in ("model", "loss"):
            assert got[part].keys() == ref[part].keys()
            for key, value in ref[part].items():
                torch.testing.assert_close(got[part][key], value, rtol=0, atol=ATOL, msg=f"{name} {part}.{key}")
    # The runs must have moved every parameter, so a wrong gradient scale (e.g. world_size x) could not pass.
    for key, value in init_model.state_dict().items():
        assert (ref["model"][key] - value).abs().max() > 1e-3, key
    for key, value in init_loss.state_dict().items():
        assert (ref["loss"][key] - value).abs().max() > 1e-3, key


def test_proxies_would_differ_with_world_size_times_gradient(results: dict[int, dict[str, Any]]) -> None:
    # Guard on the test itself: doubling the proxies' learning rate (what pytorch-metric-learning's wrapper does
    # to their gradient with 2 ranks) changes the result far beyond the tolerance.
    ref = W.run_single("proxy_ddp")
    lr = W.LOSS_LR
    try:
        W.LOSS_LR = 2 * lr
        doubled = W.run_single("proxy_ddp")
    finally:
        W.LOSS_LR = lr
    key = next(iter(ref["loss"]))
    assert (doubled["loss"][key] - ref["loss"][key]).abs().max() > 100 * ATOL
    assert (results[0]["proxy_ddp"]["loss"][key] - doubled["loss"][key]).abs().max() > 100 * ATOL


# --------------------------------------------------------------------------------------------------------------
# The gathers
# --------------------------------------------------------------------------------------------------------------


def test_gather_with_grad_order_and_gradient(results: dict[int, dict[str, Any]]) -> None:
    xs = [torch.arange(n * 2, dtype=torch.float64).view(-1, 2) + 100 * r for r, n in enumerate(W.SIZES)]
    full = torch.cat(xs)
    ws = [torch.randn(full.shape, generator=torch.Generator().manual_seed(r), dtype=torch.float64) for r in range(2)]
    # Each rank's loss is sum(w_r * y**2); the gradient of the sum of both losses w.r.t. rank r's rows.
    expected_grad = 2 * (ws[0] + ws[1]) * full
    for rank in range(WORLD):
        got = results[rank]["gather"]
        assert got["world"] == (rank, WORLD)
        torch.testing.assert_close(got["gathered"], full, rtol=0, atol=0)
        torch.testing.assert_close(got["grad"], expected_grad[W.bounds(W.SIZES, rank)], rtol=0, atol=1e-12)


def test_gather_with_grad_rank_without_rows(results: dict[int, dict[str, Any]]) -> None:
    for rank in range(WORLD):
        got = results[rank]["gather"]
        assert got["empty_gathered_shape"] == (4, 3)
        # Both ranks' losses sum row * [0, 1, 2]; rank 0 owns all 4 rows.
        expected = 2 * torch.arange(3, dtype=torch.float64).expand(4, 3) if rank == 0 else torch.zeros(0, 3)
        torch.testing.assert_close(got["empty_grad"], expected, check_dtype=False)


def test_gather_no_grad_dtypes_and_shapes(results: dict[int, dict[str, Any]]) -> None:
    for rank in range(WORLD):
        got = results[rank]["gather"]
        assert torch.equal(got["labels"], torch.tensor([0, 1, 2, 3, 4, 10, 11, 12]))
        assert got["bools"].dtype == torch.bool
        assert got["bools"].tolist() == [True, False, False]
        assert torch.equal(got["three_d"], torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1).expand(3, 2, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gather_with_grad_half_precision(results: dict[int, dict[str, Any]], dtype: torch.dtype) -> None:
    full = torch.tensor([1.0, 2.0, 2.0], dtype=dtype).view(3, 1).expand(3, 2)
    for rank in range(WORLD):
        gathered, grad = results[rank]["gather"][f"half_{dtype}"]
        assert gathered.dtype == grad.dtype == dtype
        assert torch.equal(gathered, full)
        assert torch.equal(grad, 4 * full[W.bounds((1, 2), rank)])


def test_disagreeing_ranks_raise_on_every_rank(results: dict[int, dict[str, Any]]) -> None:
    for rank in range(WORLD):
        errors = results[rank]["gather"]["errors"]
        assert set(errors) == {"trailing_shape", "dtype", "wrapper_structure", "gather_bad_rank", "wrapper_bad_rank"}
        assert "same dtype and the same shape after dimension 0" in errors["trailing_shape"]
        assert "rank 0 and rank 1 differ" in errors["dtype"]
        assert "the same structure" in errors["wrapper_structure"]
    # The rank with bad input raises its own error; the other one says which rank rejected its arguments.
    assert results[0]["gather"]["errors"]["gather_bad_rank"].startswith("ValueError: gather_with_grad: rank(s) [1]")
    assert results[1]["gather"]["errors"]["gather_bad_rank"].startswith(
        "TypeError: tensor must be a floating-point tensor"
    )
    assert results[0]["gather"]["errors"]["wrapper_bad_rank"].startswith("ValueError: labels must be")
    assert results[1]["gather"]["errors"]["wrapper_bad_rank"].startswith(
        "ValueError: DistributedLossWrapper: rank(s) [0] rejected"
    )


def test_ref_emb_that_is_embeddings_keeps_its_identity(results: dict[int, dict[str, Any]]) -> None:
    full = torch.cat([W.emb_for_rank(r) for r in range(WORLD)])
    y = torch.cat([W.labels_for_rank(r) for r in range(WORLD)])
    expected = W.MultiSimilarityLoss()(full, y, ref_emb=full, ref_labels=y).item()
    assert expected != W.MultiSimilarityLoss()(full, y, ref_emb=full.clone(), ref_labels=y.clone()).item()
    for rank in range(WORLD):
        assert results[rank]["gather"]["ref_is_emb_identity"] == 1.0
        assert results[rank]["gather"]["ref_is_emb_value"] == pytest.approx(expected, rel=1e-12)
