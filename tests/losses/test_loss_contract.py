"""The contract every loss shares: slow reference, PML cross-check, module == functional, gradcheck,
half precision / autocast, edge cases, bad input, no in-place changes, torch.compile.

The checks every public object shares (``tests/contract.py``: smoke, bad input, reference, float64 gradcheck of
the embeddings, the reference set and the class weights, module == functional, dtype, device, unchanged,
pickle) run from the table :data:`ENTRIES` at the end; the tests above add what is particular to losses."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import contract
import loss_refs as R
import pytest
import torch
from contract import Call, Entry, call, tensor
from helpers import assert_close

from dml_bias import losses as L
from dml_bias.losses import functional as F
from dml_bias.miners import MultiSimilarityMiner

PAIR_LOSSES = ["multi_similarity", "contrastive", "triplet", "ntxent", "supcon"]
CLASS_LOSSES = ["proxy_anchor", "arcface"]
ALL_LOSSES = PAIR_LOSSES + CLASS_LOSSES
NUM_CLASSES = 5


def make(name: str, dim: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Our module with non-default but well-conditioned hyper-parameters for small batches."""
    if name == "multi_similarity":
        return L.MultiSimilarityLoss(alpha=2.0, beta=10.0, base=0.5)
    if name == "contrastive":
        return L.ContrastiveLoss(pos_margin=0.2, neg_margin=1.2)
    if name == "triplet":
        return L.TripletMarginLoss(margin=0.2)
    if name == "ntxent":
        return L.NTXentLoss(temperature=0.5)
    if name == "supcon":
        return L.SupConLoss(temperature=0.5)
    if name == "proxy_anchor":
        return L.ProxyAnchorLoss(NUM_CLASSES, dim, margin=0.1, alpha=8.0, dtype=dtype)
    if name == "arcface":
        return L.AdditiveAngularMarginLoss(NUM_CLASSES, dim, margin=0.3, scale=4.0, dtype=dtype)
    raise KeyError(name)


def functional_call(name: str, module: torch.nn.Module, emb, labels, idx=None, ref=None, ref_labels=None):
    m: Any = module
    if name == "multi_similarity":
        return F.multi_similarity_loss(emb, labels, idx, ref, ref_labels, alpha=m.alpha, beta=m.beta, base=m.base)
    if name == "contrastive":
        return F.contrastive_loss(emb, labels, idx, ref, ref_labels, pos_margin=m.pos_margin, neg_margin=m.neg_margin)
    if name == "triplet":
        return F.triplet_margin_loss(emb, labels, idx, ref, ref_labels, margin=m.margin)
    if name == "ntxent":
        return F.ntxent_loss(emb, labels, idx, ref, ref_labels, temperature=m.temperature)
    if name == "supcon":
        return F.supcon_loss(emb, labels, idx, ref, ref_labels, temperature=m.temperature)
    if name == "proxy_anchor":
        return F.proxy_anchor_loss(emb, labels, m.proxies, idx, margin=m.margin, alpha=m.alpha)
    return F.arcface_loss(emb, labels, m.weight, idx, margin=m.margin, scale=m.scale)


def reference(name: str, module: torch.nn.Module, emb, labels, idx=None, ref=None, ref_labels=None):
    m: Any = module
    kw = {"indices_tuple": idx, "ref_emb": ref, "ref_labels": ref_labels}
    if name == "multi_similarity":
        return R.ms_loss(emb, labels, alpha=m.alpha, beta=m.beta, base=m.base, **kw)
    if name == "contrastive":
        return R.contrastive_loss(emb, labels, pos_margin=m.pos_margin, neg_margin=m.neg_margin, **kw)
    if name == "triplet":
        return R.triplet_loss(emb, labels, margin=m.margin, **kw)
    if name == "ntxent":
        return R.ntxent_loss(emb, labels, temperature=m.temperature, **kw)
    if name == "supcon":
        return R.supcon_loss(emb, labels, temperature=m.temperature, **kw)
    weights = None
    if idx is not None and any(len(t) for t in idx):
        counts = torch.bincount(torch.cat(list(idx)), minlength=emb.shape[0]).double()
        weights = counts / counts.max()
    if name == "proxy_anchor":
        return R.proxy_anchor_loss(emb, labels, m.proxies.double(), margin=m.margin, alpha=m.alpha, weights=weights)
    return R.arcface_loss(emb, labels, m.weight.double(), margin=m.margin, scale=m.scale, weights=weights)


def pml_loss(name: str, module: torch.nn.Module) -> Callable[..., torch.Tensor]:
    pml = R.import_pml()
    m: Any = module
    if name == "multi_similarity":
        return pml.losses.MultiSimilarityLoss(alpha=m.alpha, beta=m.beta, base=m.base)
    if name == "contrastive":
        return pml.losses.ContrastiveLoss(pos_margin=m.pos_margin, neg_margin=m.neg_margin)
    if name == "triplet":
        return pml.losses.TripletMarginLoss(margin=m.margin)
    if name == "ntxent":
        return pml.losses.NTXentLoss(temperature=m.temperature)
    if name == "supcon":
        return pml.losses.SupConLoss(temperature=m.temperature)
    if name == "proxy_anchor":
        theirs = pml.losses.ProxyAnchorLoss(NUM_CLASSES, m.embedding_size, margin=m.margin, alpha=m.alpha)
        with torch.no_grad():
            theirs.proxies.copy_(m.proxies)
        return theirs
    theirs = pml.losses.ArcFaceLoss(NUM_CLASSES, m.embedding_size, margin=math.degrees(m.margin), scale=m.scale)
    with torch.no_grad():
        theirs.W.copy_(m.weight.t())
    return theirs


def batch(n: int = 12, dim: int = 4, dtype=torch.float64, classes: int = 3):
    emb = torch.randn(n, dim, dtype=dtype)
    labels = torch.arange(n) % classes
    return emb, labels[torch.randperm(n)]


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("mode", ["all", "miner", "ref", "triplets"])
def test_module_functional_and_slow_reference_agree(name: str, mode: str) -> None:
    if mode in ("ref", "triplets") and name in CLASS_LOSSES:
        pytest.skip("classification losses take neither ref_emb nor pair/triplet structure")
    emb, labels = batch()
    module = make(name, 4, torch.float64)
    idx = ref = ref_labels = None
    if mode == "miner":
        idx = MultiSimilarityMiner(0.3)(emb, labels)
    elif mode == "ref":
        ref, ref_labels = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    elif mode == "triplets":
        idx = (torch.tensor([0, 0, 1, 1]), torch.tensor([2, 2, 3, 3]), torch.tensor([4, 5, 6, 4]))
        labels = None
    ours = module(emb, labels, idx, ref, ref_labels)
    assert ours.dtype == torch.float64
    assert_close(ours, functional_call(name, module, emb, labels, idx, ref, ref_labels), rtol=0, atol=0)
    assert_close(ours, reference(name, module, emb, labels, idx, ref, ref_labels))


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("mode", ["all", "miner", "ref"])
def test_cross_check_pml(name: str, mode: str) -> None:
    if mode == "ref" and name in CLASS_LOSSES:
        pytest.skip("no ref_emb for classification losses")
    for seed in range(2):
        torch.manual_seed(seed)
        emb = torch.randn(40, 16)
        labels = torch.randint(0, NUM_CLASSES, (40,))
        module = make(name, 16)
        theirs = pml_loss(name, module)
        kw: dict[str, Any] = {}
        if mode == "miner":
            kw["indices_tuple"] = R.import_pml().miners.MultiSimilarityMiner(0.1)(emb, labels)
        elif mode == "ref":
            kw["ref_emb"] = torch.randn(20, 16)
            kw["ref_labels"] = torch.randint(0, NUM_CLASSES, (20,))
        e1 = emb.clone().requires_grad_(True)
        e2 = emb.clone().requires_grad_(True)
        expected = theirs(e1, labels, **kw)
        got = module(e2, labels, **kw)
        assert_close(got, expected, rtol=1e-5, atol=1e-6)
        expected.backward()
        got.backward()
        assert_close(e2.grad, e1.grad, rtol=1e-4, atol=1e-6)
        if name in CLASS_LOSSES:  # the class weights' gradient too (PML's W is our weight transposed)
            ours_w = module.proxies if name == "proxy_anchor" else module.weight  # type: ignore[union-attr]
            theirs_w = theirs.proxies.grad if name == "proxy_anchor" else theirs.W.grad.t()  # type: ignore[union-attr]
            assert_close(ours_w.grad, theirs_w, rtol=1e-4, atol=1e-6)


def extreme_batches() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(4, 8)
    return {
        "identical": (torch.ones(8, 8), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])),
        "plus-minus-one-cosines": (torch.cat([x, -x, x]), torch.tensor([0, 1, 2, 3] * 3)),
        "random": (torch.randn(10, 8) * 3, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])),
    }


def class_weights_on_samples(name: str, module: torch.nn.Module, emb: torch.Tensor, labels: torch.Tensor) -> None:
    """Put each class weight exactly on a sample of its class (cosine 1 for that sample)."""
    weight = module.proxies if name == "proxy_anchor" else module.weight  # type: ignore[union-attr]
    with torch.no_grad():
        for c in range(NUM_CLASSES):
            hit = (labels == c).nonzero()
            if len(hit):
                weight[c] = emb[hit[0, 0]].float()


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("case", ["identical", "plus-minus-one-cosines", "random"])
@pytest.mark.parametrize("precision", ["float16", "bfloat16", "autocast-bf16"])
def test_half_precision_is_finite_and_close(name: str, case: str, precision: str) -> None:
    emb32, labels = extreme_batches()[case]
    module = make(name, 8)
    if name in CLASS_LOSSES:
        if name == "proxy_anchor":
            module = L.ProxyAnchorLoss(NUM_CLASSES, 8)
        else:
            module = L.AdditiveAngularMarginLoss(NUM_CLASSES, 8)
        class_weights_on_samples(name, module, emb32, labels)
    expected = module(emb32.double(), labels)
    if precision == "autocast-bf16":
        emb = emb32.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(emb, labels)
    else:
        emb = emb32.to(getattr(torch, precision)).requires_grad_(True)
        loss = module(emb, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()
    assert emb.grad.dtype == emb.dtype
    for p in module.parameters():
        assert p.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
    # The inputs are rounded to half precision before the float32 math; the rest is exact.
    tol = 5e-2 if name == "arcface" else 2e-2
    if precision != "autocast-bf16":
        # ArcFace near cos = 1: float32 rounding of cos (6e-8) moves sin(theta) ~ sqrt(1 - cos^2) by ~3e-5.
        exact = 2e-3 if name == "arcface" else 1e-5
        assert_close(loss, module(emb.detach().double(), labels), rtol=exact, atol=exact)
    assert_close(loss, expected, rtol=tol, atol=tol)


def test_arcface_grad_finite_and_bounded_at_cosine_one() -> None:
    # PML's acos form: NaN gradient at cos = 1 with torch 2.13 (pml_reference.txt section 5), and an unbounded
    # one just below 1. Ours is finite at cos = +-1 and bounded everywhere.
    module = L.AdditiveAngularMarginLoss(4, 16, scale=1.0)
    with torch.no_grad():
        module.weight.copy_(torch.eye(4, 16) * 3.0)
    for tilt in (0.0, 1e-4, 1e-3):
        emb = (torch.eye(4, 16)[:2] + tilt * torch.eye(4, 16)[2:]).requires_grad_(True)
        emb2 = (-torch.eye(4, 16)[:2]).requires_grad_(True)  # cos = -1: the theta + m > pi branch
        module.weight.grad = None
        (module(emb, torch.tensor([0, 1])) + module(emb2, torch.tensor([0, 1]))).backward()
        assert torch.isfinite(emb.grad).all()
        assert torch.isfinite(emb2.grad).all()
        assert torch.isfinite(module.weight.grad).all()
        assert emb.grad.abs().max() < 1e3


EDGE_LABELS = {
    "no-positive": torch.arange(5),
    "no-negative": torch.zeros(5, dtype=torch.long),
    "single-sample": torch.tensor([2]),
    "one-pos-one-neg": torch.tensor([0, 0]),
}


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("case", list(EDGE_LABELS))
def test_edge_cases_finite_graph_kept_and_equal_reference(name: str, case: str) -> None:
    labels = EDGE_LABELS[case]
    emb = torch.randn(len(labels), 4, dtype=torch.float64, requires_grad=True)
    module = make(name, 4, torch.float64)
    loss = module(emb, labels)
    assert loss.requires_grad
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()
    assert_close(loss, reference(name, module, emb.detach(), labels))


def test_edge_values_match_pml_table() -> None:
    # pml-notes.md 2.7: no positive pair -> negative term only; no negative pair -> positive term only; else 0.
    pml = R.import_pml()
    torch.manual_seed(0)
    e8 = torch.randn(8, 16)
    for labels in (torch.arange(8), torch.zeros(8, dtype=torch.long)):
        for ours, theirs in [
            (L.ContrastiveLoss(), pml.losses.ContrastiveLoss()),
            (L.MultiSimilarityLoss(), pml.losses.MultiSimilarityLoss()),
            (L.TripletMarginLoss(), pml.losses.TripletMarginLoss()),
            (L.NTXentLoss(), pml.losses.NTXentLoss()),
            (L.SupConLoss(), pml.losses.SupConLoss()),
        ]:
            assert_close(ours(e8, labels), theirs(e8, labels))


def test_pml_quirk_single_pairs_not_zeroed() -> None:
    # PML returns 0 when the tuple holds at most one pair of each kind; we compute the loss (documented).
    e = torch.randn(4, 3, dtype=torch.float64)
    idx = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    labels = torch.tensor([0, 0, 1, 1])
    module = L.NTXentLoss(temperature=0.5)
    assert module(e, labels, idx) > 0
    assert_close(module(e, labels, idx), R.ntxent_loss(e, labels, idx, temperature=0.5))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_bad_input(name: str) -> None:
    module = make(name, 4)
    emb, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"embeddings must be a 2-D tensor of shape \(N, D\), got shape \(6,\)"):
        module(torch.randn(6), labels)
    with pytest.raises(TypeError, match="embeddings must be a floating-point tensor"):
        module(torch.ones(6, 4, dtype=torch.long), labels)
    with pytest.raises(ValueError, match="embeddings must hold at least one row"):
        module(torch.randn(0, 4), labels[:0])
    with pytest.raises(TypeError, match=r"labels must be a 1-D integer tensor of length 6 \(embeddings.shape\[0\]\)"):
        module(emb, labels.float())
    with pytest.raises(ValueError, match=r"labels must be a 1-D integer tensor of length 6"):
        module(emb, labels[:5])
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor"):
        module(emb, labels.unsqueeze(1))
    with pytest.raises(ValueError, match="labels must be given"):
        module(emb)
    if name in CLASS_LOSSES:
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\] \(num_classes=5\)"):
            module(emb, torch.tensor([0, 0, 1, 1, 2, 5]))
        with pytest.raises(ValueError, match="does not support ref_emb"):
            module(emb, labels, ref_emb=emb.clone(), ref_labels=labels)
    else:
        with pytest.raises(ValueError, match="ref_labels must be given with ref_emb"):
            module(emb, labels, ref_emb=torch.randn(3, 4))
        with pytest.raises(ValueError, match="ref_labels was given without ref_emb"):
            module(emb, labels, ref_labels=labels)
        with pytest.raises(ValueError, match="ref_emb must have size D=4"):
            module(emb, labels, ref_emb=torch.randn(3, 5), ref_labels=torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match=r"indices_tuple\[1\] \(p\) must hold indices in \[0, 5\]"):
            module(emb, labels, (torch.tensor([0]), torch.tensor([6]), torch.tensor([0])))
        with pytest.raises(TypeError, match="indices_tuple must be a tuple"):
            module(emb, labels, (torch.tensor([0]), torch.tensor([1])))
        with pytest.raises(ValueError, match="must have len"):
            module(emb, labels, (torch.tensor([0]), torch.tensor([1, 1]), torch.tensor([0]), torch.tensor([2])))


def test_bad_hyper_parameters() -> None:
    for cls, kw, msg in [
        (L.NTXentLoss, {"temperature": 0.0}, "temperature must be a number in"),
        (L.SupConLoss, {"temperature": -1.0}, "temperature must be a number in"),
        (L.TripletMarginLoss, {"margin": -0.1}, "margin must be a number in"),
        (L.ContrastiveLoss, {"neg_margin": -1.0}, "neg_margin must be a number in"),
        (L.MultiSimilarityLoss, {"alpha": 0.0}, "alpha must be a number in"),
        (L.MultiSimilarityLoss, {"beta": float("nan")}, "beta must be a number in"),
        (L.MultiSimilarityLoss, {"distance": "manhattan"}, "distance must be one of"),
    ]:
        with pytest.raises(ValueError, match=msg):
            cls(**kw)
    with pytest.raises(ValueError, match="scale must be a number in"):
        L.AdditiveAngularMarginLoss(3, 4, scale=0.0)
    with pytest.raises(ValueError, match="margin must be a number in"):
        L.AdditiveAngularMarginLoss(3, 4, margin=4.0)
    L.ContrastiveLoss(pos_margin=1.0, neg_margin=-0.5, distance="cosine")  # meaningful for a similarity


def test_mismatched_devices() -> None:
    meta = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="labels must be on the same device as embeddings"):
        F.multi_similarity_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="ref_emb must be on the same device as embeddings"):
        F.contrastive_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), None, meta, torch.zeros(4).long())
    with pytest.raises(ValueError, match="proxies must be on the same device as embeddings"):
        F.proxy_anchor_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), meta)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_inputs_not_modified(name: str) -> None:
    emb, labels = batch(dtype=torch.float16)
    ref, ref_labels = torch.randn(5, 4, dtype=torch.float16), torch.tensor([0, 1, 2, 0, 1])
    idx = MultiSimilarityMiner(0.3)(emb, labels, *((ref, ref_labels) if name in PAIR_LOSSES else ()))
    saved = [t.clone() for t in (emb, labels, ref, ref_labels, *idx)]
    module = make(name, 4)
    params = [p.detach().clone() for p in module.parameters()]
    if name in CLASS_LOSSES:
        module(emb, labels, idx)
    else:
        module(emb, labels, idx, ref, ref_labels)
    for a, b in zip(saved, (emb, labels, ref, ref_labels, *idx), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(params, module.parameters(), strict=True):
        assert torch.equal(a, b)
        assert b.dtype == torch.float32


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_runs_on_device_and_matches_cpu(name: str, device: torch.device) -> None:
    emb, labels = batch(dtype=torch.float32)
    module = make(name, 4)
    expected = module(emb, labels)
    module = module.to(device)
    e = emb.to(device).requires_grad_(True)
    got = module(e, labels.to(device))
    got.backward()
    assert got.device == device
    assert torch.isfinite(e.grad).all()
    assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            assert torch.isfinite(module(e, labels.to(device)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["multi_similarity", "proxy_anchor"])
def test_torch_compile_forward_and_backward(name: str) -> None:
    # aot_eager traces forward and backward through AOTAutograd; Proxy-Anchor breaks the graph once at the
    # label-range check (it reads labels.max()).
    emb, labels = batch(dtype=torch.float32)
    module = make(name, 4)
    e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    compiled = torch.compile(module, backend="aot_eager")
    got, expected = compiled(e1, labels), module(e2, labels)
    assert_close(got, expected)
    got.backward()
    expected.backward()
    assert_close(e1.grad, e2.grad)


# ---------------------------------------------------------------------------------- the shared contract table
# Every loss runs through tests/contract.py like every other public object: smoke, bad input (delegated to
# tests/test_bad_input.py), slow reference, gradcheck, module == functional, dtype, device, unchanged, pickle.

LOSS_CLASSES = {
    "multi_similarity": "MultiSimilarityLoss",
    "contrastive": "ContrastiveLoss",
    "triplet": "TripletMarginLoss",
    "ntxent": "NTXentLoss",
    "supcon": "SupConLoss",
    "proxy_anchor": "ProxyAnchorLoss",
    "arcface": "AdditiveAngularMarginLoss",
}
LOSS_FUNCTIONS = {
    "multi_similarity": "multi_similarity_loss",
    "contrastive": "contrastive_loss",
    "triplet": "triplet_margin_loss",
    "ntxent": "ntxent_loss",
    "supcon": "supcon_loss",
    "proxy_anchor": "proxy_anchor_loss",
    "arcface": "arcface_loss",
}


def contract_batch(dtype: torch.dtype) -> Call:
    emb = torch.randn(8, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    return call(emb, torch.tensor([0, 1, 2, 0, 1, 2, 0, 3]))


def contract_module(name: str) -> Callable[[torch.dtype], torch.nn.Module]:
    def build(dtype: torch.dtype) -> torch.nn.Module:
        torch.manual_seed(0)  # class weights drawn in float64 and rounded: the same loss in every dtype
        return make(name, 4, torch.float64).to(dtype)

    return build


def contract_functional_inputs(name: str) -> Callable[[torch.dtype], Call]:
    def inputs(dtype: torch.dtype) -> Call:
        c = contract_batch(dtype)
        module: Any = contract_module(name)(dtype)
        if name == "proxy_anchor":
            return call(*c.args, module.proxies.detach().clone(), margin=module.margin, alpha=module.alpha)
        if name == "arcface":
            return call(*c.args, module.weight.detach().clone(), margin=module.margin, scale=module.scale)
        hyper = {
            "multi_similarity": {"alpha": 2.0, "beta": 10.0, "base": 0.5},
            "contrastive": {"pos_margin": 0.2, "neg_margin": 1.2},
            "triplet": {"margin": 0.2},
            "ntxent": {"temperature": 0.5},
            "supcon": {"temperature": 0.5},
        }[name]
        ref = torch.randn(5, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
        return call(*c.args, ref_emb=ref, ref_labels=torch.tensor([0, 1, 2, 0, 3]), **hyper)

    return inputs


def functional_reference(name: str) -> Callable[..., torch.Tensor]:
    def ref(emb: torch.Tensor, labels: torch.Tensor, *rest: Any, **kw: Any) -> torch.Tensor:
        if name == "proxy_anchor":
            return R.proxy_anchor_loss(emb, labels, rest[0].double(), margin=kw["margin"], alpha=kw["alpha"])
        if name == "arcface":
            return R.arcface_loss(emb, labels, rest[0].double(), margin=kw["margin"], scale=kw["scale"])
        return {
            "multi_similarity": R.ms_loss,
            "contrastive": R.contrastive_loss,
            "triplet": R.triplet_loss,
            "ntxent": R.ntxent_loss,
            "supcon": R.supcon_loss,
        }[name](emb, labels, **kw)

    return ref


def arcface_pml_reference(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The peer: PML's ArcFaceLoss with the same (transposed) weight and margin in degrees."""
    ours: Any = contract_module_arcface_pml(torch.float64)
    pml = R.import_pml()
    theirs = pml.losses.ArcFaceLoss(5, 4, margin=ours.margin, scale=ours.scale).double()
    with torch.no_grad():
        theirs.W.copy_(ours.W)
    return theirs(emb, labels)


def contract_module_arcface_pml(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return L.ArcFaceLoss(NUM_CLASSES, 4, margin=20.0, scale=4.0, dtype=torch.float64).to(dtype)


def wrapped_contrastive_reference(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return R.contrastive_loss(emb, labels, pos_margin=0.0, neg_margin=1.0)


def self_supervised_reference(view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
    """The peer: PML's SelfSupervisedLoss around PML's NT-Xent (both views stacked, row i of each a pair)."""
    pml = R.import_pml()
    return pml.losses.SelfSupervisedLoss(pml.losses.NTXentLoss(temperature=0.5))(view1, view2)


def contract_entries() -> list[Entry]:
    entries = []
    for name in ALL_LOSSES:
        # the functionals: against the slow reference with a reference set (pair losses) or the class weights
        grad_slots: tuple[int | str, ...] = (0, 2) if name in CLASS_LOSSES else (0, "ref_emb")
        entries.append(
            Entry(
                f"dml_bias.losses:{LOSS_CLASSES[name]}",
                contract_batch,
                tensor(()),
                make=contract_module(name),
                reference=lambda e, y, n=name: reference(n, contract_module(n)(torch.float64), e, y),
                twin=lambda m, n=name: lambda e, y: functional_call(n, m, e, y),
                grad=(0,),
            )
        )
        entries.append(
            Entry(
                f"dml_bias.losses.functional:{LOSS_FUNCTIONS[name]}",
                contract_functional_inputs(name),
                tensor(()),
                reference=functional_reference(name),
                grad=grad_slots,
            )
        )
    entries += [
        Entry(
            "dml_bias.losses:ArcFaceLoss",
            contract_batch,
            tensor(()),
            make=contract_module_arcface_pml,
            reference=arcface_pml_reference,
            grad=(0,),
            skip={"twin": "the PML-parameterised form of AdditiveAngularMarginLoss (its twin is arcface_loss)"},
            tol=(1e-6, 1e-8),
        ),
        Entry(
            "dml_bias.losses:CrossBatchMemory",
            contract_batch,
            tensor(()),
            make=lambda dtype: L.CrossBatchMemory(L.ContrastiveLoss(), embedding_size=4, memory_size=16),
            reference=wrapped_contrastive_reference,  # an empty memory: the first batch against itself
            grad=(0,),
            skip={
                "twin": "a stateful wrapper (a queue of past batches): no functional form",
                "gradcheck": "stateful: each call enqueues the batch, so repeated calls differ by design",
            },
        ),
        Entry(
            "dml_bias.losses:SelfSupervisedLoss",
            lambda dtype: call(contract_batch(dtype).args[0], contract_batch(dtype).args[0].flip(1)),
            tensor(()),
            make=lambda dtype: L.SelfSupervisedLoss(L.NTXentLoss(temperature=0.5)),
            reference=self_supervised_reference,
            grad=(0, 1),
            skip={"twin": "a wrapper: its functional form is the wrapped loss's (the reference)"},
        ),
    ]
    return entries


ENTRIES = contract_entries()


@pytest.mark.parametrize(("entry", "check"), contract.params(ENTRIES))
def test_contract(entry: Entry, check: str) -> None:
    contract.run(entry, check)
