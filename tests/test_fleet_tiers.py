"""The tiered fleet, simulated small (the benchmark runs it at fleet size: ``benchmarks/fleet.py --tiers``).

One root hub, three regional hubs (the real ``RegionalHub``, served over HTTP), four devices per site;
each site's uplink is up 20 % of the rounds, devices' links 95 %. How it could break, and what is
checked:

- a site whose uplink is down cannot get a release or a recall its regional hub already holds (devices
  would need the root): each site's uplink is cut the moment its regional hub serves the new signed
  state, and every device of the site must converge while it stays cut;
- telemetry lost or landed twice across tiers (a batch stored at the regional hub whose answer was
  lost, re-sent to the root directly, then forwarded): every sealed batch has exactly one receipt at the
  root and its exact row count in the lake;
- every device fetching its own copy over the site's uplink: the regional hubs' target downloads per
  release are one artifact per site, and the no-tier baseline (devices pulling from the root) costs
  about one copy per device.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_tiers import TieredSim, run_scenario


@pytest.fixture
def simdir(tmp_path: Path) -> Iterator[Path]:
    """A RAM-backed directory when there is one (hundreds of fsyncs per round), else tmp_path."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="fleet-tiers-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_a_tiered_fleet_under_a_20_percent_uplink(simdir: Path) -> None:
    with TieredSim(simdir, sites=3, per_site=4, uplink_up=0.2, device_up=0.95, answer_loss=0.1) as sim:
        out = run_scenario(sim, max_rounds=60)
    per_site = 4
    for name in ("release", "recall"):
        ph = out[name]
        assert ph["converged"], out
        assert ph["sites_cut"] == 3, out
        # every device of every site took it while its site's uplink was cut (after the regional had it)
        assert ph["updated_while_cut"] == 3 * per_site, out
    tel = out["telemetry"]
    assert tel["landed_batches"] == tel["batches"] == 12, tel
    assert tel["receipts_more_than_once"] == 0 and tel["unexpected_in_lake"] == [], tel
    assert tel["lake_rows_match"] == tel["batches"] and tel["lake_rows"] == tel["rows"], tel
    retry = out["cross_tier_retry"]
    assert retry["answer_lost_then_sent_to_root"] and retry["regional_also_held_it"], retry
    assert retry["regional_forward"]["duplicates"], retry  # the root already had it: no second landing
    assert retry["receipts_at_root"] == 1 and retry["lake_rows"] == retry["rows"], retry
    # one copy of the artifact per site per release (plus signed metadata), vs about one per device
    assert 0.99 <= out["artifact_copies_per_site_per_release"] <= 1.05, out
    assert out["flat_release"]["converged"] and out["flat_over_tiered_ratio"] > 2.5, out
