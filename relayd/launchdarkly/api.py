"""Every inbound LaunchDarkly endpoint (protocol doc section 1): server, mobile and JavaScript SDK routes.

Data comes only from the store (environments of family ``launchdarkly``, kinds ``flags`` and ``segments``);
credentials are resolved through an index rebuilt lazily after a store change, never by scanning per request.
Streams are handed to ``streams.Streams``; analytics payloads to an ``EventSink``. Keys are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import zlib
from collections.abc import Callable, Mapping
from email.utils import formatdate
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from relayd.config import LaunchDarklyConfig
from relayd.launchdarkly.contexts import (
    Context,
    ContextError,
    parse_context,
    secure_mode_hash,
)
from relayd.launchdarkly.evaluate import evaluate_all
from relayd.launchdarkly.events import EventSink
from relayd.launchdarkly.model import canonical_flag, canonical_segment, is_deleted
from relayd.launchdarkly.streams import FAMILY, Streams, live
from relayd.logs import Logger
from relayd.sse import SSEHub
from relayd.store import Change, Environment, Store
from relayd.web import JSON, HTTPError, json_bytes, render_error, respond_json

log = Logger()

TEXT = b"text/plain; charset=utf-8"
UNKNOWN_CREDENTIAL = "Relay Proxy does not recognize the client credential (missing or invalid Authorization header)"
UNKNOWN_ENV_ID = "URL did not contain an environment ID"
CLIENT_NOT_INITIALIZED = "client was not initialized"
NOT_FULLY_INITIALIZED = "Relay Proxy is not yet fully initialized, does not have list of environments yet"
EMPTY_KEY = "User must have a 'key' attribute"
BAD_BASE64 = "context part of URL path did not decode as valid base64"
BAD_PATH_CONTEXT = "context part of URL path did not decode to valid evaluation context as JSON"
SECURE_MODE = "Environment is in secure mode, and context hash does not match."
NOT_INITIALIZED = "Service not initialized"
EVENTS_DISABLED = "Event proxy is not enabled for this environment"
CORS_HEADERS = ("Cache-Control,Content-Type,Content-Length,Accept-Encoding,X-LaunchDarkly-User-Agent,"
                "X-LaunchDarkly-Payload-ID,X-LaunchDarkly-Wrapper,X-LaunchDarkly-Event-Schema,X-LaunchDarkly-Tags")
# The SDK headers an events forwarder needs (1.8); Authorization and Content-Encoding stay behind.
EVENT_HEADERS = ("Content-Type", "User-Agent", "X-LaunchDarkly-Event-Schema", "X-LaunchDarkly-Payload-ID",
                 "X-LaunchDarkly-Tags", "X-LaunchDarkly-User-Agent", "X-LaunchDarkly-Wrapper",
                 "X-LaunchDarkly-Unsummarized", "X-LaunchDarkly-Instance-Id")
GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00"
       b"\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


# ---------------------------------------------------------------------------------------------- credentials

class Credentials:
    """SDK key / mobile key / envId -> environment, rebuilt on first use after any store change."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._index: tuple[dict[str, Environment], dict[str, Environment], dict[str, Environment]] | None = None
        self.builds = 0
        self._unsubscribe = store.subscribe(self._invalidate)

    def _invalidate(self, change: Change) -> None:
        if change.env.family == FAMILY:
            self._index = None

    def _build(self) -> tuple[dict[str, Environment], dict[str, Environment], dict[str, Environment]]:
        if self._index is None:
            sdk: dict[str, Environment] = {}
            mobile: dict[str, Environment] = {}
            env_ids: dict[str, Environment] = {}
            for env in self.store.environments(FAMILY):
                if env.meta.get("init_failed") and not env.initialized:
                    continue  # upstream refused its key before any data: ld-relay answers 401/404
                for key in (env.meta.get("sdk_key"), env.meta.get("expiring_sdk_key")):
                    if key:
                        sdk[key] = env
                if env.meta.get("mobile_key"):
                    mobile[env.meta["mobile_key"]] = env
                if env.meta.get("env_id"):
                    env_ids[env.meta["env_id"]] = env
            self._index = (sdk, mobile, env_ids)
            self.builds += 1
        return self._index

    def by_sdk_key(self, key: str) -> Environment | None:
        return self._build()[0].get(key)

    def by_mobile_key(self, key: str) -> Environment | None:
        return self._build()[1].get(key)

    def by_env_id(self, env_id: str) -> Environment | None:
        return self._build()[2].get(env_id)


def configured_environments(store: Store, config: LaunchDarklyConfig) -> list[Environment]:
    """Create (empty, INITIALIZING) the environments of the ``[launchdarkly "NAME"]`` sections."""
    envs = []
    for c in config.environments:
        envs.append(store.add(FAMILY, c.name, {
            "name": c.name, "sdk_key": c.sdk_key, "mobile_key": c.mobile_key, "env_id": c.env_id,
            "secure_mode": c.secure_mode, "ttl": c.ttl, "allowed_origin": tuple(c.allowed_origin),
            "allowed_header": tuple(c.allowed_header), "client_stream": c.client_stream}))
    return envs


# ---------------------------------------------------------------------------------------------- helpers

def decode_path_context(segment: str) -> Context:
    """A base64url context from the URL path (padded or not), or the documented 400."""
    raw = segment.encode("ascii", "replace")
    try:
        if b"=" not in raw:
            if len(raw) % 4 == 1:
                raise binascii.Error("bad length")
            raw += b"=" * (-len(raw) % 4)
        decoded = base64.b64decode(raw, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, {"message": BAD_BASE64}) from None
    try:
        return parse_context(json.loads(decoded))
    except ContextError as e:
        raise HTTPError(400, {"message": EMPTY_KEY if str(e) == EMPTY_KEY else BAD_PATH_CONTEXT}) from None
    except (ValueError, RecursionError):  # json.loads raises RecursionError on very deep nesting
        raise HTTPError(400, {"message": BAD_PATH_CONTEXT}) from None


def body_context(request: IRequest) -> Context:
    """The context of a REPORT body: exactly ``application/json`` (415 otherwise), then a valid context."""
    if header(request, "content-type") != "application/json":
        raise HTTPError(415, "Content-Type must be application/json.", content_type=TEXT)
    try:
        return parse_context(json.loads(request.content.read()))
    except ContextError as e:
        raise HTTPError(400, {"message": str(e)}) from None
    except ValueError as e:
        raise HTTPError(400, {"message": f"invalid JSON: {e}"}) from None
    except RecursionError:
        raise HTTPError(400, {"message": "invalid JSON: nested too deeply"}) from None


def header(request: IRequest, name: str) -> str | None:
    """A request header as text (twisted.web hands out bytes)."""
    value = request.getHeader(name.encode("ascii"))
    return None if value is None else value.decode("latin-1")


def _arg(request: IRequest, name: bytes) -> str | None:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


def _words(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.replace(",", " ").split() if v)
    return tuple(value)


def etag_matches(request: IRequest, etag: str) -> bool:
    given = header(request, "if-none-match")
    if not given:
        return False
    tags = [t.strip() for t in given.split(",")]
    return etag in tags or "*" in tags or any(t.startswith("W/") and t[2:] == etag for t in tags)


def gunzip(body: bytes, limit: int) -> bytes:
    """A gzip request body, refusing output over ``limit`` bytes (a small bomb must not fill memory)."""
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error:
        raise HTTPError(400, {"message": "body is not valid gzip"}) from None
    if len(out) > limit or d.unconsumed_tail:
        raise HTTPError(400, {"message": f"decompressed body larger than {limit} bytes"})
    if not d.eof:
        raise HTTPError(400, {"message": "body is not valid gzip"})
    return out


def _php_flags(env: Environment) -> tuple[bytes, str]:
    flags = live(env, "flags")
    body = json_bytes({k: canonical_flag(v) for k, v in flags.items()})
    digest = hashlib.sha1(usedforsecurity=False)
    for key in sorted(flags):
        digest.update(f"{key}:{flags[key].get('version', 0)}".encode())
    return body, "relay-" + digest.hexdigest()[:15]


def _polling(kind: str) -> Callable[[Environment], tuple[bytes, str]]:
    def build(env: Environment) -> tuple[bytes, str]:
        flags = {k: canonical_flag(v) for k, v in live(env, "flags").items()} if kind != "segments" else None
        segments = {k: canonical_segment(v) for k, v in live(env, "segments").items()} if kind != "flags" \
            else None
        body = json_bytes({"flags": flags, "segments": segments} if kind == "all"
                          else flags if kind == "flags" else segments)
        return body, '"' + hashlib.sha1(body, usedforsecurity=False).hexdigest()[:20] + '"'
    return build


# ---------------------------------------------------------------------------------------------- the app

class LaunchDarklyAPI:
    """The Klein app of the LaunchDarkly family."""

    app = Klein()
    segments = ("all", "flags", "sdk", "msdk", "meval", "mping", "eval", "ping", "bulk", "diagnostic", "mobile",
                "events", "a")

    def __init__(self, store: Store, hub: SSEHub, clock: IReactorTime, events: EventSink, *,
                 offline: bool = False, max_event_body: int = 10 * 1024 * 1024, goals: Any = None,
                 ready: Callable[[], bool] = lambda: True) -> None:
        self.goals = goals  # a GoalsProxy online, None offline
        self.ready = ready  # False while the environment list is still being loaded (a Redis reader starting)
        self.store = store
        self.hub = hub
        self.clock = clock
        self.events = events
        self.offline = offline
        self.max_event_body = max_event_body
        self.credentials = Credentials(store)
        self.streams = Streams(store, hub)

    def resource(self) -> Any:
        return self.app.resource()

    @app.handle_errors(Exception)
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        return render_error(request, failure)

    # -- credentials

    def _key(self, request: IRequest) -> str:
        """``fetchAuthToken``: raw or ``api_key `` prefixed; empty or spaced -> 401 without a body."""
        if request.method == b"OPTIONS":
            raise HTTPError(405, {"message": "Method Not Allowed", "code": 405})
        value = header(request, "authorization") or ""
        value = value.removeprefix("api_key ")
        value = value.strip()
        if not value or " " in value:
            raise HTTPError(401)
        return value

    def _unknown(self, code: int, message: str) -> HTTPError:
        """An unknown credential; but before the environment list is loaded it may just not be known yet, and
        SDKs give up for good on 401/404 while they retry a 503 (ld-relay's answer before auto-config)."""
        if not self.ready():
            return HTTPError(503, NOT_FULLY_INITIALIZED, content_type=TEXT)
        return HTTPError(code, message, content_type=TEXT)

    @staticmethod
    def _started(env: Environment) -> Environment:
        """ld-relay has no SDK client for an environment during its first init_timeout: 503, SDKs retry."""
        if env.meta.get("init_pending") and not env.initialized:
            raise HTTPError(503, CLIENT_NOT_INITIALIZED, content_type=TEXT)
        return env

    def _sdk_env(self, request: IRequest) -> Environment:
        env = self.credentials.by_sdk_key(self._key(request))
        if env is None:
            raise self._unknown(401, UNKNOWN_CREDENTIAL)
        return self._started(env)

    def _mobile_env(self, request: IRequest) -> Environment:
        env = self.credentials.by_mobile_key(self._key(request))
        if env is None:
            raise self._unknown(401, UNKNOWN_CREDENTIAL)
        return self._started(env)

    def _js_env(self, request: IRequest, env_id: str, methods: str) -> Environment:
        """The environment of a JS route, with the CORS headers of 1.6 already set."""
        env = self.credentials.by_env_id(env_id)
        if env is None:
            raise self._unknown(404, UNKNOWN_ENV_ID)
        self._started(env)
        allowed = _words(env.meta.get("allowed_origin"))
        origin = header(request, "origin")
        if allowed:
            value = origin if origin in allowed else allowed[0]
        else:
            value = origin or "*"
        request.setHeader(b"Access-Control-Allow-Origin", value.encode("utf-8"))
        request.setHeader(b"Access-Control-Allow-Credentials", b"false")
        request.setHeader(b"Access-Control-Max-Age", b"300")
        request.setHeader(b"Access-Control-Expose-Headers", b"Date")
        request.setHeader(b"Access-Control-Allow-Headers",
                          ",".join((CORS_HEADERS, *_words(env.meta.get("allowed_header")))).encode("utf-8"))
        request.setHeader(b"Access-Control-Allow-Methods", methods.encode("ascii"))
        return env

    @staticmethod
    def _require_data(env: Environment) -> None:
        if not env.initialized:
            raise HTTPError(503, {"message": NOT_INITIALIZED})

    @staticmethod
    def _check_secure(request: IRequest, env: Environment, context: Context) -> None:
        if not env.meta.get("secure_mode"):
            return
        given = _arg(request, b"h") or ""
        expected = secure_mode_hash(env.meta.get("sdk_key") or "", context)
        if not hmac.compare_digest(given.encode("utf-8"), expected.encode("ascii")):
            raise HTTPError(400, {"message": SECURE_MODE})

    # -- evalx

    def _evalx(self, request: IRequest, env: Environment, context: Context, client_side: str | None) -> bytes:
        self._require_data(env)
        body = evaluate_all(context, live(env, "flags"), live(env, "segments"),
                            with_reasons=_arg(request, b"withReasons") == "true", client_side=client_side)
        return respond_json(request, body, content_type=JSON)

    @app.route("/sdk/evalx/contexts/<b64>", methods=["GET"])
    @app.route("/sdk/evalx/users/<b64>", methods=["GET"])
    def server_evalx_get(self, request: IRequest, b64: str) -> bytes:
        env = self._sdk_env(request)
        return self._evalx(request, env, decode_path_context(b64), None)

    @app.route("/sdk/evalx/context", methods=["REPORT"])
    @app.route("/sdk/evalx/user", methods=["REPORT"])
    def server_evalx_report(self, request: IRequest) -> bytes:
        env = self._sdk_env(request)
        return self._evalx(request, env, body_context(request), None)

    @app.route("/msdk/evalx/contexts/<b64>", methods=["GET"])
    @app.route("/msdk/evalx/users/<b64>", methods=["GET"])
    def mobile_evalx_get(self, request: IRequest, b64: str) -> bytes:
        env = self._mobile_env(request)
        return self._evalx(request, env, decode_path_context(b64), "mobile")

    @app.route("/msdk/evalx/context", methods=["REPORT"])
    @app.route("/msdk/evalx/user", methods=["REPORT"])
    def mobile_evalx_report(self, request: IRequest) -> bytes:
        env = self._mobile_env(request)
        return self._evalx(request, env, body_context(request), "mobile")

    @app.route("/sdk/evalx/<env_id>/contexts/<b64>", methods=["GET", "OPTIONS"])
    @app.route("/sdk/evalx/<env_id>/users/<b64>", methods=["GET", "OPTIONS"])
    def js_evalx_get(self, request: IRequest, env_id: str, b64: str) -> bytes:
        env = self._js_env(request, env_id, "GET,OPTIONS")
        if request.method == b"OPTIONS":
            return b""
        context = decode_path_context(b64)
        self._check_secure(request, env, context)
        return self._evalx(request, env, context, "js")

    @app.route("/sdk/evalx/<env_id>/context", methods=["REPORT", "OPTIONS"])
    @app.route("/sdk/evalx/<env_id>/user", methods=["REPORT", "OPTIONS"])
    def js_evalx_report(self, request: IRequest, env_id: str) -> bytes:
        env = self._js_env(request, env_id, "REPORT,OPTIONS")
        if request.method == b"OPTIONS":
            return b""
        context = body_context(request)
        self._check_secure(request, env, context)
        return self._evalx(request, env, context, "js")

    @app.route("/sdk/goals/<env_id>", methods=["GET", "OPTIONS"])
    def js_goals(self, request: IRequest, env_id: str) -> bytes | Deferred[bytes]:
        self._js_env(request, env_id, "GET,OPTIONS")
        if request.method == b"OPTIONS":
            return b""
        if self.goals is None:  # offline: there are no goals
            return respond_json(request, [], content_type=JSON)
        return ensureDeferred(self.goals.fetch(env_id)).addCallback(
            lambda answer: respond_json(request, answer[1], answer[0], content_type=JSON))

    # -- server-side streams and polling

    @app.route("/all", methods=["GET"])
    def stream_all(self, request: IRequest) -> Deferred[None]:
        return self.streams.server(request, self._sdk_env(request), legacy=False)

    @app.route("/flags", methods=["GET"])
    def stream_flags(self, request: IRequest) -> Deferred[None]:
        return self.streams.server(request, self._sdk_env(request), legacy=True)

    def _cacheable(self, request: IRequest, env: Environment, body: bytes, etag: str) -> bytes:
        request.setHeader(b"ETag", etag.encode("utf-8"))
        ttl = env.meta.get("ttl") or 0
        if ttl > 0:
            request.setHeader(b"Vary", b"Authorization")
            request.setHeader(b"Expires", formatdate(self.clock.seconds() + ttl, usegmt=True).encode("ascii"))
        if etag_matches(request, etag):
            request.setResponseCode(304)
            return b""
        return respond_json(request, body, content_type=JSON)

    @app.route("/sdk/flags", methods=["GET"])
    def php_flags(self, request: IRequest) -> bytes:
        env = self._sdk_env(request)
        self._require_data(env)
        body, etag = env.memo("ld-php-flags", lambda: _php_flags(env))
        return self._cacheable(request, env, body, etag)

    @app.route("/sdk/flags/<key>", methods=["GET"])
    def php_flag(self, request: IRequest, key: str) -> bytes:
        return self._php_item(request, "flags", key)

    @app.route("/sdk/segments/<key>", methods=["GET"])
    def php_segment(self, request: IRequest, key: str) -> bytes:
        return self._php_item(request, "segments", key)

    def _php_item(self, request: IRequest, kind: str, key: str) -> bytes:
        env = self._sdk_env(request)
        self._require_data(env)
        item = env.get(kind, key)
        if not isinstance(item, dict) or is_deleted(item):
            raise HTTPError(404, {"message": f"{kind[:-1]} not found", "code": 404})
        canonical = canonical_flag(item) if kind == "flags" else canonical_segment(item)
        return self._cacheable(request, env, json_bytes(canonical), f"relay-{canonical.get('version', 0)}")

    @app.route("/sdk/latest-all", methods=["GET"])
    def latest_all(self, request: IRequest) -> bytes:
        return self._latest(request, "all")

    @app.route("/sdk/latest-flags", methods=["GET"])
    def latest_flags(self, request: IRequest) -> bytes:
        return self._latest(request, "flags")

    @app.route("/sdk/latest-segments", methods=["GET"])
    def latest_segments(self, request: IRequest) -> bytes:
        return self._latest(request, "segments")

    def _latest(self, request: IRequest, kind: str) -> bytes:
        """The vendor's polling endpoints (ld-relay lacks them): full data with an ETag, 304 when unchanged."""
        env = self._sdk_env(request)
        self._require_data(env)
        body, etag = env.memo(("ld-latest", kind), lambda: _polling(kind)(env))
        request.setHeader(b"ETag", etag.encode("utf-8"))
        if etag_matches(request, etag):
            request.setResponseCode(304)
            return b""
        return respond_json(request, body, content_type=JSON)

    # -- client-side streams

    def _with_reasons(self, request: IRequest) -> bool:
        return _arg(request, b"withReasons") == "true"

    @app.route("/meval/<b64>", methods=["GET"])
    def mobile_stream_get(self, request: IRequest, b64: str) -> Deferred[None]:
        env = self._mobile_env(request)
        return self.streams.client(request, env, decode_path_context(b64), self._with_reasons(request), "mobile")

    @app.route("/meval", methods=["REPORT"])
    def mobile_stream_report(self, request: IRequest) -> Deferred[None]:
        env = self._mobile_env(request)
        return self.streams.client(request, env, body_context(request), self._with_reasons(request), "mobile")

    @app.route("/mping", methods=["GET"])
    def mobile_ping(self, request: IRequest) -> Deferred[None]:
        return self.streams.ping(request, self._mobile_env(request))

    @app.route("/eval/<env_id>/<b64>", methods=["GET", "OPTIONS"])
    def js_stream_get(self, request: IRequest, env_id: str, b64: str) -> Deferred[None] | bytes:
        env = self._js_env(request, env_id, "GET,OPTIONS")
        if request.method == b"OPTIONS":
            return b""
        context = decode_path_context(b64)
        self._check_secure(request, env, context)
        return self.streams.client(request, env, context, self._with_reasons(request), "js")

    @app.route("/eval/<env_id>", methods=["REPORT", "OPTIONS"])
    def js_stream_report(self, request: IRequest, env_id: str) -> Deferred[None] | bytes:
        env = self._js_env(request, env_id, "REPORT,OPTIONS")
        if request.method == b"OPTIONS":
            return b""
        context = body_context(request)
        self._check_secure(request, env, context)
        return self.streams.client(request, env, context, self._with_reasons(request), "js")

    @app.route("/ping/<env_id>", methods=["GET", "OPTIONS"])
    def js_ping(self, request: IRequest, env_id: str) -> Deferred[None] | bytes:
        env = self._js_env(request, env_id, "GET,OPTIONS")
        if request.method == b"OPTIONS":
            return b""
        return self.streams.ping(request, env)

    # -- events

    def _accept(self, request: IRequest, env: Environment, path: str, body: bytes | None = None,
                extra: Mapping[str, str] | None = None) -> None:
        if not self.events.enabled(env):
            raise HTTPError(503, {"message": EVENTS_DISABLED})
        if body is None:
            body = request.content.read()
            if body and "gzip" in (header(request, "content-encoding") or "").lower():
                body = gunzip(body, self.max_event_body)
        if not body.strip():
            raise HTTPError(400, {"message": "body may not be empty"})
        headers = {name: value for name in EVENT_HEADERS
                   if (value := header(request, name)) is not None}
        headers.update(extra or {})
        try:
            self.events.accept(env, path, body, headers)
        except Exception:
            log.failure("the event sink failed on a payload for {path}", path=path)

    def _events(self, request: IRequest, env: Environment, path: str) -> bytes:
        self._accept(request, env, path)
        request.setResponseCode(202)
        return b""

    @app.route("/bulk", methods=["POST"])
    def server_bulk(self, request: IRequest) -> bytes:
        return self._events(request, self._sdk_env(request), "/bulk")

    @app.route("/diagnostic", methods=["POST"])
    def server_diagnostic(self, request: IRequest) -> bytes:
        return self._events(request, self._sdk_env(request), "/diagnostic")

    @app.route("/mobile", methods=["POST"])
    @app.route("/mobile/events", methods=["POST"])
    @app.route("/mobile/events/bulk", methods=["POST"])
    def mobile_bulk(self, request: IRequest) -> bytes:
        return self._events(request, self._mobile_env(request), "/mobile")

    @app.route("/mobile/events/diagnostic", methods=["POST"])
    def mobile_diagnostic(self, request: IRequest) -> bytes:
        return self._events(request, self._mobile_env(request), "/mobile/events/diagnostic")

    @app.route("/events/bulk/<env_id>", methods=["POST", "OPTIONS"])
    def js_bulk(self, request: IRequest, env_id: str) -> bytes:
        env = self._js_env(request, env_id, "POST,OPTIONS")
        if request.method == b"OPTIONS":
            return b""
        return self._events(request, env, f"/events/bulk/{env_id}")

    @app.route("/events/diagnostic/<env_id>", methods=["POST", "OPTIONS"])
    def js_diagnostic(self, request: IRequest, env_id: str) -> bytes:
        env = self._js_env(request, env_id, "POST,OPTIONS")
        if request.method == b"OPTIONS":
            return b""
        return self._events(request, env, f"/events/diagnostic/{env_id}")

    @app.route("/a/<env_id>.gif", methods=["GET", "OPTIONS"])
    def js_gif(self, request: IRequest, env_id: str) -> bytes:
        """The image-pixel event transport: ``d`` = base64 of a JSON array of events, fed with schema 3."""
        env = self._js_env(request, env_id, "GET,OPTIONS")
        if request.method == b"OPTIONS":
            return b""
        data = _arg(request, b"d")
        if data:
            try:
                body = base64.b64decode(data + "=" * (-len(data) % 4), altchars=b"-_" if "-" in data or "_" in data
                                        else None)
                json.loads(body)
            except (binascii.Error, ValueError, RecursionError):
                body = b""
            if body and self.events.enabled(env):
                self._accept(request, env, f"/events/bulk/{env_id}", body, {"X-LaunchDarkly-Event-Schema": "3"})
        request.setHeader(b"Content-Type", b"image/gif")
        return GIF
