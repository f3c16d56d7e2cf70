"""Drift: live inputs against the baseline shipped with the module, outputs against the fleet baseline.

Inputs use the population stability index when the module ships histogram fractions, else the
Kolmogorov-Smirnov distance to the baseline normal (mean, std) per feature. Outputs compare the share of
each predicted class with the fleet's shares by Jensen-Shannon distance (base 2, in [0, 1]).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deployment.manifest import ModuleManifest, TensorStats
from verification.base import Check, CheckResult, Severity
from verification.context import VerificationContext

__all__ = ["InputDriftCheck", "OutputDriftCheck", "baseline_stats", "class_shares", "js_distance", "psi"]

_EPS = 1e-4


def baseline_stats(samples: np.ndarray, bins: int = 10) -> TensorStats:
    """Baseline statistics of ``samples [N, F]`` for a module's manifest (publisher side).

    Bin edges are shared by all features (quantiles of the pooled values); fractions are per feature.
    """
    x = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)))
    fractions = [_hist(x[:, j], edges).tolist() for j in range(x.shape[1])]
    return TensorStats(
        mean=x.mean(axis=0).tolist(),
        std=x.std(axis=0).tolist(),
        bins=edges.tolist(),
        fractions=fractions,
    )


def _hist(col: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # Values beyond the baseline range land in the outer bins: drift out of range still counts.
    counts, _ = np.histogram(np.clip(col, edges[0], edges[-1]), bins=edges)
    return np.asarray(counts, dtype=np.float64) / max(1, len(col))


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two bin-fraction vectors."""
    e = np.clip(np.asarray(expected, dtype=np.float64), _EPS, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), _EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


def class_shares(outputs: np.ndarray, n_classes: int) -> np.ndarray:
    """Share of each predicted class in ``outputs`` (``[N, C]`` scores or ``[N]`` class ids)."""
    arr = np.asarray(outputs)
    ids = arr.argmax(axis=1) if arr.ndim == 2 else arr.astype(np.int64).reshape(-1)
    counts = np.bincount(np.clip(ids, 0, n_classes - 1), minlength=n_classes).astype(np.float64)
    return np.asarray(counts / max(1.0, float(counts.sum())), dtype=np.float64)


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2) of two distributions, in [0, 1]."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(np.asarray(p, np.float64), np.asarray(q, np.float64), base=2))


def _feature_drift(x: np.ndarray, stats: TensorStats, ctx: VerificationContext) -> tuple[str, list[float]]:
    if stats.bins and stats.fractions and len(stats.bins) >= 2:
        edges = np.asarray(stats.bins, dtype=np.float64)
        n = min(x.shape[1], len(stats.fractions))
        return "psi", [psi(np.asarray(stats.fractions[j]), _hist(x[:, j], edges)) for j in range(n)]
    from scipy.stats import kstest

    n = min(x.shape[1], len(stats.mean), len(stats.std))
    out = []
    for j in range(n):
        sd = stats.std[j] if stats.std[j] > 0 else 1e-9
        out.append(float(kstest((x[:, j] - stats.mean[j]) / sd, "norm").statistic))
    return "ks", out


class InputDriftCheck(Check):
    """Recorded live inputs against the input statistics shipped (signed) with the module."""

    name = "drift.inputs"
    description = "input distribution (PSI or KS per feature) against the module's baseline statistics"
    severity = Severity.WARNING
    interval_s = 900.0
    timeout_s = 30.0

    def run(self, ctx: VerificationContext) -> CheckResult:
        pol = ctx.policy.drift
        evidence: dict[str, Any] = {}
        drifted: list[str] = []
        drifted_modules: set[str] = set()
        warned: list[str] = []
        judged = 0
        worst = {"psi": 0.0, "ks": 0.0}
        for module in ctx.modules():
            manifest = ctx.manifest(module)
            stats_by_input = manifest.golden.input_stats if manifest and manifest.golden else {}
            samples = ctx.input_samples.get(module, {})
            for input_name, stats in sorted(stats_by_input.items()):
                key = f"{module}/{input_name}"
                if input_name not in samples:
                    evidence[key] = {"note": "no samples recorded"}
                    continue
                x = np.asarray(samples[input_name], dtype=np.float64)
                x = x.reshape(len(x), -1)[-pol.max_samples :]
                finite = np.isfinite(x).all(axis=1)
                non_finite = int(len(x) - int(finite.sum()))
                if non_finite and non_finite / len(x) > pol.max_non_finite_share:
                    evidence[key] = {"samples": len(x), "non_finite_rows": non_finite}
                    drifted.append(f"{key} ({non_finite} of {len(x)} rows hold NaN/inf)")
                    drifted_modules.add(module)
                    continue
                x = x[finite]
                if len(x) < pol.min_samples:
                    evidence[key] = {"samples": len(x), "note": f"fewer than {pol.min_samples} samples"}
                    continue
                method, per_feature = _feature_drift(x, stats, ctx)
                if not per_feature:
                    continue
                judged += 1
                top = int(np.argmax(per_feature))
                value = per_feature[top]
                worst[method] = max(worst[method], value)
                limit = pol.psi_max if method == "psi" else pol.ks_statistic_max
                evidence[key] = {
                    "method": method,
                    "samples": len(x),
                    "non_finite_rows": non_finite,
                    "max": round(value, 6),
                    "feature": top,
                    "limit": limit,
                    "per_feature": [round(v, 4) for v in per_feature[:64]],
                }
                if value > limit:
                    drifted.append(f"{key} ({method} {value:.3f} > {limit}, feature {top})")
                    drifted_modules.add(module)
                elif method == "psi" and value > pol.psi_warn:
                    warned.append(f"{key} (psi {value:.3f})")
        meas = {"max_psi": worst["psi"], "max_ks": worst["ks"]}
        if drifted:
            return CheckResult.fail(f"input drift: {'; '.join(drifted)}", evidence, **meas).about(
                drifted_modules
            )
        if judged == 0:
            return CheckResult.inconclusive("no input samples to judge against a baseline", evidence)
        if warned:
            return CheckResult.warn(f"inputs moving: {'; '.join(warned)}", evidence, **meas)
        return CheckResult.ok(f"{judged} input(s) within their baselines", evidence, **meas)


class OutputDriftCheck(Check):
    """Predicted class shares against the fleet baseline shipped with the module."""

    name = "drift.outputs"
    description = (
        "output class shares against the fleet baseline (Jensen-Shannon distance); regressors: KS "
        "distance to the shipped output statistics"
    )
    severity = Severity.WARNING
    interval_s = 900.0
    timeout_s = 30.0

    def run(self, ctx: VerificationContext) -> CheckResult:
        pol = ctx.policy.drift
        evidence: dict[str, Any] = {}
        divergent: list[str] = []
        divergent_modules: list[str] = []
        judged = 0
        worst = worst_ks = 0.0
        for module in ctx.modules():
            manifest = ctx.manifest(module)
            fleet = manifest.golden.fleet_output_distribution if manifest and manifest.golden else None
            if not fleet:
                if manifest is not None and manifest.golden is not None and manifest.golden.output_stats:
                    d_ks = self._value_drift(ctx, module, manifest, evidence)
                    if d_ks is not None:
                        judged += 1
                        worst_ks = max(worst_ks, d_ks)
                        if d_ks > pol.ks_statistic_max:
                            divergent.append(f"{module} (KS {d_ks:.3f} > {pol.ks_statistic_max})")
                            divergent_modules.append(module)
                continue
            if module not in ctx.output_samples:
                evidence[module] = {"note": "no output samples recorded"}
                continue
            outputs = np.asarray(ctx.output_samples[module])[-pol.max_samples :]
            if len(outputs) < pol.min_samples:
                evidence[module] = {"samples": len(outputs), "note": f"fewer than {pol.min_samples} samples"}
                continue
            q = np.asarray(fleet, dtype=np.float64)
            p = class_shares(outputs, len(q))
            d = js_distance(p, q / q.sum())
            judged += 1
            worst = max(worst, d)
            evidence[module] = {
                "samples": len(outputs),
                "js_distance": round(d, 6),
                "limit": pol.output_js_max,
                "device_shares": [round(float(v), 4) for v in p],
                "fleet_shares": [round(float(v), 4) for v in q / q.sum()],
            }
            if d > pol.output_js_max:
                divergent.append(f"{module} (JS {d:.3f} > {pol.output_js_max})")
                divergent_modules.append(module)
        if divergent:
            return CheckResult.fail(
                f"outputs diverge from the fleet: {'; '.join(divergent)}",
                evidence,
                max_js=worst,
                max_ks=worst_ks,
            ).about(divergent_modules)
        if judged == 0:
            return CheckResult.inconclusive("no output samples to compare with a fleet baseline", evidence)
        return CheckResult.ok(
            f"{judged} module(s) match the fleet baseline", evidence, max_js=worst, max_ks=worst_ks
        )

    @staticmethod
    def _value_drift(
        ctx: VerificationContext, module: str, manifest: ModuleManifest, evidence: dict[str, Any]
    ) -> float | None:
        """Regressors (no class shares): KS distance of each output column to the shipped output stats."""
        golden = manifest.golden
        assert golden is not None  # noqa: S101 (checked by the caller)
        name = manifest.runtime.output_name
        stats = golden.output_stats.get(name) if name else None
        if stats is None and len(golden.output_stats) == 1:
            stats = next(iter(golden.output_stats.values()))
        if stats is None or module not in ctx.output_samples:
            return None
        pol = ctx.policy.drift
        y = np.asarray(ctx.output_samples[module], dtype=np.float64)
        y = y.reshape(len(y), -1)[-pol.max_samples :]
        y = y[np.isfinite(y).all(axis=1)]
        if len(y) < pol.min_samples:
            evidence[module] = {"samples": len(y), "note": f"fewer than {pol.min_samples} samples"}
            return None
        _, per_column = _feature_drift(y, TensorStats(mean=stats.mean, std=stats.std), ctx)
        if not per_column:
            return None
        d = max(per_column)
        evidence[module] = {
            "method": "ks",
            "samples": len(y),
            "ks": round(d, 6),
            "limit": pol.ks_statistic_max,
        }
        return d
