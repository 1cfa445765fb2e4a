"""End to end: real launchdarkly-server-sdk -> relayd (make_service, online config) -> the LaunchDarkly double.

relayd's stream_url and events_url point at tests/doubles/ld_upstream.py; the SDK points at relayd. Blocking SDK
calls run in deferToThread while the reactor serves relayd and the double.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from relayd.config import loads
from relayd.service import make_service
from tests.conftest import eventually, free_port
from tests.doubles.ld_upstream import SDK_KEY, LDUpstreamDouble, make_flag

ldclient = pytest.importorskip("ldclient")
from ldclient import Context
from ldclient.client import LDClient
from ldclient.config import Config

ALICE = Context.from_dict({"kind": "user", "key": "alice"})


def wait_for(check: Callable[[], bool], timeout: float) -> float:
    """Blocking (runs in a thread): seconds until ``check()`` held."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"not within {timeout}s")



@pytest_twisted.ensureDeferred
async def test_real_sdk_through_relayd_to_the_double(tmp_path: Path) -> None:
    double = LDUpstreamDouble()
    double.flags = {"f1": make_flag("f1", 1), "f2": make_flag("f2", 1, value_on="a", value_off="b")}
    await double.start(reactor)
    port = free_port()
    config = loads(f"""
[relayd]
listen = tcp:{port}:interface=127.0.0.1
[launchdarkly]
stream_url = {double.url}
events_url = {double.url}
events_flush = 200ms
[launchdarkly "Production"]
sdk_key = {SDK_KEY}
env_id = 5f0c0ffee0ddba11c0ffee09
""", base=tmp_path)
    service = make_service(config, reactor)
    service.startService()
    base = f"http://127.0.0.1:{port}"
    client: LDClient | None = None
    try:
        await eventually(lambda: service.store.environment("launchdarkly", "Production").initialized, timeout=5.0)
        env = service.store.environment("launchdarkly", "Production")
        assert double.stream_requests[0]["authorization"] == SDK_KEY

        sdk_config = Config(SDK_KEY, base_uri=base, stream_uri=base, events_uri=base, diagnostic_opt_out=False,
                            initial_reconnect_delay=0.1, flush_interval=0.2)
        client = await deferToThread(LDClient, sdk_config, 5)
        assert client.is_initialized()
        assert await deferToThread(client.variation, "f1", ALICE, None) is True

        # a flag changed in the double reaches the SDK within 2 s
        double.set_flag(make_flag("f1", 2, on=False))
        took = await deferToThread(wait_for, lambda: client.variation("f1", ALICE, None) is False, 2.0)
        assert took < 2.0

        # the upstream stream drops mid-event; meanwhile f2 changes and f1 is deleted; relayd reconnects with
        # a new put: the SDK ends up with exactly the new data, nothing lost, nothing applied twice
        changes: list[Any] = []
        env.subscribe(lambda c: changes.extend((c.op, i.key, i.new.version) for i in c.items))
        double.drop_streams(mid_event=True)
        double.set_flag(make_flag("f2", 2, on=False, value_on="a", value_off="b"), push=False)
        double.delete_flag("f1", 3, push=False)
        await deferToThread(wait_for, lambda: client.variation("f2", ALICE, None) == "b", 3.0)
        assert await deferToThread(client.variation, "f1", ALICE, "default") == "default"
        assert sorted(changes) == [("replace", "f1", 3), ("replace", "f2", 2)]
        assert len(double.stream_requests) == 2
        assert env.get("flags", "half-sent") is None

        # events the SDK posts to relayd reach the double, batched, with the section 4.3 headers
        await deferToThread(client.variation, "f2", ALICE, None)
        client.track("checkout", ALICE, metric_value=3.5)
        await deferToThread(client.flush)
        def custom_arrived() -> bool:
            return any(e.get("kind") == "custom" for r in double.events if r.path == "/bulk" for e in r.json())

        await eventually(lambda: custom_arrived() and any(r.path == "/diagnostic" for r in double.events), timeout=5.0)
        bulk = [r for r in double.events if r.path == "/bulk"]
        events = [e for r in bulk for e in r.json()]
        kinds = {e["kind"] for e in events}
        assert {"custom", "summary"} <= kinds
        custom = next(e for e in events if e["kind"] == "custom")
        assert custom["key"] == "checkout" and custom["metricValue"] == 3.5
        for r in bulk:
            assert r.headers["authorization"] == SDK_KEY
            assert r.headers["x-launchdarkly-event-schema"] == "4"
            assert r.headers["content-type"] == "application/json"
            assert r.headers["user-agent"].startswith("relayd/")
            assert r.headers["x-launchdarkly-payload-id"]
        diagnostic = next(r for r in double.events if r.path == "/diagnostic")
        assert diagnostic.json()["kind"] == "diagnostic-init"
        assert diagnostic.headers["authorization"] == SDK_KEY
    finally:
        if client is not None:
            await deferToThread(client.close)
        await service.stopService()
        await double.stop()
