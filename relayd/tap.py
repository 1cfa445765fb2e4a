"""twistd entry point: ``twistd -n relayd --config FILE [--check]``."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from relayd import config as configmod


class Options(usage.Options):
    synopsis = "[--config FILE] [--check]"
    longdesc = ("Relay Harness Feature Flags and LaunchDarkly SDK traffic, from the vendors or from an offline "
                "data folder. See README.rst for the configuration file.")
    optParameters = [["config", "c", "etc/relayd.ini", "Path to the INI configuration file."],
                     ["export", None, None, "Fetch the Harness data of the [harness] section from the SaaS, write "
                      "it as an offline folder (DIR/harness/env-<uuid>/) and exit (0 ok, 1 with the error)."]]
    optFlags = [["check", None, "Validate the configuration, print the result and exit (0 ok, 1 error)."]]

    def postOptions(self) -> None:
        try:
            self["parsed"] = configmod.load(self["config"])
        except configmod.ConfigError as e:
            self["error"] = e
        if self["check"]:
            # Exit here, before twistd writes a pidfile or starts logging: --check only validates.
            if "error" in self:
                print(f"relayd: configuration error: {self['error']}", file=sys.stderr)
                sys.exit(1)
            print(f"relayd: {self['config']}: configuration OK")
            sys.exit(0)
        if self["export"]:
            run_export(self)
        if "error" in self:
            raise usage.UsageError(f"configuration error: {self['error']}")


def run_export(options: Options) -> None:
    """``--export DIR``: runs before twistd daemonizes or logs; always exits."""
    if "error" in options:
        print(f"relayd: configuration error: {options['error']}", file=sys.stderr)
        sys.exit(1)
    harness = options["parsed"].harness
    if harness is None:
        print(f"relayd: {options['config']}: --export needs a [harness] section", file=sys.stderr)
        sys.exit(1)
    from pathlib import Path

    from twisted.internet import defer, task

    from relayd.harness.upstream import export

    async def main(reactor: Any) -> None:
        try:
            folder = await export(harness, Path(options["export"]), reactor)
        except Exception as e:  # one line, whatever went wrong (network, SaaS answer, disk)
            print(f"relayd: export failed: {getattr(e, 'message', None) or f'{type(e).__name__}: {e}'}",
                  file=sys.stderr)
            raise SystemExit(1) from None
        print(f"relayd: exported Harness data to {folder}")

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def makeService(options: Any) -> IService:
    from twisted.internet import reactor

    from relayd.service import make_service

    return make_service(options["parsed"], reactor)
