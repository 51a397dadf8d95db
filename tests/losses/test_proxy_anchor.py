"""ProxyAnchorLoss: hand-computed values, slow reference, PML cross-check, proxies untouched, numerics."""

from __future__ import annotations

import math

import loss_refs as R
import pytest
import torch
from helpers import assert_close

from dml_bias.losses import ProxyAnchorLoss
from dml_bias.losses.functional import proxy_anchor_loss
from dml_bias.miners import MultiSimilarityMiner


def test_hand_computed_2d() -> None:
    # Proxies e0, e1, -e0; samples e0 (class 0), e1 (class 1); alpha=1, margin=0.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    proxies = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    pos = 2 * math.log(1 + math.exp(-1.0)) / 2  # classes 0 and 1, each cos = 1
    # proxy 0: negative sample e1 (cos 0); proxy 1: e0 (cos 0); proxy 2: e0 (cos -1) and e1 (cos 0).
    neg = (math.log(2) + math.log(2) + math.log(1 + math.exp(-1) + 1)) / 3
    ours = proxy_anchor_loss(emb, torch.tensor([0, 1]), proxies, alpha=1.0, margin=0.0)
    assert_close(ours, pos + neg)


def test_pml_reference_value() -> None:
    torch.manual_seed(0)
    emb = torch.randn(32, 16)
    labels = torch.randint(0, 4, (32,))
    loss_fn = ProxyAnchorLoss(4, 16)
    with torch.no_grad():
        loss_fn.proxies.copy_(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)))
    assert_close(loss_fn(emb, labels), 34.31282043)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("mined", [False, True])
def test_matches_slow_reference(metric: str, mined: bool) -> None:
    emb = torch.randn(14, 5, dtype=torch.float64)
    labels = torch.randint(0, 4, (14,))
    proxies = torch.randn(6, 5, dtype=torch.float64)  # classes 4, 5 have no sample: negative term only
    idx = MultiSimilarityMiner(0.05)(emb, labels) if mined else None
    weights = None
    if idx is not None:
        counts = torch.bincount(torch.cat(idx), minlength=14).double()
        weights = counts / counts.max()
    ours = proxy_anchor_loss(emb, labels, proxies, idx, margin=0.1, alpha=8.0, distance=metric)
    ref = R.proxy_anchor_loss(emb, labels, proxies, margin=0.1, alpha=8.0, weights=weights, metric=metric)
    assert_close(ours, ref)


def test_forward_does_not_change_proxies() -> None:
    loss_fn = ProxyAnchorLoss(3, 4)
    before = loss_fn.proxies.detach().clone()
    loss = loss_fn(torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]))
    assert loss.dtype == torch.float64
    assert loss_fn.proxies.dtype == torch.float32
    assert torch.equal(loss_fn.proxies.detach(), before)
    loss.backward()
    assert loss_fn.proxies.grad is not None
    assert loss_fn.proxies.grad.dtype == torch.float32


def test_init_and_factory_kwargs() -> None:
    torch.manual_seed(0)
    loss_fn = ProxyAnchorLoss(1000, 64, dtype=torch.float64)
    assert loss_fn.proxies.shape == (1000, 64)
    assert loss_fn.proxies.dtype == torch.float64
    assert isinstance(loss_fn.proxies, torch.nn.Parameter)
    # kaiming_normal_(fan_out) on (C, D): std = sqrt(2 / C).
    assert abs(loss_fn.proxies.std().item() - math.sqrt(2 / 1000)) < 0.002


def test_param_groups() -> None:
    loss_fn = ProxyAnchorLoss(3, 4)
    groups = loss_fn.param_groups(lr=1e-4)
    assert len(groups) == 1
    assert groups[0]["params"][0] is loss_fn.proxies
    assert groups[0]["lr"] == pytest.approx(1e-2)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 1e-4}, *groups])
    assert [g["lr"] for g in opt.param_groups] == [1e-4, pytest.approx(1e-2)]
    with pytest.raises(ValueError, match="proxy_lr_mult must be a number"):
        loss_fn.param_groups(lr=1e-4, proxy_lr_mult=0.0)


def test_fp16_embedding_equal_to_proxy_is_finite() -> None:
    # alpha * (1 + margin) = 35.2: e^35 overflows fp16; every sample equals its own proxy and all other proxies.
    loss_fn = ProxyAnchorLoss(4, 8, margin=0.1, alpha=32.0)
    with torch.no_grad():
        loss_fn.proxies.copy_(torch.ones(4, 8))
    emb = torch.ones(6, 8, dtype=torch.float16, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    loss = loss_fn(emb, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()
    assert torch.isfinite(loss_fn.proxies.grad).all()
    expected = R.proxy_anchor_loss(torch.ones(6, 8, dtype=torch.float64), labels, torch.ones(4, 8, dtype=torch.float64))
    assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_bad_input() -> None:
    loss_fn = ProxyAnchorLoss(3, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\] \(num_classes=3\)"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="embeddings must have size D=4"):
        loss_fn(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="does not support ref_emb"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 1]), ref_emb=torch.randn(2, 4))
    with pytest.raises(ValueError, match="labels must be given"):
        loss_fn(torch.randn(2, 4))
    with pytest.raises(ValueError, match="num_classes must be an integer in"):
        ProxyAnchorLoss(0, 4)
    with pytest.raises(ValueError, match="margin must be a number in"):
        ProxyAnchorLoss(3, 4, margin=-0.1)
    with pytest.raises(ValueError, match="alpha must be a number in"):
        ProxyAnchorLoss(3, 4, alpha=0.0)
