"""End-to-end HTTPS interception on loopback with real TLS, real clients (httpx, curl, openssl, ssl).

The interception listener forces the upstream port to 443, so each test world runs in a private network
namespace (its own loopback): a trustme HTTPS upstream on 127.0.0.1:443 answers for ``localhost`` and
echoes what it received; two proxies (T3 option off / on) run in-process on event-loop threads that
joined the namespace.  Clients connect straight to the interception port (no NAT needed here: the
namespace world with redirected 443 lives in ``integration/``) with SNI and Host chosen per test.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import http.server
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import httpx
import pytest
import trustme

from botbox.config import parse_config
from botbox.logs import JsonLogger
from botbox.server import Runtime, StartupError
from botbox.tls.ca import generate_ca, write_ca

T = TypeVar("T")

SECRET = "sk-intercept-e2e-0123456789abcdef"
HTTP_PORT, ADMIN_PORT, TLS_PORT = 18080, 19090, 8443
HTTP_PORT_DENY, ADMIN_PORT_DENY, TLS_PORT_DENY = 18081, 19091, 8444

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 (private network namespace)",
)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path, "headers": [[k, v] for k, v in self.headers.items()]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class World:
    ns: str
    tmp: Path
    ca_pem: Path
    runtimes: dict[str, Runtime]
    logs: dict[str, io.StringIO]
    pool: concurrent.futures.ThreadPoolExecutor

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run ``fn`` on a thread inside the namespace."""
        return self.pool.submit(fn, *args, **kw).result(timeout=30)

    def run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True, text=True,
                              timeout=30, check=False, **kw)

    def metric(self, which: str, name: str, **labels: str) -> float:
        v = self.runtimes[which].metrics.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def handshakes(self, which: str, result: str, expected: float) -> float:
        return self.wait_metric(which, "botbox_tls_handshakes_total", expected, result=result)

    def wait_metric(self, which: str, name: str, expected: float, **labels: str) -> float:
        """The server counts a refused handshake after the client gave up: poll briefly, then report."""
        deadline = time.monotonic() + 3.0
        while (v := self.metric(which, name, **labels)) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return v

    def client_ctx(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


def _config(
    tmp: Path, crt: Path, key: Path, upstream_ca: Path, *, deny: bool, ports: tuple[int, int, int]
) -> Any:
    return parse_config({
        "listen_port": ports[0], "metrics_port": ports[1], "secrets_dir": str(tmp / "secrets"),
        "upstream_ca_file": str(upstream_ca),
        "egress_policy": {"default_action": "deny", "rules": [
            {"host": "localhost", "action": "allow", "header_rewrites": [
                {"name": "Authorization", "value": "Bearer {value}", "secret_ref": "api-key"}]},
            {"host": "blocked.example", "action": "deny"},
        ]},
        "https_interception": {
            "enabled": True, "listen_port": ports[2], "ca_cert_path": str(crt), "ca_key_path": str(key),
            "deny_handshake_on_disallowed_sni": deny, "handshake_timeout_ms": 1000,
            "cert_ttl_seconds": 3600, "cert_cache_size": 8, "cert_cache_ttl_seconds": 600,
        },
    })


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from netsetup.netns import namespace

    tmp = tmp_path_factory.mktemp("interception")
    (tmp / "secrets").mkdir()
    (tmp / "secrets" / "api-key").write_text(SECRET + "\n")
    crt, key = write_ca(tmp / "ca", *generate_ca("BotBox E2E CA", days=2))
    upstream_ca = trustme.CA()
    upstream_ca.cert_pem.write_to_path(str(tmp / "upstream-ca.pem"))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    upstream_ca.issue_cert("localhost").configure_cert(server_ctx)

    with namespace(prefix="bbtls") as ns, contextlib.ExitStack() as stack:
        path = f"/run/netns/{ns.name}"
        pool = stack.enter_context(
            concurrent.futures.ThreadPoolExecutor(4, initializer=_setns, initargs=(path,))
        )

        def make_upstream() -> http.server.ThreadingHTTPServer:
            srv = http.server.ThreadingHTTPServer(("127.0.0.1", 443), _Echo)
            srv.socket = server_ctx.wrap_socket(srv.socket, server_side=True)
            return srv

        upstream = pool.submit(make_upstream).result()
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        stack.callback(upstream.server_close)
        stack.callback(upstream.shutdown)

        runtimes: dict[str, Runtime] = {}
        logs: dict[str, io.StringIO] = {}
        for which, deny, ports in (("open", False, (HTTP_PORT, ADMIN_PORT, TLS_PORT)),
                                   ("deny", True, (HTTP_PORT_DENY, ADMIN_PORT_DENY, TLS_PORT_DENY))):
            logs[which] = io.StringIO()
            rt = Runtime(_config(tmp, crt, key, tmp / "upstream-ca.pem", deny=deny, ports=ports),
                         logger=JsonLogger(stream=logs[which]))
            cm = anyio.from_thread.start_blocking_portal()
            portal = pool.submit(cm.__enter__).result()  # the loop thread is born inside the namespace
            stack.callback(cm.__exit__, None, None, None)
            portal.call(rt.build)  # binds inside the namespace (loop thread)
            portal.start_task(rt.serve)
            stack.callback(portal.call, rt.request_stop)
            runtimes[which] = rt
        yield World(ns=ns.name, tmp=tmp, ca_pem=crt, runtimes=runtimes, logs=logs, pool=pool)


# ------------------------------------------------------------------------------------------ helpers


def _tls_request(w: World, raw: bytes, *, sni: str | None, port: int = TLS_PORT,
                 ctx: ssl.SSLContext | None = None) -> tuple[bytes, str | None]:
    """Send ``raw`` over TLS with the given SNI; return (response bytes, negotiated ALPN)."""

    def go() -> tuple[bytes, str | None]:
        c = ctx or w.client_ctx()
        if sni is None:
            c.check_hostname = False
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        tls = c.wrap_socket(s, server_hostname=sni)
        alpn = tls.selected_alpn_protocol()
        tls.sendall(raw)
        data = b""
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                cl = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                if cl and len(body) >= int(cl[0].split(b":")[1]):
                    break
        tls.close()
        return data, alpn

    return w.call(go)


def _status_body(resp: bytes) -> tuple[int, bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def _httpx_get(w: World, url: str, *, headers: dict[str, str], sni: str | None = None,
               verify: ssl.SSLContext | bool | None = None) -> httpx.Response:
    def go() -> httpx.Response:
        ext = {"sni_hostname": sni} if sni else None
        with httpx.Client(verify=verify if verify is not None else w.client_ctx(), trust_env=False) as c:
            return c.get(url, headers=headers, extensions=ext)

    return w.call(go)


def _echo_headers(resp_body: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in json.loads(resp_body)["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


# ------------------------------------------------------------------------------------------ tests


def test_httpx_reaches_upstream_with_key_injected(world: World) -> None:
    issued0 = world.metric("open", "botbox_https_interception_cert_issued_total", decision="issued")
    r = _httpx_get(world, f"https://localhost:{TLS_PORT}/v1/models?x=1",
                   headers={"Host": "localhost", "Authorization": "Bearer attacker", "authorization": "x"})
    assert r.status_code == 200, r.text
    hdrs = _echo_headers(r.content)
    assert hdrs["authorization"] == [f"Bearer {SECRET}"]
    assert json.loads(r.content)["path"] == "/v1/models?x=1"
    assert r.extensions["http_version"] == b"HTTP/1.1"
    assert world.metric("open", "botbox_tls_handshakes_total", result="ok") >= 1
    # a second connection is a cache hit and serves the same certificate
    hits0 = world.metric("open", "botbox_https_interception_cert_cache_total", result="hit")
    r2 = _httpx_get(world, f"https://localhost:{TLS_PORT}/again", headers={"Host": "localhost"})
    assert r2.status_code == 200
    assert world.metric("open", "botbox_https_interception_cert_cache_total", result="hit") == hits0 + 1
    issued = world.metric("open", "botbox_https_interception_cert_issued_total", decision="issued")
    assert issued <= issued0 + 1


def test_curl_with_cacert_reaches_upstream_with_key_injected(world: World) -> None:
    res = world.run(["curl", "-sS", "--max-time", "10", "--cacert", str(world.ca_pem),
                     "--connect-to", f"localhost:443:127.0.0.1:{TLS_PORT}",
                     "-H", "Authorization: Bearer from-app", "https://localhost/curl"])
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    assert body["path"] == "/curl"
    assert _echo_headers(res.stdout.encode())["authorization"] == [f"Bearer {SECRET}"]


def test_curl_without_the_ca_fails_no_silent_downgrade(world: World) -> None:
    before = world.metric("open", "botbox_tls_handshakes_total", result="io_error")
    res = world.run(["curl", "-sS", "--max-time", "10", "--connect-to", f"localhost:443:127.0.0.1:{TLS_PORT}",
                     "https://localhost/"])
    assert res.returncode == 60, (res.returncode, res.stderr)  # CURLE_PEER_FAILED_VERIFICATION
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        _httpx_get(world, f"https://localhost:{TLS_PORT}/", headers={"Host": "localhost"},
                   verify=ssl.create_default_context())
    assert world.handshakes("open", "io_error", before + 2) == before + 2


def test_chain_is_leaf_plus_ca(world: World) -> None:
    res = world.run(["openssl", "s_client", "-connect", f"127.0.0.1:{TLS_PORT}", "-servername", "localhost",
                     "-showcerts", "-CAfile", str(world.ca_pem), "-verify_return_error",
                     "-alpn", "h2,http/1.1"], input="")
    assert res.stdout.count("-----BEGIN CERTIFICATE-----") == 2, res.stdout
    assert "Verify return code: 0 (ok)" in res.stdout
    assert "ALPN protocol: http/1.1" in res.stdout


def test_disallowed_sni_gets_403_when_handshake_deny_is_off(world: World) -> None:
    r = _httpx_get(world, f"https://127.0.0.1:{TLS_PORT}/", headers={"Host": "blocked.example"},
                   sni="blocked.example")
    assert (r.status_code, r.text) == (403, "host not allowed")
    r = _httpx_get(world, f"https://127.0.0.1:{TLS_PORT}/", headers={"Host": "unknown.example"},
                   sni="unknown.example")
    assert (r.status_code, r.text) == (403, "host not allowed")


def test_disallowed_sni_fails_the_handshake_when_deny_is_on(world: World) -> None:
    issued = world.metric("deny", "botbox_https_interception_cert_issued_total", decision="issued")
    denied = world.metric("deny", "botbox_https_interception_cert_issued_total", decision="denied")
    hs_denied = world.metric("deny", "botbox_tls_handshakes_total", result="denied")
    with pytest.raises(ssl.SSLError, match="ACCESS_DENIED"):
        _tls_request(world, b"GET / HTTP/1.1\r\nHost: blocked.example\r\n\r\n", sni="blocked.example",
                     port=TLS_PORT_DENY)
    with pytest.raises(ssl.SSLError, match="ACCESS_DENIED"):
        _tls_request(world, b"GET / HTTP/1.1\r\nHost: unknown.example\r\n\r\n", sni="unknown.example",
                     port=TLS_PORT_DENY)
    assert world.wait_metric("deny", "botbox_https_interception_cert_issued_total", denied + 2,
                             decision="denied") == denied + 2
    assert world.handshakes("deny", "denied", hs_denied + 2) == hs_denied + 2
    # refused *before* issuing: nothing was signed and nothing is cached for those hosts
    assert world.metric("deny", "botbox_https_interception_cert_issued_total", decision="issued") == issued
    # the allowed host still works on the same listener
    resp, _ = _tls_request(world, b"GET /ok HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                           sni="localhost", port=TLS_PORT_DENY)
    assert _status_body(resp)[0] == 200


def test_sni_host_mismatch_is_400_and_counted(world: World) -> None:
    before = world.metric("open", "botbox_https_interception_host_mismatch_total")
    resp, _ = _tls_request(world, b"GET / HTTP/1.1\r\nHost: blocked.example\r\n\r\n", sni="localhost")
    assert _status_body(resp) == (400, b"SNI/Host header mismatch")
    assert world.metric("open", "botbox_https_interception_host_mismatch_total") == before + 1
    # case / trailing-dot variants of the same host are not a mismatch
    resp, _ = _tls_request(world, b"GET / HTTP/1.1\r\nHost: LocalHost.\r\nConnection: close\r\n\r\n",
                           sni="localhost")
    assert _status_body(resp)[0] == 200


def test_absolute_form_is_400(world: World) -> None:
    req = b"GET https://localhost/x HTTP/1.1\r\nHost: localhost\r\n\r\n"
    resp, _ = _tls_request(world, req, sni="localhost")
    assert _status_body(resp) == (400, b"absolute-form request not allowed on HTTPS interception listener")


def test_host_port_other_than_443_is_403(world: World) -> None:
    resp, _ = _tls_request(world, f"GET / HTTP/1.1\r\nHost: localhost:{TLS_PORT}\r\n\r\n".encode(),
                           sni="localhost")
    assert _status_body(resp) == (403, b"HTTPS interception listener only accepts port 443 traffic")
    resp, _ = _tls_request(world, b"GET / HTTP/1.1\r\nHost: localhost:443\r\nConnection: close\r\n\r\n",
                           sni="localhost")
    assert _status_body(resp)[0] == 200


def test_missing_sni_and_ip_literal_end_the_handshake(world: World) -> None:
    before = world.metric("open", "botbox_tls_handshakes_total", result="denied")
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        _tls_request(world, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", sni=None)
    # an IP literal URL makes clients send no SNI at all (RFC 6066)
    with pytest.raises(httpx.ConnectError):
        _httpx_get(world, f"https://127.0.0.1:{TLS_PORT}/", headers={"Host": "localhost"})
    assert world.handshakes("open", "denied", before + 2) == before + 2


def _raw_hello(server_name: bytes) -> bytes:
    lst = b"\x00" + len(server_name).to_bytes(2, "big") + server_name
    sni = b"\x00\x00" + (len(lst) + 2).to_bytes(2, "big") + len(lst).to_bytes(2, "big") + lst
    body = b"\x03\x03" + b"\x11" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(sni).to_bytes(2, "big") + sni
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(msg).to_bytes(2, "big") + msg


def _raw_exchange(w: World, data: bytes, port: int = TLS_PORT, wait: float = 5.0) -> bytes:
    def go() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
            if data:
                s.sendall(data)
            out = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(4096):
                    out += chunk
            return out

    return w.call(go)


@pytest.mark.parametrize("name", [b"127.0.0.1", b"[::1]", b"exa mple.com", b"a..b", b"evil.com/x", b"x@y.z"])
def test_invalid_or_ip_sni_gets_unrecognized_name_alert(world: World, name: bytes) -> None:
    before = world.metric("open", "botbox_tls_handshakes_total", result="denied")
    out = _raw_exchange(world, _raw_hello(name))
    assert out == bytes((21, 3, 3, 0, 2, 2, 112))  # fatal unrecognized_name, then close
    assert world.handshakes("open", "denied", before + 1) == before + 1


def test_plain_http_and_garbage_are_io_errors(world: World) -> None:
    before = world.metric("open", "botbox_tls_handshakes_total", result="io_error")
    assert _raw_exchange(world, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n") == b""
    server_hello = b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"  # not a ClientHello
    assert _raw_exchange(world, server_hello)[:1] == b"\x15"  # fatal decode_error alert
    assert world.handshakes("open", "io_error", before + 2) == before + 2


def test_handshake_timeout_closes_and_counts(world: World) -> None:
    before = world.metric("open", "botbox_tls_handshakes_total", result="timeout")
    hello = _raw_hello(b"localhost")
    assert _raw_exchange(world, b"", wait=5) == b""  # silent client
    assert _raw_exchange(world, hello[:20], wait=5) == b""  # slowloris ClientHello
    assert world.handshakes("open", "timeout", before + 2) == before + 2


def test_alpn_http11_only(world: World) -> None:
    _, alpn = _tls_request(world, b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                           sni="localhost", ctx=world.client_ctx(["h2", "http/1.1"]))
    assert alpn == "http/1.1"
    # a client offering only h2 gets no ALPN (h2 is never agreed to) and is answered in HTTP/1.1
    resp, alpn = _tls_request(world, b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                              sni="localhost", ctx=world.client_ctx(["h2"]))
    assert alpn is None
    assert resp.startswith(b"HTTP/1.1 200")


def test_healthz_reports_ca_ready_and_secrets_never_logged(world: World) -> None:
    def healthz() -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", ADMIN_PORT), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return _status_body(data)

    assert world.call(healthz) == (200, b"ok")
    app = world.runtimes["open"].app
    assert app is not None and app.ca_ready
    key_body = "".join((world.tmp / "ca" / "tls.key").read_text().splitlines()[1:-1])
    for text in world.logs.values():
        logged = text.getvalue()
        assert SECRET not in logged
        assert key_body[:24] not in logged
    # handshake refusals are logged (with the reason, never key material)
    assert '"tls handshake refused"' in world.logs["open"].getvalue()


def test_startup_fails_closed_on_bad_ca(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "api-key").write_text("k")
    crt, key = write_ca(tmp_path / "ca", *generate_ca())
    key.chmod(0o640)
    cfg = _config(tmp_path, crt, key, crt, deny=False, ports=(28080, 29090, 28443))
    rt = Runtime(cfg, logger=JsonLogger(stream=io.StringIO()))
    with pytest.raises(StartupError, match=rf"CA key file {key}: mode 0640"):
        anyio.run(_build, rt)
    assert rt.app is not None and rt.app.ca_ready is False
    other = write_ca(tmp_path / "other", *generate_ca())[1]
    rt = Runtime(_config(tmp_path, crt, other, crt, deny=False, ports=(28080, 29090, 28443)),
                 logger=JsonLogger(stream=io.StringIO()))
    with pytest.raises(StartupError, match="does not match"):
        anyio.run(_build, rt)


async def _build(rt: Runtime) -> None:
    rt.build()


def test_server_close_sends_close_notify(world: World) -> None:
    """After `Connection: close` the client reads a clean TLS EOF, not a truncation (ragged EOF)."""

    def go() -> bytes:
        ctx = world.client_ctx()
        ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)  # Python hides ragged EOFs by default
        with socket.create_connection(("127.0.0.1", TLS_PORT), timeout=10) as s, \
                ctx.wrap_socket(s, server_hostname="localhost", suppress_ragged_eofs=False) as tls:
            tls.sendall(b"GET /bye HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):  # raises SSLEOFError if the proxy skipped close_notify
                data += chunk
            return data

    assert world.call(go).startswith(b"HTTP/1.1 200")


def test_metrics_never_contain_the_secret(world: World) -> None:
    text = world.runtimes["open"].metrics.render().decode()
    assert "botbox_tls_handshakes_total" in text
    assert SECRET not in text
