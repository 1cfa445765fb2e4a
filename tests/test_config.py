from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relayd.config import ConfigError, load, loads, parse_duration, parse_size

from .conftest import ROOT


def test_embedded_default_is_offline_on_the_sample_folder() -> None:
    config = load(ROOT / "etc" / "relayd.ini")
    assert config.offline and config.relayd.offline_dir == ROOT / "etc" / "offline"
    assert config.relayd.listen == ("tcp:7000:backlog=4096", "tcp:8030:backlog=4096")
    assert config.relayd.heartbeat == 15.0
    assert config.harness is None and config.launchdarkly.environments == ()


@pytest.mark.parametrize("text,seconds", [("500ms", 0.5), ("15s", 15), ("1m", 60), ("1m30s", 90), ("2h", 7200),
                                          ("0", 0), ("1.5s", 1.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["15", "", "1x", "s", "1 m", "-1s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_sizes() -> None:
    assert parse_size("64KiB") == 65536 and parse_size("1MiB") == 1 << 20 and parse_size("100") == 100


FULL = """
[relayd]
listen = tcp:0:interface=127.0.0.1
auth_secret = s3cret
heartbeat = 500ms
state_dir = state

[harness]
account = acc
org = org
admin_token = tok
api_keys = k1, k2
target_poll = 0
stream = false

[launchdarkly]
stream_url = http://127.0.0.1:1/
init_timeout = 2s

[launchdarkly "Production"]
sdk_key = sdk-1
mobile_key = mob-1
env_id = abc
secure_mode = true
allowed_origin = https://a.example https://b.example
client_stream = ping

[launchdarkly "Staging"]
sdk_key = sdk-2
"""


def test_full_configuration(tmp_path: Path) -> None:
    config = loads(FULL, file="x.ini", base=tmp_path)
    assert config.relayd.state_dir == tmp_path / "state"
    assert config.relayd.heartbeat == 0.5
    assert config.harness is not None and config.harness.api_keys == ("k1", "k2")
    assert config.harness.target_poll == 0 and config.harness.stream is False
    assert config.harness.config_url == "https://config.ff.harness.io/api/1.0"
    assert config.launchdarkly.stream_url == "http://127.0.0.1:1"
    prod, staging = config.launchdarkly.environments
    assert (prod.name, prod.sdk_key, prod.mobile_key, prod.env_id, prod.secure_mode) == (
        "Production", "sdk-1", "mob-1", "abc", True)
    assert prod.allowed_origin == ("https://a.example", "https://b.example") and prod.client_stream == "ping"
    assert staging.client_stream == "evaluated" and not staging.secure_mode


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, file="broken.ini", base=ROOT / "etc")
    return info.value


@pytest.mark.parametrize("text,section,key,words", [
    ("[relayd]\noffline_dir = offline\nlisten_port = 1\n", "relayd", "listen_port", "unknown key"),
    ("[relayd]\noffline_dir = offline\nheartbeat = 15\n", "relayd", "heartbeat", "bad duration"),
    ("[relayd]\noffline_dir = offline\nlisten = nonsense:1\n", "relayd", "listen", "bad endpoint"),
    ("[relayd]\noffline_dir = offline\n[nope]\n", "nope", None, "unknown section"),
    ("[relayd]\nauth_secret = x\n[harness]\naccount = a\norg = o\napi_keys = k\n", "harness", "admin_token",
     "missing required key"),
    ("[relayd]\noffline_dir = offline\n[launchdarkly \"P\"]\nsdk_key = s\n", "relayd", "offline_dir",
     "cannot be combined"),
    ("[relayd]\n[launchdarkly \"P\"]\nmobile_key = m\n", 'launchdarkly "P"', "sdk_key", "missing required key"),
    ("[relayd]\n[harness]\naccount = a\norg = o\nadmin_token = t\napi_keys = k\n", "relayd", "auth_secret",
     "missing required key"),
    ("[relayd]\noffline_dir = nowhere\n", "relayd", "offline_dir", "not a folder"),
    ("[relayd]\n", "relayd", "offline_dir", "nothing to relay"),
    ("[relayd]\n[launchdarkly \"A\"]\nsdk_key = s\n[launchdarkly \"B\"]\nsdk_key = s\n", 'launchdarkly "B"',
     "sdk_key", "already used"),
    ("[relayd]\noffline_dir = offline\noffline_dir = x\n", "relayd", "offline_dir", "given twice"),
])
def test_errors_name_file_section_and_key(text: str, section: str, key: str | None, words: str) -> None:
    err = error_of(text)
    assert (err.file, err.section, err.key) == ("broken.ini", section, key)
    assert words in str(err) and str(err).startswith("broken.ini: [")


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load("/nonexistent/relayd.ini")


def twistd(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run twistd from this source checkout (the repo root on sys.path, as in a developer's tree)."""
    code = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_check_prints_one_line_naming_section_and_key(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ini"
    broken.write_text("[relayd]\noffline_dir = .\nheartbeat = soon\n")
    result = twistd("relayd", "--config", str(broken), "--check")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "[relayd] heartbeat" in lines[0] and "bad duration" in lines[0] and str(broken) in lines[0]


def test_check_accepts_the_embedded_default() -> None:
    result = twistd("relayd", "--config", "etc/relayd.ini", "--check")
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


def test_normal_start_with_a_broken_file_fails_without_a_traceback(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ini"
    broken.write_text("[relayd]\noffline_dir = .\nbogus = 1\n")
    result = twistd("-n", "--pidfile=", "relayd", "--config", str(broken))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert "[relayd] bogus: unknown key" in result.stderr + result.stdout


@pytest.mark.parametrize("url", ["redis://:hunter2@10.0.0.5:notaport/0", "redis://:hunter2@10.0.0.5:6379/db0",
                                 "redis//:hunter2@10.0.0.5:6379/0", "redis://:hunter2@/0"])
def test_a_bad_redis_url_is_a_config_error_that_does_not_quote_the_password(url: str) -> None:
    # --check must catch what would stop the daemon at start, and its one line must not print the password
    text = f"[relayd]\nauth_secret = s\n[harness]\naccount=a\norg=o\nadmin_token=t\napi_keys=k\n[redis]\nurl = {url}\n"
    with pytest.raises(ConfigError) as e:
        loads(text)
    assert e.value.section == "redis" and e.value.key == "url" and "hunter2" not in str(e.value)
