"""What an import would change on this machine, said before anything is written (pure reads).

An export's manifest proves the file is intact, not who made it: anyone can recompute the sums. So
``import`` lists what the file would change that decides who can log in, where the tunnel goes and
which certificates are asked for (the users, the SSH keys and pinned relay host key, the ACME account
key, and, with no config yet, the relay, ACME and Radicale settings of the exported config) and goes
on only with ``--accept-changes``.
"""

from __future__ import annotations

from pathlib import Path

from inverse_cloud.config import Config

__all__ = ["describe_changes"]


def _htpasswd(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    users = {}
    for line in text.splitlines():
        name, sep, hashed = line.partition(":")
        if sep and name and not name.startswith("#"):
            users[name] = hashed.strip()
    return users


def _user_changes(staged: Path, current: Path) -> list[str]:
    new, old = _htpasswd(staged), _htpasswd(current)
    out = []
    if added := sorted(set(new) - set(old)):
        out.append(f"users: adds {', '.join(added)} (with the passwords set in the export)")
    if removed := sorted(set(old) - set(new)):
        out.append(f"users: removes {', '.join(removed)}")
    if changed := sorted(u for u in set(new) & set(old) if new[u] != old[u]):
        out.append(f"users: replaces the password of {', '.join(changed)}")
    return out


def _file_changes(staged_data: Path, target_data: Path) -> list[str]:
    out = []
    for path in sorted(p for p in staged_data.rglob("*") if p.is_file()):
        rel = path.relative_to(staged_data)
        if rel.parts[0] == "collections" or rel.as_posix() == "users.htpasswd":
            continue
        current = target_data / rel
        try:
            same = current.read_bytes() == path.read_bytes()
        except OSError:
            same = False
        if same:
            continue
        what = {"ssh": "SSH key or pinned relay host key", "acme": "ACME account key or state"}.get(rel.parts[0],
                                                                                                  "file")
        verb = "replaces" if current.exists() else "adds"
        out.append(f"{what}: {verb} {current}")
    return out


def _config_summary(exported: Config) -> list[str]:
    r, a = exported.relay, exported.acme
    out = [f"config: domain {exported.server.domain}"]
    out.append(f"config: relay {r.user}@{r.host}:{r.port}, pinned host key {r.host_key or '(none)'}"
               if r.enabled else "config: no relay")
    out.append(f"config: ACME {a.directory}, email {a.email or '(none)'}" if a.enabled else "config: ACME off")
    for section, options in sorted(exported.radicale_extra.items()):
        for option, value in sorted(options.items()):
            out.append(f"config: [radicale.{section}] {option} = {value}")
    if exported.server.web_ui:
        out.append("config: Radicale's web interface on (web_ui = true)")
    return out


def describe_changes(staging: Path, target_data: Path, exported: Config | None, writes_config: bool) -> list[str]:
    """One line per change the staged import would make to ``target_data`` (and to the config when
    ``writes_config``), the store itself left out (import only ever fills an empty one)."""
    staged_data = staging / "data"
    changes = _user_changes(staged_data / "users.htpasswd", target_data / "users.htpasswd")
    changes += _file_changes(staged_data, target_data)
    if writes_config and exported is not None:
        changes += _config_summary(exported)
    return changes
