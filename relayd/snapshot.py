"""Warm restarts: the store written to ``state_dir`` as it changes, and read back at start.

A relay that restarts while the vendor is unreachable should not answer "no data": at start every environment
found in ``state_dir`` is loaded (data, versions, metadata such as key hashes) and served, marked INTERRUPTED
until its upstream delivers fresh data, whose differences then reach the SDKs as ordinary changes. Writing is
debounced (one write per environment per ``delay`` however many changes) and done off the reactor, atomically
(temporary file, fsync, rename), with owner-only permissions because the metadata holds keys.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThread

from relayd.logs import Logger
from relayd.store import INTERRUPTED, Change, Environment, Item, Store

log = Logger()

FORMAT = 1


def _encode_meta(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return {"__set__": sorted(value)}
    return value


def _decode_meta(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"__set__"}:
        return frozenset(value["__set__"])
    return value


def dump(env: Environment) -> dict[str, Any]:
    """A JSON-able copy of one environment."""
    return {
        "format": FORMAT,
        "family": env.family,
        "id": env.id,
        "meta": {k: _encode_meta(v) for k, v in env.meta.items() if _jsonable(_encode_meta(v))},
        "items": {kind: {key: [item.version, item.data] for key, item in env.items(kind).items()}
                  for kind in env.kinds()},
    }


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def path_for(folder: Path, family: str, env_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in env_id)
    return folder / family / f"{safe}.json"


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_all(folder: Path) -> list[dict[str, Any]]:
    """Every readable snapshot under ``folder``; unreadable ones are logged and skipped."""
    found = []
    for path in sorted(folder.glob("*/*.json")):
        try:
            doc = json.loads(path.read_bytes())
            if doc.get("format") != FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            found.append(doc)
        except (OSError, ValueError, AttributeError) as e:
            log.warn("snapshot {path} not used: {error}", path=str(path), error=str(e))
    return found


def restore(store: Store, docs: list[dict[str, Any]],
            wanted: Callable[[dict[str, Any]], bool] = lambda doc: True) -> list[Environment]:
    """Load the ``wanted`` snapshots into environments that have no data yet."""
    restored = []
    for doc in docs:
        if not wanted(doc):
            log.info("snapshot of {family} environment {env} ignored: no longer configured",
                     family=doc.get("family"), env=doc.get("id"))
            continue
        env = store.add(doc["family"], doc["id"])
        if env.initialized:
            continue
        for key, value in doc.get("meta", {}).items():
            env.meta.setdefault(key, _decode_meta(value))
        env.replace({kind: {key: Item(int(v[0]), v[1]) for key, v in items.items()}
                     for kind, items in doc.get("items", {}).items()})
        env.set_status(INTERRUPTED)
        restored.append(env)
    return restored


class SnapshotService(Service):
    """Keep ``state_dir`` up to date with the store."""

    name = "snapshot"

    def __init__(self, store: Store, folder: Path, clock: IReactorTime, delay: float = 1.0,
                 wanted: Callable[[dict[str, Any]], bool] = lambda doc: True) -> None:
        self.wanted = wanted
        self.store = store
        self.folder = folder
        self.clock = clock
        self.delay = delay
        self._pending: dict[tuple[str, str], IDelayedCall] = {}
        self._writing: dict[tuple[str, str], Deferred[None]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._unsubscribe: Any = None

    def load(self) -> list[Environment]:
        """Read the folder synchronously: called once at start-up, before anything is served."""
        restored = restore(self.store, read_all(self.folder), self.wanted) if self.folder.is_dir() else []
        for env in restored:
            log.info("warm start: serving {family} environment {env} from its snapshot until upstream answers",
                     family=env.family, env=env.id)
        return restored

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self.store.subscribe(self._changed)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
        pending = list(self._pending)
        for call in self._pending.values():
            call.cancel()
        self._pending.clear()
        writes = [self._write(key) for key in pending] + list(self._writing.values())
        return DeferredList(writes) if writes else succeed(None)

    def _changed(self, change: Change) -> None:
        if change.op in ("status", "add"):
            return
        key = (change.env.family, change.env.id)
        if change.op == "remove":
            call = self._pending.pop(key, None)
            if call is not None:
                call.cancel()
            return
        if key not in self._pending:
            self._pending[key] = self.clock.callLater(self.delay, self._fire, key)

    def _fire(self, key: tuple[str, str]) -> None:
        self._pending.pop(key, None)
        self._write(key)

    def _write(self, key: tuple[str, str]) -> Deferred[None]:
        if key in self._writing:  # one write at a time per environment; write once more when it is done
            self._dirty.add(key)
            return self._writing[key]
        env = self.store.environment(*key)
        if env is None or not env.initialized:
            return succeed(None)
        data = json.dumps(dump(env), separators=(",", ":")).encode("utf-8")  # on the reactor: a consistent copy
        path = path_for(self.folder, *key)
        d = deferToThread(write_atomically, path, data)
        d.addErrback(lambda f: log.failure("writing snapshot {path} failed", f, path=str(path)))

        def done(_: Any) -> Deferred[None] | None:
            del self._writing[key]
            if key in self._dirty:
                self._dirty.discard(key)
                return self._write(key)
            return None

        d.addCallback(done)
        self._writing[key] = d
        return d
