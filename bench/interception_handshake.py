"""Handshake latency of the HTTPS interception listener: cache hit vs cache miss (median, p99).

    /opt/botbox/venv/bin/python -m bench.interception_handshake [--n 400] [--json out.json]

Starts ``botbox run`` (interception on, pinned to CPU 1 when there are >= 2 CPUs) on loopback with a fresh
CA, then does sequential full TLS handshakes from this process (pinned to CPU 0), no session resumption:

* ``miss``: a new SNI for every connection (``h<i>.bench.example``): ClientHello parse, leaf key
  generation + signing in a worker thread, SSLContext build, handshake;
* ``hit``: the same SNI every time (leaf served from the cache);
* ``baseline``: ``openssl s_server`` with a static leaf, same client code (raw TLS 1.3 handshake cost).

Latency = TCP connect + TLS handshake as seen by the client (the client verifies the chain, as a real app
does). No upstream is contacted.  Numbers are for this machine only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = "/opt/botbox/venv/bin/python" if Path("/opt/botbox/venv/bin/python").exists() else sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpu: int) -> list[str]:
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu)]
    return []


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


@contextlib.contextmanager
def botbox_proxy(tmp: Path, n_hosts: int) -> Iterator[tuple[int, Path]]:
    from botbox.tls.ca import generate_ca, write_ca

    crt, key = write_ca(tmp / "ca", *generate_ca("BotBox bench CA", days=90))
    (tmp / "secrets").mkdir()
    port = _free_port()
    cfg = tmp / "config.yaml"
    cfg.write_text(
        f"listen_port: {_free_port()}\nmetrics_port: {_free_port()}\nsecrets_dir: {tmp / 'secrets'}\n"
        "egress_policy:\n  default_action: deny\n  rules: [{host: hit.bench.example, action: allow}]\n"
        f"https_interception:\n  enabled: true\n  listen_port: {port}\n  ca_cert_path: {crt}\n"
        f"  ca_key_path: {key}\n  cert_cache_size: {n_hosts + 10}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([*_pin(1), PY, "-m", "botbox", "run", "-c", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield port, crt
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def openssl_baseline(tmp: Path, ca_crt: Path) -> Iterator[int]:
    """``openssl s_server`` presenting a leaf for hit.bench.example issued by the bench CA."""
    from cryptography.hazmat.primitives import serialization

    from botbox.tls.ca import load_ca
    from botbox.tls.issuer import LeafIssuer

    ca = load_ca(ca_crt, tmp / "ca" / "tls.key", env={})
    cert, key = LeafIssuer(ca, 3600).build_certificate("hit.bench.example")
    leaf = tmp / "leaf.pem"
    leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca.chain_pem)
    leaf_key = tmp / "leaf.key"
    leaf_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    port = _free_port()
    argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(leaf), "-key", str(leaf_key),
            "-alpn", "http/1.1", "-quiet", "-naccept", "100000"]
    proc = subprocess.Popen([*_pin(1), *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def handshake_ms(port: int, sni: str, ctx: ssl.SSLContext) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(s, server_hostname=sni) as tls:
            dt = time.perf_counter() - t0
            assert tls.version() is not None
    return dt * 1000.0


def summarize(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "n": len(s),
        "median_ms": round(statistics.median(s), 3),
        "p90_ms": round(s[int(0.90 * (len(s) - 1))], 3),
        "p99_ms": round(s[int(0.99 * (len(s) - 1))], 3),
        "max_ms": round(s[-1], 3),
    }


def _issue_cost(n: int) -> dict[str, float]:
    """CPU cost of one miss minus the handshake: key generation + signing + SSLContext build."""
    from botbox.tls.ca import generate_ca, load_ca, write_ca
    from botbox.tls.issuer import LeafIssuer

    with tempfile.TemporaryDirectory(prefix="botbox-issue-bench-") as d:
        crt, key = write_ca(Path(d) / "ca", *generate_ca(days=90))
        issuer = LeafIssuer(load_ca(crt, key, env={}), 3600)
        samples = []
        for i in range(n):
            t0 = time.perf_counter()
            issuer.issue(f"x{i}.bench.example")
            samples.append((time.perf_counter() - t0) * 1000.0)
    return summarize(samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="handshakes per scenario (default 400)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if cpu := _pin(0):
        os.sched_setaffinity(0, {int(cpu[-1])})
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="botbox-hs-bench-") as d:
        tmp = Path(d)
        with botbox_proxy(tmp, args.n) as (port, ca_crt):
            ctx = ssl.create_default_context(cafile=str(ca_crt))
            ctx.set_alpn_protocols(["http/1.1"])
            for _ in range(20):  # warm-up (also fills the cache for the hit host)
                handshake_ms(port, "hit.bench.example", ctx)
            hit: list[float] = []
            miss: list[float] = []
            for i in range(args.n):  # interleaved so load drift on the machine hits both alike
                hit.append(handshake_ms(port, "hit.bench.example", ctx))
                miss.append(handshake_ms(port, f"h{i}.bench.example", ctx))
            results["hit"] = summarize(hit)
            results["miss"] = summarize(miss)
            if shutil.which("openssl"):
                with openssl_baseline(tmp, ca_crt) as bport:
                    for _ in range(20):
                        handshake_ms(bport, "hit.bench.example", ctx)
                    results["baseline_openssl_s_server"] = summarize(
                        [handshake_ms(bport, "hit.bench.example", ctx) for _ in range(args.n)]
                    )
    results["issue_leaf_in_process"] = _issue_cost(args.n)
    print(f"{'scenario':28} {'n':>5} {'median ms':>10} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, r in results.items():
        row = f"{r['median_ms']:>10} {r['p90_ms']:>8} {r['p99_ms']:>8} {r['max_ms']:>8}"
        print(f"{name:28} {r['n']:>5} {row}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
