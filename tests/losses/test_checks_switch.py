"""``dml_bias.set_checks(False)`` / ``DML_BIAS_CHECKS=0`` skip the value checks that synchronise the host.

With the checks on, a NaN embedding raises; with them off it flows into a NaN loss, the value check is never
called and no tensor value is read on the host (spied on the CPU; ``torch.cuda.set_sync_debug_mode`` on a GPU).
Shape, dtype and device checks run either way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import dml_bias
import dml_bias.losses._common as common_module
from dml_bias import losses as L
from dml_bias.losses import functional as LF
from dml_bias.miners import BatchHardMiner, MultiSimilarityMiner, PairMarginMiner, TripletMarginMiner

LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.fixture(autouse=True)
def restore_switch() -> Iterator[None]:
    previous = dml_bias.checks_enabled()
    yield
    dml_bias.set_checks(previous)


def nan_embeddings(device: torch.device | str = "cpu") -> torch.Tensor:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    x[1, 2] = float("nan")
    return x.to(device)


def pair_losses() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Every loss and miner, called the way a training step calls it."""
    proxy = L.ProxyAnchorLoss(3, 4)
    arcface = L.ArcFaceLoss(3, 4)
    return {
        "ContrastiveLoss": lambda x, y: L.ContrastiveLoss()(x, y),
        "TripletMarginLoss": lambda x, y: L.TripletMarginLoss()(x, y),
        "MultiSimilarityLoss": lambda x, y: L.MultiSimilarityLoss()(x, y),
        "NTXentLoss": lambda x, y: L.NTXentLoss()(x, y),
        "SupConLoss": lambda x, y: L.SupConLoss()(x, y),
        "ProxyAnchorLoss": lambda x, y: proxy.to(x.device)(x, y),
        "ArcFaceLoss": lambda x, y: arcface.to(x.device)(x, y),
        "with indices_tuple": lambda x, y: L.ContrastiveLoss()(x, y, (LABELS[:2].to(x.device),) * 4),
    }


def miners() -> dict[str, Callable[[torch.Tensor, torch.Tensor], Any]]:
    return {
        "BatchHardMiner": lambda x, y: BatchHardMiner()(x, y),
        "MultiSimilarityMiner": lambda x, y: MultiSimilarityMiner()(x, y),
        "PairMarginMiner": lambda x, y: PairMarginMiner()(x, y),
        "TripletMarginMiner": lambda x, y: TripletMarginMiner()(x, y),
    }


@pytest.mark.parametrize("name", list(pair_losses()))
def test_checks_on_a_nan_embedding_raises(name: str) -> None:
    assert dml_bias.checks_enabled() is True  # the default
    with pytest.raises(ValueError, match="embeddings must be finite"):
        pair_losses()[name](nan_embeddings(), LABELS)


#: Losses whose value turns NaN with a NaN embedding; the hinge losses drop the NaN pairs silently instead.
NAN_LOSSES = ("TripletMarginLoss", "MultiSimilarityLoss", "NTXentLoss", "ProxyAnchorLoss", "ArcFaceLoss")


@pytest.mark.parametrize("name", list(pair_losses()))
def test_checks_off_a_nan_embedding_is_not_reported(name: str) -> None:
    assert dml_bias.set_checks(False) is True
    loss = pair_losses()[name](nan_embeddings(), LABELS)  # no error: the documented risk
    assert loss.shape == ()
    assert bool(loss.isnan()) == (name in NAN_LOSSES)


def spy_on_value_check(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = common_module.check_rows_finite

    def spy(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(common_module, "check_rows_finite", spy)
    return calls


@pytest.mark.parametrize("name", [*pair_losses(), *miners()])
def test_the_value_check_runs_only_when_switched_on(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    call = {**pair_losses(), **miners()}[name]
    calls = spy_on_value_check(monkeypatch)
    x = torch.randn(6, 4)
    call(x, LABELS)
    assert len(calls) == 1  # the spy is the function the losses call
    dml_bias.set_checks(False)
    call(x, LABELS)
    assert len(calls) == 1


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("name", [*pair_losses(), *miners()])
def test_checks_off_no_tensor_value_is_read_on_the_host(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    call = {**pair_losses(), **miners()}[name]
    x = torch.randn(6, 4, requires_grad=True)
    reads: list[str] = []
    for method in HOST_READS:
        real = getattr(torch.Tensor, method)

        def spy(self: torch.Tensor, *args: Any, _real: Any = real, _name: str = method) -> Any:
            reads.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, method, spy)
    call(x, LABELS)
    assert reads, "the spy must see the reads of the value checks"  # switched on: the checks read values
    reads.clear()
    dml_bias.set_checks(False)
    out = call(x, LABELS)
    assert reads == []
    monkeypatch.undo()
    if isinstance(out, torch.Tensor):
        out.backward()  # the graph is intact
        assert x.grad is not None


def test_shape_dtype_and_device_checks_stay_when_switched_off() -> None:
    dml_bias.set_checks(False)
    with pytest.raises(ValueError, match="embeddings must be a 2-D tensor"):
        L.ContrastiveLoss()(torch.randn(6), LABELS)
    with pytest.raises(TypeError, match="labels must be a 1-D integer tensor"):
        L.ContrastiveLoss()(torch.randn(6, 4), LABELS.float())
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor of length 6"):
        LF.contrastive_loss(torch.randn(6, 4), LABELS[:5])
    with pytest.raises(TypeError, match="embeddings must be"):
        BatchHardMiner()(torch.zeros(6, 4, dtype=torch.long), LABELS)


def test_checks_off_an_out_of_range_label_is_not_checked() -> None:
    proxies = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        LF.proxy_anchor_loss(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 3]), proxies)
    dml_bias.set_checks(False)
    with pytest.raises((IndexError, RuntimeError)):  # torch's own error, later and less clear: the documented risk
        LF.arcface_loss(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 3]), proxies)


def test_set_checks_returns_the_previous_setting_and_validates() -> None:
    assert dml_bias.set_checks(False) is True
    assert dml_bias.checks_enabled() is False
    assert dml_bias.set_checks(True) is False
    assert dml_bias.checks_enabled() is True
    with pytest.raises(TypeError, match="enabled must be a bool, got int 0"):
        dml_bias.set_checks(0)  # type: ignore[arg-type]
    assert dml_bias.checks_enabled() is True


def run_with_env(value: str | None, code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DML_BIAS_CHECKS"}
    if value is not None:
        env["DML_BIAS_CHECKS"] = value
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "True"), ("1", "True"), ("on", "True"), ("0", "False"), ("false", "False"), (" OFF ", "False")],
)
def test_the_environment_variable_is_read(value: str | None, expected: str) -> None:
    code = (
        "import torch, dml_bias\n"
        "from dml_bias.losses import ContrastiveLoss\n"
        "x = torch.tensor([[1.0, 0.0], [float('nan'), 1.0]])\n"
        "try:\n    loss = ContrastiveLoss()(x, torch.tensor([0, 0]))\n    raised = False\n"
        "except ValueError:\n    raised = True\n"
        "print(dml_bias.checks_enabled(), raised)\n"
    )
    out = run_with_env(value, code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected, expected]  # checks on <=> the NaN raised


def test_a_bad_environment_value_is_a_clear_error_and_set_checks_overrides_it() -> None:
    out = run_with_env("maybe", "import dml_bias\ndml_bias.checks_enabled()")
    assert out.returncode != 0
    assert "DML_BIAS_CHECKS must be one of" in out.stderr
    assert "got 'maybe'" in out.stderr
    out = run_with_env("0", "import dml_bias\ndml_bias.set_checks(True)\nprint(dml_bias.checks_enabled())")
    assert out.stdout.strip() == "True"


def count_syncs(call: Callable[[], Any]) -> int:
    """How many host synchronisations ``call`` makes, seen by ``torch.cuda.set_sync_debug_mode("warn")``."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in record)


@pytest.mark.cuda
@pytest.mark.parametrize("name", [*pair_losses(), *miners()])
def test_checks_off_removes_the_host_syncs_of_the_checks_on_cuda(name: str) -> None:
    # Some losses and miners still synchronise for their own work (a miner's nonzero() builds index tensors
    # whose size depends on the data); switching the checks off removes the syncs of the value checks.
    call = {**pair_losses(), **miners()}[name]
    x, labels = torch.randn(6, 4, device="cuda"), LABELS.cuda()
    call(x, labels)  # warm-up (kernels, allocator)
    with_checks = count_syncs(lambda: call(x, labels))
    dml_bias.set_checks(False)
    without_checks = count_syncs(lambda: call(x, labels))
    assert with_checks >= 1
    assert without_checks < with_checks
