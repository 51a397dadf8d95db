r"""PAN where it helps: similarity that is a logical function of attributes, and PAN's few-shot protocol.

PAN (Mishra et al., ICCV 2021) scores an image pair with K similarity conditions mixed by learned relevance
weights (:class:`dml_bias.heads.ConditionalSimilarity`); conditions can be supervised with pairwise attribute
labels built by a logical gate (:func:`dml_bias.heads.attribute_gate`, :class:`dml_bias.heads.PANLoss`).

**Part 1 — attribute compatibility** (:class:`dml_bias.datasets.AttributeCompatibility`, built in, no
download): items are synthetic objects with five attributes; two items are compatible when a rule over the
matches of two attributes holds (default ``--rule or``: same colour **or** same shape; ``xnor``: both match or
neither; ``and``: both match), with ``--noise`` of the training labels flipped. Test items are unseen images of
unseen attribute combinations. Every method trains the same encoder (the study's
:class:`dml_bias.bias.models.SmallCNN`) from the same initialisation with the same budget (``steps`` Adam steps
on batches of ``batch_size`` items, every pair of them a training pair, the same batches for every method):

* ``cosine``: one metric embedding trained with the contrastive loss on the pair labels (positive margin 0, as
  pytorch-metric-learning's default), scored by cosine similarity;
* ``cosine_margin``: the same with a positive margin (``--margin``, 0.8 by default): positives only need to be
  closer than the margin, which leaves room for "same colour" and "same shape" to be different directions;
* ``cosine_bce``: one embedding whose cosine, times a learned scale plus a learned bias, is trained with the
  logistic loss on the pair labels: the single-embedding twin of PAN's pair loss, and the one whose optimum
  includes the ideal "same colour or same shape" embedding (the contrastive margins above exclude it: in that
  embedding a pair that shares one attribute is at distance 1);
* ``pan_unsupervised``: encoder + PAN head with free conditions, pair loss only;
* ``pan_supervised``: encoder + PAN head with two conditions supervised by the *matching gate*
  (:meth:`~dml_bias.datasets.AttributeCompatibility.match_gate`: "same colour", "same shape", the matches the
  labels are built from; λ = 1) and 8 free ones (PAN's hybrid variant);
* ``pan_wrong_gate``: the same with PAN's default ``"or"`` gate on the 20 one-hot attribute columns ("one of the
  two items has value v"), which does not describe this task (20 supervised + 8 free conditions).

Two choices of the PAN rows matter, measured in ``--quick`` (1 thread, busy 2-core VM; pair AUC):

* The head reads the unit embeddings times :math:`\sqrt{D}` (``head_input_scale``): PAN's own heads read
  standardised features (per-dimension spread 1), while unit embeddings have a per-dimension spread of
  :math:`1/\sqrt{D}`, so the head's logits barely move in a short training. Unscaled: unsupervised 0.579,
  supervised 0.589; scaled: 0.680 and 0.658.
* The supervised heads keep free conditions. PAN's score is a convex combination :math:`\sum_k w_k p_k`, so it
  can only call a pair compatible when some condition does: with only "same colour" and "same shape" conditions an
  ``xnor`` pair that differs in both gets :math:`p \approx 0` (full run, ``xnor``: 0.564 with the two supervised
  conditions alone, attribute accuracy below the majority rate). A free condition can learn "differs in both".
  On ``or`` the free conditions also help (quick: 0.658 -> 0.715).

**Part 1b — the head alone, on frozen features** (PAN's own protocol: heads on frozen features): the items are
their one-hot attributes (all five) plus Gaussian noise (std ``feature_noise``), every method sees the same
``feature_pairs`` labelled pairs (256) in ``feature_steps`` full-batch steps; the single embeddings learn a linear
map followed by the cosine, the PAN heads read the features themselves. Part 1 asks whether PAN helps an encoder
learn; part 1b whether the pair head is a better similarity than one metric embedding once the features carry
the attributes. In part 1 every method ends up within the run-to-run spread of the others (the encoder does not
transfer colour and shape to unseen combinations well, whatever head trains it: about 0.9-1.0 AUC on training
pairs against 0.7 on test pairs); in part 1b the heads lead by about 0.1 AUC.

The table gives the pair ROC-AUC and accuracy on balanced test pairs (true labels) with 95 % bootstrap
intervals over the test pairs (the same resamples for every method; they do not cover the variation between
training runs), accuracy at the threshold that is best on the training pairs, and for supervised PAN the
accuracy of its condition scores (``p_k > 0.5``) against the gate's targets next to the majority baseline.

**Part 2 — PAN's few-shot protocol** (CUB-style, as in the paper; :func:`dml_bias.metrics.few_shot_accuracy`):
an encoder trained with a triplet loss on class identity, standardised frozen features, PAN heads trained on
same-class / different-class pairs, 5-way 5-shot accuracy on novel classes. There the similarity *is* class
identity, which one metric embedding represents well, and the plain cosine row is the one to beat (details in
:func:`run_fewshot`'s notes below). With ``--root`` this part runs on CUB-200-2011 (a torchvision ResNet-18
initialised from ``--weights``, a local ``state_dict``; nothing is downloaded).

Run ``python examples/pan_attributes.py`` (parts 1, 1b and 2) or ``--quick`` (parts 1 and 1b at CI size, about
22 s of CPU time on one thread, the default with ``--quick``; add ``--fewshot`` for a small part 2); ``--out DIR``
writes ``results.json`` and ``pan_compatibility.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dml_bias.bias.models import SmallCNN
from dml_bias.datasets import AttributeCompatibility, MPerClassBatchSampler, SyntheticBackgrounds
from dml_bias.heads import ConditionalSimilarity, PANLoss, attribute_gate, sample_pairs
from dml_bias.losses import TripletMarginLoss
from dml_bias.metrics import compatibility_auc, few_shot_accuracy

# ============================================================================================ part 1


@dataclass
class CompatibilityConfig:
    # task
    rule: str = "or"
    attributes: tuple[str, ...] = ("colour", "shape")
    noise: float = 0.0
    classes: int = 48  # attribute combinations per split (train and test are disjoint)
    images_per_class: int = 20
    test_images_per_class: int = 8
    image_size: int = 32
    # encoder and training (the same for every method)
    embedding_size: int = 64
    width: int = 16
    steps: int = 600
    batch_size: int = 64  # items per step; all their pairs are training pairs
    lr: float = 3e-3
    # methods
    margin: float = 0.8  # positive margin of the "cosine_margin" row
    unsupervised_conditions: int = 8
    free_conditions: int = 8  # free conditions of the supervised heads besides the supervised ones (PAN's hybrid)
    lam: float = 1.0
    head_input_scale: float = 8.0  # sqrt(embedding_size): PAN's heads read standardised features (see train_method)
    # "images": the SmallCNN on the item images; "attributes": a linear encoder on features that carry the attributes
    inputs: str = "images"
    feature_noise: float = 0.2  # standard deviation of the noise added to the one-hot attributes ("attributes")
    labelled_pairs: int | None = None  # None: all pairs of random item batches; P: P fixed labelled pairs per step
    # part 1b (frozen attribute features): labelled pairs, full-batch steps and learning rate of every method
    feature_pairs: int = 256
    feature_steps: int = 300
    feature_lr: float = 0.02
    # evaluation
    test_pairs: int = 4000
    threshold_pairs: int = 4000
    bootstrap: int = 1000
    seed: int = 0

    @classmethod
    def quick(cls) -> CompatibilityConfig:
        return cls(
            images_per_class=10,
            test_images_per_class=5,
            image_size=24,
            steps=150,
            batch_size=48,
            test_pairs=2000,
            threshold_pairs=2000,
            bootstrap=500,
        )


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    kind: str  # "embedding" or "pan"
    margin: float = 0.0
    gate: str | None = None  # None (unsupervised), "match" or a PAN gate name
    loss: str = "contrastive"  # embeddings: "contrastive" or "bce" (logistic loss on a learned scale of the cosine)


@dataclass
class MethodResult:
    method: Method
    auc: float
    auc_ci: tuple[float, float]
    accuracy: float
    accuracy_ci: tuple[float, float]
    threshold: float
    num_conditions: int | None = None
    attribute_accuracy: float | None = None
    attribute_majority: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def compatibility_methods(cfg: CompatibilityConfig) -> list[Method]:
    return [
        Method("cosine", "cosine (contrastive, m+ = 0)", "embedding", margin=0.0),
        Method("cosine_margin", f"cosine (contrastive, m+ = {cfg.margin:g})", "embedding", margin=cfg.margin),
        Method("cosine_bce", "cosine (logistic, learned scale)", "embedding", loss="bce"),
        Method("pan_unsupervised", "PAN unsupervised", "pan"),
        Method("pan_supervised", "PAN supervised, matching gate", "pan", gate="match"),
        Method("pan_wrong_gate", "PAN supervised, wrong gate (or)", "pan", gate="or"),
    ]


def _gate_of(method: Method, task: AttributeCompatibility) -> Any:
    return task.match_gate if method.gate == "match" else method.gate


def _num_conditions(method: Method, task: AttributeCompatibility, cfg: CompatibilityConfig) -> int:
    if method.gate is None:
        return cfg.unsupervised_conditions
    width = attribute_gate(task.attributes[:1], task.attributes[:1], _gate_of(method, task)).shape[1]
    return int(width) + cfg.free_conditions


class AttributeEncoder(nn.Module):
    """A linear encoder with unit-length outputs, for features that already carry the attributes."""

    def __init__(self, in_features: int, embedding_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.linear(x), dim=1)


def attribute_features(task: AttributeCompatibility, noise: float, seed: int) -> torch.Tensor:
    """The one-hot attribute rows of the items (all five attributes) plus Gaussian noise of std ``noise``."""
    generator = torch.Generator().manual_seed(seed)
    return task.attributes.float() + noise * torch.randn(task.attributes.shape, generator=generator)


def make_encoder(cfg: CompatibilityConfig, inputs: torch.Tensor, method: Method) -> nn.Module:
    """SmallCNN on images; on frozen features a linear metric (embeddings) or nothing (PAN reads the features)."""
    if cfg.inputs == "attributes":
        return nn.Identity() if method.kind == "pan" else AttributeEncoder(inputs.shape[1], cfg.embedding_size)
    return SmallCNN(3, cfg.embedding_size, cfg.width)


def head_input_scale(cfg: CompatibilityConfig) -> float:
    return cfg.head_input_scale if cfg.inputs == "images" else 1.0


def train_method(
    method: Method, task: AttributeCompatibility, images: torch.Tensor, cfg: CompatibilityConfig
) -> tuple[nn.Module, ConditionalSimilarity | None]:
    """Train the encoder (and PAN head) of one method on all pairs of random item batches.

    ``images`` are the encoder's inputs: item images, or item features with ``cfg.inputs == "attributes"``.
    """
    torch.manual_seed(cfg.seed)  # the same encoder initialisation for every method
    encoder = make_encoder(cfg, images, method)
    head: ConditionalSimilarity | None = None
    loss_fn: PANLoss | None = None
    parameters = list(encoder.parameters())
    # logistic single embedding: P(compatible) = sigmoid(scale * cosine + bias), scale and bias learned
    scale_bias = nn.Parameter(torch.tensor([10.0, -5.0]))
    if method.loss == "bce":
        parameters.append(scale_bias)
    if method.kind == "pan":
        width = images.shape[1] if cfg.inputs == "attributes" else cfg.embedding_size
        head = ConditionalSimilarity(width, _num_conditions(method, task, cfg))
        gate = _gate_of(method, task)
        loss_fn = PANLoss(lam=cfg.lam if gate is not None else 0.0, gate=gate if gate is not None else "or")
        parameters += list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed + 10)  # the same batches for every method
    batch_first, batch_second = torch.triu_indices(cfg.batch_size, cfg.batch_size, 1)
    labelled = None
    if cfg.labelled_pairs is not None:  # a fixed set of labelled pairs, every one in every step
        labelled = task.pairs(cfg.labelled_pairs, generator=torch.Generator().manual_seed(cfg.seed + 11))
    encoder.train()
    for _ in range(cfg.steps):
        if labelled is None:
            items = torch.randperm(len(task), generator=generator)[: cfg.batch_size]
            embeddings = encoder(images[items])
            first, second = batch_first, batch_second
            a, b = items[first], items[second]
            target = task.labels(a, b)
        else:
            embeddings = encoder(images)
            first, second = a, b = labelled.first, labelled.second
            target = labelled.target.bool()
        if head is None and method.loss == "bce":
            cosine = (embeddings[first] * embeddings[second]).sum(dim=1)
            loss = nn.functional.binary_cross_entropy_with_logits(
                scale_bias[0] * cosine + scale_bias[1], target.float()
            )
        elif head is None:
            distance = (embeddings[first] - embeddings[second]).norm(dim=1)  # unit embeddings
            positive, negative = distance[target], distance[~target]
            loss = torch.relu(positive - method.margin).mean() + torch.relu(1.0 - negative).mean()
        else:
            assert loss_fn is not None
            supervision = {} if method.gate is None else {"a1": task.attributes[a], "a2": task.attributes[b]}
            scaled = embeddings * head_input_scale(cfg)
            loss = loss_fn(head(scaled[first], scaled[second]), target, **supervision)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder.eval()
    return encoder, None if head is None else head.eval()


@torch.no_grad()
def pair_scores(
    encoder: nn.Module,
    head: ConditionalSimilarity | None,
    images: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    head_input_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores of item pairs (cosine or PAN score) and, for PAN, the condition scores."""
    embeddings = encoder(images)
    if head is None:
        return (embeddings[first] * embeddings[second]).sum(dim=1).double(), None
    embeddings = embeddings * head_input_scale
    out = head(embeddings[first], embeddings[second])
    return out.score.double(), out.condition_scores


def best_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold (midway between two sorted scores) with the highest accuracy of ``score > threshold``."""
    order = scores.argsort()
    s, y = scores[order], labels[order].double()
    # predicting 1 for positions >= i: correct = negatives below i + positives from i on
    negatives_below = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(1 - y, 0)])
    positives_from = y.sum() - torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(y, 0)])
    correct = negatives_below + positives_from
    distinct = torch.cat([torch.tensor([True]), s[1:] != s[:-1], torch.tensor([True])])  # cut between distinct
    i = int(torch.where(distinct, correct, -1.0).argmax())
    if i == 0:
        return float(s[0]) - 1.0
    if i == len(s):
        return float(s[-1]) + 1.0
    return float((s[i - 1] + s[i]) / 2)


def auc_rows(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ROC-AUC of every row of ``(R, P)`` scores against bool labels, ties counted one half (midranks)."""
    order = scores.argsort(dim=1)
    s, y = scores.gather(1, order), labels.gather(1, order).double()
    num = s.shape[1]
    position = torch.arange(num).expand_as(s)
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, position, 0).cummax(dim=1).values
    last = torch.where(ends, position, num - 1).flip(1).cummin(dim=1).values.flip(1)
    rank = (first + last).double() / 2 + 1
    positives = y.sum(dim=1)
    negatives = num - positives
    return ((rank * y).sum(dim=1) - positives * (positives + 1) / 2) / (positives * negatives)


def _interval(values: torch.Tensor) -> tuple[float, float]:
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype)).tolist()
    return float(low), float(high)


def attribute_accuracy(
    condition_scores: torch.Tensor,
    method: Method,
    task: AttributeCompatibility,
    test: AttributeCompatibility,
    test_first: torch.Tensor,
    test_second: torch.Tensor,
    train_first: torch.Tensor,
    train_second: torch.Tensor,
) -> tuple[float, float]:
    """Accuracy of the supervised condition scores on test pairs, and of each condition's majority label."""
    gate = _gate_of(method, task)
    target = attribute_gate(test.attributes[test_first], test.attributes[test_second], gate).bool()
    predicted = condition_scores[:, : target.shape[1]] > 0.5
    train_target = attribute_gate(task.attributes[train_first], task.attributes[train_second], gate)
    majority = train_target.mean(dim=0) > 0.5
    return float((predicted == target).double().mean()), float((target == majority).double().mean())


def run_compatibility(cfg: CompatibilityConfig) -> tuple[dict[str, Any], list[MethodResult]]:
    common: dict[str, Any] = {
        "rule": cfg.rule,
        "attributes": cfg.attributes,
        "num_classes": cfg.classes,
        "image_size": cfg.image_size,
        "seed": cfg.seed,
    }
    task = AttributeCompatibility("train", noise=cfg.noise, images_per_class=cfg.images_per_class, **common)
    test = AttributeCompatibility("test", images_per_class=cfg.test_images_per_class, **common)
    if cfg.inputs == "attributes":
        images = attribute_features(task, cfg.feature_noise, cfg.seed + 20)
        test_images = attribute_features(test, cfg.feature_noise, cfg.seed + 21)
    else:
        images, test_images = task.images(), test.images()
    test_pairs = test.pairs(cfg.test_pairs, generator=torch.Generator().manual_seed(cfg.seed + 1))
    train_pairs = task.pairs(cfg.threshold_pairs, generator=torch.Generator().manual_seed(cfg.seed + 2))
    labels = test_pairs.clean.bool()
    bootstrap = torch.Generator().manual_seed(cfg.seed + 3)  # the same resamples for every method
    resample = torch.randint(cfg.test_pairs, (cfg.bootstrap, cfg.test_pairs), generator=bootstrap)
    results = []
    for method in compatibility_methods(cfg):
        encoder, head = train_method(method, task, images, cfg)
        scores, conditions = pair_scores(
            encoder, head, test_images, test_pairs.first, test_pairs.second, head_input_scale(cfg)
        )
        train_scores, _ = pair_scores(
            encoder, head, images, train_pairs.first, train_pairs.second, head_input_scale(cfg)
        )
        threshold = best_threshold(train_scores, train_pairs.target.bool())
        correct = ((scores > threshold) == labels).double()
        auc = compatibility_auc(scores, labels.long())
        result = MethodResult(
            method,
            auc,
            _interval(auc_rows(scores[resample], labels[resample])),
            float(correct.mean()),
            _interval(correct[resample].mean(dim=1)),
            threshold,
        )
        if head is not None:
            result.num_conditions = head.num_conditions
        if conditions is not None and method.gate is not None:
            result.attribute_accuracy, result.attribute_majority = attribute_accuracy(
                conditions,
                method,
                task,
                test,
                test_pairs.first,
                test_pairs.second,
                train_pairs.first,
                train_pairs.second,
            )
        results.append(result)
    description = {
        "name": "AttributeCompatibility",
        "rule": cfg.rule,
        "attributes": list(cfg.attributes),
        "noise": cfg.noise,
        "inputs": cfg.inputs,
        "labelled_pairs": cfg.labelled_pairs,
        "train_items": len(task),
        "test_items": len(test),
        "test_pairs": cfg.test_pairs,
        "test_positive_share": float(labels.double().mean()),
    }
    return description, results


def format_compatibility_table(task: dict[str, Any], results: Sequence[MethodResult]) -> str:
    header = (
        f"{'method':<34} {'K':>3}  {'pair AUC [95% CI]':>24}  {'accuracy [95% CI]':>24}  {'attr acc [majority]':>20}"
    )
    lines = [
        f"AttributeCompatibility: rule {task['rule']!r} over {task['attributes']}, noise {task['noise']:g}; "
        f"{task['train_items']} train items, {task['test_items']} unseen test items, {task['test_pairs']} test "
        f"pairs ({task['test_positive_share']:.0%} compatible)",
        header,
        "-" * len(header),
    ]
    for r in results:
        k = "-" if r.num_conditions is None else str(r.num_conditions)
        auc = f"{r.auc:.3f} [{r.auc_ci[0]:.3f}, {r.auc_ci[1]:.3f}]"
        acc = f"{r.accuracy:.3f} [{r.accuracy_ci[0]:.3f}, {r.accuracy_ci[1]:.3f}]"
        attr = "-"
        if r.attribute_accuracy is not None:
            attr = f"{r.attribute_accuracy:.3f} [{r.attribute_majority:.3f}]"
        lines.append(f"{r.method.label:<34} {k:>3}  {auc:>24}  {acc:>24}  {attr:>20}")
    single = max((r for r in results if r.method.kind == "embedding"), key=lambda r: r.auc)
    pan = next(r for r in results if r.method.key == "pan_supervised")
    disjoint = pan.auc_ci[0] > single.auc_ci[1] or pan.auc_ci[1] < single.auc_ci[0]
    lines.append(
        f"PAN supervised (matching gate) - best single embedding ({single.method.key}): "
        f"{pan.auc - single.auc:+.3f} AUC, intervals {'disjoint' if disjoint else 'overlap'}"
    )
    return "\n".join(lines)


def results_json(task: dict[str, Any], results: Sequence[MethodResult], cfg: CompatibilityConfig) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for r in results:
        entry: dict[str, Any] = {
            "label": r.method.label,
            "auc": r.auc,
            "auc_ci": list(r.auc_ci),
            "accuracy": r.accuracy,
            "accuracy_ci": list(r.accuracy_ci),
            "threshold": r.threshold,
        }
        if r.num_conditions is not None:
            entry["num_conditions"] = r.num_conditions
        if r.attribute_accuracy is not None:
            entry["attribute_accuracy"] = r.attribute_accuracy
            entry["attribute_majority"] = r.attribute_majority
        methods[r.method.key] = entry
    return {"task": task, "methods": methods, "config": asdict(cfg)}


def save_figure(
    task: dict[str, Any],
    results: Sequence[MethodResult],
    path: Path,
    feature_results: Sequence[MethodResult] | None = None,
) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or state is touched

    panels = [("images, SmallCNN (part 1)", results)]
    if feature_results is not None:
        panels.append(("frozen attribute features, few labelled pairs (part 1b)", feature_results))
    figure = Figure(figsize=(7.0, 0.6 + 2.6 * len(panels)), layout="constrained")
    joined = f" {task['rule']} ".join(f"same {a}" for a in task["attributes"])
    figure.suptitle(f"compatible = {joined}", fontsize=10)
    for index, (title, rows) in enumerate(panels):
        ax = figure.add_subplot(len(panels), 1, index + 1)
        aucs = [r.auc for r in rows]
        errors = [[r.auc - r.auc_ci[0] for r in rows], [r.auc_ci[1] - r.auc for r in rows]]
        colours = ["#8c8c8c" if r.method.kind == "embedding" else "#1f77b4" for r in rows]
        ax.barh(range(len(rows)), aucs, xerr=errors, color=colours, capsize=3)
        ax.set_yticks(range(len(rows)), [r.method.label for r in rows])
        ax.invert_yaxis()
        ax.set_xlim(min([0.4] + [r.auc_ci[0] - 0.05 for r in rows]), 1.0)
        ax.axvline(0.5, color="k", linewidth=0.6, linestyle=":")
        ax.set_title(title, fontsize=9)
    ax.set_xlabel("pair ROC-AUC on unseen test items (95 % bootstrap CI)")
    figure.savefig(path, dpi=120)


# ============================================================================================ part 2


@dataclass
class FewShotConfig:
    # synthetic data
    train_classes: int = 48
    test_classes: int = 24
    images_per_class: int = 32
    image_size: int = 32
    background_correlation: float = 0.5
    # encoder (triplet loss, as PAN's Siamese network)
    encoder_epochs: int | None = None  # None: 12 on the synthetic data, 0 on CUB
    embedding_size: int = 64
    width: int = 16
    batch_size: int = 60
    m_per_class: int = 5
    encoder_lr: float = 1e-3
    margin: float = 0.2
    # PAN heads
    num_pairs: int = 6000
    head_steps: int = 1500  # PAN: 100 full-batch epochs over ~170k CUB pairs; at lr 1e-3 ours need more steps
    head_lr: float = 1e-3
    unsupervised_conditions: int = 20  # PAN's CUB README: 50 (unsupervised), 10 (hybrid)
    lam: float = 1.0
    lam_sweep: tuple[float, ...] = (1e-5, 1.0, 10.0)
    # protocol
    n_way: int = 5
    k_shot: int = 5
    n_query: int = 16
    episodes: int = 600
    seed: int = 0
    device: str = "cpu"
    # CUB (with --root)
    root: str | None = None
    weights: str | None = None
    cub_image_size: int = 224
    num_workers: int = 4

    @classmethod
    def quick(cls) -> FewShotConfig:
        return cls(
            train_classes=24,
            test_classes=8,
            images_per_class=22,
            image_size=24,
            encoder_epochs=4,
            width=8,
            embedding_size=32,
            num_pairs=3000,
            head_steps=150,
            head_lr=1e-2,  # converges in 150 steps; the default run keeps PAN's 1e-3
            unsupervised_conditions=8,
            lam_sweep=(1e-5, 1.0),
            episodes=100,
        )


@dataclass
class Split:
    """Encoder inputs of one split (a dataset yielding ``(image, label)``), labels, attributes and certainty."""

    dataset: torch.utils.data.Dataset[Any]
    labels: torch.Tensor  # (N,) long
    attributes: torch.Tensor  # (N, A) bool
    certain: torch.Tensor  # (N, A) bool


@dataclass
class Variant:
    name: str
    supervision: str  # "none", "supervised" or "hybrid"
    gate: str | None
    lam: float | None
    joint: str = "absdiff"


@dataclass
class Row:
    variant: Variant
    num_conditions: int | None
    accuracy: float
    ci95: float
    attribute_accuracy: float | None = None
    attribute_majority: float | None = None


# ------------------------------------------------------------------------------------------ data


class _Pairs(torch.utils.data.Dataset[Any]):
    """``(image, label)`` from a data set of sample dicts (CUB), through a v2 transform."""

    def __init__(self, base: Any, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        sample = self.transform(self.base[i])
        return sample["image"].as_subclass(torch.Tensor), int(sample["label"])


def synthetic_splits(cfg: FewShotConfig) -> tuple[Split, Split]:
    splits = []
    for split, num_classes in (("train", cfg.train_classes), ("test", cfg.test_classes)):
        ds = SyntheticBackgrounds(
            split,
            num_classes=num_classes,
            images_per_class=cfg.images_per_class,
            image_size=cfg.image_size,
            background_correlation=cfg.background_correlation,
            seed=cfg.seed,
        )
        images, _ = ds.render_all()
        attributes = ds.class_attributes[ds.labels].bool()
        dataset = torch.utils.data.TensorDataset(images.float() / 255.0, ds.labels)
        splits.append(Split(dataset, ds.labels.clone(), attributes, torch.ones_like(attributes)))
    return splits[0], splits[1]


def cub_splits(cfg: FewShotConfig, train: bool) -> tuple[Split, Split]:
    from torchvision.transforms import v2

    from dml_bias.datasets import CUB200

    size = cfg.cub_image_size
    normalise = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    test_tf = v2.Compose([v2.Resize((round(1.15 * size),) * 2, antialias=True), v2.CenterCrop(size), *normalise])
    train_tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *normalise])
    splits = []
    assert cfg.root is not None
    for protocol in ("fewshot_base", "fewshot_novel"):
        ds = CUB200(cfg.root, protocol=protocol, attributes=True)
        tf = train_tf if train and protocol == "fewshot_base" else test_tf
        certain = ds.attribute_certainty > 2
        splits.append(Split(_Pairs(ds, tf), ds.labels.clone(), ds.attributes.bool(), certain))
    return splits[0], splits[1]


def resnet18_encoder(weights: str | None) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    if weights is None:
        print("warning: no --weights: the ResNet-18 starts from a random initialisation", file=sys.stderr)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {
            k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")
        }
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(f"{weights} is not a torchvision ResNet-18 state_dict ({len(missing)} keys missing)")
    model.fc = nn.Identity()  # 512-d pooled features
    return model


# ------------------------------------------------------------------------------------------ encoder


def train_encoder(encoder: nn.Module, split: Split, epochs: int, cfg: FewShotConfig, device: torch.device) -> None:
    classes_per_batch = min(cfg.batch_size // cfg.m_per_class, int(split.labels.unique().numel()))
    sampler = MPerClassBatchSampler(
        split.labels,
        cfg.m_per_class,
        cfg.m_per_class * classes_per_batch,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    loader = torch.utils.data.DataLoader(split.dataset, batch_sampler=sampler, num_workers=_workers(split, cfg))
    loss_fn = TripletMarginLoss(margin=cfg.margin, distance="squared_euclidean")
    optimizer = torch.optim.Adam(encoder.parameters(), lr=cfg.encoder_lr)
    encoder.train()
    for _ in range(epochs):
        for images, labels in loader:
            loss = loss_fn(encoder(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _workers(split: Split, cfg: FewShotConfig) -> int:
    return 0 if isinstance(split.dataset, torch.utils.data.TensorDataset) else cfg.num_workers


@torch.no_grad()
def extract(encoder: nn.Module, split: Split, cfg: FewShotConfig, device: torch.device) -> torch.Tensor:
    encoder.eval()
    loader = torch.utils.data.DataLoader(split.dataset, batch_size=256, num_workers=_workers(split, cfg))
    return torch.cat([encoder(images.to(device)).float() for images, _ in loader])


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """(x - train mean) / (train std + 1e-6), PAN's feature standardisation (torch's unbiased std)."""
    mean, std = train.mean(dim=0), train.std(dim=0) + 1e-6
    return [(x - mean) / std for x in (train, *others)]


# ------------------------------------------------------------------------------------------ PAN heads


def num_supervised(gate: str, num_attributes: int) -> int:
    return 2 * num_attributes if gate == "and_xor" else num_attributes


def train_fewshot_head(
    features: torch.Tensor, split: Split, pairs: Any, variant: Variant, cfg: FewShotConfig
) -> tuple[ConditionalSimilarity, int]:
    num_attributes = split.attributes.shape[1]
    if variant.supervision == "none":
        k = cfg.unsupervised_conditions
    else:
        assert variant.gate is not None
        k = num_supervised(variant.gate, num_attributes)
        if variant.supervision == "hybrid":
            k += cfg.unsupervised_conditions
    torch.manual_seed(cfg.seed)  # the same initialisation for heads of the same size
    head = ConditionalSimilarity(features.shape[1], k, joint=variant.joint).to(features.device)
    loss_fn = PANLoss(lam=variant.lam if variant.lam is not None else 0.0, gate=variant.gate or "or")
    h1, h2, target = features[pairs.first], features[pairs.second], pairs.target.to(features.device)
    supervision: dict[str, torch.Tensor] = {}
    if variant.supervision != "none":
        first, second = pairs.first.cpu(), pairs.second.cpu()
        supervision = {
            "a1": split.attributes[first],
            "a2": split.attributes[second],
            "certain1": split.certain[first],
            "certain2": split.certain[second],
        }
        supervision = {name: value.to(features.device) for name, value in supervision.items()}
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.head_lr)
    head.train()
    for _ in range(cfg.head_steps):  # full-batch steps over all sampled pairs, as PAN's main_pan.py
        loss = loss_fn(head(h1, h2), target, **supervision)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval(), k


@torch.no_grad()
def fewshot_attribute_accuracy(
    head: ConditionalSimilarity, features: torch.Tensor, split: Split, train_split: Split, gate: str, cfg: FewShotConfig
) -> tuple[float, float]:
    """Accuracy of ``p_k > 0.5`` for the supervised conditions on novel-class pairs, and the majority baseline."""
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    pairs = sample_pairs(split.labels, min(cfg.num_pairs, 20000), generator=generator)
    first, second = pairs.first.cpu(), pairs.second.cpu()
    target = attribute_gate(split.attributes[first], split.attributes[second], gate).bool()
    certain = split.certain[first] & split.certain[second]
    if gate == "and_xor":
        certain = torch.cat([certain, certain], dim=1)
    scores = head(features[pairs.first], features[pairs.second]).condition_scores[:, : target.shape[1]].cpu()
    correct = ((scores > 0.5) == target) & certain
    # majority label of every condition among the base-class training pairs
    train_pairs = sample_pairs(train_split.labels, min(cfg.num_pairs, 20000), generator=generator)
    train_target = attribute_gate(
        train_split.attributes[train_pairs.first.cpu()], train_split.attributes[train_pairs.second.cpu()], gate
    ).float()
    majority = train_target.mean(dim=0) > 0.5
    majority_correct = (target == majority) & certain
    total = certain.sum().clamp_min(1)
    return float(correct.sum() / total), float(majority_correct.sum() / total)


class CosineScore:
    """Cosine similarity as a pair scorer with ``score_matrix``, for the baseline row."""

    def score_matrix(self, query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(query, dim=1) @ nn.functional.normalize(gallery, dim=1).T


# ------------------------------------------------------------------------------------------ experiment


def fewshot_variants(cfg: FewShotConfig) -> list[Variant]:
    rows = [Variant("PAN unsupervised", "none", None, None)]
    rows += [Variant("PAN supervised", "supervised", gate, cfg.lam) for gate in ("or", "and", "xnor", "and_xor")]
    rows.append(Variant("PAN hybrid", "hybrid", "or", cfg.lam))
    rows.append(Variant("PAN supervised, concat joint", "supervised", "or", cfg.lam, joint="concat"))
    rows += [Variant("PAN supervised (λ sweep)", "supervised", "or", lam) for lam in cfg.lam_sweep if lam != cfg.lam]
    return rows


def run_fewshot(cfg: FewShotConfig) -> list[Row]:
    """PAN's CUB recipe (as in the paper's official code) on the synthetic classes or on CUB.

    1. An image encoder is trained with a triplet loss (margin 0.2 on squared Euclidean distances, as PAN's
       Siamese network) on the training (base) classes; on CUB the ResNet-18 is used as it is unless
       ``--encoder-epochs`` is given.
    2. Its features are extracted and standardised with the training mean and standard deviation (+1e-6).
    3. PAN heads are trained on the frozen features with full-batch Adam on balanced same-class /
       different-class pairs of the base classes; supervised conditions get the gated attribute labels.
    4. Every head is evaluated by 5-way 5-shot accuracy with 16 queries per class on the novel classes (a query's
       class score is its mean PAN score against the class's 5 supports), over the same episodes for every row.

    The table has the plain cosine of the encoder's embeddings, the unsupervised head, the supervised head with
    every gate, the hybrid head, the concatenated joint ``[h1; h2]`` and a λ sweep; ``attr acc`` is the accuracy
    of the supervised condition scores against the gated attribute labels of novel-class pairs, next to the
    majority rate (in brackets). The ± is the 95 % interval over episodes only.

    Why the ``or``/``and`` attribute accuracies stay near the majority rate with ``|h1 - h2|``: the joint feature
    of two images of one class is close to 0 whatever the class's attributes are, so no condition can tell "both
    red" from "neither red". Here the pair label is class identity, which the triplet-trained embedding already
    represents, so the cosine row is hard to beat; part 1 is the setting PAN is made for.
    """
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    if cfg.root is None:
        train, test = synthetic_splits(cfg)
        encoder: nn.Module = SmallCNN(3, cfg.embedding_size, cfg.width)
        epochs = 12 if cfg.encoder_epochs is None else cfg.encoder_epochs
    else:
        epochs = 0 if cfg.encoder_epochs is None else cfg.encoder_epochs
        train, test = cub_splits(cfg, train=epochs > 0)
        encoder = resnet18_encoder(cfg.weights)
    encoder.to(device)
    if epochs > 0:
        train_encoder(encoder, train, epochs, cfg, device)
    if cfg.root is not None and epochs > 0:
        train = cub_splits(cfg, train=False)[0]  # extract the base features without augmentation
    raw_train, raw_test = extract(encoder, train, cfg, device), extract(encoder, test, cfg, device)
    train_features, test_features = standardise(raw_train, raw_test)

    def evaluate(scorer: Any, features: torch.Tensor) -> tuple[float, float]:
        result = few_shot_accuracy(
            scorer,
            features,
            test.labels.to(features.device),
            n_way=cfg.n_way,
            k_shot=cfg.k_shot,
            n_query=cfg.n_query,
            num_episodes=cfg.episodes,
            generator=torch.Generator().manual_seed(cfg.seed + 1),  # the same episodes for every row
        )
        return result.mean, result.ci95

    rows = [Row(Variant("cosine (encoder embeddings)", "none", None, None), None, *evaluate(CosineScore(), raw_test))]
    pairs = sample_pairs(train.labels.to(device), cfg.num_pairs, generator=torch.Generator().manual_seed(cfg.seed + 3))
    for variant in fewshot_variants(cfg):
        head, k = train_fewshot_head(train_features, train, pairs, variant, cfg)
        row = Row(variant, k, *evaluate(head, test_features))
        if variant.gate is not None:
            row.attribute_accuracy, row.attribute_majority = fewshot_attribute_accuracy(
                head, test_features, test, train, variant.gate, cfg
            )
        rows.append(row)
    return rows


def format_fewshot_table(rows: Sequence[Row], cfg: FewShotConfig) -> str:
    shots = f"{cfg.n_way}-way {cfg.k_shot}-shot"
    header = f"{'method':<32} {'gate':<8} {'K':>3} {'λ':>6}  {shots + ' acc ± CI95':>24}  {'attr acc [majority]':>20}"
    lines = [header, "-" * len(header)]
    for r in rows:
        v = r.variant
        k = "-" if r.num_conditions is None else str(r.num_conditions)
        lam = "-" if v.lam is None else f"{v.lam:g}"
        attr = "-"
        if r.attribute_accuracy is not None:
            attr = f"{r.attribute_accuracy:.3f} [{r.attribute_majority:.3f}]"
        acc = f"{r.accuracy:.4f} ± {r.ci95:.4f}"
        lines.append(f"{v.name:<32} {v.gate or '-':<8} {k:>3} {lam:>6}  {acc:>24}  {attr:>20}")
    return "\n".join(lines)


# ============================================================================================ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run: part 1 only (add --fewshot for part 2)")
    parser.add_argument("--fewshot", action="store_true", help="with --quick: also run a small part 2")
    parser.add_argument("--no-fewshot", action="store_true", help="skip part 2 (few-shot protocol)")
    parser.add_argument("--out", default=None, help="write results.json and pan_compatibility.png here")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 with --quick, else torch's choice)"
    )
    parser.add_argument("--rule", default=None, choices=("or", "and", "xnor", "xor"), help="part 1 rule (default or)")
    parser.add_argument("--noise", type=float, default=None, help="part 1: share of flipped training labels")
    parser.add_argument("--steps", type=int, default=None, help="part 1: training steps of every method")
    parser.add_argument("--margin", type=float, default=None, help="part 1: positive margin of cosine_margin")
    parser.add_argument("--root", default=None, help="part 2 on CUB (holds CUB_200_2011/); skips part 1")
    parser.add_argument("--weights", default=None, help="local torchvision ResNet-18 state_dict (CUB only)")
    parser.add_argument("--device", default="cpu", help="part 2 device")
    parser.add_argument("--encoder-epochs", type=int, default=None, help="part 2: default 12 (synthetic), 0 (CUB)")
    parser.add_argument("--lam", type=float, default=None, help="part 2: attribute-loss weight (default 1)")
    parser.add_argument("--head-steps", type=int, default=None, help="part 2: full-batch Adam steps per head")
    parser.add_argument("--head-lr", type=float, default=None, help="part 2: Adam learning rate of the heads")
    parser.add_argument("--unsupervised-conditions", type=int, default=None, help="part 2: free conditions")
    parser.add_argument("--episodes", type=int, default=None, help="part 2: few-shot test episodes (default 600)")
    parser.add_argument("--n-query", type=int, default=None, help="part 2: queries per class (default 16)")
    parser.add_argument("--image-size", type=int, default=None, help="part 2: CUB crop size (default 224)")
    parser.add_argument("--num-workers", type=int, default=None, help="part 2: CUB data-loader workers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    threads = 1 if args.threads is None and args.quick else args.threads  # small tensors: one thread is fastest
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    output: dict[str, Any] = {}
    if args.root is None:
        cfg = CompatibilityConfig.quick() if args.quick else CompatibilityConfig()
        overrides = {
            "rule": args.rule,
            "noise": args.noise,
            "steps": args.steps,
            "feature_steps": args.steps,
            "margin": args.margin,
            "seed": args.seed,
        }
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        task, results = run_compatibility(cfg)
        print("Part 1: attribute compatibility (every method trains the same encoder with the same budget)")
        print(format_compatibility_table(task, results))
        print(f"part 1 wall time {time.perf_counter() - start:.1f} s")
        output = results_json(task, results, cfg)
        part1b_start = time.perf_counter()
        feature_cfg = replace(
            cfg, inputs="attributes", labelled_pairs=cfg.feature_pairs, steps=cfg.feature_steps, lr=cfg.feature_lr
        )
        feature_task, feature_results = run_compatibility(feature_cfg)
        print()
        print(
            f"Part 1b: frozen features that carry the attributes (one-hot attributes + N(0, "
            f"{feature_cfg.feature_noise:g}^2) noise), {feature_cfg.feature_pairs} labelled pairs, "
            f"{feature_cfg.steps} full-batch steps; embeddings: a linear metric, PAN: the head on the features"
        )
        print(format_compatibility_table(feature_task, feature_results))
        print(f"part 1b wall time {time.perf_counter() - part1b_start:.1f} s")
        output["attribute_inputs"] = results_json(feature_task, feature_results, feature_cfg)
        if args.out is not None:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            save_figure(task, results, out / "pan_compatibility.png", feature_results)
    run_part2 = args.root is not None or (not args.no_fewshot and (not args.quick or args.fewshot))
    if run_part2:
        part2_start = time.perf_counter()
        fcfg = FewShotConfig.quick() if args.quick else FewShotConfig()
        overrides = {
            "root": args.root,
            "weights": args.weights,
            "device": args.device,
            "encoder_epochs": args.encoder_epochs,
            "lam": args.lam,
            "head_steps": args.head_steps,
            "head_lr": args.head_lr,
            "unsupervised_conditions": args.unsupervised_conditions,
            "episodes": args.episodes,
            "n_query": args.n_query,
            "cub_image_size": args.image_size,
            "num_workers": args.num_workers,
            "seed": args.seed,
        }
        fcfg = replace(fcfg, **{k: v for k, v in overrides.items() if v is not None})
        rows = run_fewshot(fcfg)
        data = "CUB-200-2011 (base -> novel)" if fcfg.root else "SyntheticBackgrounds (train -> test classes)"
        print()
        print("Part 2: PAN's few-shot protocol (similarity = class identity)")
        print(f"{data}, {fcfg.episodes} episodes, chance = {1 / fcfg.n_way:.2f}")
        print(format_fewshot_table(rows, fcfg))
        print(f"part 2 wall time {time.perf_counter() - part2_start:.1f} s")
        output["fewshot"] = {
            "data": data,
            "episodes": fcfg.episodes,
            "rows": [
                {
                    "method": r.variant.name,
                    "gate": r.variant.gate,
                    "lam": r.variant.lam,
                    "k": r.num_conditions,
                    "accuracy": r.accuracy,
                    "ci95": r.ci95,
                    "attribute_accuracy": r.attribute_accuracy,
                    "attribute_majority": r.attribute_majority,
                }
                for r in rows
            ],
        }
    wall = time.perf_counter() - start
    print(f"wall time {wall:.1f} s")
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        output["wall_time_s"] = wall
        output["threads"] = torch.get_num_threads()
        tmp = out / f"results.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(output, indent=2) + "\n")
        os.replace(tmp, out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
