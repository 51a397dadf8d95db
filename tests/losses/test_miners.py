"""MultiSimilarityMiner and BatchHardMiner: slow rule, PML cross-check, empty cases, devices and dtypes."""

from __future__ import annotations

import loss_refs as R
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_bias.miners import BatchHardMiner, MultiSimilarityMiner


def as_sets(out: tuple[torch.Tensor, ...]) -> tuple[set, set]:
    a1, p, a2, n = (t.tolist() for t in out)
    return set(zip(a1, p, strict=True)), set(zip(a2, n, strict=True))


def test_hand_computed_2d() -> None:
    # Row 0: positive 1 (s=0), negatives 2 (s=.995), 3 (s=.0995). Hardest negative .995 > 0 - eps -> keep (0, 1);
    # hardest positive 0: negatives with s + 0.1 > 0 are both kept.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    pos, neg = as_sets(MultiSimilarityMiner(0.1)(emb, torch.tensor([0, 0, 1, 1])))
    assert pos == {(0, 1), (1, 0), (2, 3), (3, 2)}
    assert neg == {(0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (2, 1), (3, 0), (3, 1)}
    # With tight clusters nothing is hard: every positive is closer than every negative by more than eps.
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    pos, neg = as_sets(MultiSimilarityMiner(0.1)(emb, torch.tensor([0, 0, 1, 1])))
    assert pos == set()
    assert neg == set()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_matches_slow_rule(metric: str, with_ref: bool) -> None:
    emb = torch.randn(20, 4, dtype=torch.float64)
    labels = torch.randint(0, 4, (20,))
    ref = (torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 4, (9,))) if with_ref else (None, None)
    out = MultiSimilarityMiner(0.2, distance=metric)(emb, labels, *ref)
    assert as_sets(out) == R.ms_mined_pairs(emb, labels, *ref, epsilon=0.2, metric=metric)


@pytest.mark.parametrize("with_ref", [False, True])
def test_cross_check_pml(with_ref: bool) -> None:
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    for seed in range(3):
        torch.manual_seed(seed)
        emb = torch.randn(40, 16)
        labels = torch.randint(0, 5, (40,))
        ref = (torch.randn(25, 16), torch.randint(0, 5, (25,))) if with_ref else ()
        ours = as_sets(MultiSimilarityMiner(0.1)(emb, labels, *ref))
        theirs = as_sets(pml_miners.MultiSimilarityMiner(0.1)(emb, labels, *ref))
        assert ours == theirs
        assert len(ours[0]) > 0
        assert len(ours[1]) > 0


def test_pml_reference_counts() -> None:
    torch.manual_seed(0)
    emb = torch.randn(32, 16)
    labels = torch.randint(0, 4, (32,))
    a1, _p, a2, _n = MultiSimilarityMiner()(emb, labels)
    assert (len(a1), len(a2)) == (229, 713)  # pml_reference.txt: 230/762 pairs -> 229/713 mined


@pytest.mark.parametrize("labels", [torch.arange(6), torch.zeros(6, dtype=torch.long)], ids=["distinct", "one-class"])
def test_no_positive_or_no_negative_gives_empty(labels: torch.Tensor) -> None:
    out = MultiSimilarityMiner()(torch.randn(6, 3), labels)
    assert all(t.numel() == 0 and t.dtype == torch.long for t in out)
    out = BatchHardMiner()(torch.randn(6, 3), labels)
    assert all(t.numel() == 0 and t.dtype == torch.long for t in out)


@pytest.mark.parametrize("miner", [MultiSimilarityMiner(), BatchHardMiner()], ids=["ms", "batch-hard"])
def test_outputs_long_no_grad_on_device(miner: torch.nn.Module, device: torch.device, half_dtype) -> None:
    emb = torch.randn(10, 4, device=device, dtype=half_dtype, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4], device=device)
    out = miner(emb, labels)
    for t in out:
        assert t.dtype == torch.long
        assert t.device == emb.device
        assert not t.requires_grad


def test_batch_hard_slow_rule_and_pml() -> None:
    emb = torch.randn(24, 6, dtype=torch.float64)
    labels = torch.randint(0, 4, (24,))
    a, p, n = BatchHardMiner()(emb, labels)
    lab = labels.tolist()
    for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
        d = [float(R.measure(emb[ai], emb[j], "euclidean")) for j in range(24)]
        pos = [j for j in range(24) if j != ai and lab[j] == lab[ai]]
        neg = [j for j in range(24) if lab[j] != lab[ai]]
        assert d[pi] == max(d[j] for j in pos)
        assert d[ni] == min(d[j] for j in neg)
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    emb32 = emb.float()
    ours = BatchHardMiner()(emb32, labels)
    theirs = pml_miners.BatchHardMiner()(emb32, labels)
    for x, y in zip(ours, theirs, strict=True):
        assert torch.equal(x, y)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="epsilon must be a number in"):
        MultiSimilarityMiner(-0.1)
    with pytest.raises(ValueError, match="distance must be one of"):
        MultiSimilarityMiner(distance="manhattan")
    with pytest.raises(ValueError, match="labels must be given"):
        MultiSimilarityMiner()(torch.randn(3, 2), None)
    with pytest.raises(ValueError, match="ref_labels must be given with ref_emb"):
        MultiSimilarityMiner()(torch.randn(3, 2), torch.tensor([0, 1, 1]), torch.randn(4, 2))
    with pytest.raises(TypeError, match="labels must be a 1-D integer tensor of length 3"):
        BatchHardMiner()(torch.randn(3, 2), torch.tensor([0.0, 1.0, 1.0]))


def test_inputs_not_modified() -> None:
    emb = torch.randn(8, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    e0, l0 = emb.clone(), labels.clone()
    MultiSimilarityMiner()(emb, labels)
    BatchHardMiner()(emb, labels)
    assert torch.equal(emb, e0)
    assert torch.equal(labels, l0)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 10),
    num_classes=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    epsilon=st.floats(0.0, 0.5),
)
def test_property_ms_miner_equals_slow_rule(n: int, num_classes: int, seed: int, epsilon: float) -> None:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    out = MultiSimilarityMiner(epsilon)(emb, labels)
    assert as_sets(out) == R.ms_mined_pairs(emb, labels, epsilon=epsilon)
    # Mined pairs really are positive / negative pairs.
    a1, p, a2, neg = out
    assert bool((labels[a1] == labels[p]).all())
    assert bool((a1 != p).all())
    assert bool((labels[a2] != labels[neg]).all())
