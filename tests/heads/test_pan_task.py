"""The built-in attribute-compatibility task (dml_bias.datasets.compatibility) and a CI-sized PAN run on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_bias.datasets import (
    OBJECT_ATTRIBUTES,
    RULES,
    AttributeCompatibility,
    attribute_match_gate,
    compatibility_labels,
)
from dml_bias.heads import attribute_gate

# ------------------------------------------------------------------------------------------ truth table


# (colour match, shape match) -> label, written out by hand for every rule.
TRUTH_TABLE = {
    "or": {(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 1},
    "and": {(0, 0): 0, (0, 1): 0, (1, 0): 0, (1, 1): 1},
    "xnor": {(0, 0): 1, (0, 1): 0, (1, 0): 0, (1, 1): 1},
    "xor": {(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 0},
}


@pytest.mark.parametrize("rule", RULES)
def test_truth_table_by_hand(rule: str) -> None:
    # item 0 = (red, box); partners: (blue, ellipse) no match, (blue, box) shape only, (red, ellipse) colour only,
    # (red, box) both
    item = torch.tensor([[0, 1]])
    partners = torch.tensor([[4, 0], [4, 1], [0, 0], [0, 1]])
    got = compatibility_labels(item.expand(4, 2), partners, rule).tolist()
    expected = [TRUTH_TABLE[rule][m] for m in ((0, 0), (0, 1), (1, 0), (1, 1))]
    assert got == [bool(e) for e in expected]


def test_three_attributes_by_hand() -> None:
    a = torch.tensor([[0, 0, 0]] * 4)
    b = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0], [1, 1, 1]])  # 1, 2, 3 and 0 matches
    assert compatibility_labels(a, b, "or").tolist() == [True, True, True, False]
    assert compatibility_labels(a, b, "and").tolist() == [False, False, True, False]
    assert compatibility_labels(a, b, "xnor").tolist() == [False, True, False, True]
    assert compatibility_labels(a, b, "xor").tolist() == [True, False, True, False]


@pytest.mark.parametrize("rule", RULES)
def test_task_labels_follow_the_truth_table_on_every_pair(rule: str) -> None:
    task = AttributeCompatibility("train", rule=rule, num_classes=12, images_per_class=2, image_size=8)
    n = len(task)
    first, second = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    labels = task.labels(first, second)
    colour, shape = task.values[:, 1], task.values[:, 0]  # OBJECT_ATTRIBUTES order: shape, colour, ...
    for i, j, label in zip(first.tolist(), second.tolist(), labels.tolist(), strict=True):
        key = (int(colour[i] == colour[j]), int(shape[i] == shape[j]))
        assert label == bool(TRUTH_TABLE[rule][key]), (i, j, key)
    seen = {(int(colour[i] == colour[j]), int(shape[i] == shape[j])) for i, j in zip(first, second, strict=True)}
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}  # every row of the table occurs


def test_values_and_attributes_agree_with_the_items() -> None:
    task = AttributeCompatibility("test", num_classes=5, images_per_class=3, image_size=8)
    names = list(OBJECT_ATTRIBUTES)
    for i in range(len(task)):
        class_name = task.items.class_names[int(task.items.labels[i])]
        expected = [OBJECT_ATTRIBUTES[name].index(v) for name, v in zip(names, class_name.split("/"), strict=True)]
        assert task.values[i].tolist() == expected
        assert int(task.attributes[i].sum()) == 5
    assert task.attribute_index.tolist() == [1, 0]


def test_match_gate_by_hand() -> None:
    # shape (4) | colour (6) | pattern (4) | mark (3) | secondary (3)
    def row(shape: int, colour: int, pattern: int, mark: int, secondary: int) -> list[int]:
        out = [0] * 20
        for offset, v in zip((0, 4, 10, 14, 17), (shape, colour, pattern, mark, secondary), strict=True):
            out[offset + v] = 1
        return out

    a1 = torch.tensor([row(0, 0, 0, 0, 0), row(1, 2, 3, 2, 1)])
    a2 = torch.tensor([row(0, 1, 0, 1, 0), row(1, 2, 0, 2, 2)])
    assert attribute_match_gate(a1, a2).tolist() == [[True, False, True, False, True], [True, True, False, True, False]]
    # PAN's single-column xnor is not a match: red vs blue agree on the column "colour=green"
    assert bool(attribute_gate(a1, a2, "xnor")[0, 4 + 2])
    task = AttributeCompatibility(num_classes=4, images_per_class=1, image_size=8)
    assert task.match_gate(a1, a2).tolist() == [[False, True], [True, True]]  # colour, shape
    assert attribute_gate(a1.bool(), a2.bool(), task.match_gate).tolist() == [[0.0, 1.0], [1.0, 1.0]]


# ------------------------------------------------------------------------------------------ noise, pairs


def test_noise_flips_the_requested_share_symmetrically_and_deterministically() -> None:
    clean = AttributeCompatibility(num_classes=20, images_per_class=5, image_size=8)
    noisy = AttributeCompatibility(num_classes=20, images_per_class=5, image_size=8, noise=0.2)
    n = len(clean)
    i, j = torch.triu_indices(n, n, 1)
    flipped = noisy.labels(i, j) != clean.labels(i, j)
    share = flipped.double().mean().item()
    # 4950 independent flips with p = 0.2: the share lies within 4 standard deviations (0.023) of 0.2
    assert abs(share - 0.2) < 4 * (0.2 * 0.8 / i.numel()) ** 0.5
    assert torch.equal(noisy.labels(i, j), noisy.labels(j, i))
    assert torch.equal(noisy.labels(i, j, noisy=False), clean.labels(i, j))
    again = AttributeCompatibility(num_classes=20, images_per_class=5, image_size=8, noise=0.2)
    assert torch.equal(again.labels(i, j), noisy.labels(i, j))
    other_seed = AttributeCompatibility(num_classes=20, images_per_class=5, image_size=8, noise=0.2, seed=1)
    assert not torch.equal(other_seed.labels(i, j) != other_seed.labels(i, j, noisy=False), flipped)


@settings(max_examples=20, deadline=None)
@given(
    num_pairs=st.integers(1, 60),
    fraction=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    rule=st.sampled_from(RULES),
    seed=st.integers(0, 2**31),
)
def test_pairs_property(num_pairs: int, fraction: float, rule: str, seed: int) -> None:
    task = _SMALL[rule]
    pairs = task.pairs(num_pairs, positive_fraction=fraction, generator=torch.Generator().manual_seed(seed))
    assert pairs.first.shape == pairs.second.shape == pairs.target.shape == pairs.clean.shape == (num_pairs,)
    assert int(pairs.target.sum()) == round(fraction * num_pairs)
    assert bool((pairs.first != pairs.second).all())
    assert torch.equal(pairs.target, task.labels(pairs.first, pairs.second).float())
    assert torch.equal(pairs.clean, task.labels(pairs.first, pairs.second, noisy=False).float())


_SMALL = {
    rule: AttributeCompatibility(rule=rule, num_classes=16, images_per_class=3, image_size=8, noise=0.1)
    for rule in RULES
}


def test_pairs_are_deterministic_and_differ_between_seeds() -> None:
    task = AttributeCompatibility(num_classes=10, images_per_class=4, image_size=8)
    a = task.pairs(50, generator=torch.Generator().manual_seed(3))
    b = task.pairs(50, generator=torch.Generator().manual_seed(3))
    c = task.pairs(50, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.first, c.first)


def test_the_items_are_deterministic_from_the_seed() -> None:
    a = AttributeCompatibility(num_classes=6, images_per_class=2, image_size=12)
    b = AttributeCompatibility(num_classes=6, images_per_class=2, image_size=12)
    c = AttributeCompatibility(num_classes=6, images_per_class=2, image_size=12, seed=1)
    assert torch.equal(a.images(), b.images())
    assert torch.equal(a.values, b.values)
    assert not torch.equal(a.images(), c.images())


def test_test_items_are_unseen() -> None:
    train = AttributeCompatibility("train", num_classes=40, images_per_class=3, image_size=16)
    test = AttributeCompatibility("test", num_classes=40, images_per_class=2, image_size=16)
    train_combos = {tuple(v) for v in train.values.tolist()}
    test_combos = {tuple(v) for v in test.values.tolist()}
    assert train_combos.isdisjoint(test_combos)  # not even the attribute combination was seen
    train_images = train.images().flatten(1)
    for image in test.images().flatten(1):
        assert not bool((train_images == image).all(dim=1).any())
    # but every shape and colour of the test items occurs in training
    for column in (0, 1):
        assert set(test.values[:, column].tolist()) <= set(train.values[:, column].tolist())


def test_objects_on_black_by_default_and_random_backgrounds_on_request() -> None:
    plain = AttributeCompatibility(num_classes=3, images_per_class=2, image_size=16)
    cluttered = AttributeCompatibility(num_classes=3, images_per_class=2, image_size=16, background="random")
    _, masks = plain.items.render_all()
    outside = masks.expand(-1, 3, -1, -1) == 0
    assert bool((plain.images()[outside] == 0).all())
    assert bool((cluttered.images()[outside] > 0).any())
    assert torch.equal(plain.values, cluttered.values)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rule": "nand"}, ValueError, "rule must be one of"),
        ({"attributes": "colour"}, TypeError, "attributes must be a sequence"),
        ({"attributes": ("colour", "size")}, ValueError, "attributes must be one of"),
        ({"attributes": ("colour", "colour")}, ValueError, "each once"),
        ({"attributes": ()}, ValueError, "at least one attribute"),
        ({"noise": 0.5}, ValueError, "noise must be a number"),
        ({"noise": -0.1}, ValueError, "noise must be a number"),
        ({"background": "home"}, ValueError, "background must be one of"),
        ({"split": "val"}, ValueError, "split must be one of"),
    ],
)
def test_bad_construction(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        AttributeCompatibility(**{"num_classes": 2, "images_per_class": 1, "image_size": 8, **kwargs})


def test_bad_calls() -> None:
    task = AttributeCompatibility(num_classes=2, images_per_class=2, image_size=8)
    with pytest.raises(TypeError, match="first must be an integer tensor"):
        task.labels(torch.tensor([0.0]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"second must have size P=1 \(first.shape\[0\]\)"):
        task.labels(torch.tensor([0]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"first must hold item indices in \[0, 3\]"):
        task.matches(torch.tensor([4]), torch.tensor([1]))
    with pytest.raises(ValueError, match="num_pairs must be an integer"):
        task.pairs(0)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        task.pairs(4, generator=0)  # type: ignore[arg-type]
    single = AttributeCompatibility(num_classes=1, images_per_class=1, image_size=8)
    with pytest.raises(ValueError, match="at least 2 items"):
        single.pairs(2)
    # all five attributes of one image per combination: no two items are "and"-compatible
    distinct = AttributeCompatibility(
        rule="and", attributes=tuple(OBJECT_ATTRIBUTES), num_classes=5, images_per_class=1, image_size=8
    )
    with pytest.raises(ValueError, match="found only 0 of the 1 compatible pairs"):
        distinct.pairs(2)
    with pytest.raises(TypeError, match="values1 must be an integer tensor"):
        compatibility_labels(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="values2 must have size N=2"):
        compatibility_labels(torch.zeros(2, 2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one attribute"):
        compatibility_labels(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"a1 must have size 20 in dimension 1"):
        attribute_match_gate(torch.zeros(2, 19), torch.zeros(2, 19))


def test_inputs_are_not_modified() -> None:
    task = AttributeCompatibility(num_classes=4, images_per_class=2, image_size=8, noise=0.2)
    first, second = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    keep = first.clone(), second.clone()
    task.labels(first, second)
    task.matches(first, second)
    a1, a2 = task.attributes[first], task.attributes[second]
    copies = a1.clone(), a2.clone()
    attribute_match_gate(a1, a2)
    assert torch.equal(first, keep[0])
    assert torch.equal(second, keep[1])
    assert torch.equal(a1, copies[0])
    assert torch.equal(a2, copies[1])


# ------------------------------------------------------------------------------------------ CI-sized PAN run


def _features(task: AttributeCompatibility, generator: torch.Generator) -> torch.Tensor:
    """What an encoder that knows every attribute gives: the 20 one-hot attribute columns plus noise."""
    return task.attributes.float() + 0.2 * torch.randn(len(task), 20, generator=generator)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: small tensors run thousands of times faster on a busy machine (no spinning workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_pan_with_the_matching_gate_beats_cosine_on_the_or_task() -> None:
    from dml_bias.heads import ConditionalSimilarity, PANLoss
    from dml_bias.metrics import compatibility_auc

    generator = torch.Generator().manual_seed(0)
    train = AttributeCompatibility("train", rule="or", num_classes=48, images_per_class=4, image_size=8, noise=0.05)
    test = AttributeCompatibility("test", rule="or", num_classes=48, images_per_class=2, image_size=8)
    train_features, test_features = _features(train, generator), _features(test, generator)
    pairs = train.pairs(2000, generator=generator)
    test_pairs = test.pairs(2000, generator=generator)
    truth = test_pairs.clean.long()

    # cosine counts the matches of all five attributes, three of which the labels ignore
    h1, h2 = test_features[test_pairs.first], test_features[test_pairs.second]
    cosine_auc = compatibility_auc(torch.nn.functional.cosine_similarity(h1, h2), truth)

    torch.manual_seed(0)
    head = ConditionalSimilarity(20, 2)
    loss_fn = PANLoss(lam=1.0, gate=train.match_gate)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    a1, a2 = train.attributes[pairs.first].bool(), train.attributes[pairs.second].bool()
    x1, x2 = train_features[pairs.first], train_features[pairs.second]
    for _ in range(150):  # full-batch steps, as PAN's CUB code
        loss = loss_fn(head(x1, x2), pairs.target, a1, a2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = head.eval()(h1, h2)
    pan_auc = compatibility_auc(out.score, truth)
    # the supervised conditions are "same colour" and "same shape" on unseen items
    condition_accuracy = ((out.condition_scores > 0.5) == test.matches(test_pairs.first, test_pairs.second)).float()
    match_rate = test.matches(test_pairs.first, test_pairs.second).float().mean(dim=0)
    majority = torch.maximum(match_rate, 1 - match_rate)  # always guessing the commoner answer
    assert bool((condition_accuracy.mean(dim=0) > 0.9).all())
    assert bool((condition_accuracy.mean(dim=0) > majority + 0.1).all())
    assert pan_auc > 0.95  # measured 0.978 (cosine 0.777)
    assert pan_auc > cosine_auc + 0.1, (pan_auc, cosine_auc)


def test_one_embedding_ranks_or_pairs_perfectly_but_not_xnor_pairs() -> None:
    """The guide's claim: "same colour or same shape" is monotone in the matches, so one embedding represents it."""
    from dml_bias.metrics import compatibility_auc

    task = AttributeCompatibility(num_classes=48, images_per_class=2, image_size=8)
    colour = torch.nn.functional.one_hot(task.values[:, 1], 6).float()
    shape = torch.nn.functional.one_hot(task.values[:, 0], 4).float()
    embedding = torch.cat([colour, shape], dim=1) / 2**0.5  # unit rows
    first, second = torch.triu_indices(len(task), len(task), 1)
    cosine = (embedding[first] * embedding[second]).sum(dim=1)
    matches = task.matches(first, second).float()
    torch.testing.assert_close(cosine, matches.mean(dim=1))  # (same colour + same shape) / 2
    columns = task.values[:, task.attribute_index]
    or_labels = compatibility_labels(columns[first], columns[second], "or")
    xnor_labels = compatibility_labels(columns[first], columns[second], "xnor")
    assert compatibility_auc(cosine, or_labels.long()) == 1.0
    # xnor positives are mostly "neither matches" (cosine 0), below the "one matches" negatives (cosine 0.5)
    assert compatibility_auc(cosine, xnor_labels.long()) < 0.5
