"""Input checks of the losses and miners that need more than a shape: finiteness, zero rows, parameter factory
kwargs, the contrastive margins' order, and the float16 normalisation floor."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from dml_bias import losses as L
from dml_bias.losses import _common
from dml_bias.losses import functional as F
from dml_bias.miners import BatchHardMiner, MultiSimilarityMiner

LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
CALLERS: dict[str, Callable[..., object]] = {
    "multi_similarity": L.MultiSimilarityLoss(),
    "contrastive": L.ContrastiveLoss(),
    "triplet": L.TripletMarginLoss(),
    "ntxent": L.NTXentLoss(),
    "supcon": L.SupConLoss(),
    "proxy_anchor": L.ProxyAnchorLoss(3, 4),
    "arcface": L.AdditiveAngularMarginLoss(3, 4),
    "ms_miner": MultiSimilarityMiner(),
    "batch_hard_miner": BatchHardMiner(),
}
PAIR_CALLERS = ["multi_similarity", "contrastive", "triplet", "ntxent", "supcon", "ms_miner", "batch_hard_miner"]


def embeddings_with(value: float, row: int = 1) -> torch.Tensor:
    emb = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    emb[row, 2] = value
    return emb


@pytest.mark.parametrize("name", list(CALLERS))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_embeddings_raise(name: str, value: float) -> None:
    # Before: NaN losses (MS, triplet, NT-Xent, Proxy-Anchor, ArcFace), a finite number or 0.0 (contrastive,
    # SupCon), and plausible-looking triplets / pairs from the miners.
    with pytest.raises(ValueError, match=r"embeddings must be finite, got 1 NaN or infinite value\(s\)"):
        CALLERS[name](embeddings_with(value), LABELS)


@pytest.mark.parametrize("name", PAIR_CALLERS)
def test_non_finite_reference_raises(name: str) -> None:
    with pytest.raises(ValueError, match="ref_emb must be finite"):
        CALLERS[name](torch.randn(6, 4), LABELS, ref_emb=embeddings_with(math.nan), ref_labels=LABELS)


def test_half_input_message_describes_what_was_passed() -> None:
    with pytest.raises(ValueError, match=r"in a tensor of shape \(6, 4\) and dtype torch.float16"):
        L.SupConLoss()(embeddings_with(math.inf).half(), LABELS)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_class_weights_raise(value: float) -> None:
    weights = torch.randn(3, 4)
    weights[2, 0] = value
    with pytest.raises(ValueError, match="proxies must be finite"):
        F.proxy_anchor_loss(torch.randn(6, 4), LABELS, weights)
    with pytest.raises(ValueError, match="weight must be finite"):
        F.arcface_loss(torch.randn(6, 4), LABELS, weights)
    module = L.ProxyAnchorLoss(3, 4)
    with torch.no_grad():
        module.proxies[0, 0] = value
    with pytest.raises(ValueError, match="proxies must be finite"):
        module(torch.randn(6, 4), LABELS)


@pytest.mark.parametrize("name", list(CALLERS))
def test_zero_norm_row_raises(name: str) -> None:
    # Before: a loss with a 1e11-1e12 gradient on that row in float32 (inf in float16), or a stuck zero gradient.
    emb = torch.randn(6, 4)
    emb[3] = 0.0
    with pytest.raises(ValueError, match=r"embeddings must have no row of zero norm .* the first at index 3"):
        CALLERS[name](emb, LABELS)


def test_zero_rows_are_fine_with_dot() -> None:
    emb = torch.randn(6, 4)
    emb[3] = 0.0
    assert torch.isfinite(L.MultiSimilarityLoss(distance="dot")(emb, LABELS))
    assert torch.isfinite(F.proxy_anchor_loss(emb, LABELS, torch.zeros(3, 4), distance="dot"))
    with pytest.raises(ValueError, match="proxies must have no row of zero norm"):
        F.proxy_anchor_loss(torch.randn(6, 4), LABELS, torch.zeros(3, 4))


def test_overflowing_row_norm_raises() -> None:
    # bfloat16 holds 3e38, but a float32 norm of such a row overflows and normalising made it a zero row.
    emb = torch.randn(6, 4).to(torch.bfloat16)
    emb[0] = 3e38
    with pytest.raises(ValueError, match=r"embeddings must have row norms that fit torch.float32"):
        L.MultiSimilarityLoss()(emb, LABELS)
    assert torch.isfinite(L.MultiSimilarityLoss(distance="dot")(torch.randn(6, 4), LABELS))


def test_width_mismatch_names_the_class_matrix() -> None:
    # Before: "embeddings must have size D=5", though the (3, 5) proxies were the odd one out.
    with pytest.raises(ValueError, match=r"proxies must have size D=4 \(embeddings.shape\[1\]\) in dimension 1"):
        F.proxy_anchor_loss(torch.randn(6, 4), LABELS, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"weight must have size D=4 \(embeddings.shape\[1\]\) in dimension 1"):
        F.arcface_loss(torch.randn(6, 4), LABELS, torch.randn(3, 5))
    # The modules own their parameter: there the embeddings are the odd one out.
    with pytest.raises(ValueError, match=r"embeddings must have size D=4 \(embedding_size\)"):
        L.ProxyAnchorLoss(3, 4)(torch.randn(6, 5), LABELS)
    with pytest.raises(ValueError, match=r"embeddings must have size D=4 \(embedding_size\)"):
        L.AdditiveAngularMarginLoss(3, 4)(torch.randn(6, 5), LABELS)


@pytest.mark.parametrize("cls", [L.ProxyAnchorLoss, L.AdditiveAngularMarginLoss])
def test_parameter_device_and_dtype(cls: type[torch.nn.Module]) -> None:
    # Before: raw torch RuntimeErrors ("Expected one of cpu, cuda, ...", "Only Tensors of floating point ...").
    with pytest.raises(TypeError, match=r"dtype must be None or a floating-point torch\.dtype, got torch\.int64"):
        cls(3, 4, dtype=torch.long)
    with pytest.raises(TypeError, match=r"dtype must be None or a floating-point torch.dtype"):
        cls(3, 4, dtype="float32")
    with pytest.raises(ValueError, match="device must name a device such as 'cpu' or 'cuda:0', got 'gpu0'"):
        cls(3, 4, device="gpu0")
    with pytest.raises(
        TypeError, match=r"device must be None, a torch.device, a device string or a CUDA index, got float 0.5"
    ):
        cls(3, 4, device=0.5)
    module = cls(3, 4, device=torch.device("meta"), dtype=torch.float64)
    param = next(module.parameters())
    assert param.device.type == "meta"
    assert param.dtype == torch.float64


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="device 'cuda:0' is not available"):
        L.ProxyAnchorLoss(3, 4, device="cuda:0")


def test_contrastive_margin_order() -> None:
    # Before: accepted, though with a distance no pair is ever pushed past pos_margin > neg_margin.
    with pytest.raises(ValueError, match="pos_margin must be <= neg_margin with the distance distance='euclidean'"):
        L.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5)
    with pytest.raises(ValueError, match="pos_margin must be <= neg_margin"):
        F.contrastive_loss(torch.randn(6, 4), LABELS, pos_margin=0.3, neg_margin=0.2, distance="squared_euclidean")
    with pytest.raises(ValueError, match="pos_margin must be >= neg_margin with the similarity distance='cosine'"):
        L.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance="cosine")
    L.ContrastiveLoss(pos_margin=0.5, neg_margin=0.5)
    L.ContrastiveLoss(pos_margin=0.8, neg_margin=0.2, distance="dot")


def test_norm_eps_by_dtype() -> None:
    assert _common.norm_eps(torch.float16) == 2.0**-9
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        assert _common.norm_eps(dtype) == 1e-12


@pytest.mark.parametrize("name", ["multi_similarity", "ntxent", "proxy_anchor", "arcface"])
def test_float16_subnormal_rows_give_a_finite_bounded_gradient(name: str) -> None:
    # Before: inf gradients; the exact gradient (~1e7 here) does not fit float16.
    emb = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    emb[0] = emb[0] / emb[0].norm() * 1e-7
    x = emb.half().requires_grad_(True)
    loss = CALLERS[name](x, LABELS)
    loss.backward()  # type: ignore[union-attr]
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().max() < 65504 / 4


def test_float16_floor_changes_nothing_above_it() -> None:
    emb = torch.randn(6, 4, generator=torch.Generator().manual_seed(2)).half()
    x32 = emb.float()
    for name in ("multi_similarity", "triplet", "supcon"):
        assert torch.equal(CALLERS[name](emb, LABELS), CALLERS[name](x32, LABELS))  # type: ignore[arg-type]


def test_similarity_matrix_equals_pairwise_for_float32() -> None:
    x, y = torch.randn(5, 3), torch.randn(4, 3)
    for distance in ("cosine", "dot", "euclidean", "squared_euclidean"):
        got = _common.similarity_matrix(x, y, distance, torch.float32, torch.float32)
        assert torch.equal(got, _common.pairwise(x, y, distance))
        assert torch.equal(
            _common.similarity_matrix(x, None, distance, torch.float32), _common.pairwise(x, None, distance)
        )
