"""Request rate of relayd's SDK endpoints as a ratio to a bare twisted.web resource, measured in the same run.

Run: .venv/bin/python bench/endpoints.py [seconds]     (needs `wrk`: apt-get install wrk)

Starts relayd on its embedded sample data and, beside it, a bare twisted.web Resource returning a body of the
same size as each endpoint's answer (the floor any Twisted server pays), then drives each with wrk on loopback
(1 thread, 50 connections, keep-alive) and prints requests/s and relayd/bare. On a shared 2-core machine only the
ratios mean something; client and servers share the cores.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS_ENV = "7c2e9a50-4a3b-4d8e-9f61-2b5d8c0e1a77"
HARNESS_KEY = "2f4a6c8e-0b1d-4e3f-8a5c-7e9b1d3f5a70"
LD_SDK_KEY = "sdk-00000000-0000-4000-8000-000000000001"
LD_ENV_ID = "5f0c0ffee0ddba11c0ffee01"

BARE = """
import sys
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site
body = b"x" * int(sys.argv[2])
class R(Resource):
    isLeaf = True
    def render(self, request):
        request.setHeader(b"Content-Type", b"application/json")
        return body
site = Site(R())
site.log = lambda request: None
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1", backlog=1024)
reactor.run()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, headers: dict[str, str] | None = None) -> bytes:
    deadline = time.monotonic() + 30
    while True:
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2).read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wrk(url: str, seconds: int, headers: dict[str, str]) -> float:
    args = ["wrk", "-t1", "-c50", f"-d{seconds}s"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or "Non-2xx" in out:
        raise RuntimeError(f"wrk failed or got errors for {url}:\n{out}")
    return float(m.group(1))


def main(seconds: int = 5) -> None:
    if shutil.which("wrk") is None:
        sys.exit("bench/endpoints.py needs wrk (apt-get install wrk)")
    folder = Path(tempfile.mkdtemp())
    port = free_port()
    ini = folder / "relayd.ini"
    ini.write_text(f"[relayd]\nlisten = tcp:{port}:interface=127.0.0.1:backlog=1024\n"
                   f"offline_dir = {ROOT / 'etc' / 'offline'}\nlog_level = warn\n")
    code = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    relayd = subprocess.Popen([sys.executable, "-c", code, "-n", "--pidfile=", "--logfile=/dev/null", "relayd",
                               "--config", str(ini)], cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT)})
    bare: subprocess.Popen[bytes] | None = None
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/health")
        token = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{base}/client/auth", data=json.dumps({"apiKey": HARNESS_KEY}).encode(), method="POST"),
            timeout=5).read())["authToken"]
        context = base64.urlsafe_b64encode(json.dumps({"kind": "user", "key": "bob"}).encode()).decode()
        cases = [
            ("health", "/health", {}),
            ("harness feature-configs", f"/client/env/{HARNESS_ENV}/feature-configs?cluster=1",
             {"Authorization": f"Bearer {token}"}),
            ("harness evaluations", f"/client/env/{HARNESS_ENV}/target/alice/evaluations?cluster=1",
             {"Authorization": f"Bearer {token}"}),
            ("ld latest-all", "/sdk/latest-all", {"Authorization": LD_SDK_KEY}),
            ("ld evalx", f"/sdk/evalx/contexts/{context}", {"Authorization": LD_SDK_KEY}),
        ]
        print(f"{'endpoint':26} {'bytes':>6} {'relayd r/s':>11} {'bare r/s':>10} {'ratio':>6}")
        for name, path, headers in cases:
            size = len(wait_for(base + path, headers))
            bare_port = free_port()
            bare = subprocess.Popen([sys.executable, "-c", BARE, str(bare_port), str(size)])
            wait_for(f"http://127.0.0.1:{bare_port}/")
            ours = wrk(base + path, seconds, headers)
            floor = wrk(f"http://127.0.0.1:{bare_port}/", seconds, {})
            bare.send_signal(signal.SIGTERM)
            bare.wait(10)
            bare = None
            print(f"{name:26} {size:6d} {ours:11.0f} {floor:10.0f} {ours / floor:6.2f}")
    finally:
        if bare is not None:
            bare.kill()
        relayd.send_signal(signal.SIGTERM)
        relayd.wait(20)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
