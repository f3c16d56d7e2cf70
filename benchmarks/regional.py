"""Bytes over the root hub's link per release: every device pulling from the root vs. one regional hub per
site. Prints one JSON object.

Usage: ``python benchmarks/regional.py [--devices 20] [--release-bytes 1048576] [--releases 2]``

One root hub (TUF repository served over loopback HTTP, a byte counter on its responses), one regional hub
(``hub.regional``) and ``--devices`` devices running the real ``Puller`` (TUF verification, CAS). Each
release is published at the root, then (a) every device pulls it directly from the root, and (b) the
regional hub syncs once and every device of a second, identical population pulls it from the regional
hub. Counted: the response body bytes the root sent in each case, split into targets and metadata.
Goal: one copy of each target per site (``target_copies_per_site`` = 1.0), so the root's target bytes
fall by the number of devices at the site (``ratio_targets``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any


def _counting(app: Any, counts: Counter[str]) -> Any:
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        kind = "targets" if scope.get("path", "").startswith("/targets/") else "metadata"

        async def counted(msg: Any) -> None:
            if msg["type"] == "http.response.body":
                counts[kind] += len(msg.get("body", b""))
            await send(msg)

        await app(scope, receive, counted)

    return wrapped


def run(devices: int, release_bytes: int, releases: int) -> dict[str, Any]:
    from deployment.manifest import ModuleManifest
    from deployment.pull import Puller
    from hub.regional import RegionalConfig, RegionalHub, build_regional_app
    from hub.repository import HubRepository
    from hub.server import build_hub_app
    from policies.trust import TrustPolicy
    from sre_agent.provision import provision
    from sre_core.clock import SystemClock
    from sre_core.http_server import ServerThread
    from sre_core.paths import StatePaths

    tmp = Path(tempfile.mkdtemp(prefix="bench-regional-"))
    clock = SystemClock()
    repo = HubRepository.init(tmp / "repo", channels=("stable",), clock=clock)
    direct: Counter[str] = Counter()
    tiered: Counter[str] = Counter()
    current: list[Counter[str]] = [direct]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _counting(inner, current[0])(scope, receive, send)

    inner = build_hub_app(repo.dir)
    root_pin = repo.metadata_dir / "1.root.json"
    policy = TrustPolicy(max_stalled_attempts=2)
    with ServerThread(app) as root:
        hub = RegionalHub(
            RegionalConfig(upstream=root.url, root=root_pin, state=tmp / "regional"), clock=clock
        )
        with ServerThread(build_regional_app(hub)) as regional:
            fleets: dict[str, list[tuple[StatePaths, str]]] = {}
            for name, url in (("direct", root.url), ("tiered", regional.url)):
                fleets[name] = []
                for i in range(devices):
                    paths = StatePaths(tmp / name / f"dev{i}")
                    provision(paths, root=root_pin, hub=url, channel="stable", clock=clock)
                    fleets[name].append((paths, url))
            for r in range(releases):
                art = tmp / f"clf-{r}.onnx"
                art.write_bytes(os.urandom(release_bytes))
                repo.publish("stable", art, ModuleManifest(name="clf", version=f"1.{r}", mode="file"))
                repo.release("stable", "clf", f"1.{r}")
                current[0] = direct
                for paths, url in fleets["direct"]:
                    assert Puller(paths, url, "stable", clock=clock, policy=policy).pull().online
                current[0] = tiered
                assert hub.sync_down().published
                for paths, url in fleets["tiered"]:
                    res = Puller(paths, url, "stable", clock=clock, policy=policy).pull()
                    assert res.online and res.artifacts["clf"].version == f"1.{r}"
        hub.close()
    per_release_direct = direct["targets"] / releases
    per_release_tiered = tiered["targets"] / releases
    return {
        "devices_per_site": devices,
        "release_bytes": release_bytes,
        "releases": releases,
        "root_target_bytes_per_release_direct": per_release_direct,
        "root_target_bytes_per_release_via_regional": per_release_tiered,
        "root_metadata_bytes_direct": direct["metadata"],
        "root_metadata_bytes_via_regional": tiered["metadata"],
        "target_copies_per_site": round(per_release_tiered / release_bytes, 3),
        "ratio_targets": round(per_release_direct / max(per_release_tiered, 1), 2),
        "ratio_all_bytes": round(sum(direct.values()) / max(sum(tiered.values()), 1), 2),
        "goal": "target_copies_per_site == 1.0 (one copy per site per release)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--release-bytes", type=int, default=1024 * 1024)
    ap.add_argument("--releases", type=int, default=2)
    a = ap.parse_args()
    print(json.dumps(run(a.devices, a.release_bytes, a.releases), indent=2))


if __name__ == "__main__":
    main()
