"""Upstream connections: an httpcore pool speaking verified HTTPS (HTTP/1.1) only.

- Trust: certifi's web PKI roots plus ``upstream_ca_file`` when configured (SECURITY-SPEC R4); TLS >= 1.2,
  hostname verification always on. There is no code path that opens a plaintext upstream connection.
- The pool is keyed by (host, port) and shared across client connections, so keep-alive connections
  (and their TLS sessions) are reused.
- Timeouts: ``connect_timeout_seconds`` bounds TCP+TLS setup and waiting for a pool slot;
  ``upstream_idle_timeout_seconds`` is used as httpcore's per-operation read/write timeout, i.e. it ends
  a request only when no byte moves for that long (no total deadline: streams may be long).
- Retries: httpcore's ``retries`` is 0 and a request that was (even partially) sent is never replayed.
- The proxy connects to the canonical policy host (SECURITY-SPEC P5); name resolution is the system
  resolver's. The original destination IP of the client connection is never used.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
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


class _Protocol(asyncio.Protocol):
    """Buffers received bytes and wakes one reader; tracks write flow control and connection loss."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.lost: Exception | None = None
        self.reader: asyncio.Future[None] | None = None
        self.paused = False
        self.drainer: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
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


class UpstreamPool:
    """Thin wrapper over ``httpcore.AsyncConnectionPool`` that only builds ``https://`` requests."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        connect_timeout: float,
        idle_timeout: float,
        max_connections: int = 1024,
        keepalive_expiry: float = 60.0,
    ) -> None:
        self._timeouts = {
            "connect": connect_timeout,
            "pool": connect_timeout,
            "read": idle_timeout,
            "write": idle_timeout,
        }
        self._extensions: dict[str, object] = {"timeout": self._timeouts}
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
            http1=True,
            http2=False,
            retries=0,
            network_backend=AsyncioBackend(),
        )

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

        The caller must ``await response.aclose()``. httpcore exceptions propagate unchanged:
        ``ConnectTimeout``/``PoolTimeout``/``ReadTimeout``/``WriteTimeout`` (timeouts) and
        ``ConnectError``/``ReadError``/``WriteError``/``RemoteProtocolError`` (connection failures).
        """
        url = httpcore.URL(scheme=b"https", host=host.encode("ascii"), port=port, target=target)
        request = httpcore.Request(
            method=method,
            url=url,
            headers=list(headers),
            content=body if body is not None else b"",
            extensions=self._extensions,
        )
        return await self._pool.handle_async_request(request)

    @property
    def connection_count(self) -> int:
        return len(self._pool.connections)

    async def aclose(self) -> None:
        await self._pool.aclose()
