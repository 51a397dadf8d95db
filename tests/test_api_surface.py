"""The public API is a checked-in inventory, so no name disappears (or appears) silently.

Every public name (``__all__`` of the top-level package and of every public sub-module) must be listed in
``api_inventory.txt``; every listed name must exist, have a docstring with a runnable example, and appear in
the Sphinx API reference under ``docs/api/``. After a deliberate change to the API, regenerate the inventory:

    python tests/test_api_surface.py --update
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INVENTORY = Path(__file__).with_name("api_inventory.txt")
DOCS_API = ROOT / "docs" / "api"


def public_modules() -> list[str]:
    """The package and every sub-module whose dotted path has no component starting with ``_``."""
    import dml_bias

    names = ["dml_bias"]
    for info in pkgutil.walk_packages(dml_bias.__path__, prefix="dml_bias."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        names.append(info.name)
    return sorted(names)


def current_api() -> list[str]:
    entries = set()
    for mod_name in public_modules():
        module = importlib.import_module(mod_name)
        lazy = getattr(module, "_LAZY_SUBMODULES", ())
        for name in getattr(module, "__all__", ()):
            if name.startswith("__") or name in lazy:
                continue
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue
            entries.add(f"{mod_name}:{name}")
    return sorted(entries)


def read_inventory() -> list[str]:
    lines = INVENTORY.read_text().splitlines() if INVENTORY.exists() else []
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_inventory_matches_public_api() -> None:
    current, listed = set(current_api()), set(read_inventory())
    missing = sorted(listed - current)
    new = sorted(current - listed)
    assert not missing, f"public names disappeared: {missing} (if deliberate, run tests/test_api_surface.py --update)"
    assert not new, f"new public names not in the inventory: {new} (run tests/test_api_surface.py --update)"


@pytest.mark.parametrize("entry", read_inventory())
def test_public_object_is_documented(entry: str) -> None:
    mod_name, name = entry.split(":")
    obj = getattr(importlib.import_module(mod_name), name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        doc = inspect.getdoc(obj) or ""
        assert doc.strip(), f"{entry} has no docstring"
        assert ">>>" in doc, f"{entry}'s docstring has no runnable example"
    api_text = "\n".join(p.read_text() for p in DOCS_API.glob("*.rst"))
    assert name in api_text, f"{entry} does not appear in the API reference (docs/api/*.rst)"


if __name__ == "__main__":
    if "--update" in sys.argv:
        INVENTORY.write_text(
            "# Public API of dml_bias: module:name, one a line. Regenerate with\n"
            "#   python tests/test_api_surface.py --update\n" + "\n".join(current_api()) + "\n"
        )
        print(f"wrote {INVENTORY} ({len(current_api())} names)")
