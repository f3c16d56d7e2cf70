"""The catalogue of known chaos activities: which provider is which activity, and what it does.

The data lives in the chaos policy (``policies/defaults/chaos.yaml``, model :class:`ChaosPolicy`); this
module only answers questions about it. Lookups are by the raw provider mapping, before anything is
imported: a Python provider is known by ``module:func``; process and HTTP providers are never catalogued
(their effects cannot be known from the document).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.base import load_document
from policies.chaos import ActivitySpec, ChaosPolicy, default_chaos_policy

__all__ = ["Catalogue", "activity_key", "load_catalogue"]


def activity_key(provider: Mapping[str, Any]) -> str:
    """A stable name for a provider: ``module:func`` (python), ``process:<path>``, ``http:<url>``."""
    ptype = provider.get("type")
    if ptype == "python":
        return f"{provider.get('module')}:{provider.get('func')}"
    if ptype == "process":
        return f"process:{provider.get('path')}"
    return f"http:{provider.get('url')}"


@dataclass(frozen=True)
class Catalogue:
    """Read-only view over the policy's activity catalogue."""

    policy: ChaosPolicy

    def spec(self, provider: Mapping[str, Any]) -> ActivitySpec | None:
        """The catalogue entry for a provider, or None when the activity is unknown."""
        if provider.get("type") != "python":
            return None
        return self.policy.activities.get(activity_key(provider))

    def get(self, key: str) -> ActivitySpec | None:
        return self.policy.activities.get(key)

    def restorers(self, key: str) -> tuple[str, ...]:
        """Catalogue keys that undo the activity ``key`` (empty when nothing does)."""
        spec = self.get(key)
        return spec.restored_by if spec else ()

    def control_allowed(self, module: str) -> bool:
        """Whether a control module may be loaded by an experiment."""
        return module in self.policy.controls

    def keys(self, kind: str | None = None) -> list[str]:
        """Catalogued keys, optionally only actions or probes."""
        return sorted(k for k, s in self.policy.activities.items() if kind is None or s.kind == kind)


def load_catalogue(path: Path | None = None) -> Catalogue:
    """The catalogue from a policy file, or the shipped default when ``path`` is None.

    Raises:
        InputError: the policy file is unreadable or invalid (the message names the key).
    """
    policy = default_chaos_policy() if path is None else load_document(ChaosPolicy, path)
    return Catalogue(policy)
