"""Chaos Toolkit discovery for our extension (``chaos discover chaos``).

``chaos/__init__.py`` re-exports :func:`discover`, which chaoslib looks up on the package.
"""

from __future__ import annotations

from typing import Any

__all__ = ["discover"]


def discover(discover_system: bool = True) -> dict[str, Any]:
    """Describe the activities of ``chaos.actions`` and ``chaos.probes`` in Chaos Toolkit's format."""
    from chaoslib.discovery.discover import discover_actions, discover_probes, initialize_discovery_result

    discovery: dict[str, Any] = initialize_discovery_result("sre-agent-chaos", "0.1.0", "device")
    discovery["activities"].extend(discover_actions("chaos.actions"))
    discovery["activities"].extend(discover_probes("chaos.probes"))
    return discovery
