"""Supply chain: every dependency pinned with a ceiling, the start-up check equal to the pins' floors, and
requirements.lock covering the pins with hashes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from inverse_cloud.dav import server

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _spec(req: str) -> tuple[str, str, str]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+),<([0-9.]+)", req.replace(" ", ""))
    assert m, f"{req!r}: expected NAME>=FLOOR,<CEILING"
    return m.group(1).lower(), m.group(2), m.group(3)


@pytest.mark.parametrize("req", PYPROJECT["project"]["dependencies"]
                         + PYPROJECT["project"]["optional-dependencies"]["test"])
def test_every_dependency_has_a_floor_and_a_ceiling(req):
    _spec(req)


def test_start_up_check_matches_the_pins():
    """MINIMUM_VERSIONS names every runtime dependency with its pin's floor (Radicale included): before,
    it held aiohttp and asyncssh only, with an asyncssh floor (2.14.2) below the pin (2.24.1)."""
    floors = {name: tuple(int(p) for p in floor.split(".")) for name, floor, _ in
              map(_spec, PYPROJECT["project"]["dependencies"])}
    assert server.MINIMUM_VERSIONS == floors


def test_lock_pins_every_dependency_with_hashes_inside_the_ranges():
    text = (REPO / "requirements.lock").read_text()
    pinned = dict(re.findall(r"(?m)^([a-z0-9_.-]+)==([^ \\]+) \\\n\s+--hash=sha256:", text))
    for req in PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["test"]:
        name, floor, ceiling = _spec(req)
        assert name in pinned, f"{name} is not in requirements.lock"
        version = server._release(pinned[name])
        assert server._release(floor) <= version < server._release(ceiling), (name, pinned[name])
    assert "file:///" not in text and "--find-links" not in text


def test_an_old_radicale_refuses_to_start(monkeypatch):
    import importlib.metadata

    from inverse_cloud.errors import StartupError

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.8.2" if name == "radicale" else real(name))
    with pytest.raises(StartupError, match="radicale 3.8.2 is older than 3.9.0"):
        server.check_versions()
