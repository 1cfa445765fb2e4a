"""End to end: the real harness-featureflags Python SDK against relayd on loopback, serving the offline folder.

relayd is built by ``make_service`` exactly as twistd builds it; the SDK's blocking calls run in threads while the
reactor serves relayd. The SDK polls at most every 60 s, so a change seen within 2 s can only have come through
``GET /stream``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from relayd.config import Config, RelaydConfig
from relayd.harness.metrics import MetricsBuffer
from relayd.service import make_service

from .conftest import HARNESS_ENV, HARNESS_KEY, free_port, abort_connections

featureflags = pytest.importorskip("featureflags")
from featureflags.client import CfClient
from featureflags.config import (
    with_analytics_enabled,
    with_base_url,
    with_events_url,
    with_pull_interval,
    with_stream_enabled,
)
from featureflags.evaluations.auth_target import Target


def _flags_file(folder: Path) -> Path:
    return folder / "harness" / f"env-{HARNESS_ENV}" / "feature_config.json"


async def _until(check: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """Poll ``check`` in a thread (SDK calls may block) until it returns something truthy, or time out."""
    deadline = time.monotonic() + timeout
    while True:
        value = await deferToThread(check)
        if value or time.monotonic() >= deadline:
            return value
        await deferLater(reactor, step, lambda: None)


@pytest_twisted.ensureDeferred
async def test_python_sdk_end_to_end(offline_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    posted: list[tuple[str, Any]] = []
    real_add = MetricsBuffer.add
    monkeypatch.setattr(MetricsBuffer, "add", lambda self, env_id, payload: (
        real_add(self, env_id, payload), posted.append((env_id, payload)))[0])
    logging.getLogger("featureflags").setLevel(logging.CRITICAL)  # its stream thread logs tracebacks at close
    port = free_port()
    config = Config(relayd=RelaydConfig(listen=(f"tcp:{port}:interface=127.0.0.1",), offline_dir=offline_dir,
                                        offline_poll=0.1, heartbeat=5.0))
    top = make_service(config, reactor)
    top.startService()
    base = f"http://127.0.0.1:{port}"
    client: Any = None
    try:
        def start() -> Any:
            c = CfClient(HARNESS_KEY, with_base_url(base), with_events_url(base), with_stream_enabled(True),
                         with_pull_interval(60), with_analytics_enabled(True))
            c.wait_for_initialization()
            return c

        client = await deferToThread(start)
        assert client.is_initialized()

        alice = Target(identifier="alice", name="Alice", attributes={"email": "alice@example.com"})
        bob = Target(identifier="bob", name="Bob", attributes={"email": "bob@other.org"})
        mallory = Target(identifier="mallory", name="Mallory", attributes={"email": "m@beta.example.com"})
        carol = Target(identifier="carol", name="Carol", attributes={"email": "carol@beta.example.com"})
        dave = Target(identifier="dave", name="Dave", attributes={"email": "dave@nowhere.net"})

        def evaluate_all() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for t in (alice, bob, mallory, carol, dave):
                out[t.identifier] = (
                    client.bool_variation("dark_mode", t, None),
                    client.int_variation("max_items", t, -1),
                    client.number_variation("discount_rate", t, -1.0),
                    client.string_variation("banner_text", t, "default"),
                    client.json_variation("theme_config", t, {}),
                    client.bool_variation("legacy_feature", t, True),
                )
            return out

        got = await deferToThread(evaluate_all)
        light, dark = {"color": "white", "contrast": 1}, {"color": "black", "contrast": 2}
        assert got == {
            # alice: in the dark_mode target map, @example.com rule on max_items, theme rule by identifier
            "alice": (True, 100, 0.0, "Hello from relayd", dark, False),
            # bob: included in beta_testers (dark_mode via segment, discount via segmentMatch)
            "bob": (True, 10, 0.15, "Hello from relayd", dark, False),
            # mallory: excluded from beta_testers although her email matches its rule
            "mallory": (False, 10, 0.0, "Goodbye", light, False),
            # carol: in beta_testers by the segment's email rule (".example.com" is not "@example.com")
            "carol": (True, 10, 0.15, "Hello from relayd", light, False),
            # dave: nothing matches; banner_text's prerequisite dark_mode=true fails -> off variation
            "dave": (False, 10, 0.0, "Goodbye", light, False),
        }

        # The SDK's metrics post (normally every 60 s; sent now) is accepted and aggregated.
        await deferToThread(client._analytics._send_data)
        assert posted and {env_id for env_id, _ in posted} == {HARNESS_ENV}
        counted: dict[str, int] = {}  # the SDK sends one entry per flag and variation
        for _, payload in posted:
            for m in payload.get("metricsData") or ():
                flag = next(a["value"] for a in m["attributes"] if a["key"] == "featureIdentifier")
                counted[flag] = counted.get(flag, 0) + m["count"]
        assert counted["dark_mode"] == 5 and counted["theme_config"] == 5  # five targets evaluated
        assert {"alice", "bob"} <= {t["identifier"] for _, p in posted for t in p.get("targetData") or ()}

        # The SDK's stream is open on relayd before the folder is edited.
        hub = top.hub
        deadline = time.monotonic() + 10
        while hub.count(("harness", HARNESS_ENV)) < 1 and time.monotonic() < deadline:
            await deferLater(reactor, 0.05, lambda: None)
        assert hub.count(("harness", HARNESS_ENV)) >= 1

        path = _flags_file(offline_dir)
        flags = json.loads(path.read_text())
        for f in flags:
            if f["feature"] == "banner_text":
                f["variations"][0]["value"] = "Edited offline"
            if f["feature"] == "legacy_feature":
                f["state"] = "on"
        path.write_text(json.dumps(flags))
        edited = time.monotonic()

        def seen() -> bool:
            return (client.string_variation("banner_text", alice, "default") == "Edited offline"
                    and client.bool_variation("legacy_feature", dave, False) is True)

        assert await _until(seen, timeout=2.0), "the edit did not reach the SDK through /stream within 2 s"
        assert time.monotonic() - edited < 2.0
    finally:
        if client is not None:
            await deferToThread(client.close)
        await top.stopService()
        abort_connections(top.site)
