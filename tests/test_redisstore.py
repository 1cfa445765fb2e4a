"""Scale-out through Redis: a writer relayd mirrors its store, readers follow it, against a real redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, tcp
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from relayd.config import RedisConfig
from relayd.health import HealthAPI
from relayd.redisstore import (
    RedisLink,
    RedisReader,
    RedisWriter,
    follows_redis,
    parse_url,
    redis_service,
)
from relayd.store import INTERRUPTED, VALID, Change, Item, ItemChange, Store

from .conftest import eventually, free_port

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (CI installs it: "
                                "apt-get install redis-server)")

FAST = {"initial_delay": 0.05, "max_delay": 0.2, "connect_timeout": 1.0, "reply_timeout": 2.0}


class RedisServer:
    """A private redis-server on a free loopback port; stop() and start() again keep the port (a restart)."""

    def __init__(self, folder: Path, password: str | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [str(REDIS_SERVER), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", ""]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    servers: list[RedisServer] = []

    def make(password: str | None = None) -> RedisServer:
        folder = tmp_path / f"redis{len(servers)}"
        folder.mkdir()
        server = RedisServer(folder, password)
        servers.append(server)
        server.start()
        return server

    yield make
    try:
        # every test closes its connections: nothing of ours may be left talking to a Redis port
        ports = {server.port for server in servers}
        left = [s for s in reactor.getReaders() + reactor.getWriters()
                if isinstance(s, tcp.Client) and s.getPeer().port in ports]
        assert left == [], left
    finally:
        for server in servers:
            server.stop()



def flags(**versions: int) -> dict[str, Item]:
    return {key: Item(v, {"key": key, "version": v}) for key, v in versions.items()}


def writer_for(store: Store, url: str, **options: Any) -> RedisWriter:
    return RedisWriter(store, url, "t", reactor, **{"delay": 0.01, "prune_delay": 0.0, **FAST, **options})


def reader_for(store: Store, url: str, **options: Any) -> RedisReader:
    return RedisReader(store, url, "t", reactor, **{"check_interval": 0.05, **FAST, **options})


# ---------------------------------------------------------------------------------------------- URL parsing


def test_urls_parse_and_never_show_the_password() -> None:
    u = parse_url("redis://:s3cr%40t@cache.example:6380/2")
    assert (u.host, u.port, u.db, u.tls, u.username, u.password) == ("cache.example", 6380, 2, False, None, "s3cr@t")
    assert u.safe == "redis://cache.example:6380/2"
    assert "s3cr" not in repr(u)
    t = parse_url("rediss://relay:pw@[::1]")
    assert (t.host, t.port, t.db, t.tls, t.username, t.password) == ("::1", 6379, 0, True, "relay", "pw")
    assert t.safe == "rediss://[::1]:6379/0"
    for bad in ("http://:pw@h/0", "redis://:pw@h/zero", "redis://:pw@h:notaport/0", "redis://:pw@/0"):
        with pytest.raises(ValueError) as e:
            parse_url(bad)
        assert "pw" not in str(e.value)


def test_reader_role_is_what_vendor_sources_must_skip() -> None:
    from relayd.config import Config
    assert follows_redis(Config(redis=RedisConfig(role="reader")))
    assert not follows_redis(Config(redis=RedisConfig(role="writer")))
    assert not follows_redis(Config())
    assert isinstance(redis_service(Store(reactor), RedisConfig(role="reader"), reactor), RedisReader)
    assert isinstance(redis_service(Store(reactor), RedisConfig(), reactor), RedisWriter)


# ---------------------------------------------------------------------------------------------- writer -> reader


@pytest_twisted.ensureDeferred
async def test_a_writer_change_reaches_the_reader_as_exactly_the_changed_items(redis_server: Any) -> None:
    server = redis_server()
    wstore, rstore = Store(reactor), Store(reactor)
    writer, reader = writer_for(wstore, server.url), reader_for(rstore, server.url)
    writer.startService()
    reader.startService()
    try:
        wenv = wstore.add("launchdarkly", "e1", {"name": "Prod", "sdk_key": "sdk-1"})
        wenv.replace({"flags": flags(a=1, b=1, c=1), "segments": {}})
        wenv.set_status(VALID)
        await eventually(lambda: rstore.environment("launchdarkly", "e1") is not None
                         and rstore.environment("launchdarkly", "e1").status.state == VALID)
        renv = rstore.environment("launchdarkly", "e1")
        assert dict(renv.all("flags")) == {k: {"key": k, "version": 1} for k in "abc"}
        assert renv.meta["name"] == "Prod" and renv.meta["sdk_key"] == "sdk-1"

        seen: list[Change] = []
        renv.subscribe(seen.append)
        wenv.upsert("flags", "b", 2, {"key": "b", "version": 2})
        wenv.delete("flags", "c", 2)
        took = await eventually(lambda: any(c.items for c in seen))
        assert took < 1.0
        await deferLater(reactor, 0.1, lambda: None)  # nothing else follows
        data_changes = [c for c in seen if c.op != "status"]
        assert [c.op for c in data_changes] == ["replace"]  # debounced: one write, one patch
        assert sorted(data_changes[0].items, key=lambda c: c.key) == [
            ItemChange("flags", "b", Item(1, {"key": "b", "version": 1}), Item(2, {"key": "b", "version": 2})),
            ItemChange("flags", "c", Item(1, {"key": "c", "version": 1}), Item(2, None)),
        ]
        assert renv.item("flags", "c") == Item(2, None)  # the tombstone travels too
    finally:
        await reader.stopService()
        await writer.stopService()


@pytest_twisted.ensureDeferred
async def test_a_reader_started_later_loads_everything_and_reports_the_shared_store(redis_server: Any) -> None:
    server = redis_server()
    wstore, rstore = Store(reactor), Store(reactor)
    h = wstore.add("harness", "env-uuid", {"api_keys": ("k1",), "api_key_hashes": frozenset({"ab"})})
    h.replace({"flags": flags(f=3), "segments": flags(s=1)})
    h.set_status(VALID)
    ld = wstore.add("launchdarkly", "e2", {"name": "Staging"})
    ld.replace({"flags": flags(x=7)})
    ld.set_status(INTERRUPTED, error_kind="NETWORK_ERROR", error_message="upstream down")
    writer = writer_for(wstore, server.url)
    writer.startService()
    reader = reader_for(rstore, server.url)
    try:
        await eventually(lambda: writer.link.up)
        await deferLater(reactor, 0.1, lambda: None)
        reader.startService()
        await eventually(lambda: reader.synced and len(rstore.environments()) == 2)
        rh = rstore.environment("harness", "env-uuid")
        assert rh.items("flags") == h.items("flags") and rh.items("segments") == h.items("segments")
        assert rh.meta["api_key_hashes"] == frozenset({"ab"})
        assert rh.status.state == VALID
        rl = rstore.environment("launchdarkly", "e2")
        assert rl.items("flags") == ld.items("flags")
        assert (rl.status.state, rl.status.error_kind) == (INTERRUPTED, "NETWORK_ERROR")  # mirrors the writer
        status = HealthAPI(rstore, reactor)._status_env(rl)["dataStoreStatus"]
        assert status["database"] == "redis" and status["dbPrefix"] == "t"
        assert status["dbServer"] == f"redis://127.0.0.1:{server.port}/0"
    finally:
        await reader.stopService()
        await writer.stopService()


@pytest_twisted.ensureDeferred
async def test_environment_removal_reaches_the_reader(redis_server: Any) -> None:
    server = redis_server()
    wstore, rstore = Store(reactor), Store(reactor)
    for env_id in ("keep", "drop"):
        wstore.add("launchdarkly", env_id).replace({"flags": flags(a=1)})
    writer, reader = writer_for(wstore, server.url), reader_for(rstore, server.url)
    writer.startService()
    reader.startService()
    try:
        await eventually(lambda: len(rstore.environments()) == 2)
        wstore.remove("launchdarkly", "drop")
        await eventually(lambda: rstore.environment("launchdarkly", "drop") is None)
        assert rstore.environment("launchdarkly", "keep") is not None
        # a reader started now does not see it either
        late = Store(reactor)
        reader2 = reader_for(late, server.url)
        reader2.startService()
        try:
            await eventually(lambda: reader2.synced)
            assert [e.id for e in late] == ["keep"]
        finally:
            await reader2.stopService()
    finally:
        await reader.stopService()
        await writer.stopService()


@pytest_twisted.ensureDeferred
async def test_writer_heartbeat_expiry_marks_reader_environments_interrupted(redis_server: Any) -> None:
    server = redis_server()
    wstore, rstore = Store(reactor), Store(reactor)
    wenv = wstore.add("launchdarkly", "e1")
    wenv.replace({"flags": flags(a=1)})
    wenv.set_status(VALID)
    writer = writer_for(wstore, server.url, heartbeat_ttl=0.6)
    reader = reader_for(rstore, server.url)
    writer.startService()
    reader.startService()
    try:
        await eventually(lambda: rstore.environment("launchdarkly", "e1") is not None
                         and rstore.environment("launchdarkly", "e1").status.state == VALID)
        await deferLater(reactor, 0.8, lambda: None)  # longer than the TTL: the heartbeat is being refreshed
        renv = rstore.environment("launchdarkly", "e1")
        assert renv.status.state == VALID
        await writer.link.stop()  # the writer dies without saying goodbye: only the TTL tells
        took = await eventually(lambda: renv.status.state == INTERRUPTED, timeout=3.0)
        assert took > 0.2  # it took the expiry, not the disconnect, to notice
        assert renv.status.error_kind == "STORE_ERROR"
        assert dict(renv.all("flags")) == {"a": {"key": "a", "version": 1}}  # stale data is still served
    finally:
        await reader.stopService()
        await writer.stopService()


@pytest_twisted.ensureDeferred
async def test_redis_restart_reader_resyncs_without_dropping_environments(redis_server: Any) -> None:
    server = redis_server()
    wstore, rstore = Store(reactor), Store(reactor)
    wenv = wstore.add("launchdarkly", "e1")
    wenv.replace({"flags": flags(a=1, b=1)})
    wenv.set_status(VALID)
    # the writer reconnects later than the reader: the reader first finds an empty Redis and no writer
    writer = writer_for(wstore, server.url, initial_delay=0.6, max_delay=0.6)
    reader = reader_for(rstore, server.url)
    writer.startService()
    reader.startService()
    removed: list[Change] = []
    rstore.subscribe(lambda c: removed.append(c) if c.op == "remove" else None)
    try:
        await eventually(lambda: rstore.environment("launchdarkly", "e1") is not None
                         and rstore.environment("launchdarkly", "e1").status.state == VALID)
        renv = rstore.environment("launchdarkly", "e1")
        server.stop()  # comes back empty: no persistence
        await eventually(lambda: renv.status.state == INTERRUPTED)
        wenv.upsert("flags", "a", 2, {"key": "a", "version": 2})  # changed while Redis was down
        assert renv.get("flags", "a") == {"key": "a", "version": 1}  # local data keeps being served
        server.start()
        await eventually(lambda: reader.synced)
        assert not writer.link.up and rstore.environment("launchdarkly", "e1") is renv
        assert renv.status.state == INTERRUPTED
        await eventually(lambda: renv.status.state == VALID and renv.get("flags", "a") == {"key": "a", "version": 2},
                         timeout=5.0)
        wenv.upsert("flags", "b", 2, {"key": "b", "version": 2})
        await eventually(lambda: renv.get("flags", "b") == {"key": "b", "version": 2})
        assert removed == [] and rstore.environment("launchdarkly", "e1") is renv  # SDK streams stayed open
    finally:
        await reader.stopService()
        await writer.stopService()


@pytest_twisted.ensureDeferred
async def test_no_password_in_logs(redis_server: Any) -> None:
    password = "hunter2-Very-Secret"
    server = redis_server(password=password)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    wstore, rstore = Store(reactor), Store(reactor)
    wstore.add("launchdarkly", "e1").replace({"flags": flags(a=1)})
    writer = writer_for(wstore, server.url)
    wrong = reader_for(Store(reactor), server.url.replace(password, "not-" + password))
    closed = free_port()
    unreachable = RedisLink(parse_url(f"redis://:{password}@127.0.0.1:{closed}/0"), reactor, "test", **FAST)
    reader = reader_for(rstore, server.url)
    for service in (writer, reader, wrong):
        service.startService()
    unreachable.start()
    try:
        await eventually(lambda: rstore.environment("launchdarkly", "e1") is not None)
        await deferLater(reactor, 0.3, lambda: None)  # a few failed attempts of the other two
        assert not wrong.commands.up and not unreachable.up
        await writer.link.stop()
        server.stop()
        await eventually(lambda: not reader.commands.up)
    finally:
        for service in (reader, wrong, writer):
            await service.stopService()
        await unreachable.stop()
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(f"{formatEvent(e)} {e!r}" for e in events)
    assert "unreachable" in text and "auth" in text.lower()  # the failures were logged ...
    assert f"127.0.0.1:{closed}" in text
    assert password not in text  # ... without the password
    assert password not in repr(rstore.environment("launchdarkly", "e1").meta)


# ---------------------------------------------------------------------------------------------- whole daemons


@pytest_twisted.ensureDeferred
async def test_two_relayds_share_state_through_redis(redis_server: Any, offline_dir: Path) -> None:
    import treq

    from relayd.config import loads
    from relayd.service import make_service

    server = redis_server()
    writer_port, reader_port = free_port(), free_port()
    writer = make_service(loads(f"""
[relayd]
listen = tcp:{writer_port}:interface=127.0.0.1
offline_dir = {offline_dir}
[redis]
url = {server.url}
role = writer
prefix = e2e
"""), reactor)
    reader = make_service(loads(f"""
[relayd]
listen = tcp:{reader_port}:interface=127.0.0.1
auth_secret = shared-secret
[redis]
url = {server.url}
role = reader
prefix = e2e
"""), reactor)
    assert reader.getServiceNamed("redis-reader") and writer.getServiceNamed("redis-writer")
    writer.startService()
    reader.startService()
    try:
        await eventually(lambda: {(e.family, e.id) for e in reader.store}
                         == {(e.family, e.id) for e in writer.store} != set(), timeout=5.0)
        response = await treq.get(f"http://127.0.0.1:{reader_port}/status", persistent=False)
        body = await response.json()
        assert len(body["environments"]) == len(writer.store.environments())
        for entry in body["environments"].values():
            assert entry["dataStoreStatus"]["database"] == "redis"
            assert entry["dataStoreStatus"]["dbPrefix"] == "e2e"
        for env in writer.store:
            mirrored = reader.store.environment(env.family, env.id)
            assert {k: mirrored.items(k) for k in env.kinds()} == {k: env.items(k) for k in env.kinds()}
    finally:
        await reader.stopService()
        await writer.stopService()


@pytest_twisted.ensureDeferred
async def test_harness_metrics_posted_to_readers_reach_the_writer_once(redis_server: Any) -> None:
    from relayd.harness.metrics import MetricsBuffer
    from relayd.redisstore import HarnessMetricsRelay

    server = redis_server()
    writer = writer_for(Store(reactor), server.url)
    readers = [reader_for(Store(reactor), server.url) for _ in range(2)]
    writer_buffer, reader_buffers = MetricsBuffer(), [MetricsBuffer(), MetricsBuffer()]
    relays = [HarnessMetricsRelay(writer_buffer, writer.link, "t", "writer", reactor, interval=0.05)]
    relays += [HarnessMetricsRelay(buf, r.commands, "t", "reader", reactor, interval=0.05)
               for buf, r in zip(reader_buffers, readers, strict=True)]
    services = [writer, *readers, *relays]
    for service in services:
        service.startService()
    body = {"metricsData": [{"timestamp": 1, "count": 2, "metricsType": "FFMETRICS",
                             "attributes": [{"key": "featureIdentifier", "value": "f"}]}]}
    try:
        await eventually(lambda: writer.link.up and all(r.commands.up for r in readers))
        reader_buffers[0].add("env", body)
        reader_buffers[1].add("env", body)
        reader_buffers[1].add("env", body)
        await eventually(lambda: "env" in writer_buffer.environments()
                         and not any(b.environments() for b in reader_buffers))
        await deferLater(reactor, 0.2, lambda: None)  # later ticks must not bring anything twice
        taken = writer_buffer.take("env")
        assert [m["count"] for m in taken["metricsData"]] == [6]
    finally:
        for service in reversed(services):
            await maybeDeferred(service.stopService)
