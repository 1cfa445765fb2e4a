"""End to end: the real launchdarkly-server-sdk against relayd on loopback, serving a copy of etc/offline.

The SDK's calls block, so they run in a thread (deferToThread) while the reactor serves relayd.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from relayd.launchdarkly import offline as ld_offline
from relayd.launchdarkly.api import LaunchDarklyAPI
from relayd.offline import OfflineSource
from relayd.sse import SSEHub
from relayd.store import Environment, Store
from relayd.web import RelaydSite, build_router

from .conftest import LD_ENV_ID, LD_SDK_KEY, abort_connections

ldclient = pytest.importorskip("ldclient")
from ldclient import Context
from ldclient.client import LDClient
from ldclient.config import Config

CONTEXTS = [
    {"kind": "user", "key": "alice"},
    {"kind": "user", "key": "bob"},
    {"kind": "user", "key": "mallory", "email": "m@beta.example.com"},
    {"kind": "user", "key": "carol", "email": "carol@example.com"},
    {"kind": "user", "key": "dave", "email": "dave@beta.example.com"},
    {"kind": "multi", "user": {"key": "erin"}, "org": {"key": "acme"}},
    {"kind": "org", "key": "globex"},
]


class Sink:
    def __init__(self) -> None:
        self.paths: list[str] = []

    def enabled(self, env: Environment) -> bool:
        return True

    def accept(self, env: Environment, path: str, body: bytes, headers: Any) -> None:
        self.paths.append(path)


@pytest.fixture
def relayd(offline_dir: Path) -> Generator[tuple[str, Path, Sink], None, None]:
    store = Store(reactor)
    hub = SSEHub(reactor, heartbeat=5)
    sink = Sink()
    api = LaunchDarklyAPI(store, hub, reactor, sink)
    source = OfflineSource(store, offline_dir, {"launchdarkly": ld_offline.read}, reactor, interval=0.2)
    site = RelaydSite(build_router([(api.segments, api.resource())]), clock=reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    hub.startService()
    source.startService()
    # the folder is read in a thread: an SDK that asked before it was loaded would get 401 and give up
    pytest_twisted.blockon(Deferred.fromCoroutine(_until_loaded(store)))
    yield f"http://127.0.0.1:{port.getHost().port}", offline_dir, sink
    source.stopService()
    pytest_twisted.blockon(hub.stopService())
    pytest_twisted.blockon(port.stopListening())
    abort_connections(site)
    api.streams.stop()


async def _until_loaded(store: Store) -> None:
    for _ in range(200):
        env = store.environment("launchdarkly", LD_ENV_ID)
        if env is not None and env.initialized:
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("the offline folder was not loaded")


def evalx(base: str, ctx: dict) -> dict:
    b64 = base64.urlsafe_b64encode(json.dumps(ctx).encode()).decode().rstrip("=")
    req = urllib.request.Request(f"{base}/sdk/evalx/contexts/{b64}?withReasons=true",
                                 headers={"Authorization": LD_SDK_KEY})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def assert_same_evaluations(client: LDClient, base: str) -> None:
    for ctx in CONTEXTS:
        ours = evalx(base, ctx)
        state = client.all_flags_state(Context.from_dict(ctx), with_reasons=True)
        assert state.valid
        theirs = state.to_json_dict()
        meta = theirs["$flagsState"]
        assert len(ours) == 7 and set(ours) == {k for k in theirs if not k.startswith("$")}, ctx
        for key, entry in ours.items():
            assert theirs[key] == entry["value"], (ctx, key)
            assert meta[key].get("variation") == entry["variation"], (ctx, key)
            assert meta[key]["reason"] == entry["reason"], (ctx, key)
            assert meta[key]["version"] == entry["version"], (ctx, key)


def config(base: str, **kw: Any) -> Config:
    return Config(LD_SDK_KEY, base_uri=base, stream_uri=base, events_uri=base, diagnostic_opt_out=True,
                  initial_reconnect_delay=0.1, **kw)


def wait_for(check: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s")


def edit_flag(folder: Path, key: str, **changes: Any) -> None:
    path = folder / "launchdarkly" / f"{LD_ENV_ID}-data.json"
    data = json.loads(path.read_text())
    data["flags"][key].update(changes)
    data["flags"][key]["version"] += 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


@pytest_twisted.inlineCallbacks
def test_streaming_sdk_initializes_evaluates_and_follows_edits(relayd: tuple[str, Path, Sink]
                                                                ) -> Generator[Deferred[Any], Any, None]:
    base, folder, sink = relayd

    def scenario() -> float:
        client = LDClient(config(base), start_wait=5)
        try:
            assert client.is_initialized()
            assert_same_evaluations(client, base)
            bob = Context.from_dict({"kind": "user", "key": "bob"})
            assert client.variation("dark-mode", bob, None) is False
            edit_flag(folder, "dark-mode", fallthrough={"variation": 0})
            took = wait_for(lambda: client.variation("dark-mode", bob, None) is True, 2.0)
            assert_same_evaluations(client, base)
            client.flush()
            wait_for(lambda: "/bulk" in sink.paths, 3.0)
            return took
        finally:
            client.close()

    took = yield deferToThread(scenario)
    assert took < 2.0


@pytest_twisted.inlineCallbacks
def test_polling_sdk_initializes_from_latest_all(relayd: tuple[str, Path, Sink]
                                                  ) -> Generator[Deferred[Any], Any, None]:
    base, _, _ = relayd

    def scenario() -> None:
        client = LDClient(config(base, stream=False, send_events=False), start_wait=5)
        try:
            assert client.is_initialized()
            assert_same_evaluations(client, base)
        finally:
            client.close()

    yield deferToThread(scenario)
