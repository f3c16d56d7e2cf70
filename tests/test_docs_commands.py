"""Every `sre-agent` / `sre-hub` command shown in README.md and docs/*.md.

Each one is extracted from the code blocks and (1) checked against the real command tree: the command
exists and every option it uses is one that command takes (synopsis notation such as ``a|b``,
``[--opt]`` and ``FILE...`` is read the way a person reads it); (2) unless listed in :data:`NOT_RUN` with
the reason, run in order against a sandbox (a hub repository with a published model, a device provisioned
against it), placeholders filled, and its exit code compared with the documented one (0, or the codes
an ``exit N`` / ``exit 0/10/2`` comment names).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import hub.cli
import sre_agent.cli
from sre_core.cli import click_command

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGS = {"sre-agent": sre_agent.cli, "sre-hub": hub.cli}

# Commands shown but not run here, by (program, subcommand...) prefix, and why.
NOT_RUN: dict[tuple[str, ...], str] = {
    ("sre-agent", "run"): "the daemon runs until SIGTERM (tests/test_operability_systemd.py starts it)",
    ("sre-hub", "serve"): "serves until SIGTERM (tests/test_operability_servers.py starts it)",
    ("sre-hub", "regional"): "serves until SIGTERM; needs a root hub (tests/test_regional_hub.py runs it)",
    ("sre-agent", "chaos", "run"): "a real guarded run needs a serving device (tests/test_chaos_runner*.py)",
    ("sre-agent", "chaos", "approve"): "needs an operator key and a reviewed escalated file",
    ("sre-agent", "reconcile"): "installs into slots and probes (tests/test_reconcile_e2e.py)",
    ("sre-agent", "rollback"): "needs an installed module with a standby (tests/test_slots_cli.py)",
    ("sre-agent", "verify"): "runs golden vectors on installed models (tests/test_verification_cli.py)",
    ("sre-agent", "gates"): "synopsis of three subcommands (tests/test_verification_cli.py)",
    (
        "sre-agent",
        "escalations",
    ): "needs an escalation id from a real incident (tests/test_triage_escalations.py)",
    ("sre-agent", "telemetry"): "needs a telemetry database a daemon wrote (tests/test_telemetry_cli.py)",
    ("sre-agent", "pull"): "bare form needs the device's hub online; the --from bundle form runs",
    (
        "sre-hub",
        "recall",
    ): "withdrawing needs an older release to fall back to (tests/test_fleet_rollouts.py)",
    (
        "sre-hub",
        "rollout",
        "approve",
    ): "needs a wave whose gate is manual and open (tests/test_fleet_rollouts.py)",
    ("sre-hub", "rollout", "pause"): "shown with the resume alternative; tests/test_fleet_rollouts.py",
    ("sre-hub", "rollout", "ack"): "needs a halted rollout (tests/test_fleet_rollouts.py)",
    ("sre-hub", "rollout", "abort"): "would end the sandbox's rollout before the commands after it",
    ("sre-hub", "escalations", "show"): "needs an escalation id a device uploaded",
    ("sre-hub", "escalations", "approve"): "needs an escalation id a device uploaded and an operator key",
    ("sre-hub", "escalations", "reject"): "needs an escalation id a device uploaded and an operator key",
}


@dataclass
class Shown:
    doc: str
    line: str
    argv: list[str]
    exits: set[int]


def _commands() -> list[Shown]:
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S):
            if m.group(1) not in ("bash", "sh", "shell", "console", ""):
                continue
            for raw in m.group(2).replace("\\\n", " ").splitlines():
                line = raw.strip().removeprefix("$ ").strip()
                if not line.startswith(("sre-agent ", "sre-hub ")):
                    continue
                code, _, comment = line.partition("  #")
                exits = {0}
                found = re.search(r"exit (\d+(?:/\d+)*)", comment)
                if found:
                    exits = {int(x) for x in found.group(1).split("/")}
                if re.search(r"exit (?:0 run, )?10|exit 0 run", comment):
                    exits |= {0, 10, 2}
                out.append(Shown(doc.name, line, shlex.split(code.split(" # ")[0]), exits))
    return out


SHOWN = _commands()


def _normalise(argv: list[str]) -> list[str]:
    """Read synopsis notation: drop ``[...]`` groups, take the first of ``a|b``, ``X...`` -> ``X``."""
    out: list[str] = []
    depth = 0
    for a in argv:
        if a.startswith("["):
            depth += a.count("[") - a.count("]")
            continue
        if depth > 0:
            depth += a.count("[") - a.count("]")
            continue
        first = a.split("|")[0] if "|" in a and not a.startswith(("http", "'", '"')) else a
        out.append(first.removesuffix("..."))
    return out


def _resolve(argv: list[str]) -> tuple[Any, list[str], list[str]]:
    """(click command, command path, remaining args)."""
    cmd = click_command(PROGS[argv[0]].build_app())
    path = [argv[0]]
    rest = argv[1:]
    while hasattr(cmd, "commands") and rest and rest[0] in cmd.commands:
        cmd = cmd.commands[rest[0]]
        path.append(rest[0])
        rest = rest[1:]
    return cmd, path, rest


def test_docs_show_commands() -> None:
    assert len(SHOWN) > 40, len(SHOWN)


@pytest.mark.parametrize("shown", SHOWN, ids=[f"{s.doc}:{' '.join(s.argv[:3])}" for s in SHOWN])
def test_every_shown_command_matches_the_command_tree(shown: Shown) -> None:
    argv = _normalise(shown.argv)
    cmd, path, rest = _resolve(argv)
    assert not hasattr(cmd, "commands"), f"{shown.line!r}: '{' '.join(path)}' needs a subcommand"
    names = {o for p in cmd.params for o in (*getattr(p, "opts", []), *getattr(p, "secondary_opts", []))}
    names |= {"-h", "--help", "--wide"}
    used = [a.split("=")[0] for a in rest if a.startswith("-") and not re.fullmatch(r"-\d+", a)]
    unknown = [u for u in used if u not in names]
    assert not unknown, f"{shown.doc}: {shown.line!r}: {' '.join(path)} takes no {unknown}"


def _not_run(argv: list[str]) -> str | None:
    if argv[:2] == ["sre-agent", "pull"] and "--from" in argv:
        return None  # the bundle form runs against the sandbox's exported bundle
    for n in range(len(argv), 0, -1):
        why = NOT_RUN.get(tuple(argv[:n]))
        if why:
            return why
    return None


class _Sandbox:
    """Values for the placeholders the docs use, in one temporary world.

    ``hub`` (README) is a fresh path that README's own ``sre-hub init`` creates; ``REPO`` (the guides) is
    a hub prepared with ``classifier`` 1.0.0 released in ``stable``; ``root.json`` is REPO's root.
    """

    def __init__(self, tmp: Path) -> None:
        from deployment.sample_models import linear_classifier

        self.tmp = tmp
        self.readme_hub = tmp / "hub"
        self.repo = tmp / "repo"
        self.state = tmp / "device"
        self.model = tmp / "model.onnx"
        self.model.write_bytes(linear_classifier(seed=0))
        self.partial = tmp / "deployment.yaml"
        self.partial.write_text("flapping:\n  max_rollbacks: 5\n")  # a partial policy file
        self.bundles: list[Path] = []
        hub_args = ["--repo", str(self.repo), "--channel", "stable", "--module", "classifier", "--version"]
        for argv in (
            ["init", "--repo", str(self.repo), "--channel", "stable", "--channel", "beta"],
            ["publish", *hub_args, "1.0.0", str(self.model)],
            ["release", *hub_args, "1.0.0", "--expires", "14d"],
        ):
            assert hub.cli.main(argv) == 0, argv

    def _one(self, a: str, argv: list[str]) -> str:
        named = {
            "DIR": self.state, "/var/lib/sre-agent": self.state, "REPO": self.repo, "hub": self.readme_hub,
            "root.json": self.repo / "metadata" / "root.json", "model.onnx": self.model,
            "deployment.yaml": self.partial, "out.html": self.tmp / "out.html",
            "FILE": ROOT / "experiments" / "uplink-latency.yaml",
        }  # fmt: skip
        if a in named:
            return str(named[a])
        if a.startswith("/media/usb"):  # export writes a new bundle; pull reads the last one
            if "export" in argv or not self.bundles:
                self.bundles.append(self.tmp / f"bundle{len(self.bundles)}")
            return str(self.bundles[-1])
        if a.endswith("=safe.onnx"):
            return a.replace("safe.onnx", str(self.model))
        if a.startswith("~/"):  # a person's home: the sandbox's
            return str(self.tmp / "home" / a[2:])
        if a.startswith("experiments/"):
            return str(ROOT / a)
        if a == "http://hub:8080":
            return "http://127.0.0.1:9"  # nothing listens: init only records it
        return {"1.0": "1.0.0", "2.0": "2.0.0"}.get(a, a)

    def fill(self, argv: list[str]) -> list[str]:
        out = [self._one(a, argv) for a in argv]
        if (
            out[:2] == ["sre-hub", "publish"] and "--manifest" in out
        ):  # the manifest form needs a manifest file
            j = out.index("--manifest")
            del out[j : j + 2]
        if out[0] == "sre-agent" and "--state" not in out and out[1] != "policy":
            out += ["--state", str(self.state)]  # the docs' bare device commands mean "this device"
        return out


@pytest.mark.slow
def test_shown_commands_exit_as_documented(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("SRE_AGENT_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(ROOT)
    box = _Sandbox(tmp_path)
    ran, failures = [], []
    for shown in SHOWN:
        argv = _normalise(shown.argv)
        if _not_run(argv):
            continue
        filled = box.fill(argv)
        rc = PROGS[filled[0]].main(filled[1:])
        err = capsys.readouterr().err
        ran.append(" ".join(argv[:3]))
        if rc not in shown.exits:
            failures.append(f"{shown.doc}: {shown.line}\n  ran {filled}\n  exit {rc}: {err[-600:]}")
    assert len(ran) >= 20, ran
    assert not failures, "\n".join(failures)
