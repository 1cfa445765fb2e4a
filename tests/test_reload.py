from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from relayd import config as configmod
from relayd import logs
from relayd.reload import ReloadOnHUP
from relayd.sse import SSEHub

INI = "[relayd]\noffline_dir = .\nheartbeat = {hb}\nlog_level = {level}\nlisten = {listen}\n"


def test_reload_applies_runtime_settings_and_keeps_a_broken_file_out(tmp_path: Path) -> None:
    path = tmp_path / "relayd.ini"
    path.write_text(INI.format(hb="15s", level="info", listen="tcp:7000"))
    clock = Clock()
    hub = SSEHub(clock, heartbeat=15)
    hub.startService()
    reloader = ReloadOnHUP(path, configmod.load(path), hub, clock)
    try:
        path.write_text(INI.format(hb="5s", level="debug", listen="tcp:7001"))
        new = reloader.reload()
        assert new is not None and hub.heartbeat == 5 and logs._threshold == 0
        [call] = clock.getDelayedCalls()
        assert call.getTime() == 5
        path.write_text("[relayd]\nbogus = 1\n")
        assert reloader.reload() is None and reloader.current is new
    finally:
        logs.set_level("info")
        hub.stopService()
