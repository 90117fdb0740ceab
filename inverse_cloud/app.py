"""``serve``'s composition root: every component built from :class:`~inverse_cloud.config.Config`, in start
order, with real types. This is the only place that shows the whole process.

Start order (the supervisor stops in reverse):

1. the DAV server: both listeners, the Radicale bridge, the TLS manager (a self-signed stand-in until a
   certificate exists), with the phone page as its home page and the sync tracker as a response hook;
2. the tunnel to the relay, when ``[relay]`` names a host: it starts after the listeners it forwards to
   and stops before them, so no new connection arrives while the server drains; it owns its link watcher
   (netlink and resume checks), which it starts and stops with itself;
3. the certificate manager, when ``[acme]`` is enabled: it needs the HTTP listener (challenges) and,
   through the tunnel, the public path;
4. the phone page's own thread pool, the control socket (``status``, ``probe``), systemd notifications.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from inverse_cloud import config as config_mod
from inverse_cloud.config import Config
from inverse_cloud.dav.server import DavServer
from inverse_cloud.errors import ConfigError, InverseCloudError, StartupError
from inverse_cloud.ops.control import ControlServer, refuse_if_running
from inverse_cloud.ops.phone import HomePage
from inverse_cloud.ops.status import SyncTracker, collect, snapshot
from inverse_cloud.ops.systemd import Notifier, SystemdComponent, short_summary
from inverse_cloud.ops.verbs import cert_renew_verb, probe_verb
from inverse_cloud.supervisor import Supervisor

__all__ = ["build_supervisor", "cmd_serve", "serve"]


def build_supervisor(cfg: Config) -> Supervisor:
    """Every component of ``serve`` for ``cfg``, added to one supervisor in start order."""
    started_at = time.time()
    sup = Supervisor()
    tracker = SyncTracker()
    def page_status() -> dict[str, Any]:
        # Called per page view, once serve runs: every component below is built by then.
        return snapshot(cfg, server, sup.components, tracker, started_at)

    page = HomePage(cfg.server.domain, cfg.server.htpasswd_path, cfg.server.storage_dir,
                    auth_delay_s=cfg.server.auth_delay_s, status=page_status)
    server = DavServer(cfg, public_https_port=443, home_handler=page, response_hooks=[tracker.note])
    sup.add(server)

    if cfg.relay.enabled and cfg.relay.host:
        from inverse_cloud.tunnel.link import Tunnel
        from inverse_cloud.tunnel.watcher import LinkWatcher

        sup.add(Tunnel(cfg, server, watcher=LinkWatcher()))
    manager = None
    if cfg.acme.enabled:
        from inverse_cloud.certs.manager import CertManager

        manager = CertManager(cfg, server)
        sup.add(manager)

    sup.add(page)

    control = ControlServer(cfg.server.control_socket)

    async def status_verb(_request: dict[str, Any]) -> Any:
        return await collect(cfg, server, sup.components, tracker, started_at)

    control.register("status", status_verb)
    control.register("probe", probe_verb(server.challenges))
    if manager is not None:
        control.register("cert-renew", cert_renew_verb(manager))
    sup.add(control)

    sd = SystemdComponent(Notifier(), lambda: short_summary(
        snapshot(cfg, server, sup.components, tracker, started_at)))
    sup.add(sd)
    sup.on_ready.append(sd.ready)
    sup.on_stopping.append(sd.stopping)
    return sup


def serve(cfg: Config) -> None:
    """Run ``serve`` until SIGTERM/SIGINT.

    :raises StartupError: a component could not start (the ones already started were stopped).
    :raises ConfigError: the configuration cannot be served as it is.
    """
    from inverse_cloud.fsutil import access_problem

    for folder, what in ((cfg.server.data_dir, "the data folder"), (cfg.server.state_dir, "the state folder")):
        problem = access_problem(folder, what)
        if problem:
            raise StartupError(problem)
    asyncio.run(refuse_if_running(cfg.server.control_socket))
    sup = build_supervisor(cfg)
    try:
        asyncio.run(sup.run())
    except (StartupError, ConfigError):
        raise
    except InverseCloudError as exc:
        raise StartupError(str(exc)) from exc


def cmd_serve(args: argparse.Namespace) -> int:
    from inverse_cloud import log as log_mod

    cfg = config_mod.load_config(args)
    log_mod.setup(args.log_level or cfg.server.log_level)
    serve(cfg)
    return 0
