r"""A built-in attribute-compatibility task: pairs of items labelled by a logical function of attribute matches.

Similarity in a compatibility task depends on *which* attributes two items share: "compatible if they have the
same colour **or** the same shape". Such a relation is not transitive (a red box goes with a red ellipse and a
red ellipse with a blue ellipse, but the red box does not go with the blue ellipse), which is the setting PAN's
conditional similarity :cite:`mishra2021pan` is meant for (:class:`dml_bias.heads.ConditionalSimilarity`).

:class:`AttributeCompatibility` builds that task from the objects of
:class:`~dml_bias.datasets.SyntheticBackgrounds` (no download): the items of the ``"train"`` and ``"test"``
splits are different images of disjoint attribute combinations, so test items are unseen. A pair is labelled by
a rule (:data:`RULES`) over the matches of chosen attributes (:func:`compatibility_labels`), optionally with a
fixed share of flipped labels. :func:`attribute_match_gate` is the gate that supervises PAN's conditions with the
per-attribute matches the labels are built from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from dml_bias._checks import check_choice, check_number, check_shape, check_tensor, describe
from dml_bias.datasets.synthetic import OBJECT_ATTRIBUTES, SyntheticBackgrounds

__all__ = ["RULES", "AttributeCompatibility", "CompatibilityPairs", "attribute_match_gate", "compatibility_labels"]

#: The rules of :func:`compatibility_labels`, applied to the per-attribute matches of a pair.
RULES: tuple[str, ...] = ("or", "and", "xnor", "xor")

#: Widths of the one-hot groups of :attr:`SyntheticBackgrounds.class_attributes`, in :data:`OBJECT_ATTRIBUTES` order.
_GROUP_SIZES: tuple[int, ...] = tuple(len(values) for values in OBJECT_ATTRIBUTES.values())

#: Candidate pairs drawn per round by :meth:`AttributeCompatibility.pairs`, and the most rounds before it gives up.
_MIN_ROUND = 4096
_MAX_ROUNDS = 64


def _check_integer_tensor(x: object, name: str) -> torch.Tensor:
    tensor = check_tensor(x, name)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {describe(tensor)}")
    return tensor


def compatibility_labels(values1: torch.Tensor, values2: torch.Tensor, rule: str = "or") -> torch.Tensor:
    r"""Pair labels from the attribute values of the two items: a rule over the per-attribute matches.

    With :math:`m_g = [v_{1g} = v_{2g}]` the match of attribute :math:`g` (of :math:`G`):

    ==========  ==================================================  ======================================
    ``rule``    label                                               with two attributes (colour, shape)
    ==========  ==================================================  ======================================
    ``"or"``    :math:`\bigvee_g m_g` (some attribute matches)      same colour or same shape
    ``"and"``   :math:`\bigwedge_g m_g` (all match)                 same colour and same shape
    ``"xnor"``  :math:`\sum_g m_g` even                             both match or neither does
    ``"xor"``   :math:`\sum_g m_g` odd                              exactly one matches
    ==========  ==================================================  ======================================

    Args:
        values1: ``(N, G)`` integer tensor, the categorical values of :math:`G \ge 1` attributes of the first items.
        values2: ``(N, G)`` integer tensor, the same attributes of the second items.
        rule: One of :data:`RULES`.

    Returns:
        ``(N,)`` bool tensor, True for a compatible pair.

    Raises:
        TypeError: Non-tensor or non-integer values.
        ValueError: Shapes that differ or are not ``(N, G)`` with ``G >= 1``, or an unknown rule.

    Example:
        >>> import torch
        >>> from dml_bias.datasets import compatibility_labels
        >>> colour_shape = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])  # four items
        >>> first, second = torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 2, 3])
        >>> compatibility_labels(colour_shape[first], colour_shape[second], "or").tolist()
        [True, True, True, False]
        >>> compatibility_labels(colour_shape[first], colour_shape[second], "xnor").tolist()
        [True, False, False, True]
    """
    check_choice(rule, "rule", RULES)
    _check_integer_tensor(values1, "values1")
    _check_integer_tensor(values2, "values2")
    sizes = check_shape(values1, "values1", ("N", "G"))
    check_shape(values2, "values2", ("N", "G"), sizes, sources={"N": "values1.shape[0]", "G": "values1.shape[1]"})
    if sizes["G"] < 1:
        raise ValueError(f"values1 must hold at least one attribute per item, got {describe(values1)}")
    matches = values1 == values2.to(values1.device)
    if rule == "or":
        return matches.any(dim=1)
    if rule == "and":
        return matches.all(dim=1)
    parity = matches.sum(dim=1) % 2
    return parity == 0 if rule == "xnor" else parity == 1


def attribute_match_gate(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """The matching gate: per-attribute matches of two items from their one-hot attribute rows.

    The rows are those of :attr:`SyntheticBackgrounds.class_attributes` (20 columns, one group per attribute of
    :data:`OBJECT_ATTRIBUTES`); two items match on an attribute when their whole group agrees. Pass it as the
    ``gate`` of :class:`dml_bias.heads.PANLoss` to supervise five conditions with "same shape", "same colour",
    "same pattern", "same mark" and "same secondary colour" (PAN's built-in gates act on single columns: ``"xnor"``
    on the column "colour=red" is also true for a blue and a green item).

    Args:
        a1: ``(N, 20)`` binary attributes of the first items (bool, or integers/floats holding 0 and 1).
        a2: ``(N, 20)`` binary attributes of the second items.

    Returns:
        ``(N, 5)`` bool tensor, the matches in :data:`OBJECT_ATTRIBUTES` order.

    Raises:
        TypeError: Non-tensor inputs.
        ValueError: Shapes other than ``(N, 20)`` or that differ.

    Example:
        >>> import torch
        >>> from dml_bias.datasets import AttributeCompatibility, attribute_match_gate
        >>> from dml_bias.heads import attribute_gate
        >>> task = AttributeCompatibility("train", num_classes=4, images_per_class=1, image_size=8)
        >>> attribute_match_gate(task.attributes[[0, 1]], task.attributes[[0, 2]]).shape
        torch.Size([2, 5])
        >>> bool((attribute_match_gate(task.attributes, task.attributes)).all())
        True
        >>> attribute_gate(task.attributes[[0]], task.attributes[[1]], attribute_match_gate).shape  # for PANLoss
        torch.Size([1, 5])
    """
    width = sum(_GROUP_SIZES)
    check_tensor(a1, "a1")
    check_tensor(a2, "a2")
    sizes = check_shape(a1, "a1", ("N", width))
    check_shape(a2, "a2", ("N", width), sizes, sources={"N": "a1.shape[0]"})
    agree = (a1 != 0) == (a2 != 0).to(a1.device)
    return torch.stack([group.all(dim=1) for group in agree.split(_GROUP_SIZES, dim=1)], dim=1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser on uint64 arrays (wrapping arithmetic): a fixed, well-mixed hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _pair_uniform(first: torch.Tensor, second: torch.Tensor, seed: int) -> torch.Tensor:
    """A uniform number in ``[0, 1)`` per unordered pair ``{first, second}``, fixed by ``seed``."""
    a = first.detach().cpu().numpy().astype(np.uint64)
    b = second.detach().cpu().numpy().astype(np.uint64)
    low, high = np.minimum(a, b), np.maximum(a, b)
    key = _splitmix64(np.array([seed], dtype=np.uint64))
    hashed = _splitmix64((low << np.uint64(32)) ^ high ^ key)
    return torch.from_numpy((hashed >> np.uint64(11)).astype(np.float64) * 2.0**-53)


class CompatibilityPairs(NamedTuple):
    """Item pairs returned by :meth:`AttributeCompatibility.pairs`.

    Attributes:
        first: ``(P,)`` int64 index of the first item of every pair.
        second: ``(P,)`` int64 index of the second item.
        target: ``(P,)`` float32 label a model is trained on (1 = compatible), with the task's label noise.
        clean: ``(P,)`` float32 true label (equal to ``target`` where the pair's label is not flipped).

    Example:
        >>> from dml_bias.datasets import AttributeCompatibility
        >>> task = AttributeCompatibility("train", num_classes=6, images_per_class=4, image_size=8)
        >>> pairs = task.pairs(10, generator=torch.Generator().manual_seed(0))
        >>> pairs.first.shape, int(pairs.target.sum())
        (torch.Size([10]), 5)
    """

    first: torch.Tensor
    second: torch.Tensor
    target: torch.Tensor
    clean: torch.Tensor


class AttributeCompatibility:
    r"""Items of :class:`SyntheticBackgrounds` and pair labels from a logical rule over attribute matches.

    Every item is an image of an object with five categorical attributes (:data:`OBJECT_ATTRIBUTES`: shape,
    colour, pattern, mark, secondary colour). Two items are *compatible* when ``rule`` holds for the matches of
    ``attributes`` (:func:`compatibility_labels`); the default, "same colour or same shape", is not transitive, so
    no threshold on a single distance is forced by the labels alone. With ``noise > 0`` the label of every
    unordered pair is flipped with probability ``noise``, by a hash of the pair and ``seed``: a pair keeps its
    (possibly flipped) label wherever and however often it is drawn, as a mislabelled example in a data set would.

    The items are :class:`SyntheticBackgrounds` images of split ``split``: a ``"train"`` and a ``"test"`` task
    with the same ``num_classes`` hold disjoint attribute combinations (as in :class:`SyntheticBackgrounds`, the
    test split takes the ``num_classes`` combinations after the training ones), so the test items and even their
    combinations are never seen in training, while every single attribute value appears in both. Use fewer
    ``images_per_class`` for a smaller test split, not fewer classes (that would reuse training combinations).
    With ``background="none"`` (default) the objects are drawn on black (the ``only_fg`` variant), so nothing but
    the object carries information; ``"random"`` draws each image on a random background of the pool
    (``background_correlation=0``), a harder, cluttered version.

    Everything is deterministic given the arguments: the items from ``seed`` (as in :class:`SyntheticBackgrounds`),
    the noise from ``seed`` and the pairs from the generator passed to :meth:`pairs`.

    Args:
        split: ``"train"`` or ``"test"``.
        rule: One of :data:`RULES`.
        attributes: Names of the attributes the rule reads (keys of :data:`OBJECT_ATTRIBUTES`, no repeats).
        noise: Share of flipped pair labels, in ``[0, 0.5)``.
        num_classes: Attribute combinations in the split (as :class:`SyntheticBackgrounds`).
        images_per_class: Images of every combination.
        image_size: Height and width of the images in pixels.
        background: ``"none"`` (objects on black) or ``"random"`` (random textured backgrounds).
        seed: Seed of the items and of the label noise.

    Attributes:
        items: The :class:`SyntheticBackgrounds` data set of the items (samples are dicts; see there).
        values: ``(N, 5)`` int64 tensor, the attribute values of every item (indices into the value tuples of
            :data:`OBJECT_ATTRIBUTES`, in its order).
        attributes: ``(N, 20)`` uint8 tensor, the one-hot attribute rows of every item (columns named by
            :data:`~dml_bias.datasets.ATTRIBUTE_NAMES`), the input of :func:`attribute_match_gate` and of
            :class:`dml_bias.heads.PANLoss`.
        attribute_index: ``(G,)`` int64 tensor, the columns of ``values`` the rule reads.

    Raises:
        TypeError: ``attributes`` is not a sequence of strings.
        ValueError: An unknown split, rule, attribute or background, repeated attributes, or a number out of range.

    Example:
        >>> import torch
        >>> from dml_bias.datasets import AttributeCompatibility
        >>> task = AttributeCompatibility("train", rule="or", num_classes=8, images_per_class=3, image_size=16)
        >>> len(task), task.values.shape, task.attributes.shape
        (24, torch.Size([24, 5]), torch.Size([24, 20]))
        >>> pairs = task.pairs(6, generator=torch.Generator().manual_seed(0))
        >>> same = task.values[pairs.first][:, [1, 0]] == task.values[pairs.second][:, [1, 0]]
        >>> bool((same.any(dim=1).float() == pairs.clean).all())  # same colour or same shape
        True
        >>> task.images().shape, task.images().dtype
        (torch.Size([24, 3, 16, 16]), torch.float32)
    """

    def __init__(
        self,
        split: str = "train",
        *,
        rule: str = "or",
        attributes: Sequence[str] = ("colour", "shape"),
        noise: float = 0.0,
        num_classes: int = 48,
        images_per_class: int = 20,
        image_size: int = 32,
        background: str = "none",
        seed: int = 0,
    ) -> None:
        check_choice(rule, "rule", RULES)
        if isinstance(attributes, str) or not isinstance(attributes, Sequence):
            raise TypeError(f"attributes must be a sequence of attribute names, got {type(attributes).__name__}")
        names = list(OBJECT_ATTRIBUTES)
        for name in attributes:
            check_choice(name, "attributes", names)
        if len(attributes) == 0 or len(set(attributes)) != len(attributes):
            raise ValueError(f"attributes must name at least one attribute, each once, got {list(attributes)}")
        check_number(noise, "noise", low=0.0, high=0.5, high_inclusive=False)
        check_choice(background, "background", ("none", "random"))
        self.items = SyntheticBackgrounds(
            split,
            num_classes=num_classes,
            images_per_class=images_per_class,
            image_size=image_size,
            background_correlation=0.0,
            num_backgrounds=max(2, num_classes),
            seed=seed,
        )
        if background == "none":
            self.items = self.items.with_variant("only_fg")
        self.split = split
        self.rule = rule
        self.attribute_names = tuple(attributes)
        self.noise = float(noise)
        self.background = background
        self.seed = int(seed)
        self.attributes = self.items.class_attributes[self.items.labels].clone()
        groups = self.attributes.split(_GROUP_SIZES, dim=1)
        self.values = torch.stack([group.argmax(dim=1) for group in groups], dim=1)
        self.attribute_index = torch.tensor([names.index(name) for name in attributes], dtype=torch.long)

    def __len__(self) -> int:
        """The number of items."""
        return len(self.items)

    def __repr__(self) -> str:
        """Split, rule, attributes, noise and size."""
        return (
            f"AttributeCompatibility(split={self.split!r}, rule={self.rule!r}, attributes={self.attribute_names}, "
            f"noise={self.noise}, items={len(self)}, background={self.background!r})"
        )

    def images(self) -> torch.Tensor:
        """All item images, rendered once: ``(N, 3, H, W)`` float32 in ``[0, 1]``.

        Example:
            >>> from dml_bias.datasets import AttributeCompatibility
            >>> AttributeCompatibility(num_classes=2, images_per_class=2, image_size=8).images().shape
            torch.Size([4, 3, 8, 8])
        """
        images, _ = self.items.render_all()
        return images.float() / 255.0

    def _check_indices(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_integer_tensor(first, "first")
        _check_integer_tensor(second, "second")
        sizes = check_shape(first, "first", ("P",))
        check_shape(second, "second", ("P",), sizes, sources={"P": "first.shape[0]"})
        first, second = first.detach().cpu().long(), second.detach().cpu().long()
        for name, index in (("first", first), ("second", second)):
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
                raise ValueError(
                    f"{name} must hold item indices in [0, {len(self) - 1}], got values in "
                    f"[{int(index.min())}, {int(index.max())}]"
                )
        return first, second

    def matches(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Per-attribute matches of item pairs, for the attributes of the rule.

        Args:
            first: ``(P,)`` integer indices of the first items.
            second: ``(P,)`` integer indices of the second items.

        Returns:
            ``(P, G)`` bool tensor on the CPU, column ``g`` for ``attributes[g]``.

        Raises:
            TypeError: Non-integer indices.
            ValueError: Shapes that are not ``(P,)`` or differ, or indices out of range.

        Example:
            >>> from dml_bias.datasets import AttributeCompatibility
            >>> task = AttributeCompatibility(num_classes=4, images_per_class=2, image_size=8)
            >>> task.matches(torch.tensor([0, 0]), torch.tensor([1, 2])).shape
            torch.Size([2, 2])
        """
        first, second = self._check_indices(first, second)
        columns = self.values[:, self.attribute_index]
        return columns[first] == columns[second]

    def labels(self, first: torch.Tensor, second: torch.Tensor, *, noisy: bool = True) -> torch.Tensor:
        """Compatibility labels of item pairs.

        Args:
            first: ``(P,)`` integer indices of the first items.
            second: ``(P,)`` integer indices of the second items.
            noisy: With the task's label noise (the labels a model is trained on); ``False``: the true labels.

        Returns:
            ``(P,)`` bool tensor on the CPU; symmetric in the two items.

        Raises:
            TypeError: Non-integer indices.
            ValueError: Shapes that are not ``(P,)`` or differ, or indices out of range.

        Example:
            >>> from dml_bias.datasets import AttributeCompatibility
            >>> task = AttributeCompatibility(num_classes=4, images_per_class=2, image_size=8, noise=0.3)
            >>> i, j = torch.arange(8).repeat(8), torch.arange(8).repeat_interleave(8)
            >>> bool((task.labels(i, j) == task.labels(j, i)).all())
            True
        """
        first, second = self._check_indices(first, second)
        columns = self.values[:, self.attribute_index]
        label = compatibility_labels(columns[first], columns[second], self.rule)
        if noisy and self.noise > 0:
            label = label ^ (_pair_uniform(first, second, self.seed) < self.noise)
        return label

    def match_gate(self, a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
        """The matching gate of this task: :func:`attribute_match_gate` restricted to the rule's attributes.

        Pass it as ``PANLoss(gate=task.match_gate)`` to supervise ``G`` conditions with exactly the matches the
        labels are built from.

        Args:
            a1: ``(N, 20)`` binary attributes of the first items (rows of :attr:`attributes`).
            a2: ``(N, 20)`` binary attributes of the second items.

        Returns:
            ``(N, G)`` bool tensor, column ``g`` for ``attributes[g]``.

        Example:
            >>> from dml_bias.datasets import AttributeCompatibility
            >>> task = AttributeCompatibility(num_classes=4, images_per_class=2, image_size=8)
            >>> i, j = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
            >>> bool((task.match_gate(task.attributes[i], task.attributes[j]) == task.matches(i, j)).all())
            True
        """
        return attribute_match_gate(a1, a2)[:, self.attribute_index.to(a1.device)]

    def pairs(
        self, num_pairs: int, *, positive_fraction: float = 0.5, generator: torch.Generator | None = None
    ) -> CompatibilityPairs:
        r"""Draw item pairs with a chosen share of compatible ones (by the noisy label a model sees).

        Pairs of two different items are drawn uniformly with replacement, in rounds, and the first
        ``round(positive_fraction * num_pairs)`` with ``target = 1`` and the first ones with ``target = 0`` are
        kept, in random order.

        Args:
            num_pairs: Number of pairs :math:`P \ge 1`.
            positive_fraction: Share of pairs with ``target = 1``, in ``[0, 1]``.
            generator: A CPU :class:`torch.Generator` (``None``: torch's global generator).

        Returns:
            A :class:`CompatibilityPairs` ``(first, second, target, clean)``.

        Raises:
            TypeError: ``generator`` is not a :class:`torch.Generator`.
            ValueError: An argument out of range, fewer than two items, or too few pairs of one kind (e.g. an
                ``"and"`` rule whose items share no combination).

        Example:
            >>> from dml_bias.datasets import AttributeCompatibility
            >>> task = AttributeCompatibility(num_classes=6, images_per_class=4, image_size=8, rule="xnor")
            >>> pairs = task.pairs(8, positive_fraction=0.25, generator=torch.Generator().manual_seed(1))
            >>> int(pairs.target.sum()), bool((pairs.first != pairs.second).all())
            (2, True)
        """
        check_number(num_pairs, "num_pairs", low=1, integer=True)
        check_number(positive_fraction, "positive_fraction", low=0.0, high=1.0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        n = len(self)
        if n < 2:
            raise ValueError(f"the task must hold at least 2 items to form a pair, got {n}")
        wanted = {True: round(positive_fraction * num_pairs)}
        wanted[False] = num_pairs - wanted[True]
        found: dict[bool, list[torch.Tensor]] = {True: [], False: []}
        count = {True: 0, False: 0}
        batch = max(_MIN_ROUND, 4 * num_pairs)
        for _ in range(_MAX_ROUNDS):
            first = torch.randint(n, (batch,), generator=generator)
            second = (first + 1 + torch.randint(n - 1, (batch,), generator=generator)) % n  # never first itself
            target = self.labels(first, second)
            for kind in (True, False):
                keep = torch.nonzero(target == kind).flatten()[: wanted[kind] - count[kind]]
                found[kind].append(torch.stack([first[keep], second[keep]], dim=1))
                count[kind] += keep.numel()
            if count[True] == wanted[True] and count[False] == wanted[False]:
                break
        else:
            kind = True if count[True] < wanted[True] else False
            raise ValueError(
                f"found only {count[kind]} of the {wanted[kind]} {'compatible' if kind else 'incompatible'} pairs "
                f"requested among {_MAX_ROUNDS * batch} random pairs of {self!r}; ask for fewer or change "
                "positive_fraction"
            )
        rows = torch.cat(found[True] + found[False])
        order = torch.randperm(num_pairs, generator=generator)
        rows = rows[order]
        target = torch.cat([torch.ones(wanted[True]), torch.zeros(wanted[False])])[order]
        clean = self.labels(rows[:, 0], rows[:, 1], noisy=False).float()
        return CompatibilityPairs(rows[:, 0].clone(), rows[:, 1].clone(), target, clean)
