"""Shared fixtures: a copy of the embedded sample data, and free loopback ports."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "etc" / "offline"
HARNESS_ENV = "7c2e9a50-4a3b-4d8e-9f61-2b5d8c0e1a77"
HARNESS_KEY = "2f4a6c8e-0b1d-4e3f-8a5c-7e9b1d3f5a70"
LD_ENV_ID = "5f0c0ffee0ddba11c0ffee01"
LD_SDK_KEY = "sdk-00000000-0000-4000-8000-000000000001"
LD_MOBILE_KEY = "mob-00000000-0000-4000-8000-000000000001"


@pytest.fixture
def offline_dir(tmp_path: Path) -> Path:
    """A private copy of etc/offline, safe to edit."""
    target = tmp_path / "offline"
    shutil.copytree(SAMPLE, target)
    return target


async def eventually(predicate: Callable[[], Any], timeout: float = 3.0, step: float = 0.01) -> float:
    """Wait on the real reactor until ``predicate()`` is true; the seconds it took, AssertionError after
    ``timeout``."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(reactor, step, lambda: None)
    return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def abort_connections(site: object) -> None:
    """Drop the server side of connections a client left open (keep-alive pools of the vendors' SDKs).

    Stopping a listening port does not close the connections it accepted; without this they outlive the test.
    """
    from twisted.internet import reactor, tcp

    for selectable in reactor.getReaders() + reactor.getWriters():
        if isinstance(selectable, tcp.Server) and getattr(selectable.protocol, "factory", None) is site:
            selectable.abortConnection()
