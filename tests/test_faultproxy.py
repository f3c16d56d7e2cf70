"""The embedded fault proxy: its Toxiproxy API, every toxic on real loopback TCP, and third-party clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from chaos.faultproxy import FaultProxyServer
from chaos.toxiproxy_client import (
    ToxiproxyClient,
    ToxiproxyConflictError,
    ToxiproxyNotFoundError,
    ToxiproxyServerError,
    ToxiproxyUnavailableError,
)


class Upstream:
    """A loopback TCP server: ``echo`` mode echoes; ``source`` mode sends ``payload`` then closes."""

    def __init__(self, mode: str = "echo", payload: bytes = b"") -> None:
        self.mode = mode
        self.payload = payload
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.chunks: list[int] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            if self.mode == "source":
                try:
                    conn.sendall(self.payload)
                except OSError:
                    pass
                return
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    self.received += data
                    self.chunks.append(len(data))
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


@pytest.fixture
def fp() -> Iterator[FaultProxyServer]:
    server = FaultProxyServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def api(fp: FaultProxyServer) -> Iterator[ToxiproxyClient]:
    with ToxiproxyClient(fp.url, timeout_s=5) as c:
        yield c


@pytest.fixture
def echo() -> Iterator[Upstream]:
    up = Upstream("echo")
    yield up
    up.close()


def _port(proxy: dict[str, object]) -> int:
    return int(str(proxy["listen"]).rsplit(":", 1)[1])


def _connect(proxy: dict[str, object], timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(proxy)), timeout=timeout)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _recv_all(s: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := s.recv(65536):
        buf += chunk
    return bytes(buf)


def _rtt(proxy: dict[str, object], msg: bytes = b"ping") -> float:
    with _connect(proxy) as s:
        t0 = time.monotonic()
        s.sendall(msg)
        assert _recv_exact(s, len(msg)) == msg
        return time.monotonic() - t0


# --- API ------------------------------------------------------------------------------------------


def test_api_proxy_lifecycle(api: ToxiproxyClient, echo: Upstream) -> None:
    assert "faultproxy" in api.version()
    p = api.create_proxy("svc", echo.addr, listen="0.0.0.0:0")
    assert p["listen"].startswith("127.0.0.1:"), "non-loopback listen must be rewritten to loopback"
    assert _port(p) > 0 and p["enabled"] is True and p["toxics"] == []
    with pytest.raises(ToxiproxyConflictError):
        api.create_proxy("svc", echo.addr)
    assert set(api.proxies()) == {"svc"}
    assert api.get_proxy("svc")["upstream"] == echo.addr
    data = os.urandom(300_000)
    with _connect(p) as s:
        s.sendall(data)
        assert _recv_exact(s, len(data)) == data

    # disable: live connections drop, new ones are refused; enable: back on the same port
    live = _connect(p)
    api.update_proxy("svc", enabled=False)
    assert live.recv(10) == b""
    live.close()
    with pytest.raises(OSError):
        _connect(p, timeout=1).close()
    p2 = api.update_proxy("svc", enabled=True)
    assert p2["listen"] == p["listen"]
    assert _rtt(p2) >= 0

    api.add_toxic("svc", "latency", {"latency": 10})
    api.update_proxy("svc", enabled=False)
    api.reset()
    after = api.get_proxy("svc")
    assert after["enabled"] is True and after["toxics"] == []

    api.delete_proxy("svc")
    with pytest.raises(ToxiproxyNotFoundError):
        api.get_proxy("svc")
    with pytest.raises(ToxiproxyNotFoundError):
        api.delete_proxy("svc")
    api.delete_proxy("svc", missing_ok=True)


def test_api_toxic_crud_and_validation(api: ToxiproxyClient, echo: Upstream) -> None:
    api.create_proxy("svc", echo.addr)
    t = api.add_toxic("svc", "latency", {"latency": 5, "jitter": 1})
    assert t == {
        "name": "latency_downstream",
        "type": "latency",
        "stream": "downstream",
        "toxicity": 1.0,
        "attributes": {"latency": 5, "jitter": 1},
    }
    with pytest.raises(ToxiproxyConflictError):
        api.add_toxic("svc", "latency", {"latency": 5})
    api.update_toxic("svc", "latency_downstream", {"latency": 7}, toxicity=0.5)
    got = api.get_toxic("svc", "latency_downstream")
    assert got["attributes"]["latency"] == 7 and got["toxicity"] == 0.5
    for bad in (
        {"type": "nope"},
        {"type": "latency", "stream": "sideways"},
        {"type": "latency", "toxicity": 2},
        {"type": "latency", "attributes": {"latency": -1}},
    ):
        with pytest.raises(Exception, match="400"):
            api._call("POST", "/proxies/svc/toxics", bad)
    assert [x["name"] for x in api.toxics("svc")] == ["latency_downstream"]
    api.remove_toxic("svc", "latency_downstream")
    assert api.toxics("svc") == []
    with pytest.raises(ToxiproxyNotFoundError):
        api.remove_toxic("svc", "latency_downstream")
    with pytest.raises(ToxiproxyNotFoundError):
        api.add_toxic("ghost", "latency")


def test_api_populate_and_listen_failure(api: ToxiproxyClient, echo: Upstream) -> None:
    out = api.populate([{"name": "a", "upstream": echo.addr}, {"name": "b", "upstream": echo.addr}])
    assert sorted(p["name"] for p in out) == ["a", "b"]
    again = api.populate([{"name": "a", "upstream": echo.addr}])
    assert again[0]["listen"] == api.get_proxy("a")["listen"], "an unchanged proxy is kept"
    taken = _port(api.get_proxy("a"))
    with pytest.raises(ToxiproxyServerError):
        api.create_proxy("clash", echo.addr, listen=f"127.0.0.1:{taken}")
    assert "clash" not in api.proxies()


# --- toxics ---------------------------------------------------------------------------------------


def test_latency_and_jitter_add_delay_both_ways(api: ToxiproxyClient, echo: Upstream) -> None:
    p = api.create_proxy("svc", echo.addr)
    base = _rtt(p)
    api.add_toxic("svc", "latency", {"latency": 150, "jitter": 50}, stream="downstream")
    api.add_toxic("svc", "latency", {"latency": 100}, stream="upstream")
    slow = [_rtt(p) for _ in range(3)]
    # latency is a lower bound (sleep guarantees it): 100 up + at least 100 down
    assert min(slow) >= 0.2
    assert min(slow) > base
    api.reset()
    assert _rtt(p) < min(slow)


def test_bandwidth_limits_rate(api: ToxiproxyClient) -> None:
    payload = os.urandom(60_000)
    src = Upstream("source", payload)
    try:
        p = api.create_proxy("svc", src.addr)
        t0 = time.monotonic()
        with _connect(p) as s:
            free = _recv_all(s)
            fast = time.monotonic() - t0
        api.add_toxic("svc", "bandwidth", {"rate": 60})  # 60 KB/s -> 60 kB take >= 1 s
        t0 = time.monotonic()  # before connecting: the proxy may start sending before we look
        with _connect(p) as s:
            got = _recv_all(s)
            slow = time.monotonic() - t0
        assert free == payload and got == payload
        assert slow >= 0.95
        assert slow > fast
    finally:
        src.close()


def test_slow_close_delays_close(api: ToxiproxyClient) -> None:
    src = Upstream("source", b"bye")
    try:
        p = api.create_proxy("svc", src.addr)
        api.add_toxic("svc", "slow_close", {"delay": 300})
        t0 = time.monotonic()
        with _connect(p) as s:
            assert _recv_all(s) == b"bye"
            assert time.monotonic() - t0 >= 0.3
    finally:
        src.close()


def test_timeout_closes_after_timeout_and_drops_data(api: ToxiproxyClient, echo: Upstream) -> None:
    p = api.create_proxy("svc", echo.addr)
    api.add_toxic("svc", "timeout", {"timeout": 250}, stream="upstream")
    t0 = time.monotonic()  # the toxic's clock starts with the connection
    with _connect(p) as s:
        s.sendall(b"lost")
        assert s.recv(10) == b""  # closed by the toxic, nothing echoed
        assert time.monotonic() - t0 >= 0.25
    assert bytes(echo.received) == b"", "a timeout toxic black-holes data"


def test_timeout_zero_holds_until_removed(api: ToxiproxyClient, echo: Upstream) -> None:
    p = api.create_proxy("svc", echo.addr)
    api.add_toxic("svc", "timeout", {"timeout": 0}, stream="downstream")
    with _connect(p, timeout=0.5) as s:
        s.sendall(b"one")
        with pytest.raises(TimeoutError):
            s.recv(10)
        assert bytes(echo.received) == b"one", "upstream got it; the answer is held"
        api.remove_toxic("svc", "timeout_downstream")
        s.settimeout(5)
        s.sendall(b"two")
        assert _recv_exact(s, 3) == b"two"


def test_reset_peer_resets_connection(api: ToxiproxyClient, echo: Upstream) -> None:
    p = api.create_proxy("svc", echo.addr)
    api.add_toxic("svc", "reset_peer", {"timeout": 100}, stream="upstream")
    with _connect(p) as s:
        time.sleep(0.3)
        with pytest.raises(ConnectionResetError):
            s.sendall(b"x")
            s.recv(10)
            s.sendall(b"y")
            s.recv(10)


def test_slicer_slices_data(api: ToxiproxyClient, echo: Upstream) -> None:
    p = api.create_proxy("svc", echo.addr)
    api.add_toxic(
        "svc", "slicer", {"average_size": 100, "size_variation": 20, "delay": 20_000}, stream="upstream"
    )
    data = os.urandom(1000)
    with _connect(p) as s:
        s.sendall(data)
        assert _recv_exact(s, len(data)) == data
    assert len(echo.chunks) >= 4, "1000 bytes in ~100-byte slices 20 ms apart arrive in pieces"
    assert max(echo.chunks) <= 240


def test_limit_data_cuts_after_bytes(api: ToxiproxyClient) -> None:
    src = Upstream("source", os.urandom(50_000))
    try:
        p = api.create_proxy("svc", src.addr)
        api.add_toxic("svc", "limit_data", {"bytes": 1234})
        with _connect(p) as s:
            got = _recv_all(s)
        assert got == src.payload[:1234]
    finally:
        src.close()


def test_toxicity_zero_never_applies_and_one_always(api: ToxiproxyClient, echo: Upstream) -> None:
    p = api.create_proxy("svc", echo.addr)
    api.add_toxic("svc", "timeout", {"timeout": 0}, name="never", stream="upstream", toxicity=0.0)
    for _ in range(5):
        assert _rtt(p) >= 0
    api.update_toxic("svc", "never", {}, toxicity=1.0)
    with _connect(p, timeout=0.3) as s:
        s.sendall(b"x")
        with pytest.raises(TimeoutError):
            s.recv(1)


def test_toxic_added_to_live_connection_applies(api: ToxiproxyClient, echo: Upstream) -> None:
    p = api.create_proxy("svc", echo.addr)
    with _connect(p) as s:
        s.sendall(b"a")
        assert _recv_exact(s, 1) == b"a"
        api.add_toxic("svc", "limit_data", {"bytes": 0}, stream="downstream")
        s.sendall(b"b")
        assert s.recv(1) == b""


# --- third-party clients and bounds ---------------------------------------------------------------


def test_toxiproxy_python_drives_fault_proxy(fp: FaultProxyServer, echo: Upstream) -> None:
    from toxiproxy import Toxiproxy
    from toxiproxy.api import APIConsumer

    saved = (APIConsumer.host, APIConsumer.port)
    try:
        server = Toxiproxy()
        server.update_api_consumer("127.0.0.1", fp.port)
        assert server.running()
        proxy = server.create(upstream=echo.addr, name="tp")
        proxy.add_toxic(type="latency", attributes={"latency": 120})
        assert list(proxy.toxics()) == ["latency_downstream"]
        listen = server.get_proxy("tp").listen
        assert _rtt({"listen": listen}) >= 0.12
        proxy.destroy_toxic("latency_downstream")
        assert proxy.toxics() == {}
        with proxy.down():
            assert server.get_proxy("tp").enabled is False
        assert server.get_proxy("tp").enabled is True
        server.destroy_all()
        assert server.proxies() == {}
    finally:
        APIConsumer.host, APIConsumer.port = saved


def test_chaostoolkit_toxiproxy_drives_fault_proxy(fp: FaultProxyServer, echo: Upstream) -> None:
    from chaostoxi.proxy import actions as pa
    from chaostoxi.proxy import probes as pp
    from chaostoxi.toxic import actions as ta

    cfg: dict[str, object] = {"toxiproxy_url": fp.url}
    host, port = echo.addr.split(":")
    try:
        assert pa.create_proxy("ctk", host, int(port), configuration=cfg)  # asks for 0.0.0.0
        listen = pp.get_proxy_attribute("ctk", "listen", configuration=cfg)
        assert str(listen).startswith("127.0.0.1:")
        assert pp.proxy_exist("ctk", configuration=cfg)
        assert ta.create_latency_toxic("ctk", "lag", 150, configuration=cfg)
        assert _rtt({"listen": listen}) >= 0.15
        assert ta.create_limiter_toxic("ctk", "cap", 0, configuration=cfg)
        with _connect({"listen": listen}) as s:
            s.sendall(b"x")
            assert s.recv(1) == b""
        assert ta.delete_toxic("ctk", "cap", configuration=cfg)
        assert pa.reset(configuration=cfg)
        assert _rtt({"listen": listen}) >= 0
        assert pa.disable_proxy("ctk", configuration=cfg)
        assert pp.get_proxy_attribute("ctk", "enabled", configuration=cfg) is False
        pa.delete_proxy("ctk", configuration=cfg)
        assert not pp.proxy_exist("ctk", configuration=cfg)
    finally:
        os.environ.pop("ctk_PORT", None)


def test_hung_toxiproxy_call_is_bounded() -> None:
    """A Toxiproxy that accepts and never answers: every call ends with an error, in bounded time."""
    sock = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with ToxiproxyClient(url, timeout_s=0.3) as c:
            for call in (c.version, c.proxies, c.reset, lambda: c.add_toxic("u", "latency")):
                with pytest.raises(ToxiproxyUnavailableError):
                    call()
    finally:
        stop.set()
        t.join(2)
        for h in held:
            h.close()
        sock.close()


def test_faultproxy_runs_as_a_process(echo: Upstream) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "chaos.faultproxy", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with ToxiproxyClient(url, timeout_s=5) as c:
            p = c.create_proxy("x", echo.addr)
            assert _rtt(p) >= 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_api_is_bounded_against_bad_clients(fp: FaultProxyServer, api: ToxiproxyClient) -> None:
    """Oversize bodies are refused, over-long lines drop that connection, a stalled client blocks nobody."""
    with socket.create_connection(("127.0.0.1", fp.port), timeout=5) as s:
        s.sendall(b"POST /proxies HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 413")
    with socket.create_connection(("127.0.0.1", fp.port), timeout=5) as s:
        s.sendall(b"GET /" + b"x" * 200_000 + b" HTTP/1.1\r\n\r\n")
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    stalled = socket.create_connection(("127.0.0.1", fp.port), timeout=5)
    try:
        stalled.sendall(b"POST /proxies HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")  # never finishes
        assert "faultproxy" in api.version()
        assert api.proxies() == {}
    finally:
        stalled.close()


def test_many_connections_relay_correctly_and_leave_no_links(
    fp: FaultProxyServer, api: ToxiproxyClient, echo: Upstream
) -> None:
    """50 concurrent clients, half the time through a toxic: every byte comes back, nothing leaks."""
    p = api.create_proxy("svc", echo.addr)
    api.add_toxic("svc", "slicer", {"average_size": 512, "size_variation": 100, "delay": 0}, toxicity=0.5)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            data = os.urandom(20_000 + i)
            with _connect(p) as s:
                s.sendall(data)
                assert _recv_exact(s, len(data)) == data
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    deadline = time.monotonic() + 10
    while fp.call(lambda px: len(px.proxies["svc"].links)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fp.call(lambda px: len(px.proxies["svc"].links)) == 0
