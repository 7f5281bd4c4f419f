"""Upstream connections: a keep-alive pool speaking verified HTTPS (HTTP/1.1) only.

- Trust: certifi's web PKI roots plus ``upstream_ca_file`` when configured (SECURITY-SPEC R4); TLS >= 1.2,
  hostname verification always on. There is no code path that opens a plaintext upstream connection.
- The pool is keyed by (host, port) and shared across client connections, so keep-alive connections
  are reused: a LIFO deque of idle connections per key, no global lock, no per-request scan (the scan
  of ``httpcore.AsyncConnectionPool`` dominated the CPU profile). Connections are native asyncio
  transports (TLS in C on uvloop).
- HTTP/1.1 is spoken here directly (no httpcore/h11 on this side: it was the largest remaining cost
  per request). The request head is built from headers the client side already validated (h11 plus the
  raw pre-check; rewritten values are checked for CR/LF/NUL) and written with one ``transport.write``.
  The response head is parsed strictly (:func:`parse_response_head`): a bounded head, ``HTTP/1.0`` or
  ``HTTP/1.1`` status line with a 3-digit code, token header names, no control characters, no
  obs-fold, at most one ``Content-Length`` (digits only), ``Transfer-Encoding`` only exactly
  ``chunked`` (with ``Content-Length`` too, chunked wins, Content-Length is dropped and the connection
  is not reused: RFC 9112 §6.3); anything else is an
  :class:`UpstreamProtocolError` (the pipeline answers 502). Bodies (Content-Length, chunked or
  close-delimited) are relayed as they arrive, with flow control in both directions.
- Timeouts: ``connect_timeout_seconds`` bounds TCP connect and the TLS handshake (each);
  ``upstream_idle_timeout_seconds`` bounds every wait for the upstream (a read or a write drain), i.e. it
  ends a request only when no byte moves for that long (no total deadline: streams may be long).
- Retries: a request with a body or a non-idempotent method is never replayed. Only a bodiless
  GET/HEAD/OPTIONS/TRACE that failed on a *reused* keep-alive connection before any response byte
  (the server closed it just as we sent) is retried once on a fresh connection.
- The proxy connects to the canonical policy host (SECURITY-SPEC P5); name resolution is the system
  resolver's. The original destination IP of the client connection is never used.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path

import anyio
import certifi

from botbox.fastio import READ_LOW_WATER, BufferedProtocol

__all__ = [
    "MAX_RESPONSE_HEAD_BYTES",
    "ResponseHead",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "build_ssl_context",
    "parse_response_head",
]


def build_ssl_context(upstream_ca_file: str | Path | None) -> ssl.SSLContext:
    """Client context: certifi roots (+ extra PEM bundle), TLS >= 1.2, hostname check on.

    Raises ``OSError``/``ssl.SSLError`` when ``upstream_ca_file`` is unreadable or not PEM certificates.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certifi.where())
    if upstream_ca_file is not None:
        path = Path(upstream_ca_file)
        # Read explicitly so an unreadable/empty file is an error, not a silently smaller trust store.
        pem = path.read_text(encoding="ascii")
        if "-----BEGIN CERTIFICATE-----" not in pem:
            raise ssl.SSLError(f"{path}: no PEM certificate found")
        ctx.load_verify_locations(cadata=pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# -- errors ------------------------------------------------------------------------------------------


class UpstreamError(Exception):
    """Base of every upstream failure. Messages never contain header values or bodies."""


class UpstreamConnectError(UpstreamError):
    """TCP connect, TLS handshake/verification failed, or the connection broke (read/write error)."""


class UpstreamTimeout(UpstreamError):
    """Connect/handshake exceeded ``connect_timeout``, or no byte moved for ``idle_timeout``."""


class UpstreamProtocolError(UpstreamError):
    """The upstream's response is malformed, ambiguous or not relayable (strict parse)."""


# -- response head parsing (pure) ------------------------------------------------------------------

MAX_RESPONSE_HEAD_BYTES = 64 * 1024
MAX_RESPONSE_HEADERS = 200
_MAX_CHUNK_LINE = 4096
_MAX_TRAILER_BYTES = 16 * 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([\t \x21-\x7e\x80-\xff]*))?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


class ResponseHead:
    """A parsed response head. ``length``: body length for Content-Length framing, else None;
    ``chunked``: chunked framing; ``persistent``: HTTP version and ``Connection`` allow reuse;
    ``keep_alive``: the connection may be reused after this response (persistent and self-delimited)."""

    __slots__ = ("chunked", "headers", "keep_alive", "length", "persistent", "reason", "status")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                 length: int | None, *, chunked: bool, persistent: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.length = length
        self.chunked = chunked
        self.persistent = persistent
        # Without Content-Length or chunked framing the body runs until EOF: never reusable.
        self.keep_alive = persistent and (chunked or length is not None)


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse ``head`` (status line + header lines, without the final CRLFCRLF) strictly.

    Raises :class:`UpstreamProtocolError` for anything a proxy cannot relay unambiguously.
    """
    if len(head) > MAX_RESPONSE_HEAD_BYTES:
        raise UpstreamProtocolError("response head too large")
    lines = head.split(b"\r\n")
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise UpstreamProtocolError("malformed status line")
    http11 = m.group(1) == b"1"
    status = int(m.group(2))
    reason = m.group(3) or b""
    if len(lines) - 1 > MAX_RESPONSE_HEADERS:
        raise UpstreamProtocolError("too many response headers")
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    te: bytes | None = None
    close = not http11
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # No obs-fold (leading SP/HTAB), no space before the colon, token names only.
        if not sep or _TOKEN.fullmatch(name) is None:
            raise UpstreamProtocolError("malformed response header line")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value) is not None:
            raise UpstreamProtocolError("control character in response header")
        lname = name.lower()
        if lname == b"content-length":
            if length is not None or _DIGITS.fullmatch(value) is None:
                raise UpstreamProtocolError("invalid or duplicate Content-Length")
            length = int(value)
        elif lname == b"transfer-encoding":
            if te is not None or value.lower() != b"chunked":
                raise UpstreamProtocolError("unsupported Transfer-Encoding")
            te = value
        elif lname == b"connection":
            tokens = [t.strip(b" \t").lower() for t in value.split(b",")]
            if b"close" in tokens:
                close = True
            elif b"keep-alive" in tokens and not http11:
                close = False
        headers.append((name, value))
    if te is not None and not http11:
        raise UpstreamProtocolError("Transfer-Encoding in an HTTP/1.0 response")
    if te is not None and length is not None:
        # RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; an intermediary that forwards
        # such a message must drop Content-Length first. The message smells of response splitting,
        # so the connection is never reused (whatever follows the chunked body is discarded with it).
        headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
        length = None
        close = True
    return ResponseHead(status, reason, headers, length, chunked=te is not None, persistent=not close)


# -- transport ---------------------------------------------------------------------------------------

_IDEMPOTENT_NO_BODY = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})


def _fire_timeout(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(UpstreamTimeout("upstream idle timeout"))


class _Protocol(BufferedProtocol):
    """An upstream connection's protocol: the shared buffering and flow control, but an EOF from the
    upstream closes the connection (no half-close: the response is complete or broken)."""

    __slots__ = ()
    HALF_CLOSE = False


class _Connection:
    """One verified TLS connection to an upstream, speaking HTTP/1.1."""

    __slots__ = ("idle_since", "key", "proto", "transport")

    def __init__(self, key: tuple[str, int], transport: asyncio.Transport, proto: _Protocol) -> None:
        self.key = key
        self.transport = transport
        self.proto = proto
        # After start_tls the protocol is driven by the TLS transport: flow control must pause/resume
        # that one, not the raw TCP transport underneath.
        proto.transport = transport
        self.idle_since = 0.0

    def usable(self) -> bool:
        """An idle pooled connection with pending bytes, EOF or a closing transport is unusable."""
        p = self.proto
        return not (p.buf or p.eof or self.transport.is_closing())

    def close(self) -> None:
        self.transport.close()

    async def wait_readable(self, idle: float) -> None:
        """Wait until bytes or EOF are available (the caller checked ``proto.buf`` is empty)."""
        proto = self.proto
        if proto.eof:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        proto.reader = fut
        handle = loop.call_later(idle, _fire_timeout, fut)
        try:
            await fut
        finally:
            proto.reader = None
            handle.cancel()

    def resume_if_low(self) -> None:
        proto = self.proto
        if proto.reading_paused and len(proto.buf) < READ_LOW_WATER and not proto.eof:
            proto.reading_paused = False
            self.transport.resume_reading()

    async def write(self, data: bytes, idle: float) -> None:
        transport = self.transport
        if transport.is_closing():
            raise UpstreamConnectError("upstream connection closed")
        transport.write(data)
        proto = self.proto
        if proto.write_paused:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            proto.drainer = fut
            handle = loop.call_later(idle, _fire_timeout, fut)
            try:
                await fut
            finally:
                proto.drainer = None
                handle.cancel()
            if proto.lost or transport.is_closing():
                raise UpstreamConnectError("upstream connection lost while sending")


class _NoResponse(UpstreamConnectError):
    """The connection closed before any response byte (a reused connection may be retried)."""


class UpstreamResponse:
    """A response whose head has arrived; the body is read with :meth:`aiter_stream` as it arrives.

    Call :meth:`close` (or ``await aclose()``) when done: a connection whose response was read to
    the end and is keep-alive goes back to the pool, any other is closed.
    """

    __slots__ = ("_conn", "_done", "_left", "_pool", "_state", "_timeout", "head", "headers", "status")

    def __init__(self, pool: UpstreamPool | None, conn: _Connection | None, head: ResponseHead,
                 *, no_body: bool, timeout: float) -> None:
        self._pool = pool
        self._conn = conn
        self.head = head
        self.status = head.status
        self.headers = head.headers
        self._timeout = timeout
        # _state: 0 = Content-Length (``_left`` bytes remain), 1 = chunked, 2 = until EOF.
        self._left = 0
        if no_body:
            self._state, self._done = 0, True
        elif head.chunked:
            self._state, self._done = 1, False
        elif head.length is not None:
            self._state, self._left, self._done = 0, head.length, head.length == 0
        else:
            self._state, self._done = 2, False

    @property
    def reason(self) -> bytes:
        return self.head.reason

    @property
    def extensions(self) -> dict[str, object]:  # httpcore-compatible view for callers/tests
        return {"reason_phrase": self.head.reason}

    @property
    def complete(self) -> bool:
        """The whole body has been handed out (nothing more to read)."""
        return self._done

    def take_buffered(self) -> bytes:
        """Body bytes already received, without waiting (b"" when none); for write coalescing."""
        conn = self._conn
        if self._done or conn is None or self._state != 0:
            return b""
        buf = conn.proto.buf
        if not buf:
            return b""
        n = min(len(buf), self._left)
        data = bytes(buf[:n]) if n < len(buf) else bytes(buf)
        del buf[:n]
        self._left -= n
        if self._left == 0:
            self._done = True
        conn.resume_if_low()
        return data

    async def aiter_stream(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        proto = conn.proto
        buf = proto.buf
        timeout = self._timeout
        if self._state == 0:
            while not self._done:
                if not buf:
                    await conn.wait_readable(timeout)
                    if not buf:
                        raise UpstreamConnectError("upstream closed the connection mid-body")
                n = min(len(buf), self._left)
                if n == len(buf):
                    data = bytes(buf)
                    buf.clear()
                else:
                    data = bytes(buf[:n])
                    del buf[:n]
                self._left -= n
                if self._left == 0:
                    self._done = True
                conn.resume_if_low()
                yield data
        elif self._state == 2:
            while True:
                if not buf:
                    await conn.wait_readable(timeout)
                    if not buf:
                        if proto.exc is not None:
                            raise UpstreamConnectError("upstream connection broke mid-body")
                        self._done = True
                        return
                data = bytes(buf)
                buf.clear()
                conn.resume_if_low()
                yield data
        else:
            async for data in self._chunked(conn, buf, timeout):
                yield data

    async def _chunked(self, conn: _Connection, buf: bytearray, idle: float) -> AsyncIterator[bytes]:
        async def need(pred_len: int) -> None:
            # Wait for more bytes (the buffer holds fewer than the parser needs).
            await conn.wait_readable(idle)
            if len(buf) <= pred_len:
                raise UpstreamConnectError("upstream closed the connection mid-body")

        while True:
            # chunk-size line
            while True:
                i = buf.find(b"\r\n")
                if i != -1:
                    break
                if len(buf) > _MAX_CHUNK_LINE:
                    raise UpstreamProtocolError("chunk size line too long")
                await need(len(buf))
            if i > _MAX_CHUNK_LINE:
                raise UpstreamProtocolError("chunk size line too long")
            line = bytes(buf[:i])
            size_part = line.split(b";", 1)[0].rstrip(b" \t")
            if _HEX.fullmatch(size_part) is None or _BAD_VALUE.search(line) is not None:
                raise UpstreamProtocolError("malformed chunk size")
            size = int(size_part, 16)
            del buf[: i + 2]
            if size == 0:
                break
            left = size
            while left:
                if not buf:
                    await need(0)
                n = min(left, len(buf))
                if n == len(buf):
                    data = bytes(buf)
                    buf.clear()
                else:
                    data = bytes(buf[:n])
                    del buf[:n]
                left -= n
                conn.resume_if_low()
                yield data
            while len(buf) < 2:
                await need(len(buf))
            if buf[:2] != b"\r\n":
                raise UpstreamProtocolError("missing CRLF after chunk data")
            del buf[:2]
        # Trailers (dropped: never relayed) up to the empty line.
        while True:
            if buf[:2] == b"\r\n":
                del buf[:2]
                break
            i = buf.find(b"\r\n\r\n")
            if i != -1:
                trailer = bytes(buf[:i])
                del buf[: i + 4]
                if _BAD_VALUE.search(trailer.replace(b"\r\n", b"")) is not None:
                    raise UpstreamProtocolError("malformed trailer")
                break
            if len(buf) > _MAX_TRAILER_BYTES:
                raise UpstreamProtocolError("trailers too large")
            await need(len(buf))
        self._done = True
        conn.resume_if_low()

    def close(self) -> None:
        """Return the connection to the pool (complete keep-alive response) or close it."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        pool = self._pool
        if self._done and self.head.keep_alive and pool is not None and not conn.proto.buf:
            pool._release(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        self.close()


class UpstreamPool:
    """Keep-alive pool of verified TLS HTTP/1.1 connections, keyed by (host, port).

    A deliberately small pool (no global lock, no scan): a LIFO deque of idle connections per key.
    Taking a connection checks only that one (expired or EOF/data pending → dropped).
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        connect_timeout: float,
        idle_timeout: float,
        max_connections: int = 1024,
        keepalive_expiry: float = 60.0,
    ) -> None:
        self._ssl_context = ssl_context
        ssl_context.set_alpn_protocols(["http/1.1"])
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._max_idle = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._closed = False
        self.connections_opened = 0

    async def _connect(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        protocol = _Protocol()
        timeout = self._connect_timeout
        try:
            with anyio.fail_after(timeout):
                transport, _ = await loop.create_connection(lambda: protocol, host, port)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"connect to {host}:{port} timed out") from exc
        except OSError as exc:
            raise UpstreamConnectError(f"connect to {host}:{port} failed: {exc.strerror or exc}") from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with anyio.fail_after(timeout):
                tls_transport = await loop.start_tls(
                    transport, protocol, self._ssl_context, server_side=False, server_hostname=host,
                )
        except TimeoutError as exc:
            transport.abort()
            raise UpstreamTimeout("TLS handshake timed out") from exc
        except (OSError, ssl.SSLError, ConnectionError, RuntimeError) as exc:
            transport.abort()
            raise UpstreamConnectError(f"TLS handshake failed: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            transport.abort()
            raise
        if tls_transport is None:  # pragma: no cover - only for a closed transport
            transport.abort()
            raise UpstreamConnectError("TLS handshake failed: transport closed")
        self.connections_opened += 1
        return _Connection((host, port), tls_transport, protocol)

    def _take_idle(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        expiry = self._keepalive_expiry
        while idle:
            conn = idle.pop()
            if conn.usable() and now - conn.idle_since < expiry:
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        if self._closed or not conn.usable():
            conn.close()
            return
        key = conn.key
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        now = time.monotonic()
        conn.idle_since = now
        expiry = self._keepalive_expiry
        # Drop the oldest idle connections beyond the cap or past their keep-alive expiry.
        while idle and (len(idle) >= self._max_idle or now - idle[0].idle_since >= expiry):
            idle.popleft().close()
        idle.append(conn)

    async def send(
        self,
        method: bytes,
        *,
        host: str,
        port: int,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | None,
    ) -> UpstreamResponse:
        """Send one request over TLS to ``host:port`` and return once the response head arrived.

        ``headers`` must already be valid (the client side validated them) and carry the framing
        (``Content-Length`` or ``Transfer-Encoding: chunked``) when ``body`` is given. The caller must
        ``close()`` the response. Raises :class:`UpstreamTimeout`, :class:`UpstreamConnectError`,
        :class:`UpstreamProtocolError`. Only a bodiless idempotent request that failed on a *reused*
        connection before any response byte is retried, once, on a fresh connection.
        """
        if self._closed:
            raise UpstreamConnectError("upstream pool closed")
        key = (host, port)
        chunked = False
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
            if len(name) == 17 and name.lower() == b"transfer-encoding":
                chunked = True
        parts.append(b"\r\n")
        head = b"".join(parts)
        conn = self._take_idle(key)
        reused = conn is not None
        if conn is None:
            conn = await self._connect(host, port)
        try:
            return await self._exchange(conn, method, head, body, chunked)
        except _NoResponse:
            conn.close()
            if not (reused and body is None and method in _IDEMPOTENT_NO_BODY):
                raise
        except BaseException:
            conn.close()
            raise
        conn = await self._connect(host, port)
        try:
            return await self._exchange(conn, method, head, None, False)
        except BaseException:
            conn.close()
            raise

    async def _exchange(self, conn: _Connection, method: bytes, head: bytes,
                        body: AsyncIterable[bytes] | None, chunked: bool) -> UpstreamResponse:
        timeout = self._idle_timeout
        proto = conn.proto
        if body is None:
            await conn.write(head, timeout)
        else:
            # The head goes out with the first body chunk (one TLS record, one syscall).
            pending = head
            async for chunk in body:
                if not chunk:
                    continue
                if chunked:
                    data = b"%x\r\n%b\r\n" % (len(chunk), chunk)
                    await conn.write(pending + data if pending else data, timeout)
                else:
                    await conn.write(pending + chunk if pending else chunk, timeout)
                pending = b""
            end = b"0\r\n\r\n" if chunked else b""
            if pending or end:
                await conn.write(pending + end, timeout)
        buf = proto.buf
        while True:
            start = 0
            while True:
                i = buf.find(b"\r\n\r\n", start)
                if i != -1:
                    break
                if len(buf) > MAX_RESPONSE_HEAD_BYTES:
                    raise UpstreamProtocolError("response head too large")
                start = max(0, len(buf) - 3)
                before = len(buf)
                await conn.wait_readable(timeout)
                if len(buf) == before:
                    if before == 0:
                        raise _NoResponse("upstream closed the connection before responding")
                    raise UpstreamConnectError("upstream closed the connection mid-head")
            raw = bytes(buf[:i])
            del buf[: i + 4]
            rhead = parse_response_head(raw)
            status = rhead.status
            if status < 200:
                if status == 101:
                    raise UpstreamProtocolError("protocol upgrade is not supported")
                continue  # interim (100 Continue, 103 Early Hints): wait for the final response
            no_body = method == b"HEAD" or status in (204, 304)
            if no_body:
                rhead.keep_alive = rhead.persistent  # no body follows whatever the framing says
            return UpstreamResponse(self, conn, rhead, no_body=no_body, timeout=timeout)

    @property
    def connection_count(self) -> int:
        return sum(len(d) for d in self._idle.values())

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()

