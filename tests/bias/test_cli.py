"""``dml-bias study`` on the command line: help, a small run, and every bad-input path (message, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dml_bias.bias import cli
from dml_bias.bias import study as study_module


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_module_help_in_a_fresh_interpreter() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dml_bias", "study", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for flag in ("--quick", "--out", "--swap", "--modes", "--losses", "--dataset", "--weights", "--num-workers"):
        assert flag in out.stdout
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["study", "--modes", "none,blur"], "unknown modes 'blur'; choose from none, soft, hard, channel, bg_augment"),
        (["study", "--losses", "triplet"], "unknown losses 'triplet'"),
        (["study", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["study", "--swap", "gallery"], "invalid choice: 'gallery'"),
        (["study", "--epochs", "0"], "expected a positive integer, got '0'"),
        (["study", "--sigmas", "0.2,x"], "expected comma-separated numbers"),
        (["study", "--sigmas", "2"], "expected numbers between 0 and 1 (exclusive) such as 0.2,0.5, got '2'"),
        (["study", "--sigmas", "0.2,1"], "expected numbers between 0 and 1 (exclusive)"),
        (["study", "--dataset", "cub"], "--dataset cub needs --root PATH"),
        (["study", "--root", "/tmp"], "--root and --weights are only used with --dataset cub"),
    ],
)
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(argv, capsys)
    assert status == 2
    assert message in err
    assert "Traceback" not in err


def test_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "results"
    target.write_text("not a directory")
    status, _, err = _run(["study", "--quick", "--out", str(target)], capsys)
    assert status == 2
    assert f"--out {str(target)!r} exists and is not a directory" in err


def test_cub_root_without_segmentations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "images").mkdir()
    status, _, err = _run(
        ["study", "--dataset", "cub", "--root", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"], capsys
    )
    assert status == 2
    assert "has no 'segmentations' folder" in err
    assert "Traceback" not in err
    status, _, err = _run(["study", "--dataset", "cub", "--root", str(tmp_path / "missing")], capsys)
    assert status == 2
    assert "not a directory" in err


def test_missing_weights_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(
        ["study", "--dataset", "cub", "--root", str(tmp_path), "--weights", str(tmp_path / "r50.pth")], capsys
    )
    assert status == 2
    assert "is not a file" in err


def test_cuda_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(study_module.torch.cuda, "is_available", lambda: False)
    status, _, err = _run(["study", "--quick", "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert status == 2
    assert "CUDA is not available" in err


def test_small_study_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    status, stdout, err = _run(
        [
            "study",
            "--quick",
            "--losses",
            "proxy_anchor",
            "--modes",
            "none,hard",
            "--variants",
            "original,mixed_rand,mixed_same",
            "--epochs",
            "1",
            "--threads",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert status == 0, err
    assert "Proxy-Anchor: Recall@k and MAP@R on the original test images" in stdout
    assert "per-class Recall@1 failures" in stdout
    data = json.loads((out / "results.json").read_text())
    assert [r["mode"] for r in data["runs"]] == ["none", "hard"]
    assert set(data["runs"][1]["metrics_raw"]) == {"original", "mixed_rand", "mixed_same"}
    assert data["config"]["epochs"] == 1
    for name in ("per_class.csv", "report.md", "recall_by_mode.png", "per_class_failures.png", "retrieval_grid.png"):
        assert (out / name).is_file(), name


def test_interrupt_exits_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(config: study_module.StudyConfig) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(study_module, "run_study", interrupted)
    status, _, err = _run(["study", "--quick", "--out", str(tmp_path)], capsys)
    assert status == 130
    assert "interrupted; the completed runs are in" in err


def test_version_and_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(["--version"], capsys)
    assert status == 0
    assert out.startswith("dml-bias ")
    status, out, _ = _run([], capsys)
    assert status == 0
    assert "study" in out


def test_threads_and_workers_reach_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --threads the study runs on one thread (synthetic data); --threads N and --num-workers N pass through."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen: list[study_module.StudyConfig] = []

    def fake_run_study(config: study_module.StudyConfig) -> None:
        seen.append(config)
        raise KeyboardInterrupt  # stop before any training: the configuration is all this test needs

    monkeypatch.setattr(study_module, "run_study", fake_run_study)
    out = str(tmp_path / "out")
    assert _run(["study", "--quick", "--out", out], capsys)[0] == 130
    assert _run(["study", "--quick", "--out", out, "--threads", "3", "--num-workers", "2"], capsys)[0] == 130
    assert (seen[0].num_threads, seen[0].resolved_threads(), seen[0].num_workers) == (None, 1, 0)
    assert (seen[1].num_threads, seen[1].resolved_threads(), seen[1].num_workers) == (3, 3, 2)
    status, help_text, _ = _run(["study", "--help"], capsys)
    assert status == 0
    assert "default: 1 on the synthetic data" in " ".join(help_text.split())
