"""The contract between pulling (trust) and installing (slots): what a verified artifact is.

``deployment.pull`` produces these values only after every check passed (TUF signatures, length and
hashes, optional cosign/DSSE); ``deployment.slots`` and ``deployment.reconcile`` consume them and never
look at unverified bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from deployment.manifest import DesiredState, ModuleManifest

__all__ = ["PullResult", "TrustStatus", "VerifiedArtifact"]


class TrustStatus(enum.StrEnum):
    """How current the device's signed desired state is.

    fresh: metadata refreshed within its validity; stale: offline, still enforcing the last verified
    desired state (not yet expired); expired: the desired state's own expiry passed by trusted time
    (the device must enter safe mode); none: never pulled a desired state.
    """

    FRESH = "fresh"
    STALE = "stale"
    EXPIRED = "expired"
    NONE = "none"


@dataclass(frozen=True)
class VerifiedArtifact:
    """A module artifact whose bytes passed every check, held in the content-addressed cache."""

    module: str
    version: str
    target: str
    path: Path
    sha256: str
    length: int
    manifest: ModuleManifest


@dataclass(frozen=True)
class PullResult:
    """Outcome of one pull: the verified desired state (if any) and its verified artifacts.

    ``refused`` is set (to what was refused and why) when the pull was refused or failed and this is the
    held state the device keeps enforcing instead (see ``Puller.pull_or_held``).
    """

    trust: TrustStatus
    online: bool
    trusted_now: datetime
    desired: DesiredState | None = None
    artifacts: dict[str, VerifiedArtifact] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    refused: str | None = None
