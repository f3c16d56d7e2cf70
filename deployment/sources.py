"""Where the signed files can be read from: an ordered list of hubs and mirrors, with fallback rules.

Public API::

    Source(name, metadata_url, targets_url)     one place (a hub, a mirror, a CDN, a bundle directory)
    sources_for(primary, fallbacks=(), metadata_url=None, targets_url=None) -> list[Source]
    order_sources(sources, last_good, now, sticky_s) -> list[Source]     pure
    share_s(remaining_s, untried) -> float                               pure
    SourceMemory(path)   .last_good() -> (name, when) | None   .remember(name, when)

Every byte a source serves is verified by TUF against the pinned root, so any source is acceptable
and a source that serves bad bytes is skipped for the next one. The rules:

- Order: the configured order (the primary hub first, then the other hubs, then the mirrors), except
  that the last source a pull succeeded from comes first while that success is younger than
  ``sticky_s`` (a dead first hub does not cost every pull a timeout); after that the configured order
  applies again, so a device returns to its regional hub once it is back.
- Deadlines: each attempt on a source gets an equal share of what is left of the pull deadline,
  ``remaining / sources not yet tried`` (the per-read deadlines still apply inside it), so a source that
  trickles bytes cannot eat the time of the sources after it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sre_core.atomic import atomic_write_json

__all__ = ["Source", "SourceMemory", "order_sources", "share_s", "sources_for"]


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Source:
    """One place the signed metadata and targets can be read from (bases end with ``/``)."""

    name: str
    metadata_url: str
    targets_url: str

    @property
    def remote(self) -> bool:
        return _is_url(self.name)


def _bases(source: str) -> tuple[str, str]:
    if _is_url(source):
        base = source.rstrip("/")
        return f"{base}/metadata/", f"{base}/targets/"
    base_dir = Path(source).resolve()
    return (base_dir / "metadata").as_uri() + "/", (base_dir / "targets").as_uri() + "/"


def sources_for(
    primary: str,
    fallbacks: Sequence[str] = (),
    metadata_url: str | None = None,
    targets_url: str | None = None,
) -> list[Source]:
    """The sources in configured order: ``primary`` (whose metadata/targets bases a CDN may replace,
    when it is a URL), then each fallback (hub or mirror base URLs, or bundle directories), duplicates
    dropped."""
    meta, targets = _bases(primary)
    if _is_url(primary):
        meta = metadata_url.rstrip("/") + "/" if metadata_url else meta
        targets = targets_url.rstrip("/") + "/" if targets_url else targets
    out = [Source(primary, meta, targets)]
    seen = {primary.rstrip("/")}
    for f in fallbacks:
        if f.rstrip("/") in seen:
            continue
        seen.add(f.rstrip("/"))
        out.append(Source(f, *_bases(f)))
    return out


def order_sources(
    sources: Sequence[Source], last_good: tuple[str, datetime] | None, now: datetime, sticky_s: float
) -> list[Source]:
    """The order to try ``sources`` in: the last good one first while it is younger than ``sticky_s``."""
    ordered = list(sources)
    if last_good is None or sticky_s <= 0:
        return ordered
    name, when = last_good
    if not 0 <= (now - when).total_seconds() < sticky_s:
        return ordered
    first = [s for s in ordered if s.name == name]
    return first + [s for s in ordered if s.name != name]


def share_s(remaining_s: float, untried: int) -> float:
    """The time one attempt may take: an equal share of what is left among the sources not yet tried."""
    if untried < 1:
        raise ValueError("untried must be >= 1")
    return max(remaining_s, 0.0) / untried


class SourceMemory:
    """The last source a pull succeeded from, persisted (``<state>/run/pull_source.json``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def last_good(self) -> tuple[str, datetime] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            when = datetime.fromisoformat(data["at"])
            name = data["source"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no memory: the configured order
        if not isinstance(name, str) or when.tzinfo is None:
            return None
        return name, when

    def remember(self, name: str, when: datetime) -> None:
        atomic_write_json(self.path, {"source": name, "at": when.isoformat()})
