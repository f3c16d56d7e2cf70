"""Cost of re-hashing a slot before each transition that makes it serve or become active.

One module with a model of ``--mb`` MiB (random bytes: the slot manager never parses them). Each round
installs a new version, starts its canary, promotes it, then rolls back to the last-known-good and
forward again: four transitions that each re-hash one slot (canary start, promote, two rollbacks).
Rounds alternate between the real slot manager and one whose re-hash is replaced by "ok" (the cost
before the re-hash existed), on the same files, so the difference is the re-hash and nothing else.
The install itself (copy + hash of the cached bytes) is reported next to it for scale.

Run: ``python benchmarks/slot_rehash.py [--mb 100] [--rounds 3]``. Prints one JSON object:
``extra_ms_per_transition`` (median, with minus without) and ``extra_vs_install_ratio`` (that extra
over one install's time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deployment.artifacts import VerifiedArtifact
from deployment.manifest import ModuleManifest
from deployment.slots import SlotCheck, SlotManager, SlotRecord
from sre_core.audit import AuditLog
from sre_core.paths import StatePaths


class _NoRehash(SlotManager):
    """The slot manager as it was: transitions trust the bytes recorded at install."""

    def _verify(self, module: str, slot: str, rec: SlotRecord | None) -> SlotCheck:
        return SlotCheck(module, slot, rec is not None, [] if rec is not None else ["slot is empty"])


def _artifact(cas: Path, version: str, size: int, seed: int) -> VerifiedArtifact:
    cas.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)  # 1 MiB, distinct per version
    data = (block * (size // len(block) + 1))[:size]
    digest = hashlib.sha256(data).hexdigest()
    (cas / digest).write_bytes(data)
    manifest = ModuleManifest(name="clf", version=version, mode="managed")
    return VerifiedArtifact("clf", version, f"clf/clf-{version}", cas / digest, digest, size, manifest)


def _round(slots: SlotManager, art: VerifiedArtifact) -> dict[str, float]:
    t0 = time.perf_counter()
    slots.install(art)
    t1 = time.perf_counter()
    slots.begin_canary("clf")
    t2 = time.perf_counter()
    slots.promote_canary("clf")
    t3 = time.perf_counter()
    slots.rollback("clf", reason="drill", actor="chaos", mark_bad=False)
    slots.rollback("clf", reason="drill", actor="chaos", mark_bad=False)
    t4 = time.perf_counter()
    return {"install": t1 - t0, "canary_start": t2 - t1, "promote": t3 - t2, "rollback": (t4 - t3) / 2}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    size = args.mb << 20
    runs: dict[str, list[dict[str, float]]] = {"with": [], "without": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = StatePaths(Path(tmp) / "state")
        paths.root.mkdir(parents=True)
        audit = AuditLog(paths.audit_log)
        managers = {"with": SlotManager(paths, audit), "without": _NoRehash(paths, audit)}
        first = _artifact(Path(tmp) / "cas", "0.0", size, 0)
        managers["with"].install(first)
        managers["with"].flip("clf")
        managers["with"].commit("clf")
        for i in range(args.rounds * 2):
            kind = "with" if i % 2 == 0 else "without"
            art = _artifact(Path(tmp) / "cas", f"1.{i}", size, i + 1)
            runs[kind].append(_round(managers[kind], art))
            (Path(tmp) / "cas" / art.sha256).unlink()

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind]) * 1000

    steps = ("canary_start", "promote", "rollback")
    extra = {k: round(med("with", k) - med("without", k), 1) for k in steps}
    per_transition = statistics.median(extra.values())
    out: dict[str, Any] = {
        "model_mib": args.mb,
        "rounds": args.rounds,
        "ms_with_rehash": {k: round(med("with", k), 1) for k in steps},
        "ms_without_rehash": {k: round(med("without", k), 1) for k in steps},
        "extra_ms": extra,
        "extra_ms_per_transition": round(per_transition, 1),
        "install_ms": round(med("with", "install"), 1),
        "extra_vs_install_ratio": round(per_transition / med("with", "install"), 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
