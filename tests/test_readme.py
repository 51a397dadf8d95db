"""The README's tour is part of the contract: its Python blocks run, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_quick_start_commands() -> None:
    text = README.read_text()
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", text, flags=re.DOTALL)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ['pip install -e ".[dev]"', "dml-bias study", "python -m pytest"]


@pytest.mark.slow
def test_readme_tour_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    blocks = python_blocks()
    assert len(blocks) >= 4
    for block in blocks:
        if "ddp_model" in block:  # needs a process group and a DDP model; covered by tests/distributed
            continue
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "my_study" / "results.json").exists()
