"""The on-device canary controller: pure decisions from counters, no I/O, no clock of its own.

The lifecycle is one ``(phase, event) -> phase`` table (:data:`TRANSITIONS`); an event without a line in
it is a bug and raises. The driver (``deployment.serving``) feeds the controller router snapshots and the
monotonic time, and carries out what each :class:`Decision` says (set a weight, flip, abort).

Statistics. Each gate compares the canary with the incumbent over the current step's requests and
answers pass, fail or inconclusive; the step passes only when every gate passes *and* the canary has
``min_samples`` requests, and aborts as soon as any gate fails. A gate is a pair of one-sided tests run
sequentially: a look happens each time the sample count crosses a geometric milestone
(``n0 * growth**j``), and look ``j`` spends ``alpha * 6 / (pi**2 * (j + 1)**2)`` of the error budget
(these sum to ``alpha``), so the chance of a wrong verdict over the whole step, however long it runs, stays
below ``alpha`` per side (a union bound). Failure looks start at a handful of samples, so gross
regressions stop within the first few requests; pass looks start at ``min_samples``, so "too few samples"
is never a pass. Intervals are exact (Clopper-Pearson for rates, order statistics for quantiles), so the
test holds for any traffic volume.

- error rate: the canary may err at most ``(1 + error_rate_relative) * p_incumbent +
  max_error_rate_increase`` (a relative margin with a small absolute floor, so a 0.5 % version next to a
  0 % incumbent fails): fail when ``LCB(canary) > (1 + rel) * UCB(incumbent) + floor``; pass when
  ``UCB(canary) <= (1 + rel) * LCB(incumbent) + floor``. Routed and mirrored runs count; pinned ones not.
  The rates are of *discordant* failures: the router checks every failure (an exception, or NaN/Inf
  outputs) of one version against the other version on the same input, and a failure both had counts
  for neither (:meth:`VersionStats.evidence`), so inputs that fail everywhere cannot abort a good
  candidate nor widen the incumbent's margin for a bad one.
- latency, *paired*: each mirrored request runs on both versions back to back (alternating order) and
  gives one ratio ``t_canary / t_incumbent`` (see ``deployment.router``): same input, same batch size,
  same instant, so cache warmth and load hit both sides alike and no normalisation guesswork is needed.
  A sign test on the median ratio: fail when the share of pairs with ratio above
  ``max_p95_latency_ratio`` is confidently above 1/2, pass when it is confidently below 1/2. A tail guard
  (fail only) compares the p95 of the paired per-row latencies with the same ratio, using exact
  order-statistic bounds: an identical model has the same paired distribution as the incumbent, so the
  guard fires for it with probability below ``alpha``. Without mirroring there is no paired evidence
  and the gate is skipped (reported as such): an unpaired comparison of a 1 % canary with the 99 %
  incumbent measures cache warmth, not the model (docs/canary.md has the measurements).
- divergence: over mirrored requests, the share of rows whose top-1 class differs (classifiers) or whose
  relative error exceeds ``relative_tolerance`` (regressors): pass when its UCB ``<= max_divergence``,
  fail when its LCB exceeds it. Without mirroring the gate is skipped (reported as such).

Without mirroring, a 100 % step gives the incumbent no requests; the error gate then judges against what
the incumbent did since the canary began.

A step that reaches ``max_duration_s`` without a verdict ends the canary as *inconclusive*: the weight
goes to 0 but the version is not marked bad (nothing was shown to be wrong with it).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from scipy import stats

from deployment.manifest import CanarySpec, CanaryStep
from deployment.router import LatencyHistogram, PairStats, Snapshot, VersionStats
from policies.deployment import CanaryPolicy
from sre_core.lifecycle import StateTable

__all__ = [
    "DEFAULT_STEPS",
    "RESUME",
    "TABLE",
    "TRANSITIONS",
    "CanaryConfig",
    "CanaryController",
    "Decision",
    "Event",
    "GateResult",
    "Phase",
    "StepConfig",
    "clopper_pearson",
    "judge_divergence",
    "judge_error_rate",
    "judge_latency",
    "judge_tail_latency",
    "look_alpha",
    "quantile_rank_bounds",
    "transition",
]

DEFAULT_STEPS: tuple[float, ...] = (1.0, 5.0, 25.0, 50.0, 100.0)
LATENCY_QUANTILE = 0.95


class Phase(enum.StrEnum):
    """Where a canary is. PROMOTED, ABORTED, INCONCLUSIVE and CANCELLED are final."""

    PENDING = "pending"
    RAMPING = "ramping"
    SOAKING = "soaking"
    PROMOTING = "promoting"
    PROMOTED = "promoted"
    ABORTED = "aborted"
    INCONCLUSIVE = "inconclusive"
    CANCELLED = "cancelled"


class Event(enum.StrEnum):
    START = "start"
    STEP_PASSED = "step_passed"
    STEPS_DONE = "steps_done"
    SOAK_DONE = "soak_done"
    GATE_FAILED = "gate_failed"
    TIMED_OUT = "timed_out"
    FLIPPED = "flipped"
    FLIP_FAILED = "flip_failed"
    CANCEL = "cancel"


TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.PENDING, Event.START): Phase.RAMPING,
    (Phase.PENDING, Event.CANCEL): Phase.CANCELLED,
    (Phase.RAMPING, Event.STEP_PASSED): Phase.RAMPING,
    (Phase.RAMPING, Event.STEPS_DONE): Phase.SOAKING,
    (Phase.RAMPING, Event.GATE_FAILED): Phase.ABORTED,
    (Phase.RAMPING, Event.TIMED_OUT): Phase.INCONCLUSIVE,
    (Phase.RAMPING, Event.CANCEL): Phase.CANCELLED,
    (Phase.SOAKING, Event.SOAK_DONE): Phase.PROMOTING,
    (Phase.SOAKING, Event.GATE_FAILED): Phase.ABORTED,
    (Phase.SOAKING, Event.CANCEL): Phase.CANCELLED,
    (Phase.PROMOTING, Event.FLIPPED): Phase.PROMOTED,
    (Phase.PROMOTING, Event.FLIP_FAILED): Phase.ABORTED,
}
"""The whole canary lifecycle."""

FINAL = frozenset({Phase.PROMOTED, Phase.ABORTED, Phase.INCONCLUSIVE, Phase.CANCELLED})

RESUME: dict[Phase, Phase] = {
    # After a restart the in-memory evidence is gone: a canary in flight starts over from step one (the
    # candidate is still in the standby slot, unflipped). PROMOTING depends on whether the slot flip
    # landed; the driver asks the slots, then reports FLIPPED or starts over.
    Phase.PENDING: Phase.PENDING,
    Phase.RAMPING: Phase.PENDING,
    Phase.SOAKING: Phase.PENDING,
    Phase.PROMOTING: Phase.PROMOTING,
    Phase.PROMOTED: Phase.PROMOTED,
    Phase.ABORTED: Phase.ABORTED,
    Phase.INCONCLUSIVE: Phase.INCONCLUSIVE,
    Phase.CANCELLED: Phase.CANCELLED,
}
"""Where a persisted phase resumes after a restart."""


TABLE: StateTable[Phase, Event] = StateTable("canary", TRANSITIONS, Phase.PENDING, RESUME, FINAL)
"""The canary lifecycle on the shared engine (:mod:`sre_core.lifecycle`)."""


def transition(phase: Phase, event: Event) -> Phase:
    """The next phase. Raises NoTransitionError (a RuntimeError) for an event the table does not allow."""
    return TABLE.next(phase, event)


# -- statistics -----------------------------------------------------------------------------------
def look_alpha(alpha: float, look: int) -> float:
    """Error budget of look ``look`` (0-based): ``alpha * 6 / (pi^2 (look+1)^2)``; sums to ``alpha``."""
    return alpha * 6.0 / (math.pi**2 * (look + 1) ** 2)


def clopper_pearson(x: int, n: int, a: float) -> tuple[float, float]:
    """One-sided exact bounds at level ``a`` each: (lower, upper) for a binomial proportion."""
    if n <= 0:
        return 0.0, 1.0
    lo = 0.0 if x <= 0 else float(stats.beta.ppf(a, x, n - x + 1))
    hi = 1.0 if x >= n else float(stats.beta.ppf(1.0 - a, x + 1, n - x))
    return lo, hi


def quantile_rank_bounds(n: int, q: float, a: float) -> tuple[int | None, int | None]:
    """Ranks (1-based) of the order statistics bounding the q-quantile, each one-sided at level ``a``.

    Lower: the largest k with ``P(Bin(n, q) <= k-1) <= a``; upper: the smallest k with
    ``P(Bin(n, q) >= k) <= a``. None when ``n`` is too small for such a bound.
    """
    if n <= 0:
        return None, None
    k_lo = int(stats.binom.ppf(a, n, q))  # smallest k with cdf(k) >= a
    while k_lo >= 1 and stats.binom.cdf(k_lo - 1, n, q) > a:
        k_lo -= 1
    while k_lo + 1 <= n and stats.binom.cdf(k_lo, n, q) <= a:
        k_lo += 1
    k_hi = int(stats.binom.isf(a, n, q)) + 1
    while k_hi - 1 >= 1 and stats.binom.sf(k_hi - 2, n, q) <= a:
        k_hi -= 1
    while k_hi <= n and stats.binom.sf(k_hi - 1, n, q) > a:
        k_hi += 1
    return (k_lo if k_lo >= 1 else None), (k_hi if k_hi <= n else None)


Verdict = Literal["pass", "fail", "inconclusive", "skipped"]


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict with the numbers behind it."""

    gate: str
    verdict: Verdict
    n: int
    detail: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"gate": self.gate, "verdict": self.verdict, "n": self.n, **self.detail}


def judge_error_rate(
    canary: VersionStats,
    incumbent: VersionStats,
    max_increase: float,
    a_fail: float | None,
    a_pass: float | None,
    *,
    relative: float = 0.0,
) -> GateResult:
    """Error-rate gate at the given look budgets (None: no look of that side now).

    The canary may err at most ``(1 + relative) * p_incumbent + max_increase``.
    """
    xc, nc, xi, ni = canary.errors, canary.requests, incumbent.errors, incumbent.requests
    detail = {"canary_rate": xc / nc if nc else math.nan, "incumbent_rate": xi / ni if ni else math.nan}
    scale = 1.0 + relative
    if a_fail is not None:
        lo_c, _ = clopper_pearson(xc, nc, a_fail / 2)
        _, hi_i = clopper_pearson(xi, ni, a_fail / 2)
        if lo_c > scale * hi_i + max_increase:
            return GateResult("error_rate", "fail", nc, {**detail, "excess_lcb": lo_c - scale * hi_i})
    if a_pass is not None:
        _, hi_c = clopper_pearson(xc, nc, a_pass / 2)
        lo_i, _ = clopper_pearson(xi, ni, a_pass / 2)
        if hi_c <= scale * lo_i + max_increase:
            return GateResult("error_rate", "pass", nc, {**detail, "excess_ucb": hi_c - scale * lo_i})
    return GateResult("error_rate", "inconclusive", nc, detail)


def judge_latency(
    paired: PairStats,
    max_ratio: float,
    a_fail: float | None,
    a_pass: float | None,
    *,
    tail: bool = True,
) -> GateResult:
    """Paired latency gate: a sign test on the median per-request ratio, plus a fail-only tail guard
    on the p95 of the paired per-row latencies (see the module docstring)."""
    n = paired.n
    detail = {
        "ratio_p50": paired.ratio.quantile(0.5),
        "ratio_p95": paired.ratio.quantile(0.95),
        "canary_p95_s": paired.canary.quantile(LATENCY_QUANTILE),
        "incumbent_p95_s": paired.incumbent.quantile(LATENCY_QUANTILE),
    }
    if a_fail is not None:
        slower = paired.ratio.count_above(max_ratio, certainly=True)
        lo, _ = clopper_pearson(slower, n, a_fail / 2)
        if lo > 0.5:
            return GateResult("latency", "fail", n, {**detail, "slower_share_lcb": lo})
        if tail:
            guard = judge_tail_latency(paired.canary, paired.incumbent, max_ratio, a_fail / 2, None)
            if guard.verdict == "fail":
                return GateResult("latency", "fail", n, {**detail, **guard.detail, "tail": 1.0})
    if a_pass is not None:
        slower = paired.ratio.count_above(max_ratio, certainly=False)
        _, hi = clopper_pearson(slower, n, a_pass / 2)
        if hi < 0.5:
            return GateResult("latency", "pass", n, {**detail, "slower_share_ucb": hi})
    return GateResult("latency", "inconclusive", n, detail)


def judge_tail_latency(
    canary: LatencyHistogram,
    incumbent: LatencyHistogram,
    max_ratio: float,
    a_fail: float | None,
    a_pass: float | None,
) -> GateResult:
    """p95 latency-ratio test of two histograms (exact order-statistic bounds on the incumbent's p95).

    With ``L``/``U`` the incumbent's p95 bounds: pass when the share of canary samples slower than
    ``ratio * L`` is confidently below 5 %; fail when the share slower than ``ratio * U`` is confidently
    above 5 %. Fair only when both histograms come from comparable runs (the paired ones do).
    """
    q = LATENCY_QUANTILE
    nc, ni = canary.n, incumbent.n
    detail = {"canary_p95_s": canary.quantile(q), "incumbent_p95_s": incumbent.quantile(q)}
    if a_fail is not None:
        _, k_hi = quantile_rank_bounds(ni, q, a_fail / 2)
        if k_hi is not None:
            threshold = max_ratio * LatencyHistogram.upper_edge(incumbent.bucket_of_rank(k_hi))
            slow = canary.count_above(threshold, strict_lower=True)
            lo, _ = clopper_pearson(slow, nc, a_fail / 2)
            if lo > 1 - q:
                return GateResult(
                    "latency", "fail", nc, {**detail, "slow_share_lcb": lo, "threshold_s": threshold}
                )
    if a_pass is not None:
        k_lo, _ = quantile_rank_bounds(ni, q, a_pass / 2)
        if k_lo is not None:
            threshold = max_ratio * LatencyHistogram.lower_edge(incumbent.bucket_of_rank(k_lo))
            slow = canary.count_above(threshold, strict_lower=False)
            _, hi = clopper_pearson(slow, nc, a_pass / 2)
            if hi <= 1 - q:
                return GateResult(
                    "latency", "pass", nc, {**detail, "slow_share_ucb": hi, "threshold_s": threshold}
                )
    return GateResult("latency", "inconclusive", nc, detail)


def judge_divergence(
    pairs: int, diverged: int, max_divergence: float, a_fail: float | None, a_pass: float | None
) -> GateResult:
    """Divergence gate over mirrored rows."""
    detail = {"divergence": diverged / pairs if pairs else math.nan}
    if a_fail is not None:
        lo, _ = clopper_pearson(diverged, pairs, a_fail)
        if lo > max_divergence:
            return GateResult("divergence", "fail", pairs, {**detail, "lcb": lo})
    if a_pass is not None:
        _, hi = clopper_pearson(diverged, pairs, a_pass)
        if hi <= max_divergence:
            return GateResult("divergence", "pass", pairs, {**detail, "ucb": hi})
    return GateResult("divergence", "inconclusive", pairs, detail)


# -- configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepConfig:
    """One step: the canary's share (0..1), evidence needed, time allowed."""

    weight: float
    min_samples: int = 300
    max_duration_s: float = 600.0


_POLICY = CanaryPolicy()


@dataclass(frozen=True)
class CanaryConfig:
    """Everything the controller needs, validated at construction.

    ``alpha`` bounds the chance of a wrong verdict per side and step; ``first_look`` is the sample count
    of the first failure look; looks then come every time the count grows by ``look_growth``.
    """

    steps: tuple[StepConfig, ...] = tuple(StepConfig(w / 100) for w in DEFAULT_STEPS)
    soak_s: float = 60.0
    mirror_share: float = 0.1
    # The gates the deployment policy sets take their defaults from the policy model, their one home.
    max_error_rate_increase: float = _POLICY.max_error_rate_increase
    error_rate_relative: float = _POLICY.error_rate_relative
    max_p95_latency_ratio: float = _POLICY.max_p95_latency_ratio
    latency_tail_guard: bool = False
    warmup_pairs: int = 20
    allow_pin: bool = _POLICY.allow_pin_to_canary
    divergence: Literal["top1", "relative_error"] = "top1"
    max_divergence: float = 0.05
    relative_tolerance: float = 0.05
    alpha: float = 0.05
    first_look: int = 10
    look_growth: float = 1.5

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a canary needs at least one step")
        weights = [s.weight for s in self.steps]
        if any(not 0 < w <= 1 for w in weights) or weights != sorted(weights):
            raise ValueError("canary step weights must increase within (0, 1]")
        if not 0 < self.alpha < 0.5 or self.first_look < 1 or self.look_growth <= 1:
            raise ValueError("alpha must be in (0, 0.5), first_look >= 1, look_growth > 1")
        if self.error_rate_relative < 0 or self.max_p95_latency_ratio < 1 or self.warmup_pairs < 0:
            raise ValueError("error_rate_relative >= 0, max_p95_latency_ratio >= 1, warmup_pairs >= 0")

    @classmethod
    def from_spec(
        cls,
        spec: CanarySpec | None,
        policy_steps: Sequence[float] | None = None,
        policy: CanaryPolicy | None = None,
        **overrides: Any,
    ) -> CanaryConfig:
        """Steps from the manifest when it has them, else the policy's percentages, else the default;
        each gate the manifest sets (not None), else the deployment policy's (``policy``: its ``canary:``
        section; None: the policy model's defaults), else the built-in one; ``overrides`` last."""
        spec = spec or CanarySpec()
        if spec.steps:
            steps = tuple(_step(s) for s in spec.steps)
        else:
            template = CanaryStep(weight_pct=100)
            steps = tuple(
                StepConfig(p / 100, template.min_samples, template.max_duration_s)
                for p in (policy_steps or DEFAULT_STEPS)
            )
        p = policy or _POLICY
        from_policy: dict[str, Any] = {
            "max_error_rate_increase": p.max_error_rate_increase,
            "error_rate_relative": p.error_rate_relative,
            "max_p95_latency_ratio": p.max_p95_latency_ratio,
            "allow_pin": p.allow_pin_to_canary,
        }
        fields: tuple[str, ...] = ("soak_s", "mirror_share", "max_error_rate_increase")
        fields += ("max_p95_latency_ratio", "divergence", "max_divergence")
        explicit = {f: getattr(spec, f) for f in fields if getattr(spec, f) is not None}
        base = cls(steps=steps, **{**from_policy, **explicit})
        return replace(base, **overrides) if overrides else base


def _step(s: CanaryStep) -> StepConfig:
    return StepConfig(s.weight_pct / 100, s.min_samples, s.max_duration_s)


# -- the controller -------------------------------------------------------------------------------
Action = Literal["hold", "set_weight", "flip", "abort"]


@dataclass(frozen=True)
class Decision:
    """What the driver must do now.

    ``set_weight``: route ``weight`` to the canary; ``flip``: make the canary active, then report
    :meth:`CanaryController.flipped`; ``abort``: weight 0 at once (and mark the version bad when
    ``mark_bad``); ``hold``: nothing.
    """

    action: Action
    phase: Phase
    weight: float
    step: int
    reason: str = ""
    mark_bad: bool = False
    gates: tuple[GateResult, ...] = ()


class _Looks:
    """Which milestone each gate side last looked at (a look is spent at most once)."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def budget(self, key: str, n: int, n0: int, growth: float, alpha: float) -> float | None:
        if n < n0:
            return None
        j = math.floor(math.log(n / n0) / math.log(growth) + 1e-9)
        if j <= self.last.get(key, -1):
            return None
        self.last[key] = j
        return look_alpha(alpha, j)


class CanaryController:
    """Judges one candidate against the incumbent. Values in, :class:`Decision` out; no I/O.

    Args:
        config: steps, gates and statistics settings.
        candidate: the canary's version string.
        incumbent: the active version's string.
    """

    def __init__(self, config: CanaryConfig, candidate: str, incumbent: str) -> None:
        self.config = config
        self.candidate = candidate
        self.incumbent = incumbent
        self.phase = Phase.PENDING
        self.step = 0
        self.weight = 0.0
        self.reason = ""
        self.gates: tuple[GateResult, ...] = ()
        self.history: list[tuple[Phase, Event, Phase]] = []
        self._baseline: Snapshot | None = None
        self._origin: Snapshot | None = None
        self._since = 0.0
        self._looks = _Looks()
        self._passed: dict[str, GateResult] = {}
        self._error_looks = _Looks()
        self._error_passed: dict[str, GateResult] = {}
        self._samples = 0

    # -- lifecycle plumbing ---------------------------------------------------------------------
    def _fire(self, event: Event) -> Phase:
        new = transition(self.phase, event)
        self.history.append((self.phase, event, new))
        self.phase = new
        return new

    def _enter_window(self, snapshot: Snapshot, now: float) -> None:
        self._baseline = snapshot
        self._since = now
        self._looks = _Looks()
        self._passed = {}
        self._samples = 0

    @property
    def final(self) -> bool:
        return self.phase in FINAL

    def start(self, snapshot: Snapshot, now: float) -> Decision:
        """Begin step 1."""
        self._fire(Event.START)
        self._origin = snapshot
        self.step = 0
        self.weight = self.config.steps[0].weight
        self._enter_window(snapshot, now)
        return Decision("set_weight", self.phase, self.weight, self.step, "canary started")

    def cancel(self, reason: str) -> Decision:
        """Stop without judging (operator, safe mode): weight 0, version not marked bad."""
        self._fire(Event.CANCEL)
        self.weight = 0.0
        self.reason = reason
        return Decision("abort", self.phase, 0.0, self.step, reason)

    def flipped(self) -> None:
        """The driver made the canary active."""
        self._fire(Event.FLIPPED)
        self.weight = 1.0
        self.reason = "promoted"

    def flip_failed(self, reason: str) -> Decision:
        """The flip could not be committed: back to the incumbent."""
        self._fire(Event.FLIP_FAILED)
        self.weight = 0.0
        self.reason = reason
        return Decision("abort", self.phase, 0.0, self.step, reason, mark_bad=False)

    # -- judging --------------------------------------------------------------------------------
    def _judge(self, delta: Snapshot, whole: Snapshot, min_samples: int | None) -> tuple[GateResult, ...]:
        c = self.config
        can = delta.stats(self.candidate)
        inc = delta.stats(self.incumbent)
        if inc.requests < c.first_look:
            # At 100 % without mirroring the incumbent gets nothing in this step: judge against what it
            # did since the canary began (its behaviour does not change while it waits).
            inc = whole.stats(self.incumbent)
        pairs, diverged = delta.pair_counts(self.candidate)
        n0_pass = min_samples

        def budgets(
            gate: str, n: int, looks: _Looks | None = None, passed: dict[str, GateResult] | None = None
        ) -> tuple[float | None, float | None]:
            looks = looks or self._looks
            passed = self._passed if passed is None else passed
            a_fail = looks.budget(gate + ":fail", n, c.first_look, c.look_growth, c.alpha)
            a_pass = None
            if gate not in passed:
                n0 = n0_pass if n0_pass is not None else c.steps[0].min_samples
                a_pass = looks.budget(gate + ":pass", n, max(n0, 1), c.look_growth, c.alpha)
            return a_fail, a_pass

        results = []
        # Errors are a property of the model, not of its share: judged on everything since the canary
        # began, in one sequence of looks over the whole canary (so later steps need no fresh thousands
        # of samples to show a rate below the 0.2-point floor, and a failure look never stops).
        # Discordant evidence only: a failure both versions had on the same input counts for neither.
        can_all = whole.stats(self.candidate).evidence()
        inc_all = whole.stats(self.incumbent).evidence()
        af, ap = budgets("error_rate", can_all.requests, self._error_looks, self._error_passed)
        error = judge_error_rate(
            can_all, inc_all, c.max_error_rate_increase, af, ap, relative=c.error_rate_relative
        )
        if error.verdict == "pass":
            self._error_passed["error_rate"] = error
        kept_error = self._error_passed.get("error_rate")
        if error.verdict == "inconclusive" and kept_error is not None:
            error = replace(kept_error, n=error.n, detail={**kept_error.detail, **error.detail})
        results.append(error)
        if c.mirror_share > 0:
            paired = delta.paired_stats(self.candidate)
            af, ap = budgets("latency", paired.n)
            results.append(judge_latency(paired, c.max_p95_latency_ratio, af, ap, tail=c.latency_tail_guard))
        else:
            results.append(GateResult("latency", "skipped", 0, {}))
        if c.mirror_share > 0:
            af, ap = budgets("divergence", pairs)
            results.append(judge_divergence(pairs, diverged, c.max_divergence, af, ap))
        else:
            results.append(GateResult("divergence", "skipped", 0, {}))
        merged = []
        for r in results:
            if r.verdict == "pass":
                self._passed[r.gate] = r
            # A pass stays a pass for the step (its look was spent); a later failure look still counts.
            kept = self._passed.get(r.gate)
            if r.verdict == "inconclusive" and kept is not None:
                merged.append(replace(kept, n=r.n, detail={**kept.detail, **r.detail}))
            else:
                merged.append(r)
        self._samples = can.evidence().requests
        return tuple(merged)

    def evaluate(self, snapshot: Snapshot, now: float) -> Decision:
        """Judge the evidence since the step (or soak) began; ``now`` is monotonic seconds."""
        if self.phase not in (Phase.RAMPING, Phase.SOAKING) or self._baseline is None:
            return Decision("hold", self.phase, self.weight, self.step, self.reason)
        delta = snapshot.minus(self._baseline)
        c = self.config
        soaking = self.phase is Phase.SOAKING
        step = c.steps[self.step]
        whole = snapshot.minus(self._origin) if self._origin is not None else delta
        self.gates = self._judge(delta, whole, None if soaking else step.min_samples)
        failed = [g for g in self.gates if g.verdict == "fail"]
        where = "soak" if soaking else f"step {self.step + 1}/{len(c.steps)} ({step.weight:.0%})"
        if failed:
            self._fire(Event.GATE_FAILED)
            self.weight = 0.0
            self.reason = f"{', '.join(g.gate for g in failed)} gate failed at {where}"
            return Decision("abort", self.phase, 0.0, self.step, self.reason, True, self.gates)
        elapsed = now - self._since
        if soaking:
            if elapsed >= c.soak_s:
                self._fire(Event.SOAK_DONE)
                self.reason = "soak passed; flipping"
                return Decision("flip", self.phase, 1.0, self.step, self.reason, False, self.gates)
            return Decision(
                "hold", self.phase, self.weight, self.step, f"soaking {elapsed:.0f}/{c.soak_s:.0f} s"
            )
        passed = all(g.verdict in ("pass", "skipped") for g in self.gates)
        if passed and delta.stats(self.candidate).evidence().requests >= step.min_samples:
            if self.step + 1 < len(c.steps):
                self._fire(Event.STEP_PASSED)
                self.step += 1
                self.weight = c.steps[self.step].weight
                self.reason = f"{where} passed"
            else:
                self._fire(Event.STEPS_DONE)
                self.weight = 1.0
                self.reason = f"{where} passed; soaking at 100%"
            self._enter_window(snapshot, now)
            return Decision("set_weight", self.phase, self.weight, self.step, self.reason, False, self.gates)
        if elapsed >= step.max_duration_s:
            self._fire(Event.TIMED_OUT)
            self.weight = 0.0
            self.reason = f"{where} inconclusive after {elapsed:.0f} s ({self._samples} canary samples)"
            return Decision("abort", self.phase, 0.0, self.step, self.reason, False, self.gates)
        return Decision("hold", self.phase, self.weight, self.step, self.reason, False, self.gates)

    def progress(self) -> dict[str, Any]:
        """A JSON-ready summary for status displays."""
        c = self.config
        step = c.steps[min(self.step, len(c.steps) - 1)]
        return {
            "candidate": self.candidate,
            "incumbent": self.incumbent,
            "phase": self.phase.value,
            "step": self.step + 1,
            "steps": len(c.steps),
            "step_weights": [s.weight for s in c.steps],
            "weight": self.weight,
            "samples": self._samples,
            "min_samples": step.min_samples,
            "reason": self.reason,
            "gates": [g.to_dict() for g in self.gates],
        }
