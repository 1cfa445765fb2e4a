"""Analytics and diagnostic events that LaunchDarkly SDKs post to relayd, on their way to the vendor.

The inbound routes accept a payload (202) and hand it to an ``EventSink``; what happens next is the sink's job:
offline mode discards, the forwarder batches and posts upstream.
"""

from __future__ import annotations

from typing import Mapping, Protocol

from relayd.store import Environment


class EventSink(Protocol):
    def enabled(self, env: Environment) -> bool:
        """False = forwarding is off for this environment: the SDK gets 503, as from ld-relay."""

    def accept(self, env: Environment, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        """Take one payload: ``path`` is where it goes upstream (``/bulk``, ``/diagnostic``, ``/mobile``,
        ``/mobile/events/diagnostic``, ``/events/bulk/{envId}``, ``/events/diagnostic/{envId}``), ``body`` the
        decompressed JSON, ``headers`` the SDK's headers worth keeping (``X-LaunchDarkly-Event-Schema``,
        ``X-LaunchDarkly-Tags``, ``User-Agent``, ...). Must not block and must not raise."""


class DiscardEvents:
    """Offline mode: events are accepted and dropped, like ld-relay's offline mode."""

    def enabled(self, env: Environment) -> bool:
        return True

    def accept(self, env: Environment, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        return None
