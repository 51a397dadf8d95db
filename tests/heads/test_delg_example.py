"""examples/delg_retrieval.py runs in its CI-sized form: trains, writes a Revisited-format set, re-ranks, scores."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "delg_retrieval.py"
ROW = re.compile(r"^\s*(global descriptor|\+ spatial verif\.)\s+([0-9.]+)\s+([0-9.]+)$")


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("delg_retrieval_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_prints_map_before_and_after_reranking(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example()
    results = example.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out

    # the data set really was written in the Revisited layout and read back through the loader
    folder = tmp_path / "datasets" / "roxford5k"
    assert (folder / "gnd_roxford5k.pkl").is_file()
    cfg = example.Config.quick()
    per_landmark = cfg.easy_per_landmark + cfg.hard_per_landmark + cfg.junk_per_landmark
    jpgs = sorted(p.name for p in (folder / "jpg").iterdir())
    assert len(jpgs) == cfg.test_landmarks * (per_landmark + 1)

    assert set(results) == {"global", "reranked"}
    for name in results:
        assert set(results[name]) == {"medium", "hard"}
        for value in results[name].values():
            assert 0.0 <= value <= 1.0
            assert not math.isnan(value)

    rows = [ROW.match(line) for line in out.splitlines()]
    printed = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in rows if m}
    assert printed["global descriptor"] == pytest.approx(
        (100 * results["global"]["medium"], 100 * results["global"]["hard"]), abs=0.051
    )
    assert printed["+ spatial verif."] == pytest.approx(
        (100 * results["reranked"]["medium"], 100 * results["reranked"]["hard"]), abs=0.051
    )
    assert f"{cfg.test_landmarks} queries, {cfg.test_landmarks * per_landmark} database images" in out


def test_views_keep_their_box_inside_the_image() -> None:
    example = load_example()
    import numpy as np

    landmarks = example.Landmarks("test", 2, 96, seed=0)
    rng = np.random.default_rng(0)
    for kind in ("easy", "hard", "junk", "query"):
        image, box = landmarks.view(0, kind, rng)
        assert tuple(image.shape) == (3, 96, 96)
        assert float(image.min()) >= 0.0
        assert float(image.max()) <= 1.0
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= 96
        assert 0 <= y1 < y2 <= 96
