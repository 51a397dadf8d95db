"""What the study figures show: MAP@R beside Recall@1, discrete colours, full names, images as the models saw them."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from matplotlib import colormaps
from matplotlib.colors import to_rgb
from test_plot_layout import small_study

from dml_bias.bias import StudyResult, plots
from dml_bias.bias.analysis import LOSS_TITLES, per_class_rows
from dml_bias.transforms.functional import mask_background


@pytest.fixture(scope="module")
def result() -> StudyResult:
    return small_study()


def _squash(text: str) -> str:
    return re.sub(r"\s", "", text)


# ------------------------------------------------------------------------------------------------ wrap_name


def test_wrap_name_breaks_after_separators_and_keeps_every_character() -> None:
    assert plots.wrap_name("ellipse/blue/solid/back/contrast", 18) == "ellipse/blue/\nsolid/back/\ncontrast"
    assert plots.wrap_name("001.Black_footed_Albatross", 12) == "001.Black_\nfooted_\nAlbatross"
    assert plots.wrap_name("Black footed Albatross", 12) == "Black footed\nAlbatross"
    # No separator: cut into pieces of the width, nothing dropped.
    assert plots.wrap_name("abcdefghijklmnopqrstuvwxyz", 10) == "abcdefghij\nklmnopqrst\nuvwxyz"
    assert plots.wrap_name("short", 18) == "short"


@given(st.text(alphabet="ab/_- .", min_size=1, max_size=60), st.integers(4, 30))
def test_wrap_name_lines_fit_and_only_whitespace_changes(name: str, width: int) -> None:
    wrapped = plots.wrap_name(name, width)
    if name.strip():
        assert all(len(line) <= width for line in wrapped.split("\n"))
    assert _squash(wrapped) == _squash(name)


# --------------------------------------------------------------------------------------------------- as_seen


def test_as_seen_masks_like_the_models_input() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(1, 256, (3, 6, 6), generator=gen, dtype=torch.uint8)
    mask = torch.zeros(1, 6, 6, dtype=torch.uint8)
    mask[:, 2:4, 1:5] = 255
    before = image.clone(), mask.clone()
    hard = plots.as_seen(image, mask, "hard", None)
    fg = mask[0] > 0
    assert torch.equal(hard[:, fg], image[:, fg])
    assert int(hard[:, ~fg].abs().sum()) == 0  # the background zeroed
    soft = plots.as_seen(image, mask, "soft", 0.25)
    expected = torch.round(image.float() * 0.25).to(torch.uint8)
    assert torch.equal(soft[:, ~fg], expected[:, ~fg])
    assert torch.equal(soft[:, fg], image[:, fg])
    assert torch.equal(soft, mask_background(image, mask, "soft", sigma=0.25))
    for mode in ("none", "bg_augment", "channel"):
        assert torch.equal(plots.as_seen(image, mask, mode, None), image)
    assert torch.equal(image, before[0])
    assert torch.equal(mask, before[1])


# ------------------------------------------------------------------------------------------- recall by mode


def test_recall_figure_puts_map_at_r_beside_recall_at_1(result: StudyResult) -> None:
    fig = plots.recall_by_mode_figure(result)
    losses = list(dict.fromkeys(r["loss"] for r in result.runs))
    titled = {ax.get_title(): ax for ax in fig.axes}
    for loss in losses:
        runs = [r for r in result.runs if r["loss"] == loss]
        left = titled[f"{LOSS_TITLES[loss]}: Recall@1 and MAP@R"]
        heights = [p.get_height() for p in left.patches]
        expected = [r["metrics"]["original"]["recall@1"] for r in runs]
        expected += [r["metrics"]["original"]["map@r"] for r in runs]
        assert heights == pytest.approx(expected)
        # each MAP@R bar stands right beside its Recall@1 bar
        xs = [p.get_x() for p in left.patches]
        n = len(runs)
        assert all(0 < xs[n + i] - xs[i] < 0.5 for i in range(n))
        right = titled[f"{LOSS_TITLES[loss]}: Recall@k"]
        ks = [r["metrics"]["original"][k] for k in plots.KS for r in runs]
        assert [p.get_height() for p in right.patches] == pytest.approx(ks)
        assert left.get_legend() is None
        assert right.get_legend() is None
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    labels = {t.get_text() for t in legends[0].get_texts()}
    assert {"Recall@1", "MAP@R", "Recall@8", "Recall@1 on mixed_rand (own mode)"} <= labels


# --------------------------------------------------------------------------------------- per-class failures


def test_per_class_figure_has_one_discrete_colour_per_home_count(result: StudyResult) -> None:
    fig = plots.per_class_figure(result)
    rows = per_class_rows(result)
    counts = [round(1 / r["background_distinctiveness"]) for r in rows]
    levels = sorted(set(counts))
    assert len(levels) >= 2  # shared and own homes: the colour has something to show
    scatters = [c for ax in fig.axes for c in ax.collections]
    assert len(scatters) == len(dict.fromkeys(r["loss"] for r in rows))
    for scatter in scatters:
        assert scatter.cmap.N == len(levels)  # a ListedColormap with one colour per count
        assert list(scatter.norm.boundaries) == [i - 0.5 for i in range(len(levels) + 1)]
    first = [r for r in rows if r["loss"] == rows[0]["loss"]]
    colours = scatters[0].get_facecolors()
    for r, colour in zip(first, colours, strict=True):
        want = plots.COUNT_COLOURS[levels.index(round(1 / r["background_distinctiveness"]))]
        assert np.allclose(colour[:3], to_rgb(want))
    (legend,) = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    texts = [t.get_text() for t in legend.get_texts()]
    for n in levels:
        assert ("own home background" if n == 1 else f"home shared by {n} classes") in texts


def test_spread_keeps_equal_points_apart_and_near_their_counts() -> None:
    points = [(3, 4), (3, 4), (3, 4), (3, 4), (7, 0)]
    got = plots.spread(points, 0.4)
    # four on a circle of radius 0.4 around (3, 4), a quarter turn apart; the single one stays
    assert np.array(got) == pytest.approx(np.array([(3.4, 4.0), (3.0, 4.4), (2.6, 4.0), (3.0, 3.6), (7.0, 0.0)]))
    assert plots.spread([(1, 1), (2, 2)], 0.4) == [(1.0, 1.0), (2.0, 2.0)]


def test_per_class_points_sit_at_their_failure_counts(result: StudyResult) -> None:
    fig = plots.per_class_figure(result)
    rows = per_class_rows(result)
    scatters = [c for ax in fig.axes for c in ax.collections]
    first = [r for r in rows if r["loss"] == rows[0]["loss"]]
    drawn = scatters[0].get_offsets()
    true = np.array([(r["failures_none"], r["failures_hard"]) for r in first], dtype=float)
    assert np.all(np.hypot(*(drawn - true).T) < 0.5)  # within half a failure of the true counts
    assert len({(round(a, 6), round(b, 6)) for a, b in drawn}) == len(first)  # no two on one spot


def test_per_class_figure_lists_the_top_classes_by_full_name(result: StudyResult) -> None:
    fig = plots.per_class_figure(result, top=3)
    rows = per_class_rows(result)
    keys = [t.get_text() for ax in fig.axes if not ax.axison for t in ax.texts]
    assert len(keys) == len(dict.fromkeys(r["loss"] for r in rows))
    for loss, key in zip(dict.fromkeys(r["loss"] for r in rows), keys, strict=True):
        ranked = sorted((r for r in rows if r["loss"] == loss), key=lambda r: r["rank"])
        for r in ranked[:3]:
            assert _squash(f"{r['rank']}. {r['class_name']}") in _squash(key)
        assert re.findall(r"^(\d+)\. ", key, flags=re.M) == ["1", "2", "3"]


# ------------------------------------------------------------------------------------------- retrieval grid


def test_retrieval_grid_shows_what_each_model_saw(result: StudyResult) -> None:
    fig = plots.retrieval_grid_figure(result)
    grid = result.grid
    assert grid is not None
    modes = list(grid["models"])
    k = grid["models"][modes[0]]["neighbour_labels"].shape[1]
    image_axes = [ax for ax in fig.axes if ax.images]
    names = result.dataset["class_names"]
    for qi in range(grid["query_labels"].numel()):
        for mi, mode in enumerate(modes):
            row = image_axes[(qi * len(modes) + mi) * (k + 1) : (qi * len(modes) + mi + 1) * (k + 1)]
            shown = np.asarray(row[0].images[0].get_array())
            seen = plots.as_seen(grid["query_images"][qi], grid["query_masks"][qi], mode, None)
            assert np.array_equal(shown, seen.permute(1, 2, 0).numpy())
            label = row[0].get_ylabel()
            assert label.startswith(f"{mode} model")
            assert _squash(names[int(grid["query_labels"][qi])]) in _squash(label)
            for j, ax in enumerate(row[1:]):
                wrong = int(grid["models"][mode]["neighbour_labels"][qi, j]) != int(grid["query_labels"][qi])
                spine = ax.spines["left"]
                assert (spine.get_edgecolor()[:3] == (1.0, 0.0, 0.0)) == wrong
                assert (spine.get_linestyle() == "--") == wrong
    assert "hard" in modes


# --------------------------------------------------------------------------------------------- attribution


def _rows(fig: object, columns: int) -> list[list[object]]:
    image_axes = [ax for ax in fig.axes if ax.images]  # type: ignore[attr-defined]
    return [image_axes[i : i + columns] for i in range(0, len(image_axes), columns)]


def test_attribution_figure_has_every_model_of_both_losses_masked_as_seen(result: StudyResult) -> None:
    data = result.attribution_maps
    assert data is not None
    fig = plots.attribution_figure(result)
    picks = plots.attribution_pairs(result)
    rows = _rows(fig, 2 * len(picks))
    models = data["models"]
    assert len(rows) == len(models) == len(result.runs)
    assert {m["loss"] for m in models} == {"proxy_anchor", "multi_similarity"}
    for row, model in zip(rows, models, strict=True):
        loss, mode, sigma = plots.model_spec(result, model)
        assert row[0].get_ylabel() == f"{LOSS_TITLES[loss]}\n{model['name']}"
        query = int(data["indices"][picks[0]])
        shown = np.asarray(row[0].images[0].get_array())
        seen = plots.as_seen(data["images"][query], data["masks"][query], mode, sigma)
        assert np.array_equal(shown, seen.permute(1, 2, 0).numpy())
        if mode == "hard":
            assert not np.array_equal(shown, data["images"][query].permute(1, 2, 0).numpy())
        # the channel model's mask is outlined
        assert bool(row[0].collections) == (mode == "channel")
        # the map over it: RdBu_r colours, opacity proportional to |map| / max |map|
        heat = model["query_maps"][picks[0]].double().numpy()
        scaled = heat / np.abs(heat).max()
        rgba = np.asarray(row[0].images[1].get_array())
        assert rgba[..., 3] == pytest.approx(plots.HEAT_ALPHA * np.abs(scaled))
        assert rgba[..., :3] == pytest.approx(colormaps["RdBu_r"]((scaled + 1) / 2)[..., :3])
    titles = [ax.get_title(loc="left") for ax in rows[0][::2]]
    names = result.dataset["class_names"]
    for title, pos in zip(titles, picks, strict=True):
        label = int(data["test_labels"][int(data["indices"][pos])])
        assert _squash(names[label]) in _squash(title)
    (bar,) = [ax for ax in fig.axes if not ax.images and ax.get_xlabel()]
    assert bar.get_xlim() == pytest.approx((-1.0, 1.0))
    assert "takes from the similarity" in bar.get_xlabel()
    assert "adds to it" in bar.get_xlabel()


def test_attribution_figure_without_stored_modes_uses_the_runs(result: StudyResult) -> None:
    """Entries as older studies stored them (no loss/mode/σ, first loss only) get their mode from the runs."""
    old = copy.copy(result)
    data = dict(result.attribution_maps or {})
    first = data["loss"]
    data["models"] = [
        {k: v for k, v in m.items() if k not in ("loss", "mode", "sigma")} for m in data["models"] if m["loss"] == first
    ]
    old.attribution_maps = data
    specs = [plots.model_spec(old, m) for m in data["models"]]
    expected = [(r["loss"], r["mode"], r["sigma"]) for r in result.runs if r["loss"] == first]
    assert specs == expected
    fig = plots.attribution_figure(old)
    assert len(_rows(fig, 2 * len(plots.attribution_pairs(old)))) == len(expected)
    with pytest.raises(ValueError, match="no mode and no run"):
        plots.model_spec(old, {"name": "nonexistent"})


def test_figures_skip_what_the_result_has_no_data_for(result: StudyResult) -> None:
    bare = copy.copy(result)
    bare.attribution_maps = None
    bare.grid = None
    assert sorted(plots.figures(bare)) == ["per_class_failures", "recall_by_mode"]
    with pytest.raises(ValueError, match="attribution maps"):
        plots.attribution_figure(bare)
    with pytest.raises(ValueError, match="retrieval grid"):
        plots.retrieval_grid_figure(bare)
