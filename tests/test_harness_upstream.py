"""relayd.harness.upstream against the loopback SaaS double (tests/doubles/harness_saas.py), plus the backoff and
re-auth state machine on a task.Clock with fake HTTP."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import defer, reactor, task, tcp
from twisted.internet.threads import deferToThread

from relayd.config import HarnessConfig
from relayd.harness import offline as harness_offline
from relayd.harness.api import HarnessAPI
from relayd.harness.directory import (
    AdminDirectory,
    ListedEnvironment,
    find_environment,
    listed_environment,
)
from relayd.harness.metrics import MetricsBuffer
from relayd.harness.upstream import (
    HarnessUpstream,
    KeySource,
    SaaSClient,
    admin_page,
    decode_jwt_payload,
    export,
    merge_newer,
    sha256_hex,
)
from relayd.health import HealthAPI
from relayd.sse import SSEHub
from relayd.sseclient import StreamError
from relayd.store import INTERRUPTED, OFF, VALID, Item, Store
from tests.conftest import eventually
from tests.doubles.harness_saas import HarnessSaaS, flag, segment
from tests.test_sseclient import FakeHTTP

ENV = "0d9d3c6e-1111-4aaa-8bbb-000000000001"
KEY = "server-key-0001"
ENV2 = "0d9d3c6e-2222-4aaa-8bbb-000000000002"
KEY2 = "server-key-0002"
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- pure parts


def test_decode_jwt_payload_without_verification():
    token = jwt.encode({"environment": ENV, "environmentIdentifier": "dev"}, "anything-anything-anything-anything", algorithm="HS256")
    assert decode_jwt_payload(token)["environmentIdentifier"] == "dev"
    for bad in ("x", "a.b.c", jwt.encode({"no": "env"}, "k" * 32, algorithm="HS256")):
        with pytest.raises(StreamError):
            decode_jwt_payload(bad)


def test_admin_page_both_shapes():
    bare = {"apiKeys": [{"key": "a"}], "pageCount": 3}
    assert admin_page(bare, "apiKeys") == ([{"key": "a"}], 3)
    old = {"status": "SUCCESS", "data": {"targets": [1, 2], "pageCount": 1}, "metaData": {}}
    assert admin_page(old, "targets") == ([1, 2], 1)
    assert admin_page({"targets": None}, "targets") == ([], None)
    with pytest.raises(StreamError):
        admin_page([], "targets")


def test_merge_newer_keeps_newer_store_items_and_tombstones():
    current = {"a": Item(5, {"v": 5}), "b": Item(1, {"v": 1}), "gone": Item(9, None)}
    fetched = {"a": {"version": 4}, "b": {"version": 2}}
    out = merge_newer(current, fetched)
    assert out == {"a": Item(5, {"v": 5}), "b": Item(2, {"version": 2}), "gone": Item(9, None)}


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_listed_environment_reads_the_embedded_key_list():
    item = {"id": ENV, "identifier": "dev", "name": "Dev", "project": "ignored-when-listed-under-a-project",
            "apiKeys": {"apiKeys": [{"apiKey": "****", "key": _h("a").upper()}, {"apiKey": "****", "key": "masked"},
                                    {"apiKey": "****"}, {"key": _h("b")}], "itemCount": 4, "pageCount": 1}}
    assert listed_environment("proj", item) == ListedEnvironment(ENV, "dev", "proj", frozenset({_h("a"), _h("b")}))
    # the embedded list is itself paged and holds only part of the keys: unknown, ask /admin/apikey
    partial = dict(item, apiKeys={"apiKeys": [{"key": _h("a")}], "itemCount": 150})
    assert listed_environment("proj", partial).hashes is None  # type: ignore[union-attr]
    assert listed_environment("", {"identifier": "qa", "project": "p2"}) == ListedEnvironment("", "qa", "p2",
                                                                                                 frozenset())
    assert listed_environment("proj", {"identifier": "", "id": ENV}) is None
    assert listed_environment("proj", ["not", "an", "object"]) is None


def test_find_environment_by_uuid_where_listed_else_by_identifiers():
    claims = {"environment": ENV, "environmentIdentifier": "dev", "projectIdentifier": "proj"}
    same_names_other_uuid = ListedEnvironment(ENV2, "dev", "proj", frozenset({"x"}))
    by_uuid = ListedEnvironment(ENV, "renamed", "elsewhere", frozenset({"y"}))
    by_names = ListedEnvironment("", "dev", "proj", frozenset({"z"}))
    assert find_environment([same_names_other_uuid, by_uuid, by_names], claims) is by_uuid
    assert find_environment([same_names_other_uuid, by_names], claims) is by_names
    assert find_environment([same_names_other_uuid], claims) is None
    assert find_environment([ListedEnvironment("", "dev", "other", frozenset())], claims) is None
    assert find_environment([by_names], {"environment": ENV}) is None


class _Calls:
    """A JSON caller whose answers the test gives, one pending Deferred per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, defer.Deferred[Any]]] = []

    def call(self, method: str, url: str, headers: Any, body: Any = None) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((urlsplit(url).path, d))
        return d

    def answer(self, body: Any) -> None:
        next(d for _, d in self.calls if not d.called).callback(body)


def _directory() -> tuple[task.Clock, _Calls, AdminDirectory]:
    clock = task.Clock()
    calls = _Calls()
    cfg = HarnessConfig(account="a", org="o", admin_token="t", api_keys=(KEY,), admin_url="https://a.test/cf")
    return clock, calls, AdminDirectory(cfg, calls, clock, max_age=60.0)


def test_directory_pass_is_shared_reused_for_max_age_and_not_kept_when_it_fails():
    clock, calls, directory = _directory()
    claims = {"environment": ENV}
    first = defer.ensureDeferred(directory.hashes_for(claims))
    second = defer.ensureDeferred(directory.hashes_for(claims))  # joins the pass in flight
    calls.answer({"status": "SUCCESS", "data": {"projects": [{"identifier": "proj"}], "pageCount": 1}})
    calls.answer({"environments": [{"id": ENV, "identifier": "dev", "apiKeys": {"apiKeys": [{"key": _h("k")}]}}],
                  "pageCount": 1})
    assert first.result == second.result == frozenset({_h("k")})
    assert [p for p, _ in calls.calls] == ["/cf/admin/projects", "/cf/admin/environments"]
    clock.advance(59)
    assert defer.ensureDeferred(directory.hashes_for({"environment": "unknown"})).result is None
    assert len(calls.calls) == 2 and directory.passes == 1  # reused
    clock.advance(2)
    failed = defer.ensureDeferred(directory.hashes_for(claims))  # too old: a new pass, which fails
    calls.calls[-1][1].errback(StreamError("ERROR_RESPONSE", "HTTP 500", status=500))
    errors: list[Any] = []
    failed.addErrback(errors.append)
    assert errors[0].check(StreamError) and errors[0].value.status == 500
    defer.ensureDeferred(directory.hashes_for(claims))
    assert directory.passes == 3  # the failure was not kept


def test_directory_without_a_projects_listing_answers_none():
    _, calls, directory = _directory()
    d = defer.ensureDeferred(directory.hashes_for({"environment": ENV}))
    calls.calls[0][1].errback(StreamError("ERROR_RESPONSE", "HTTP 404", status=404))
    assert d.result is None
    assert defer.ensureDeferred(directory.hashes_for({"environment": ENV})).result is None
    assert len(calls.calls) == 1


def test_directory_waiter_cancelled_leaves_the_pass_to_the_others():
    _, calls, directory = _directory()
    gone = directory.environments()
    kept = directory.environments()
    gone.cancel()
    gone.addErrback(lambda f: f.trap(defer.CancelledError))
    calls.answer({"projects": []})
    assert kept.result == []


# ---------------------------------------------------------------------------------------------- loopback



def health(store: Store) -> dict[str, str]:
    """Environment id -> streamStatus.state, through the real /health route."""
    stub = StubTreq(HealthAPI(store, reactor).resource())
    out: list[Any] = []
    stub.get("http://relayd.test/health").addCallback(lambda r: r.json()).addCallback(out.append)
    stub.flush()
    return {e["id"]: e["streamStatus"]["state"] for e in out[0]["environments"]}


@pytest.fixture
def saas():
    double = HarnessSaaS()
    pytest_twisted.blockon(defer.ensureDeferred(double.start()))
    env = double.add_env(ENV, KEY, identifier="dev", project="proj")
    env.flags = {f"f{i}": flag(f"f{i}") for i in range(3)}
    env.segments = {"beta": segment("beta", ["t1"])}
    env.targets = {f"t{i}": {"identifier": f"t{i}", "name": f"T{i}", "attributes": {}} for i in range(5)}
    env.extra_key_hashes = [hashlib.sha256(f"client-{i}".encode()).hexdigest() for i in range(4)]
    double.admin_page_size = 2  # 5 keys and 5 targets: 3 pages each
    yield double
    pytest_twisted.blockon(defer.ensureDeferred(double.stop()))
    sockets = reactor.getReaders() + reactor.getWriters()
    assert [s for s in sockets if isinstance(s, (tcp.Connection, tcp.Port))] == []
    assert reactor.getDelayedCalls() == []  # no retry, poll or connection attempt left behind


def config(saas: HarnessSaaS, **kw: Any) -> HarnessConfig:
    values: dict[str, Any] = dict(account="acc", org="org", admin_token="admin-token", api_keys=(KEY,),
                                  config_url=saas.url + "/api/1.0", admin_url=saas.url + "/gateway/cf",
                                  events_url=saas.url + "/events/api/1.0", target_poll=3600.0, metric_post=3600.0,
                                  stream=True, flag_poll=3600.0)
    values.update(kw)
    return HarnessConfig(**values)


class Running:
    def __init__(self, saas: HarnessSaaS, metrics: MetricsBuffer | None = None, **kw: Any) -> None:
        self.store = Store(reactor)
        self.upstream = HarnessUpstream(config(saas, **kw), self.store, reactor, metrics=metrics, timeout=2.0,
                                        read_timeout=0.5, initial_delay=0.02, max_delay=0.1, random=lambda: 0.0)
        self.source = self.upstream.sources[KEY]

    @property
    def env(self) -> Any:
        return self.store.environment("harness", ENV)


@pytest.fixture
def running(saas: HarnessSaaS):
    made: list[Running] = []

    def make(**kw: Any) -> Running:
        r = Running(saas, **kw)
        r.upstream.startService()
        made.append(r)
        return r
    yield make
    for r in made:
        pytest_twisted.blockon(r.upstream.stopService())


def connected(r: Running, saas: HarnessSaaS) -> Callable[[], bool]:
    return lambda: r.env is not None and r.env.status.state == VALID and saas.connected(ENV) == 1


def requests_to(saas: HarnessSaaS, path: str) -> list[tuple[dict[str, list[str]], dict[str, str]]]:
    out = []
    for _, uri, headers in saas.requests:
        parts = urlsplit(uri)
        if parts.path == path:
            out.append((parse_qs(parts.query), headers))
    return out


@pytest_twisted.ensureDeferred
async def test_startup_pages_every_admin_list_and_loads_the_store(saas, running):
    r = running(target_poll=3600.0)
    await r.source.ready
    await eventually(connected(r, saas))
    env = r.env
    assert set(env.all("flags")) == {"f0", "f1", "f2"}
    assert [t["identifier"] for t in env.get("segments", "beta")["included"]] == ["t1"]
    assert set(env.all("targets")) == {f"t{i}" for i in range(5)}
    hashes = {sha256_hex(KEY)} | {hashlib.sha256(f"client-{i}".encode()).hexdigest() for i in range(4)}
    assert env.meta["api_key_hashes"] == frozenset(hashes)
    assert env.meta["api_keys"] == (KEY,)
    assert requests_to(saas, "/gateway/cf/admin/apikey") == []  # the keys came from the environments listing
    calls = requests_to(saas, "/gateway/cf/admin/targets")
    assert [q["pageNumber"][0] for q, _ in calls[:3]] == ["0", "1", "2"]
    for q, h in calls:
        assert h["x-api-key"] == "admin-token"
        assert int(q["pageSize"][0]) <= 100
        assert q["accountIdentifier"] == ["acc"] and q["orgIdentifier"] == ["org"]
        assert q["environmentIdentifier"] == ["dev"] and q["projectIdentifier"] == ["proj"]
    (q, h), *_ = requests_to(saas, f"/api/1.0/client/env/{ENV}/feature-configs")
    assert q["cluster"] == ["2"]  # from the token's clusterIdentifier
    assert h["harness-environmentid"] == ENV and h["harness-accountid"] == "acc"
    assert h["authorization"].startswith("Bearer ") and "harness-sdk-info" in h
    (q, _), *_ = requests_to(saas, f"/api/1.0/client/env/{ENV}/target-segments")
    assert q["rules"] == ["v2"]
    (q, h), *_ = requests_to(saas, "/api/1.0/stream")
    assert q["cluster"] == ["2"] and h["api-key"] == KEY
    assert saas.auth_requests[0] == {"apiKey": KEY}
    assert health(r.store) == {ENV: "CONNECTED"}


@pytest_twisted.ensureDeferred
async def test_startup_accepts_the_older_admin_envelope_and_skips_targets_when_off(saas, running):
    saas.envelope = True
    r = running(target_poll=0.0)
    await r.source.ready
    assert len(r.env.meta["api_key_hashes"]) == 5
    assert requests_to(saas, "/gateway/cf/admin/targets") == []
    assert dict(r.env.all("targets")) == {}


def sdk_auth(store: Store, key: str) -> tuple[int, Any]:
    """POST /client/auth to relayd's Harness SDK API on this store, as an SDK does: (status, JSON body)."""
    clock = task.Clock()
    api = HarnessAPI(store, SSEHub(clock), clock, b"upstream-test-secret-32-bytes!!!")
    out: list[Any] = []
    try:
        stub = StubTreq(api.resource())
        stub.post("http://relayd.test/client/auth", json={"apiKey": key}).addCallback(
            lambda r: r.json().addCallback(lambda body: out.append((r.code, body))))
        stub.flush()
    finally:
        api.unsubscribe()
    return out[0]


def paths(saas: HarnessSaaS) -> list[str]:
    return [urlsplit(uri).path for _, uri, _ in saas.requests]


@pytest_twisted.ensureDeferred
async def test_startup_pages_projects_and_environments_once_for_all_keys(saas, running):
    """Two configured keys in two projects; five projects and three environments in the first project, served two
    to a page: one pass of every page, all keys of each environment in the store, no /admin/apikey at all."""
    saas.add_env(ENV2, KEY2, identifier="prod", project="proj2").flags = {"g": flag("g")}
    saas.add_env("0d9d3c6e-3333-4aaa-8bbb-000000000003", "unconfigured-qa", identifier="qa", project="proj")
    saas.add_env("0d9d3c6e-4444-4aaa-8bbb-000000000004", "unconfigured-stage", identifier="stage", project="proj")
    saas.extra_projects = ["alpha", "beta", "gamma"]
    saas.broken["apikey"] = 500  # would be noticed: the listing must not be needed
    r = running(api_keys=(KEY, KEY2), target_poll=0.0)
    await r.source.ready
    await r.upstream.sources[KEY2].ready
    projects = requests_to(saas, "/gateway/cf/admin/projects")
    assert [q["pageNumber"] for q, _ in projects] == [["0"], ["1"], ["2"]]  # 5 projects, pages of 2, once
    for q, h in projects:
        assert h["x-api-key"] == "admin-token" and q["pageSize"] == ["100"]
        assert q["accountIdentifier"] == ["acc"] and q["orgIdentifier"] == ["org"]
    envs = requests_to(saas, "/gateway/cf/admin/environments")
    asked = [(q["projectIdentifier"][0], q["pageNumber"][0]) for q, _ in envs]
    assert sorted(asked) == sorted([("proj", "0"), ("proj", "1"), ("proj2", "0"), ("alpha", "0"), ("beta", "0"),
                                    ("gamma", "0")])
    for q, h in envs:
        assert h["x-api-key"] == "admin-token" and int(q["pageSize"][0]) <= 100
        assert q["accountIdentifier"] == ["acc"] and q["orgIdentifier"] == ["org"]
    assert requests_to(saas, "/gateway/cf/admin/apikey") == []
    env2 = r.store.environment("harness", ENV2)
    assert r.env.meta["api_key_hashes"] == frozenset({_h(KEY)} | {_h(f"client-{i}") for i in range(4)})
    assert env2.meta["api_key_hashes"] == frozenset({_h(KEY2)})
    assert set(env2.all("flags")) == {"g"}
    # in order: auth, the admin pass, then the client API of each key
    seen = paths(saas)
    last_admin = max(i for i, p in enumerate(seen) if "/admin/" in p)
    assert seen.index("/api/1.0/client/auth") < seen.index("/gateway/cf/admin/projects")
    assert seen.index("/gateway/cf/admin/projects") < seen.index("/gateway/cf/admin/environments")
    assert last_admin < seen.index(f"/api/1.0/client/env/{ENV}/feature-configs")
    assert last_admin < seen.index(f"/api/1.0/client/env/{ENV2}/feature-configs")
    # an SDK using ANOTHER key of the environment, known to relayd only from the environments listing
    code, body = sdk_auth(r.store, "client-2")
    assert code == 200 and jwt.decode(body["authToken"], options={"verify_signature": False})["environment"] == ENV
    assert sdk_auth(r.store, "client-9")[0] == 401
    assert sdk_auth(r.store, KEY2)[0] == 200


@pytest_twisted.ensureDeferred
async def test_bare_listing_without_uuids_matches_by_project_and_environment_identifier(saas, running):
    saas.directory_envelope = False
    saas.directory_ids = False
    saas.add_env(ENV2, KEY2, identifier="dev", project="proj2")  # same environment identifier, other project
    r = running(target_poll=0.0)
    await r.source.ready
    assert r.env.meta["api_key_hashes"] == frozenset({_h(KEY)} | {_h(f"client-{i}") for i in range(4)})
    assert requests_to(saas, "/gateway/cf/admin/apikey") == []
    assert sdk_auth(r.store, "client-0")[0] == 200
    assert sdk_auth(r.store, KEY2)[0] == 401  # proj2's key is not this environment's


@pytest.mark.parametrize("why", ["no projects listing", "environment not listed"])
@pytest_twisted.ensureDeferred
async def test_falls_back_to_the_apikey_listing(saas, running, why):
    if why == "no projects listing":
        saas.broken["projects"] = 404
    else:
        saas.unlisted.add(ENV)
    r = running(target_poll=0.0)
    await r.source.ready
    await eventually(connected(r, saas))
    calls = requests_to(saas, "/gateway/cf/admin/apikey")
    assert [q["pageNumber"] for q, _ in calls[:3]] == [["0"], ["1"], ["2"]]  # 5 keys, pages of 2
    for q, h in calls:
        assert h["x-api-key"] == "admin-token"
        assert q["environmentIdentifier"] == ["dev"] and q["projectIdentifier"] == ["proj"]
    assert r.env.meta["api_key_hashes"] == frozenset({_h(KEY)} | {_h(f"client-{i}") for i in range(4)})
    assert len(requests_to(saas, "/gateway/cf/admin/projects")) == 1
    assert sdk_auth(r.store, "client-3")[0] == 200


@pytest_twisted.ensureDeferred
async def test_admin_failures_do_not_stop_serving(saas, running):
    saas.broken.update(projects=500, apikey=503, targets=500)
    r = running(target_poll=3600.0)
    await r.source.ready
    await eventually(connected(r, saas))
    assert set(r.env.all("flags")) == {"f0", "f1", "f2"}  # served all the same
    assert health(r.store) == {ENV: "CONNECTED"}
    assert r.env.meta["api_key_hashes"] == frozenset({_h(KEY)})  # the configured key at least
    assert sdk_auth(r.store, KEY)[0] == 200 and sdk_auth(r.store, "client-1")[0] == 401
    # the admin API comes back; the next re-sync (a stream reconnect) learns the other keys
    saas.broken.clear()
    saas.drop_streams(mid_event=False)
    await eventually(lambda: len(r.env.meta["api_key_hashes"]) == 5)
    await eventually(connected(r, saas))
    assert sdk_auth(r.store, "client-1")[0] == 200


@pytest_twisted.ensureDeferred
async def test_stream_events_reach_the_store(saas, running):
    r = running()
    await eventually(connected(r, saas))
    seen: list[Any] = []
    r.env.subscribe(seen.append)
    saas.set_flag(ENV, flag("f1", on=False))
    await eventually(lambda: r.env.get("flags", "f1")["state"] == "off", 2.0)
    assert r.env.item("flags", "f1").version == 2
    saas.set_flag(ENV, flag("new"))
    saas.set_segment(ENV, segment("beta", ["t1", "t2"]))
    saas.delete_flag(ENV, "f0")
    await eventually(lambda: r.env.get("flags", "new") is not None and r.env.get("flags", "f0") is None
                     and len(r.env.get("segments", "beta")["included"]) == 2, 2.0)
    assert r.env.item("flags", "f0").deleted
    assert {c.op for c in seen} >= {"upsert", "delete"}


@pytest_twisted.ensureDeferred
async def test_drop_mid_event_then_outage_loses_no_update(saas, running):
    r = running()
    await eventually(connected(r, saas))
    saas.fail("stream", 500, 429, 503)
    saas.drop_streams(mid_event=True)
    await eventually(lambda: r.env.status.state == INTERRUPTED)
    assert health(r.store) == {ENV: "DISCONNECTED"}
    # changes while relayd is not connected: no event will ever tell it
    saas.set_flag(ENV, flag("f2", on=False), notify=False)
    saas.delete_flag(ENV, "f1", notify=False)
    assert r.env.get("flags", "f2")["state"] == "on"  # the last data is still served
    await eventually(connected(r, saas))
    await eventually(lambda: r.env.get("flags", "f2")["state"] == "off" and r.env.get("flags", "f1") is None)
    assert health(r.store) == {ENV: "CONNECTED"}
    assert r.source.stream.retry_count >= 3


@pytest_twisted.ensureDeferred
async def test_garbage_on_the_stream_reconnects_and_resyncs(saas, running):
    r = running()
    await eventually(connected(r, saas))
    saas.set_flag(ENV, flag("f0", on=False), notify=False)
    saas.push(ENV, None, raw=b"event: *\ndata: {not json\n\n")
    await eventually(lambda: r.env.get("flags", "f0")["state"] == "off")
    await eventually(connected(r, saas))


@pytest_twisted.ensureDeferred
async def test_stalled_stream_is_abandoned_and_recovers(saas, running):
    r = running()
    await eventually(connected(r, saas))
    saas.heartbeat.stop()  # the open stream goes silent: the 0.5 s read timeout must fire
    saas.stall_stream = True  # and reconnects get no headers
    await eventually(lambda: r.env.status.state == INTERRUPTED)
    saas.set_flag(ENV, flag("f0", on=False), notify=False)
    saas.stall_stream = False
    saas.heartbeat.start(0.1, now=False)
    await eventually(connected(r, saas))
    await eventually(lambda: r.env.get("flags", "f0")["state"] == "off")


@pytest_twisted.ensureDeferred
async def test_event_fetch_failure_is_retried_by_a_full_resync(saas, running):
    r = running()
    await eventually(connected(r, saas))
    saas.fail("flag", 500)
    saas.set_flag(ENV, flag("f1", on=False))
    await eventually(lambda: r.env.get("flags", "f1")["state"] == "off")


@pytest_twisted.ensureDeferred
async def test_expired_token_on_fetch_reauthenticates(saas, running):
    r = running()
    await eventually(connected(r, saas))
    auths = len(saas.auth_requests)
    saas.token_epoch += 1  # every token issued so far is now refused with 401
    saas.fail("stream", 500)  # and the stream drops, so the next data calls run with the old token
    saas.drop_streams(mid_event=False)
    saas.set_flag(ENV, flag("f1", on=False), notify=False)
    await eventually(lambda: r.env.get("flags", "f1")["state"] == "off")
    await eventually(connected(r, saas))
    assert len(saas.auth_requests) > auths
    assert not r.source.off


@pytest_twisted.ensureDeferred
async def test_revoked_key_turns_the_environment_off(saas, running):
    r = running()
    await eventually(connected(r, saas))
    saas.disabled_keys.add(KEY)
    saas.drop_streams(mid_event=False)
    await eventually(lambda: r.env.status.state == OFF)
    assert r.env.status.error_kind == "ERROR_RESPONSE"
    assert health(r.store) == {ENV: "DISCONNECTED"}
    streams = len(requests_to(saas, "/api/1.0/stream"))
    await task.deferLater(reactor, 0.3, lambda: None)
    assert len(requests_to(saas, "/api/1.0/stream")) == streams  # no retry
    assert r.env.get("flags", "f0") is not None  # the last data stays served


@pytest_twisted.ensureDeferred
async def test_polling_mode_replaces_on_every_tick(saas, running):
    r = running(stream=False, flag_poll=0.1)
    await r.source.ready
    assert requests_to(saas, "/api/1.0/stream") == []
    saas.set_flag(ENV, flag("f0", on=False), notify=False)
    await eventually(lambda: r.env.get("flags", "f0")["state"] == "off")
    saas.fail("flags", 500)
    await eventually(lambda: r.env.status.state == INTERRUPTED)
    await eventually(lambda: r.env.status.state == VALID)


@pytest_twisted.ensureDeferred
async def test_target_poll_updates_targets(saas, running):
    r = running(target_poll=0.1)
    await r.source.ready
    saas.envs[ENV].targets["t9"] = {"identifier": "t9", "name": "T9", "attributes": {}}
    await eventually(lambda: r.env.get("targets", "t9") is not None)


def sdk_post(flag_id: str, count: int, target: str = "t1") -> dict[str, Any]:
    return {"metricsData": [{"timestamp": 1700000000000, "count": count, "metricsType": "FFMETRICS",
                             "attributes": [{"key": "featureIdentifier", "value": flag_id},
                                            {"key": "variationIdentifier", "value": "true"},
                                            {"key": "target", "value": "global"},
                                            {"key": "SDK_LANGUAGE", "value": "python"}]}],
            "targetData": [{"identifier": target, "name": target, "attributes": []}]}


def counts(saas: HarnessSaaS) -> dict[str, int]:
    out: dict[str, int] = {}
    for env_id, body in saas.metrics:
        assert env_id == ENV
        for m in body["metricsData"]:
            fid = next(a["value"] for a in m["attributes"] if a["key"] == "featureIdentifier")
            out[fid] = out.get(fid, 0) + m["count"]
    return out


@pytest_twisted.ensureDeferred
async def test_metrics_of_two_sdks_arrive_aggregated_exactly_once_even_after_a_failed_post(saas, running):
    buffer = MetricsBuffer()
    r = running(metrics=buffer)
    await r.source.ready
    buffer.add(ENV, sdk_post("f0", 3, "t1"))  # SDK one
    buffer.add(ENV, sdk_post("f0", 4, "t2"))  # SDK two
    saas.fail("metrics", 500)
    await r.upstream.forwarder.tick()
    assert saas.metrics == []
    buffer.add(ENV, sdk_post("f1", 1))  # arrives between the failed post and the retry
    await r.upstream.forwarder.tick()
    assert len(saas.metrics) == 1
    assert counts(saas) == {"f0": 7, "f1": 1}
    assert len(saas.metrics[0][1]["metricsData"]) == 2  # one entry per flag: aggregated, not one per post
    assert {t["identifier"] for t in saas.metrics[0][1]["targetData"]} == {"t1", "t2"}
    (q, h), = requests_to(saas, f"/events/api/1.0/metrics/{ENV}")[-1:]
    assert q["cluster"] == ["2"] and h["authorization"].startswith("Bearer ")
    await r.upstream.forwarder.tick()
    assert len(saas.metrics) == 1  # nothing left to send twice


@pytest_twisted.ensureDeferred
async def test_metric_post_loop_and_target_registration(saas, running):
    buffer = MetricsBuffer()
    r = running(metrics=buffer, metric_post=0.1)
    await r.source.ready
    r.upstream.register_target(ENV, {"identifier": "sdk-user", "name": "SDK user", "attributes": {"a": 1}})
    buffer.add(ENV, sdk_post("f2", 5))
    await eventually(lambda: counts(saas) == {"f2": 5} and any(a.get("target") for a in saas.auth_requests))
    reg = [a for a in saas.auth_requests if a.get("target")]
    assert reg == [{"apiKey": KEY, "target": {"identifier": "sdk-user", "name": "SDK user", "attributes": {"a": 1}}}]
    await task.deferLater(reactor, 0.3, lambda: None)
    assert counts(saas) == {"f2": 5} and len([a for a in saas.auth_requests if a.get("target")]) == 1


@pytest_twisted.ensureDeferred
async def test_export_writes_a_folder_the_offline_reader_loads(saas, tmp_path):
    folder = await export(config(saas), tmp_path / "out", reactor, timeout=2.0)
    assert folder == tmp_path / "out" / "harness"
    envs = harness_offline.read(folder)
    data = envs[ENV]
    assert set(data.kinds["flags"]) == {"f0", "f1", "f2"}
    assert set(data.kinds["segments"]) == {"beta"}
    assert len(data.kinds["targets"]) == 5
    assert sha256_hex(KEY) in data.meta["api_key_hashes"] and len(data.meta["api_key_hashes"]) == 5
    assert requests_to(saas, "/gateway/cf/admin/apikey") == []  # the same admin pass as a running relayd
    assert len(requests_to(saas, "/gateway/cf/admin/projects")) == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["harness"]  # no temporary leftovers
    # a second export replaces the first atomically
    saas.envs[ENV].flags.pop("f0")
    await export(config(saas), tmp_path / "out", reactor, timeout=2.0)
    assert set(harness_offline.read(folder)[ENV].kinds["flags"]) == {"f1", "f2"}


def _ini(saas_url: str, tmp: Path) -> Path:
    path = tmp / "relayd.ini"
    path.write_text(f"""[relayd]
auth_secret = s
[harness]
account = acc
org = org
admin_token = admin-token
api_keys = {KEY}
config_url = {saas_url}/api/1.0
admin_url = {saas_url}/gateway/cf
events_url = {saas_url}/events/api/1.0
""")
    return path


def _twistd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "twisted", "relayd", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)


@pytest_twisted.ensureDeferred
async def test_export_command(saas, tmp_path):
    ini = _ini(saas.url, tmp_path)
    done = await deferToThread(_twistd, "--config", str(ini), "--export", str(tmp_path / "dir"))
    assert done.returncode == 0, done.stderr
    assert set(harness_offline.read(tmp_path / "dir" / "harness")[ENV].kinds["flags"]) == {"f0", "f1", "f2"}
    saas.disabled_keys.add(KEY)
    done = await deferToThread(_twistd, "--config", str(ini), "--export", str(tmp_path / "dir2"))
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "export failed" in done.stderr
    assert not (tmp_path / "dir2" / "harness").exists()


# ---------------------------------------------------------------------------------------------- task.Clock


class FakeJSON:
    """Synchronous treq stand-in for API calls: canned answers by path."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.auth_status = 200

    def request(self, method: str, url: str, **kw: Any) -> defer.Deferred[Any]:
        path = urlsplit(url).path
        self.calls.append((method, path))
        if path.endswith("/client/auth"):
            token = jwt.encode({"environment": ENV, "clusterIdentifier": "1"}, "k" * 32, algorithm="HS256")
            return defer.succeed(_Resp(self.auth_status, {"authToken": token}))
        if "/admin/" in path:
            return defer.succeed(_Resp(200, {"apiKeys": [], "targets": [], "pageCount": 1}))
        return defer.succeed(_Resp(200, [flag("f0")] if path.endswith("feature-configs") else []))


class _Resp:
    def __init__(self, code: int, body: Any) -> None:
        self.code, self._body = code, json.dumps(body).encode()

    def content(self) -> defer.Deferred[bytes]:
        return defer.succeed(self._body)


def clock_source(rand: float = 0.0) -> tuple[task.Clock, FakeJSON, FakeHTTP, KeySource, Store]:
    clock = task.Clock()
    api, stream = FakeJSON(), FakeHTTP(clock)
    store = Store(clock)
    cfg = HarnessConfig(account="a", org="o", admin_token="t", api_keys=(KEY,), config_url="https://c.test/api/1.0",
                        admin_url="https://a.test/cf", events_url="https://e.test/api/1.0", target_poll=0.0)
    source = KeySource(cfg, KEY, store, SaaSClient(api, clock, 5.0), clock, stream_http=stream,
                       random=lambda: rand)
    return clock, api, stream, source, store


@pytest.mark.parametrize("rand,factor", [(0.0, 1.0), (0.999999, 0.5)])
def test_backoff_schedule_on_clock(rand: float, factor: float):
    clock, _, stream, source, store = clock_source(rand)
    source.startService()
    assert source.ready.called and len(stream.calls) == 1
    env = store.environment("harness", ENV)
    expected = [1, 2, 4, 8, 16, 30, 30]
    times = []
    for delay in expected:
        stream.calls[-1].respond(503)
        assert env.status.state == INTERRUPTED
        n = len(stream.calls)
        clock.advance(delay * factor - 0.01)
        assert len(stream.calls) == n  # not early
        clock.advance(0.02)
        assert len(stream.calls) == n + 1
        times.append(stream.calls[-1].when)
    assert [round(b - a, 1) for a, b in zip(times, times[1:])] == [round(d * factor, 1) for d in expected[1:]]
    # a connection that stays good for 60 s resets the schedule
    response = stream.calls[-1].respond(200)
    assert env.status.state == VALID
    clock.advance(61)
    response.end()
    n = len(stream.calls)
    clock.advance(1 * factor + 0.01)
    assert len(stream.calls) == n + 1
    source.stopService()


def test_stream_401_reauthenticates_once_then_turns_the_key_off():
    clock, api, stream, source, store = clock_source()
    source.startService()
    env = store.environment("harness", ENV)
    stream.calls[-1].respond(401)
    auths = [c for c in api.calls if c[1].endswith("/client/auth")]
    assert len(auths) == 2 and len(stream.calls) == 2  # re-authenticated and reconnected at once
    stream.calls[-1].respond(401)
    assert env.status.state == OFF and env.status.error_kind == "ERROR_RESPONSE"
    clock.advance(120)
    assert len(stream.calls) == 2
    source.stopService()


def test_startup_retries_auth_on_the_backoff_schedule_and_gives_up_on_401():
    clock, api, stream, source, store = clock_source()
    api.auth_status = 503
    source.startService()
    assert not source.ready.called
    clock.advance(1.01)
    clock.advance(2.01)
    assert len([c for c in api.calls if c[1].endswith("/client/auth")]) == 3
    api.auth_status = 200
    clock.advance(4.01)
    assert source.ready.called and store.environment("harness", ENV).initialized
    source.stopService()
    clock2, api2, stream2, source2, store2 = clock_source()
    api2.auth_status = 401
    source2.startService()
    assert source2.off and source2.ready.called and stream2.calls == []
    clock2.advance(100)
    assert len(api2.calls) == 1
    source2.stopService()


# ---------------------------------------------------------------------------------------------- real SDK


@pytest_twisted.ensureDeferred
async def test_real_sdk_through_relayd_sees_changes_and_metrics_arrive_once(saas):
    featureflags = pytest.importorskip("featureflags")  # noqa: F841
    import logging
    import time

    from featureflags.client import CfClient
    from featureflags.config import (
        with_analytics_enabled,
        with_base_url,
        with_events_url,
        with_pull_interval,
        with_stream_enabled,
    )
    from featureflags.evaluations.auth_target import Target

    from relayd.config import Config, RelaydConfig
    from relayd.service import make_service
    from tests.conftest import abort_connections, free_port

    logging.getLogger("featureflags").setLevel(logging.CRITICAL)
    port = free_port()
    top = make_service(Config(relayd=RelaydConfig(listen=(f"tcp:{port}:interface=127.0.0.1",), auth_secret="s" * 32,
                                                  heartbeat=5.0),
                              harness=config(saas, target_poll=0.0)), reactor)
    top.startService()
    base = f"http://127.0.0.1:{port}"
    clients: list[Any] = []
    try:
        await eventually(lambda: (e := top.store.environment("harness", ENV)) is not None
                         and e.status.state == VALID, 5.0)

        def start() -> Any:
            c = CfClient(KEY, with_base_url(base), with_events_url(base), with_stream_enabled(True),
                         with_pull_interval(60), with_analytics_enabled(True))
            c.wait_for_initialization()
            return c
        clients.append(await deferToThread(start))
        clients.append(await deferToThread(start))
        t1 = Target(identifier="t1", name="T1")
        assert await deferToThread(clients[0].bool_variation, "f1", t1, False) is True
        await eventually(lambda: top.hub.count(("harness", ENV)) >= 2, 10.0)

        saas.set_flag(ENV, flag("f1", on=False))  # the SaaS streams a patch: relayd fetches, SDKs hear it
        changed = time.monotonic()

        async def until(check: Callable[[], bool], timeout: float) -> bool:
            while time.monotonic() - changed < timeout:
                if await deferToThread(check):
                    return True
                await task.deferLater(reactor, 0.05, lambda: None)
            return False
        assert await until(lambda: clients[0].bool_variation("f1", t1, True) is False, 2.0), "not within 2 s"

        # an outage of relayd's upstream stream: the SDK streams stay open, and a change made meanwhile (no event)
        # still reaches the SDKs after the re-sync
        saas.drop_streams(mid_event=True)
        saas.set_flag(ENV, flag("f2", on=False), notify=False)
        changed = time.monotonic()
        assert await until(lambda: clients[1].bool_variation("f2", t1, True) is False, 5.0)

        # metrics of both SDKs, aggregated by relayd, posted upstream once
        for client, n in ((clients[0], 3), (clients[1], 2)):
            for _ in range(n):
                await deferToThread(client.bool_variation, "f0", t1, False)
            await deferToThread(client._analytics._send_data)
        upstream = top.getServiceNamed("harness-upstream")
        await upstream.forwarder.tick()
        await upstream.forwarder.tick()
        assert counts(saas)["f0"] == 5 and len(saas.metrics) == 1
    finally:
        for c in clients:
            await deferToThread(c.close)
        await top.stopService()
        abort_connections(top.site)
        await task.deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_metrics_with_an_expired_token_log_in_again_and_a_refused_body_is_dropped(saas, running):
    buffer = MetricsBuffer()
    r = running(metrics=buffer)
    await r.source.ready
    buffer.add(ENV, sdk_post("f0", 2))
    saas.token_epoch += 1  # every token issued so far is now refused with 401
    await r.upstream.forwarder.tick()
    assert counts(saas) == {"f0": 2}  # re-authenticated once, then posted
    # a body the SaaS refuses for good (4xx other than 401/408/429) is dropped, not retried on every tick
    buffer.add(ENV, sdk_post("f1", 3))
    saas.fail("metrics", 400)
    await r.upstream.forwarder.tick()
    assert buffer.environments() == [] and r.upstream.forwarder.dropped == 3
    buffer.add(ENV, sdk_post("f2", 1))
    await r.upstream.forwarder.tick()
    assert counts(saas) == {"f0": 2, "f2": 1}
