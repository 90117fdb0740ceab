"""Sub-commands and serve-time components of one feature area (see cli.EXTENSIONS)."""

from __future__ import annotations

import argparse
from typing import Any

from .config import Config


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add this area's sub-commands to the inverse-cloud parser."""


def serve_hook(cfg: Config, supervisor: Any, server: Any) -> None:
    """Add this area's components to ``serve`` (called in start order, after the DAV server)."""
