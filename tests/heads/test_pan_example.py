"""examples/pan_attributes.py runs in its CI-sized form, prints complete tables and writes sane results."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "datasets"))

from _builders import build_cub

from dml_bias.metrics import compatibility_auc

EXAMPLE = Path(__file__).parents[2] / "examples" / "pan_attributes.py"
FEWSHOT_ROW = re.compile(
    r"^(?P<name>.+?)\s{2,}(?P<gate>\S+)\s+(?P<k>\S+)\s+(?P<lam>\S+)\s+(?P<acc>[0-9.]+) ± (?P<ci>[0-9.]+)"
    r"\s+(?P<attr>-|(?P<attr_acc>[0-9.]+) \[(?P<majority>[0-9.]+)\])$"
)
METHODS = ["cosine", "cosine_margin", "cosine_bce", "pan_unsupervised", "pan_supervised", "pan_wrong_gate"]


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    """``main(["--threads", ...])`` sets torch's thread count for the process, as a script should; undo it."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pan_attributes_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ helpers of part 1


def test_auc_rows_matches_compatibility_auc_with_ties() -> None:
    module = load_example()
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (5, 40), generator=generator).double()  # many ties
    labels = torch.rand(5, 40, generator=generator) < 0.4
    got = module.auc_rows(scores, labels)
    expected = torch.tensor([compatibility_auc(s, y.long()) for s, y in zip(scores, labels, strict=True)])
    torch.testing.assert_close(got, expected.double())


def test_auc_rows_by_hand() -> None:
    module = load_example()
    scores = torch.tensor([[0.1, 0.4, 0.35, 0.8]], dtype=torch.float64)
    labels = torch.tensor([[False, False, True, True]])
    # positive 0.35 beats 0.1 but not 0.4; positive 0.8 beats both: 3 of 4 pairs
    assert module.auc_rows(scores, labels).tolist() == [0.75]
    tied = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    assert module.auc_rows(tied, torch.tensor([[True, False]])).tolist() == [0.5]


def test_best_threshold_by_hand() -> None:
    module = load_example()
    scores = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.4], dtype=torch.float64)
    labels = torch.tensor([False, False, True, True, False])
    # cutting between 0.2 and 0.3 gets 4 of 5 right (0.4 is the error); no cut gets all 5
    assert module.best_threshold(scores, labels) == pytest.approx(0.25)
    assert module.best_threshold(scores, torch.ones(5, dtype=torch.bool)) < 0.1
    assert module.best_threshold(scores, torch.zeros(5, dtype=torch.bool)) > 0.9


# ------------------------------------------------------------------------------------------ quick run


def test_quick_run_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = load_example()
    torch.set_num_threads(2)  # restored by the fixture
    assert module.main(["--quick", "--steps", "15", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Part 1: attribute compatibility" in out
    assert "rule 'or' over ['colour', 'shape']" in out
    assert "Part 1b: frozen features" in out
    assert "Part 2" not in out  # --quick runs part 1 only
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "pan_compatibility.png").stat().st_size > 1000
    assert results["threads"] == 1  # --quick runs on one thread unless told otherwise
    cfg = module.CompatibilityConfig.quick()
    assert results["task"]["inputs"] == "images"
    assert results["task"]["labelled_pairs"] is None
    assert results["attribute_inputs"]["task"]["inputs"] == "attributes"
    assert results["attribute_inputs"]["task"]["labelled_pairs"] == cfg.feature_pairs
    for data in (results, results["attribute_inputs"]):
        check_part1_results(data, cfg, out)


def check_part1_results(data: dict[str, Any], cfg: Any, out: str) -> None:
    assert data["task"]["rule"] == "or"
    assert data["task"]["test_positive_share"] == 0.5
    assert data["task"]["train_items"] == cfg.classes * cfg.images_per_class
    assert data["task"]["test_items"] == cfg.classes * cfg.test_images_per_class
    assert list(data["methods"]) == METHODS
    for key, entry in data["methods"].items():
        for name in ("auc", "accuracy"):
            low, high = entry[f"{name}_ci"]
            assert low <= entry[name] <= high, (key, name, entry)
            assert 0.0 <= low <= high <= 1.0
            assert high - low < 0.2  # 2000 test pairs: a bootstrap interval of about +-0.03
        assert f"{entry['auc']:.3f}" in out
    ks = {key: entry.get("num_conditions") for key, entry in data["methods"].items()}
    assert ks == {
        "cosine": None,
        "cosine_margin": None,
        "cosine_bce": None,
        "pan_unsupervised": 8,
        "pan_supervised": 10,
        "pan_wrong_gate": 28,
    }
    for key in ("pan_supervised", "pan_wrong_gate"):
        assert 0.0 <= data["methods"][key]["attribute_accuracy"] <= 1.0
        assert 0.5 <= data["methods"][key]["attribute_majority"] <= 1.0  # the majority label is right >= half


def test_pan_beats_every_single_embedding_on_frozen_attribute_features() -> None:
    """Part 1b at CI size: with features that carry the attributes and 256 labelled pairs, the PAN head ranks the
    unseen "same colour or same shape" pairs far better than a linear metric embedding trained on the same pairs."""
    module = load_example()
    torch.set_num_threads(1)  # restored by the fixture; small tensors are faster without worker threads
    cfg = module.CompatibilityConfig.quick()
    cfg = module.replace(
        cfg,
        inputs="attributes",
        labelled_pairs=cfg.feature_pairs,
        steps=cfg.feature_steps,
        lr=cfg.feature_lr,
        test_pairs=1000,
        threshold_pairs=500,
        bootstrap=200,
    )
    _, results = module.run_compatibility(cfg)
    by_key = {r.method.key: r for r in results}
    assert list(by_key) == METHODS
    pan = by_key["pan_supervised"]
    for key in ("cosine", "cosine_margin", "cosine_bce"):
        single = by_key[key]
        # measured: PAN 0.92, single embeddings 0.75-0.81; the gap is 0.05 or more with disjoint intervals
        assert pan.auc > single.auc + 0.05, (key, pan.auc, single.auc)
        assert pan.auc_ci[0] > single.auc_ci[1], (key, pan.auc_ci, single.auc_ci)
    assert pan.auc > 0.85
    # the supervised conditions are "same colour" / "same shape" on unseen items, well above always saying "no"
    assert pan.attribute_accuracy > pan.attribute_majority + 0.1


def test_quick_run_with_fewshot_part(capsys: pytest.CaptureFixture[str]) -> None:
    module = load_example()
    argv = ["--quick", "--fewshot", "--steps", "5", "--rule", "xnor", "--noise", "0.1", "--head-steps", "10"]
    argv += ["--episodes", "10", "--encoder-epochs", "1", "--threads", "1"]
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert "rule 'xnor' over ['colour', 'shape'], noise 0.1" in out
    assert "10 episodes, chance = 0.20" in out
    rows = parse_rows(out)
    check_fewshot_table(
        rows, num_attributes=20, unsupervised=module.FewShotConfig.quick().unsupervised_conditions, episodes=10
    )


# ------------------------------------------------------------------------------------------ part 2 (few-shot)


def parse_rows(text: str) -> list[dict[str, str]]:
    rows = []
    for line in text.splitlines():
        match = FEWSHOT_ROW.match(line)
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


def check_fewshot_table(rows: list[dict[str, str]], num_attributes: int, unsupervised: int, episodes: int) -> None:
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
    argv += ["--out", str(tmp_path / "out"), "--threads", "1"]
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert "Part 1" not in out  # CUB: the few-shot protocol only
    assert "CUB-200-2011 (base -> novel), 5 episodes" in out
    unsupervised = module.FewShotConfig.quick().unsupervised_conditions
    check_fewshot_table(parse_rows(out), num_attributes=6, unsupervised=unsupervised, episodes=5)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(data["fewshot"]["rows"]) == 9
