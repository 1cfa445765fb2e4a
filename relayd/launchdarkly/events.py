"""Analytics and diagnostic events that LaunchDarkly SDKs post to relayd, on their way to the vendor.

The inbound routes accept a payload (202) and hand it to an ``EventSink``; what happens next is the sink's job:
offline mode discards, the forwarder batches and posts upstream.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as _BodyProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure

from relayd.config import LaunchDarklyConfig
from relayd.httpclient import http_client
from relayd.logs import Logger
from relayd.store import Environment

log = Logger()


class EventSink(Protocol):
    def enabled(self, env: Environment) -> bool:
        """False = forwarding is off for this environment: the SDK gets 503, as from ld-relay."""

    def accept(self, env: Environment, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        """Take one payload: ``path`` is where it goes upstream (``/bulk``, ``/diagnostic``, ``/mobile``,
        ``/mobile/events/diagnostic``, ``/events/bulk/{envId}``, ``/events/diagnostic/{envId}``), ``body`` the
        decompressed JSON, ``headers`` the SDK's headers worth keeping (``X-LaunchDarkly-Event-Schema``,
        ``X-LaunchDarkly-Tags``, ``User-Agent``, ...). Must not block and must not raise."""


class DiscardEvents:
    """Offline mode: events are accepted and dropped, like ld-relay's offline mode."""

    def enabled(self, env: Environment) -> bool:
        return True

    def accept(self, env: Environment, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        return None


# ---------------------------------------------------------------------------------------------- forwarding

def _header(headers: Mapping[str, str], name: str) -> str | None:
    lname = name.lower()
    for key, value in headers.items():
        if key.lower() == lname:
            return value
    return None


def is_diagnostic(path: str) -> bool:
    return path in ("/diagnostic", "/mobile/events/diagnostic") or path.startswith("/events/diagnostic/")


def credential_for(env: Environment, path: str) -> str | None:
    """Section 4.3: the SDK key for server paths, the mobile key for mobile paths, nothing for JS paths."""
    if path.startswith("/events/"):
        return None
    if path.startswith("/mobile"):
        return env.meta.get("mobile_key") or None
    return env.meta.get("sdk_key") or None


def is_recoverable(status: int) -> bool:
    """Event delivery: 400/408/429/5xx (and other non-4xx) are worth the one retry; other 4xx are not."""
    return status in (400, 408, 429) or not 400 <= status < 500


class _Batch:
    """Analytics events bound for one (environment, path, schema, tags), as raw JSON array elements."""

    __slots__ = ("count", "env", "parts", "path", "schema", "tags")

    def __init__(self, env: Environment, path: str, schema: str | None, tags: str | None) -> None:
        self.env, self.path, self.schema, self.tags = env, path, schema, tags
        self.parts: list[bytes] = []
        self.count = 0


class EventForwarder(Service):
    """Batches what SDKs post and sends it to ``events_url`` every ``events_flush`` (ld-relay's event relay).

    Analytics payloads (JSON arrays) are kept verbatim and joined per (environment, path, schema, tags) into one
    array per flush; diagnostic payloads are posted verbatim one by one. The buffer holds at most
    ``events_capacity`` events (a diagnostic payload counts as one); what does not fit is dropped, counted in
    ``dropped`` and logged once per flush interval. A post that fails recoverably is retried once after
    ``retry_delay`` (1 s), then dropped. Nothing here blocks: posts run on treq with a persistent pool.
    """

    def __init__(
        self,
        config: LaunchDarklyConfig,
        *,
        clock: IReactorTime,
        http: Any = None,
        user_agent: str = "",
        retry_delay: float = 1.0,
        request_timeout: float = 30.0,
        payload_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self.config = config
        self.base_url = config.events_url.rstrip("/")
        self.capacity = config.events_capacity
        self.interval = config.events_flush
        self._clock = clock
        self._pool: Any = None
        if http is None:
            http, self._pool = http_client(clock)
        self._http = http
        if not user_agent:
            from relayd import __version__

            user_agent = f"relayd/{__version__} LDRelay/{__version__}"
        self._user_agent = user_agent
        self._retry_delay = retry_delay
        self._request_timeout = request_timeout
        self._payload_id = payload_id
        self._batches: dict[tuple[str, str, str | None, str | None], _Batch] = {}
        self._diagnostics: list[tuple[Environment, str, bytes, dict[str, str]]] = []
        self._queued = 0
        self.dropped = 0  # events dropped for lack of room, since start
        self._dropped_unlogged = 0
        self.posted = 0  # payloads delivered
        self.failed = 0  # payloads given up on
        self._loop: LoopingCall | None = None
        self._in_flight: set[Deferred[Any]] = set()
        self._stopping = False  # no retries once shutting down

    # -- EventSink

    def enabled(self, env: Environment) -> bool:
        return self.config.send_events

    def accept(self, env: Environment, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        try:
            self._accept(env, path, body, headers)
        except Exception:  # noqa: BLE001 (the sink must never raise into a request)
            log.failure("event forwarder failed to queue a payload for {path}", path=path)

    def _accept(self, env: Environment, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        if is_diagnostic(path):
            if not self._room(1):
                return
            keep = {name: value for name in _DIAGNOSTIC_HEADERS if (value := _header(headers, name)) is not None}
            self._diagnostics.append((env, path, body, keep))
            self._queued += 1
            return
        try:
            events = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nesting too deep for json
            log.warn("dropping an event payload for {path} that is not valid JSON", path=path)  # noqa: G010
            return
        if isinstance(events, dict):
            events = [events]
        if not isinstance(events, list):
            log.warn("dropping an event payload for {path} that is not a JSON array", path=path)  # noqa: G010
            return
        if not events:
            return
        room = self.capacity - self._queued
        if room <= 0:
            self._drop(len(events))
            return
        raw = body.strip()
        if len(events) > room:
            self._drop(len(events) - room)
            events = events[:room]
            parts = [json.dumps(e, separators=(",", ":")).encode() for e in events]
        elif raw[:1] == b"[" and raw[-1:] == b"]":
            parts = [raw[1:-1]]  # verbatim, as ld-relay queues them
        else:  # a single object, or an encoding other than plain UTF-8
            parts = [json.dumps(e, separators=(",", ":")).encode() for e in events]
        schema = _header(headers, "X-LaunchDarkly-Event-Schema")
        tags = _header(headers, "X-LaunchDarkly-Tags")
        key = (env.id, path, schema, tags)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch(env, path, schema, tags)
        batch.parts.extend(parts)
        batch.count += len(events)
        self._queued += len(events)

    def _room(self, n: int) -> bool:
        if self._queued + n > self.capacity:
            self._drop(n)
            return False
        return True

    def _drop(self, n: int) -> None:
        if not self._dropped_unlogged:
            log.warn("event buffer full ({capacity} events): dropping events until the next flush",  # noqa: G010
                     capacity=self.capacity)
        self.dropped += n
        self._dropped_unlogged += n

    @property
    def queued(self) -> int:
        """Events waiting for the next flush."""
        return self._queued

    # -- flushing

    def flush(self) -> Deferred[None]:
        """Send everything queued now; the Deferred fires when those posts are done (never fails)."""
        if self._dropped_unlogged:
            log.warn("dropped {n} events since the last flush: the event buffer was full", n=self._dropped_unlogged)  # noqa: G010
            self._dropped_unlogged = 0
        batches, self._batches = self._batches, {}
        diagnostics, self._diagnostics = self._diagnostics, []
        self._queued = 0
        posts: list[Deferred[Any]] = []
        for batch in batches.values():
            body = b"[" + b",".join(p for p in batch.parts if p.strip()) + b"]"
            headers = self._base_headers(batch.env, batch.path)
            if batch.schema:
                headers["X-LaunchDarkly-Event-Schema"] = batch.schema
            if batch.tags:
                headers["X-LaunchDarkly-Tags"] = batch.tags
            posts.append(self._send(batch.path, body, headers))
        for env, path, body, kept in diagnostics:
            headers = self._base_headers(env, path)
            headers.update(kept)
            posts.append(self._send(path, body, headers))
        d = DeferredList(posts, consumeErrors=True) if posts else succeed(None)
        return d.addCallback(lambda _: None)

    def _base_headers(self, env: Environment, path: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": self._user_agent}
        credential = credential_for(env, path)
        if credential:
            headers["Authorization"] = credential
        return headers

    def _send(self, path: str, body: bytes, headers: dict[str, str]) -> Deferred[None]:
        headers["X-LaunchDarkly-Payload-ID"] = self._payload_id()  # the same ID on the retry, as LD's sender
        url = self.base_url + path
        d = Deferred.fromCoroutine(self._deliver(url, path, body, headers))
        self._in_flight.add(d)

        def done(result: Any) -> None:
            self._in_flight.discard(d)

        d.addErrback(lambda f: log.failure("event post to {path} failed unexpectedly", f, path=path))
        d.addBoth(done)
        return d

    async def _deliver(self, url: str, path: str, body: bytes, headers: dict[str, str]) -> None:
        for attempt in (1, 2):
            problem = await self._post_once(url, body, headers)
            if problem is None:
                self.posted += 1
                return
            reason, recoverable = problem
            if not recoverable or attempt == 2 or self._stopping:
                log.warn("event payload to {path} dropped: {reason}", path=path, reason=reason)  # noqa: G010
                self.failed += 1
                return
            log.info("event post to {path} failed ({reason}); retrying in {delay:g}s", path=path, reason=reason,
                     delay=self._retry_delay)
            await deferLater(self._clock, self._retry_delay, lambda: None)

    async def _post_once(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[str, bool] | None:
        """None on success, else (reason, recoverable). ``request_timeout`` covers the response body too."""
        try:
            d = Deferred.fromCoroutine(self._post_and_drain(url, body, headers))
            d.addTimeout(self._request_timeout, self._clock)
            code = await d
        except Exception as e:  # noqa: BLE001 (network failures of any shape are "recoverable")
            return f"{type(e).__name__}", True
        if 200 <= code < 300:
            return None
        return f"HTTP {code}", is_recoverable(code)

    async def _post_and_drain(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        response = await self._http.post(url, data=body, headers=headers)
        await _drain(response)  # read it so the connection can go back to the pool
        return int(response.code)

    # -- service

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._loop = LoopingCall(self.flush)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("event flush loop died", f))

    def stopService(self) -> Deferred[None]:
        """Stop the timer, send what is queued (no retries), then close the pool."""
        super().stopService()
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        d: Deferred[Any] = self.flush()
        pending = list(self._in_flight)
        if pending:
            d = DeferredList([d, *pending], consumeErrors=True)
        if self._pool is not None:
            pool = self._pool
            d.addCallback(lambda _: pool.closeCachedConnections())
        return d.addCallback(lambda _: None)


class _Drainer(_BodyProtocol):
    """Reads and drops a response body; the connection is aborted if the wait is cancelled."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(canceller=lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:  # a TransportProxyProducer: stopProducing drops the connection
            cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.transport = None
        if not self.done.called:
            self.done.callback(None)


def _drain(response: Any) -> Deferred[None]:
    drainer = _Drainer()
    response.deliverBody(drainer)
    return drainer.done


# Headers of an SDK's diagnostic post that are re-sent with it (ld-relay re-posts with the incoming headers).
_DIAGNOSTIC_HEADERS = ("User-Agent", "X-LaunchDarkly-User-Agent", "X-LaunchDarkly-Wrapper",
                       "X-LaunchDarkly-Event-Schema", "X-LaunchDarkly-Tags")
