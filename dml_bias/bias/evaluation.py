"""Evaluating one trained study model: retrieval on every test variant, then attribution on a test subset.

The fourth step of the study's data path (config → data → train → **evaluate** → report → figures). Internal to
the study (``__all__`` is empty); the numbers end up in :attr:`StudyResult.runs <dml_bias.bias.StudyResult>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dml_bias.bias.config import METRIC_KEYS, VARIANTS, RunSpec, StudyConfig
from dml_bias.bias.data import Split, StudyData, model_input

__all__: list[str] = []

#: Queries per class of the retrieval grid and of the attribution figure are drawn from the first classes.
GRID_QUERIES = 6
#: Query/neighbour pairs shown per model in the attribution figure.
ATTRIBUTION_PAIRS = 3


# ------------------------------------------------------------------------------------------------- retrieval


@torch.no_grad()
def embed(
    model: nn.Module,
    split: Split,
    mode: str,
    sigma: float | None,
    raw: bool,
    data: StudyData,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """Embeddings ``(N, D)`` (float32, CPU) of a split; ``raw``: without the mode's test-time mask."""
    model.eval()
    out = []
    for start in range(0, split.labels.numel(), batch_size):
        images = split.images[start : start + batch_size].to(device)
        masks = split.masks[start : start + batch_size].to(device)
        if raw and mode == "channel":
            # "Raw" = no mask information: the mask channel says "everything is object".
            masks = torch.full_like(masks, 255)
        eval_mode = "none" if raw and mode != "channel" else mode
        out.append(model(model_input(images, masks, eval_mode, sigma, data.mean, data.std)).float().cpu())
    return torch.cat(out)


def retrieval_summary(
    query: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """:data:`METRIC_KEYS` over all queries and ``{class: {"recall@1", "count"}}`` (self excluded)."""
    from dml_bias.metrics import retrieval_metrics, sharded_retrieval_metrics

    # Recall@k with k at least the number of other items is the hit rate over everything: clamp k (tiny sets).
    largest = max(1, labels.numel() - 1)
    ks = sorted({min(k, largest) for k in (1, 2, 4, 8)})
    keys = ("recall@k", "map@r", "r_precision")
    if reference is None:
        res = retrieval_metrics(query, labels, ks=ks, metrics=keys, per_class=True)
    else:  # query i is reference item i in another variant (other rows): leave it out by its index
        own = torch.arange(labels.numel(), device=labels.device)
        res = sharded_retrieval_metrics(
            query, labels, reference, labels, ks=ks, metrics=keys, query_indices=own, per_class=True
        )
    for k in (1, 2, 4, 8):
        res[f"recall@{k}"] = res[f"recall@{min(k, largest)}"]
        for values in res["per_class"].values():
            values[f"recall@{k}"] = values[f"recall@{min(k, largest)}"]
    summary = {k: float(res[k]) for k in METRIC_KEYS}
    per_class = {
        int(c): {"recall@1": float(v["recall@1"]), "count": int(v["count"])} for c, v in res["per_class"].items()
    }
    return summary, per_class


def chance_recall_at_1(labels: torch.Tensor) -> float:
    """Expected Recall@1 of a random ranking: mean over queries of (same-class others) / (all others)."""
    counts = torch.bincount(labels).to(torch.float64)
    n = labels.numel()
    return float(((counts[labels] - 1) / (n - 1)).mean())


def evaluate_retrieval(
    config: StudyConfig,
    data: StudyData,
    model: nn.Module,
    spec: RunSpec,
    variants: list[str],
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Retrieval metrics of one model on every variant, with its own mode (``metrics``) and raw (``metrics_raw``).

    Returns:
        The run's entries (``metrics``, ``metrics_raw``, ``background_gap``, ``background_gap_raw``,
        ``worst_class``, ``per_class_recall@1``, ``class_counts``) and the own-mode embeddings that later steps
        reuse: ``{"original": {"query", "gallery"}, config.report_variant: {...}}``.
    """
    test = data.test
    run: dict[str, Any] = {}
    kept: dict[str, dict[str, torch.Tensor]] = {}
    evaluations = [("metrics", False)]
    if spec.mode not in ("none", "bg_augment"):
        evaluations.append(("metrics_raw", True))
    per_class_all: dict[str, dict[str, dict[int, float]]] = {}
    class_counts: dict[int, int] = {}
    for key, raw in evaluations:
        run[key], per_class_all[key] = {}, {}
        gallery = None
        if config.swap == "queries":
            gallery = embed(model, data.variant("original"), spec.mode, spec.sigma, raw, data, device)
        for v in variants:
            emb = embed(model, data.variant(v), spec.mode, spec.sigma, raw, data, device)
            summary, per_class = retrieval_summary(emb, test.labels, gallery)
            run[key][v] = summary
            per_class_all[key][v] = {c: pc["recall@1"] for c, pc in per_class.items()}
            if v == "original" and not class_counts:
                class_counts = {int(c): int(pc["count"]) for c, pc in per_class.items()}
            if key == "metrics" and v in ("original", config.report_variant):
                kept[v] = {"query": emb, "gallery": emb if gallery is None else gallery}
    if "metrics_raw" not in run:
        run["metrics_raw"] = run["metrics"]
        per_class_all["metrics_raw"] = per_class_all["metrics"]
    for key, gap_key in (("metrics", "background_gap"), ("metrics_raw", "background_gap_raw")):
        m = run[key]
        run[gap_key] = (
            m["mixed_same"]["recall@1"] - m["mixed_rand"]["recall@1"]
            if "mixed_same" in m and "mixed_rand" in m
            else None
        )
    orig = per_class_all["metrics"]["original"]
    worst = min(orig, key=lambda c: (orig[c], c))
    run["worst_class"] = {"label": worst, "name": test.class_names[worst], "recall@1": orig[worst]}
    run["per_class_recall@1"] = {
        key: {v: {str(c): r for c, r in pcs.items()} for v, pcs in per_v.items()}
        for key, per_v in per_class_all.items()
    }
    run["class_counts"] = {str(c): n for c, n in class_counts.items()}
    return run, kept


def grid_data(
    config: StudyConfig, data: StudyData, embeddings: dict[str, dict[str, torch.Tensor]]
) -> dict[str, Any] | None:
    """Queries and their top-5 neighbours for the no-mask and hard-mask models (first loss), for the figure."""
    if not embeddings:
        return None
    from dml_bias.metrics import knn

    variant = data.variant(config.report_variant)
    gallery_split = variant if config.swap == "both" else data.variant("original")
    labels = data.test.labels
    # One query per class from the first classes (deterministic).
    classes = torch.unique(labels)[:GRID_QUERIES]
    queries = torch.stack([torch.nonzero(labels == c).flatten()[0] for c in classes])
    grid: dict[str, Any] = {
        "variant": config.report_variant,
        "loss": config.losses[0],
        "query_images": variant.images[queries],
        "query_masks": variant.masks[queries],
        "query_labels": labels[queries],
        "models": {},
    }
    for mode, emb in embeddings.items():
        k = min(5, labels.numel() - 1)
        # k + 1 neighbours, then each query's own item (same index) is left out.
        _, idx_all = knn(emb["query"][queries], emb["gallery"], k=k + 1, exclude_self=False)
        rows = []
        for qi, q in enumerate(queries.tolist()):
            row = [int(j) for j in idx_all[qi].tolist() if int(j) != q][:k]
            rows.append(row)
        neighbours = torch.tensor(rows, dtype=torch.long)
        grid["models"][mode] = {
            "neighbour_images": gallery_split.images[neighbours],
            "neighbour_masks": gallery_split.masks[neighbours],
            "neighbour_labels": labels[neighbours],
        }
    return grid


# ----------------------------------------------------------------------------------------------- attribution


@dataclass
class AttributionSubset:
    """The test images the attribution measures use, and the donor each one gets its swaps from."""

    indices: torch.Tensor  # (n,) long, into the test split
    donors: torch.Tensor  # (n,) long, into the test split: an image of another class


def attribution_subset(config: StudyConfig, data: StudyData) -> AttributionSubset | None:
    """The first ``config.attribution_images`` test images of every class, each with a random other-class donor.

    ``None`` if ``config.attribution_images`` is 0. The donors are drawn with
    :func:`~dml_bias.transforms.functional.choose_donor` (``"mixed_rand"``) from the whole test split, seeded by
    ``config.seed``, once for the study: every model is measured on the same swaps.
    """
    from dml_bias.transforms.functional import choose_donor

    per_class = config.attribution_images
    if per_class == 0:
        return None
    labels = data.test.labels
    picked = [torch.nonzero(labels == c).flatten()[:per_class] for c in torch.unique(labels)]
    indices = torch.cat(picked)
    gen = torch.Generator().manual_seed(config.seed * 1000 + len(VARIANTS))
    donors = torch.tensor([choose_donor("mixed_rand", labels, int(i), generator=gen) for i in indices.tolist()])
    return AttributionSubset(indices, donors)


def attribution_layer(model: nn.Module) -> str:
    """The layer the study explains: the last feature map before the embedding head."""
    names = dict(model.named_modules())
    return "trunk.layer4" if "trunk.layer4" in names else "features"


def evaluate_attribution(
    model: nn.Module,
    spec: RunSpec,
    data: StudyData,
    subset: AttributionSubset,
    original: dict[str, torch.Tensor],
    device: torch.device,
    *,
    keep_maps: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Foreground energy and background sensitivity of one model on the subset, both in its own mask mode.

    Each subset image is a query: its map explains its similarity to its nearest neighbour among the other
    original test images (:func:`~dml_bias.bias.similarity_attribution` at :func:`attribution_layer`), and
    :func:`~dml_bias.bias.foreground_energy` scores the map against the query's mask (object where the mask is above
    half). Background sensitivity
    swaps each image's background (and, separately, its object) with its donor's
    (:func:`~dml_bias.bias.background_sensitivity`).

    Args:
        model: The trained model.
        spec: The run's loss, mode and σ.
        data: The study's data.
        subset: From :func:`attribution_subset`.
        original: The model's own-mode embeddings of the original test images (``"query"``, ``"gallery"``).
        device: The model's device.
        keep_maps: Also return the maps of the queries and of their neighbours (for the figure).

    Returns:
        The run's ``attribution`` entry and, if ``keep_maps``, the figure's data for this model.
    """
    from dml_bias.bias.attribution import ForegroundEnergy, background_sensitivity, foreground_energy
    from dml_bias.metrics import knn
    from dml_bias.transforms.functional import foreground_mask

    mode, sigma = spec.mode, spec.sigma
    test = data.test
    idx = subset.indices
    labels = test.labels[idx]
    _, nn_idx = knn(original["query"][idx], original["gallery"], k=2, exclude_self=False)
    # The nearest neighbour other than the query itself.
    neighbours = torch.where(nn_idx[:, 0] == idx, nn_idx[:, 1], nn_idx[:, 0])

    def inputs(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return model_input(images.to(device), masks.to(device), mode, sigma, data.mean, data.std)

    layer = attribution_layer(model)
    query_in = inputs(test.images[idx], test.masks[idx])
    neighbour_emb = original["gallery"][neighbours].to(device)
    maps = _attribution_maps(model, query_in, neighbour_emb, layer)
    # Real segmentations are soft (CUB's grey levels): the energy counts the pixels above half as object.
    energy = foreground_energy(maps, foreground_mask(test.masks[idx]))
    shifts = background_sensitivity(
        model,
        test.images[idx],
        test.masks[idx],
        donors=(test.images[subset.donors], test.masks[subset.donors]),
        input_fn=inputs,
    )
    per_class: dict[str, dict[str, float]] = {}
    by_class = shifts.per_class(labels)
    for c, values in by_class.items():
        sel = labels == c
        class_energy = ForegroundEnergy(energy.energy[sel], energy.chance[sel]).summary()
        per_class[str(c)] = {
            "foreground_energy": class_energy["mean"],
            "foreground_chance": float(energy.chance[sel].mean()),
            "foreground_empty": class_energy["empty"],
            "background_shift": values["background"],
            "object_shift": values["object"],
            "background_sensitivity": values["score"],
            "count": values["count"],
        }
    finite_score = shifts.score[~torch.isnan(shifts.score)]
    entry = {
        "layer": layer,
        "num_images": int(idx.numel()),
        # Maps without positive attribution have no energy: left out of the mean and counted.
        "foreground_energy": energy.summary()["mean"],
        "foreground_empty": energy.summary()["empty"],
        "foreground_chance": float(energy.chance.mean()),
        "background_shift": float(shifts.background.mean()),
        "object_shift": float(shifts.object.mean()),
        "background_sensitivity": float(finite_score.mean()) if finite_score.numel() else float("nan"),
        "per_class": per_class,
    }
    figure = None
    if keep_maps:
        neighbour_in = inputs(test.images[neighbours], test.masks[neighbours])
        query_emb = original["query"][idx].to(device)
        neighbour_maps = _attribution_maps(model, neighbour_in, query_emb, layer)
        figure = {
            "name": spec.name,
            "loss": spec.loss,
            "mode": spec.mode,
            "sigma": spec.sigma,
            "query_maps": maps,
            "neighbour_maps": neighbour_maps,
            "neighbours": neighbours,
            "foreground_energy": energy.energy,
        }
    return entry, figure


def _attribution_maps(
    model: nn.Module, query: torch.Tensor, reference: torch.Tensor, layer: str, chunk: int = 64
) -> torch.Tensor:
    """:func:`~dml_bias.bias.similarity_attribution` in chunks of ``chunk`` images (bounded memory), on the CPU."""
    from dml_bias.bias.attribution import similarity_attribution

    parts = [
        similarity_attribution(model, query[i : i + chunk], reference[i : i + chunk], layer=layer).cpu()
        for i in range(0, query.shape[0], chunk)
    ]
    return torch.cat(parts)


def attribution_figure_data(
    data: StudyData, subset: AttributionSubset | None, models: list[dict[str, Any]], loss: str
) -> dict[str, Any] | None:
    """What the attribution figure needs: the subset's images and, per model of ``loss``, its maps."""
    if subset is None or not models:
        return None
    test = data.test
    return {
        "loss": loss,
        "indices": subset.indices,
        "labels": test.labels[subset.indices],
        "images": test.images,
        "masks": test.masks,
        "test_labels": test.labels,
        "models": models,
    }
