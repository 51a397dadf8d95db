"""Tests of MPerClassBatchSampler: batch composition, determinism, epochs, DDP ranks, replacement, coverage."""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_bias.datasets import MPerClassBatchSampler


def _labels(counts: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_composition(batch: list[int], labels: torch.Tensor, m: int, batch_size: int) -> None:
    assert len(batch) == batch_size
    counts = collections.Counter(labels[batch].tolist())
    assert len(counts) == batch_size // m, counts
    assert set(counts.values()) == {m}, counts


def test_every_batch_has_k_classes_times_m_samples() -> None:
    labels = _labels([7, 3, 12, 5, 9, 2, 8, 6])
    sampler = MPerClassBatchSampler(labels, 3, 12, generator=_gen())
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        _check_composition(batch, labels, 3, 12)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), min_size=2, max_size=12),
    m=st.integers(1, 4),
    k=st.integers(1, 4),
    drop_last=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_composition_property(counts: list[int], m: int, k: int, drop_last: bool, seed: int) -> None:
    labels = _labels(counts)
    if len(counts) < k:
        with pytest.raises(ValueError, match="distinct classes"):
            MPerClassBatchSampler(labels, m, m * k, generator=_gen(seed), drop_last=drop_last)
        return
    sampler = MPerClassBatchSampler(labels, m, m * k, generator=_gen(seed), drop_last=drop_last)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    chunks = sum(max(1, -(-c // m)) for c in counts)
    most = max(-(-c // m) for c in counts)
    assert len(sampler) == (chunks // k if drop_last else max(-(-chunks // k), most))
    for batch in batches:
        _check_composition(batch, labels, m, m * k)
        # an index repeats within a batch only for a class with fewer than m samples
        for index, times in collections.Counter(batch).items():
            if times > 1:
                assert counts[int(labels[index])] < m
    if not drop_last:  # every sample is visited
        assert set().union(*map(set, batches)) == set(range(len(labels)))


def test_replacement_only_for_small_classes() -> None:
    labels = _labels([2, 10, 10, 10])  # class 0 is smaller than m
    sampler = MPerClassBatchSampler(labels, 4, 8, generator=_gen(3))
    saw_small = False
    for epoch in range(5):
        sampler.set_epoch(epoch)
        for batch in sampler:
            per_class = collections.defaultdict(list)
            for i in batch:
                per_class[int(labels[i])].append(i)
            for c, idx in per_class.items():
                if c == 0:
                    saw_small = True
                    assert set(idx) == {0, 1}  # both samples, plus repeats
                else:
                    assert len(set(idx)) == 4
    assert saw_small


def test_deterministic_from_generator_and_epoch() -> None:
    labels = _labels([6] * 10)
    a = MPerClassBatchSampler(labels, 2, 8, generator=_gen(5))
    b = MPerClassBatchSampler(labels, 2, 8, generator=_gen(5))
    c = MPerClassBatchSampler(labels, 2, 8, generator=_gen(6))
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating twice in one epoch repeats the order
    assert list(a) != list(c)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first


def test_ranks_get_disjoint_batches_of_equal_count() -> None:
    labels = _labels([5] * 16)  # every class exactly fills chunks of m=5 -> no repeated index at all
    per_rank = [list(MPerClassBatchSampler(labels, 5, 10, generator=_gen(2), num_replicas=3, rank=r)) for r in range(3)]
    single = list(MPerClassBatchSampler(labels, 5, 10, generator=_gen(2)))
    assert len(single) == 8
    assert [len(b) for b in per_rank] == [2, 2, 2]  # 8 batches // 3 ranks
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen))  # no index on two ranks
    # the ranks take every num_replicas-th batch of the same global order
    for r in range(3):
        assert per_rank[r] == single[r:6:3]
    padded = [len(MPerClassBatchSampler(labels, 5, 10, num_replicas=3, rank=r, drop_last=False)) for r in range(3)]
    assert padded == [3, 3, 3]


def test_coverage_over_an_epoch() -> None:
    labels = _labels([20] * 30)
    sampler = MPerClassBatchSampler(labels, 4, 32, generator=_gen(0))
    visits = torch.zeros(len(labels))
    for batch in sampler:
        visits[batch] += 1
    # 150 chunks // 8 = 18 batches use 144 of 150 chunks; no index is used twice
    assert len(sampler) == 18
    assert int(visits.max()) == 1
    assert int((visits == 1).sum()) == 18 * 32


def test_default_seed_and_distributed_default_seed() -> None:
    labels = _labels([4] * 6)
    torch.manual_seed(0)
    a = list(MPerClassBatchSampler(labels, 2, 4))
    torch.manual_seed(0)
    assert list(MPerClassBatchSampler(labels, 2, 4)) == a
    # with several replicas and no generator all ranks agree on seed 0
    assert MPerClassBatchSampler(labels, 2, 4, num_replicas=2, rank=1).seed == 0


def test_works_as_dataloader_batch_sampler() -> None:
    labels = _labels([4] * 6)
    data = torch.utils.data.TensorDataset(torch.arange(len(labels)), labels)
    sampler = MPerClassBatchSampler(labels, 2, 6, generator=_gen(1))
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    out = list(loader)
    assert len(out) == len(sampler)
    assert [x.tolist() for x, _ in out] == list(sampler)


def test_accepts_sequences_and_arbitrary_label_values() -> None:
    sampler = MPerClassBatchSampler([10, 10, -3, -3, 7, 7], 2, 4, generator=_gen(0))
    for batch in sampler:
        assert len(batch) == 4


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"m": 0, "batch_size": 4}, ValueError, "m must"),
        ({"m": 8, "batch_size": 4}, ValueError, "m must not exceed batch_size"),
        ({"m": 3, "batch_size": 8}, ValueError, "multiple of m"),
        ({"m": 2, "batch_size": 10}, ValueError, "5 distinct classes, but labels has only 4"),
        ({"m": 2.0, "batch_size": 4}, TypeError, "m must"),
        ({"m": 2, "batch_size": 4, "rank": 2, "num_replicas": 2}, ValueError, "rank"),
        ({"m": 2, "batch_size": 4, "num_replicas": 0}, ValueError, "num_replicas"),
        ({"m": 2, "batch_size": 4, "num_replicas": 9, "rank": 0}, ValueError, "fewer than num_replicas"),
        ({"m": 2, "batch_size": 4, "generator": 3}, TypeError, "generator"),
        ({"m": 2, "batch_size": 4, "drop_last": 1}, TypeError, "drop_last"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        MPerClassBatchSampler(_labels([2, 2, 2, 2]), **kwargs)


@pytest.mark.parametrize(
    ("labels", "error"),
    [(torch.zeros(8), TypeError), (torch.zeros(4, 2, dtype=torch.long), ValueError), ("abc", TypeError)],
)
def test_bad_labels(labels: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="labels"):
        MPerClassBatchSampler(labels, 2, 4)


def test_set_epoch_rejects_negative() -> None:
    sampler = MPerClassBatchSampler(_labels([2, 2]), 2, 4)
    with pytest.raises(ValueError, match="epoch"):
        sampler.set_epoch(-1)


def test_consecutive_batches_cycle_through_classes() -> None:
    # balanced classes: the first ceil(30 / 8) = 3 batches never repeat a class (largest-first scheduling)
    labels = _labels([20] * 30)
    for seed in range(5):
        batches = list(MPerClassBatchSampler(labels, 4, 32, generator=_gen(seed)))
        first = [c for b in batches[:3] for c in set(labels[b].tolist())]
        assert len(first) == len(set(first)) == 24


def test_iteration_does_not_consume_the_users_generator() -> None:
    g = _gen(4)
    sampler = MPerClassBatchSampler(_labels([4] * 6), 2, 4, generator=g)
    state = g.get_state()
    list(sampler)
    assert torch.equal(g.get_state(), state)


def test_rank_and_world_size_default_from_torch_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    # a real process group is too slow for the unit tests; the sampler only asks these three functions
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    labels = _labels([5] * 16)
    got = []
    for r in range(3):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda r=r: r)
        sampler = MPerClassBatchSampler(labels, 5, 10, generator=_gen(2))
        assert (sampler.rank, sampler.num_replicas) == (r, 3)
        assert list(sampler) == list(MPerClassBatchSampler(labels, 5, 10, generator=_gen(2), num_replicas=3, rank=r))
        got.append(list(sampler))
    seen = [i for batches in got for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 60
    # without a generator all ranks still agree (seed 0)
    assert MPerClassBatchSampler(labels, 5, 10).seed == 0
