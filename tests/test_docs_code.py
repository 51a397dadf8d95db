"""Every Python block of the README and of the Sphinx pages runs: per page, in order, in one namespace, offline.

Which blocks run (the rule; README.md's Development section points here):

* ``README.md`` (Markdown): every ```` ```python ```` fence. Other fences (``bash``, ``text``, …) are shown only.
* ``docs/**/*.rst``: every ``.. code-block::`` / ``.. code::`` / ``.. sourcecode::`` whose language is
  ``python``, ``python3``, ``py`` or ``pycon``. A block (of any directive, or a literal ``::`` block) whose first
  line starts with ``>>>`` is a doctest: its expected output is compared (with the project's doctest flags,
  ``NORMALIZE_WHITESPACE``, ``ELLIPSIS`` and ``NUMBER``).
* A literal ``::`` block that is not a doctest is *text* (a directory layout, a diagram, an error message) and
  must not be valid Python: Python that should run goes into ``.. code-block:: python`` so nobody can hide code
  from this test in a ``::`` block (:func:`test_literal_blocks_are_not_python`).
* The rare block that cannot run by nature (a multi-node launch, a command that needs a real data set) carries a
  marker on the line right before it, with the reason: ``.. docs-test: no-run (REASON)`` (an invisible reST
  comment) or ``<!-- docs-test: no-run (REASON) -->`` in Markdown. :data:`NO_RUN_ALLOWED` lists the pages that
  may use it, so a new exception is a deliberate change to this file.

Each page runs in a fresh temporary directory (blocks may write files there), with the seeds fixed, matplotlib
on its ``Agg`` backend and every non-local network connection refused, so a block that downloads anything fails
here even on a machine that is online. Some pages have a check on the namespace they leave behind
(:data:`PAGE_CHECKS`), so a page that "runs" but computes nonsense fails too.
"""

from __future__ import annotations

import doctest
import ipaddress
import math
import re
import socket
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

PYTHON_LANGUAGES = {"python", "python3", "py", "pycon"}
NO_RUN = "docs-test: no-run"
#: Pages allowed to mark a block ``no-run`` (and why: each reason is also written beside the block).
NO_RUN_ALLOWED: dict[str, str] = {
    "docs/api/datasets_real.rst": "the loaders of real data sets need a real copy of the data",
}
#: Pages whose blocks take more than a few seconds: both run a quick study (1-2 min on a busy 2-core CPU).
SLOW_PAGES = {"README.md", "docs/guides/study.rst"}

_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\.\s+(?P<name>code-block|code|sourcecode)::\s*(?P<lang>\S*)\s*$")
_ANY_DIRECTIVE = re.compile(r"^\s*\.\.\s+[\w:-]+::")
_FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")


def _doctest_runner() -> doctest.DocTestRunner:
    """A runner with the flags ``pyproject.toml`` gives pytest's doctests (``NUMBER`` is pytest's own flag)."""
    from _pytest import doctest as pytest_doctest  # the checker that understands NUMBER; no public API for it

    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS | pytest_doctest._get_number_flag()
    return doctest.DocTestRunner(checker=pytest_doctest._get_checker(), optionflags=flags)


@dataclass(frozen=True)
class Block:
    """One code block of a page: ``kind`` is ``python``, ``doctest``, ``text`` or ``no-run``."""

    kind: str
    code: str
    line: int  # 1-based line of the first code line
    literal: bool = False  # a reST literal ``::`` block (not a directive)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _indented_body(lines: list[str], start: int, min_indent: int) -> tuple[str, int, int]:
    """The block of lines from ``start`` indented deeper than ``min_indent`` (blank lines inside kept).

    Returns the dedented text, the index of its first non-blank line and the index after its last line.
    """
    i = start
    while i < len(lines) and not lines[i].strip():
        i += 1
    first = i
    body: list[str] = []
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > min_indent):
        body.append(lines[i])
        i += 1
    while body and not body[-1].strip():
        body.pop()
    return textwrap.dedent("\n".join(body)) + "\n", first, first + len(body)


def _marked_no_run(lines: list[str], index: int) -> bool:
    j = index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    return j >= 0 and NO_RUN in lines[j]


def rst_blocks(text: str) -> list[Block]:
    """The code blocks of a reST page, in order (see the module docstring for the rule)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE.match(line)
        literal = line.rstrip().endswith("::") and not _ANY_DIRECTIVE.match(line)
        if not directive and not literal:
            i += 1
            continue
        indent = _indent(line)
        start = i + 1
        if directive:  # skip the directive's options (":caption: ...", ":linenos:")
            while start < len(lines) and lines[start].strip().startswith(":") and _indent(lines[start]) > indent:
                start += 1
        code, first, end = _indented_body(lines, start, indent)
        if not code.strip():
            i += 1
            continue
        if _marked_no_run(lines, i):
            kind = "no-run"
        elif code.lstrip().startswith(">>>"):
            kind = "doctest"
        elif directive:
            kind = "python" if directive["lang"].lower() in PYTHON_LANGUAGES else "text"
        else:
            kind = "text"
        blocks.append(Block(kind, code, first + 1, literal=not directive))
        i = end
    return blocks


def markdown_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        code = "\n".join(lines[i + 1 : end]) + "\n"
        lang = fence["lang"].lower()
        if _marked_no_run(lines, i):
            kind = "no-run"
        elif code.lstrip().startswith(">>>"):
            kind = "doctest"
        else:
            kind = "python" if lang in PYTHON_LANGUAGES else "text"
        blocks.append(Block(kind, code, i + 2))
        i = end + 1
    return blocks


def page_blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    return markdown_blocks(text) if path.suffix == ".md" else rst_blocks(text)


def pages() -> list[Path]:
    rst = sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts)
    return [README, *rst]


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def runnable_pages() -> list[Any]:
    params = []
    for path in pages():
        if any(b.kind in ("python", "doctest") for b in page_blocks(path)):
            marks = [pytest.mark.slow] if _name(path) in SLOW_PAGES else []
            params.append(pytest.param(path, id=_name(path), marks=marks))
    return params


# --------------------------------------------------------------------------------------------------- offline


def _is_local(address: Any) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse every Python-level connection that leaves the machine (downloads, pip, hub)."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self: socket.socket, address: Any) -> Any:
        if not _is_local(address):
            raise OSError(f"the docs must run offline: connection to {address!r} refused by tests/test_docs_code.py")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        if not _is_local(address):
            raise OSError(f"the docs must run offline: connection to {address!r} refused by tests/test_docs_code.py")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


# --------------------------------------------------------------------------------------------------- checks


def _check_getting_started(ns: dict[str, Any]) -> None:
    losses, before, after = ns["losses"], ns["before"], ns["metrics"]
    assert len(losses) == 40  # 10 epochs x 4 batches of 32 out of 128 training images
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])
    for key in ("recall@1", "recall@2", "recall@4", "map@r"):
        assert 0.0 <= after[key] <= 1.0
    assert after["map@r"] > before["map@r"]  # the loop learns (+0.03 to +0.13 over seeds 0-2)


def _check_readme(ns: dict[str, Any]) -> None:
    assert (Path.cwd() / "my_study" / "results.json").is_file()
    assert (Path.cwd() / "my_audit" / "report.html").is_file()


def _check_metrics_extra(ns: dict[str, Any]) -> None:
    from dml_bias.metrics import knn, retrieval_metrics

    # In one process the "shard" is the whole gallery: the sharded search equals the plain one.
    with torch.no_grad():
        gallery = ns["model"](ns["gallery_images"])
    _, ids = knn(ns["queries"], gallery, k=100)
    assert torch.equal(ns["ids"], ids)
    plain = retrieval_metrics(ns["queries"], ns["query_labels"], gallery, ns["gallery_labels"], ks=(1, 10, 100))
    for key in ("recall@1", "recall@10", "recall@100", "map@r"):
        assert ns["metrics"][key] == pytest.approx(plain[key], abs=1e-12)


PAGE_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "docs/getting_started.rst": _check_getting_started,
    "docs/api/metrics_extra.rst": _check_metrics_extra,
    "README.md": _check_readme,
}


# --------------------------------------------------------------------------------------------------- tests


def _run_doctest(block: Block, namespace: dict[str, Any], filename: str) -> None:
    parser, runner = doctest.DocTestParser(), _doctest_runner()
    test = parser.get_doctest(block.code, namespace, f"{filename}:{block.line}", filename, block.line - 1)
    test.globs = namespace  # one namespace per page: names defined here are visible to later blocks
    out: list[str] = []
    runner.run(test, out=out.append, clear_globs=False)
    if runner.failures:
        pytest.fail(f"doctest at {filename}:{block.line} failed:\n" + "".join(out), pytrace=False)


def _run_python(block: Block, namespace: dict[str, Any], filename: str) -> None:
    # Pad with blank lines so tracebacks point at the line of the page.
    code = compile("\n" * (block.line - 1) + block.code, filename, "exec")
    exec(code, namespace)


@pytest.mark.parametrize("path", runnable_pages())
@pytest.mark.usefixtures("offline")
def test_page_code_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One intra-op thread: the pages run in seconds even on a busy CI machine, where several threads per
    # process oversubscribe the cores (and the results do not depend on the machine's core count).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_page(path)
    finally:
        torch.set_num_threads(threads)
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # a page failed mid-way
            torch.distributed.destroy_process_group()


def _run_page(path: Path) -> None:
    name = _name(path)
    namespace: dict[str, Any] = {"__name__": f"docs:{name}"}
    ran = 0
    for block in page_blocks(path):
        if block.kind == "python":
            _run_python(block, namespace, str(path))
        elif block.kind == "doctest":
            _run_doctest(block, namespace, str(path))
        else:
            continue
        ran += 1
    assert ran > 0
    if name in PAGE_CHECKS:
        PAGE_CHECKS[name](namespace)


def test_literal_blocks_are_not_python() -> None:
    """A ``::`` block that parses as Python would escape this test: such code belongs in ``code-block:: python``."""
    hidden = []
    for path in pages():
        if path.suffix != ".rst":
            continue
        for block in rst_blocks(path.read_text(encoding="utf-8")):
            if block.kind != "text" or not block.literal:
                continue
            try:
                compile(block.code, str(path), "exec")
            except SyntaxError:
                continue
            hidden.append(f"{_name(path)}:{block.line}")
    assert not hidden, f"literal '::' blocks that are valid Python (use '.. code-block:: python'): {hidden}"


def test_no_run_markers_are_rare_and_justified() -> None:
    for path in pages():
        for block in page_blocks(path):
            if block.kind == "no-run":
                assert _name(path) in NO_RUN_ALLOWED, f"{_name(path)}:{block.line} is marked no-run"
                # not run, but at least valid Python
                compile(block.code, f"{_name(path)}:{block.line}", "exec")
    for path in pages():
        for match in re.finditer(re.escape(NO_RUN) + r"(.*)", path.read_text(encoding="utf-8")):
            assert re.match(r"\s*\(\S.*\)", match.group(1)), f"{_name(path)}: a no-run marker needs a (reason)"


def test_readme_has_quick_start_commands() -> None:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", text, flags=re.DOTALL)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ['pip install -e ".[dev]"', "dml-bias study", "python -m pytest"]


def test_every_page_with_code_is_collected() -> None:
    names = {p.id for p in runnable_pages()}
    for expected in ("README.md", "docs/getting_started.rst", "docs/guides/background_masks.rst"):
        assert expected in names


# ----------------------------------------------------------------------------------------- the extractor itself

SAMPLE_RST = """\
Title
=====

Run this:

.. code-block:: python
   :caption: first

   x = 1

     y = 2

A layout::

    root/
      images/

.. code-block:: bash

   pip install dml-bias

A doctest::

    >>> x + 1
    2

.. docs-test: no-run (needs eight GPUs)

.. code-block:: python

   launch()

.. math::

   a = b
"""

SAMPLE_MD = """\
# T

```python
a = 1
```

```bash
ls
```

<!-- docs-test: no-run (a real data set) -->
```python
load()
```
"""


def test_rst_extractor_follows_the_rule() -> None:
    blocks = rst_blocks(SAMPLE_RST)
    assert [b.kind for b in blocks] == ["python", "text", "text", "doctest", "no-run"]
    assert blocks[0].code == "x = 1\n\n  y = 2\n"
    assert blocks[0].line == 9
    assert blocks[1].code == "root/\n  images/\n"
    assert blocks[3].code == ">>> x + 1\n2\n"
    assert blocks[4].code == "launch()\n"


def test_markdown_extractor_follows_the_rule() -> None:
    blocks = markdown_blocks(SAMPLE_MD)
    assert [(b.kind, b.code, b.line) for b in blocks] == [
        ("python", "a = 1\n", 4),
        ("text", "ls\n", 8),
        ("no-run", "load()\n", 13),
    ]


def test_failing_doctest_fails(tmp_path: Path) -> None:
    ns: dict[str, Any] = {}
    _run_python(Block("python", "x = 1\n", 1), ns, "page.rst")
    _run_doctest(Block("doctest", ">>> x + 1\n2\n", 3), ns, "page.rst")
    with pytest.raises(pytest.fail.Exception, match=r"page\.rst:3"):
        _run_doctest(Block("doctest", ">>> x + 1\n3\n", 3), ns, "page.rst")


@pytest.mark.usefixtures("offline")
def test_offline_guard_refuses_remote_connections() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(OSError, match="offline"):
        s.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed


def _iter_blocks() -> Iterator[tuple[str, Block]]:  # pragma: no cover - debugging aid
    for path in pages():
        for block in page_blocks(path):
            yield _name(path), block


if __name__ == "__main__":  # list the blocks and their kinds: python tests/test_docs_code.py
    for page, block in _iter_blocks():
        print(f"{page}:{block.line}: {block.kind}")
