"""The background-bias study end to end: files, every mode and loss, the direction of the effect, the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_SCHEDULE

from dml_bias.bias import METRIC_KEYS, VARIANTS, RunSpec, StudyConfig, StudyResult, run_study
from dml_bias.bias import study as study_module
from dml_bias.bias.data import StudyData
from dml_bias.bias.evaluation import chance_recall_at_1, embed, evaluate_retrieval
from dml_bias.bias.models import SmallCNN
from dml_bias.bias.report import PER_CLASS_FIELDS, per_class_rows, per_class_summary

TINY = {**TINY_SCHEDULE, "progress": False, "num_threads": 1}

# Proxy-Anchor, no mask vs hard mask, on a small data set trained long enough for the effect to show.
SMALL_PA = {
    "losses": ("proxy_anchor",),
    "modes": ("none", "hard"),
    "variants": ("original", "mixed_rand"),
    "num_classes": 10,
    "images_per_class": 16,
    "image_size": 24,
    "epochs": 4,
    "width": 8,
    "embedding_size": 32,
    "batch_size": 40,
    "m_per_class": 4,
    "progress": False,
    "num_threads": 1,
}


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyResult, Path]:
    out = tmp_path_factory.mktemp("study")
    result = run_study(StudyConfig(**TINY, out_dir=str(out)))
    result.save(out)
    return result, out


def test_every_mode_and_loss_in_results_json(tiny_result: tuple[StudyResult, Path]) -> None:
    _result, out = tiny_result
    for name in ("results.json", "per_class.csv", "report.md", "recall_by_mode.png", "per_class_failures.png"):
        assert (out / name).is_file(), name
    assert (out / "retrieval_grid.png").is_file()
    data = json.loads((out / "results.json").read_text())
    got = {(r["loss"], r["mode"], r["sigma"]) for r in data["runs"]}
    expected = {(loss, mode, None) for loss in ("proxy_anchor", "multi_similarity") for mode in ("none", "hard")}
    expected |= {(loss, "channel", None) for loss in ("proxy_anchor", "multi_similarity")}
    expected |= {(loss, "bg_augment", None) for loss in ("proxy_anchor", "multi_similarity")}
    expected |= {(loss, "soft", s) for loss in ("proxy_anchor", "multi_similarity") for s in (0.2, 0.5)}
    assert got == expected
    for run in data["runs"]:
        for key in ("metrics", "metrics_raw"):
            assert set(run[key]) == set(VARIANTS)
            for values in run[key].values():
                assert set(values) == set(METRIC_KEYS)
                # Recall@k is the share of the 36 test queries with a hit: a whole number of queries
                n_queries = TINY["num_classes"] * TINY["images_per_class"]
                for k in ("recall@1", "recall@2", "recall@4", "recall@8"):
                    assert values[k] * n_queries == pytest.approx(round(values[k] * n_queries), abs=1e-9)
        # recall@k cannot decrease with k
        m = run["metrics"]["original"]
        assert m["recall@1"] <= m["recall@2"] <= m["recall@4"] <= m["recall@8"]
        gap = run["metrics"]["mixed_same"]["recall@1"] - run["metrics"]["mixed_rand"]["recall@1"]
        assert run["background_gap"] == pytest.approx(gap)
    assert data["seed"] == 0
    assert data["config"]["epochs_resolved"] == 1
    assert {"torch", "dml_bias", "python"} <= set(data["versions"])
    # the total covers the data preparation and every run's training, evaluation and attribution
    parts = data["timings"]["data"] + sum(
        r["train_seconds"] + r["eval_seconds"] + r["attribution_seconds"] for r in data["runs"]
    )
    assert data["timings"]["total"] >= parts
    assert data["interrupted"] is False
    # TINY: 3 classes with a home of their own, 3 sharing the fourth background
    assert sorted(data["dataset"]["background_distinctiveness"]) == pytest.approx([1 / 3] * 3 + [1.0] * 3)
    assert set(data["per_class_summary"]) == {"proxy_anchor", "multi_similarity"}
    from scipy.stats import spearmanr

    for loss, summary in data["per_class_summary"].items():
        assert summary["num_classes"] == TINY["num_classes"]
        rows = [r for r in data["per_class"] if r["loss"] == loss]
        shares = [r["reliance_share"] for r in rows]
        distinct = [r["background_distinctiveness"] for r in rows]
        expected = 0.0 if len(set(shares)) < 2 else spearmanr(shares, distinct).statistic
        assert summary["spearman_reliance_share"] == pytest.approx(expected)


def test_own_and_raw_evaluations(tiny_result: tuple[StudyResult, Path]) -> None:
    result, _ = tiny_result
    by = {(r["loss"], r["name"]): r for r in result.runs}
    for loss in ("proxy_anchor", "multi_similarity"):
        # No test-time mask: the raw evaluation is the same evaluation (the same entry, not a second one).
        assert by[(loss, "none")]["metrics_raw"] is by[(loss, "none")]["metrics"]
        assert by[(loss, "bg_augment")]["metrics_raw"] is by[(loss, "bg_augment")]["metrics"]
        hard = by[(loss, "hard")]["metrics"]
        # Hard masks at test time hide every background: the swapped variants equal the original exactly.
        for v in ("only_fg", "mixed_same", "mixed_rand", "mixed_next"):
            assert hard[v] == pytest.approx(hard["original"], abs=1e-12)


def test_table_and_report_print(tiny_result: tuple[StudyResult, Path]) -> None:
    result, out = tiny_result
    table = result.table()
    for text in ("Proxy-Anchor", "Multi-Similarity", "Recall@1", "MAP@R", "mix_rand", "BG-gap", "soft σ=0.2", "raw"):
        assert text in table
    assert "raw" not in result.table(raw=False).split("\n")[2]
    report = result.per_class_report(top=3)
    assert "reliance" in report
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert len(rows) == 2 * TINY["num_classes"]
    assert [int(r["rank"]) for r in rows[: TINY["num_classes"]]] == list(range(1, TINY["num_classes"] + 1))
    md = (out / "report.md").read_text()
    assert "![recall_by_mode](recall_by_mode.png)" in md
    assert "## All metrics" in md


def test_direction_of_the_effect() -> None:
    """No-mask models lose much more Recall@1 from original to mixed_rand than hard-mask models (two seeds)."""
    for seed in (0, 1):
        cfg = StudyConfig(**SMALL_PA, num_backgrounds=20, unique_homes=None, seed=seed)
        by = {r["mode"]: r for r in run_study(cfg).runs}
        drop_none = by["none"]["metrics"]["original"]["recall@1"] - by["none"]["metrics"]["mixed_rand"]["recall@1"]
        drop_hard = by["hard"]["metrics"]["original"]["recall@1"] - by["hard"]["metrics"]["mixed_rand"]["recall@1"]
        assert drop_hard == pytest.approx(0.0, abs=1e-12)
        assert drop_none > 0.4, (seed, drop_none)
        assert by["none"]["metrics"]["original"]["recall@1"] > 0.6, seed


def test_ranking_follows_home_background_distinctiveness() -> None:
    """Half the classes have a home of their own, half share one: the former rank first in the per-class report."""
    for seed in (0, 1, 2):
        cfg = StudyConfig(**SMALL_PA, unique_homes=5, num_backgrounds=6, seed=seed)
        result = run_study(cfg)
        distinct = result.dataset["background_distinctiveness"]
        assert sorted(distinct) == [0.2] * 5 + [1.0] * 5
        summary = per_class_summary(result, top=5)["proxy_anchor"]
        # typically +0.5 … +0.9; +0.87 is the most two distinctiveness levels of 5 classes each allow
        assert summary["spearman_reliance_share"] > 0.3, (seed, summary)
        # most of the 5 first-ranked classes have a home of their own: at least 3 (typically 4 or 5; all classes 0.6)
        assert summary["mean_distinctiveness_top"] >= (3 * 1.0 + 2 * 0.2) / 5 - 1e-9, (seed, summary)
        assert summary["mean_distinctiveness_all"] == pytest.approx(0.6)
        rows = per_class_rows(result)
        ranked = [r["reliance_share"] for r in rows]
        assert ranked == sorted(ranked, reverse=True)


def test_swap_queries_keeps_the_original_gallery() -> None:
    """Both protocols against a hand-made evaluation of the same (untrained) model."""
    from dml_bias.metrics import retrieval_metrics, sharded_retrieval_metrics

    base = {**TINY, "losses": ("proxy_anchor",), "modes": ("none",), "variants": ("original", "mixed_rand")}
    spec = RunSpec("proxy_anchor", "none")
    torch.manual_seed(0)
    model = SmallCNN(embedding_size=8, width=4).eval()
    results = {}
    for swap in ("both", "queries"):
        cfg = StudyConfig(**base, swap=swap)
        data = StudyData(cfg)
        results[swap] = evaluate_retrieval(cfg, data, model, spec, ["original", "mixed_rand"], torch.device("cpu"))[0]
    orig = embed(model, data.variant("original"), "none", None, False, data, torch.device("cpu"))
    mixed = embed(model, data.variant("mixed_rand"), "none", None, False, data, torch.device("cpu"))
    labels = data.test.labels
    ks = [1, 2, 4, 8]
    swapped_gallery = retrieval_metrics(mixed, labels, ks=ks)
    # query i is original item i: left out by its index (the reference's rows are other images than the queries)
    own = torch.arange(labels.numel())
    original_gallery = sharded_retrieval_metrics(mixed, labels, orig, labels, ks=ks, query_indices=own)
    for k in ("recall@1", "recall@8", "map@r"):
        assert results["both"]["metrics"]["mixed_rand"][k] == pytest.approx(float(swapped_gallery[k]))
        assert results["queries"]["metrics"]["mixed_rand"][k] == pytest.approx(float(original_gallery[k]))
    # Recall@1 by hand: each swapped query's nearest original image other than its own
    sim = torch.nn.functional.normalize(mixed.double(), dim=1) @ torch.nn.functional.normalize(orig.double(), dim=1).T
    sim[own, own] = -torch.inf
    hits = (labels[sim.argmax(dim=1)] == labels).double().mean()
    assert results["queries"]["metrics"]["mixed_rand"]["recall@1"] == pytest.approx(float(hits))
    # on the original images the two protocols coincide
    assert results["queries"]["metrics"]["original"] == pytest.approx(results["both"]["metrics"]["original"])


def test_interrupt_keeps_completed_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_train = study_module.train_model
    calls = {"n": 0}

    def train_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(study_module, "train_model", train_then_interrupt)
    cfg = StudyConfig(**{**TINY, "losses": ("proxy_anchor",), "modes": ("none", "hard")}, out_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["interrupted"] is True
    assert [r["mode"] for r in data["runs"]] == ["none"]


def _fake_result(rates: dict[str, dict[str, list[float]]], distinct: list[float]) -> StudyResult:
    """A result with hand-set per-class Recall@1 (10 queries per class) for a 'none' and a 'hard' run."""
    cfg = StudyConfig(losses=("proxy_anchor",), modes=("none", "hard"))
    runs = []
    for mode, per_variant in rates.items():
        pcs = {v: {str(c): r for c, r in enumerate(vals)} for v, vals in per_variant.items()}
        runs.append(
            {
                "loss": "proxy_anchor",
                "mode": mode,
                "sigma": None,
                "name": mode,
                "class_counts": {str(c): 10 for c in range(len(distinct))},
                "per_class_recall@1": {"metrics": pcs, "metrics_raw": pcs},
            }
        )
    names = [f"class{c}" for c in range(len(distinct))]
    return StudyResult(
        config=cfg,
        runs=runs,
        dataset={"class_names": names, "home_backgrounds": [0, 1, 2], "background_distinctiveness": distinct},
    )


def test_per_class_rows_hand_computed() -> None:
    result = _fake_result(
        {
            "none": {"original": [1.0, 0.9, 0.5], "mixed_rand": [0.2, 0.8, 0.4]},
            "hard": {"original": [0.7, 0.7, 0.6], "mixed_rand": [0.7, 0.7, 0.5]},
        },
        distinct=[1.0, 0.5, 0.5],
    )
    rows = per_class_rows(result)
    # failures = round(10 * (1 - R@1)); reliance = (none_v - none_o) - (hard_v - hard_o)
    by = {r["label"]: r for r in rows}
    assert (by[0]["failures_none"], by[0]["failures_hard"], by[0]["failures_none_original"]) == (8, 3, 0)
    assert by[0]["reliance"] == 8
    assert by[1]["reliance"] == 1
    assert by[2]["reliance"] == (6 - 5) - (5 - 4)
    assert by[0]["difference"] == 5
    assert by[2]["difference"] == 1
    assert by[2]["difference_original"] == 1
    # reliance_share = reliance / max(failures_none, 1)
    assert by[0]["reliance_share"] == pytest.approx(8 / 8)
    assert by[1]["reliance_share"] == pytest.approx(1 / 2)
    assert by[2]["reliance_share"] == pytest.approx(0 / 6)
    # ranked by reliance share (class 2 ranks below class 1 although its difference is larger)
    assert [r["label"] for r in rows] == [0, 1, 2]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    text = result.per_class_report(top=2)
    assert "class0" in text
    assert "top 2 0.75, all classes 0.67" in text
    summary = per_class_summary(result, top=2)["proxy_anchor"]
    # ranks of the share (3, 2, 1) against those of distinctiveness (3, 1.5, 1.5): Pearson of the ranks = 1.5/√3
    assert summary["spearman_reliance_share"] == pytest.approx(1.5 / 3**0.5)
    # difference (5, -1, 1) has ranks (3, 1, 2): deviations (1, -1, 0) · (1, -0.5, -0.5) = 1.5 as well
    assert summary["spearman_difference"] == pytest.approx(1.5 / 3**0.5)
    assert summary["spearman_background_alone"] is None
    assert (summary["top"], summary["mean_distinctiveness_top"]) == (2, pytest.approx(0.75))
    assert summary["mean_distinctiveness_all"] == pytest.approx(2 / 3)
    assert "reliance share (the ranking) +0.87" in text


def test_per_class_summary_with_ties_and_constant_scores() -> None:
    # every class fails alike: the share is constant, so its rank correlation is defined as 0
    result = _fake_result(
        {
            "none": {"original": [1.0, 1.0, 1.0], "mixed_rand": [0.5, 0.5, 0.5]},
            "hard": {"original": [0.7, 0.7, 0.7], "mixed_rand": [0.7, 0.7, 0.7]},
        },
        distinct=[1.0, 0.5, 0.5],
    )
    summary = per_class_summary(result)["proxy_anchor"]
    assert summary["spearman_reliance_share"] == 0.0
    assert summary["top"] == 3
    # ties are broken by label
    assert [r["label"] for r in per_class_rows(result)] == [0, 1, 2]
    # without distinctiveness (real data) there is nothing to correlate
    result.dataset["background_distinctiveness"] = None
    assert per_class_summary(result) == {}


def test_chance_recall() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1])
    # class 0 queries: 1 of 4 others; class 1 queries: 2 of 4 others
    assert chance_recall_at_1(labels) == pytest.approx((2 * 0.25 + 3 * 0.5) / 5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("modes", ("none", "blur"), "modes must be one of"),
        ("losses", ("triplet",), "losses must be one of"),
        ("dataset", "imagenet", "dataset must be one of"),
        ("swap", "gallery", "swap must be one of"),
        ("batch_size", 61, "multiple of m_per_class"),
        ("modes", (), "non-empty"),
        ("epochs", 0, "epochs must be"),
        ("dataset", "cub", "root must be"),
    ],
)
def test_config_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StudyConfig(**{field: value}).validate()


def test_home_background_layout() -> None:
    # default: half the classes have a home of their own, the others share one generic home
    assert StudyConfig().resolved_homes() == (16, 15)
    assert StudyConfig.quick().resolved_homes() == (9, 8)
    assert StudyConfig(num_classes=7).resolved_homes() == (4, 3)
    assert StudyConfig(unique_homes=10).resolved_homes() == (11, 10)
    assert StudyConfig(unique_homes=30).resolved_homes() == (30, 30)
    assert StudyConfig(num_backgrounds=20).resolved_homes() == (20, None)  # shared evenly
    assert StudyConfig().to_dict()["unique_homes_resolved"] == 15
    with pytest.raises(ValueError, match="unique_homes must be an integer in"):
        StudyConfig(unique_homes=31).validate()
    with pytest.raises(ValueError, match="num_backgrounds must exceed unique_homes=10"):
        StudyConfig(unique_homes=10, num_backgrounds=10).validate()


def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(study_module.StudyError, match="not a directory"):
        run_study(StudyConfig(**TINY, out_dir=str(target)))


# ------------------------------------------------------------------------------------ attribution in the study

ATTRIBUTION_KEYS = {
    "layer",
    "num_images",
    "foreground_energy",
    "foreground_empty",
    "foreground_chance",
    "background_shift",
    "object_shift",
    "background_sensitivity",
    "per_class",
}


def test_attribution_keys_in_results_report_and_csv(tiny_result: tuple[StudyResult, Path]) -> None:
    _result, out = tiny_result
    data = json.loads((out / "results.json").read_text())
    n_images = TINY["num_classes"] * StudyConfig().attribution_images
    assert data["config"]["attribution_images"] == 4
    assert len(data["dataset"]["attribution_images"]["indices"]) == n_images
    indices = data["dataset"]["attribution_images"]["indices"]
    donors = data["dataset"]["attribution_images"]["donors"]
    assert len(set(indices)) == len(donors) == n_images
    labels = StudyData(StudyConfig(**TINY)).test.labels
    # the first four images of every class, each with a donor of another class
    expected_indices = [int(j) for c in range(TINY["num_classes"]) for j in torch.nonzero(labels == c).flatten()[:4]]
    assert indices == expected_indices
    assert all(labels[d] != labels[i] for d, i in zip(donors, indices, strict=True))
    for run in data["runs"]:
        a = run["attribution"]
        assert set(a) == ATTRIBUTION_KEYS
        assert a["layer"] == "features"
        assert a["num_images"] == n_images
        assert set(a["per_class"]) == {str(c) for c in range(TINY["num_classes"])}
        # the chance level is the objects' mean area share, the same for every model
        assert a["foreground_chance"] == pytest.approx(data["runs"][0]["attribution"]["foreground_chance"])
        # the mean over images equals the count-weighted mean of the per-class means
        for key in ("background_shift", "object_shift"):
            weighted = sum(v[key] * v["count"] for v in a["per_class"].values()) / n_images
            assert a[key] == pytest.approx(weighted)
    assert set(data["attribution_summary"]) == {"proxy_anchor", "multi_similarity"}
    for summary in data["attribution_summary"].values():
        assert set(summary) == {
            "num_classes",
            "spearman_sensitivity_reliance_share",
            "spearman_sensitivity_distinctiveness",
            "spearman_background_energy_reliance_share",
            "spearman_background_energy_distinctiveness",
        }
    md = (out / "report.md").read_text()
    for text in ("## Attribution (no retraining)", "| foreground_energy |", "`spearman_sensitivity_reliance_share`"):
        assert text in md
    assert "![attribution_maps](attribution_maps.png)" in md
    assert (out / "attribution_maps.png").is_file()
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert list(rows[0]) == list(PER_CLASS_FIELDS)
    by_run = {(r["loss"], r["mode"]): r for r in data["runs"]}
    for row in rows:
        none = by_run[(row["loss"], "none")]["attribution"]["per_class"][row["label"]]
        assert float(row["background_sensitivity_none"]) == pytest.approx(none["background_sensitivity"])
        assert float(row["background_sensitivity_hard"]) == 0.0
    assert "bg-sens" in _result.table()


def test_hard_mask_model_has_zero_background_shift(tiny_result: tuple[StudyResult, Path]) -> None:
    """With hard masks the background is gone from the input, so swapping it cannot move the embedding."""
    result, _ = tiny_result
    for run in result.runs:
        a = run["attribution"]
        if run["mode"] == "hard":
            assert a["background_shift"] == 0.0
            assert a["background_sensitivity"] == 0.0
            assert all(v["background_shift"] == 0.0 for v in a["per_class"].values())
            assert a["object_shift"] > 0.0
        elif run["mode"] in ("none", "bg_augment"):
            assert a["background_shift"] > 0.0


def test_attribution_off(tmp_path: Path) -> None:
    cfg = StudyConfig(**{**TINY, "losses": ("proxy_anchor",), "modes": ("none",)}, attribution_images=0)
    result = run_study(cfg)
    assert "attribution" not in result.runs[0]
    assert result.attribution_maps is None
    assert result.to_dict()["attribution_summary"] == {}
    names = {p.name for p in result.save(tmp_path).values()}
    assert "attribution_maps.png" not in names


def test_figures_leave_the_matplotlib_backend_alone(tiny_result: tuple[StudyResult, Path], tmp_path: Path) -> None:
    import matplotlib

    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        paths = tiny_result[0].plot(tmp_path)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)
    assert {p.name for p in paths} == {
        "recall_by_mode.png",
        "per_class_failures.png",
        "retrieval_grid.png",
        "attribution_maps.png",
    }
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_soft_sigmas_must_lie_in_the_open_unit_interval() -> None:
    for bad in (1.0, 2.0, 0.0):
        with pytest.raises(ValueError, match=r"soft_sigmas must be a number in \(0.0, 1.0\)"):
            StudyConfig(soft_sigmas=(0.2, bad)).validate()
    StudyConfig(soft_sigmas=(0.01, 0.99)).validate()
    # without the soft mode the σ values are not used
    StudyConfig(modes=("none",), soft_sigmas=(2.0,)).validate()


def test_training_settings_user_values_win_over_the_recipe() -> None:
    cub = {"dataset": "cub", "root": "CUB_200_2011"}
    recipe = StudyConfig(**cub).resolved_training("multi_similarity")
    assert (recipe["lr"], recipe["weight_decay"], recipe["batch_size"], recipe["m_per_class"]) == (3e-5, 5e-4, 80, 5)
    own = StudyConfig(**cub, lr=1e-2, weight_decay=0.0, batch_size=12, m_per_class=3)
    for loss in ("proxy_anchor", "multi_similarity"):
        s = own.resolved_training(loss)
        assert (s["lr"], s["weight_decay"], s["batch_size"], s["m_per_class"], s["from_recipe"]) == (
            1e-2,
            0.0,
            12,
            3,
            [],
        )
    # a partial setting: the user's batch with the recipe's images per class must still fit
    with pytest.raises(ValueError, match="batch_size must be a multiple of m_per_class=4"):
        StudyConfig(**cub, batch_size=90).validate()
    synthetic = StudyConfig().to_dict()["training_resolved"]["proxy_anchor"]
    assert synthetic == {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 60, "m_per_class": 5}


def test_runs_record_the_settings_actually_used(tiny_result: tuple[StudyResult, Path]) -> None:
    result, _ = tiny_result
    for run in result.runs:
        assert run["training"] == {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 12, "m_per_class": 3, "epochs": 1}
