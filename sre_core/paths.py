"""The device state-directory layout (see ARCHITECTURE.md section 4). Pass a StatePaths; never hard-code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["StatePaths"]


@dataclass(frozen=True)
class StatePaths:
    """Every path under one device state directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().absolute())

    @property
    def identity(self) -> Path:
        return self.root / "identity"

    @property
    def private_key(self) -> Path:
        return self.identity / "device_ed25519.pem"

    @property
    def public_key(self) -> Path:
        return self.identity / "device_ed25519.pub.pem"

    @property
    def device_id_file(self) -> Path:
        return self.identity / "device_id"

    @property
    def trust(self) -> Path:
        return self.root / "trust"

    @property
    def root_json(self) -> Path:
        return self.trust / "root.json"

    @property
    def tuf(self) -> Path:
        return self.root / "tuf"

    @property
    def cas(self) -> Path:
        return self.root / "cas"

    @property
    def modules(self) -> Path:
        return self.root / "modules"

    def module(self, name: str) -> Path:
        return self.modules / name

    @property
    def safe(self) -> Path:
        return self.root / "safe"

    @property
    def clock_file(self) -> Path:
        return self.root / "clock.json"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def telemetry_db(self) -> Path:
        return self.root / "telemetry.duckdb"

    @property
    def config_file(self) -> Path:
        return self.root / "agent.toml"

    @property
    def device_file(self) -> Path:
        """Provisioning facts: hub, channel, pinned root digest."""
        return self.root / "device.json"

    @property
    def policies(self) -> Path:
        return self.root / "policies"

    @property
    def run(self) -> Path:
        """Runtime files: pid, admin socket, dead man's switch records."""
        return self.root / "run"

    def layout(self) -> list[Path]:
        """Directories that :meth:`create` makes."""
        return [
            self.root,
            self.identity,
            self.trust,
            self.tuf,
            self.cas,
            self.modules,
            self.safe,
            self.policies,
            self.run,
        ]

    def create(self) -> None:
        """Create the layout (idempotent). The identity directory is 0700."""
        for d in self.layout():
            d.mkdir(parents=True, exist_ok=True)
        self.identity.chmod(0o700)
