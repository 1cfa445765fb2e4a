# -*- test-case-name: tests.test_harness_upstream -*-
"""Everything relayd sends to the Harness SaaS (protocols/harness.md sections 3.1 and 4.1, v1 flow).

Per configured server key a :class:`KeySource` authenticates (``POST /client/auth``), learns all hashed SDK keys of
its environment from the projects/environments pass of the admin API that every key shares
(:class:`relayd.harness.directory.AdminDirectory`; ``/admin/apikey`` where that listing is missing or silent about
the environment), pages the admin targets, fetches flags and segments into the store, and then follows the
SaaS ``/stream`` (or polls every ``flag_poll`` when ``stream = false``). Every (re)connect re-fetches everything
and ``Environment.replace`` reports the differences, which the SDK API turns into events: SDK streams stay open
through an outage and converge afterwards (the end of section 2.6 says why relayd does not close them).

:class:`MetricsForwarder` posts the SDK metrics aggregated in a :class:`MetricsBuffer` and replays the targets
SDKs registered; :class:`HarnessUpstream` is the parent service; :func:`export` writes the offline folder.

The HTTP client is treq-like and injected (one persistent pool for API calls, closed in ``stopService``; each
stream uses ``SSEClient``'s own non-persistent pool). Timers run on the injected clock.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random as _random
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import quote, urlencode

from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from relayd import __version__
from relayd.config import HarnessConfig
from relayd.harness.directory import PAGE_SIZE, AdminDirectory, admin_page, page_all
from relayd.harness.directory import key_hashes as directory_key_hashes
from relayd.harness.metrics import MetricsBuffer
from relayd.httpclient import http_client
from relayd.logs import Logger
from relayd.sseclient import (
    ERROR_RESPONSE,
    INVALID_DATA,
    NETWORK_ERROR,
    SSEClient,
    SSEEvent,
    StreamError,
    backoff_delay,
)
from relayd.store import INTERRUPTED, OFF, VALID, Environment, Item, Store

__all__ = [
    "FAMILY",
    "PAGE_SIZE",
    "AdminDirectory",
    "HarnessUpstream",
    "KeySource",
    "MetricsForwarder",
    "SaaSClient",
    "admin_key_hashes",
    "admin_page",
    "decode_jwt_payload",
    "export",
    "sha256_hex",
]

log = Logger()

FAMILY = "harness"
FLAGS, SEGMENTS, TARGETS = "flags", "segments", "targets"
SDK_INFO = f"Proxy {__version__}"  # what the vendor's own relay sends as Harness-SDK-Info (section 3.2)
USER_AGENT = f"relayd/{__version__}"


class HTTPLike(Protocol):
    """What we need from treq: ``treq.client.HTTPClient`` and ``treq.testing.StubTreq`` fit."""

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]: ...


# ---------------------------------------------------------------------------------------------- pure helpers


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def decode_jwt_payload(token: str) -> dict[str, Any]:
    """The claims of a JWT, without verifying it (we trust the SaaS we just authenticated to over TLS)."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (IndexError, ValueError, UnicodeError) as e:
        raise StreamError(INVALID_DATA, f"auth token is not a JWT ({type(e).__name__})") from None
    if not isinstance(claims, dict) or not isinstance(claims.get("environment"), str) or not claims["environment"]:
        raise StreamError(INVALID_DATA, "auth token has no environment claim")
    return claims


def _version(data: Any) -> int:
    v = data.get("version") if isinstance(data, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _keyed(items: Any, id_field: str, what: str) -> dict[str, Any]:
    if items is None:
        return {}
    if not isinstance(items, list):
        raise StreamError(INVALID_DATA, f"{what}: expected a JSON array")
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get(id_field), str) or not item[id_field]:
            raise StreamError(INVALID_DATA, f"{what}: an item has no string {id_field!r}")
        out[item[id_field]] = item
    return out


def merge_newer(current: Mapping[str, Item], fetched: Mapping[str, Any]) -> dict[str, Item]:
    """Fetched items as store items, except where the store already holds a newer version (an event applied while
    the full fetch was in flight must not be rolled back by it)."""
    out: dict[str, Item] = {}
    for key, data in fetched.items():
        new = Item(_version(data), data)
        old = current.get(key)
        out[key] = old if old is not None and old.version > new.version else new
    for key, old in current.items():
        if key not in out and old.deleted:
            out[key] = old  # keep tombstones so a late older upsert cannot resurrect the item
    return out


# ---------------------------------------------------------------------------------------------- HTTP


class SaaSClient:
    """JSON calls to the SaaS with a per-call timeout on the injected clock (treq's own covers only headers and
    uses the global reactor). Non-2xx becomes a StreamError with the status."""

    def __init__(self, http: HTTPLike, clock: IReactorTime, timeout: float = 30.0) -> None:
        self.http = http
        self.clock = clock
        self.timeout = timeout
        self._pending: set[Deferred[Any]] = set()

    def call(self, method: str, url: str, headers: Mapping[str, str], body: Any = None) -> Deferred[Any]:
        d = ensureDeferred(self._call(method, url, headers, body))
        d.addTimeout(self.timeout, self.clock)
        self._pending.add(d)

        def forget(result: Any) -> Any:
            self._pending.discard(d)
            return result
        return d.addBoth(forget).addErrback(self._translate, url)

    def cancel_all(self) -> None:
        """Abort every call in flight (service stop): their connections close instead of lingering."""
        for d in list(self._pending):
            d.cancel()

    async def _call(self, method: str, url: str, headers: Mapping[str, str], body: Any) -> Any:
        hdrs = {"Accept": "application/json", "User-Agent": USER_AGENT, **headers}
        kwargs: dict[str, Any] = {"headers": hdrs}
        if body is not None:
            kwargs["data"] = json.dumps(body, separators=(",", ":")).encode()
            hdrs["Content-Type"] = "application/json"
        response = await self.http.request(method, url, **kwargs)
        content = await response.content()
        code = response.code
        if not 200 <= code < 300:
            raise StreamError(ERROR_RESPONSE, f"HTTP {code} from {_path(url)}", status=code,
                              recoverable=code not in (401, 403))
        if not content.strip():
            return None
        try:
            return json.loads(content)
        except ValueError:
            raise StreamError(INVALID_DATA, f"invalid JSON from {_path(url)}") from None

    @staticmethod
    def _translate(failure: Any, url: str) -> Any:
        if failure.check(StreamError):
            return failure
        if failure.check(DeferTimeout, CancelledError):
            raise StreamError(NETWORK_ERROR, f"no answer from {_path(url)}")
        raise StreamError(NETWORK_ERROR, f"{_path(url)}: {type(failure.value).__name__}: {failure.value}")


def _path(url: str) -> str:
    """A URL for logs: no query (it may hold identifiers we do not want to spread)."""
    return url.split("?", 1)[0]


def _sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred(lambda d: call.cancel() if call.active() else None)
    call = clock.callLater(seconds, d.callback, None)
    return d


def _log_errors(what: str) -> Callable[[Any], None]:
    def errback(failure: Any) -> None:
        if failure.check(StreamError):
            log.warn("{what} failed: {error}", what=what, error=failure.value.message)
        else:
            log.failure("{what} failed", failure, what=what)
    return errback


# ---------------------------------------------------------------------------------------------- fetching


class Fetcher:
    """The SaaS calls of one key: auth, admin paging, flag/segment lists and items. Holds the key's token."""

    def __init__(self, config: HarnessConfig, api_key: str, client: SaaSClient) -> None:
        self.config = config
        self.api_key = api_key
        self.client = client
        self.token = ""
        self.claims: dict[str, Any] = {}

    @property
    def env_id(self) -> str:
        return str(self.claims.get("environment", ""))

    @property
    def cluster(self) -> str:
        return str(self.claims.get("clusterIdentifier") or "1")

    def headers(self) -> dict[str, str]:
        """Section 3.1 item 4 (and 8): what the vendor SDKs send on authenticated calls."""
        h = {"Authorization": f"Bearer {self.token}", "Harness-SDK-Info": SDK_INFO,
             "Harness-EnvironmentID": self.env_id}
        if isinstance(self.claims.get("accountID"), str) and self.claims["accountID"]:
            h["Harness-AccountID"] = self.claims["accountID"]
        return h

    async def authenticate(self) -> dict[str, Any]:
        body = await self.client.call("POST", f"{self.config.config_url}/client/auth", {},
                                      {"apiKey": self.api_key})
        token = body.get("authToken") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise StreamError(INVALID_DATA, "auth answer has no authToken")
        claims = decode_jwt_payload(token)
        self.token, self.claims = token, claims
        return claims

    async def get(self, path: str, query: Mapping[str, str] | None = None, *, reauth: bool = True) -> Any:
        """GET on the client API; a 401 (expired token) re-authenticates once and retries."""
        q = {"cluster": self.cluster, **(query or {})}
        try:
            return await self.client.call("GET", f"{self.config.config_url}{path}?{urlencode(q)}", self.headers())
        except StreamError as e:
            if e.status != 401 or not reauth:
                raise
        log.info("SaaS token of environment {env} refused; authenticating again", env=self.env_id)
        await self.authenticate()
        return await self.get(path, query, reauth=False)

    async def flags(self) -> dict[str, Any]:
        return _keyed(await self.get(f"/client/env/{self.env_id}/feature-configs"), "feature", "feature-configs")

    async def segments(self) -> dict[str, Any]:
        return _keyed(await self.get(f"/client/env/{self.env_id}/target-segments", {"rules": "v2"}),
                      "identifier", "target-segments")

    async def flag(self, identifier: str) -> Any:
        return await self.get(f"/client/env/{self.env_id}/feature-configs/{quote(identifier, safe='')}")

    async def segment(self, identifier: str) -> Any:
        return await self.get(f"/client/env/{self.env_id}/target-segments/{quote(identifier, safe='')}",
                              {"rules": "v2"})

    async def admin_pages(self, path: str, list_field: str) -> list[Any]:
        """Every page of an admin list of this key's environment (section 3.1, the newer parameter names)."""
        q = {"accountIdentifier": self.config.account, "orgIdentifier": self.config.org,
             "projectIdentifier": str(self.claims.get("projectIdentifier", "")),
             "environmentIdentifier": str(self.claims.get("environmentIdentifier", ""))}
        return await page_all(self.client, f"{self.config.admin_url}{path}", q, self.config.admin_token, list_field)

    async def key_hashes(self) -> frozenset[str]:
        """The environment's hashed SDK keys from the v1 ``/admin/apikey`` listing (the fallback)."""
        return directory_key_hashes(await self.admin_pages("/admin/apikey", "apiKeys"))

    async def targets(self) -> dict[str, Any]:
        return _keyed(await self.admin_pages("/admin/targets", "targets"), "identifier", "admin targets")


async def admin_key_hashes(directory: AdminDirectory, fetch: Fetcher) -> frozenset[str]:
    """Every hashed SDK key of the authenticated key's environment: from the shared projects/environments pass, or
    from ``/admin/apikey`` when that pass fails or cannot tell (no projects listing, environment not listed, keys
    only partly embedded). Raises the StreamError of ``/admin/apikey`` when both fail."""
    try:
        found = await directory.hashes_for(fetch.claims)
    except StreamError as e:
        log.warn("admin projects/environments listing not read ({error}); reading /admin/apikey for environment "
                 "{env}", error=e.message, env=fetch.env_id)
        found = None
    if found is not None:
        return found
    return await fetch.key_hashes()


# ---------------------------------------------------------------------------------------------- one key


class KeySource(Service):
    """One configured server key: its environment in the store, kept in sync with the SaaS."""

    def __init__(self, config: HarnessConfig, api_key: str, store: Store, client: SaaSClient,
                 clock: IReactorTime, *, directory: AdminDirectory | None = None, stream_http: Any = None,
                 read_timeout: float = 60.0,
                 initial_delay: float = 1.0, max_delay: float = 30.0, reset_after: float = 60.0,
                 random: Callable[[], float] = _random.random) -> None:
        self.config = config
        self.api_key = api_key
        self.store = store
        self.clock = clock
        self.fetch = Fetcher(config, api_key, client)
        self.directory = directory if directory is not None else AdminDirectory(config, client, clock)
        self.name = f"harness-key-{api_key[-4:]}"
        self.env: Environment | None = None
        self.stream: SSEClient | None = None
        self._stream_http = stream_http
        self._read_timeout = read_timeout
        self._initial_delay, self._max_delay, self._reset_after = initial_delay, max_delay, reset_after
        self._random = random
        self._poll: LoopingCall | None = None
        self._target_poll: LoopingCall | None = None
        self._startup: Deferred[Any] | None = None
        self._syncing: Deferred[Any] | None = None
        self._sync_again = False
        self._sync_targets = False
        self._sync_waiters: list[Deferred[None]] = []
        self._resync_call: IDelayedCall | None = None
        self._resync_failures = 0
        self._reauth_tried = False
        self.off = False
        self.ready: Deferred[None] = Deferred()  # fires after the first full sync (or when the key is off)

    # -- lifecycle

    def startService(self) -> None:
        super().startService()
        self._startup = ensureDeferred(self._start())
        self._startup.addErrback(_log_errors(f"start-up of Harness key ...{self.api_key[-4:]}"))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for d in (self._startup, self._syncing):
            if d is not None and not d.called:
                d.cancel()
        if self._resync_call is not None and self._resync_call.active():
            self._resync_call.cancel()
        for loop in (self._poll, self._target_poll):
            if loop is not None and loop.running:
                loop.stop()
        if self.stream is not None and self.stream.running:
            return self.stream.stopService()
        return succeed(None)

    async def _start(self) -> None:
        """Authenticate and load everything, retrying on the backoff schedule until it works or the key is off."""
        attempt = 0
        while self.running:
            try:
                await self._bootstrap()
                break
            except StreamError as e:
                if not e.recoverable:
                    self._key_off(e)
                    return
                delay = backoff_delay(self._initial_delay, attempt, self._max_delay, self._random())
                attempt += 1
                log.warn("Harness start-up for key ...{key} failed ({error}); retrying in {delay:.1f}s",
                         key=self.api_key[-4:], error=e.message, delay=delay)
                if self.env is not None:
                    self.env.set_status(INTERRUPTED, error_kind=e.kind, error_message=e.message)
                await _sleep(self.clock, delay)
        if not self.running:
            return
        if self.config.stream:
            self.stream = SSEClient(
                self._stream_url, headers=self._stream_headers, on_event=self._on_event,
                on_connect=self._on_connect, on_error=self._on_stream_error, clock=self.clock,
                http=self._stream_http, read_timeout=self._read_timeout, initial_delay=self._initial_delay,
                max_delay=self._max_delay, reset_after=self._reset_after, random=self._random)
            self.stream.startService()
        else:
            self.env.set_status(VALID)  # type: ignore[union-attr]
            self._poll = LoopingCall(self._poll_tick)
            self._poll.clock = self.clock
            self._poll.start(self.config.flag_poll, now=False)
        if self.config.target_poll > 0:
            self._target_poll = LoopingCall(self._target_tick)
            self._target_poll.clock = self.clock
            self._target_poll.start(self.config.target_poll, now=False)
        if not self.ready.called:
            self.ready.callback(None)  # last: whoever waits on it may stop us at once

    async def _bootstrap(self) -> None:
        claims = await self.fetch.authenticate()
        env_id = claims["environment"]
        meta: dict[str, Any] = {"api_keys": (self.api_key,)}
        for field in ("environmentIdentifier", "projectIdentifier"):
            if isinstance(claims.get(field), str):
                meta[field] = claims[field]
        if self.env is None:
            meta["api_key_hashes"] = frozenset({sha256_hex(self.api_key)})
            self.env = self.store.add(FAMILY, env_id, meta)
        else:
            self.store.add(FAMILY, env_id, meta)
        await self.sync(with_targets=self.config.target_poll > 0)

    # -- full sync

    def sync(self, with_targets: bool = False) -> Deferred[None]:
        """Fetch everything and replace the environment's data (the store reports the differences). Calls made
        while one runs coalesce into one more run after it, so a reconnect during a fetch is never missed."""
        d: Deferred[None] = Deferred()
        self._sync_waiters.append(d)
        self._sync_targets = self._sync_targets or with_targets
        if self._syncing is not None:
            self._sync_again = True
        else:
            self._syncing = ensureDeferred(self._sync_loop())
            self._syncing.addBoth(self._sync_done)
        return d

    async def _sync_loop(self) -> None:
        while True:
            self._sync_again = False
            with_targets, self._sync_targets = self._sync_targets, False
            await self._sync(with_targets)
            if not self._sync_again:
                return

    def _sync_done(self, result: Any) -> None:
        self._syncing = None
        waiters, self._sync_waiters = self._sync_waiters, []
        for d in waiters:
            d.callback(None) if not isinstance(result, Failure) else d.errback(result)

    async def _sync(self, with_targets: bool) -> None:
        env = self.env
        assert env is not None
        hashes: frozenset[str] | None
        try:
            hashes = await admin_key_hashes(self.directory, self.fetch)
        except StreamError as e:
            log.warn("admin API key list for environment {env} not read ({error}); SDKs keep using the hashes "
                     "known so far", env=env.id, error=e.message)
            hashes = None
        targets = None
        if with_targets:
            try:
                targets = await self.fetch.targets()
            except StreamError as e:
                log.warn("admin targets of environment {env} not read: {error}", env=env.id, error=e.message)
        flags = await self.fetch.flags()
        segments = await self.fetch.segments()
        if hashes is not None:
            self.store.add(FAMILY, env.id, {"api_key_hashes": hashes | {sha256_hex(self.api_key)}})
        data = {FLAGS: merge_newer(env.items(FLAGS), flags), SEGMENTS: merge_newer(env.items(SEGMENTS), segments)}
        if targets is not None:
            data[TARGETS] = {k: Item(0, v) for k, v in targets.items()}
        change = env.replace(data)
        if change.items:
            log.info("environment {env} re-synced: {n} item(s) differ", env=env.id, n=len(change.items))

    def _schedule_resync(self, error: StreamError) -> None:
        """A change may have been missed (an event's fetch failed): fetch everything again after a backoff."""
        if not self.running or self.off:
            return
        if self._resync_call is not None and self._resync_call.active():
            return
        delay = backoff_delay(self._initial_delay, self._resync_failures, self._max_delay, self._random())
        self._resync_failures += 1
        log.warn("Harness environment {env}: {error}; full re-fetch in {delay:.1f}s", env=self.fetch.env_id,
                 error=error.message, delay=delay)
        self._resync_call = self.clock.callLater(delay, self._resync)

    def _resync(self) -> Deferred[None]:
        self._resync_call = None
        d = self.sync()
        d.addCallbacks(self._synced, self._sync_failed)
        return d

    def _synced(self, _: Any = None) -> None:
        self._resync_failures = 0
        if self.env is not None and not self.off and (self.stream is None or self.stream.state == "connected"):
            self.env.set_status(VALID)

    def _sync_failed(self, failure: Any) -> None:
        if failure.check(StreamError):
            error: StreamError = failure.value
            if error.status in (401, 403):
                self._key_off(error)
                return
            if self.env is not None:
                self.env.set_status(INTERRUPTED, error_kind=error.kind, error_message=error.message)
            self._schedule_resync(error)
            return
        if failure.check(CancelledError):
            return
        log.failure("Harness re-sync failed", failure)
        self._schedule_resync(StreamError(NETWORK_ERROR, "re-sync failed"))

    def _key_off(self, error: StreamError) -> None:
        """The SaaS refuses the key: stop talking to it, keep serving the last data, say so in /health."""
        log.error("Harness SaaS refuses key ...{key} ({error}); the environment is off", key=self.api_key[-4:],
                  error=error.message)
        self.off = True
        if self.env is not None:
            self.env.set_status(OFF, error_kind=ERROR_RESPONSE, error_message=error.message)
        if self.stream is not None and self.stream.running:
            self.stream.stopService()
        for loop in (self._poll, self._target_poll):
            if loop is not None and loop.running:
                loop.stop()
        if not self.ready.called:
            self.ready.callback(None)

    # -- stream

    def _stream_url(self) -> str:
        return f"{self.config.config_url}/stream?cluster={self.fetch.cluster}"

    def _stream_headers(self) -> dict[str, str]:
        return {**self.fetch.headers(), "API-Key": self.api_key, "User-Agent": USER_AGENT}

    def _on_connect(self) -> None:
        self._reauth_tried = False
        # Whatever changed while we were not connected has no event: fetch it all, the store reports the diff.
        if self._resync_call is not None and self._resync_call.active():
            self._resync_call.cancel()
        self._resync()

    def _on_stream_error(self, error: StreamError) -> None:
        if self.env is None:
            return
        if error.status in (401, 403):
            if self._reauth_tried:
                self._key_off(error)
                return
            self._reauth_tried = True
            self.env.set_status(INTERRUPTED, error_kind=error.kind, error_message=error.message)
            d = ensureDeferred(self.fetch.authenticate())
            d.addCallbacks(lambda _: self.stream.restart() if self.stream is not None else None,
                           lambda f: self._key_off(f.value) if f.check(StreamError) and f.value.status in
                           (401, 403) else self._reauth_retry(f))
            return
        self.env.set_status(INTERRUPTED, error_kind=error.kind, error_message=error.message)

    def _reauth_retry(self, failure: Any) -> None:
        """Re-auth after a stream 401 failed for a transient reason: try the stream again later."""
        if not self.running:  # stopped meanwhile (stopService cancelled the re-auth): schedule nothing
            return
        log.warn("re-authentication failed: {error}", error=getattr(failure.value, "message", str(failure.value)))
        self._reauth_tried = False
        delay = backoff_delay(self._initial_delay, 0, self._max_delay, self._random())
        self._resync_call = self.clock.callLater(
            delay, lambda: self.stream.restart() if self.stream is not None and self.running else None)

    def _on_event(self, event: SSEEvent) -> None:
        try:
            msg = json.loads(event.data)
        except ValueError:
            raise StreamError(INVALID_DATA, "stream event is not JSON") from None
        if not isinstance(msg, dict):
            raise StreamError(INVALID_DATA, "stream event is not a JSON object")
        domain, kind, identifier = msg.get("domain"), msg.get("event"), msg.get("identifier")
        if domain not in ("flag", "target-segment"):
            return  # other domains are of no interest to a relay
        if not isinstance(identifier, str) or not identifier or kind not in ("create", "patch", "delete"):
            raise StreamError(INVALID_DATA, "stream event lacks identifier or event")
        version = _version(msg)
        d = ensureDeferred(self._apply_event(domain, kind, identifier, version))
        d.addErrback(self._event_failed)

    async def _apply_event(self, domain: str, kind: str, identifier: str, version: int) -> None:
        env = self.env
        assert env is not None
        store_kind = FLAGS if domain == "flag" else SEGMENTS
        if kind == "delete":
            old = env.item(store_kind, identifier)
            env.delete(store_kind, identifier, max(version, old.version + 1 if old is not None else 0))
            return
        try:
            data = await (self.fetch.flag(identifier) if domain == "flag" else self.fetch.segment(identifier))
        except StreamError as e:
            if e.status == 404:  # gone again before we asked: a delete
                old = env.item(store_kind, identifier)
                if old is not None and not old.deleted:
                    env.delete(store_kind, identifier, max(version, old.version + 1))
                return
            raise
        id_field = "feature" if domain == "flag" else "identifier"
        if not isinstance(data, dict) or data.get(id_field) != identifier:
            raise StreamError(INVALID_DATA, f"{domain} {identifier!r}: unexpected answer")
        env.upsert(store_kind, identifier, _version(data), data)

    def _event_failed(self, failure: Any) -> None:
        if failure.check(CancelledError):
            return
        if failure.check(StreamError) and failure.value.status in (401, 403):
            self._key_off(failure.value)
            return
        error = failure.value if failure.check(StreamError) else StreamError(NETWORK_ERROR, str(failure.value))
        if not failure.check(StreamError):
            log.failure("applying a Harness stream event failed", failure)
        self._schedule_resync(error)

    # -- polling

    def _poll_tick(self) -> Deferred[None]:
        """``stream = false``: the same full fetch and replace every flag_poll; never raises."""
        d = self.sync()
        d.addCallbacks(self._synced, self._poll_failed)
        return d

    def _poll_failed(self, failure: Any) -> None:
        if failure.check(StreamError):
            if failure.value.status in (401, 403):
                self._key_off(failure.value)
            elif self.env is not None:
                self.env.set_status(INTERRUPTED, error_kind=failure.value.kind, error_message=failure.value.message)
            return
        log.failure("Harness flag poll failed", failure)

    def _target_tick(self) -> Deferred[None]:
        d = ensureDeferred(self._poll_targets())
        d.addErrback(_log_errors(f"admin target poll of environment {self.fetch.env_id}"))
        return d

    async def _poll_targets(self) -> None:
        if self.env is None or self.off:
            return
        targets = await self.fetch.targets()
        self.env.replace({TARGETS: {k: Item(0, v) for k, v in targets.items()}})


# ---------------------------------------------------------------------------------------------- metrics


def target_json(target: Any) -> dict[str, Any]:
    """The client-API Target object of an SDK's target (``relayd.harness.evaluate.Target`` or a dict)."""
    if isinstance(target, Mapping):
        return dict(target)
    return {"identifier": target.identifier, "name": target.name, "anonymous": bool(target.anonymous),
            "attributes": dict(target.attributes)}


class MetricsForwarder(Service):
    """Every ``interval``: post each environment's aggregated SDK metrics, and replay registered targets.

    A body is ``take``-n from the buffer before the post and ``restore``-d if the post fails, so it is retried on
    the next tick, merged with what arrived meanwhile: nothing is lost and nothing is counted twice.
    """

    name = "harness-metrics"

    def __init__(self, config: HarnessConfig, buffer: MetricsBuffer, sources: Callable[[], Mapping[str, KeySource]],
                 client: SaaSClient, clock: IReactorTime, *, max_targets: int = 10_000) -> None:
        self.config = config
        self.buffer = buffer
        self.sources = sources
        self.client = client
        self.clock = clock
        self.max_targets = max_targets
        self._targets: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._loop: LoopingCall | None = None
        self.dropped_targets = 0
        self.dropped = 0  # evaluations in bodies the SaaS refused for good

    def register_target(self, env_id: str, target: Mapping[str, Any]) -> None:
        """An SDK authenticated at relayd with this target: register it with the SaaS on the next tick
        (section 3.1 item 6). Bounded; the oldest pending registrations are dropped first."""
        identifier = target.get("identifier")
        if not isinstance(identifier, str) or not identifier:
            return
        key = (env_id, identifier)
        self._targets[key] = dict(target)
        self._targets.move_to_end(key)
        while len(self._targets) > self.max_targets:
            self._targets.popitem(last=False)
            self.dropped_targets += 1

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.config.metric_post, now=False)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def tick(self) -> Deferred[None]:
        """One round; never fails (a LoopingCall whose call fails stops for good)."""
        d = ensureDeferred(self._tick())
        d.addErrback(_log_errors("Harness metrics forwarding"))
        return d

    async def _post_metrics(self, source: KeySource, env_id: str, body: dict[str, Any]) -> None:
        """POST one body with the environment's SaaS token; a refused (expired) token is renewed once."""
        for attempt in (1, 2):
            url = f"{self.config.events_url}/metrics/{quote(env_id, safe='')}?cluster={source.fetch.cluster}"
            try:
                await self.client.call("POST", url, source.fetch.headers(), body)
                return
            except StreamError as e:
                if e.status != 401 or attempt == 2:
                    raise
            log.info("SaaS token of environment {env} refused for metrics; authenticating again", env=env_id)
            await source.fetch.authenticate()

    async def _tick(self) -> None:
        by_env = {s.fetch.env_id: s for s in self.sources().values() if s.fetch.token and not s.off}
        for env_id in self.buffer.environments():
            source = by_env.get(env_id)
            if source is None:
                continue  # not (yet) authenticated: keep it buffered
            body = self.buffer.take(env_id)
            if body is None:
                continue
            try:
                await self._post_metrics(source, env_id, body)
            except StreamError as e:
                if e.status is not None and 400 <= e.status < 500 and e.status not in (401, 408, 429):
                    # refused for good: retrying the same body would block this environment's metrics forever
                    self.dropped += sum(m.get("count", 0) for m in body.get("metricsData", ()))
                    log.error("the SaaS refused the metrics of environment {env} (HTTP {status}); dropped",
                              env=env_id, status=e.status)
                    continue
                self.buffer.restore(env_id, body)
                log.warn("posting metrics of environment {env} failed ({error}); retrying next time", env=env_id,
                         error=e.message or e.kind)
            except Exception as e:  # noqa: BLE001 - network or timeout: put it back for the next tick
                self.buffer.restore(env_id, body)
                log.warn("posting metrics of environment {env} failed ({error}); retrying next time", env=env_id,
                         error=str(e) or type(e).__name__)
        for key, target in list(self._targets.items()):
            env_id = key[0]
            source = by_env.get(env_id)
            if source is None:
                continue
            try:
                await self.client.call("POST", f"{self.config.config_url}/client/auth", {},
                                       {"apiKey": source.api_key, "target": target})
            except Exception as e:  # noqa: BLE001
                log.warn("registering target {t} with the SaaS failed: {error}", t=key[1],
                         error=getattr(e, "message", type(e).__name__))
                if isinstance(e, StreamError) and not e.recoverable:
                    self._targets.pop(key, None)
                continue
            if self._targets.get(key) is target:
                del self._targets[key]


# ---------------------------------------------------------------------------------------------- the service


def make_http(reactor: Any) -> tuple[Any, Any]:
    """A treq client on a persistent pool for API calls, and the pool (closed on stop)."""
    return http_client(reactor)


class HarnessUpstream(MultiService):
    """All SaaS traffic of the Harness family: one KeySource per key, and the metrics forwarder."""

    name = "harness-upstream"

    def __init__(self, config: HarnessConfig, store: Store, reactor: Any, *, metrics: MetricsBuffer | None = None,
                 http: HTTPLike | None = None, stream_http: Any = None, clock: IReactorTime | None = None,
                 timeout: float = 30.0, **stream_options: Any) -> None:
        super().__init__()
        self.config = config
        self.store = store
        self.clock = clock or reactor
        self._pool = None
        if http is None:
            http, self._pool = make_http(reactor)
        self.client = SaaSClient(http, self.clock, timeout)
        self.metrics = metrics if metrics is not None else MetricsBuffer()
        self.directory = AdminDirectory(config, self.client, self.clock)  # one admin pass for all keys
        self.sources: dict[str, KeySource] = {}
        for key in config.api_keys:
            source = KeySource(config, key, store, self.client, self.clock, directory=self.directory,
                               stream_http=stream_http, **stream_options)
            source.setServiceParent(self)
            self.sources[key] = source
        self.forwarder: MetricsForwarder | None = None
        if config.metric_post > 0:
            self.forwarder = MetricsForwarder(config, self.metrics, lambda: self.sources, self.client, self.clock)
            self.forwarder.setServiceParent(self)

    def ready(self) -> bool:
        """Whether every configured key finished its first sync (or was turned off)."""
        return all(source.ready.called for source in self.sources.values())

    def register_target(self, env_id: str, target: Mapping[str, Any]) -> None:
        """Hook for the SDK API: a target an SDK authenticated with (no-op when forwarding is off)."""
        if self.forwarder is not None:
            self.forwarder.register_target(env_id, target)

    def stopService(self) -> Deferred[None]:
        d = super().stopService()
        self.client.cancel_all()
        pool = self._pool
        if pool is not None:
            d.addCallback(lambda _: pool.closeCachedConnections())
        return d


# ---------------------------------------------------------------------------------------------- export


async def fetch_all(config: HarnessConfig, client: SaaSClient) -> dict[str, dict[str, Any]]:
    """Everything the offline folder holds, per environment, from the live SaaS."""
    out: dict[str, dict[str, Any]] = {}
    directory = AdminDirectory(config, client, client.clock)  # the same data, and one pass, as a running relayd
    for key in config.api_keys:
        fetch = Fetcher(config, key, client)
        claims = await fetch.authenticate()
        hashes = await admin_key_hashes(directory, fetch)
        entry = out.setdefault(claims["environment"], {"hashes": set(), "claims": claims})
        entry["hashes"] |= hashes | {sha256_hex(key)}
        entry["flags"] = list((await fetch.flags()).values())
        entry["segments"] = list((await fetch.segments()).values())
        entry["targets"] = list((await fetch.targets()).values())
    return out


def write_offline(folder: Path, data: Mapping[str, Mapping[str, Any]], now: float | None = None) -> Path:
    """Write ``folder/harness/env-<uuid>/...`` atomically: built beside it, then swapped in by renames."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / "harness"
    tmp = folder / f".harness.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    for env_id, entry in data.items():
        d = tmp / f"env-{env_id}"
        d.mkdir()
        files = {"auth_config.json": sorted(entry["hashes"]), "feature_config.json": entry["flags"],
                 "segments.json": entry["segments"], "targets.json": entry["targets"]}
        for name, value in files.items():
            (d / name).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        claims = entry.get("claims", {})
        (d / "README.md").write_text(
            f"# Harness environment {env_id}\n\nenvironment: {claims.get('environmentIdentifier', '')}\n"
            f"project: {claims.get('projectIdentifier', '')}\nflags: {len(entry['flags'])}\n"
            f"segments: {len(entry['segments'])}\ntargets: {len(entry['targets'])}\n"
            f"generated: {stamp} by relayd {__version__}\n", encoding="utf-8")
    old = folder / f".harness.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


async def export(config: HarnessConfig, folder: Path, reactor: Any, http: HTTPLike | None = None,
                 timeout: float = 30.0) -> Path:
    """``twistd relayd --export DIR``: the vendor's GENERATE_OFFLINE_CONFIG. Raises StreamError on failure."""
    pool = None
    if http is None:
        http, pool = make_http(reactor)
    try:
        data = await fetch_all(config, SaaSClient(http, reactor, timeout))
    finally:
        if pool is not None:
            await pool.closeCachedConnections()
    return write_offline(folder, data)
