from __future__ import annotations

import os

import pytest

# Radicale reads RADICALE_CONFIG when used through its global entry point; we never do, and a test
# environment must not leak one in.
os.environ.pop("RADICALE_CONFIG", None)


@pytest.fixture
def instance(tmp_path):
    """A fresh initialised instance (config path); user alice / 'correct horse'."""
    from tests.support import init_instance

    return init_instance(tmp_path / "ic")
