"""Where checks come from: the built-ins, third-party checks through the ``sre_agent.checks`` entry-point
group, and learned gates; and which of them run, on what schedule, as the policy names them.

An entry point's name is the check name; it may point at a :class:`~verification.base.Check` subclass,
an instance, or a zero-argument factory returning one. Third-party code is imported only when the
policy names its check, and a check that cannot be loaded becomes an ``error`` result, never a crash.
"""

from __future__ import annotations

import re
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from policies.verification import CheckPolicy, VerificationPolicy
from verification.base import Check, CheckResult, CheckSpec, Severity, Status
from verification.builtin import BUILTIN_CHECKS

__all__ = ["ENTRY_POINT_GROUP", "CheckRegistry", "PlannedCheck", "RegistryError"]

ENTRY_POINT_GROUP = "sre_agent.checks"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class RegistryError(Exception):
    """A check cannot be registered or created (unknown name, bad plugin)."""


@dataclass(frozen=True)
class PlannedCheck:
    """A check instance with its effective schedule, ready for the runner or the scheduler."""

    check: Check
    spec: CheckSpec


def _as_factory(obj: Any, name: str) -> Callable[[], Check]:
    if isinstance(obj, Check):
        return lambda: obj
    if isinstance(obj, type) and issubclass(obj, Check):
        return obj
    if callable(obj):

        def make() -> Check:
            made = obj()
            if not isinstance(made, Check):
                raise RegistryError(f"check {name}: factory returned {type(made).__name__}, not a Check")
            return made

        return make
    raise RegistryError(f"check {name}: {type(obj).__name__} is neither a Check nor a factory of one")


class CheckRegistry:
    """Name -> check factory. Instances are created once per name and reused (checks may keep state)."""

    def __init__(self) -> None:
        self._factories: dict[str, Callable[[], Check]] = {}
        self._sources: dict[str, str] = {}
        self._instances: dict[str, Check] = {}
        self._lock = threading.Lock()

    @classmethod
    def default(cls, entry_points: Iterable[metadata.EntryPoint] | None = None) -> CheckRegistry:
        """Built-ins plus the entry points of ``sre_agent.checks`` (or the ones given)."""
        reg = cls()
        for check_cls in BUILTIN_CHECKS:
            reg.register(check_cls.name, check_cls, source="builtin")
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP) if entry_points is None else entry_points
        for ep in eps:
            reg.register_entry_point(ep)
        return reg

    def register(self, name: str, factory: Any, source: str = "code") -> None:
        """Add a check. Raises RegistryError for a bad name or one already taken."""
        if not _NAME.match(name):
            raise RegistryError(f"check name {name!r} must match {_NAME.pattern}")
        with self._lock:
            if name in self._factories:
                raise RegistryError(f"check {name} is already registered (by {self._sources[name]})")
            self._factories[name] = _as_factory(factory, name)
            self._sources[name] = source

    def register_entry_point(self, ep: metadata.EntryPoint) -> None:
        """Add a third-party check lazily: its module is imported on first use."""
        if ep.name in self._factories:
            # A plugin cannot shadow a built-in (or an earlier plugin): first registration wins.
            return
        dist = getattr(ep, "dist", None)
        source = f"entry point {ep.value}" + (f" ({dist.name})" if dist is not None else "")

        def load() -> Check:
            return _as_factory(ep.load(), ep.name)()

        self.register(ep.name, load, source=source)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._factories)

    def source(self, name: str) -> str:
        return self._sources.get(name, "unknown")

    def get(self, name: str) -> Check:
        """The (cached) instance of ``name``. Raises RegistryError if unknown or it fails to load."""
        with self._lock:
            inst = self._instances.get(name)
            factory = self._factories.get(name)
        if inst is not None:
            return inst
        if factory is None:
            raise RegistryError(f"no check named {name} is installed")
        try:
            inst = factory()
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryError(f"check {name} failed to load: {type(exc).__name__}: {exc}") from exc
        if not isinstance(inst, Check):
            raise RegistryError(f"check {name}: loaded {type(inst).__name__}, not a Check")
        if not inst.name:
            inst.name = name
        with self._lock:
            return self._instances.setdefault(name, inst)

    def plan(
        self, policy: VerificationPolicy, only: str | None = None
    ) -> tuple[list[PlannedCheck], list[CheckResult]]:
        """The checks the policy names (or just ``only``) with their specs, and error results for
        named checks that are not installed or do not load."""
        names = policy.enabled_checks() if only is None else [only]
        planned: list[PlannedCheck] = []
        problems: list[CheckResult] = []
        for name in names:
            cp = policy.checks.get(name, CheckPolicy())
            try:
                check = self.get(name)
                planned.append(PlannedCheck(check, spec_for(check, cp, policy)))
            except (RegistryError, ValueError) as exc:
                problems.append(
                    CheckResult(
                        Status.ERROR,
                        str(exc),
                        {"source": self.source(name), "installed": self.names()},
                        check=name,
                        severity=Severity(cp.severity or "warning"),
                        traceback=traceback.format_exc(),
                    )
                )
        return planned, problems


def spec_for(check: Check, cp: CheckPolicy, policy: VerificationPolicy) -> CheckSpec:
    """Effective schedule: the policy entry, else the check's own default, else the policy defaults."""
    d = policy.defaults
    return CheckSpec(
        name=check.name,
        interval_s=cp.interval_s or check.interval_s or d.interval_s,
        timeout_s=cp.timeout_s or check.timeout_s or d.timeout_s,
        severity=Severity(cp.severity) if cp.severity else check.severity,
        jitter_s=d.jitter_s if cp.jitter_s is None else cp.jitter_s,
        misfire_grace_s=d.misfire_grace_s,
        isolation=cp.isolation or check.isolation,
    )
