"""README.md and docs/setup.md give the same install commands, and the commands they show exist."""

from __future__ import annotations

from pathlib import Path

from inverse_cloud.cli import build_parser
from tests.support.docs import command_lines, shell_blocks

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
