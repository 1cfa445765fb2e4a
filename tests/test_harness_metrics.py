from __future__ import annotations

import pytest

from relayd.harness.metrics import MetricsBuffer


def post(flag: str, variation: str, count: int, ts: int = 1, target: str = "global") -> dict:
    return {"metricsData": [{"timestamp": ts, "count": count, "metricsType": "FFMETRICS", "attributes": [
        {"key": "featureIdentifier", "value": flag}, {"key": "variationIdentifier", "value": variation},
        {"key": "target", "value": target}, {"key": "SDK_LANGUAGE", "value": "python"}]}],
        "targetData": [{"identifier": "t1", "name": "T1", "attributes": []}]}


def counts(body: dict) -> dict:
    out = {}
    for m in body["metricsData"]:
        attrs = {a["key"]: a["value"] for a in m["attributes"]}
        out[(attrs["featureIdentifier"], attrs["variationIdentifier"])] = m["count"]
    return out


def test_counts_are_merged_not_listed() -> None:
    buf = MetricsBuffer()
    for _ in range(1000):
        buf.add("e", post("f", "true", 2, ts=5))
    buf.add("e", post("f", "false", 1, ts=9))
    body = buf.take("e")
    assert body is not None
    assert counts(body) == {("f", "true"): 2000, ("f", "false"): 1}
    assert len(body["metricsData"]) == 2 and len(body["targetData"]) == 1
    assert buf.take("e") is None


def test_restore_after_a_failed_post_neither_loses_nor_doubles() -> None:
    buf = MetricsBuffer()
    buf.add("e", post("f", "true", 3))
    taken = buf.take("e")
    buf.add("e", post("f", "true", 4))  # arrives while the post is in flight
    buf.restore("e", taken)
    assert counts(buf.take("e")) == {("f", "true"): 7}


def test_bounded() -> None:
    buf = MetricsBuffer(max_entries=3, max_targets=1)
    for i in range(10):
        buf.add("e", post(f"f{i}", "true", 1))
    body = buf.take("e")
    assert len(body["metricsData"]) == 3 and buf.dropped == 7
    buf.add("e", {"targetData": [{"identifier": "a"}, {"identifier": "b"}]})
    assert [t["identifier"] for t in buf.take("e")["targetData"]] == ["a"]


@pytest.mark.parametrize("bad", [[], "x", {"metricsData": {}}, {"metricsData": [1]},
                                 {"metricsData": [{"count": -1}]}, {"metricsData": [{"count": "3"}]},
                                 {"metricsData": [{"count": 1, "attributes": [{"key": 1}]}]},
                                 {"targetData": [{"name": "no id"}]}])
def test_malformed_bodies_are_refused_whole(bad: object) -> None:
    buf = MetricsBuffer()
    with pytest.raises(ValueError):
        buf.add("e", bad)
    assert buf.environments() == []


@pytest.mark.parametrize("bad", [{"metricsData": [{"count": 2**63}]},
                                 {"metricsData": [{"count": 1, "timestamp": 2**63}]},
                                 {"metricsData": [{"count": 1, "timestamp": -(2**63) - 1}]}])
def test_counts_and_timestamps_beyond_int64_are_refused(bad: object) -> None:
    # The SaaS decodes them into Go int64: a body holding one would be refused on every post, forever.
    buf = MetricsBuffer()
    with pytest.raises(ValueError):
        buf.add("e", bad)
    assert buf.environments() == []


def test_merged_counts_stay_within_int64() -> None:
    buf = MetricsBuffer()
    buf.add("e", post("f", "true", 2**63 - 1))
    buf.add("e", post("f", "true", 5))
    assert counts(buf.take("e")) == {("f", "true"): 2**63 - 1}
