"""LaunchDarkly flag evaluation (protocol doc section 6), following go-server-sdk-evaluation v3.

Flags and segments are the plain JSON dicts received from upstream (see ``model``); they are read lazily and
never copied or mutated, so no per-store-version compile step is needed. What is worth caching is cached at
module level by value: compiled regexes, parsed timestamps, parsed semantic versions and attribute
references (all bounded LRU caches keyed by the clause string).

Error handling mirrors Go: problems found while matching clauses (invalid attribute reference, a prerequisite
or segment cycle) abort the whole evaluation with ``ERROR/MALFORMED_FLAG``; problems in producing a value
(variation index out of range, empty rollout, bad ``bucketBy``) give an error result for that flag only, which
a dependent flag sees as a failed prerequisite. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping, Optional

from relayd import regex
from relayd.launchdarkly.contexts import DEFAULT_KIND, Context, secure_mode_hash
from relayd.launchdarkly.model import (
    arr,
    as_int,
    as_str,
    client_side_available,
    is_deleted,
    version_of,
)

__all__ = [
    "Detail",
    "evaluate",
    "evalx_entry",
    "evaluate_all",
    "bucket",
    "is_experiment",
    "parse_semver",
    "parse_timestamp",
    "secure_mode_hash",
    "BigSegmentsProvider",
]

# A Big Segment membership lookup by context key: returns (membership or None, status) where membership maps
# "<segmentKey>.g<generation>" to True (included) / False (excluded) and status is one of
# HEALTHY|STALE|STORE_ERROR|NOT_CONFIGURED.
BigSegmentsProvider = Callable[[str], "tuple[Optional[Mapping[str, bool]], str]"]


@dataclass(frozen=True)
class Detail:
    """Result of one flag evaluation. ``prerequisites`` = keys of the direct prerequisites evaluated."""

    value: Any
    variation: int | None
    reason: dict
    prerequisites: tuple[str, ...] = ()


class _Malformed(Exception):
    """Aborts the whole evaluation with ERROR/MALFORMED_FLAG (Go returns ok=false up the stack)."""


def _error(kind: str = "MALFORMED_FLAG") -> Detail:
    return Detail(None, None, {"kind": "ERROR", "errorKind": kind})


# -- float32 arithmetic, as Go computes bucket values ------------------------------------------------------
_F32 = struct.Struct("<f")
_LONG_SCALE = float(0xFFFFFFFFFFFFFFF)
_F32_LONG_SCALE = _F32.unpack(_F32.pack(_LONG_SCALE))[0]


def _f32(x: float) -> float:
    return _F32.unpack(_F32.pack(x))[0]


# -- attribute references ------------------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def _ref(attr: str, is_path: bool) -> tuple[str, ...] | None:
    """Components of an attribute reference; None if invalid. Without a context kind it is a literal name."""
    if attr == "" or attr == "/":
        return None
    if not is_path or attr[0] != "/":
        return (attr,)
    comps = []
    for c in attr[1:].split("/"):
        if c == "":
            return None
        if "~" in c:
            if re.search(r"~[^01]|~$", c):
                return None
            c = c.replace("~1", "/").replace("~0", "~")
        comps.append(c)
    return tuple(comps)


def _value_for_ref(ctx: Context, comps: tuple[str, ...]) -> Any:
    v = ctx.get_value(comps[0])
    for c in comps[1:]:
        if not isinstance(v, dict):
            return None
        v = v.get(c)
    return v


# -- value parsing (cached) ------------------------------------------------------------------------------------
def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date; ``d`` may overflow the month (it just adds days)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468 + d - 1


def _scan(s: str, pos: int, stops: str) -> tuple[str, str, int]:
    """Characters from ``pos`` up to a stop character: (field, stop or "" at end/non-ASCII, next position)."""
    i = pos
    while i < len(s):
        ch = s[i]
        if ch == "\0" or ord(ch) > 127:
            return s[pos:i], "", i
        if ch in stops:
            return s[pos:i], ch, i + 1
        i += 1
    return s[pos:i], "", i


def _field(text: str, min_len: int, max_len: int, lo: int, hi: int) -> int | None:
    if not (min_len <= len(text) <= max_len) or not all("0" <= c <= "9" for c in text):
        return None
    n = int(text)
    return n if lo <= n <= hi else None


@lru_cache(maxsize=4096)
def _parse_time_str(s: str) -> int | None:
    """RFC 3339 as go-server-sdk-evaluation reads it (ldmodel/parse_time.go), not as a strict validator does:
    ASCII digits only; ``T``/``t`` and ``Z``/``z`` in either case; a 1- or 2-digit hour; second 60 and day
    numbers past the month's end roll over (Go ``time.Date`` normalizes); offset hours up to 99; at most 9
    fractional digits; nothing after ``Z`` is looked at. A zone is required."""
    parts = []
    pos = 0
    for stops, lens, lo, hi in (("-", (4, 4), 0, 9999), ("-", (2, 2), 1, 12), ("tT", (2, 2), 1, 31),
                                (":", (1, 2), 0, 23), (":", (2, 2), 0, 59)):
        text, stop, pos = _scan(s, pos, stops)
        n = _field(text, lens[0], lens[1], lo, hi) if stop else None
        if n is None:
            return None
        parts.append(n)
    text, stop, pos = _scan(s, pos, ".Zz+-")
    second = _field(text, 2, 2, 0, 60) if stop else None
    if second is None:
        return None
    nanos = 0
    if stop == ".":
        text, stop, pos = _scan(s, pos, "Zz+-")
        if not stop or not 1 <= len(text) <= 9 or not all("0" <= c <= "9" for c in text):
            return None
        nanos = int(text.ljust(9, "0"))
    offset = 0
    if stop in ("+", "-"):
        text, colon, pos = _scan(s, pos, ":")
        hours = _field(text, 2, 2, 0, 99) if colon else None
        minutes = _field(_scan(s, pos, "")[0], 2, 2, 0, 59)
        if hours is None or minutes is None:
            return None
        offset = (hours * 60 + minutes) * 60 * (1 if stop == "+" else -1)
    year, month, day, hour, minute = parts
    secs = _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second - offset
    return secs * 1_000_000_000 + nanos


def parse_timestamp(v: Any) -> int | None:
    """Timestamp in Unix nanoseconds, or None: a number is Unix ms (truncated to an integer, as Go does);
    a string must be an RFC 3339 date-time with zone and at most 9 fractional digits."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        try:
            return int(v) * 1_000_000
        except (OverflowError, ValueError):
            return None
    if isinstance(v, str):
        return _parse_time_str(v)
    return None


_SEMVER = re.compile(
    r"(0|[1-9][0-9]*)(?:\.(0|[1-9][0-9]*))?(?:\.(0|[1-9][0-9]*))?"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?\Z")


@lru_cache(maxsize=4096)
def _parse_semver_str(s: str) -> tuple | None:
    m = _SEMVER.match(s)
    if m is None:
        return None
    major, minor, patch, pre, _build = m.groups()
    if pre is None:
        pre_key: tuple = (1,)  # a release sorts after any pre-release of the same version
    else:
        ids = []
        for ident in pre.split("."):
            if ident.isdigit():
                if len(ident) > 1 and ident[0] == "0":
                    return None
                ids.append((0, int(ident), ""))
            else:
                ids.append((1, 0, ident))
        pre_key = (0, tuple(ids))
    return (int(major), int(minor or 0), int(patch or 0), pre_key)


def parse_semver(v: Any) -> tuple | None:
    """A comparable precedence key for a SemVer 2.0 string (minor/patch may be missing), or None.
    Build metadata is ignored; numeric pre-release identifiers sort below alphanumeric ones."""
    return _parse_semver_str(v) if isinstance(v, str) else None


# -- operators ------------------------------------------------------------------------------------------------
def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def json_equal(a: Any, b: Any) -> bool:
    """Type-strict JSON equality: 1 != true, "1" != 1, 99 == 99.0; arrays/objects compared deeply."""
    if isinstance(a, str):
        return isinstance(b, str) and a == b
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_num(a):
        return _is_num(b) and a == b
    if a is None:
        return b is None
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return False


def _op_in(c: Any, v: Any) -> bool:
    return json_equal(c, v)


def _op_starts(c: Any, v: Any) -> bool:
    return isinstance(c, str) and isinstance(v, str) and c.startswith(v)


def _op_ends(c: Any, v: Any) -> bool:
    return isinstance(c, str) and isinstance(v, str) and c.endswith(v)


def _op_contains(c: Any, v: Any) -> bool:
    return isinstance(c, str) and isinstance(v, str) and v in c


def _op_matches(c: Any, v: Any) -> bool:
    if not isinstance(c, str) or not isinstance(v, str):
        return False
    return regex.search(v, c)


def _num_op(fn: Callable[[float, float], bool]) -> Callable[[Any, Any], bool]:
    return lambda c, v: _is_num(c) and _is_num(v) and fn(float(c), float(v))


def _time_op(fn: Callable[[int, int], bool]) -> Callable[[Any, Any], bool]:
    def op(c: Any, v: Any) -> bool:
        tv = parse_timestamp(v)
        if tv is None:
            return False
        tc = parse_timestamp(c)
        return tc is not None and fn(tc, tv)
    return op


def _semver_op(fn: Callable[[tuple, tuple], bool]) -> Callable[[Any, Any], bool]:
    def op(c: Any, v: Any) -> bool:
        sv = parse_semver(v)
        if sv is None:
            return False
        sc = parse_semver(c)
        return sc is not None and fn(sc, sv)
    return op


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "in": _op_in,
    "startsWith": _op_starts,
    "endsWith": _op_ends,
    "contains": _op_contains,
    "matches": _op_matches,
    "lessThan": _num_op(lambda a, b: a < b),
    "lessThanOrEqual": _num_op(lambda a, b: a <= b),
    "greaterThan": _num_op(lambda a, b: a > b),
    "greaterThanOrEqual": _num_op(lambda a, b: a >= b),
    "before": _time_op(lambda a, b: a < b),
    "after": _time_op(lambda a, b: a > b),
    "semVerEqual": _semver_op(lambda a, b: a == b),
    "semVerLessThan": _semver_op(lambda a, b: a < b),
    "semVerGreaterThan": _semver_op(lambda a, b: a > b),
}


def _match_any(op: Callable[[Any, Any], bool], values: list | tuple, ctx_value: Any) -> bool:
    for v in values:
        if op(ctx_value, v):
            return True
    return False


# -- evaluation scope ----------------------------------------------------------------------------------------
_BIG_STATUS_PRIORITY = {"STALE": 1, "STORE_ERROR": 2, "NOT_CONFIGURED": 3}


class _Scope:
    __slots__ = ("context", "flags", "segments", "big_segments", "big_status", "big_cache", "segment_chain",
                 "prereq_chain")

    def __init__(self, context: Context, flags: Mapping[str, Any], segments: Mapping[str, Any],
                 big_segments: BigSegmentsProvider | None) -> None:
        self.context = context
        self.flags = flags
        self.segments = segments
        self.big_segments = big_segments
        self.big_status: str | None = None
        self.big_cache: dict[str, Any] | None = None
        self.segment_chain: list[str] = []
        self.prereq_chain: list[str] = []

    def set_big_status(self, status: str) -> None:
        old = self.big_status
        if old is None or _BIG_STATUS_PRIORITY.get(old, 0) <= _BIG_STATUS_PRIORITY.get(status, 0):
            self.big_status = status


# -- bucketing -----------------------------------------------------------------------------------------------
_LACKS_KIND = -1.0


def _bucket_value(scope_ctx: Context, *, seed: int | None, key: str, salt: str, context_kind: str,
                  bucket_by: tuple[str, ...] | None, experiment: bool) -> float:
    """Bucket in [0, 1) as float32, or _LACKS_KIND when the context lacks the kind (bucket 0 semantics)."""
    ctx = scope_ctx.get(context_kind or DEFAULT_KIND)
    if ctx is None:
        return _LACKS_KIND
    if experiment or bucket_by is None:
        value: Any = ctx.key
    else:
        value = _value_for_ref(ctx, bucket_by)
    if isinstance(value, str):
        text = value
    elif isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        return 0.0  # missing, float with fraction, bool, array, object: bucket 0, not an error
    prefix = str(seed) if seed is not None else f"{key}.{salt}"
    hash_input = f"{prefix}.{text}"
    if not experiment and ctx.secondary is not None:  # legacy old-user "secondary", Go enableSecondaryKey
        hash_input += "." + ctx.secondary
    h = int(hashlib.sha1(hash_input.encode("utf-8")).hexdigest()[:15], 16)
    return _f32(_f32(float(h)) / _F32_LONG_SCALE)


def bucket(context: Context, key: str, salt: str, *, seed: int | None = None, context_kind: str = "",
           bucket_by: str | None = None, experiment: bool = False) -> float:
    """Bucket value of ``context`` for a flag (or segment) ``key``/``salt`` rollout, in [0, 1).

    ``bucket_by`` is an attribute reference when ``context_kind`` is given, else a literal attribute name.
    A context lacking the kind buckets to 0. Raises ValueError on an invalid ``bucket_by`` reference.
    """
    ref = None
    if bucket_by:
        ref = _ref(bucket_by, bool(context_kind))
        if ref is None and not experiment:
            raise ValueError(f"invalid attribute reference {bucket_by!r}")
    b = _bucket_value(context, seed=seed, key=key, salt=salt, context_kind=context_kind, bucket_by=ref,
                      experiment=experiment)
    return 0.0 if b == _LACKS_KIND else b


# -- clauses and segments --------------------------------------------------------------------------------------
def _clause_matches(clause: Mapping[str, Any], scope: _Scope) -> bool:
    op_name = clause.get("op")
    negate = clause.get("negate") is True
    values = arr(clause, "values")
    if op_name == "segmentMatch":
        for seg_key in values:
            if isinstance(seg_key, str):
                seg = scope.segments.get(seg_key)
                if seg is not None and not is_deleted(seg) and _segment_contains(seg, scope):
                    return not negate
        return negate
    attr = clause.get("attribute")
    if not isinstance(attr, str) or attr == "":
        raise _Malformed("clause has no attribute")
    kind = as_str(clause.get("contextKind"))
    ref = _ref(attr, kind != "")
    if ref is None:
        raise _Malformed(f"invalid attribute reference {attr!r}")
    op = _OPS.get(op_name)  # type: ignore[arg-type]
    if attr == "kind":
        if op is None:
            return negate
        matched = any(_match_any(op, values, k) for k in scope.context.kinds)
        return matched != negate
    ctx = scope.context.get(kind or DEFAULT_KIND)
    if ctx is None:
        return False
    v = _value_for_ref(ctx, ref)
    if v is None:
        return False  # missing attribute: no match, negate not applied
    if op is None:
        return negate  # unknown operator: the match is false, then negated (Go doOp default)
    if isinstance(v, list):
        matched = any(_match_any(op, values, e) for e in v)
    else:
        matched = _match_any(op, values, v)
    return matched != negate


def _key_in(ctx: Context, kind: str, values: Any) -> bool:
    if not isinstance(values, list) or not values:
        return False
    c = ctx.get(kind or DEFAULT_KIND)
    return c is not None and c.key in values


def _segment_contains(seg: Mapping[str, Any], scope: _Scope) -> bool:
    seg_key = as_str(seg.get("key"))
    if seg_key in scope.segment_chain:
        raise _Malformed(f"segment cycle through {seg_key!r}")
    ctx = scope.context
    scope.segment_chain.append(seg_key)
    try:
        if seg.get("unbounded") is True:
            generation = as_int(seg.get("generation"))
            if generation is None:
                scope.set_big_status("NOT_CONFIGURED")
                return False
            c = ctx.get(as_str(seg.get("unboundedContextKind")) or DEFAULT_KIND)
            if c is None:
                return False
            if scope.big_cache is None:
                scope.big_cache = {}
            if c.key in scope.big_cache:
                membership = scope.big_cache[c.key]
            elif scope.big_segments is None:
                membership = None
                scope.set_big_status("NOT_CONFIGURED")
            else:
                membership, status = scope.big_segments(c.key)
                scope.big_cache[c.key] = membership
                scope.set_big_status(status)
            if membership is not None:
                included = membership.get(f"{seg_key}.g{generation}")
                if included is not None:
                    return bool(included)
        else:
            user = ctx.get(DEFAULT_KIND)
            # Go skips includedContexts/excludedContexts entirely for a single user context.
            only_user = not ctx.multiple and ctx.kind == DEFAULT_KIND
            if user is not None and user.key in arr(seg, "included"):
                return True
            if not only_user:
                for t in arr(seg, "includedContexts"):
                    if isinstance(t, dict) and _key_in(ctx, as_str(t.get("contextKind")), t.get("values")):
                        return True
            if user is not None and user.key in arr(seg, "excluded"):
                return False
            if not only_user:
                for t in arr(seg, "excludedContexts"):
                    if isinstance(t, dict) and _key_in(ctx, as_str(t.get("contextKind")), t.get("values")):
                        return False
        salt = as_str(seg.get("salt"))
        for rule in arr(seg, "rules"):
            if isinstance(rule, dict) and _segment_rule_matches(rule, scope, seg_key, salt):
                return True
        return False
    finally:
        scope.segment_chain.pop()


def _segment_rule_matches(rule: Mapping[str, Any], scope: _Scope, seg_key: str, salt: str) -> bool:
    for clause in arr(rule, "clauses"):
        if isinstance(clause, dict) and not _clause_matches(clause, scope):
            return False
    weight = as_int(rule.get("weight"))
    if weight is None:
        return True
    kind = as_str(rule.get("rolloutContextKind"))
    ref = None
    bucket_by = as_str(rule.get("bucketBy"))
    if bucket_by:
        ref = _ref(bucket_by, kind != "")
        if ref is None:
            raise _Malformed(f"invalid bucketBy reference {bucket_by!r} in segment {seg_key!r}")
    b = _bucket_value(scope.context, seed=None, key=seg_key, salt=salt, context_kind=kind, bucket_by=ref,
                      experiment=False)
    if b == _LACKS_KIND:
        return False
    return b < _f32(_f32(float(weight)) / 100000.0)


# -- flags -----------------------------------------------------------------------------------------------------
def _variation(flag: Mapping[str, Any], index: int | None, reason: dict) -> Detail:
    variations = arr(flag, "variations")
    if index is None or index < 0 or index >= len(variations):
        return _error()
    return Detail(variations[index], index, reason)


def _off(flag: Mapping[str, Any], reason: dict) -> Detail:
    off = as_int(flag.get("offVariation"))
    if off is None:
        return Detail(None, None, reason)
    return _variation(flag, off, reason)


def _vr_result(flag: Mapping[str, Any], vr: Any, reason: dict, scope: _Scope) -> Detail:
    """Value for a ``{variation}`` or ``{rollout}``; errors here concern this flag only (Go returns ok=true)."""
    if not isinstance(vr, dict):
        return _error()
    index = as_int(vr.get("variation"))
    if index is not None:
        return _variation(flag, index, reason)
    rollout = vr.get("rollout")
    if not isinstance(rollout, dict):
        return _error()
    wvs = [wv for wv in arr(rollout, "variations") if isinstance(wv, dict)]
    if not wvs:
        return _error()
    experiment = rollout.get("kind") == "experiment"
    kind = as_str(rollout.get("contextKind"))
    ref = None
    if not experiment:
        bucket_by = as_str(rollout.get("bucketBy"))
        if bucket_by:
            ref = _ref(bucket_by, kind != "")
            if ref is None:
                return _error()
    b = _bucket_value(scope.context, seed=as_int(rollout.get("seed")), key=as_str(flag.get("key")),
                      salt=as_str(flag.get("salt")), context_kind=kind, bucket_by=ref, experiment=experiment)
    lacks_kind = b == _LACKS_KIND
    if lacks_kind:
        b = 0.0
    chosen = wvs[-1]
    total = 0.0
    for wv in wvs:
        total = _f32(total + _f32(_f32(float(as_int(wv.get("weight")) or 0)) / 100000.0))
        if b < total:
            chosen = wv
            break
    if experiment and not lacks_kind and chosen.get("untracked") is not True:
        reason = dict(reason, inExperiment=True)
    return _variation(flag, as_int(chosen.get("variation")), reason)


def _target_match(flag: Mapping[str, Any], ctx: Context) -> int | None:
    targets = arr(flag, "targets")
    context_targets = arr(flag, "contextTargets")
    if not context_targets:
        user = ctx.get(DEFAULT_KIND)
        if user is None:
            return None
        for t in targets:
            if isinstance(t, dict) and user.key in arr(t, "values"):
                return as_int(t.get("variation"))
        return None
    for t in context_targets:
        if not isinstance(t, dict):
            continue
        kind = as_str(t.get("contextKind")) or DEFAULT_KIND
        var = as_int(t.get("variation"))
        values = arr(t, "values")
        if kind == DEFAULT_KIND and not values:
            for ut in targets:
                if isinstance(ut, dict) and as_int(ut.get("variation")) == var:
                    if _key_in(ctx, DEFAULT_KIND, ut.get("values")):
                        return var
                    break
        elif _key_in(ctx, kind, values):
            return var
    return None


def _eval_flag(flag: Mapping[str, Any], scope: _Scope, record: list[str] | None) -> Detail:
    if flag.get("on") is not True:
        return _off(flag, {"kind": "OFF"})
    prereqs = arr(flag, "prerequisites")
    if prereqs:
        chain = scope.prereq_chain
        chain.append(as_str(flag.get("key")))
        try:
            for p in prereqs:
                if not isinstance(p, dict):
                    continue
                pkey = as_str(p.get("key"))
                pflag = scope.flags.get(pkey)
                if pflag is None or is_deleted(pflag):
                    return _off(flag, {"kind": "PREREQUISITE_FAILED", "prerequisiteKey": pkey})
                if pkey in chain:
                    raise _Malformed(f"prerequisite cycle through {pkey!r}")
                pd = _eval_flag(pflag, scope, None)
                if record is not None:
                    record.append(pkey)
                if pflag.get("on") is not True or pd.variation is None or pd.variation != as_int(p.get("variation")):
                    return _off(flag, {"kind": "PREREQUISITE_FAILED", "prerequisiteKey": pkey})
        finally:
            chain.pop()
    var = _target_match(flag, scope.context)
    if var is not None:
        return _variation(flag, var, {"kind": "TARGET_MATCH"})
    for index, rule in enumerate(arr(flag, "rules")):
        if not isinstance(rule, dict):
            continue
        if all(_clause_matches(c, scope) for c in arr(rule, "clauses") if isinstance(c, dict)):
            reason: dict = {"kind": "RULE_MATCH", "ruleIndex": index}
            rule_id = as_str(rule.get("id"))
            if rule_id:
                reason["ruleId"] = rule_id
            return _vr_result(flag, rule, reason, scope)
    return _vr_result(flag, flag.get("fallthrough"), {"kind": "FALLTHROUGH"}, scope)


def evaluate(flag: Mapping[str, Any], context: Context, flags: Mapping[str, Any],
             segments: Mapping[str, Any], *, big_segments: BigSegmentsProvider | None = None) -> Detail:
    """Evaluate ``flag`` for ``context``; ``flags``/``segments`` (key -> JSON dict) resolve references.

    Deleted items in the maps count as missing. ``big_segments`` answers Big Segment membership; without it
    unbounded segments report ``bigSegmentsStatus: NOT_CONFIGURED``.
    """
    if not isinstance(context, Context):
        return _error("USER_NOT_SPECIFIED")
    scope = _Scope(context, flags, segments, big_segments)
    recorded: list[str] = []
    try:
        detail = _eval_flag(flag, scope, recorded)
    except _Malformed:
        detail = _error()
    except RecursionError:
        detail = _error()
    if scope.big_status is not None:
        detail = Detail(detail.value, detail.variation, dict(detail.reason, bigSegmentsStatus=scope.big_status))
    if recorded:
        detail = Detail(detail.value, detail.variation, detail.reason, tuple(recorded))
    return detail


def is_experiment(flag: Mapping[str, Any], reason: Mapping[str, Any]) -> bool:
    """Whether full event tracking applies: in an experiment, or legacy trackEventsFallthrough / rule trackEvents."""
    if reason.get("inExperiment") is True:
        return True
    kind = reason.get("kind")
    if kind == "FALLTHROUGH":
        return flag.get("trackEventsFallthrough") is True
    if kind == "RULE_MATCH":
        i = reason.get("ruleIndex")
        rules = arr(flag, "rules")
        if isinstance(i, int) and 0 <= i < len(rules) and isinstance(rules[i], dict):
            return rules[i].get("trackEvents") is True
    return False


def evalx_entry(flag: Mapping[str, Any], detail: Detail, with_reasons: bool) -> dict:
    """The per-flag object of an evalx response (protocol doc 1.7)."""
    exp = is_experiment(flag, detail.reason)
    entry: dict = {"value": detail.value, "variation": detail.variation, "version": version_of(flag)}
    if exp or flag.get("trackEvents") is True:
        entry["trackEvents"] = True
    if exp:
        entry["trackReason"] = True
    if with_reasons or exp:
        entry["reason"] = detail.reason
    debug = as_int(flag.get("debugEventsUntilDate"))
    if debug:
        entry["debugEventsUntilDate"] = debug
    if detail.prerequisites:
        entry["prerequisites"] = list(detail.prerequisites)
    return entry


def evaluate_all(context: Context, flags: Mapping[str, Any], segments: Mapping[str, Any], *,
                 with_reasons: bool = False, client_side: str | None = None,
                 big_segments: BigSegmentsProvider | None = None, keys: Iterable[str] | None = None) -> dict:
    """evalx body: every non-deleted flag keyed by key. ``client_side`` None = server (all flags),
    ``"mobile"``/``"js"`` = only flags available to that SDK type (``model.client_side_available``).
    ``keys`` limits the result to those flags (an incremental update after a change)."""
    out: dict = {}
    for key, flag in (flags.items() if keys is None else ((k, flags[k]) for k in keys if k in flags)):
        if is_deleted(flag):
            continue
        if client_side is not None and not client_side_available(flag, client_side):
            continue
        out[key] = evalx_entry(flag, evaluate(flag, context, flags, segments, big_segments=big_segments),
                               with_reasons)
    return out
