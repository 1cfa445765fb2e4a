# -*- test-case-name: tests.test_ld_upstream -*-
"""One LaunchDarkly upstream stream per configured environment: ``GET {stream_url}/all`` into the store.

This is what ld-relay's per-environment Go SDK client does (protocol doc section 4.1): stream ``put`` /
``patch`` / ``delete`` into the environment's data, report the data-source state (``INITIALIZING`` until the
first answer, ``VALID``, ``INTERRUPTED`` with an error kind on a recoverable failure, ``OFF`` after an
unrecoverable 4xx), and keep retrying with the eventsource backoff. The reconnect machinery itself is
:class:`relayd.sseclient.SSEClient`.

What the SDK-facing API reads from ``Environment.meta`` (besides the configured keys) to answer requests for an
environment without data, as section 1.1 / 4.1 describe:

* ``init_pending`` True: inside the first ``init_timeout`` after start and no data yet -> ld-relay has no SDK
  client object yet: 503 ``client was not initialized``.
* ``init_failed`` True: the upstream refused the SDK key (401/403 or another unrecoverable 4xx) before any data
  arrived (``ErrInitializationFailed``) -> treat the credential as unknown: 401 (404 for JS envId routes).
* neither, and ``env.initialized`` False: init timed out and the stream keeps retrying in the background ->
  streams are accepted and wait for data, evalx answers 503 ``Service not initialized``.
"""

from __future__ import annotations

import json
import random as _random
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from relayd import __version__
from relayd.config import LaunchDarklyConfig, LaunchDarklyEnvConfig
from relayd.httpclient import http_client
from relayd.launchdarkly.model import as_int, is_deleted
from relayd.logs import Logger
from relayd.sseclient import (
    INVALID_DATA,
    HTTPClientLike,
    SSEClient,
    SSEEvent,
    StreamError,
)
from relayd.store import INTERRUPTED, OFF, VALID, Environment, Item, Store

__all__ = ["FAMILY", "KINDS", "USER_AGENT", "EnvironmentStream", "environment_for", "parse_event"]

log = Logger()

FAMILY = "launchdarkly"
KINDS = ("flags", "segments")
USER_AGENT = f"relayd/{__version__} LDRelay/{__version__}"


# ---------------------------------------------------------------------------------------------- pure parts

def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StreamError(INVALID_DATA, f"{what} is not a JSON object")
    return value


def _item(value: Any, what: str) -> Item:
    obj = _object(value, what)
    version = as_int(obj.get("version")) or 0
    return Item(version, None if is_deleted(obj) else obj)


def _split_path(path: Any) -> tuple[str, str] | None:
    """``/flags/KEY`` -> ("flags", "KEY"); other paths (unknown kinds) -> None, ignored like the Go SDK does."""
    if not isinstance(path, str):
        raise StreamError(INVALID_DATA, "missing path")
    for kind in KINDS:
        prefix = f"/{kind}/"
        if path.startswith(prefix) and len(path) > len(prefix):
            return kind, path[len(prefix):]
    return None


def parse_event(event: SSEEvent) -> tuple[str, Any] | None:
    """Decode one ``/all`` stream event; pure, raises :class:`StreamError` (``INVALID_DATA``) on bad data.

    Returns ``("put", {kind: {key: Item}})``, ``("patch", (kind, key, Item))``, ``("delete", (kind, key,
    version))``, or None for events this relay ignores (unknown event types or paths).
    """
    if event.event not in ("put", "patch", "delete"):
        return None
    try:
        doc = json.loads(event.data)
    except json.JSONDecodeError as e:
        raise StreamError(INVALID_DATA, f"malformed JSON in {event.event} event: {e.msg}") from None
    doc = _object(doc, f"{event.event} event")
    if event.event == "put":
        path = doc.get("path", "/")
        if path not in ("/", ""):
            return None
        data = _object(doc.get("data"), "put data")
        kinds: dict[str, dict[str, Item]] = {}
        for kind in KINDS:
            raw = data.get(kind)
            items = {} if raw is None else _object(raw, f"put {kind}")
            kinds[kind] = {key: _item(value, f"{kind}/{key}") for key, value in items.items()}
        return "put", kinds
    where = _split_path(doc.get("path"))
    if where is None:
        return None
    kind, key = where
    if event.event == "patch":
        return "patch", (kind, key, _item(doc.get("data"), f"patch of {kind}/{key}"))
    version = as_int(doc.get("version"))
    if version is None:
        raise StreamError(INVALID_DATA, f"delete of {kind}/{key} without a version")
    return "delete", (kind, key, version)


def environment_for(store: Store, config: LaunchDarklyEnvConfig) -> Environment:
    """The store environment of a ``[launchdarkly "NAME"]`` section, created if missing.

    The store id is the section name, as the SDK API's ``configured_environments`` and the snapshot matching
    use; an environment carrying that name under another id (e.g. one created with id = ``env_id``) is reused
    rather than duplicated. The configured values are merged into its meta (a ``meta`` store change if any
    differ, so the API's credential indexes follow).
    """
    meta = {
        "name": config.name,
        "sdk_key": config.sdk_key,
        "mobile_key": config.mobile_key,
        "env_id": config.env_id,
        "secure_mode": config.secure_mode,
        "allowed_origin": tuple(config.allowed_origin),
        "allowed_header": tuple(config.allowed_header),
        "ttl": config.ttl,
        "client_stream": config.client_stream,
    }
    env = store.environment(FAMILY, config.name)
    if env is None:
        env = next((e for e in store.environments(FAMILY) if e.meta.get("name") == config.name), None)
    if env is None:
        return store.add(FAMILY, config.name, meta)
    env.update_meta(meta)
    return env


# ---------------------------------------------------------------------------------------------- service

class EnvironmentStream(Service):
    """The upstream ``/all`` stream of one LaunchDarkly environment, writing into the store.

    ``ready()`` fires with True on the first data, False when initialization ends without data (unrecoverable
    error, or ``init_timeout`` passed: the stream then keeps retrying in the background). ``first_data()``
    fires only on the first data, however long that takes.
    """

    def __init__(
        self,
        store: Store,
        env_config: LaunchDarklyEnvConfig,
        config: LaunchDarklyConfig,
        *,
        clock: IReactorTime,
        http: HTTPClientLike | None = None,
        read_timeout: float = 300.0,
        initial_delay: float = 1.0,
        max_delay: float = 30.0,
        reset_after: float = 60.0,
        random: Callable[[], float] = _random.random,
        user_agent: str = USER_AGENT,
    ) -> None:
        self.env = environment_for(store, env_config)
        self.name = f"launchdarkly upstream {env_config.name}"
        self._sdk_key = env_config.sdk_key
        self._clock = clock
        self._init_timeout = config.init_timeout
        self._user_agent = user_agent
        self.url = config.stream_url.rstrip("/") + "/all"
        self._init_call: IDelayedCall | None = None
        self._ready: list[Deferred[bool]] = []
        self._first: list[Deferred[None]] = []
        self._init_result: bool | None = True if self.env.initialized else None
        self.client = SSEClient(
            self.url,
            headers=self._headers,
            on_event=self._on_event,
            on_error=self._on_error,
            clock=clock,
            http=http,
            read_timeout=read_timeout,
            initial_delay=initial_delay,
            max_delay=max_delay,
            reset_after=reset_after,
            random=random,
        )

    # -- public

    def ready(self) -> Deferred[bool]:
        """Fires when initialization is over: True with data, False without (failed or timed out)."""
        if self._init_result is not None:
            return succeed(self._init_result)
        d: Deferred[bool] = Deferred(lambda d: self._ready.remove(d) if d in self._ready else None)
        self._ready.append(d)
        return d

    def first_data(self) -> Deferred[None]:
        """Fires once the environment has data."""
        if self.env.initialized:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._first.remove(d) if d in self._first else None)
        self._first.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        self.env.meta.pop("init_failed", None)
        if not self.env.initialized:
            self._init_result = None
            self.env.meta["init_pending"] = True
            self._init_call = self._clock.callLater(self._init_timeout, self._init_timed_out)
        self.client.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._cancel_init_timer()
        self.env.meta.pop("init_pending", None)
        return self.client.stopService()

    # -- callbacks

    def _headers(self) -> Mapping[str, str]:
        return {"Authorization": self._sdk_key, "User-Agent": self._user_agent}

    def _on_event(self, event: SSEEvent) -> None:
        parsed = parse_event(event)
        if parsed is None:
            log.debug("ignoring {event} event from the LaunchDarkly stream", event=event.event)
            return
        op, value = parsed
        env = self.env
        if op == "put":
            change = env.replace(value)
            log.info("{name}: received full data set ({flags} flags, {segments} segments, {n} changed)",
                     name=env.meta.get("name"), flags=len(value["flags"]), segments=len(value["segments"]),
                     n=len(change.items))
        elif op == "patch":
            kind, key, item = value
            if item.deleted:
                env.delete(kind, key, item.version)
            else:
                env.upsert(kind, key, item.version, item.data)
        else:
            kind, key, version = value
            env.delete(kind, key, version)
        if env.initialized:
            env.set_status(VALID)
            self._init_over(True)

    def _on_error(self, error: StreamError) -> None:
        env = self.env
        name = env.meta.get("name")
        if not error.recoverable:
            if error.status in (401, 403):
                log.error("{name}: LaunchDarkly rejected the SDK key (HTTP {status}); not retrying", name=name,
                          status=error.status)
            env.set_status(OFF, error_kind=error.kind, error_message=error.message)
            if not env.initialized:
                env.meta["init_failed"] = True
                self._init_over(False)
            return
        # protocols/launchdarkly.md 4.1: a recoverable failure is INTERRUPTED, before the first data too (the Go
        # SDK would keep INITIALIZING there; /status says "disconnected" either way until data arrives).
        env.set_status(INTERRUPTED, error_kind=error.kind, error_message=error.message)

    # -- initialization

    def _init_timed_out(self) -> None:
        self._init_call = None
        if not self.env.initialized:
            log.warn("{name}: no data from LaunchDarkly within {t:g}s; still trying in the background",  # noqa: G010
                     name=self.env.meta.get("name"), t=self._init_timeout)
            self._init_over(False)

    def _cancel_init_timer(self) -> None:
        if self._init_call is not None and self._init_call.active():
            self._init_call.cancel()
        self._init_call = None

    def _init_over(self, success: bool) -> None:
        self.env.meta.pop("init_pending", None)
        if success:
            self.env.meta.pop("init_failed", None)
            first, self._first = self._first, []
            for d in first:
                d.callback(None)
        if self._init_result is not None:
            return
        self._init_result = success
        self._cancel_init_timer()
        waiting, self._ready = self._ready, []
        for waiter in waiting:
            waiter.callback(success)


class GoalsProxy:
    """``/sdk/goals/{envId}`` for the JavaScript SDK: fetched from ``client_side_base_url`` as ld-relay proxies it.

    Answers are cached for ``ttl`` per environment, and concurrent requests for one environment share one
    upstream fetch, so a page-load herd makes one upstream request; ``timeout`` (on the injected clock) covers
    the whole fetch, body included. When the vendor cannot be reached the last answer is served, or 503 when
    there is none.
    """

    def __init__(self, base_url: str, *, clock: IReactorTime, http: Any = None, ttl: float = 60.0,
                 timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.clock = clock
        self.ttl = ttl
        self.timeout = timeout
        if http is None:
            http, _ = http_client(clock)
        self.http = http
        self._cache: dict[str, tuple[float, int, bytes]] = {}
        self._waiting: dict[str, list[Deferred[tuple[int, bytes]]]] = {}

    async def fetch(self, env_id: str) -> tuple[int, bytes]:
        cached = self._cache.get(env_id)
        if cached is not None and self.clock.seconds() - cached[0] < self.ttl:
            return cached[1], cached[2]
        answer: Deferred[tuple[int, bytes]] = Deferred()
        waiting = self._waiting.get(env_id)
        if waiting is not None:
            waiting.append(answer)
        else:
            self._waiting[env_id] = [answer]
            run = Deferred.fromCoroutine(self._fetch(env_id))
            run.addTimeout(self.timeout, self.clock)
            run.addBoth(self._answer, env_id)
        return await answer

    async def _fetch(self, env_id: str) -> tuple[int, bytes]:
        response = await self.http.get(f"{self.base_url}/sdk/goals/{env_id}", headers={"User-Agent": USER_AGENT})
        body = await response.content()
        return int(response.code), body

    def _answer(self, result: tuple[int, bytes] | Failure, env_id: str) -> None:
        cached = self._cache.get(env_id)
        if isinstance(result, Failure):  # network or timeout: serve the last answer rather than fail the page
            error = result.value
            log.warn("goals for {env} not fetched: {error}", env=env_id,  # noqa: G010
                     error=str(error) or type(error).__name__)
            if cached is not None:
                result = cached[1], cached[2]
            else:
                result = 503, b'{"message":"goals are not available from LaunchDarkly right now"}'
        elif result[0] == 200:
            self._cache[env_id] = (self.clock.seconds(), result[0], result[1])
        for waiter in self._waiting.pop(env_id, []):
            waiter.callback(result)
