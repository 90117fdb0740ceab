"""README.md and docs/setup.md give the same install commands, the commands they show exist, and every code block
in them is either run by a journey test in the test world or marked as not run, with the reason."""

from __future__ import annotations

import re
from pathlib import Path

from inverse_cloud.cli import build_parser
from tests.support.docs import DOCS_AS_TESTS, all_blocks, command_lines, shell_blocks

REPO = Path(__file__).resolve().parent.parent


def test_readme_and_setup_md_install_the_same_way():
    """The first block of README's "Run it" and of setup.md's step 1 install with the same commands (what
    follows differs: README goes on with `setup`, step 1 with `init`)."""
    def install(block: list[str]) -> list[str]:
        return [line for line in block if not line.startswith("inverse-cloud")]

    readme = install(shell_blocks(REPO / "README.md", "Run it")[0])
    setup = install(shell_blocks(REPO / "docs" / "setup.md", "1. Laptop")[0])
    assert readme and readme == setup, (readme, setup)
    assert (REPO / readme[0].split()[1]).is_file(), readme[0]


def test_every_documented_inverse_cloud_command_parses():
    """Each `inverse-cloud ...` line of README and setup.md is accepted by the real parser (no stale flag)."""
    parser = build_parser()
    seen = 0
    for doc, heading in ((REPO / "README.md", "inverse-cloud"), (REPO / "docs" / "setup.md", "Setting up")):
        for block in shell_blocks(doc, heading):
            for line in command_lines(block):
                for part in line.split("#", 1)[0].split(";"):
                    words = part.split()
                    if words[:1] == ["inverse-cloud"] and len(words) > 1:
                        parser.parse_args(words[1:])
                        seen += 1
    assert seen >= 10, seen


ROLES = {"laptop", "relay", "phone", "container"}  # hosts of the test world; a systemd-nspawn container
RUNNERS = ("integration/test_journey.py", "integration/test_systemd_user.py")


def test_every_block_is_run_by_a_journey_or_marked_not_run():
    """Each code block of README.md and docs/setup.md carries a `<!-- docs-test: ... -->` mark: `run on ROLE by
    TEST`, where TEST is a test function of one of RUNNERS (which asserts at its end that it ran every block
    marked with its name), or `not run: REASON`. A new block without a mark fails here, so the docs
    cannot drift from what the journeys run without anyone deciding so."""
    journeys = {name for runner in RUNNERS
                for name in re.findall(r"^def (test_\w+)\(", (REPO / runner).read_text(), re.M)}
    problems, runs = [], 0
    for doc in DOCS_AS_TESTS:
        for block in all_blocks(REPO / doc, REPO):
            by = block.run_by()
            if by:
                role, test = by
                runs += 1
                if role not in ROLES or test not in journeys:
                    problems.append(f"{block.where}: {block.mark!r} names no known role/journey test")
            elif not block.not_run_reason():
                problems.append(f"{block.where}: neither 'run on ROLE by TEST' nor 'not run: REASON' "
                                f"(mark: {block.mark!r}); first line: {block.lines[0]}")
    assert not problems, "\n".join(problems)
    assert runs >= 8, runs


def test_all_blocks_finds_marks_and_unmarked_blocks(tmp_path):
    """The block finder itself: an indented and a fenced block, one marked each way, one unmarked."""
    doc = tmp_path / "d.md"
    doc.write_text("# T\n\n<!-- docs-test: run on laptop by test_x -->\n\n    echo one\n    echo two\n\ntext\n\n"
                   "<!-- docs-test: not run: because -->\n```sh\necho three\n```\n\n## U\n\n    echo four\n")
    blocks = all_blocks(doc)
    assert [b.lines for b in blocks] == [("echo one", "echo two"), ("echo three",), ("echo four",)]
    assert blocks[0].run_by() == ("laptop", "test_x") and blocks[0].line == 5
    assert blocks[1].not_run_reason() == "because"
    assert blocks[2].mark == "" and blocks[2].heading == "U"
