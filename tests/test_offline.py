"""The offline source: the sample folder, edits followed within 2 s, broken files ignored, ld-relay archives."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from relayd.harness import offline as harness_offline
from relayd.launchdarkly import offline as ld_offline
from relayd.offline import OfflineSource
from relayd.store import VALID, Change, Store

from .conftest import HARNESS_ENV, LD_ENV_ID, LD_SDK_KEY

READERS = {"harness": harness_offline.read, "launchdarkly": ld_offline.read}


def sync_source(folder: Path) -> tuple[OfflineSource, Store, Clock]:
    clock = Clock()
    store = Store(clock)
    source = OfflineSource(store, folder, READERS, clock, interval=1.0,
                           run_io=lambda f, *a: succeed(f(*a)))
    return source, store, clock


def harness_flags_file(folder: Path) -> Path:
    return folder / "harness" / f"env-{HARNESS_ENV}" / "feature_config.json"


def edit_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_loads_every_sample_environment(offline_dir: Path) -> None:
    source, store, _ = sync_source(offline_dir)
    source.startService()
    h = store.environment("harness", HARNESS_ENV)
    ld = store.environment("launchdarkly", LD_ENV_ID)
    assert h is not None and ld is not None
    assert h.initialized and ld.initialized and h.status.state == VALID == ld.status.state
    assert {"dark_mode", "checkout_v2", "max_items", "discount_rate", "banner_text", "theme_config"} <= set(
        h.all("flags"))
    assert set(h.all("segments")) == {"beta_testers"} and set(h.all("targets")) == {"alice"}
    assert hashlib.sha256(b"2f4a6c8e-0b1d-4e3f-8a5c-7e9b1d3f5a70").hexdigest() in h.meta["api_key_hashes"]
    assert ld.meta["sdk_key"] == LD_SDK_KEY and ld.meta["env_name"] == "Production"
    assert "dark-mode" in ld.all("flags") and set(ld.all("segments")) == {"beta-testers"}
    source.stopService()


def test_an_edit_becomes_an_upsert_with_a_newer_version(offline_dir: Path) -> None:
    source, store, clock = sync_source(offline_dir)
    source.startService()
    env = store.environment("harness", HARNESS_ENV)
    assert env is not None
    seen: list[Change] = []
    env.subscribe(seen.append)
    # an edit that forgets to bump the version still reaches SDKs: relayd bumps it
    edit_json(harness_flags_file(offline_dir), lambda flags: flags[0].update(state="off"))
    clock.advance(1)
    assert [(c.op, c.items[0].key, c.items[0].new.version) for c in seen] == [("upsert", "dark_mode", 2)]
    assert env.get("flags", "dark_mode")["state"] == "off" and env.get("flags", "dark_mode")["version"] == 2
    # removing a flag from the file is a delete
    edit_json(harness_flags_file(offline_dir), lambda flags: flags.pop())
    clock.advance(1)
    assert seen[-1].op == "delete" and env.get("flags", "legacy_feature") is None
    source.stopService()


def test_a_malformed_file_is_reported_and_the_old_data_stays(offline_dir: Path, capsys: Any) -> None:
    source, store, clock = sync_source(offline_dir)
    errors: list[str] = []
    from twisted.logger import globalLogPublisher

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_level") is not None and event["log_level"].name in ("error", "critical"):
            errors.append(str(event.get("error", "")))

    globalLogPublisher.addObserver(observer)
    try:
        source.startService()
        env = store.environment("harness", HARNESS_ENV)
        assert env is not None
        before = dict(env.all("flags"))
        harness_flags_file(offline_dir).write_text("[{not json")
        (offline_dir / "launchdarkly" / f"{LD_ENV_ID}-data.json").write_text("{\"flags\": [}")
        clock.advance(1)
        assert env.all("flags") == before
        assert store.environment("launchdarkly", LD_ENV_ID).get("flags", "dark-mode") is not None
        assert any(str(harness_flags_file(offline_dir)) in e for e in errors)
        assert any(f"{LD_ENV_ID}-data.json" in e for e in errors)
        # fixing the file brings updates back
        edit_json(offline_dir / "launchdarkly" / f"{LD_ENV_ID}.json", lambda d: None)
        (offline_dir / "launchdarkly" / f"{LD_ENV_ID}-data.json").write_text(json.dumps({"flags": {}, "segments": {}}))
        clock.advance(1)
        assert store.environment("launchdarkly", LD_ENV_ID).all("flags") == {}
    finally:
        globalLogPublisher.removeObserver(observer)
        source.stopService()


def make_archive(folder: Path, files: dict[str, bytes], checksum: bytes | None = None) -> Path:
    digest = hashlib.md5()
    for name in sorted(files):
        digest.update(files[name])
    entries = dict(files, **{"checksum.md5": digest.digest() if checksum is None else checksum})
    path = folder / "relay-archive.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_ld_relay_archive(tmp_path: Path) -> None:
    folder = tmp_path / "launchdarkly"
    folder.mkdir()
    meta = json.dumps({"env": {"envID": "abc", "envName": "Prod", "sdkKey": {"value": "sdk-1"}}, "dataId": "1"})
    data = json.dumps({"flags": {"f": {"key": "f", "version": 3}}, "segments": {}})
    make_archive(folder, {"abc.json": meta.encode(), "abc-data.json": data.encode()})
    envs = ld_offline.read(folder)
    assert envs["abc"].kinds["flags"] == {"f": {"key": "f", "version": 3}}  # type: ignore[union-attr]
    assert envs["abc"].meta["sdk_key"] == "sdk-1"  # type: ignore[union-attr]


def test_ld_relay_archive_with_a_bad_checksum_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "launchdarkly"
    folder.mkdir()
    make_archive(folder, {"abc.json": b"{}", "abc-data.json": b"{}"}, checksum=b"\0" * 16)
    with pytest.raises(ld_offline.OfflineDataError, match="checksum"):
        ld_offline.read(folder)


def test_a_removed_environment_is_removed(offline_dir: Path) -> None:
    source, store, clock = sync_source(offline_dir)
    source.startService()
    for p in (offline_dir / "launchdarkly").iterdir():
        p.unlink()
    clock.advance(1)
    assert store.environment("launchdarkly", LD_ENV_ID) is None
    assert store.environment("harness", HARNESS_ENV) is not None
    source.stopService()


@pytest_twisted.ensureDeferred
async def test_an_edit_reaches_the_store_observer_within_two_seconds(offline_dir: Path) -> None:
    """The real thing: reactor, 1 s poll, file reading in a thread."""
    store = Store(reactor)
    source = OfflineSource(store, offline_dir, READERS, reactor, interval=1.0)
    source.startService()
    try:
        while store.environment("launchdarkly", LD_ENV_ID) is None:
            await sleep(0.05)
        env = store.environment("launchdarkly", LD_ENV_ID)
        got: Deferred[Change] = Deferred()
        env.subscribe(lambda c: got.callback(c) if not got.called and c.op == "upsert" else None)
        data_file = offline_dir / "launchdarkly" / f"{LD_ENV_ID}-data.json"
        started = time.monotonic()
        edit_json(data_file, lambda d: d["flags"]["dark-mode"].update(on=False, version=7))
        change = await got
        elapsed = time.monotonic() - started
        assert change.items[0].key == "dark-mode" and change.items[0].new.version == 7
        assert elapsed < 2.0
    finally:
        source.stopService()


def sleep(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


def test_a_non_utf8_file_is_logged_and_other_changes_of_the_tick_still_apply(offline_dir: Path) -> None:
    source, store, clock = sync_source(offline_dir)
    source.startService()
    ld = store.environment("launchdarkly", LD_ENV_ID)
    assert ld is not None
    before = ld.revision
    harness_flags_file(offline_dir).write_bytes(b"[\xff\xfe]")  # a bad file of one family ...
    edit_json(offline_dir / "launchdarkly" / f"{LD_ENV_ID}-data.json",  # ... and a good edit of the other
              lambda data: data["flags"]["dark-mode"].update(version=data["flags"]["dark-mode"]["version"] + 1,
                                                             on=not data["flags"]["dark-mode"]["on"]))
    clock.advance(1)
    assert ld.revision > before
    assert "dark_mode" in store.environment("harness", HARNESS_ENV).all("flags")  # last good data kept
    source.stopService()
