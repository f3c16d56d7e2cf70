"""Running a typer app with the project's exit-code contract: 0 ok, 1 failure, 2 bad usage or input.

Terminal habits every command gets from here: ``-h``/``--help`` and ``--version`` on the root, ``--wide``
anywhere on the command line (tables never cut values), full-width tables whenever stdout is not a
terminal (pipes, files, ``| grep``), and :func:`show_value` so no Python ``None`` reaches text output.
"""

from __future__ import annotations

import contextvars
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any

import typer

from sre_core.errors import SreError

__all__ = [
    "CONTEXT_SETTINGS",
    "JsonOpt",
    "PortOpt",
    "click_command",
    "describe_validation",
    "emit_json",
    "err_console",
    "install_root_options",
    "out_console",
    "package_version",
    "require_writable",
    "run_app",
    "show_value",
    "table",
    "walk_commands",
    "wide_output",
]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for machines.")]
PortOpt = Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port to listen on (1-65535).")]

# click settings for both command lines: -h works like --help on every command.
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}

# Width of a console that must not cut values (not a terminal, or --wide).
WIDE_COLUMNS = 10_000

# Set by run_app for the duration of one invocation when --wide was given.
_WIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("sre_cli_wide", default=False)


def package_version() -> str:
    """The installed distribution's version (``0+unknown`` from a bare checkout)."""
    from importlib import metadata

    try:
        return metadata.version("sre-agent")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def install_root_options(app: typer.Typer, prog_name: str, version: Callable[[], str]) -> None:
    """Give ``app`` a root callback with ``--version`` and ``--wide`` (shown in ``-h``)."""

    def _print_version(value: bool) -> None:
        if value:
            print(f"{prog_name} {version()}")
            raise typer.Exit(0)

    # Defaults (not Annotated) so the callback is bound now, not looked up by name at parse time.
    @app.callback()
    def _root(
        show_version: bool = typer.Option(
            False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
        wide: bool = typer.Option(
            False,
            "--wide",
            help="Never cut table cells (automatic when stdout is not a terminal); works after any command.",
        ),
    ) -> None:
        """Root options shared by every command."""


def run_app(app: Any, prog_name: str, argv: Sequence[str] | None = None) -> int:
    """Invoke a typer/click app and translate errors into exit codes and readable messages.

    An :class:`SreError` prints ``error: what: why (what to do: ...)`` on stderr (or a JSON object when
    ``--json`` was given) and returns its exit code.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    wide = "--wide" in args
    if wide:  # accepted after any command: strip it here, the root callback only documents it
        args = [a for a in args if a != "--wide"]
    token = _WIDE.set(wide)
    try:
        return _invoke(app, prog_name, args)
    finally:
        _WIDE.reset(token)


def walk_commands(cmd: Any, path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    """Every command of a click group tree as ``(path, command)``, the root included."""
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from walk_commands(sub, (*path, name))


def click_command(app: Any) -> Any:
    """The click command tree of a typer app, with help polished: flags show no ``<bool>`` type."""
    cmd = typer.main.get_command(app) if isinstance(app, typer.Typer) else app
    for _, c in walk_commands(cmd):
        for p in c.params:
            if getattr(p, "is_flag", False) and getattr(p, "metavar", None) is None:
                p.metavar = ""
        c.get_help_option = _flag_help_option(c.get_help_option)
    return cmd


def _flag_help_option(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def get_help_option(ctx: Any) -> Any:
        opt = original(ctx)
        if opt is not None and opt.metavar is None:
            opt.metavar = ""
        return opt

    return get_help_option


def _invoke(app: Any, prog_name: str, args: list[str]) -> int:
    try:
        rv = click_command(app).main(args=args, prog_name=prog_name, standalone_mode=False)
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
    except ValueError as exc:
        # A pydantic ValidationError that reached here is bad input nobody translated: say which value is
        # wrong and how, without pydantic's type codes and documentation URLs.
        if not hasattr(exc, "errors"):
            raise
        print(f"error: invalid input: {describe_validation(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Disk full, permission denied, a file where a directory should be: a failure, stated plainly.
        where = f" ({exc.filename})" if exc.filename else ""
        fix = ""
        if isinstance(exc, PermissionError):
            fix = " (what to do: run as the account that owns the state directory, or fix its permissions)"
        elif exc.errno == 28:  # ENOSPC
            fix = " (what to do: free space on that filesystem)"
        elif exc.errno == 30:  # EROFS
            fix = " (what to do: point --state at a writable filesystem)"
        if "--json" in args:
            print(json.dumps({"error": type(exc).__name__, "what": f"{exc.strerror or exc}{where}"}))
        else:
            print(f"error: {exc.strerror or exc}{where}{fix}", file=sys.stderr)
        return 1
    return rv if isinstance(rv, int) else 0


def emit_json(obj: Any) -> None:
    """Print a JSON document on stdout (no rich markup)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def wide_output() -> bool:
    """Whether tables must show full values: ``--wide`` was given or stdout is not a terminal."""
    return _WIDE.get() or not sys.stdout.isatty()


def out_console() -> Any:
    """A rich console on stdout; wide (nothing cut, nothing wrapped) when piped or with ``--wide``."""
    from rich.console import Console

    if wide_output():
        return Console(width=WIDE_COLUMNS, soft_wrap=True)
    return Console()


def table(title: str | None, columns: Iterable[str], **kwargs: Any) -> Any:
    """A rich table whose cells wrap (fold) instead of being cut with an ellipsis on a narrow terminal."""
    from rich.table import Table

    t = Table(title=title, **kwargs)
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def show_value(value: Any) -> str:
    """A value as text for people: ``-`` for none, ``yes``/``no`` for booleans, lists comma-joined."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(show_value(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def err_console() -> Any:
    """A rich console on stderr (progress, warnings)."""
    from rich.console import Console

    if _WIDE.get() or not sys.stderr.isatty():  # logs and pipes: never wrap a message mid-line
        return Console(stderr=True, width=WIDE_COLUMNS, soft_wrap=True)
    return Console(stderr=True)


def require_writable(directory: Any, what: str) -> None:
    """Fail with one clear message when ``directory`` cannot be written (read-only mount, permissions,
    full disk), before a command starts work that would fail half-way with a temp file's name.

    Raises:
        SreError: a probe file cannot be created there.
    """
    import errno
    import tempfile
    from pathlib import Path

    d = Path(directory)
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".write-probe.", delete=True):
            pass
    except OSError as exc:
        why = {
            errno.EROFS: "it is on a read-only filesystem",
            errno.EACCES: "this account may not write there",
            errno.EPERM: "this account may not write there",
            errno.ENOSPC: "its filesystem is full",
            errno.ENOENT: "it does not exist",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise SreError(
            what,
            f"the state directory {d} is not writable: {why}",
            "remount it read-write, free space or fix its owner, or point --state at a writable directory",
        ) from exc


def describe_validation(exc: Any) -> str:
    """A pydantic ValidationError as ``path = value: what is expected`` lines (no type codes, no URLs)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "<document>"
        value = err.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"{loc} = {shown[:60]}: {err.get('msg', 'invalid')}")
    return "; ".join(lines)
