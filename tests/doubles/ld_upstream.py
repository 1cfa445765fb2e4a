"""A LaunchDarkly SaaS double on loopback: stream (``/all``), polling (``/sdk/latest-all``) and events services.

A Klein app on a real ``Site`` bound to 127.0.0.1:0. Tests change flags (``set_flag``/``delete_flag``/``put``),
which are pushed to every open stream as the real service does (section 2.1), and script faults for the next
stream connections with ``stream_faults`` (a list consumed one per connection): an int answers that status,
``"stall"`` sends headers and then nothing, ``"malformed"`` sends a ``put`` with broken JSON, ``"no-put"`` opens
the stream without the initial ``put``. ``drop_streams(mid_event=True)`` cuts every stream half-way through an
event. Event posts are recorded with path, headers and body; ``event_statuses`` scripts their answers.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.server import Site

SDK_KEY = "sdk-11111111-2222-4333-8444-555555555555"
MOBILE_KEY = "mob-11111111-2222-4333-8444-555555555555"


def make_flag(key: str, version: int, on: bool = True, value_on: Any = True, value_off: Any = False) -> dict:
    """A minimal but complete server-side flag: on -> variation 0 (fallthrough), off -> variation 1."""
    return {"key": key, "version": version, "on": on, "variations": [value_on, value_off],
            "fallthrough": {"variation": 0}, "offVariation": 1, "targets": [], "contextTargets": [],
            "rules": [], "prerequisites": [], "salt": key, "trackEvents": False,
            "trackEventsFallthrough": False, "debugEventsUntilDate": None,
            "clientSideAvailability": {"usingMobileKey": True, "usingEnvironmentId": True},
            "clientSide": True, "deleted": False}


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        raw = gzip.decompress(self.body) if self.headers.get("content-encoding") == "gzip" else self.body
        return json.loads(raw)


@dataclass
class StreamConn:
    request: Any
    headers: dict[str, str]
    done: Deferred[None] = field(default_factory=Deferred)

    @property
    def open(self) -> bool:
        return not self.done.called and self.request.channel is not None


def _headers(request: Any) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v[-1].decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()}


class LDUpstreamDouble:
    app = Klein()

    def __init__(self, sdk_key: str = SDK_KEY) -> None:
        self.sdk_key = sdk_key
        self.flags: dict[str, dict] = {}
        self.segments: dict[str, dict] = {}
        self.stream_faults: list[int | str] = []
        self.event_statuses: list[int] = []  # consumed one per event post; default 202
        self.streams: list[StreamConn] = []  # every stream request that got a 200
        self.stream_requests: list[dict[str, str]] = []  # headers of every /all request, faults included
        self.stream_connected: DeferredQueue[StreamConn] = DeferredQueue()
        self.events: list[Recorded] = []
        self.event_posted: DeferredQueue[Recorded] = DeferredQueue()
        self.polls: list[dict[str, str]] = []
        self.port: Any = None
        self.url = ""

    # -- lifecycle

    async def start(self, reactor: Any) -> str:
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(self.app.resource()))
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        return self.url

    async def stop(self) -> None:
        self.drop_streams()
        if self.port is not None:
            await self.port.stopListening()

    # -- data changes, pushed to open streams

    def put_payload(self) -> dict:
        return {"path": "/", "data": {"flags": self.flags, "segments": self.segments}}

    def push(self, event: str, data: Any) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        frame = f"event: {event}\n" + "".join(f"data: {line}\n" for line in text.split("\n")) + "\n"
        for conn in self.streams:
            if conn.open:
                conn.request.write(frame.encode())

    def set_flag(self, flag: dict, *, push: bool = True) -> None:
        self.flags[flag["key"]] = flag
        if push:
            self.push("patch", {"path": f"/flags/{flag['key']}", "data": flag})

    def delete_flag(self, key: str, version: int, *, push: bool = True) -> None:
        self.flags.pop(key, None)
        if push:
            self.push("delete", {"path": f"/flags/{key}", "version": version})

    def put(self) -> None:
        self.push("put", self.put_payload())

    def drop_streams(self, *, mid_event: bool = False) -> None:
        for conn in self.streams:
            if conn.open:
                if mid_event:
                    conn.request.write(b'event: patch\ndata: {"path":"/flags/half-sent","da')
                conn.request.channel.transport.abortConnection()

    def open_streams(self) -> list[StreamConn]:
        return [c for c in self.streams if c.open]

    # -- stream service

    @app.route("/all", methods=["GET"])
    def all(self, request: Any) -> Any:
        headers = _headers(request)
        self.stream_requests.append(headers)
        fault = self.stream_faults.pop(0) if self.stream_faults else None
        if headers.get("authorization") != self.sdk_key:
            fault = 401
        if isinstance(fault, int):
            request.setResponseCode(fault)
            request.setHeader(b"content-type", b"text/plain")
            return b"error"
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        conn = StreamConn(request, headers, Deferred(lambda d: None))
        request.notifyFinish().addBoth(lambda _: None if conn.done.called else conn.done.callback(None))
        self.streams.append(conn)
        if fault == "stall":
            request.write(b"")  # headers only, then silence
        elif fault == "malformed":
            request.write(b'event: put\ndata: {"path":"/","data":{"flags":\n\n')
        elif fault == "no-put":
            request.write(b":\n\n")
        else:
            request.write(b":\n\nevent: put\ndata: " + json.dumps(self.put_payload()).encode() + b"\n\n")
        self.stream_connected.put(conn)
        return conn.done

    # -- polling service

    @app.route("/sdk/latest-all", methods=["GET"])
    def latest_all(self, request: Any) -> bytes:
        headers = _headers(request)
        self.polls.append(headers)
        if headers.get("authorization") != self.sdk_key:
            request.setResponseCode(401)
            return b""
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"flags": self.flags, "segments": self.segments}).encode()

    # -- events service

    def _event(self, request: Any) -> bytes:
        path = request.path.decode("latin-1")
        rec = Recorded(request.method.decode(), path, _headers(request), request.content.read())
        self.events.append(rec)
        status = self.event_statuses.pop(0) if self.event_statuses else 202
        request.setResponseCode(status)
        self.event_posted.put(rec)
        return b""

    @app.route("/bulk", methods=["POST"])
    @app.route("/diagnostic", methods=["POST"])
    @app.route("/mobile", methods=["POST"])
    @app.route("/mobile/events", methods=["POST"])
    @app.route("/mobile/events/bulk", methods=["POST"])
    @app.route("/mobile/events/diagnostic", methods=["POST"])
    def server_events(self, request: Any) -> bytes:
        return self._event(request)

    @app.route("/events/bulk/<env_id>", methods=["POST"])
    @app.route("/events/diagnostic/<env_id>", methods=["POST"])
    def js_events(self, request: Any, env_id: str) -> bytes:
        return self._event(request)
