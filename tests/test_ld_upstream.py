"""The LaunchDarkly upstream stream against the loopback double: data into the store, states in /status.

The HTTP side is real (treq over loopback to tests/doubles/ld_upstream.py); every timer of the stream (backoff,
read timeout, init timeout) and of the store runs on a task.Clock, so schedules are checked exactly and fast.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool

from relayd.config import LaunchDarklyConfig, LaunchDarklyEnvConfig
from relayd.health import HealthAPI
from relayd.launchdarkly.upstream import EnvironmentStream, environment_for, parse_event
from relayd.sseclient import (
    ERROR_RESPONSE,
    INVALID_DATA,
    NETWORK_ERROR,
    SSEEvent,
    StreamError,
)
from relayd.store import INTERRUPTED, OFF, VALID, Change, Item, Store
from tests.conftest import eventually
from tests.doubles.ld_upstream import SDK_KEY, LDUpstreamDouble, make_flag

# ---------------------------------------------------------------------------------------------- pure parsing


def test_parse_put_patch_delete():
    put = SSEEvent("put", json.dumps({"path": "/", "data": {
        "flags": {"f": {"key": "f", "version": 3}, "gone": {"key": "gone", "version": 9, "deleted": True}},
        "segments": {"s": {"key": "s", "version": 2}}}}))
    op, kinds = parse_event(put)
    assert op == "put"
    assert kinds == {"flags": {"f": Item(3, {"key": "f", "version": 3}), "gone": Item(9, None)},
                     "segments": {"s": Item(2, {"key": "s", "version": 2})}}
    # the sdk-test-harness form without "path", and a put missing "segments" (empty, as the Go SDK reads it)
    assert parse_event(SSEEvent("put", '{"data":{"flags":{}}}')) == ("put", {"flags": {}, "segments": {}})
    patch = SSEEvent("patch", '{"path":"/segments/a/b","data":{"key":"a/b","version":7}}')
    assert parse_event(patch) == ("patch", ("segments", "a/b", Item(7, {"key": "a/b", "version": 7})))
    assert parse_event(SSEEvent("delete", '{"path":"/flags/f","version":13}')) == ("delete", ("flags", "f", 13))


def test_parse_ignores_unknown_events_and_paths():
    assert parse_event(SSEEvent("ping", "not json")) is None
    assert parse_event(SSEEvent("patch", '{"path":"/other/x","data":{"version":1}}')) is None
    assert parse_event(SSEEvent("delete", '{"path":"/flags/","version":1}')) is None


@pytest.mark.parametrize("event,data", [
    ("put", '{"path":"/","data":{"flags":'),
    ("put", '[1,2]'),
    ("put", '{"path":"/","data":{"flags":[]}}'),
    ("put", '{"path":"/","data":{"flags":{"f":7}}}'),
    ("patch", '{"path":"/flags/f","data":null}'),
    ("patch", '{"data":{"version":1}}'),
    ("delete", '{"path":"/flags/f"}'),
])
def test_parse_bad_data_is_invalid_data(event: str, data: str):
    with pytest.raises(StreamError) as e:
        parse_event(SSEEvent(event, data))
    assert e.value.kind == INVALID_DATA and e.value.recoverable


def env_config(name: str = "Production", **kw: Any) -> LaunchDarklyEnvConfig:
    kw.setdefault("sdk_key", SDK_KEY)
    return LaunchDarklyEnvConfig(name=name, **kw)


def test_environment_for_ids_meta_and_reuse():
    store = Store(task.Clock())
    env = environment_for(store, env_config(env_id="abc123", mobile_key="mob-1", allowed_origin=("https://x",)))
    assert env.id == "Production" and env.family == "launchdarkly"
    assert env.meta == {"name": "Production", "sdk_key": SDK_KEY, "mobile_key": "mob-1", "env_id": "abc123",
                        "secure_mode": False, "allowed_origin": ("https://x",), "allowed_header": (), "ttl": 0.0,
                        "client_stream": "evaluated"}
    assert environment_for(store, env_config("Production")) is env
    assert environment_for(store, env_config("Other")).id == "Other"
    # an environment of that name created elsewhere (another id) is reused, not duplicated
    store2 = Store(task.Clock())
    existing = store2.add("launchdarkly", "abc123", {"name": "Production"})
    assert environment_for(store2, env_config(env_id="abc123")) is existing
    assert len(store2.environments("launchdarkly")) == 1 and existing.meta["env_id"] == "abc123"


# ---------------------------------------------------------------------------------------------- loopback



@pytest.fixture
def double():
    d = LDUpstreamDouble()
    d.flags = {"f1": make_flag("f1", 1), "f2": make_flag("f2", 1)}
    pytest_twisted.blockon(Deferred.fromCoroutine(d.start(reactor)))
    yield d
    pytest_twisted.blockon(Deferred.fromCoroutine(d.stop()))


class Rig:
    """A stream on a Clock against the double, with the store's change feed recorded."""

    def __init__(self, double: LDUpstreamDouble, **kw: Any) -> None:
        self.double = double
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.store = Store(self.clock)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        http = HTTPClient(Agent(reactor, pool=self.pool))
        config = LaunchDarklyConfig(stream_url=double.url + "/", init_timeout=kw.pop("init_timeout", 10.0))
        kw.setdefault("random", lambda: 0.0)
        self.stream = EnvironmentStream(self.store, env_config(kw.pop("name", "Production"), env_id="env-1",
                                                               **kw.pop("env", {})),
                                        config, clock=self.clock, http=http, **kw)
        self.env = self.stream.env
        self.changes: list[Change] = []
        self.env.subscribe(self.changes.append)
        self.health = HealthAPI(self.store, self.clock)

    def item_changes(self) -> list[tuple[str, str, str, int]]:
        return [(c.op, ic.kind, ic.key, ic.new.version) for c in self.changes for ic in c.items]

    async def status(self) -> dict:
        client = StubTreq(self.health.resource())
        response = await client.get("http://relayd.test/status")
        assert response.code == 200
        body = json.loads(await response.content())
        return body["environments"]["Production"]

    def next_retry_delay(self) -> float:
        """Delay of the pending reconnect (the only timer besides the init timeout and watchdogs)."""
        retry = self.stream.client._retry_call
        assert retry is not None and retry.active()
        return retry.getTime() - self.clock.seconds()

    async def stop(self) -> None:
        await self.stream.stopService()
        await self.pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_put_patch_delete_into_store_with_version_checks(double: LDUpstreamDouble):
    rig = Rig(double)
    ready = rig.stream.ready()
    rig.stream.startService()
    try:
        assert rig.env.meta["init_pending"] is True
        await eventually(lambda: ready.called)
        assert ready.result is True and "init_pending" not in rig.env.meta
        headers = double.stream_requests[0]
        assert headers["authorization"] == SDK_KEY  # raw key, no prefix
        assert headers["user-agent"].startswith("relayd/") and headers["accept"] == "text/event-stream"
        assert rig.env.status.state == VALID and rig.env.initialized
        assert rig.env.get("flags", "f1") == make_flag("f1", 1)

        double.set_flag(make_flag("f1", 2, on=False))
        await eventually(lambda: rig.env.item("flags", "f1").version == 2)
        double.push("patch", {"path": "/flags/f1", "data": make_flag("f1", 1)})  # older: ignored
        double.push("patch", {"path": "/flags/f1", "data": make_flag("f1", 2)})  # same version: ignored
        double.delete_flag("f2", 5)
        double.push("patch", {"path": "/flags/f2", "data": make_flag("f2", 4)})  # must not resurrect it
        double.push("patch", {"path": "/segments/s1", "data": {"key": "s1", "version": 1, "included": ["u"]}})
        await eventually(lambda: rig.env.get("segments", "s1") is not None)
        assert rig.env.get("flags", "f1")["on"] is False
        assert rig.env.item("flags", "f2") == Item(5, None)
        assert rig.item_changes() == [
            ("replace", "flags", "f1", 1), ("replace", "flags", "f2", 1),
            ("upsert", "flags", "f1", 2), ("delete", "flags", "f2", 5), ("upsert", "segments", "s1", 1)]
    finally:
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_dropped_stream_reconnect_loses_nothing_applies_nothing_twice(double: LDUpstreamDouble):
    rig = Rig(double)
    rig.stream.startService()
    try:
        await eventually(lambda: rig.env.initialized)
        double.set_flag(make_flag("f1", 2))
        await eventually(lambda: rig.env.item("flags", "f1").version == 2)
        double.drop_streams(mid_event=True)  # half an event, then the connection is cut
        await eventually(lambda: rig.stream.client.state == "waiting")
        assert rig.env.status.state == INTERRUPTED and rig.env.status.error_kind == NETWORK_ERROR
        assert rig.env.get("flags", "half-sent") is None and rig.env.item("flags", "half-sent") is None
        # while disconnected: f2 changes, f3 appears, f1 is deleted upstream
        double.set_flag(make_flag("f2", 3), push=False)
        double.set_flag(make_flag("f3", 1), push=False)
        double.delete_flag("f1", 3, push=False)
        before = len(rig.changes)
        assert rig.next_retry_delay() == 1.0
        rig.clock.advance(1.0)
        await eventually(lambda: rig.env.item("flags", "f3") is not None)
        replace = rig.changes[before:]
        assert [c.op for c in replace if c.op != "status"] == ["replace"]
        assert sorted(rig.item_changes()[-3:]) == [
            ("replace", "flags", "f1", 3), ("replace", "flags", "f2", 3), ("replace", "flags", "f3", 1)]
        assert rig.env.item("flags", "f1").deleted  # tombstone version 3 from the put
        assert rig.env.status.state == VALID
        # the same put again (another reconnect) changes nothing at all
        n = len(rig.item_changes())
        double.put()
        double.push("patch", {"path": "/flags/f3", "data": make_flag("f3", 1)})  # duplicate: not applied
        double.push("patch", {"path": "/flags/f4", "data": make_flag("f4", 1)})
        await eventually(lambda: rig.env.item("flags", "f4") is not None)
        assert rig.item_changes()[n:] == [("upsert", "flags", "f4", 1)]
        assert len(double.stream_requests) == 2
    finally:
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_401_is_off_in_status_without_retry(double: LDUpstreamDouble):
    rig = Rig(double, env={"sdk_key": "sdk-99999999-2222-4333-8444-555555550000"})
    ready = rig.stream.ready()
    rig.stream.startService()
    try:
        await eventually(lambda: ready.called)
        assert ready.result is False
        assert rig.env.status.state == OFF and rig.env.status.error_kind == ERROR_RESPONSE
        assert rig.env.meta["init_failed"] is True and "init_pending" not in rig.env.meta
        for _ in range(20):  # an hour of clock time: no retries
            rig.clock.advance(180)
            await task.deferLater(reactor, 0.005, lambda: None)
        assert len(double.stream_requests) == 1
        status = await rig.status()
        assert status["status"] == "disconnected"
        assert status["connectionStatus"]["state"] == "OFF"
        assert status["connectionStatus"]["lastError"]["kind"] == "ERROR_RESPONSE"
        assert status["sdkKey"] == "sdk-********-****-****-****-*******50000"
    finally:
        await rig.stop()


@pytest.mark.parametrize("code", [500, 429])
@pytest_twisted.ensureDeferred
async def test_recoverable_status_backs_off_then_interrupted_after_data(double: LDUpstreamDouble, code: int):
    rig = Rig(double)
    double.stream_faults = [code, code, code]
    rig.stream.startService()
    try:
        for n, expected in enumerate([1.0, 2.0, 4.0], start=1):
            await eventually(lambda n=n: len(double.stream_requests) == n and rig.stream.client.state == "waiting")
            assert rig.next_retry_delay() == expected
            # before any data too, a recoverable failure is INTERRUPTED with the error recorded
            assert rig.env.status.state == INTERRUPTED and rig.env.status.error_kind == ERROR_RESPONSE
            assert (await rig.status())["connectionStatus"]["state"] == "INTERRUPTED"
            assert (await rig.status())["status"] == "disconnected"  # never had data
            rig.clock.advance(expected)
        await eventually(lambda: rig.env.initialized)
        assert rig.env.status.state == VALID and (await rig.status())["status"] == "connected"
        # after data an outage is INTERRUPTED; the good connection lasted < 60 s, so the retry count goes on
        double.stream_faults = [code, code, code]
        double.drop_streams()
        await eventually(lambda: rig.stream.client.state == "waiting")
        assert rig.env.status.state == INTERRUPTED and rig.env.status.error_kind == NETWORK_ERROR
        interrupted_at = rig.clock.seconds()
        assert rig.next_retry_delay() == 8.0
        for n, expected in [(5, 16.0), (6, 30.0), (7, 30.0)]:
            rig.clock.advance(rig.next_retry_delay())
            await eventually(lambda n=n: len(double.stream_requests) == n and rig.stream.client.state == "waiting")
            assert rig.next_retry_delay() == expected
        status = await rig.status()
        assert status["connectionStatus"]["state"] == "INTERRUPTED"
        assert status["connectionStatus"]["stateSince"] == int(interrupted_at * 1000)
        assert status["connectionStatus"]["lastError"] == {"kind": "ERROR_RESPONSE",
                                                           "time": int(rig.clock.seconds() * 1000)}
        assert status["status"] == "connected"  # 54 s out of VALID: under disconnected_status_time
        rig.clock.advance(6.0)
        assert (await rig.status())["status"] == "disconnected"
        rig.clock.advance(24.0)
        await eventually(lambda: rig.env.status.state == VALID)
        assert (await rig.status())["status"] == "connected" and len(double.stream_requests) == 8
    finally:
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_malformed_json_reconnects_with_invalid_data(double: LDUpstreamDouble):
    rig = Rig(double)
    double.stream_faults = ["malformed"]
    rig.stream.startService()
    try:
        await eventually(lambda: rig.stream.client.state == "waiting")
        assert rig.env.status.error_kind == INVALID_DATA and not rig.env.initialized
        await eventually(lambda: not double.streams[0].open)  # relayd closed the bad stream
        rig.clock.advance(rig.next_retry_delay())
        await eventually(lambda: rig.env.initialized)
        assert rig.env.status.state == VALID and len(double.stream_requests) == 2
        assert rig.env.status.error_kind == INVALID_DATA  # lastError stays until the next error
    finally:
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_stall_past_read_timeout_reconnects(double: LDUpstreamDouble):
    rig = Rig(double, read_timeout=300.0)
    double.stream_faults = ["stall"]
    rig.stream.startService()
    try:
        await eventually(lambda: len(double.streams) == 1 and rig.stream.client.state == "connected")
        rig.clock.advance(299.0)
        await task.deferLater(reactor, 0.01, lambda: None)
        assert double.streams[0].open
        rig.clock.advance(1.0)
        await eventually(lambda: not double.streams[0].open)
        assert rig.env.status.error_kind == NETWORK_ERROR
        rig.clock.advance(rig.next_retry_delay())
        await eventually(lambda: rig.env.initialized)
    finally:
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_init_timeout_then_data_later(double: LDUpstreamDouble):
    rig = Rig(double, init_timeout=10.0)
    double.stream_faults = ["no-put"]
    ready, first = rig.stream.ready(), rig.stream.first_data()
    rig.stream.startService()
    try:
        await eventually(lambda: len(double.streams) == 1)
        assert rig.env.meta.get("init_pending") is True
        rig.clock.advance(10.0)
        assert ready.called and ready.result is False
        assert "init_pending" not in rig.env.meta and "init_failed" not in rig.env.meta
        assert not first.called and not rig.env.initialized
        double.put()
        await eventually(lambda: first.called)
        assert rig.env.initialized and rig.env.status.state == VALID
        assert rig.stream.ready().result is False  # init is over; the outcome does not change
    finally:
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_stop_closes_stream_and_timers(double: LDUpstreamDouble):
    rig = Rig(double)
    rig.stream.startService()
    await eventually(lambda: rig.env.initialized)
    await rig.stop()
    await eventually(lambda: not double.open_streams())
    assert rig.clock.getDelayedCalls() == []
    rig.clock.advance(100)
    await task.deferLater(reactor, 0.01, lambda: None)
    assert len(double.stream_requests) == 1


@pytest_twisted.ensureDeferred
async def test_double_polling_service(double: LDUpstreamDouble):
    import treq

    ok = await treq.get(double.url + "/sdk/latest-all", headers={"Authorization": SDK_KEY}, persistent=False)
    assert ok.code == 200 and json.loads(await ok.content()) == {"flags": double.flags, "segments": {}}
    bad = await treq.get(double.url + "/sdk/latest-all", headers={"Authorization": "sdk-x"}, persistent=False)
    assert bad.code == 401
    await bad.content()
    assert [p["authorization"] for p in double.polls] == [SDK_KEY, "sdk-x"]


@pytest_twisted.ensureDeferred
async def test_goals_are_proxied_cached_and_served_stale_when_unreachable(double: LDUpstreamDouble):
    from relayd.launchdarkly.upstream import GoalsProxy

    clock = task.Clock()
    pool = HTTPConnectionPool(reactor, persistent=False)
    proxy = GoalsProxy(double.url, clock=clock, http=HTTPClient(Agent(reactor, pool=pool)), ttl=60)
    code, body = await proxy.fetch("env1")
    assert code == 200 and json.loads(body) == double.goals
    await proxy.fetch("env1")
    assert double.goal_requests == 1  # cached
    clock.advance(61)
    await double.stop()  # the vendor is gone: the last answer is still served
    code, body = await proxy.fetch("env1")
    assert code == 200 and json.loads(body) == double.goals
    assert (await proxy.fetch("never-seen"))[0] == 503
    await pool.closeCachedConnections()


class _PendingGoals:
    """An upstream whose answers the test releases by hand."""

    def __init__(self) -> None:
        self.requests: list[Deferred[Any]] = []

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.requests.append(d)
        return d


class _Answer:
    def __init__(self, code: int, body: Deferred[bytes]) -> None:
        self.code = code
        self._body = body

    def content(self) -> Deferred[bytes]:
        return self._body


def test_goals_page_load_herd_makes_one_upstream_request() -> None:
    from relayd.launchdarkly.upstream import GoalsProxy

    http = _PendingGoals()
    proxy = GoalsProxy("http://vendor", clock=task.Clock(), http=http)
    answers = [Deferred.fromCoroutine(proxy.fetch("env1")) for _ in range(50)]
    assert len(http.requests) == 1  # not one vendor request per waiting browser
    assert not any(a.called for a in answers)
    http.requests[0].callback(_Answer(200, Deferred.fromCoroutine(_later(b"[]"))))
    got: list[Any] = []
    for a in answers:
        a.addCallback(got.append)
    assert got == [(200, b"[]")] * 50
    Deferred.fromCoroutine(proxy.fetch("env1")).addCallback(got.append)
    assert len(http.requests) == 1 and got[-1] == (200, b"[]")  # then cached


async def _later(value: Any) -> Any:
    return value


def test_goals_body_that_never_ends_times_out_on_the_clock() -> None:
    from relayd.launchdarkly.upstream import GoalsProxy

    clock = task.Clock()
    http = _PendingGoals()
    proxy = GoalsProxy("http://vendor", clock=clock, http=http, timeout=10)
    answer = Deferred.fromCoroutine(proxy.fetch("env1"))
    http.requests[0].callback(_Answer(200, Deferred()))  # headers, then a stalled body
    clock.advance(10)
    got: list[Any] = []
    answer.addCallback(got.append)
    assert got and got[0][0] == 503
    Deferred.fromCoroutine(proxy.fetch("env1"))
    assert len(http.requests) == 2  # the next request tries again
