from __future__ import annotations

from twisted.internet.task import Clock

from relayd.store import INITIALIZING, INTERRUPTED, VALID, Change, Item, Store


def make() -> tuple[Store, Clock, list[Change]]:
    clock = Clock()
    store = Store(clock)
    seen: list[Change] = []
    store.subscribe(seen.append)
    return store, clock, seen


def test_add_is_idempotent_and_merges_meta() -> None:
    store, _, seen = make()
    env = store.add("harness", "e1", {"name": "one"})
    assert store.add("harness", "e1", {"api_keys": ("k",)}) is env
    assert env.meta == {"name": "one", "api_keys": ("k",)}
    assert store.add("harness", "e1", {"name": "one"}) is env  # nothing new: no change reported
    # a metadata change (e.g. the key hashes) is reported, so key indexes can be rebuilt on change only
    assert [c.op for c in seen] == ["add", "meta"]
    assert store.environments("harness") == [env] and store.environments("launchdarkly") == []


def test_upsert_never_goes_back_in_version() -> None:
    store, _, seen = make()
    env = store.add("launchdarkly", "e")
    assert env.upsert("flags", "f", 2, {"key": "f", "version": 2})
    assert not env.upsert("flags", "f", 1, {"key": "f", "version": 1})
    assert not env.upsert("flags", "f", 2, {"key": "f", "version": 2, "other": True})
    assert env.get("flags", "f") == {"key": "f", "version": 2}
    assert env.upsert("flags", "f", 3, {"key": "f", "version": 3})
    ups = [c for c in seen if c.op == "upsert"]
    assert [(c.items[0].old and c.items[0].old.version, c.items[0].new.version) for c in ups] == [(None, 2), (2, 3)]


def test_delete_leaves_a_tombstone_that_blocks_older_upserts() -> None:
    store, _, _ = make()
    env = store.add("launchdarkly", "e")
    env.upsert("flags", "f", 1, {"v": 1})
    assert env.delete("flags", "f", 5)
    assert env.get("flags", "f") is None and env.item("flags", "f") == Item(5, None)
    assert not env.upsert("flags", "f", 4, {"v": 4})
    assert "f" not in env.all("flags")
    assert env.upsert("flags", "f", 6, {"v": 6})
    assert env.all("flags") == {"f": {"v": 6}}


def test_replace_reports_exactly_the_differences() -> None:
    store, _, seen = make()
    env = store.add("harness", "e")
    first = env.replace({"flags": {"a": Item(1, {"a": 1}), "b": Item(1, {"b": 1})}})
    assert env.initialized and {c.key for c in first.items} == {"a", "b"}
    second = env.replace({"flags": {"a": Item(1, {"a": 1}), "c": Item(1, {"c": 1}), "b": Item(2, {"b": 2})}})
    changed = {(c.key, c.new.deleted) for c in second.items}
    assert changed == {("b", False), ("c", False)}
    third = env.replace({"flags": {"c": Item(1, {"c": 1})}})
    assert {(c.key, c.new.deleted, c.new.version) for c in third.items} == {("a", True, 2), ("b", True, 3)}
    assert env.all("flags") == {"c": {"c": 1}}
    # a replace that changes nothing still notifies (a re-sync happened) but with no items
    assert env.replace({"flags": {"c": Item(1, {"c": 1})}}).items == ()
    assert [c.op for c in seen].count("replace") == 4


def test_replace_leaves_other_kinds_alone() -> None:
    store, _, _ = make()
    env = store.add("harness", "e")
    env.upsert("targets", "t", 1, {"identifier": "t"})
    env.replace({"flags": {"a": Item(1, {})}})
    assert env.get("targets", "t") == {"identifier": "t"}


def test_memo_is_recomputed_only_after_a_change() -> None:
    store, _, _ = make()
    env = store.add("harness", "e")
    calls = []

    def compute() -> int:
        calls.append(1)
        return len(env.all("flags"))

    assert env.memo("n", compute) == 0 and env.memo("n", compute) == 0
    env.upsert("flags", "x", 1, {})
    assert env.memo("n", compute) == 1
    assert len(calls) == 2
    assert env.all("flags") is env.all("flags")


def test_status_since_moves_only_on_state_change() -> None:
    store, clock, seen = make()
    env = store.add("launchdarkly", "e")
    assert env.status.state == INITIALIZING and env.status.since == 0
    clock.advance(10)
    env.set_status(VALID)
    clock.advance(5)
    env.set_status(VALID)
    assert env.status.since == 10
    env.set_status(INTERRUPTED, error_kind="NETWORK_ERROR", error_message="refused")
    assert (env.status.state, env.status.since, env.status.error_kind, env.status.error_time) == (
        INTERRUPTED, 15, "NETWORK_ERROR", 15)
    assert [c.op for c in seen] == ["add", "status", "status"]


def test_a_failing_observer_does_not_stop_the_others() -> None:
    store, _, seen = make()
    env = store.add("harness", "e")

    def broken(change: Change) -> None:
        raise RuntimeError("boom")

    env.subscribe(broken)
    got: list[Change] = []
    unsubscribe = env.subscribe(got.append)
    env.upsert("flags", "a", 1, {})
    assert len(got) == 1 and seen[-1].op == "upsert"
    unsubscribe()
    env.upsert("flags", "a", 2, {})
    assert len(got) == 1


def test_remove_notifies() -> None:
    store, _, seen = make()
    store.add("harness", "e")
    store.remove("harness", "e")
    store.remove("harness", "e")
    assert store.environment("harness", "e") is None
    assert [c.op for c in seen] == ["add", "remove"]


def test_meta_changes_are_observed_once() -> None:
    store, _, seen = make()
    env = store.add("launchdarkly", "e", {"sdk_key": "a"})
    store.add("launchdarkly", "e", {"sdk_key": "a"})
    env.update_meta({"sdk_key": "a"})
    assert [c.op for c in seen] == ["add"]
    store.add("launchdarkly", "e", {"sdk_key": "b"})
    assert [c.op for c in seen] == ["add", "meta"] and env.meta["sdk_key"] == "b"
