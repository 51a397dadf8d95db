"""``docs/check_offline.py`` finds every way a built page could load something from the network.

The script itself runs on the real build in ``.ci/run`` (after ``sphinx-build``); here it runs on small
hand-written builds, one problem at a time, so each rule is known to fire.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_checker():  # a module loaded from its path: docs/ is not a package
    spec = importlib.util.spec_from_file_location("check_offline", ROOT / "docs" / "check_offline.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_offline = _load_checker()


def _build(tmp_path: Path, body: str, *, css: str = "", mathjax: bool = True) -> Path:
    root = tmp_path / "html"
    (root / "_static").mkdir(parents=True)
    (root / "_static" / "local.js").write_text("")
    (root / "_static" / "theme.css").write_text(css)
    if mathjax:
        fonts = root / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2"
        fonts.mkdir(parents=True)
        (root / "_static" / "mathjax" / "tex-chtml.js").write_text("")
    (root / "index.html").write_text(f"<html><head>{body}</head><body><p>text</p></body></html>")
    return root


CLEAN_HEAD = (
    '<script src="_static/local.js?v=1"></script><link rel="stylesheet" href="_static/theme.css">'
    '<link rel="next" href="https://example.org/next.html"><a href="https://docs.python.org/3/">python</a>'
)


def test_clean_build_passes(tmp_path: Path) -> None:
    root = _build(
        tmp_path, CLEAN_HEAD, css="body { background: url('img.png'); } a { x: url(data:image/png;base64,AA) }"
    )
    assert check_offline.check_build(root) == []
    assert check_offline.main([str(root)]) == 0


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ('<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"></script>', "<script src>"),
        ('<script src="//cdn.example.org/x.js"></script>', "<script src>"),
        ('<link rel="stylesheet" href="http://fonts.googleapis.com/css?family=Roboto">', "<link"),
        ('<link rel="preload" as="font" href="https://example.org/f.woff2">', "<link"),
        ('<link rel="icon" href="HTTPS://example.org/favicon.ico">', "<link"),
        ('<img src="https://example.org/logo.png">', "<img src>"),
        ('<img srcset="_static/local.js 1x, https://example.org/b.png 2x" src="_static/local.js">', "<img srcset>"),
        ('<iframe src="https://example.org/embed"></iframe>', "<iframe src>"),
        ('<object data="https://example.org/x.svg"></object>', "<object data>"),
        ("<style>@import url(https://fonts.example.org/a.css);</style>", "<style>"),
        ('<style>@import "https://fonts.example.org/a.css";</style>', "<style>"),
        ("<div style=\"background: url('https://example.org/bg.png')\"></div>", "style attribute"),
    ],
)
def test_external_resources_in_html_are_found(tmp_path: Path, head: str, expected: str) -> None:
    problems = check_offline.check_build(_build(tmp_path, CLEAN_HEAD + head))
    assert len(problems) == 1
    assert "external" in problems[0]
    assert expected in problems[0]
    assert problems[0].startswith("index.html:")


@pytest.mark.parametrize(
    "css",
    [
        "@import url(https://fonts.googleapis.com/css2?family=Inter);",
        "@import 'http://example.org/x.css';",
        "@font-face { font-family: X; src: url(\"https://example.org/x.woff2\") format('woff2'); }",
        "body { background: url(//example.org/x.png) }",
    ],
)
def test_external_resources_in_css_are_found(tmp_path: Path, css: str) -> None:
    problems = check_offline.check_build(_build(tmp_path, CLEAN_HEAD, css=css))
    assert len(problems) == 1
    assert problems[0].startswith("_static/theme.css: CSS loads an external resource")
    assert check_offline.main([str(tmp_path / "html")]) == 1


def test_missing_local_resource_is_found(tmp_path: Path) -> None:
    problems = check_offline.check_build(_build(tmp_path, CLEAN_HEAD + '<script src="_static/gone.js"></script>'))
    assert problems == ["index.html: <script src> refers to _static/gone.js, which is not in the build"]


def test_math_needs_local_mathjax_with_fonts(tmp_path: Path) -> None:
    math = '<span class="math notranslate nohighlight">\\(x^2\\)</span>'
    local = '<script defer src="_static/mathjax/tex-chtml.js"></script>'
    root = _build(tmp_path / "a", CLEAN_HEAD + local + math)
    assert check_offline.check_build(root) == []
    root = _build(tmp_path / "b", CLEAN_HEAD + math)  # formulas, but no MathJax at all
    assert check_offline.check_build(root) == ["index.html: the page has formulas but loads no MathJax from the build"]
    root = _build(tmp_path / "c", CLEAN_HEAD + local + math)
    (root / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").rmdir()
    problems = check_offline.check_build(root)
    assert len(problems) == 1
    assert "MathJax's fonts" in problems[0]


def test_empty_build_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="build the documentation first"):
        check_offline.check_build(tmp_path)
    assert check_offline.main([str(tmp_path)]) == 2


def test_is_external() -> None:
    assert check_offline.is_external("https://a.org/x.js")
    assert check_offline.is_external(" http://a.org")
    assert check_offline.is_external("//a.org/x.js")
    assert check_offline.is_external("ftp://a.org/x")
    for local in ("_static/x.js", "../x.css", "#top", "data:font/woff2;base64,AA", "file:///tmp/x", "x//y.js"):
        assert not check_offline.is_external(local), local
