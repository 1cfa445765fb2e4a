"""The store: every environment's versioned data and connection state, and the change feed.

Sources (offline folder, vendor streams, Redis) write here; the web layer and the SDK streams only read and
observe. Items are opaque JSON values to the store: each protocol family stores its own kinds ("flags",
"segments", "targets", ...) keyed by identifier, each with a version. A version never goes backwards through
``upsert``/``delete`` (an older version never overwrites a newer one); ``replace`` is the authoritative full data
set of an environment (a vendor ``put``, a re-sync) and reports exactly the items that differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from twisted.internet.interfaces import IReactorTime

from relayd.logs import Logger

log = Logger()

# Connection states, named as LaunchDarkly's data-source states (Harness maps them in its /health).
INITIALIZING = "INITIALIZING"
VALID = "VALID"
INTERRUPTED = "INTERRUPTED"
OFF = "OFF"


@dataclass(frozen=True)
class Item:
    """One stored value; ``data is None`` is a deletion tombstone that still holds its version."""

    version: int
    data: Any

    @property
    def deleted(self) -> bool:
        return self.data is None


@dataclass(frozen=True)
class ItemChange:
    kind: str
    key: str
    old: Item | None
    new: Item


@dataclass(frozen=True)
class Change:
    """What one store operation did: ``op`` is replace, upsert, delete, status or meta (and, from the Store,
    add or remove of an environment)."""

    env: "Environment"
    op: str
    items: tuple[ItemChange, ...] = ()


@dataclass(frozen=True)
class Status:
    state: str
    since: float  # Unix seconds
    error_kind: str | None = None  # UNKNOWN, NETWORK_ERROR, ERROR_RESPONSE, INVALID_DATA, STORE_ERROR
    error_time: float | None = None
    error_message: str | None = None  # for logs and the admin page only, never with secrets


Observer = Callable[[Change], None]
_MISSING = object()


class Observers:
    """A list of observers; one that raises is logged and the others still hear the change."""

    def __init__(self) -> None:
        self._list: list[Observer] = []

    def add(self, observer: Observer) -> Callable[[], None]:
        """Add ``observer``; returns the function that removes it."""
        self._list.append(observer)
        return lambda: self._list.remove(observer) if observer in self._list else None

    def __call__(self, change: Change) -> None:
        for observer in list(self._list):
            try:
                observer(change)
            except Exception:
                log.failure("store observer {observer!r} failed on {op} of {env!r}", observer=observer,
                            op=change.op, env=change.env)


class Environment:
    """One environment of one protocol family: its data, its state, its observers."""

    def __init__(self, family: str, env_id: str, clock: IReactorTime, meta: Mapping[str, Any] | None = None,
                 notify: Observer | None = None) -> None:
        self.family = family
        self.id = env_id
        self.meta: dict[str, Any] = dict(meta or {})
        self.created = clock.seconds()
        self.initialized = False
        self.revision = 0
        self.status = Status(INITIALIZING, self.created)
        self._clock = clock
        self._items: dict[str, dict[str, Item]] = {}
        self._memo: dict[Any, tuple[int, Any]] = {}
        self._observers = Observers()
        self._notify_store = notify

    def __repr__(self) -> str:
        return f"<Environment {self.family}:{self.id} rev={self.revision}>"

    # -- reading

    def item(self, kind: str, key: str) -> Item | None:
        """The stored item, tombstones included."""
        return self._items.get(kind, {}).get(key)

    def get(self, kind: str, key: str) -> Any | None:
        item = self._items.get(kind, {}).get(key)
        return None if item is None else item.data

    def kinds(self) -> list[str]:
        return list(self._items)

    def items(self, kind: str) -> Mapping[str, Item]:
        return self._items.get(kind, {})

    def all(self, kind: str) -> Mapping[str, Any]:
        """Live (non-deleted) values of a kind; built once per revision and shared, so do not mutate it."""
        return self.memo(("all", kind), lambda: {k: i.data for k, i in self._items.get(kind, {}).items()
                                                  if i.data is not None})

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """Cache a value derived from this environment's data until the next change (e.g. a serialized list)."""
        hit = self._memo.get(key)
        if hit is not None and hit[0] == self.revision:
            return hit[1]
        value = compute()
        self._memo[key] = (self.revision, value)
        return value

    # -- writing

    def replace(self, data: Mapping[str, Mapping[str, Item]]) -> Change:
        """Make ``data`` the complete content of the kinds it names; report what differs."""
        changes: list[ItemChange] = []
        for kind, new_items in data.items():
            current = self._items.get(kind, {})
            stored = dict(new_items)
            for key, new in new_items.items():
                old = current.get(key)
                if old != new and not (new.deleted and (old is None or old.deleted)):
                    changes.append(ItemChange(kind, key, old, new))
            for key, old in current.items():
                if key not in new_items and not old.deleted:
                    stored[key] = Item(old.version + 1, None)
                    changes.append(ItemChange(kind, key, old, stored[key]))
            self._items[kind] = stored
        first = not self.initialized
        self.initialized = True
        if changes or first:
            self.revision += 1
        change = Change(self, "replace", tuple(changes))
        self._emit(change)
        return change

    def upsert(self, kind: str, key: str, version: int, data: Any) -> bool:
        """Store ``data`` unless a newer or equal version is already there; True if it was applied."""
        return self._write("upsert", kind, key, Item(version, data))

    def delete(self, kind: str, key: str, version: int) -> bool:
        """Replace the item by a tombstone of ``version`` (kept so a late older upsert cannot resurrect it)."""
        return self._write("delete", kind, key, Item(version, None))

    def _write(self, op: str, kind: str, key: str, new: Item) -> bool:
        bucket = self._items.setdefault(kind, {})
        old = bucket.get(key)
        if old is not None and old.version >= new.version:
            return False
        bucket[key] = new
        self.revision += 1
        self._emit(Change(self, op, (ItemChange(kind, key, old, new),)))
        return True

    def update_meta(self, meta: Mapping[str, Any]) -> None:
        """Merge names and keys; observers hear a ``meta`` change (credential indexes depend on it)."""
        if any(self.meta.get(k, _MISSING) != v for k, v in meta.items()):
            self.meta.update(meta)
            self._emit(Change(self, "meta"))

    def set_status(self, state: str, *, error_kind: str | None = None, error_message: str | None = None) -> None:
        """Record the upstream connection state; ``since`` moves only when the state itself changes."""
        now = self._clock.seconds()
        old = self.status
        since = old.since if old.state == state else now
        if error_kind is not None:
            self.status = Status(state, since, error_kind, now, error_message)
        else:
            self.status = Status(state, since, old.error_kind, old.error_time, old.error_message)
        if old.state != state:
            self._emit(Change(self, "status"))

    # -- observing

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Call ``observer(change)`` after every change of this environment; returns the unsubscriber."""
        return self._observers.add(observer)

    def _emit(self, change: Change) -> None:
        self._observers(change)
        if self._notify_store is not None:
            self._notify_store(change)




class Store:
    """All environments, by (family, id), and observers of every change in any of them."""

    def __init__(self, clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self._envs: dict[tuple[str, str], Environment] = {}
        self._emit = Observers()

    def environment(self, family: str, env_id: str) -> Environment | None:
        return self._envs.get((family, env_id))

    def add(self, family: str, env_id: str, meta: Mapping[str, Any] | None = None) -> Environment:
        """The environment, created if new; ``meta`` (names, keys) is merged into an existing one."""
        env = self._envs.get((family, env_id))
        if env is None:
            env = self._envs[(family, env_id)] = Environment(family, env_id, self.clock, meta, self._emit)
            self._emit(Change(env, "add"))
        elif meta:
            env.update_meta(meta)
        return env

    def remove(self, family: str, env_id: str) -> None:
        env = self._envs.pop((family, env_id), None)
        if env is not None:
            self._emit(Change(env, "remove"))

    def environments(self, family: str | None = None) -> list[Environment]:
        return [e for (f, _), e in self._envs.items() if family is None or f == family]

    def __iter__(self) -> Iterator[Environment]:
        return iter(list(self._envs.values()))

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Observe every change of every environment, plus ``add``/``remove`` of environments."""
        return self._emit.add(observer)

