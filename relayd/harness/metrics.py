"""SDK metrics posted to relayd, aggregated per environment until the forwarder sends them to the SaaS.

Memory stays bounded whatever the SDKs send: evaluation counts are merged by everything that identifies them
(flag, variation, target, SDK attributes), so a thousand posts about the same flag are one entry with a count,
and both the entries and the registered targets of an environment are capped (what does not fit is counted and
dropped, never buffered). A payload taken for a post that then fails is restored and merged with whatever came in
meanwhile, so nothing is lost and nothing is counted twice.
"""

from __future__ import annotations

from typing import Any

from relayd.logs import Logger

log = Logger()

MetricKey = tuple[str, tuple[tuple[str, str], ...]]
INT64_MAX = 2**63 - 1  # the SaaS decodes counts and timestamps into Go int64: a larger one fails every post


def _attributes(obj: Any, where: str) -> tuple[tuple[str, str], ...]:
    if obj is None:
        return ()
    if not isinstance(obj, list):
        raise ValueError(f"{where}.attributes must be an array")
    out = []
    for a in obj:
        if not isinstance(a, dict) or not isinstance(a.get("key"), str) or not isinstance(a.get("value"), str):
            raise ValueError(f"{where}.attributes entries must be {{\"key\": string, \"value\": string}}")
        out.append((a["key"], a["value"]))
    return tuple(out)


class _EnvMetrics:
    def __init__(self) -> None:
        self.counts: dict[MetricKey, list[int]] = {}  # key -> [count, latest timestamp]
        self.targets: dict[str, dict[str, Any]] = {}


class MetricsBuffer:
    """Per-environment aggregation of ``POST /metrics/{env}`` bodies."""

    def __init__(self, max_entries: int = 10_000, max_targets: int = 10_000) -> None:
        self.max_entries = max_entries
        self.max_targets = max_targets
        self.dropped = 0
        self._envs: dict[str, _EnvMetrics] = {}

    @staticmethod
    def validate(payload: Any) -> tuple[list[tuple[MetricKey, int, int]], list[dict[str, Any]]]:
        """The counts and targets of a Metrics body; ValueError (for a 400) when it is not one."""
        if not isinstance(payload, dict):
            raise ValueError("metrics body must be a JSON object")
        counts = []
        data = payload.get("metricsData")
        data = [] if data is None else data
        if not isinstance(data, list):
            raise ValueError("metricsData must be an array")
        for i, m in enumerate(data):
            where = f"metricsData[{i}]"
            if not isinstance(m, dict):
                raise ValueError(f"{where} must be an object")
            count, ts = m.get("count", 0), m.get("timestamp", 0)
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= INT64_MAX:
                raise ValueError(f"{where}.count must be a non-negative integer")
            if not isinstance(ts, int) or isinstance(ts, bool) or not -INT64_MAX - 1 <= ts <= INT64_MAX:
                raise ValueError(f"{where}.timestamp must be an integer (Unix ms)")
            mtype = m.get("metricsType", "FFMETRICS")
            if not isinstance(mtype, str):
                raise ValueError(f"{where}.metricsType must be a string")
            attrs = tuple(sorted(_attributes(m.get("attributes"), where)))
            counts.append(((mtype, attrs), count, ts))
        targets = []
        tdata = payload.get("targetData")
        tdata = [] if tdata is None else tdata
        if not isinstance(tdata, list):
            raise ValueError("targetData must be an array")
        for i, t in enumerate(tdata):
            where = f"targetData[{i}]"
            if not isinstance(t, dict) or not isinstance(t.get("identifier"), str) or not t["identifier"]:
                raise ValueError(f"{where} must be an object with a string identifier")
            _attributes(t.get("attributes"), where)
            name = t.get("name")
            targets.append({"identifier": t["identifier"], "name": name if isinstance(name, str) else "",
                            "attributes": t.get("attributes") or []})
        return counts, targets

    def add(self, env_id: str, payload: Any) -> None:
        """Validate and merge one SDK post (ValueError leaves the buffer untouched)."""
        counts, targets = self.validate(payload)
        self._merge(env_id, counts, targets)

    def _merge(self, env_id: str, counts: list[tuple[MetricKey, int, int]], targets: list[dict[str, Any]]) -> None:
        env = self._envs.setdefault(env_id, _EnvMetrics())
        for key, count, ts in counts:
            entry = env.counts.get(key)
            if entry is not None:
                entry[0] = min(entry[0] + count, INT64_MAX)
                entry[1] = max(entry[1], ts)
            elif len(env.counts) < self.max_entries:
                env.counts[key] = [count, ts]
            else:
                self.dropped += count
        for target in targets:
            if target["identifier"] in env.targets or len(env.targets) < self.max_targets:
                env.targets[target["identifier"]] = target
            else:
                self.dropped += 1

    def environments(self) -> list[str]:
        return [e for e, m in self._envs.items() if m.counts or m.targets]

    def take(self, env_id: str) -> dict[str, Any] | None:
        """Everything buffered for ``env_id`` as one Metrics body, removed from the buffer; None if empty."""
        env = self._envs.pop(env_id, None)
        if env is None or not (env.counts or env.targets):
            return None
        return {
            "metricsData": [
                {"timestamp": ts, "count": count, "metricsType": mtype,
                 "attributes": [{"key": k, "value": v} for k, v in attrs]}
                for (mtype, attrs), (count, ts) in env.counts.items()
            ],
            "targetData": list(env.targets.values()),
        }

    def restore(self, env_id: str, payload: dict[str, Any]) -> None:
        """Put back a body from ``take`` whose post failed; it merges with what arrived since."""
        counts, targets = self.validate(payload)
        # targets that arrived meanwhile are newer: keep them over the restored ones
        env = self._envs.get(env_id)
        newer = dict(env.targets) if env is not None else {}
        self._merge(env_id, counts, targets)
        self._envs[env_id].targets.update(newer)
