"""SSE fan-out cost: relayd's hub against the bare minimum (the same bytes written to the same requests).

Run: .venv/bin/python bench/fanout.py [subscribers] [events]
Prints the ratio hub/baseline for publishing events and for heartbeats; this machine is shared and noisy, so only
the ratio (both measured in this run, best of 5) means anything. The hub's extra work per write is the paused
check and the backlog bookkeeping; a ratio well under 2 keeps fan-out dominated by the transport.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from relayd.sse import SSEHub, encode  # noqa: E402


class Sink:
    """A request whose transport accepts everything (as a socket with room does)."""

    def __init__(self) -> None:
        self.n = 0
        self.channel = None

    def setResponseCode(self, code: int) -> None: ...
    def setHeader(self, name: bytes, value: bytes) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def notifyFinish(self) -> Deferred[None]:
        return Deferred()

    def write(self, data: bytes) -> None:
        self.n += len(data)


def best(fn: Any, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(subscribers: int = 10_000, events: int = 20) -> None:
    clock = Clock()
    hub = SSEHub(clock, heartbeat=15)
    hub.startService()
    sinks = [Sink() for _ in range(subscribers)]
    for s in sinks:
        hub.subscribe(s, "env")  # type: ignore[arg-type]
    frame = encode('{"event":"patch","domain":"flag","identifier":"flag1","version":7}', event="*")

    def baseline() -> None:
        for _ in range(events):
            for s in sinks:
                s.write(frame)

    def publish() -> None:
        for _ in range(events):
            hub.publish("env", frame)

    def heartbeat() -> None:
        for _ in range(events):
            hub._heartbeat()

    base, pub, beat = best(baseline), best(publish), best(heartbeat)
    writes = subscribers * events
    print(f"subscribers={subscribers} events={events} writes={writes}")
    print(f"baseline  {base / writes * 1e6:.2f} us/write")
    print(f"publish   {pub / writes * 1e6:.2f} us/write  ratio {pub / base:.2f}")
    print(f"heartbeat {beat / writes * 1e6:.2f} us/write  ratio {beat / base:.2f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
