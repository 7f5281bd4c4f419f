"""The interception listener's per-connection work: ClientHello → policy → leaf → TLS → pipeline.

Flow for one accepted TCP connection (all of it under ``handshake_timeout_ms``):

1. read bytes until a complete ClientHello is buffered (:func:`parse_client_hello`); not TLS or
   malformed → ``tls_handshakes_total{result="io_error"}``;
2. SNI: missing, not canonicalisable, or an IP literal → fatal ``unrecognized_name`` alert,
   ``result="denied"`` (T6);
3. ``deny_handshake_on_disallowed_sni: true`` and the policy does not allow the host on 443 →
   ``access_denied`` alert before any certificate is issued, ``cert_issued_total{decision="denied"}`` and
   ``result="denied"`` (T3);
4. leaf from the cache (single-flight issuance in a worker thread);
5. TLS handshake over memory BIOs, starting with the bytes already read, ALPN ``http/1.1`` only;
   success → ``result="ok"`` and :func:`botbox.pipeline.serve_connection` with
   ``ConnectionContext(listener="https_interception", sni=<canonical SNI>)``, which applies T4/T5.

A timeout anywhere in 1–5 → ``result="timeout"``.  The connection slot, the active-connection gauge and
the drain are the server's (this module only handles an already-accepted stream).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import ssl
import time
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.abc

from botbox.hostname import InvalidHost, canonicalize_host
from botbox.pipeline import ConnectionContext, serve_connection
from botbox.tls.ca import CAError, CertificateAuthority, load_ca
from botbox.tls.cache import CertCache, IssuanceError
from botbox.tls.clienthello import MAX_CLIENT_HELLO, ClientHelloBuffer, ClientHelloError, NotTLSError
from botbox.tls.issuer import LeafIssuer
from botbox.tls.stream import TLSHandshakeError, TLSServerStream

if TYPE_CHECKING:
    from botbox.config import HttpsInterception
    from botbox.pipeline import ProxyApp

__all__ = ["SELFTEST_HOST", "HandshakeOutcome", "Interceptor", "sni_host"]

HandshakeOutcome = Literal["ok", "io_error", "timeout", "denied"]

#: Host name used for the startup self-test issuance (reserved TLD, never a real host).
SELFTEST_HOST = "botbox-selftest.invalid"

_ALERT_UNRECOGNIZED_NAME = 112
_ALERT_ACCESS_DENIED = 49
_ALERT_DECODE_ERROR = 50
_ALERT_INTERNAL_ERROR = 80


def _alert(description: int) -> bytes:
    """A plaintext fatal alert record (sent before ServerHello, so unencrypted)."""
    return bytes((21, 3, 3, 0, 2, 2, description))


def sni_host(raw: str | None) -> str | None:
    """Canonical DNS name from a raw SNI, or None when it is missing, invalid or an IP literal (T6)."""
    if raw is None:
        return None
    try:
        host = canonicalize_host(raw)
    except InvalidHost:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


class _Refused(Exception):
    def __init__(
        self, outcome: HandshakeOutcome, reason: str, alert: int | None, host: str | None = None
    ) -> None:
        super().__init__(reason)
        self.outcome: HandshakeOutcome = outcome
        self.reason = reason
        self.alert = alert
        self.host = host


class Interceptor:
    """Owns the CA, the leaf issuer and the certificate cache for one proxy app."""

    def __init__(self, app: ProxyApp, settings: HttpsInterception, ca: CertificateAuthority) -> None:
        self.app = app
        self.settings = settings
        self.ca = ca
        self.timeout = settings.handshake_timeout_ms / 1000.0
        self.deny_disallowed = settings.deny_handshake_on_disallowed_sni
        m = app.metrics
        results = ("ok", "io_error", "timeout", "denied")
        self._hs = {r: m.tls_handshakes_total.labels(result=r) for r in results}
        self._lookup = {r: m.https_interception_cert_cache_total.labels(result=r) for r in ("hit", "miss")}
        self._issued = m.https_interception_cert_issued_total.labels(decision="issued")
        self._denied = m.https_interception_cert_issued_total.labels(decision="denied")
        self._ca_not_after = ca.not_after.timestamp()
        self.issuer = LeafIssuer(ca, settings.cert_ttl_seconds)
        self.cache = CertCache(
            self.issuer.issue,
            max_size=settings.cert_cache_size,
            ttl_seconds=settings.cert_cache_ttl_seconds,
            on_lookup=lambda r: self._lookup[r].inc(),
            on_issued=self._issued.inc,
        )

    @classmethod
    def from_app(cls, app: ProxyApp) -> Interceptor:
        """Load the CA (fail closed: :class:`CAError`), self-test one issuance, mark the app CA-ready."""
        settings = app.config.https_interception
        if settings is None or not settings.enabled:
            raise CAError("HTTPS interception is not enabled in the configuration")
        ca = load_ca(settings.ca_cert_path, settings.ca_key_path)
        self = cls(app, settings, ca)
        try:
            self.issuer.issue(SELFTEST_HOST)  # proves key, signing and context loading work here
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise CAError(
                f"CA {settings.ca_cert_path}: cannot issue a test certificate ({type(exc).__name__}: {exc})"
            ) from None
        app.ca_ready = True
        return self

    def _ca_expired(self) -> bool:
        """The CA ran out while serving: /healthz turns 503 and handshakes are refused (fail closed)."""
        if _now() < self._ca_not_after:
            return False
        self.app.ca_ready = False
        return True

    # ------------------------------------------------------------------------------------------
    async def _read_client_hello(self, stream: anyio.abc.ByteStream) -> tuple[bytes, str]:
        buf = ClientHelloBuffer()
        while True:
            try:
                chunk = await stream.receive(MAX_CLIENT_HELLO)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                raise _Refused("io_error", "connection closed before ClientHello", None) from None
            try:
                hello = buf.feed(chunk)
            except NotTLSError:
                raise _Refused("io_error", "not TLS", None) from None
            except ClientHelloError as exc:
                raise _Refused("io_error", f"malformed ClientHello: {exc}", _ALERT_DECODE_ERROR) from None
            if hello is None:
                continue
            host = sni_host(hello.server_name)
            if host is None:
                why = "missing SNI" if hello.server_name is None else "invalid or IP-literal SNI"
                raise _Refused("denied", why, _ALERT_UNRECOGNIZED_NAME)
            return bytes(buf.raw), host

    async def _negotiate(self, stream: anyio.abc.ByteStream) -> tuple[TLSServerStream, str]:
        initial, host = await self._read_client_hello(stream)
        if self._ca_expired():
            raise _Refused("io_error", "interception CA has expired", _ALERT_INTERNAL_ERROR, host)
        if self.deny_disallowed and not self.app.policy.decide(host, 443, "GET").allowed:
            self._denied.inc()
            why = "host not allowed (deny_handshake_on_disallowed_sni)"
            raise _Refused("denied", why, _ALERT_ACCESS_DENIED, host)
        try:
            leaf = await self.cache.get(host)
        except IssuanceError as exc:
            raise _Refused("io_error", str(exc), _ALERT_INTERNAL_ERROR, host) from None
        try:
            tls = await TLSServerStream.handshake(stream, leaf.context, initial)
        except TLSHandshakeError as exc:
            # OpenSSL already sent its alert (e.g. the client rejected our certificate: unknown_ca)
            raise _Refused("io_error", str(exc), None, host) from None
        return tls, host

    async def handshake(self, stream: anyio.abc.ByteStream) -> tuple[TLSServerStream, str] | None:
        """Run steps 1–5; return the TLS stream and canonical SNI, or None (stream closed, counted)."""
        outcome: HandshakeOutcome
        host: str | None = None
        try:
            with anyio.fail_after(self.timeout):
                try:
                    tls, host = await self._negotiate(stream)
                except _Refused as exc:
                    if exc.alert is not None:
                        with contextlib.suppress(Exception):
                            await stream.send(_alert(exc.alert))
                    raise
        except TimeoutError:
            outcome, reason = "timeout", "handshake timeout"
        except _Refused as exc:
            outcome, reason, host = exc.outcome, exc.reason, exc.host
        else:
            self._hs["ok"].inc()
            return tls, host
        self._hs[outcome].inc()
        self.app.logger.info(
            "tls handshake refused", listener="https_interception", result=outcome, reason=reason, sni=host,
            client=_peer(stream),
        )
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0), contextlib.suppress(Exception):
            await stream.aclose()
        return None

    async def handle(self, stream: anyio.abc.ByteStream, ctx: ConnectionContext) -> None:
        """Server hook: serve one accepted connection of the interception listener; closes ``stream``."""
        got = await self.handshake(stream)
        if got is None:
            return
        tls, host = got
        await serve_connection(tls, dataclasses.replace(ctx, sni=host), self.app)


def _now() -> float:
    return time.time()


def _peer(stream: anyio.abc.ByteStream) -> str | None:
    try:
        addr = stream.extra(anyio.abc.SocketAttribute.remote_address)  # noqa: S610 - anyio, not Django
    except Exception:
        return None
    if isinstance(addr, tuple):
        host, port = str(addr[0]), int(addr[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr)
