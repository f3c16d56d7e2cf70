"""The signed self-attestation of a real install carries what the slot manager recorded.

How to break it: attest from fields the slot manager never writes (``active_version``, ``digest``);
before, a real install's attestation named no version and no digest, and the test used a made-up
state file, so nothing noticed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from deploy_helpers import StaticSource, make_artifact

from deployment.reconcile import Reconciler
from sre_agent.attestation import collect_state, sign_attestation
from sre_core.clock import FakeClock
from sre_core.identity import load_or_create_identity
from sre_core.paths import StatePaths
from sre_core.signing import dsse_verify


def test_attestation_of_a_real_install_names_versions_and_digests(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path / "dev")
    paths.create()
    ident, _ = load_or_create_identity(paths, None)
    clock = FakeClock()
    one = make_artifact(tmp_path / "cas", "clf", "1.0", b"one")
    pol = make_artifact(tmp_path / "cas", "rules", "7", b"rules: []", kind="policy", filename="triage.yaml")
    src = StaticSource(clock, [one, pol])
    rec = Reconciler(paths, src, clock)
    rec.run_once()
    src.set([make_artifact(tmp_path / "cas", "clf", "2.0", b"two"), pol], serial=2)
    rec.run_once()

    st = collect_state(paths, clock, "ab" * 32, "p@1", "fresh", safe_mode=False)
    clf = st.modules["clf"]
    assert clf["version"] == "2.0" and clf["sha256"] == hashlib.sha256(b"two").hexdigest()
    assert clf["last_known_good"]["version"] == "1.0" and clf["phase"] == "idle" and clf["kind"] == "model"
    assert clf["tree_sha256"] == rec.slots.status("clf").active.record.tree_sha256  # type: ignore[union-attr]
    assert st.modules["rules"]["kind"] == "policy" and st.modules["rules"]["version"] == "7"
    raw = (paths.module("clf") / "state.json").read_bytes()
    assert clf["state_sha256"] == hashlib.sha256(raw).hexdigest()

    env = sign_attestation(ident, st)
    key_id, payload = dsse_verify(env, lambda k: ident.public_key)
    assert key_id == ident.device_id
    assert json.loads(payload)["predicate"]["modules"]["clf"]["version"] == "2.0"
