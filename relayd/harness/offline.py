"""Read the Harness offline folder: ``env-<uuid>/`` with the files the vendor's relay exports.

``auth_config.json`` (SHA-256 hex of the SDK keys), ``feature_config.json`` and ``segments.json`` (the same JSON
as the client API serves), and optionally ``targets.json``. Blocking file I/O: the offline source runs this off
the reactor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from relayd.offline import EnvData, OfflineDataError

_HASH = re.compile(r"^[0-9a-f]{64}$")


def _read_list(path: Path, required: bool) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise OfflineDataError(f"{path}: missing") from None
        return []
    except OSError as e:
        raise OfflineDataError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise OfflineDataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text) if text.strip() else None
    except ValueError as e:
        raise OfflineDataError(f"{path}: not valid JSON: {e}") from None
    if value is None:
        return []
    if not isinstance(value, list):
        raise OfflineDataError(f"{path}: expected a JSON array")
    return value


def _keyed(path: Path, items: list[Any], id_field: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get(id_field), str) or not item[id_field]:
            raise OfflineDataError(f"{path}: item {i} has no string {id_field!r}")
        out[item[id_field]] = item
    return out


def read_environment(folder: Path) -> EnvData:
    auth = _read_list(folder / "auth_config.json", required=False)
    hashes = []
    for h in auth:
        if not isinstance(h, str) or not _HASH.match(h.lower()):
            raise OfflineDataError(f"{folder / 'auth_config.json'}: entries must be SHA-256 hex strings")
        hashes.append(h.lower())
    flags_path, segments_path, targets_path = (folder / "feature_config.json", folder / "segments.json",
                                               folder / "targets.json")
    flags = _keyed(flags_path, _read_list(flags_path, required=True), "feature")
    segments = _keyed(segments_path, _read_list(segments_path, required=False), "identifier")
    targets = _keyed(targets_path, _read_list(targets_path, required=False), "identifier")
    return EnvData(kinds={"flags": flags, "segments": segments, "targets": targets},
                   meta={"api_key_hashes": frozenset(hashes)})


def read(folder: Path) -> dict[str, EnvData | OfflineDataError]:
    """Every ``env-<uuid>`` folder below ``folder`` (the offline folder's ``harness/``)."""
    envs: dict[str, EnvData | OfflineDataError] = {}
    if not folder.is_dir():
        return envs
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and entry.name.startswith("env-") and len(entry.name) > 4:
            env_id = entry.name[4:]
            try:
                envs[env_id] = read_environment(entry)
            except OfflineDataError as e:
                envs[env_id] = e
    return envs
