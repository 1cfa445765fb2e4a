"""Model: lenient accessors, client-side availability and canonical (relay-shaped) JSON."""

from __future__ import annotations

import json

import pytest

from relayd.launchdarkly import model


def test_lenient_accessors():
    assert model.arr({"a": None}, "a") == ()
    assert model.arr({}, "a") == ()
    assert model.arr({"a": "x"}, "a") == ()
    assert model.arr({"a": [1]}, "a") == [1]
    assert model.as_int(2) == 2 and model.as_int(2.0) == 2
    assert model.as_int(2.5) is None and model.as_int(True) is None and model.as_int(None) is None
    assert model.as_bool(True) and not model.as_bool(1) and not model.as_bool(None)
    assert model.as_str(None) == "" and model.as_str(3) == "" and model.as_str("x") == "x"
    assert model.is_deleted(None) and model.is_deleted({"deleted": True}) and not model.is_deleted({})
    assert model.version_of({"version": 7}) == 7 and model.version_of({}) == 0


@pytest.mark.parametrize("flag,mobile,js", [
    ({}, True, False),
    ({"clientSide": True}, True, True),
    ({"clientSide": False}, True, False),
    ({"clientSideAvailability": {"usingMobileKey": False, "usingEnvironmentId": True}}, False, True),
    ({"clientSideAvailability": {"usingMobileKey": True, "usingEnvironmentId": False}}, True, False),
    ({"clientSideAvailability": {}}, False, False),
    # the explicit object wins over the legacy mirror
    ({"clientSide": True, "clientSideAvailability": {"usingMobileKey": True, "usingEnvironmentId": False}},
     True, False),
])
def test_client_side_available(flag, mobile, js):
    assert model.client_side_available(flag, "mobile") is mobile
    assert model.client_side_available(flag, "js") is js


def test_client_side_available_rejects_unknown_kind():
    with pytest.raises(ValueError):
        model.client_side_available({}, "server")


def test_canonical_flag_minimal_fills_defaults_in_relay_order():
    out = model.canonical_flag({"key": "f", "version": 3, "unknownField": 1, "prerequisites": None})
    assert list(out) == ["key", "on", "prerequisites", "targets", "contextTargets", "rules", "fallthrough",
                         "offVariation", "variations", "clientSide", "salt", "trackEvents",
                         "trackEventsFallthrough", "debugEventsUntilDate", "version", "deleted"]
    assert out == {"key": "f", "on": False, "prerequisites": [], "targets": [], "contextTargets": [],
                   "rules": [], "fallthrough": {}, "offVariation": None, "variations": [], "clientSide": False,
                   "salt": "", "trackEvents": False, "trackEventsFallthrough": False,
                   "debugEventsUntilDate": None, "version": 3, "deleted": False}


def test_canonical_flag_full():
    flag = {
        "deleted": False, "version": 9, "key": "f", "on": True, "salt": "s",
        "prerequisites": [{"key": "p", "variation": 1, "junk": 1}],
        "targets": [{"values": ["a"], "variation": 0}],
        "contextTargets": [{"contextKind": "org", "variation": 1, "values": ["o"]},
                           {"contextKind": "user", "variation": 0, "values": []}],
        "rules": [{"clauses": [{"attribute": "email", "op": "endsWith", "values": ["@x"], "negate": False}],
                   "id": "r1", "variation": 1, "trackEvents": True},
                  {"clauses": [{"contextKind": "org", "attribute": "/a/b", "op": "in", "values": [1.0, 2.5]}],
                   "rollout": {"variations": [{"variation": 0, "weight": 60000},
                                              {"variation": 1, "weight": 40000, "untracked": True}],
                               "kind": "experiment", "seed": 61, "contextKind": "org", "bucketBy": "x"}},
                  {"clauses": [{"attribute": None, "op": "segmentMatch", "values": ["s1"]}], "id": ""}],
        "fallthrough": {"rollout": {"variations": [{"variation": 0, "weight": 100000}], "bucketBy": ""}},
        "offVariation": 1, "variations": [True, False, 3.0],
        "clientSideAvailability": {"usingEnvironmentId": True, "usingMobileKey": False},
        "trackEvents": True, "trackEventsFallthrough": False, "debugEventsUntilDate": 1700000000000,
        "migration": {"checkRatio": 5}, "samplingRatio": 10, "excludeFromSummaries": True,
    }
    out = model.canonical_flag(flag)
    assert list(out)[-6:] == ["debugEventsUntilDate", "version", "deleted", "migration", "samplingRatio",
                              "excludeFromSummaries"]
    assert out["prerequisites"] == [{"key": "p", "variation": 1}]
    assert out["targets"] == [{"variation": 0, "values": ["a"]}]
    assert out["contextTargets"] == [{"contextKind": "org", "variation": 1, "values": ["o"]},
                                     {"contextKind": "user", "variation": 0, "values": []}]
    r0, r1, r2 = out["rules"]
    assert list(r0) == ["variation", "id", "clauses", "trackEvents"]
    assert r0["clauses"] == [{"attribute": "email", "op": "endsWith", "values": ["@x"], "negate": False}]
    assert list(r1) == ["rollout", "clauses", "trackEvents"]
    assert list(r1["rollout"]) == ["kind", "contextKind", "variations", "seed", "bucketBy"]
    assert r1["rollout"]["variations"][1] == {"variation": 1, "weight": 40000, "untracked": True}
    assert list(r1["rollout"]["variations"][0]) == ["variation", "weight"]
    assert r1["clauses"][0] == {"contextKind": "org", "attribute": "/a/b", "op": "in", "values": [1, 2.5],
                                "negate": False}
    assert r2["clauses"][0]["attribute"] == ""  # undefined attribute written as ""
    assert "id" not in r2
    assert out["fallthrough"] == {"rollout": {"variations": [{"variation": 0, "weight": 100000}]}}
    assert out["variations"] == [True, False, 3]
    assert json.dumps(out["variations"]) == "[true, false, 3]"
    assert out["clientSideAvailability"] == {"usingMobileKey": False, "usingEnvironmentId": True}
    assert list(out["clientSideAvailability"]) == ["usingMobileKey", "usingEnvironmentId"]
    assert out["clientSide"] is True
    assert out["debugEventsUntilDate"] == 1700000000000
    assert out["migration"] == {"checkRatio": 5} and out["samplingRatio"] == 10
    assert out["excludeFromSummaries"] is True


def test_canonical_flag_does_not_mutate_input():
    flag = {"key": "f", "variations": [1.0], "rules": [{"clauses": [{"attribute": "a", "op": "in",
                                                                       "values": [2.0]}]}]}
    snapshot = json.dumps(flag)
    model.canonical_flag(flag)
    assert json.dumps(flag) == snapshot


def test_canonical_segment():
    seg = {"key": "s", "version": 2, "included": ["a"], "excluded": None,
           "includedContexts": [{"contextKind": "org", "values": ["o"]}], "salt": "x",
           "rules": [{"id": "r", "clauses": [], "weight": 5000, "bucketBy": "email",
                      "rolloutContextKind": "user"}, {"clauses": []}],
           "unbounded": True, "unboundedContextKind": "org", "generation": 4, "extra": 1}
    out = model.canonical_segment(seg)
    assert list(out) == ["key", "included", "excluded", "includedContexts", "excludedContexts", "salt", "rules",
                         "unbounded", "unboundedContextKind", "version", "generation", "deleted"]
    assert out["excluded"] == [] and out["excludedContexts"] == []
    assert out["rules"] == [{"id": "r", "clauses": [], "weight": 5000, "bucketBy": "email",
                             "rolloutContextKind": "user"}, {"id": "", "clauses": []}]
    assert out["generation"] == 4 and out["deleted"] is False
    plain = model.canonical_segment({"key": "p"})
    assert "unbounded" not in plain and plain["generation"] is None


def test_canonical_json_is_compact_utf8():
    assert model.canonical_json({"a": ["é", 1]}) == '{"a":["é",1]}'.encode("utf-8")
