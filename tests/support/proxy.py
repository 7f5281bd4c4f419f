"""Helpers to run the proxy in-process (a blocking-portal thread) or as a subprocess, write config files,
and talk raw HTTP/1.1 to it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.from_thread
import h11
import yaml

from botbox.config import parse_config
from botbox.logs import JsonLogger
from botbox.server import Runtime

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = "/opt/botbox/venv/bin/python"


def free_port() -> int:
    """A TCP port currently free on both 127.0.0.1 and ::1 (for the [::1] twin)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket(socket.AF_INET6) as s6:
                s6.bind(("::1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def make_config(
    *,
    secrets_dir: Path,
    ca_file: Path | None,
    upstream_port: int,
    secret_ref: str | None = "api-key",  # noqa: S107 - a secret *name*
    **overrides: Any,
) -> dict[str, Any]:
    """A config dict with a rule for the test upstream (127.0.0.1 with Authorization injection, and
    localhost without)."""
    rewrites: list[dict[str, Any]] = []
    if secret_ref is not None:
        rewrites.append({"name": "Authorization", "value": "Bearer {value}", "secret_ref": secret_ref})
    cfg: dict[str, Any] = {
        "listen_addr": "127.0.0.1",
        "listen_port": free_port(),
        "metrics_addr": "127.0.0.1",
        "metrics_port": free_port(),
        "secrets_dir": str(secrets_dir),
        "upstream_ca_file": str(ca_file) if ca_file else None,
        "connect_timeout_seconds": 2,
        "upstream_idle_timeout_seconds": 5,
        "request_header_timeout_seconds": 2,
        "shutdown_grace_seconds": 5,
        "egress_policy": {
            "default_action": "deny",
            "rules": [
                {"host": "127.0.0.1", "action": "allow", "allowed_ports": [upstream_port],
                 "header_rewrites": rewrites},
                {"host": "localhost", "action": "allow", "allowed_ports": [upstream_port, 443]},
            ],
        },
    }
    cfg.update(overrides)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class LogCapture(io.TextIOBase):
    """Thread-safe in-memory text stream for JsonLogger."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf: list[str] = []

    def write(self, s: str) -> int:
        with self._lock:
            self._buf.append(s)
        return len(s)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        with self._lock:
            return "".join(self._buf)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines() if line.strip()]

    def requests(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("msg") == "request"]


@dataclass
class RunningProxy:
    runtime: Runtime
    port: int
    admin_port: int
    logs: LogCapture
    portal: Any = None
    _future: Any = None

    @property
    def app(self) -> Any:
        return self.runtime.app

    def metric(self, name: str, **labels: str) -> float:
        """Current value; waits briefly for a pending update (accounting happens after the last byte
        of the response is sent, so the client can see the response a moment before the metric)."""
        deadline = time.monotonic() + 0.5
        while True:
            v = self.runtime.metrics.registry.get_sample_value(name, labels)
            if v or time.monotonic() > deadline:
                return 0.0 if v is None else float(v)
            time.sleep(0.01)

    def request_logs(self, n: int = 1) -> list[dict[str, Any]]:
        """The request log lines, waiting until at least ``n`` exist."""
        deadline = time.monotonic() + 2.0
        while True:
            logs = self.logs.requests()
            if len(logs) >= n or time.monotonic() > deadline:
                return logs
            time.sleep(0.01)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def exchange(self, raw: bytes, *, method: bytes = b"GET", timeout: float = 10.0,
                 check_closed: bool = False) -> Response:
        """One raw request on a fresh connection; returns the parsed response (+ whether it closed)."""
        with self.connect(timeout) as s:
            s.sendall(raw)
            return read_response(s, method=method, check_closed=check_closed)


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    closed: bool | None = None
    chunks: list[tuple[float, bytes]] = field(default_factory=list)

    def header(self, name: str) -> bytes | None:
        n = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == n:
                return v
        return None

    def all(self, name: str) -> list[bytes]:
        n = name.lower().encode()
        return [v for k, v in self.headers if k.lower() == n]


def read_response(sock: socket.socket, *, method: bytes = b"GET", check_closed: bool = False,
                  leftover: bytearray | None = None) -> Response:
    """Parse one response from ``sock`` with an h11 client (timestamps each body chunk)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    if leftover:
        conn.receive_data(bytes(leftover))
        leftover.clear()
    status = 0
    headers: list[tuple[bytes, bytes]] = []
    body = bytearray()
    chunks: list[tuple[float, bytes]] = []
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            data = sock.recv(65536)
            conn.receive_data(data)
            continue
        if isinstance(ev, h11.InformationalResponse):
            continue
        if isinstance(ev, h11.Response):
            status = ev.status_code
            headers = list(ev.headers.raw_items())
        elif isinstance(ev, h11.Data):
            body += ev.data
            chunks.append((time.monotonic(), bytes(ev.data)))
        elif isinstance(ev, h11.EndOfMessage):
            break
        elif isinstance(ev, h11.ConnectionClosed):
            raise ConnectionError("closed before a complete response")
    if leftover is not None:
        leftover += conn.trailing_data[0]
    closed = None
    if check_closed:
        closed = is_closed(sock, 1.0)
    return Response(status, headers, bytes(body), closed, chunks)


def is_closed(sock: socket.socket, wait: float = 2.0) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def get(host: str, path: str = "/", *, headers: list[tuple[str, str]] | None = None,
        method: str = "GET", body: bytes | None = None, version: str = "1.1") -> bytes:
    """Build a raw request (origin-form) with the given Host."""
    lines = [f"{method} {path} HTTP/{version}", f"Host: {host}"]
    for k, v in headers or []:
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


@contextlib.contextmanager
def running_proxy(cfg_dict: dict[str, Any]) -> Iterator[RunningProxy]:
    """Run the proxy in-process in a portal thread; stop (drain) and clean up on exit."""
    cfg = parse_config(cfg_dict)
    logs = LogCapture()
    runtime = Runtime(cfg, logger=JsonLogger(stream=logs))
    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        future, _ = portal.start_task(runtime.serve)
        proxy = RunningProxy(runtime, cfg.listen_port, cfg.metrics_port, logs, portal, future)
        try:
            yield proxy
        finally:
            portal.call(runtime.request_stop)
            future.result(timeout=30)


@dataclass
class ProxyProcess:
    proc: subprocess.Popen[bytes]
    cfg: dict[str, Any]
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if '"msg":"listening"' in self.stderr():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"botbox exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"botbox did not start listening: {self.stderr()}")


def spawn_botbox(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> ProxyProcess:
    stderr_path = tmp_path / f"botbox-stderr-{time.monotonic_ns()}.log"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [VENV_PYTHON, "-m", "botbox", *args],
            stdout=subprocess.DEVNULL, stderr=err, cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        )
    return ProxyProcess(proc, {}, stderr_path)


def run_botbox(args: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VENV_PYTHON, "-m", "botbox", *args], capture_output=True, text=True, timeout=timeout,
        cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)}, check=False,
    )


__all__ = ["sys"]


def serve_raw(proxy: RunningProxy, ctx: Any, raw: bytes, *, method: bytes = b"GET",
              shut_write: bool = False, check_closed: bool = False) -> Response:
    """Run ``serve_connection`` with a hand-made ConnectionContext on one end of a socketpair
    (so listener/orig_dst/sni can be set without TLS or iptables) and read the response."""
    from anyio.abc import SocketStream

    from botbox.pipeline import serve_connection

    a, b = socket.socketpair()
    app = proxy.runtime.app

    async def run() -> None:
        stream = await SocketStream.from_socket(a)
        await serve_connection(stream, ctx, app)

    fut = proxy.portal.start_task_soon(run)
    try:
        b.settimeout(10)
        b.sendall(raw)
        if shut_write:
            b.shutdown(socket.SHUT_WR)
        return read_response(b, method=method, check_closed=check_closed)
    finally:
        b.close()
        fut.result(timeout=10)
