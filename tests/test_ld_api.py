"""The LaunchDarkly inbound API through the real router and Klein, driven by StubTreq and task.Clock."""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import treq
from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from relayd.health import HealthAPI
from relayd.launchdarkly import offline as ld_offline
from relayd.launchdarkly.api import LaunchDarklyAPI
from relayd.launchdarkly.events import DiscardEvents
from relayd.offline import OfflineSource
from relayd.sse import SSEHub
from relayd.store import Environment, Store

from .conftest import LD_ENV_ID, LD_MOBILE_KEY, LD_SDK_KEY

SDK = {"Authorization": LD_SDK_KEY}
MOB = {"Authorization": LD_MOBILE_KEY}
ALICE = {"kind": "user", "key": "alice"}
BOB = {"kind": "user", "key": "bob"}


class RecordingSink:
    def __init__(self, enabled: bool = True) -> None:
        self.on = enabled
        self.got: list[tuple[str, bytes, dict[str, str]]] = []

    def enabled(self, env: Environment) -> bool:
        return self.on

    def accept(self, env: Environment, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        self.got.append((path, body, dict(headers)))


class Stream:
    def __init__(self) -> None:
        self.code: int | None = None
        self.headers: Any = None
        self.chunks: list[bytes] = []

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8")

    def events(self) -> list[tuple[str, Any]]:
        out = []
        for block in self.text.split("\n\n"):
            lines = block.split("\n")
            names = [ln[7:] for ln in lines if ln.startswith("event: ")]
            data = "\n".join(ln[6:] for ln in lines if ln.startswith("data: "))
            if names:
                out.append((names[0], json.loads(data) if data.strip() else data))
        return out

    def take(self) -> list[tuple[str, Any]]:
        events = self.events()
        self.chunks.clear()
        return events


class Relay:
    """relayd's LaunchDarkly side over a copy of the sample folder, all in memory."""

    def __init__(self, folder: Path, sink: RecordingSink | None = None, load: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = Store(self.clock)
        self.hub = SSEHub(self.clock, heartbeat=10)
        self.sink = sink or RecordingSink()
        self.api = LaunchDarklyAPI(self.store, self.hub, self.clock, self.sink, max_event_body=4096)
        self.source = OfflineSource(self.store, folder, {"launchdarkly": ld_offline.read}, self.clock,
                                    run_io=lambda f, *a: succeed(f(*a)))
        if load:
            self.source.load_now()
        health = HealthAPI(self.store, self.clock)
        from relayd.web import build_router
        self.stub = StubTreq(build_router([(self.api.segments, self.api.resource()),
                                           (health.segments, health.resource())]))

    @property
    def env(self) -> Environment:
        env = self.store.environment("launchdarkly", LD_ENV_ID)
        assert env is not None
        return env

    def call(self, method: str, path: str, headers: Mapping[str, str] | None = None, body: bytes | None = None
             ) -> tuple[int, Any, bytes]:
        out: list[Any] = []
        self.stub.request(method, "http://relay" + path, headers=dict(headers or {}), data=body).addCallback(
            lambda r: r.content().addCallback(lambda b: out.append((r.code, r.headers, b))))
        self.stub.flush()
        assert out, f"{method} {path} did not complete"
        return out[0]

    def json(self, method: str, path: str, headers: Mapping[str, str] | None = None, body: Any = None,
             content_type: str = "application/json") -> tuple[int, Any]:
        h = dict(headers or {})
        raw = None
        if body is not None:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            h["Content-Type"] = content_type
        code, _, data = self.call(method, path, h, raw)
        try:
            return code, json.loads(data) if data else None
        except ValueError:
            return code, data.decode()

    def stream(self, method: str, path: str, headers: Mapping[str, str] | None = None,
               body: Any = None) -> Stream:
        s = Stream()
        h = dict(headers or {})
        raw = None
        if body is not None:
            raw = json.dumps(body).encode()
            h["Content-Type"] = "application/json"

        def got(r: Any) -> None:
            s.code, s.headers = r.code, r.headers
            treq.collect(r, s.chunks.append)
        self.stub.request(method, "http://relay" + path, headers=h, data=raw).addCallback(got)
        self.stub.flush()
        return s

    def flush(self) -> None:
        self.stub.flush()

    def patch_flag(self, key: str, **changes: Any) -> None:
        flag = dict(self.env.get("flags", key), **changes)
        flag["version"] = self.env.item("flags", key).version + 1
        self.env.upsert("flags", key, flag["version"], flag)
        self.flush()


def b64(obj: Any, pad: bool = False) -> str:
    text = base64.urlsafe_b64encode(json.dumps(obj).encode()).decode()
    return text if pad else text.rstrip("=")


@pytest.fixture
def relay(offline_dir: Path) -> Relay:
    return Relay(offline_dir)


# ---------------------------------------------------------------------------------------------- evalx

def test_server_evalx_shape_and_every_flag(relay: Relay) -> None:
    code, body = relay.json("GET", f"/sdk/evalx/contexts/{b64(ALICE)}", SDK)
    assert code == 200
    assert body["dark-mode"] == {"value": True, "variation": 0, "version": 1}
    assert body["banner-text"] == {"value": "Hello from relayd", "variation": 0, "version": 1,
                                   "prerequisites": ["dark-mode"]}
    assert body["server-only"]["value"] == "on"
    assert body["legacy-feature"] == {"value": False, "variation": 1, "version": 1}
    assert "reason" not in body["dark-mode"]


def test_evalx_aliases_padding_report_and_reasons_agree(relay: Relay) -> None:
    bob_user = {"key": "bob"}  # old user schema
    _, get = relay.json("GET", f"/sdk/evalx/users/{b64(bob_user, pad=True)}?withReasons=true", SDK)
    _, report = relay.json("REPORT", "/sdk/evalx/user?withReasons=true", SDK, body=bob_user)
    _, report2 = relay.json("REPORT", "/sdk/evalx/context?withReasons=true", {"Authorization": "api_key " +
                                                                                LD_SDK_KEY}, body=BOB)
    assert get == report == report2
    assert get["theme-config"]["reason"] == {"kind": "RULE_MATCH", "ruleIndex": 0, "ruleId": "r-beta"}
    assert get["dark-mode"]["reason"] == {"kind": "FALLTHROUGH"}


def test_mobile_and_js_evalx_are_filtered_by_client_side_availability(relay: Relay) -> None:
    _, mobile = relay.json("GET", f"/msdk/evalx/contexts/{b64(ALICE)}", MOB)
    _, mobile_r = relay.json("REPORT", "/msdk/evalx/context", MOB, body=ALICE)
    _, js = relay.json("GET", f"/sdk/evalx/{LD_ENV_ID}/contexts/{b64(ALICE)}")
    _, js_r = relay.json("REPORT", f"/sdk/evalx/{LD_ENV_ID}/context", body=ALICE)
    assert "server-only" not in mobile and "server-only" not in js
    assert mobile == mobile_r == js == js_r
    assert set(mobile) == {"dark-mode", "checkout-v2", "max-items", "banner-text", "theme-config",
                           "legacy-feature"}
    # A legacy flag without clientSideAvailability: mobile yes, JS only if clientSide.
    flag = dict(relay.env.get("flags", "max-items"), clientSide=False, version=5)
    del flag["clientSideAvailability"]
    relay.env.upsert("flags", "max-items", 5, flag)
    _, mobile = relay.json("GET", f"/msdk/evalx/contexts/{b64(ALICE)}", MOB)
    _, js = relay.json("GET", f"/sdk/evalx/{LD_ENV_ID}/contexts/{b64(ALICE)}")
    assert "max-items" in mobile and "max-items" not in js


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("auth", [None, "", "Bearer " + LD_SDK_KEY, "api_key a b", "sdk x"])
def test_malformed_authorization_is_401_without_body(relay: Relay, auth: str | None) -> None:
    code, _, body = relay.call("GET", f"/sdk/evalx/contexts/{b64(ALICE)}", {} if auth is None
                               else {"Authorization": auth})
    assert (code, body) == (401, b"")


def test_unknown_or_wrong_kind_of_key_is_401_with_message(relay: Relay) -> None:
    for path, headers in ((f"/sdk/evalx/contexts/{b64(ALICE)}", {"Authorization": "sdk-unknown"}),
                          (f"/sdk/evalx/contexts/{b64(ALICE)}", MOB),
                          (f"/msdk/evalx/contexts/{b64(ALICE)}", SDK),
                          ("/all", MOB), ("/bulk", MOB)):
        code, _, body = relay.call("POST" if path == "/bulk" else "GET", path, headers)
        assert code == 401, path
        assert body == b"Relay Proxy does not recognize the client credential (missing or invalid Authorization " \
                       b"header)"


def test_bad_contexts_answer_400(relay: Relay) -> None:
    bad_b64 = relay.json("GET", "/sdk/evalx/contexts/a$b", SDK)
    assert bad_b64 == (400, {"message": "context part of URL path did not decode as valid base64"})
    not_json = base64.urlsafe_b64encode(b"{nope").decode()
    assert relay.json("GET", f"/sdk/evalx/contexts/{not_json}", SDK) == (
        400, {"message": "context part of URL path did not decode to valid evaluation context as JSON"})
    assert relay.json("GET", f"/sdk/evalx/contexts/{b64({'kind': 'multi'})}", SDK)[0] == 400
    assert relay.json("GET", f"/sdk/evalx/contexts/{b64({'kind': 'user', 'key': ''})}", SDK) == (
        400, {"message": "User must have a 'key' attribute"})
    code, body = relay.json("REPORT", "/sdk/evalx/context", SDK, body=b"{not json")
    assert code == 400 and body["message"]
    assert relay.json("REPORT", "/msdk/evalx/context", MOB, body={"kind": "user", "key": ""}) == (
        400, {"message": "User must have a 'key' attribute"})


def test_deeply_nested_json_is_a_400_not_an_internal_error(relay: Relay) -> None:
    """json.loads raises RecursionError (not ValueError) past ~1000 levels: a bad request, not a 500."""
    nested = b"[" * 5000 + b"]" * 5000
    in_path = base64.urlsafe_b64encode(nested).decode()
    assert relay.json("GET", f"/sdk/evalx/contexts/{in_path}", SDK) == (
        400, {"message": "context part of URL path did not decode to valid evaluation context as JSON"})
    code, body = relay.json("REPORT", "/sdk/evalx/context", SDK, body=nested)
    assert code == 400 and body["message"]
    code, headers, gif = relay.call("GET", f"/a/{LD_ENV_ID}.gif?d={base64.b64encode(nested).decode()}")
    assert code == 200 and gif.startswith(b"GIF89a") and relay.sink.got == []


def test_report_needs_exactly_application_json(relay: Relay) -> None:
    for ct in ("application/json; charset=utf-8", "text/plain"):
        assert relay.json("REPORT", "/sdk/evalx/context", SDK, body=ALICE, content_type=ct) == (
            415, "Content-Type must be application/json.")
    code, _, _ = relay.call("REPORT", "/meval", MOB, json.dumps(ALICE).encode())
    assert code == 415
    assert relay.json("REPORT", f"/eval/{LD_ENV_ID}", body=ALICE, content_type="text/json")[0] == 415


def test_503_before_data_and_404_for_unknown_env_id(offline_dir: Path) -> None:
    relay = Relay(offline_dir, load=False)
    relay.store.add("launchdarkly", "Production", {"name": "Production", "sdk_key": "sdk-configured",
                                                   "mobile_key": "mob-configured", "env_id": "abc123"})
    assert relay.json("GET", f"/sdk/evalx/contexts/{b64(ALICE)}", {"Authorization": "sdk-configured"}) == (
        503, {"message": "Service not initialized"})
    assert relay.json("GET", f"/sdk/evalx/abc123/contexts/{b64(ALICE)}")[0] == 503
    assert relay.json("GET", "/sdk/latest-all", {"Authorization": "sdk-configured"})[0] == 503
    assert relay.json("GET", "/sdk/flags", {"Authorization": "sdk-configured"})[0] == 503
    code, _, body = relay.call("GET", f"/sdk/evalx/nope/contexts/{b64(ALICE)}")
    assert (code, body) == (404, b"URL did not contain an environment ID")
    assert relay.call("OPTIONS", "/eval/nope/x")[0] == 404


def test_secure_mode_requires_the_context_hash(relay: Relay) -> None:
    relay.env.meta["secure_mode"] = True
    multi = {"kind": "multi", "user": {"key": "a:b"}, "org": {"key": "o%1"}}
    fq = "org:o%251:user:a%3Ab"
    h = hmac.new(LD_SDK_KEY.encode(), fq.encode(), hashlib.sha256).hexdigest()
    path = f"/sdk/evalx/{LD_ENV_ID}/contexts/{b64(multi)}"
    assert relay.json("GET", path)[0] == 400
    assert relay.json("GET", path + "?h=" + "0" * 64) == (
        400, {"message": "Environment is in secure mode, and context hash does not match."})
    assert relay.json("GET", path + "?h=" + h)[0] == 200
    assert relay.call("GET", f"/eval/{LD_ENV_ID}/{b64(multi)}")[0] == 400
    # Server and mobile routes do not use secure mode.
    assert relay.json("GET", f"/msdk/evalx/contexts/{b64(multi)}", MOB)[0] == 200


def test_a_bad_request_does_not_disturb_an_open_stream(relay: Relay) -> None:
    s = relay.stream("GET", "/all", SDK)
    s.take()
    for _ in range(3):
        relay.call("GET", "/sdk/evalx/contexts/%%%", SDK)
        relay.call("REPORT", "/meval", MOB, b"[]")
    relay.patch_flag("dark-mode", on=False)
    assert [e for e, _ in s.take()] == ["patch"]


# ---------------------------------------------------------------------------------------------- server streams

def test_all_stream_put_patch_delete(relay: Relay) -> None:
    s = relay.stream("GET", "/all", SDK)
    assert s.code == 200
    assert s.headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    assert s.headers.getRawHeaders("cache-control") == ["no-cache, no-store, must-revalidate"]
    assert s.headers.getRawHeaders("access-control-allow-origin") == ["*"]
    [(event, put)] = s.take()
    assert event == "put" and put["path"] == "/"
    assert set(put["data"]) == {"flags", "segments"}
    assert put["data"]["flags"]["dark-mode"]["salt"] == "dark-mode-salt"
    assert put["data"]["segments"]["beta-testers"]["included"] == ["bob"]
    relay.patch_flag("dark-mode", on=False)
    [(event, patch)] = s.take()
    assert event == "patch" and patch["path"] == "/flags/dark-mode"
    assert patch["data"]["on"] is False and patch["data"]["version"] == 2
    seg = dict(relay.env.get("segments", "beta-testers"), included=["bob", "carol"], version=7)
    relay.env.upsert("segments", "beta-testers", 7, seg)
    relay.flush()
    [(event, patch)] = s.take()
    assert (event, patch["path"], patch["data"]["version"]) == ("patch", "/segments/beta-testers", 7)
    relay.env.delete("flags", "max-items", 9)
    relay.flush()
    assert s.take() == [("delete", {"path": "/flags/max-items", "version": 9})]


def test_flags_stream_is_the_legacy_format_without_segments(relay: Relay) -> None:
    s = relay.stream("GET", "/flags", {"Authorization": "api_key " + LD_SDK_KEY})
    [(event, put)] = s.take()
    assert event == "put" and "dark-mode" in put and "segments" not in put and "path" not in put
    relay.patch_flag("dark-mode", on=False)
    relay.env.upsert("segments", "beta-testers", 3, dict(relay.env.get("segments", "beta-testers"), version=3))
    relay.env.delete("flags", "max-items", 4)
    relay.flush()
    events = s.take()
    assert [(e, d["path"]) for e, d in events] == [("patch", "/dark-mode"), ("delete", "/max-items")]
    assert events[1][1]["version"] == 4


def test_no_put_before_data_then_put_when_it_arrives(offline_dir: Path) -> None:
    relay = Relay(offline_dir, load=False)
    relay.store.add("launchdarkly", LD_ENV_ID, {"sdk_key": LD_SDK_KEY, "mobile_key": LD_MOBILE_KEY,
                                                "env_id": LD_ENV_ID})
    s = relay.stream("GET", "/all", SDK)
    m = relay.stream("GET", f"/meval/{b64(ALICE)}", MOB)
    assert s.code == 200 and s.events() == [] and m.events() == []
    relay.source.load_now()
    relay.flush()
    assert [e for e, _ in s.take()] == ["put"]
    [(event, put)] = m.take()
    assert event == "put" and put["dark-mode"]["value"] is True


def test_heartbeats_come_from_the_hub(relay: Relay) -> None:
    relay.hub.startService()
    try:
        s = relay.stream("GET", "/all", SDK)
        s.take()
        relay.clock.advance(10)
        relay.flush()
        assert s.text == ":\n\n"
    finally:
        relay.hub.stopService()


def test_removed_environment_closes_its_streams(relay: Relay) -> None:
    relay.stream("GET", "/all", SDK)
    assert relay.hub.count() == 1
    relay.store.remove("launchdarkly", LD_ENV_ID)
    relay.flush()
    assert relay.hub.count() == 0


# ---------------------------------------------------------------------------------------------- client streams

def test_client_stream_patches_only_contexts_whose_value_changed(relay: Relay) -> None:
    alice = relay.stream("GET", f"/meval/{b64(ALICE)}", MOB)
    bob = relay.stream("REPORT", f"/eval/{LD_ENV_ID}", body=BOB)
    [(event, put)] = alice.take()
    assert event == "put"
    assert put["dark-mode"] == {"value": True, "variation": 0, "version": 1, "flagVersion": 1}
    assert "server-only" not in put
    assert bob.take()[0][1]["dark-mode"]["value"] is False
    # Target bob too: his value flips, alice's does not.
    relay.patch_flag("dark-mode", targets=[{"variation": 0, "values": ["alice", "bob"]}])
    assert alice.take() == []
    events = bob.take()
    assert ("patch", {"key": "dark-mode", "value": True, "variation": 0, "version": 2, "flagVersion": 2}) in events
    # banner-text depends on dark-mode: bob's banner changes through the prerequisite.
    assert ("patch", "banner-text") in [(e, d["key"]) for e, d in events]
    # Turning the flag off changes both.
    relay.patch_flag("dark-mode", on=False)
    assert ("patch", "dark-mode") in [(e, d["key"]) for e, d in alice.take()]
    assert ("patch", "dark-mode") in [(e, d["key"]) for e, d in bob.take()]


def test_client_stream_segment_change_and_delete(relay: Relay) -> None:
    carol = {"kind": "user", "key": "carol"}
    s = relay.stream("GET", f"/eval/{LD_ENV_ID}/{b64(carol)}?withReasons=true")
    assert s.take()[0][1]["theme-config"]["value"] == {"color": "white", "contrast": 1}
    seg = dict(relay.env.get("segments", "beta-testers"), included=["bob", "carol"], version=2)
    relay.env.upsert("segments", "beta-testers", 2, seg)
    relay.flush()
    [(event, patch)] = s.take()
    assert event == "patch" and patch["key"] == "theme-config"
    assert patch["value"] == {"color": "black", "contrast": 2}
    assert patch["reason"] == {"kind": "RULE_MATCH", "ruleIndex": 0, "ruleId": "r-beta"}
    relay.env.delete("flags", "theme-config", 5)
    relay.flush()
    assert s.take() == [("delete", {"key": "theme-config", "version": 5})]
    # A flag that stops being client-side is deleted from the client's view as well.
    relay.patch_flag("max-items", clientSideAvailability={"usingMobileKey": True, "usingEnvironmentId": False})
    assert [(e, d["key"]) for e, d in s.take()] == [("delete", "max-items")]


def test_client_stream_evaluation_is_shared_per_context(relay: Relay) -> None:
    a1 = relay.stream("GET", f"/meval/{b64(ALICE)}", MOB)
    reordered = {"key": "alice", "kind": "user"}
    a2 = relay.stream("REPORT", "/meval", MOB, body=reordered)
    relay.stream("GET", f"/meval/{b64(BOB)}", MOB)
    assert relay.api.streams.evaluations == 2  # alice once, bob once
    before = relay.api.streams.evaluations
    relay.patch_flag("dark-mode", on=False)
    assert relay.api.streams.evaluations == before + 2
    assert a1.events()[-1] == a2.events()[-1]
    assert a1.events()[-1][0] == "patch"


def test_ping_streams(relay: Relay) -> None:
    mping = relay.stream("GET", "/mping", MOB)
    ping = relay.stream("GET", f"/ping/{LD_ENV_ID}")
    relay.env.meta["client_stream"] = "ping"
    meval = relay.stream("GET", f"/meval/{b64(ALICE)}", MOB)
    for s in (mping, ping, meval):
        assert s.text == "event: ping\ndata:  \n\n"
        s.take()
    relay.patch_flag("server-only", on=False)
    for s in (mping, ping, meval):
        assert s.text == "event: ping\ndata:  \n\n"


# ---------------------------------------------------------------------------------------------- CORS

def test_cors_on_js_routes(relay: Relay) -> None:
    path = f"/sdk/evalx/{LD_ENV_ID}/contexts/{b64(ALICE)}"
    code, headers, body = relay.call("OPTIONS", path, {"Origin": "https://app.example"})
    assert (code, body) == (200, b"")
    assert headers.getRawHeaders("access-control-allow-origin") == ["https://app.example"]
    assert headers.getRawHeaders("access-control-allow-methods") == ["GET,OPTIONS"]
    assert headers.getRawHeaders("access-control-max-age") == ["300"]
    assert headers.getRawHeaders("access-control-allow-credentials") == ["false"]
    assert headers.getRawHeaders("access-control-expose-headers") == ["Date"]
    assert relay.call("GET", path)[1].getRawHeaders("access-control-allow-origin") == ["*"]
    relay.env.meta["allowed_origin"] = ("https://a.example", "https://b.example")
    relay.env.meta["allowed_header"] = ("X-Custom",)
    _, headers, _ = relay.call("GET", path, {"Origin": "https://b.example"})
    assert headers.getRawHeaders("access-control-allow-origin") == ["https://b.example"]
    assert headers.getRawHeaders("access-control-allow-headers")[0].endswith("X-LaunchDarkly-Tags,X-Custom")
    _, headers, _ = relay.call("GET", path, {"Origin": "https://evil.example"})
    assert headers.getRawHeaders("access-control-allow-origin") == ["https://a.example"]
    _, headers, _ = relay.call("OPTIONS", f"/sdk/evalx/{LD_ENV_ID}/context")
    assert headers.getRawHeaders("access-control-allow-methods") == ["REPORT,OPTIONS"]
    s = relay.stream("GET", f"/eval/{LD_ENV_ID}/{b64(ALICE)}", {"Origin": "https://b.example"})
    assert s.headers.getRawHeaders("access-control-allow-origin") == ["*"]
    assert relay.json("GET", f"/sdk/goals/{LD_ENV_ID}") == (200, [])


# ---------------------------------------------------------------------------------------------- PHP and polling

def test_php_flags_etag_and_304(relay: Relay) -> None:
    code, headers, body = relay.call("GET", "/sdk/flags", SDK)
    flags = json.loads(body)
    assert code == 200 and flags["dark-mode"]["key"] == "dark-mode" and "server-only" in flags
    expected = "relay-" + hashlib.sha1("".join(f"{k}:1" for k in sorted(flags)).encode()).hexdigest()[:15]
    assert headers.getRawHeaders("etag") == [expected]
    assert headers.getRawHeaders("expires") is None
    code, _, body = relay.call("GET", "/sdk/flags", dict(SDK, **{"If-None-Match": expected}))
    assert (code, body) == (304, b"")
    relay.patch_flag("dark-mode", on=False)
    code, headers, _ = relay.call("GET", "/sdk/flags", dict(SDK, **{"If-None-Match": expected}))
    assert code == 200 and headers.getRawHeaders("etag") != [expected]


def test_php_single_items_and_ttl(relay: Relay) -> None:
    relay.env.meta["ttl"] = 300.0
    code, headers, body = relay.call("GET", "/sdk/flags/dark-mode", SDK)
    assert code == 200 and json.loads(body)["key"] == "dark-mode"
    assert headers.getRawHeaders("etag") == ["relay-1"]
    assert headers.getRawHeaders("vary") == ["Authorization"]
    assert headers.getRawHeaders("expires") == ["Tue, 14 Nov 2023 22:18:20 GMT"]  # 1_700_000_000 + 300
    code, headers, _ = relay.call("GET", "/sdk/segments/beta-testers", dict(SDK, **{"If-None-Match": "relay-1"}))
    assert code == 304 and headers.getRawHeaders("expires")
    assert relay.call("GET", "/sdk/flags/nope", SDK)[0] == 404
    relay.env.delete("flags", "dark-mode", 2)
    assert relay.call("GET", "/sdk/flags/dark-mode", SDK)[0] == 404


def test_polling_endpoints(relay: Relay) -> None:
    code, headers, body = relay.call("GET", "/sdk/latest-all", SDK)
    data = json.loads(body)
    assert code == 200 and set(data) == {"flags", "segments"} and "beta-testers" in data["segments"]
    etag = headers.getRawHeaders("etag")[0]
    assert relay.call("GET", "/sdk/latest-all", dict(SDK, **{"If-None-Match": etag}))[0] == 304
    _, flags = relay.json("GET", "/sdk/latest-flags", SDK)
    _, segments = relay.json("GET", "/sdk/latest-segments", SDK)
    assert flags == data["flags"] and segments == data["segments"]
    relay.patch_flag("dark-mode", on=False)
    code, _, body = relay.call("GET", "/sdk/latest-all", dict(SDK, **{"If-None-Match": etag}))
    assert code == 200 and json.loads(body)["flags"]["dark-mode"]["on"] is False


# ---------------------------------------------------------------------------------------------- events

def test_event_intake_routes(relay: Relay) -> None:
    payload = b'[{"kind":"identify"}]'
    headers = {"Content-Type": "application/json", "X-LaunchDarkly-Event-Schema": "4", "User-Agent": "t/1"}
    routes = [("/bulk", SDK, "/bulk"), ("/diagnostic", SDK, "/diagnostic"), ("/mobile", MOB, "/mobile"),
              ("/mobile/events", MOB, "/mobile"), ("/mobile/events/bulk", MOB, "/mobile"),
              ("/mobile/events/diagnostic", MOB, "/mobile/events/diagnostic"),
              (f"/events/bulk/{LD_ENV_ID}", {}, f"/events/bulk/{LD_ENV_ID}"),
              (f"/events/diagnostic/{LD_ENV_ID}", {}, f"/events/diagnostic/{LD_ENV_ID}")]
    for path, auth, upstream in routes:
        code, _, body = relay.call("POST", path, dict(headers, **auth), payload)
        assert (code, body) == (202, b""), path
        got_path, got_body, got_headers = relay.sink.got[-1]
        assert (got_path, got_body) == (upstream, payload)
        assert got_headers["X-LaunchDarkly-Event-Schema"] == "4" and "Authorization" not in got_headers
    assert len(relay.sink.got) == len(routes)


def test_event_gzip_empty_oversize_and_disabled(relay: Relay) -> None:
    payload = b'[{"kind":"custom","key":"k"}]'
    code, _, _ = relay.call("POST", "/bulk", dict(SDK, **{"Content-Encoding": "gzip"}), gzip.compress(payload))
    assert code == 202 and relay.sink.got[-1][1] == payload
    assert relay.json("POST", "/bulk", SDK, body=b"") == (400, {"message": "body may not be empty"})
    bomb = gzip.compress(b"[" + b" " * 100_000 + b"]")
    assert relay.call("POST", "/bulk", dict(SDK, **{"Content-Encoding": "gzip"}), bomb)[0] == 400
    assert relay.call("POST", "/bulk", dict(SDK, **{"Content-Encoding": "gzip"}), b"not gzip")[0] == 400
    relay.sink.on = False
    assert relay.json("POST", "/bulk", SDK, body=payload) == (
        503, {"message": "Event proxy is not enabled for this environment"})
    assert len(relay.sink.got) == 1


def test_gif_events(relay: Relay) -> None:
    events = base64.b64encode(b'[{"kind":"feature","key":"dark-mode"}]').decode()
    code, headers, body = relay.call("GET", f"/a/{LD_ENV_ID}.gif?d={events}")
    assert code == 200 and body.startswith(b"GIF89a")
    assert headers.getRawHeaders("content-type") == ["image/gif"]
    path, got, hdrs = relay.sink.got[-1]
    assert path == f"/events/bulk/{LD_ENV_ID}" and json.loads(got)[0]["key"] == "dark-mode"
    assert hdrs["X-LaunchDarkly-Event-Schema"] == "3"


# ---------------------------------------------------------------------------------------------- index and status

def test_credential_index_is_rebuilt_only_after_store_changes(relay: Relay) -> None:
    relay.call("GET", f"/sdk/evalx/contexts/{b64(ALICE)}", SDK)
    builds = relay.api.credentials.builds
    for _ in range(3):
        relay.call("GET", f"/msdk/evalx/contexts/{b64(ALICE)}", MOB)
    assert relay.api.credentials.builds == builds
    relay.store.add("launchdarkly", "other", {"sdk_key": "sdk-other"})
    relay.store.environment("launchdarkly", "other").replace({"flags": {}, "segments": {}})
    assert relay.json("GET", f"/sdk/evalx/contexts/{b64(ALICE)}", {"Authorization": "sdk-other"}) == (200, {})
    assert relay.api.credentials.builds == builds + 1


def test_expiring_sdk_key_is_accepted_and_shown_obscured(relay: Relay) -> None:
    old = "sdk-99999999-0000-4000-8000-00000000abcd"
    relay.store.add("launchdarkly", LD_ENV_ID, {"expiring_sdk_key": old})
    relay.env.set_status("INTERRUPTED")  # any change refreshes the index
    assert relay.json("GET", f"/sdk/evalx/contexts/{b64(ALICE)}", {"Authorization": old})[0] == 200
    _, status = relay.json("GET", "/status")
    entry = status["environments"][LD_ENV_ID]
    assert entry["expiringSdkKey"] == "sdk-********-****-****-****-*******0abcd"
    assert old not in json.dumps(status)


def test_make_service_registers_the_routes_and_configured_environments() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from relayd.config import (
        Config,
        LaunchDarklyConfig,
        LaunchDarklyEnvConfig,
        RelaydConfig,
    )
    from relayd.service import make_service

    cfg = Config(relayd=RelaydConfig(listen=()), launchdarkly=LaunchDarklyConfig(environments=(
        LaunchDarklyEnvConfig(name="Production", sdk_key="sdk-prod", env_id="e1", allowed_origin=("https://a",),
                              client_stream="ping"),)))
    top = make_service(cfg, MemoryReactorClock())
    env = top.store.environment("launchdarkly", "Production")
    assert env is not None and not env.initialized and env.status.state == "INITIALIZING"
    assert env.meta["client_stream"] == "ping" and env.meta["allowed_origin"] == ("https://a",)
    stub = StubTreq(top.site.resource)
    out: list[Any] = []
    stub.get(f"http://relay/sdk/evalx/contexts/{b64(ALICE)}", headers={"Authorization": "sdk-prod"}).addCallback(
        lambda r: r.content().addCallback(lambda b: out.append((r.code, json.loads(b)))))
    stub.flush()
    assert out == [(503, {"message": "Service not initialized"})]


def test_environment_whose_key_upstream_refused_before_any_data_is_unknown() -> None:
    clock = Clock()
    store = Store(clock)
    env = store.add("launchdarkly", "Production", {"sdk_key": LD_SDK_KEY, "env_id": LD_ENV_ID})
    stub = StubTreq(LaunchDarklyAPI(store, SSEHub(clock), clock, DiscardEvents()).resource())

    def code(path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        out: list[tuple[int, bytes]] = []
        stub.get(f"http://relay{path}", headers=headers or {}).addCallback(
            lambda r: r.content().addCallback(lambda b: out.append((r.code, b))))
        stub.flush()
        return out[0]

    # inside the first init_timeout ld-relay has no client for the environment yet
    env.meta["init_pending"] = True
    assert code(f"/sdk/evalx/contexts/{b64(ALICE)}", {"Authorization": LD_SDK_KEY}) == (
        503, b"client was not initialized")
    del env.meta["init_pending"]
    env.meta["init_failed"] = True
    env.set_status("OFF", error_kind="ERROR_RESPONSE")
    assert code(f"/sdk/evalx/contexts/{b64(ALICE)}", {"Authorization": LD_SDK_KEY})[0] == 401
    assert code(f"/sdk/evalx/{LD_ENV_ID}/contexts/{b64(ALICE)}")[0] == 404


def test_environment_that_goes_off_after_data_keeps_serving_it(relay: Relay) -> None:
    """A key refused later (upstream OFF) leaves the last data served, marked in /status, not a 401."""
    relay.env.set_status("OFF", error_kind="ERROR_RESPONSE")
    assert relay.call("GET", f"/sdk/evalx/contexts/{b64(ALICE)}", SDK)[0] == 200
    assert relay.call("GET", f"/sdk/evalx/{LD_ENV_ID}/contexts/{b64(ALICE)}")[0] == 200


def test_a_key_changed_in_the_offline_folder_is_honoured_at_once(tmp_path: Path) -> None:
    """Only the environment's metadata changes (no flag data): the credential index must still follow."""
    import shutil

    from .conftest import SAMPLE

    folder = tmp_path / "offline"
    shutil.copytree(SAMPLE, folder)
    clock = Clock()
    store = Store(clock)
    source = OfflineSource(store, folder, {"launchdarkly": ld_offline.read}, clock,
                           run_io=lambda f, *a: succeed(f(*a)))
    source.startService()
    stub = StubTreq(LaunchDarklyAPI(store, SSEHub(clock), clock, DiscardEvents(), offline=True).resource())

    def code(key: str) -> int:
        out: list[int] = []
        stub.get("http://relay/sdk/latest-all", headers={"Authorization": key}).addCallback(
            lambda r: out.append(r.code))
        stub.flush()
        return out[0]

    assert code(LD_SDK_KEY) == 200
    meta = folder / "launchdarkly" / f"{LD_ENV_ID}.json"
    meta.write_text(meta.read_text().replace(LD_SDK_KEY, "sdk-rotated-1"))
    clock.advance(1)
    assert code("sdk-rotated-1") == 200 and code(LD_SDK_KEY) == 401
    source.stopService()


def test_client_stream_change_re_evaluates_only_the_flags_it_can_affect(relay: Relay, monkeypatch: Any) -> None:
    """A patch costs O(contexts x affected flags), not O(contexts x all flags): with many client streams a
    full re-evaluation per change blocks the reactor for seconds."""
    from relayd.launchdarkly import evaluate as ld_evaluate
    from relayd.launchdarkly.contexts import parse_context
    from relayd.launchdarkly.streams import client_entries

    seen: list[str] = []
    real = ld_evaluate.evaluate

    def counting(flag: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(flag["key"])
        return real(flag, *args, **kwargs)

    monkeypatch.setattr(ld_evaluate, "evaluate", counting)
    carol = {"kind": "user", "key": "carol"}
    s = relay.stream("GET", f"/eval/{LD_ENV_ID}/{b64(carol)}")
    s.take()
    topic = relay.api.streams.client_topic(relay.env.id, parse_context(carol), False, "js")
    assert topic is not None

    def evaluated_after(change: Any) -> set[str]:
        seen.clear()
        change()
        relay.flush()
        evaluated = set(seen)
        assert topic.entries == client_entries(relay.env, topic.context, False, "js")  # same as a full pass
        return evaluated

    assert evaluated_after(lambda: relay.patch_flag("checkout-v2", on=False)) == {"checkout-v2"}
    # banner-text has dark-mode as a prerequisite.
    assert evaluated_after(lambda: relay.patch_flag("dark-mode", on=False)) == {"dark-mode", "banner-text"}
    # theme-config matches the beta-testers segment; make that segment depend on another one.
    seg = dict(relay.env.get("segments", "beta-testers"), version=2,
               rules=[{"id": "in-inner", "clauses": [{"attribute": "key", "op": "segmentMatch",
                                                      "values": ["inner"]}]}])
    assert evaluated_after(lambda: relay.env.upsert("segments", "beta-testers", 2, seg)) == {"theme-config"}
    s.take()
    inner = {"key": "inner", "version": 1, "included": ["carol"], "salt": "x"}
    assert evaluated_after(lambda: relay.env.upsert("segments", "inner", 1, inner)) == {"theme-config"}
    assert s.take() == [("patch", {"key": "theme-config", "value": {"color": "black", "contrast": 2},
                                   "variation": 1, "version": relay.env.item("flags", "theme-config").version,
                                   "flagVersion": relay.env.item("flags", "theme-config").version})]
    new_flag = dict(relay.env.get("flags", "checkout-v2"), key="brand-new", version=1)
    assert evaluated_after(lambda: relay.env.upsert("flags", "brand-new", 1, new_flag)) == {"brand-new"}
    assert evaluated_after(lambda: relay.env.delete("flags", "dark-mode", 50)) == {"banner-text"}


def test_stream_logs_do_not_carry_context_attributes(relay: Relay) -> None:
    """Client stream topics appear in the hub's log lines (e.g. dropping a slow stream): a context's attributes,
    private ones included, must not end up in relayd's log."""
    from twisted.logger import globalLogPublisher, formatEvent

    secret = {"kind": "user", "key": "k", "email": "dana@example.com", "_meta": {"privateAttributes": ["email"]}}
    relay.stream("GET", f"/meval/{b64(secret)}", MOB)
    logged: list[str] = []
    observer = lambda e: logged.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        for sub in list(relay.hub.all_subscribers()):
            relay.hub.drop(sub, "test")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert logged and not [line for line in logged if "dana@example.com" in line]


def test_unknown_keys_get_503_until_the_environment_list_is_loaded() -> None:
    """A Redis reader starting up has no environments yet: SDKs must retry (503), not give up (401/404)."""
    clock = Clock()
    store = Store(clock)
    loaded = [False]
    stub = StubTreq(LaunchDarklyAPI(store, SSEHub(clock), clock, DiscardEvents(), ready=lambda: loaded[0])
                    .resource())

    def call(path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        out: list[tuple[int, bytes]] = []
        stub.get(f"http://relay{path}", headers=headers).addCallback(
            lambda r: r.content().addCallback(lambda b: out.append((r.code, b))))
        stub.flush()
        return out[0]

    assert call("/sdk/latest-all", {"Authorization": LD_SDK_KEY}) == (
        503, b"Relay Proxy is not yet fully initialized, does not have list of environments yet")
    assert call(f"/sdk/evalx/{LD_ENV_ID}/contexts/{b64(ALICE)}", {})[0] == 503
    loaded[0] = True
    assert call("/sdk/latest-all", {"Authorization": LD_SDK_KEY})[0] == 401
    assert call(f"/sdk/evalx/{LD_ENV_ID}/contexts/{b64(ALICE)}", {})[0] == 404
