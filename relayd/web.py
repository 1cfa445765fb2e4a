"""The inbound HTTP side: one Site per listener, routing to the protocol families, limits, errors, access log.

Every listener serves every route. Each family (and the health/status API) is a Klein app owning a set of first
path segments; a flat dispatch on that segment keeps routing O(1) and lets Klein see the full path. Errors are
JSON bodies, never tracebacks; request bodies over ``max_body`` get 413 without being held in memory; the access
log goes through twisted.logger with credentials redacted.
"""

from __future__ import annotations

import json
import re
from io import BytesIO
from typing import Any, Iterable, Mapping, cast
from urllib.parse import parse_qsl, urlencode

from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException

from relayd import logs
from relayd.logs import Logger

log = Logger()
access_log = Logger(namespace="relayd.access")

JSON = b"application/json"
JSON_UTF8 = b"application/json; charset=utf-8"


class HTTPError(Exception):
    """Raise from a route to answer with ``code`` and a body (a JSON-able object, bytes/str, or None)."""

    def __init__(self, code: int, body: Any = None, *, content_type: bytes = JSON,
                 headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(code, body)
        self.code = code
        self.body = body
        self.content_type = content_type
        self.headers = tuple(headers)


def json_bytes(obj: Any) -> bytes:
    """Compact JSON, UTF-8: the one encoder every response and event uses."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def respond_json(request: IRequest, obj: Any, code: int = 200, content_type: bytes = JSON) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    return obj if isinstance(obj, bytes) else json_bytes(obj)


def render_error(request: IRequest, failure: Failure) -> bytes:
    """The error handler every Klein app installs: domain errors, routing errors, and bugs (500, logged)."""
    err = failure.value
    if isinstance(err, HTTPError):
        request.setResponseCode(err.code)
        for name, value in err.headers:
            request.setHeader(name, value)
        if err.body is None:
            return b""
        request.setHeader(b"Content-Type", err.content_type)
        if isinstance(err.body, bytes):
            return err.body
        if isinstance(err.body, str):
            return err.body.encode("utf-8")
        return json_bytes(err.body)
    if isinstance(err, HTTPException):  # werkzeug routing: 404, 405 (with its Allow header)
        code = err.code or 500
        request.setResponseCode(code)
        for header, text in err.get_headers():
            if header.lower() == "allow":
                request.setHeader(b"Allow", text.encode("ascii"))
        request.setHeader(b"Content-Type", JSON)
        return json_bytes({"message": _REASONS.get(code, err.name), "code": code})
    log.failure("unhandled error serving {method} {path}", failure, method=_method(request),
                path=redact_uri(request.uri))
    request.setResponseCode(500)
    request.setHeader(b"Content-Type", JSON)
    return json_bytes({"message": "internal error", "code": 500})


_REASONS = {404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request"}


def _method(request: IRequest | http.Request) -> str:
    return request.method.decode("ascii", "replace")


# ---------------------------------------------------------------------------------------------- redaction

_SECRET_PARAM = re.compile(r"(key|token|secret|auth|password|sig)", re.IGNORECASE)


def redact_uri(uri: bytes) -> str:
    """The request URI for logs: query values that may be credentials are replaced by ``***``."""
    text = uri.decode("utf-8", "replace")
    path, sep, query = text.partition("?")
    if not sep:
        return path
    pairs = [(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in parse_qsl(query, keep_blank_values=True)]
    return f"{path}?{urlencode(pairs, safe='*:/,')}"


def obscure(key: str, keep: int = 5) -> str:
    """A key as the vendors show it: a ``sdk-``/``mob-`` prefix kept, all but dashes and the last ``keep`` starred."""
    if not key:
        return ""
    prefix = ""
    if re.match(r"^[a-z]{3}-", key):
        prefix, key = key[:4], key[4:]
    if len(key) <= 4:
        return prefix + key
    head, tail = key[:-keep], key[-keep:]
    return prefix + re.sub(r"[^-]", "*", head) + tail  # dashes kept: a UUID key keeps its shape


# ---------------------------------------------------------------------------------------------- request and site

class RelaydRequest(Request):
    """A Request that refuses oversize bodies with 413 instead of storing them."""

    max_body = 10 * 1024 * 1024
    clock: Any = None  # set per site, with max_body, by RelaydSite
    _too_large = False
    _body_size = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self._too_large = True
            self.content = BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._body_size += len(data)
        if self._body_size > self.max_body:
            self._too_large = True
            self.content = BytesIO()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        self.relayd_started = self.clock.seconds()
        if self._too_large:
            self.setResponseCode(413)
            self.setHeader(b"Content-Type", JSON)
            self.setHeader(b"Connection", b"close")
            self.write(json_bytes({"message": f"request body larger than {self.max_body} bytes", "code": 413}))
            self.finish()
            return
        super().process()


class RelaydSite(Site):
    """A Site with relayd's request limits and a redacting access log on twisted.logger."""

    def __init__(self, resource: IResource, *, clock: Any = None, max_body: int = RelaydRequest.max_body,
                 **kwargs: Any) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.requestFactory = cast("type[RelaydRequest]",
                                   type("Request", (RelaydRequest,), {"max_body": max_body, "clock": clock}))
        super().__init__(resource, **kwargs)
        self.noisy = False

    def log(self, request: http.Request) -> None:  # called by Request.finish()
        if not logs.enabled(LogLevel.info):
            return
        started = getattr(request, "relayd_started", None)
        duration = (self.clock.seconds() - started) * 1000 if started is not None else 0.0
        agent = request.getHeader(b"user-agent") or b"-"
        access_log.info('{client} "{method} {uri}" {code} {length} {ms:.1f}ms "{agent}"',
                        client=request.getClientAddress().host if hasattr(request.getClientAddress(), "host")
                        else "-", method=_method(request), uri=redact_uri(request.uri), code=request.code,
                        length=request.sentLength, ms=duration, agent=agent.decode("latin-1"))


class Router(Resource):
    """Dispatch on the first path segment to the app that owns it; Klein below sees the whole path."""

    isLeaf = True

    def __init__(self, apps: Mapping[str, IResource]) -> None:
        super().__init__()
        self._apps = {segment.encode("utf-8"): resource for segment, resource in apps.items()}

    def render(self, request: Request) -> bytes | int:
        first = request.postpath[0] if request.postpath else b""
        resource = self._apps.get(first)
        if resource is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", JSON)
            return json_bytes({"message": "Not Found", "code": 404})
        return resource.render(request)


def build_router(apps: Iterable[tuple[Iterable[str], IResource]]) -> Router:
    """Join the apps' routes; two apps claiming one first segment is a programming error."""
    table: dict[str, IResource] = {}
    for segments, resource in apps:
        for segment in segments:
            if segment in table:
                raise ValueError(f"path segment /{segment} is claimed twice")
            table[segment] = resource
    return Router(table)
