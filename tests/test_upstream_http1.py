"""BotBox's own upstream HTTP/1.1 client (botbox/upstream.py): strict response-head parsing (a
malformed or ambiguous response is a 502, never relayed), body framings relayed faithfully, keep-alive
reuse only when the response is self-delimited, and the request head/body framing sent upstream."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import h11
import pytest
import trustme

from botbox.upstream import UpstreamProtocolError, parse_response_head
from tests.support.proxy import RunningProxy, get, read_response

StartProxy = Callable[[dict[str, Any]], RunningProxy]


# -- pure: parse_response_head ---------------------------------------------------------------------

@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded",  # obs-fold
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\tfolded",  # obs-fold (HTAB)
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2",  # duplicate, even if equal
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x10",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked",
        b"HTTP/1.1 200 OK\r\nX-A : 1",  # whitespace before the colon
        b"HTTP/1.1 200 OK\r\nX A: 1",
        b"HTTP/1.1 200 OK\r\nno-colon",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b",
        b"HTTP/1.1 200 OK\r\nX-A: a\rb",
        b"HTTP/1.1 200 OK\r\nX-A: a\nb",
        b"HTTP/1.1 200 OK\r\n\r\nX-A: 1",  # empty line inside the head
        b"HTTP/2 200 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 099 OK",
        b"HTTP/1.1  200 OK",
        b"http/1.1 200 OK",
        b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 300 + b"X-B: 2",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (64 * 1024),
    ],
)
def test_malformed_response_heads_are_rejected(head: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        parse_response_head(head)


def test_response_head_framing_and_persistence() -> None:
    h = parse_response_head(b"HTTP/1.1 201 Created\r\nContent-Length:  12 \r\nX-Empty:\r\nX-Tab: a\tb")
    assert (h.status, h.reason, h.length, h.chunked, h.keep_alive) == (201, b"Created", 12, False, True)
    assert h.headers == [(b"Content-Length", b"12"), (b"X-Empty", b""), (b"X-Tab", b"a\tb")]
    h = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked")
    assert (h.length, h.chunked, h.keep_alive) == (None, True, True)
    # Both framings: chunked wins (RFC 9112 §6.3), Content-Length is dropped, never reused.
    h = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\nTransfer-Encoding: chunked")
    assert (h.length, h.chunked, h.keep_alive) == (None, True, False)
    assert h.headers == [(b"Transfer-Encoding", b"chunked")]
    h = parse_response_head(b"HTTP/1.1 200")  # no reason phrase at all
    assert (h.status, h.reason, h.keep_alive) == (200, b"", False)  # close-delimited: not reusable
    h = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive, close")
    assert not h.keep_alive
    h = parse_response_head(b"HTTP/1.0 200 OK\r\nContent-Length: 1")
    assert not h.keep_alive
    h = parse_response_head(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive")
    assert h.keep_alive


# -- through the proxy: a scripted raw TLS upstream ------------------------------------------------

class ScriptedUpstream:
    """TLS server (trustme cert for 127.0.0.1) answering each request head with the next scripted
    raw response; records raw request bytes and the number of TLS connections. A response carrying
    ``X-Close: 1`` (close-delimited) is followed by closing the connection."""

    def __init__(self, ca: trustme.CA, responses: list[bytes], *, close_after: bool = False) -> None:
        self.responses = list(responses)
        self.close_after = close_after
        self.received: list[bytes] = []
        self.connections = 0
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(self._ctx)
        self._srv = socket.socket()
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(8)
        self.port: int = self._srv.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False

    def start(self) -> ScriptedUpstream:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._srv.shutdown(socket.SHUT_RDWR)
        self._srv.close()
        for raw in self._socks:  # pooled connections the proxy still holds open
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)

    def _accept(self) -> None:
        while not self._stop:
            try:
                raw, _ = self._srv.accept()
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            with self._ctx.wrap_socket(raw, server_side=True) as tls:
                self._socks.append(tls)
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = tls.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, _, rest = buf.partition(b"\r\n\r\n")
                    want = _body_end(head, rest)
                    while want is None or len(rest) < want:
                        data = tls.recv(65536)
                        if not data:
                            return
                        rest += data
                        want = _body_end(head, rest)
                    with self._lock:
                        self.received.append(head + b"\r\n\r\n" + rest[:want])
                        if not self.responses:
                            return
                        response = self.responses.pop(0)
                    buf = rest[want:]
                    tls.sendall(response)
                    if self.close_after or b"\r\nX-Close: 1\r\n" in response:
                        return
        except (OSError, ssl.SSLError):
            return


def _body_end(head: bytes, rest: bytes) -> int | None:
    """How many bytes of ``rest`` belong to the request body (None: not complete yet)."""
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        i = rest.find(b"0\r\n\r\n")
        return None if i == -1 else i + 5
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


@pytest.fixture
def scripted(ca: trustme.CA) -> Iterator[Callable[..., ScriptedUpstream]]:
    made: list[ScriptedUpstream] = []

    def make(responses: list[bytes], **kw: Any) -> ScriptedUpstream:
        up = ScriptedUpstream(ca, responses, **kw).start()
        made.append(up)
        return up

    try:
        yield make
    finally:
        for up in made:
            up.stop()


def _proxy_for(proxy_factory: StartProxy, base_config: dict[str, Any], port: int) -> RunningProxy:
    base_config["egress_policy"]["rules"][0]["allowed_ports"] = [port]
    return proxy_factory(base_config)


@pytest.mark.parametrize(
    "bad",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n X-Fold: y\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    ],
    ids=["obs-fold", "dup-cl", "te-gzip", "huge-head", "101", "bare-lf"],
)
def test_malformed_upstream_response_is_502_and_not_relayed(
    proxy_factory: StartProxy, base_config: dict[str, Any], scripted: Callable[..., ScriptedUpstream],
    bad: bytes,
) -> None:
    up = scripted([bad], close_after=True)
    proxy = _proxy_for(proxy_factory, base_config, up.port)
    r = proxy.exchange(get(f"127.0.0.1:{up.port}"))
    assert (r.status, r.body) == (502, b"upstream connection failed")
    assert proxy.metric("botbox_upstream_errors_total", host="127.0.0.1", status_code="connection_error") == 1


def test_chunked_close_delimited_and_interim_responses_relayed(
    proxy_factory: StartProxy, base_config: dict[str, Any], scripted: Callable[..., ScriptedUpstream],
) -> None:
    up = scripted([
        # chunk extension + trailer (trailers are dropped), split over several chunks
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n",
        # 100 Continue before the final response, keep-alive Content-Length body
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        # close-delimited body: relayed to its end, connection not reused afterwards
        b"HTTP/1.1 200 OK\r\nX-Close: 1\r\n\r\nuntil-eof",
    ], close_after=False)
    proxy = _proxy_for(proxy_factory, base_config, up.port)
    host = f"127.0.0.1:{up.port}"
    with proxy.connect() as s:
        leftover = bytearray()
        s.sendall(get(host, "/a"))
        r1 = read_response(s, leftover=leftover)
        s.sendall(get(host, "/b"))
        r2 = read_response(s, leftover=leftover)
        s.sendall(get(host, "/c"))
        r3 = read_response(s, leftover=leftover)
    assert (r1.status, r1.body, r1.header("x-up")) == (200, b"hello world", b"1")
    assert r1.header("x-trailer") is None
    assert (r2.status, r2.body) == (200, b"abc")
    assert (r3.status, r3.body, r3.header("x-close")) == (200, b"until-eof", b"1")
    # /a, /b and /c all went over one pooled TLS connection (the close-delimited one ends it).
    assert up.connections == 1
    assert len(up.received) == 3


@pytest.mark.parametrize(
    "bad",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["short-cl", "chunked-eof", "bad-chunk-size"],
)
def test_truncated_bodies_abort_the_client_connection(
    proxy_factory: StartProxy, base_config: dict[str, Any], scripted: Callable[..., ScriptedUpstream],
    bad: bytes,
) -> None:
    """A Content-Length body or a chunked body cut short must not look complete to the client."""
    up = scripted([bad], close_after=True)
    proxy = _proxy_for(proxy_factory, base_config, up.port)
    with proxy.connect() as s:
        s.sendall(get(f"127.0.0.1:{up.port}"))
        with pytest.raises((ConnectionError, OSError, h11.RemoteProtocolError)):
            read_response(s)


def test_request_head_and_chunked_body_framing_upstream(
    proxy_factory: StartProxy, base_config: dict[str, Any], scripted: Callable[..., ScriptedUpstream],
) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    up = scripted([ok, ok])
    proxy = _proxy_for(proxy_factory, base_config, up.port)
    host = f"127.0.0.1:{up.port}"
    with proxy.connect() as s:
        leftover = bytearray()
        s.sendall(f"POST /up?q=1 HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
                  "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n".encode())
        assert read_response(s, leftover=leftover).status == 200
        s.sendall(get(host, "/g", method="PUT", body=b"xyz"))
        assert read_response(s, leftover=leftover).status == 200
    first, second = up.received
    head, _, body = first.partition(b"\r\n\r\n")
    # (Compared line by line: a failing assertion must never print the injected secret.)
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /up?q=1 HTTP/1.1"
    assert lines[1].lower() == f"host: {host}".encode()
    assert lines.count(b"Transfer-Encoding: chunked") == 1
    assert sum(1 for line in lines if line.startswith(b"Authorization: Bearer ")) == 1
    # Re-chunked as received by the proxy (sizes may differ); decoded content is what the client sent.
    assert _dechunk(body) == b"abcde"
    head2, _, body2 = second.partition(b"\r\n\r\n")
    assert head2.startswith(b"PUT /g HTTP/1.1\r\n") and b"\r\nContent-Length: 3" in head2
    assert body2 == b"xyz"
    assert up.connections == 1


def _dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        line, _, body = body.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            return out
        out += body[:size]
        assert body[size:size + 2] == b"\r\n"
        body = body[size + 2:]


def test_both_framings_reframed_and_connection_never_reused(
    proxy_factory: StartProxy, base_config: dict[str, Any], scripted: Callable[..., ScriptedUpstream],
) -> None:
    """Content-Length + chunked with a forged response behind the chunked body: chunked wins, and the
    upstream connection is dropped, so the forged bytes can never answer the next request."""
    up = scripted([
        b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nforged!",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal",
    ])
    proxy = _proxy_for(proxy_factory, base_config, up.port)
    host = f"127.0.0.1:{up.port}"
    with proxy.connect() as s:
        leftover = bytearray()
        s.sendall(get(host, "/a"))
        r1 = read_response(s, leftover=leftover)
        s.sendall(get(host, "/b"))
        r2 = read_response(s, leftover=leftover)
    assert (r1.status, r1.body, r1.header("content-length")) == (200, b"hello", None)
    assert (r2.status, r2.body) == (200, b"real")
    assert up.connections == 2


def test_client_framing_http10_client_head_and_204(
    proxy_factory: StartProxy, base_config: dict[str, Any], scripted: Callable[..., ScriptedUpstream],
) -> None:
    """Framing towards the client: an HTTP/1.0 client gets an unframed body ended by the close (never
    chunked); HEAD keeps the upstream's Content-Length without a body; 204 has no body and the
    connection stays usable."""
    up = scripted([
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ])
    proxy = _proxy_for(proxy_factory, base_config, up.port)
    host = f"127.0.0.1:{up.port}"
    with proxy.connect() as s:
        s.sendall(get(host, "/old", version="1.0"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 200 ok"
    assert b"connection: close" in lines
    assert not any(line.startswith((b"transfer-encoding", b"content-length")) for line in lines)
    assert body == b"abc"
    with proxy.connect() as s:
        leftover = bytearray()
        s.sendall(get(host, "/h", method="HEAD"))
        r1 = read_response(s, method=b"HEAD", leftover=leftover)
        s.sendall(get(host, "/n"))
        r2 = read_response(s, leftover=leftover)
        s.sendall(get(host, "/ok"))
        r3 = read_response(s, leftover=leftover)
    assert (r1.status, r1.header("content-length"), r1.body) == (200, b"1234", b"")
    assert (r2.status, r2.body, r2.header("transfer-encoding")) == (204, b"", None)
    assert (r3.status, r3.body) == (200, b"ok")
    assert up.connections == 1
