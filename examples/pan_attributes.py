"""PAN with attribute supervision: 5-way 5-shot classification of novel classes, as in PAN's CUB experiment.

PAN (Mishra et al., ICCV 2021) scores an image pair with K similarity conditions mixed by learned relevance
weights (:class:`dml_bias.heads.ConditionalSimilarity`); conditions can be supervised with pairwise attribute
labels built by a logical gate (:func:`dml_bias.heads.attribute_gate`, :class:`dml_bias.heads.PANLoss`).
This script follows PAN's CUB protocol (methods notes §A.3, A.5, A.6):

1. an image encoder is trained first with a triplet loss (margin 0.2 on squared Euclidean distances, as PAN's
   Siamese network) on the training (base) classes;
2. its features are extracted and standardised with the training mean and standard deviation (+1e-6);
3. PAN heads are trained on the frozen features with full-batch Adam (lr 1e-3) on balanced same-class /
   different-class pairs of the base classes (:func:`dml_bias.heads.sample_pairs`); supervised conditions get
   the gated attribute labels of the pair;
4. every head is evaluated by 5-way 5-shot accuracy with 16 queries per class on the novel classes
   (:func:`dml_bias.heads.few_shot_accuracy`: a query's class score is its mean PAN score against the class's
   5 supports), over the same episodes for every row.

Data: by default the built-in :class:`dml_bias.datasets.SyntheticBackgrounds`, whose classes are combinations
of five object attributes (shape, colour, pattern, mark, secondary colour; 20 binary attribute columns in
``class_attributes``, all certain), so attribute supervision exists by construction; train and test classes are
disjoint combinations. The encoder is the study's :class:`dml_bias.bias.models.SmallCNN`. With ``--root``, CUB
(``CUB200(root, protocol="fewshot_base" / "fewshot_novel", attributes=True)``, an attribute is certain if its
certainty id is > 2) with a torchvision ResNet-18 (``fc`` removed, 512-d) initialised from ``--weights`` (a local
``state_dict``; nothing is downloaded). On CUB the encoder is used as it is unless ``--encoder-epochs`` is given
(PAN fine-tunes its Siamese ResNet-18 for hours on a GPU; use ``--device cuda``).

The table has the plain cosine similarity of the encoder's embeddings (a query's class score = its mean cosine
against the supports, the same protocol as PAN's), the unsupervised head, the supervised head with every gate,
the hybrid head (supervised + unsupervised conditions, gate ``or``), the supervised ``or`` head with the
concatenated joint feature ``[h1; h2]`` instead of PAN's ``|h1 - h2|``, and a sweep over the attribute-loss
weight λ (PAN's CUB README uses λ = 1e-5). ``attr acc`` is the accuracy of the supervised condition scores
(``p_k > 0.5``) against the gated attribute labels of novel-class pairs, next to the accuracy of always
predicting each condition's majority label (in brackets). The ± is the 95 % interval over episodes only: it does
not cover the variation between training runs (another head initialisation moves a row by a few points).

Why the ``or``/``and`` attribute accuracies stay near the majority rate with ``|h1 - h2|``: the joint feature of
two images of one class is close to 0 whatever the class's attributes are, so no condition can tell "both
red" from "neither red". Difference-type labels (``xnor``, the ``xor`` half of ``and_xor``) can be read from it
only where the features place an attribute along a direction of its own, which features trained for class
identity do weakly; the concatenated joint feature can learn ``or``.

Run ``python examples/pan_attributes.py`` (a few minutes on 2 CPU cores) or ``--quick`` (CI-sized).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from dml_bias.bias.models import SmallCNN
from dml_bias.datasets import MPerClassSampler, SyntheticBackgrounds
from dml_bias.heads import ConditionalSimilarity, PANLoss, attribute_gate, few_shot_accuracy, sample_pairs
from dml_bias.losses import TripletMarginLoss


@dataclass
class Config:
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
    def quick(cls) -> Config:
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


def synthetic_splits(cfg: Config) -> tuple[Split, Split]:
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


def cub_splits(cfg: Config, train: bool) -> tuple[Split, Split]:
    from torchvision.transforms import v2

    from dml_bias.datasets import CUB200

    size = cfg.cub_image_size
    normalise = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    test_tf = v2.Compose([v2.Resize((round(1.15 * size),) * 2, antialias=True), v2.CenterCrop(size), *normalise])
    train_tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *normalise])
    splits = []
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


def train_encoder(encoder: nn.Module, split: Split, epochs: int, cfg: Config, device: torch.device) -> None:
    classes_per_batch = min(cfg.batch_size // cfg.m_per_class, int(split.labels.unique().numel()))
    sampler = MPerClassSampler(
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


def _workers(split: Split, cfg: Config) -> int:
    return 0 if isinstance(split.dataset, torch.utils.data.TensorDataset) else cfg.num_workers


@torch.no_grad()
def extract(encoder: nn.Module, split: Split, cfg: Config, device: torch.device) -> torch.Tensor:
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


def train_head(
    features: torch.Tensor, split: Split, pairs: Any, variant: Variant, cfg: Config
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
def attribute_accuracy(
    head: ConditionalSimilarity, features: torch.Tensor, split: Split, train_split: Split, gate: str, cfg: Config
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


def variants(cfg: Config) -> list[Variant]:
    rows = [Variant("PAN unsupervised", "none", None, None)]
    rows += [Variant("PAN supervised", "supervised", gate, cfg.lam) for gate in ("or", "and", "xnor", "and_xor")]
    rows.append(Variant("PAN hybrid", "hybrid", "or", cfg.lam))
    rows.append(Variant("PAN supervised, concat joint", "supervised", "or", cfg.lam, joint="concat"))
    rows += [Variant("PAN supervised (λ sweep)", "supervised", "or", lam) for lam in cfg.lam_sweep if lam != cfg.lam]
    return rows


def run(cfg: Config) -> list[Row]:
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
    for variant in variants(cfg):
        head, k = train_head(train_features, train, pairs, variant, cfg)
        row = Row(variant, k, *evaluate(head, test_features))
        if variant.gate is not None:
            row.attribute_accuracy, row.attribute_majority = attribute_accuracy(
                head, test_features, test, train, variant.gate, cfg
            )
        rows.append(row)
    return rows


def format_table(rows: Sequence[Row], cfg: Config) -> str:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (seconds)")
    parser.add_argument("--root", default=None, help="CUB folder (holds CUB_200_2011/); default: synthetic data")
    parser.add_argument("--weights", default=None, help="local torchvision ResNet-18 state_dict (CUB only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encoder-epochs", type=int, default=None, help="default: 12 (synthetic), 0 (CUB)")
    parser.add_argument("--lam", type=float, default=None, help="attribute-loss weight of the main rows (default 1)")
    parser.add_argument("--head-steps", type=int, default=None, help="full-batch Adam steps per head (default 1500)")
    parser.add_argument("--head-lr", type=float, default=None, help="Adam learning rate of the heads (default 1e-3)")
    parser.add_argument("--unsupervised-conditions", type=int, default=None, help="free conditions (default 20)")
    parser.add_argument("--episodes", type=int, default=None, help="few-shot test episodes (default 600)")
    parser.add_argument("--n-query", type=int, default=None, help="queries per class (default 16)")
    parser.add_argument("--image-size", type=int, default=None, help="CUB crop size (default 224)")
    parser.add_argument("--num-workers", type=int, default=None, help="CUB data-loader workers (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = Config.quick() if args.quick else Config()
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
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    start = time.perf_counter()
    rows = run(cfg)
    data = "CUB-200-2011 (base -> novel)" if cfg.root else "SyntheticBackgrounds (train -> test classes)"
    print(f"{data}, {cfg.episodes} episodes, chance = {1 / cfg.n_way:.2f}")
    print(format_table(rows, cfg))
    print(f"wall time {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
