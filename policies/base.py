"""Loading policy documents (YAML or JSON) into typed models with precise errors."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from sre_core.errors import InputError

__all__ = ["PolicyModel", "format_validation_error", "load_default", "load_document", "parse_document"]


class PolicyModel(BaseModel):
    """Base for policy documents: unknown keys are errors (a typo must not silently disable a guard)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: a.b[2].c = <value>: expected ...``."""
    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        value = err.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"{source}: {loc or '<document>'} = {shown}: {err['msg']}")
    return "\n".join(lines)


def parse_document[M: BaseModel](model: type[M], text: str, source: str) -> M:
    """Parse YAML/JSON text into ``model``.

    Raises:
        InputError: the text is not YAML/JSON, or does not match the model.
    """
    try:
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"load policy {source}", f"not valid YAML/JSON: {exc}", "fix the syntax") from exc
    if raw is None:
        raw = {}
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise InputError(
            f"load policy {source}",
            "\n" + format_validation_error(exc, source),
            f"correct the document against the {model.__name__} schema",
        ) from exc


def load_document[M: BaseModel](model: type[M], path: Path) -> M:
    """Load a policy file. Raises InputError if unreadable or invalid."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"load policy {path}", str(exc), "check the path") from exc
    return parse_document(model, text, str(path))


def load_default[M: BaseModel](model: type[M], name: str) -> M:
    """Load the shipped default document ``policies/defaults/<name>.yaml``."""
    text = resources.files("policies").joinpath("defaults", f"{name}.yaml").read_text(encoding="utf-8")
    return parse_document(model, text, f"policies/defaults/{name}.yaml")
