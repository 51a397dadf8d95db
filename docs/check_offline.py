"""Check that the built HTML documentation loads nothing from the network.

Run it after the Sphinx build (``.ci/run`` does)::

    python docs/check_offline.py docs/_build/html

It fails (exit status 1, one line per problem) when

* an HTML page loads an external resource: ``<script src>``, ``<link href>`` (stylesheets, fonts, icons;
  navigation links such as ``rel="next"`` are not loads), ``<img>``/``<source>``/``<iframe>``/``<audio>``/
  ``<video>``/``<embed>`` ``src``, ``<object data>``, or a ``url(...)``/``@import`` in a ``<style>`` element or a
  ``style`` attribute;
* a CSS file of the build imports or ``url()``-references anything external (web fonts included);
* a local resource that a page loads is missing from the build;
* a page with formulas (``class="math"``) does not load MathJax from the build itself, or MathJax's fonts are
  not in the build.

"External" means an absolute ``http:``/``https:``/``ftp:`` URL or a protocol-relative ``//host/...`` one.
Hyperlinks (``<a href>``) are not resources and are not checked. The script uses the standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

_EXTERNAL = re.compile(r"^\s*(?:[a-zA-Z][a-zA-Z0-9+.-]*:)?//|^\s*(?:https?|ftp):", re.IGNORECASE)
_CSS_URL = re.compile(r"""url\(\s*(['"]?)(.*?)\1\s*\)""", re.IGNORECASE)
_CSS_IMPORT = re.compile(r"""@import\s+(['"])(.+?)\1""", re.IGNORECASE)  # the url(...) form is a _CSS_URL
#: ``<link rel>`` values that name a related page rather than a resource the browser fetches.
_NAVIGATION_RELS = {
    "next",
    "prev",
    "previous",
    "index",
    "search",
    "author",
    "license",
    "canonical",
    "alternate",
    "help",
    "glossary",
    "copyright",
    "up",
    "top",
    "first",
    "last",
    "contents",
    "home",
}
_SRC_TAGS = {"script", "img", "source", "iframe", "audio", "video", "embed", "track", "input"}
#: Where MathJax 3's CHTML output looks for its fonts, relative to the MathJax script's folder.
_MATHJAX_FONTS = Path("output") / "chtml" / "fonts" / "woff-v2"


def is_external(url: str) -> bool:
    """Whether ``url`` points off the machine (``http(s)://``, ``ftp://`` or protocol-relative ``//``)."""
    return bool(_EXTERNAL.match(url)) and not url.strip().lower().startswith(("data:", "file:"))


def css_references(css: str) -> list[str]:
    """Every URL a piece of CSS loads: ``url(...)`` values and ``@import`` targets."""
    urls = [m.group(2) for m in _CSS_URL.finditer(css)]
    urls += [m.group(2) for m in _CSS_IMPORT.finditer(css)]
    return urls


class _ResourceParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.resources: list[tuple[str, str]] = []  # (what, url)
        self.has_math = False
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if "math" in values.get("class", "").split():
            self.has_math = True
        if tag in _SRC_TAGS and values.get("src"):
            self.resources.append((f"<{tag} src>", values["src"]))
        if tag == "object" and values.get("data"):
            self.resources.append(("<object data>", values["data"]))
        if tag == "link" and values.get("href"):
            rels = set(values.get("rel", "").lower().split())
            if not rels or not rels <= _NAVIGATION_RELS:
                self.resources.append((f'<link rel="{values.get("rel", "")}" href>', values["href"]))
        if tag in ("img", "source") and values.get("srcset"):
            for part in values["srcset"].split(","):
                if part.strip():
                    self.resources.append((f"<{tag} srcset>", part.split()[0]))
        if values.get("style"):
            self.resources += [("style attribute", url) for url in css_references(values["style"])]
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.resources += [("<style>", url) for url in css_references(data)]


def _local_target(page: Path, url: str) -> Path | None:
    path = unquote(urlsplit(url).path)
    if not path or url.strip().lower().startswith(("data:", "file:", "mailto:", "javascript:")):
        return None
    return (page.parent / path).resolve()


def check_html(page: Path, root: Path) -> list[str]:
    """The problems of one HTML page (see the module docstring)."""
    parser = _ResourceParser()
    parser.feed(page.read_text(encoding="utf-8", errors="replace"))
    name = page.relative_to(root).as_posix()
    problems = []
    mathjax_local = False
    for what, url in parser.resources:
        if is_external(url):
            problems.append(f"{name}: {what} loads an external resource: {url}")
            continue
        target = _local_target(page, url)
        if target is None:
            continue
        if not target.exists():
            problems.append(f"{name}: {what} refers to {url}, which is not in the build")
        elif what == "<script src>" and "mathjax" in url.lower():
            mathjax_local = True
            if not (target.parent / _MATHJAX_FONTS).is_dir():
                problems.append(f"{name}: MathJax's fonts ({_MATHJAX_FONTS.as_posix()}) are not next to {url}")
    if parser.has_math and not mathjax_local:
        problems.append(f"{name}: the page has formulas but loads no MathJax from the build")
    return problems


def check_css(sheet: Path, root: Path) -> list[str]:
    """The external references of one CSS file of the build."""
    name = sheet.relative_to(root).as_posix()
    text = sheet.read_text(encoding="utf-8", errors="replace")
    return [f"{name}: CSS loads an external resource: {url}" for url in css_references(text) if is_external(url)]


def check_build(root: Path) -> list[str]:
    """All problems of a built HTML tree; raises :class:`FileNotFoundError` if it holds no HTML page."""
    root = root.resolve()
    pages = sorted(root.rglob("*.html"))
    if not pages:
        raise FileNotFoundError(f"no HTML page under {root}: build the documentation first")
    problems = [p for page in pages for p in check_html(page, root)]
    problems += [p for sheet in sorted(root.rglob("*.css")) for p in check_css(sheet, root)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", nargs="?", default="docs/_build/html", type=Path, help="the built HTML folder")
    args = parser.parse_args(argv)
    try:
        problems = check_build(args.build)
    except FileNotFoundError as exc:
        print(f"check_offline: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    pages = len(list(args.build.rglob("*.html")))
    if problems:
        print(f"check_offline: {len(problems)} problem(s) in {pages} pages under {args.build}", file=sys.stderr)
        return 1
    print(f"check_offline: {pages} pages under {args.build} load nothing from the network")
    return 0


if __name__ == "__main__":
    sys.exit(main())
