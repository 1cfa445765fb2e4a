"""The service tree: everything relayd runs, built from one Config."""

from __future__ import annotations

import resource
from typing import Any, Callable, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString

from relayd import logs
from relayd.admin import AdminAPI
from relayd.config import Config
from relayd.harness import offline as harness_offline
from relayd.harness.api import HarnessAPI
from relayd.harness.metrics import MetricsBuffer
from relayd.harness.tokens import make_secret
from relayd.harness.upstream import HarnessUpstream, target_json
from relayd.health import HealthAPI
from relayd.launchdarkly import offline as ld_offline
from relayd.launchdarkly.api import LaunchDarklyAPI, configured_environments
from relayd.launchdarkly.events import DiscardEvents, EventForwarder, EventSink
from relayd.launchdarkly.upstream import EnvironmentStream, GoalsProxy
from relayd.logs import Logger
from relayd.offline import OfflineSource
from relayd.redisstore import (
    HarnessMetricsRelay,
    RedisReader,
    RedisWriter,
    follows_redis,
    redis_service,
)
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
    """The whole daemon: store and SSE hub, the families' SDK APIs on every listener, and the sources that feed
    the store (offline folder, or the vendors, with warm-restart snapshots), plus the admin listener."""
    logs.set_level(config.relayd.log_level)
    soft, _ = raise_nofile_limit()
    log.info("open files limit: {n}", n=soft)
    online = not config.offline
    # A Redis reader follows what the writer relayd shares and holds no vendor data connection of its own.
    vendor = online and not follows_redis(config)

    store = Store(reactor)
    hub = SSEHub(reactor, heartbeat=config.relayd.heartbeat, max_backlog=config.relayd.sse_buffer)

    # Upstream services are built first: the SDK APIs hand them what SDKs post (events, metrics, targets).
    harness_metrics = MetricsBuffer()
    harness_upstream = None
    if vendor and config.harness is not None:
        harness_upstream = HarnessUpstream(config.harness, store, reactor, metrics=harness_metrics)
    ld_events: EventSink = DiscardEvents()
    ld_streams: list[EnvironmentStream] = []
    goals = None
    if online:
        ld_events = EventForwarder(config.launchdarkly, clock=reactor)
        goals = GoalsProxy(config.launchdarkly.client_side_base_url, clock=reactor)
        if vendor:
            ld_streams = [EnvironmentStream(store, env, config.launchdarkly, clock=reactor)
                          for env in config.launchdarkly.environments]
    else:
        configured_environments(store, config.launchdarkly)

    # Until the sources have listed the environments (the Harness SaaS's first sync, a Redis reader's first
    # load), an unknown key may just not be known yet: the SDK APIs answer 503, which SDKs retry, not 401.
    ready_checks: list[Callable[[], bool]] = []
    if harness_upstream is not None:
        ready_checks.append(harness_upstream.ready)

    def ready() -> bool:
        return all(check() for check in ready_checks)

    health = HealthAPI(store, reactor, config.launchdarkly.disconnected_status_time)
    admin = AdminAPI(store, hub, reactor)
    launchdarkly = LaunchDarklyAPI(store, hub, reactor, ld_events, offline=config.offline, goals=goals,
                                   max_event_body=config.relayd.max_body, ready=ready)
    harness = HarnessAPI(store, hub, reactor, make_secret(config.relayd.auth_secret), metrics=harness_metrics,
                         on_target=None if harness_upstream is None else
                         lambda env_id, target: harness_upstream.register_target(env_id, target_json(target)),
                         prometheus_text=admin.prometheus_text,
                         ready=ready)
    site = RelaydSite(build_router([(health.segments, health.resource()),
                                    (launchdarkly.segments, launchdarkly.resource()),
                                    (harness.segments, harness.resource())]),
                      clock=reactor, max_body=config.relayd.max_body)

    top = Relayd(config, store, hub, site)
    top.ld_events = ld_events
    hub.setServiceParent(top)
    if config.relayd.state_dir is not None and vendor:
        snapshots = SnapshotService(store, config.relayd.state_dir, reactor, wanted=configured(config))
        snapshots.load()  # before any source starts: serve the last data while upstream is unreachable
        snapshots.setServiceParent(top)
    # Redis scale-out: a writer mirrors this store next to its vendor sources; a reader follows it instead.
    if config.redis is not None:
        if follows_redis(config):
            log.info("Redis reader: serving what the writer relayd shares, no vendor connections")
        mirror = redis_service(store, config.redis, reactor)
        mirror.setServiceParent(top)
        if isinstance(mirror, RedisReader):
            ready_checks.append(lambda: mirror.synced)
        if config.redis.role == "reader" or harness_upstream is not None:
            # Harness SDK metrics posted to readers reach the SaaS through the writer's forwarder
            link = mirror.commands if isinstance(mirror, RedisReader) else cast(RedisWriter, mirror).link
            HarnessMetricsRelay(harness_metrics, link, config.redis.prefix, config.redis.role,
                                reactor).setServiceParent(top)
    if config.relayd.offline_dir is not None:
        log.info("offline mode: serving {folder}", folder=str(config.relayd.offline_dir))
        offline = OfflineSource(store, config.relayd.offline_dir,
                                {"harness": harness_offline.read, "launchdarkly": ld_offline.read},
                                reactor, interval=config.relayd.offline_poll)
        # Read once now, before anything listens: an SDK connecting in the first instant must find its key
        # (Harness SDKs give up for good on a 401). Later reads happen off the reactor.
        offline.load_now()
        offline.setServiceParent(top)
    if harness_upstream is not None:
        harness_upstream.setServiceParent(top)
    for stream in ld_streams:
        stream.setServiceParent(top)
    if isinstance(ld_events, EventForwarder):
        ld_events.setServiceParent(top)
    if config.path is not None:
        ReloadOnHUP(config.path, config, hub, reactor).setServiceParent(top)
    for description in config.relayd.listen:
        StreamServerEndpointService(serverFromString(reactor, description), site).setServiceParent(top)
    if config.relayd.admin_listen:
        admin_site = RelaydSite(admin.resource(), clock=reactor, max_body=64 * 1024)
        for description in config.relayd.admin_listen:
            StreamServerEndpointService(serverFromString(reactor, description), admin_site).setServiceParent(top)
    return top
