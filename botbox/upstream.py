"""Upstream connections: a keep-alive pool speaking verified HTTPS (HTTP/1.1) only.

- Trust: certifi's web PKI roots plus ``upstream_ca_file`` when configured (SECURITY-SPEC R4); TLS >= 1.2,
  hostname verification always on. There is no code path that opens a plaintext upstream connection.
- The pool is keyed by (host, port) and shared across client connections, so keep-alive connections
  are reused. It is our own (LIFO deque per key, no global lock, no per-request scan of every pooled
  connection as ``httpcore.AsyncConnectionPool`` does, which dominated the CPU profile); each
  connection is httpcore's ``AsyncHTTP11Connection`` on native asyncio transports (TLS in C on uvloop).
- Timeouts: ``connect_timeout_seconds`` bounds TCP connect and the TLS handshake (each);
  ``upstream_idle_timeout_seconds`` is used as httpcore's per-operation read/write timeout, i.e. it ends
  a request only when no byte moves for that long (no total deadline: streams may be long).
- Retries: a request with a body or a non-idempotent method is never replayed. Only a bodiless
  GET/HEAD/OPTIONS/TRACE that failed on a *reused* keep-alive connection before any response byte
  (the server closed it just as we sent) is retried once on a fresh connection.
- The proxy connects to the canonical policy host (SECURITY-SPEC P5); name resolution is the system
  resolver's. The original destination IP of the client connection is never used.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterable, Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio
import certifi
import httpcore

__all__ = ["AsyncioBackend", "UpstreamPool", "build_ssl_context"]


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


def _fire_timeout(fut: asyncio.Future[None], exc: type[Exception]) -> None:
    if not fut.done():
        fut.set_exception(exc())


_READ_HIGH_WATER = 256 * 1024  # pause reading from the upstream above this many buffered bytes
_READ_LOW_WATER = 64 * 1024


class _Protocol(asyncio.Protocol):
    """Buffers received bytes and wakes one reader; flow control in both directions (reading is paused
    while the buffer is above the high-water mark, so a fast upstream cannot make us buffer a whole
    body while the client reads slowly); tracks connection loss."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.lost: Exception | None = None
        self.reader: asyncio.Future[None] | None = None
        self.paused = False
        self.drainer: asyncio.Future[None] | None = None
        self.reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > _READ_HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = exc
        self._wake_reader()
        self.paused = False
        if self.drainer is not None and not self.drainer.done():
            self.drainer.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.drainer is not None and not self.drainer.done():
            self.drainer.set_result(None)

    def _wake_reader(self) -> None:
        if self.reader is not None and not self.reader.done():
            self.reader.set_result(None)


class _AsyncioStream(httpcore.AsyncNetworkStream):
    """httpcore stream over a native asyncio transport: with uvloop, TLS runs in C (no Python
    MemoryBIO pump per read/write), and the idle-connection liveness check is a flag test instead of
    a poll() syscall per pooled connection per request."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        # After start_tls the protocol is driven by the TLS transport (connection_made is not called
        # again): flow control must pause/resume that one, not the raw TCP transport underneath.
        protocol.transport = transport

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        proto = self._protocol
        if not proto.buf and not proto.eof:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            proto.reader = fut
            handle = loop.call_later(timeout, _fire_timeout, fut, httpcore.ReadTimeout) if timeout else None
            try:
                await fut
            finally:
                proto.reader = None
                if handle is not None:
                    handle.cancel()
        if proto.buf:
            if len(proto.buf) <= max_bytes:
                data = bytes(proto.buf)
                proto.buf.clear()
            else:
                data = bytes(proto.buf[:max_bytes])
                del proto.buf[:max_bytes]
            if proto.reading_paused and len(proto.buf) < _READ_LOW_WATER and not proto.eof:
                proto.reading_paused = False
                self._transport.resume_reading()
            return data
        if proto.lost is not None:
            raise httpcore.ReadError(str(proto.lost) or type(proto.lost).__name__)
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        transport = self._transport
        if transport.is_closing():
            raise httpcore.WriteError("connection closed")
        transport.write(buffer)
        proto = self._protocol
        if proto.paused:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            proto.drainer = fut
            handle = loop.call_later(timeout, _fire_timeout, fut, httpcore.WriteTimeout) if timeout else None
            try:
                await fut
            finally:
                proto.drainer = None
                if handle is not None:
                    handle.cancel()
            if proto.lost is not None:
                raise httpcore.WriteError(str(proto.lost) or type(proto.lost).__name__)

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(timeout):
                tls_transport = await loop.start_tls(
                    self._transport, self._protocol, ssl_context,
                    server_side=False, server_hostname=server_hostname,
                )
        except TimeoutError as exc:
            self._transport.abort()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from exc
        except (OSError, ssl.SSLError, ConnectionError, RuntimeError) as exc:
            self._transport.abort()
            raise httpcore.ConnectError(f"TLS handshake failed: {type(exc).__name__}: {exc}") from exc
        if tls_transport is None:  # pragma: no cover - only for a closed transport
            raise httpcore.ConnectError("TLS handshake failed: transport closed")
        return _AsyncioStream(tls_transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        t = self._transport
        if info == "is_readable":
            # An idle pooled connection with pending bytes or EOF is unusable (server closed it).
            return bool(self._protocol.buf) or self._protocol.eof or t.is_closing()
        if info == "ssl_object":
            return t.get_extra_info("ssl_object")
        if info == "client_addr":
            return t.get_extra_info("sockname")
        if info == "server_addr":
            return t.get_extra_info("peername")
        if info == "socket":
            return t.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend on native asyncio transports (requires the asyncio/uvloop loop)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        protocol = _Protocol()
        try:
            with anyio.fail_after(timeout):
                transport, _ = await loop.create_connection(
                    lambda: protocol, host, port,
                    local_addr=(local_address, 0) if local_address else None,
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"connect to {host}:{port} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"connect to {host}:{port} failed: {exc.strerror or exc}") from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in socket_options or ():
                sock.setsockopt(*option)
        return _AsyncioStream(transport, protocol)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:  # pragma: no cover - never used: upstreams are TCP+TLS only
        raise httpcore.ConnectError("unix sockets are not supported")

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


_IDEMPOTENT_NO_BODY = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})


class _ReleasingStream:
    """Response body wrapper: closing it hands the connection back to the pool (or drops it)."""

    __slots__ = ("_conn", "_inner", "_key", "_pool")

    def __init__(self, inner: Any, pool: UpstreamPool, key: tuple[str, int],
                 conn: httpcore.AsyncHTTP11Connection) -> None:
        self._inner = inner
        self._pool = pool
        self._key = key
        self._conn = conn

    def __aiter__(self) -> Any:
        return self._inner.__aiter__()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()  # idle again if the response was complete and keep-alive
        finally:
            await self._pool._release(self._key, self._conn)


class UpstreamPool:
    """Keep-alive pool of verified TLS HTTP/1.1 connections, keyed by (host, port).

    A deliberately small pool (no global lock, no scan): a LIFO deque of idle connections per key.
    Taking a connection checks only that one (expired or EOF/data pending → dropped). Each connection
    is httpcore's ``AsyncHTTP11Connection`` (h11 inside) on :class:`AsyncioBackend` streams.
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
        self._extensions: dict[str, object] = {
            "timeout": {"connect": connect_timeout, "pool": connect_timeout,
                        "read": idle_timeout, "write": idle_timeout},
        }
        self._max_idle = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._backend = AsyncioBackend()
        self._idle: dict[tuple[str, int], deque[httpcore.AsyncHTTP11Connection]] = {}
        self._closed = False
        self.connections_opened = 0

    async def _connect(self, host: str, port: int) -> httpcore.AsyncHTTP11Connection:
        # Both steps raise httpcore ConnectError/ConnectTimeout.
        stream = await self._backend.connect_tcp(host, port, timeout=self._connect_timeout)
        try:
            stream = await stream.start_tls(self._ssl_context, server_hostname=host,
                                            timeout=self._connect_timeout)
        except BaseException:
            await stream.aclose()
            raise
        self.connections_opened += 1
        origin = httpcore.Origin(b"https", host.encode("ascii"), port)
        return httpcore.AsyncHTTP11Connection(origin, stream, keepalive_expiry=self._keepalive_expiry)

    def _take_idle(self, key: tuple[str, int]) -> httpcore.AsyncHTTP11Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.is_idle() and not conn.has_expired():
                return conn
            self._discard(conn)
        return None

    @staticmethod
    def _discard(conn: httpcore.AsyncHTTP11Connection) -> None:
        # Closing a native transport is synchronous underneath; no need to await anything.
        stream = conn._network_stream
        if isinstance(stream, _AsyncioStream):
            stream._transport.close()

    async def _release(self, key: tuple[str, int], conn: httpcore.AsyncHTTP11Connection) -> None:
        if self._closed or not conn.is_idle() or conn.has_expired():
            if not conn.is_closed():
                await conn.aclose()
            return
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        # Drop the oldest idle connections beyond the cap or past their keep-alive expiry.
        while idle and (len(idle) >= self._max_idle or idle[0].has_expired()):
            self._discard(idle.popleft())
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
    ) -> httpcore.Response:
        """Send one request over TLS to ``host:port`` and return once response headers arrived.

        The caller must ``await response.aclose()`` (returns the connection to the pool). httpcore
        exceptions propagate: ``ConnectTimeout``/``ReadTimeout``/``WriteTimeout`` (timeouts) and
        ``ConnectError``/``ReadError``/``WriteError``/``RemoteProtocolError`` (connection failures).
        Only a bodiless idempotent request that failed on a *reused* connection before any response
        byte is retried, once, on a fresh connection (the keep-alive close race); nothing else ever is.
        """
        if self._closed:
            raise httpcore.ConnectError("upstream pool closed")
        key = (host, port)
        url = httpcore.URL(scheme=b"https", host=host.encode("ascii"), port=port, target=target)
        request = httpcore.Request(
            method=method,
            url=url,
            headers=list(headers),
            content=body if body is not None else b"",
            extensions=self._extensions,
        )
        conn = self._take_idle(key)
        reused = conn is not None
        if conn is None:
            conn = await self._connect(host, port)
        try:
            response = await conn.handle_async_request(request)
        except (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError):
            await conn.aclose()
            if not (reused and body is None and method in _IDEMPOTENT_NO_BODY):
                raise
            conn = await self._connect(host, port)
            try:
                response = await conn.handle_async_request(request)
            except BaseException:
                await conn.aclose()
                raise
        except BaseException:
            await conn.aclose()
            raise
        response.stream = _ReleasingStream(response.stream, self, key, conn)
        return response

    @property
    def connection_count(self) -> int:
        return sum(len(d) for d in self._idle.values())

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                await idle.pop().aclose()
        self._idle.clear()
