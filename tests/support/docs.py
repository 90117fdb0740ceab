"""The shell blocks of README.md and docs/*.md, extracted so tests run them as written.

A block is a run of lines indented by four spaces (Markdown's indented code block) or a ```sh/```bash/```console
fence. :func:`shell_blocks` returns the blocks under one heading, each as its list of command lines (a trailing
``# comment`` is kept: the shell ignores it)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DOCS_AS_TESTS", "Block", "DocBlocks", "all_blocks", "command_lines", "shell_blocks"]

# the documents whose every code block is run by a test or marked as not run
DOCS_AS_TESTS = ("README.md", "docs/setup.md")


def _section(text: str, heading: str) -> list[str]:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#+)\s+(.*)$", line)
        if m and m.group(2).strip().startswith(heading):
            level = len(m.group(1))
            out = []
            for nxt in lines[i + 1:]:
                n = re.match(r"^(#+)\s", nxt)
                if n and len(n.group(1)) <= level:
                    break
                out.append(nxt)
            return out
    raise LookupError(f"no heading starting with {heading!r}")


def shell_blocks(path: Path, heading: str) -> list[list[str]]:
    """The code blocks of the section whose heading starts with ``heading`` (up to the next heading of the
    same or a higher level), in order."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    fenced = False
    for line in _section(path.read_text(encoding="utf-8"), heading) + [""]:
        if fenced:
            if line.strip().startswith("```"):
                fenced = False
                blocks.append(current or [])
                current = None
            elif current is not None:
                current.append(line)
            continue
        if line.strip().startswith("```"):
            fenced, current = True, []
            continue
        if line.startswith("    ") and line.strip():
            current = (current or []) + [line[4:]]
        elif current is not None:  # a blank or an unindented line ends the block
            blocks.append(current)
            current = None
    return [b for b in blocks if b]


def command_lines(block: list[str]) -> list[str]:
    """The block's lines with continuation lines (ending in ``\\``) joined into one command each."""
    out: list[str] = []
    pending = ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


# --- every block of a document, with its docs-test mark -------------------------------------------------

MARK = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
RUN = re.compile(r"^run on (\w+) by (test_\w+)$")
NOT_RUN = re.compile(r"^not run: (\S.*)$")


@dataclass(frozen=True)
class Block:
    """One code block of a document: where it is, its lines, and the ``<!-- docs-test: ... -->`` comment on the
    line before it (a blank line between is allowed): ``run on ROLE by TEST`` (a journey test runs it on that
    host of the test world) or ``not run: REASON``; empty when the block has no mark."""

    doc: str
    line: int
    heading: str
    lines: tuple[str, ...]
    mark: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line} (under {self.heading!r})"

    def run_by(self) -> tuple[str, str] | None:
        """(role, test name) when the mark says a journey runs this block."""
        m = RUN.match(self.mark)
        return (m.group(1), m.group(2)) if m else None

    def not_run_reason(self) -> str:
        m = NOT_RUN.match(self.mark)
        return m.group(1) if m else ""


def all_blocks(path: Path, root: Path | None = None) -> list[Block]:
    """Every code block of the document (indented or fenced, found as :func:`shell_blocks` finds them), in
    order, each with the mark on the last non-blank line before it."""
    name = str(path.relative_to(root)) if root else path.name
    out: list[Block] = []
    heading, last_text = "", ""
    current: list[str] | None = None
    start, mark, fenced = 0, "", False
    for no, line in enumerate([*path.read_text(encoding="utf-8").splitlines(), ""], start=1):
        if fenced:
            if line.strip().startswith("```"):
                fenced = False
                out.append(Block(name, start, heading, tuple(current or []), mark))
                current, last_text = None, line
            elif current is not None:
                current.append(line)
            continue
        if line.strip().startswith("```"):
            m = MARK.match(last_text)
            fenced, current, start, mark = True, [], no + 1, m.group(1) if m else ""
            continue
        if line.startswith("    ") and line.strip():
            if current is None:
                m = MARK.match(last_text)
                current, start, mark = [], no, m.group(1) if m else ""
            current.append(line[4:])
            continue
        if current is not None:  # a blank or an unindented line ends the block
            out.append(Block(name, start, heading, tuple(current), mark))
            current = None
            last_text = ""
        h = re.match(r"^#+\s+(.*)$", line)
        if h:
            heading = h.group(1).strip()
        if line.strip():
            last_text = line
    return [b for b in out if b.lines]


class DocBlocks:
    """The code blocks of README.md and docs/setup.md whose mark says ``run on ROLE by <test>``; the test
    takes each before it runs it, and :meth:`assert_all_ran` fails on one it never took."""

    def __init__(self, repo: Path, test: str) -> None:
        self.test = test
        self.mine = [b for doc in DOCS_AS_TESTS for b in all_blocks(repo / doc, repo)
                     if (b.run_by() or ("", ""))[1] == test]
        self.ran: set[Block] = set()

    def take(self, doc: str, first: str, role: str = "laptop") -> Block:
        block = next((b for b in self.mine if b.doc == doc and b.lines[0].startswith(first)), None)
        assert block is not None, f"{doc}: no block starting {first!r} marked 'run on {role} by {self.test}'"
        assert block.run_by() == (role, self.test), block.mark
        self.ran.add(block)
        return block

    def line(self, block: Block, first: str) -> str:
        """The block's command line that starts with ``first``, as written (its trailing comment included)."""
        found = [line for line in command_lines(list(block.lines)) if line.startswith(first)]
        assert len(found) == 1, (first, block.lines)
        return found[0]

    def assert_all_ran(self) -> None:
        missing = [b.where for b in self.mine if b not in self.ran]
        assert not missing, f"blocks marked 'run ... by {self.test}' that it never ran: {missing}"

