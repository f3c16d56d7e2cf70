"""Loading policy documents (YAML or JSON) into typed models with precise errors.

A policy file overlays the shipped default of its kind (:mod:`policies.kinds`): an SRE writes only what
changes. Sections (typed sub-documents such as ``guardrails``) merge key by key; collections (lists, and
maps keyed by names such as the chaos ``activities`` catalogue or the verification ``checks``) replace
the default's whole, so leaving an entry out removes it rather than silently keeping the default's.
"""

from __future__ import annotations

import json
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from sre_core.errors import InputError

__all__ = [
    "PolicyModel",
    "default_text",
    "format_validation_error",
    "load_default",
    "load_document",
    "overlay",
    "parse_document",
]


class PolicyModel(BaseModel):
    """Base for policy documents: unknown keys are errors (a typo must not silently disable a guard)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a document may hold at ``loc`` (empty when the path leaves typed sections)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            return []
        current = _section_model(current.model_fields[part].annotation)
    return sorted(current.model_fields) if current is not None else []


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """One line per problem: ``source: a.b[2].c = <value>: expected ...`` (unknown keys: the closest)."""
    import difflib

    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        value = err.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if len(shown) > 60:
            shown = shown[:57] + "..."
        msg = err["msg"]
        if err["type"] == "extra_forbidden" and model is not None:
            known = _keys_at(model, tuple(err["loc"][:-1]))
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1, cutoff=0.5)
            msg = "unknown key" + (f"; did you mean '{close[0]}'?" if close else "")
            if known:
                msg += f" (keys here: {', '.join(known)})"
        lines.append(f"{source}: {loc or '<document>'} = {shown}: {msg}")
    return "\n".join(lines)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a typed section (``Guardrails`` or ``Guardrails | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return found[0] if len(found) == 1 else None
    return None


def overlay(model: type[BaseModel], base: Any, top: Any) -> Any:
    """``top`` over ``base``: typed sections merge recursively, everything else in ``top`` replaces."""
    if not isinstance(base, dict) or not isinstance(top, dict):
        return top
    out = dict(base)
    for key, value in top.items():
        field = model.model_fields.get(key)
        sub = _section_model(field.annotation) if field is not None else None
        if sub is not None and isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = overlay(sub, out[key], value)
        else:
            out[key] = value
    return out


def _load_yaml(text: str, source: str) -> Any:
    try:
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"load policy {source}", f"not valid YAML/JSON: {exc}", "fix the syntax") from exc
    return {} if raw is None else raw


def _validate[M: BaseModel](model: type[M], raw: Any, source: str) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise InputError(
            f"load policy {source}",
            "\n" + format_validation_error(exc, source, model),
            f"correct the document against the {model.__name__} schema "
            "(`sre-agent policy show KIND` prints the defaults it overlays)",
        ) from exc


def parse_document[M: BaseModel](model: type[M], text: str, source: str, *, defaults: bool = True) -> M:
    """Parse YAML/JSON text into ``model``, overlaid on the kind's shipped default when it has one.

    Args:
        defaults: False to validate the text alone (the shipped defaults themselves).

    Raises:
        InputError: the text is not YAML/JSON, is not a mapping, or does not match the model.
    """
    raw = _load_yaml(text, source)
    if defaults:
        from policies.kinds import kind_of_model

        kind = kind_of_model(model)
        if kind is not None:
            if not isinstance(raw, dict):
                raise InputError(
                    f"load policy {source}",
                    f"the document is a {type(raw).__name__}, not a mapping of keys",
                    f"write `key: value` lines; `sre-agent policy show {kind.name}` prints the defaults",
                )
            raw = overlay(model, _load_yaml(default_text(kind.name), f"defaults/{kind.name}.yaml"), raw)
    return _validate(model, raw, source)


def load_document[M: BaseModel](model: type[M], path: Path) -> M:
    """Load a policy file overlaid on its kind's shipped default. Raises InputError if unreadable/invalid."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"load policy {path}", str(exc), "check the path") from exc
    return parse_document(model, text, str(path))


def default_text(name: str) -> str:
    """The text of the shipped default document ``policies/defaults/<name>.yaml``."""
    return resources.files("policies").joinpath("defaults", f"{name}.yaml").read_text(encoding="utf-8")


def load_default[M: BaseModel](model: type[M], name: str) -> M:
    """Load the shipped default document ``policies/defaults/<name>.yaml``."""
    return parse_document(model, default_text(name), f"policies/defaults/{name}.yaml", defaults=False)
