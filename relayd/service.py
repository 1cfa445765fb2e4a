"""The service tree: everything relayd runs, built from one Config."""

from __future__ import annotations

import resource
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString

from relayd import logs
from relayd.admin import AdminAPI
from relayd.config import Config
from relayd.harness import offline as harness_offline
from relayd.health import HealthAPI
from relayd.launchdarkly import offline as ld_offline
from relayd.logs import Logger
from relayd.offline import OfflineSource
from relayd.sse import SSEHub
from relayd.store import Store
from relayd.web import RelaydSite, build_router

log = Logger()


class Relayd(MultiService):
    """The root service; holds what tests and the admin page want to reach."""

    def __init__(self, config: Config, store: Store, hub: SSEHub, site: RelaydSite) -> None:
        super().__init__()
        self.config = config
        self.store = store
        self.hub = hub
        self.site = site


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one: every SDK stream holds a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def make_service(config: Config, reactor: Any) -> Relayd:
    logs.set_level(config.relayd.log_level)
    soft, _ = raise_nofile_limit()
    log.info("open files limit: {n}", n=soft)

    store = Store(reactor)
    hub = SSEHub(reactor, heartbeat=config.relayd.heartbeat, max_backlog=config.relayd.sse_buffer)
    health = HealthAPI(store, reactor, config.launchdarkly.disconnected_status_time)
    apps: list[tuple[tuple[str, ...], Any]] = [(health.segments, health.resource())]
    site = RelaydSite(build_router(apps), clock=reactor, max_body=config.relayd.max_body)

    top = Relayd(config, store, hub, site)
    hub.setServiceParent(top)
    if config.relayd.offline_dir is not None:
        log.info("offline mode: serving {folder}", folder=str(config.relayd.offline_dir))
        OfflineSource(store, config.relayd.offline_dir,
                      {"harness": harness_offline.read, "launchdarkly": ld_offline.read},
                      reactor, interval=config.relayd.offline_poll).setServiceParent(top)
    if config.harness is not None and not config.offline:
        # Harness SaaS traffic: per-key sync and streams, target polling, metrics forwarding.
        from relayd.harness.upstream import HarnessUpstream

        HarnessUpstream(config.harness, store, reactor).setServiceParent(top)
    for description in config.relayd.listen:
        StreamServerEndpointService(serverFromString(reactor, description), site).setServiceParent(top)
    if config.relayd.admin_listen:
        admin = RelaydSite(AdminAPI(store, hub, reactor).resource(), clock=reactor, max_body=64 * 1024)
        for description in config.relayd.admin_listen:
            StreamServerEndpointService(serverFromString(reactor, description), admin).setServiceParent(top)
    return top
