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
    optParameters = [["config", "c", "etc/relayd.ini", "Path to the INI configuration file."]]
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
        if "error" in self:
            raise usage.UsageError(f"configuration error: {self['error']}")


def makeService(options: Any) -> IService:
    from twisted.internet import reactor

    from relayd.service import make_service

    return make_service(options["parsed"], reactor)
