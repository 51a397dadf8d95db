"""``import dml_bias`` is light: no heavy optional imports, no warnings, little time over ``import torch``."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torchvision", "faiss", "matplotlib", "scipy", "tqdm", "sklearn", "PIL")


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return out.stdout.strip()


def test_import_has_version_and_no_warnings() -> None:
    version = _run("import dml_bias; print(dml_bias.__version__)")
    assert version
    assert version[0].isdigit()


def test_import_pulls_in_no_heavy_module() -> None:
    code = "import sys, dml_bias; print(','.join(m for m in " + repr(HEAVY) + " if m in sys.modules))"
    assert _run(code) == ""


def test_lazy_submodule_access() -> None:
    code = "import sys, dml_bias; s = dml_bias.similarity; print('dml_bias.similarity' in sys.modules, s.__name__)"
    assert _run(code) == "True dml_bias.similarity"


def test_unknown_attribute_raises() -> None:
    code = (
        "import dml_bias\n"
        "try:\n    dml_bias.not_a_module\nexcept AttributeError as e:\n    print('AttributeError', e)\n"
    )
    assert _run(code).startswith("AttributeError module 'dml_bias' has no attribute 'not_a_module'")


def test_import_adds_under_100ms_over_torch() -> None:
    # Best of several fresh interpreters, to keep the test robust on a loaded 2-core machine.
    code = (
        "import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
        "import dml_bias; t2 = time.perf_counter(); print(t2 - t1)"
    )
    extra = min(float(_run(code)) for _ in range(3))
    assert extra < 0.100, f"import dml_bias added {extra * 1000:.1f} ms over import torch"
