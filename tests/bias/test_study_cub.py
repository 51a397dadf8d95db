"""The study's real-data path on a tiny fake CUB-200-2011 folder (ResNet-50 on CPU, one epoch)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))

from _builders import build_cub

from dml_bias.bias import StudyConfig, build_resnet50, run_study


def test_cub_study_on_a_fake_folder(tmp_path: Path) -> None:
    build_cub(tmp_path, class_ids=(1, 2, 101, 102), images_per_class=3)
    cfg = StudyConfig(
        dataset="cub",
        root=str(tmp_path),
        losses=("proxy_anchor",),
        modes=("channel",),
        variants=("original", "only_bg_t", "mixed_rand"),
        epochs=1,
        embedding_size=16,
        image_size=48,
        progress=False,
        num_threads=2,
    )
    with pytest.warns(UserWarning, match="random initialisation"):
        result = run_study(cfg)
    run = result.runs[0]
    assert result.dataset["num_test_images"] == 6
    assert result.dataset["input_size"] == 48
    assert set(run["metrics"]) == {"original", "only_bg_t", "mixed_rand"}
    assert set(run["metrics_raw"]) == set(run["metrics"])
    # 2 test classes × 3 images: a random ranking finds the class at rank 1 with probability 2/5
    assert result.dataset["chance_recall@1"] == pytest.approx(0.4)


def test_resnet50_weights_file_checks(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weights must be an existing file"):
        build_resnet50(8, weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv9.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="lacks"):
        build_resnet50(8, weights=bad)
    model = build_resnet50(8, in_channels=4, warn=False).eval()
    assert model.trunk.conv1.in_channels == 4
    out = model(torch.randn(2, 4, 32, 32))
    assert out.shape == (2, 8)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_cub_user_settings_win_over_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit lr, weight decay and batch layout reach the optimiser and the sampler, and results record them."""
    from dml_bias.bias import training

    build_cub(tmp_path, class_ids=(1, 2, 101, 102), images_per_class=3)
    seen: dict[str, object] = {}
    real_adamw = torch.optim.AdamW

    def spy_adamw(groups, lr, weight_decay):  # type: ignore[no-untyped-def]
        seen["lr"], seen["weight_decay"] = lr, weight_decay
        return real_adamw(groups, lr=lr, weight_decay=weight_decay)

    real_loader = training.StudyData.train_loader

    def spy_loader(self, mode, batch_size, m, seed):  # type: ignore[no-untyped-def]
        seen["batch_size"], seen["m_per_class"] = batch_size, m
        return real_loader(self, mode, batch_size, m, seed)

    monkeypatch.setattr(training.torch.optim, "AdamW", spy_adamw)
    monkeypatch.setattr(training.StudyData, "train_loader", spy_loader)
    cfg = StudyConfig(
        dataset="cub",
        root=str(tmp_path),
        losses=("multi_similarity",),
        modes=("none",),
        variants=("original",),
        epochs=1,
        embedding_size=8,
        image_size=32,
        lr=0.02,
        weight_decay=0.0,
        batch_size=6,
        m_per_class=3,
        attribution_images=0,
        progress=False,
        num_threads=2,
    )
    with pytest.warns(UserWarning, match="random initialisation"):
        result = run_study(cfg)
    assert seen == {"lr": 0.02, "weight_decay": 0.0, "batch_size": 6, "m_per_class": 3}
    used = {"lr": 0.02, "weight_decay": 0.0, "batch_size": 6, "m_per_class": 3, "epochs": 1}
    assert result.runs[0]["training"] == used
    assert result.to_dict()["config"]["training_resolved"]["multi_similarity"] == {
        k: v for k, v in used.items() if k != "epochs"
    }


def test_train_loader_leaves_the_data_set_unchanged(tmp_path: Path) -> None:
    from dml_bias.bias.data import StudyData

    build_cub(tmp_path, class_ids=(1, 2, 101, 102), images_per_class=3)
    cfg = StudyConfig(dataset="cub", root=str(tmp_path), image_size=32, progress=False)
    with pytest.warns(UserWarning, match="random initialisation"):
        data = StudyData(cfg)
    before = data.train_dataset.transform
    loader = data.train_loader("bg_augment", 6, 3, seed=0)
    assert data.train_dataset.transform is before
    assert loader.dataset is not data.train_dataset
    assert loader.dataset.transform is not None
    images, masks, labels = next(iter(loader))
    assert images.shape == (6, 3, 32, 32)
    assert masks.shape == (6, 1, 32, 32)
    assert labels.shape == (6,)
