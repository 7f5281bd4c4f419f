"""Upstream side: verified TLS only, 502/504, keep-alive reuse, streaming both ways (R4, R6, P5)."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import h11
import pytest
import trustme

from botbox.upstream import build_ssl_context
from tests.support.proxy import RunningProxy, get, read_response
from tests.support.upstream import TLSUpstream, pattern

StartProxy = Callable[[dict[str, Any]], RunningProxy]


def test_upstream_5xx_relayed_and_counted(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    r = proxy.exchange(get(f"127.0.0.1:{upstream.port}", "/status?code=503"))
    assert r.status == 503 and r.body == b"status"
    assert proxy.metric("botbox_upstream_errors_total", host="127.0.0.1", status_code="503") == 1


def test_connection_refused_is_502(proxy_factory: StartProxy, base_config: dict[str, Any]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, never listening → ECONNREFUSED
        base_config["egress_policy"]["rules"][0]["allowed_ports"] = [dead]
        proxy = proxy_factory(base_config)
        r = proxy.exchange(get(f"127.0.0.1:{dead}"))
    assert (r.status, r.body) == (502, b"upstream connection failed")
    assert proxy.metric("botbox_upstream_errors_total", host="127.0.0.1", status_code="connection_error") == 1


def test_untrusted_certificate_is_502(
    proxy_factory: StartProxy, base_config: dict[str, Any], upstream: TLSUpstream
) -> None:
    base_config["upstream_ca_file"] = None  # only certifi roots: the trustme CA is not trusted
    proxy = proxy_factory(base_config)
    r = proxy.exchange(get(f"127.0.0.1:{upstream.port}"))
    assert r.status == 502
    assert upstream.requests == []  # no request bytes ever reached the unverified server


def test_hostname_mismatch_is_502(
    proxy_factory: StartProxy, base_config: dict[str, Any], ca: trustme.CA
) -> None:
    other = TLSUpstream(ca, hosts=("not-this-host.example",)).start()
    try:
        base_config["egress_policy"]["rules"][0]["allowed_ports"] = [other.port]
        proxy = proxy_factory(base_config)
        r = proxy.exchange(get(f"127.0.0.1:{other.port}"))
        assert r.status == 502
        assert other.requests == []
    finally:
        other.stop()


def test_plaintext_upstream_is_never_used(proxy_factory: StartProxy, base_config: dict[str, Any]) -> None:
    """R4: an upstream speaking plain HTTP gets a TLS ClientHello, never a cleartext request."""
    received = bytearray()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(2)
            try:
                received.extend(conn.recv(4096))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        base_config["egress_policy"]["rules"][0]["allowed_ports"] = [port]
        proxy = proxy_factory(base_config)
        r = proxy.exchange(get(f"127.0.0.1:{port}"))
        t.join(5)
    finally:
        srv.close()
    assert r.status == 502
    assert received[:1] == b"\x16"  # TLS handshake record
    assert b"GET" not in received and b"Bearer" not in received


def test_slow_upstream_is_504(
    proxy_factory: StartProxy, base_config: dict[str, Any], upstream: TLSUpstream
) -> None:
    base_config["upstream_idle_timeout_seconds"] = 0.3
    proxy = proxy_factory(base_config)
    r = proxy.exchange(get(f"127.0.0.1:{upstream.port}", "/slow?delay=1"))
    assert (r.status, r.body) == (504, b"gateway timeout")
    assert proxy.metric("botbox_upstream_errors_total", host="127.0.0.1", status_code="timeout") == 1


def test_connect_timeout_is_504(proxy_factory: StartProxy, base_config: dict[str, Any]) -> None:
    """A listener whose accept queue is full never completes the TCP handshake → connect timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the backlog so further SYNs are dropped
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", port))
            fillers.append(c)
        time.sleep(0.1)
        base_config["connect_timeout_seconds"] = 0.5
        base_config["egress_policy"]["rules"][0]["allowed_ports"] = [port]
        proxy = proxy_factory(base_config)
        t0 = time.monotonic()
        r = proxy.exchange(get(f"127.0.0.1:{port}"))
        assert time.monotonic() - t0 < 5
    finally:
        for c in fillers:
            c.close()
        srv.close()
    # A TLS handshake that never gets an answer is a timeout as well; both are 504.
    assert (r.status, r.body) == (504, b"gateway timeout")


def test_stall_mid_body_aborts_client_connection(
    proxy_factory: StartProxy, base_config: dict[str, Any], upstream: TLSUpstream
) -> None:
    base_config["upstream_idle_timeout_seconds"] = 0.3
    proxy = proxy_factory(base_config)
    with proxy.connect() as s:
        s.sendall(get(f"127.0.0.1:{upstream.port}", "/stall-body?delay=1"))
        with pytest.raises((ConnectionError, h11.RemoteProtocolError)):
            read_response(s)  # headers + 5 of 10 bytes, then the proxy closes: never a "complete" body
    assert proxy.metric("botbox_upstream_errors_total", host="127.0.0.1", status_code="timeout") == 1


def test_sse_events_arrive_one_by_one(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    """R6: 5 events 200 ms apart; the first must reach the client long before the last is sent."""
    with proxy.connect() as s:
        s.sendall(get(f"127.0.0.1:{upstream.port}", "/sse?n=5&interval_ms=200"))
        r = read_response(s)
    assert r.status == 200
    events = [line for line in r.body.decode().split("\n\n") if line]
    assert len(events) == 5
    sent = [float(e.split()[2]) for e in events]
    first_arrival = r.chunks[0][0]
    assert sent[4] - sent[0] >= 0.75
    assert first_arrival < sent[4] - 0.5, "first event was held back until the stream ended"
    # Every event arrived before the next one was sent.
    arrivals = []
    for ts, data in r.chunks:
        arrivals += [ts] * data.count(b"\n\n")
    assert all(arrivals[i] < sent[i + 1] for i in range(4))


def test_large_download_streams(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    n = 20 * 1024 * 1024 + 7
    with proxy.connect() as s:
        s.sendall(get(f"127.0.0.1:{upstream.port}", f"/download?bytes={n}"))
        r = read_response(s)
    assert r.status == 200 and len(r.body) == n
    assert hashlib.sha256(r.body).digest() == hashlib.sha256(pattern(n)).digest()
    assert r.header("content-length") == str(n).encode()
    assert len(r.chunks) > 10  # delivered incrementally, not as one buffered blob


def test_large_upload_streams(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    n = 20 * 1024 * 1024
    body = pattern(n)
    with proxy.connect() as s:
        s.sendall(f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\nContent-Length: {n}\r\n\r\n"
                  .encode())
        # Send in slices; the upstream starts receiving before the client has finished sending.
        for i in range(0, n, 1 << 20):
            s.sendall(body[i:i + (1 << 20)])
        r = read_response(s)
    assert r.status == 200
    assert r.body == f"{n} {hashlib.sha256(body).hexdigest()}".encode()


def test_upload_is_streamed_not_buffered(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    """The upstream sees the request (head) while the client is still sending its body."""
    with proxy.connect() as s:
        s.sendall(f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\nTransfer-Encoding: chunked"
                  "\r\n\r\n5\r\nhello\r\n".encode())
        deadline = time.monotonic() + 5
        while not upstream.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert upstream.requests, "upstream got nothing before the body was complete"
        s.sendall(b"0\r\n\r\n")
        r = read_response(s)
    assert r.body.startswith(b"5 ")


def test_upstream_ca_file_must_be_pem(tmp_path: Any) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ssl.SSLError):
        build_ssl_context(bad)
    with pytest.raises(OSError):
        build_ssl_context(tmp_path / "missing.pem")
    ctx = build_ssl_context(None)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_stale_keepalive_retry_only_for_idempotent_bodiless(
    proxy: RunningProxy, upstream: TLSUpstream
) -> None:
    """A reused connection the upstream drops without answering: GET is retried once on a fresh
    connection (then 502 because it drops again), POST is never replayed."""
    h = f"127.0.0.1:{upstream.port}"
    assert proxy.exchange(get(h, "/warm")).status == 200  # leaves one pooled connection
    assert proxy.exchange(get(h, "/close")).status == 502
    assert [r.target for r in upstream.requests].count("/close") == 2
    assert proxy.exchange(get(h, "/warm")).status == 200
    assert proxy.exchange(get(h, "/close", method="POST", body=b"x")).status == 502
    posts = [r for r in upstream.requests if r.method == "POST"]
    assert len(posts) == 1


def test_slow_client_backpressures_upstream(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    """R6: a client that stops reading must stall the upstream, not make the proxy buffer the body."""
    n = 96 * 1024 * 1024
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.connect(("127.0.0.1", proxy.port))
        s.sendall(get(f"127.0.0.1:{upstream.port}", f"/download?bytes={n}"))
        assert s.recv(64).startswith(b"HTTP/1.1 200")
        time.sleep(1.0)  # not reading: plenty of time for an unthrottled upstream to send it all
        sent = upstream.download_sent
    # Socket buffers on both legs plus the proxy's bounded read buffer hold at most a few tens of MiB.
    assert sent < 40 * 1024 * 1024, f"upstream sent {sent >> 20} MiB to a client that read nothing"
