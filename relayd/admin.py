"""The admin listener (``admin_listen``): Prometheus ``/metrics`` and a small HTML status page.

Kept off the SDK listeners on purpose: operators bind it to loopback or a management network. Everything here is
read from the store and the SSE hub at request time; nothing is counted on the hot path except what those two
already keep.
"""

from __future__ import annotations

import html
from typing import Any

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from relayd import __version__
from relayd.sse import SSEHub
from relayd.store import INITIALIZING, INTERRUPTED, OFF, VALID, Store
from relayd.web import obscure, render_error

_STATES = (INITIALIZING, VALID, INTERRUPTED, OFF)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class AdminAPI:
    app = Klein()

    def __init__(self, store: Store, hub: SSEHub, clock: IReactorTime) -> None:
        self.store = store
        self.hub = hub
        self.clock = clock
        self.started = clock.seconds()

    def resource(self) -> Any:
        return self.app.resource()

    @app.handle_errors(Exception)
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        return render_error(request, failure)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.prometheus_text()

    def prometheus_text(self) -> bytes:
        """The Prometheus exposition, also served at ``GET /metrics`` on the SDK listeners (as Harness's relay)."""
        lines = [
            "# HELP relayd_info relayd version.", "# TYPE relayd_info gauge",
            f'relayd_info{{version="{__version__}"}} 1',
            "# HELP relayd_uptime_seconds Seconds since relayd started.", "# TYPE relayd_uptime_seconds gauge",
            f"relayd_uptime_seconds {self.clock.seconds() - self.started:.0f}",
            "# HELP relayd_sse_streams Open SDK streams.", "# TYPE relayd_sse_streams gauge",
            f"relayd_sse_streams {self.hub.count()}",
            "# HELP relayd_sse_dropped_total SDK streams dropped for not reading.",
            "# TYPE relayd_sse_dropped_total counter",
            f"relayd_sse_dropped_total {self.hub.dropped}",
            "# HELP relayd_environment_state Upstream state of each environment (1 for the current state).",
            "# TYPE relayd_environment_state gauge",
        ]
        items, revisions = [], []
        for env in self.store:
            labels = f'family="{_label(env.family)}",environment="{_label(env.id)}"'
            for state in _STATES:
                lines.append(f'relayd_environment_state{{{labels},state="{state}"}} '
                             f"{1 if env.status.state == state else 0}")
            for kind in sorted(env.kinds()):
                items.append(f'relayd_environment_items{{{labels},kind="{_label(kind)}"}} {len(env.all(kind))}')
            revisions.append(f"relayd_environment_changes_total{{{labels}}} {env.revision}")
        lines += ["# HELP relayd_environment_items Live items per kind.", "# TYPE relayd_environment_items gauge",
                  *items,
                  "# HELP relayd_environment_changes_total Changes applied to the environment.",
                  "# TYPE relayd_environment_changes_total counter", *revisions]
        return ("\n".join(lines) + "\n").encode("utf-8")

    @app.route("/", methods=["GET"])
    def page(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        rows = []
        now = self.clock.seconds()
        for env in sorted(self.store, key=lambda e: (e.family, e.id)):
            key = env.meta.get("sdk_key") or ""
            counts = ", ".join(f"{len(env.all(k))} {k}" for k in sorted(env.kinds()))
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
                env.family, env.meta.get("name") or env.id, obscure(key), env.status.state,
                f"{now - env.status.since:.0f}s", env.status.error_kind or "", counts,
                self.hub.count((env.family, env.id)))) + "</tr>")
        body = f"""<!doctype html><html><head><meta charset="utf-8"><title>relayd</title>
<style>body{{font-family:sans-serif}}td,th{{padding:2px 10px;text-align:left}}</style></head><body>
<h1>relayd {html.escape(__version__)}</h1>
<p>up {now - self.started:.0f}s, {self.hub.count()} open SDK streams, {self.hub.dropped} dropped for not reading</p>
<table><tr><th>family</th><th>environment</th><th>key</th><th>state</th><th>for</th><th>last error</th>
<th>data</th><th>streams</th></tr>{"".join(rows)}</table></body></html>"""
        return body.encode("utf-8")
