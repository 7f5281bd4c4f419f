"""Soak test: a bounded run of ``botbox run`` at moderate load with its memory sampled.

    /opt/botbox/venv/bin/python -m bench.soak --minutes 10            # the documented long soak
    /opt/botbox/venv/bin/python -m bench.soak --seconds 20 --json out.json

Everything stays on loopback: a throwaway CA (trustme), a local TLS echo upstream, the proxy as a
subprocess (``python -m botbox run``) and an asyncio load generator with ``--concurrency`` keep-alive
clients. The mix exercises the paths a long-lived sidecar sees: small GETs, 4 KiB POST bodies, denied
hosts (403), malformed requests (400 + close), fresh connections, and a secret rotation (Kubernetes
``..data`` symlink swap) every ``--rotate-every`` seconds.

RSS of the proxy is sampled every ``--sample-every`` seconds from ``/proc/PID/status``. The first
``--warmup`` fraction of the run is discarded (allocator arenas, TLS session cache, prometheus label
children and the upstream pool reach their steady state there). Verdict:

* ``growth`` = median RSS of the last quarter of the post-warmup samples minus the median of the
  first quarter; must be ≤ ``max(--bound-mib, 10 % of the baseline)``. The default 8 MiB is generous
  for noise (a Python process's RSS wobbles by a few MiB) yet small enough to catch a leak of about
  1 KiB per request within a 20 s CI run at a few hundred requests/s.
* ``slope`` (least squares over the post-warmup samples, MiB/hour) is reported for the long run.
* Zero unexpected responses (every request's status must be the one its kind expects).

Exit status: 0 pass, 1 fail (errors or growth beyond the bound).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h11
import trustme

REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ----------------------------------------------------------------------------------------- upstream
class EchoUpstream:
    """TLS + h11 echo server on a private event loop thread; answers with a fingerprint of the
    ``Authorization`` it received (never the value), counts requests."""

    def __init__(self, ca: trustme.CA) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost").configure_cert(self.ctx)
        self.port = 0
        self.hits = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-upstream", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("upstream did not start")

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx, backlog=512)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.IDLE:
                        return
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    auth = b""
                    for n, v in event.headers:
                        if n == b"authorization":
                            auth = v
                    size = 0
                    while True:
                        ev = conn.next_event()
                        if ev is h11.NEED_DATA:
                            conn.receive_data(await reader.read(65536))
                        elif isinstance(ev, h11.Data):
                            size += len(ev.data)
                        elif isinstance(ev, h11.EndOfMessage):
                            break
                        else:
                            return
                    self.hits += 1
                    body = json.dumps(
                        {"auth_sha256": hashlib.sha256(auth).hexdigest(), "body_bytes": size}
                    ).encode()
                    writer.write(conn.send(h11.Response(status_code=200, headers=[
                        ("Content-Type", "application/json"), ("Content-Length", str(len(body)))])) or b"")
                    writer.write(conn.send(h11.Data(data=body)) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                else:
                    return
        except (h11.ProtocolError, ConnectionError, ssl.SSLError, OSError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# ------------------------------------------------------------------------------------------- secrets
class K8sSecretDir:
    """The Kubernetes Secret volume layout: ``..<ts>/key``, ``..data -> ..<ts>``, ``key -> ..data/key``."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.generation = 0
        self.values: list[bytes] = []

    def write(self, value: bytes) -> None:
        self.generation += 1
        gen = self.root / f"..2026_soak_{self.generation:06d}"
        gen.mkdir(mode=0o755)
        (gen / self.name).write_bytes(value + b"\n")
        tmp = self.root / "..data_tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        tmp.symlink_to(gen.name)
        os.replace(tmp, self.root / "..data")  # atomic swap, as the kubelet does
        link = self.root / self.name
        if not link.is_symlink():
            link.symlink_to(f"..data/{self.name}")
        self.values.append(value)
        if old is not None:
            for p in (self.root / old).iterdir():
                p.unlink()
            (self.root / old).rmdir()


# ------------------------------------------------------------------------------------------- proxy
@dataclass
class ProxyProcess:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    stderr_path: Path

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as r:
            return str(r.read().decode())


def start_proxy(work: Path, config: dict[str, Any]) -> ProxyProcess:
    import yaml

    port, admin = free_port(), free_port()
    config = {**config, "listen_port": port, "metrics_port": admin}
    cfg = work / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    err = work / "proxy.stderr"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with err.open("wb") as err_fh:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "botbox", "run", "--config", str(cfg)],
            cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=err_fh,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode}: {err.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=1) as r:
                if r.status == 200:
                    return ProxyProcess(proc, port, admin, err)
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"proxy not ready: {err.read_text()[-2000:]}")


# -------------------------------------------------------------------------------------------- load
@dataclass
class Counts:
    ok: int = 0
    denied: int = 0
    bad: int = 0
    errors: int = 0
    fingerprints: set[str] = field(default_factory=set)
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what)


async def _roundtrip(port: int, requests: list[bytes]) -> list[tuple[int, bytes]]:
    """Send requests one after the other on one keep-alive connection; return (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out: list[tuple[int, bytes]] = []
    try:
        for raw in requests:
            writer.write(raw)
            await writer.drain()
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
            status, body = 0, b""
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), 30)
                    conn.receive_data(data)
                elif isinstance(ev, h11.Response):
                    status = ev.status_code
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
                else:
                    raise ConnectionError(f"unexpected {ev!r}")
            out.append((status, body))
            if conn.their_state is h11.MUST_CLOSE:
                break
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return out


async def _client(port: int, authority: bytes, stop: float, counts: Counts, seed: int) -> None:
    get = b"GET /soak HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n"
    post = (b"POST /soak HTTP/1.1\r\nHost: " + authority + b"\r\nContent-Length: 4096\r\n\r\n" + b"p" * 4096)
    denied = b"GET / HTTP/1.1\r\nHost: denied.example\r\n\r\n"
    bad = (b"POST / HTTP/1.1\r\nHost: " + authority
           + b"\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
    i = seed
    while time.monotonic() < stop:
        i += 1
        kind = i % 20
        if kind == 0:
            batch, expect = [bad], [400]
        elif kind in (1, 2):
            batch, expect = [get, denied, get], [200, 403, 200]
        else:
            batch, expect = [get, post] * 10, [200] * 20
        try:
            results = await _roundtrip(port, batch)
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            counts.error(f"{type(exc).__name__}: {exc}")
            continue
        if [s for s, _ in results] != expect:
            counts.error(f"statuses {[s for s, _ in results]} != {expect}")
            continue
        for status, body in results:
            if status == 200:
                counts.ok += 1
                counts.fingerprints.add(json.loads(body)["auth_sha256"])
            elif status == 403:
                counts.denied += 1
            else:
                counts.bad += 1


@dataclass
class SoakResult:
    seconds: float
    requests: int
    ok: int
    denied: int
    bad_requests: int
    errors: int
    error_samples: list[str]
    rps: float
    rotations: int
    unknown_fingerprints: int
    rss_kib: list[tuple[float, int]]
    baseline_kib: float
    growth_kib: float
    bound_kib: float
    slope_mib_per_hour: float
    passed: bool


def _slope(points: list[tuple[float, int]]) -> float:
    if len(points) < 2:
        return 0.0
    xs = [p[0] for p in points]
    ys = [float(p[1]) for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def run_soak(
    seconds: float,
    *,
    concurrency: int = 8,
    sample_every: float = 0.5,
    rotate_every: float = 5.0,
    warmup: float = 0.25,
    bound_mib: float = 8.0,
    log: bool = True,
) -> SoakResult:
    def say(msg: str) -> None:
        if log:
            print(f"[soak] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="botbox-soak-") as tmp:
        work = Path(tmp)
        ca = trustme.CA()
        ca_file = work / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        secrets_dir = work / "secrets"
        secrets_dir.mkdir()
        secret = K8sSecretDir(secrets_dir, "api-key")
        secret.write(b"soak-secret-0")
        upstream = EchoUpstream(ca)
        upstream.start()
        proxy: ProxyProcess | None = None
        try:
            authority = f"localhost:{upstream.port}".encode()
            proxy = start_proxy(work, {
                "secrets_dir": str(secrets_dir),
                "upstream_ca_file": str(ca_file),
                "max_connections": 256,
                "egress_policy": {"default_action": "deny", "rules": [{
                    "host": "localhost", "action": "allow", "allowed_ports": [upstream.port],
                    "header_rewrites": [
                        {"name": "Authorization", "value": "Bearer {value}", "secret_ref": "api-key"}],
                }]},
            })
            say(f"proxy pid {proxy.proc.pid} on 127.0.0.1:{proxy.port}, upstream :{upstream.port}, "
                f"{seconds:.0f} s, {concurrency} clients")
            counts = Counts()
            samples: list[tuple[float, int]] = []
            rotations = 0
            t0 = time.monotonic()
            stop = t0 + seconds

            async def sampler() -> None:
                nonlocal rotations
                next_rotate = t0 + rotate_every
                last_report = t0
                while time.monotonic() < stop:
                    now = time.monotonic()
                    samples.append((now - t0, rss_kib(proxy.proc.pid)))
                    if now >= next_rotate:
                        rotations += 1
                        secret.write(b"soak-secret-%d" % rotations)
                        next_rotate += rotate_every
                    if log and now - last_report >= 30:
                        last_report = now
                        say(f"t={now - t0:.0f}s rss={samples[-1][1] / 1024:.1f} MiB ok={counts.ok} "
                            f"errors={counts.errors}")
                    await asyncio.sleep(sample_every)

            async def main() -> None:
                clients = [_client(proxy.port, authority, stop, counts, i * 7) for i in range(concurrency)]
                await asyncio.gather(sampler(), *clients)

            asyncio.run(main())
            elapsed = time.monotonic() - t0
            if proxy.proc.poll() is not None:
                counts.error(f"proxy died with {proxy.proc.returncode}")
        finally:
            if proxy is not None:
                proxy.proc.terminate()
                try:
                    proxy.proc.wait(30)
                except subprocess.TimeoutExpired:
                    proxy.proc.kill()
                    proxy.proc.wait()
            upstream.stop()
        allowed_fps = {hashlib.sha256(b"Bearer " + v).hexdigest() for v in secret.values}
        unknown = len(counts.fingerprints - allowed_fps)

    post = [s for s in samples if s[0] >= seconds * warmup]
    q = max(1, len(post) // 4)
    baseline = statistics.median(v for _, v in post[:q]) if post else 0.0
    end = statistics.median(v for _, v in post[-q:]) if post else 0.0
    growth = end - baseline
    bound = max(bound_mib * 1024, 0.10 * baseline)
    slope = _slope(post) * 3600 / 1024  # KiB/s -> MiB/hour
    requests = counts.ok + counts.denied + counts.bad
    passed = counts.errors == 0 and unknown == 0 and growth <= bound and len(post) >= 4
    return SoakResult(
        seconds=round(elapsed, 1), requests=requests, ok=counts.ok, denied=counts.denied,
        bad_requests=counts.bad, errors=counts.errors, error_samples=counts.error_samples,
        rps=round(requests / elapsed, 1), rotations=rotations, unknown_fingerprints=unknown,
        rss_kib=samples, baseline_kib=baseline, growth_kib=growth, bound_kib=bound,
        slope_mib_per_hour=round(slope, 2), passed=passed,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float, default=None)
    g.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--sample-every", type=float, default=1.0)
    ap.add_argument("--rotate-every", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=0.25, help="fraction of the run discarded")
    ap.add_argument("--bound-mib", type=float, default=8.0)
    ap.add_argument("--json", type=Path, default=None, help="write the full result (with samples) here")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (args.minutes or 10.0) * 60
    res = run_soak(seconds, concurrency=args.concurrency, sample_every=args.sample_every,
                   rotate_every=args.rotate_every, warmup=args.warmup, bound_mib=args.bound_mib)
    if args.json:
        args.json.write_text(json.dumps(asdict(res), indent=1))
    rss = [v for _, v in res.rss_kib]
    print(
        f"soak {res.seconds:.0f}s: {res.requests} requests ({res.rps:.0f}/s; ok {res.ok}, "
        f"denied {res.denied}, bad {res.bad_requests}), errors {res.errors}, rotations {res.rotations}, "
        f"RSS min/max {min(rss) / 1024:.1f}/{max(rss) / 1024:.1f} MiB, "
        f"baseline {res.baseline_kib / 1024:.1f} MiB, "
        f"growth {res.growth_kib / 1024:+.2f} MiB (bound {res.bound_kib / 1024:.1f}), "
        f"slope {res.slope_mib_per_hour:+.2f} MiB/h -> {'PASS' if res.passed else 'FAIL'}"
    )
    for e in res.error_samples:
        print(f"  error: {e}")
    return 0 if res.passed else 1


if __name__ == "__main__":
    sys.exit(main())
