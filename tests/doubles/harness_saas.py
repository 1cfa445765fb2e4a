"""A Harness SaaS double on loopback: admin API (projects, environments with their hashed keys, API keys, targets;
paged, x-api-key), client API (auth, flags, segments, SSE stream) and events API (metrics), with faults a test can
inject.

Paths mirror the real services under one port: ``{url}/api/1.0`` (config_url), ``{url}/gateway/cf`` (admin_url),
``{url}/events/api/1.0`` (events_url).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import LoopingCall, deferLater
from twisted.web.server import Site

SECRET = "saas-double-secret-0123456789abcdef-xyz"


@dataclass
class Env:
    uuid: str
    identifier: str
    project: str
    keys: list[str]
    flags: dict[str, dict[str, Any]] = field(default_factory=dict)
    segments: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra_key_hashes: list[str] = field(default_factory=list)


def flag(feature: str, on: bool = True, version: int = 1) -> dict[str, Any]:
    """A boolean FeatureConfig (section 5.1 shape)."""
    return {"feature": feature, "project": "p", "environment": "e", "kind": "boolean", "state": "on" if on else "off",
            "version": version, "defaultServe": {"variation": "true"}, "offVariation": "false",
            "variations": [{"identifier": "true", "value": "true"}, {"identifier": "false", "value": "false"}],
            "rules": [], "variationToTargetMap": [], "prerequisites": []}


def segment(identifier: str, included: list[str] = (), version: int = 1) -> dict[str, Any]:
    return {"identifier": identifier, "name": identifier, "version": version, "rules": [], "excluded": [],
            "included": [{"identifier": t, "name": t, "account": "acc", "org": "org", "environment": "dev",
                          "project": "proj", "anonymous": False, "attributes": {}} for t in included]}


class _TrackingSite(Site):
    """A Site that knows its open connections, so the double can close them all on stop."""

    def __init__(self, resource: Any) -> None:
        super().__init__(resource)
        self.channels: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.channels.add(channel)
        return channel


class HarnessSaaS:
    app = Klein()

    def __init__(self, admin_token: str = "admin-token") -> None:
        self.admin_token = admin_token
        self.envs: dict[str, Env] = {}
        self.disabled_keys: set[str] = set()
        self.streams: list[Any] = []
        self.metrics: list[tuple[str, Any]] = []
        self.auth_requests: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, uri, headers
        self.faults: dict[str, list[int]] = {}  # route name -> statuses to answer, one per request
        self.token_epoch = 0  # tokens with an older "epoch" claim get 401 (expired)
        self.stall_stream = False  # accept stream requests but send nothing, not even headers' first byte
        self.envelope = False  # answer /admin/apikey and /admin/targets in the {"status","data"} envelope
        self.directory_envelope = True  # /admin/projects and /admin/environments: enveloped (False: bare)
        self.directory_ids = True  # /admin/environments items carry the environment UUID as "id"
        self.extra_projects: list[str] = []  # projects without environments (more pages to read)
        self.unlisted: set[str] = set()  # environment UUIDs /admin/environments leaves out
        self.broken: dict[str, int] = {}  # route name -> status answered to every request until removed
        self.port: Any = None
        self.heartbeat = LoopingCall(lambda: [r.write(b":\n\n") for r, _ in list(self.streams)])

    # -- test controls

    async def start(self) -> str:
        self.site = _TrackingSite(self.app.resource())
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.site)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.heartbeat.start(0.1, now=False)
        return self.url

    async def stop(self) -> None:
        """Stop listening and cut every connection still open (pooled keep-alives, stalled requests)."""
        self.heartbeat.stop()
        self.close_streams()
        await self.port.stopListening()
        for channel in list(self.site.channels):
            transport = getattr(channel, "transport", None)
            if transport is not None and transport.connected:
                transport.abortConnection()
        await deferLater(reactor, 0, lambda: None)

    def add_env(self, uuid: str, key: str, identifier: str = "dev", project: str = "proj") -> Env:
        env = self.envs[uuid] = Env(uuid, identifier, project, [key])
        return env

    def fail(self, route: str, *statuses: int) -> None:
        self.faults.setdefault(route, []).extend(statuses)

    def set_flag(self, env_id: str, data: dict[str, Any], notify: bool = True) -> None:
        env = self.envs[env_id]
        old = env.flags.get(data["feature"])
        data = dict(data, version=(old["version"] + 1) if old else data.get("version", 1))
        env.flags[data["feature"]] = data
        if notify:
            self.push(env_id, {"event": "patch" if old else "create", "domain": "flag",
                               "identifier": data["feature"], "version": data["version"]})

    def delete_flag(self, env_id: str, feature: str, notify: bool = True) -> None:
        old = self.envs[env_id].flags.pop(feature)
        if notify:
            self.push(env_id, {"event": "delete", "domain": "flag", "identifier": feature,
                               "version": old["version"] + 1})

    def set_segment(self, env_id: str, data: dict[str, Any], notify: bool = True) -> None:
        env = self.envs[env_id]
        old = env.segments.get(data["identifier"])
        data = dict(data, version=(old["version"] + 1) if old else data.get("version", 1))
        env.segments[data["identifier"]] = data
        if notify:
            self.push(env_id, {"event": "patch" if old else "create", "domain": "target-segment",
                               "identifier": data["identifier"], "version": data["version"]})

    def push(self, env_id: str, msg: Any, raw: bytes | None = None) -> None:
        frame = raw if raw is not None else b"event: *\ndata: " + json.dumps(msg).encode() + b"\n\n"
        for request, env in list(self.streams):
            if env == env_id:
                request.write(frame)

    def drop_streams(self, mid_event: bool = True) -> None:
        """Cut every stream, in the middle of an event if asked (the partial event must not be applied)."""
        for request, _ in list(self.streams):
            if mid_event:
                request.write(b'event: *\ndata: {"event":"patch","domain":"fl')
            request.channel.transport.abortConnection()
        self.streams.clear()

    def close_streams(self) -> None:
        self.drop_streams(mid_event=False)

    def connected(self, env_id: str) -> int:
        return sum(1 for _, e in self.streams if e == env_id)

    # -- helpers

    def _fault(self, request: Any, route: str) -> bytes | None:
        queue = self.faults.get(route)
        code = queue.pop(0) if queue else self.broken.get(route)
        if code is not None:
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": f"injected {code}"}).encode()
        return None

    def _record(self, request: Any) -> None:
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.method.decode(), request.uri.decode(), headers))

    @staticmethod
    def _json(request: Any, obj: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return json.dumps(obj).encode()

    def _claims(self, request: Any, env_id: str | None = None) -> dict[str, Any] | None:
        auth = (request.getHeader(b"authorization") or b"").decode()
        if not auth.startswith("Bearer "):
            return None
        try:
            claims = jwt.decode(auth[7:], SECRET, algorithms=["HS256"])
        except jwt.PyJWTError:
            return None
        if claims.get("epoch") != self.token_epoch:
            return None
        if env_id is not None and claims["environment"] != env_id:
            return None
        return claims

    def _key_env(self, key: str) -> Env | None:
        if key in self.disabled_keys:
            return None
        return next((e for e in self.envs.values() if key in e.keys), None)

    # -- client API

    @app.route("/api/1.0/client/auth", methods=["POST"])
    def auth(self, request: Any) -> bytes:
        self._record(request)
        fault = self._fault(request, "auth")
        if fault is not None:
            return fault
        body = json.loads(request.content.read())
        self.auth_requests.append(body)
        env = self._key_env(body.get("apiKey", ""))
        if env is None:
            return self._json(request, {"message": "invalid key"}, 401)
        now = int(time.time())
        token = jwt.encode({"environment": env.uuid, "environmentIdentifier": env.identifier,
                            "project": "p-uuid", "projectIdentifier": env.project, "clusterIdentifier": "2",
                            "accountID": "acc", "key_type": "Server", "iat": now, "epoch": self.token_epoch},
                           SECRET, algorithm="HS256")
        return self._json(request, {"authToken": token})

    def _env_or_error(self, request: Any, env_id: str, route: str) -> tuple[Env | None, bytes | None]:
        self._record(request)
        fault = self._fault(request, route)
        if fault is not None:
            return None, fault
        if self._claims(request, env_id) is None:
            return None, self._json(request, {"message": "unauthorised"}, 401)
        return self.envs[env_id], None

    @app.route("/api/1.0/client/env/<env_id>/feature-configs", methods=["GET"])
    def flags(self, request: Any, env_id: str) -> bytes:
        env, err = self._env_or_error(request, env_id, "flags")
        return err if env is None else self._json(request, list(env.flags.values()))

    @app.route("/api/1.0/client/env/<env_id>/feature-configs/<ident>", methods=["GET"])
    def flag(self, request: Any, env_id: str, ident: str) -> bytes:
        env, err = self._env_or_error(request, env_id, "flag")
        if env is None:
            return err
        if ident not in env.flags:
            return self._json(request, {"error": "not found"}, 404)
        return self._json(request, env.flags[ident])

    @app.route("/api/1.0/client/env/<env_id>/target-segments", methods=["GET"])
    def segments(self, request: Any, env_id: str) -> bytes:
        env, err = self._env_or_error(request, env_id, "segments")
        return err if env is None else self._json(request, list(env.segments.values()))

    @app.route("/api/1.0/client/env/<env_id>/target-segments/<ident>", methods=["GET"])
    def segment(self, request: Any, env_id: str, ident: str) -> bytes:
        env, err = self._env_or_error(request, env_id, "segment")
        if env is None:
            return err
        if ident not in env.segments:
            return self._json(request, {"error": "not found"}, 404)
        return self._json(request, env.segments[ident])

    @app.route("/api/1.0/stream", methods=["GET"])
    def stream(self, request: Any) -> Any:
        self._record(request)
        fault = self._fault(request, "stream")
        if fault is not None:
            return fault
        claims = self._claims(request)
        key = (request.getHeader(b"api-key") or b"").decode()
        env = self._key_env(key)
        if claims is None or env is None or claims["environment"] != env.uuid:
            return self._json(request, {"message": "unauthorised"}, 401)
        if self.stall_stream:
            return Deferred()  # headers never come
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b":\n\n")
        entry = (request, env.uuid)
        self.streams.append(entry)

        def gone(_: Any) -> None:
            if entry in self.streams:
                self.streams.remove(entry)
        request.notifyFinish().addBoth(gone)
        return Deferred(lambda d: None)

    # -- admin API

    def _listing(self, request: Any, route: str, list_field: str, items_of: Any, envelope: bool,
                 required: tuple[str, ...] = ()) -> bytes:
        """One page of an admin list: x-api-key checked, pageSize <= 100 asked, pages of at most admin_page_size."""
        self._record(request)
        fault = self._fault(request, route)
        if fault is not None:
            return fault
        if (request.getHeader(b"x-api-key") or b"").decode() != self.admin_token:
            return self._json(request, {"message": "bad admin token"}, 401)
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        missing = [name for name in required if not args.get(name)]
        if missing:
            return self._json(request, {"message": f"missing {', '.join(missing)}"}, 400)
        page, size = int(args.get("pageNumber", "0")), int(args.get("pageSize", "100"))
        if size > 100:
            return self._json(request, {"message": "pageSize too large"}, 400)
        items = items_of(args)
        size = min(size, self.admin_page_size)
        pages = max(1, -(-len(items) // size))
        body = {list_field: items[page * size:(page + 1) * size], "itemCount": len(items), "pageCount": pages,
                "pageIndex": page, "pageSize": size, "version": 1}
        if envelope:
            body = {"status": "SUCCESS", "data": body, "metaData": {}, "correlationId": "c"}
        return self._json(request, body)

    def _admin(self, request: Any, route: str, list_field: str, items_of: Any) -> bytes:
        """A list of one environment (apikey, targets), chosen by projectIdentifier + environmentIdentifier."""
        def items(args: dict[str, str]) -> list[Any]:
            return [item for env in self.envs.values()
                    if env.identifier == args.get("environmentIdentifier") and env.project == args.get(
                        "projectIdentifier") for item in items_of(env)]
        return self._listing(request, route, list_field, items, self.envelope)

    admin_page_size = 100  # the double may serve smaller pages than asked (the client must not stop early)

    @staticmethod
    def _key_objects(env: Env) -> list[dict[str, Any]]:
        hashes = [hashlib.sha256(k.encode()).hexdigest() for k in env.keys] + env.extra_key_hashes
        return [{"apiKey": "****", "identifier": f"k{i}", "key": h, "name": f"k{i}", "type": "server"}
                for i, h in enumerate(hashes)]

    @app.route("/gateway/cf/admin/projects", methods=["GET"])
    def projects(self, request: Any) -> bytes:
        def items(args: dict[str, str]) -> list[Any]:
            names = list(dict.fromkeys([e.project for e in self.envs.values()] + self.extra_projects))
            return [{"identifier": p, "name": p.title(), "description": "", "tags": []} for p in names]
        return self._listing(request, "projects", "projects", items, self.directory_envelope,
                             ("accountIdentifier", "orgIdentifier"))

    @app.route("/gateway/cf/admin/environments", methods=["GET"])
    def environments(self, request: Any) -> bytes:
        def items(args: dict[str, str]) -> list[Any]:
            out = []
            for env in self.envs.values():
                if env.project != args["projectIdentifier"] or env.uuid in self.unlisted:
                    continue
                keys = self._key_objects(env)
                item = {"id": env.uuid, "identifier": env.identifier, "name": env.identifier.upper(),
                        "project": env.project, "tags": [],
                        "apiKeys": {"apiKeys": keys, "itemCount": len(keys), "pageCount": 1, "pageIndex": 0,
                                    "pageSize": len(keys), "version": 1}}
                if not self.directory_ids:
                    del item["id"]
                out.append(item)
            return out
        return self._listing(request, "environments", "environments", items, self.directory_envelope,
                             ("accountIdentifier", "orgIdentifier", "projectIdentifier"))

    @app.route("/gateway/cf/admin/apikey", methods=["GET"])
    def apikeys(self, request: Any) -> bytes:
        return self._admin(request, "apikey", "apiKeys", self._key_objects)

    @app.route("/gateway/cf/admin/targets", methods=["GET"])
    def targets(self, request: Any) -> bytes:
        return self._admin(request, "targets", "targets", lambda env: list(env.targets.values()))

    # -- events API

    @app.route("/events/api/1.0/metrics/<env_id>", methods=["POST"])
    def post_metrics(self, request: Any, env_id: str) -> bytes:
        self._record(request)
        fault = self._fault(request, "metrics")
        if fault is not None:
            return fault
        if self._claims(request, env_id) is None:
            return self._json(request, {"message": "unauthorised"}, 401)
        self.metrics.append((env_id, json.loads(request.content.read())))
        return self._json(request, None)
