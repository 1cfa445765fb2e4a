"""Scale-out through Redis: one writer relayd mirrors its store to Redis, any number of readers follow it.

The writer talks to the vendors as usual and mirrors every environment; readers talk to no vendor and serve what
the writer wrote, so SDK traffic can be spread over many relays while the vendor sees one client. Layout under
the configured prefix ``P`` (every write of one environment is one atomic Lua script, so a reader never sees a
half-written change and every change has its sequence number)::

    P:env:<family>:<id>   the environment as snapshot.dump() JSON: items with versions and tombstones, metadata
    P:envs                set of "<family>:<id>", every mirrored environment
    P:status              hash "<family>:<id>" -> the writer's upstream connection status of that environment
    P:seq                 incremented once per published change
    P:writer              the writer's heartbeat (SET PX ttl, refreshed every ttl/3): readers report whether it lives
    P:changes             pub/sub channel: {"seq": n, "op": "put"|"status"|"remove", "family": f, "id": i}

A reader loads everything at start and after every (re)subscription or sequence gap (a gap means lost messages),
and otherwise re-reads only the environment a message names; updates go through ``Environment.replace`` so its SDK
streams get exactly the changed items. Redis being unreachable never blocks: each connection reconnects with
backoff, commands fail fast while it is down, the local store keeps serving, and reader environments turn
INTERRUPTED. The URL may hold a password: only ``RedisURL.safe`` (no credentials) is ever logged or shown.

txredisapi 1.6 is used directly (a Twisted-native client with Deferreds and pub/sub): ``RedisFactory`` and
``startConnecting(endpoint)``, one factory per connection, the subscriber on its own connection.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    ensureDeferred,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from relayd.config import RedisConfig
from relayd.harness.metrics import MetricsBuffer
from relayd.logs import Logger
from relayd.snapshot import FORMAT, _decode_meta, dump
from relayd.store import (
    INITIALIZING,
    INTERRUPTED,
    Change,
    Environment,
    Item,
    Status,
    Store,
)

log = Logger()

STORE_ERROR = "STORE_ERROR"
_DB_META = ("database", "db_server", "db_prefix")


# ---------------------------------------------------------------------------------------------- URL


@dataclass(frozen=True)
class RedisURL:
    """A parsed ``redis://[[user]:password@]host[:port][/db]`` or ``rediss://`` (TLS) URL."""

    host: str
    port: int = 6379
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr, a log line or /status

    @property
    def safe(self) -> str:
        """The URL without credentials: what logs and /status show."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"


def parse_url(url: str) -> RedisURL:
    """Parse a Redis URL; the ValueError never quotes the URL (it may hold a password)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError("bad Redis URL: redis://[:password@]host:port/db or rediss:// for TLS") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("bad Redis URL: the scheme must be redis:// or rediss:// (TLS)")
    if not parts.hostname:
        raise ValueError("bad Redis URL: no host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("bad Redis URL: the path must be a database number (/0)")
    return RedisURL(host=parts.hostname, port=port or 6379, db=int(path or 0), tls=parts.scheme == "rediss",
                    username=unquote(parts.username) if parts.username else None,
                    password=unquote(parts.password) if parts.password is not None else None)


# ---------------------------------------------------------------------------------------------- one connection


class RedisLink:
    """One Redis connection kept open with backoff; commands fail fast (never queue) while it is down.

    ``on_up(link)`` runs once the connection is usable (AUTH and SELECT done), ``on_down(link)`` when a usable
    connection is lost; with ``subscriber=True`` the connection is a pub/sub one and ``on_message(channel,
    message)`` hears every message.
    """

    def __init__(self, url: RedisURL, reactor: Any, name: str, *, subscriber: bool = False,
                 on_up: Callable[[RedisLink], Any] | None = None,
                 on_down: Callable[[RedisLink], Any] | None = None,
                 on_message: Callable[[str, str], Any] | None = None,
                 connect_timeout: float = 5.0, reply_timeout: float | None = 10.0,
                 initial_delay: float = 0.5, max_delay: float = 10.0) -> None:
        self.url = url
        self.name = name
        self.conn: txredisapi.BaseRedisProtocol | None = None
        self._reactor = reactor
        self._on_up = on_up
        self._on_down = on_down
        self._on_message = on_message
        self._failures = 0
        self._factory = _Factory(self, subscriber, reply_timeout, initial_delay, max_delay)
        endpoint: Any = HostnameEndpoint(reactor, url.host, url.port, timeout=connect_timeout)
        if url.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(url.host), endpoint)
        self._endpoint = _LoggingEndpoint(endpoint, self)
        self._started = False

    @property
    def up(self) -> bool:
        return self.conn is not None

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._factory.startConnecting(self._endpoint)

    def stop(self) -> Deferred[Any]:
        """Stop reconnecting and close the connection; fires when it is closed."""
        if not self._started:
            return succeed(None)
        self._started = False
        conn, self.conn = self.conn, None
        d = self._factory.disconnect()
        if conn is not None and self._on_down is not None:
            self._on_down(self)
        return d

    def command(self, *args: Any) -> Deferred[Any]:
        """Run one command; fails at once with txredisapi.ConnectionError when the link is down."""
        if self.conn is None:
            return maybeDeferred(_raise, txredisapi.ConnectionError("not connected"))
        return maybeDeferred(self.conn.execute_command, *args)

    def subscribe(self, channel: str) -> Deferred[Any]:
        if self.conn is None:
            return maybeDeferred(_raise, txredisapi.ConnectionError("not connected"))
        return maybeDeferred(self.conn.subscribe, channel)

    # -- called by the factory and its protocols

    def _connected(self, conn: Any) -> None:
        if not self._started or not conn.connected:
            return
        if self._failures:
            log.info("Redis {server} ({name}) reachable again", server=self.url.safe, name=self.name)
        self._failures = 0
        self.conn = conn
        keepalive = getattr(conn.transport, "setTcpKeepAlive", None)  # not on a TLS wrapper
        if keepalive is not None:
            keepalive(1)  # a half-open subscriber connection would otherwise wait forever
        if self._on_up is not None:
            self._on_up(self)

    def _lost(self, conn: Any, reason: Failure | None) -> None:
        if self.conn is not conn:
            return
        self.conn = None
        if self._started:
            log.warn("Redis {server} ({name}) connection lost: {error}; reconnecting", server=self.url.safe,
                     name=self.name, error=_describe(reason))
            self._failures = 1
        if self._on_down is not None:
            self._on_down(self)

    def _failed(self, reason: Failure | str) -> None:
        """A connection attempt failed: logged once per outage, then at debug level."""
        self._failures += 1
        error = reason if isinstance(reason, str) else _describe(reason)
        level = log.warn if self._failures == 1 else log.debug
        level("Redis {server} ({name}) unreachable: {error}; retrying with backoff", server=self.url.safe,
              name=self.name, error=error)

    def _message(self, channel: Any, message: Any) -> None:
        if self._on_message is not None:
            self._on_message(_text(channel), _text(message))


def _raise(error: Exception) -> None:
    raise error


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _describe(reason: Failure | None) -> str:
    if reason is None:
        return "closed"
    return reason.getErrorMessage() or getattr(reason.type, "__name__", "error")


class _LoggingEndpoint:
    """Wraps the client endpoint so that failed connection attempts are logged (ClientService only retries)."""

    def __init__(self, endpoint: Any, link: RedisLink) -> None:
        self._endpoint = endpoint
        self._link = link

    def __repr__(self) -> str:  # ClientService logs its retries with it: the safe URL, never the password
        return f"<Redis {self._link.url.safe} ({self._link.name})>"

    def connect(self, factory: Any) -> Deferred[Any]:
        d = self._endpoint.connect(factory)

        def failed(f: Failure) -> Failure:
            from twisted.internet.defer import CancelledError
            if not f.check(CancelledError):
                self._link._failed(f)
            return f

        return d.addErrback(failed)


class _Factory(txredisapi.RedisFactory):
    """A one-connection txredisapi factory that reports to its RedisLink instead of a connection pool.

    A failed AUTH or SELECT makes txredisapi stop reconnecting for good; Redis answers LOADING while it reads its
    data after a restart, so here it is logged and retried with the usual backoff instead.
    """

    def __init__(self, link: RedisLink, subscriber: bool, reply_timeout: float | None, initial_delay: float,
                 max_delay: float) -> None:
        url = link.url
        super().__init__(url.safe, url.db or None, 1, isLazy=True, password=url.password,
                         replyTimeout=None if subscriber else reply_timeout, convertNumbers=False,
                         username=url.username)
        self.protocol = _Subscriber if subscriber else txredisapi.RedisProtocol
        self.initialDelay = initial_delay
        self.maxDelay = max_delay
        self._link = link

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        p.link = self._link
        reactor = self._link._reactor
        p.whenConnected().addCallback(lambda conn: reactor.callLater(0, self._link._connected, conn))
        lost = p.connectionLost

        def connection_lost(reason: Failure) -> None:
            try:
                lost(reason)
            finally:
                self._link._lost(p, reason)

        p.connectionLost = connection_lost
        return p

    def addConnection(self, conn: Any) -> None:
        pass  # no pool: the link holds its one connection

    def stopTrying(self) -> Deferred[Any]:  # AUTH/SELECT failed: keep retrying (see the class docstring)
        return succeed(None)

    def connectionError(self, why: str) -> None:
        self._link._failed(why)


class _Subscriber(txredisapi.SubscriberProtocol):
    link: RedisLink

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.link._message(channel, message)


# ---------------------------------------------------------------------------------------------- shared helpers


class _Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.envs = f"{prefix}:envs"
        self.status = f"{prefix}:status"
        self.seq = f"{prefix}:seq"
        self.writer = f"{prefix}:writer"
        self.changes = f"{prefix}:changes"

    def env(self, family: str, env_id: str) -> str:
        return f"{self.prefix}:env:{family}:{env_id}"


def _member(family: str, env_id: str) -> str:
    return f"{family}:{env_id}"


def _split(member: str) -> tuple[str, str]:
    family, _, env_id = member.partition(":")
    return family, env_id


def db_meta(url: RedisURL, prefix: str) -> dict[str, str]:
    """The ``env.meta`` entries that make /status show the dataStoreStatus fields of the shared store."""
    return {"database": "redis", "db_server": url.safe, "db_prefix": prefix}


def encode_status(status: Status) -> str:
    return json.dumps({"state": status.state, "since": status.since, "error_kind": status.error_kind,
                       "error_time": status.error_time, "error_message": status.error_message},
                      separators=(",", ":"))


def decode_status(text: str | None) -> Status | None:
    if not text:
        return None
    try:
        doc = json.loads(text)
        return Status(str(doc["state"]), float(doc.get("since") or 0), doc.get("error_kind"),
                      doc.get("error_time"), doc.get("error_message"))
    except (ValueError, KeyError, TypeError):
        return None


# Everything one change does, atomically: readers never see a half-written change, and the sequence number
# published is exactly the one of this write.
_WRITE = """
local op = ARGV[2]
if op == 'remove' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
else
  if ARGV[3] ~= '' then
    redis.call('SET', KEYS[1], ARGV[3])
    redis.call('SADD', KEYS[2], ARGV[1])
  end
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
end
local seq = redis.call('INCR', KEYS[4])
redis.call('PUBLISH', ARGV[7], cjson.encode({seq = seq, op = op, family = ARGV[5], id = ARGV[6]}))
return seq
"""


# ---------------------------------------------------------------------------------------------- writer


class RedisWriter(Service):
    """Mirror the local store to Redis (role = writer), debounced per environment, plus the writer heartbeat."""

    name = "redis-writer"

    def __init__(self, store: Store, url: str | RedisURL, prefix: str, reactor: Any, *, delay: float = 0.1,
                 heartbeat_ttl: float = 30.0, prune_delay: float = 30.0, **link_options: Any) -> None:
        self.store = store
        self.url = url if isinstance(url, RedisURL) else parse_url(url)
        self.keys = _Keys(prefix)
        self.clock: IReactorTime = reactor
        self.delay = delay
        self.heartbeat_ttl = heartbeat_ttl
        self.prune_delay = prune_delay
        self.meta = db_meta(self.url, prefix)
        self.link = RedisLink(self.url, reactor, "writer", on_up=self._up, **link_options)
        self._dirty: dict[tuple[str, str], str] = {}  # env -> "put" | "status" | "remove"
        self._writing: dict[tuple[str, str], Deferred[Any]] = {}
        self._timer: IDelayedCall | None = None
        self._prune: IDelayedCall | None = None
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = reactor
        self._unsubscribe: Callable[[], None] | None = None
        self._identity = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": reactor.seconds()})

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self.store.subscribe(self._changed)
        for env in self.store:
            env.meta.update(self.meta)
            self._mark(env, "put" if env.initialized else "status")
        self.link.start()
        self._beat.start(self.heartbeat_ttl / 3, now=False)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
        for call in (self._timer, self._prune):
            if call is not None and call.active():
                call.cancel()
        if self._beat.running:
            self._beat.stop()
        # a clean stop says so at once: readers report INTERRUPTED now rather than when the heartbeat expires
        pending = list(self._writing.values())
        d = DeferredList(pending) if pending else succeed(None)
        d.addCallback(lambda _: self.link.command("DEL", self.keys.writer) if self.link.up else None)
        d.addErrback(lambda f: None)
        d.addCallback(lambda _: self.link.stop())
        return d

    # -- observing the store

    def _changed(self, change: Change) -> None:
        env = change.env
        if change.op == "add":
            env.meta.update(self.meta)
            self._mark(env, "status")
        elif change.op == "remove":
            self._mark(env, "remove")
        elif change.op == "status":
            self._mark(env, "status")
        else:
            self._mark(env, "put")

    def _mark(self, env: Environment, op: str) -> None:
        key = (env.family, env.id)
        old = self._dirty.get(key)
        if old is None or old == "remove" or op == "remove" or op == "put":
            self._dirty[key] = op
        self._schedule(self.delay)

    def _schedule(self, delay: float) -> None:
        if self.running and self.link.up and (self._timer is None or not self._timer.active()):
            self._timer = self.clock.callLater(delay, self._flush)

    def _flush(self) -> None:
        if not self.link.up:
            return  # everything is written again on reconnect
        for key in list(self._dirty):
            if key not in self._writing:
                self._write(key, self._dirty.pop(key))

    def _write(self, key: tuple[str, str], op: str) -> None:
        family, env_id = key
        env = self.store.environment(family, env_id)
        doc = status = ""
        if env is None:
            op = "remove"
        else:
            if op == "remove":
                op = "put"  # removed and added again before the write
            status = encode_status(env.status)
            if op == "put" and env.initialized:
                doc = json.dumps(dump(env), separators=(",", ":"))  # on the reactor: a consistent copy
        k = self.keys
        d = self.link.command("EVAL", _WRITE, 4, k.env(family, env_id), k.envs, k.status, k.seq,
                              _member(family, env_id), op, doc, status, family, env_id, k.changes)
        self._writing[key] = d

        def failed(f: Failure) -> None:
            log.warn("writing {family} environment {env} to Redis {server} failed: {error}", family=family,
                     env=env_id, server=self.url.safe, error=f.getErrorMessage())
            if key not in self._dirty:
                self._dirty[key] = op
            self._schedule(max(self.delay, 1.0))

        def done(_: Any) -> None:
            self._writing.pop(key, None)
            if key in self._dirty:
                self._schedule(self.delay)

        d.addCallbacks(lambda seq: None, failed)
        d.addBoth(done)

    # -- connection

    def _up(self, link: RedisLink) -> None:
        log.info("mirroring the store to Redis {server} under {prefix}:", server=self.url.safe,
                 prefix=self.keys.prefix)
        for env in self.store:  # Redis may have restarted empty, or missed writes while it was unreachable
            self._mark(env, "put" if env.initialized else "status")
        self._flush()
        # after the rewrite, on the same connection: a reader that sees the heartbeat knows the index is complete
        self._heartbeat()
        if self._prune is None or not self._prune.active():
            self._prune = self.clock.callLater(self.prune_delay, self._prune_stale)

    def _heartbeat(self) -> None:
        if self.link.up:
            self.link.command("SET", self.keys.writer, self._identity, "PX", int(self.heartbeat_ttl * 1000)) \
                .addErrback(lambda f: log.debug("Redis heartbeat failed: {error}", error=f.getErrorMessage()))

    def _prune_stale(self) -> None:
        """Remove environments this writer no longer has (e.g. taken out of its configuration while it was down).

        Done ``prune_delay`` after connecting so that the sources have registered their environments first.
        """
        def prune(members: Any) -> None:
            for member in members or ():
                family, env_id = _split(_text(member))
                if self.store.environment(family, env_id) is None and (family, env_id) not in self._dirty:
                    log.info("removing {family} environment {env} from Redis: this writer no longer has it",
                             family=family, env=env_id)
                    self._dirty[(family, env_id)] = "remove"
            self._flush()

        self.link.command("SMEMBERS", self.keys.envs).addCallbacks(prune, lambda f: None)


# ---------------------------------------------------------------------------------------------- reader


class RedisReader(Service):
    """Follow the store a writer mirrors to Redis (role = reader): no vendor is contacted."""

    name = "redis-reader"

    def __init__(self, store: Store, url: str | RedisURL, prefix: str, reactor: Any, *,
                 check_interval: float = 5.0, **link_options: Any) -> None:
        self.store = store
        self.url = url if isinstance(url, RedisURL) else parse_url(url)
        self.keys = _Keys(prefix)
        self.clock: IReactorTime = reactor
        self.check_interval = check_interval
        self.meta = db_meta(self.url, prefix)
        self.commands = RedisLink(self.url, reactor, "reader", on_up=self._commands_up, on_down=self._down,
                                  **link_options)
        self.subscriber = RedisLink(self.url, reactor, "subscriber", subscriber=True, on_up=self._subscriber_up,
                                    on_down=self._down, on_message=self._message, **link_options)
        self.writer_alive = False
        self.subscribed = False
        self.synced = False  # a full load succeeded since the last (re)subscription
        self._writer_status: dict[tuple[str, str], Status] = {}
        self._last_seq: int | None = None
        self._need_sync = True
        self._syncing: Deferred[Any] | None = None
        self._check = LoopingCall(self._tick)
        self._check.clock = reactor

    def startService(self) -> None:
        super().startService()
        self.commands.start()
        self.subscriber.start()
        self._check.start(self.check_interval, now=False)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._check.running:
            self._check.stop()
        return DeferredList([self.subscriber.stop(), self.commands.stop()])

    # -- connection events

    def _commands_up(self, link: RedisLink) -> None:
        self._maybe_sync()

    def _subscriber_up(self, link: RedisLink) -> None:
        def subscribed(_: Any) -> None:
            log.info("following Redis {server} under {prefix}:", server=self.url.safe, prefix=self.keys.prefix)
            self.subscribed = True
            self._need_sync = True  # a (re)subscription is a gap: messages may have been lost meanwhile
            self._maybe_sync()

        link.subscribe(self.keys.changes).addCallbacks(subscribed, lambda f: log.warn(
            "subscribing to {channel} failed: {error}", channel=self.keys.changes, error=f.getErrorMessage()))

    def _down(self, link: RedisLink) -> None:
        if link is self.subscriber:
            self.subscribed = False
            self._last_seq = None  # Redis may come back restarted, its sequence from 0
        self._need_sync = True
        self.synced = False
        self._update_all()

    def _tick(self) -> None:
        """Watch the writer's heartbeat, and retry a full load that failed."""
        if self._need_sync:
            self._maybe_sync()
        elif self.commands.up:
            self.commands.command("GET", self.keys.writer).addCallbacks(self._writer_seen, lambda f: None)

    def _writer_seen(self, value: Any) -> None:
        alive = value is not None
        if alive != self.writer_alive:
            self.writer_alive = alive
            if alive:
                log.info("the Redis writer is alive")
                self._need_sync = True  # its index is complete again: drop what it no longer has
                self._maybe_sync()
            else:
                log.warn("the Redis writer's heartbeat expired: serving its last data as INTERRUPTED")
            self._update_all()

    # -- messages

    def _message(self, channel: str, message: str) -> None:
        try:
            msg = json.loads(message)
            seq = int(msg["seq"])
            op = str(msg["op"])
            family, env_id = str(msg["family"]), str(msg["id"])
        except (ValueError, KeyError, TypeError):
            log.warn("ignoring a malformed message on {channel}", channel=channel)
            return
        last = self._last_seq
        if last is not None and seq > last + 1:
            log.info("Redis change sequence jumped from {last} to {seq}: reloading everything", last=last, seq=seq)
            self._need_sync = True
            self._maybe_sync()
        self._last_seq = seq if last is None else max(last, seq)
        if op == "remove":
            self._writer_status.pop((family, env_id), None)
            if self.store.environment(family, env_id) is not None:
                log.info("{family} environment {env} removed by the writer", family=family, env=env_id)
                self.store.remove(family, env_id)
        elif op == "status":
            self.commands.command("HGET", self.keys.status, _member(family, env_id)).addCallbacks(
                lambda text: self._apply_status(family, env_id, text), self._read_failed)
        else:
            self._read_env(family, env_id)

    def _read_env(self, family: str, env_id: str) -> Deferred[Any]:
        doc = self.commands.command("GET", self.keys.env(family, env_id))
        status = self.commands.command("HGET", self.keys.status, _member(family, env_id))
        d = DeferredList([doc, status], fireOnOneErrback=True, consumeErrors=True)
        d.addCallback(lambda results: self._apply(family, env_id, results[0][1], results[1][1]))
        d.addErrback(self._read_failed)
        return d

    def _read_failed(self, f: Failure) -> None:
        error = getattr(f.value, "subFailure", f)
        log.warn("reading from Redis {server} failed: {error}; reloading everything when possible",
                 server=self.url.safe, error=error.getErrorMessage())
        self._need_sync = True

    # -- full load

    def _maybe_sync(self) -> None:
        if not (self.running and self._need_sync and self.subscribed and self.commands.up):
            return
        if self._syncing is not None:
            return  # _sync_done looks at _need_sync again
        self._need_sync = False
        self._syncing = ensureDeferred(self._sync())
        self._syncing.addErrback(self._read_failed)
        self._syncing.addBoth(self._sync_done)

    def _sync_done(self, _: Any) -> None:
        self._syncing = None
        self._maybe_sync()

    async def _sync(self) -> None:
        k = self.keys
        c = self.commands
        # all on one connection, in this order: whatever changes after GET seq is announced with a higher one
        seq, writer, members, statuses = await DeferredList(
            [c.command("GET", k.seq), c.command("GET", k.writer), c.command("SMEMBERS", k.envs),
             c.command("HGETALL", k.status)], fireOnOneErrback=True, consumeErrors=True)
        self.writer_alive = writer[1] is not None
        wanted = {_split(_text(m)) for m in members[1] or ()}
        for env in self.store:
            # Only a live writer's index is complete (it sets its heartbeat after rewriting everything): after
            # a Redis restart the index is empty until the writer is back, and SDKs keep their stale data.
            if self.writer_alive and (env.family, env.id) not in wanted:
                log.info("{family} environment {env} is no longer in Redis: removed", family=env.family,
                         env=env.id)
                self._writer_status.pop((env.family, env.id), None)
                self.store.remove(env.family, env.id)
        table = statuses[1] or {}
        if isinstance(table, list):  # HGETALL as a flat list
            table = dict(zip(table[::2], table[1::2]))
        self._last_seq = max(self._last_seq or 0, int(seq[1] or 0))
        docs = await DeferredList([c.command("GET", k.env(f, i)) for f, i in sorted(wanted)],
                                  fireOnOneErrback=True, consumeErrors=True)
        for (family, env_id), (_, doc) in zip(sorted(wanted), docs):
            self._apply(family, env_id, doc, table.get(_member(family, env_id)))
        self.synced = True
        log.info("loaded {n} environment(s) from Redis {server}", n=len(wanted), server=self.url.safe)

    # -- applying

    def _apply(self, family: str, env_id: str, text: Any, status_text: Any) -> None:
        if text is None:
            return  # removed meanwhile: its "remove" message follows
        try:
            doc = json.loads(_text(text))
            if doc.get("format") != FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            data = {kind: {key: Item(int(v[0]), v[1]) for key, v in items.items()}
                    for kind, items in doc.get("items", {}).items()}
            meta = {key: _decode_meta(value) for key, value in doc.get("meta", {}).items()}
        except (ValueError, TypeError, AttributeError, IndexError) as e:
            log.warn("{family} environment {env} in Redis not usable: {error}", family=family, env=env_id,
                     error=str(e))
            return
        meta.update(self.meta)
        env = self.store.add(family, env_id)
        if env.meta != meta:
            env.meta.clear()
            env.meta.update(meta)
        for kind in env.kinds():
            data.setdefault(kind, {})  # a kind the writer no longer has: its items are deleted
        env.replace(data)
        self._apply_status(family, env_id, status_text)

    def _apply_status(self, family: str, env_id: str, text: Any) -> None:
        status = decode_status(_text(text) if text is not None else None)
        if status is not None:
            self._writer_status[(family, env_id)] = status
        env = self.store.environment(family, env_id)
        if env is not None:
            self._update(env)

    def _update_all(self) -> None:
        for env in self.store:
            self._update(env)

    def _update(self, env: Environment) -> None:
        """A reader's status mirrors the writer's, unless Redis or the writer is gone."""
        if not (self.commands.up and self.subscriber.up):
            env.set_status(INTERRUPTED, error_kind=STORE_ERROR, error_message=f"Redis {self.url.safe} unreachable")
            return
        if not self.writer_alive:
            env.set_status(INTERRUPTED, error_kind=STORE_ERROR,
                           error_message="the writer relayd is not running (its Redis heartbeat expired)")
            return
        ws = self._writer_status.get((env.family, env.id))
        state = ws.state if ws is not None else INITIALIZING
        if state == INITIALIZING and env.initialized:
            state = INTERRUPTED  # serving data the writer has not confirmed since it started
        if ws is not None and ws.error_kind is not None:
            env.set_status(state, error_kind=ws.error_kind, error_message=ws.error_message)
        else:
            env.set_status(state)


# ---------------------------------------------------------------------------------------------- wiring


def follows_redis(config: Any) -> bool:
    """True for a reader: it must start no vendor upstream service (the writer talks to the vendors)."""
    redis: RedisConfig | None = getattr(config, "redis", None)
    return redis is not None and redis.role == "reader"


class HarnessMetricsRelay(Service):
    """Harness SDK metrics posted to readers reach the SaaS through the writer, the only one with SaaS tokens.

    A reader moves its aggregated buffer to a Redis list every ``interval``; the writer drains that list into its
    own buffer, which its forwarder posts. A body leaves one side only once Redis has it (a failed RPUSH is
    restored into the reader's buffer), and merging is by count, so nothing is lost and nothing counted twice.
    """

    name = "harness-metrics-relay"
    BATCH = 100

    def __init__(self, buffer: MetricsBuffer, link: RedisLink, prefix: str, role: str, clock: IReactorTime,
                 interval: float = 10.0) -> None:
        self.buffer = buffer
        self.link = link
        self.key = f"{prefix}:harness-metrics"
        self.role = role
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        self.interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self.tick() if self.role == "reader" else None  # hand over what is buffered before going

    def tick(self) -> Deferred[Any]:
        d = self._push() if self.role == "reader" else self._drain()
        return d.addErrback(lambda f: log.warn("moving Harness metrics through Redis failed: {error}",
                                               error=f.getErrorMessage()))

    def _push(self) -> Deferred[Any]:
        pushes = []
        for env_id in self.buffer.environments():
            body = self.buffer.take(env_id)
            if body is None:
                continue
            d = self.link.command("RPUSH", self.key, json.dumps({"env": env_id, "body": body}))
            d.addErrback(self._restore, env_id, body)
            pushes.append(d)
        return DeferredList(pushes, consumeErrors=True) if pushes else succeed(None)

    def _restore(self, failure: Failure, env_id: str, body: dict[str, Any]) -> Failure:
        """Redis did not take the body: it goes back into the buffer for the next tick."""
        self.buffer.restore(env_id, body)
        return failure

    def _drain(self) -> Deferred[Any]:
        def got(items: Any) -> Deferred[Any] | None:
            for raw in items or ():
                try:
                    item = json.loads(_text(raw))
                    self.buffer.restore(item["env"], item["body"])
                except (ValueError, KeyError, TypeError):
                    log.warn("a malformed Harness metrics entry in Redis was dropped")
            if items and len(items) == self.BATCH:
                return self._drain()
            return None

        return self.link.command("LPOP", self.key, self.BATCH).addCallback(got)


def redis_service(store: Store, config: RedisConfig, reactor: Any, **options: Any) -> Service:
    """The writer's mirror or the reader's follower, as configured."""
    url = parse_url(config.url)
    if config.role == "reader":
        return RedisReader(store, url, config.prefix, reactor, **options)
    return RedisWriter(store, url, config.prefix, reactor, **options)


__all__ = ["HarnessMetricsRelay", "RedisLink", "RedisReader", "RedisURL", "RedisWriter", "db_meta", "decode_status",
           "encode_status", "follows_redis", "parse_url", "redis_service"]
