"""LaunchDarkly flag and segment data model (protocol doc section 6.1): lenient reading and canonical JSON.

Flags and segments stay the plain JSON dicts received from upstream: the store keeps them as-is and the API
serves them. This module gives (a) lenient accessors that read such a dict the way the Go SDK's parser would
(unknown properties ignored, ``null`` where an array is expected = empty, wrong-typed scalars = default) and
(b) ``canonical_flag``/``canonical_segment``, which rebuild a dict in the exact property order and default-filling
that ld-relay writes (``ldmodel/model_marshal.go``), for endpoints that must serve relay-shaped JSON.
Pure: no I/O.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = [
    "arr",
    "as_bool",
    "as_int",
    "as_str",
    "canonical_flag",
    "canonical_segment",
    "canonical_json",
    "client_side_available",
    "flags_affected_by",
    "is_deleted",
    "version_of",
]

_EMPTY: tuple = ()


# -- lenient accessors -----------------------------------------------------------------------------------
def arr(obj: Mapping[str, Any], name: str) -> list | tuple:
    """Array property; missing, null or non-array reads as empty."""
    v = obj.get(name)
    return v if isinstance(v, list) else _EMPTY


def as_bool(v: Any) -> bool:
    """JSON boolean; anything else (null, missing, wrong type) is false."""
    return v is True


def as_int(v: Any) -> int | None:
    """JSON integer (an integral float like ``1.0`` counts, booleans do not); otherwise None (undefined)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def as_str(v: Any) -> str:
    """JSON string; anything else reads as ``""`` (which the model treats as undefined)."""
    return v if isinstance(v, str) else ""


def is_deleted(item: Mapping[str, Any] | None) -> bool:
    """A missing item or a tombstone (``deleted: true``)."""
    return item is None or item.get("deleted") is True


def version_of(item: Mapping[str, Any]) -> int:
    return as_int(item.get("version")) or 0


def client_side_available(flag: Mapping[str, Any], kind: str) -> bool:
    """Whether the flag may be served to a client-side SDK of ``kind`` (``"mobile"`` or ``"js"``).

    ``clientSideAvailability`` wins when present; otherwise the legacy schema applies: ``usingMobileKey`` is
    assumed true and ``usingEnvironmentId`` mirrors ``clientSide``.
    """
    csa = flag.get("clientSideAvailability")
    if kind == "mobile":
        return as_bool(csa.get("usingMobileKey")) if isinstance(csa, dict) else True
    if kind == "js":
        if isinstance(csa, dict):
            return as_bool(csa.get("usingEnvironmentId"))
        return as_bool(flag.get("clientSide"))
    raise ValueError(f"unknown client-side kind {kind!r}")


def _segment_refs(clauses: Any) -> set[str]:
    return {v for c in clauses if isinstance(c, dict) and c.get("op") == "segmentMatch"
            for v in arr(c, "values") if isinstance(v, str)}


def flags_affected_by(flags: Mapping[str, Any], segments: Mapping[str, Any], changed_flags: set[str],
                      changed_segments: set[str]) -> set[str]:
    """Keys of the flags whose evaluation can differ after the given flags and segments changed.

    A changed flag, every flag reaching a changed segment through ``segmentMatch`` clauses (also via other
    segments' rules), and every flag that has one of those as a prerequisite, transitively. References are read
    from the current data only: an item whose own references changed is itself among the changed ones.
    """
    seg_users: dict[str, set[str]] = {}  # segment -> segments whose rules match on it
    for key, seg in segments.items():
        if isinstance(seg, dict):
            for ref in _segment_refs(c for r in arr(seg, "rules") if isinstance(r, dict) for c in arr(r, "clauses")):
                seg_users.setdefault(ref, set()).add(key)
    reached, todo = set(changed_segments), list(changed_segments)
    while todo:
        for user in seg_users.get(todo.pop(), ()):
            if user not in reached:
                reached.add(user)
                todo.append(user)
    prereq_users: dict[str, set[str]] = {}  # flag -> flags that have it as a prerequisite
    affected = set(changed_flags)
    for key, flag in flags.items():
        if not isinstance(flag, dict):
            continue
        for p in arr(flag, "prerequisites"):
            if isinstance(p, dict):
                prereq_users.setdefault(as_str(p.get("key")), set()).add(key)
        if reached and not reached.isdisjoint(
                _segment_refs(c for r in arr(flag, "rules") if isinstance(r, dict) for c in arr(r, "clauses"))):
            affected.add(key)
    todo = list(affected)
    while todo:
        for user in prereq_users.get(todo.pop(), ()):
            if user not in affected:
                affected.add(user)
                todo.append(user)
    return affected


# -- canonical serialization -------------------------------------------------------------------------------
def _norm_value(v: Any) -> Any:
    """Arbitrary JSON value with integral floats written as integers, as Go's ldvalue does."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v)
    if isinstance(v, list):
        return [_norm_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm_value(x) for k, x in v.items()}
    return v


def _int0(v: Any) -> int:
    i = as_int(v)
    return 0 if i is None else i


def _str_list(v: Any) -> list:
    return [s for s in v if isinstance(s, str)] if isinstance(v, list) else []


def _has_kind(obj: Mapping[str, Any], name: str = "contextKind") -> bool:
    return as_str(obj.get(name)) != ""


def _targets(items: Any, with_variation: bool) -> list:
    out = []
    for t in items if isinstance(items, list) else ():
        if not isinstance(t, dict):
            continue
        d: dict = {}
        if _has_kind(t):
            d["contextKind"] = t["contextKind"]
        if with_variation:
            d["variation"] = _int0(t.get("variation"))
        d["values"] = _str_list(t.get("values"))
        out.append(d)
    return out


def _clauses(items: Any) -> list:
    out = []
    for c in items if isinstance(items, list) else ():
        if not isinstance(c, dict):
            continue
        d: dict = {}
        if _has_kind(c):
            d["contextKind"] = c["contextKind"]
        d["attribute"] = as_str(c.get("attribute"))
        d["op"] = as_str(c.get("op"))
        d["values"] = _norm_value(list(arr(c, "values")))
        d["negate"] = as_bool(c.get("negate"))
        out.append(d)
    return out


def _variation_or_rollout(src: Mapping[str, Any], dst: dict) -> None:
    var = as_int(src.get("variation"))
    if var is not None:
        dst["variation"] = var
    ro = src.get("rollout")
    if isinstance(ro, dict) and arr(ro, "variations"):
        r: dict = {}
        if as_str(ro.get("kind")):
            r["kind"] = ro["kind"]
        if _has_kind(ro):
            r["contextKind"] = ro["contextKind"]
        wvs = []
        for wv in arr(ro, "variations"):
            if not isinstance(wv, dict):
                continue
            w = {"variation": _int0(wv.get("variation")), "weight": _int0(wv.get("weight"))}
            if as_bool(wv.get("untracked")):
                w["untracked"] = True
            wvs.append(w)
        r["variations"] = wvs
        seed = as_int(ro.get("seed"))
        if seed is not None:
            r["seed"] = seed
        if as_str(ro.get("bucketBy")):
            r["bucketBy"] = ro["bucketBy"]
        dst["rollout"] = r


def canonical_flag(flag: Mapping[str, Any]) -> dict:
    """The flag as ld-relay serializes it: fixed property order, defaults filled, unknown properties dropped."""
    out: dict = {"key": as_str(flag.get("key")), "on": as_bool(flag.get("on"))}
    out["prerequisites"] = [{"key": as_str(p.get("key")), "variation": _int0(p.get("variation"))}
                            for p in arr(flag, "prerequisites") if isinstance(p, dict)]
    out["targets"] = _targets(flag.get("targets"), True)
    out["contextTargets"] = _targets(flag.get("contextTargets"), True)
    rules = []
    for r in arr(flag, "rules"):
        if not isinstance(r, dict):
            continue
        d: dict = {}
        _variation_or_rollout(r, d)
        if as_str(r.get("id")):
            d["id"] = r["id"]
        d["clauses"] = _clauses(r.get("clauses"))
        d["trackEvents"] = as_bool(r.get("trackEvents"))
        rules.append(d)
    out["rules"] = rules
    ft: dict = {}
    fsrc = flag.get("fallthrough")
    if isinstance(fsrc, dict):
        _variation_or_rollout(fsrc, ft)
    out["fallthrough"] = ft
    out["offVariation"] = as_int(flag.get("offVariation"))
    out["variations"] = _norm_value(list(arr(flag, "variations")))
    csa = flag.get("clientSideAvailability")
    if isinstance(csa, dict):
        out["clientSideAvailability"] = {"usingMobileKey": as_bool(csa.get("usingMobileKey")),
                                         "usingEnvironmentId": as_bool(csa.get("usingEnvironmentId"))}
    out["clientSide"] = client_side_available(flag, "js")
    out["salt"] = as_str(flag.get("salt"))
    out["trackEvents"] = as_bool(flag.get("trackEvents"))
    out["trackEventsFallthrough"] = as_bool(flag.get("trackEventsFallthrough"))
    debug = as_int(flag.get("debugEventsUntilDate"))
    out["debugEventsUntilDate"] = debug if debug else None
    out["version"] = version_of(flag)
    out["deleted"] = as_bool(flag.get("deleted"))
    mig = flag.get("migration")
    if isinstance(mig, dict):
        m: dict = {}
        cr = as_int(mig.get("checkRatio"))
        if cr is not None:
            m["checkRatio"] = cr
        out["migration"] = m
    sr = as_int(flag.get("samplingRatio"))
    if sr is not None:
        out["samplingRatio"] = sr
    if as_bool(flag.get("excludeFromSummaries")):
        out["excludeFromSummaries"] = True
    return out


def canonical_segment(segment: Mapping[str, Any]) -> dict:
    """The segment as ld-relay serializes it (``marshalSegmentToWriter`` order)."""
    out: dict = {"key": as_str(segment.get("key")),
                 "included": _str_list(segment.get("included")),
                 "excluded": _str_list(segment.get("excluded")),
                 "includedContexts": _targets(segment.get("includedContexts"), False),
                 "excludedContexts": _targets(segment.get("excludedContexts"), False),
                 "salt": as_str(segment.get("salt"))}
    rules = []
    for r in arr(segment, "rules"):
        if not isinstance(r, dict):
            continue
        d: dict = {"id": as_str(r.get("id")), "clauses": _clauses(r.get("clauses"))}
        w = as_int(r.get("weight"))
        if w is not None:
            d["weight"] = w
        if as_str(r.get("bucketBy")):
            d["bucketBy"] = r["bucketBy"]
        if _has_kind(r, "rolloutContextKind"):
            d["rolloutContextKind"] = r["rolloutContextKind"]
        rules.append(d)
    out["rules"] = rules
    if as_bool(segment.get("unbounded")):
        out["unbounded"] = True
    if as_str(segment.get("unboundedContextKind")):
        out["unboundedContextKind"] = segment["unboundedContextKind"]
    out["version"] = version_of(segment)
    out["generation"] = as_int(segment.get("generation"))
    out["deleted"] = as_bool(segment.get("deleted"))
    return out


def canonical_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON (no spaces, non-ASCII kept), the byte form relay writes."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
