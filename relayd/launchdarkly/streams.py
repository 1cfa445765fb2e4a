"""LaunchDarkly SSE streams: what each kind of stream sends on connect and after each store change.

Server streams (``/all``, ``/flags``) have one topic per environment: the ``put`` frame is built once per store
revision and every patch/delete once per change. Client-side streams (``/eval``, ``/meval``) carry evaluated
flags, so their topic is (environment, context, withReasons, SDK kind): one evaluation per topic per change,
shared by every client with that context, and only flags whose evaluated result changed are sent. Environments
with ``client_stream = ping`` (and ``/ping``, ``/mping``) get ld-relay's ping-only behaviour instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from relayd.launchdarkly.contexts import Context
from relayd.launchdarkly.evaluate import evaluate_all
from relayd.launchdarkly.model import canonical_flag, canonical_segment, flags_affected_by, is_deleted
from relayd.logs import Logger
from relayd.sse import SSEHub, Subscriber, encode
from relayd.store import Change, Environment, Store
from relayd.web import json_bytes

log = Logger()

FAMILY = "launchdarkly"
PING_FRAME = encode(" ", "ping")
# 1.9: the SSE server of ld-relay adds these to every stream (the hub sets Content-Type, Cache-Control, X-Accel).
STREAM_HEADERS = ((b"Connection", b"keep-alive"), (b"Access-Control-Allow-Origin", b"*"))


def _frame(event: str, data: Any) -> bytes:
    return encode(json_bytes(data).decode("utf-8"), event)


def live(env: Environment, kind: str) -> dict[str, Any]:
    """Non-deleted items of a kind (store tombstones and ``deleted: true`` values both excluded)."""
    return env.memo(("ld-live", kind), lambda: {k: v for k, v in env.all(kind).items()
                                                 if isinstance(v, dict) and not is_deleted(v)})


def all_put_frame(env: Environment) -> bytes:
    """The ``/all`` put: built once per revision and shared by every connecting SDK."""
    def build() -> bytes:
        flags = {k: canonical_flag(v) for k, v in live(env, "flags").items()}
        segments = {k: canonical_segment(v) for k, v in live(env, "segments").items()}
        return _frame("put", {"path": "/", "data": {"flags": flags, "segments": segments}})
    return env.memo("ld-put-all", build)


def flags_put_frame(env: Environment) -> bytes:
    return env.memo("ld-put-flags", lambda: _frame("put", {k: canonical_flag(v)
                                                            for k, v in live(env, "flags").items()}))


def context_json(context: Context) -> str:
    """A context's canonical JSON: equal contexts (whatever their attribute order) share one topic."""
    return json.dumps(context.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _topic(env_id: str, context: Context, with_reasons: bool, client_kind: str) -> tuple[Any, ...]:
    """A client stream's hub topic. Topics show in the hub's log lines, so the context is in it only as a
    digest of its canonical JSON: its attributes (private ones too) never reach the log."""
    digest = hashlib.sha256(context_json(context).encode("utf-8")).hexdigest()
    return ("ld-eval", env_id, digest, with_reasons, client_kind)


def _signature(entry: dict[str, Any]) -> dict[str, Any]:
    """What the client sees change: everything but the versions."""
    return {k: v for k, v in entry.items() if k not in ("version", "flagVersion")}


def client_entries(env: Environment, context: Context, with_reasons: bool, client_kind: str,
                   keys: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Evaluated flags as the vendor's client stream sends them: evalx entries plus ``flagVersion``
    (only the flags in ``keys`` when given)."""
    out = evaluate_all(context, live(env, "flags"), live(env, "segments"), with_reasons=with_reasons,
                       client_side=client_kind, keys=keys)
    for entry in out.values():
        entry["flagVersion"] = entry["version"]
    return out


@dataclass
class ClientTopic:
    """One shared client-side evaluation: its context and the last result sent to its subscribers."""

    env_id: str
    context: Context
    with_reasons: bool
    client_kind: str  # "js" or "mobile"
    entries: dict[str, dict[str, Any]] | None = None
    revision: int = -1
    put: bytes | None = field(default=None, repr=False)


class Streams:
    """Every LaunchDarkly stream topic, fed from the store's change feed through the SSE hub."""

    def __init__(self, store: Store, hub: SSEHub) -> None:
        self.store = store
        self.hub = hub
        self._client_topics: dict[str, dict[Hashable, ClientTopic]] = {}
        self._put_revision: dict[str, int] = {}
        self.evaluations = 0  # client-side topic evaluations, for tests and stats
        self._unsubscribe: Callable[[], None] = store.subscribe(self._on_change)

    def stop(self) -> None:
        self._unsubscribe()

    # -- subscribing

    def server(self, request: IRequest, env: Environment, legacy: bool) -> Deferred[None]:
        """``/all`` (or ``/flags`` when ``legacy``): a put now if there is data, nothing before."""
        topic = ("ld-flags" if legacy else "ld-all", env.id)
        initial = None
        if env.initialized:
            initial = flags_put_frame(env) if legacy else all_put_frame(env)
            self._put_revision.setdefault(env.id, env.revision)
        return self.hub.subscribe(request, topic, initial=initial, headers=STREAM_HEADERS)

    def ping(self, request: IRequest, env: Environment, extra_headers: tuple[tuple[bytes, bytes], ...] = ()
             ) -> Deferred[None]:
        """ld-relay's ping stream: one ping on connect once there is data, one after each change."""
        return self.hub.subscribe(request, ("ld-ping", env.id), initial=PING_FRAME if env.initialized else None,
                                  headers=STREAM_HEADERS + extra_headers)

    def client(self, request: IRequest, env: Environment, context: Context, with_reasons: bool,
               client_kind: str) -> Deferred[None]:
        """An evaluated client-side stream (or a ping stream if the environment asks for ping)."""
        if env.meta.get("client_stream") == "ping":
            return self.ping(request, env)
        topic = _topic(env.id, context, with_reasons, client_kind)
        topics = self._client_topics.setdefault(env.id, {})
        state = topics.get(topic)
        if state is None:
            state = topics[topic] = ClientTopic(env.id, context, with_reasons, client_kind)
        initial = None
        if env.initialized:
            self._refresh(env, state)
            initial = self._put(state)
        return self.hub.subscribe(request, topic, initial=initial, headers=STREAM_HEADERS,
                                  on_close=lambda sub: self._closed(sub))

    def client_topic(self, env_id: str, context: Context, with_reasons: bool, client_kind: str
                     ) -> ClientTopic | None:
        topic = _topic(env_id, context, with_reasons, client_kind)
        return self._client_topics.get(env_id, {}).get(topic)

    def _closed(self, sub: Subscriber) -> None:
        if self.hub.count(sub.topic) == 0:
            env_id = cast(tuple[Any, ...], sub.topic)[1]  # client topics are (kind, env id, ...)
            topics = self._client_topics.get(env_id)
            if topics is not None:
                topics.pop(sub.topic, None)
                if not topics:
                    del self._client_topics[env_id]

    def _refresh(self, env: Environment, state: ClientTopic, affected: set[str] | None = None) -> set[str] | None:
        """Bring a topic's result up to the environment's revision (a no-op when it already is).

        ``affected``: the only flags the latest change can have altered; a topic that was current before that
        change re-evaluates just those. Returns the keys whose entries may differ (None = any of them).
        """
        if state.revision == env.revision and state.entries is not None:
            return set()
        if affected is not None and state.entries is not None and state.revision == env.revision - 1:
            entries = {k: v for k, v in state.entries.items() if k not in affected}
            entries.update(client_entries(env, state.context, state.with_reasons, state.client_kind,
                                          sorted(affected)))
            changed: set[str] | None = affected
        else:
            entries = client_entries(env, state.context, state.with_reasons, state.client_kind)
            changed = None
        state.entries = entries
        state.revision = env.revision
        state.put = None
        self.evaluations += 1
        return changed

    @staticmethod
    def _put(state: ClientTopic) -> bytes:
        """The put for (re)connecting clients of a topic, encoded at most once per revision."""
        if state.put is None:
            state.put = _frame("put", state.entries or {})
        return state.put

    # -- the change feed

    def _on_change(self, change: Change) -> None:
        env = change.env
        if env.family != FAMILY:
            return
        if change.op == "remove":
            self._drop_env(env.id)
            return
        if change.op not in ("replace", "upsert", "delete"):
            return
        if not change.items and not (change.op == "replace" and self._put_revision.get(env.id) != env.revision):
            return
        self._server(change)
        self.hub.publish(("ld-ping", env.id), PING_FRAME)
        self._clients(env, change)

    def _server(self, change: Change) -> None:
        env = change.env
        if change.op == "replace":
            if self._put_revision.get(env.id) == env.revision:
                return
            self._put_revision[env.id] = env.revision
            if self.hub.count(("ld-all", env.id)):  # a big data set is not serialized for nobody
                self.hub.publish(("ld-all", env.id), all_put_frame(env))
            if self.hub.count(("ld-flags", env.id)):
                self.hub.publish(("ld-flags", env.id), flags_put_frame(env))
            return
        for item in change.items:
            if item.kind not in ("flags", "segments"):
                continue
            data = item.new.data
            if data is None or is_deleted(data):
                self.hub.publish(("ld-all", env.id), _frame("delete", {"path": f"/{item.kind}/{item.key}",
                                                                       "version": item.new.version}))
                if item.kind == "flags":
                    self.hub.publish(("ld-flags", env.id), _frame("delete", {"path": f"/{item.key}",
                                                                             "version": item.new.version}))
                continue
            canonical = canonical_flag(data) if item.kind == "flags" else canonical_segment(data)
            self.hub.publish(("ld-all", env.id), _frame("patch", {"path": f"/{item.kind}/{item.key}",
                                                                  "data": canonical}))
            if item.kind == "flags":
                self.hub.publish(("ld-flags", env.id), _frame("patch", {"path": f"/{item.key}",
                                                                        "data": canonical}))

    def _clients(self, env: Environment, change: Change) -> None:
        """Re-evaluate each client topic of ``env`` once and send only what changed for that context.

        Only the flags the change can affect are evaluated again (a patch with thousands of client streams
        must not cost thousands of full evaluations on the reactor)."""
        topics = self._client_topics.get(env.id)
        if not topics:
            return
        affected: set[str] | None = None
        if change.items and all(i.kind in ("flags", "segments") for i in change.items):
            affected = flags_affected_by(live(env, "flags"), live(env, "segments"),
                                         {i.key for i in change.items if i.kind == "flags"},
                                         {i.key for i in change.items if i.kind == "segments"})
        for topic, state in list(topics.items()):
            if self.hub.count(topic) == 0:
                continue
            old = state.entries
            try:
                changed = self._refresh(env, state, affected)
            except Exception:
                log.failure("re-evaluating a client-side stream of {env} failed", env=env.id)
                continue
            new = state.entries or {}
            if old is None:
                self.hub.publish(topic, self._put(state))
                continue
            for key in (new if changed is None else sorted(k for k in changed if k in new)):
                entry = new[key]
                before = old.get(key)
                if before is None or _signature(before) != _signature(entry):
                    self.hub.publish(topic, _frame("patch", dict({"key": key}, **entry)))
            for key, before in (old.items() if changed is None else
                                [(k, old[k]) for k in sorted(changed) if k in old]):
                if key not in new:
                    item = env.item("flags", key)
                    version = item.version if item is not None and item.version > before["version"] \
                        else before["version"] + 1
                    self.hub.publish(topic, _frame("delete", {"key": key, "version": version}))

    def _drop_env(self, env_id: str) -> None:
        self._put_revision.pop(env_id, None)
        for topic in [("ld-all", env_id), ("ld-flags", env_id), ("ld-ping", env_id),
                      *self._client_topics.pop(env_id, {})]:
            self.hub.close_topic(topic)
