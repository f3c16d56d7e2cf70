"""A real sample device for tests, benchmarks and demos: ONNX classifiers installed into A/B slots
through ``deployment.slots`` with golden specs derived from the models themselves."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from deployment.artifacts import VerifiedArtifact
from deployment.manifest import ModuleManifest, RuntimeSpec
from deployment.sample_models import linear_classifier
from sre_core.audit import AuditLog
from sre_core.clock import Clock
from sre_core.paths import StatePaths
from verification.golden import make_golden

__all__ = ["SampleModule", "install_sample_module"]


@dataclass(frozen=True)
class SampleModule:
    """What was installed: the module name, its versions (last one active) and its baseline inputs."""

    name: str
    versions: tuple[str, ...]
    baseline: np.ndarray
    n_features: int
    n_classes: int


def install_sample_module(
    paths: StatePaths,
    clock: Clock,
    name: str = "classifier",
    versions: tuple[str, ...] = ("1.0.0", "1.1.0"),
    n_features: int = 8,
    n_classes: int = 3,
    seed: int = 0,
    hidden_layers: int = 0,
    hidden_size: int = 64,
) -> SampleModule:
    """Install each version in turn (install, flip, commit): the last is active, the one before standby."""
    from deployment.slots import SlotManager

    audit = AuditLog(paths.audit_log, clock=clock)
    mgr = SlotManager(paths, audit, clock=clock)
    rng = np.random.default_rng(seed)
    baseline = rng.normal(0.0, 1.0, (2000, n_features)).astype(np.float32)
    paths.cas.mkdir(parents=True, exist_ok=True)
    for i, version in enumerate(versions):
        model = linear_classifier(
            n_features, n_classes, seed=seed + i, hidden_layers=hidden_layers, hidden_size=hidden_size
        )
        digest = hashlib.sha256(model).hexdigest()
        cas_file = paths.cas / digest
        cas_file.write_bytes(model)
        manifest = ModuleManifest(
            name=name,
            version=version,
            runtime=RuntimeSpec(input_name="input", output_name="probabilities"),
            golden=make_golden(model, baseline, vectors=4),
        )
        mgr.install(
            VerifiedArtifact(
                module=name,
                version=version,
                target=f"modules/{name}/{version}/model.onnx",
                path=cas_file,
                sha256=digest,
                length=len(model),
                manifest=manifest,
            )
        )
        mgr.flip(name)
        mgr.commit(name)
    return SampleModule(name, tuple(versions), baseline, n_features, n_classes)
