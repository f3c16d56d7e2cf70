"""The canary's gate defaults live in one place (the deployment policy) and reach every construction path.

How the promise could be broken, and the test that would catch it:
- the manifest schema carries a default of its own (an absolute 0.01 error margin passes a version with
  0.5 % errors) and a manifest that leaves the field unset, once it has travelled as JSON, holds that
  default as if its author had written it -> the schema's gate fields default to "unset" (None), which
  survives the wire;
- "explicit" is guessed by comparing a value with the schema's default, so an author who writes that
  value is silently overruled -> an explicit value always wins;
- a copy of the defaults drifts (the policy model, the shipped policy file, the controller's own
  defaults) -> they are compared here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deployment.canary import CanaryConfig, judge_error_rate
from deployment.manifest import CanarySpec, ModuleManifest, manifest_from_custom, manifest_to_custom
from deployment.router import VersionStats
from deployment.sample_models import linear_classifier
from deployment.serving import ManagedServing, ModelRepository
from deployment.sessions import load_session
from policies.deployment import CanaryPolicy, load_deployment_policy
from sre_core.paths import StatePaths
from tests.deploy_helpers import make_artifact

GATES = ("max_error_rate_increase", "error_rate_relative", "max_p95_latency_ratio")


def _wire(spec: CanarySpec | None) -> CanarySpec | None:
    """The manifest as a device receives it: serialized into the TUF target's custom field and back."""
    sent = ModuleManifest(name="m", version="1", canary=spec)
    got = manifest_from_custom(manifest_to_custom(sent))
    assert got is not None
    return got.canary


def test_a_manifest_that_leaves_the_error_margin_unset_carries_no_margin_of_its_own() -> None:
    assert CanarySpec().max_error_rate_increase is None
    wired = _wire(CanarySpec(mirror_share=0.2))
    assert wired is not None and wired.max_error_rate_increase is None  # not 0.01 on the wire
    assert wired.mirror_share == 0.2


def test_every_construction_path_takes_the_policy_margin() -> None:
    shipped = load_deployment_policy().canary
    assert shipped == CanaryPolicy()  # the shipped policy file and the policy model agree
    built_in = CanaryConfig()
    for spec in (None, CanarySpec(), _wire(CanarySpec()), _wire(CanarySpec(soak_s=5)), _wire(None)):
        for policy in (None, shipped):
            cfg = CanaryConfig.from_spec(spec, policy=policy)
            for gate in GATES:
                assert getattr(cfg, gate) == getattr(shipped, gate) == getattr(built_in, gate), (spec, gate)
    assert shipped.max_error_rate_increase < 0.005  # a floor, not a margin that hides 0.5 % of errors
    # an operator's policy reaches the controller through every path as well
    strict = CanaryPolicy(max_error_rate_increase=0.0005, error_rate_relative=0.25)
    cfg = CanaryConfig.from_spec(_wire(CanarySpec()), policy=strict)
    assert (cfg.max_error_rate_increase, cfg.error_rate_relative) == (0.0005, 0.25)


def test_an_explicit_manifest_value_always_wins() -> None:
    policy = CanaryPolicy(max_error_rate_increase=0.001, max_p95_latency_ratio=2.0)
    # values that happen to equal the old schema defaults are still the author's choice
    spec = _wire(CanarySpec(max_error_rate_increase=0.01, max_p95_latency_ratio=1.5, soak_s=60))
    cfg = CanaryConfig.from_spec(spec, policy=policy)
    assert cfg.max_error_rate_increase == 0.01 and cfg.max_p95_latency_ratio == 1.5 and cfg.soak_s == 60


def test_half_a_percent_of_errors_fails_a_canary_whose_manifest_sets_no_margin(
    state: StatePaths, tmp_path: Path
) -> None:
    """Through the driver: a wire manifest without a margin, the policy the daemon loads."""
    blob = linear_classifier(seed=0)
    repo = ModelRepository()
    repo.add(load_session(blob, name="m", version="1"))
    serving = ManagedServing(state, repo, policy=load_deployment_policy().canary)
    art = make_artifact(tmp_path / "cas", "m", "2", blob, mode="managed", canary=CanarySpec(mirror_share=0.2))
    manifest = manifest_from_custom(manifest_to_custom(art.manifest))
    assert manifest is not None
    run = serving.prepare("m", art.path, manifest)
    c = run.config
    canary = VersionStats(requests=20_000, errors=100)  # 0.5 %
    incumbent = VersionStats(requests=200_000, errors=0)
    a = 0.01
    verdict = judge_error_rate(
        canary, incumbent, c.max_error_rate_increase, a, None, relative=c.error_rate_relative
    )
    assert verdict.verdict == "fail", (c.max_error_rate_increase, verdict)
    assert run.router.infer({"input": np.zeros((1, 16), np.float32)}).version == "1"
