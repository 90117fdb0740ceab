"""One owner for every component's lifetime.

Components are started in the order they are added and stopped in reverse: on SIGTERM/SIGINT the
last-started (the tunnel) stops first, so no new work arrives, then the HTTP server drains in-flight
requests within ``[server] shutdown_timeout_s``, then Radicale's threads finish. SIGHUP calls every
component's ``reload()`` (certificates, user file). A component that fails while running is logged
once; the others keep serving.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

__all__ = ["Component", "Supervisor"]

log = logging.getLogger(__name__)


@runtime_checkable
class Component(Protocol):
    name: str

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class Supervisor:
    def __init__(self) -> None:
        self._components: list[Component] = []
        self._started: list[Component] = []
        self._stop = asyncio.Event()
        self.stop_reason = ""
        # A hook may be a coroutine function (work it must keep off the event loop runs in a thread).
        self._reload_hooks: list[Callable[[], Awaitable[None] | None]] = []
        self._reloads: set[asyncio.Task[None]] = set()
        self.on_ready: list[Callable[[], None]] = []
        self.on_stopping: list[Callable[[], None]] = []

    @property
    def components(self) -> tuple[Component, ...]:
        """Every component added, in start order (status reporting reads their ``status()``)."""
        return tuple(self._components)

    def add(self, component: Component) -> Component:
        self._components.append(component)
        reload = getattr(component, "reload", None)
        if callable(reload):
            self._reload_hooks.append(reload)
        return component

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop.set()

    def reload(self) -> asyncio.Task[None]:
        """SIGHUP: every component's ``reload()``, in start order, in a task (the signal handler returns
        at once). A hook that fails is logged once and the others still run."""
        log.info("reloading certificates and users (SIGHUP)")
        task = asyncio.get_running_loop().create_task(self._reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)
        return task

    async def _reload(self) -> None:
        for hook in self._reload_hooks:
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # boundary: a reload failure must not kill a serving process
                log.error("reload failed: %s", exc, exc_info=True)

    def reconnect(self) -> None:
        """SIGUSR1: links to the outside (the tunnel) re-establish themselves now (network changed)."""
        for component in self._components:
            hook = getattr(component, "reconnect", None)
            if callable(hook):
                hook()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.reconnect)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)

    async def run(self, install_signals: bool = True) -> None:
        """Start everything, wait for a stop request, stop everything in reverse.

        :raises InverseCloudError: a component could not start (the ones started are stopped first).
        """
        if install_signals:
            self._install_signals()
        try:
            try:
                for component in self._components:
                    await component.start()
                    self._started.append(component)
            except BaseException:
                await self._stop_all()
                raise
            for hook in self.on_ready:
                hook()
            await self._stop.wait()
            log.info("stopping (%s)", self.stop_reason)
            for hook in self.on_stopping:
                hook()
            await self._stop_all()
        finally:
            if install_signals:
                self._remove_signals()

    async def _stop_all(self) -> None:
        while self._started:
            component = self._started.pop()
            try:
                await component.aclose()
            except Exception as exc:  # boundary: keep stopping the rest
                log.error("stopping %s failed: %s", component.name, exc, exc_info=True)
        log.info("stopped")
