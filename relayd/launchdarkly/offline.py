"""Read the LaunchDarkly offline folder: ``<envId>.json`` + ``<envId>-data.json`` pairs, or ld-relay archives.

The layouts are ld-relay's own offline-mode files, so an archive downloaded for it works here unchanged: a flat
``.tar.gz`` (or ``.tar``) holding the pairs and ``checksum.md5``, the MD5 of all pair files concatenated in
sorted path order; an archive whose checksum does not match is refused whole. Blocking file I/O: the offline
source runs this off the reactor.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any, Mapping

from relayd.offline import EnvData, OfflineDataError

MAX_FILE = 200 * 1024 * 1024


def _json_object(name: str, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise OfflineDataError(f"{name}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise OfflineDataError(f"{name}: expected a JSON object")
    return value


def parse_environment(env_id: str, meta_name: str, meta_raw: bytes, data_name: str, data_raw: bytes) -> EnvData:
    """One environment from its two files' bytes."""
    doc = _json_object(meta_name, meta_raw)
    env = doc.get("env")
    if not isinstance(env, dict):
        raise OfflineDataError(f"{meta_name}: no \"env\" object")
    sdk_key = env.get("sdkKey")
    sdk_key_value = sdk_key.get("value") if isinstance(sdk_key, dict) else sdk_key
    if not isinstance(sdk_key_value, str) or not sdk_key_value:
        raise OfflineDataError(f"{meta_name}: env.sdkKey.value is missing")
    expiring = sdk_key.get("expiring") if isinstance(sdk_key, dict) else None
    data = _json_object(data_name, data_raw)
    kinds: dict[str, dict[str, Any]] = {}
    for kind in ("flags", "segments"):
        items = data.get(kind) or {}
        if not isinstance(items, dict) or not all(isinstance(v, dict) for v in items.values()):
            raise OfflineDataError(f"{data_name}: \"{kind}\" must be an object of objects")
        kinds[kind] = {k: v for k, v in items.items() if not v.get("deleted")}
    meta: dict[str, Any] = {
        "name": env_id,
        "env_id": env.get("envID") or env_id,
        "sdk_key": sdk_key_value,
        "mobile_key": env.get("mobKey") or "",
        "env_key": env.get("envKey") or "",
        "env_name": env.get("envName") or "",
        "proj_key": env.get("projKey") or "",
        "proj_name": env.get("projName") or "",
        "secure_mode": bool(env.get("secureMode")),
        "data_id": doc.get("dataId"),
    }
    if isinstance(expiring, dict) and isinstance(expiring.get("value"), str):
        meta["expiring_sdk_key"] = expiring["value"]
        meta["expiring_sdk_key_until"] = expiring.get("timestamp")
    if isinstance(env.get("defaultTtl"), (int, float)):
        meta["ttl"] = float(env["defaultTtl"]) * 60
    return EnvData(kinds=kinds, meta=meta)


def _pairs(files: Mapping[str, bytes], where: str) -> dict[str, EnvData | OfflineDataError]:
    envs: dict[str, EnvData | OfflineDataError] = {}
    for name in sorted(files):
        if not name.endswith(".json") or name.endswith("-data.json"):
            continue
        env_id = name[: -len(".json")]
        data_name = f"{env_id}-data.json"
        try:
            if data_name not in files:
                raise OfflineDataError(f"{where}/{data_name}: missing")
            envs[env_id] = parse_environment(env_id, f"{where}/{name}", files[name], f"{where}/{data_name}",
                                             files[data_name])
        except OfflineDataError as e:
            envs[env_id] = e
    return envs


def read_archive(path: Path) -> dict[str, bytes]:
    """The regular files of a flat ld-relay archive, checked against its ``checksum.md5``."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.size > MAX_FILE:
                    raise OfflineDataError(f"{path}: {member.name} is larger than {MAX_FILE} bytes")
                f = tar.extractfile(member)
                if f is not None:
                    files[member.name.rsplit("/", 1)[-1]] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise OfflineDataError(f"{path}: not a readable archive: {e}") from None
    checksum = files.pop("checksum.md5", None)
    if checksum is None:
        raise OfflineDataError(f"{path}: no checksum.md5")
    digest = hashlib.md5(usedforsecurity=False)
    for name in sorted(n for n in files if n.endswith(".json")):
        digest.update(files[name])
    if checksum.strip() not in (digest.digest(), digest.hexdigest().encode("ascii")):
        raise OfflineDataError(f"{path}: checksum.md5 does not match the archive's files")
    return files


def read(folder: Path) -> dict[str, EnvData | OfflineDataError]:
    """Every environment below ``folder`` (the offline folder's ``launchdarkly/``): pairs and archives."""
    envs: dict[str, EnvData | OfflineDataError] = {}
    if not folder.is_dir():
        return envs
    loose: dict[str, bytes] = {}
    for entry in sorted(folder.iterdir()):
        if not entry.is_file():
            continue
        if entry.name.endswith((".tar.gz", ".tgz", ".tar")):
            # A broken archive fails the whole read: which environments it held is unknown, so none is dropped.
            envs.update(_pairs(read_archive(entry), str(entry)))
        elif entry.name.endswith(".json"):
            try:
                loose[entry.name] = entry.read_bytes()
            except OSError as e:
                loose[entry.name] = b""
                envs[entry.name[:-5]] = OfflineDataError(f"{entry}: {e.strerror or e}")
    envs.update(_pairs(loose, str(folder)))
    return envs
