"""Signed escalation decisions live in the hub database (SQLite default and PostgreSQL): every replica
lists them, the exported file is only a copy to deliver, and a refused decision stores nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pg_support import pg_server, pg_url  # noqa: F401 (fixtures)
from test_triage_redteam import (  # noqa: F401 (fixtures)
    RunCli,
    _escalate,
    _hub_approval_files,
    _hub_approve,
    cli,
    world,
)

from hub.operators import HubEscalations
from hub.store import ENV_DATABASE_URL
from sre_agent.escalations import escalations_dir
from sre_core.paths import StatePaths


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "postgresql":
        monkeypatch.setenv(ENV_DATABASE_URL, str(request.getfixturevalue("pg_url")))
    return str(request.param)


def test_decisions_are_stored_in_the_hub_database(
    backend: str,
    world: dict[str, Path],  # noqa: F811
    state: StatePaths,
    cli: RunCli,  # noqa: F811
) -> None:
    repo = world["repo"]
    esc = _escalate(state)
    src = str(escalations_dir(state))
    # a harsher action than proposed: refused, nothing stored anywhere
    r = _hub_approve(cli, repo, world["key"], esc, "--action", "safe_mode", "--from", src)
    assert r.returncode == 2 and HubEscalations(repo).decisions(esc) == [] and _hub_approval_files(repo) == []
    r = _hub_approve(cli, repo, world["key"], esc, "--from", src)
    assert r.returncode == 0, r.stderr
    exported = Path(json.loads(r.stdout)["path"])
    rows = HubEscalations(repo).decisions(esc)  # a fresh reader, as another replica would be
    assert [(d["decision"], d["operator"]) for d in rows] == [("approve", "alice")]
    assert rows[0]["approval"] == json.loads(exported.read_text())
    exported.unlink()  # the delivered copy is gone: the hub still knows what it signed
    shown = cli("sre-hub", "escalations", "show", esc, "--repo", str(repo), "--from", src, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["hub_decisions"] == [f"{esc}.approve.alice.json"]
    # signing again replaces the operator's decision (one row), never adds a second
    assert _hub_approve(cli, repo, world["key"], esc, "--from", src).returncode == 0
    assert len(HubEscalations(repo).decisions(esc)) == 1
