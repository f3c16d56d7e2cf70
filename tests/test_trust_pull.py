"""Device pull against a real hub on loopback: happy path, offline, bundles, resumable downloads over a
link that drops, key rotation, second signatures required by policy."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from _trust_support import DroppingProxy, HubEnv, make_env, p256_keypair, sha256
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner

from deployment.artifacts import TrustStatus
from deployment.manifest import ModuleManifest
from deployment.pull import PullError, load_held, safe_target
from hub.bundle import export_bundle
from policies.trust import TrustPolicy
from sre_agent.provision import provision
from sre_core.paths import StatePaths

MiB = 1024 * 1024


@pytest.fixture
def env(tmp_path: Path) -> Iterator[HubEnv]:
    e = make_env(tmp_path)
    try:
        yield e
    finally:
        e.server.stop()


def test_pull_verifies_and_holds_the_desired_state(env: HubEnv) -> None:
    assert load_held(env.paths, env.clock).trust is TrustStatus.NONE
    target = env.artifact("1.0.0", size=100_000)
    result = env.puller().pull()
    assert result.trust is TrustStatus.FRESH and result.online
    assert result.desired is not None and result.desired.serial == 1
    art = result.artifacts["clf"]
    assert art.target == target and art.length == 100_000
    assert sha256(art.path) == art.sha256 == sha256(env.target_file(target))
    assert art.manifest.name == "clf" and art.manifest.version == "1.0.0"
    assert not art.path.stat().st_mode & 0o222  # read-only in the CAS
    held = load_held(env.paths, env.clock, verify=True)
    assert held.trust is TrustStatus.FRESH and held.artifacts["clf"].sha256 == art.sha256
    assert "pull.verified" in env.audit_events()
    # a second pull with nothing new downloads no artifact bytes
    p = env.puller()
    p.pull()
    assert p.stats["bytes"] == 0


def test_trust_status_moves_fresh_stale_expired_with_trusted_time(env: HubEnv) -> None:
    env.artifact("1.0.0")
    env.puller().pull()
    env.server.stop()
    env.clock.advance(timedelta(hours=2))
    offline = env.puller().pull()
    assert not offline.online and offline.trust is TrustStatus.STALE
    assert offline.artifacts["clf"].version == "1.0.0"
    assert any("offline" in m for m in offline.messages)
    assert "pull.offline" in env.audit_events()
    assert load_held(env.paths, env.clock).trust is TrustStatus.FRESH  # timestamp (1 day) still valid
    env.clock.advance(timedelta(days=2))
    assert load_held(env.paths, env.clock).trust is TrustStatus.STALE
    env.clock.advance(timedelta(days=12))  # desired state lifetime is 14 days
    assert load_held(env.paths, env.clock).trust is TrustStatus.EXPIRED
    assert env.puller().pull().trust is TrustStatus.EXPIRED


def test_desired_state_serial_never_goes_back(env: HubEnv) -> None:
    env.artifact("1.0.0")
    old_target_meta = {p.name: p.read_bytes() for p in env.repo.metadata_dir.glob("*.json")}
    env.artifact("1.1.0")
    assert env.puller().pull().desired.serial == 2  # type: ignore[union-attr]
    # A channel key holder re-signs the serial-1 desired state into a *newer* role version.
    ds1 = env.repo.desired_state("stable")
    assert ds1 is not None
    old = ds1.model_copy(update={"serial": 1})
    env.repo._write_desired("stable", old)
    with pytest.raises(PullError, match="rollback") as info:
        env.puller().pull()
    assert info.value.refused and "serial 1" in info.value.why
    assert load_held(env.paths, env.clock).desired.serial == 2  # type: ignore[union-attr]
    assert old_target_meta  # the hub kept its older files


def test_pull_from_an_offline_bundle(env: HubEnv, tmp_path: Path) -> None:
    env.artifact("1.0.0", size=50_000)
    env.repo.timestamp(timedelta(days=7))
    info = export_bundle(env.repo, "stable", tmp_path / "usb")
    assert info["targets"] == 2
    assert not (tmp_path / "usb" / "keys").exists() and not (tmp_path / "usb" / "repo.json").exists()
    env.server.stop()
    env.clock.advance(timedelta(days=3))
    result = env.puller(source=str(tmp_path / "usb")).pull()
    assert result.trust is TrustStatus.FRESH and result.artifacts["clf"].version == "1.0.0"
    # a tampered bundle is refused like a tampered hub
    env.server.start()
    env.artifact("1.1.0", size=50_000)
    export_bundle(env.repo, "stable", tmp_path / "usb2")
    victim = next((tmp_path / "usb2" / "targets" / "stable").glob("*clf-1.1.0*"))
    victim.write_bytes(b"\0" * victim.stat().st_size)
    with pytest.raises(PullError, match="sha256"):
        env.puller(source=str(tmp_path / "usb2")).pull()
    assert load_held(env.paths, env.clock).artifacts["clf"].version == "1.0.0"


def test_download_completes_over_a_link_that_drops_every_mib(env: HubEnv) -> None:
    size = 8 * MiB
    env.artifact("1.0.0", size=size)
    with DroppingProxy(env.server.port, drop_every=MiB + 12345) as proxy:
        p = env.puller(source=proxy.url)
        result = p.pull()
    art = result.artifacts["clf"]
    assert sha256(art.path) == art.sha256 and art.length == size
    assert p.stats["resumes"] >= 7 and p.stats["restarts"] == 0
    assert proxy.bytes_down / size <= 1.05  # resumed, not restarted


def test_interrupted_download_resumes_on_the_next_pull(env: HubEnv) -> None:
    size = 4 * MiB
    env.artifact("1.0.0", size=size)
    with DroppingProxy(env.server.port, drop_every=MiB, budget=MiB + 64 * 1024) as proxy:
        with pytest.raises(PullError, match="resumes") as info:
            env.puller(source=proxy.url).pull()
    assert not info.value.refused  # a transfer failure, not a trust failure
    assert len(env.partials()) == 1
    have = (env.paths.cas / "partial" / env.partials()[0]).stat().st_size
    assert 0 < have < size
    assert load_held(env.paths, env.clock).trust is TrustStatus.NONE  # nothing half-installed
    with DroppingProxy(env.server.port, drop_every=64 * MiB) as proxy:
        p = env.puller(source=proxy.url)
        result = p.pull()
    assert result.artifacts["clf"].length == size
    assert p.stats["bytes"] == size - have  # only the rest travelled
    assert env.partials() == []


def test_changed_file_restarts_instead_of_splicing(env: HubEnv) -> None:
    """If-Range: a partial whose validator no longer matches starts over."""
    size = 2 * MiB
    target = env.artifact("1.0.0", size=size)
    tf = env.repo.channel_targets("stable")[target]
    sha = tf.hashes["sha256"]
    part = env.paths.cas / "partial" / f"{sha}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * 1000)  # garbage from some earlier, different download
    url = f"{env.url}/targets/stable/{sha}.{target.split('/')[1]}"
    (env.paths.cas / "partial" / f"{sha}.json").write_text(json.dumps({"url": url, "etag": '"stale-etag"'}))
    p = env.puller()
    result = p.pull()
    assert sha256(result.artifacts["clf"].path) == sha
    assert p.stats["restarts"] == 1


@pytest.mark.parametrize("role", ["root", "targets", "snapshot", "timestamp", "stable"])
def test_key_rotation_is_followed_by_devices(env: HubEnv, role: str) -> None:
    env.artifact("1.0.0")
    env.puller().pull()
    new_ids = env.repo.rotate_key(role)
    assert new_ids
    assert not list((env.repo.keys_dir / role).glob(f"{new_ids[0]}*")) == []
    env.artifact("1.1.0")
    assert env.puller().pull().artifacts["clf"].version == "1.1.0"
    # A device provisioned with the original root also follows the chain.
    from sre_agent.provision import provision
    from sre_core.paths import StatePaths

    fresh = StatePaths(env.tmp / "fresh")
    provision(fresh, root=env.repo.metadata_dir / "1.root.json", clock=env.clock)
    assert env.puller(paths=fresh).pull().artifacts["clf"].version == "1.1.0"


def test_retired_channel_key_is_refused_after_rotation(env: HubEnv) -> None:
    env.artifact("1.0.0")
    env.puller().pull()
    (old_pem,) = (env.repo.keys_dir / "stable").glob("*.pem")
    env.repo.rotate_key("stable")
    retired = env.repo.keys_dir / "retired" / "stable" / old_pem.name
    signer = CryptoSigner(load_pem_private_key(retired.read_bytes(), None))
    env.artifact("1.1.0")
    md = env.repo._load("stable")
    md.signed.version += 1
    md.signatures.clear()
    md.sign(signer)
    env.inject_role("stable", md)
    with pytest.raises(PullError, match="UnsignedMetadataError") as info:
        env.puller().pull()
    assert info.value.refused
    assert load_held(env.paths, env.clock).artifacts["clf"].version == "1.0.0"


def test_policy_required_cosign_and_attestation(env: HubEnv) -> None:
    cosign_priv, cosign_pub = p256_keypair()
    att_priv, att_pub = p256_keypair()
    policy = TrustPolicy(
        require_cosign=True,
        require_attestation=True,
        cosign_public_keys=[cosign_pub],
        attestation_public_keys=[att_pub],
    )
    f = env.tmp / "m.onnx"
    f.write_bytes(b"model" * 5000)
    sbom = {"bomFormat": "CycloneDX", "specVersion": "1.5", "components": []}
    env.repo.publish(
        "stable",
        f,
        ModuleManifest(name="clf", version="1.0.0", mode="file"),
        cosign_key=cosign_priv,
        attestation=("https://cyclonedx.org/bom", sbom, att_priv),
    )
    env.repo.release("stable", "clf", "1.0.0")
    result = env.puller(policy=policy).pull()
    kinds = {a.kind for a in result.artifacts["clf"].manifest.attestations}
    assert kinds == {"cosign", "dsse"}
    # the same checks hold for an offline bundle: it carries the signature and the attestation
    info = export_bundle(env.repo, "stable", env.tmp / "usb")
    assert info["targets"] == 4
    bundled = StatePaths(env.tmp / "usb-device")
    provision(bundled, root=env.repo.metadata_dir / "1.root.json", clock=env.clock)
    assert env.puller(source=str(env.tmp / "usb"), policy=policy, paths=bundled).pull().artifacts["clf"]
    # Unsigned version: refused before a byte of the artifact is downloaded.
    env.artifact("1.1.0", size=300_000)
    p = env.puller(policy=policy)
    with pytest.raises(PullError, match="requires a cosign signature"):
        p.pull()
    assert p.stats["bytes"] < 4096  # the desired state only, not the 300 kB artifact
    # Signed by a key that is not pinned.
    other_priv, _ = p256_keypair()
    f.write_bytes(b"model2" * 5000)
    env.repo.publish(
        "stable",
        f,
        ModuleManifest(name="clf", version="1.2.0", mode="file"),
        cosign_key=other_priv,
        attestation=("https://cyclonedx.org/bom", sbom, att_priv),
    )
    env.repo.release("stable", "clf", "1.2.0")
    with pytest.raises(PullError, match="cosign") as info:
        env.puller(policy=policy).pull()
    assert "pinned" in info.value.why
    assert load_held(env.paths, env.clock).artifacts["clf"].version == "1.0.0"


def test_cron_timestamp_keeps_a_quiet_repository_valid(env: HubEnv) -> None:
    """No publish for 60 days: the hub's cron re-signs timestamp (and snapshot before it expires)."""
    env.artifact("1.0.0")
    env.repo.release("stable", "clf", "1.0.0", expires_in=timedelta(days=90))
    for _ in range(6):
        env.clock.advance(timedelta(days=10))
        env.repo.timestamp()
        assert env.puller().pull().trust is TrustStatus.FRESH
    assert "snapshot" not in env.repo.expiring(timedelta(days=10))


def test_trickling_server_hits_the_deadline_and_the_next_pull_resumes(tmp_path: Path) -> None:
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from hub.server import build_hub_app
    from sre_core.http_server import ServerThread

    env = make_env(tmp_path)
    try:
        target = env.artifact("1.0.0", size=300_000)
        real = env.target_file(target).read_bytes()
        clock = env.clock

        def trickle(request: Request) -> StreamingResponse:
            def body() -> Iterator[bytes]:
                for i in range(0, 40_000, 4096):
                    clock.advance(60)  # each piece takes a minute
                    yield real[i : i + 4096]

            return StreamingResponse(body(), headers={"ETag": f'"{hashlib.sha256(real).hexdigest()}"'})

        slow = ServerThread(
            build_hub_app(env.repo.dir, [Route("/targets/stable/{d}.clf-1.0.0-model.onnx", trickle)])
        ).start()
        try:
            with pytest.raises(PullError, match="minimum rate") as info:
                env.puller(source=slow.url).pull()
        finally:
            slow.stop()
        assert not info.value.refused
        assert len(env.partials()) == 1
        p = env.puller()
        result = p.pull()
        assert sha256(result.artifacts["clf"].path) == sha256(env.target_file(target))
        assert p.stats["resumes"] == 1 and p.stats["bytes"] < 300_000
    finally:
        env.server.stop()


def test_damaged_held_record_means_nothing_is_held_until_the_next_pull(env: HubEnv) -> None:
    env.artifact("1.0.0")
    env.puller().pull()
    held = env.paths.trust / "held.json"
    held.write_text(held.read_text()[:50])
    assert load_held(env.paths, env.clock).trust is TrustStatus.NONE
    assert (env.paths.trust / "held.json.corrupt").exists()
    assert env.puller().pull().trust is TrustStatus.FRESH


def test_pull_reports_telemetry(env: HubEnv) -> None:
    from deployment.pull import Puller
    from sre_core.telemetry import MemorySink

    sink = MemorySink()
    env.artifact("1.0.0", size=70_000)
    Puller(env.paths, env.url, "stable", clock=env.clock, telemetry=sink).pull()
    got = {name: (value, labels["outcome"]) for name, value, labels in sink.metrics}
    assert got["pull.bytes"][0] >= 70_000 and got["pull.bytes"][1] == "fresh"
    f = env.target_file(env.artifact("1.1.0", size=70_000))
    f.write_bytes(b"\0" * 70_000)
    with pytest.raises(PullError):
        Puller(env.paths, env.url, "stable", clock=env.clock, telemetry=sink).pull()
    assert sink.events[-1][0] == "pull.refused" and sink.events[-1][2] == "error"
    assert "clf-1.1.0" in sink.events[-1][1]


def test_update_desired_signs_rollouts_and_recalls(env: HubEnv) -> None:
    env.artifact("1.0.0")
    ds = env.repo.update_desired("stable", {"rollout": {"id": "r1", "waves": [10, 50, 100]}})
    assert ds.serial == 2 and ds.modules["clf"].version == "1.0.0"
    result = env.puller().pull()
    assert result.desired is not None and result.desired.rollout == {"id": "r1", "waves": [10, 50, 100]}
    from sre_core.errors import InputError

    with pytest.raises(InputError, match="not published"):
        env.repo.update_desired("stable", {"modules": {"clf": {"version": "9", "target": "stable/nope"}}})


def test_re_pinning_a_new_trust_anchor_drops_metadata_trusted_under_the_old_one(
    env: HubEnv, tmp_path: Path
) -> None:
    env.artifact("1.0.0")
    env.puller().pull()
    other = make_env(tmp_path / "other-hub")
    try:
        other.clock.set(env.clock.now())
        other.artifact("7.0.0")
        # The old anchor refuses the other hub's metadata...
        with pytest.raises(PullError, match=r"Unsigned|signature|threshold"):
            env.puller(source=other.url).pull()
        # ...and after `sre-agent init --root <new root>` the device trusts the new hub only.
        from sre_agent.provision import pin_root

        pin_root(env.paths, other.repo.metadata_dir / "1.root.json")
        result = env.puller(source=other.url).pull()
        assert result.artifacts["clf"].version == "7.0.0"
        with pytest.raises(PullError):
            env.puller().pull()
    finally:
        other.server.stop()


def test_concurrent_publishers_are_serialised(env: HubEnv) -> None:
    import threading

    from hub.repository import HubRepository

    errors: list[BaseException] = []

    def publisher(n: int) -> None:
        repo = HubRepository(env.repo.dir, env.clock)  # its own instance, as another process would have
        try:
            for i in range(4):
                f = env.tmp / f"p{n}-{i}.bin"
                f.write_bytes(os.urandom(1000))
                repo.publish("stable", f, ModuleManifest(name=f"m{n}", version=f"1.{i}", mode="file"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(env.repo.channel_targets("stable")) == 8
    env.repo.release("stable", "m0", "1.3")
    env.repo.release("stable", "m1", "1.3")
    result = env.puller().pull()
    assert {m: a.version for m, a in result.artifacts.items()} == {"m0": "1.3", "m1": "1.3"}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab./\\\x00-_+A", max_size=20))
def test_safe_target_admits_only_one_plain_name_under_the_channel(name: str) -> None:
    path = f"stable/{name}"
    if safe_target(path, "stable"):
        parts = path.split("/")
        assert len(parts) == 2 and parts[1] not in {"", ".", ".."} and not parts[1].startswith(".")
        assert "\\" not in path and "\x00" not in path
        assert (Path("/cas") / parts[1]).parent == Path("/cas")
    assert not safe_target("/" + path, "stable")
    assert not safe_target(path, "beta")
