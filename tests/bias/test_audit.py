"""The background-bias audit: ground truth by construction, every model spec, the study round trip, the bootstrap
interval against a slow reference, the report files and every bad input of the issue."""

from __future__ import annotations

import html as html_module
import json
import math
import re
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from dml_bias.bias import VARIANTS, AuditError, StudyConfig, audit, run_study
from dml_bias.bias import cli as cli_module
from dml_bias.bias._model_spec import find_layer, load_model
from dml_bias.bias._variants import make_batch_variants
from dml_bias.bias.audit import bootstrap_ci, bootstrap_indices, open_data
from dml_bias.datasets import MaskedFolder
from dml_bias.transforms.functional import make_variant

SIZE, TOP, SIDE = 32, 12, 8  # the object: rows and columns 12..19 of a 32 x 32 image
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

# Ground-truth models, importable as a factory (module.path:callable) from a file the tests write.
MODELS_SOURCE = textwrap.dedent(
    f"""
    import torch
    from torch import nn

    TOP, SIDE = {TOP}, {SIDE}


    class WindowPool(nn.Module):
        '''A fixed 1x1 projection, then the mean inside (object) or outside (background) the object window.'''

        def __init__(self, inside: bool) -> None:
            super().__init__()
            self.inside = inside
            self.features = nn.Conv2d(3, 6, 1, bias=False)
            g = torch.Generator().manual_seed(3)
            with torch.no_grad():
                self.features.weight.copy_(torch.randn(6, 3, 1, 1, generator=g))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.features(x)
            window = torch.zeros(f.shape[-2:], dtype=f.dtype, device=f.device)
            window[TOP : TOP + SIDE, TOP : TOP + SIDE] = 1.0
            weight = window if self.inside else 1.0 - window
            return (f * weight).sum(dim=(2, 3)) / weight.sum()


    def object_only() -> nn.Module:
        return WindowPool(True)


    def background_only() -> nn.Module:
        return WindowPool(False)


    def true_masks(images: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(images.shape[0], images.shape[-2], images.shape[-1], device=images.device)
        out[:, TOP : TOP + SIDE, TOP : TOP + SIDE] = 1.0
        return out


    def not_a_module() -> int:
        return 3
    """
)


@pytest.fixture(scope="module")
def factories(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("audit_models")
    (folder / "audit_gt_models.py").write_text(MODELS_SOURCE)
    sys.path.insert(0, str(folder))
    import audit_gt_models

    yield audit_gt_models
    sys.path.remove(str(folder))


class GroundTruth(torch.utils.data.Dataset):
    """Classes with their own object colour and their own background colour; the object at a fixed window."""

    def __init__(self, classes: int = 4, per_class: int = 6, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(classes).repeat_interleave(per_class)
        self.class_names = [f"class{c}" for c in range(classes)]
        hues = torch.rand(classes, 3, generator=g)
        object_colour = 40 + 180 * hues
        background_colour = 40 + 180 * torch.rand(classes, 3, generator=g)
        n = self.labels.numel()
        jitter_o = torch.randn(n, 3, generator=g) * 4
        jitter_b = torch.randn(n, 3, generator=g) * 4
        self.images = torch.empty(n, 3, SIZE, SIZE, dtype=torch.uint8)
        self.masks = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.uint8)
        self.masks[:, :, TOP : TOP + SIDE, TOP : TOP + SIDE] = 255
        for i, c in enumerate(self.labels.tolist()):
            bg = (background_colour[c] + jitter_b[i]).round().clamp(0, 255).to(torch.uint8)
            ob = (object_colour[c] + jitter_o[i]).round().clamp(0, 255).to(torch.uint8)
            self.images[i] = bg.view(3, 1, 1)
            self.images[i, :, TOP : TOP + SIDE, TOP : TOP + SIDE] = ob.view(3, 1, 1)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "mask": self.masks[i], "label": int(self.labels[i])}


def _write_folder(root: Path, data: GroundTruth, masks: bool = True) -> Path:
    for i in range(len(data)):
        name = data.class_names[int(data.labels[i])]
        folder = root / "images" / name if masks else root / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
        if masks:
            (root / "masks" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.masks[i, 0].numpy()).save(root / "masks" / name / f"{i:03d}.png")
    return root


def _numbers(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ("settings", "timings", "model", "data")}


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli_module.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --------------------------------------------------------------------------------------- ground truth


def test_ground_truth_object_only_and_background_only(factories: Any) -> None:
    data = GroundTruth()
    kw: dict[str, Any] = {"mean": MEAN, "std": STD, "bootstrap": 200, "attribution_images": 2, "progress": False}
    obj = audit(factories.object_only(), data, **kw)
    bg = audit(factories.background_only(), data, **kw)
    chance = obj.chance_recall_at_1
    assert chance == pytest.approx(5 / 23)
    # object-only: the object decides, backgrounds change nothing
    assert obj.variants["original"]["recall@1"] == 1.0
    assert obj.variants["mixed_rand"]["recall@1"] == 1.0
    assert obj.bg_gap["value"] == 0.0
    assert obj.bg_gap["ci"] == [0.0, 0.0]
    assert obj.background_sensitivity["mean"] == 0.0
    assert obj.foreground_energy["mean"] == pytest.approx(1.0, abs=1e-6)
    assert obj.foreground_energy["chance"] == pytest.approx(SIDE * SIDE / SIZE**2)
    assert "no measurable part" in obj.verdict()
    # background-only: the background decides
    assert bg.variants["original"]["recall@1"] == 1.0
    assert bg.variants["only_bg_t"]["recall@1"] == 1.0
    assert bg.variants["mixed_rand"]["recall@1"] <= chance + 0.15
    assert bg.bg_gap["value"] >= 0.6
    assert bg.bg_gap["ci"][0] > 0.4
    assert bg.background_sensitivity["mean"] == pytest.approx(1.0, abs=1e-9)
    assert bg.foreground_energy["mean"] == pytest.approx(0.0, abs=1e-6)
    assert re.match(
        r"Recall@1 falls from 1\.00 \[1\.00, 1\.00\] to \.\d\d \[.*\] when backgrounds are swapped: \d+ points",
        bg.verdict(),
    )
    # per class: every class of the background-only model loses its Recall@1, none of the object-only model's does
    assert [r["recall@1_drop"] for r in obj.per_class] == [0.0] * 4
    assert all(r["recall@1_drop"] >= 0.5 for r in bg.per_class)
    assert {r["label"] for r in bg.per_class} == {0, 1, 2, 3}


def test_per_query_values_average_to_the_study_metrics(factories: Any) -> None:
    data = GroundTruth(seed=1)
    # a random projection model: imperfect retrieval, so the per-query values are not all 1
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    res = audit(model, data, bootstrap=20, attribution_images=0, progress=False)
    for v in VARIANTS:
        pq = res.per_query[v]
        assert float(pq["recall@1"].mean()) == pytest.approx(res.variants[v]["recall@1"], abs=1e-12)
        assert float(pq["map@r"].mean()) == pytest.approx(res.variants[v]["map@r"], abs=1e-9)
    assert res.settings["layer"] is None
    assert res.foreground_energy["num_images"] == 0


# --------------------------------------------------------------------------------------- bootstrap


def _slow_percentile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def test_bootstrap_interval_against_a_slow_reference() -> None:
    values = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.25, 0.5, 1.0, 0.0, 0.75, 1.0], dtype=torch.float64)
    idx = bootstrap_indices(values.numel(), 500, seed=7)
    # the same draws, re-made by hand
    g = torch.Generator().manual_seed(7)
    draws = torch.randint(values.numel(), (500, values.numel()), generator=g).tolist()
    means = sorted(sum(float(values[j]) for j in row) / len(row) for row in draws)
    expected = [_slow_percentile(means, 0.025), _slow_percentile(means, 0.975)]
    got = bootstrap_ci(values, idx)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[0] < float(values.mean()) < got[1]


# --------------------------------------------------------------------------------------- batched variants


def test_batched_variants_equal_make_variant() -> None:
    g = torch.Generator().manual_seed(0)
    n, h, w = 12, 18, 15
    images = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    masks = torch.zeros(n, 1, h, w, dtype=torch.uint8)
    for i in range(n):
        t, left = int(torch.randint(0, h - 2, (1,), generator=g)), int(torch.randint(0, w - 2, (1,), generator=g))
        masks[i, 0, t : t + 1 + i % 7, left : left + 2 + i % 5] = 255 if i % 3 else 1
    masks[0] = 0  # no object
    masks[1] = 255  # all object: no free strip to tile from
    masks[2, 0, 3:9, 4:10] = torch.randint(0, 256, (6, 6), generator=g, dtype=torch.uint8)  # soft levels
    perm = torch.randperm(n, generator=g)
    donors = {v: (images[perm], masks[perm]) for v in ("mixed_same", "mixed_rand", "mixed_next")}
    made = make_batch_variants(VARIANTS, images, masks, donors)
    for v in VARIANTS:
        ref = [
            make_variant(v, images[i], masks[i], (images[perm[i]], masks[perm[i]]) if v.startswith("mixed") else None)[
                0
            ]
            for i in range(n)
        ]
        assert torch.equal(made[v], torch.stack(ref)), v


# --------------------------------------------------------------------------------------- model specs


def test_every_model_spec_on_a_tiny_folder(factories: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = GroundTruth(classes=3, per_class=3)
    root = _write_folder(tmp_path / "data", data)
    common = ["--data", str(root), "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25", "--bootstrap", "50"]
    common += ["--no-progress", "--attribution-images", "1", "--layer", "input", "--no-figures"]
    model = factories.background_only().eval()
    scripted = tmp_path / "bg.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; users still have TorchScript files
        torch.jit.trace(model, torch.zeros(2, 3, SIZE, SIZE)).save(str(scripted))
    exported = tmp_path / "bg.pt2"
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.zeros(2, 3, SIZE, SIZE),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(exported))
    weights = tmp_path / "bg_weights.pth"
    torch.save(model.state_dict(), weights)
    results = {}
    for name, spec in (
        ("torchscript", [str(scripted)]),
        ("export", [str(exported)]),
        ("factory", ["audit_gt_models:background_only", "--weights", str(weights)]),
    ):
        out = tmp_path / f"out_{name}"
        status, stdout, err = _run_cli(["audit", "--model", *spec, *common, "--out", str(out)], capsys)
        assert status == 0, err
        assert "when backgrounds are swapped" in stdout
        results[name] = json.loads((out / "results.json").read_text())
        assert results[name]["settings"]["model_kind"] == name
    # TorchScript and factory forms of one model (and the exported program) give identical numbers
    assert _numbers(results["torchscript"]) == _numbers(results["factory"])
    assert _numbers(results["export"])["variants"] == _numbers(results["factory"])["variants"]
    # torchvision + weights, head replaced by identity (random init, nothing downloaded)
    import torchvision

    tv_weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tv_weights)
    out = tmp_path / "out_tv"
    status, _, err = _run_cli(
        ["audit", "--model", "torchvision:resnet18", "--weights", str(tv_weights), *common[:-3], "--out", str(out)],
        capsys,
    )
    assert status == 0, err
    tv = json.loads((out / "results.json").read_text())
    assert tv["settings"]["layer"] == "layer3"
    assert tv["num_images"] == 9
    loaded = load_model("torchvision:resnet18", tv_weights)
    assert isinstance(loaded.module.fc, nn.Identity)


def test_layer_finder_dry_run(factories: Any) -> None:
    assert find_layer(factories.object_only(), torch.zeros(2, 3, 8, 8)) == "features"
    import torchvision

    assert find_layer(torchvision.models.resnet18(weights=None).eval(), torch.zeros(1, 3, 64, 64)) == "layer4"
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(AuditError, match=r"no sub-module of the model outputs a 4-D .* pass --layer NAME"):
        find_layer(flat, torch.zeros(2, 3, 8, 8))


# --------------------------------------------------------------------------------------- study round trip


def test_saved_study_model_reproduces_the_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = StudyConfig.quick(
        losses=("proxy_anchor",),
        modes=("none", "channel"),
        num_classes=4,
        images_per_class=6,
        image_size=16,
        batch_size=12,
        m_per_class=3,
        epochs=1,
        attribution_images=1,
        progress=False,
        out_dir=str(tmp_path / "study"),
        save_models=True,
    )
    res = run_study(cfg)
    for run in res.runs:
        path = Path(run["model_file"])
        assert path.is_file()
        assert path.with_suffix(".json").is_file()
        out = tmp_path / f"audit_{path.stem}"
        argv = ["audit", "--model", str(path), "--data", "synthetic", "--bootstrap", "30", "--no-progress"]
        status, _, err = _run_cli([*argv, "--out", str(out), "--no-figures"], capsys)
        assert status == 0, err
        got = json.loads((out / "results.json").read_text())
        for v in VARIANTS:
            assert got["variants"][v]["recall@1"] == run["metrics"][v]["recall@1"], (path.stem, v)
            assert got["variants"][v]["map@r"] == run["metrics"][v]["map@r"], (path.stem, v)
        assert got["bg_gap"]["value"] == run["background_gap"]
        assert got["chance_recall@1"] == res.dataset["chance_recall@1"]
        assert got["settings"]["mask_input"] == run["mode"]
        assert got["num_images"] == 24
        _check_saved_model_holds_its_norm(path)
    # a study without out_dir cannot save models
    with pytest.raises(ValueError, match="save_models=True needs out_dir"):
        StudyConfig(save_models=True).validate()


def _check_saved_model_holds_its_norm(path: Path) -> None:
    """The file holds the model without its last F.normalize; the loader adds it back in Python, so the
    attribution can hold its norm: the input-level maps equal gradient × input of ⟨z, r̂⟩ / ‖z‖ with ‖z‖ detached."""
    from dml_bias.bias import similarity_decomposition
    from dml_bias.bias._model_spec import L2Normalized, load_model

    loaded = load_model(str(path))
    assert isinstance(loaded.module, L2Normalized)
    assert loaded.sidecar is not None
    assert loaded.sidecar["normalize"] is True
    channels = 4 if loaded.sidecar["mode"] == "channel" else 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, 16, 16, generator=g)
    with torch.no_grad():
        z = loaded.module.inner(x)
        r = torch.randn(2, z.shape[1], generator=g)
        assert not torch.allclose(z.norm(dim=1), torch.ones(2))  # unnormalised in the file
        torch.testing.assert_close(loaded.module(x), torch.nn.functional.normalize(z, dim=1))
    leaf = x.clone().requires_grad_(True)
    z = loaded.module.inner(leaf)
    score = (z * torch.nn.functional.normalize(r, dim=1)).sum(dim=1) / z.norm(dim=1).detach()
    (grad,) = torch.autograd.grad(score.sum(), leaf)
    maps = similarity_decomposition(loaded.module, x, r).maps
    torch.testing.assert_close(maps, (x * grad).sum(dim=1), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------- masks from a callable


def test_masks_from_a_callable_returning_the_true_masks(factories: Any, tmp_path: Path) -> None:
    data = GroundTruth(classes=3, per_class=4)
    with_masks = MaskedFolder(_write_folder(tmp_path / "masked", data))
    without = MaskedFolder(_write_folder(tmp_path / "plain", data, masks=False), masks=False)
    kw: dict[str, Any] = {"mean": MEAN, "std": STD, "bootstrap": 100, "attribution_images": 2, "progress": False}
    a = audit(factories.background_only(), with_masks, **kw)
    b = audit(factories.background_only(), without, masks_from=factories.true_masks, **kw)
    assert _numbers(a.to_dict()) == _numbers(b.to_dict())
    assert b.settings["mask_source"] == "masks_from"
    assert a.settings["mask_source"] == "dataset"


# --------------------------------------------------------------------------------------- outputs


def test_report_files_and_self_contained_html(factories: Any, tmp_path: Path) -> None:
    res = audit(factories.background_only(), GroundTruth(), mean=MEAN, std=STD, bootstrap=50, progress=False)
    paths = res.save(tmp_path / "out")
    names = sorted(p.name for p in paths.values())
    assert {"results.json", "per_class.csv", "report.md", "report.html", "audit_variants.png"} <= set(names)
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]
    d = json.loads((tmp_path / "out" / "results.json").read_text())
    assert d["schema"] == "dml_bias.audit/1"
    assert set(d["variants"]) == set(VARIANTS)
    for v in VARIANTS:
        assert set(d["variants"][v]) >= {"recall@1", "recall@1_ci", "map@r", "map@r_ci"}
    assert set(d["bg_gap"]) >= {"value", "ci"}
    assert isinstance(d["chance_recall@1"], float)
    assert set(d["background_sensitivity"]) >= {"mean", "ci"}
    assert set(d["foreground_energy"]) >= {"mean", "chance", "ci"}
    row_keys = {
        "label",
        "name",
        "count",
        "recall@1",
        "mixed_rand_recall@1",
        "background_sensitivity",
        "foreground_energy",
    }
    assert all(row_keys <= set(r) for r in d["per_class"])
    assert len(d["per_class"]) == 4
    assert d["num_images"] == 24
    assert d["num_classes"] == 4
    assert isinstance(d["model"], str)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "http://" not in html
    assert "https://" not in html
    assert not re.search(r"<script[^>]*src=", html)
    assert not re.search(r"<link[^>]*href=", html)
    assert not re.search(r"""src="(?!data:image/png;base64,)""", html)
    assert "@import" not in html
    assert "url(" not in html
    assert html.count("data:image/png;base64,") >= 3
    assert html_module.escape(res.verdict()) in html
    csv_lines = (tmp_path / "out" / "per_class.csv").read_text().splitlines()
    assert csv_lines[0].startswith("label,name,count,recall@1,mixed_rand_recall@1")
    assert len(csv_lines) == 5


def test_model_is_left_as_it_was(factories: Any) -> None:
    model = factories.object_only().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = GroundTruth(classes=2, per_class=3)
    images = data.images.clone()
    audit(model, data, bootstrap=10, attribution_images=1, progress=False)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(images, data.images)


# --------------------------------------------------------------------------------------- bad input


def test_bad_data_inputs(factories: Any, tmp_path: Path) -> None:
    model = factories.object_only()
    data = GroundTruth(classes=2, per_class=3)
    kw: dict[str, Any] = {"bootstrap": 10, "attribution_images": 0, "progress": False}
    lonely = GroundTruth(classes=2, per_class=3)
    lonely.labels = torch.tensor([0, 0, 0, 0, 0, 1])
    with pytest.raises(AuditError, match="class 'class1' has a single image"):
        audit(model, lonely, **kw)
    empty = GroundTruth(classes=2, per_class=3)
    empty.masks[1] = 0
    with pytest.warns(UserWarning, match="1 of 6 images have an all-background mask"):
        audit(model, empty, **kw)
    bad_mask = GroundTruth(classes=2, per_class=3)
    bad_mask.masks = torch.zeros(6, 1, 5, 5, dtype=torch.uint8)
    with pytest.raises(AuditError, match=r"sample 0: the mask has size \(5, 5\) but the image \(32, 32\)"):
        audit(model, bad_mask, **kw)

    class NoMask(GroundTruth):
        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"image": self.images[i], "label": int(self.labels[i])}

    with pytest.raises(AuditError, match="has no 'mask'; give masks_from"):
        audit(model, NoMask(classes=2, per_class=3), **kw)
    with pytest.raises(AuditError, match=r"masks_from must return shape \(6, 32, 32\)"):
        audit(model, data, masks_from=lambda x: torch.zeros(2, 2), **kw)
    with pytest.raises(AuditError, match=r"masks_from must return object probabilities in \[0, 1\]"):
        audit(model, data, masks_from=lambda x: torch.full(x.shape[:1] + x.shape[2:], 2.0), **kw)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        audit("model", data, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask_input must be one of"):
        audit(model, data, mask_input="blur", **kw)
    with pytest.raises(ValueError, match="bootstrap"):
        audit(model, data, bootstrap=0, progress=False)
    with pytest.raises(ValueError, match="mean must be three numbers"):
        audit(model, data, mean=(0.5, 0.5), **kw)
    with pytest.raises(AuditError, match="layer 'nope' is not a sub-module"):
        audit(model, data, layer="nope", bootstrap=10, progress=False)


def test_bad_command_lines(factories: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = GroundTruth(classes=2, per_class=2)
    root = _write_folder(tmp_path / "data", data)
    (root / "masks" / "class1" / "003.png").unlink()
    weights = tmp_path / "w.pth"
    torch.save({"features.weight": torch.zeros(6, 3, 1, 1), "extra.bias": torch.zeros(2)}, weights)
    script = tmp_path / "broken.pt"
    script.write_bytes(b"not torchscript")
    cases = [
        (["--model", str(tmp_path / "none.pt"), "--data", "synthetic"], "is neither an existing file"),
        (["--model", str(script), "--data", "synthetic"], "cannot load .* as a TorchScript model"),
        (["--model", "no_such_module_xyz:f", "--data", "synthetic"], "cannot import 'no_such_module_xyz'"),
        (["--model", "audit_gt_models:missing", "--data", "synthetic"], "has no attribute 'missing'"),
        (["--model", "audit_gt_models:not_a_module", "--data", "synthetic"], "must return a torch.nn.Module"),
        (["--model", "audit_gt_models:object_only", "--weights", str(weights), "--data", "synthetic"],
         r"does not fit the model; unexpected keys: extra\.bias"),
        (["--model", "audit_gt_models:object_only", "--weights", str(tmp_path / "x.pth"), "--data", "synthetic"],
         "is not a file"),
        (["--model", "torchvision:no_such_net", "--data", "synthetic"], "torchvision has no model 'no_such_net'"),
        (["--model", "audit_gt_models:object_only", "--data", str(root)], r"missing mask file .*class1/003\.png"),
        (["--model", "audit_gt_models:object_only", "--data", str(tmp_path / "nowhere")], "missing data folder"),
        (["--model", "audit_gt_models:object_only", "--data", "synthetic", "--mask-input", "soft:2"],
         "expected none, hard, soft:σ"),
        (["--model", "audit_gt_models:object_only", "--data", "synthetic", "--masks-from", "nocolon"],
         "--masks-from must be module.path:callable"),
    ]  # fmt: skip
    for argv, message in cases:
        status, _, err = _run_cli(["audit", *argv, "--no-progress", "--out", str(tmp_path / "o")], capsys)
        assert status == 2, (argv, err)
        last = err.strip().splitlines()[-1]
        assert re.search(message, last), (argv, err)
        assert "Traceback" not in err, err
        assert last.startswith(("dml-bias: error:", "dml-bias audit: error:")), err


def test_open_data_specs(tmp_path: Path) -> None:
    ds, name = open_data("synthetic", {"synthetic": {"num_classes": 3, "images_per_class": 2, "image_size": 16}},
                         with_masks=True)  # fmt: skip
    assert len(ds) == 6
    assert name == "synthetic test split"
    with pytest.raises(AuditError, match="missing"):
        open_data("cub:" + str(tmp_path), None, with_masks=True)


@pytest.mark.cuda
def test_audit_on_cuda_matches_the_cpu(factories: Any) -> None:
    data = GroundTruth(classes=3, per_class=4)
    kw: dict[str, Any] = {"mean": MEAN, "std": STD, "bootstrap": 50, "attribution_images": 1, "progress": False}
    cpu = audit(factories.background_only(), data, **kw)
    gpu = audit(factories.background_only().cuda(), data, device="cuda", **kw)
    for v in VARIANTS:
        assert gpu.variants[v]["recall@1"] == cpu.variants[v]["recall@1"]
        assert gpu.variants[v]["map@r"] == pytest.approx(cpu.variants[v]["map@r"], abs=1e-6)
    assert gpu.background_sensitivity["mean"] == pytest.approx(cpu.background_sensitivity["mean"], abs=1e-5)
    images = data.images.cuda()
    masks = data.masks.cuda()
    perm = torch.randperm(len(data)).cuda()
    donors = {v: (images[perm], masks[perm]) for v in ("mixed_same", "mixed_rand", "mixed_next")}
    on_gpu = make_batch_variants(VARIANTS, images, masks, donors)
    on_cpu = make_batch_variants(
        VARIANTS, images.cpu(), masks.cpu(), {k: (a.cpu(), b.cpu()) for k, (a, b) in donors.items()}
    )
    for v in VARIANTS:
        assert torch.equal(on_gpu[v].cpu(), on_cpu[v]), v


def test_command_line_help(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run_cli(["audit", "--help"], capsys)
    assert status == 0
    for flag in ("--model", "--weights", "--data", "--masks-from", "--image-size", "--mean", "--std", "--mask-input"):
        assert flag in out
    for flag in ("--layer", "--bootstrap", "--device", "--batch-size", "--workers", "--no-progress", "--out"):
        assert flag in out
    status, out, _ = _run_cli(["study", "--help"], capsys)
    assert status == 0
    assert "--save-models" in out


def _result_with(original: float, swapped: float, drop_ci: list[float]) -> Any:
    from dml_bias.bias import AuditResult

    def entry(r: float) -> dict[str, Any]:
        return {"recall@1": r, "recall@1_ci": [r - 0.02, r + 0.02], "map@r": r, "map@r_ci": [r, r]}

    variants = {v: entry(original) for v in VARIANTS}
    variants["mixed_rand"] = entry(swapped)
    return AuditResult(
        "m", "d", 10, 2, variants, {"value": 0.0, "ci": [0.0, 0.0]}, {"value": original - swapped, "ci": drop_ci},
        0.1, {"mean": 0.5, "ci": [0.4, 0.6]}, {"mean": 0.5, "chance": 0.2, "ci": [0.4, 0.6]}, [],
    )  # fmt: skip


def test_verdict_wording() -> None:
    assert _result_with(0.80, 0.47, [0.30, 0.36]).verdict() == (
        "Recall@1 falls from .80 [.78, .82] to .47 [.45, .49] when backgrounds are swapped: 33 points of this "
        "model's retrieval come from backgrounds."
    )
    assert "no measurable part" in _result_with(0.80, 0.80, [0.0, 0.0]).verdict()
    assert (
        "the drop, 5 points [-1, 11], is not distinguishable from zero"
        in _result_with(0.8, 0.75, [-0.01, 0.11]).verdict()
    )
    assert "rises from .70" in _result_with(0.70, 0.75, [-0.08, -0.02]).verdict()


def test_cub_data_spec(factories: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "datasets"))
    import _builders

    _builders.build_cub(tmp_path / "cub")  # classes 101, 102 are the test classes, 3 images each, sizes differ
    out = tmp_path / "out"
    argv = ["audit", "--model", "audit_gt_models:object_only", "--data", f"cub:{tmp_path / 'cub'}"]
    argv += ["--image-size", "32", "--bootstrap", "20", "--no-progress", "--no-figures", "--out", str(out)]
    status, _, err = _run_cli(argv, capsys)
    assert status == 0, err
    got = json.loads((out / "results.json").read_text())
    assert got["num_images"] == 6
    assert got["num_classes"] == 2
    assert got["data"].startswith("CUB-200-2011 test classes")
    # at 8 px the object window of the model lies outside the image: its embeddings are NaN, said in one line
    status, _, err = _run_cli([*argv[:5], "--image-size", "8", "--no-progress", "--out", str(out)], capsys)
    assert status == 2
    assert "the model returned NaN or infinite embeddings for 6 of 6 inputs" in err
