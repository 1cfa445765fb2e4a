# -*- test-case-name: tests.test_harness_upstream -*-
"""The account/org directory of the Harness admin API: projects, their environments, each environment's hashed SDK
keys (protocols/harness.md section 3.1, the paragraph on versions 0.8.x-0.11.x).

One pass pages ``GET {admin}/admin/projects`` once, then ``GET {admin}/admin/environments`` once per project, with
``x-api-key: <admin_token>``. All configured keys share that pass: it does not depend on the key, so N keys cost one
pass instead of N ``/admin/apikey`` listings, and every environment gets *all* of its keys (an SDK may use another
key of the environment than the one relayd was configured with). A finished pass is reused for ``max_age`` seconds,
so a burst of re-syncs (every stream reconnecting at once) costs one pass too.

A projects listing that answers 404 means this admin API has none: :meth:`AdminDirectory.hashes_for` then answers
None, as it does for an environment the listing does not hold, and the caller reads ``/admin/apikey`` instead.

Lists are read in the ``{"status", "data": {...}}`` envelope or bare, ``pageSize`` <= 100, until
``pageNumber >= pageCount - 1`` or an empty page, never stopping early because a page was shorter than asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence
from urllib.parse import urlencode

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from relayd.config import HarnessConfig
from relayd.sseclient import INVALID_DATA, StreamError

__all__ = [
    "AdminDirectory",
    "ListedEnvironment",
    "PAGE_SIZE",
    "admin_page",
    "find_environment",
    "listed_environment",
    "page_all",
]

PAGE_SIZE = 100  # the admin API's maximum
MAX_PAGES = 100_000  # a listing that never ends is a broken server, not a big account
_HASH = re.compile(r"[0-9a-f]{64}")


class JSONCaller(Protocol):
    """``relayd.harness.upstream.SaaSClient``: JSON in and out, non-2xx as StreamError with the status."""

    def call(self, method: str, url: str, headers: Mapping[str, str], body: Any = None) -> Deferred[Any]: ...


# ---------------------------------------------------------------------------------------------- pure parts


def admin_page(body: Any, list_field: str) -> tuple[list[Any], int | None]:
    """The items and page count of one admin page, bare (``{"apiKeys": [..], "pageCount": N}``) or in the
    envelope (``{"status": "SUCCESS", "data": {...}}``)."""
    if isinstance(body, dict) and isinstance(body.get("data"), dict) and list_field not in body:
        body = body["data"]
    if not isinstance(body, dict):
        raise StreamError(INVALID_DATA, f"admin {list_field}: expected a JSON object")
    items = body.get(list_field) or []
    if not isinstance(items, list):
        raise StreamError(INVALID_DATA, f"admin {list_field}: expected an array")
    count = body.get("pageCount")
    return items, count if isinstance(count, int) and not isinstance(count, bool) else None


def key_hashes(keys: Any) -> frozenset[str]:
    """The SHA-256 hex values of an ``apiKeys`` array (``[{"key": "<hash>", ...}]``); masked or odd entries skipped."""
    out = set()
    for k in keys if isinstance(keys, list) else ():
        h = k.get("key") if isinstance(k, dict) else None
        if isinstance(h, str) and _HASH.fullmatch(h.lower()):
            out.add(h.lower())
    return frozenset(out)


@dataclass(frozen=True)
class ListedEnvironment:
    """One environment of the admin listing. ``hashes`` is None when the listing embeds only part of its keys (the
    embedded ``apiKeys`` object is itself paged): the caller must then ask ``/admin/apikey``."""

    id: str  # the environment UUID the SDK tokens carry; "" when the listing gives none
    identifier: str
    project: str
    hashes: frozenset[str] | None


def listed_environment(project: str, env: Any) -> ListedEnvironment | None:
    """An ``/admin/environments`` item (``{"id", "identifier", "project", "apiKeys": {"apiKeys": [..]}}``), or None
    if it has no identifier. ``project`` is the project it was listed under (the item's own field if that is
    empty)."""
    if not isinstance(env, dict) or not isinstance(env.get("identifier"), str) or not env["identifier"]:
        return None
    env_id, own_project = (v if isinstance(v, str) else "" for v in (env.get("id"), env.get("project")))
    keys = env.get("apiKeys")
    hashes: frozenset[str] | None
    if isinstance(keys, list):  # a bare array: tolerated
        hashes = key_hashes(keys)
    elif isinstance(keys, dict):
        listed = keys.get("apiKeys")
        listed = listed if isinstance(listed, list) else []
        hashes = key_hashes(listed)
        count = keys.get("itemCount")
        if isinstance(count, int) and not isinstance(count, bool) and count > len(listed):
            hashes = None  # more keys than embedded
    else:
        hashes = frozenset()
    return ListedEnvironment(env_id, env["identifier"], project or own_project, hashes)


def find_environment(envs: Sequence[ListedEnvironment], claims: Mapping[str, Any]) -> ListedEnvironment | None:
    """The listed environment of an SDK token's claims: by UUID (``environment``) where the listing gives one, else
    by ``projectIdentifier`` + ``environmentIdentifier``."""
    env_id = claims.get("environment")
    project, identifier = claims.get("projectIdentifier"), claims.get("environmentIdentifier")
    for env in envs:
        if env.id:
            if env.id == env_id:
                return env
        elif identifier and env.identifier == identifier and env.project == project:
            return env
    return None


# ---------------------------------------------------------------------------------------------- HTTP


async def page_all(client: JSONCaller, url: str, query: Mapping[str, str], admin_token: str,
                   list_field: str) -> list[Any]:
    """Every item of an admin list: pages 0, 1, ... of ``PAGE_SIZE`` until ``pageNumber >= pageCount - 1`` or an
    empty page (a short page is not the end: the server may cap the size below what was asked)."""
    out: list[Any] = []
    page = 0
    while True:
        q = {**query, "pageNumber": str(page), "pageSize": str(PAGE_SIZE)}
        body = await client.call("GET", f"{url}?{urlencode(q)}", {"x-api-key": admin_token})
        items, count = admin_page(body, list_field)
        out.extend(items)
        if not items or (count is not None and page >= count - 1):
            return out
        page += 1
        if page >= MAX_PAGES:
            raise StreamError(INVALID_DATA, f"admin {list_field}: too many pages")


class AdminDirectory:
    """The projects/environments pass shared by every configured key (module docstring)."""

    def __init__(self, config: HarnessConfig, client: JSONCaller, clock: IReactorTime, *,
                 max_age: float = 60.0) -> None:
        self.config = config
        self.client = client
        self.clock = clock
        self.max_age = max_age
        self.passes = 0  # started passes, for logs and tests
        self._result: list[ListedEnvironment] | None = None  # None also when there is no projects listing
        self._at: float | None = None
        self._running: Deferred[Any] | None = None
        self._waiters: list[Deferred[list[ListedEnvironment] | None]] = []

    def environments(self) -> Deferred[list[ListedEnvironment] | None]:
        """Every listed environment; None when the admin API has no projects listing (404). Joins a pass in flight,
        reuses one finished less than ``max_age`` ago, else starts one. A failed pass (StreamError) is not kept."""
        if self._running is None and self._at is not None and self.clock.seconds() - self._at < self.max_age:
            return succeed(self._result)
        d: Deferred[list[ListedEnvironment] | None] = Deferred(lambda d: self._forget(d))
        self._waiters.append(d)
        if self._running is None:
            self.passes += 1
            running: Deferred[Any] = Deferred.fromCoroutine(self._pass())
            self._running = running
            running.addBoth(self._done)
        return d

    async def hashes_for(self, claims: Mapping[str, Any]) -> frozenset[str] | None:
        """The hashed SDK keys of the environment of these token claims, or None if the listing cannot tell (no
        projects listing, environment not listed, or only part of its keys embedded)."""
        envs = await self.environments()
        found = find_environment(envs, claims) if envs is not None else None
        return found.hashes if found is not None else None

    def _forget(self, d: Deferred[Any]) -> None:
        if d in self._waiters:
            self._waiters.remove(d)

    async def _pass(self) -> list[ListedEnvironment] | None:
        base = self.config.admin_url
        account = {"accountIdentifier": self.config.account, "orgIdentifier": self.config.org}
        try:
            projects = await page_all(self.client, f"{base}/admin/projects", account, self.config.admin_token,
                                      "projects")
        except StreamError as e:
            if e.status == 404:
                return None
            raise
        out: list[ListedEnvironment] = []
        seen: set[str] = set()
        for project in projects:
            ident = project.get("identifier") if isinstance(project, dict) else None
            if not isinstance(ident, str) or not ident or ident in seen:
                continue
            seen.add(ident)
            envs = await page_all(self.client, f"{base}/admin/environments",
                                  {**account, "projectIdentifier": ident}, self.config.admin_token, "environments")
            for env in envs:
                entry = listed_environment(ident, env)
                if entry is not None:
                    out.append(entry)
        return out

    def _done(self, result: Any) -> None:
        self._running = None
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure):
            for d in waiters:
                if not d.called:
                    d.errback(result)
            return  # not kept: the next caller tries again
        self._at = self.clock.seconds()
        self._result = result
        for d in waiters:
            if not d.called:
                d.callback(result)
