"""Public names that moved keep working from their old import path, with a DeprecationWarning, as the same object.

Issue #24 moved spatial verification and re-ranking from ``dml_bias.heads`` to :mod:`dml_bias.retrieval`, and
PAN's protocols (few-shot, FITB, compatibility) from ``dml_bias.heads`` and ``dml_bias.metrics.outfits`` to
:mod:`dml_bias.metrics.protocols` (exported by :mod:`dml_bias.metrics`). The old paths are removed in 0.2.0.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import dml_bias.metrics
import dml_bias.retrieval
from dml_bias._compat import REMOVAL_RELEASE

PROTOCOLS = ("FewShotResult", "compatibility_scores", "few_shot_accuracy", "few_shot_episodes", "fitb_scores")

#: (old module, name, new module): one entry per moved name and old path.
MOVES = [
    *[("dml_bias.heads.verification", n, "dml_bias.retrieval") for n in ("rerank", "spatial_verification")],
    *[("dml_bias.heads", n, "dml_bias.retrieval") for n in ("rerank", "spatial_verification")],
    *[("dml_bias.heads.pairwise", n, "dml_bias.metrics") for n in PROTOCOLS],
    *[("dml_bias.heads", n, "dml_bias.metrics") for n in PROTOCOLS],
    *[("dml_bias.metrics.outfits", n, "dml_bias.metrics") for n in ("compatibility_auc", "fitb_accuracy")],
]


@pytest.mark.parametrize(("old", "name", "new"), MOVES, ids=[f"{o}.{n}" for o, n, _ in MOVES])
def test_old_path_warns_and_gives_the_same_object(old: str, name: str, new: str) -> None:
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"moved to {new}.{name};") as record:
        obj = getattr(module, name)
    assert obj is getattr(importlib.import_module(new), name)
    message = str(record[0].message)
    assert message == (
        f"{old}.{name} moved to {new}.{name}; import it from {new} (the old path is removed in {REMOVAL_RELEASE})"
    )
    assert record[0].filename == __file__  # the warning points at the caller, not at dml_bias


@pytest.mark.parametrize(("old", "name", "new"), MOVES[:1] + MOVES[4:5] + MOVES[-1:])
def test_from_import_of_an_old_path_works(old: str, name: str, new: str) -> None:
    namespace: dict[str, object] = {}
    with pytest.warns(DeprecationWarning, match=f"moved to {new}.{name}"):
        exec(f"from {old} import {name}", namespace)
    assert namespace[name] is getattr(importlib.import_module(new), name)


def test_new_homes_export_the_moved_names() -> None:
    assert dml_bias.retrieval.__all__ == ["rerank", "spatial_verification"]
    assert set(dml_bias.metrics.protocols.__all__) == {*PROTOCOLS, "compatibility_auc", "fitb_accuracy"}
    for name in dml_bias.metrics.protocols.__all__:
        assert getattr(dml_bias.metrics, name) is getattr(dml_bias.metrics.protocols, name)
        assert name in dml_bias.metrics.__all__


def test_old_modules_no_longer_list_the_moved_names() -> None:
    import dml_bias.heads

    for old, name, _ in MOVES:
        assert name not in getattr(importlib.import_module(old), "__all__", [])
    assert "spatial_verification" not in dir(dml_bias.heads.verification)
    assert "FewShotResult" not in dml_bias.heads.__all__


@pytest.mark.parametrize("old", ["dml_bias.heads", "dml_bias.heads.pairwise", "dml_bias.metrics.outfits"])
def test_unknown_names_still_raise_attribute_error(old: str) -> None:
    with pytest.raises(AttributeError, match=f"module '{old}' has no attribute 'not_a_name'"):
        _ = importlib.import_module(old).not_a_name


def test_the_library_imports_without_using_a_moved_name() -> None:
    # Every module of the package imported with DeprecationWarning as an error: nothing inside dml_bias uses an
    # old path (the heads, the metrics and the examples' import lines included).
    code = (
        "import importlib, pkgutil, dml_bias\n"
        "for m in pkgutil.walk_packages(dml_bias.__path__, 'dml_bias.'):\n"
        "    if m.name.startswith('dml_bias.bias'):\n"  # the study and audit: none of the moved names, other owners
        "        continue\n"
        "    importlib.import_module(m.name)\n"
        "import dml_bias.heads, dml_bias.metrics, dml_bias.retrieval\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
