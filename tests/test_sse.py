"""The SSE hub, driven by task.Clock and requests whose transports behave like slow or fast sockets."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relayd.sse import HEARTBEAT, SSEHub, encode


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False
        self.lost = False

    def abortConnection(self) -> None:
        self.aborted = True

    def loseConnection(self) -> None:
        self.lost = True


class FakeChannel:
    def __init__(self) -> None:
        self.transport = FakeTransport()


class FakeRequest:
    """Just enough of twisted.web's Request: headers, writes into a socket buffer that pauses its producer."""

    PAUSE_AT = 64 * 1024

    def __init__(self, reading: bool = True) -> None:
        self.reading = reading
        self.code: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.received = bytearray()   # what the peer has read
        self.buffered = 0             # bytes sitting in the user-space socket buffer
        self.producer: Any = None
        self.finished = False
        self.channel = FakeChannel()
        self._finish: Deferred[None] = Deferred()

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:
        return self._finish

    def write(self, data: bytes) -> None:
        assert not self.finished
        if self.reading:
            self.received += data
            return
        self.buffered += len(data)
        if self.buffered > self.PAUSE_AT and self.producer is not None:
            self.producer.pauseProducing()

    def drain(self) -> None:
        """The peer reads again: the kernel takes the buffer and the channel resumes its producer."""
        self.reading = True
        self.buffered = 0
        if self.producer is not None:
            self.producer.resumeProducing()

    def finish(self) -> None:
        self.finished = True
        self._finish.callback(None)


def hub_with_clock(**kw: Any) -> tuple[SSEHub, Clock]:
    clock = Clock()
    hub = SSEHub(clock, **kw)
    hub.startService()
    return hub, clock


def subscribe(hub: SSEHub, topic: str, request: FakeRequest, **kw: Any) -> Deferred[None]:
    d = hub.subscribe(request, topic, **kw)  # type: ignore[arg-type]
    d.addCallback(lambda _: request.finish())  # what Klein does when the route's Deferred fires
    return d


def test_encode() -> None:
    assert encode('{"a":1}', event="put") == b'event: put\ndata: {"a":1}\n\n'
    assert encode("a\nb", event_id="7") == b"id: 7\ndata: a\ndata: b\n\n"


def test_subscribe_sends_headers_at_once() -> None:
    hub, _ = hub_with_clock()
    req = FakeRequest()
    subscribe(hub, "t", req, initial=b"event: put\ndata: {}\n\n")
    assert req.code == 200 and req.headers[b"Content-Type"].startswith(b"text/event-stream")
    assert req.headers[b"Cache-Control"].startswith(b"no-cache")
    assert bytes(req.received) == b"event: put\ndata: {}\n\n"
    req2 = FakeRequest()
    subscribe(hub, "t", req2)
    assert bytes(req2.received) == HEARTBEAT  # nothing to say yet, but the headers go out


def test_one_heartbeat_timer_for_many_subscribers() -> None:
    hub, clock = hub_with_clock(heartbeat=15)
    reqs = [FakeRequest() for _ in range(500)]
    for i, r in enumerate(reqs):
        subscribe(hub, f"env{i % 3}", r)
    assert len(clock.getDelayedCalls()) == 1
    for r in reqs:
        r.received.clear()
    clock.advance(14.9)
    assert all(r.received == b"" for r in reqs)
    clock.advance(0.1)
    assert all(bytes(r.received) == HEARTBEAT for r in reqs)
    clock.advance(15)
    assert all(bytes(r.received) == HEARTBEAT * 2 for r in reqs)
    assert len(clock.getDelayedCalls()) == 1


def test_an_event_reaches_every_subscriber_of_its_topic_once() -> None:
    hub, _ = hub_with_clock()
    a = [FakeRequest() for _ in range(3)]
    b = FakeRequest()
    for r in a:
        subscribe(hub, "a", r)
    subscribe(hub, "b", b)
    frame = encode("x", event="patch")
    assert hub.publish("a", frame) == 3
    assert all(bytes(r.received).count(frame) == 1 for r in a)
    assert frame not in bytes(b.received)
    assert hub.publish("nobody", frame) == 0


def test_a_subscriber_that_stops_reading_is_dropped_and_memory_stays_bounded() -> None:
    hub, clock = hub_with_clock(heartbeat=15, max_backlog=256 * 1024)
    fast, slow = FakeRequest(), FakeRequest(reading=False)
    subscribe(hub, "t", fast)
    subscribe(hub, "t", slow)
    frame = encode("x" * 1000, event="patch")
    sub = hub.subscribers("t")[1]
    peak = 0
    for _ in range(400):  # ~400 KB of events: far more than the socket buffer plus the backlog bound
        hub.publish("t", frame)
        peak = max(peak, sub.backlog_size)
    assert peak <= 256 * 1024 + len(frame)
    assert slow.channel.transport.aborted and sub.closed and sub.backlog_size == 0
    assert hub.count("t") == 1 and hub.dropped == 1
    assert bytes(fast.received).count(frame) == 400  # the healthy subscriber missed nothing


def test_a_paused_subscriber_gets_its_backlog_when_it_reads_again() -> None:
    hub, _ = hub_with_clock(max_backlog=1 << 20)
    req = FakeRequest(reading=False)
    subscribe(hub, "t", req)
    frames = [encode(str(i) * 2000, event="patch") for i in range(50)]
    for f in frames:
        hub.publish("t", f)
    sub = hub.subscribers("t")[0]
    assert sub.paused_since is not None and sub.backlog_size > 0
    req.drain()
    for f in frames[-10:]:
        assert f in bytes(req.received)
    assert sub.backlog_size == 0 and not sub.closed


def test_a_subscriber_paused_too_long_is_dropped_by_the_heartbeat() -> None:
    hub, clock = hub_with_clock(heartbeat=15, slow_after=30)
    req = FakeRequest(reading=False)
    subscribe(hub, "t", req)
    hub.publish("t", b"x" * (FakeRequest.PAUSE_AT + 1))
    clock.advance(15)
    assert not req.channel.transport.aborted
    clock.advance(15)
    assert req.channel.transport.aborted and hub.count() == 0


def test_client_going_away_unsubscribes() -> None:
    hub, _ = hub_with_clock()
    req = FakeRequest()
    closed = []
    d = hub.subscribe(req, "t", on_close=closed.append)  # type: ignore[arg-type]
    d.cancel()  # Klein cancels the route's Deferred when the connection is lost
    assert hub.count() == 0 and len(closed) == 1
    d.addErrback(lambda f: None)


def test_close_topic_ends_the_streams_and_closes_the_connections() -> None:
    hub, _ = hub_with_clock()
    reqs = [FakeRequest() for _ in range(2)]
    for r in reqs:
        subscribe(hub, "t", r)
    other = FakeRequest()
    subscribe(hub, "u", other)
    hub.close_topic("t")
    assert all(r.finished and r.channel.transport.lost for r in reqs)
    assert not other.finished and hub.count() == 1


def test_stop_service_closes_everything_and_the_timer() -> None:
    hub, clock = hub_with_clock()
    req = FakeRequest()
    subscribe(hub, "t", req)
    d = hub.stopService()
    assert req.finished and req.channel.transport.lost
    clock.advance(1)
    assert d.called and clock.getDelayedCalls() == []
