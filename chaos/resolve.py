"""Resolve an experiment the way chaoslib will at run time, without running or importing anything.

Pre-flight judges what Chaos Toolkit will execute, not the text: chaoslib substitutes ``$name`` and
``${name}`` (``string.Template``; a whole-string ``${name}`` keeps the value's type) from the
configuration and from every secret scope (``ChainMap(configuration, *secrets.values())``), in
activity arguments, HTTP URLs/headers/timeouts, pauses and control arguments. This module mirrors
chaoslib 1.45 exactly and reuses its own pure string substitution (:func:`chaoslib.substitute_string`);
``tests/test_preflight_resolve.py`` checks the mirror against chaoslib's functions differentially.

What only exists at run time becomes an :class:`Unresolved` marker: environment configuration and
secrets (the device's environment is not part of the document), vault secrets, dynamic configuration
(probes), and the configuration keys the device itself sets (:data:`DEVICE_KEYS`). A string that embeds
a marker is a marker. Pre-flight escalates anything it needs that is a marker.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from chaoslib import substitute_string

__all__ = [
    "DEVICE_KEYS",
    "FORBIDDEN_KEYS",
    "Resolution",
    "Unresolved",
    "contains_unresolved",
    "resolve_document",
]

DEVICE_KEYS: frozenset[str] = frozenset(
    {
        "state_dir",
        "toxiproxy_url",
        "toxiproxy_host",
        "toxiproxy_port",
        "toxiproxy_timeout_s",
        "serving_url",
        "serving_restart",
        "uplink_proxy",
        "uplink_upstream",
    }
)
"""Configuration keys the runner sets from the device's configuration (whatever the document says)."""

FORBIDDEN_KEYS: frozenset[str] = frozenset(
    {"state_dir", "serving_restart", "uplink_proxy", "uplink_upstream"}
)
"""Device settings an experiment may not even name: what the runner executes (``serving_restart``),
which files it touches (``state_dir``) and which link is which. The others (the Toxiproxy endpoint,
the serving URL) may appear for the plain ``chaos run`` command; the guarded runner replaces them."""


class Unresolved:
    """A value only known at run time (``expr`` says where it comes from)."""

    __slots__ = ("expr",)

    def __init__(self, expr: str) -> None:
        self.expr = expr

    def __repr__(self) -> str:
        return f"<run-time {self.expr}>"


def contains_unresolved(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is, or holds somewhere inside it, an :class:`Unresolved` marker."""
    if isinstance(value, Unresolved):
        return True
    if depth > 200:
        return True
    if isinstance(value, Mapping):
        return any(contains_unresolved(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return any(contains_unresolved(v, depth + 1) for v in value)
    return False


class _Recorder(Mapping[str, Any]):
    """The substitution mapping; notes whether a lookup returned run-time data."""

    def __init__(self, chain: ChainMap[str, Any]) -> None:
        self.chain = chain
        self.hit: str | None = None

    def __getitem__(self, key: str) -> Any:
        value = self.chain[key]  # KeyError when absent: chaoslib leaves the pattern as text
        if contains_unresolved(value):
            self.hit = key
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.chain)

    def __len__(self) -> int:
        return len(self.chain)


@dataclass
class Resolution:
    """The configuration and secrets chaoslib will hold, and substitution over them."""

    configuration: dict[str, Any]
    secrets: dict[str, Any]
    problems: list[tuple[str, str]] = field(default_factory=list)
    """``(path, why)`` for resolution that chaoslib itself would fail on (pre-flight escalates)."""
    external: list[tuple[str, str]] = field(default_factory=list)
    """``(path, type)`` of secrets fetched from outside the device (vault, ...)."""
    device_keys_set: list[str] = field(default_factory=list)
    """Device-owned configuration keys the document tried to set."""

    def __post_init__(self) -> None:
        self.rebuild()

    def rebuild(self) -> None:
        """(Re)build the substitution mapping: ``ChainMap(configuration, *secrets.values())``."""
        scopes: list[Any] = [v for v in self.secrets.values() if isinstance(v, Mapping)]
        self._mapping = _Recorder(ChainMap(self.configuration, *scopes))

    def substitute(self, value: Any) -> Any:
        """``value`` after chaoslib's substitution (a string that used run-time data is a marker)."""
        if not value:
            return value
        if isinstance(value, str):
            return self._string(value)
        if isinstance(value, dict):
            return self._dict(value)
        if isinstance(value, list):
            return self._seq(value)
        return value

    def _string(self, text: str) -> Any:
        if "$" not in text:
            return text  # Template leaves such a string unchanged; skip its cost
        self._mapping.hit = None
        out = substitute_string(text, self._mapping)
        hit = self._mapping.hit
        if hit is None or contains_unresolved(out):
            return out
        return Unresolved(f"{text!r} uses {hit}")  # run-time data embedded in a string

    def _dict(self, data: dict[str, Any]) -> dict[str, Any]:
        if not data:
            return data
        out: dict[str, Any] = {}
        for k, v in data.items():
            if isinstance(v, str):
                out[k] = self._string(v)
            elif isinstance(v, list | tuple):
                out[k] = self._seq(v)
            elif isinstance(v, dict):
                out[k] = self._dict(v)
            else:
                out[k] = v
        return out

    def _seq(self, data: list[Any] | tuple[Any, ...]) -> list[Any] | tuple[Any, ...]:
        if not data:
            return data
        out: list[Any] = []
        for v in data:
            if isinstance(v, str):
                out.append(self._string(v))
            elif isinstance(v, list | tuple):
                out.append(self._seq(v))
            elif isinstance(v, dict):
                out.append(self._dict(v))
            else:
                out.append(v)
        return out


def _configuration(conf: Mapping[str, Any], res: Resolution) -> None:
    """Mirror of ``chaoslib.configuration.load_configuration`` + ``load_dynamic_configuration``."""
    for key, value in conf.items():
        if key in DEVICE_KEYS:
            if key in FORBIDDEN_KEYS:
                res.device_keys_set.append(key)
            continue
        if isinstance(value, dict) and "type" in value:
            if value["type"] == "env":
                res.configuration[key] = Unresolved(f"configuration.{key} (environment {value.get('key')!r})")
            elif value["type"] == "probe":
                res.configuration[key] = Unresolved(f"configuration.{key} (dynamic: a probe's output)")
            else:
                res.configuration[key] = value
        else:
            res.configuration[key] = value
    for key in DEVICE_KEYS:
        res.configuration[key] = Unresolved(f"device setting {key}")


def _secrets(info: Mapping[str, Any], path: str, res: Resolution, depth: int = 0) -> dict[str, Any]:
    """Mirror of ``chaoslib.secret.load_secrets`` (recursive; env and vault at any depth)."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        where = f"{path}.{key}"
        if isinstance(value, dict):
            kind = value.get("type")
            if kind == "env":
                out[key] = Unresolved(f"{where} (environment {value.get('key')!r})")
            elif kind == "vault":
                res.external.append((where, "vault"))
                out[key] = Unresolved(f"{where} (vault)")
            elif depth > 64:
                out[key] = Unresolved(f"{where} (nested too deep)")
            else:
                out[key] = _secrets(value, where, res, depth + 1)
        else:
            out[key] = value
    return out


def resolve_document(doc: Mapping[str, Any]) -> Resolution:
    """What chaoslib will hold as configuration and secrets when it runs ``doc`` under our runner."""
    res = Resolution({}, {})
    conf = doc.get("configuration")
    _configuration(conf if isinstance(conf, Mapping) else {}, res)
    secrets = doc.get("secrets")
    res.secrets = _secrets(secrets, "secrets", res) if isinstance(secrets, Mapping) else {}
    for scope, value in res.secrets.items():
        if not isinstance(value, Mapping):
            # chaoslib builds ChainMap(configuration, *secrets.values()): a scope that is not a mapping
            # makes every later lookup fail in ways pre-flight cannot predict
            res.problems.append((f"secrets.{scope}", "a secret scope that is not a mapping of names"))
    res.rebuild()
    return res
