"""The README's quick start and the guide's examples, run as a reader runs them, so that
they cannot drift.

Every ```bash block of the README's set-up and quick-start sections, and every ```bash
block of the guide (``docs/*.md``), carries a marker on the line before it:
``<!-- test: run; creates: PATH ... -->`` (run here, in order; it must exit 0 and leave
each PATH), ``<!-- test: setup (REASON) -->`` (the README's activation: run in the clone,
then before every other block in the same shell) or ``<!-- test: skip (REASON) -->``. The
README's blocks run first, in an empty folder, in a shell whose PATH has no ``segflow``
until the setup block puts it there; the guide's then run in that same folder, page by
page in the order of ``mkdocs.yml``'s ``nav``, so they may use what the quick start made.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SECTIONS = ("## Set up and run", "## Quick start on your own data")
MARKER = re.compile(
    r"<!-- test: (run; creates: (?P<creates>[^>]*?)|skip \((?P<why>.+)\)"
    r"|(?P<setup>setup) \(.+\)) -->"
)
BASH_BLOCK = re.compile(r"(?:^([^\n]*)\n)?```bash\n(.*?)```", re.MULTILINE | re.DOTALL)
#: Shell blocks under another name would escape the markers: the guide writes ```bash.
OTHER_SHELL_FENCE = re.compile(r"^\s*```(sh|shell|console|zsh|shell-session)\s*$", re.MULTILINE)
EXIT_ROW = re.compile(r"^\| `(\d+)` \| ([^|]+) \|", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    where: str  # the file (and README section) it is in
    code: str
    why: str | None  # the skip reason; None: it runs
    creates: tuple[str, ...]
    setup: bool = False  # run in the clone before every other block, in the same shell


def marked_blocks(text: str, where: str) -> list[Block]:
    """Each ```bash block of ``text`` with its marker; a block without one fails."""
    assert not OTHER_SHELL_FENCE.search(text), f"{where}: a shell block not fenced as ```bash"
    blocks = []
    for m in BASH_BLOCK.finditer(text):
        marker = MARKER.fullmatch((m.group(1) or "").strip())
        assert marker, f"{where}: a bash block without a test marker:\n{m.group(2)}"
        creates = tuple((marker.group("creates") or "").split())
        setup = marker.group("setup") is not None
        blocks.append(Block(where, m.group(2), marker.group("why"), creates, setup))
    return blocks


def readme_blocks() -> list[Block]:
    """The marked bash blocks of the README's SECTIONS, in order."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for title in SECTIONS:
        assert title in text, f"README lost its section {title!r}"
        body = text.split(title, 1)[1]
        body = re.split(r"^## ", body, maxsplit=1, flags=re.MULTILINE)[0]
        blocks += marked_blocks(body, f"README.md, {title}")
    return blocks


def docs_pages() -> list[Path]:
    """The guide's pages in the order of mkdocs.yml's nav, then any others by name."""
    nav = re.findall(
        r"^\s*-\s*(?:[^:\n]+:\s*)?(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M
    )
    pages = [DOCS / name for name in nav]
    return pages + sorted(set(DOCS.glob("*.md")) - set(pages))


def docs_blocks() -> list[Block]:
    blocks = []
    for page in docs_pages():
        blocks += marked_blocks(page.read_text(), str(page.relative_to(ROOT)))
    return blocks


def test_every_quick_start_block_is_marked_and_most_run():
    blocks = readme_blocks()
    run = [b for b in blocks if b.why is None and not b.setup]
    assert len(run) >= 5, "the quick start should run train, segment, export and predict"
    assert [b.code for b in blocks if b.setup] == ["source .venv/bin/activate\n"]
    for b in blocks:
        assert b.why or b.creates or b.setup, f"a run block names no output:\n{b.code}"


def test_every_docs_block_is_marked_and_the_cheap_ones_run():
    pages = docs_pages()
    assert all(p.exists() for p in pages), f"mkdocs.yml names a missing page: {pages}"
    blocks = docs_blocks()
    run = [b for b in blocks if b.why is None]
    assert len(run) >= 5, "the guide's offline CLI examples (geometry, model, evaluate) should run"
    for b in blocks:
        assert b.why or b.creates, f"{b.where}: a run block names no output:\n{b.code}"


def slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) and GitHub give a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_the_readme_links_into_the_guide_resolve():
    """mkdocs build --strict checks links between the guide's pages; the README is not one."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]*)(?:#([^)\s]+))?\)", readme)
    assert links, "the README should point into docs/"
    for path, anchor in links:
        target = ROOT / path
        assert target.exists(), f"README links to {path}, which does not exist"
        if anchor:
            text = re.sub(r"```.*?```", "", target.read_text(), flags=re.DOTALL)
            headings = re.findall(r"^#+ (.+?)\s*$", text, re.MULTILINE)
            assert anchor in {slug(h) for h in headings}, f"README: {path} has no #{anchor}"


def test_the_readme_and_the_guide_point_at_nothing_outside_the_repository():
    for path in (ROOT / "README.md", *docs_pages()):
        text = path.read_text()
        for outside in ("../shared", "DESIGN.md"):
            assert outside not in text, f"{path.name} points at {outside}, not in a clone"


def test_the_readme_and_the_guide_give_the_same_exit_statuses():
    readme = dict(EXIT_ROW.findall((ROOT / "README.md").read_text()))
    guide = dict(EXIT_ROW.findall((DOCS / "guide.md").read_text()))
    assert readme, "the README lost its exit-status table"
    assert readme == guide


def without_segflow(path: str) -> str:
    """``path`` without the folders that hold a ``segflow`` command."""
    return os.pathsep.join(
        d for d in path.split(os.pathsep) if d and not os.access(Path(d, "segflow"), os.X_OK)
    )


class Reader:
    """One folder a reader works in, in a fresh shell: ``segflow`` is on its PATH only
    once the README's setup block (the activation, run in the clone) put it there."""

    def __init__(self, tmp: Path) -> None:
        if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
            pytest.skip(f"the tests run from {sys.prefix}, not this clone's .venv (make test)")
        self.work = tmp / "work"
        self.work.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        self.env = {**env, "PATH": without_segflow(os.environ["PATH"])}
        self.setup = "\n".join(b.code for b in readme_blocks() if b.setup)
        self.quick_start_ran: bool | None = None  # None: not yet; False: it failed

    def run(self, block: Block) -> None:
        script = f"cd {shlex.quote(str(ROOT))}\n{self.setup}\ncd {shlex.quote(str(self.work))}\n"
        res = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script + block.code],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if res.returncode != 0:
            pytest.fail(
                f"{block.where}: block failed ({res.returncode}):\n{block.code}\n"
                f"{res.stderr[-3000:]}"
            )
        assert "Traceback" not in res.stderr, f"{block.where}:\n{res.stderr}"
        for path in block.creates:
            assert (self.work / path).exists(), (
                f"{block.where}: {block.code.strip()} did not create {path}"
            )

    def quick_start(self) -> None:
        """Run the README's blocks once; a later caller skips when they failed."""
        if self.quick_start_ran is False:
            pytest.skip("the README's quick start failed (see its test)")
        if self.quick_start_ran:
            return
        self.quick_start_ran = False
        for block in readme_blocks():
            if block.why is None and not block.setup:
                self.run(block)
        self.quick_start_ran = True


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Reader:
    return Reader(tmp_path_factory.mktemp("reader"))


def test_the_quick_start_runs_as_written(reader: Reader):
    """In an empty folder."""
    reader.quick_start()


def test_the_guide_examples_run_after_the_quick_start(reader: Reader):
    """In the folder the quick start made, page by page in the nav's order."""
    reader.quick_start()
    for block in docs_blocks():
        if block.why is None:
            reader.run(block)
