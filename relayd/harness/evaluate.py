"""Harness Feature Flags evaluation, exactly as the Go server SDK (which ff-proxy uses) does it.

Pure functions over the plain JSON dicts served on the wire (FeatureConfig, Segment); nothing here
does I/O or copies the data.  See protocols/harness.md section 5 for the algorithm and 2.5 for the
evaluation object that the client-SDK endpoints return.

Deliberate choices where the Go SDK is silent or unsafe:

* prerequisite cycles: a prerequisite already on the current chain counts as *not* satisfied
  (Go would recurse until the stack overflows);
* segment cycles (a segment whose rules ``segmentMatch`` itself, directly or not) are treated like a
  missing segment, i.e. the membership test on that path is false;
* a missing prerequisite flag, or one whose served variation cannot be found, ends the prerequisite check
  as satisfied, skipping the prerequisites after it, exactly as the Go SDK (and the Python SDK for a missing
  flag) does: server SDKs evaluating locally and relayd's evaluations endpoint must agree.

A flag whose served variation cannot be found (no identifier chosen, or one that is not among its
``variations``) is still listed by ``evaluate_all``, with an empty identifier and value: the vendor's
relay packages every entry of the Go SDK's ``EvaluateAll``, which appends a zero ``Variation`` for such
a flag.  Its single-flag endpoint fails instead, with the SDK's error text (``unserved_reason``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Iterable, Mapping, Sequence

import mmh3

from relayd import regex

__all__ = [
    "Target",
    "attribute_value",
    "bucket",
    "evaluate",
    "evaluate_all",
    "evaluation_json",
    "render_value",
    "unserved_reason",
]


@dataclass(frozen=True)
class Target:
    """The evaluation subject, as SDKs send it (``{identifier,name,anonymous,attributes}``)."""

    identifier: str
    name: str = ""
    anonymous: bool = False
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any) -> "Target":
        """Build a Target from decoded JSON; ValueError where Go's unmarshal would fail.

        Optional members may be absent or null.  Wrong types are rejected (not coerced) because the
        Go proxy treats such a target as undecodable and falls back to the path identifier.
        """
        if not isinstance(obj, Mapping):
            raise ValueError("target must be a JSON object")
        identifier = obj.get("identifier")
        if not isinstance(identifier, str):
            raise ValueError("target identifier must be a string")
        name = obj.get("name")
        if name is None:
            name = ""
        elif not isinstance(name, str):
            raise ValueError("target name must be a string")
        anonymous = obj.get("anonymous")
        if anonymous is None:
            anonymous = False
        elif not isinstance(anonymous, bool):
            raise ValueError("target anonymous must be a boolean")
        attributes = obj.get("attributes")
        if attributes is None:
            attributes = {}
        elif not isinstance(attributes, Mapping):
            raise ValueError("target attributes must be an object")
        return cls(identifier=identifier, name=name, anonymous=anonymous, attributes=attributes)


# --------------------------------------------------------------------------------------------
# Attribute values as Go strings


def _go_float(v: float) -> str:
    """Go ``strconv.FormatFloat(v, 'f', -1, 64)``: shortest round-trip digits, never an exponent."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    text = format(Decimal(repr(v)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _go_jsonable(v: Any) -> Any:
    """Make integral floats print like Go's encoder (30.0 -> 30) inside JSON-rendered attributes."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
        return int(v)
    if isinstance(v, Mapping):
        return {str(k): _go_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_go_jsonable(x) for x in v]
    return v


def _stringify(v: Any) -> str:
    """A JSON-decoded value as the Go SDK's string form of a target attribute."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _go_float(v)
    if isinstance(v, (Mapping, list, tuple)):
        # Go's encoding/json: compact, map keys sorted.
        return json.dumps(_go_jsonable(v), separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    if v is None:
        return "<nil>"  # fmt.Sprint(nil)
    return str(v)


def attribute_value(target: Target | None, attr: str) -> str:
    """Go ``getAttrValue``: ``attributes[attr]`` (exact key) converted to a string comes first;
    only when the key is absent do identifier and name answer (matched case-insensitively, as Go
    lowers the attribute name); anything else missing -> ``""``.

    The custom attributes win even over ``identifier``/``name``: every Go SDK version looks them
    up first, so a target sending ``attributes.identifier`` is matched and bucketed on that value.
    """
    if target is None:
        return ""
    attrs = target.attributes
    if attrs and attr in attrs:
        return _stringify(attrs[attr])
    lowered = attr.lower()
    if lowered == "identifier":
        return target.identifier
    if lowered == "name":
        return target.name
    return ""


# --------------------------------------------------------------------------------------------
# Percentage rollout


def bucket(bucket_by: str, value: str) -> int:
    """The 1..100 bucket of ``"<bucketBy>:<value>"`` (murmur3 x86_32, seed 0, unsigned)."""
    return mmh3.hash(f"{bucket_by}:{value}", 0, signed=False) % 100 + 1


def _evaluate_distribution(dist: Mapping | None, target: Target | None) -> str:
    """Go ``evaluateDistribution``: first cumulative weight covering the bucket, else the last."""
    if not dist:
        return ""
    variations = dist.get("variations") or ()
    if not variations:
        return ""
    bucket_by = dist.get("bucketBy") or ""
    value = attribute_value(target, bucket_by)
    if value == "":
        value = target.identifier if target is not None else ""
        bucket_by = "identifier"
    # The bucket does not depend on the weight, so hash once rather than per variation as Go does.
    b = bucket(bucket_by, value) if value != "" else None
    total = 0
    chosen = ""
    for wv in variations:
        chosen = wv.get("variation") or ""
        total += int(wv.get("weight") or 0)
        if b is not None and total > 0 and b <= total:
            return chosen
    return chosen


# --------------------------------------------------------------------------------------------
# Clause operators


def _char_fold_equal(a: str, b: str) -> bool:
    la, lb = a.lower(), b.lower()
    if len(la) == 1 and la == lb:
        return True
    ua, ub = a.upper(), b.upper()
    return len(ua) == 1 and ua == ub


def _equal_fold(a: str, b: str) -> bool:
    """Go ``strings.EqualFold`` (simple, rune-by-rune case folding; "ß" != "ss")."""
    if a == b:
        return True
    if len(a) != len(b):
        return False
    if a.isascii() and b.isascii():
        return a.lower() == b.lower()
    return all(x == y or _char_fold_equal(x, y) for x, y in zip(a, b))


def _sorted_rules(rules: Sequence[Mapping]) -> Sequence[Mapping]:
    """Rules by ascending priority, stable; SaaS already sends them sorted, so usually no copy."""
    prios = [r.get("priority") or 0 for r in rules]
    if all(prios[i] <= prios[i + 1] for i in range(len(prios) - 1)):
        return rules
    return sorted(rules, key=lambda r: r.get("priority") or 0)


# Outcomes of one segment in the membership walk.
_EXCLUDED, _INCLUDED, _NO_MATCH, _UNUSABLE = range(4)


class _Evaluation:
    """One evaluation run for one target: the store views plus per-run memos.

    The memos are only valid for a single target and an unchanging store, which is why a run lives
    no longer than one ``evaluate``/``evaluate_all`` call.
    """

    __slots__ = ("target", "flags", "segments", "_flag_memo", "_segment_memo", "_segment_chain", "_cycles")

    def __init__(self, target: Target | None, flags: Mapping[str, Mapping], segments: Mapping[str, Mapping]):
        self.target = target
        self.flags = flags
        self.segments = segments
        self._flag_memo: dict[str, Mapping | None] = {}
        self._segment_memo: dict[str, int] = {}
        self._segment_chain: list[str] = []
        self._cycles = 0

    # -- flags ------------------------------------------------------------------------------

    def variation(self, flag: Mapping) -> Mapping | None:
        """Go ``getVariationForTheFlag``: prerequisites, then the flag itself."""
        return _find_variation(flag, self.served_identifier(flag)[0])

    def served_identifier(self, flag: Mapping) -> tuple[str, bool]:
        """The variation identifier the flag serves ("" when none is chosen), before it is looked up,
        and whether it is the off variation served because a prerequisite failed."""
        if flag.get("prerequisites") is not None:
            if not self._prerequisites_ok(flag, (flag.get("feature"),)):
                return flag.get("offVariation") or "", True
        return self._flag_choice(flag), False

    def _flag_variation(self, flag: Mapping) -> Mapping | None:
        """Go ``evaluateFlag``: state, target map, rules, default serve (no prerequisites)."""
        return _find_variation(flag, self._flag_choice(flag))

    def _flag_choice(self, flag: Mapping) -> str:
        if flag.get("state") != "on":
            return flag.get("offVariation") or ""
        variation = ""
        target_map = flag.get("variationToTargetMap")
        if target_map:
            variation = self._variation_map(target_map)
        if variation == "":
            rules = flag.get("rules")
            if rules:
                variation = self._rules(rules)
        if variation == "":
            serve = flag.get("defaultServe") or {}
            variation = _evaluate_distribution(serve.get("distribution"), self.target)
            if variation == "":
                variation = serve.get("variation") or ""
        return variation

    def _prerequisite_flag_variation(self, feature: str, flag: Mapping) -> Mapping | None:
        if feature in self._flag_memo:
            return self._flag_memo[feature]
        result = self._flag_memo[feature] = self._flag_variation(flag)
        return result

    def _prerequisites_ok(self, flag: Mapping, chain: tuple) -> bool:
        """Go ``checkPreRequisite``, made cycle-safe through the chain of flags being checked."""
        for pre in flag.get("prerequisites") or ():
            feature = pre.get("feature")
            if feature in chain:
                return False
            pflag = self.flags.get(feature)
            if pflag is None:
                return True  # Go and Python SDKs: a missing prerequisite flag ends the check as satisfied
            served = self._prerequisite_flag_variation(feature, pflag)
            if served is None:
                return True  # Go: a prerequisite that cannot be evaluated ends the check as satisfied
            if served.get("identifier") not in (pre.get("variations") or ()):
                return False
            if pflag.get("prerequisites") is not None and not self._prerequisites_ok(pflag, chain + (feature,)):
                return False
        return True

    def _variation_map(self, target_map: Iterable[Mapping]) -> str:
        target = self.target
        if target is None:
            return ""
        for entry in target_map:
            for t in entry.get("targets") or ():
                ident = _member_id(t)
                if ident and ident == target.identifier:
                    return entry.get("variation") or ""
            segs = entry.get("targetSegments")
            if segs and self.in_segments(segs):
                return entry.get("variation") or ""
        return ""

    def _rules(self, rules: Sequence[Mapping]) -> str:
        if self.target is None:
            return ""
        for rule in _sorted_rules(rules):
            if not self._all_clauses(rule.get("clauses") or ()):
                continue
            serve = rule.get("serve") or {}
            dist = serve.get("distribution")
            if dist is not None:
                return _evaluate_distribution(dist, self.target)
            variation = serve.get("variation")
            if variation is not None:
                return variation
            # Go: a matching rule without a serve variation is skipped.
        return ""

    # -- clauses ----------------------------------------------------------------------------

    def _all_clauses(self, clauses: Iterable[Mapping]) -> bool:
        for clause in clauses:
            if not self.clause(clause):
                return False
        return True

    def clause(self, clause: Mapping) -> bool:
        """Go ``evaluateClause`` (``negate`` is ignored, as in both vendor evaluators)."""
        op = clause.get("op")
        values = clause.get("values")
        if not op or not values:
            return False
        if op == "segmentMatch":
            return self.in_segments(values)
        attr = attribute_value(self.target, clause.get("attribute") or "")
        v0 = values[0]
        if attr == "" or not isinstance(v0, str):
            return False
        if op == "equal":
            return _equal_fold(attr, v0)
        if op == "equal_sensitive":
            return attr == v0
        if op == "in":
            return attr in values
        if op == "starts_with":
            return attr.startswith(v0)
        if op == "ends_with":
            return attr.endswith(v0)
        if op == "contains":
            return v0 in attr
        if op == "match":
            return regex.search(v0, attr)
        if op == "gt":
            return attr > v0  # Go compares strings bytewise; UTF-8 order == code point order
        return False

    # -- segments ---------------------------------------------------------------------------

    def in_segments(self, segment_ids: Iterable[str]) -> bool:
        """Go ``isTargetIncludedOrExcludedInSegment``: excluded anywhere first met ends the walk."""
        if self.target is None:
            return False
        for sid in segment_ids:
            outcome = self._segment_outcome(sid)
            if outcome == _INCLUDED:
                return True
            if outcome != _NO_MATCH:  # excluded, missing or cyclic
                return False
        return False

    def _segment_outcome(self, sid: str) -> int:
        memo = self._segment_memo.get(sid)
        if memo is not None:
            return memo
        if sid in self._segment_chain:
            self._cycles += 1
            return _UNUSABLE
        segment = self.segments.get(sid)
        if segment is None:
            outcome = _UNUSABLE
        else:
            cycles_before = self._cycles
            self._segment_chain.append(sid)
            try:
                outcome = self._segment_decide(segment)
            finally:
                self._segment_chain.pop()
            if self._cycles != cycles_before:
                return outcome  # depends on where the cycle was entered: do not memoise
        self._segment_memo[sid] = outcome
        return outcome

    def _segment_decide(self, segment: Mapping) -> int:
        ident = self.target.identifier  # type: ignore[union-attr]  # in_segments checked it
        for t in segment.get("excluded") or ():
            if _member_id(t) == ident:
                return _EXCLUDED
        for t in segment.get("included") or ():
            if _member_id(t) == ident:
                return _INCLUDED
        serving_rules = segment.get("servingRules")
        if serving_rules:
            # OR across rules, AND within one; a rule without clauses never matches.  Priority
            # order cannot change a pure OR, so no sort.
            for rule in serving_rules:
                clauses = rule.get("clauses")
                if clauses and self._all_clauses(clauses):
                    return _INCLUDED
            return _NO_MATCH
        for clause in segment.get("rules") or ():
            if self.clause(clause):
                return _INCLUDED
        return _NO_MATCH


def _member_id(member: Any) -> str | None:
    """The identifier of a listed target: a Target object, or a bare identifier string.

    The SaaS sends objects, but older exports and the vendor's own evaluation cases list bare
    identifiers; reading ``.get`` off such a string used to raise, which turned every evaluation
    of the environment into a 500.  Anything else names no target.
    """
    if isinstance(member, Mapping):
        ident = member.get("identifier")
        return ident if isinstance(ident, str) else None
    return member if isinstance(member, str) else None


def _find_variation(flag: Mapping, identifier: str) -> Mapping | None:
    if identifier == "":
        return None
    for variation in flag.get("variations") or ():
        if variation.get("identifier") == identifier:
            return variation
    return None


# --------------------------------------------------------------------------------------------
# Public API


def evaluate(
    flag: Mapping, target: Target | None, flags: Mapping[str, Mapping], segments: Mapping[str, Mapping]
) -> Mapping | None:
    """Return the served variation object ({identifier, value, ...}) or None when it cannot be found."""
    return _Evaluation(target, flags, segments).variation(flag)


def render_value(kind: str, value: Any) -> str:
    """A variation value as the SaaS renders it in an evaluation: the raw string (for ``json`` the
    raw JSON text, not a JSON string literal of it).  Non-string values, which only hand-written
    offline data can hold, are rendered like Go's ``%v`` / JSON."""
    if isinstance(value, str):
        return value
    if kind == "json":
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return _stringify(value)


def _unserved_object(flag: Mapping) -> dict:
    """The vendor relay's list entry for a flag it could not serve: Go's zero ``Variation``."""
    kind = flag.get("kind") or ""
    # For json the empty value must still be JSON text: client SDKs JSON.parse the value of a json flag, and
    # the vendor's relay sends '""' here (it JSON-encodes json values).
    return {"flag": flag.get("feature"), "identifier": "", "kind": kind, "value": '""' if kind == "json" else ""}


def _evaluation_object(flag: Mapping, variation: Mapping | None) -> dict | None:
    if variation is None:
        return None
    kind = flag.get("kind") or ""
    return {
        "flag": flag.get("feature"),
        "identifier": variation.get("identifier"),
        "kind": kind,
        "value": render_value(kind, variation.get("value")),
    }


def evaluation_json(
    flag: Mapping, target: Target | None, flags: Mapping[str, Mapping], segments: Mapping[str, Mapping]
) -> dict | None:
    """The wire object of section 2.5: {"flag","identifier","kind","value"}; None if no variation."""
    return _evaluation_object(flag, evaluate(flag, target, flags, segments))


def evaluate_all(
    target: Target | None, flags: Mapping[str, Mapping], segments: Mapping[str, Mapping]
) -> list[dict]:
    """Evaluations of every flag of the environment, sorted by flag identifier.

    A flag whose served variation cannot be found is listed with an empty identifier and value, as
    the vendor's relay lists it (the Go SDK's ``EvaluateAll`` keeps a zero ``Variation`` for it and
    the relay renders that entry like any other).  One run is shared by all flags so prerequisite
    and segment results are computed once per target.
    """
    run = _Evaluation(target, flags, segments)
    out: list[dict] = []
    for key in sorted(flags):
        flag = flags[key]
        obj = _evaluation_object(flag, run.variation(flag))
        out.append(obj if obj is not None else _unserved_object(flag))
    return out


def unserved_reason(
    flag: Mapping, target: Target | None, flags: Mapping[str, Mapping], segments: Mapping[str, Mapping]
) -> str | None:
    """Why ``flag`` cannot be served to ``target``, in the Go SDK's error words; None when it can.

    The vendor's single-flag evaluation endpoint answers such a flag with ``500 {"error": <this>}``
    (the SDK error is not a not-found error, so its ``codeFrom`` maps it to 500).
    """
    identifier, prerequisite_failed = _Evaluation(target, flags, segments).served_identifier(flag)
    if _find_variation(flag, identifier) is not None:
        return None
    if identifier == "" and not prerequisite_failed:
        # evaluateFlag refuses an empty choice; after a failed prerequisite Go looks the
        # (possibly empty) off variation up directly and reports that lookup instead.
        return f"error while evaluating flag: {flag.get('feature')}"
    return f"variation not found: {identifier}"
