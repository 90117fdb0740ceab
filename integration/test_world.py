"""The test world itself: names resolve through its DNS server, the laptop reaches the internet only through
its NAT router, the relay's sshd answers on its public address, and a reboot clears the relay's runtime
state. (The journey, integration/test_journey.py, relies on each of these.)"""

from __future__ import annotations

from world import HOSTS, RELAY_NAME, ZONE

PROBE = f"probe.{ZONE}"  # a name no other test publishes (the world is shared by the session)


def test_names_resolve_through_the_world_dns(world):
    """Every host's system resolver asks the world's DNS server: the relay's name resolves on the laptop, the
    phone and the relay itself; a published record appears at once and an unpublished one is gone."""
    relay = HOSTS["relay"].address
    for role in ("laptop", "phone", "relay", "ca"):
        assert world.resolve(role, RELAY_NAME) == [relay], role
    assert world.resolve("phone", PROBE) == []
    world.publish([f"{PROBE}. A {relay}   ; a comment"])
    try:
        assert world.resolve("laptop", PROBE) == [relay]
    finally:
        world.unpublish(PROBE, "A")
    assert world.resolve("phone", PROBE) == []


def test_the_laptop_is_behind_a_masquerading_router(world):
    """The laptop reaches the relay's sshd by its public address; the relay sees the router's address, not the
    laptop's (the connection is masqueraded); the phone cannot reach the laptop's home address."""
    import socket

    sock = world.call("laptop", socket.create_connection, (HOSTS["relay"].address, 22), 10)
    try:
        assert sock.recv(4) == b"SSH-"
        seen = world.run("relay", "ss", "-tnH", "state", "established", "( sport = :22 )").stdout
        assert f"{HOSTS['router'].address}:" in seen and HOSTS["laptop"].address not in seen, seen
    finally:
        sock.close()
    assert not world.tcp_open("phone", HOSTS["laptop"].address, 22)


def test_a_reboot_clears_what_is_not_persistent(world):
    """A rule loaded by hand and a sysctl set by hand (in no sysctl.d file) on the relay are gone after a
    reboot; sshd is back."""
    world.run("relay", "nft", "add table ip wo_manual", check=True)
    world.run("relay", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", check=True)
    world.reboot_relay()
    assert "wo_manual" not in world.run("relay", "nft", "list", "tables").stdout
    assert world.run("relay", "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
    assert world.tcp_open("phone", HOSTS["relay"].address, 22)
