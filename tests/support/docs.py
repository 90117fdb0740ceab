"""The shell blocks of README.md and docs/*.md, extracted so tests run them as written.

A block is a run of lines indented by four spaces (Markdown's indented code block) or a ```sh/```bash/```console
fence. :func:`shell_blocks` returns the blocks under one heading, each as its list of command lines (a trailing
``# comment`` is kept: the shell ignores it)."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["command_lines", "shell_blocks"]


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
