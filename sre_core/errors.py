"""Base error types.

Every user-facing error says what failed, why, and what to do about it. The CLI maps
:class:`InputError` (bad usage or input) to exit code 2 and any other :class:`SreError` to exit code 1.

    SreError                  something failed; exit 1
    +-- InputError            the caller gave us something malformed or refused; exit 2
        +-- ConfigError       a configuration key has a bad value
"""

from __future__ import annotations

__all__ = ["ConfigError", "InputError", "SreError"]


class SreError(Exception):
    """An error with a message a person can act on.

    Args:
        what: what failed, e.g. ``"verify artifact model-2.0.onnx"``.
        why: the reason, e.g. ``"sha256 does not match the signed target"``.
        fix: what to do next, e.g. ``"pull again; if it persists, report the hub"``.
    """

    exit_code = 1

    def __init__(self, what: str, why: str = "", fix: str = "") -> None:
        self.what = what
        self.why = why
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [self.what]
        if self.why:
            parts.append(f": {self.why}")
        if self.fix:
            parts.append(f" (what to do: {self.fix})")
        return "".join(parts)

    def to_dict(self) -> dict[str, str]:
        return {"error": type(self).__name__, "what": self.what, "why": self.why, "fix": self.fix}


class InputError(SreError):
    """Bad usage or bad input: a malformed file, an invalid argument, a refused document."""

    exit_code = 2


class ConfigError(InputError):
    """A configuration value is invalid; the message names the key, the value and the expected form."""
