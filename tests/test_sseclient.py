"""Tests for relayd.sseclient: parser, backoff policy, the client state machine on a task.Clock
with a fake treq, and the real thing against a loopback twisted.web server."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import error as ierror
from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from relayd.sseclient import (
    ERROR_RESPONSE,
    INVALID_DATA,
    NETWORK_ERROR,
    EventParser,
    SSEClient,
    SSEEvent,
    StreamError,
    backoff_delay,
    default_recoverable,
)

# ------------------------------------------------------------------------------------------
# Parser


def feed_all(chunks: list[bytes], parser: EventParser | None = None) -> list[SSEEvent]:
    parser = parser or EventParser()
    out: list[SSEEvent] = []
    for c in chunks:
        out.extend(parser.feed(c))
    return out


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def test_parser_basic_event_types_and_default():
    events = feed_all([b"event: put\ndata: {\"a\":1}\n\ndata: plain\n\n"])
    assert events == [SSEEvent("put", '{"a":1}', None), SSEEvent("message", "plain", None)]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_parser_line_endings(eol: bytes):
    stream = eol.join([b"event: patch", b"data: one", b"data: two", b"", b"data: x", b"", b""])
    assert feed_all([stream]) == [SSEEvent("patch", "one\ntwo"), SSEEvent("message", "x")]
    assert feed_all(bytewise(stream)) == [SSEEvent("patch", "one\ntwo"), SSEEvent("message", "x")]


def test_parser_cr_at_chunk_end_then_lf_is_one_line_end():
    # "data: a\r" | "\n\r\n": if the \r\n pair were seen as two line ends the event would be
    # dispatched early and the next \r\n would dispatch nothing; both forms must give one event
    # with exactly the data "a" and no spurious extra blank-line dispatch of "b".
    p = EventParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"\ndata: b\r") == []
    assert p.feed(b"\n\r") == [SSEEvent("message", "a\nb")]
    assert p.feed(b"\n") == []  # the \n after a chunk-final \r is not another blank line
    assert p.feed(b"data: c\n\n") == [SSEEvent("message", "c")]


def test_parser_lone_cr_then_other_char_in_next_chunk():
    p = EventParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"\r") == [SSEEvent("message", "a")]


def test_parser_comments_and_unknown_fields_ignored():
    events = feed_all([b":\n\n: heartbeat\nfoo: bar\ndata: x\n:mid\n\n"])
    assert events == [SSEEvent("message", "x")]


def test_parser_field_parsing_rules():
    # one leading space stripped only; no colon -> whole line is the name with empty value
    events = feed_all([b"data:  two spaces\ndata\ndata:no-space\n\n"])
    assert events == [SSEEvent("message", " two spaces\n\nno-space")]
    # data with empty value still dispatches an (empty) event; a block with no data does not
    assert feed_all([b"data:\n\n", b"event: x\n\n"]) == [SSEEvent("message", "")]


def test_parser_event_type_resets_after_dispatch():
    events = feed_all([b"event: a\ndata: 1\n\ndata: 2\n\n"])
    assert [e.event for e in events] == ["a", "message"]


def test_parser_ids_persist_reset_and_nul_ignored():
    p = EventParser()
    events = p.feed(b"id: 1\ndata: a\n\ndata: b\n\nid: x\0y\ndata: c\n\nid\ndata: d\n\n")
    assert [e.id for e in events] == ["1", "1", "1", None]
    assert p.last_event_id == ""
    # an id in a block without data updates the last id but dispatches nothing
    assert p.feed(b"id: 9\n\n") == []
    assert p.last_event_id == "9"


def test_parser_retry_field():
    p = EventParser()
    p.feed(b"retry: 2500\n\n")
    assert p.retry == 2500 and p.pop_retry() == 2500 and p.pop_retry() is None
    p.feed(b"retry: 12a\nretry: -5\nretry:\n\n")
    assert p.retry == 2500 and p.pop_retry() is None


def test_parser_bom_at_start_only_even_split():
    bom = "\ufeff".encode()
    assert feed_all([bom[:1], bom[1:] + b"data: a\n\n"]) == [SSEEvent("message", "a")]
    # a BOM later in the stream is not stripped: the line's field name is then unknown
    assert feed_all([b"data: a\n\n" + bom + b"data: b\n\n"]) == [SSEEvent("message", "a")]


def test_parser_utf8_split_across_chunks_and_invalid_bytes():
    raw = "event: put\ndata: {\"name\": \"Grüße 👋\"}\n\n".encode()
    assert feed_all(bytewise(raw)) == [SSEEvent("put", '{"name": "Grüße 👋"}')]
    assert feed_all([b"data: \xff\n\n"]) == [SSEEvent("message", "\ufffd")]


def test_parser_incomplete_event_not_dispatched_and_large_line():
    p = EventParser()
    assert p.feed(b"id: 1\ndata: done\n\nid: 2\ndata: parti") == [SSEEvent("message", "done", "1")]
    assert p.last_event_id == "1"  # the unfinished block's id is not committed
    big = b"x" * 200_000
    chunks = [b"data: "] + [big[i : i + 1000] for i in range(0, len(big), 1000)] + [b"\n\n"]
    assert feed_all(chunks) == [SSEEvent("message", big.decode())]


def test_parser_chunking_invariance():
    stream = (
        "\ufeffretry: 100\r\nid: a1\r\nevent: put\r\ndata: {\"é\": 1}\r\ndata: more\r\n\r\n"
        ": hb\n\nevent: delete\rdata: z\r\rdata: tail\n\n"
    ).encode()
    whole = feed_all([stream])
    assert whole == [
        SSEEvent("put", '{"é": 1}\nmore', "a1"),
        SSEEvent("delete", "z", "a1"),
        SSEEvent("message", "tail", "a1"),
    ]
    assert feed_all(bytewise(stream)) == whole
    for size in (2, 3, 5, 7):
        assert feed_all([stream[i : i + size] for i in range(0, len(stream), size)]) == whole


# ------------------------------------------------------------------------------------------
# Policy


def test_default_recoverable():
    for code in (400, 408, 429, 500, 502, 503, 504, 599, 204, 301):
        assert default_recoverable(code), code
    for code in (401, 403, 404, 405, 410, 413, 499):
        assert not default_recoverable(code), code


def test_backoff_delay_schedule_and_jitter():
    assert [backoff_delay(1.0, n, 30.0, 0.0) for n in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff_delay(1.0, 2, 30.0, 0.5) == 3.0  # 4 s minus 25 %
    assert backoff_delay(1.0, 10, 30.0, 0.5) == 22.5
    assert 15.0 < backoff_delay(1.0, 5, 30.0, 0.999999) < 15.001
    assert backoff_delay(1.0, 5000, 30.0, 0.0) == 30.0  # no overflow
    assert backoff_delay(0.25, 2, 30.0, 0.0) == 1.0


# ------------------------------------------------------------------------------------------
# Client state machine on a Clock with a fake treq


class FakeBodyTransport:
    def __init__(self, proto: Any) -> None:
        self.proto = proto
        self.stopped = False

    def stopProducing(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.proto.connectionLost(Failure(ResponseFailed([Failure(ierror.ConnectionAborted())])))

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class FakeResponse:
    def __init__(self, code: int = 200, content_type: bytes | None = b"text/event-stream") -> None:
        self.code = code
        self.headers = Headers({b"content-type": [content_type]} if content_type else {})
        self.proto: Any = None
        self.transport: FakeBodyTransport | None = None

    def deliverBody(self, proto: Any) -> None:
        self.proto = proto
        self.transport = FakeBodyTransport(proto)
        proto.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def end(self, reason: Exception | None = None) -> None:
        self.transport.stopped = True
        self.proto.connectionLost(Failure(reason or ResponseDone()))


class Call:
    def __init__(self, url: str, headers: dict[str, str], when: float) -> None:
        self.url, self.headers, self.when = url, headers, when
        self.cancelled = False
        self.d: Deferred[Any] = Deferred(lambda d: setattr(self, "cancelled", True))

    def respond(self, code: int = 200, content_type: bytes | None = b"text/event-stream") -> FakeResponse:
        r = FakeResponse(code, content_type)
        self.d.callback(r)
        return r

    def refuse(self) -> None:
        self.d.errback(ierror.ConnectionRefusedError())


class FakeHTTP:
    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.calls: list[Call] = []

    def get(self, url: str, **kw: Any) -> Deferred[Any]:
        assert kw.get("unbuffered") is True
        c = Call(url, dict(kw["headers"]), self.clock.seconds())
        self.calls.append(c)
        return c.d


class Harness:
    def __init__(self, rand: float = 0.0, **kw: Any) -> None:
        self.clock = task.Clock()
        self.http = FakeHTTP(self.clock)
        self.events: list[SSEEvent] = []
        self.errors: list[StreamError] = []
        self.connects = 0
        kw.setdefault("on_event", self.events.append)
        self.client = SSEClient(
            kw.pop("url", "https://upstream.test/stream?cluster=1"),
            headers=kw.pop("headers", {"API-Key": "k"}),
            on_connect=self._connected,
            on_error=self.errors.append,
            clock=self.clock,
            http=self.http,
            random=lambda: rand,
            **kw,
        )

    def _connected(self) -> None:
        self.connects += 1

    @property
    def last(self) -> Call:
        return self.http.calls[-1]


def test_client_request_headers_and_callables():
    tokens = iter(["t1", "t2"])
    h = Harness(url=lambda: "https://u.test/all", headers=lambda: {"Authorization": next(tokens)})
    h.client.startService()
    assert h.last.url == "https://u.test/all"
    assert h.last.headers == {
        "Accept": "text/event-stream",
        "Cache-Control": "no-cache",
        "Authorization": "t1",
    }
    r = h.last.respond()
    assert h.connects == 1 and h.client.state == "connected"
    r.send(b"id: 41\ndata: a\n\n")
    r.end()
    h.clock.advance(1.0)
    assert h.last.headers["Authorization"] == "t2"  # evaluated per connect
    assert h.last.headers["Last-Event-ID"] == "41"


def test_backoff_schedule_on_repeated_connect_failures():
    h = Harness(rand=0.0)
    h.client.startService()
    for _ in range(8):
        h.last.refuse()
        h.clock.advance(h.clock.getDelayedCalls()[0].getTime() - h.clock.seconds())
    times = [c.when for c in h.http.calls]
    assert [b - a for a, b in itertools.pairwise(times)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert all(e.kind == NETWORK_ERROR and e.recoverable for e in h.errors)
    assert len(h.errors) == 8


def test_backoff_jitter_subtracts():
    h = Harness(rand=0.5)
    h.client.startService()
    for _ in range(3):
        h.last.refuse()
        (call,) = h.clock.getDelayedCalls()
        h.clock.advance(call.getTime() - h.clock.seconds())
    times = [c.when for c in h.http.calls]
    assert [b - a for a, b in itertools.pairwise(times)] == [0.75, 1.5, 3.0]


@pytest.mark.parametrize("good_for,expected", [(59.0, 8.0), (60.0, 1.0)])
def test_retry_count_resets_after_good_connection(good_for: float, expected: float):
    h = Harness(rand=0.0)
    h.client.startService()
    for delay in (1, 2, 4):
        h.last.refuse()
        h.clock.advance(delay)
    assert h.client.retry_count == 3
    r = h.last.respond()
    h.clock.advance(good_for)
    r.send(b":\n")  # keep the read watchdog happy regardless of read_timeout
    r.end()
    (call,) = h.clock.getDelayedCalls()
    assert call.getTime() - h.clock.seconds() == expected


def test_next_delay_is_pure():
    h = Harness(rand=0.0)
    assert h.client.next_delay() == 1.0 and h.client.next_delay() == 1.0
    assert h.client.retry_count == 0


def test_retry_field_sets_new_base_delay():
    h = Harness(rand=0.0)
    h.client.startService()
    h.last.refuse()
    h.clock.advance(1)
    h.last.refuse()
    h.clock.advance(2)
    r = h.last.respond()
    r.send(b"retry: 5000\n\n")
    r.end()
    (call,) = h.clock.getDelayedCalls()
    assert call.getTime() - h.clock.seconds() == 5.0
    h.clock.advance(5)
    h.last.refuse()
    (call,) = h.clock.getDelayedCalls()
    assert call.getTime() - h.clock.seconds() == 10.0


def test_retry_zero_cannot_make_a_tight_reconnect_loop():
    h = Harness(rand=0.0)
    h.client.startService()
    r = h.last.respond()
    r.send(b"retry: 0\n\n")
    r.end()
    (call,) = h.clock.getDelayedCalls()
    assert call.getTime() - h.clock.seconds() == pytest.approx(0.1)


def test_unrecoverable_status_stops_until_restart():
    h = Harness()
    h.client.startService()
    r = h.last.respond(401, b"application/json")
    assert r.proto is not None and r.transport is not None  # body is being drained
    (err,) = h.errors
    assert (err.kind, err.status, err.recoverable) == (ERROR_RESPONSE, 401, False)
    assert h.client.state == "failed"
    h.clock.advance(3600)
    assert len(h.http.calls) == 1 and h.client.state == "failed"
    h.client.restart()
    assert len(h.http.calls) == 2 and h.client.state == "connecting"


@pytest.mark.parametrize("code", [400, 408, 429, 500, 503])
def test_recoverable_status_retries(code: int):
    h = Harness()
    h.client.startService()
    h.last.respond(code, b"text/plain")
    assert h.errors[0].status == code and h.errors[0].recoverable
    h.clock.advance(1.0)
    assert len(h.http.calls) == 2


def test_custom_is_recoverable():
    h = Harness(is_recoverable=lambda code: code != 503)
    h.client.startService()
    h.last.respond(503)
    assert not h.errors[0].recoverable
    h.clock.advance(100)
    assert len(h.http.calls) == 1


def test_wrong_content_type_is_a_recoverable_error():
    h = Harness()
    h.client.startService()
    h.last.respond(200, b"application/json")
    assert h.connects == 0
    assert h.errors[0].kind == ERROR_RESPONSE and h.errors[0].recoverable
    h.clock.advance(1.0)
    assert len(h.http.calls) == 2


def test_header_wait_times_out():
    h = Harness(read_timeout=10.0)
    h.client.startService()
    h.clock.advance(9.9)
    assert not h.last.cancelled and h.errors == []
    h.clock.advance(0.1)
    assert h.last.cancelled
    assert h.errors[0].kind == NETWORK_ERROR and "no response" in h.errors[0].message
    h.clock.advance(1.0)
    assert len(h.http.calls) == 2


def test_read_timeout_counts_heartbeats_as_activity():
    h = Harness(read_timeout=5.0)
    h.client.startService()
    r = h.last.respond()
    for _ in range(10):
        h.clock.advance(4.0)
        r.send(b":\n")  # comment heartbeat only
    assert h.errors == [] and not r.transport.stopped
    h.clock.advance(4.999)
    assert not r.transport.stopped
    h.clock.advance(0.001)
    assert r.transport.stopped
    assert h.errors[0].kind == NETWORK_ERROR and "no data" in h.errors[0].message
    h.clock.advance(1.0)
    assert len(h.http.calls) == 2


def test_invalid_data_from_on_event_reconnects_with_backoff():
    h = Harness()
    seen: list[SSEEvent] = []

    def on_event(ev: SSEEvent) -> None:
        if ev.data == "bad":
            raise StreamError(INVALID_DATA, "bad json")
        seen.append(ev)

    h = Harness(on_event=on_event)
    h.client.startService()
    r = h.last.respond()
    r.send(b"id: 1\ndata: ok\n\nid: 2\ndata: bad\n\nid: 3\ndata: after\n\n")
    assert [e.id for e in seen] == ["1"]  # nothing after the bad event is delivered
    assert r.transport.stopped
    (err,) = h.errors
    assert err.kind == INVALID_DATA and err.recoverable
    assert len(h.http.calls) == 1
    h.clock.advance(1.0)
    assert h.last.headers["Last-Event-ID"] == "1"  # the bad event will be sent again


def test_other_on_event_exceptions_are_logged_and_stream_continues():
    h = Harness()
    seen: list[str] = []

    def on_event(ev: SSEEvent) -> None:
        if ev.data == "boom":
            raise ValueError("boom")
        seen.append(ev.data)

    h = Harness(on_event=on_event)
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        h.client.startService()
        r = h.last.respond()
        r.send(b"data: a\n\ndata: boom\n\ndata: b\n\n")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert seen == ["a", "b"] and h.errors == [] and not r.transport.stopped
    assert any(e.get("log_failure") and e["log_failure"].check(ValueError) for e in logged)


def test_restart_from_on_event_drops_rest_of_chunk_and_reconnects_now():
    holder: list[SSEClient] = []
    seen: list[str] = []

    def on_event(ev: SSEEvent) -> None:
        seen.append(ev.data)
        if ev.data == "restart":
            holder[0].restart()

    h = Harness(on_event=on_event)
    holder.append(h.client)
    h.client.startService()
    r = h.last.respond()
    r.send(b"data: restart\n\ndata: never\n\n")
    assert seen == ["restart"] and r.transport.stopped
    assert len(h.http.calls) == 2 and h.errors == []  # at once, no error report
    r2 = h.last.respond()
    r2.send(b"data: fresh\n\n")
    assert seen == ["restart", "fresh"]


def test_restart_while_waiting_connects_now():
    h = Harness()
    h.client.startService()
    h.last.refuse()
    assert h.client.state == "waiting"
    h.client.restart()
    assert len(h.http.calls) == 2 and h.clock.getDelayedCalls()  # only the header watchdog
    h.last.refuse()
    h.clock.advance(1.0)
    assert len(h.http.calls) == 2  # the old retry timer was cancelled; this one is 2 s
    h.clock.advance(1.0)
    assert len(h.http.calls) == 3


def test_stop_service_aborts_and_cancels_timers():
    h = Harness()
    h.client.startService()
    r = h.last.respond()
    r.send(b"data: a\n\n")
    d = h.client.stopService()
    assert r.transport.stopped
    assert d.called
    assert h.clock.getDelayedCalls() == []
    assert h.errors == [] and h.client.state == "stopped"
    h.clock.advance(1000)
    assert len(h.http.calls) == 1


def test_stop_service_cancels_pending_request_and_retry():
    h = Harness()
    h.client.startService()
    d = h.client.stopService()
    assert h.last.cancelled and d.called and h.errors == []
    assert h.clock.getDelayedCalls() == []
    h2 = Harness()
    h2.client.startService()
    h2.last.refuse()
    h2.client.stopService()
    assert h2.clock.getDelayedCalls() == []
    h2.client.restart()  # no-op while stopped
    assert len(h2.http.calls) == 1


def test_stop_from_on_error_is_respected():
    holder: list[SSEClient] = []
    h = Harness()
    h.client._on_error = lambda e: holder[0].stopService()
    holder.append(h.client)
    h.client.startService()
    h.last.refuse()
    assert h.clock.getDelayedCalls() == []


def test_secrets_never_logged():
    h = Harness(
        url="https://user:pw@upstream.test/stream?apiKey=SECRET-Q",
        headers={"Authorization": "SECRET-A", "API-Key": "SECRET-K"},
    )
    logged: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        logged.append(formatEvent(event) or "")
        if event.get("log_failure"):
            logged.append(event["log_failure"].getTraceback())

    globalLogPublisher.addObserver(observe)
    try:
        h.client.startService()
        h.last.refuse()
        h.clock.advance(1)
        h.last.respond(401, b"text/plain")
        h.client.restart()
        h.last.respond().send(b"data: x\n\n")
        h.client.stopService()
    finally:
        globalLogPublisher.removeObserver(observe)
    text = "\n".join(logged)
    assert "upstream.test/stream" in text  # the logs do say which stream
    for secret in ("SECRET", "pw@", "user:"):
        assert secret not in text


# ------------------------------------------------------------------------------------------
# Real loopback server


from twisted.internet import reactor, tcp
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

Handler = Callable[[Any], Any]


class Upstream(Resource):
    """Serves scripted responses: each request takes the next handler."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.handlers: list[Handler] = []
        self.requests: DeferredQueue[Any] = DeferredQueue()
        self.all_requests: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.all_requests.append(request)
        handler = self.handlers.pop(0) if self.handlers else status(503)
        result = handler(request)
        # put() resumes a waiting test synchronously: only after the handler set the headers
        self.requests.put(request)
        return result


def status(code: int) -> Handler:
    def handle(request: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain")
        return b"error body " * 100

    return handle


def stream(*chunks: bytes) -> Handler:
    def handle(request: Any) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        for c in chunks:
            request.write(c)
        return NOT_DONE_YET

    return handle


def within(d: Deferred[Any], seconds: float = 3.0) -> Deferred[Any]:
    return d.addTimeout(seconds, reactor)


def closed(request: Any) -> Deferred[Any]:
    """Fires when the server side of the request's connection is gone."""
    d = request.notifyFinish()
    d.addErrback(lambda f: None)
    return d


@pytest.fixture
def upstream():
    resource = Upstream()
    port = pytest_twisted.blockon(
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource))
    )
    resource.url = f"http://127.0.0.1:{port.getHost().port}/stream?cluster=1"
    yield resource
    for request in resource.all_requests:
        if not request.finished and request.channel is not None and request.channel.transport:
            request.channel.transport.abortConnection()
    ours = port.getHost().port
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(task.deferLater(reactor, 0, lambda: None))
    sockets = reactor.getReaders() + reactor.getWriters()
    left = [s for s in sockets if isinstance(s, tcp.Port) and s.getHost().port == ours
            or isinstance(s, tcp.Connection) and ours in (s.getHost().port, s.getPeer().port)]
    assert left == []
    timers = [c for c in reactor.getDelayedCalls() if "sseclient" in repr(c.func)]
    assert timers == []  # no watchdog or retry timer left behind


class Recorder:
    def __init__(self) -> None:
        self.events: DeferredQueue[SSEEvent] = DeferredQueue()
        self.errors: DeferredQueue[StreamError] = DeferredQueue()
        self.event_list: list[SSEEvent] = []
        self.error_list: list[StreamError] = []
        self.connects = 0

    def on_event(self, ev: SSEEvent) -> None:
        self.event_list.append(ev)
        self.events.put(ev)

    def on_error(self, err: StreamError) -> None:
        self.error_list.append(err)
        self.errors.put(err)

    def on_connect(self) -> None:
        self.connects += 1


def make_client(upstream: Upstream, rec: Recorder, **kw: Any) -> SSEClient:
    kw.setdefault("initial_delay", 0.02)
    kw.setdefault("read_timeout", 5.0)
    return SSEClient(
        upstream.url,
        headers={"API-Key": "key-1"},
        on_event=rec.on_event,
        on_error=rec.on_error,
        on_connect=rec.on_connect,
        clock=reactor,
        **kw,
    )


@pytest_twisted.ensureDeferred
async def test_loopback_events_delivered(upstream: Upstream):
    rec = Recorder()
    upstream.handlers = [stream(b": hello\n\n", b"event: put\ndata: {\"x\":1}\n\n")]
    client = make_client(upstream, rec)
    client.startService()
    try:
        request = await within(upstream.requests.get())
        assert request.getHeader(b"api-key") == b"key-1"
        assert request.getHeader(b"accept") == b"text/event-stream"
        assert request.getHeader(b"last-event-id") is None
        assert await within(rec.events.get()) == SSEEvent("put", '{"x":1}')
        request.write(b"data: line1\r\ndata: line2\r\n\r\n")
        assert await within(rec.events.get()) == SSEEvent("message", "line1\nline2")
        assert rec.connects == 1 and rec.error_list == []
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_loopback_drop_mid_event_resumes_with_last_event_id(upstream: Upstream):
    rec = Recorder()
    upstream.handlers = [
        stream(b"id: 1\ndata: one\n\n", b"id: 2\nevent: put\ndata: par"),
        stream(),
    ]
    client = make_client(upstream, rec)
    client.startService()
    try:
        first = await within(upstream.requests.get())
        assert await within(rec.events.get()) == SSEEvent("message", "one", "1")
        first.channel.transport.abortConnection()  # drop with an event half sent
        err = await within(rec.errors.get())
        assert err.kind == NETWORK_ERROR and err.recoverable
        second = await within(upstream.requests.get())
        assert second.getHeader(b"last-event-id") == b"1"
        second.write(b"id: 2\nevent: put\ndata: complete\n\n")
        assert await within(rec.events.get()) == SSEEvent("put", "complete", "2")
        assert rec.event_list == [SSEEvent("message", "one", "1"), SSEEvent("put", "complete", "2")]
        assert rec.connects == 2
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_loopback_500_is_retried(upstream: Upstream):
    rec = Recorder()
    upstream.handlers = [status(500), stream(b"data: after-500\n\n")]
    client = make_client(upstream, rec)
    client.startService()
    try:
        err = await within(rec.errors.get())
        assert (err.kind, err.status, err.recoverable) == (ERROR_RESPONSE, 500, True)
        assert await within(rec.events.get()) == SSEEvent("message", "after-500")
        assert len(upstream.all_requests) == 2
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_loopback_401_stops_without_retry(upstream: Upstream):
    rec = Recorder()
    upstream.handlers = [status(401), stream(b"data: should-not-connect\n\n")]
    client = make_client(upstream, rec, initial_delay=0.01)
    client.startService()
    try:
        err = await within(rec.errors.get())
        assert (err.kind, err.status, err.recoverable) == (ERROR_RESPONSE, 401, False)
        await task.deferLater(reactor, 0.2, lambda: None)  # 20 initial delays
        assert len(upstream.all_requests) == 1 and client.state == "failed"
        assert rec.event_list == []
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_loopback_stall_past_read_timeout_reconnects(upstream: Upstream):
    rec = Recorder()
    upstream.handlers = [stream(b"id: 5\ndata: before-stall\n\n"), stream(b"data: resumed\n\n")]
    client = make_client(upstream, rec, read_timeout=0.5)
    client.startService()
    try:
        first = await within(upstream.requests.get())
        first_closed = closed(first)
        assert (await within(rec.events.get())).data == "before-stall"
        started = reactor.seconds()
        err = await within(rec.errors.get())
        assert err.kind == NETWORK_ERROR and "no data" in err.message
        assert reactor.seconds() - started >= 0.45
        await within(first_closed, 1.0)  # the stalled connection was really closed
        second = await within(upstream.requests.get())
        assert second.getHeader(b"last-event-id") == b"5"
        assert (await within(rec.events.get())).data == "resumed"
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_loopback_stop_service_closes_connection(upstream: Upstream):
    rec = Recorder()
    upstream.handlers = [stream(b"data: a\n\n")]
    client = make_client(upstream, rec)
    client.startService()
    request = await within(upstream.requests.get())
    server_closed = closed(request)
    await within(rec.events.get())
    await within(client.stopService(), 1.0)
    await within(server_closed, 1.0)
    assert rec.error_list == []
    await task.deferLater(reactor, 0.1, lambda: None)
    assert len(upstream.all_requests) == 1  # no reconnect after stop


# ------------------------------------------------------------------------------------------
# Buffer cap


def test_parser_line_over_cap_is_invalid_data():
    p = EventParser(max_size=100)
    p.feed(b"data: " + b"x" * 60)
    with pytest.raises(StreamError) as e:
        p.feed(b"x" * 60)  # still no line end: 126 characters buffered
    assert e.value.kind == INVALID_DATA and e.value.recoverable


def test_parser_many_data_lines_over_cap_is_invalid_data():
    p = EventParser(max_size=100)
    assert p.feed(b"data: " + b"y" * 40 + b"\n") == []
    with pytest.raises(StreamError):
        p.feed(b"data: " + b"y" * 40 + b"\ndata: " + b"y" * 40 + b"\n")


def test_parser_cap_is_per_event_not_per_stream():
    p = EventParser(max_size=100)
    for i in range(10):  # 10 x 80 characters in total, each event under the cap
        assert p.feed(b"data: " + b"z" * 80 + b"\n\n") == [SSEEvent("message", "z" * 80)]


def test_client_aborts_and_reconnects_on_oversized_line():
    h = Harness(max_event_size=50)
    h.client.startService()
    r = h.last.respond()
    r.send(b"data: ok\n\n")
    r.send(b"data: " + b"x" * 100)
    assert r.transport.stopped
    assert [e.data for e in h.events] == ["ok"]
    (err,) = h.errors
    assert err.kind == INVALID_DATA and err.recoverable
    h.clock.advance(1.0)
    assert len(h.http.calls) == 2
