"""The attack suite: each case runs against a real hub on loopback and must be refused with nothing
installed, nothing half-written, and an audit record."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from _trust_support import HubEnv, make_env
from securesystemslib.signer import CryptoSigner
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from tuf.api.metadata import Metadata, TargetFile, Targets

from deployment.artifacts import TrustStatus
from deployment.manifest import DesiredModule, DesiredState
from deployment.pull import PullError, load_held
from sre_core.errors import InputError


@pytest.fixture
def env(tmp_path: Path) -> Iterator[HubEnv]:
    e = make_env(tmp_path)
    try:
        yield e
    finally:
        e.server.stop()


def _pulled_v1(env: HubEnv) -> dict[str, object]:
    env.artifact("1.0.0")
    result = env.puller().pull()
    assert result.trust is TrustStatus.FRESH
    assert result.artifacts["clf"].version == "1.0.0"
    return env.snapshot_device()


def _assert_refused(env: HubEnv, before: dict[str, object], match: str) -> PullError:
    with pytest.raises(PullError, match=match) as info:
        env.puller().pull()
    err = info.value
    assert err.refused
    assert env.snapshot_device() == before, "a refused pull changed the held state or the CAS"
    assert env.partials() == [], "a refused pull left a partial download"
    assert env.cas_is_clean()
    assert env.audit_events()[-1] == "pull.refused"
    held = load_held(env.paths, env.clock)
    assert err.held.desired == held.desired
    return err


def test_tampered_artifact_is_refused(env: HubEnv) -> None:
    before = _pulled_v1(env)
    target = env.artifact("1.1.0", size=200_000)
    f = env.target_file(target)
    data = bytearray(f.read_bytes())
    data[1000] ^= 0xFF
    f.write_bytes(bytes(data))
    err = _assert_refused(env, before, "sha256")
    assert "clf-1.1.0" in err.what
    assert "nothing was installed" in err.fix


def test_channel_metadata_signed_with_unknown_key_is_refused(env: HubEnv) -> None:
    before = _pulled_v1(env)
    env.artifact("1.1.0")
    # An attacker re-signs the newest stable role (adding their own target) with a key root never named.
    md = env.repo._load("stable")
    signed = md.signed
    assert isinstance(signed, Targets)
    evil = env.tmp / "evil.bin"
    evil.write_bytes(b"evil" * 1000)
    signed.targets["stable/evil.bin"] = TargetFile.from_file("stable/evil.bin", str(evil), ["sha256"])
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())
    (env.repo.metadata_dir / f"{signed.version}.stable.json").write_bytes(md.to_bytes())
    _assert_refused(env, before, "UnsignedMetadataError")


def test_expired_metadata_is_refused_until_the_hub_re_signs(env: HubEnv) -> None:
    before = _pulled_v1(env)
    env.artifact("1.1.0")
    env.clock.advance(timedelta(days=2))  # the timestamp (1 day) was not re-signed by cron
    _assert_refused(env, before, "ExpiredMetadataError")
    held = load_held(env.paths, env.clock)
    assert held.desired is not None and held.desired.serial == 1  # still enforcing the last verified state
    env.repo.timestamp()
    result = env.puller().pull()
    assert result.trust is TrustStatus.FRESH and result.artifacts["clf"].version == "1.1.0"


def test_rollback_to_older_metadata_is_refused(env: HubEnv) -> None:
    env.artifact("1.0.0")
    old = env.copy_metadata(env.tmp / "old-metadata")
    env.artifact("2.0.0")
    assert env.puller().pull().artifacts["clf"].version == "2.0.0"
    before = env.snapshot_device()
    # The mirror serves the whole older repository state (valid signatures, not expired).
    shutil.rmtree(env.repo.metadata_dir)
    shutil.copytree(old, env.repo.metadata_dir)
    _assert_refused(env, before, "BadVersionNumberError|version")
    assert load_held(env.paths, env.clock).artifacts["clf"].version == "2.0.0"


def test_replayed_old_timestamp_is_refused(env: HubEnv) -> None:
    """Freeze attack: the mirror keeps serving an old timestamp so the device never sees new releases."""
    env.artifact("1.0.0")
    old_ts = (env.repo.metadata_dir / "timestamp.json").read_bytes()
    env.artifact("1.1.0")
    env.puller().pull()
    before = env.snapshot_device()
    (env.repo.metadata_dir / "timestamp.json").write_bytes(old_ts)
    _assert_refused(env, before, "BadVersionNumberError|version")
    # A second device that never saw the newer timestamp is frozen only until the old one expires.
    fresh = make_env(env.tmp / "other")
    try:
        shutil.rmtree(fresh.repo.dir)
        shutil.copytree(env.repo.dir, fresh.repo.dir)
        fresh.paths.root_json.write_bytes((env.repo.metadata_dir / "1.root.json").read_bytes())
        fresh.clock.set(env.clock.now() + timedelta(days=2))
        with pytest.raises(PullError, match="ExpiredMetadataError"):
            fresh.puller().pull()
        assert load_held(fresh.paths, fresh.clock).trust is TrustStatus.NONE
    finally:
        fresh.server.stop()


def test_mix_and_match_metadata_is_refused(env: HubEnv) -> None:
    before = _pulled_v1(env)
    env.artifact("1.1.0")
    env.artifact("1.2.0")
    meta = env.repo.metadata_dir
    versions = sorted(int(p.name.split(".")[0]) for p in meta.glob("*.snapshot.json"))
    newest, older = versions[-1], versions[-2]
    # Current timestamp, but the snapshot file it names holds an older snapshot (valid signature).
    (meta / f"{newest}.snapshot.json").write_bytes((meta / f"{older}.snapshot.json").read_bytes())
    _assert_refused(env, before, "BadVersionNumberError|version")
    # Restore the snapshot; now mix in an older channel role under the newest name.
    env.repo.timestamp()
    env.repo._commit([])
    stable = sorted(int(p.name.split(".")[0]) for p in meta.glob("*.stable.json"))
    (meta / f"{stable[-1]}.stable.json").write_bytes((meta / f"{stable[-2]}.stable.json").read_bytes())
    _assert_refused(env, before, "BadVersionNumberError|version")


def _endless(request: Request) -> StreamingResponse:
    def body() -> Iterator[bytes]:
        chunk = b"\0" * 65536
        for _ in range(100_000):  # bounded: 6.5 GB, far past any cap
            yield chunk

    return StreamingResponse(body(), media_type="application/octet-stream")


def test_endless_and_oversized_artifacts_are_refused(tmp_path: Path) -> None:
    routes = [
        Route("/targets/stable/{digest}.clf-1.0.0-model.onnx", _endless, methods=["GET"]),
    ]
    env = make_env(tmp_path / "a")
    try:
        env.artifact("1.0.0", size=300_000)
        env.server.stop()
        # Same repository, but its artifact is served by an endless stream.
        from hub.server import build_hub_app
        from sre_core.http_server import ServerThread

        env.server = ServerThread(build_hub_app(env.repo.dir, routes)).start()
        before = env.snapshot_device()
        with pytest.raises(PullError, match="more than the signed length") as info:
            env.puller().pull()
        assert info.value.refused
        assert "clf-1.0.0" in info.value.what
        assert env.snapshot_device() == before and env.partials() == []
    finally:
        env.server.stop()
    # Oversized: the artifact file has extra bytes appended (same name, served normally).
    env2 = make_env(tmp_path / "b")
    try:
        before = _pulled_v1(env2)
        target = env2.artifact("1.1.0", size=300_000)
        with env2.target_file(target).open("ab") as fh:
            fh.write(b"x" * 5000)
        err = _assert_refused(env2, before, "more than the signed length")
        assert "clf-1.1.0" in err.what
    finally:
        env2.server.stop()


def test_endless_metadata_is_refused(tmp_path: Path) -> None:
    env = make_env(tmp_path, extra_routes=[Route("/metadata/timestamp.json", _endless, methods=["GET"])])
    try:
        before = env.snapshot_device()
        with pytest.raises(PullError, match="oversized metadata") as info:
            env.puller().pull()
        assert info.value.refused and env.snapshot_device() == before
    finally:
        env.server.stop()


@pytest.mark.parametrize("bad", ["stable/../../etc/passwd", "/etc/passwd", "stable/..", "stable/a/../../x"])
def test_target_path_escape_is_refused(env: HubEnv, bad: str) -> None:
    before = _pulled_v1(env)
    # A desired state legitimately signed by the channel key, naming an unsafe path.
    now = env.clock.now()
    ds = DesiredState(
        channel="stable",
        serial=2,
        issued=now,
        expires=now + timedelta(days=3),
        modules={"clf": DesiredModule(version="1.0.0", target=bad)},
    )
    env.repo._write_desired("stable", ds)
    err = _assert_refused(env, before, "not 'stable/<plain name>'")
    assert bad in err.why
    # And the hub itself refuses to publish such a path.
    f = env.tmp / "x.bin"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match="plain name"):
        env.repo._add_target_file("stable", bad, f, {})


def test_clock_rolled_back_past_expiry_revives_nothing(env: HubEnv) -> None:
    env.artifact("1.0.0")  # desired state expires in 14 days, timestamp in 1 day
    old_repo = env.tmp / "old-repo"
    shutil.copytree(env.repo.dir, old_repo)
    env.clock.advance(timedelta(days=20))
    env.repo.release("stable", "clf", "1.0.0", expires_in=timedelta(days=30))
    assert env.puller().pull().trust is TrustStatus.FRESH
    before = env.snapshot_device()
    # The RTC is wound back to the old days and a mirror serves the old (then valid) repository.
    env.clock.set(env.clock.now() - timedelta(days=20))
    shutil.rmtree(env.repo.dir)
    shutil.copytree(old_repo, env.repo.dir)
    _assert_refused(env, before, "BadVersionNumberError")  # TUF's version check fires first
    # Even with the metadata cache lost, trusted time (signed high-water) makes the replay expired.
    shutil.rmtree(env.paths.tuf)
    _assert_refused(env, before, "ExpiredMetadataError")
    # Held state: a desired state that expired stays expired when the clock goes back.
    env.clock.set(env.clock.now() + timedelta(days=70))
    assert load_held(env.paths, env.clock).trust is TrustStatus.EXPIRED
    env.clock.set(env.clock.now() - timedelta(days=60))
    held = load_held(env.paths, env.clock)
    assert held.trust is TrustStatus.EXPIRED
    assert held.trusted_now > env.clock.now()


def test_channel_key_cannot_sign_for_another_channel(env: HubEnv) -> None:
    beta_dev = env.paths.root.parent / "beta-device"
    from sre_agent.provision import provision
    from sre_core.paths import StatePaths

    beta_paths = StatePaths(beta_dev)
    provision(
        beta_paths, root=env.repo.metadata_dir / "1.root.json", hub=env.url, channel="beta", clock=env.clock
    )
    env.artifact("1.0.0", channel="beta")
    assert env.puller(channel="beta", paths=beta_paths).pull().artifacts["clf"].version == "1.0.0"
    before_beta = (beta_paths.trust / "held.json").read_bytes()
    # The stable release engineer adds a beta desired state + artifact to the stable role, signed with
    # the stable key; the hub's online keys even re-sign snapshot and timestamp around it.
    evil = env.tmp / "evil.bin"
    evil.write_bytes(b"evil" * 4096)
    md = env.repo._load("stable")
    signed = md.signed
    assert isinstance(signed, Targets)
    tf = TargetFile.from_file("beta/clf-6.6.6-model.onnx", str(evil), ["sha256"])
    tf.unrecognized_fields["custom"] = {"manifest": {"name": "clf", "version": "6.6.6"}}
    signed.targets[tf.path] = tf
    now = env.clock.now()
    evil_ds = env.tmp / "ds.json"
    evil_ds.write_text(
        DesiredState(
            channel="beta",
            serial=99,
            issued=now,
            expires=now + timedelta(days=9),
            modules={"clf": DesiredModule(version="6.6.6", target=tf.path)},
        ).model_dump_json()
    )
    signed.targets["beta/desired-state.json"] = TargetFile.from_file(
        "beta/desired-state.json", str(evil_ds), ["sha256"]
    )
    for path, src in [(tf.path, evil), ("beta/desired-state.json", evil_ds)]:
        dest = env.repo.targets_dir / "beta" / f"{signed.targets[path].hashes['sha256']}.{path.split('/')[1]}"
        dest.write_bytes(src.read_bytes())
    env.repo._put_current("stable", md)
    env.repo._commit(["stable"])
    result = env.puller(channel="beta", paths=beta_paths).pull()
    assert result.artifacts["clf"].version == "1.0.0"  # the stable role's beta paths are never consulted
    assert result.desired is not None and result.desired.serial == 1
    # Signing the beta role itself with the stable key fails the delegation's signature check.
    bmd = env.repo._load("beta")
    bsigned = bmd.signed
    assert isinstance(bsigned, Targets)
    bsigned.targets[tf.path] = tf
    bsigned.version += 1
    bmd.signatures.clear()
    for s in env.repo._signers_for("stable"):
        bmd.sign(s)
    env.inject_role("beta", bmd)
    with pytest.raises(PullError, match="UnsignedMetadataError") as info:
        env.puller(channel="beta", paths=beta_paths).pull()
    assert info.value.refused
    assert (beta_paths.trust / "held.json").read_bytes() == before_beta
    assert json.loads((beta_paths.trust / "held.json").read_text())["serial"] == 1
    # The hub API refuses cross-channel paths up front.
    with pytest.raises(InputError):
        env.repo._add_target_file("stable", "beta/x.bin", evil, {})
    assert Metadata.from_bytes((env.repo.metadata_dir / "timestamp.json").read_bytes()).signed.version > 1
