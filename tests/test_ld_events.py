"""Event forwarding: what SDKs post to relayd reaches the events service batched, with section 4.3's headers.

Posts go over real loopback HTTP to tests/doubles/ld_upstream.py; the flush timer and the retry delay run on a
task.Clock.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import globalLogPublisher

from relayd.config import LaunchDarklyConfig
from relayd.launchdarkly.events import (
    DiscardEvents,
    EventForwarder,
    credential_for,
    is_diagnostic,
)
from relayd.store import Store
from tests.conftest import eventually
from tests.doubles.ld_upstream import MOBILE_KEY, SDK_KEY, LDUpstreamDouble

ENV_ID = "5f0c0ffee0ddba11c0ffee02"


@pytest.fixture
def double():
    d = LDUpstreamDouble()
    pytest_twisted.blockon(Deferred.fromCoroutine(d.start(reactor)))
    yield d
    pytest_twisted.blockon(Deferred.fromCoroutine(d.stop()))


def make_env(store: Store, name: str = "Production", sdk_key: str = SDK_KEY, env_id: str = ENV_ID):
    return store.add("launchdarkly", env_id, {"name": name, "sdk_key": sdk_key, "mobile_key": MOBILE_KEY,
                                              "env_id": env_id})


class Rig:
    def __init__(self, double: LDUpstreamDouble | None, http: Any = None, **config: Any) -> None:
        self.clock = task.Clock()
        self.store = Store(self.clock)
        self.env = make_env(self.store)
        config.setdefault("events_flush", 5.0)
        url = double.url + "/" if double is not None else "http://127.0.0.1:1"
        self.config = LaunchDarklyConfig(events_url=url, **config)
        if http is None:
            # a real persistent pool on the real reactor; only the timers run on the Clock
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool

            self.pool = HTTPConnectionPool(reactor, persistent=True)
            http = HTTPClient(Agent(reactor, pool=self.pool))
        else:
            self.pool = None
        self.forwarder = EventForwarder(self.config, clock=self.clock, http=http)

    async def stop(self) -> None:
        await self.forwarder.stopService()
        if self.pool is not None:
            await self.pool.closeCachedConnections()



def ev(n: int) -> dict:
    return {"kind": "custom", "key": f"e{n}", "creationDate": 1700000000000 + n,
            "context": {"kind": "user", "key": "u"}}


def payload(*events: dict) -> bytes:
    return json.dumps(list(events), indent=1).encode()  # odd spacing: it must still be kept verbatim


def test_paths_and_credentials():
    store = Store(task.Clock())
    env = make_env(store)
    assert [is_diagnostic(p) for p in ("/bulk", "/diagnostic", "/mobile", "/mobile/events/diagnostic",
                                       f"/events/bulk/{ENV_ID}", f"/events/diagnostic/{ENV_ID}")] == [
        False, True, False, True, False, True]
    assert credential_for(env, "/bulk") == SDK_KEY and credential_for(env, "/diagnostic") == SDK_KEY
    assert credential_for(env, "/mobile") == MOBILE_KEY
    assert credential_for(env, "/mobile/events/diagnostic") == MOBILE_KEY
    assert credential_for(env, f"/events/bulk/{ENV_ID}") is None


def test_enabled_follows_send_events_and_discard_stays():
    store = Store(task.Clock())
    env = make_env(store)
    clock = task.Clock()
    assert EventForwarder(LaunchDarklyConfig(send_events=True), clock=clock, http=object()).enabled(env)
    assert not EventForwarder(LaunchDarklyConfig(send_events=False), clock=clock, http=object()).enabled(env)
    assert DiscardEvents().enabled(env) and DiscardEvents().accept(env, "/bulk", b"[]", {}) is None


@pytest_twisted.ensureDeferred
async def test_batched_per_path_schema_and_tags_with_headers(double: LDUpstreamDouble):
    rig = Rig(double)
    fwd = rig.forwarder
    fwd.startService()
    try:
        server = {"X-LaunchDarkly-Event-Schema": "4", "User-Agent": "PythonClient/9.0"}
        fwd.accept(rig.env, "/bulk", payload(ev(1), ev(2)), server)
        fwd.accept(rig.env, "/bulk", payload(ev(3)), {"x-launchdarkly-event-schema": "4",
                                                       "user-agent": "PythonClient/9.0"})
        fwd.accept(rig.env, "/bulk", payload(ev(4)), {**server, "X-LaunchDarkly-Tags": "application-id/app1"})
        fwd.accept(rig.env, "/mobile", payload(ev(5)), {"X-LaunchDarkly-Event-Schema": "4"})
        fwd.accept(rig.env, f"/events/bulk/{ENV_ID}", payload(ev(6)), {"X-LaunchDarkly-Event-Schema": "3"})
        diag = b'{"kind":"diagnostic-init","id":{"diagnosticId":"d1"}}'
        fwd.accept(rig.env, "/diagnostic", diag, server)
        fwd.accept(rig.env, "/diagnostic", diag.replace(b"d1", b"d2"), server)
        assert fwd.queued == 8
        rig.clock.advance(4.9)
        await task.deferLater(reactor, 0.02, lambda: None)
        assert double.events == []  # nothing before the flush interval
        rig.clock.advance(0.1)
        await eventually(lambda: fwd.posted == 6)
        assert fwd.queued == 0 and len(double.events) == 6
        by_key = {(r.path, r.headers.get("x-launchdarkly-tags"), r.body): r for r in double.events}
        posts = {(r.path, r.headers.get("x-launchdarkly-tags")): r for r in double.events
                 if r.path != "/diagnostic"}
        main = posts[("/bulk", None)]
        assert main.json() == [ev(1), ev(2), ev(3)]  # one array per batch, in arrival order
        assert main.headers["authorization"] == SDK_KEY
        assert main.headers["content-type"] == "application/json"
        assert main.headers["x-launchdarkly-event-schema"] == "4"
        assert main.headers["user-agent"].startswith("relayd/")
        assert posts[("/bulk", "application-id/app1")].json() == [ev(4)]
        mobile = posts[("/mobile", None)]
        assert mobile.json() == [ev(5)] and mobile.headers["authorization"] == MOBILE_KEY
        js = posts[(f"/events/bulk/{ENV_ID}", None)]
        assert js.json() == [ev(6)] and "authorization" not in js.headers
        assert js.headers["x-launchdarkly-event-schema"] == "3"
        diagnostics = [r for r in double.events if r.path == "/diagnostic"]
        assert sorted(r.body for r in diagnostics) == sorted([diag, diag.replace(b"d1", b"d2")])  # verbatim
        assert all(r.headers["authorization"] == SDK_KEY and r.headers["user-agent"] == "PythonClient/9.0"
                   for r in diagnostics)
        ids = [r.headers["x-launchdarkly-payload-id"] for r in double.events]
        assert len(set(ids)) == 6 and all(uuid.UUID(i).version == 4 for i in ids)
        assert len(by_key) == 6
        # the next interval has nothing to send
        rig.clock.advance(5.0)
        await task.deferLater(reactor, 0.02, lambda: None)
        assert len(double.events) == 6
    finally:
        await rig.stop()


@pytest.mark.parametrize("first,retried", [(503, True), (500, True), (429, True), (408, True), (400, True),
                                           (401, False), (403, False), (413, False)])
@pytest_twisted.ensureDeferred
async def test_retry_once_after_one_second_on_recoverable_status(double: LDUpstreamDouble, first: int,
                                                                 retried: bool):
    rig = Rig(double)
    double.event_statuses = [first]
    d = rig.forwarder
    d.accept(rig.env, "/bulk", payload(ev(1)), {"X-LaunchDarkly-Event-Schema": "4"})
    done = d.flush()
    await eventually(lambda: len(double.events) == 1)
    await task.deferLater(reactor, 0.02, lambda: None)
    if retried:
        rig.clock.advance(0.99)
        await task.deferLater(reactor, 0.02, lambda: None)
        assert len(double.events) == 1
        rig.clock.advance(0.01)
        await eventually(lambda: len(double.events) == 2)
        a, b = double.events
        assert a.body == b.body and a.headers["x-launchdarkly-payload-id"] == b.headers["x-launchdarkly-payload-id"]
        await done
        assert d.posted == 1 and d.failed == 0
    else:
        await done
        rig.clock.advance(10)
        await task.deferLater(reactor, 0.02, lambda: None)
        assert len(double.events) == 1 and d.failed == 1
    await rig.stop()


@pytest_twisted.ensureDeferred
async def test_second_failure_drops_payload(double: LDUpstreamDouble):
    rig = Rig(double)
    double.event_statuses = [500, 500, 500]
    d = rig.forwarder
    d.accept(rig.env, "/bulk", payload(ev(1)), {})
    done = d.flush()
    await eventually(lambda: len(double.events) == 1)
    await task.deferLater(reactor, 0.02, lambda: None)
    rig.clock.advance(1.0)
    await done
    rig.clock.advance(60)
    await task.deferLater(reactor, 0.02, lambda: None)
    assert len(double.events) == 2 and d.failed == 1 and d.posted == 0
    await rig.stop()


class RefusingHTTP:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def post(self, url: str, **kw: Any) -> Deferred[Any]:
        self.calls.append((url, kw["headers"]))
        return fail(ConnectionRefusedError())


@pytest_twisted.ensureDeferred
async def test_network_error_retried_once_then_dropped():
    http = RefusingHTTP()
    rig = Rig(None, http=http)
    rig.forwarder.accept(rig.env, "/bulk", payload(ev(1)), {})
    done = rig.forwarder.flush()
    assert len(http.calls) == 1 and not done.called  # never blocks: the retry waits on the clock
    rig.clock.advance(1.0)
    assert len(http.calls) == 2 and done.called
    rig.clock.advance(100)
    assert len(http.calls) == 2 and rig.forwarder.failed == 1
    assert http.calls[0][0] == "http://127.0.0.1:1/bulk"


def test_bounded_buffer_counts_drops_and_logs_once_per_interval():
    http = RefusingHTTP()
    rig = Rig(None, http=http, events_capacity=5)
    fwd = rig.forwarder
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        fwd.accept(rig.env, "/bulk", payload(ev(1), ev(2), ev(3)), {})
        fwd.accept(rig.env, "/bulk", payload(ev(4), ev(5), ev(6)), {})  # 2 fit, 1 dropped
        fwd.accept(rig.env, "/diagnostic", b'{"kind":"diagnostic"}', {})  # full: dropped
        fwd.accept(rig.env, "/mobile", payload(ev(7)), {})  # full: dropped
        assert fwd.queued == 5 and fwd.dropped == 3
        warnings = [e for e in logged if "buffer" in str(e.get("log_format", ""))]
        assert len(warnings) == 1
        fwd.flush()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert len(http.calls) == 1
    assert fwd.queued == 0
    fwd.accept(rig.env, "/bulk", payload(ev(8)), {})
    assert fwd.queued == 1 and fwd.dropped == 3  # room again after the flush


def test_truncated_batch_body_is_the_events_that_fit():
    sent: list[bytes] = []

    class OK:
        def post(self, url: str, data: bytes, headers: dict) -> Deferred[Any]:
            sent.append(data)
            return Deferred()  # never answers: fine, we only look at the body

    rig = Rig(None, http=OK(), events_capacity=2)
    rig.forwarder.accept(rig.env, "/bulk", payload(ev(1)), {})
    rig.forwarder.accept(rig.env, "/bulk", payload(ev(2), ev(3)), {})
    rig.forwarder.flush()
    assert [json.loads(b) for b in sent] == [[ev(1), ev(2)]]


def test_bad_payloads_are_dropped_without_raising():
    rig = Rig(None, http=RefusingHTTP())
    fwd = rig.forwarder
    fwd.accept(rig.env, "/bulk", b"{not json", {})
    fwd.accept(rig.env, "/bulk", b'"a string"', {})
    fwd.accept(rig.env, "/bulk", b"[]", {})
    failures: list[dict] = []
    globalLogPublisher.addObserver(failures.append)
    try:
        fwd.accept(rig.env, "/bulk", b"[" * 5000 + b"]" * 5000, {})  # deeper than json can go
    finally:
        globalLogPublisher.removeObserver(failures.append)
    assert not [e for e in failures if e.get("log_failure") is not None]  # a warning, not a traceback
    assert fwd.queued == 0
    fwd.accept(rig.env, "/bulk", b'{"kind":"custom","key":"single"}', {})  # one object: wrapped
    assert fwd.queued == 1


@pytest_twisted.ensureDeferred
async def test_stop_service_flushes_and_stops_timer(double: LDUpstreamDouble):
    rig = Rig(double)
    rig.forwarder.startService()
    rig.forwarder.accept(rig.env, "/bulk", payload(ev(1)), {})
    await rig.forwarder.stopService()
    assert len(double.events) == 1 and double.events[0].json() == [ev(1)]
    assert rig.clock.getDelayedCalls() == []
    if rig.pool is not None:
        await rig.pool.closeCachedConnections()


def test_a_response_body_that_never_ends_does_not_hold_the_post_or_shutdown():
    """The request timeout covers the response body too: an events service (or a proxy) that sends headers and
    then stalls must not keep the payload in flight forever, nor hang stopService."""
    aborted: list[bool] = []

    class StalledTransport:
        def stopProducing(self) -> None:
            aborted.append(True)

    class StalledResponse:
        code = 202
        length = 10

        def deliverBody(self, protocol: Any) -> None:
            protocol.makeConnection(StalledTransport())  # headers came; the body never does

    class Stalling:
        def __init__(self) -> None:
            self.calls = 0

        def post(self, url: str, data: bytes, headers: dict) -> Deferred[Any]:
            self.calls += 1
            return succeed(StalledResponse())

    http = Stalling()
    rig = Rig(None, http=http)
    rig.forwarder.startService()
    rig.forwarder.accept(rig.env, "/bulk", payload(ev(1)), {})
    stopped = rig.forwarder.stopService()
    assert not stopped.called
    rig.clock.advance(30.0)  # request_timeout
    assert stopped.called and aborted == [True]
    assert http.calls == 1 and rig.forwarder.failed == 1
