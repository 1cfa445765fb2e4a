# -*- test-case-name: tests.test_sseclient -*-
"""Reconnecting upstream Server-Sent Events client on treq.

Both upstream families (Harness ``GET /stream``, LaunchDarkly ``GET /all``) keep one long-lived SSE
connection to the vendor and must survive drops, stalls and outages without hammering the vendor.
This module holds the pieces they share:

* :class:`EventParser`: an incremental ``text/event-stream`` parser (WHATWG rules), pure.
* :func:`backoff_delay` / :func:`default_recoverable`: the reconnect policy of the LaunchDarkly
  eventsource clients (1 s doubling to 30 s, jitter subtracting up to 50 %, reset after 60 s of
  good connection; 400/408/429/5xx recoverable, other 4xx fatal).
* :class:`SSEClient`: a ``Service`` that connects, feeds the parser, watches for read stalls, and
  reconnects with ``Last-Event-ID``.

treq's ``timeout=`` only covers the wait for response headers (and uses the global reactor), so
the client runs its own watchdog on the injected clock for both the header wait and the body, and
aborts a stalled body with ``transport.stopProducing()``.
"""

from __future__ import annotations

import codecs
import random as _random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from typing import Protocol as _TypingProtocol
from urllib.parse import urlsplit, urlunsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed

from relayd.httpclient import http_client
from relayd.logs import Logger

MIN_RETRY_DELAY = 0.1  # seconds: the lowest base delay an upstream's "retry:" field can set

__all__ = [
    "ERROR_RESPONSE",
    "INVALID_DATA",
    "NETWORK_ERROR",
    "UNKNOWN",
    "EventParser",
    "SSEClient",
    "SSEEvent",
    "StreamError",
    "backoff_delay",
    "default_recoverable",
]

log = Logger()

NETWORK_ERROR = "NETWORK_ERROR"
ERROR_RESPONSE = "ERROR_RESPONSE"
INVALID_DATA = "INVALID_DATA"
UNKNOWN = "UNKNOWN"

# Bytes of an error response body we read before giving up on it (it is only drained so the
# connection closes cleanly; nobody looks at it).
_DISCARD_LIMIT = 64 * 1024

# Largest event (or single line) the parser buffers: a hostile or broken upstream that never sends a line end
# would otherwise grow the buffer without bound. LaunchDarkly puts of big projects run to tens of MiB.
MAX_EVENT_SIZE = 64 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event.

    ``id`` is the stream's last event ID at dispatch time (WHATWG semantics: it persists across
    events until another ``id:`` field changes it), or None when none is set.
    """

    event: str = "message"
    data: str = ""
    id: str | None = None


_EOL = re.compile(r"\r\n|\r|\n")


class EventParser:
    """Incremental ``text/event-stream`` parser; feed it bytes as they arrive.

    Handles ``\\r\\n``, ``\\n`` and ``\\r`` line ends (including a ``\\r`` that ends one chunk with
    its ``\\n`` in the next), a UTF-8 BOM at the start, UTF-8 sequences split across chunks
    (invalid bytes become U+FFFD), comments (ignored), and ``id``/``retry`` fields. An event that
    is still incomplete when the connection ends is never dispatched: use one parser per
    connection and pass the previous ``last_event_id`` on.

    A line or an event's data growing past ``max_size`` characters raises
    :class:`StreamError` (``INVALID_DATA``) from :meth:`feed`.
    """

    def __init__(self, last_event_id: str = "", max_size: int = MAX_EVENT_SIZE) -> None:
        # WHATWG: an id field fills the buffer; the "last event ID string" (what a reconnect
        # sends) only takes the buffer's value at a blank line, so an id inside an event cut
        # off by a disconnect is never committed.
        self.last_event_id = last_event_id
        self._id_buffer = last_event_id
        self.retry: int | None = None  # last valid retry field, milliseconds
        self._retry_pending: int | None = None
        # utf-8-sig strips one BOM at the very start, even when its bytes are split.
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self._partial: list[str] = []  # pieces of the current, unterminated line
        self._skip_lf = False  # the previous chunk ended with \r: a leading \n is part of it
        self._partial_size = 0
        self._data: list[str] = []
        self._data_size = 0
        self._event_type = ""
        self._max_size = max_size

    def _too_big(self) -> StreamError:
        return StreamError(INVALID_DATA, f"event larger than {self._max_size} characters")

    def pop_retry(self) -> int | None:
        """Return a ``retry:`` value (ms) received since the last call, else None."""
        value, self._retry_pending = self._retry_pending, None
        return value

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume a chunk and return the events it completed, in order."""
        text = self._decoder.decode(chunk)
        events: list[SSEEvent] = []
        pos, end = 0, len(text)
        if self._skip_lf and end:
            self._skip_lf = False
            if text[0] == "\n":
                pos = 1
        while pos < end:
            m = _EOL.search(text, pos)
            if m is None:
                rest = text[pos:]
                self._partial.append(rest)
                self._partial_size += len(rest)
                if self._partial_size + self._data_size > self._max_size:
                    raise self._too_big()
                break
            line = text[pos : m.start()]
            if self._partial:
                self._partial.append(line)
                line = "".join(self._partial)
                self._partial.clear()
                self._partial_size = 0
            if m.end() == end and m.group() == "\r":
                self._skip_lf = True
            pos = m.end()
            self._line(line, events)
        return events

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line[0] == ":":
            return  # comment (heartbeat); the caller counts the bytes as activity
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data_size += len(value) + 1
            if self._data_size > self._max_size:
                raise self._too_big()
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id" and "\0" not in value:
            self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = self._retry_pending = int(value)
        # other field names are ignored, as the spec says

    def _dispatch(self, events: list[SSEEvent]) -> None:
        self.last_event_id = self._id_buffer
        if self._data:
            events.append(
                SSEEvent(
                    event=self._event_type or "message",
                    data="\n".join(self._data),
                    id=self.last_event_id or None,
                )
            )
        self._data = []
        self._data_size = 0
        self._event_type = ""


# --------------------------------------------------------------------------------------------
# Policy


class StreamError(Exception):
    """Why a stream attempt failed; ``kind`` uses the LaunchDarkly data-source error kinds."""

    def __init__(
        self,
        kind: str,
        message: str = "",
        *,
        status: int | None = None,
        recoverable: bool = True,
    ) -> None:
        super().__init__(message or kind)
        self.kind = kind
        self.message = message or kind
        self.status = status
        self.recoverable = recoverable

    def __repr__(self) -> str:
        return (
            f"StreamError({self.kind!r}, {self.message!r}, status={self.status!r}, "
            f"recoverable={self.recoverable!r})"
        )


def default_recoverable(status: int) -> bool:
    """LaunchDarkly's ``isHTTPErrorRecoverable``: 400, 408, 429 and non-4xx retry; other 4xx don't."""
    if 400 <= status < 500:
        return status in (400, 408, 429)
    return True


def backoff_delay(base: float, retry_count: int, max_delay: float, rand: float) -> float:
    """Delay before retry number ``retry_count`` (0-based): ``min(base * 2**n, max)`` minus jitter.

    ``rand`` in [0, 1) subtracts ``rand * 50 %`` of the delay, so the result lies in (d/2, d].
    """
    delay = max_delay if retry_count >= 64 else min(base * (2.0**retry_count), max_delay)
    return delay - delay * 0.5 * rand


def _safe_url(url: str) -> str:
    """The URL without credentials or query (query strings may hold keys) for logs."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        query = "..." if parts.query else ""
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "<unparseable url>"


def _describe(failure: Failure) -> str:
    """A short, secret-free description of a connection failure."""
    value = failure.value
    if isinstance(value, ResponseFailed) and value.reasons:
        return "; ".join(_describe(r) for r in value.reasons)
    text = str(value).strip()
    return f"{type(value).__name__}: {text}" if text else type(value).__name__


# --------------------------------------------------------------------------------------------
# Client


class HTTPClientLike(_TypingProtocol):
    """What the client needs from treq: ``HTTPClient``, ``StubTreq`` and the ``treq`` module fit."""

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]: ...


class _Body(Protocol):
    """Base for body protocols: can abort its connection and tells waiters when it is closed."""

    def __init__(self) -> None:
        self._lost = False
        self._waiters: list[Deferred[None]] = []

    def abort(self) -> None:
        if self.transport is not None:  # a TransportProxyProducer: stopProducing drops the connection
            cast(IPushProducer, self.transport).stopProducing()

    def when_closed(self) -> Deferred[None]:
        if self._lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.transport = None
        self._lost = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


class _DiscardBody(_Body):
    """Reads and drops an error response body so the connection ends cleanly."""

    def __init__(self, clock: IReactorTime, timeout: float, done: Callable[[_Body], None]) -> None:
        super().__init__()
        self._clock, self._timeout, self._done = clock, timeout, done
        self._received = 0
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._timeout, self.abort)

    def dataReceived(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > _DISCARD_LIMIT:
            self.abort()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._done(self)
        super().connectionLost(reason)


class _StreamBody(_Body):
    """Delivers an event-stream body to its client, tagged with the attempt it belongs to."""

    def __init__(self, client: SSEClient, attempt: _Attempt) -> None:
        super().__init__()
        self._client, self._attempt = client, attempt

    def connectionMade(self) -> None:
        self._client._body_started(self._attempt)

    def dataReceived(self, data: bytes) -> None:
        self._client._body_data(self._attempt, data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._client._body_lost(self._attempt, self, reason)
        super().connectionLost(reason)


class _Attempt:
    """State of one connection attempt; callbacks of superseded attempts are ignored."""

    def __init__(self, parser: EventParser) -> None:
        self.parser = parser
        self.request: Deferred[Any] | None = None
        self.body: _StreamBody | None = None
        self.watchdog: IDelayedCall | None = None
        self.timed_out = False
        self.last_activity = 0.0

    def cancel_watchdog(self) -> None:
        if self.watchdog is not None and self.watchdog.active():
            self.watchdog.cancel()
        self.watchdog = None

    def drop(self) -> None:
        """Stop whatever this attempt is doing: pending request or open body."""
        self.cancel_watchdog()
        request, self.request = self.request, None
        if request is not None:
            request.cancel()
        if self.body is not None:
            self.body.abort()


def _noop(*args: Any) -> None:
    return None


class SSEClient(Service):
    """A reconnecting SSE stream from one upstream URL, as a Twisted service.

    ``url`` and ``headers`` may be callables: they are evaluated on every connect, so a refreshed
    token or key applies to the next connection. Headers are never logged.

    Callbacks: ``on_connect()`` after a 200 ``text/event-stream`` response; ``on_event(event)``
    per event; ``on_error(error)`` for every failure, before the retry is scheduled (or before the
    client gives up on an unrecoverable one). If ``on_event`` raises a :class:`StreamError` the
    connection is treated as failed with that error (``INVALID_DATA`` is recoverable: reconnect
    with backoff; the bad event's ID is not counted as received). Any other exception from
    ``on_event`` is logged and the stream goes on.
    """

    def __init__(
        self,
        url: str | Callable[[], str],
        *,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]],
        on_event: Callable[[SSEEvent], None],
        on_connect: Callable[[], None] = _noop,
        on_error: Callable[[StreamError], None] = _noop,
        is_recoverable: Callable[[int], bool] = default_recoverable,
        clock: IReactorTime,
        http: HTTPClientLike | None = None,
        read_timeout: float = 300.0,
        initial_delay: float = 1.0,
        max_delay: float = 30.0,
        reset_after: float = 60.0,
        random: Callable[[], float] = _random.random,
        connect_timeout: float = 10.0,
        max_event_size: int = MAX_EVENT_SIZE,
    ) -> None:
        self._url = url
        self._headers = headers
        self._on_event = on_event
        self._on_connect = on_connect
        self._on_error = on_error
        self._is_recoverable = is_recoverable
        self._clock = clock
        self._pool: Any = None
        if http is None:
            # A stream never goes back to a pool: use a private non-persistent one.
            client, self._pool = http_client(clock, persistent=False, connect_timeout=connect_timeout)
            http = cast(HTTPClientLike, client)
        self._http: HTTPClientLike = http
        self._read_timeout = read_timeout
        self._initial_delay = initial_delay
        self._max_delay = max_delay
        self._reset_after = reset_after
        self._random = random
        self._max_event_size = max_event_size

        self._base_delay = initial_delay
        self._retry_count = 0
        self._good_since: float | None = None
        self._last_event_id = ""
        self._current: _Attempt | None = None
        self._retry_call: IDelayedCall | None = None
        self._bodies: set[_Body] = set()

    # -- public API ---------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """One of ``stopped``, ``connecting``, ``connected``, ``waiting`` (for a retry), ``failed``
        (gave up after an unrecoverable error; ``restart()`` resumes)."""
        if not self.running:
            return "stopped"
        if self._current is not None:
            return "connected" if self._current.body is not None else "connecting"
        if self._retry_call is not None:
            return "waiting"
        return "failed"

    @property
    def last_event_id(self) -> str | None:
        """The ID that is sent as ``Last-Event-ID`` on the next connect, if any."""
        return self._last_event_id or None

    @property
    def retry_count(self) -> int:
        """Failures since the last reset; the exponent of the next backoff."""
        return self._retry_count

    def next_delay(self) -> float:
        """The delay the next retry would wait, from the current base delay and retry count.

        Draws one value from ``random``; does not change any state.
        """
        return backoff_delay(self._base_delay, self._retry_count, self._max_delay, self._random())

    def startService(self) -> None:
        super().startService()
        self._retry_count = 0
        self._base_delay = self._initial_delay
        self._good_since = None
        self._connect()

    def stopService(self) -> Deferred[None]:
        """Abort the stream, cancel timers; the Deferred fires once open connections are closed."""
        super().stopService()
        self._cancel_retry()
        current, self._current = self._current, None
        if current is not None:
            current.drop()
        bodies = list(self._bodies)
        waits = [body.when_closed() for body in bodies]  # before aborting: loss may be synchronous
        for body in bodies:
            body.abort()
        d: Deferred[Any] = DeferredList(waits) if waits else succeed(None)
        if self._pool is not None:
            pool = self._pool
            d.addCallback(lambda _: pool.closeCachedConnections())
        d.addCallback(lambda _: None)
        return d

    def restart(self) -> None:
        """Drop the current connection (or pending retry) and connect again now.

        Also resumes a client that stopped on an unrecoverable error. No-op when not running.
        """
        if not self.running:
            return
        self._cancel_retry()
        current, self._current = self._current, None
        if current is not None:
            current.drop()
        log.info("restarting stream from {url}", url=self._safe_url())
        self._connect()

    # -- connection cycle ---------------------------------------------------------------------

    def _safe_url(self) -> str:
        try:
            return _safe_url(self._url() if callable(self._url) else self._url)
        except Exception:  # noqa: BLE001 (callbacks must not kill the loop)
            return "<url callable failed>"

    def _cancel_retry(self) -> None:
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None

    def _connect(self) -> None:
        self._retry_call = None
        attempt = _Attempt(EventParser(self._last_event_id, self._max_event_size))
        self._current = attempt
        try:
            url = self._url() if callable(self._url) else self._url
            supplied = self._headers() if callable(self._headers) else self._headers
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            headers.update(supplied)
            if self._last_event_id:
                headers["Last-Event-ID"] = self._last_event_id
            log.debug("connecting to {url}", url=_safe_url(url))
            d = self._http.get(url, headers=headers, unbuffered=True)
        except Exception as e:  # noqa: BLE001 (callbacks must not kill the loop)
            log.failure("building the stream request failed")
            self._failed(attempt, StreamError(UNKNOWN, f"request failed: {type(e).__name__}"))
            return
        attempt.request = d
        attempt.watchdog = self._clock.callLater(self._read_timeout, self._header_timeout, attempt)
        d.addCallbacks(
            self._on_response, self._on_request_failed, callbackArgs=(attempt,), errbackArgs=(attempt,)
        )
        d.addErrback(lambda f: log.failure("sseclient internal error", f))

    def _header_timeout(self, attempt: _Attempt) -> None:
        attempt.watchdog = None
        if attempt is self._current and attempt.request is not None:
            attempt.timed_out = True
            attempt.request.cancel()

    def _on_request_failed(self, failure: Failure, attempt: _Attempt) -> None:
        if attempt is not self._current:
            return  # cancelled by restart/stop, or superseded
        attempt.request = None
        attempt.cancel_watchdog()
        if attempt.timed_out:
            message = f"no response within {self._read_timeout:g}s"
        else:
            message = f"connection failed: {_describe(failure)}"
        self._failed(attempt, StreamError(NETWORK_ERROR, message))

    def _on_response(self, response: Any, attempt: _Attempt) -> None:
        if attempt is not self._current:
            self._discard(response)
            return
        attempt.request = None
        attempt.cancel_watchdog()
        code = response.code
        if code != 200:
            self._discard(response)
            self._failed(
                attempt,
                StreamError(
                    ERROR_RESPONSE,
                    f"HTTP {code}",
                    status=code,
                    recoverable=self._is_recoverable(code),
                ),
            )
            return
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if ctype.split(b";")[0].strip().lower() != b"text/event-stream":
            self._discard(response)
            self._failed(
                attempt,
                StreamError(
                    ERROR_RESPONSE,
                    f"unexpected content type {ctype[:60].decode('latin-1')!r}",
                    status=code,
                ),
            )
            return
        self._good_since = self._clock.seconds()
        log.info("stream connected to {url}", url=self._safe_url())
        body = _StreamBody(self, attempt)
        attempt.body = body
        self._bodies.add(body)
        try:
            self._on_connect()
        except Exception:  # noqa: BLE001 (callbacks must not kill the loop)
            log.failure("on_connect raised")
        # If on_connect stopped or restarted us, the body still attaches and its
        # connectionMade aborts the connection.
        response.deliverBody(body)

    def _discard(self, response: Any) -> None:
        body = _DiscardBody(self._clock, self._read_timeout, self._bodies.discard)
        self._bodies.add(body)
        response.deliverBody(body)

    def _body_started(self, attempt: _Attempt) -> None:
        attempt.last_activity = self._clock.seconds()
        if attempt is self._current:
            attempt.watchdog = self._clock.callLater(self._read_timeout, self._check_idle, attempt)
        elif attempt.body is not None:
            attempt.body.abort()  # stopped or restarted before the body was attached

    def _check_idle(self, attempt: _Attempt) -> None:
        """Fires at most once per read_timeout; re-arms from the last activity (cheaper than
        resetting a timer on every chunk)."""
        attempt.watchdog = None
        if attempt is not self._current:
            return
        remaining = attempt.last_activity + self._read_timeout - self._clock.seconds()
        if remaining > 1e-6:
            attempt.watchdog = self._clock.callLater(remaining, self._check_idle, attempt)
            return
        self._abort(
            attempt, StreamError(NETWORK_ERROR, f"no data for {self._read_timeout:g}s, aborting stream")
        )

    def _body_data(self, attempt: _Attempt, data: bytes) -> None:
        attempt.last_activity = self._clock.seconds()
        if attempt is not self._current:
            return
        parser = attempt.parser
        try:
            events = parser.feed(data)
        except StreamError as e:
            self._abort(attempt, e)
            return
        retry = parser.pop_retry()
        if retry is not None:
            # The server's retry: is the new base delay (and, as in LaunchDarkly's clients,
            # starts the backoff over).
            # A floor keeps a server that says "retry: 0" and then closes at once from being hammered.
            self._base_delay = max(retry / 1000.0, MIN_RETRY_DELAY)
            self._retry_count = 0
        for event in events:
            try:
                self._on_event(event)
            except StreamError as e:
                if attempt is self._current:
                    self._abort(attempt, e)
                return
            except Exception:  # noqa: BLE001 (callbacks must not kill the loop)
                log.failure("on_event raised; event {event!r} dropped", event=event.event)
            if attempt is not self._current:
                return  # stopped or restarted from inside on_event
            self._last_event_id = event.id or ""
        self._last_event_id = parser.last_event_id

    def _body_lost(self, attempt: _Attempt, body: _Body, reason: Failure | None) -> None:
        attempt.cancel_watchdog()
        attempt.body = None
        self._bodies.discard(body)
        if attempt is not self._current:
            return
        if reason is None or reason.check(ResponseDone):
            error = StreamError(NETWORK_ERROR, "stream closed by server")
        else:
            error = StreamError(NETWORK_ERROR, f"stream failed: {_describe(reason)}")
        self._failed(attempt, error)

    def _abort(self, attempt: _Attempt, error: StreamError) -> None:
        """Close this attempt's connection ourselves and handle it as failed with ``error``."""
        self._current = None
        attempt.drop()
        self._failed(attempt, error)

    def _failed(self, attempt: _Attempt, error: StreamError) -> None:
        if self._current is attempt:
            self._current = None
        now = self._clock.seconds()
        if self._good_since is not None and now - self._good_since >= self._reset_after:
            self._retry_count = 0
        self._good_since = None
        try:
            self._on_error(error)
        except Exception:  # noqa: BLE001 (callbacks must not kill the loop)
            log.failure("on_error raised")
        if not self.running or self._current is not None or self._retry_call is not None:
            return  # on_error stopped or restarted us
        if not error.recoverable:
            log.error(
                "stream from {url} failed and will not be retried: {error}",
                url=self._safe_url(),
                error=error.message,
            )
            return
        delay = self.next_delay()
        self._retry_count += 1
        log.warn(  # noqa: G010 (twisted.logger has no .warning)
            "stream from {url} failed ({error}); reconnecting in {delay:.2f}s",
            url=self._safe_url(),
            error=error.message,
            delay=delay,
        )
        self._retry_call = self._clock.callLater(delay, self._connect)
