"""Request pipeline over real sockets against a real TLS upstream (CONTRACT §3, SECURITY-SPEC R/S/P)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from botbox.pipeline import MAX_HEAD_BYTES, ConnectionContext
from tests.conftest import SECRET_VALUE
from tests.support.proxy import RunningProxy, get, read_response, serve_raw
from tests.support.upstream import TLSUpstream

BEARER = b"Bearer " + SECRET_VALUE.encode()


def up_host(upstream: TLSUpstream, host: str = "127.0.0.1") -> str:
    return f"{host}:{upstream.port}"


def assert_no_secret(proxy: RunningProxy, *bodies: bytes) -> None:
    assert SECRET_VALUE not in proxy.logs.text()
    assert SECRET_VALUE.encode() not in proxy.runtime.metrics.render()
    for b in bodies:
        assert SECRET_VALUE.encode() not in b


# --- happy path, injection, keep-alive ---------------------------------------------------------


def test_transparent_request_injects_credential_upstream(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    r = proxy.exchange(get(up_host(upstream), "/v1/models?limit=1"))
    assert r.status == 200 and r.body == b"ok"
    rec = upstream.last()
    assert rec.target == "/v1/models?limit=1"
    assert rec.values("Authorization") == [BEARER]
    assert rec.values("Host") == [up_host(upstream).encode()]
    assert proxy.metric("botbox_requests_total", host="127.0.0.1", decision="allow") == 1
    assert proxy.metric("botbox_header_rewrites_total", host="127.0.0.1") == 1
    log = proxy.request_logs()[-1]
    assert log["headers_rewritten"] == ["Authorization"] and log["path"] == "/v1/models"
    assert_no_secret(proxy, r.body)


@pytest.mark.parametrize(
    "client_headers",
    [
        [("Authorization", "Bearer evil")],
        [("Authorization", "Bearer evil"), ("authorization", "Bearer evil2")],
        [("AUTHORIZATION", "x"), ("aUtHoRiZaTiOn", "y"), ("Authorization", "")],
        [("Connection", "authorization"), ("Authorization", "Basic ZXZpbA==")],
    ],
    ids=["one", "two-cases", "three-spellings-empty", "connection-nominated"],
)
def test_duplicate_authorization_smuggling_leaves_exactly_configured_value(
    proxy: RunningProxy, upstream: TLSUpstream, client_headers: list[tuple[str, str]]
) -> None:
    r = proxy.exchange(get(up_host(upstream), "/", headers=client_headers))
    assert r.status == 200
    assert upstream.last().values("Authorization") == [BEARER]


def test_keep_alive_and_pipelining_reuse_client_and_upstream_connections(
    proxy: RunningProxy, upstream: TLSUpstream
) -> None:
    leftover = bytearray()
    with proxy.connect() as s:
        # Two pipelined requests in one write, then a third after the responses.
        s.sendall(get(up_host(upstream), "/a") + get(up_host(upstream), "/b"))
        assert read_response(s, leftover=leftover).status == 200
        assert read_response(s, leftover=leftover).status == 200
        s.sendall(get(up_host(upstream), "/c"))
        assert read_response(s, leftover=leftover).status == 200
    with proxy.connect() as s2:  # a different client connection reuses the pooled upstream one
        s2.sendall(get(up_host(upstream), "/d"))
        assert read_response(s2).status == 200
    assert [r.target for r in upstream.requests] == ["/a", "/b", "/c", "/d"]
    assert upstream.handshakes == 1


def test_explicit_proxy_absolute_form_with_curl(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    out = subprocess.run(
        ["curl", "-sS", "-x", f"http://127.0.0.1:{proxy.port}", "-H", "Authorization: Bearer evil",
         "-o", "/dev/null", "-w", "%{http_code}", f"http://{up_host(upstream)}/explicit?q=1"],
        capture_output=True, text=True, timeout=20, check=False,
    )
    assert out.stdout == "200", out.stderr
    rec = upstream.last()
    assert rec.target == "/explicit?q=1"  # absolute-form is forwarded as origin-form
    assert rec.values("Authorization") == [BEARER]
    assert rec.values("Proxy-Connection") == []


def test_https_absolute_form_is_forwarded_over_tls(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    raw = (f"GET https://{up_host(upstream)}/s HTTP/1.1\r\nHost: {up_host(upstream)}\r\n\r\n").encode()
    assert proxy.exchange(raw).status == 200
    assert upstream.last().target == "/s"


# --- CONTRACT §3 rows (HTTP listener) --------------------------------------------------------------


def test_connect_is_405_and_closed(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    raw = f"CONNECT {up_host(upstream)} HTTP/1.1\r\nHost: {up_host(upstream)}\r\n\r\n".encode()
    r = proxy.exchange(raw, check_closed=True)
    assert (r.status, r.body) == (405, b"CONNECT method not allowed")
    assert r.header("content-type", ).startswith(b"text/plain")  # type: ignore[union-attr]
    assert r.closed
    assert upstream.requests == []
    assert proxy.metric("botbox_requests_total", host="_denied", decision="denied_connect") == 1


@pytest.mark.parametrize("raw", [b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n", b"GET / HTTP/1.1\r\nHost:\r\n\r\n"])  # noqa: E501
def test_missing_host_is_400(proxy: RunningProxy, raw: bytes) -> None:
    r = proxy.exchange(raw, check_closed=True)
    assert (r.status, r.body, r.closed) == (400, b"missing host", True)
    assert proxy.metric("botbox_requests_total", host="_denied", decision="denied_no_host") == 1


@pytest.mark.parametrize(
    "host",
    ["evil.example", "127.0.0.2:{port}", "localhost:1", "127.0.0.1", "127.0.0.1:443"],
    ids=["unknown-host", "other-ip", "port-not-allowed", "no-port-means-443", "443-not-in-allowed"],
)
def test_denied_host_or_port_is_403_and_keeps_connection(
    proxy: RunningProxy, upstream: TLSUpstream, host: str
) -> None:
    with proxy.connect() as s:
        s.sendall(get(host.format(port=upstream.port)))
        r = read_response(s)
        assert (r.status, r.body) == (403, b"host not allowed")
        s.sendall(get(up_host(upstream)))  # the same connection still works
        assert read_response(s).status == 200
    assert proxy.metric("botbox_requests_total", host="_denied", decision="deny") == 1
    assert [r.target for r in upstream.requests] == ["/"]
    assert proxy.request_logs(2)[0]["decision"] == "deny"


def test_denied_head_request_has_no_body(proxy: RunningProxy) -> None:
    with proxy.connect() as s:
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        r = read_response(s, method=b"HEAD")
        assert r.status == 403 and r.body == b"" and r.header("content-length") == b"16"


@pytest.mark.parametrize(
    "host",
    ["LOCALHOST:{port}", "localhost.:{port}", " localhost:{port}", "LocalHost.:{port}"],
)
def test_host_variants_canonicalise_to_the_rule(proxy: RunningProxy, upstream: TLSUpstream, host: str) -> None:  # noqa: E501
    r = proxy.exchange(get(host.format(port=upstream.port)))
    assert r.status == 200
    assert upstream.last().values("Host") == [f"localhost:{upstream.port}".encode()]  # R3
    assert upstream.last().values("Authorization") == []  # localhost rule injects nothing


def test_missing_secret_is_500_and_nothing_forwarded(
    proxy: RunningProxy, upstream: TLSUpstream, secrets_dir: Path
) -> None:
    (secrets_dir / "api-key").unlink()
    assert proxy.runtime.app.secrets.reload()
    r = proxy.exchange(get(up_host(upstream)))
    assert (r.status, r.body) == (500, b"internal error: secret not available")
    assert upstream.requests == []


@pytest.mark.parametrize("bad", [b"abc\r\nX-Injected: 1", b"abc\ndef", b"abc\x00"])
def test_secret_with_control_characters_fails_closed(
    proxy: RunningProxy, upstream: TLSUpstream, secrets_dir: Path, bad: bytes
) -> None:
    (secrets_dir / "api-key").unlink()
    (secrets_dir / "api-key").write_bytes(bad)
    assert proxy.runtime.app.secrets.reload()
    r = proxy.exchange(get(up_host(upstream)))
    assert r.status == 500
    assert upstream.requests == []
    assert b"abc" not in r.body and "abc" not in proxy.logs.text()


def test_trace_gets_no_credential(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    r = proxy.exchange(get(up_host(upstream), method="TRACE"))
    assert r.status == 200
    assert upstream.last().method == "TRACE"
    assert upstream.last().values("Authorization") == []


def test_rewritten_header_names_stripped_from_response(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    r = proxy.exchange(get(up_host(upstream), "/reflect"))
    assert r.status == 200
    assert r.all("authorization") == []  # R7: rewritten name removed
    assert r.all("x-safe") == [b"kept"] and r.all("x-api-key") == [b"reflected"]


def test_hop_by_hop_headers_removed(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    hop = [("Connection", "keep-alive, X-Private"), ("X-Private", "1"), ("Keep-Alive", "timeout=5"),
           ("Proxy-Connection", "keep-alive"), ("Proxy-Authorization", "Basic eA=="), ("TE", "trailers"),
           ("Trailer", "X-T"), ("Upgrade", "h2c"), ("X-End", "kept")]
    assert proxy.exchange(get(up_host(upstream), headers=hop)).status == 200
    names = {k.lower() for k, _ in upstream.last().headers}
    for gone in (b"connection", b"x-private", b"keep-alive", b"proxy-connection", b"proxy-authorization",
                 b"te", b"trailer", b"upgrade"):
        assert gone not in names
    assert upstream.last().values("X-End") == [b"kept"]


# --- R5: malformed / ambiguous framing -----------------------------------------------------------

SMUGGLING: dict[str, bytes] = {
    "cl-and-te": b"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # noqa: E501
    "te-and-cl": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",  # noqa: E501
    "dup-cl-same": b"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nA",
    "dup-cl-diff": b"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nAB",
    "cl-list": b"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 1, 1\r\n\r\nA",
    "cl-sign": b"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: +1\r\n\r\nA",
    "cl-alpha": b"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: abc\r\n\r\n",
    "te-gzip": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: gzip\r\n\r\n",
    "te-chunked-chunked": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",  # noqa: E501
    "te-identity": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: identity\r\n\r\n",
    "te-dup": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # noqa: E501
    "te-space-name": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te-vtab": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: {h}\r\nX-A: 1\r\n  folded\r\n\r\n",
    "obs-fold-tab": b"GET / HTTP/1.1\r\nHost: {h}\r\nX-A: 1\r\n\tAuthorization: x\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: {h}\n\n\r\n\r\n",
    "bare-lf-header": b"GET / HTTP/1.1\r\nHost: {h}\nX-A: 1\r\n\r\n",
    "bare-cr": b"GET / HTTP/1.1\r\nHost: {h}\r\nX-A: 1\rX-B: 2\r\n\r\n",
    "nul-value": b"GET / HTTP/1.1\r\nHost: {h}\r\nX-A: a\x00b\r\n\r\n",
    "ctl-value": b"GET / HTTP/1.1\r\nHost: {h}\r\nX-A: a\x01b\r\n\r\n",
    "bad-name": b"GET / HTTP/1.1\r\nHost: {h}\r\nX A: 1\r\n\r\n",
    "colon-less": b"GET / HTTP/1.1\r\nHost: {h}\r\nXA\r\n\r\n",
    "dup-host": b"GET / HTTP/1.1\r\nHost: {h}\r\nHost: evil.example\r\n\r\n",
    "dup-host-same": b"GET / HTTP/1.1\r\nHost: {h}\r\nHost: {h}\r\n\r\n",
    "abs-host-mismatch": b"GET http://evil.example/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
    "abs-port-mismatch": b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
    "abs-userinfo": b"GET http://user@{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
    "abs-ftp": b"GET ftp://{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n",
    "asterisk": b"OPTIONS * HTTP/1.1\r\nHost: {h}\r\n\r\n",
    "authority-form": b"GET {h} HTTP/1.1\r\nHost: {h}\r\n\r\n",
    "host-userinfo": b"GET / HTTP/1.1\r\nHost: a@{h}\r\n\r\n",
    "host-path": b"GET / HTTP/1.1\r\nHost: {h}/x\r\n\r\n",
    "bad-version": b"GET / HTTP/2.0\r\nHost: {h}\r\n\r\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\nHost: {h}\r\n\r\n",
    "leading-empty-line": b"\r\nGET / HTTP/1.1\r\nHost: {h}\r\n\r\n",
    "bad-chunk-size": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nAB\r\n0\r\n\r\n",  # noqa: E501
    "chunk-bare-lf": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n2\nAB\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_malformed_request_is_400_and_closed(proxy: RunningProxy, upstream: TLSUpstream, name: str) -> None:
    raw = SMUGGLING[name].replace(b"{h}", up_host(upstream).encode())
    r = proxy.exchange(raw, check_closed=True)
    assert (r.status, r.body, r.closed) == (400, b"bad request", True), name
    # Nothing reached the upstream except possibly the head of a body-framing failure, which is then
    # aborted: never a complete request.
    assert all(rec.body_sha256 == "" for rec in upstream.requests)


def test_oversized_head_and_too_many_headers_are_400(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    h = up_host(upstream)
    big = get(h, headers=[("X-Big", "a" * (MAX_HEAD_BYTES + 10))])
    r = proxy.exchange(big, check_closed=True)
    assert (r.status, r.closed) == (400, True)
    many = get(h, headers=[(f"X-{i}", "1") for i in range(101)])
    assert proxy.exchange(many, check_closed=True).status == 400
    ok = get(h, headers=[(f"X-{i}", "1") for i in range(99)])
    assert proxy.exchange(ok).status == 200
    assert proxy.metric("botbox_requests_total", host="_denied", decision="bad_request") == 2


def test_pipelined_smuggled_second_request_is_checked(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    h = up_host(upstream).encode()
    first = b"GET /first HTTP/1.1\r\nHost: " + h + b"\r\n\r\n"
    second = b"GET /second HTTP/1.1\r\nHost: " + h + b"\r\nX-A: 1\r\n folded\r\n\r\n"
    leftover = bytearray()
    with proxy.connect() as s:
        s.sendall(first + second)
        assert read_response(s, leftover=leftover).status == 200
        assert read_response(s, leftover=leftover).status == 400
    assert [r.target for r in upstream.requests] == ["/first"]


# --- bodies -------------------------------------------------------------------------------------


def test_chunked_request_body_forwarded_chunked(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    h = up_host(upstream)
    raw = (f"POST /upload HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n"
           "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").encode()
    r = proxy.exchange(raw)
    assert r.status == 200 and r.body.startswith(b"11 ")
    assert upstream.last().values("Transfer-Encoding") == [b"chunked"]


def test_expect_100_continue(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    h = up_host(upstream)
    with proxy.connect() as s:
        s.sendall(f"POST /upload HTTP/1.1\r\nHost: {h}\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
                  .encode())
        assert s.recv(100).startswith(b"HTTP/1.1 100 ")
        s.sendall(b"abc")
        r = read_response(s)
    assert r.status == 200 and r.body.startswith(b"3 ")


# --- interception listener rows and port semantics (ConnectionContext set by hand) --------------


def _ctx(**kw: Any) -> ConnectionContext:
    base: dict[str, Any] = {"listener": "http", "peer": "127.0.0.1:1", "orig_dst": None, "sni": None}
    base.update(kw)
    return ConnectionContext(**base)


def test_interception_rows(proxy: RunningProxy) -> None:
    ic = _ctx(listener="https_interception", sni="localhost")
    r = serve_raw(proxy, ic, b"GET https://localhost/ HTTP/1.1\r\nHost: localhost\r\n\r\n", check_closed=True)
    assert (r.status, r.body, r.closed) == (
        400, b"absolute-form request not allowed on HTTPS interception listener", True)
    r = serve_raw(proxy, ic, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", check_closed=True)
    assert (r.status, r.body, r.closed) == (400, b"SNI/Host header mismatch", True)
    assert proxy.metric("botbox_https_interception_host_mismatch_total") == 1
    r = serve_raw(proxy, ic, b"GET / HTTP/1.1\r\nHost: LOCALHOST.:8443\r\n\r\n")
    assert (r.status, r.body) == (403, b"HTTPS interception listener only accepts port 443 traffic")
    assert proxy.metric("botbox_https_interception_host_mismatch_total") == 1  # case/dot variant matched


@pytest.mark.parametrize(
    ("orig_dst", "host", "expected"),
    [
        (("203.0.113.9", 80), "127.0.0.1", 403),  # port 80 upgraded → checked as 443 → not allowed
        (("203.0.113.9", 8080), "127.0.0.1", 403),  # other original port checked as is
        (("203.0.113.9", 80), "127.0.0.1:{port}", 200),  # explicit Host port checked as given
        (("203.0.113.9", "{port}"), "127.0.0.1", 200),  # original port = allowed port
    ],
)
def test_port_semantics_with_original_destination(
    proxy: RunningProxy, upstream: TLSUpstream, orig_dst: tuple[str, Any], host: str, expected: int
) -> None:
    port = upstream.port
    od = (orig_dst[0], port if orig_dst[1] == "{port}" else orig_dst[1])
    r = serve_raw(proxy, _ctx(orig_dst=od), get(host.format(port=port)))
    assert r.status == expected
    if expected == 200:
        assert upstream.last().values("Authorization") == [BEARER]
    log = proxy.request_logs()[-1]
    assert log["orig_dst"] == f"{od[0]}:{od[1]}"


def test_never_connects_to_original_destination_ip(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    # P5: a redirected connection to some other IP with Host naming an allowed host goes to the host.
    r = serve_raw(proxy, _ctx(orig_dst=("192.0.2.1", upstream.port)), get(f"localhost:{upstream.port}"))
    assert r.status == 200
    assert upstream.last().values("Host") == [f"localhost:{upstream.port}".encode()]


def test_client_address_logged_and_no_secret_anywhere(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    with proxy.connect() as s:
        s.sendall(get(up_host(upstream), headers=[("Authorization", "Bearer client-own-token-zzz")]))
        read_response(s)
        local = s.getsockname()
    log = proxy.request_logs()[-1]
    assert set(log) == {"ts", "level", "msg", "request_id", "client", "orig_dst", "host", "method", "path",
                        "decision", "rule", "headers_rewritten", "upstream_status", "duration_ms"}
    assert log["client"] == f"{local[0]}:{local[1]}" and log["upstream_status"] == 200
    assert "client-own-token-zzz" not in proxy.logs.text()
    assert_no_secret(proxy)


def test_connection_refused_peer_closes_cleanly(proxy: RunningProxy) -> None:
    with proxy.connect() as s:
        s.sendall(b"GET / HTT")
        s.shutdown(socket.SHUT_WR)
        r = s.recv(1000)
    assert r.startswith(b"HTTP/1.1 400")


def test_default_allow_admits_unknown_hosts_on_443_only(
    proxy_factory: Any, base_config: dict[str, Any]
) -> None:
    """P4 through the runtime: an unknown host is forwarded on 443 (nothing listens on 127.0.0.3:443,
    so 502 proves it was allowed and attempted) and refused on any other port."""
    base_config["egress_policy"]["default_action"] = "allow"
    proxy = proxy_factory(base_config)
    assert proxy.exchange(get("127.0.0.3")).status == 502
    assert proxy.exchange(get("127.0.0.3:8443")).status == 403
    logs = proxy.request_logs(2)
    assert logs[0]["rule"] == "default" and logs[0]["headers_rewritten"] == []
