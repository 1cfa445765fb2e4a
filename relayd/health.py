"""``GET /health`` (Harness relay shape) and ``GET /status`` (LaunchDarkly relay shape), read from the store.

Both report every environment relayd knows, of either family, so that one probe of either shape covers the
whole daemon. Keys appear only obscured. The conventions for ``Environment.meta`` read here:
``name`` (display name), ``sdk_key``, ``mobile_key``, ``env_id``, ``env_key``, ``env_name``, ``proj_key``,
``proj_name`` (LaunchDarkly), ``api_keys`` (Harness keys in clear, when configured), and ``database`` /
``db_server`` / ``db_prefix`` where a shared store backs the environment.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from relayd import __version__
from relayd.store import INITIALIZING, VALID, Environment, Store
from relayd.web import JSON, JSON_UTF8, obscure, render_error, respond_json

_HARNESS_STATE = {INITIALIZING: "INITIALIZING", VALID: "CONNECTED"}  # anything else is DISCONNECTED


class HealthAPI:
    app = Klein()
    segments = ("health", "status")

    def __init__(self, store: Store, clock: IReactorTime, disconnected_status_time: float = 60.0) -> None:
        self.store = store
        self.clock = clock
        self.disconnected_status_time = disconnected_status_time

    def resource(self) -> Any:
        return self.app.resource()

    @app.handle_errors(Exception)
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        return render_error(request, failure)

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        envs = [self._health_env(env) for env in self.store]
        return respond_json(request, {"environments": envs, "cacheStatus": "healthy"}, content_type=JSON_UTF8)

    @app.route("/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        envs = {}
        for env in sorted(self.store, key=_status_name):
            envs[_status_name(env)] = self._status_env(env)
        healthy = all(e["status"] == "connected" for e in envs.values())
        body = {"environments": envs, "status": "healthy" if healthy else "degraded", "version": __version__,
                "clientVersion": __version__}
        request.setHeader(b"Cache-Control", b"no-store")
        return respond_json(request, body, content_type=JSON)

    def _health_env(self, env: Environment) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": env.id,
            "streamStatus": {"state": _HARNESS_STATE.get(env.status.state, "DISCONNECTED"),
                             "since": int(env.status.since)},
        }
        if env.family != "harness":
            entry["family"] = env.family
            if env.meta.get("name"):
                entry["name"] = env.meta["name"]
        return entry

    def connected(self, env: Environment) -> bool:
        """LaunchDarkly's rule: has had data, and not out of VALID for ``disconnected_status_time`` or more."""
        if not env.initialized:
            return False
        st = env.status
        return st.state == VALID or self.clock.seconds() - st.since < self.disconnected_status_time

    def _status_env(self, env: Environment) -> dict[str, Any]:
        meta = env.meta
        st = env.status
        sdk_key = meta.get("sdk_key") or next(iter(meta.get("api_keys") or ()), "")
        entry: dict[str, Any] = {"sdkKey": obscure(sdk_key)}
        env_id = meta.get("env_id") or (env.id if env.family == "harness" else "")
        if env_id:
            entry["envId"] = env_id
        for field, key in (("envKey", "env_key"), ("envName", "env_name"), ("projKey", "proj_key"),
                           ("projName", "proj_name")):
            if meta.get(key):
                entry[field] = meta[key]
        if meta.get("mobile_key"):
            entry["mobileKey"] = obscure(meta["mobile_key"])
        if meta.get("expiring_sdk_key"):
            entry["expiringSdkKey"] = obscure(meta["expiring_sdk_key"])
        entry["status"] = "connected" if self.connected(env) else "disconnected"
        connection: dict[str, Any] = {"state": st.state, "stateSince": _ms(st.since)}
        if st.error_kind is not None and st.error_time is not None:
            connection["lastError"] = {"kind": st.error_kind, "time": _ms(st.error_time)}
        entry["connectionStatus"] = connection
        store_status: dict[str, Any] = {"state": "VALID" if env.initialized or st.state != INITIALIZING
                                        else "INITIALIZING", "stateSince": _ms(env.created)}
        for field, key in (("database", "database"), ("dbServer", "db_server"), ("dbPrefix", "db_prefix")):
            if meta.get(key):
                store_status[field] = meta[key]
        entry["dataStoreStatus"] = store_status
        return entry


def _status_name(env: Environment) -> str:
    name = env.meta.get("name") or env.id
    return name if env.family == "launchdarkly" else f"{env.family}/{name}"


def _ms(seconds: float) -> int:
    return int(seconds * 1000)
