"""The service tree: everything relayd runs, built from one Config."""

from __future__ import annotations

import resource
from typing import Any, Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString

from relayd import logs
from relayd.admin import AdminAPI
from relayd.config import Config
from relayd.harness import offline as harness_offline
from relayd.harness.api import HarnessAPI
from relayd.harness.tokens import make_secret
from relayd.health import HealthAPI
from relayd.launchdarkly import offline as ld_offline
from relayd.logs import Logger
from relayd.offline import OfflineSource
from relayd.reload import ReloadOnHUP
from relayd.snapshot import SnapshotService
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
        self.ld_events: Any = None  # the LaunchDarkly EventSink the SDK API hands payloads to


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


def configured(config: Config) -> Callable[[dict[str, Any]], bool]:
    """Which snapshots still belong to this configuration (an environment removed from it stays gone)."""
    ld_ids = {env.name for env in config.launchdarkly.environments}  # store id of a configured environment
    harness_keys = set(config.harness.api_keys) if config.harness is not None else set()

    def wanted(doc: dict[str, Any]) -> bool:
        if doc.get("family") == "launchdarkly":
            return doc.get("id") in ld_ids
        if doc.get("family") == "harness":
            return bool(harness_keys & set(doc.get("meta", {}).get("api_keys") or ()))
        return False

    return wanted


def make_service(config: Config, reactor: Any) -> Relayd:
    logs.set_level(config.relayd.log_level)
    soft, _ = raise_nofile_limit()
    log.info("open files limit: {n}", n=soft)

    store = Store(reactor)
    hub = SSEHub(reactor, heartbeat=config.relayd.heartbeat, max_backlog=config.relayd.sse_buffer)
    health = HealthAPI(store, reactor, config.launchdarkly.disconnected_status_time)
    apps: list[tuple[tuple[str, ...], Any]] = [(health.segments, health.resource())]
    # LaunchDarkly SDK routes; events go to the upstream forwarder, or are discarded offline.
    from relayd.launchdarkly.api import LaunchDarklyAPI, configured_environments
    from relayd.launchdarkly.events import DiscardEvents, EventForwarder, EventSink
    ld_events: EventSink = DiscardEvents()
    if not config.offline:
        ld_events = EventForwarder(config.launchdarkly, clock=reactor)
    from relayd.launchdarkly.upstream import GoalsProxy
    goals = None if config.offline else GoalsProxy(config.launchdarkly.client_side_base_url, clock=reactor)
    launchdarkly = LaunchDarklyAPI(store, hub, reactor, ld_events, offline=config.offline, goals=goals,
                                   max_event_body=config.relayd.max_body)
    configured_environments(store, config.launchdarkly)
    apps.append((launchdarkly.segments, launchdarkly.resource()))
    harness_api = HarnessAPI(store, hub, reactor, make_secret(config.relayd.auth_secret))
    apps.append((harness_api.segments, harness_api.resource()))
    site = RelaydSite(build_router(apps), clock=reactor, max_body=config.relayd.max_body)

    top = Relayd(config, store, hub, site)
    hub.setServiceParent(top)
    if config.relayd.state_dir is not None and config.relayd.offline_dir is None:
        snapshots = SnapshotService(store, config.relayd.state_dir, reactor, wanted=configured(config))
        snapshots.load()  # before any source starts: serve the last data while upstream is unreachable
        snapshots.setServiceParent(top)
    if config.relayd.offline_dir is not None:
        log.info("offline mode: serving {folder}", folder=str(config.relayd.offline_dir))
        OfflineSource(store, config.relayd.offline_dir,
                      {"harness": harness_offline.read, "launchdarkly": ld_offline.read},
                      reactor, interval=config.relayd.offline_poll).setServiceParent(top)
    if config.harness is not None and not config.offline:
        # Harness SaaS traffic: per-key sync and streams, target polling, metrics forwarding (the SDK API's
        # metrics buffer, and the targets SDKs register at /client/auth, go upstream through it).
        from relayd.harness.upstream import HarnessUpstream, target_json

        harness_upstream = HarnessUpstream(config.harness, store, reactor, metrics=harness_api.metrics)
        harness_upstream.setServiceParent(top)
        remember = harness_api.remember_target

        def remember_and_forward(env_id: str, target: Any) -> None:
            remember(env_id, target)
            harness_upstream.register_target(env_id, target_json(target))
        harness_api.remember_target = remember_and_forward  # type: ignore[method-assign]
    # --- LaunchDarkly upstream: one /all stream per [launchdarkly "NAME"] section, and event forwarding.
    if not config.offline:
        from relayd.launchdarkly.upstream import EnvironmentStream
        for env_config in config.launchdarkly.environments:
            EnvironmentStream(store, env_config, config.launchdarkly, clock=reactor).setServiceParent(top)
        if isinstance(ld_events, EventForwarder):
            ld_events.setServiceParent(top)
    top.ld_events = ld_events
    # --- end LaunchDarkly upstream
    if config.path is not None:
        ReloadOnHUP(config.path, config, hub, reactor).setServiceParent(top)
    for description in config.relayd.listen:
        StreamServerEndpointService(serverFromString(reactor, description), site).setServiceParent(top)
    if config.relayd.admin_listen:
        admin = RelaydSite(AdminAPI(store, hub, reactor).resource(), clock=reactor, max_body=64 * 1024)
        for description in config.relayd.admin_listen:
            StreamServerEndpointService(serverFromString(reactor, description), admin).setServiceParent(top)
    return top
