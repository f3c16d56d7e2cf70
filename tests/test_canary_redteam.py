"""Red team for the on-device canary: clients must not be able to force a verdict.

Written from the public surface only (docs/canary.md, the deployment policy, ``sre-agent serve --help``,
the Open Inference Protocol over REST and gRPC). Each case states how a client would try to break the
promise, and the outcome the docs promise:

1. Pinning: a request pinned to the version under canary is refused (403 / PERMISSION_DENIED) unless
   ``allow_pin_to_canary``; pinned requests are answered but *never* evidence. A client that pins
   failing requests and huge batches to the canary by every spelling the protocol offers must not get an
   identical candidate aborted.
2. Routed adversarial traffic: the router's share is observable (``model_version`` in every answer), so
   a client can time requests to land on the canary's slot. Inputs that fail on *both* versions, huge
   batches, malformed requests (client errors, 4xx) and NaN inputs sent at the canary's slots must not get
   an identical candidate aborted ("errors are a property of the model, not of its share").
3. A burst of concurrent HTTP clients must not make the paired latency gate abort an identical candidate.
4. Under-reaction: a candidate that returns NaN or fails on ~1 % of requests IS aborted, also when a
   client floods the incumbent with failing requests to raise the relative error margin.

Real ONNX Runtime sessions on models built here, real HTTP and gRPC servers on 127.0.0.1; the canary's
clock is a FakeClock advanced per batch of traffic, so verdicts never depend on machine speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from deployment.canary import CanaryConfig, Phase, StepConfig
from deployment.oip import create_app
from deployment.oip_grpc import GrpcServer
from deployment.router import Router
from deployment.sample_models import erroring_classifier, linear_classifier, slow_classifier
from deployment.serving import CanaryRun, ModelRepository
from deployment.sessions import load_session
from sre_core.clock import FakeClock
from sre_core.http_server import ServerThread
from sre_core.telemetry import MemorySink

pytestmark = pytest.mark.slow

HIDDEN = 1
POISON = 10.0  # feature 0 above every threshold used here: the erroring graph fails inside ONNX Runtime
Z1 = 2.326  # P(N(0,1) > Z1) = 1 %: the 1 %-failing candidate's threshold


# -- models --------------------------------------------------------------------------------------
def relabel(blob: bytes, note: str) -> bytes:
    """Same graph, new bytes: an identical release."""
    model = onnx.load_from_string(blob)
    model.doc_string = note
    return bytes(model.SerializeToString())


def nan_on_tail(threshold: float) -> bytes:
    """``linear_classifier(seed=0)`` whose outputs are NaN for rows with ``input[:, 0] > threshold``."""
    model = onnx.load_from_string(linear_classifier(seed=0, hidden_layers=HIDDEN))
    g = model.graph
    for node in g.node:
        node.output[:] = ["_clean" if o == "probabilities" else o for o in node.output]
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "_s0"),
            numpy_helper.from_array(np.array([1], np.int64), "_s1"),
            numpy_helper.from_array(np.array([1], np.int64), "_ax"),
            numpy_helper.from_array(np.array(threshold, np.float32), "_nthr"),
            numpy_helper.from_array(np.array(np.nan, np.float32), "_nan"),
            numpy_helper.from_array(np.array(0.0, np.float32), "_zero"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("Slice", ["input", "_s0", "_s1", "_ax"], ["_col"]),
            helper.make_node("Greater", ["_col", "_nthr"], ["_tail"]),
            helper.make_node("Where", ["_tail", "_nan", "_zero"], ["_poison"]),
            helper.make_node("Add", ["_clean", "_poison"], ["probabilities"]),
        ]
    )
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def erroring(threshold: float) -> bytes:
    return erroring_classifier(seed=0, hidden_layers=HIDDEN, error_threshold=threshold)


# -- the serving plane ---------------------------------------------------------------------------
def config(**kw: object) -> CanaryConfig:
    """The shipped defaults (gates, margins, mirroring, alpha), with two steps so a run stays short."""
    steps = (StepConfig(0.05, min_samples=300, max_duration_s=600), StepConfig(1.0, 300, 600))
    return dataclasses.replace(CanaryConfig.from_spec(None), steps=steps, soak_s=5.0, **kw)  # type: ignore[arg-type]


@dataclass
class Plane:
    router: Router
    run: CanaryRun
    clock: FakeClock
    sink: MemorySink
    rest: str
    grpc: str
    answers: list[tuple[str, int, str]] = field(default_factory=list)  # (what, status, version)

    @property
    def incidents(self) -> list[object]:
        return [e for e in self.sink.events if e[0] == "incident"]


@contextmanager
def plane(incumbent: bytes, candidate: bytes, cfg: CanaryConfig, seed: int = 7) -> Iterator[Plane]:
    sink = MemorySink()
    repo = ModelRepository(sink)
    router = repo.add(load_session(incumbent, name="m", version="1.0"), seed=seed)
    clock = FakeClock()
    run = CanaryRun("m", router, load_session(candidate, name="m", version="2.0"), cfg, clock, sink)
    with ServerThread(create_app(repo)) as rest, GrpcServer(repo, port=0) as grpc_server:
        run.start()
        yield Plane(router, run, clock, sink, rest.url, grpc_server.url)


def benign(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    """Inputs no variant here fails on or turns to NaN (|x| < 2.2 < every threshold)."""
    return np.clip(rng.normal(size=(n, 16)), -2.2, 2.2).astype(np.float32)


def poison(n: int = 1) -> np.ndarray:
    x = np.zeros((n, 16), np.float32)
    x[:, 0] = POISON
    return x


def drive(
    p: Plane,
    rng: np.random.Generator,
    attack: Callable[[int], None] | None = None,
    feed: Callable[[np.random.Generator], np.ndarray] = benign,
    max_ticks: int = 2_000,
) -> None:
    """Routed live traffic (100 requests per tick, in process on the served router), then the attacker."""
    for tick in range(max_ticks):
        if p.run.controller.final:
            return
        for _ in range(100):
            with contextlib.suppress(Exception):  # a failing routed request: an error answer
                p.router.infer({"input": feed(rng)})
        if attack is not None:
            attack(tick)
        p.clock.advance(0.5)
        p.run.tick()


def json_body(x: np.ndarray, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
    }
    body.update(extra)
    return body


def binary_post(http: httpx.Client, path: str, x: np.ndarray) -> httpx.Response:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            # NaN answers cannot travel as JSON: ask for binary outputs, as a well-behaved client would.
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return http.post(
        path, content=head + x.tobytes(), headers={"Inference-Header-Content-Length": str(len(head))}
    )


def version_of(resp: httpx.Response) -> str:
    if resp.status_code != 200:
        return ""
    try:
        return str(resp.json().get("model_version", ""))
    except (ValueError, UnicodeDecodeError):  # binary answers
        return "binary"


def assert_not_banned(p: Plane) -> None:
    assert p.run.phase is not Phase.ABORTED, (p.run.last, p.run.controller.history)
    assert not (p.run.last is not None and p.run.last.mark_bad)
    assert not p.incidents, p.incidents


# -- 1. pinning by every spelling the protocol offers ------------------------------------------------
REST_PINS = [
    "/v2/models/m/versions/2.0/infer",
    "/v2/models/M/versions/2.0/infer",
    "/v2/models/m/versions/2.0%20/infer",
    "/v2/models/m/versions/%202.0/infer",
    "/v2/models/m/versions/2%2E0/infer",
    "/v2/models/m/versions/2.0/infer/",
    "/v2/models/m%20/versions/2.0/infer",
    "/v2/models/m/versions/2.0/../2.0/infer",
    "/v2/models/m/versions/V2.0/infer",
]
ROUTED_PIN_HINTS: list[tuple[dict[str, str], dict[str, object]]] = [
    ({"model-version": "2.0", "x-model-version": "2.0", "triton-model-version": "2.0"}, {}),
    ({}, {"parameters": {"model_version": "2.0", "version": "2.0"}}),
    ({}, {"model_version": "2.0", "version": "2.0", "model_name": "m"}),
]


def rest_pin_attack(p: Plane, http: httpx.Client) -> Callable[[int], None]:
    def attack(tick: int) -> None:
        if tick >= 20:
            return
        for i, path in enumerate(REST_PINS):
            x = poison(4096 if (tick + i) % 5 == 0 else 1)  # failing rows, some in huge batches
            r = http.post(path, json=json_body(x))
            p.answers.append((path, r.status_code, version_of(r)))
            r = binary_post(http, path, x)
            p.answers.append((path + " (binary)", r.status_code, version_of(r)))
        for headers, extra in ROUTED_PIN_HINTS:
            # Routed requests with pin hints (failing inputs): a hint must not make them canary-only.
            r = http.post("/v2/models/m/infer", json=json_body(poison(), **extra), headers=headers)
            p.answers.append(("routed+hint", r.status_code, version_of(r)))

    return attack


def grpc_pin_attack(p: Plane, client: object) -> Callable[[int], None]:
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    def attack(tick: int) -> None:
        if tick >= 20:
            return
        for name, version in [("m", "2.0"), ("m", " 2.0"), ("m", "2.0 "), ("M", "2.0"), ("m", "2.00")]:
            x = poison(4096 if tick % 5 == 0 else 1)
            inp = tg.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            try:
                res = client.infer(name, [inp], model_version=version, parameters={"model_version": "2.0"})  # type: ignore[attr-defined]
                got = res.get_response().model_version
                p.answers.append((f"grpc {name!r} {version!r}", 200, str(got)))
            except InferenceServerException as exc:
                p.answers.append((f"grpc {name!r} {version!r}", -1, str(exc.status())))

    return attack


@pytest.mark.parametrize("allow_pin", [False, True])
def test_rest_and_grpc_pins_to_the_canary_are_never_evidence(allow_pin: bool) -> None:
    """Attack: pin failing requests and 4096-row batches to the canary by every REST/gRPC spelling."""
    import tritonclient.grpc as tg

    blob = erroring(3.0)
    with plane(blob, relabel(blob, "2.0"), config(allow_pin=allow_pin)) as p:
        meta = httpx.get(f"{p.rest}/v2/models/m", timeout=10).json()
        if not allow_pin:
            assert "2.0" not in meta["versions"]  # the canary version is not advertised
        with httpx.Client(base_url=p.rest, timeout=30) as http, tg.InferenceServerClient(p.grpc) as g:
            rest, grpc_ = rest_pin_attack(p, http), grpc_pin_attack(p, g)

            def attack(tick: int) -> None:
                rest(tick)
                grpc_(tick)

            drive(p, np.random.default_rng(1), attack)
        assert_not_banned(p)
        assert p.run.phase is Phase.PROMOTED, (p.run.last, p.run.controller.history)
    print(sorted(Counter((w, c, v) for (w, c, v) in p.answers).items()))
    if not allow_pin:
        # Refused, or an error answer: never a canary answer to a pinned request.
        leaked = [(w, c, v) for (w, c, v) in p.answers if c == 200 and v == "2.0" and "routed" not in w]
        assert not leaked, leaked[:5]


# -- 2. adversarial traffic through the routed path ---------------------------------------------------
class TimedAttacker:
    """Learns the canary's slot from ``model_version`` in answers, then fires payloads at it."""

    def __init__(
        self, http: httpx.Client, rng: np.random.Generator, payloads: list[Callable[[], httpx.Response]]
    ):
        self.http, self.rng, self.payloads = http, rng, payloads
        self.fired = 0
        self.on_target = 0  # a benign probe at the predicted slot was answered by the canary

    def routed(self) -> str:
        r = self.http.post("/v2/models/m/infer", json=json_body(benign(self.rng)))
        return version_of(r)

    def period(self, limit: int = 200) -> int | None:
        hits: list[int] = []
        for i in range(limit):
            if self.routed() == "2.0":
                hits.append(i)
                if len(hits) == 2:
                    return hits[1] - hits[0]
        return None

    def __call__(self, tick: int) -> None:
        if tick >= 30:
            return
        gap = self.period()
        if gap is None or gap > 100:
            return
        for k in range(len(self.payloads)):
            for _ in range(gap - 1):
                self.routed()
            if k == 0:  # check the prediction once per window with a benign probe
                self.on_target += self.routed() == "2.0"
                for _ in range(gap - 1):
                    self.routed()
            self.payloads[k]()
            self.fired += 1


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("fails-on-both-versions"),
        "client-errors-nan-and-clean-huge-batches",
    ],
)
def test_routed_requests_timed_to_the_canary_slot_cannot_ban_an_identical_candidate(kind: str) -> None:
    """Attack: at the canary's slots, send failing inputs or huge batches, malformed requests, NaN inputs."""
    import tritonclient.grpc as tg

    blob = erroring(3.0)
    with plane(blob, relabel(blob, "2.0"), config()) as p:
        statuses: list[int] = []
        with httpx.Client(base_url=p.rest, timeout=60) as http, tg.InferenceServerClient(p.grpc) as g:

            def post(body: object) -> httpx.Response:
                r = http.post("/v2/models/m/infer", json=body)
                statuses.append(r.status_code)
                return r

            def nan_grpc() -> httpx.Response:
                x = np.full((1, 16), np.nan, np.float32)
                inp = tg.InferInput("input", [1, 16], "FP32")
                inp.set_data_from_numpy(x)
                with contextlib.suppress(Exception):
                    g.infer("m", [inp])
                return httpx.Response(0)

            def nan_rest() -> httpx.Response:
                r = binary_post(http, "/v2/models/m/infer", np.full((2, 16), np.nan, np.float32))
                statuses.append(r.status_code)
                return r

            def field(name: str, datatype: str, n: int) -> dict[str, object]:
                return {"inputs": [{"name": name, "datatype": datatype, "shape": [1, 16], "data": [0] * n}]}

            huge = json.dumps(json_body(benign(np.random.default_rng(0), 8192))).encode()  # encoded once
            json_type = {"content-type": "application/json"}
            payloads: list[Callable[[], httpx.Response]] = (
                [
                    lambda: post(json_body(poison())),  # fails inside ONNX Runtime on both versions
                    lambda: post(json_body(poison(8192))),  # a huge batch holding failing rows
                ]
                if kind == "fails-on-both-versions"
                else [
                    lambda: post(json_body(np.zeros((1, 15), np.float32))),  # wrong shape
                    lambda: post(field("nope", "FP32", 16)),  # unknown input
                    lambda: post(field("input", "INT8", 16)),  # wrong datatype
                    lambda: post(field("input", "FP32", 3)),  # too few elements
                    lambda: http.post(
                        "/v2/models/m/infer", content=huge, headers=json_type
                    ),  # 8192 clean rows
                    nan_rest,
                    nan_grpc,
                ]
            )
            attacker = TimedAttacker(http, np.random.default_rng(5), payloads)
            drive(p, np.random.default_rng(2), attacker)
        print(f"timed attacker: fired {attacker.fired}, probes on the canary slot {attacker.on_target}")
        assert attacker.fired > 0 and attacker.on_target > 0  # the slot really was predictable
        assert_not_banned(p)
        assert p.run.phase is Phase.PROMOTED, (p.run.last, p.run.controller.history)
        if kind != "fails-on-both-versions":  # malformed requests are client errors (4xx)
            assert not [s for s in statuses if s >= 500], sorted(set(statuses))


# -- 3. a burst of concurrent clients ----------------------------------------------------------------------
def under_burst(p: Plane, trial: int) -> list[int]:
    """Drive the canary while six HTTP clients hammer the routed path (batches 1-256); their status codes."""
    stop = threading.Event()
    codes: list[int] = []

    def client(i: int) -> None:
        rng = np.random.default_rng(100 * trial + i)
        with httpx.Client(base_url=p.rest, timeout=60) as http:
            for _ in range(100_000):
                if stop.is_set():
                    return
                n = int(rng.choice([1, 1, 8, 64, 256]))
                try:
                    codes.append(http.post("/v2/models/m/infer", json=json_body(benign(rng, n))).status_code)
                except httpx.HTTPError:
                    codes.append(-1)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    try:
        drive(p, np.random.default_rng(trial))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    return codes


@pytest.mark.parametrize("trial", range(3))
def test_identical_candidate_survives_a_burst_of_concurrent_clients(trial: int) -> None:
    blob = linear_classifier(seed=0, hidden_layers=2)
    with plane(blob, relabel(blob, f"2.0 trial {trial}"), config(), seed=trial) as p:
        codes = under_burst(p, trial)
        assert codes and set(codes) == {200}
        assert_not_banned(p)
        assert p.run.phase is Phase.PROMOTED, (p.run.last, p.run.controller.history)


def test_a_clearly_slower_candidate_is_still_aborted_under_the_same_burst() -> None:
    """Under-reaction: the burst's noise must not hide a candidate doing several times the work."""
    base = linear_classifier(seed=0, hidden_layers=2)
    slow = slow_classifier(seed=0, hidden_layers=2, extra_layers=8, extra_size=512)  # same answers, >3x work
    with plane(base, slow, config()) as p:
        under_burst(p, 9)
        assert p.run.phase is Phase.ABORTED, (p.run.last, p.run.controller.history)
        assert p.run.last is not None and "latency" in [
            g.gate for g in p.run.last.gates if g.verdict == "fail"
        ]


# -- 4. under-reaction -------------------------------------------------------------------------------------
def normal(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(size=(1, 16)).astype(np.float32)


@pytest.mark.parametrize(
    ("what", "candidate"),
    [
        ("1 % of requests fail", erroring(Z1)),
        pytest.param("1 % of answers are NaN", nan_on_tail(Z1)),
    ],
)
def test_a_candidate_bad_on_one_percent_of_requests_is_aborted(what: str, candidate: bytes) -> None:
    with plane(linear_classifier(seed=0, hidden_layers=HIDDEN), candidate, config()) as p:
        drive(p, np.random.default_rng(3), feed=normal)
        with httpx.Client(base_url=p.rest, timeout=10) as http:  # strict JSON whatever the model returned
            tail = np.zeros((1, 16), np.float32)
            tail[0, 0] = 5.0
            r = http.post("/v2/models/m/infer", json=json_body(tail))
            if r.status_code == 200:
                json.loads(r.text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        assert p.run.phase is Phase.ABORTED, (what, p.run.last, p.run.controller.history)
        assert p.run.last is not None and p.run.last.mark_bad
        assert len(p.incidents) == 1


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/v2/models/m/versions/1.0/infer", id="pinned-to-incumbent"),
        pytest.param("/v2/models/m/infer", id="routed"),
    ],
)
def test_flooding_the_incumbent_with_errors_does_not_let_a_one_percent_failing_candidate_through(
    path: str,
) -> None:
    """Attack: raise the incumbent's error rate with failing inputs (~10 % of traffic) to widen the margin."""
    incumbent = erroring(POISON - 1)  # fails only on the attacker's inputs, like the candidate
    candidate = erroring(Z1)  # also fails on 1 % of real traffic
    with plane(incumbent, candidate, config()) as p, httpx.Client(base_url=p.rest, timeout=30) as http:

        def attack(tick: int) -> None:
            for _ in range(10):
                http.post(path, json=json_body(poison()))

        drive(p, np.random.default_rng(4), attack, feed=normal)
        assert p.run.phase is Phase.ABORTED, (p.run.last, p.run.controller.history)
