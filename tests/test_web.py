"""The inbound web layer: routing, JSON errors, body limit, redaction, /health and /status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock

from relayd.harness import offline as harness_offline
from relayd.health import HealthAPI
from relayd.launchdarkly import offline as ld_offline
from relayd.offline import OfflineSource
from relayd.store import INTERRUPTED, Store
from relayd.web import RelaydSite, build_router, obscure, redact_uri

from .conftest import HARNESS_ENV, LD_ENV_ID, ROOT, free_port


def sample_store(folder: Path) -> tuple[Store, Clock]:
    clock = Clock()
    clock.advance(1_700_000_000)
    store = Store(clock)
    OfflineSource(store, folder, {"harness": harness_offline.read, "launchdarkly": ld_offline.read}, clock,
                  run_io=lambda f, *a: succeed(f(*a))).load_now()
    return store, clock


def client(store: Store, clock: Clock) -> StubTreq:
    health = HealthAPI(store, clock)
    return StubTreq(build_router([(health.segments, health.resource())]))


def get_json(stub: StubTreq, url: str, **kw: Any) -> tuple[int, Any, Any]:
    out: list[Any] = []
    stub.request(kw.pop("method", "GET"), url, **kw).addCallback(
        lambda r: r.content().addCallback(lambda body: out.append((r.code, body, r.headers))))
    stub.flush()
    code, body, headers = out[0]
    return code, json.loads(body) if body else None, headers


def test_health_lists_every_environment(offline_dir: Path) -> None:
    store, clock = sample_store(offline_dir)
    code, body, headers = get_json(client(store, clock), "http://relay/health")
    assert code == 200
    assert headers.getRawHeaders("content-type") == ["application/json; charset=utf-8"]
    assert body["cacheStatus"] == "healthy"
    ids = {e["id"]: e for e in body["environments"]}
    assert set(ids) == {HARNESS_ENV, LD_ENV_ID}
    assert ids[HARNESS_ENV]["streamStatus"] == {"state": "CONNECTED", "since": 1_700_000_000}


def test_status_in_launchdarkly_shape_with_obscured_keys(offline_dir: Path) -> None:
    store, clock = sample_store(offline_dir)
    code, body, _ = get_json(client(store, clock), "http://relay/status")
    assert code == 200 and body["status"] == "healthy"
    assert list(body) == ["environments", "status", "version", "clientVersion"]
    ld = body["environments"][LD_ENV_ID]
    assert ld["sdkKey"] == "sdk-********-****-****-****-*******00001"
    assert ld["mobileKey"] == "mob-********-****-****-****-*******00001"
    assert ld["envId"] == LD_ENV_ID and ld["envName"] == "Production" and ld["projKey"] == "relayd-sample"
    assert ld["status"] == "connected"
    assert ld["connectionStatus"] == {"state": "VALID", "stateSince": 1_700_000_000_000}
    assert ld["dataStoreStatus"]["state"] == "VALID"
    assert f"harness/{HARNESS_ENV}" in body["environments"]
    assert "sdk-00000000" not in json.dumps(body)


def test_status_turns_degraded_after_a_minute_interrupted(offline_dir: Path) -> None:
    store, clock = sample_store(offline_dir)
    env = store.environment("launchdarkly", LD_ENV_ID)
    env.set_status(INTERRUPTED, error_kind="NETWORK_ERROR")
    stub = client(store, clock)
    _, body, _ = get_json(stub, "http://relay/status")
    assert body["status"] == "healthy" and body["environments"][LD_ENV_ID]["status"] == "connected"
    assert body["environments"][LD_ENV_ID]["connectionStatus"]["lastError"] == {
        "kind": "NETWORK_ERROR", "time": 1_700_000_000_000}
    clock.advance(60)
    _, body, _ = get_json(stub, "http://relay/status")
    assert body["status"] == "degraded" and body["environments"][LD_ENV_ID]["status"] == "disconnected"
    _, body, _ = get_json(stub, "http://relay/health")
    ld = [e for e in body["environments"] if e["id"] == LD_ENV_ID][0]
    assert ld["streamStatus"]["state"] == "DISCONNECTED"


def test_unknown_routes_and_methods_answer_json(offline_dir: Path) -> None:
    store, clock = sample_store(offline_dir)
    stub = client(store, clock)
    code, body, _ = get_json(stub, "http://relay/no/such/thing")
    assert code == 404 and body["message"] == "Not Found"
    code, body, headers = get_json(stub, "http://relay/health", method="DELETE")
    assert code == 405 and body["code"] == 405 and "GET" in headers.getRawHeaders("allow")[0]


@pytest_twisted.ensureDeferred
async def test_oversize_bodies_get_413_and_others_are_still_served(offline_dir: Path) -> None:
    store, clock = sample_store(offline_dir)
    health = HealthAPI(store, clock)
    site = RelaydSite(build_router([(health.segments, health.resource())]), max_body=100)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        big = await treq.post(f"{base}/health", data=b"x" * 101, persistent=False)
        body = json.loads(await big.content())
        assert big.code == 413 and "100 bytes" in body["message"]
        small = await treq.post(f"{base}/health", data=b"x" * 100, persistent=False)
        assert small.code == 405
        await small.content()
        ok = await treq.get(f"{base}/health", persistent=False)
        assert ok.code == 200
        await ok.content()
    finally:
        await port.stopListening()


def test_redaction() -> None:
    assert redact_uri(b"/stream?cluster=1&apiKey=abc") == "/stream?cluster=1&apiKey=***"
    assert redact_uri(b"/a?h=1&authToken=x&sdk_key=y") == "/a?h=1&authToken=***&sdk_key=***"
    assert redact_uri(b"/plain/path") == "/plain/path"
    assert obscure("sdk-0a1b2c3d-4e5f-6789-abcd-ef0123456789") == "sdk-********-****-****-****-*******56789"
    assert obscure("abc") == "abc" and obscure("") == ""


def test_twistd_runs_the_embedded_default_and_stops_cleanly(tmp_path: Path) -> None:
    """What `make run` does: twistd -n relayd on etc/relayd.ini (ports moved to free ones)."""
    ports = free_port(), free_port()
    ini = tmp_path / "relayd.ini"
    ini.write_text((ROOT / "etc" / "relayd.ini").read_text()
                   .replace("tcp:7000", f"tcp:{ports[0]}:interface=127.0.0.1")
                   .replace("tcp:8030", f"tcp:{ports[1]}:interface=127.0.0.1")
                   .replace("offline_dir = offline", f"offline_dir = {ROOT / 'etc' / 'offline'}"))
    code = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    proc = subprocess.Popen([sys.executable, "-c", code, "-n", "--pidfile=", "relayd", "--config", str(ini)],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = status = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/health", timeout=2))
                status = json.load(urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/status", timeout=2))
                if len(health["environments"]) == 2:
                    break
            except OSError:
                time.sleep(0.1)
        assert health is not None and status is not None
        assert {e["id"] for e in health["environments"]} == {HARNESS_ENV, LD_ENV_ID}
        assert LD_ENV_ID in status["environments"] and status["status"] == "healthy"
        # SIGHUP re-reads the configuration instead of killing the daemon (Twisted installs no handler)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None
        assert urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/health", timeout=2).status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    # twistd stopped by a signal exits by that signal, as a shell expects of Ctrl-C
    assert proc.returncode in (0, -signal.SIGINT), out
    assert "Server Shut Down." in out and "Traceback" not in out
    assert "SIGHUP: configuration" in out and "re-read" in out


def test_obscure_hides_keys_that_are_not_hex() -> None:
    # offline data and some vendors' keys are not UUIDs: every character but the last five is hidden
    assert obscure("sdk-my-secret-production-key") == "sdk-**-******-*********n-key"
    assert obscure("Zr8PqLmN2vXw") == "*******N2vXw"
