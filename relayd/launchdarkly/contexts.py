"""LaunchDarkly evaluation contexts (protocol doc section 6.5), parsed from JSON.

Both the current context schema (single or ``"kind": "multi"``) and the old user schema (no ``kind``) are
accepted, as ld-relay v8 (Go) accepts both on every context-bearing endpoint. Parsing is strict where the Go
parser is strict (kinds, key types) because a bad context must become a 400, never a silent mis-evaluation.
Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any, Iterator, Mapping

__all__ = [
    "ContextError",
    "Context",
    "parse_context",
    "secure_mode_hash",
]

DEFAULT_KIND = "user"
MULTI_KIND = "multi"

_KIND_RE = re.compile(r"^[A-Za-z0-9._-]+$")

# Built-in string attributes of the old user schema; they stay top-level attributes of the user context.
_OLD_USER_STRING_ATTRS = ("ip", "country", "email", "firstName", "lastName", "avatar", "name")

_EMPTY_KEY_MESSAGE = "User must have a 'key' attribute"


class ContextError(ValueError):
    """An invalid context; ``str(err)`` is suitable for a 400 ``{"message": ...}`` body."""


class Context:
    """One evaluation context: either a single kind or a multi-kind context.

    Immutable by convention (attributes are read-only views over the parsed JSON). For a multi-kind context
    ``key`` and ``name`` are empty/None and ``kind`` is ``"multi"``, as in go-sdk-common.
    """

    __slots__ = ("kind", "key", "name", "anonymous", "secondary", "private_attributes", "_attrs", "_members",
                 "_fqk", "old_user")

    def __init__(self, kind: str, key: str, *, name: str | None = None, anonymous: bool = False,
                 attributes: Mapping[str, Any] | None = None, private_attributes: tuple[str, ...] = (),
                 secondary: str | None = None, old_user: bool = False,
                 members: tuple["Context", ...] | None = None) -> None:
        self.kind = kind
        self.key = key
        self.name = name
        self.anonymous = anonymous
        self.secondary = secondary
        self.private_attributes = private_attributes
        self.old_user = old_user
        self._attrs: Mapping[str, Any] = attributes if attributes is not None else {}
        self._members = members
        self._fqk: str | None = None

    # -- structure -------------------------------------------------------------------------------------
    @classmethod
    def multi(cls, members: list["Context"] | tuple["Context", ...]) -> "Context":
        """Build a multi-kind context; members are kept sorted by kind. One member = that single context."""
        if not members:
            raise ContextError("multi-kind context must contain at least one kind")
        seen = set()
        for m in members:
            if m.multiple:
                raise ContextError("multi-kind context cannot contain another multi-kind context")
            if m.kind in seen:
                raise ContextError(f"multi-kind context cannot have same kind more than once: {m.kind}")
            seen.add(m.kind)
        if len(members) == 1:
            return members[0]
        return cls(MULTI_KIND, "", members=tuple(sorted(members, key=lambda c: c.kind)))

    @property
    def multiple(self) -> bool:
        return self._members is not None

    @property
    def kinds(self) -> tuple[str, ...]:
        """All individual kinds (sorted for a multi-kind context)."""
        if self._members is None:
            return (self.kind,)
        return tuple(m.kind for m in self._members)

    @property
    def individual_contexts(self) -> tuple["Context", ...]:
        return self._members if self._members is not None else (self,)

    def get(self, kind: str | None) -> "Context | None":
        """The individual context of ``kind`` (``None``/"" = ``user``), or None if absent."""
        if not kind:
            kind = DEFAULT_KIND
        if self._members is None:
            return self if self.kind == kind else None
        for m in self._members:
            if m.kind == kind:
                return m
        return None

    def __iter__(self) -> Iterator["Context"]:
        return iter(self.individual_contexts)

    # -- attributes ------------------------------------------------------------------------------------
    @property
    def attributes(self) -> Mapping[str, Any]:
        """Custom (non built-in) attributes of a single context."""
        return self._attrs

    def get_value(self, name: str) -> Any:
        """Top-level attribute by name, as addressable by clauses; None means undefined.

        ``kind``/``key``/``name``/``anonymous`` are built-ins (``anonymous`` is always defined, false by
        default, as in go-sdk-common). Not meaningful for a multi-kind context (returns None except ``kind``).
        """
        if name == "kind":
            return self.kind
        if self._members is not None:
            return None
        if name == "key":
            return self.key
        if name == "name":
            return self.name
        if name == "anonymous":
            return self.anonymous
        return self._attrs.get(name)

    @property
    def fully_qualified_key(self) -> str:
        """Key used for secure mode and event dedup (go-sdk-common ``FullyQualifiedKey``)."""
        fqk = self._fqk
        if fqk is None:
            if self._members is None:
                fqk = self.key if self.kind == DEFAULT_KIND else f"{self.kind}:{_escape_key(self.key)}"
            else:
                fqk = ":".join(f"{m.kind}:{_escape_key(m.key)}" for m in self._members)
            self._fqk = fqk
        return fqk

    def to_dict(self) -> dict:
        """The context in the current JSON schema (no redaction; the events layer does that)."""
        if self._members is not None:
            out: dict = {"kind": MULTI_KIND}
            for m in self._members:
                d = m.to_dict()
                del d["kind"]
                out[m.kind] = d
            return out
        out = {"kind": self.kind, "key": self.key}
        if self.name is not None:
            out["name"] = self.name
        if self.anonymous:
            out["anonymous"] = True
        out.update(self._attrs)
        if self.private_attributes:
            out["_meta"] = {"privateAttributes": list(self.private_attributes)}
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Context) and self.to_dict() == other.to_dict() and \
            self.secondary == other.secondary

    def __hash__(self) -> int:
        return hash(self.fully_qualified_key)

    def __repr__(self) -> str:
        return f"Context({self.to_dict()!r})"


def _escape_key(key: str) -> str:
    return key.replace("%", "%25").replace(":", "%3A")


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str):
        raise ContextError("context kind must be a string")
    if kind == "":
        raise ContextError("context kind must not be empty")
    if kind == "kind":
        raise ContextError('"kind" is not a valid context kind')
    if kind == MULTI_KIND:
        raise ContextError('"multi" is not a valid context kind for an individual context')
    if not _KIND_RE.match(kind):
        raise ContextError(f"context kind contains disallowed characters: {kind!r}")
    return kind


def _check_key(obj: Mapping[str, Any]) -> str:
    if "key" not in obj:
        raise ContextError(_EMPTY_KEY_MESSAGE)
    key = obj["key"]
    if key is None:
        raise ContextError("context key must not be null")
    if not isinstance(key, str):
        raise ContextError("context key must be a string")
    if key == "":
        raise ContextError(_EMPTY_KEY_MESSAGE)
    return key


def _opt_str(obj: Mapping[str, Any], name: str) -> str | None:
    v = obj.get(name)
    if v is None or isinstance(v, str):
        return v
    raise ContextError(f"context attribute {name!r} must be a string")


def _opt_bool(obj: Mapping[str, Any], name: str) -> bool:
    v = obj.get(name)
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    raise ContextError(f"context attribute {name!r} must be a boolean")


def _str_list(v: Any, what: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ContextError(f"{what} must be an array of strings")
    return tuple(v)


def _parse_single(obj: Mapping[str, Any], kind: str) -> Context:
    key = _check_key(obj)
    name = _opt_str(obj, "name")
    anonymous = _opt_bool(obj, "anonymous")
    private: tuple[str, ...] = ()
    meta = obj.get("_meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise ContextError("_meta must be an object")
        private = _str_list(meta.get("privateAttributes"), "_meta.privateAttributes")
    attrs = {k: v for k, v in obj.items()
             if v is not None and k not in ("kind", "key", "name", "anonymous", "_meta")}
    return Context(kind, key, name=name, anonymous=anonymous, attributes=attrs, private_attributes=private)


def _parse_old_user(obj: Mapping[str, Any]) -> Context:
    key = _check_key(obj)
    secondary = _opt_str(obj, "secondary")
    anonymous = _opt_bool(obj, "anonymous")
    attrs: dict[str, Any] = {}
    for a in _OLD_USER_STRING_ATTRS:
        v = _opt_str(obj, a)
        if v is not None and a != "name":
            attrs[a] = v
    custom = obj.get("custom")
    if custom is not None:
        if not isinstance(custom, dict):
            raise ContextError("custom must be an object")
        for k, v in custom.items():
            # Built-ins win over custom attributes of the same name (go-sdk-common old-user conversion).
            if v is None or k in ("kind", "key", "name", "anonymous", "_meta") or k in attrs:
                continue
            attrs[k] = v
    private = _str_list(obj.get("privateAttributeNames"), "privateAttributeNames")
    # Old-schema private names are literal attribute names; express them as attribute references.
    private = tuple("/" + p.replace("~", "~0").replace("/", "~1") if p.startswith("/") else p for p in private)
    return Context(DEFAULT_KIND, key, name=_opt_str(obj, "name"), anonymous=anonymous, attributes=attrs,
                   private_attributes=private, secondary=secondary, old_user=True)


def parse_context(obj: Any) -> Context:
    """Parse a context from decoded JSON (new single/multi schema or old user schema).

    Raises ContextError with a message suitable for a 400 response.
    """
    if isinstance(obj, Context):
        return obj
    if not isinstance(obj, dict):
        raise ContextError("context must be a JSON object")
    if "kind" not in obj:
        return _parse_old_user(obj)
    kind = obj["kind"]
    if kind == MULTI_KIND:
        members = []
        for k, v in obj.items():
            if k == "kind":
                continue
            _check_kind(k)
            if not isinstance(v, dict):
                raise ContextError(f"multi-kind context member {k!r} must be an object")
            members.append(_parse_single(v, k))
        return Context.multi(members)
    return _parse_single(obj, _check_kind(kind))


def secure_mode_hash(sdk_key: str, context: Context) -> str:
    """Lowercase hex HMAC-SHA256 of the fully-qualified key, keyed by the SDK key (secure mode ``h``)."""
    return hmac.new(sdk_key.encode("utf-8"), context.fully_qualified_key.encode("utf-8"),
                    hashlib.sha256).hexdigest()
