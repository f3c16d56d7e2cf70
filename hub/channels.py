"""Release channels: promotion staging -> pre-prod -> fleet, and M-for-N channel matrices.

Public API::

    PROMOTION_PATH = ("staging", "pre-prod", "fleet")
    PromotionCriteria(soak_s=3600, min_healthy=3, max_failures=0)
    judge_promotion(reports, module, version, released_at, now, criteria) -> PromotionVerdict   (pure)
    matrix_channel(customer, sku, envelope) -> str          e.g. "acme.orin-nx.eu-mdr"
    Channels(service)
        .ensure_matrix(customers, skus, envelopes) -> list[str]   (each its own delegated TUF role + key)
        .verdict(module, version, src) -> PromotionVerdict
        .promote(module, version, src, dst, criteria=None, force=False, rollout=None) -> dict

Every channel is a delegated targets role of the hub repository (:meth:`HubRepository.add_channel`),
restricted to ``<channel>/*`` with its own key, so one customer x SKU x regulatory envelope can never
be signed for with another's key. Promotion copies the very artifact and manifest of the source channel
into the destination, signed by the destination's role, then releases it there (or starts a rollout).
Criteria: the version soaked in the source channel for ``soak_s`` since its signed publication, at least
``min_healthy`` devices of that channel report it healthy, and at most ``max_failures`` devices report it
failed (rolled back) - "no open failures".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from deployment.manifest import NAME_RE, manifest_from_custom
from hub.dora import publications
from hub.rollouts import RolloutService, RolloutSpec
from sre_core.errors import InputError

__all__ = [
    "PROMOTION_PATH",
    "Channels",
    "PromotionCriteria",
    "PromotionVerdict",
    "judge_promotion",
    "matrix_channel",
]

PROMOTION_PATH = ("staging", "pre-prod", "fleet")


@dataclass(frozen=True)
class PromotionCriteria:
    soak_s: int = 3600
    min_healthy: int = 3
    max_failures: int = 0

    def __post_init__(self) -> None:
        if self.soak_s < 0 or self.min_healthy < 0 or self.max_failures < 0:
            raise InputError("promotion criteria", "soak, min healthy and max failures are >= 0")


@dataclass
class PromotionVerdict:
    ok: bool
    healthy: int
    failed: int
    soaked_s: int
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def judge_promotion(
    reports: dict[str, dict[str, Any]],
    module: str,
    version: str,
    released_at: datetime | None,
    now: datetime,
    criteria: PromotionCriteria,
) -> PromotionVerdict:
    """Pure: may ``module@version`` leave the channel these ``reports`` come from?"""
    healthy = failed = 0
    for rep in reports.values():
        f = (rep.get("modules") or {}).get(module) or {}
        if version in (f.get("bad") or []):
            failed += 1
        elif f.get("version") == version and f.get("phase") in (None, "idle") and not rep.get("safe_mode"):
            healthy += 1
    soaked = int((now - released_at).total_seconds()) if released_at else 0
    reasons = []
    if released_at is None:
        reasons.append(f"{module} {version} was never released in the source channel")
    elif soaked < criteria.soak_s:
        reasons.append(f"soaked {soaked} s of {criteria.soak_s} s")
    if healthy < criteria.min_healthy:
        reasons.append(f"{healthy} devices healthy on it, {criteria.min_healthy} needed")
    if failed > criteria.max_failures:
        reasons.append(f"{failed} devices failed it (open failures), at most {criteria.max_failures} allowed")
    return PromotionVerdict(not reasons, healthy, failed, soaked, reasons)


def _slug(part: str, what: str) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", part.strip().lower()).strip("-")
    if not s:
        raise InputError(f"channel {what} {part!r}", "empty after normalising", "use letters and digits")
    return s


def matrix_channel(customer: str, sku: str, envelope: str) -> str:
    """The channel for one customer x hardware SKU x regulatory envelope."""
    name = f"{_slug(customer, 'customer')}.{_slug(sku, 'sku')}.{_slug(envelope, 'envelope')}"
    if not re.match(NAME_RE, name):
        raise InputError(f"channel {name!r}", "longer than 63 characters", "use shorter names")
    return name


class Channels:
    """Channel management over a :class:`RolloutService` (its repository signs)."""

    def __init__(self, service: RolloutService) -> None:
        self.service = service
        self.repo = service.repo

    def ensure_matrix(self, customers: list[str], skus: list[str], envelopes: list[str]) -> list[str]:
        """Create every missing customer x SKU x envelope channel; returns all of their names."""
        names = [matrix_channel(c, s, e) for c in customers for s in skus for e in envelopes]
        for name in names:
            if name not in self.repo.channels:
                self.repo.add_channel(name)
        return names

    def _released_at(self, module: str, version: str, channel: str) -> datetime | None:
        for p in publications(self.repo):
            if (p.channel, p.module, p.version) == (channel, module, version):
                return p.issued
        return None

    def verdict(
        self, module: str, version: str, src: str, criteria: PromotionCriteria | None = None
    ) -> PromotionVerdict:
        return judge_promotion(
            self.service.reports.in_channel(src),
            module,
            version,
            self._released_at(module, version, src),
            self.service.clock.now(),
            criteria or PromotionCriteria(),
        )

    def promote(
        self,
        module: str,
        version: str,
        src: str,
        dst: str,
        criteria: PromotionCriteria | None = None,
        force: bool = False,
        rollout: RolloutSpec | None = None,
    ) -> dict[str, Any]:
        """Copy ``module@version`` from ``src`` to ``dst`` (signed by ``dst``'s role) and release it there,
        or start ``rollout`` there.

        Raises:
            InputError: criteria not met (unless ``force``), unknown channels or version.
        """
        for ch in (src, dst):
            if ch not in self.repo.channels:
                raise InputError(f"promote to {dst}", f"no channel {ch!r}", "create it first")
        if src == dst:
            raise InputError("promote", "source and destination are the same channel")
        v = self.verdict(module, version, src, criteria)
        if not v.ok and not force:
            raise InputError(
                f"promote {module} {version} {src} -> {dst}",
                "; ".join(v.reasons),
                "wait for the soak and healthy devices, or --force (audited)",
            )
        found = None
        for path, tf in self.repo.channel_targets(src).items():
            man = manifest_from_custom(tf.custom)
            if man is not None and man.name == module and man.version == version:
                found = (path, tf, man)
        if found is None:
            raise InputError(f"promote {module} {version}", f"not published in {src}")
        path, tf, man = found
        blob = self.repo.targets_dir / src / f"{tf.hashes['sha256']}.{path.split('/', 1)[1]}"
        self.repo.publish(dst, blob, man)
        if rollout is not None:
            r = self.service.start(
                rollout.model_copy(update={"channel": dst, "module": module, "version": version})
            )
            how: dict[str, Any] = {"rollout": r.id}
        else:
            ds = self.repo.release(dst, module, version)
            how = {"serial": ds.serial}
        return {"module": module, "version": version, "from": src, "to": dst, "forced": not v.ok,
                "verdict": v.to_dict(), **how}  # fmt: skip
