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

import ssl
from collections.abc import AsyncIterable, Sequence
from pathlib import Path

import certifi
import httpcore

__all__ = ["UpstreamPool", "build_ssl_context"]


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
            network_backend=httpcore.AnyIOBackend(),
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
