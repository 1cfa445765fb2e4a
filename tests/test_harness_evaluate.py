"""Tests of the Harness evaluation engine against protocols/harness.md section 5 (Go SDK semantics)."""

from __future__ import annotations

import json

import pytest

from relayd.harness.evaluate import (
    Target,
    attribute_value,
    bucket,
    evaluate,
    evaluate_all,
    evaluation_json,
    unserved_reason,
)
from relayd.regex import compile_clause

# --------------------------------------------------------------------------------------------
# Builders


def flag(
    feature: str = "f1",
    *,
    kind: str = "boolean",
    state: str = "on",
    variations=None,
    default: str | None = "false",
    distribution=None,
    off: str = "off",
    rules=None,
    target_map=None,
    prerequisites=None,
) -> dict:
    if variations is None:
        variations = [
            {"identifier": "true", "value": "true", "name": "True"},
            {"identifier": "false", "value": "false", "name": "False"},
            {"identifier": "off", "value": "false", "name": "Off"},
        ]
    serve: dict = {}
    if default is not None:
        serve["variation"] = default
    if distribution is not None:
        serve["distribution"] = distribution
    out = {
        "feature": feature,
        "environment": "dev",
        "project": "proj",
        "kind": kind,
        "state": state,
        "version": 1,
        "variations": variations,
        "defaultServe": serve,
        "offVariation": off,
    }
    if rules is not None:
        out["rules"] = rules
    if target_map is not None:
        out["variationToTargetMap"] = target_map
    if prerequisites is not None:
        out["prerequisites"] = prerequisites
    return out


def clause(attribute: str, op: str, *values: str, negate: bool = False) -> dict:
    return {"id": "c", "attribute": attribute, "op": op, "values": list(values), "negate": negate}


def rule(priority: int, serve: str, *clauses: dict, rule_id: str = "") -> dict:
    return {"ruleId": rule_id or f"r{priority}", "priority": priority, "clauses": list(clauses), "serve": {"variation": serve}}


def dist(bucket_by: str, *weights: tuple[str, int]) -> dict:
    return {"bucketBy": bucket_by, "variations": [{"variation": v, "weight": w} for v, w in weights]}


def segment(identifier: str, *, included=(), excluded=(), rules=None, serving_rules=None) -> dict:
    def tgt(i: str) -> dict:
        return {"account": "", "environment": "", "identifier": i, "name": i, "org": "", "project": ""}

    out = {
        "identifier": identifier,
        "name": identifier,
        "environment": "dev",
        "version": 1,
        "included": [tgt(i) for i in included],
        "excluded": [tgt(i) for i in excluded],
    }
    if rules is not None:
        out["rules"] = rules
    if serving_rules is not None:
        out["servingRules"] = serving_rules
    return out


def served(f: dict, target: Target | None, flags=None, segments=None) -> str | None:
    v = evaluate(f, target, flags if flags is not None else {f["feature"]: f}, segments or {})
    return None if v is None else v["identifier"]


def matches(c: dict, target: Target | None, segments=None) -> bool:
    """True when a single-clause rule selects its variation."""
    f = flag(rules=[rule(1, "true", c)])
    return served(f, target, segments=segments) == "true"


ALICE = Target("alice", "Alice", attributes={"email": "alice@example.com", "age": 30, "score": 1.5, "beta": True})


# --------------------------------------------------------------------------------------------
# Target


def test_target_from_json_full():
    t = Target.from_json({"identifier": "t1", "name": "T", "anonymous": True, "attributes": {"a": 1}})
    assert t == Target("t1", "T", True, {"a": 1})


def test_target_from_json_optional_members_absent_or_null():
    assert Target.from_json({"identifier": "t1"}) == Target("t1")
    assert Target.from_json({"identifier": "t1", "name": None, "anonymous": None, "attributes": None}) == Target("t1")


@pytest.mark.parametrize(
    "obj",
    [
        None,
        "t1",
        ["t1"],
        {},
        {"identifier": None},
        {"identifier": 5},
        {"identifier": "t", "name": 3},
        {"identifier": "t", "anonymous": "yes"},
        {"identifier": "t", "attributes": []},
    ],
)
def test_target_from_json_rejects(obj):
    with pytest.raises(ValueError):
        Target.from_json(obj)


# --------------------------------------------------------------------------------------------
# Attribute lookup (5.5)


@pytest.mark.parametrize(
    "attr, expected",
    [
        ("identifier", "alice"),
        ("Identifier", "alice"),
        ("name", "Alice"),
        ("NAME", "Alice"),
        ("email", "alice@example.com"),
        ("age", "30"),
        ("score", "1.5"),
        ("beta", "true"),
        ("missing", ""),
        ("Email", ""),  # custom attribute keys are exact
    ],
)
def test_attribute_value(attr, expected):
    assert attribute_value(ALICE, attr) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        (30, "30"),
        (-7, "-7"),
        (30.0, "30"),
        (1.5, "1.5"),
        (0.1, "0.1"),
        (-2.25, "-2.25"),
        (1e21, "1000000000000000000000"),
        (1e-05, "0.00001"),
        (123456789.125, "123456789.125"),
        (True, "true"),
        (False, "false"),
        ("x", "x"),
        ({"b": 1, "a": [1, 2.0]}, '{"a":[1,2],"b":1}'),
        ([1, "x", True], '[1,"x",true]'),
    ],
)
def test_attribute_conversion(value, expected):
    assert attribute_value(Target("t", attributes={"k": value}), "k") == expected


def test_attribute_of_no_target():
    assert attribute_value(None, "identifier") == ""


def test_numeric_attribute_in_clause():
    assert matches(clause("age", "equal", "30"), ALICE)
    assert matches(clause("score", "starts_with", "1.5"), ALICE)
    assert matches(clause("beta", "equal_sensitive", "true"), ALICE)
    assert not matches(clause("age", "equal", "30.0"), ALICE)


# --------------------------------------------------------------------------------------------
# Operators (5.3)

T = Target("user-1", "Bob", attributes={"email": "Bob@Example.com", "plan": "gold", "v": "b"})


@pytest.mark.parametrize(
    "c, expected",
    [
        (clause("email", "starts_with", "Bob@"), True),
        (clause("email", "starts_with", "bob@"), False),
        (clause("email", "ends_with", "@Example.com"), True),
        (clause("email", "ends_with", "@example.org"), False),
        (clause("email", "contains", "@Exam"), True),
        (clause("email", "contains", "@exam"), False),
        (clause("email", "equal", "bob@example.COM"), True),
        (clause("email", "equal", "bob@example.co"), False),
        (clause("email", "equal_sensitive", "Bob@Example.com"), True),
        (clause("email", "equal_sensitive", "bob@example.com"), False),
        (clause("plan", "in", "silver", "gold"), True),
        (clause("plan", "in", "silver", "GOLD"), False),
        (clause("v", "gt", "a"), True),
        (clause("v", "gt", "b"), False),
        (clause("v", "gt", "B"), True),  # lexicographic: "b" > "B"
        (clause("identifier", "match", r"r-\d"), True),  # unanchored search
        (clause("identifier", "match", r"^\d"), False),
        (clause("identifier", "match", "user-1$"), True),
        (clause("identifier", "match", "(unclosed"), False),  # bad regex
        (clause("name", "equal", "bob"), True),
        (clause("plan", "no_such_op", "gold"), False),
    ],
)
def test_operators(c, expected):
    assert matches(c, T) is expected


def test_gt_is_string_not_numeric():
    t = Target("t", attributes={"n": 9})
    assert matches(clause("n", "gt", "10"), t)  # "9" > "10"
    assert not matches(clause("n", "gt", "90"), t)


def test_equal_fold_unicode():
    t = Target("t", attributes={"city": "ÅRHUS", "s": "straße"})
    assert matches(clause("city", "equal", "århus"), t)
    assert not matches(clause("s", "equal", "STRASSE"), t)  # simple folding only, like EqualFold


def test_match_regex_is_cached():
    compile_clause.cache_clear()
    for _ in range(5):
        assert matches(clause("identifier", "match", "^user-[0-9]+$"), T)
    info = compile_clause.cache_info()
    assert info.misses == 1 and info.hits == 4


@pytest.mark.parametrize("pattern,value,expected", [
    (r"^\pL+$", "héllo", True),          # RE2 Unicode classes, which Python's re lacks
    (r"^b$", "b\n", False),              # Go: $ is the very end of the text, never before a final newline
    (r"(?=a)a", "a", False),             # lookarounds do not compile in Go: the clause cannot match
    (r"(a)\1", "aa", False),             # nor backreferences
    (r"(?i)ÉTÉ", "été", True),
])
def test_match_uses_go_regexp_semantics(pattern, value, expected):
    t = Target("x", attributes={"v": value})
    assert matches(clause("v", "match", pattern), t) is expected


@pytest.mark.parametrize(
    "c",
    [
        {"attribute": "plan", "op": "equal", "values": []},
        {"attribute": "plan", "op": "equal"},
        {"attribute": "plan", "values": ["gold"]},
        {"attribute": "plan", "op": "", "values": ["gold"]},
        {"attribute": "plan", "op": "equal", "values": None},
    ],
)
def test_clause_without_op_or_values_is_false(c):
    assert not matches(c, T)


@pytest.mark.parametrize("op", ["starts_with", "ends_with", "contains", "equal", "equal_sensitive", "in", "match"])
def test_empty_attribute_is_false(op):
    # An empty pattern/prefix would match any non-empty string, yet an empty attribute never matches.
    assert not matches(clause("missing", op, ""), T)
    assert not matches(clause("missing", "match", ".*"), T)


def test_negate_is_ignored():
    assert matches(clause("plan", "equal", "gold", negate=True), T)
    assert not matches(clause("plan", "equal", "silver", negate=True), T)


def test_segment_match_does_not_need_attribute():
    segs = {"vip": segment("vip", included=["user-1"])}
    assert matches(clause("", "segmentMatch", "vip"), T, segs)
    assert not matches(clause("", "segmentMatch", "vip"), Target("other"), segs)


# --------------------------------------------------------------------------------------------
# Flag evaluation order (5.2)


def test_off_flag_serves_off_variation():
    f = flag(state="off", target_map=[{"variation": "true", "targets": [{"identifier": "alice"}]}])
    assert served(f, ALICE) == "off"


def test_default_serve_variation():
    assert served(flag(default="true"), ALICE) == "true"


def test_unknown_variation_gives_none():
    assert served(flag(default="nope"), ALICE) is None
    assert served(flag(state="off", off="nope"), ALICE) is None
    assert served(flag(default=None), ALICE) is None


def test_served_object_is_the_flag_variation():
    f = flag(default="true")
    assert evaluate(f, ALICE, {"f1": f}, {}) is f["variations"][0]


def test_target_map_by_identifier_precedes_rules():
    f = flag(
        target_map=[{"variation": "true", "targets": [{"identifier": "alice", "name": "A"}]}],
        rules=[rule(1, "off", clause("identifier", "equal", "alice"))],
    )
    assert served(f, ALICE) == "true"
    assert served(f, Target("bob")) == "false"


def test_target_map_first_entry_wins():
    f = flag(
        target_map=[
            {"variation": "off", "targets": [{"identifier": "x"}], "targetSegments": ["beta"]},
            {"variation": "true", "targets": [{"identifier": "alice"}]},
        ]
    )
    segs = {"beta": segment("beta", included=["alice"])}
    assert served(f, ALICE, segments=segs) == "off"


def test_target_map_via_segment():
    f = flag(target_map=[{"variation": "true", "targets": None, "targetSegments": ["beta"]}])
    segs = {"beta": segment("beta", rules=[clause("email", "ends_with", "@example.com")])}
    assert served(f, ALICE, segments=segs) == "true"
    assert served(f, Target("bob", attributes={"email": "b@x.org"}), segments=segs) == "false"


def test_target_map_empty_identifier_never_matches():
    f = flag(target_map=[{"variation": "true", "targets": [{"identifier": ""}]}])
    assert served(f, Target("")) == "false"


def test_target_map_null_is_fine():
    f = flag(default="true")
    f["variationToTargetMap"] = None
    f["rules"] = None
    assert served(f, ALICE) == "true"


def test_rules_sorted_by_priority():
    f = flag(
        rules=[
            rule(3, "off", clause("identifier", "equal", "alice")),
            rule(1, "true", clause("email", "contains", "alice")),
            rule(2, "off", clause("name", "equal", "alice")),
        ]
    )
    before = [r["priority"] for r in f["rules"]]
    assert served(f, ALICE) == "true"
    assert [r["priority"] for r in f["rules"]] == before  # the stored flag is not reordered


def test_rules_equal_priority_keep_array_order():
    f = flag(
        rules=[
            rule(5, "off", clause("identifier", "equal", "alice"), rule_id="a"),
            rule(5, "true", clause("identifier", "equal", "alice"), rule_id="b"),
            rule(1, "false", clause("identifier", "equal", "nobody")),
        ]
    )
    assert served(f, ALICE) == "off"


def test_rule_clauses_are_anded():
    f = flag(rules=[rule(1, "true", clause("identifier", "equal", "alice"), clause("email", "ends_with", "@nope.com"))])
    assert served(f, ALICE) == "false"
    f = flag(rules=[rule(1, "true", clause("identifier", "equal", "alice"), clause("email", "ends_with", "@example.com"))])
    assert served(f, ALICE) == "true"


def test_rule_without_clauses_matches_everyone():
    # Go's evaluateClauses over an empty list is true.
    assert served(flag(rules=[rule(1, "true")]), ALICE) == "true"


def test_rule_without_serve_variation_is_skipped():
    r1 = {"priority": 1, "clauses": [clause("identifier", "equal", "alice")], "serve": {}}
    r2 = rule(2, "true", clause("identifier", "equal", "alice"))
    assert served(flag(rules=[r1, r2]), ALICE) == "true"


def test_rule_with_distribution():
    # identifier:enver -> bucket 67
    r = {"priority": 1, "clauses": [], "serve": {"distribution": dist("identifier", ("true", 66), ("false", 34))}}
    assert served(flag(default="off", rules=[r]), Target("enver")) == "false"
    r["serve"]["distribution"] = dist("identifier", ("true", 67), ("false", 33))
    assert served(flag(default="off", rules=[r]), Target("enver")) == "true"


def test_no_target_skips_map_and_rules():
    f = flag(
        default="true",
        target_map=[{"variation": "off", "targets": [{"identifier": ""}], "targetSegments": ["all"]}],
        rules=[rule(1, "off")],
    )
    segs = {"all": segment("all", rules=[clause("identifier", "match", ".*")])}
    assert served(f, None, segments=segs) == "true"


def test_no_target_with_distribution_serves_last():
    f = flag(default=None, distribution=dist("identifier", ("true", 50), ("false", 50)))
    assert served(f, None) == "false"


# --------------------------------------------------------------------------------------------
# Prerequisites


def test_prerequisite_satisfied():
    parent = flag("parent", default="true")
    child = flag("child", default="true", prerequisites=[{"feature": "parent", "variations": ["true"]}])
    flags = {"parent": parent, "child": child}
    assert served(child, ALICE, flags) == "true"


def test_prerequisite_failed_serves_off_variation():
    parent = flag("parent", default="false")
    child = flag("child", default="true", prerequisites=[{"feature": "parent", "variations": ["true"]}])
    assert served(child, ALICE, {"parent": parent, "child": child}) == "off"


def test_prerequisite_evaluated_for_the_target():
    parent = flag("parent", default="false", rules=[rule(1, "true", clause("identifier", "equal", "alice"))])
    child = flag("child", default="true", prerequisites=[{"feature": "parent", "variations": ["true"]}])
    flags = {"parent": parent, "child": child}
    assert served(child, ALICE, flags) == "true"
    assert served(child, Target("bob"), flags) == "off"


def test_prerequisite_off_parent_uses_its_off_variation():
    parent = flag("parent", state="off", off="false")
    child = flag("child", default="true", prerequisites=[{"feature": "parent", "variations": ["false"]}])
    assert served(child, ALICE, {"parent": parent, "child": child}) == "true"


def test_prerequisite_missing_flag_is_satisfied():
    other = flag("other", default="false")
    child = flag(
        "child",
        default="true",
        prerequisites=[{"feature": "gone", "variations": ["true"]}, {"feature": "other", "variations": ["true"]}],
    )
    flags = {"child": child, "other": other}
    # As the vendor SDKs: the missing one ends the check as satisfied, the failing one after it is not reached.
    assert served(child, ALICE, flags) == "true"
    # ... while a failing prerequisite before the missing one still fails the check
    child["prerequisites"].reverse()
    assert served(child, ALICE, flags) == "off"
    other["defaultServe"] = {"variation": "true"}
    assert served(child, ALICE, flags) == "true"


def test_prerequisite_all_must_hold():
    a = flag("a", default="true")
    b = flag("b", default="false")
    child = flag("child", default="true", prerequisites=[{"feature": "a", "variations": ["true"]}, {"feature": "b", "variations": ["true"]}])
    assert served(child, ALICE, {"a": a, "b": b, "child": child}) == "off"


def test_prerequisite_nested():
    grand = flag("grand", default="false")
    parent = flag("parent", default="true", prerequisites=[{"feature": "grand", "variations": ["true"]}])
    child = flag("child", default="true", prerequisites=[{"feature": "parent", "variations": ["true"]}])
    flags = {"grand": grand, "parent": parent, "child": child}
    assert served(child, ALICE, flags) == "off"
    grand["defaultServe"] = {"variation": "true"}
    assert served(child, ALICE, flags) == "true"


def test_prerequisite_nested_go_quirk_parent_checked_before_its_prereqs():
    # Go compares the parent's own evaluation (state/map/rules/default) with the allowed variations,
    # then checks the parent's prerequisites; a failing grand-parent fails the child even when the
    # parent's off variation would have been an allowed one.
    grand = flag("grand", default="false")
    parent = flag("parent", default="true", off="off", prerequisites=[{"feature": "grand", "variations": ["true"]}])
    child = flag("child", default="true", prerequisites=[{"feature": "parent", "variations": ["true", "off"]}])
    assert served(child, ALICE, {"grand": grand, "parent": parent, "child": child}) == "off"


@pytest.mark.parametrize("chain_len", [1, 2, 3])
def test_prerequisite_cycle_terminates_and_fails(chain_len):
    names = [f"f{i}" for i in range(chain_len)]
    flags = {}
    for i, n in enumerate(names):
        nxt = names[(i + 1) % chain_len]
        flags[n] = flag(n, default="true", prerequisites=[{"feature": nxt, "variations": ["true"]}])
    for n in names:
        assert served(flags[n], ALICE, flags) == "off"


def test_prerequisite_diamond_is_not_a_cycle():
    base = flag("base", default="true")
    left = flag("left", default="true", prerequisites=[{"feature": "base", "variations": ["true"]}])
    right = flag("right", default="true", prerequisites=[{"feature": "base", "variations": ["true"]}])
    top = flag(
        "top",
        default="true",
        prerequisites=[{"feature": "left", "variations": ["true"]}, {"feature": "right", "variations": ["true"]}],
    )
    assert served(top, ALICE, {"base": base, "left": left, "right": right, "top": top}) == "true"


def test_prerequisite_checked_before_state():
    parent = flag("parent", default="false")
    child = flag("child", state="off", off="true", prerequisites=[{"feature": "parent", "variations": ["true"]}])
    child["variations"].append({"identifier": "x", "value": "x"})
    assert served(child, ALICE, {"parent": parent, "child": child}) == "true"


# --------------------------------------------------------------------------------------------
# Segment membership (5.4)


def seg_flag() -> dict:
    return flag(rules=[rule(1, "true", clause("", "segmentMatch", "s1", "s2"))])


def in_segs(target: Target | None, segs: dict) -> bool:
    return served(seg_flag(), target, segments=segs) == "true"


def test_segment_included():
    assert in_segs(ALICE, {"s1": segment("s1", included=["alice"]), "s2": segment("s2")})
    assert not in_segs(Target("bob"), {"s1": segment("s1", included=["alice"]), "s2": segment("s2")})


def test_segment_excluded_beats_included_and_rules():
    s1 = segment("s1", included=["alice"], excluded=["alice"], rules=[clause("identifier", "equal", "alice")])
    assert not in_segs(ALICE, {"s1": s1, "s2": segment("s2")})


def test_segment_excluded_returns_false_even_if_later_segment_includes():
    segs = {"s1": segment("s1", excluded=["alice"]), "s2": segment("s2", included=["alice"])}
    assert not in_segs(ALICE, segs)


def test_segment_later_segment_includes():
    segs = {"s1": segment("s1", included=["x"]), "s2": segment("s2", included=["alice"])}
    assert in_segs(ALICE, segs)


def test_segment_missing_is_false_for_the_whole_call():
    assert not in_segs(ALICE, {"s2": segment("s2", included=["alice"])})
    # A missing *second* segment does not matter when the first one includes.
    assert in_segs(ALICE, {"s1": segment("s1", included=["alice"])})


def test_segment_members_given_as_bare_identifiers():
    # Older exports list members as plain strings instead of Target objects; both must work, and
    # an exclusion written that way still beats the segment's rules.
    s1 = {"identifier": "s1", "included": ["carol", "dave"], "excluded": ["alice"],
          "rules": [clause("identifier", "starts_with", "a")]}
    segs = {"s1": s1, "s2": segment("s2")}
    assert in_segs(Target("dave"), segs)
    assert not in_segs(ALICE, segs)
    assert in_segs(Target("anna"), segs)
    assert not in_segs(Target("erin"), segs)


def test_segment_member_of_unknown_shape_names_no_target():
    s1 = {"identifier": "s1", "included": [None, 7, {"identifier": 3}, ["alice"], "alice"]}
    assert in_segs(ALICE, {"s1": s1, "s2": segment("s2")})
    s1 = {"identifier": "s1", "included": [None, 7, {"name": "alice"}]}
    assert not in_segs(ALICE, {"s1": s1, "s2": segment("s2")})


def test_target_map_members_given_as_bare_identifiers():
    f = flag(target_map=[{"variation": "true", "targets": ["zed", "yan"]}])
    assert served(f, Target("yan")) == "true"
    assert served(f, Target("xia")) == "false"


def test_evaluate_all_survives_bare_identifier_members():
    segs = {"grp": {"identifier": "grp", "included": ["kim"], "excluded": []}}
    flags = {"a": flag("a", rules=[rule(1, "true", clause("", "segmentMatch", "grp"))]),
             "b": flag("b", default="true")}
    out = evaluate_all(Target("kim"), flags, segs)
    assert [(e["flag"], e["value"]) for e in out] == [("a", "true"), ("b", "true")]


def test_segment_legacy_rules_are_ored():
    s1 = segment("s1", rules=[clause("email", "ends_with", "@nope.com"), clause("age", "equal", "30")])
    assert in_segs(ALICE, {"s1": s1, "s2": segment("s2")})
    s1 = segment("s1", rules=[clause("email", "ends_with", "@nope.com"), clause("age", "equal", "31")])
    assert not in_segs(ALICE, {"s1": s1, "s2": segment("s2")})


def test_segment_serving_rules_and_within_or_across():
    sr_fail = {"ruleId": "a", "priority": 1, "clauses": [clause("age", "equal", "30"), clause("email", "ends_with", "@nope.com")]}
    sr_ok = {"ruleId": "b", "priority": 2, "clauses": [clause("age", "equal", "30"), clause("email", "ends_with", "@example.com")]}
    assert not in_segs(ALICE, {"s1": segment("s1", serving_rules=[sr_fail]), "s2": segment("s2")})
    assert in_segs(ALICE, {"s1": segment("s1", serving_rules=[sr_fail, sr_ok]), "s2": segment("s2")})


def test_segment_serving_rules_take_precedence_over_legacy_rules():
    sr_fail = {"ruleId": "a", "priority": 1, "clauses": [clause("age", "equal", "99")]}
    legacy_ok = [clause("age", "equal", "30")]
    segs = {"s1": segment("s1", rules=legacy_ok, serving_rules=[sr_fail]), "s2": segment("s2")}
    assert not in_segs(ALICE, segs)
    segs["s1"]["servingRules"] = []  # empty serving rules: legacy rules apply
    assert in_segs(ALICE, segs)


def test_segment_serving_rule_without_clauses_never_matches():
    segs = {"s1": segment("s1", serving_rules=[{"ruleId": "a", "priority": 1, "clauses": []}]), "s2": segment("s2")}
    assert not in_segs(ALICE, segs)


def test_segment_no_target():
    assert not in_segs(None, {"s1": segment("s1", included=[""]), "s2": segment("s2")})


def test_segment_rule_can_match_another_segment():
    segs = {
        "s1": segment("s1", rules=[clause("", "segmentMatch", "inner")]),
        "s2": segment("s2"),
        "inner": segment("inner", included=["alice"]),
    }
    assert in_segs(ALICE, segs)
    assert not in_segs(Target("bob"), segs)


def test_segment_cycle_terminates():
    segs = {
        "s1": segment("s1", rules=[clause("", "segmentMatch", "s2")]),
        "s2": segment("s2", rules=[clause("", "segmentMatch", "s1")]),
    }
    assert not in_segs(ALICE, segs)
    segs["s2"]["included"] = [{"identifier": "alice"}]
    assert in_segs(ALICE, segs)


# --------------------------------------------------------------------------------------------
# Percentage rollout (5.6)


@pytest.mark.parametrize(
    "key, expected",
    [
        ("email:enver.bisevac@harness", 61),
        ("identifier:enver", 67),
        ("email:enver.bisevac@harness.io", 32),
        ("identifier:harness", 6),
        ("identifier:john", 6),
        ("identifier:test", 57),
        ("name:Harness", 68),
        ("identifier:target-1", 83),
    ],
)
def test_bucket_vectors(key, expected):
    attr, _, value = key.partition(":")
    assert bucket(attr, value) == expected


def rollout(bucket_by: str, *weights: tuple[str, int]) -> dict:
    variations = [{"identifier": v, "value": v} for v, _ in weights]
    return flag(default=None, variations=variations, distribution=dist(bucket_by, *weights))


def test_rollout_identifier_enver_gets_b():
    assert served(rollout("identifier", ("A", 10), ("B", 60), ("C", 30)), Target("enver")) == "B"


def test_rollout_email_attribute_gets_a():
    t = Target("someone", attributes={"email": "enver.bisevac@harness.io"})
    assert served(rollout("email", ("A", 40), ("B", 40), ("C", 20)), t) == "A"


def test_rollout_falls_through_to_last():
    # identifier:harness -> 6 > 1 + 2: no cumulative weight covers it -> last variation.
    assert served(rollout("identifier", ("true", 1), ("false", 2)), Target("harness")) == "false"


def test_rollout_boundaries_are_inclusive():
    # identifier:test -> 57
    assert served(rollout("identifier", ("A", 57), ("B", 43)), Target("test")) == "A"
    assert served(rollout("identifier", ("A", 56), ("B", 44)), Target("test")) == "B"


def test_rollout_zero_weight_never_wins():
    # identifier:john -> 6; first variation has 0 weight
    assert served(rollout("identifier", ("A", 0), ("B", 10), ("C", 90)), Target("john")) == "B"


def test_rollout_by_name():
    # name:Harness -> 68
    f = rollout("name", ("A", 67), ("B", 33))
    assert served(f, Target("x", "Harness")) == "B"
    f = rollout("name", ("A", 68), ("B", 32))
    assert served(f, Target("x", "Harness")) == "A"


def test_rollout_missing_attribute_falls_back_to_identifier():
    # email missing -> identifier:enver -> 67, not the hash of "email:enver"
    f = rollout("email", ("A", 66), ("B", 34))
    assert served(f, Target("enver")) == "B"
    f = rollout("email", ("A", 67), ("B", 33))
    assert served(f, Target("enver")) == "A"


def test_rollout_attribute_used_not_identifier():
    # email:enver.bisevac@harness -> 61 while identifier:enver -> 67
    t = Target("enver", attributes={"email": "enver.bisevac@harness"})
    assert served(rollout("email", ("A", 61), ("B", 39)), t) == "A"
    assert served(rollout("identifier", ("A", 61), ("B", 39)), t) == "B"


def test_rollout_empty_identifier_serves_last():
    assert served(rollout("identifier", ("A", 100), ("B", 0)), Target("")) == "B"


def test_rollout_before_default_variation():
    f = flag(default="off", distribution=dist("identifier", ("true", 100)))
    assert served(f, Target("anyone")) == "true"
    f["defaultServe"]["distribution"]["variations"] = []
    assert served(f, Target("anyone")) == "off"


def test_rollout_numeric_attribute_is_hashed_as_go_string():
    # age 30.0 must hash as "age:30"
    t_float = Target("x", attributes={"age": 30.0})
    t_int = Target("x", attributes={"age": 30})
    b = bucket("age", "30")
    f = rollout("age", ("A", b), ("B", 100 - b))
    assert served(f, t_float) == "A" == served(f, t_int)
    if b > 1:
        f = rollout("age", ("A", b - 1), ("B", 101 - b))
        assert served(f, t_float) == "B"


# --------------------------------------------------------------------------------------------
# evaluation_json / evaluate_all (2.5)


@pytest.mark.parametrize(
    "kind, value",
    [
        ("boolean", "true"),
        ("int", "42"),
        ("number", "0.11"),
        ("string", "hello world"),
        ("json", '{"a": 1, "b": [true, null]}'),
    ],
)
def test_evaluation_json_kinds(kind, value):
    f = flag("k", kind=kind, default="v1", variations=[{"identifier": "v1", "value": value}])
    assert evaluation_json(f, ALICE, {"k": f}, {}) == {"flag": "k", "identifier": "v1", "kind": kind, "value": value}


def test_evaluation_json_json_kind_is_raw_text():
    raw = '{"theme":"dark","sizes":[1,2]}'
    f = flag("j", kind="json", default="v", variations=[{"identifier": "v", "value": raw}])
    out = evaluation_json(f, None, {"j": f}, {})
    assert out["value"] == raw
    assert json.loads(out["value"]) == {"theme": "dark", "sizes": [1, 2]}  # parses once, not twice


def test_evaluation_json_non_string_values_from_hand_written_data():
    f = flag("j", kind="json", default="v", variations=[{"identifier": "v", "value": {"a": 1}}])
    assert evaluation_json(f, None, {"j": f}, {})["value"] == '{"a":1}'
    f = flag("b", kind="boolean", default="v", variations=[{"identifier": "v", "value": True}])
    assert evaluation_json(f, None, {"b": f}, {})["value"] == "true"


def test_evaluation_json_none_without_variation():
    f = flag(default="missing")
    assert evaluation_json(f, ALICE, {"f1": f}, {}) is None


def test_evaluation_json_target_none():
    f = flag(default="true", rules=[rule(1, "off")])
    assert evaluation_json(f, None, {"f1": f}, {}) == {"flag": "f1", "identifier": "true", "kind": "boolean", "value": "true"}


def test_evaluate_all_sorted_and_complete():
    flags = {
        "zeta": flag("zeta", default="true"),
        "alpha": flag("alpha", state="off"),
        "mid": flag("mid", kind="string", default="s", variations=[{"identifier": "s", "value": "str"}]),
        "broken": flag("broken", default="nope"),
    }
    out = evaluate_all(ALICE, flags, {})
    assert [e["flag"] for e in out] == ["alpha", "broken", "mid", "zeta"]
    assert out[0] == {"flag": "alpha", "identifier": "off", "kind": "boolean", "value": "false"}
    # no variation "nope": listed with Go's zero Variation, as the vendor relay lists it
    assert out[1] == {"flag": "broken", "identifier": "", "kind": "boolean", "value": ""}
    assert out[2]["value"] == "str"


def test_evaluate_all_lists_every_unservable_flag_with_empty_variation():
    colours = [{"identifier": "red", "value": "#f00"}, {"identifier": "blue", "value": "#00f"}]
    flags = {
        # off, and the off variation names nothing
        "dim": flag("dim", kind="string", state="off", off="", variations=colours),
        # target map serves an identifier that is not a variation; others get the default
        "mapped": flag("mapped", kind="string", default="blue", variations=colours,
                       target_map=[{"variation": "green", "targets": [{"identifier": "alice"}]}]),
        # the prerequisite fails, and the off variation is gone
        "gated": flag("gated", kind="json", default="doc", off="gone",
                      variations=[{"identifier": "doc", "value": '{"a":1}'}],
                      prerequisites=[{"feature": "mapped", "variations": ["red"]}]),
        # neither a default variation nor a distribution: nothing is chosen
        "empty": flag("empty", kind="int", default=None, variations=[{"identifier": "1", "value": "1"}]),
    }
    def blank(feature: str, kind: str) -> dict:
        # a json flag's value is JSON text even when empty: client SDKs JSON.parse it
        return {"flag": feature, "identifier": "", "kind": kind, "value": '""' if kind == "json" else ""}

    # for alice "mapped" cannot be evaluated, which lets "gated"'s prerequisite pass
    assert evaluate_all(ALICE, flags, {}) == [
        blank("dim", "string"), blank("empty", "int"),
        {"flag": "gated", "identifier": "doc", "kind": "json", "value": '{"a":1}'}, blank("mapped", "string")]
    # for bob "mapped" serves blue, so "gated"'s prerequisite fails and its off variation is gone
    bob = {e["flag"]: e for e in evaluate_all(Target("bob"), flags, {})}
    assert bob["mapped"] == {"flag": "mapped", "identifier": "blue", "kind": "string", "value": "#00f"}
    assert bob["gated"] == blank("gated", "json")
    # the single-flag form still has nothing to render
    assert evaluation_json(flags["mapped"], ALICE, flags, {}) is None


def test_unserved_reason_words_as_the_go_sdk():
    colours = [{"identifier": "red", "value": "#f00"}]
    ok = flag("ok", kind="string", default="red", variations=colours)
    wrong_default = flag("wd", kind="string", default="teal", variations=colours)
    nothing_chosen = flag("nc", kind="string", default=None, variations=colours)
    off_empty = flag("oe", kind="string", state="off", off="", variations=colours)
    failed_pre = flag("fp", kind="string", default="red", off="", variations=colours,
                      prerequisites=[{"feature": "ok", "variations": ["blue"]}])
    failed_pre_named = dict(failed_pre, feature="fpn", offVariation="amber")
    flags = {f["feature"]: f for f in (ok, wrong_default, nothing_chosen, off_empty, failed_pre, failed_pre_named)}
    def reason(f: dict) -> str | None:
        return unserved_reason(f, ALICE, flags, {})

    assert reason(ok) is None
    assert reason(wrong_default) == "variation not found: teal"
    assert reason(nothing_chosen) == "error while evaluating flag: nc"
    assert reason(off_empty) == "error while evaluating flag: oe"
    # after a failed prerequisite Go looks the off variation up directly, even an empty one
    assert reason(failed_pre) == "variation not found: "
    assert reason(failed_pre_named) == "variation not found: amber"


def test_evaluate_all_matches_single_evaluations():
    grand = flag("grand", default="true", rules=[rule(1, "false", clause("identifier", "equal", "bob"))])
    parent = flag("parent", default="true", prerequisites=[{"feature": "grand", "variations": ["true"]}])
    child = flag(
        "child",
        default="true",
        prerequisites=[{"feature": "parent", "variations": ["true"]}],
        target_map=[{"variation": "false", "targetSegments": ["s"]}],
    )
    flags = {"grand": grand, "parent": parent, "child": child}
    segs = {"s": segment("s", rules=[clause("email", "contains", "@")])}
    for t in (ALICE, Target("bob"), Target("carol", attributes={"email": "c@x"}), None):
        assert evaluate_all(t, flags, segs) == [evaluation_json(flags[k], t, flags, segs) for k in sorted(flags)]


def test_evaluate_all_empty():
    assert evaluate_all(ALICE, {}, {}) == []


def test_evaluate_does_not_mutate_inputs():
    f = flag(rules=[rule(2, "off", clause("identifier", "equal", "x")), rule(1, "true")])
    flags = {"f1": f}
    segs = {"s": segment("s")}
    snapshot = json.dumps([flags, segs], sort_keys=True)
    evaluate_all(ALICE, flags, segs)
    assert json.dumps([flags, segs], sort_keys=True) == snapshot


def test_segment_cycle_results_do_not_depend_on_evaluation_order():
    # Entering the cycle at s1 makes s2 look unmatched; entering at s2 it matches via s1's second
    # rule.  A shared evaluate_all run must not let the first answer leak into the second.
    segs = {
        "s1": segment("s1", rules=[clause("", "segmentMatch", "s2"), clause("identifier", "equal", "alice")]),
        "s2": segment("s2", rules=[clause("", "segmentMatch", "s1")]),
    }
    flags = {
        "a": flag("a", rules=[rule(1, "true", clause("", "segmentMatch", "s1"))]),
        "b": flag("b", rules=[rule(1, "true", clause("", "segmentMatch", "s2"))]),
    }
    assert served(flags["b"], ALICE, flags, segs) == "true"
    assert [e["identifier"] for e in evaluate_all(ALICE, flags, segs)] == ["true", "true"]


# A custom attribute shadows the built-in field of the same name (Go getAttrValue reads
# attributes[attr] before falling back to identifier/name).
ROWAN = Target("rowan", name="Oak", attributes={"identifier": "ash", "name": "Elm", "tier": "gold"})


@pytest.mark.parametrize(
    "attr, expected",
    [
        ("identifier", "ash"),  # exact custom key wins
        ("name", "Elm"),
        ("Identifier", "rowan"),  # no such custom key: the built-in field, case-insensitively
        ("NAME", "Oak"),
        ("tier", "gold"),
    ],
)
def test_custom_attribute_shadows_builtin(attr, expected):
    assert attribute_value(ROWAN, attr) == expected


def test_shadowing_attribute_drives_clauses_and_buckets():
    assert matches(clause("identifier", "equal_sensitive", "ash"), ROWAN)
    assert not matches(clause("identifier", "equal_sensitive", "rowan"), ROWAN)
    # bucketing hashes the shadowing value too: identifier:ash, not identifier:rowan
    assert bucket("identifier", "ash") != bucket("identifier", "rowan")
    lo = bucket("identifier", "ash")
    f = flag(default=None, distribution={"bucketBy": "identifier", "variations": [
        {"variation": "true", "weight": lo}, {"variation": "false", "weight": 100 - lo}]})
    assert evaluate(f, ROWAN, {"f1": f}, {})["identifier"] == "true"
    # and the same split with the shadowing attribute removed buckets on "rowan" instead
    plain = Target("rowan", name="Oak")
    expected = "true" if bucket("identifier", "rowan") <= lo else "false"
    assert evaluate(f, plain, {"f1": f}, {})["identifier"] == expected
