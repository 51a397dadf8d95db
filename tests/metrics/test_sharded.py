"""Tests of the sharded exact search and of the evaluator's cross-rank sync (2-process gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dml_bias.metrics.knn import knn
from dml_bias.metrics.sharded import sharded_knn, sharded_retrieval_metrics

# The data both the workers and the test rebuild (seeded): duplicated rows make ties.
DATA_SNIPPET = """
import torch

def make_data():
    g = torch.Generator().manual_seed(7)
    reference = torch.randn(31, 6, generator=g)
    reference[5] = reference[20]          # exact duplicates across shards
    reference[9] = 2.0 * reference[3]     # same direction: a cosine tie
    query = torch.randn(9, 6, generator=g)
    query[0] = reference[20]
    dataset = torch.randn(23, 6, generator=g)
    dataset[11] = dataset[2]
    labels = torch.randint(0, 5, (23,), generator=g)
    labels[4] = 9                         # a lone label
    return query, reference, dataset, labels
"""

WORKER = (
    DATA_SNIPPET
    + """
import sys
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from dml_bias.metrics.evaluator import RetrievalEvaluator
from dml_bias.metrics.sharded import sharded_knn, sharded_retrieval_metrics


def run(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    query, reference, dataset, labels = make_data()
    out = {}
    # Unequal consecutive shards (rank 0: rows 0..12, rank 1: rows 13..30), offsets derived.
    shard = reference[:13] if rank == 0 else reference[13:]
    for metric in ("cosine", "euclidean", "dot"):
        for k in (1, 5, 20, 31):
            out[("consecutive", metric, k)] = sharded_knn(query, shard, k, metric=metric)
    # Explicit offsets, the higher rows on rank 0, and self exclusion with the reference as queries.
    shard = reference[18:] if rank == 0 else reference[:18]
    offset = 18 if rank == 0 else 0
    own = torch.arange(31)
    for k in (1, 7, 30):
        out[("exclude", "cosine", k)] = sharded_knn(reference, shard, k, shard_offset=offset, exclude_indices=own)
    # One rank with an empty shard.
    shard = reference if rank == 0 else reference[:0]
    out[("empty", "cosine", 4)] = sharded_knn(query, shard, 4)

    # Label metrics: leave-one-out over a sharded dataset, and separate queries against it.
    rows = torch.arange(23)
    mine = rows[:9] if rank == 0 else rows[9:]
    out["loo"] = sharded_retrieval_metrics(
        dataset, labels, dataset[mine], labels[mine], ks=(1, 2, 8), query_indices=rows, metric="euclidean"
    )
    out["separate"] = sharded_retrieval_metrics(dataset[:6] + 0.1, labels[:6], dataset[mine], labels[mine], ks=(1, 3))
    # Full mAP and per-class values through both counting passes, an empty shard, and a clustered set whose
    # relevant items rank deep (so the error bands are re-scored), split unevenly with explicit offsets.
    retrieval_module = sys.modules["dml_bias.metrics._counting"]
    engine = sys.modules["dml_bias.metrics._exact"]
    for mode in ("float32", "half", "float64"):
        retrieval_module.COUNT_BULK = mode
        engine.FORCE_HALF = torch.bfloat16 if mode == "half" else None  # bf16 even on CPUs without native bf16
        out[f"per_class/{mode}"] = sharded_retrieval_metrics(
            dataset, labels, dataset[mine], labels[mine], ks=(1, 4), query_indices=rows, per_class=True,
            metrics=("recall@k", "map@r", "r_precision", "map"),
        )
        empty = dataset if rank == 0 else dataset[:0]
        empty_labels = labels if rank == 0 else labels[:0]
        out[f"empty_shard/{mode}"] = sharded_retrieval_metrics(
            dataset, labels, empty, empty_labels, ks=(2,), query_indices=rows, per_class=True, metrics=("map", "mrr")
        )
        g = torch.Generator().manual_seed(11)
        big_labels = torch.arange(240) % 24
        big = torch.randn(24, 16, generator=g)[big_labels] + 2.0 * torch.randn(240, 16, generator=g)
        big[7] = big[100]
        part = slice(150, 240) if rank == 0 else slice(0, 150)
        out[f"clustered/{mode}"] = sharded_retrieval_metrics(
            big, big_labels, big[part], big_labels[part], ks=(1, 8), shard_offset=part.start,
            query_indices=torch.arange(240), per_class=True, chunk_size=50,
            metrics=("recall@k", "precision@k", "map@r", "r_precision", "map", "mrr"),
        )
    retrieval_module.COUNT_BULK = None
    engine.FORCE_HALF = None

    # Evaluator: a shuffled DistributedSampler pads 23 samples to 24 with a repeat.
    sampler = DistributedSampler(range(23), num_replicas=2, rank=rank, shuffle=True, seed=3)
    order = torch.tensor(list(sampler))
    evaluator = RetrievalEvaluator(ks=(1, 2, 4), per_class=True)
    plain = RetrievalEvaluator(ks=(1, 2, 4))
    for batch in order.split(5):
        evaluator.update(dataset[batch], labels[batch], batch)
        plain.update(dataset[batch], labels[batch])
    out["evaluator"] = evaluator.compute()
    out["gathered"] = evaluator.gathered()
    out["plain_count"] = plain.gathered()[0].shape[0]
    # Unequal sizes, one rank holding nothing.
    empty_first = RetrievalEvaluator(ks=(1,))
    if rank == 1:
        empty_first.update(dataset, labels, torch.arange(23))
    out["empty_first"] = empty_first.compute()
    # Separate queries (rows 0..7) and gallery (rows 8..22), each padded by its own sampler.
    inshop = RetrievalEvaluator(ks=(1, 2), separate_reference=True)
    for rows, is_gallery in ((torch.arange(8), False), (torch.arange(8, 23), True)):
        mine = rows[torch.tensor(list(DistributedSampler(rows, num_replicas=2, rank=rank, shuffle=False)))]
        inshop.update(dataset[mine], labels[mine], mine, reference=is_gallery)
    out["inshop"] = inshop.compute()
    # Re-identification: camera ids travel with the samples (rank 0 holds no gallery).
    cams = torch.arange(23) % 3
    reid = RetrievalEvaluator(ks=(1, 2), separate_reference=True, metrics=("recall@k", "map"))
    queries = torch.arange(8)
    mine = queries[torch.tensor(list(DistributedSampler(queries, num_replicas=2, rank=rank, shuffle=False)))]
    reid.update(dataset[mine], labels[mine], mine, groups=cams[mine])
    if rank == 1:  # the whole gallery
        gallery = torch.arange(8, 23)
        reid.update(dataset[gallery], labels[gallery], gallery, reference=True, groups=cams[gallery])
    out["reid"] = reid.compute()
    # Sharded metrics with the re-identification rule (cameras), self excluded, every key.
    part = slice(0, 10) if rank == 0 else slice(10, 23)
    out["sharded_reid"] = sharded_retrieval_metrics(
        dataset, labels, dataset[part], labels[part], ks=(1, 2), shard_offset=part.start,
        query_indices=torch.arange(23), query_groups=cams, reference_shard_groups=cams[part],
        metrics=("recall@k", "precision@k", "map@r", "r_precision", "map", "mrr"),
    )  # fmt: skip
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
"""
)


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    namespace: dict = {}
    exec(DATA_SNIPPET, namespace)
    return namespace["make_data"]()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("gloo")
    script = out_dir / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    # Two worker processes started directly (cheaper than a launcher that imports torch once more).
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), port, str(out_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    errors = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(err[-4000:])
    assert not errors, "\n".join(errors)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(2)]


# --- two processes ---------------------------------------------------------------------------------------------


def test_sharded_knn_equals_single_process_knn(gloo_results: list[dict]) -> None:
    query, reference, _, _ = make_data()
    checked = 0
    for key, value in gloo_results[0].items():
        if not isinstance(key, tuple):
            continue
        scores, indices = value
        layout, metric, k = key
        if layout == "exclude":
            expected_scores, expected_indices = knn(reference, None, k, metric=metric)
        else:
            expected_scores, expected_indices = knn(query, reference, k, metric=metric)
        torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0, msg=f"indices differ for {key}")
        torch.testing.assert_close(scores, expected_scores, rtol=0, atol=0, msg=f"scores differ for {key}")
        other_scores, other_indices = gloo_results[1][key]
        assert torch.equal(other_indices, indices)
        assert torch.equal(other_scores, scores)
        checked += 1
    assert checked == 3 * 4 + 3 + 1


def test_evaluator_sync_removes_sampler_padding(gloo_results: list[dict]) -> None:
    from dml_bias.metrics.retrieval import retrieval_metrics

    _, _, dataset, labels = make_data()
    expected = retrieval_metrics(dataset, labels, ks=(1, 2, 4), exclude_self=True, per_class=True, metric="cosine")
    for rank in range(2):
        result = gloo_results[rank]
        assert result["evaluator"] == expected
        embeddings, gathered_labels, indices = result["gathered"]
        assert torch.equal(indices, torch.arange(23))
        assert torch.equal(embeddings, dataset)
        assert torch.equal(gathered_labels, labels)
        assert result["plain_count"] == 24  # without indices the padded repeat stays
        assert result["empty_first"] == retrieval_metrics(dataset, labels, ks=(1,), exclude_self=True)
        assert result["inshop"] == retrieval_metrics(dataset[:8], labels[:8], dataset[8:], labels[8:], ks=(1, 2))
        cams = torch.arange(23) % 3
        assert result["sharded_reid"] == retrieval_metrics(
            dataset, labels, ks=(1, 2), query_groups=cams,
            metrics=("recall@k", "precision@k", "map@r", "r_precision", "map", "mrr"),
        )  # fmt: skip
        assert result["reid"] == retrieval_metrics(
            dataset[:8], labels[:8], dataset[8:], labels[8:], ks=(1, 2), metrics=("recall@k", "map"),
            query_groups=cams[:8], reference_groups=cams[8:],
        )  # fmt: skip


def test_sharded_retrieval_metrics_equal_retrieval_metrics(gloo_results: list[dict]) -> None:
    from dml_bias.metrics.retrieval import retrieval_metrics

    _, _, dataset, labels = make_data()
    loo = retrieval_metrics(dataset, labels, ks=(1, 2, 8), metric="euclidean")
    separate = retrieval_metrics(dataset[:6] + 0.1, labels[:6], dataset, labels, ks=(1, 3))
    assert loo["num_lone_queries"] >= 1  # label 9 (and possibly others) occur once
    for rank in range(2):
        for name, expected in (("loo", loo), ("separate", separate)):
            got = gloo_results[rank][name]
            assert got == expected, (rank, name)


def test_sharded_full_map_and_per_class_equal_single_process(gloo_results: list[dict]) -> None:
    from dml_bias.metrics.retrieval import retrieval_metrics

    _, _, dataset, labels = make_data()
    g = torch.Generator().manual_seed(11)
    big_labels = torch.arange(240) % 24
    big = torch.randn(24, 16, generator=g)[big_labels] + 2.0 * torch.randn(240, 16, generator=g)
    big[7] = big[100]
    expected = {
        "per_class": retrieval_metrics(
            dataset, labels, ks=(1, 4), per_class=True, metrics=("recall@k", "map@r", "r_precision", "map")
        ),
        "empty_shard": retrieval_metrics(dataset, labels, ks=(2,), per_class=True, metrics=("map", "mrr")),
        "clustered": retrieval_metrics(
            big, big_labels, ks=(1, 8), per_class=True,
            metrics=("recall@k", "precision@k", "map@r", "r_precision", "map", "mrr"),
        ),
    }  # fmt: skip
    assert 0.0 < expected["clustered"]["map"] < 0.9  # relevant items rank deep: the bands are exercised
    for rank in range(2):
        for mode in ("float32", "half", "float64"):
            for name, value in expected.items():
                assert gloo_results[rank][f"{name}/{mode}"] == value, (rank, mode, name)


# --- one process -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "squared_euclidean"])
def test_single_process_is_a_plain_search_with_offset(metric: str) -> None:
    query, reference, _, _ = make_data()
    scores, indices = sharded_knn(query, reference, 6, shard_offset=100, metric=metric)
    expected_scores, expected_indices = knn(query, reference, 6, metric=metric)
    assert torch.equal(indices, expected_indices + 100)
    assert torch.equal(scores, expected_scores)
    own = sharded_knn(reference, reference, 5, exclude_indices=torch.arange(31), metric=metric)
    expected = knn(reference, None, 5, metric=metric)
    assert torch.equal(own[1], expected[1])
    assert torch.equal(own[0], expected[0])


def test_bad_input_names_the_argument() -> None:
    query, reference, _, _ = make_data()
    with pytest.raises(ValueError, match="k must be at most N = 31"):
        sharded_knn(query, reference, 32)
    with pytest.raises(ValueError, match="k must be at most N - 1 = 30"):
        sharded_knn(reference, reference, 31, exclude_indices=torch.arange(31))
    with pytest.raises(ValueError, match="reference_shard must have size D=6"):
        sharded_knn(query, reference[:, :3], 2)
    with pytest.raises(TypeError, match="reference_shard must have the dtype of query"):
        sharded_knn(query, reference.double(), 2)
    with pytest.raises(ValueError, match="exclude_indices must have size Q=9"):
        sharded_knn(query, reference, 2, exclude_indices=torch.arange(4))
    with pytest.raises(ValueError, match="shard_offset must be an integer in"):
        sharded_knn(query, reference, 2, shard_offset=-1)
    with pytest.raises(ValueError, match="metric must be one of"):
        sharded_knn(query, reference, 2, metric="hamming")
    with pytest.raises(ValueError, match="query must be finite"):
        sharded_knn(torch.full((1, 6), float("nan")), reference, 2)


def test_retrieval_metrics_single_process_and_bad_input() -> None:
    from dml_bias.metrics.retrieval import retrieval_metrics

    _, _, dataset, labels = make_data()
    got = sharded_retrieval_metrics(dataset, labels, dataset, labels, ks=(1, 4), query_indices=torch.arange(23))
    expected = retrieval_metrics(dataset, labels, ks=(1, 4))
    assert got == expected
    assert "map" not in got  # asked for only
    keys = ("recall@k", "precision@k", "map@r", "r_precision", "map", "mrr")
    got = sharded_retrieval_metrics(
        dataset, labels, dataset, labels, ks=(1, 4), query_indices=torch.arange(23), metrics=keys, per_class=True
    )
    assert got == retrieval_metrics(dataset, labels, ks=(1, 4), metrics=keys, per_class=True)
    with pytest.raises(ValueError, match="query_labels must share a label"):  # every query lone: as retrieval_metrics
        sharded_retrieval_metrics(dataset, torch.arange(23), dataset, torch.arange(23), query_indices=torch.arange(23))
    with pytest.raises(ValueError, match="query_indices must be global reference indices below 23"):
        sharded_retrieval_metrics(dataset, labels, dataset, labels, query_indices=torch.arange(23) + 1)
    with pytest.raises(ValueError, match="chunk_size must be"):
        sharded_retrieval_metrics(dataset, labels, dataset, labels, chunk_size=0)
    with pytest.raises(TypeError, match="per_class must be a bool"):
        sharded_retrieval_metrics(dataset, labels, dataset, labels, per_class=1)
    with pytest.raises(ValueError, match="reference_shard_labels must be a 1-D integer tensor of length 23"):
        sharded_retrieval_metrics(dataset, labels, dataset, labels[:5])
    with pytest.raises(ValueError, match="ks must be at most N - 1 = 22"):
        sharded_retrieval_metrics(dataset, labels, dataset, labels, ks=(23,), query_indices=torch.arange(23))
    with pytest.raises(ValueError, match="query_indices must have size Q=23"):
        sharded_retrieval_metrics(dataset, labels, dataset, labels, query_indices=torch.arange(3))
    with pytest.raises(TypeError, match="query_labels must be a 1-D integer tensor"):
        sharded_retrieval_metrics(dataset, labels.float(), dataset, labels)


@pytest.mark.parametrize("with_indices", [False, True])
@pytest.mark.parametrize("keys", [("recall@k", "map@r", "r_precision"), ("recall@k", "precision@k", "map", "mrr")])
def test_single_process_groups_equal_retrieval_metrics(with_indices: bool, keys: tuple[str, ...]) -> None:
    """The re-identification rule on one shard equals retrieval_metrics with the same groups (ties, junk, lone)."""
    from dml_bias.metrics.retrieval import retrieval_metrics

    _, _, dataset, labels = make_data()
    cams = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 2])
    if with_indices:
        got = sharded_retrieval_metrics(
            dataset, labels, dataset, labels, ks=(1, 3), metrics=keys, query_indices=torch.arange(23),
            query_groups=cams, reference_shard_groups=cams, per_class=True,
        )  # fmt: skip
        want = retrieval_metrics(dataset, labels, ks=(1, 3), metrics=keys, query_groups=cams, per_class=True)
    else:
        query, qcams = dataset[:8] + 0.01, cams[:8]
        got = sharded_retrieval_metrics(
            query, labels[:8], dataset, labels, ks=(1, 3), metrics=keys, query_groups=qcams,
            reference_shard_groups=cams, per_class=True,
        )  # fmt: skip
        want = retrieval_metrics(
            query, labels[:8], dataset, labels, ks=(1, 3), metrics=keys, query_groups=qcams,
            reference_groups=cams, per_class=True,
        )  # fmt: skip
    assert got == want
    plain = sharded_retrieval_metrics(dataset, labels, dataset, labels, ks=(1, 3), metrics=keys,
                                      query_indices=torch.arange(23))  # fmt: skip
    assert plain["num_queries"] != want["num_queries"] or plain != want  # the rule changes the result


def test_groups_bad_input() -> None:
    _, _, dataset, labels = make_data()
    cams = torch.zeros(23, dtype=torch.long)
    with pytest.raises(ValueError, match="reference_shard_groups must be given with the other groups argument"):
        sharded_retrieval_metrics(dataset, labels, dataset, labels, query_groups=cams)
    with pytest.raises(ValueError, match="query_groups must be given with the other groups argument"):
        sharded_retrieval_metrics(dataset, labels, dataset, labels, reference_shard_groups=cams)
    with pytest.raises(ValueError, match=r"reference_shard_groups must be a 1-D integer tensor of length 23"):
        sharded_retrieval_metrics(dataset, labels, dataset, labels, query_groups=cams, reference_shard_groups=cams[:5])
    with pytest.raises(TypeError, match="query_groups"):
        sharded_retrieval_metrics(dataset, labels, dataset, labels, query_groups=cams.float(),
                                  reference_shard_groups=cams)  # fmt: skip
