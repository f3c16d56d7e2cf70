"""Regional hub sites at the root: site tokens, relayed device requests, each site's sync and backlog.

Public API::

    SiteRegistry(store, clock=None)
        .add(name) -> str                 a new site token (shown once; stored as its sha256)
        .remove(name) -> bool
        .site(authorization) -> str | None      the site a ``Bearer`` token authenticates
        .record(name, status, current_timestamp) the site's report (last sync, backlog, served version)
        .rows(current_timestamp, max_age_s, desired=None) -> list[dict]   age, in-sync flag (the site's
                                          claim checked against the device reports it relayed), breach
    current_desired(repo) -> {channel: (serial, issued)}    what the root releases now
    behind_devices(store, desired) -> {site: {device: channel}}   device-signed evidence against a site
    relay_target(headers, url, registry) -> Relay | None    how to verify a device request a site forwards
    current_timestamp(repo_dir) -> int | None       the timestamp version the root serves now
    site_routes(repo_dir, store=None, clock=None) -> list[Route]
        POST /v1/sites/{name}/status     (site token) the site's sync state and backlog
        GET  /v1/sites/roster            (site token) enrolled device keys and revocations
    RELAY_URI_HEADER, RELAY_WINDOW_S, DEFAULT_MAX_SYNC_AGE_S

A regional hub forwards a device's request unchanged (the device's RFC 9421 signature, Content-Digest,
nonce and ``created``) and adds ``Authorization: Bearer <site token>`` and ``X-Sre-Relay-Uri`` (the URI the
device signed, at the regional hub). The root then verifies the device signature over that URI; the
path and query must be the root request's own. ``created`` may be up to :data:`RELAY_WINDOW_S` old (a
site's uplink can be down for days) but never ahead of the root clock by more than the normal window.
The nonce of a relayed request is not checked against the replay cache: a re-forward after the regional
hub crashed must be a no-op, not a refusal. Replays are harmless instead, by the idempotency of every
relayed kind: batches by their content-derived id, reports and attestations newest-wins by the device's
signed time. A request without a valid site token gets the normal 300 s window and nonce check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, select, update
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hub.store import HubStore, open_store, store_config
from hub.store._schema import devices, sites
from hub.store._schema import reports as reports_t
from sre_core.clock import Clock, SystemClock
from sre_core.errors import InputError
from sre_core.signing import NonceCache, SignatureRefused

__all__ = [
    "DEFAULT_MAX_SYNC_AGE_S",
    "RELAYED_BY",
    "RELAY_URI_HEADER",
    "RELAY_WINDOW_S",
    "SYNC_SKEW_S",
    "Relay",
    "SiteRegistry",
    "behind_devices",
    "current_desired",
    "current_timestamp",
    "relay_fresh",
    "relay_target",
    "site_routes",
]

RELAY_URI_HEADER = "x-sre-relay-uri"
RELAY_WINDOW_S = 30 * 24 * 3600.0
DEFAULT_MAX_SYNC_AGE_S = 3600.0
MAX_STATUS_BYTES = 16 * 1024
SYNC_SKEW_S = 300.0
"""Clock skew allowed between a device's signed ``last_sync`` and the root's signed ``issued``."""
RELAYED_BY = "relayed_by"
"""The key the root adds to a stored device report it received through a site (the site's name)."""


def _valid_name(name: str) -> bool:
    return bool(name) and len(name) <= 64 and all(c.isalnum() or c in "._-" for c in name)


class SiteRegistry:
    """Sites in the hub store (table ``sites``): hashed tokens and the last status each reported."""

    def __init__(self, store: HubStore, clock: Clock | None = None) -> None:
        self.store = store
        self.clock = clock or SystemClock()

    def add(self, name: str) -> str:
        """A new token for site ``name`` (replaces its previous token).

        Raises:
            InputError: the name is not letters, digits, ``. _ -`` (64 at most).
        """
        if not _valid_name(name):
            raise InputError(f"add site {name!r}", "names are letters, digits, . _ - (64 at most)")
        token = "sre_site_" + secrets.token_urlsafe(32)
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock.now().isoformat()
        with self.store.tx() as conn:
            conn.execute(
                self.store.insert(sites)
                .values(name=name, sha256=digest, added_at=now)
                .on_conflict_do_update(index_elements=["name"], set_={"sha256": digest})
            )
        return token

    def remove(self, name: str) -> bool:
        with self.store.tx() as conn:
            return bool(conn.execute(delete(sites).where(sites.c.name == name)).rowcount)

    def site(self, authorization: str | None) -> str | None:
        """The site a ``Bearer`` token authenticates (constant-time comparison), or None."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        digest = hashlib.sha256(authorization[7:].strip().encode()).hexdigest()
        with self.store.tx() as conn:
            rows = conn.execute(select(sites.c.name, sites.c.sha256)).all()
        found = None
        for name, stored in rows:
            if hmac.compare_digest(str(stored), digest):
                found = str(name)
        return found

    def record(self, name: str, status: dict[str, Any], current_timestamp: int | None) -> bool:
        """Store a site's report. Its sync counts as current (``last_sync`` = now, root clock) when the
        timestamp version it serves is the root's current one."""
        now = self.clock.now().isoformat()
        values: dict[str, Any] = {"last_seen": now, "status": json.dumps(status, sort_keys=True)}
        if current_timestamp is not None and status.get("timestamp_version") == current_timestamp:
            values["last_sync"] = now
        with self.store.tx() as conn:
            return bool(conn.execute(update(sites).where(sites.c.name == name).values(**values)).rowcount)

    def rows(
        self,
        current_timestamp: int | None,
        max_age_s: float = DEFAULT_MAX_SYNC_AGE_S,
        desired: Mapping[str, tuple[int, datetime]] | None = None,
    ) -> list[dict[str, Any]]:
        """One row per site: last sync and its age (root clock), backlog, in-sync flag, drift-SLO breach.

        The site's own claim (the timestamp version it serves) is checked against evidence it cannot
        forge: the device-signed reports it relayed (see :func:`behind_devices`). With ``desired``
        (channel -> current desired-state serial and its signed issue time, :func:`current_desired`),
        a site whose devices synced through it after the current serial was issued and still hold an
        older one is out of sync whatever it claims, and breaches the drift SLO once that serial is
        older than ``max_age_s``."""
        now = self.clock.now()
        with self.store.tx() as conn:
            found = conn.execute(select(sites).order_by(sites.c.name)).all()
        behind = behind_devices(self.store, desired) if desired else {}
        out = []
        for r in found:
            status: dict[str, Any] = json.loads(r.status) if r.status else {}
            age = (now - datetime.fromisoformat(r.last_sync)).total_seconds() if r.last_sync else None
            claimed = current_timestamp is not None and status.get("timestamp_version") == current_timestamp
            evidence = behind.get(str(r.name), {})
            issued = [desired[ch][1] for ch in evidence.values()] if desired else []
            overdue = any((now - t).total_seconds() > max_age_s for t in issued)
            out.append(
                {
                    "site": r.name,
                    "last_sync": r.last_sync,
                    "sync_age_s": None if age is None else round(age, 1),
                    "in_sync": bool(claimed) and not evidence,
                    "claimed_in_sync": bool(claimed),
                    "devices_behind": sorted(evidence),
                    "breach": age is None or age > max_age_s or overdue,
                    "backlog": status.get("backlog"),
                    "timestamp_version": status.get("timestamp_version"),
                    "last_seen": r.last_seen,
                    "root_unreachable_since": status.get("root_unreachable_since"),
                }
            )
        return out


def current_desired(repo: Any) -> dict[str, tuple[int, datetime]]:
    """channel -> (serial, issued) of the desired state ``repo`` (a HubRepository) releases now."""
    out: dict[str, tuple[int, datetime]] = {}
    for ch in repo.channels:
        try:
            ds = repo.desired_state(ch)
        except (OSError, ValueError, KeyError):
            continue
        if ds is not None:
            out[ch] = (int(ds.serial), ds.issued)
    return out


def behind_devices(
    store: HubStore, desired: Mapping[str, tuple[int, datetime]], skew_s: float = SYNC_SKEW_S
) -> dict[str, dict[str, str]]:
    """site -> {device -> channel} of devices whose newest report, relayed by that site, contradicts it.

    The evidence is the device's signed report (never the site's word): the device synced (its signed
    ``last_sync``) more than ``skew_s`` after the channel's current desired state was issued (its
    signed ``issued``), through that site, and holds an older serial. An honest site in sync serves the
    current serial to every device that syncs; one that is behind or serves a frozen repository does
    not. Reports sent directly to the root carry no site and never count against one."""
    with store.tx() as conn:
        rows = conn.execute(select(reports_t.c.device_id, reports_t.c.body)).all()
    out: dict[str, dict[str, str]] = {}
    for dev, body in rows:
        try:
            rep = json.loads(body)
            site, channel = rep.get(RELAYED_BY), rep.get("channel")
            if not isinstance(site, str) or channel not in desired:
                continue
            serial, issued = desired[channel]
            held = rep.get("serial")
            synced = datetime.fromisoformat(str(rep.get("last_sync")))
        except (ValueError, TypeError, AttributeError):
            continue
        if isinstance(held, int) and held < serial and (synced - issued).total_seconds() > skew_s:
            out.setdefault(site, {})[str(dev)] = str(channel)
    return out


class _RelayNonces(NonceCache):
    """The nonce cache a relayed request is verified with: a long window, no nonce memory (see the
    module docstring: relayed kinds are idempotent instead)."""

    def check_and_add(self, key_id: str, nonce: str, created: int, now: float) -> bool:
        return bool(nonce) and len(nonce) <= 128


@dataclass(frozen=True)
class Relay:
    """A device request forwarded by an authenticated site: verify it over ``uri`` with ``nonces``."""

    site: str
    uri: str
    nonces: NonceCache


def relay_target(
    headers: Iterable[tuple[str, str]] | Any,
    url: str,
    registry: SiteRegistry,
    window_s: float = RELAY_WINDOW_S,
) -> Relay | None:
    """How to verify a request: None when it is not relayed (verify it as sent).

    Raises:
        SignatureRefused: ``site-unauthorized`` (a relay header without a valid site token) or
            ``forged`` (the relayed URI names another path or query).
    """
    get = headers.get if hasattr(headers, "get") else dict(headers).get
    uri = get(RELAY_URI_HEADER)
    if uri is None:
        return None
    site = registry.site(get("authorization"))
    if site is None:
        raise SignatureRefused(
            "site-unauthorized", "a relayed request needs Authorization: Bearer <site token>"
        )
    mine, theirs = urlsplit(url), urlsplit(str(uri))
    if theirs.scheme not in ("http", "https") or (theirs.path, theirs.query) != (mine.path, mine.query):
        raise SignatureRefused("forged", f"{RELAY_URI_HEADER} must name this request's path and query")
    return Relay(site, str(uri), _RelayNonces(window_s))


def relay_fresh(created: int, now: float, window_s: float) -> None:
    """A relayed request may be old, never ahead of the root clock by more than the normal window.

    Raises:
        SignatureRefused: ``stale`` when ``created`` lies in the future beyond ``window_s``.
    """
    if created > now + window_s:
        raise SignatureRefused("stale", f"created {created} is {created - now:+.0f} s ahead of the hub clock")


def current_timestamp(repo_dir: Path) -> int | None:
    """The version of the timestamp the hub at ``repo_dir`` serves now (None when unreadable)."""
    return _current_timestamp(repo_dir)


def _current_timestamp(repo_dir: Path) -> int | None:
    try:
        ts = json.loads((repo_dir / "metadata" / "timestamp.json").read_bytes())
        return int(ts["signed"]["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def site_routes(repo_dir: Path, store: HubStore | None = None, clock: Clock | None = None) -> list[Route]:
    """The root's routes for regional hubs (site token): status reports and the device roster."""
    repo_dir = Path(repo_dir)
    store = store or open_store(store_config(repo_dir).database_url)
    registry = SiteRegistry(store, clock)

    def _unauthorized() -> JSONResponse:
        return JSONResponse(
            {"refused": "unauthorized", "detail": "send Authorization: Bearer <site token>"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="sre-hub-sites"'},
        )

    async def status(request: Request) -> JSONResponse:
        site = await run_in_threadpool(registry.site, request.headers.get("authorization"))
        if site is None:
            return _unauthorized()
        if site != request.path_params["name"]:
            return JSONResponse({"refused": "another site's status"}, status_code=403)
        body = await request.body()
        if len(body) > MAX_STATUS_BYTES:
            return JSONResponse({"error": "status too large"}, status_code=413)
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return JSONResponse({"error": "the status is not a JSON object"}, status_code=400)
        keep = {k: doc[k] for k in ("timestamp_version", "backlog", "last_sync", "root_unreachable_since",
                                     "forwarded", "refused", "devices") if k in doc}  # fmt: skip
        current = _current_timestamp(repo_dir)
        await run_in_threadpool(registry.record, site, keep, current)
        return JSONResponse({"status": "recorded", "current_timestamp": current})

    async def roster(request: Request) -> JSONResponse:
        site = await run_in_threadpool(registry.site, request.headers.get("authorization"))
        if site is None:
            return _unauthorized()

        def read() -> dict[str, Any]:
            # device keys only: no root credential (operator token hashes) ever goes to a site
            with store.tx() as conn:
                devs = conn.execute(select(devices)).all()
            return {
                "devices": [
                    {"device_id": d.device_id, "key_pem": d.key_pem, "revoked_at": d.revoked_at} for d in devs
                ]
            }

        return JSONResponse(await run_in_threadpool(read))

    return [
        Route("/v1/sites/roster", roster, methods=["GET"]),
        Route("/v1/sites/{name}/status", status, methods=["POST"]),
    ]
