"""Pulling signed modules: refresh TUF metadata, fetch the channel's desired state and its artifacts.

Public API::

    Puller(paths, source, channel, clock=None, policy=None, fetch_config=None, audit=None, progress=None,
           telemetry=None, metadata_url=None, targets_url=None, fallbacks=(), transport=None,
           sticky_s=900)   metrics pull.seconds/bytes/requests/resumes/restarts; events
           pull.refused/failed. metadata_url/targets_url: a CDN or mirror of the signed files (used when
           ``source`` is a hub URL; a bundle directory ignores them). fallbacks: more hubs or mirrors,
           tried in order after ``source`` (see :mod:`deployment.sources` for order and deadline shares)
        .pull() -> PullResult              raises PullError (with .held, the last verified state)
        .pull_or_held() -> PullResult      never raises PullError: the held state with ``refused`` set
    load_held(paths, clock, verify=False) -> PullResult    offline: what the device holds and trusts
    recover_trusted_time(paths, clock, audit, tolerance, telemetry=None) -> dict | None   drop a
        poisoned ``clock.json`` mark (audited ``trusted_time.discarded``); run by every pull and by the
        reconcile loop at start, so every command that pulls recovers the same way
    PullError(SreError): .refused (a security check failed) / transfer failure, .held (a PullResult)
    ProgressFactory = Callable[[str, int], Callable[[int], None]]   (target name, total) -> advance(n)

Flow (``pull``): trusted now = max(system clock, newest signed time) -> python-tuf ``Updater.refresh``
with that reference time (root -> timestamp -> snapshot -> targets: signatures, thresholds, expiry,
rollback and freeze protection; a timestamp whose signing time lies beyond the device clock plus
``max_signed_time_ahead_s`` is refused before it is persisted) -> ``<channel>/desired-state.json``
through the channel's delegated role -> the pure verifier
(:func:`deployment.desired_verifier.verify_desired_state`: channel, serial never goes back, bounded
signing time) -> per module: a safe target
path, a signed target with a manifest that names the module and version, optional cosign/DSSE second
signatures against keys pinned in the trust policy (checked against the signed digest before any byte
is downloaded), a resumable download into ``<state>/cas/partial`` capped at the signed length, then
length + sha256 verification and an atomic rename into the CAS. Only when everything verified is the
held record (``<state>/trust/held.json``) replaced, atomically. Every refusal writes an audit record.

Every read has a wall-clock deadline (metadata: ``metadata_deadline_s``; artifacts: from their length
and ``min_rate_bytes_s``) and the whole pull has ``pull_deadline_s``: a mirror that trickles a byte a
second ends the pull as *offline*, so expiry and safe mode still happen on time.

Several sources (a regional hub, the root hub, mirrors): the metadata walk (refresh through the
desired state) runs against one source at a time; a source that cannot be reached, or whose bytes fail
any check, is audited with its URL (``pull.source_offline`` / ``pull.refused``) and the next is tried
with a fresh updater over the same trusted metadata (what a bad source sent was never persisted).
Artifacts come from the source that served the metadata, falling back to the others on a transfer
failure or bytes that do not match the signed length and digest. The pull is refused only when no
source succeeded and one of them was refused; offline when none could be reached. The source of the
last successful pull is tried first while ``sticky_s`` has not passed.

Offline (the hub cannot be reached): keep what is held and say so; python-tuf has no offline mode, so
the trust status of held state is our logic: fresh while the held timestamp metadata is unexpired by
trusted time, stale after, expired once the desired state's own expiry passed (the reconcile loop turns
that into safe mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError
from tuf.api import exceptions
from tuf.api.metadata import Metadata, TargetFile, Timestamp
from tuf.ngclient import Updater, UpdaterConfig

from deployment.artifacts import PullResult, TrustStatus, VerifiedArtifact
from deployment.cas import ContentStore, HashMismatchError
from deployment.desired_verifier import (
    DesiredStateError,
    FutureIssuedError,
    HeldFacts,
    verify_desired_state,
)
from deployment.fetcher import DirectoryFetcher, FetchConfig, HttpFetcher, make_fetcher
from deployment.manifest import DesiredState, ModuleManifest, manifest_from_custom
from deployment.rollout import effective_desired
from deployment.signatures import SignatureError, cosign_verify, verify_attestation
from deployment.sources import Source, SourceMemory, order_sources, share_s, sources_for
from deployment.trusted_time import FutureSignedTimeError, TrustedTime
from deployment.tuf_adapter import DurableUpdater, set_reference_time
from policies.trust import TrustPolicy, load_trust_policy
from sre_core.atomic import atomic_write_bytes, atomic_write_json
from sre_core.audit import AuditLog
from sre_core.clock import Clock, SystemClock
from sre_core.errors import SreError
from sre_core.paths import StatePaths
from sre_core.telemetry import NullSink, TelemetrySink

__all__ = [
    "DESIRED_STATE",
    "ISSUED_FIELD",
    "ProgressFactory",
    "PullError",
    "Puller",
    "load_held",
    "recover_trusted_time",
    "safe_target",
]

DESIRED_STATE = "desired-state.json"
ISSUED_FIELD = "x-sre-issued"  # the hub's signing time inside timestamp metadata
ProgressFactory = Callable[[str, int], Callable[[int], None]]
_MAX_SIG_BYTES = 64 * 1024


class PullError(SreError):
    """A pull did not complete. ``refused``: a trust check failed (bad data); otherwise a transfer
    failure (run pull again to resume). ``held`` is what the device still holds and enforces."""

    def __init__(self, what: str, why: str, fix: str, held: PullResult, refused: bool = True) -> None:
        super().__init__(what, why, fix)
        self.held = held
        self.refused = refused


def safe_target(path: str, channel: str) -> bool:
    """``<channel>/<plain name>``: no ``..``, no absolute path, no backslash, one level deep."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return False
    parts = path.split("/")
    if len(parts) != 2 or parts[0] != channel or parts[1] in {"", ".", ".."} or parts[1].startswith("."):
        return False
    return all(c.isalnum() or c in "._+-" for c in parts[1])


def _held_path(paths: StatePaths) -> Path:
    return paths.trust / "held.json"


def _read_held(paths: StatePaths) -> dict[str, Any] | None:
    p = _held_path(paths)
    if not p.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(p.read_text())
        DesiredState.model_validate(data["desired"])
    except (OSError, ValueError, KeyError, TypeError):
        # Written atomically, so this is tampering or disk damage: keep the evidence aside and hold
        # nothing (safe mode) until the next verified pull.
        p.replace(p.with_name("held.json.corrupt"))
        return None
    return data


def recover_trusted_time(
    paths: StatePaths,
    clock: Clock,
    audit: AuditLog,
    tolerance: timedelta,
    telemetry: TelemetrySink | None = None,
) -> dict[str, str] | None:
    """Replace a trusted time poisoned before signed times were bounded, or keep it. Returns what changed.

    The one recovery path (:meth:`TrustedTime.discard_unbacked`, conditions in
    :func:`deployment.trusted_time.unbacked_mark`): :meth:`Puller.pull` runs it before every pull and
    the reconcile loop at start (pulling or not), so ``sre-agent pull`` alone recovers as the daemon
    does. The held desired states that may vouch for the mark are the verified one in ``held.json`` and
    the one the last reconcile pass enforced; the later issue time and the later expiry of the two
    count, so either one keeps the mark. Audited ``trusted_time.discarded``; an unreadable
    ``clock.json`` is audited ``trusted_time.check_failed`` and left for the pull to report.
    """
    from deployment.reconcile import read_last_reconcile

    held: list[DesiredState] = []
    try:
        record = _read_held(paths)
        if record is not None:
            held.append(DesiredState.model_validate(record["desired"]))
        enforced = read_last_reconcile(paths).get("desired")
        if enforced:
            held.append(DesiredState.model_validate(enforced))
        trusted = TrustedTime(paths.clock_file, clock)
    except (SreError, ValueError) as exc:
        audit.append("trusted_time.check_failed", why=str(exc)[:300])
        return None
    issued = max((d.issued for d in held), default=None)
    expires = max((d.expires for d in held), default=None)
    done = trusted.discard_unbacked(tolerance, issued, expires)
    if done is not None:
        audit.append("trusted_time.discarded", **done)
        if telemetry is not None:
            telemetry.event("deployment", f"trusted time reset: {done['why']}"[:300], severity="warning")
    return done


def _artifacts_from(
    held: dict[str, Any], store: ContentStore, verify: bool
) -> tuple[dict[str, VerifiedArtifact], list[str]]:
    from deployment.cas import hash_file

    arts: dict[str, VerifiedArtifact] = {}
    notes: list[str] = []
    for module, a in held.get("artifacts", {}).items():
        path = store.get(a["sha256"], int(a["length"]))
        if path is None:
            notes.append(f"{module} {a['version']}: artifact missing from the cache; pull again")
            continue
        if verify and hash_file(path) != (int(a["length"]), a["sha256"]):
            notes.append(f"{module} {a['version']}: cached artifact does not match its digest; pull again")
            continue
        arts[module] = VerifiedArtifact(
            module=module,
            version=a["version"],
            target=a["target"],
            path=path,
            sha256=a["sha256"],
            length=int(a["length"]),
            manifest=ModuleManifest.model_validate(a["manifest"]),
        )
    return arts, notes


def load_held(paths: StatePaths, clock: Clock | None = None, verify: bool = False) -> PullResult:
    """What the device holds: the last verified desired state and artifacts, with their trust status.

    Args:
        verify: re-hash every cached artifact (slow for big files; default checks presence + length).
    """
    clock = clock or SystemClock()
    trusted = TrustedTime(paths.clock_file, clock)
    now = trusted.checkpoint()
    held = _read_held(paths)
    messages = []
    if trusted.clock_behind():
        messages.append(f"system clock is behind the newest signed time; trusted time is {now.isoformat()}")
    if held is None:
        return PullResult(
            TrustStatus.NONE, online=False, trusted_now=now, messages=[*messages, "no desired state held"]
        )
    desired = effective_desired(paths, DesiredState.model_validate(held["desired"]))
    arts, notes = _artifacts_from(held, ContentStore(paths.cas), verify)
    ts_expires = datetime.fromisoformat(held["timestamp_expires"])
    if desired.is_expired(now):
        trust = TrustStatus.EXPIRED
        messages.append(f"desired state serial {desired.serial} expired at {desired.expires.isoformat()}")
    elif now < ts_expires:
        trust = TrustStatus.FRESH
    else:
        trust = TrustStatus.STALE
        messages.append(
            f"metadata last refreshed {held['refreshed_at']}; enforcing held serial {desired.serial}"
        )
    return PullResult(
        trust, online=False, trusted_now=now, desired=desired, artifacts=arts, messages=messages + notes
    )


class _SourceOffline(Exception):  # noqa: N818 (an outcome, not a crash)
    """One source could not be reached (the message says how); the next one is tried."""


class _FutureTimestampError(exceptions.RepositoryError):
    """A verified timestamp's signing time is beyond the admissible bound (refused before persisting)."""


def signing_time(timestamp_bytes: bytes) -> datetime | None:
    """The hub's signing time (``x-sre-issued``) in timestamp metadata bytes (None when absent)."""
    ts = Metadata[Timestamp].from_bytes(timestamp_bytes).signed
    issued = ts.unrecognized_fields.get(ISSUED_FIELD)
    if not isinstance(issued, str):
        return None
    try:
        when = datetime.fromisoformat(issued)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


@contextlib.contextmanager
def _pull_lock(paths: StatePaths) -> Iterator[None]:
    paths.run.mkdir(parents=True, exist_ok=True)
    with (paths.run / "pull.lock").open("a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise SreError("pull", "another pull is running on this state directory", "wait for it") from exc
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class Puller:
    """One pull from a hub URL or a bundle directory into a device state directory."""

    def __init__(
        self,
        paths: StatePaths,
        source: str,
        channel: str,
        clock: Clock | None = None,
        policy: TrustPolicy | None = None,
        fetch_config: FetchConfig | None = None,
        audit: AuditLog | None = None,
        progress: ProgressFactory | None = None,
        telemetry: TelemetrySink | None = None,
        metadata_url: str | None = None,
        targets_url: str | None = None,
        fallbacks: Sequence[str] = (),
        transport: httpx.BaseTransport | None = None,
        sticky_s: float = 900.0,
    ) -> None:
        self.paths = paths
        self.source = source
        self.sources: list[Source] = sources_for(source, fallbacks, metadata_url, targets_url)
        self.transport = transport
        self.sticky_s = sticky_s
        self._at = source  # the source being tried (audit records name it)
        self._targets_order: list[Source] = self.sources[:1]
        # A CDN or mirror for the signed files (TUF verifies them wherever they come from); a bundle
        # directory (an operator's `--from DIR`) is read as it is.
        remote = source.startswith(("http://", "https://"))
        self.metadata_url = metadata_url if remote else None
        self.targets_url = targets_url if remote else None
        self.channel = channel
        self.clock = clock or SystemClock()
        self.policy = policy or load_trust_policy(paths.policies)
        self.fetch_config = fetch_config or FetchConfig(
            connect_timeout_s=self.policy.connect_timeout_s,
            read_timeout_s=self.policy.read_timeout_s,
            max_stalled_attempts=self.policy.max_stalled_attempts,
            metadata_deadline_s=self.policy.metadata_deadline_s,
            min_rate_bytes_s=self.policy.min_rate_bytes_s,
            pull_deadline_s=self.policy.pull_deadline_s,
        )
        self.tolerance = timedelta(seconds=self.policy.max_signed_time_ahead_s)
        self.audit = audit or AuditLog(paths.audit_log, self.clock)
        self.progress = progress
        self.telemetry: TelemetrySink = telemetry or NullSink()
        self.store = ContentStore(paths.cas)
        self.stats: dict[str, int] = {"requests": 0, "bytes": 0, "resumes": 0, "restarts": 0}
        self._fetchers: dict[str, HttpFetcher | DirectoryFetcher] = {}
        self._deadline = 0.0
        self._anchor = ""

    # ----- outcomes ------------------------------------------------------------------------------
    def _refuse(
        self, what: str, why: str, fix: str, refused: bool = True, event: str | None = None
    ) -> PullError:
        self.audit.append(
            event or ("pull.refused" if refused else "pull.failed"),
            source=self._at,
            channel=self.channel,
            what=what,
            why=why,
        )
        return PullError(what, why, fix, load_held(self.paths, self.clock), refused)

    def _offline(self, reason: str) -> PullResult:
        held = load_held(self.paths, self.clock)
        trust = held.trust if held.trust in (TrustStatus.EXPIRED, TrustStatus.NONE) else TrustStatus.STALE
        msg = f"offline: {reason}; keeping what is held"
        if held.desired is not None:
            msg += f" (desired state serial {held.desired.serial}, trust {trust})"
        extra: dict[str, Any] = {"sources": [s.name for s in self.sources]} if len(self.sources) > 1 else {}
        self.audit.append(
            "pull.offline", source=self.source, channel=self.channel, reason=reason, trust=str(trust), **extra
        )
        return PullResult(
            trust,
            online=False,
            trusted_now=held.trusted_now,
            desired=held.desired,
            artifacts=held.artifacts,
            messages=[msg, *held.messages],
        )

    # ----- the pull ------------------------------------------------------------------------------
    def pull_or_held(self) -> PullResult:
        """:meth:`pull`, but a refused or failed pull returns the held state with ``refused`` set
        (already audited), so a reconcile pass keeps enforcing it and reports the refusal."""
        try:
            return self.pull()
        except PullError as exc:
            kind = "refused" if exc.refused else "failed"
            return dataclasses.replace(exc.held, refused=f"pull {kind}: {exc.message}")

    def _held_timestamp(self, url: str) -> bytes | None:
        """The trusted ``timestamp.json`` (for a conditional poll); other metadata is versioned."""
        if not url.endswith("/timestamp.json"):
            return None
        try:
            return (self.paths.tuf / "timestamp.json").read_bytes()
        except OSError:
            return None

    def pull(self) -> PullResult:
        """Refresh, fetch and verify. Returns the new state, or the held one when offline.

        Raises:
            PullError: a trust check failed (``refused``) or a download could not finish.
            SreError: the device is not provisioned with a trust anchor.
        """
        if not self.paths.root_json.is_file():
            raise SreError(
                "pull",
                f"no trust anchor at {self.paths.root_json}",
                "provision the device: sre-agent init --state DIR --root root.json --hub URL --channel C",
            )
        with _pull_lock(self.paths):
            recover_trusted_time(self.paths, self.clock, self.audit, self.tolerance, self.telemetry)
            self.store.remove_stale()
            self._fetchers = {}
            started = self.clock.monotonic()
            self._deadline = started + self.fetch_config.pull_deadline_s
            outcome = "error"
            try:
                result = self._pull()
                outcome = str(result.trust) if result.online else "offline"
                return result
            except PullError as exc:
                outcome = "refused" if exc.refused else "failed"
                self.telemetry.event(
                    f"pull.{outcome}",
                    exc.message,
                    severity="error" if exc.refused else "warning",
                    attrs={"channel": self.channel, "source": self._at},
                )
                raise
            finally:
                for fetcher in self._fetchers.values():
                    self.stats["requests"] += fetcher.requests
                    fetcher.close()
                self._fetchers = {}
                labels = {"channel": self.channel, "outcome": outcome}
                self.telemetry.metric("pull.seconds", self.clock.monotonic() - started, labels)
                for key in ("bytes", "requests", "resumes", "restarts"):
                    self.telemetry.metric(f"pull.{key}", float(self.stats[key]), labels)

    def _admit(self, trusted: TrustedTime) -> Callable[[str, bytes], None]:
        """Refuse a verified timestamp signed beyond the bound *before* python-tuf persists it."""
        limit = trusted.bound(self.tolerance)

        def admit(filename: str, data: bytes) -> None:
            if filename != "timestamp.json":
                return
            when = signing_time(data)
            if when is not None and when > limit:
                raise _FutureTimestampError(
                    f"the timestamp was signed at {when.isoformat()}, beyond the device clock plus the "
                    f"tolerance ({limit.isoformat()}); it is not persisted and trusted time is unchanged"
                )

        return admit

    def _fetcher(self, src: Source, untried: int) -> HttpFetcher | DirectoryFetcher | None:
        """The fetcher for ``src``, its deadline set to this attempt's share of what is left of the pull
        (None when nothing is left)."""
        share = share_s(self._deadline - self.clock.monotonic(), untried)
        if share <= 0:
            return None
        fetcher = self._fetchers.get(src.name)
        if fetcher is None:
            config = dataclasses.replace(self.fetch_config, pull_deadline_s=share)
            fetcher = make_fetcher(src.name, config, self.clock, self._held_timestamp, self.transport)
            self._fetchers[src.name] = fetcher
        fetcher.pull_deadline = self.clock.monotonic() + share
        return fetcher

    def _updater(self, trusted: TrustedTime, src: Source, fetcher: HttpFetcher | DirectoryFetcher) -> Updater:
        meta_url = src.metadata_url
        self.paths.tuf.mkdir(parents=True, exist_ok=True)
        config = UpdaterConfig(targets_max_length=64 * 1024 * 1024, snapshot_max_length=16 * 1024 * 1024)
        updater: Updater | None = None
        admit = self._admit(trusted)
        pinned = self.paths.root_json.read_bytes()
        anchor = self.paths.tuf / "anchor.sha256"
        pinned_sha = hashlib.sha256(pinned).hexdigest()
        self._anchor = pinned_sha
        if not anchor.is_file() or anchor.read_text().strip() != pinned_sha:
            # A newly pinned trust anchor (re-provisioning) invalidates everything trusted under the old one.
            shutil.rmtree(self.paths.tuf, ignore_errors=True)
            self.paths.tuf.mkdir(parents=True)
            atomic_write_bytes(anchor, pinned_sha.encode())
        if (self.paths.tuf / "root.json").is_file():
            # The cached root may be newer than the pinned one (rotation); if it is unreadable, start again
            # from the pinned anchor and walk the root chain.
            with contextlib.suppress(exceptions.RepositoryError, OSError, ValueError):
                updater = DurableUpdater(str(self.paths.tuf), meta_url, fetcher, config, None, admit)
        if updater is None:
            try:
                updater = DurableUpdater(str(self.paths.tuf), meta_url, fetcher, config, pinned, admit)
            except exceptions.RepositoryError as exc:
                raise self._refuse(
                    f"load the pinned trust anchor {self.paths.root_json}",
                    str(exc),
                    "re-provision the trust anchor with sre-agent init --root",
                ) from exc
        # python-tuf checks expiry against its own datetime.now(); use trusted time instead so a clock
        # wound back cannot make expired metadata look valid (and tests can drive time).
        set_reference_time(updater, trusted.now())
        return updater

    def _tuf(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a python-tuf step, translating its errors into refusals or offline."""
        try:
            return fn()
        except exceptions.DownloadLengthMismatchError as exc:
            raise self._refuse(what, f"oversized metadata: {exc}", "report the hub operators") from exc
        except exceptions.DownloadError:
            raise
        except _FutureTimestampError as exc:
            raise self._refuse(
                what,
                str(exc),
                "nothing was installed; the hub's online timestamp key signed a time in the future (a wrong "
                "hub clock or a stolen key): the hub must re-sign with a correct clock or rotate the key; "
                "the device recovers on its own at the next good release",
                event="pull.future_time_refused",
            ) from exc
        except exceptions.RepositoryError as exc:
            raise self._refuse(what, f"{type(exc).__name__}: {exc}", _repository_advice(exc)) from exc

    def _metadata(
        self, src: Source, fetcher: HttpFetcher | DirectoryFetcher, trusted: TrustedTime, held: Any
    ) -> tuple[Updater, Timestamp, DesiredState | None, str]:
        """The metadata walk against one source: refresh, then the channel's desired state.

        Raises:
            _SourceOffline: the source could not be reached (or was too slow).
            PullError: its data failed a check (refused) or the desired state did not download.
        """
        updater = self._updater(trusted, src, fetcher)
        try:
            self._tuf(f"refresh signed metadata from {src.name}", updater.refresh)
        except exceptions.DownloadError as exc:
            raise _SourceOffline(f"cannot refresh metadata from {src.name} ({exc})") from exc
        ts_bytes = (self.paths.tuf / "timestamp.json").read_bytes()
        ts = Metadata[Timestamp].from_bytes(ts_bytes).signed
        issued = signing_time(ts_bytes)
        if issued is not None:
            try:
                trusted.admit(issued, "timestamp", self.tolerance)
            except FutureSignedTimeError as exc:  # cached before this bound existed: refuse it too
                raise self._refuse(exc.what, exc.why, exc.fix, event="pull.future_time_refused") from exc
        ds_target = f"{self.channel}/{DESIRED_STATE}"
        try:
            info = self._tuf(f"look up {ds_target}", lambda: updater.get_targetinfo(ds_target))
        except exceptions.DownloadError as exc:
            raise _SourceOffline(f"cannot fetch {self.channel} metadata ({exc})") from exc
        if info is None:
            return updater, ts, None, ""
        desired, ds_sha = self._desired_state(info, held, trusted, [src])
        return updater, ts, desired, ds_sha

    def _pull(self) -> PullResult:
        trusted = TrustedTime(self.paths.clock_file, self.clock)
        trusted.checkpoint()
        held = _read_held(self.paths)
        several = len(self.sources) > 1
        memory = SourceMemory(self.paths.run / "pull_source.json")
        order = order_sources(
            self.sources, memory.last_good() if several else None, self.clock.now(), self.sticky_s
        )
        refusals: list[PullError] = []
        offline: list[str] = []
        found: tuple[Updater, Timestamp, DesiredState | None, str] | None = None
        good = order[0]
        for i, src in enumerate(order):
            self._at = src.name
            fetcher = self._fetcher(src, len(order) - i)
            if fetcher is None:
                offline.append(f"{src.name}: the pull deadline passed before it was tried")
                continue
            try:
                found = self._metadata(src, fetcher, trusted, held)
            except _SourceOffline as exc:
                offline.append(str(exc))
                if several:
                    self.audit.append(
                        "pull.source_offline", source=src.name, channel=self.channel, reason=str(exc)
                    )
                continue
            except PullError as exc:  # audited with this source's URL; the next source may serve good bytes
                refusals.append(exc)
                continue
            good = src
            break
        if found is None:
            self._at = self.source
            if refusals:
                first = refusals[0]
                if not several:
                    raise first
                why = f"{first.why} (no source served verified metadata; {len(order)} tried)"
                raise PullError(first.what, why, first.fix, first.held, first.refused) from first
            return self._offline("; ".join(offline))
        self._at = good.name
        self._targets_order = [good, *(s for s in order if s is not good)]
        updater, ts, desired, ds_sha = found
        if desired is None:
            self.audit.append("pull.empty", source=good.name, channel=self.channel)
            return PullResult(
                TrustStatus.NONE,
                online=True,
                trusted_now=trusted.now(),
                messages=[f"channel {self.channel} has no released desired state yet"],
            )
        now = trusted.now()
        artifacts: dict[str, VerifiedArtifact] = {}
        records: dict[str, Any] = {}
        effective = effective_desired(self.paths, desired)  # rollout membership + recalls (fleet)
        for module, dm in sorted(effective.modules.items()):
            art = self._artifact(updater, module, dm.version, dm.target)
            artifacts[module] = art
            records[module] = {
                "version": art.version,
                "target": art.target,
                "sha256": art.sha256,
                "length": art.length,
                "manifest": art.manifest.model_dump(mode="json"),
            }
        atomic_write_json(
            _held_path(self.paths),
            {
                "source": good.name,
                "channel": self.channel,
                "desired": desired.model_dump(mode="json"),
                "desired_sha256": ds_sha,
                "anchor": self._anchor,
                "serial": desired.serial,
                "refreshed_at": now.isoformat(),
                "timestamp_expires": ts.expires.isoformat(),
                "artifacts": records,
            },
        )
        expired = desired.is_expired(now)
        trust = TrustStatus.EXPIRED if expired else TrustStatus.FRESH
        messages = [f"desired state serial {desired.serial} verified ({len(artifacts)} modules)"]
        if expired:
            messages.append(
                f"the desired state expired at {desired.expires.isoformat()}: the hub must release again"
            )
        if several:
            memory.remember(good.name, self.clock.now())
            if good is not order[0] or refusals or offline:
                messages.append(f"pulled from {good.name} ({len(refusals) + len(offline)} sources skipped)")
        self.audit.append(
            "pull.verified",
            source=good.name,
            channel=self.channel,
            serial=desired.serial,
            trust=str(trust),
            modules={m: {"version": a.version, "sha256": a.sha256} for m, a in artifacts.items()},
        )
        return PullResult(
            trust, online=True, trusted_now=now, desired=effective, artifacts=artifacts, messages=messages
        )

    # ----- desired state ------------------------------------------------------------------------
    def _desired_state(
        self, info: TargetFile, held: dict[str, Any] | None, trusted: TrustedTime, sources: list[Source]
    ) -> tuple[DesiredState, str]:
        path = self._download(info, self.policy.max_desired_state_bytes, sources)
        sha = info.hashes["sha256"]
        try:
            desired = verify_desired_state(
                path.read_bytes(),
                sha,
                self.channel,
                self._anchor,
                HeldFacts.from_record(held),
                trusted.bound(self.tolerance),
            )
        except DesiredStateError as exc:
            future = isinstance(exc, FutureIssuedError)
            raise self._refuse(
                exc.what, exc.why, exc.fix, event="pull.future_time_refused" if future else None
            ) from exc
        try:
            trusted.admit(desired.issued, "desired-state", self.tolerance)
        except FutureSignedTimeError as exc:  # the bound moved on between the two checks: refuse
            raise self._refuse(exc.what, exc.why, exc.fix, event="pull.future_time_refused") from exc
        return desired, sha

    # ----- artifacts ----------------------------------------------------------------------------
    def _signed_target(self, updater: Updater, target: str, what: str) -> TargetFile:
        if not safe_target(target, self.channel):
            raise self._refuse(
                what,
                f"target path {target!r} is not '{self.channel}/<plain name>' ('..', absolute or nested)",
                "nothing was installed; report the hub: the desired state names an unsafe path",
            )
        try:
            info: TargetFile | None = self._tuf(f"look up {target}", lambda: updater.get_targetinfo(target))
        except exceptions.DownloadError as exc:
            raise self._refuse(
                what, f"cannot fetch metadata for {target}: {exc}", "pull again", refused=False
            ) from exc
        if info is None:
            raise self._refuse(
                what, f"{target} is not a target signed by the {self.channel} role", "report the hub"
            )
        if "sha256" not in info.hashes:
            raise self._refuse(what, f"{target} carries no sha256", "republish it with sre-hub publish")
        return info

    def _artifact(self, updater: Updater, module: str, version: str, target: str) -> VerifiedArtifact:
        what = f"artifact {module} {version} ({target})"
        info = self._signed_target(updater, target, what)
        if info.length > self.policy.max_artifact_bytes:
            raise self._refuse(
                what,
                f"signed length {info.length} exceeds max_artifact_bytes {self.policy.max_artifact_bytes}",
                "raise the limit in trust.yaml if this size is expected",
            )
        custom = info.custom if isinstance(info.custom, dict) else {}
        try:
            manifest = manifest_from_custom(custom)
        except ValidationError as exc:
            raise self._refuse(
                what, f"the signed manifest is invalid: {exc.errors()[0]['msg']}", "republish it"
            ) from exc
        if manifest is None:
            raise self._refuse(what, "the signed target carries no module manifest", "republish it")
        if manifest.name != module or manifest.version != version:
            raise self._refuse(
                what, f"the signed manifest says {manifest.name} {manifest.version}", "report the hub"
            )
        sha = info.hashes["sha256"]
        self._second_signatures(updater, manifest, sha, what)
        path = self._download(info, self.policy.max_artifact_bytes)
        return VerifiedArtifact(module, version, target, path, sha, info.length, manifest)

    def _second_signatures(self, updater: Updater, manifest: ModuleManifest, sha: str, what: str) -> None:
        refs = {a.kind: a for a in manifest.attestations}
        checks = []
        if self.policy.require_cosign:
            checks.append("cosign")
        if self.policy.require_attestation:
            checks.append("dsse")
        for kind in checks:
            ref = refs.get(kind)  # type: ignore[call-overload]
            if ref is None:
                raise self._refuse(
                    what,
                    f"the trust policy requires a {kind} signature and the manifest lists none",
                    "publish with --cosign-key / --attest, or relax trust.yaml",
                )
            info = self._signed_target(updater, ref.target, what)
            blob = self._download(info, _MAX_SIG_BYTES).read_bytes()
            try:
                if kind == "cosign":
                    cosign_verify(self.policy.cosign_public_keys, sha, blob, what)
                else:
                    verify_attestation(
                        blob,
                        self.policy.attestation_public_keys,
                        sha,
                        self.policy.attestation_predicate_types,
                        what,
                    )
            except SignatureError as exc:
                self.audit.append(
                    "pull.refused", source=self._at, channel=self.channel, what=exc.what, why=exc.why
                )
                raise PullError(exc.what, exc.why, exc.fix, load_held(self.paths, self.clock)) from exc

    def _download(self, info: TargetFile, cap: int, sources: list[Source] | None = None) -> Path:
        """Fetch a signed target into the CAS (resuming a partial), verify length and sha256.

        Tries ``sources`` in order (default: the one that served the metadata first, then the others);
        a transfer failure or bytes that fail verification move on to the next source, audited.
        """
        sha = info.hashes["sha256"]
        what = info.path
        if info.length > cap:
            raise self._refuse(
                f"target {what}", f"signed length {info.length} exceeds the cap {cap}", "report the hub"
            )
        have = self.store.get(sha, info.length)
        if have is not None:
            return have
        attempts = sources if sources is not None else self._targets_order
        first_error: PullError | None = None
        for i, src in enumerate(attempts):
            self._at = src.name
            fetcher = self._fetcher(src, len(attempts) - i)
            if fetcher is None:
                break
            try:
                return self._download_from(src, fetcher, info)
            except PullError as exc:  # audited with this source's URL
                if first_error is None or (exc.refused and not first_error.refused):
                    first_error = exc
        if first_error is None:
            raise self._refuse(
                f"download {what}", "the pull deadline passed", "run pull again: it resumes", refused=False
            )
        raise first_error

    def _download_from(self, src: Source, fetcher: HttpFetcher | DirectoryFetcher, info: TargetFile) -> Path:
        sha = info.hashes["sha256"]
        what = info.path
        dirname, _, base = info.path.rpartition("/")
        url = f"{src.targets_url}{dirname}/{sha}.{base}"
        resume = self.store.read_resume(sha)
        # The partial is named by the signed digest, so it may come from another mirror; If-Range with the
        # old validator makes a server whose file differs answer 200 (restart) instead of splicing.
        validator = resume.get("etag")
        part = self.store.partial(sha)
        if validator is None and part.exists():
            part.unlink()
        advance = self.progress(info.path, info.length) if self.progress else None
        try:
            stats = fetcher.download_to(
                url,
                part,
                info.length,
                validator,
                advance,
                on_validator=lambda etag: self.store.write_resume(sha, {"url": url, "etag": etag}),
            )
        except exceptions.DownloadLengthMismatchError as exc:
            self.store.discard(sha)
            raise self._refuse(
                f"artifact {what}", f"oversized: {exc}", "nothing was installed; report the hub or the link"
            ) from exc
        except exceptions.DownloadError as exc:
            raise self._refuse(
                f"download {what}", str(exc), "run pull again: it resumes where it stopped", refused=False
            ) from exc
        self.stats["bytes"] += stats.bytes_received
        self.stats["resumes"] += stats.resumes
        self.stats["restarts"] += stats.restarts
        try:
            return self.store.commit(sha, info.length, what)
        except HashMismatchError as exc:
            self.audit.append(
                "pull.refused", source=src.name, channel=self.channel, what=exc.what, why=exc.why
            )
            raise PullError(exc.what, exc.why, exc.fix, load_held(self.paths, self.clock)) from exc


def _repository_advice(exc: Exception) -> str:
    """What to do about metadata TUF refused, by cause (each cause has a different remedy)."""
    head = "nothing was installed; "
    if isinstance(exc, exceptions.ExpiredMetadataError):
        return head + (
            "the signed metadata expired (by trusted time): the hub must re-sign freshness "
            "(`sre-hub timestamp`, normally from cron); for a bundle, export a fresh one"
        )
    if isinstance(exc, exceptions.BadVersionNumberError):
        return head + (
            "the source served older metadata than this device already trusts (a replayed or stale bundle "
            "or mirror): pull from the hub or a freshly exported bundle; the device keeps its current state"
        )
    if isinstance(exc, exceptions.UnsignedMetadataError):
        return head + (
            "the metadata is not signed by the keys this device's pinned root trusts: either the device is "
            "pinned to another hub's root (compare root_sha256 in <state>/device.json with the sha256 of "
            "the hub's root.json; re-provision with `sre-agent init --root`) or the files were altered: "
            "report it to the hub operators"
        )
    if isinstance(exc, exceptions.LengthOrHashMismatchError):
        return (
            head
            + "a file does not match its signed length or hash (altered in transit or at rest): pull again"
        )
    return head + "the source sent metadata that fails TUF verification: report it to the hub operators"
