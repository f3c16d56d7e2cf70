"""A full manifest (floats in probes, canary gates, golden vectors) survives publish -> TUF -> pull intact."""

from __future__ import annotations

from pathlib import Path

from deployment.manifest import (
    CanarySpec,
    CanaryStep,
    GoldenSpec,
    GoldenVector,
    ModuleManifest,
    ProbeSpec,
    manifest_from_custom,
    manifest_to_custom,
)
from deployment.sample_models import linear_classifier
from tests._trust_support import make_env


def _rich_manifest(version: str) -> ModuleManifest:
    return ModuleManifest(
        name="clf",
        version=version,
        probes=[ProbeSpec(kind="http", url="http://127.0.0.1:1/ready", timeout_s=2.5, interval_s=0.25)],
        canary=CanarySpec(
            steps=[CanaryStep(weight_pct=2.5, min_samples=50), CanaryStep(weight_pct=100.0)],
            max_p95_latency_ratio=1.25,
            max_divergence=0.02,
        ),
        golden=GoldenSpec(
            vectors=[
                GoldenVector(inputs={"input": [[0.1, -2.75]]}, expected={"p": [[0.3, 0.7]]}, tolerance=1e-3)
            ],
            fleet_output_distribution=[0.25, 0.75],
        ),
    )


def test_custom_round_trip_keeps_every_float() -> None:
    m = _rich_manifest("1.0")
    assert manifest_from_custom(manifest_to_custom(m)) == m
    assert manifest_from_custom({"other": 1}) is None
    assert manifest_from_custom(None) is None


def test_publish_and_pull_a_manifest_with_floats(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    try:
        art = tmp_path / "clf-1.0.onnx"
        art.write_bytes(linear_classifier(n_features=2, n_classes=2, output_name="p"))  # the hub loads it
        manifest = _rich_manifest("1.0")
        env.repo.publish("stable", art, manifest)
        env.repo.release("stable", "clf", "1.0")
        result = env.puller().pull()
        got = result.artifacts["clf"].manifest
        assert got == manifest
        assert got.canary is not None and got.canary.steps is not None
        assert got.canary.steps[0].weight_pct == 2.5
        assert got.golden is not None and got.golden.vectors[0].inputs["input"] == [[0.1, -2.75]]
    finally:
        env.server.stop()
