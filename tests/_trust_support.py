"""Shared pieces of the trust tests: a real hub on loopback, a provisioned device, a dropping TCP proxy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.routing import BaseRoute
from tuf.api.metadata import Metadata, MetaFile

from deployment.manifest import ModuleManifest
from deployment.pull import Puller
from hub.repository import HubRepository
from hub.server import build_hub_app
from policies.trust import TrustPolicy
from sre_agent.provision import provision
from sre_core.clock import FakeClock
from sre_core.http_server import ServerThread
from sre_core.paths import StatePaths


@dataclass
class HubEnv:
    """A hub repository served on 127.0.0.1 and a device provisioned against it."""

    tmp: Path
    clock: FakeClock
    repo: HubRepository
    server: ServerThread
    paths: StatePaths
    overrides: dict[str, Callable[..., Any]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def artifact(
        self,
        version: str,
        size: int = 64 * 1024,
        module: str = "clf",
        channel: str = "stable",
        mode: Literal["managed", "file"] = "managed",
    ) -> str:
        """Publish about ``size`` random bytes as module ``version`` and release it; returns the target
        path. A managed module is a real ONNX model carrying the random bytes (the hub loads it)."""
        f = self.tmp / f"{module}-{version}.onnx"
        f.write_bytes(random_model(size) if mode == "managed" else os.urandom(size))
        pub = self.repo.publish(channel, f, ModuleManifest(name=module, version=version, mode=mode))
        self.repo.release(channel, module, version)
        return pub.target

    def puller(
        self,
        source: str | None = None,
        channel: str = "stable",
        policy: TrustPolicy | None = None,
        paths: StatePaths | None = None,
    ) -> Puller:
        return Puller(
            paths or self.paths,
            source or self.url,
            channel,
            clock=self.clock,
            policy=policy or TrustPolicy(max_stalled_attempts=2),
        )

    def snapshot_device(self) -> dict[str, Any]:
        """What must not change when a pull is refused: the held record (what slots may install)."""
        held = self.paths.trust / "held.json"
        return {"held": held.read_bytes() if held.exists() else None}

    def cas_is_clean(self) -> bool:
        """Every blob in the CAS hashes to its name: nothing unverified or half-written is reachable."""
        d = self.paths.cas / "sha256"
        return all(sha256(p) == p.name for p in d.glob("*")) if d.exists() else True

    def partials(self) -> list[str]:
        d = self.paths.cas / "partial"
        return sorted(p.name for p in d.glob("*.part")) if d.exists() else []

    def audit_events(self) -> list[str]:
        if not self.paths.audit_log.exists():
            return []
        return [json.loads(line)["event"] for line in self.paths.audit_log.read_text().splitlines()]

    def target_file(self, target: str, channel: str = "stable") -> Path:
        tf = self.repo.channel_targets(channel)[target]
        return self.repo.targets_dir / channel / f"{tf.hashes['sha256']}.{target.split('/', 1)[1]}"

    def inject_role(self, role: str, md: Metadata[Any]) -> None:
        """Publish already-signed role metadata as the newest version; the hub's online snapshot and
        timestamp keys then name it (the worst case: only the role's own signature protects it)."""
        version = md.signed.version
        (self.repo.metadata_dir / f"{version}.{role}.json").write_bytes(md.to_bytes())
        self.repo._put_current(role, md)
        snap = self.repo._load("snapshot")
        snap.signed.meta[f"{role}.json"] = MetaFile(version)
        v = self.repo._store("snapshot", snap)
        ts = self.repo._load("timestamp")
        ts.signed.snapshot_meta = MetaFile(v)
        self.repo._store("timestamp", ts)

    def copy_metadata(self, dest: Path) -> Path:
        shutil.copytree(self.repo.metadata_dir, dest)
        return dest

    def restore_metadata(self, src: Path) -> None:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, self.repo.metadata_dir / f.name)


def make_env(
    tmp: Path,
    channels: tuple[str, ...] = ("stable", "beta"),
    extra_routes: list[BaseRoute] | None = None,
    device_channel: str = "stable",
) -> HubEnv:
    clock = FakeClock()
    repo = HubRepository.init(tmp / "repo", channels=channels, clock=clock)
    server = ServerThread(build_hub_app(repo.dir, extra_routes or [])).start()
    paths = StatePaths(tmp / "device")
    provision(
        paths, root=repo.metadata_dir / "1.root.json", hub=server.url, channel=device_channel, clock=clock
    )
    return HubEnv(tmp, clock, repo, server, paths)


def random_model(size: int) -> bytes:
    """A valid ONNX classifier of exactly ``size`` bytes (when above ~1.3 kB), unique each call: random
    hex padding in its doc string."""
    import onnx

    from deployment.sample_models import linear_classifier

    model = onnx.load_from_string(linear_classifier(seed=0))
    pad = os.urandom(size // 2 + 1).hex()
    want = max(0, size - len(model.SerializeToString()))
    for _ in range(8):  # the length prefix of the field grows with it: converge on the exact size
        model.doc_string = pad[:want]
        got = len(model.SerializeToString())
        if got == size or want == 0:
            break
        want = max(0, want + size - got)
    return bytes(model.SerializeToString())


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class DroppingProxy:
    """A loopback TCP proxy that cuts each connection after ``drop_every`` bytes from the server.

    Counts the bytes it forwarded downstream, so tests can compare transfer to artifact size.
    ``budget`` (optional) caps the total downstream bytes; beyond it connections are refused (a link down).
    """

    def __init__(self, upstream_port: int, drop_every: int, budget: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.drop_every = drop_every
        self.budget = budget
        self.bytes_down = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DroppingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                exhausted = self.budget is not None and self.bytes_down >= self.budget
            if exhausted:
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        client.settimeout(10)
        sent = 0

        def pump_up() -> None:
            try:
                while data := client.recv(65536):
                    upstream.sendall(data)
            except OSError:
                pass

        t = threading.Thread(target=pump_up, daemon=True)
        t.start()
        try:
            while not self._stop.is_set():
                data = upstream.recv(65536)
                if not data:
                    break
                allowed = self.drop_every - sent
                with self._lock:
                    if self.budget is not None:
                        allowed = min(allowed, self.budget - self.bytes_down)
                    piece = data[: max(allowed, 0)]
                    self.bytes_down += len(piece)
                client.sendall(piece)
                sent += len(piece)
                if len(piece) < len(data):
                    break
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def p256_keypair() -> tuple[bytes, str]:
    """A fresh ECDSA P-256 key pair: (PKCS8 PEM private key, PEM public key) as cosign writes them."""
    key = ec.generate_private_key(ec.SECP256R1())
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return priv, pub.decode()


class Trickler:
    """A loopback HTTP server that answers every request with a large body at one byte a second."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\n{")
            for _ in range(600):  # bounded: ten minutes at most
                if self.stop.wait(1.0):
                    break
                conn.sendall(b" ")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(5)
