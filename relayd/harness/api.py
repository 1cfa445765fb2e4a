"""The Harness SDK API: ``/client/auth``, flags and segments, client evaluations, ``/stream`` and ``/metrics``.

Everything is read from the store (family ``harness``; kinds ``flags`` keyed by feature, ``segments`` and
``targets`` keyed by identifier; the SHA-256 hex of the environment's SDK keys in ``meta["api_key_hashes"]``), so
the same routes serve offline data, the vendor's data and a shared cache alike. Routes, statuses and bodies follow
protocols/harness.md section 2 (the v2 relay), with relayd's 400 instead of 500 for malformed JSON and a 400 for a
``Harness-Target`` header that cannot be decoded. Lists are serialized once per environment revision, the key
index is rebuilt only after a store change, and each flag or segment change is encoded once and written to every
stream of its environment. Keys and tokens are never logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import HTTPException

from relayd import sse
from relayd.harness import tokens
from relayd.harness.evaluate import (
    Target,
    evaluate_all,
    evaluation_json,
    unserved_reason,
)
from relayd.harness.metrics import MetricsBuffer
from relayd.logs import Logger
from relayd.sse import SSEHub
from relayd.store import Change, Environment, Store
from relayd.web import JSON_UTF8, HTTPError, json_bytes, render_error

log = Logger()

FAMILY = "harness"
FLAGS, SEGMENTS, TARGETS = "flags", "segments", "targets"
_DOMAINS = {FLAGS: "flag", SEGMENTS: "target-segment"}

_IDENTIFIER = re.compile(r"^[A-Za-z0-9.@_-]*$")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,200}$")
_CORS = ((b"Access-Control-Allow-Origin", b"*"),
         (b"Access-Control-Allow-Methods", b"GET,OPTIONS,POST"),
         (b"Access-Control-Allow-Headers", b"*,Authorization"))
_NOT_FOUND = {"error": "not found: cache: not found"}
_REASONS = {404: "Not Found", 405: "Method Not Allowed"}


def _body(obj: Any) -> bytes:
    """What the vendor's Go JSON encoder writes: compact JSON and a newline."""
    return json_bytes(obj) + b"\n"


def _fail(code: int, obj: Any) -> HTTPError:
    return HTTPError(code, _body(obj), content_type=JSON_UTF8)


def _ok(request: IRequest, body: bytes) -> bytes:
    request.setResponseCode(200)
    request.setHeader(b"Content-Type", JSON_UTF8)
    return body


def _query(request: IRequest) -> dict[str, str]:
    """Query parameters with ``;`` accepted as a separator (the v2 relay's AllowQuerySemicolons); first wins."""
    _, _, raw = request.uri.partition(b"?")
    out: dict[str, str] = {}
    for k, v in parse_qsl(raw.replace(b";", b"&").decode("utf-8", "replace"), keep_blank_values=True):
        out.setdefault(k, v)
    return out


def _loads(raw: bytes) -> Any:
    """JSON from a client; ValueError (for a 400) for anything undecodable, including nesting deeper than the
    decoder's recursion limit, which would otherwise escape as a RecursionError and answer 500."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _valid_name(name: str) -> bool:
    """``^[\\p{L}\\d .@_-]*$`` of the v2 relay (Go's ``\\d`` is ASCII)."""
    return all(c.isalpha() or c in "0123456789 .@_-" for c in name)


def segment_view(segment: Mapping[str, Any], v2: bool) -> Mapping[str, Any]:
    """A segment as served: ``servingRules`` for ``rules=v2`` when it has them, else legacy ``rules`` (synthesized
    from the first clause of each serving rule when it has only serving rules)."""
    serving = segment.get("servingRules")
    if v2 and serving:
        return {k: v for k, v in segment.items() if k != "rules"}
    out = {k: v for k, v in segment.items() if k != "servingRules"}
    if serving and not segment.get("rules"):
        out["rules"] = [r["clauses"][0] for r in serving
                        if isinstance(r, Mapping) and isinstance(r.get("clauses"), list) and r["clauses"]]
    return out


class _Front(Resource):
    """What every Harness response carries (X-Request-Id, CORS), and the CORS preflight, before Klein routes."""

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: IRequest) -> Any:
        given = request.getHeader(b"x-request-id")
        valid = given is not None and _REQUEST_ID.match(given.decode("latin-1"))
        request.setHeader(b"X-Request-Id", given if valid else str(uuid.uuid4()).encode("ascii"))
        for name, value in _CORS:
            request.setHeader(name, value)
        if request.method == b"OPTIONS":
            request.setResponseCode(204)
            return b""
        return self._inner.render(request)


class HarnessAPI:
    """The inbound API of Harness SDKs, on one store and one SSE hub."""

    app = Klein()
    segments = ("client", "stream", "metrics")

    def __init__(self, store: Store, hub: SSEHub, clock: IReactorTime, secret: bytes,
                 metrics: MetricsBuffer | None = None, target_cache_size: int = 10_000,
                 on_target: Callable[[str, Target], None] | None = None,
                 prometheus_text: Callable[[], bytes] | None = None,
                 ready: Callable[[], bool] = lambda: True) -> None:
        self.ready = ready  # False until the upstream's first sync: unknown keys then get 503, not 401
        self.on_target = on_target  # told of every target an SDK authenticates with (forwarded to the SaaS)
        self.prometheus_text = prometheus_text  # GET /metrics
        self.store = store
        self.hub = hub
        self.clock = clock
        self.metrics = metrics if metrics is not None else MetricsBuffer()
        self.target_cache_size = target_cache_size
        self._secret = secret
        self._key_index: dict[str, str] | None = None
        self._targets: dict[str, OrderedDict[str, Target]] = {}
        self.unsubscribe: Callable[[], None] = store.subscribe(self._on_change)

    def resource(self) -> IResource:
        return _Front(self.app.resource())

    # ------------------------------------------------------------------------------------------ store side

    def environment_for_key(self, hashed_key: str) -> Environment | None:
        """The environment whose SDK keys include ``hashed_key``, from an index rebuilt once per key change."""
        if self._key_index is None:
            index: dict[str, str] = {}
            for each in self.store.environments(FAMILY):
                for h in each.meta.get("api_key_hashes") or ():
                    index.setdefault(h, each.id)
            self._key_index = index
        env_id = self._key_index.get(hashed_key)
        env = self.store.environment(FAMILY, env_id) if env_id is not None else None
        if env is None or hashed_key not in (env.meta.get("api_key_hashes") or ()):
            return None
        return env

    def _on_change(self, change: Change) -> None:
        env = change.env
        if env.family != FAMILY:
            return
        topic = (FAMILY, env.id)
        if change.op in ("add", "remove", "meta"):
            self._key_index = None
        if change.op == "remove":
            self._targets.pop(env.id, None)
            self.hub.close_topic(topic)
            return
        if change.op == "meta":
            keys = env.meta.get("api_key_hashes") or ()
            for sub in self.hub.subscribers(topic):
                if sub.info not in keys:  # its key was revoked: end the stream as the vendor does
                    self.hub.close(sub)
            return
        if not change.items or not self.hub.count(topic):
            return
        for item in change.items:
            domain = _DOMAINS.get(item.kind)
            if domain is None:
                continue
            if item.new.deleted:
                event = "delete"
            elif item.old is None or item.old.deleted:
                event = "create"
            else:
                event = "patch"
            data = json_bytes({"event": event, "domain": domain, "identifier": item.key,
                               "version": item.new.version}).decode("utf-8")
            self.hub.publish(topic, sse.encode(data, event="*"))

    # ------------------------------------------------------------------------------------------ auth helpers

    def _claims(self, request: IRequest) -> tokens.Claims:
        """The verified claims of the request's bearer token whose key is still valid; 401 otherwise."""
        header = request.getHeader(b"authorization")
        if header is None or header[:7].lower() != b"bearer " or not header[7:].strip():
            raise _fail(401, {"message": "missing or malformed jwt"})
        try:
            claims = tokens.verify(self._secret, header[7:].strip().decode("ascii"), now=self.clock.seconds())
        except (tokens.TokenError, UnicodeDecodeError):
            raise _fail(401, {"message": "invalid or expired jwt"}) from None
        env = self.store.environment(FAMILY, claims.environment)
        if env is None or claims.key_hash not in (env.meta.get("api_key_hashes") or ()):
            raise _fail(401, {"message": "invalid or expired jwt"})  # the key was revoked
        return claims

    def _environment(self, request: IRequest, env_id: str) -> Environment | None:
        """Check the token and that it is for ``env_id``; the environment, or None if unknown."""
        claims = self._claims(request)
        if claims.environment != env_id:
            raise _fail(401, {"message": f"Environment ID [{claims.environment}] mismatch with requested {env_id}"})
        return self.store.environment(FAMILY, env_id)

    # ------------------------------------------------------------------------------------------ routes

    @app.handle_errors(Exception)
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        err = failure.value
        if isinstance(err, HTTPException):
            # Unrouted paths and methods still pass the vendor's JWT middleware: 401 without a valid token.
            try:
                self._claims(request)
            except HTTPError as e:
                return render_error(request, Failure(e))
            code = err.code or 404
            allow = [v.encode("ascii") for k, v in err.get_headers() if k.lower() == "allow"]
            return render_error(request, Failure(HTTPError(
                code, _body({"message": _REASONS.get(code, err.name)}), content_type=JSON_UTF8,
                headers=[(b"Allow", v) for v in allow])))
        return render_error(request, failure)

    @app.route("/client/auth", methods=["POST"])
    def auth(self, request: IRequest) -> bytes:
        raw = request.content.read() if request.content is not None else b""
        if not raw.strip():
            raise _fail(400, {"error": "bad request: request body cannot be empty"})
        try:
            body = _loads(raw)
        except ValueError as e:
            raise _fail(400, {"error": f"bad request: {e}"}) from None
        if not isinstance(body, dict):
            raise _fail(400, {"error": "bad request: request body must be a JSON object"})
        api_key = body.get("apiKey")
        if not isinstance(api_key, str) or not api_key:
            raise _fail(400, {"error": "bad request: apiKey cannot be empty"})
        target = self._auth_target(body.get("target"))
        hashed = tokens.key_hash(api_key)
        env = self.environment_for_key(hashed)
        if env is None:
            if not self.ready():
                # The first sync with the SaaS is still running: this key may be one it has not listed yet.
                # A 401 would make the SDK give up for good; a 503 makes it retry.
                raise _fail(503, {"error": "relay is starting: environments are still being loaded"})
            raise _fail(401, {"error": "unauthorised"})
        if target is not None and target.identifier:
            self.remember_target(env.id, target)
            if self.on_target is not None:
                self.on_target(env.id, target)
        token = tokens.issue(self._secret, env.id, hashed, self.clock.seconds())
        return _ok(request, _body({"authToken": token}))

    @staticmethod
    def _auth_target(obj: Any) -> Target | None:
        if obj is None:
            return None
        if isinstance(obj, dict) and obj.get("identifier") is None:
            obj = dict(obj, identifier="")  # Go decodes {} into an empty target: an SDK sending one is fine
        try:
            target = Target.from_json(obj)
        except ValueError as e:
            raise _fail(400, {"error": f"bad request: {e}"}) from None
        if not _IDENTIFIER.match(target.identifier):
            raise _fail(400, {"error": "bad request: target identifier is invalid"})
        if not _valid_name(target.name):
            raise _fail(400, {"error": "bad request: target name is invalid"})
        if not target.name:
            target = Target(target.identifier, target.identifier, target.anonymous, target.attributes)
        return target

    def remember_target(self, env_id: str, target: Target) -> None:
        """Keep the target an SDK authenticated with, for its evaluations (LRU, bounded per environment)."""
        cache = self._targets.setdefault(env_id, OrderedDict())
        cache[target.identifier] = target
        cache.move_to_end(target.identifier)
        while len(cache) > self.target_cache_size:
            cache.popitem(last=False)

    @app.route("/client/env/<env_id>/feature-configs", methods=["GET"])
    @app.route("/client/client/env/<env_id>/feature-configs", methods=["GET"])
    def feature_configs(self, request: IRequest, env_id: str) -> bytes:
        env = self._environment(request, env_id)
        if env is None:
            return _ok(request, b"[]\n")
        return _ok(request, env.memo(("harness-api", "feature-configs"), lambda: _body(
            [f if f.get("variationToTargetMap") is not None else dict(f, variationToTargetMap=[])
             for f in env.all(FLAGS).values()])))

    @app.route("/client/env/<env_id>/feature-configs/<identifier>", methods=["GET"])
    @app.route("/client/client/env/<env_id>/feature-configs/<identifier>", methods=["GET"])
    def feature_config(self, request: IRequest, env_id: str, identifier: str) -> bytes:
        env = self._environment(request, env_id)
        flag = env.get(FLAGS, identifier) if env is not None else None
        if env is None or flag is None:
            raise _fail(404, _NOT_FOUND)
        return _ok(request, env.memo(("harness-api", "feature-config", identifier), lambda: _body(flag)))

    @app.route("/client/env/<env_id>/target-segments", methods=["GET"])
    @app.route("/client/client/env/<env_id>/target-segments", methods=["GET"])
    def target_segments(self, request: IRequest, env_id: str) -> bytes:
        env = self._environment(request, env_id)
        if env is None:
            return _ok(request, b"[]\n")
        v2 = _query(request).get("rules") == "v2"
        return _ok(request, env.memo(("harness-api", "target-segments", v2), lambda: _body(
            [segment_view(s, v2) for s in env.all(SEGMENTS).values()])))

    @app.route("/client/env/<env_id>/target-segments/<identifier>", methods=["GET"])
    @app.route("/client/client/env/<env_id>/target-segments/<identifier>", methods=["GET"])
    def target_segment(self, request: IRequest, env_id: str, identifier: str) -> bytes:
        env = self._environment(request, env_id)
        segment = env.get(SEGMENTS, identifier) if env is not None else None
        if env is None or segment is None:
            raise _fail(404, _NOT_FOUND)
        v2 = _query(request).get("rules") == "v2"
        return _ok(request, env.memo(("harness-api", "target-segment", identifier, v2),
                                     lambda: _body(segment_view(segment, v2))))

    def _target(self, request: IRequest, env: Environment, identifier: str) -> Target:
        """Harness-Target header, else the target cached at /client/auth, else the targets kind, else bare."""
        header = request.getHeader(b"harness-target")
        if header is not None:
            try:
                return Target.from_json(_loads(base64.b64decode(header, validate=True)))
            except (ValueError, binascii.Error):
                raise _fail(400, {"error": "bad request: Harness-Target header is invalid"}) from None
        cache = self._targets.get(env.id)
        if cache is not None and identifier in cache:
            cache.move_to_end(identifier)
            return cache[identifier]
        stored = env.get(TARGETS, identifier)
        if stored is not None:
            try:
                return Target.from_json(stored)
            except ValueError:
                pass
        return Target(identifier)

    @app.route("/client/env/<env_id>/target/<target>/evaluations", methods=["GET"])
    @app.route("/client/client/env/<env_id>/target/<target>/evaluations", methods=["GET"])
    def evaluations(self, request: IRequest, env_id: str, target: str) -> bytes:
        env = self._environment(request, env_id)
        if env is None:
            return _ok(request, b"[]\n")
        subject = self._target(request, env, target)
        return _ok(request, _body(evaluate_all(subject, env.all(FLAGS), env.all(SEGMENTS))))

    @app.route("/client/env/<env_id>/target/<target>/evaluations/<feature>", methods=["GET"])
    @app.route("/client/client/env/<env_id>/target/<target>/evaluations/<feature>", methods=["GET"])
    def evaluation(self, request: IRequest, env_id: str, target: str, feature: str) -> bytes:
        env = self._environment(request, env_id)
        flag = env.get(FLAGS, feature) if env is not None else None
        if env is None or flag is None:
            raise _fail(404, _NOT_FOUND)
        subject = self._target(request, env, target)
        flags, segments = env.all(FLAGS), env.all(SEGMENTS)
        result = evaluation_json(flag, subject, flags, segments)
        if result is None:
            # The vendor relay passes the Go SDK's evaluation error through, which its codeFrom maps
            # to 500 (only a missing flag is a not-found error there).
            reason = unserved_reason(flag, subject, flags, segments) or "error while evaluating flag"
            raise _fail(500, {"error": reason})
        return _ok(request, _body(result))

    @app.route("/stream", methods=["GET"])
    def stream(self, request: IRequest) -> Any:
        self._claims(request)
        api_key = (request.getHeader(b"api-key") or b"").decode("utf-8", "replace")
        if not api_key:
            raise _fail(400, {"error": "bad request: API-Key can't be empty"})
        hashed = tokens.key_hash(api_key)
        env = self.environment_for_key(hashed)
        if env is None:
            raise _fail(404, {"error": f"not found: no environment found for apiKey {json.dumps(api_key)}"})
        return self.hub.subscribe(request, (FAMILY, env.id), info=hashed)

    @app.route("/metrics", methods=["GET"])
    def prometheus(self, request: IRequest) -> bytes:
        """The vendor's relay serves its Prometheus metrics here too, without a token (section 2.1)."""
        if self.prometheus_text is None:
            raise HTTPError(404, _body({"message": "Not Found"}), content_type=JSON_UTF8)
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.prometheus_text()

    @app.route("/metrics/<env_id>", methods=["POST"])
    def post_metrics(self, request: IRequest, env_id: str) -> bytes:
        self._environment(request, env_id)
        raw = request.content.read() if request.content is not None else b""
        if not raw.strip():
            raise _fail(400, {"error": "bad request: request body cannot be empty"})
        try:
            self.metrics.add(env_id, _loads(raw))
        except ValueError as e:
            raise _fail(400, {"error": f"bad request: {e}"}) from None
        return _ok(request, b"null\n")
