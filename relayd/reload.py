"""SIGHUP: re-read the configuration file and apply what can change at run time.

Twisted installs no SIGHUP handler, and the default action of SIGHUP ends the process, so without this a stray
``kill -HUP`` or ``systemctl reload`` would stop the relay. A file that no longer parses is reported and the
running configuration stays; settings that need new sockets or sources are reported as needing a restart.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Callable

from twisted.application.service import Service

from relayd import config as configmod
from relayd import logs
from relayd.logs import Logger
from relayd.sse import SSEHub

log = Logger()


class ReloadOnHUP(Service):
    name = "reload"

    def __init__(self, path: Path, current: configmod.Config, hub: SSEHub, reactor: Any) -> None:
        self.path = path
        self.current = current
        self.hub = hub
        self.reactor = reactor
        self._previous: Callable[..., Any] | int | None = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def reload(self) -> configmod.Config | None:
        try:
            new = configmod.load(self.path)
        except configmod.ConfigError as e:
            log.error("SIGHUP: configuration not reloaded, keeping the running one: {error}", error=str(e))
            return None
        old = self.current
        logs.set_level(new.relayd.log_level)
        if new.relayd.heartbeat != old.relayd.heartbeat:
            self.hub.set_heartbeat(new.relayd.heartbeat)
        self.hub.max_backlog = new.relayd.sse_buffer
        runtime = ("log_level", "heartbeat", "sse_buffer")
        needs_restart = [f"[relayd] {name}" for name in vars(new.relayd)
                         if name not in runtime and getattr(new.relayd, name) != getattr(old.relayd, name)]
        needs_restart += [f"[{name}]" for name in ("harness", "launchdarkly", "redis")
                          if getattr(new, name) != getattr(old, name)]
        if needs_restart:
            log.warn("SIGHUP: these changes take effect at the next restart: {what}", what=", ".join(needs_restart))
        log.info("SIGHUP: configuration {path} re-read", path=str(self.path))
        self.current = new
        return new
