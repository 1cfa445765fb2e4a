"""The treq clients relayd talks to the vendors with: one construction, so every one is configured alike.

API calls (polling, metrics, events, goals) share connections through a persistent pool; a stream never goes
back to a pool, so stream clients get a private non-persistent one. Both verify TLS certificates with the
platform's trust roots (twisted's default browser-like policy, backed by service_identity) and are quiet: the
pool's "Starting factory" line per connection would otherwise fill the log.
"""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class QuietPool(HTTPConnectionPool):
    _factory = _QuietFactory


def http_client(reactor: Any, *, persistent: bool = True, connect_timeout: float = 10.0,
                max_per_host: int = 8) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client and its pool; whoever owns it closes the pool (``closeCachedConnections``) on stop."""
    pool = QuietPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = max_per_host
    return HTTPClient(Agent(reactor, pool=pool, connectTimeout=connect_timeout)), pool
