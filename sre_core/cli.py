"""Running a typer app with the project's exit-code contract: 0 ok, 1 failure, 2 bad usage or input."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from sre_core.errors import SreError

__all__ = ["JsonOpt", "emit_json", "err_console", "out_console", "run_app"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for machines.")]


def run_app(app: Any, prog_name: str, argv: Sequence[str] | None = None) -> int:
    """Invoke a typer/click app and translate errors into exit codes and readable messages.

    An :class:`SreError` prints ``error: what: why (what to do: ...)`` on stderr (or a JSON object when
    ``--json`` was given) and returns its exit code.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = app(args=args, prog_name=prog_name, standalone_mode=False)
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 0))
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:
        # Usage errors (unknown command, bad option) and bad parameters: click's exit code 2.
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except SreError as exc:
        if "--json" in args:
            print(json.dumps(exc.to_dict()))
        else:
            print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        # Disk full, permission denied, a file where a directory should be: a failure, stated plainly.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    return rv if isinstance(rv, int) else 0


def emit_json(obj: Any) -> None:
    """Print a JSON document on stdout (no rich markup)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def out_console() -> Any:
    """A rich console on stdout."""
    from rich.console import Console

    return Console()


def err_console() -> Any:
    """A rich console on stderr (progress, warnings)."""
    from rich.console import Console

    return Console(stderr=True)
