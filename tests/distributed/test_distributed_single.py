"""dml_bias.distributed in a single process (no process group): helpers, identity behaviour, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_bias.distributed import (
    DistributedLossWrapper,
    _check_indices_tuple,
    _ScaleGrad,
    average_gradients,
    broadcast_parameters,
    gather_no_grad,
    gather_with_grad,
    get_rank,
    get_world_size,
    is_distributed,
)
from dml_bias.losses import MultiSimilarityLoss, ProxyAnchorLoss
from dml_bias.miners import MultiSimilarityMiner


def test_world_helpers_without_process_group() -> None:
    assert is_distributed() is False
    assert get_rank() == 0
    assert get_world_size() == 1


# --------------------------------------------------------------------------------------------------------------
# Gathers
# --------------------------------------------------------------------------------------------------------------


def test_gathers_are_identity_in_a_single_process() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    labels = torch.tensor([1, 0, 1])
    out = gather_no_grad(labels)
    assert torch.equal(out, labels)
    detached = gather_no_grad(x)
    assert not detached.requires_grad
    assert detached.data_ptr() == x.data_ptr()  # no copy


@pytest.mark.parametrize("fn", [gather_with_grad, gather_no_grad])
def test_gather_bad_input(fn) -> None:
    with pytest.raises(TypeError, match=r"tensor must be a torch.Tensor, got list"):
        fn([1.0, 2.0])
    with pytest.raises(ValueError, match=r"tensor must have between 1 and 8 dimensions .*shape \(\)"):
        fn(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"between 1 and 8 dimensions"):
        fn(torch.zeros((1,) * 9))
    with pytest.raises(ValueError, match=r"dense"):
        fn(torch.eye(2).to_sparse())


def test_gather_with_grad_needs_floating_point() -> None:
    with pytest.raises(
        TypeError, match=r"tensor must be a floating-point tensor, got shape \(3,\) and dtype torch.int64"
    ):
        gather_with_grad(torch.tensor([1, 2, 3]))


def test_scale_grad_keeps_value_and_scales_gradient() -> None:
    x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    y = _ScaleGrad.apply(x * 3, 0.25)
    assert torch.equal(y, torch.tensor([3.0, -6.0], dtype=torch.float64))
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 0.75, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------------
# Parameter helpers
# --------------------------------------------------------------------------------------------------------------


def test_parameter_helpers_are_no_ops_in_a_single_process() -> None:
    layer = torch.nn.Linear(3, 2)
    layer(torch.randn(4, 3)).pow(2).sum().backward()
    weight, grad = layer.weight.detach().clone(), layer.weight.grad.clone()
    average_gradients(layer)
    average_gradients(list(layer.parameters()))
    average_gradients(layer.weight)
    broadcast_parameters(layer)
    assert torch.equal(layer.weight, weight)
    assert torch.equal(layer.weight.grad, grad)


def test_parameter_helpers_bad_input() -> None:
    with pytest.raises(TypeError, match=r"parameters must be an nn.Module or an iterable of tensors, got int"):
        average_gradients(3)
    with pytest.raises(TypeError, match=r"parameters\[1\] must be a torch.Tensor, got str"):
        average_gradients([torch.zeros(1), "w"])
    with pytest.raises(TypeError, match=r"module must be a torch.nn.Module, got Tensor"):
        broadcast_parameters(torch.zeros(2))


# --------------------------------------------------------------------------------------------------------------
# The wrapper in a single process is the bare loss
# --------------------------------------------------------------------------------------------------------------


def _grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.grad.clone() for t in tensors]


def test_wrapper_equals_bare_proxy_anchor_value_and_gradients() -> None:
    loss = ProxyAnchorLoss(4, 8, dtype=torch.float64)
    wrapped = DistributedLossWrapper(loss)
    emb = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (10,))
    expected = loss(emb, labels)
    expected.backward()
    g_expected = _grads(emb, loss.proxies)
    emb.grad, loss.proxies.grad = None, None
    got = wrapped(emb, labels)
    got.backward()
    assert torch.equal(got, expected)
    for a, b in zip(_grads(emb, loss.proxies), g_expected, strict=True):
        assert torch.equal(a, b)
    assert [name for name, _ in wrapped.named_parameters()] == ["loss.proxies"]


def test_wrapper_sum_reduction_in_a_single_process_is_the_bare_loss() -> None:
    loss = ProxyAnchorLoss(3, 4, dtype=torch.float64)
    emb = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss(emb, labels).backward()
    expected = _grads(emb, loss.proxies)
    emb.grad, loss.proxies.grad = None, None
    DistributedLossWrapper(loss, grad_reduction="sum")(emb, labels).backward()
    for a, b in zip(_grads(emb, loss.proxies), expected, strict=True):
        assert torch.equal(a, b)


def test_wrapper_with_miner_equals_loss_on_mined_tuples() -> None:
    emb = torch.randn(12, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (12,))
    loss, miner = MultiSimilarityLoss(), MultiSimilarityMiner()
    mined = miner(emb, labels)
    assert len(mined[0]) > 0
    expected = loss(emb, labels, mined)
    assert torch.equal(DistributedLossWrapper(loss, miner=miner)(emb, labels), expected)
    assert torch.equal(DistributedLossWrapper(loss)(emb, labels, mined), expected)
    assert not torch.equal(loss(emb, labels), expected)  # the miner matters on this batch


def test_wrapper_passes_ref_emb_and_ref_labels() -> None:
    emb, ref = torch.randn(6, 4), torch.randn(5, 4)
    labels, ref_labels = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 1, 0, 0, 1])
    loss = MultiSimilarityLoss()
    expected = loss(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    got = DistributedLossWrapper(loss)(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    assert torch.equal(got, expected)
    miner = MultiSimilarityMiner()
    mined = miner(emb, labels, ref, ref_labels)
    got = DistributedLossWrapper(loss, miner=miner)(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    assert torch.equal(got, loss(emb, labels, mined, ref, ref_labels))


def test_wrapper_accepts_any_two_argument_loss() -> None:
    logits, target = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    ce = torch.nn.CrossEntropyLoss()
    assert torch.equal(DistributedLossWrapper(ce)(logits, target), ce(logits, target))
    # Only the arguments that were given reach the loss.
    assert torch.equal(DistributedLossWrapper(lambda e: e.sum())(logits), logits.sum())


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 12), classes=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_wrapper_is_the_bare_loss_property(n: int, classes: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, 3, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    torch.manual_seed(seed)
    loss = ProxyAnchorLoss(classes, 3)
    assert_close(DistributedLossWrapper(loss)(emb, labels), loss(emb, labels), rtol=0, atol=0)


def test_wrapper_repr() -> None:
    text = repr(DistributedLossWrapper(MultiSimilarityLoss(), grad_reduction="sum"))
    assert "grad_reduction='sum'" in text
    assert "MultiSimilarityLoss" in text


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


def test_wrapper_bad_construction() -> None:
    with pytest.raises(TypeError, match=r"loss must be a callable .*got int"):
        DistributedLossWrapper(3)
    with pytest.raises(TypeError, match=r"miner must be a callable or None, got str"):
        DistributedLossWrapper(MultiSimilarityLoss(), miner="ms")
    with pytest.raises(ValueError, match=r"grad_reduction must be one of 'mean', 'sum', got 'avg'"):
        DistributedLossWrapper(MultiSimilarityLoss(), grad_reduction="avg")
    with pytest.raises(TypeError, match=r"sync_parameters must be a bool, got int 1"):
        DistributedLossWrapper(MultiSimilarityLoss(), sync_parameters=1)


def test_wrapper_rejects_miner_and_indices_tuple_together() -> None:
    emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    wrapped = DistributedLossWrapper(MultiSimilarityLoss(), miner=MultiSimilarityMiner())
    with pytest.raises(ValueError, match=r"either indices_tuple .* or a miner"):
        wrapped(emb, labels, MultiSimilarityMiner()(emb, labels))


def test_check_indices_tuple() -> None:
    i = torch.tensor([0, 1])
    assert len(_check_indices_tuple((i, i, i), 2, 2, "embeddings")) == 3
    with pytest.raises(TypeError, match=r"indices_tuple must be a tuple of 3 .* or 4"):
        _check_indices_tuple((i, i), 2, 2, "embeddings")
    with pytest.raises(TypeError, match=r"indices_tuple\[1\] must be a 1-D integer tensor"):
        _check_indices_tuple((i, i.float(), i, i), 2, 2, "embeddings")
    with pytest.raises(ValueError, match=r"indices_tuple\[0..1\] must have equal lengths, got lengths \[2, 1\]"):
        _check_indices_tuple((i, i[:1], i, i), 2, 2, "embeddings")
    with pytest.raises(ValueError, match=r"indices_tuple\[3\] must index the local rows of ref_emb, .*\[0, 1\]"):
        _check_indices_tuple((i, i, i, i + 1), 2, 2, "ref_emb")
    with pytest.raises(ValueError, match=r"indices_tuple\[0\] must index the local rows of embeddings"):
        _check_indices_tuple((i - 1, i, i), 2, 5, "embeddings")
