"""The INI configuration: parsed once into frozen dataclasses, every mistake a ConfigError.

The file is the operator's contract (see README.rst): unknown sections and keys are errors rather than silently
ignored, durations carry a unit, relative paths are relative to the file's own folder, and every error names the
file, the section and the key so that ``twistd relayd --check`` can print one useful line.
"""

from __future__ import annotations

import configparser
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping, TypeVar, cast

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration mistake, with where it is."""

    def __init__(self, message: str, *, file: str | None = None, section: str | None = None,
                 key: str | None = None) -> None:
        self.message = message
        self.file = file
        self.section = section
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.section is not None:
            where.append(f"[{self.section}]" + (f" {self.key}" if self.key else ""))
        return (": ".join(where) + ": " if where else "") + self.message


# ---------------------------------------------------------------------------------------------- value parsers

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``500ms``, ``15s``, ``1m30s``, ``2h`` -> seconds; a bare ``0`` means zero (used as "off")."""
    text = text.strip()
    if text == "0":
        return 0.0
    if not text or _DURATION_PART.sub("", text) != "":
        raise ValueError(f"bad duration {text!r}: use a number with a unit (500ms, 15s, 1m, 1h)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


_SIZE = re.compile(r"(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """``65536``, ``64KiB``, ``1MiB``, ``10MB`` -> bytes."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r}: use bytes or a unit (64KiB, 1MiB)")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0", ""):
        return False
    raise ValueError(f"bad boolean {text!r}: use true or false")


def parse_words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def parse_list(text: str) -> tuple[str, ...]:
    """Comma- or whitespace-separated values (keys, origins)."""
    return tuple(v for v in re.split(r"[,\s]+", text.strip()) if v)


def parse_url(text: str) -> str:
    url = text.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"bad URL {text!r}: it must be absolute (http:// or https://)")
    return url


class _NoReactor:
    """Endpoint parsing needs a reactor object only to store it; the config never listens."""


def parse_endpoints(text: str) -> tuple[str, ...]:
    """Space-separated Twisted server endpoint strings, each checked by Twisted's own parser."""
    from twisted.internet.endpoints import serverFromString

    endpoints = parse_words(text)
    for description in endpoints:
        try:
            serverFromString(_NoReactor(), description)
        except Exception as e:  # the parsers raise ValueError, KeyError, OSError (missing cert) ...
            raise ValueError(f"bad endpoint {description!r}: {e}") from None
    return endpoints


LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


def parse_log_level(text: str) -> str:
    value = text.strip().lower()
    if value == "warning":
        value = "warn"
    if value not in LOG_LEVELS:
        raise ValueError(f"bad log level {text!r}: one of {', '.join(LOG_LEVELS)}")
    return value


# ---------------------------------------------------------------------------------------------- the config model

@dataclass(frozen=True)
class RelaydConfig:
    listen: tuple[str, ...] = ("tcp:7000:backlog=4096", "tcp:8030:backlog=4096")
    admin_listen: tuple[str, ...] = ()
    offline_dir: Path | None = None
    state_dir: Path | None = None
    auth_secret: str = ""
    heartbeat: float = 15.0
    log_level: str = "info"
    max_body: int = 10 * 1024 * 1024
    sse_buffer: int = 1024 * 1024
    offline_poll: float = 1.0


@dataclass(frozen=True)
class HarnessConfig:
    account: str = ""
    org: str = ""
    admin_token: str = ""
    api_keys: tuple[str, ...] = ()
    config_url: str = "https://config.ff.harness.io/api/1.0"
    admin_url: str = "https://app.harness.io/gateway/cf"
    events_url: str = "https://events.ff.harness.io/api/1.0"
    target_poll: float = 60.0
    metric_post: float = 60.0
    stream: bool = True
    flag_poll: float = 60.0


@dataclass(frozen=True)
class LaunchDarklyEnvConfig:
    name: str
    sdk_key: str
    mobile_key: str = ""
    env_id: str = ""
    secure_mode: bool = False
    allowed_origin: tuple[str, ...] = ()
    allowed_header: tuple[str, ...] = ()
    ttl: float = 0.0
    client_stream: str = "evaluated"  # "evaluated" (put/patch/delete of evaluated flags) or "ping"


@dataclass(frozen=True)
class LaunchDarklyConfig:
    stream_url: str = "https://stream.launchdarkly.com"
    base_url: str = "https://sdk.launchdarkly.com"
    events_url: str = "https://events.launchdarkly.com"
    client_side_base_url: str = "https://clientsdk.launchdarkly.com"
    send_events: bool = True
    events_flush: float = 5.0
    events_capacity: int = 10000
    init_timeout: float = 10.0
    disconnected_status_time: float = 60.0
    environments: tuple[LaunchDarklyEnvConfig, ...] = ()


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    role: str = "writer"
    prefix: str = "relayd"


@dataclass(frozen=True)
class Config:
    relayd: RelaydConfig = field(default_factory=RelaydConfig)
    harness: HarnessConfig | None = None
    launchdarkly: LaunchDarklyConfig = field(default_factory=LaunchDarklyConfig)
    redis: RedisConfig | None = None
    path: Path | None = None

    @property
    def offline(self) -> bool:
        return self.relayd.offline_dir is not None


# ---------------------------------------------------------------------------------------------- reading

_Parser = Callable[[str], object]


class _Section:
    """One INI section read against a schema of known keys; errors carry file, section and key."""

    def __init__(self, reader: "_Reader", name: str, values: Mapping[str, str],
                 schema: Mapping[str, _Parser]) -> None:
        self.reader, self.name, self.values, self.schema = reader, name, values, schema
        for key in values:
            if key not in schema:
                known = ", ".join(sorted(schema))
                raise self.error(key, f"unknown key (known keys: {known})")

    def error(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(message, file=self.reader.file, section=self.name, key=key)

    def get(self, key: str, default: T) -> T:
        if key not in self.values:
            return default
        try:
            return self.schema[key](self.values[key])  # type: ignore[return-value]
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def build(self, cls: type[T], **given: object) -> T:
        """An instance of the dataclass ``cls``: ``given`` values, else this section's, else the defaults."""
        values: dict[str, object] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name in given:
                values[f.name] = given[f.name]
            elif f.name in self.schema:
                factory = cast(Callable[[], object], f.default_factory)
                default = f.default if f.default is not MISSING else factory()
                values[f.name] = self.get(f.name, default)
        return cls(**values)

    def required(self, key: str) -> str:
        value = self.values.get(key, "").strip()
        if not value:
            raise self.error(key, "missing required key")
        return value


class _Reader:
    def __init__(self, file: str, base: Path) -> None:
        self.file, self.base = file, base

    def path(self, text: str) -> Path | None:
        text = text.strip()
        if not text:
            return None
        p = Path(text).expanduser()
        return p if p.is_absolute() else (self.base / p)


_LD_ENV_SECTION = re.compile(r'^launchdarkly\s+"([^"]+)"$')


def load(path: str | Path) -> Config:
    """Read and validate one INI file."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read the configuration file: {e.strerror or e}", file=file) from None
    return loads(text, file=file, base=path.resolve().parent)


def loads(text: str, *, file: str = "<config>", base: Path | None = None) -> Config:
    """Parse INI text; ``base`` is the folder relative paths are resolved against."""
    cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"),
                                   default_section="\x00none")
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive names
    try:
        cp.read_string(text, source=file)
    except configparser.DuplicateOptionError as e:
        raise ConfigError("key given twice", file=file, section=e.section, key=e.option) from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError("section given twice", file=file, section=e.section) from None
    except configparser.Error as e:
        raise ConfigError(f"not a valid INI file: {e.message.splitlines()[0]}", file=file) from None
    reader = _Reader(file, base or Path.cwd())

    relayd_cfg = RelaydConfig()
    harness_cfg: HarnessConfig | None = None
    ld_values: Mapping[str, str] = {}
    ld_envs: list[LaunchDarklyEnvConfig] = []
    redis_cfg: RedisConfig | None = None
    seen_env_ids: dict[str, str] = {}

    for name in cp.sections():
        values = dict(cp.items(name))
        if name == "relayd":
            relayd_cfg = _read_relayd(_Section(reader, name, values, _RELAYD_KEYS), reader)
        elif name == "harness":
            harness_cfg = _read_harness(_Section(reader, name, values, _HARNESS_KEYS))
        elif name == "launchdarkly":
            _Section(reader, name, values, _LD_KEYS)
            ld_values = values
        elif m := _LD_ENV_SECTION.match(name):
            env = _read_ld_env(_Section(reader, name, values, _LD_ENV_KEYS), m.group(1))
            if env.env_id:
                if env.env_id in seen_env_ids:
                    raise ConfigError(f"env_id already used by [{seen_env_ids[env.env_id]}]", file=file,
                                      section=name, key="env_id")
                seen_env_ids[env.env_id] = name
            ld_envs.append(env)
        elif name == "redis":
            redis_cfg = _read_redis(_Section(reader, name, values, _REDIS_KEYS))
        else:
            raise ConfigError("unknown section (known: relayd, harness, launchdarkly, "
                              'launchdarkly "NAME", redis)', file=file, section=name)

    ld_section = _Section(reader, "launchdarkly", ld_values, _LD_KEYS)
    ld_cfg = ld_section.build(LaunchDarklyConfig, environments=tuple(ld_envs))
    config = Config(relayd=relayd_cfg, harness=harness_cfg, launchdarkly=ld_cfg, redis=redis_cfg,
                    path=Path(file) if file != "<config>" else None)
    _check_conflicts(config, file)
    return config


def _positive_int(text: str) -> int:
    value = int(text.strip())
    if value <= 0:
        raise ValueError(f"must be a positive whole number, not {text!r}")
    return value


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"must be greater than zero, not {text!r}")
    return value


_RELAYD_KEYS: dict[str, _Parser] = {
    "listen": parse_endpoints, "admin_listen": parse_endpoints, "offline_dir": str, "state_dir": str,
    "auth_secret": str, "heartbeat": _positive_duration, "log_level": parse_log_level, "max_body": parse_size,
    "sse_buffer": parse_size, "offline_poll": _positive_duration,
}


def _read_relayd(s: _Section, reader: _Reader) -> RelaydConfig:
    listen = s.get("listen", RelaydConfig.listen)
    if not listen:
        raise s.error("listen", "at least one endpoint is needed")
    return s.build(RelaydConfig, listen=listen, offline_dir=reader.path(s.values.get("offline_dir", "")),
                   state_dir=reader.path(s.values.get("state_dir", "")),
                   auth_secret=s.values.get("auth_secret", "").strip())


_HARNESS_KEYS: dict[str, _Parser] = {
    "account": str, "org": str, "admin_token": str, "api_keys": parse_list, "config_url": parse_url,
    "admin_url": parse_url, "events_url": parse_url, "target_poll": parse_duration, "metric_post": parse_duration,
    "stream": parse_bool, "flag_poll": _positive_duration,
}


def _read_harness(s: _Section) -> HarnessConfig:
    api_keys = s.get("api_keys", ())
    if not api_keys:
        raise s.error("api_keys", "missing required key (comma-separated server SDK keys)")
    return s.build(HarnessConfig, account=s.required("account"), org=s.required("org"),
                   admin_token=s.required("admin_token"), api_keys=api_keys)


_LD_KEYS: dict[str, _Parser] = {
    "stream_url": parse_url, "base_url": parse_url, "events_url": parse_url, "client_side_base_url": parse_url,
    "send_events": parse_bool, "events_flush": _positive_duration, "events_capacity": _positive_int,
    "init_timeout": parse_duration, "disconnected_status_time": parse_duration,
}


def _client_stream(text: str) -> str:
    value = text.strip().lower()
    if value not in ("evaluated", "ping"):
        raise ValueError(f"bad client_stream {text!r}: evaluated or ping")
    return value


_LD_ENV_KEYS: dict[str, _Parser] = {
    "sdk_key": str, "mobile_key": str, "env_id": str, "secure_mode": parse_bool, "allowed_origin": parse_words,
    "allowed_header": parse_list, "ttl": parse_duration, "client_stream": _client_stream,
}


def _read_ld_env(s: _Section, name: str) -> LaunchDarklyEnvConfig:
    return s.build(LaunchDarklyEnvConfig, name=name, sdk_key=s.required("sdk_key"),
                   mobile_key=s.values.get("mobile_key", "").strip(), env_id=s.values.get("env_id", "").strip())


def _redis_role(text: str) -> str:
    value = text.strip().lower()
    if value not in ("writer", "reader"):
        raise ValueError(f"bad role {text!r}: writer or reader")
    return value


def _redis_url(text: str) -> str:
    """Checked by the parser the Redis service uses (so --check catches what would stop the start), whose errors
    never quote the URL: it may hold a password."""
    from relayd.redisstore import parse_url as parse_redis_url

    url = text.strip()
    parse_redis_url(url)
    return url


_REDIS_KEYS: dict[str, _Parser] = {"url": _redis_url, "role": _redis_role, "prefix": str}


def _read_redis(s: _Section) -> RedisConfig:
    return RedisConfig(url=s.get("url", RedisConfig.url), role=s.get("role", RedisConfig.role),
                       prefix=s.values.get("prefix", RedisConfig.prefix).strip() or RedisConfig.prefix)


def _check_conflicts(config: Config, file: str) -> None:
    """Options that cannot go together, reported where the operator has to look."""
    r = config.relayd
    if r.offline_dir is not None:
        if config.harness is not None:
            raise ConfigError("offline_dir cannot be combined with a [harness] section (offline serves the "
                              "folder instead of the vendor)", file=file, section="relayd", key="offline_dir")
        if config.launchdarkly.environments:
            first = config.launchdarkly.environments[0].name
            raise ConfigError(f'offline_dir cannot be combined with [launchdarkly "{first}"] sections',
                              file=file, section="relayd", key="offline_dir")
        if not r.offline_dir.is_dir():
            raise ConfigError(f"offline_dir {str(r.offline_dir)!r} is not a folder", file=file, section="relayd",
                              key="offline_dir")
    elif config.redis is None or config.redis.role == "writer":
        if config.harness is None and not config.launchdarkly.environments:
            raise ConfigError("nothing to relay: set offline_dir, or add a [harness] or "
                              '[launchdarkly "NAME"] section', file=file, section="relayd", key="offline_dir")
    if not r.auth_secret and r.offline_dir is None and (config.harness is not None or config.redis is not None):
        raise ConfigError("missing required key (the HS256 secret of the tokens relayd issues to Harness SDKs; "
                          "only offline mode may leave it empty)", file=file, section="relayd", key="auth_secret")
    keys: dict[str, str] = {}
    for env in config.launchdarkly.environments:
        for kind, key in (("sdk_key", env.sdk_key), ("mobile_key", env.mobile_key)):
            if key and key in keys:
                raise ConfigError(f'the same key is already used by [launchdarkly "{keys[key]}"]', file=file,
                                  section=f'launchdarkly "{env.name}"', key=kind)
            if key:
                keys[key] = env.name

