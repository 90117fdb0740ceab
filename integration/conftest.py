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


@pytest.fixture
def relay_instance(tmp_path):
    """An initialised instance whose [relay] points at a real sshd set up by relay-setup (host key pinned),
    with fast keepalives; yields (config path, RelaySshd). sshd is stopped by pid afterwards."""
    from relay_sshd import TEST_USER, configure, relay_sshd, sshd_available

    from tests.support import free_port, init_instance

    missing = sshd_available()
    assert missing is None, missing
    cfg = init_instance(tmp_path / "ic", relay=f"{TEST_USER}@127.0.0.1:{free_port()}")
    configure(cfg, "relay", keepalive_interval_s=2, keepalive_count_max=3, connect_timeout_s=5)
    with relay_sshd(cfg) as relay:
        yield cfg, relay


@pytest.fixture(scope="session")
def world():
    """The simulated internet of integration/world.py (relay, DNS, CA, a NATed laptop, a phone), built once per
    test run and shared; torn down (every process by pid, every namespace) at the end of the session."""
    from world import world_session

    assert os.geteuid() == 0, "the world needs root (network and mount namespaces); CI runs as root"
    with world_session() as w:
        yield w
