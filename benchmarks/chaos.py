"""Chaos harness figures: fault-proxy added latency and throughput vs a direct loopback connection, and
pre-flight time per experiment.

Anchor (published for Toxiproxy): < 100 µs added latency with no toxics, ~1000 MB/s through one proxy.
Everything runs on loopback: an echo / source server in its own process, the fault proxy in its own
process (``python -m chaos.faultproxy``), the client here. Each figure is measured direct and through
the proxy in the same run, interleaved, and reported as a ratio.

    .venv/bin/python benchmarks/chaos.py [--rtt N] [--mb MB] [--rounds R] [--preflight-repeat N]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chaos.toxiproxy_client import ToxiproxyClient

SERVERS = r"""
import socket, sys, threading
mode, total = sys.argv[1], int(sys.argv[2])
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
def echo(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with c:
        while data := c.recv(65536):
            c.sendall(data)
def source(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chunk = b"x" * (1 << 20)
    with c:
        c.recv(1)
        left = total
        while left > 0:
            n = min(left, len(chunk)); c.sendall(chunk[:n]); left -= n
while True:
    c, _ = srv.accept()
    threading.Thread(target=echo if mode == "echo" else source, args=(c,), daemon=True).start()
"""


def _spawn(*args: str) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    return p, p.stdout.readline().strip()


def _rtts(port: int, n: int) -> list[float]:
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = b"p" * 64
        for _ in range(50):  # warm up
            s.sendall(msg)
            s.recv(64)
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < 64:
                got += len(s.recv(64 - got))
            out.append(time.perf_counter() - t0)
    return out


def _throughput(port: int, total: int) -> float:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        t0 = time.perf_counter()
        s.sendall(b"g")
        got = 0
        while got < total:
            n = s.recv_into(view)
            if not n:
                break
            got += n
        dt = time.perf_counter() - t0
    if got < total:
        raise RuntimeError(f"short read: {got} of {total}")
    return total / dt / 1e6


def _port(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rtt", type=int, default=3000, help="round trips per round and path")
    ap.add_argument("--mb", type=int, default=128, help="MB per throughput transfer")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    ap.add_argument("--preflight-repeat", type=int, default=50)
    args = ap.parse_args()
    total = args.mb * 1_000_000

    echo, echo_port = _spawn("-c", SERVERS, "echo", "0")
    src, src_port = _spawn("-c", SERVERS, "source", str(total))
    fp, url = _spawn("-m", "chaos.faultproxy", "--port", "0")
    try:
        with ToxiproxyClient(url) as api:
            pe = _port(api.create_proxy("echo", f"127.0.0.1:{echo_port}")["listen"])
            ps = _port(api.create_proxy("source", f"127.0.0.1:{src_port}")["listen"])
            direct_rtt: list[float] = []
            proxy_rtt: list[float] = []
            direct_mbs: list[float] = []
            proxy_mbs: list[float] = []
            for _ in range(args.rounds):
                direct_rtt += _rtts(int(echo_port), args.rtt)
                proxy_rtt += _rtts(pe, args.rtt)
                direct_mbs.append(_throughput(int(src_port), total))
                proxy_mbs.append(_throughput(ps, total))
            # the toxic path with a 0 ms latency toxic (queue + pump, no delay), then a 5 ms one:
            # how exactly does the proxy add what it is told to?
            api.add_toxic("echo", "latency", {"latency": 0}, stream="downstream")
            toxic_rtt = _rtts(pe, args.rtt)
            api.update_toxic("echo", "latency_downstream", {"latency": 5})
            lat5_rtt = _rtts(pe, max(50, args.rtt // 20))
    finally:
        for p in (fp, echo, src):
            p.terminate()
            p.wait(10)

    def us(xs: list[float], q: float) -> float:
        s = sorted(xs)
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1e6, 1)

    d50, p50 = us(direct_rtt, 0.5), us(proxy_rtt, 0.5)
    added = round(p50 - d50, 1)
    dm, pm = statistics.median(direct_mbs), statistics.median(proxy_mbs)
    result: dict[str, object] = {
        "benchmark": "chaos",
        "fault_proxy": {
            "added_latency_us_p50": added,
            "added_latency_vs_anchor_100us": round(added / 100.0, 2),
            "rtt_us": {
                "direct_p50": d50,
                "direct_p99": us(direct_rtt, 0.99),
                "proxied_p50": p50,
                "proxied_p99": us(proxy_rtt, 0.99),
                "proxied_zero_latency_toxic_p50": us(toxic_rtt, 0.5),
                "proxied_5ms_latency_toxic_p50": us(lat5_rtt, 0.5),
            },
            "latency_toxic_5ms_added_us_p50": round(us(lat5_rtt, 0.5) - p50, 1),
            "rtt_ratio_proxied_to_direct": round(p50 / d50, 2) if d50 else None,
            "throughput_mb_s": {"direct": round(dm, 1), "proxied": round(pm, 1)},
            "throughput_ratio_proxied_to_direct": round(pm / dm, 3),
            "throughput_vs_anchor_1000mb_s": round(pm / 1000.0, 3),
            "transfer_mb": args.mb,
            "round_trips": args.rtt * args.rounds,
        },
    }
    try:
        from chaos.preflight import preflight_timing
    except ImportError:
        result["preflight"] = "chaos.preflight.preflight_timing not available"
    else:
        result["preflight"] = preflight_timing(repeat=args.preflight_repeat)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
