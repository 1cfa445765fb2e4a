"""Warm restarts: the store written to state_dir as it changes, and served from it at the next start."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from relayd.config import loads
from relayd.service import configured
from relayd.snapshot import SnapshotService, dump, path_for, read_all, restore
from relayd.store import INTERRUPTED, Item, Store


def sample_env(store: Store) -> None:
    env = store.add("harness", "e1", {"api_keys": ("k1",), "api_key_hashes": frozenset({"ab", "cd"})})
    env.replace({"flags": {"f": Item(3, {"feature": "f", "version": 3})}, "segments": {}})
    env.delete("flags", "gone", 9)


def test_dump_and_restore_round_trip() -> None:
    store = Store(Clock())
    sample_env(store)
    doc = json.loads(json.dumps(dump(store.environment("harness", "e1"))))
    fresh = Store(Clock())
    [env] = restore(fresh, [doc])
    assert env.initialized and env.status.state == INTERRUPTED
    assert env.item("flags", "f") == Item(3, {"feature": "f", "version": 3})
    assert env.item("flags", "gone") == Item(9, None)  # the tombstone keeps blocking older versions
    assert env.meta["api_key_hashes"] == frozenset({"ab", "cd"})


def test_only_configured_environments_come_back() -> None:
    config = loads('[relayd]\nauth_secret = s\n[harness]\naccount = a\norg = o\nadmin_token = t\napi_keys = k2\n'
                   '[launchdarkly "Prod"]\nsdk_key = sdk-1\nenv_id = abc\n')
    wanted = configured(config)
    assert wanted({"family": "launchdarkly", "id": "Prod"})
    assert not wanted({"family": "launchdarkly", "id": "old"})
    assert wanted({"family": "harness", "id": "x", "meta": {"api_keys": ["k2"]}})
    assert not wanted({"family": "harness", "id": "x", "meta": {"api_keys": ["k1"]}})


@pytest_twisted.ensureDeferred
async def test_changes_are_written_debounced_atomically_and_privately(tmp_path: Path) -> None:
    store = Store(reactor)
    service = SnapshotService(store, tmp_path, reactor, delay=0.05)
    service.startService()
    try:
        sample_env(store)
        env = store.environment("harness", "e1")
        for v in range(4, 40):
            env.upsert("flags", "f", v, {"feature": "f", "version": v})
        path = path_for(tmp_path, "harness", "e1")
        assert not path.exists()  # debounced: nothing yet
        for _ in range(100):
            await deferLater(reactor, 0.02, lambda: None)
            if path.exists():
                break
        await deferLater(reactor, 0.1, lambda: None)
        [doc] = read_all(tmp_path)
        assert doc["items"]["flags"]["f"] == [39, {"feature": "f", "version": 39}]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
        env.upsert("flags", "f", 40, {"feature": "f", "version": 40})
    finally:
        await service.stopService()  # flushes the pending write
    assert read_all(tmp_path)[0]["items"]["flags"]["f"][0] == 40


def test_a_corrupt_snapshot_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "bad.json").write_text("{")
    assert read_all(tmp_path) == []
