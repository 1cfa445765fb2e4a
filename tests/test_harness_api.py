"""The Harness SDK API: auth and tokens, flag/segment endpoints, evaluations, metrics, and /stream on loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
import treq
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock, deferLater

from relayd.harness import api as api_module
from relayd.harness import offline as harness_offline
from relayd.harness import tokens
from relayd.harness.api import HarnessAPI, segment_view
from relayd.health import HealthAPI
from relayd.offline import OfflineSource
from relayd.sse import SSEHub
from relayd.store import Store
from relayd.web import RelaydSite, build_router

from .conftest import HARNESS_ENV, HARNESS_KEY

SECRET = b"test-secret-of-thirty-two-bytes!"
NOW = 1_700_000_000
OTHER_ENV = "0e0e0e0e-1111-4222-8333-444455556666"
OTHER_KEY = "other-sdk-key"
BASE = "http://relay"
EP = f"{BASE}/client/env/{HARNESS_ENV}"


def load(store: Store, folder: Path, clock: Any) -> None:
    OfflineSource(store, folder, {"harness": harness_offline.read}, clock,
                  run_io=lambda f, *a: succeed(f(*a))).load_now()


class Relay:
    """The health and Harness apps on a store of the sample folder, reached through StubTreq."""

    def __init__(self, folder: Path) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = Store(self.clock)
        load(self.store, folder, self.clock)
        other = self.store.add("harness", OTHER_ENV, {"api_key_hashes": frozenset({tokens.key_hash(OTHER_KEY)})})
        other.replace({"flags": {}, "segments": {}})
        self.hub = SSEHub(self.clock)
        self.api = HarnessAPI(self.store, self.hub, self.clock, SECRET)
        health = HealthAPI(self.store, self.clock)
        self.stub = StubTreq(build_router([(health.segments, health.resource()),
                                           (self.api.segments, self.api.resource())]))

    @property
    def env(self) -> Any:
        return self.store.environment("harness", HARNESS_ENV)

    def call(self, method: str, url: str, body: Any = None, token: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        out: list[Any] = []
        self.stub.request(method, url, data=data, headers=hdrs).addCallback(
            lambda r: r.content().addCallback(lambda b: out.append((r.code, b, r.headers))))
        self.stub.flush()
        return out[0]

    def json(self, method: str, url: str, body: Any = None, token: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        code, raw, hdrs = self.call(method, url, body, token, headers)
        assert hdrs.getRawHeaders("content-type") == ["application/json; charset=utf-8"], (code, raw)
        assert raw.endswith(b"\n") and not raw.endswith(b"\n\n")
        return code, json.loads(raw)

    def token(self, key: str = HARNESS_KEY, target: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"apiKey": key}
        if target is not None:
            body["target"] = target
        code, obj = self.json("POST", f"{BASE}/client/auth", body)
        assert code == 200, obj
        return obj["authToken"]


@pytest.fixture
def relay(offline_dir: Path) -> Relay:
    return Relay(offline_dir)


def sample_flags(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / "harness" / f"env-{HARNESS_ENV}" / "feature_config.json").read_text())


# ---------------------------------------------------------------------------------------------- tokens

def test_token_claims_verify_independently(relay: Relay) -> None:
    code, raw, headers = relay.call("POST", f"{BASE}/client/auth", {"apiKey": HARNESS_KEY})
    assert code == 200 and raw.endswith(b"}\n")
    assert headers.getRawHeaders("access-control-allow-origin") == ["*"]
    assert len(headers.getRawHeaders("x-request-id")[0]) == 36  # generated UUID
    token = json.loads(raw)["authToken"]
    # PyJWT, not our code, checks signature and claims
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims == {"environment": HARNESS_ENV, "clusterIdentifier": "1", "iat": NOW, "nbf": NOW,
                      "apiKey": "auth-key-" + hashlib.sha256(HARNESS_KEY.encode()).hexdigest()}
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    assert "exp" not in claims


def test_verify_accepts_a_token_signed_by_pyjwt_and_refuses_tampering() -> None:
    key = "auth-key-" + "ab" * 32
    good = jwt.encode({"environment": "e", "clusterIdentifier": "1", "iat": 5, "nbf": 5, "apiKey": key}, SECRET,
                      algorithm="HS256")
    claims = tokens.verify(SECRET, good, now=10)
    assert claims.environment == "e" and claims.key_hash == "ab" * 32 and claims.issued_at == 5
    header, payload, sig = good.split(".")
    forged_payload = base64.urlsafe_b64encode(json.dumps(
        {"environment": "x", "clusterIdentifier": "1", "apiKey": key}).encode()).rstrip(b"=").decode()
    bad = [
        jwt.encode({"environment": "e", "apiKey": key}, b"other-secret-of-thirty-two-bytes", algorithm="HS256"),
        f"{header}.{forged_payload}.{sig}",
        jwt.encode({"environment": "e", "apiKey": key}, None, algorithm="none"),
        jwt.encode({"environment": "e"}, SECRET, algorithm="HS256"),  # no apiKey claim
        jwt.encode({"environment": "e", "apiKey": key}, SECRET * 2, algorithm="HS512"),
        jwt.encode({"environment": "e", "apiKey": key, "nbf": 10_000}, SECRET, algorithm="HS256"),
        "a.b", "", "....", f"{header}.{payload}.{sig}x", f"{header}.{payload}.{sig[:-2]}",
    ]
    # a valid HS256 signature over a header that names another algorithm is still refused
    for alg in ("none", "HS512"):
        head = base64.urlsafe_b64encode(json.dumps({"alg": alg}).encode()).rstrip(b"=").decode()
        mac = hmac.new(SECRET, f"{head}.{payload}".encode(), hashlib.sha256).digest()
        bad.append(f"{head}.{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}")
    for token in bad:
        with pytest.raises(tokens.TokenError):
            tokens.verify(SECRET, token, now=10)
    assert tokens.issue(SECRET, "e", "ab" * 32, 7).count(".") == 2


def test_protected_routes_refuse_bad_tokens(relay: Relay) -> None:
    url = f"{EP}/feature-configs"
    assert relay.json("GET", url) == (401, {"message": "missing or malformed jwt"})
    assert relay.json("GET", url, headers={"Authorization": "Bearer: foo"})[0] == 401
    assert relay.json("GET", url, headers={"Authorization": "Basic abc"})[0] == 401
    forged = jwt.encode({"environment": HARNESS_ENV, "clusterIdentifier": "1",
                         "apiKey": "auth-key-" + tokens.key_hash(HARNESS_KEY)}, b"guessed-secret-of-thirty-two-byte", algorithm="HS256")
    code, body = relay.json("GET", url, token=forged)
    assert code == 401 and isinstance(body, dict)
    assert relay.json("GET", url, token="not.a.jwt")[0] == 401
    # a token of another environment, even a valid one, cannot read this one
    other = relay.token(OTHER_KEY)
    assert relay.json("GET", url, token=other) == (
        401, {"message": f"Environment ID [{OTHER_ENV}] mismatch with requested {HARNESS_ENV}"})
    for path in ("/feature-configs/dark_mode", "/target-segments", "/target/t1/evaluations"):
        assert relay.json("GET", EP + path, token=other)[0] == 401
    assert relay.json("POST", f"{BASE}/metrics/{HARNESS_ENV}", {}, token=other)[0] == 401
    # an unknown environment in the path: the token is not for it
    assert relay.json("GET", f"{BASE}/client/env/nope/feature-configs", token=other)[0] == 401
    # and relayd keeps serving the good token throughout
    assert relay.json("GET", url, token=relay.token())[0] == 200


def test_revoking_a_key_revokes_its_tokens(relay: Relay) -> None:
    token = relay.token()
    url = f"{EP}/feature-configs"
    assert relay.json("GET", url, token=token)[0] == 200
    relay.store.add("harness", HARNESS_ENV, {"api_key_hashes": frozenset({"00" * 32})})
    assert relay.json("GET", url, token=token)[0] == 401
    assert relay.json("POST", f"{BASE}/client/auth", {"apiKey": HARNESS_KEY}) == (401, {"error": "unauthorised"})
    relay.store.add("harness", HARNESS_ENV, {"api_key_hashes": frozenset({tokens.key_hash(HARNESS_KEY)})})
    assert relay.json("GET", url, token=token)[0] == 200  # the key is back: so are its tokens
    relay.store.remove("harness", HARNESS_ENV)
    assert relay.json("GET", url, token=token)[0] == 401
    assert relay.json("POST", f"{BASE}/client/auth", {"apiKey": HARNESS_KEY})[0] == 401


@pytest.mark.parametrize("body, code, error", [
    (b"", 400, "bad request: request body cannot be empty"),
    (b"  \n", 400, "bad request: request body cannot be empty"),
    (b"{garbage", 400, None),
    (b"\xff\xfe", 400, None),
    (b"[1,2]", 400, None),
    (b"{}", 400, "bad request: apiKey cannot be empty"),
    (b'{"apiKey":""}', 400, "bad request: apiKey cannot be empty"),
    (b'{"apiKey":42}', 400, "bad request: apiKey cannot be empty"),
    (b'{"apiKey":"no-such-key"}', 401, "unauthorised"),
    (b'{"apiKey":"K","target":{"identifier":"bad id!"}}', 400, "bad request: target identifier is invalid"),
    (b'{"apiKey":"K","target":{"identifier":"t1","name":"x<y"}}', 400, "bad request: target name is invalid"),
    (b'{"apiKey":"K","target":{"identifier":7}}', 400, None),
    (b'{"apiKey":"K","target":"t1"}', 400, None),
])
def test_auth_bad_inputs(relay: Relay, body: bytes, code: int, error: str | None) -> None:
    got_code, got = relay.json("POST", f"{BASE}/client/auth", body.replace(b'"K"', json.dumps(HARNESS_KEY).encode()))
    assert got_code == code and isinstance(got["error"], str)
    if error is not None:
        assert got["error"] == error
    assert relay.json("GET", f"{EP}/feature-configs", token=relay.token())[0] == 200  # others still served


def test_auth_accepts_unicode_names_and_defaults_the_name(relay: Relay) -> None:
    relay.token(target={"identifier": "zoe.b@x_y-1", "name": "Zoë Ångström 2"})
    relay.token(target={})  # what an SDK without a target may send: accepted, nothing cached
    assert list(relay.api._targets[HARNESS_ENV]) == ["zoe.b@x_y-1"]
    relay.token(target={"identifier": "t9"})
    assert relay.api._targets[HARNESS_ENV]["t9"].name == "t9"


# ---------------------------------------------------------------------------------------------- flags, segments

def test_feature_configs_list_and_by_id(relay: Relay, offline_dir: Path) -> None:
    token = relay.token()
    flags = sample_flags(offline_dir)
    code, got = relay.json("GET", f"{EP}/feature-configs?cluster=1", token=token)
    assert code == 200
    assert got == [dict(f, variationToTargetMap=f["variationToTargetMap"] or []) for f in flags]
    assert all(f["variationToTargetMap"] is not None for f in got)
    code, one = relay.json("GET", f"{EP}/feature-configs/checkout_v2?cluster=1;stream=*", token=token)
    assert code == 200 and one == next(f for f in flags if f["feature"] == "checkout_v2")
    assert one["variationToTargetMap"] is None  # only the list endpoint rewrites null
    assert relay.json("GET", f"{EP}/feature-configs/nope", token=token) == (
        404, {"error": "not found: cache: not found"})


def test_alias_paths_answer_the_same(relay: Relay) -> None:
    token = relay.token()
    for path in ("/feature-configs", "/feature-configs/dark_mode", "/target-segments?rules=v2",
                 "/target-segments/beta_testers", "/target/alice/evaluations",
                 "/target/alice/evaluations/max_items", "/feature-configs/nope"):
        real = relay.call("GET", f"{BASE}/client/env/{HARNESS_ENV}{path}", token=token)
        alias = relay.call("GET", f"{BASE}/client/client/env/{HARNESS_ENV}{path}", token=token)
        assert real[:2] == alias[:2]


def test_lists_are_serialized_once_per_revision(relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    token = relay.token()
    calls: list[Any] = []
    real = api_module._body
    monkeypatch.setattr(api_module, "_body", lambda obj: calls.append(obj) or real(obj))
    for _ in range(3):
        relay.call("GET", f"{EP}/feature-configs", token=token)
        relay.call("GET", f"{EP}/target-segments?rules=v2", token=token)
    assert len(calls) == 2
    relay.env.upsert("flags", "dark_mode", 9, dict(relay.env.get("flags", "dark_mode"), version=9))
    code, got = relay.json("GET", f"{EP}/feature-configs", token=token)
    assert code == 200 and len(calls) == 3 and next(f for f in got if f["feature"] == "dark_mode")["version"] == 9


SERVING = [{"ruleId": "r1", "priority": 1, "clauses": [
    {"id": "c1", "attribute": "email", "op": "ends_with", "values": ["@a.com"], "negate": False},
    {"id": "c2", "attribute": "name", "op": "starts_with", "values": ["A"], "negate": False}]},
           {"ruleId": "r2", "priority": 2, "clauses": [
               {"id": "c3", "attribute": "identifier", "op": "equal", "values": ["x"], "negate": False}]}]


def test_segments_rules_v2(relay: Relay) -> None:
    token = relay.token()
    v2only = {"identifier": "v2only", "name": "v2only", "environment": "dev", "version": 1, "included": [],
              "excluded": [], "servingRules": SERVING}
    both = dict(v2only, identifier="both", rules=[SERVING[1]["clauses"][0]])
    relay.env.upsert("segments", "v2only", 1, v2only)
    relay.env.upsert("segments", "both", 1, both)
    _, legacy = relay.json("GET", f"{EP}/target-segments?cluster=1", token=token)
    by_id = {s["identifier"]: s for s in legacy}
    assert "servingRules" not in by_id["v2only"] and "servingRules" not in by_id["both"]
    assert by_id["v2only"]["rules"] == [SERVING[0]["clauses"][0], SERVING[1]["clauses"][0]]
    assert by_id["both"]["rules"] == both["rules"]
    assert "rules" in by_id["beta_testers"] and "servingRules" not in by_id["beta_testers"]
    for query in ("?cluster=1&rules=v2", "?cluster=1;rules=v2", "?rules=v2;cluster=1"):
        _, v2 = relay.json("GET", f"{EP}/target-segments{query}", token=token)
        by_id = {s["identifier"]: s for s in v2}
        assert by_id["v2only"]["servingRules"] == SERVING and "rules" not in by_id["v2only"]
        assert by_id["both"]["servingRules"] == SERVING and "rules" not in by_id["both"]
        assert by_id["beta_testers"]["rules"][0]["op"] == "ends_with"  # no serving rules: legacy rules
    assert relay.json("GET", f"{EP}/target-segments/v2only?rules=v2", token=token)[1]["servingRules"] == SERVING
    assert "servingRules" not in relay.json("GET", f"{EP}/target-segments/v2only", token=token)[1]
    assert relay.json("GET", f"{EP}/target-segments/nope", token=token)[0] == 404
    assert segment_view({"identifier": "s", "servingRules": [{"clauses": []}]}, False) == {"identifier": "s",
                                                                                            "rules": []}


def test_unknown_environment_lists_are_empty_and_by_id_is_404(relay: Relay) -> None:
    token = relay.token(OTHER_KEY)
    for path in ("/feature-configs", "/target-segments", "/target/t1/evaluations"):
        assert relay.json("GET", f"{BASE}/client/env/{OTHER_ENV}{path}", token=token) == (200, [])
    relay.api._environment = lambda request, env_id: None  # type: ignore[method-assign]  # env gone meanwhile
    for path in ("/feature-configs/f", "/target-segments/s", "/target/t1/evaluations/f"):
        assert relay.json("GET", f"{BASE}/client/env/gone{path}", token=token) == (
            404, {"error": "not found: cache: not found"})


# ---------------------------------------------------------------------------------------------- evaluations

def _b64_target(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def evaluations(relay: Relay, token: str, target: str, **kw: Any) -> dict[str, Any]:
    code, got = relay.json("GET", f"{EP}/target/{target}/evaluations?cluster=1", token=token, **kw)
    assert code == 200
    assert all(set(e) == {"flag", "identifier", "kind", "value"} for e in got)
    return {e["flag"]: e["value"] for e in got}


def test_evaluations_bare_cached_stored_and_header_targets(relay: Relay) -> None:
    token = relay.token()
    # bare identifier: nothing about dave is known
    dave = evaluations(relay, token, "dave")
    assert dave == {"dark_mode": "false", "checkout_v2": dave["checkout_v2"], "max_items": "10",
                    "discount_rate": "0", "banner_text": "Goodbye", "theme_config": '{"color":"white","contrast":1}',
                    "legacy_feature": "false"}
    # alice is in targets.json with an @example.com email
    assert evaluations(relay, token, "alice")["max_items"] == "100"
    # carol authenticated with her attributes: the cached target is used for the path identifier
    relay.token(target={"identifier": "carol", "name": "Carol", "attributes": {"email": "c@beta.example.com"}})
    carol = evaluations(relay, token, "carol")
    assert carol["discount_rate"] == "0.15" and carol["dark_mode"] == "true" and carol["banner_text"] == (
        "Hello from relayd")
    # the Harness-Target header wins over the cache and the path
    header = {"Harness-Target": _b64_target({"identifier": "bob", "name": "Bob", "attributes": {"age": 30}})}
    assert evaluations(relay, token, "carol", headers=header)["theme_config"] == '{"color":"black","contrast":2}'
    assert evaluations(relay, token, "carol")["theme_config"] == '{"color":"white","contrast":1}'
    code, one = relay.json("GET", f"{EP}/target/carol/evaluations/discount_rate", token=token)
    assert code == 200 and one == {"flag": "discount_rate", "identifier": "some", "kind": "int", "value": "0.15"}
    assert relay.json("GET", f"{EP}/target/carol/evaluations/nope", token=token) == (
        404, {"error": "not found: cache: not found"})


def test_evaluations_with_bare_identifier_segment_members(relay: Relay) -> None:
    # A segment listing members as plain identifier strings (older exports) must not break the endpoint.
    env = relay.env
    env.upsert("segments", "pilots", 1, {"identifier": "pilots", "name": "pilots", "environment": "dev",
                                         "included": ["zoe"], "excluded": ["yuri"],
                                         "rules": [{"attribute": "identifier", "op": "ends_with", "values": ["i"]}]})
    env.upsert("flags", "pilot_only", 1, {
        "feature": "pilot_only", "environment": "dev", "project": "p", "kind": "string", "state": "on",
        "version": 1, "offVariation": "no", "defaultServe": {"variation": "no"},
        "variations": [{"identifier": "yes", "value": "cleared"}, {"identifier": "no", "value": "grounded"}],
        "rules": [{"ruleId": "r", "priority": 1, "serve": {"variation": "yes"},
                   "clauses": [{"attribute": "", "op": "segmentMatch", "values": ["pilots"]}]}]})
    token = relay.token()
    assert evaluations(relay, token, "zoe")["pilot_only"] == "cleared"
    assert evaluations(relay, token, "yuri")["pilot_only"] == "grounded"  # excluded beats the rule
    assert evaluations(relay, token, "kai")["pilot_only"] == "cleared"  # via the rule
    code, one = relay.json("GET", f"{EP}/target/sam/evaluations/pilot_only", token=token)
    assert code == 200 and one == {"flag": "pilot_only", "identifier": "no", "kind": "string", "value": "grounded"}


def test_unservable_flag_is_listed_empty_and_fails_alone_with_500(relay: Relay) -> None:
    # "sizes" serves "xl" to vip members of its target map, but has no such variation.
    relay.env.upsert("flags", "sizes", 1, {
        "feature": "sizes", "environment": "dev", "project": "p", "kind": "string", "state": "on",
        "version": 1, "offVariation": "s", "defaultServe": {"variation": "m"},
        "variations": [{"identifier": "s", "value": "small"}, {"identifier": "m", "value": "medium"}],
        "variationToTargetMap": [{"variation": "xl", "targets": [{"identifier": "vip", "name": "V"}]}]})
    token = relay.token()
    code, listed = relay.json("GET", f"{EP}/target/vip/evaluations", token=token)
    assert code == 200
    assert [e for e in listed if e["flag"] == "sizes"] == [
        {"flag": "sizes", "identifier": "", "kind": "string", "value": ""}]
    assert relay.json("GET", f"{EP}/target/vip/evaluations/sizes", token=token) == (
        500, {"error": "variation not found: xl"})
    # every other target is served normally, by both endpoints
    assert evaluations(relay, token, "pat")["sizes"] == "medium"
    assert relay.json("GET", f"{EP}/target/pat/evaluations/sizes", token=token) == (
        200, {"flag": "sizes", "identifier": "m", "kind": "string", "value": "medium"})
    # a flag that does not exist at all is still a not-found
    assert relay.json("GET", f"{EP}/target/vip/evaluations/shoes", token=token)[0] == 404


def test_target_cache_is_bounded(relay: Relay) -> None:
    relay.api.target_cache_size = 3
    for i in range(5):
        relay.token(target={"identifier": f"t{i}"})
    relay.token(target={"identifier": "t2"})  # refreshed: now the most recent
    relay.token(target={"identifier": "t5"})
    assert list(relay.api._targets[HARNESS_ENV]) == ["t4", "t2", "t5"]


@pytest.mark.parametrize("header", [
    "%%%not-base64%%%",
    base64.b64encode(b"not json").decode(),
    base64.b64encode(b"\xff\xfe").decode(),
    _b64_target({"identifier": 5}),
    _b64_target(["alice"]),
])
def test_bad_harness_target_header(relay: Relay, header: str) -> None:
    token = relay.token()
    for url in (f"{EP}/target/alice/evaluations", f"{EP}/target/alice/evaluations/dark_mode"):
        assert relay.json("GET", url, token=token, headers={"Harness-Target": header}) == (
            400, {"error": "bad request: Harness-Target header is invalid"})
    assert evaluations(relay, token, "alice")["dark_mode"] == "true"


# ---------------------------------------------------------------------------------------------- web details

def test_cors_preflight_request_id_and_unrouted_paths(relay: Relay) -> None:
    code, raw, headers = relay.call("OPTIONS", f"{EP}/feature-configs",
                                    headers={"Origin": "http://app", "Access-Control-Request-Method": "GET"})
    assert code == 204 and raw == b""
    assert headers.getRawHeaders("access-control-allow-methods") == ["GET,OPTIONS,POST"]
    assert headers.getRawHeaders("access-control-allow-headers") == ["*,Authorization"]
    assert headers.getRawHeaders("access-control-allow-origin") == ["*"]
    code, _, headers = relay.call("GET", f"{EP}/feature-configs", headers={"X-Request-Id": "req-42"})
    assert code == 401 and headers.getRawHeaders("x-request-id") == ["req-42"]
    assert headers.getRawHeaders("access-control-allow-origin") == ["*"]
    # the documentation's unrouted paths: 401 without a token, 404 with one
    assert relay.json("GET", f"{EP}/stream")[0] == 401
    assert relay.json("GET", f"{EP}/stream", token=relay.token()) == (404, {"message": "Not Found"})
    assert relay.json("GET", f"{BASE}/client/auth")[0] == 401
    code, raw, headers = relay.call("GET", f"{BASE}/client/auth", token=relay.token())
    assert (code, raw) == (405, b'{"message":"Method Not Allowed"}\n') and "POST" in headers.getRawHeaders("allow")[0]
    # the health API is untouched
    assert relay.call("GET", f"{BASE}/health")[0] == 200


# ---------------------------------------------------------------------------------------------- metrics

METRICS = {"metricsData": [{"timestamp": 1_700_000_000_000, "count": 3, "metricsType": "FFMETRICS",
                            "attributes": [{"key": "featureIdentifier", "value": "dark_mode"},
                                           {"key": "variationIdentifier", "value": "true"},
                                           {"key": "target", "value": "global"}]}],
           "targetData": [{"identifier": "t1", "name": "T One", "attributes": [{"key": "email", "value": "a@b.c"}]}]}


def test_metrics_intake(relay: Relay) -> None:
    token = relay.token()
    url = f"{BASE}/metrics/{HARNESS_ENV}?cluster=1"
    for _ in range(2):
        code, raw, headers = relay.call("POST", url, METRICS, token=token)
        assert (code, raw) == (200, b"null\n")
        assert headers.getRawHeaders("content-type") == ["application/json; charset=utf-8"]
    taken = relay.api.metrics.take(HARNESS_ENV)
    assert taken is not None and [m["count"] for m in taken["metricsData"]] == [6]
    assert [t["identifier"] for t in taken["targetData"]] == ["t1"]
    for body in (b"", b"{nope", b"[]", b'{"metricsData": 5}', b'{"metricsData": [{"count": -1}]}'):
        code, got = relay.json("POST", url, body, token=token)
        assert code == 400 and got["error"].startswith("bad request")
    assert relay.json("POST", url, METRICS)[0] == 401
    assert relay.json("POST", f"{BASE}/metrics/{OTHER_ENV}", METRICS, token=token)[0] == 401
    assert relay.api.metrics.take(HARNESS_ENV) is None  # refused posts were not counted


# ---------------------------------------------------------------------------------------------- /stream

class Frames:
    """Collects an SSE body and lets a test wait for a frame."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[None] | None = None
        self._waiters: list[tuple[bytes, Deferred[None]]] = []

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk
        for item in list(self._waiters):
            if item[0] in self.data:
                self._waiters.remove(item)
                item[1].callback(None)

    def wait_for(self, needle: bytes, timeout: float = 2.0) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if needle in self.data:
            d.callback(None)
            return d
        self._waiters.append((needle, d))
        return d.addTimeout(timeout, reactor)


@pytest_twisted.ensureDeferred
async def test_stream_validation_events_and_close(offline_dir: Path) -> None:
    store = Store(reactor)
    load(store, offline_dir, reactor)
    store.add("harness", OTHER_ENV, {"api_key_hashes": frozenset({tokens.key_hash(OTHER_KEY)})})
    hub = SSEHub(reactor, heartbeat=0.1)
    hub.startService()
    api = HarnessAPI(store, hub, reactor, SECRET)
    site = RelaydSite(build_router([(api.segments, api.resource())]), clock=reactor)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        auth = await treq.post(f"{base}/client/auth", json={"apiKey": HARNESS_KEY}, persistent=False)
        token = (await auth.json())["authToken"]
        bearer = {"Authorization": f"Bearer {token}"}

        async def refused(headers: dict[str, str]) -> tuple[int, Any]:
            r = await treq.get(f"{base}/stream?cluster=1", headers=headers, persistent=False)
            return r.code, json.loads(await r.content())

        assert await refused({}) == (401, {"message": "missing or malformed jwt"})
        assert await refused({"API-Key": HARNESS_KEY}) == (401, {"message": "missing or malformed jwt"})
        assert await refused(bearer) == (400, {"error": "bad request: API-Key can't be empty"})
        assert await refused({**bearer, "API-Key": "wrong"}) == (
            404, {"error": 'not found: no environment found for apiKey "wrong"'})

        response = await treq.get(f"{base}/stream?cluster=1&stream=*", persistent=False, unbuffered=True,
                                  headers={**bearer, "API-Key": HARNESS_KEY, "Accept": "text/event-stream"})
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type")[0].startswith("text/event-stream")
        frames = Frames()
        body_done = treq.collect(response, frames)
        # a second stream on another environment must not see this environment's events
        other_auth = await treq.post(f"{base}/client/auth", json={"apiKey": OTHER_KEY}, persistent=False)
        other_token = (await other_auth.json())["authToken"]
        other = await treq.get(f"{base}/stream", persistent=False, unbuffered=True,
                               headers={"Authorization": f"Bearer {other_token}", "API-Key": OTHER_KEY})
        other_frames = Frames()
        treq.collect(other, other_frames)
        await frames.wait_for(b":\n\n")  # headers out at once, then heartbeats

        env = store.environment("harness", HARNESS_ENV)
        seen: list[Any] = []

        def fetch_on_event(change: Any) -> None:  # the store already holds the new data when events go out
            seen.append(env.get("flags", "dark_mode"))
        env.subscribe(fetch_on_event)
        env.upsert("flags", "dark_mode", 2, dict(env.get("flags", "dark_mode"), version=2))
        await frames.wait_for(b'data: {"event":"patch","domain":"flag","identifier":"dark_mode","version":2}\n\n')
        assert b'event: *\ndata: {"event":"patch"' in frames.data and seen[0]["version"] == 2
        env.upsert("flags", "new_flag", 1, {"feature": "new_flag", "version": 1})
        await frames.wait_for(b'{"event":"create","domain":"flag","identifier":"new_flag","version":1}')
        env.delete("flags", "new_flag", 2)
        await frames.wait_for(b'{"event":"delete","domain":"flag","identifier":"new_flag","version":2}')
        env.upsert("segments", "beta_testers", 5, dict(env.get("segments", "beta_testers"), version=5))
        await frames.wait_for(b'{"event":"patch","domain":"target-segment","identifier":"beta_testers",'
                              b'"version":5}')
        assert b"dark_mode" not in other_frames.data

        # removing the environment closes its streams (and their connections); the other stays open
        store.remove("harness", HARNESS_ENV)
        await body_done.addTimeout(2, reactor)
        assert hub.count(("harness", HARNESS_ENV)) == 0 and hub.count(("harness", OTHER_ENV)) == 1
        # revoking the other key closes the streams opened with it
        store.add("harness", OTHER_ENV, {"api_key_hashes": frozenset()})
        await deferLater(reactor, 0.2, lambda: None)
        assert hub.count() == 0
    finally:
        await hub.stopService()
        await port.stopListening()


def test_secret_is_configured_or_random_per_process() -> None:
    assert tokens.make_secret("configured") == b"configured"
    a, b = tokens.make_secret(""), tokens.make_secret("")
    assert a != b and len(a) == 64


# ---------------------------------------------------------------------------------------------- hostile input

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("body, code", [
    (DEEP, 400),                          # nesting past the JSON decoder's recursion limit
    (b'{"apiKey":"\\ud800"}', 401),      # a lone surrogate cannot be any configured key
])
def test_auth_hostile_bodies_are_client_errors(relay: Relay, body: bytes, code: int) -> None:
    got_code, got = relay.json("POST", f"{BASE}/client/auth", body)
    assert got_code == code and isinstance(got["error"], str)


def test_metrics_and_target_header_refuse_deep_nesting(relay: Relay) -> None:
    token = relay.token()
    code, got = relay.json("POST", f"{BASE}/metrics/{HARNESS_ENV}", DEEP, token=token)
    assert code == 400 and isinstance(got["error"], str)
    header = base64.b64encode(b"[" * 4000 + b"]" * 4000).decode()  # within the 16 KiB header limit
    assert relay.json("GET", f"{EP}/target/alice/evaluations", token=token, headers={"Harness-Target": header}) \
        == (400, {"error": "bad request: Harness-Target header is invalid"})


def test_unknown_key_gets_503_while_the_first_upstream_sync_runs() -> None:
    """A Harness SDK gives up for good on a 401 but retries a 503: until the SaaS has listed the keys, an unknown
    key may just not be known yet."""
    clock = Clock()
    store = Store(clock)
    ready = [False]
    api = HarnessAPI(store, SSEHub(clock), clock, b"secret", ready=lambda: ready[0])
    stub = StubTreq(api.resource())

    def auth() -> int:
        out: list[int] = []
        stub.post("http://relay/client/auth", data=b'{"apiKey": "not-listed-yet"}').addCallback(
            lambda r: out.append(r.code))
        stub.flush()
        return out[0]

    assert auth() == 503
    ready[0] = True
    assert auth() == 401
