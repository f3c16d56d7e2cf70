"""Helpers for the slot/reconcile tests: real files in a content-addressed dir with real sha256."""

from __future__ import annotations

import hashlib
import io
import tarfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from deployment.artifacts import PullResult, TrustStatus, VerifiedArtifact
from deployment.manifest import DesiredModule, DesiredState, ModuleManifest


def make_artifact(
    cas: Path,
    module: str,
    version: str,
    data: bytes,
    **manifest: Any,
) -> VerifiedArtifact:
    """Store ``data`` under ``cas/<sha256>`` and describe it as a verified artifact."""
    cas.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()
    path = cas / digest
    path.write_bytes(data)
    m = ModuleManifest(name=module, version=version, **{"mode": "file", **manifest})
    return VerifiedArtifact(
        module=module,
        version=version,
        target=f"{module}/{module}-{version}",
        path=path,
        sha256=digest,
        length=len(data),
        manifest=m,
    )


def make_tar(files: dict[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def desired_state(
    issued: datetime,
    arts: list[VerifiedArtifact],
    serial: int = 1,
    valid: timedelta = timedelta(days=30),
) -> DesiredState:
    return DesiredState(
        channel="stable",
        serial=serial,
        issued=issued,
        expires=issued + valid,
        modules={a.module: DesiredModule(version=a.version, target=a.target) for a in arts},
    )


class StaticSource:
    """A source returning a fixed desired state with its artifacts; ``online`` can be toggled."""

    def __init__(
        self, clock: Any, arts: list[VerifiedArtifact], serial: int = 1, valid: timedelta = timedelta(days=30)
    ):
        self.clock = clock
        self.online = True
        self.set(arts, serial, valid)

    def set(self, arts: list[VerifiedArtifact], serial: int, valid: timedelta = timedelta(days=30)) -> None:
        self.arts = {a.module: a for a in arts}
        self.desired = desired_state(self.clock.now(), arts, serial, valid)

    def __call__(self) -> PullResult:
        now = self.clock.now()
        if self.desired.is_expired(now):
            trust = TrustStatus.EXPIRED
        else:
            trust = TrustStatus.FRESH if self.online else TrustStatus.STALE
        return PullResult(
            trust=trust, online=self.online, trusted_now=now, desired=self.desired, artifacts=dict(self.arts)
        )
