"""The canary as an operator meets it: the real ``sre-agent run`` as a child process, a real hub on loopback,
a client sending inference over HTTP throughout, releases published at the hub.

(a) an identical candidate (the same weights, a new digest) is promoted and then serves every request;
(b) a candidate doing 4x the graph work (about 2x slower per request, measured alone) is aborted by the
    paired latency gate at the device policy's ratio (1.5) and marked bad, and the incumbent keeps serving;
(c) through the daemon mode of ``benchmarks/serving.py`` (``--canary-daemon``): an identical ~5 MiB
    candidate promoted and a candidate failing on exactly 1 % of the client's inputs aborted, twice each,
    with no failed client request during any run.

Steps are shortened in the manifest (two steps of 50 latency pairs, no soak) and the error floor is raised
to 0.05, so a verdict takes seconds of traffic instead of the default policy's thousands of requests; the
latency ratio is the device policy's; the 1 %-error candidate keeps the policy's error floor (0.2 points),
which a 0.05 floor would let through. A few runs of each (slow); the figures under the default policy are
``benchmarks/serving.py --canary`` and ``--canary-daemon`` (docs/canary.md).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx
import pytest

from deployment.manifest import CanarySpec, CanaryStep, ModuleManifest
from deployment.sample_models import doubled_classifier, linear_classifier
from tests.live_harness import Live, live_rig
from tests.live_harness import clean_stop as _clean_stop
from tests.live_harness import record as _record
from tests.live_harness import serving as _serving

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("live-faults")]  # one daemon at a time

TINY: dict[str, Any] = {"seed": 1, "hidden_layers": 2}
SPEC = CanarySpec(
    steps=[CanaryStep(weight_pct=w, min_samples=50, max_duration_s=150) for w in (50, 100)],
    soak_s=0.0,
    mirror_share=0.5,
    max_error_rate_increase=0.05,  # the latency ratio is left to the device's policy (1.5)
)
SPEC_POLICY_ERRORS = SPEC.model_copy(update={"max_error_rate_increase": None})  # the policy's 0.2 points
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    with live_rig(tmp_path) as lv:
        yield lv


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serving_bench", REPO / "benchmarks" / "serving.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _relabel(blob: bytes, note: str) -> bytes:
    model = onnx.load_from_string(blob)
    model.doc_string = note
    return bytes(model.SerializeToString())


def _publish(lv: Live, version: str, blob: bytes, spec: CanarySpec | None = SPEC) -> None:
    f = lv.tmp / f"clf-{version}.onnx"
    f.write_bytes(blob)
    lv.repo.publish("stable", f, ModuleManifest(name="clf", version=version, canary=spec))
    lv.repo.release("stable", "clf", version)


def test_live_identical_candidate_promoted_then_slower_one_aborted_and_marked_bad(live: Live) -> None:
    base = linear_classifier(**TINY)
    _publish(live, "1.0", base)
    client = _serving(live)
    try:
        # (a) identical: promoted, then it serves every request
        t0 = time.monotonic()
        _publish(live, "2.0", _relabel(base, "2.0"))
        live.wait(lambda: live.seen("canary.promoted", version="2.0"), "2.0 promoted", timeout=240)
        t_promoted = time.monotonic()
        live.wait(lambda: live.status().active.version == "2.0", "slots: 2.0 active")  # type: ignore[union-attr]
        live.wait(lambda: set(client.last(20)) == {"2.0"}, "the client served by 2.0 only")
        assert not live.status().bad
        promoted = next(e["data"] for e in live.events() if e["event"] == "canary.promoted")
        _record("canary a: identical candidate", "promoted", t_promoted - t0, gates=promoted["gates"])
        # (b) 2x slower: aborted by the latency gate, marked bad; 2.0 keeps serving
        t1 = time.monotonic()
        _publish(live, "3.0", doubled_classifier(**TINY, copies=3))
        live.wait(lambda: live.seen("canary.gate_failed", version="3.0"), "3.0 aborted", timeout=240)
        t_aborted = time.monotonic()
        failed = next(e["data"] for e in live.events() if e["event"] == "canary.gate_failed")
        assert "latency" in failed["reason"], failed
        live.wait(lambda: any(b["version"] == "3.0" for b in live.status().bad.values()), "3.0 marked bad")
        assert live.status().active.version == "2.0"  # type: ignore[union-attr]
        time.sleep(1.0)
        assert set(client.last(20)) == {"2.0"}
        assert not live.seen("canary.promoted", version="3.0")
        _record(
            "canary b: 2x slower candidate",
            "aborted by the latency gate, marked bad",
            t_aborted - t1,
            reason=failed["reason"],
            client_errors=client.error_kinds(),  # the server listens before 1.0 is loaded: 404s first
            client_errors_after_first_answer=client.error_kinds(client.served[0][0]),
        )
    finally:
        client.stop()
    _clean_stop(live)


def test_live_daemon_mode_promotes_a_medium_identical_and_aborts_a_1pct_error_candidate() -> None:
    kinds = {"identical_5mib": SPEC, "errors_1pct": SPEC_POLICY_ERRORS}
    res = _bench().canary_daemon(2, set(kinds), spec=kinds.__getitem__, timeout_s=600)
    assert res["daemon_exit_code"] == 0
    for kind in kinds:
        row = res[kind]
        assert row["right"] == row["runs"] == 2, (kind, row["outcomes"], row["wrong_reasons"])
        assert not row["client_not_200"], (kind, row["client_not_200"])  # the incumbent answered
        _record(
            f"canary c: {kind} (benchmark daemon mode)",
            f"{row['outcomes']}",
            max(row["publish_to_verdict_s"]),
            publish_to_verdict_s=row["publish_to_verdict_s"],
            decision_s_per_step=row["median_decision_s_per_step"],
        )
    reasons = [d["reason"] for d in res["errors_1pct"]["runs_detail"]]
    assert all("error" in r for r in reasons), reasons  # the error gate, not another one
