"""Devices in a tiered fleet: an ordered list of hubs and mirrors, fallback among them, sticky choice,
deadline shares, bad sources skipped (audited with their URL), uploads and reports to the first hub
that takes them. Real hubs and mirrors on loopback, real TUF, real signatures."""

from __future__ import annotations

import json
import random
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from _trust_support import HubEnv, Trickler, make_env
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send
from telemetry_support import device, metric_columns, running_hub, small_policy

import sre_agent.cli
from deployment.artifacts import PullResult
from deployment.pull import Puller, PullError
from deployment.sources import Source, order_sources, share_s, sources_for
from hub.server import build_static_app
from policies.trust import TrustPolicy
from sre_agent.telemetry import Store, TelemetryWriter
from sre_agent.uplink import Uplink
from sre_core.clock import SystemClock
from sre_core.http_server import ServerThread, free_port


class Switch:
    """An ASGI wrapper: ``down`` answers 503 to everything; ``seen`` lists the paths asked for."""

    def __init__(self, app: Any) -> None:
        self.app, self.down, self.seen = app, False, list[str]()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append(scope["path"])
            if self.down:
                await JSONResponse({"error": "down"}, 503)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _mirror(env: HubEnv, dest: Path) -> Path:
    """A copy of the signed files, as an rsync mirror or a regional hub holds them."""
    shutil.rmtree(dest, ignore_errors=True)
    for part in ("metadata", "targets"):
        shutil.copytree(env.repo.dir / part, dest / part)
    return dest


def _audit(env: HubEnv) -> list[dict[str, Any]]:
    """Audit records as ``{"event": ..., **data}``."""
    out = []
    for line in env.paths.audit_log.read_text().splitlines():
        rec = json.loads(line)
        out.append({"event": rec["event"], **rec["data"]})
    return out


def _held_source(env: HubEnv) -> str:
    return str(json.loads((env.paths.trust / "held.json").read_text())["source"])


def test_sources_order_and_shares_are_pure() -> None:
    srcs = sources_for("http://reg/", ["http://root", "http://reg", "http://cdn"], "http://cdn1/meta")
    assert [s.name for s in srcs] == ["http://reg/", "http://root", "http://cdn"]
    assert srcs[0].metadata_url == "http://cdn1/meta/" and srcs[0].targets_url == "http://reg/targets/"
    now = datetime(2026, 12, 1, tzinfo=UTC)
    sticky = ("http://cdn", datetime(2026, 11, 30, 23, 50, tzinfo=UTC))
    assert order_sources(srcs, sticky, now, 900)[0].name == "http://cdn"
    assert order_sources(srcs, sticky, now, 300)[0].name == "http://reg/"  # expired
    assert order_sources(srcs, ("gone", now), now, 900)[0].name == "http://reg/"
    assert share_s(60, 3) == 20 and share_s(-1, 2) == 0
    assert isinstance(srcs[0], Source)


def test_a_dead_first_hub_falls_back_then_the_choice_sticks_then_returns(tmp_path: Path) -> None:
    """How to break it: the device knows one hub only, so a regional hub that is down leaves it
    offline although the root answers; or the device never returns to its regional hub."""
    env = make_env(tmp_path)
    env.artifact("1.0", size=4096)
    regional = Switch(build_static_app(_mirror(env, tmp_path / "regional")))
    with ServerThread(regional) as reg:
        regional.down = True

        def pull() -> PullResult:
            return Puller(
                env.paths, reg.url, "stable", clock=env.clock, fallbacks=[env.url], sticky_s=600
            ).pull()

        result = pull()
        assert result.online and result.artifacts["clf"].version == "1.0"
        assert _held_source(env) == env.url
        offline = [r for r in _audit(env) if r["event"] == "pull.source_offline"]
        assert offline and offline[-1]["source"] == reg.url, offline
        # The regional hub is back with the next release; the root stays first while the choice is sticky.
        regional.down = False
        env.artifact("2.0", size=4096)
        _mirror(env, tmp_path / "regional")
        regional.seen.clear()
        assert pull().artifacts["clf"].version == "2.0"
        assert regional.seen == [] and _held_source(env) == env.url
        # Past sticky_s the configured order applies again: back to the regional hub.
        env.clock.advance(601)
        env.artifact("3.0", size=4096)
        _mirror(env, tmp_path / "regional")
        assert pull().artifacts["clf"].version == "3.0"
        assert "/metadata/timestamp.json" in regional.seen and _held_source(env) == reg.url
        assert any(p.startswith("/targets/stable/") for p in regional.seen)


def test_a_source_that_serves_bad_bytes_is_skipped_and_audited_with_its_url(tmp_path: Path) -> None:
    """How to break it: a regional hub (or mirror) alters an artifact or the metadata. TUF refuses the
    bytes; the device must not stop there (the next source serves good ones), and must say which
    source lied."""
    env = make_env(tmp_path)
    target = env.artifact("1.0", size=8192)
    bad_art = _mirror(env, tmp_path / "bad-art")
    rel = env.target_file(target).relative_to(env.repo.dir)
    blob = bytearray((bad_art / rel).read_bytes())
    blob[100] ^= 0xFF  # same length, other bytes
    (bad_art / rel).write_bytes(bytes(blob))
    bad_meta = _mirror(env, tmp_path / "bad-meta")
    ts = json.loads((bad_meta / "metadata" / "timestamp.json").read_text())
    ts["signed"]["expires"] = "2099-01-01T00:00:00Z"  # a freeze attempt: the signature no longer holds
    (bad_meta / "metadata" / "timestamp.json").write_text(json.dumps(ts))
    with ServerThread(build_static_app(bad_meta)) as m1, ServerThread(build_static_app(bad_art)) as m2:
        result = Puller(
            env.paths, m1.url, "stable", clock=env.clock, fallbacks=[m2.url, env.url], sticky_s=0
        ).pull()
    assert result.online and result.artifacts["clf"].version == "1.0"
    assert env.cas_is_clean() and env.partials() == []
    refused = [r for r in _audit(env) if r["event"] == "pull.refused"]
    assert {r["source"] for r in refused} == {m1.url, m2.url}, refused
    meta_refusal = next(r for r in refused if r["source"] == m1.url)
    assert "signature" in meta_refusal["why"].lower() or "Unsigned" in meta_refusal["why"]
    art_refusal = next(r for r in refused if r["source"] == m2.url)
    assert "sha256" in art_refusal["why"]
    # metadata came from the artifact-tampering mirror (it was good), the artifact from the root
    assert _held_source(env) == m2.url


def test_no_good_source_refuses_and_changes_nothing(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    env.artifact("1.0", size=4096)
    env.puller().pull()
    env.artifact("2.0", size=4096)
    bad = _mirror(env, tmp_path / "bad")
    for f in (bad / "targets" / "stable").iterdir():
        if f.name.endswith(".onnx") and "2.0" in f.name:
            f.write_bytes(b"\0" * f.stat().st_size)
    before = env.snapshot_device()
    env.server.stop()  # the root is unreachable
    with ServerThread(build_static_app(bad)) as m, pytest.raises(PullError) as err:
        Puller(env.paths, m.url, "stable", clock=env.clock, fallbacks=[env.url]).pull()
    assert err.value.refused and "sha256" in err.value.why
    assert env.snapshot_device() == before and env.cas_is_clean()
    assert err.value.held.artifacts["clf"].version == "1.0"  # what it still enforces


def test_a_trickling_first_source_leaves_the_others_their_share(tmp_path: Path) -> None:
    """How to break it: the first source answers a byte a second. Without a share, its reads run to
    the whole pull deadline and the root, tried after it, gets no time (the pull ends offline)."""
    env = make_env(tmp_path)
    env.clock.advance(datetime.now(UTC) - env.clock.now())  # this test runs on the system clock
    env.artifact("1.0", size=4096)
    trickler = Trickler()
    try:
        policy = TrustPolicy(
            pull_deadline_s=6, metadata_deadline_s=60, read_timeout_s=30, max_stalled_attempts=1
        )
        result = Puller(
            env.paths, trickler.url, "stable", clock=SystemClock(), policy=policy, fallbacks=[env.url]
        ).pull()
    finally:
        trickler.close()
    assert result.online and result.artifacts["clf"].version == "1.0", result.messages
    offline = [r for r in _audit(env) if r["event"] == "pull.source_offline"]
    assert offline and offline[0]["source"] == trickler.url


def test_uploads_and_reports_go_to_the_first_hub_that_takes_them(tmp_path: Path) -> None:
    from deployment.rollout import device_report, send_report
    from sre_core.clock import FakeClock

    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    paths, ident = device(tmp_path / "dev")
    store = Store(paths.telemetry_db, small_policy(), clock, ident.device_id)
    w = TelemetryWriter(store, enforce=False)
    w.write_table("metrics", metric_columns(int(clock.now().timestamp() * 1e6), 40, 5))
    w.flush()
    dead = f"http://127.0.0.1:{free_port()}"
    with running_hub(tmp_path / "fleet", clock) as hub:
        hub.fleet.enroll(ident.device_id, ident.public_pem)
        up = Uplink(store, ident, [dead, hub.url], clock, rng=random.Random(0))
        report = up.flush(max_attempts=2)
        up.close()
        assert report.pending_after == 0 and report.failures == 0 and report.uploaded
        assert report.by_hub == {hub.url: len(report.uploaded)}
        assert len(hub.fleet.receipts()) == len(report.uploaded)
    store.close()
    with pytest.raises(httpx.HTTPError):  # no hub answers: the caller retries at the next sync
        send_report([dead], paths, device_report(paths, "stable", clock), clock)


def test_hub_urls_in_config_env_and_config_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "agent.toml").write_text(
        '[hub]\nurl = "http://root.example:8080"\nmirrors = ["https://cdn.example/fleet"]\n'
    )
    env = {"SRE_AGENT_HUB__URLS": '["http://regional.example:8080"]'}
    monkey = pytest.MonkeyPatch()
    for k, v in env.items():
        monkey.setenv(k, v)
    try:
        assert sre_agent.cli.main(["config", "show", "--state", str(tmp_path), "--json"]) == 0
        shown = json.dumps(json.loads(capsys.readouterr().out))
        assert "http://regional.example:8080" in shown and "https://cdn.example/fleet" in shown
        from sre_agent.config import load_effective

        eff = load_effective(state_dir=tmp_path)
        assert eff.settings.hub.hubs() == ["http://regional.example:8080", "http://root.example:8080"]
        assert eff.settings.hub.pull_fallbacks() == ["http://root.example:8080", "https://cdn.example/fleet"]
        assert eff.sources["hub.urls"] == "env" and eff.sources["hub.mirrors"] == "file"
        monkey.setenv("SRE_AGENT_HUB__URLS", '["ftp://regional.example"]')
        assert sre_agent.cli.main(["config", "show", "--state", str(tmp_path)]) != 0
        assert "$SRE_AGENT_HUB__URLS" in capsys.readouterr().err
    finally:
        monkey.undo()
