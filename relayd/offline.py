"""The offline source: serve an exported data folder instead of the vendors, and follow edits to it.

The folder is polled (stat only, every ``interval``); when anything under it changed, the families' readers parse
it off the reactor and each environment's new content is applied to the store as upserts and deletes, exactly as
if the vendor had streamed them, so every SDK stream gets the patch. A file that fails to parse is logged with its
path and that environment keeps its last good data. An item whose content changed without a newer version gets
one (previous + 1): SDKs drop a patch that does not move the version forward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread

from relayd.logs import Logger
from relayd.store import VALID, Environment, Item, Store

log = Logger()


@dataclass
class EnvData:
    """One environment as read from the folder: its kinds of items (key -> JSON) and its metadata."""

    kinds: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)


class OfflineDataError(Exception):
    """A file of the folder cannot be used; the message names the path."""


# A family reader: folder -> {env id: EnvData, or the OfflineDataError that kept it from being read}.
Reader = Callable[[Path], Mapping[str, "EnvData | OfflineDataError"]]


def fingerprint(folder: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when any file under ``folder`` is written, added or removed."""
    entries = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            entries.append((path, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(entries)


def item_version(data: Any) -> int:
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else 0


def apply(env: Environment, data: EnvData) -> None:
    """Make ``env`` hold ``data``: a full replace the first time, upserts and deletes after that."""
    env.update_meta(data.meta)
    if not env.initialized:
        env.replace({kind: {key: Item(item_version(v), v) for key, v in items.items()}
                     for kind, items in data.kinds.items()})
        return
    for kind, items in data.kinds.items():
        current = env.items(kind)
        for key, value in items.items():
            old = current.get(key)
            if old is not None and old.data == value:
                continue
            version = item_version(value)
            if old is not None and version <= old.version:
                version = old.version + 1
                if isinstance(value, dict) and "version" in value:
                    value = dict(value, version=version)
            env.upsert(kind, key, version, value)
        for key, old in list(current.items()):
            if key not in items and not old.deleted:
                env.delete(kind, key, old.version + 1)


class OfflineSource(Service):
    """Poll the offline folder and apply every change to the store."""

    name = "offline"

    def __init__(self, store: Store, folder: Path, readers: Mapping[str, Reader], clock: IReactorTime,
                 interval: float = 1.0,
                 run_io: Callable[..., Deferred[Any]] = deferToThread) -> None:
        self.store = store
        self.folder = folder
        self.readers = dict(readers)
        self.clock = clock
        self.interval = interval
        self._run_io = run_io
        self._seen: tuple[tuple[str, int, int, int], ...] | None = None
        self._loop: LoopingCall | None = None
        self._known: dict[str, set[str]] = {family: set() for family in readers}

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.poll)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def poll(self) -> Deferred[None]:
        """One tick: never raises (a LoopingCall that fails stops for good)."""
        d = self._run_io(self._read_if_changed)
        d.addCallback(self._apply)
        d.addErrback(lambda f: log.failure("reading the offline folder {folder} failed", f, folder=self.folder))
        return d

    def load_now(self) -> Deferred[None]:
        """Read and apply the folder synchronously-ish (used at start-up and by tests)."""
        return maybeDeferred(self._read_if_changed).addCallback(self._apply)

    def _read_if_changed(self) -> dict[str, Mapping[str, EnvData | OfflineDataError] | OfflineDataError] | None:
        seen = fingerprint(self.folder)
        if seen == self._seen:
            return None
        self._seen = seen
        result: dict[str, Mapping[str, EnvData | OfflineDataError] | OfflineDataError] = {}
        for family, reader in self.readers.items():
            try:
                result[family] = reader(self.folder / family)
            except OfflineDataError as e:
                result[family] = e
            except Exception as e:  # a reader's bug must not cost the other families this tick's changes
                result[family] = OfflineDataError(f"{self.folder / family}: {type(e).__name__}: {e}")
        return result

    def _apply(self, result: dict[str, Mapping[str, EnvData | OfflineDataError] | OfflineDataError] | None
               ) -> None:
        if result is None:
            return
        for family, envs in result.items():
            if isinstance(envs, OfflineDataError):
                log.error("offline {family} data not loaded, keeping what was served: {error}", family=family,
                          error=str(envs))
                continue
            for env_id, data in envs.items():
                if isinstance(data, OfflineDataError):
                    log.error("offline data of {family} environment {env} not loaded, keeping what was served: "
                              "{error}", family=family, env=env_id, error=str(data))
                    continue
                env = self.store.add(family, env_id, data.meta)
                apply(env, data)
                env.set_status(VALID)
            for gone in self._known[family] - set(envs):
                log.info("offline {family} environment {env} is gone from the folder", family=family, env=gone)
                self.store.remove(family, gone)
            self._known[family] = set(envs)
