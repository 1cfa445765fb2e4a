"""Server-Sent Events: frame encoding and the fan-out hub every SDK stream goes through.

Fan-out costs O(changes), not O(clients x time): an event is encoded once and the same bytes are written to every
subscriber of its topic, and one shared timer sends the heartbeat comment to everyone. A subscriber that stops
reading is not buffered without limit: while its transport is paused, frames wait in a bounded backlog, and a
subscriber whose backlog overflows, or who stays paused past ``slow_after``, is dropped (the SDK reconnects).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from zope.interface import implementer

from relayd.logs import Logger

log = Logger()

HEARTBEAT = b":\n\n"


def encode(data: str, event: str | None = None, event_id: str | None = None) -> bytes:
    """One SSE frame; multi-line data becomes one ``data:`` line per line."""
    parts = []
    if event_id is not None:
        parts.append(f"id: {event_id}\n")
    if event is not None:
        parts.append(f"event: {event}\n")
    for line in data.split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


@implementer(IPushProducer)
class Subscriber:
    """One open SDK stream: the request it writes to, and its state as a push producer."""

    def __init__(self, hub: "SSEHub", request: IRequest, topic: Hashable, info: Any = None,
                 on_close: Callable[["Subscriber"], None] | None = None) -> None:
        self.hub = hub
        self.request = request
        self.topic = topic
        self.info = info  # what the family needs to know about this stream (e.g. its context)
        self.opened = hub.clock.seconds()
        self.paused_since: float | None = None
        self.closed = False
        self._backlog: list[bytes] = []
        self._backlog_size = 0
        self._on_close = on_close
        self.done: Deferred[None] = Deferred(canceller=lambda _: hub._remove(self, "client went away"))

    # IPushProducer: the HTTP channel pauses us when the socket's user-space buffer passes 64 KiB.
    def pauseProducing(self) -> None:
        if self.paused_since is None:
            self.paused_since = self.hub.clock.seconds()

    def resumeProducing(self) -> None:
        self.paused_since = None
        if self._backlog and not self.closed:
            backlog, self._backlog, self._backlog_size = self._backlog, [], 0
            self.request.write(b"".join(backlog))

    def stopProducing(self) -> None:
        self.hub._remove(self, "connection lost")

    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        if self.paused_since is None:
            self.request.write(frame)  # may call pauseProducing() synchronously
            return
        self._backlog.append(frame)
        self._backlog_size += len(frame)
        if self._backlog_size > self.hub.max_backlog:
            self.hub.drop(self, "backlog overflow")

    @property
    def backlog_size(self) -> int:
        return self._backlog_size


class SSEHub(Service):
    """Every open SDK stream, grouped by topic (an environment, or an environment and a context)."""

    name = "sse-hub"

    def __init__(self, clock: IReactorTime, heartbeat: float = 15.0, max_backlog: int = 1 << 20,
                 slow_after: float | None = None, heartbeat_frame: bytes = HEARTBEAT) -> None:
        self.clock = clock
        self.heartbeat = heartbeat
        self.max_backlog = max_backlog
        self.slow_after = slow_after if slow_after is not None else max(2 * heartbeat, 30.0)
        self.heartbeat_frame = heartbeat_frame
        self._topics: dict[Hashable, dict[Subscriber, None]] = {}
        self._beat: LoopingCall | None = None
        self.dropped = 0

    # -- lifecycle

    def startService(self) -> None:
        super().startService()
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = self.clock
        self._beat.start(self.heartbeat, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        subscribers = list(self.all_subscribers())
        for sub in subscribers:
            self.close(sub)
        if not subscribers:
            return succeed(None)
        return deferLater(self.clock, 0.2, lambda: None)  # let the final chunks and FINs go out

    def set_heartbeat(self, seconds: float) -> None:
        """Change the heartbeat period of the running hub (configuration reload)."""
        self.heartbeat = seconds
        if self._beat is not None and self._beat.running:
            self._beat.stop()
            self._beat.start(seconds, now=False)

    # -- subscribing

    def subscribe(self, request: IRequest, topic: Hashable, *, initial: bytes | None = None, info: Any = None,
                  headers: Iterable[tuple[bytes, bytes]] = (),
                  on_close: Callable[[Subscriber], None] | None = None) -> Deferred[None]:
        """Turn ``request`` into an open stream on ``topic``; return what a Klein route returns to keep it open."""
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
        request.setHeader(b"X-Accel-Buffering", b"no")
        for name, value in headers:
            request.setHeader(name, value)
        sub = Subscriber(self, request, topic, info, on_close)
        self._topics.setdefault(topic, {})[sub] = None
        real = cast(Request, request)  # Klein hands routes an IRequest; it is twisted.web's Request
        real.registerProducer(sub, True)
        real.notifyFinish().addBoth(lambda _: self._remove(sub, "request finished"))
        # The first write sends the status line and headers, so the SDK sees the stream open at once.
        request.write(initial if initial else HEARTBEAT)
        return sub.done

    def publish(self, topic: Hashable, frame: bytes) -> int:
        """Write one encoded frame to every subscriber of ``topic``; returns how many got it."""
        subs = self._topics.get(topic)
        if not subs:
            return 0
        for sub in list(subs):
            sub.send(frame)
        return len(subs)

    def subscribers(self, topic: Hashable) -> list[Subscriber]:
        return list(self._topics.get(topic, ()))

    def topics(self) -> list[Hashable]:
        return list(self._topics)

    def all_subscribers(self) -> Iterable[Subscriber]:
        for subs in list(self._topics.values()):
            yield from list(subs)

    def count(self, topic: Hashable | None = None) -> int:
        if topic is not None:
            return len(self._topics.get(topic, ()))
        return sum(len(s) for s in self._topics.values())

    # -- ending streams

    def close(self, sub: Subscriber) -> None:
        """End a stream from our side and close its TCP connection (SDKs that read the raw socket need the FIN)."""
        if sub.closed:
            return
        self._remove(sub, "closed by relayd")
        transport = _transport(sub.request)
        if not sub.done.called:
            sub.done.callback(None)  # Klein finishes the response: the terminating chunk goes out first
        if transport is not None:
            transport.loseConnection()

    def close_topic(self, topic: Hashable) -> None:
        for sub in list(self._topics.get(topic, ())):
            self.close(sub)

    def drop(self, sub: Subscriber, why: str) -> None:
        """Abort a subscriber that cannot keep up: discard what it has not read, free its memory now."""
        if sub.closed:
            return
        self.dropped += 1
        log.info("dropping slow SSE subscriber on {topic!r}: {why}", topic=sub.topic, why=why)
        self._remove(sub, why)
        transport = _transport(sub.request)
        if transport is not None:
            transport.abortConnection()

    def _remove(self, sub: Subscriber, why: str) -> None:
        if sub.closed:
            return
        sub.closed = True
        sub._backlog, sub._backlog_size = [], 0
        subs = self._topics.get(sub.topic)
        if subs is not None:
            subs.pop(sub, None)
            if not subs:
                del self._topics[sub.topic]
        try:
            cast(Request, sub.request).unregisterProducer()
        except Exception:  # the channel may already be gone
            pass
        log.debug("SSE stream on {topic!r} ended after {secs:.1f}s: {why}", topic=sub.topic,
                  secs=self.clock.seconds() - sub.opened, why=why)
        if sub._on_close is not None:
            try:
                sub._on_close(sub)
            except Exception:
                log.failure("SSE on_close callback failed")

    def _heartbeat(self) -> None:
        now = self.clock.seconds()
        frame = self.heartbeat_frame
        for sub in list(self.all_subscribers()):
            try:
                if sub.paused_since is None:
                    sub.request.write(frame)
                elif now - sub.paused_since >= self.slow_after:
                    self.drop(sub, f"not reading for {now - sub.paused_since:.0f}s")
            except Exception:  # a LoopingCall that raises stops for good; one bad stream must not stop them all
                log.failure("heartbeat to an SSE subscriber failed")
                self._remove(sub, "heartbeat failed")


def _transport(request: IRequest) -> Any:
    channel = getattr(request, "channel", None)
    return getattr(channel, "transport", None)
