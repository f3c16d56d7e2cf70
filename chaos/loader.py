"""Loading Chaos Toolkit experiment files (JSON or YAML) safely, with precise errors and a content hash.

Why not ``chaoslib.loader`` + ``ensure_experiment_is_valid``: chaoslib's validation imports every
Python provider module, resolves environment configuration and secrets and loads controls, i.e. it runs
code chosen by the author. Pre-flight must look at the raw document before any of that, so this module
parses with ``yaml.safe_load`` (JSON is YAML), checks the structure itself and names the exact place of
every problem: ``FILE: method[2].provider.module: expected a non-empty string, got 42``.

The content hash (:func:`experiment_hash`) is the sha256 of the canonical JSON of the parsed document
(sorted keys, no whitespace, UTF-8): the same experiment in YAML or JSON, reformatted or with its keys
reordered, has the same hash, and any change of meaning changes it. Approvals bind to this hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sre_core.errors import InputError

__all__ = [
    "MAX_ACTIVITIES",
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "Experiment",
    "ExperimentError",
    "Problem",
    "canonical_json",
    "experiment_hash",
    "iter_activities",
    "load_experiment",
    "parse_experiment",
]

MAX_BYTES = 1 << 20
"""Largest experiment file accepted (1 MiB)."""
MAX_NODES = 50_000
"""Most values (after YAML alias expansion) in one experiment: bounds the cost of every later walk."""
MAX_DEPTH = 64
MAX_ACTIVITIES = 500
"""Most activities (all sections together) in one experiment."""

_TOP_KEYS = {
    "version": "a string",
    "title": "a non-empty string",
    "description": "a string",
    "tags": "a list of strings",
    "contributions": "a mapping",
    "configuration": "a mapping",
    "secrets": "a mapping",
    "extensions": "a list of mappings with a 'name'",
    "steady-state-hypothesis": "a mapping with 'title' and 'probes'",
    "method": "a non-empty list of activities",
    "rollbacks": "a list of activities",
    "controls": "a list of controls",
    "runtime": "a mapping",
    "dry": "a value",
}
_PROVIDER_TYPES = ("python", "process", "http")
_SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_COMPOSE_SAFE = 5000
"""Every YAML collection starts at one of ``[{-:?``: with fewer of them than this the composer cannot
nest deep enough to overflow the C stack (measured: 20,000 levels compose; 100,000 crash)."""
_ACTIVITY_KEYS = (
    "type",
    "name",
    "provider",
    "tolerance",
    "pauses",
    "background",
    "controls",
    "timeout",
    "description",
    "configuration",
    "secrets",
    "extensions",
)
_PROVIDER_KEYS = {
    "python": ("type", "module", "func", "arguments", "secrets"),
    "process": ("type", "path", "arguments", "secrets", "timeout"),
    "http": (
        "type",
        "url",
        "method",
        "headers",
        "arguments",
        "timeout",
        "expected_status",
        "verify_tls",
        "secrets",
    ),
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a document: where (a path inside it) and what was expected."""

    path: str
    expected: str
    got: str = ""

    def __str__(self) -> str:
        return f"{self.path or '<document>'}: expected {self.expected}" + (
            f", got {self.got}" if self.got else ""
        )


class ExperimentError(InputError):
    """An experiment file that cannot be loaded or is not a valid experiment (exit 2).

    Attributes:
        source: the file (or label) the document came from.
        problems: every structural problem found, each with its path inside the document.
    """

    def __init__(self, source: str, problems: list[Problem], why: str = "") -> None:
        self.source = source
        self.problems = problems
        lines = why or "\n".join(f"{source}: {p}" for p in problems)
        super().__init__(
            f"load experiment {source}",
            lines if why else "\n" + lines,
            "correct the experiment (Chaos Toolkit format; see experiments/README.md)",
        )


@dataclass(frozen=True)
class Experiment:
    """A parsed, structurally valid experiment document. Nothing in it has been imported or run."""

    source: str
    raw: dict[str, Any]
    hash: str
    format: str
    size: int = 0
    warnings: tuple[str, ...] = field(default=())

    @property
    def title(self) -> str:
        return str(self.raw.get("title", ""))

    @property
    def description(self) -> str:
        return str(self.raw.get("description", ""))


def canonical_json(doc: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, compact separators, UTF-8, no NaN."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def experiment_hash(doc: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON of a parsed experiment."""
    return "sha256:" + hashlib.sha256(canonical_json(doc)).hexdigest()


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    shown = json.dumps(value, default=str)
    if len(shown) > 50:
        shown = shown[:47] + "..."
    return f"{type(value).__name__} {shown}"


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _check_json(value: Any, path: str, problems: list[Problem], budget: list[int], depth: int = 0) -> None:
    """Only JSON values (YAML dates, sets, non-string keys, NaN are refused); bounded size and depth."""
    budget[0] -= 1
    if budget[0] < 0:
        if budget[0] == -1:
            problems.append(Problem(path, f"at most {MAX_NODES} values in the document"))
        return
    if depth > MAX_DEPTH:
        problems.append(Problem(path, f"nesting at most {MAX_DEPTH} deep"))
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                problems.append(Problem(path, "string keys", f"key {_fmt(k)}"))
                continue
            _check_json(v, _child(path, k), problems, budget, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, _child(path, i), problems, budget, depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            problems.append(Problem(path, "a finite number", _fmt(value)))
    elif not (value is None or isinstance(value, str | int | bool)):
        problems.append(
            Problem(path, "a JSON value (string, number, boolean, null, list, mapping)", _fmt(value))
        )


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_activity(act: Any, path: str, problems: list[Problem], probe_only: bool = False) -> None:
    if not isinstance(act, dict):
        problems.append(Problem(path, "an activity (a mapping) or a {ref: name}", _fmt(act)))
        return
    if "ref" in act:
        if not _nonempty_str(act["ref"]):
            problems.append(Problem(_child(path, "ref"), "the name of another activity", _fmt(act["ref"])))
        return
    for key in act:
        if key not in _ACTIVITY_KEYS:
            # a misspelt key must not silently change what runs (e.g. `provder`, `pause`)
            problems.append(Problem(_child(path, key), "an activity key (" + ", ".join(_ACTIVITY_KEYS) + ")"))
    kind = act.get("type")
    allowed = ("probe",) if probe_only else ("probe", "action")
    if kind not in allowed:
        problems.append(Problem(_child(path, "type"), " or ".join(repr(a) for a in allowed), _fmt(kind)))
    if not _nonempty_str(act.get("name")):
        problems.append(Problem(_child(path, "name"), "a non-empty string", _fmt(act.get("name"))))
    _check_provider(act.get("provider"), _child(path, "provider"), problems)
    if "timeout" in act and not (_is_number(act["timeout"]) and act["timeout"] > 0):
        problems.append(
            Problem(_child(path, "timeout"), "a positive number of seconds", _fmt(act["timeout"]))
        )
    if "background" in act and not isinstance(act["background"], bool):
        problems.append(Problem(_child(path, "background"), "true or false", _fmt(act["background"])))
    pauses = act.get("pauses")
    if pauses is not None:
        if not isinstance(pauses, dict):
            problems.append(Problem(_child(path, "pauses"), "a mapping with 'before'/'after'", _fmt(pauses)))
        else:
            for k, v in pauses.items():
                p = _child(_child(path, "pauses"), k)
                if k not in ("before", "after"):
                    problems.append(Problem(p, "only 'before' or 'after'"))
                elif not (
                    (_is_number(v) and v >= 0)
                    or (isinstance(v, str) and v.startswith("${") and v.endswith("}"))
                ):
                    problems.append(Problem(p, "seconds (>= 0) or a ${variable}", _fmt(v)))
    if "controls" in act:
        _check_controls(act["controls"], _child(path, "controls"), problems)
    tol = act.get("tolerance")
    if isinstance(tol, dict) and tol.get("type") == "probe":
        _check_activity(tol, _child(path, "tolerance"), problems, probe_only=True)


def _check_tolerance(tol: Any, path: str, problems: list[Problem]) -> None:
    """Mirror of chaoslib's ``ensure_hypothesis_tolerance_is_valid`` (the parts that import nothing)."""
    if isinstance(tol, float) or tol is None:
        problems.append(Problem(path, "a boolean, integer, string, list or mapping", _fmt(tol)))
        return
    if not isinstance(tol, dict):
        return
    kind = tol.get("type")
    if kind == "range":
        rng = tol.get("range")
        if not (isinstance(rng, list) and len(rng) == 2 and all(_is_number(x) for x in rng)):
            problems.append(Problem(_child(path, "range"), "[lower, upper] numbers", _fmt(rng)))
    elif kind == "regex":
        pattern = tol.get("pattern")
        try:
            import re

            re.compile(pattern)  # type: ignore[arg-type,type-var]
        except (TypeError, re.error):
            problems.append(Problem(_child(path, "pattern"), "a valid regular expression", _fmt(pattern)))
    elif kind == "jsonpath":
        if not _nonempty_str(tol.get("path")):
            problems.append(Problem(_child(path, "path"), "a JSON path", _fmt(tol.get("path"))))
    elif kind != "probe":
        problems.append(Problem(_child(path, "type"), "probe, regex, jsonpath or range", _fmt(kind)))


def _check_provider(prov: Any, path: str, problems: list[Problem]) -> None:
    if not isinstance(prov, dict):
        problems.append(Problem(path, "a provider mapping with a 'type'", _fmt(prov)))
        return
    ptype = prov.get("type")
    if ptype not in _PROVIDER_TYPES:
        problems.append(Problem(_child(path, "type"), "one of 'python', 'process', 'http'", _fmt(ptype)))
        return
    for key in prov:
        if key not in _PROVIDER_KEYS[ptype]:
            problems.append(
                Problem(
                    _child(path, key), f"a {ptype} provider key (" + ", ".join(_PROVIDER_KEYS[ptype]) + ")"
                )
            )
    if ptype == "python":
        for key in ("module", "func"):
            if not _nonempty_str(prov.get(key)):
                problems.append(Problem(_child(path, key), "a non-empty string", _fmt(prov.get(key))))
        if "arguments" in prov and not isinstance(prov["arguments"], dict):
            problems.append(Problem(_child(path, "arguments"), "a mapping", _fmt(prov["arguments"])))
    elif ptype == "process":
        if not _nonempty_str(prov.get("path")):
            problems.append(Problem(_child(path, "path"), "a non-empty string", _fmt(prov.get("path"))))
        if "arguments" in prov and not isinstance(prov["arguments"], str | list | dict):
            problems.append(
                Problem(_child(path, "arguments"), "a string, list or mapping", _fmt(prov["arguments"]))
            )
    else:
        if not _nonempty_str(prov.get("url")):
            problems.append(Problem(_child(path, "url"), "a non-empty URL", _fmt(prov.get("url"))))
        if "method" in prov and not _nonempty_str(prov["method"]):
            problems.append(Problem(_child(path, "method"), "an HTTP method", _fmt(prov["method"])))
        if "headers" in prov and not isinstance(prov["headers"], dict):
            problems.append(Problem(_child(path, "headers"), "a mapping", _fmt(prov["headers"])))
    if "timeout" in prov:
        t = prov["timeout"]
        ok = (_is_number(t) and t > 0) or (
            isinstance(t, list) and len(t) == 2 and all(_is_number(x) and x > 0 for x in t)
        )
        if not ok:
            problems.append(Problem(_child(path, "timeout"), "positive seconds or [connect, read]", _fmt(t)))


def _check_controls(controls: Any, path: str, problems: list[Problem]) -> None:
    if not isinstance(controls, list):
        problems.append(Problem(path, "a list of controls", _fmt(controls)))
        return
    for i, ctl in enumerate(controls):
        p = _child(path, i)
        if not isinstance(ctl, dict):
            problems.append(Problem(p, "a control mapping with 'name' and 'provider'", _fmt(ctl)))
            continue
        if not _nonempty_str(ctl.get("name")):
            problems.append(Problem(_child(p, "name"), "a non-empty string", _fmt(ctl.get("name"))))
        prov = ctl.get("provider")
        if (
            not isinstance(prov, dict)
            or prov.get("type") != "python"
            or not _nonempty_str(prov.get("module"))
        ):
            problems.append(Problem(_child(p, "provider"), "{type: python, module: ...}", _fmt(prov)))


def _names(doc: dict[str, Any]) -> set[str]:
    return {
        str(act["name"])
        for _, act in iter_activities(doc)
        if isinstance(act, dict) and "ref" not in act and isinstance(act.get("name"), str)
    }


def validate_structure(doc: Any) -> list[Problem]:
    """Every structural problem of a parsed document (empty when it is a valid experiment)."""
    problems: list[Problem] = []
    budget = [MAX_NODES]
    _check_json(doc, "", problems, budget)
    if problems:
        return problems
    if not isinstance(doc, dict):
        return [Problem("", "a mapping (an experiment object)", _fmt(doc))]
    for key in doc:
        if key not in _TOP_KEYS:
            problems.append(Problem(key, "a known experiment key (" + ", ".join(sorted(_TOP_KEYS)) + ")"))
    if not _nonempty_str(doc.get("title")):
        problems.append(Problem("title", "a non-empty string", _fmt(doc.get("title"))))
    # chaoslib refuses to run an experiment without a description (ensure_experiment_is_valid)
    if not _nonempty_str(doc.get("description")):
        problems.append(
            Problem(
                "description", "a non-empty string (Chaos Toolkit requires one)", _fmt(doc.get("description"))
            )
        )
    if "version" in doc and not isinstance(doc["version"], str):
        problems.append(Problem("version", "a string", _fmt(doc["version"])))
    tags = doc.get("tags", [])
    if not (isinstance(tags, list) and all(_nonempty_str(t) for t in tags)):
        problems.append(Problem("tags", "a list of non-empty strings", _fmt(tags)))
    for key in ("configuration", "secrets", "contributions", "runtime"):
        if key in doc and not isinstance(doc[key], dict):
            problems.append(Problem(key, "a mapping", _fmt(doc[key])))
    conf = doc.get("configuration")
    if isinstance(conf, dict):
        for k, v in conf.items():
            if isinstance(v, dict) and v.get("type") == "probe":
                _check_activity(v, _child("configuration", k), problems, probe_only=True)
            elif isinstance(v, dict) and v.get("type") == "env" and not _nonempty_str(v.get("key")):
                problems.append(
                    Problem(_child(_child("configuration", k), "key"), "an environment variable name")
                )
    ext = doc.get("extensions", [])
    if not isinstance(ext, list):
        problems.append(Problem("extensions", "a list of mappings with a 'name'", _fmt(ext)))
    else:
        for i, e in enumerate(ext):
            if not (isinstance(e, dict) and _nonempty_str(e.get("name"))):
                problems.append(Problem(_child("extensions", i), "a mapping with a 'name'", _fmt(e)))
    ssh = doc.get("steady-state-hypothesis")
    if ssh is not None:
        if not isinstance(ssh, dict):
            problems.append(
                Problem("steady-state-hypothesis", "a mapping with 'title' and 'probes'", _fmt(ssh))
            )
        else:
            if not _nonempty_str(ssh.get("title")):
                problems.append(
                    Problem("steady-state-hypothesis.title", "a non-empty string", _fmt(ssh.get("title")))
                )
            probes = ssh.get("probes", [])
            if not isinstance(probes, list):
                problems.append(Problem("steady-state-hypothesis.probes", "a list of probes", _fmt(probes)))
            else:
                for i, act in enumerate(probes):
                    p = f"steady-state-hypothesis.probes[{i}]"
                    _check_activity(act, p, problems, probe_only=True)
                    if isinstance(act, dict) and "ref" not in act and "tolerance" not in act:
                        problems.append(
                            Problem(_child(p, "tolerance"), "a tolerance (a hypothesis probe needs one)")
                        )
                    elif isinstance(act, dict) and "tolerance" in act:
                        _check_tolerance(act["tolerance"], _child(p, "tolerance"), problems)
            if "controls" in ssh:
                _check_controls(ssh["controls"], "steady-state-hypothesis.controls", problems)
            for key in ssh:
                if key not in ("title", "probes", "controls"):
                    problems.append(
                        Problem(
                            _child("steady-state-hypothesis", key),
                            "a hypothesis key (title, probes, controls)",
                        )
                    )
    method = doc.get("method")
    if not (isinstance(method, list) and method):
        problems.append(Problem("method", "a non-empty list of activities", _fmt(method)))
    else:
        for i, act in enumerate(method):
            _check_activity(act, f"method[{i}]", problems)
    rollbacks = doc.get("rollbacks", [])
    if not isinstance(rollbacks, list):
        problems.append(Problem("rollbacks", "a list of activities", _fmt(rollbacks)))
    else:
        for i, act in enumerate(rollbacks):
            _check_activity(act, f"rollbacks[{i}]", problems)
    if "controls" in doc:
        _check_controls(doc["controls"], "controls", problems)
    if problems:
        return problems
    count = sum(1 for _ in iter_activities(doc))
    if count > MAX_ACTIVITIES:
        return [Problem("", f"at most {MAX_ACTIVITIES} activities", f"{count}")]
    names = _names(doc)
    referenced = {a["ref"] for _, a in iter_activities(doc) if isinstance(a, dict) and "ref" in a}
    first: dict[str, str] = {}
    for path, act in iter_activities(doc):
        name = act.get("name") if isinstance(act, dict) and "ref" not in act else None
        if isinstance(name, str) and name in referenced:
            if name in first:
                # chaoslib resolves a ref to the *last* definition: an ambiguous ref could hide an activity
                problems.append(
                    Problem(
                        _child(path, "name"),
                        f"a unique name ({name!r} is referenced and defined at {first[name]})",
                    )
                )
            first.setdefault(name, path)
    for path, act in iter_activities(doc):
        if isinstance(act, dict) and "ref" in act and act["ref"] not in names:
            problems.append(
                Problem(
                    _child(path, "ref"), "the name of an activity defined in the experiment", _fmt(act["ref"])
                )
            )
    return problems


def iter_activities(doc: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every activity slot of a document with its path, in execution-ish order.

    Yields configuration probes, hypothesis probes (and their tolerance probes), method, rollbacks
    (each activity followed by its tolerance probe). Controls are not activities (see the pre-flight).
    """
    conf = doc.get("configuration")
    if isinstance(conf, dict):
        for k, v in conf.items():
            if isinstance(v, dict) and v.get("type") == "probe":
                yield _child("configuration", k), v
    ssh = doc.get("steady-state-hypothesis")
    sections: list[tuple[str, Any]] = []
    if isinstance(ssh, dict):
        sections.append(("steady-state-hypothesis.probes", ssh.get("probes")))
    sections += [("method", doc.get("method")), ("rollbacks", doc.get("rollbacks"))]
    for base, items in sections:
        if not isinstance(items, list):
            continue
        for i, act in enumerate(items):
            path = f"{base}[{i}]"
            yield path, act
            tol = act.get("tolerance") if isinstance(act, dict) else None
            if isinstance(tol, dict) and tol.get("type") == "probe":
                yield _child(path, "tolerance"), tol


def _check_yaml_depth(text: str, source: str) -> None:
    """Refuse YAML nested deeper than :data:`MAX_DEPTH` before composing it.

    libyaml's composer recurses in C: a megabyte of ``- - - ...`` or ``[[[...`` overflows the C stack
    and kills the process (no Python exception). The event stream is produced iteratively, so the depth
    is measured on it first.
    """
    depth = 0
    for event in yaml.parse(text, Loader=_SAFE_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ExperimentError(source, [], f"nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_experiment(data: bytes | str, source: str, fmt: str | None = None) -> Experiment:
    """Parse and validate experiment text.

    Args:
        data: the file content (JSON or YAML).
        source: a label for messages (usually the path).
        fmt: ``"json"`` or ``"yaml"``; default: guessed from ``source``'s suffix (JSON is valid YAML).

    Raises:
        ExperimentError: too large, not UTF-8, not YAML/JSON, or not a valid experiment; the message
            names each problem's path inside the document and what was expected.
    """
    raw_bytes = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw_bytes) > MAX_BYTES:
        raise ExperimentError(source, [], f"file is {len(raw_bytes)} bytes; at most {MAX_BYTES} are accepted")
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ExperimentError(source, [], f"not UTF-8 text: {exc}") from exc
    if fmt is None:
        fmt = "json" if source.lower().endswith(".json") else "yaml"
    try:
        # CSafeLoader is libyaml's safe loader (same constructors as safe_load, ~10x faster)
        if fmt != "json" and sum(text.count(c) for c in "[{-:?") > _COMPOSE_SAFE:
            _check_yaml_depth(text, source)
        doc: Any = json.loads(text) if fmt == "json" else yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ExperimentError(source, [], f"not valid JSON at {where}: {exc.msg}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ExperimentError(source, [], f"not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    except RecursionError as exc:
        raise ExperimentError(source, [], f"nested deeper than {MAX_DEPTH} levels") from exc
    except (ValueError, OverflowError) as exc:
        # e.g. an integer of thousands of digits (Python refuses to convert it): a refusal, not a crash
        raise ExperimentError(source, [], f"a value cannot be read: {str(exc)[:200]}") from exc
    try:
        problems = validate_structure(doc)
        if problems:
            raise ExperimentError(source, problems)
        digest = experiment_hash(doc)
    except (RecursionError, ValueError, OverflowError) as exc:
        raise ExperimentError(source, [], f"the document cannot be judged: {str(exc)[:200]}") from exc
    return Experiment(source=source, raw=doc, hash=digest, format=fmt, size=len(raw_bytes))


def load_experiment(path: Path) -> Experiment:
    """Read and validate an experiment file (``.json``, ``.yaml`` or ``.yml``).

    Raises:
        ExperimentError: unreadable, too large or invalid (see :func:`parse_experiment`).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise ExperimentError(str(p), [], f"file is {size} bytes; at most {MAX_BYTES} are accepted")
        with p.open("rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ExperimentError(str(p), [], f"cannot read it: {exc.strerror or exc}") from exc
    return parse_experiment(data, str(p))
