"""Untrusted text made safe to show an operator: one sanitiser for every terminal and report.

Escalation text (titles, log lines, event messages, check details, model summaries) comes from devices and
from whatever wrote into their logs. Printed raw, an ANSI escape sequence can rewrite the terminal (hide
a line, fake a prompt, set the window title, emit OSC 8 links) and a bidi override (U+202E and friends)
can make ``safe_mode`` read as something else. :func:`neutralise` replaces every such character with a
visible escape (``\\x1b``, ``\\u202e``), so the operator sees that it was there and nothing acts on it.

Neutralised: C0 and C1 control characters (ESC, CSI ``\\x9b``, BEL, backspace, carriage return...), DEL,
format characters (bidi embeddings, overrides and isolates, LRM/RLM/ALM, zero-width space/joiners, BOM,
soft hyphen), line and paragraph separators, surrogates, private-use and unassigned code points.
Newlines and tabs are kept only when asked.
"""

from __future__ import annotations

import unicodedata
from typing import Any

__all__ = ["neutralise", "neutralise_tree"]

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _visible(ch: str) -> str:
    cp = ord(ch)
    return f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}"


def neutralise(text: object, *, max_len: int | None = None, keep_newlines: bool = False) -> str:
    """``text`` (made a string) with every control, bidi or invisible formatting character shown as a
    visible escape, optionally cut to ``max_len`` characters (an ellipsis marks the cut)."""
    s = text if isinstance(text, str) else str(text)
    out: list[str] = []
    for ch in s:
        if keep_newlines and ch in "\n\t":
            out.append(ch)
        elif unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            out.append(_visible(ch))
        else:
            out.append(ch)
    shown = "".join(out)
    if max_len is not None and len(shown) > max_len:
        shown = shown[: max(0, max_len - 1)] + "…"
    return shown


def neutralise_tree(value: Any, *, max_len: int | None = None) -> Any:
    """Every string in a JSON-like value (dict keys included) neutralised; other values unchanged."""
    if isinstance(value, str):
        return neutralise(value, max_len=max_len)
    if isinstance(value, dict):
        return {neutralise(k): neutralise_tree(v, max_len=max_len) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [neutralise_tree(v, max_len=max_len) for v in value]
    return value
