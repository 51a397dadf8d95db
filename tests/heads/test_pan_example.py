"""examples/pan_attributes.py runs in its CI-sized form and prints a complete, sane table."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "datasets"))

from _builders import build_cub

EXAMPLE = Path(__file__).parents[2] / "examples" / "pan_attributes.py"
ROW = re.compile(
    r"^(?P<name>.+?)\s{2,}(?P<gate>\S+)\s+(?P<k>\S+)\s+(?P<lam>\S+)\s+(?P<acc>[0-9.]+) ± (?P<ci>[0-9.]+)"
    r"\s+(?P<attr>-|(?P<attr_acc>[0-9.]+) \[(?P<majority>[0-9.]+)\])$"
)


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pan_attributes_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def parse_rows(text: str) -> list[dict[str, str]]:
    rows = []
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            rows.append(match.groupdict())
    return rows


def check_interval(accuracy: str, ci: str, episodes: int) -> None:
    """A printed ``mean ± CI95`` is one that ``episodes`` per-episode accuracies in [0, 1] can give.

    ``1.96 * std / sqrt(episodes)`` (unbiased std) of values in [0, 1] with mean ``m`` is largest when every
    value is 0 or 1: ``1.96 * sqrt(m * (1 - m) / (episodes - 1))``; so a mean near 0 or 1 forces a narrow
    interval, and a constant accuracy (0 or 1 overall) has none.
    """
    mean, half_width = float(accuracy), float(ci)
    assert 0.0 <= mean <= 1.0, accuracy
    largest = 1.96 * math.sqrt(mean * (1 - mean) / (episodes - 1))
    assert 0.0 <= half_width <= largest + 5e-5, (accuracy, ci, largest)


def check_table(rows: list[dict[str, str]], num_attributes: int, unsupervised: int, episodes: int) -> None:
    keys = [(r["name"], r["gate"], r["lam"]) for r in rows]
    assert keys == [
        ("cosine (encoder embeddings)", "-", "-"),
        ("PAN unsupervised", "-", "-"),
        ("PAN supervised", "or", "1"),
        ("PAN supervised", "and", "1"),
        ("PAN supervised", "xnor", "1"),
        ("PAN supervised", "and_xor", "1"),
        ("PAN hybrid", "or", "1"),
        ("PAN supervised, concat joint", "or", "1"),
        ("PAN supervised (λ sweep)", "or", "1e-05"),
    ]
    ks = [r["k"] for r in rows]
    a = num_attributes
    assert ks == ["-", str(unsupervised), str(a), str(a), str(a), str(2 * a), str(a + unsupervised), str(a), str(a)]
    for r in rows:
        check_interval(r["acc"], r["ci"], episodes)
        if r["gate"] == "-":
            assert r["attr"] == "-"
        else:
            assert 0.0 <= float(r["attr_acc"]) <= 1.0
            assert 0.0 <= float(r["majority"]) <= 1.0


def test_quick_synthetic_run(capsys: pytest.CaptureFixture[str]) -> None:
    module = load_example()
    assert module.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "SyntheticBackgrounds" in out
    assert "100 episodes, chance = 0.20" in out
    rows = parse_rows(out)
    cfg = module.Config.quick()
    check_table(
        rows,
        num_attributes=20,
        unsupervised=cfg.unsupervised_conditions,
        episodes=cfg.episodes,
    )
    accuracy = {(r["name"], r["gate"], r["lam"]): float(r["acc"]) for r in rows}
    # Even the CI-sized encoder (4 short epochs) and heads are well above 5-way chance (0.2) on novel classes;
    # the observed values are about 0.55 (cosine) and 0.54 (unsupervised PAN) with a CI of ±0.015.
    assert accuracy[("cosine (encoder embeddings)", "-", "-")] > 0.35
    assert accuracy[("PAN unsupervised", "-", "-")] > 0.35
    assert accuracy[("PAN hybrid", "or", "1")] > 0.3


def test_quick_cub_run_on_a_tiny_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchvision.models import resnet18

    # 20 classes: few-shot base = even positions (10 classes), novel = positions 3, 7, 11, 15, 19 (5 classes)
    build_cub(tmp_path, class_ids=tuple(range(1, 21)), images_per_class=6, num_attributes=6)
    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), weights)
    module = load_example()
    argv = ["--quick", "--root", str(tmp_path), "--weights", str(weights), "--image-size", "32"]
    argv += ["--encoder-epochs", "1", "--num-workers", "0", "--n-query", "1", "--episodes", "5", "--head-steps", "20"]
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert "CUB-200-2011 (base -> novel), 5 episodes" in out
    unsupervised = module.Config.quick().unsupervised_conditions
    check_table(parse_rows(out), num_attributes=6, unsupervised=unsupervised, episodes=5)
