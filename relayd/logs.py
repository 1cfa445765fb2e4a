"""relayd's loggers: twisted.logger with the configured ``log_level`` applied at the source.

twistd owns the log observer (stdout, a file, or ``--logger``), so the level is enforced where relayd emits:
messages below the threshold are dropped before they are formatted, whatever observer is installed.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger as _TwistedLogger
from twisted.logger import LogLevel

_ORDER = {LogLevel.debug: 0, LogLevel.info: 1, LogLevel.warn: 2, LogLevel.error: 3, LogLevel.critical: 4}
_threshold = _ORDER[LogLevel.info]


def set_level(name: str) -> None:
    """``debug``, ``info``, ``warn``, ``error`` or ``critical`` (validated by the config)."""
    global _threshold
    _threshold = _ORDER[LogLevel.levelWithName(name)]


def enabled(level: LogLevel) -> bool:
    """Whether a message at ``level`` would be emitted: lets hot paths skip building one that would not."""
    return _ORDER.get(level, 4) >= _threshold


class Logger(_TwistedLogger):
    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if enabled(level):
            super().emit(level, format, **kwargs)
