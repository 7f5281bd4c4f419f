"""One client connection: strict HTTP/1.1 parse → policy → header rewrite → upstream (TLS) → stream back.

Inbound parsing (SECURITY-SPEC R5) is h11 plus a raw pre-check of the request head, because h11 is
deliberately lenient in places where a security proxy must not be. The pre-check rejects:

* a head larger than ``MAX_HEAD_BYTES`` (16 KiB, request line + headers) or with more than
  ``MAX_HEADERS`` (100) header lines;
* any bare CR or bare LF (every line must end in CRLF) and obsolete line folding (h11 unfolds it);
* more than one ``Host``, more than one ``Content-Length`` (h11 merges equal duplicates), both
  ``Content-Length`` and ``Transfer-Encoding`` (h11 silently drops Content-Length), more than one
  ``Transfer-Encoding`` header, or a ``Transfer-Encoding`` that is not exactly ``chunked``;

and h11 then rejects invalid names/values, bad request lines and bad chunk framing. Every malformed
request gets ``400 bad request`` and the connection is closed. One fresh ``h11.Connection`` is used per
request (pipelined bytes are carried over), so the pre-check sees every request head.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.abc
import h11

from botbox.fastio import FastStream
from botbox.hostname import InvalidHost, canonicalize_host, parse_authority
from botbox.origdst import format_addr
from botbox.rewrite import (
    SecretUnavailable,
    downstream_response_headers,
    secret_usable,
    upstream_request_headers,
)
from botbox.upstream import UpstreamConnectError, UpstreamProtocolError, UpstreamResponse, UpstreamTimeout

if TYPE_CHECKING:
    from botbox.config import Config
    from botbox.logs import JsonLogger
    from botbox.metrics import Metrics
    from botbox.policy import Decision, Policy
    from botbox.secrets import SecretStore
    from botbox.upstream import UpstreamPool

__all__ = [
    "CURRENT_CONNECTION",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "ConnectionContext",
    "ConnectionState",
    "ListenerName",
    "ProxyApp",
    "serve_connection",
]

ListenerName = Literal["http", "https_interception"]

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
_READ_SIZE = 65536
_FRAMING = (b"content-length", b"transfer-encoding")
# Request IDs: 64 random bits from a generator seeded once per process from the OS (every worker is a
# fresh interpreter). IDs are correlation handles, not secrets; os.urandom per request cost a
# getrandom() syscall (~3 us/req in the profile).
_request_bits = random.Random(os.urandom(32)).getrandbits  # noqa: S311 - not a security token


def _request_id() -> str:
    return f"{_request_bits(64):016x}"
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(rb"[0-9]{1,18}")
# An incomplete head that can never become valid: a bare LF / bare CR (a CR may still be followed by
# its LF in the next read, so only a CR followed by something else counts), or a first byte that
# cannot start a method token (TLS ClientHello 0x16, binary junk). Rejected at once instead of
# waiting for the header timeout.
_EARLY_BAD = re.compile(rb"(?<!\r)\n|\r(?=[^\n])|\A[^!#$%&'*+.^_`|~0-9A-Za-z\r\n]")

MSG_CONNECT = b"CONNECT method not allowed"
MSG_NO_HOST = b"missing host"
MSG_DENIED = b"host not allowed"
MSG_SECRET = b"internal error: secret not available"
MSG_BAD_GATEWAY = b"upstream connection failed"
MSG_TIMEOUT = b"gateway timeout"
MSG_ABSOLUTE = b"absolute-form request not allowed on HTTPS interception listener"
MSG_SNI = b"SNI/Host header mismatch"
MSG_PORT_443 = b"HTTPS interception listener only accepts port 443 traffic"
MSG_BAD_REQUEST = b"bad request"

_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    504: b"Gateway Timeout",
}

_TIMEOUT_ERRORS = (UpstreamTimeout,)
_CONN_ERRORS = (UpstreamConnectError, UpstreamProtocolError, OSError)
_CLIENT_IO_ERRORS = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ConnectionError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """What is known about a client connection before its first request."""

    listener: ListenerName
    peer: str  # "ip:port" of the client
    orig_dst: tuple[str, int] | None  # SO_ORIGINAL_DST, None when not redirected
    sni: str | None = None  # TLS SNI (interception listener only)


@dataclass(slots=True, eq=False)
class ConnectionState:
    """Per-connection bookkeeping shared with the server (drain: idle connections are closed first)."""

    idle: bool = True
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


CURRENT_CONNECTION: contextvars.ContextVar[ConnectionState | None] = contextvars.ContextVar(
    "botbox_connection", default=None
)


class ProxyApp:
    """Everything a connection needs: config, policy, secrets, upstream pool, metrics, logger."""

    def __init__(
        self,
        *,
        config: Config,
        policy: Policy,
        secrets: SecretStore,
        upstream: UpstreamPool,
        metrics: Metrics,
        logger: JsonLogger,
    ) -> None:
        self.config = config
        self.policy = policy
        self.secrets = secrets
        self.upstream = upstream
        self.metrics = metrics
        self.logger = logger
        interception = config.https_interception
        self.interception_enabled = bool(interception is not None and interception.enabled)
        self.enforce_sni_host_match = bool(interception.enforce_sni_host_match) if interception else True
        # The interception module sets this once the CA is loaded (/healthz reports 503 until then).
        self.ca_ready = not self.interception_enabled
        self.draining = False
        self.header_timeout = float(config.request_header_timeout_seconds)
        self.idle_timeout = float(config.upstream_idle_timeout_seconds)

    def ready(self) -> bool:
        """Readiness for /healthz: every referenced secret resolves (S8) and the CA is loaded."""
        # A secret that exists but can never be injected (CR/LF/NUL, empty: S4) is not available.
        return self.ca_ready and all(secret_usable(self.secrets, n) for n in self.policy.referenced_secrets)


class _Reject(Exception):
    """Answer the current request with a proxy-generated response."""

    def __init__(self, status: int, body: bytes, decision: str, *, close: bool = True) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.decision = decision
        self.close = close


class _ClientGone(Exception):
    """The client connection failed or timed out while we were reading its request body."""

    def __init__(self, why: str, *, malformed: bool = False, timed_out: bool = False) -> None:
        super().__init__(why)
        self.malformed = malformed
        self.timed_out = timed_out


def _bad() -> _Reject:
    return _Reject(400, MSG_BAD_REQUEST, "bad_request")


@dataclass(slots=True)
class _Head:
    method: bytes
    host_count: int = 0
    cl_count: int = 0
    te_values: list[bytes] = field(default_factory=list)
    host_value: bytes = b""
    cl_value: bytes | None = None
    conn_close: bool = False  # a Connection header mentions "close"


def _inspect_head(head: bytes) -> _Head:
    """Raw checks h11 does not do (see module docstring). ``head`` excludes the final CRLFCRLF."""
    lines = head.split(b"\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        raise _bad()
    for line in lines:
        # Bare CR/LF, NUL and other controls (HTAB allowed in values) anywhere in the head.
        if _CTL.search(line) is not None:
            raise _bad()
    request_line = lines[0]
    if not request_line.endswith((b" HTTP/1.1", b" HTTP/1.0")):
        raise _bad()
    method = request_line.split(b" ", 1)[0]
    info = _Head(method=method)
    for line in lines[1:]:
        if not line or line[0] in (0x20, 0x09):  # empty line inside head / obs-fold
            raise _Reject(400, MSG_BAD_REQUEST, "bad_request")
        name, sep, value = line.partition(b":")
        if not sep:
            raise _Reject(400, MSG_BAD_REQUEST, "bad_request")
        lname = name.lower()
        if lname == b"host":
            info.host_count += 1
            info.host_value = value.strip(b" \t")
        elif lname == b"content-length":
            info.cl_count += 1
            info.cl_value = value.strip(b" \t")
            if not _DIGITS.fullmatch(info.cl_value):
                raise _bad()
        elif lname == b"transfer-encoding":
            info.te_values.append(value.strip(b" \t").lower())
        elif lname == b"connection" and b"close" in value.lower():
            info.conn_close = True
    if info.host_count > 1 or info.cl_count > 1 or len(info.te_values) > 1:
        raise _Reject(400, MSG_BAD_REQUEST, "bad_request")
    if info.te_values and (info.cl_count or info.te_values[0] != b"chunked"):
        raise _Reject(400, MSG_BAD_REQUEST, "bad_request")
    return info


def _split_absolute(target: bytes) -> tuple[bytes, bytes, bytes] | None:
    """``http://a/b?c`` → (scheme, authority, origin-form target); None when not absolute-form."""
    lower = target[:8].lower()
    if lower.startswith(b"http://"):
        scheme, rest = b"http", target[7:]
    elif lower.startswith(b"https://"):
        scheme, rest = b"https", target[8:]
    else:
        return None
    end = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if i != -1 and i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    if not path.startswith(b"/"):
        path = b"/" + path
    return scheme, authority, path


def _response_bytes(status: int, body: bytes, *, close: bool, head_only: bool) -> bytes:
    lines = [
        b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
    ]
    if close:
        lines.append(b"Connection: close")
    out = b"\r\n".join(lines) + b"\r\n\r\n"
    return out if head_only else out + body


class _Conn:
    """State of one client connection (buffer of unparsed bytes carried between requests)."""

    __slots__ = ("app", "buf", "ctx", "fast", "first", "orig", "peer", "state", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, ctx: ConnectionContext, app: ProxyApp) -> None:
        self.stream = stream
        self.ctx = ctx
        self.app = app
        self.buf = b""
        self.state = CURRENT_CONNECTION.get()
        self.peer = ctx.peer
        self.orig = format_addr(ctx.orig_dst)
        self.first = True
        # Plain client connections are FastStreams: timeouts there are a timer only while actually
        # waiting, instead of an anyio cancel scope per operation (a large share of the CPU per request).
        self.fast = stream if isinstance(stream, FastStream) else None

    async def recv(self, seconds: float) -> bytes:
        """Receive up to ``_READ_SIZE`` bytes within ``seconds``: b"" at EOF, ``TimeoutError``."""
        fast = self.fast
        try:
            if fast is not None:
                return await fast.receive_within(_READ_SIZE, seconds)
            with anyio.fail_after(seconds):
                return await self.stream.receive(_READ_SIZE)
        except anyio.EndOfStream:
            return b""

    async def send(self, data: bytes, seconds: float) -> None:
        """Send ``data``; raises ``TimeoutError`` when the client does not drain it within ``seconds``."""
        fast = self.fast
        if fast is not None:
            await fast.send_within(data, seconds)
        else:
            with anyio.fail_after(seconds):
                await self.stream.send(data)

    async def read_head(self) -> bytes | None:
        """Return the raw request head (without the blank line) or None on clean close/drain.

        Raises ``_Reject`` (oversized head) and ``TimeoutError`` (header timeout).
        """
        app = self.app
        header_timeout = app.header_timeout
        if not self.buf:
            # Nothing buffered: the connection is idle (drain may close it) until a first byte arrives.
            if self.state is not None:
                self.state.idle = True
            if app.draining:
                return None
            if self.first:
                # First request: the header deadline runs from accept, including the first byte.
                t0 = time.monotonic()
                data = await self.recv(header_timeout)
                header_timeout = max(0.0, header_timeout - (time.monotonic() - t0))
            else:
                # Keep-alive: wait for the next request up to the idle timeout, then close quietly.
                try:
                    data = await self.recv(app.idle_timeout)
                except TimeoutError:
                    return None
            if not data:
                return None
            self.buf = data
        if self.state is not None:
            self.state.idle = False
        self.first = False
        # One deadline for the rest of the head (from its first byte), checked at every read.
        deadline = time.monotonic() + header_timeout
        start = 0
        while True:
            idx = self.buf.find(b"\r\n\r\n", start)
            if idx != -1:
                if idx > MAX_HEAD_BYTES:
                    raise _Reject(400, MSG_BAD_REQUEST, "bad_request")
                return self.buf[:idx]
            if len(self.buf) > MAX_HEAD_BYTES or _EARLY_BAD.search(self.buf) is not None:
                raise _Reject(400, MSG_BAD_REQUEST, "bad_request")
            start = max(0, len(self.buf) - 3)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            data = await self.recv(left)
            if not data:
                if self.buf.strip(b"\r\n"):
                    raise _Reject(400, MSG_BAD_REQUEST, "bad_request")
                return None
            self.buf += data

    async def send_generated(self, rej: _Reject, head_only: bool) -> None:
        with contextlib.suppress(TimeoutError):
            await self.send(
                _response_bytes(rej.status, rej.body, close=rej.close, head_only=head_only),
                self.app.idle_timeout,
            )


async def serve_connection(stream: anyio.abc.ByteStream, ctx: ConnectionContext, app: ProxyApp) -> None:
    """Serve HTTP/1.1 requests on ``stream`` until the client closes, an error forces a close, or the
    server drains. Never raises for client/upstream I/O problems; always closes ``stream``."""
    conn = _Conn(stream, ctx, app)
    try:
        while True:
            keep = await _serve_one(conn)
            if not keep or app.draining:
                break
    except _CLIENT_IO_ERRORS:
        pass
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0), contextlib.suppress(Exception):
            await stream.aclose()


@dataclass(slots=True)
class _Request:
    """What is known about the request being handled (for logging even when it is rejected)."""

    request_id: str
    t0: float
    method: str | None = None
    path: str | None = None
    host: str | None = None
    head_only: bool = False
    h: h11.Connection | None = None
    request: h11.Request | None = None
    decision: Decision | None = None
    upstream_target: bytes = b""
    up_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    # Framing and persistence as parsed (pre-check + h11): set by _prepare once per request.
    keep_alive: bool = False
    has_body: bool = False
    chunked: bool = False
    cl_value: bytes | None = None


def _prepare(conn: _Conn, head: bytes, req: _Request) -> None:
    """Parse and decide; raise ``_Reject`` for every proxy-generated answer (CONTRACT §3)."""
    app = conn.app
    ctx = conn.ctx
    info = _inspect_head(head)
    req.method = info.method[:32].decode("latin-1")  # logged; h11 validates the real one below
    req.head_only = info.method == b"HEAD"
    if info.method == b"CONNECT":
        raise _Reject(405, MSG_CONNECT, "denied_connect")
    if info.host_count == 0 or not info.host_value:
        raise _Reject(400, MSG_NO_HOST, "denied_no_host")
    h = req.h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES + 4)
    h.receive_data(conn.buf)
    conn.buf = b""
    try:
        event = h.next_event()
    except h11.RemoteProtocolError:
        raise _bad() from None
    if not isinstance(event, h11.Request):
        raise _bad()
    request = req.request = event
    target = request.target
    # HTTP/1.1 without "Connection: close" (h11 validated the version; the pre-check saw the headers).
    keep_alive = req.keep_alive = request.http_version == b"1.1" and not info.conn_close
    has_body = info.cl_count > 0 or bool(info.te_values)
    req.chunked = bool(info.te_values)  # the pre-check allows only exactly "chunked", never with CL
    req.cl_value = info.cl_value
    req.has_body = req.chunked or (info.cl_value is not None and info.cl_value != b"0")
    soft_close = has_body or not keep_alive  # a 403/500 keeps the connection only without a body

    # Authority: the Host header, cross-checked against an absolute-form URI.
    try:
        host, host_port = parse_authority(info.host_value.decode("latin-1"))
    except (InvalidHost, UnicodeDecodeError):
        raise _bad() from None
    req.host = host
    if target.startswith(b"/"):
        upstream_target = target
        explicit_port = host_port
    else:
        absolute = _split_absolute(target)
        if absolute is None:
            raise _bad()
        if ctx.listener == "https_interception":
            raise _Reject(400, MSG_ABSOLUTE, "bad_request")
        scheme, authority, upstream_target = absolute
        try:
            uri_host, uri_port = parse_authority(authority.decode("latin-1"))
        except (InvalidHost, UnicodeDecodeError):
            raise _bad() from None
        default = 80 if scheme == b"http" else 443
        if uri_host != host or (uri_port or default) != (host_port or default):
            raise _bad()
        explicit_port = uri_port
    qpos = upstream_target.find(b"?")
    req.path = (upstream_target if qpos == -1 else upstream_target[:qpos]).decode("latin-1")
    req.upstream_target = upstream_target

    # Port semantics (CONTRACT §2; README "Port semantics").
    if ctx.listener == "https_interception":
        if app.enforce_sni_host_match:
            try:
                sni = canonicalize_host(ctx.sni) if ctx.sni is not None else None
            except InvalidHost:
                sni = None
            if sni != host:
                app.metrics.https_interception_host_mismatch_total.inc()
                raise _Reject(400, MSG_SNI, "bad_request")
        if explicit_port is not None and explicit_port != 443:
            raise _Reject(403, MSG_PORT_443, "deny", close=soft_close)
        port = 443
    elif explicit_port is not None:
        port = explicit_port
    elif ctx.orig_dst is not None:
        port = 443 if ctx.orig_dst[1] == 80 else ctx.orig_dst[1]
    else:
        port = 443

    req.method = request.method.decode("ascii")  # a token, validated by h11
    decision = req.decision = app.policy.decide(host, port, req.method)
    if not decision.allowed:
        raise _Reject(403, MSG_DENIED, "deny", close=soft_close)
    try:
        req.up_headers, req.rewritten = upstream_request_headers(
            request.headers.raw_items(), decision, app.secrets
        )
    except SecretUnavailable:
        app.logger.warning("secret not available", request_id=req.request_id, rule=decision.rule)
        raise _Reject(500, MSG_SECRET, "allow", close=soft_close) from None


async def _serve_one(conn: _Conn) -> bool:
    """Handle one request; return True to keep the connection open for the next one."""
    app = conn.app
    try:
        head = await conn.read_head()
    except TimeoutError:
        app.metrics.connections_rejected_total.labels(reason="timeout").inc()
        app.logger.info("request header timeout", client=conn.peer, orig_dst=conn.orig)
        return False
    except _Reject as rej:
        await conn.send_generated(rej, head_only=False)
        _log_reject(conn, rej, _Request(_request_id(), time.perf_counter()))
        return False
    if head is None:
        return False

    req = _Request(_request_id(), time.perf_counter())
    try:
        _prepare(conn, head, req)
    except _Reject as rej:
        if app.draining:
            rej.close = True
        kept = False
        if not rej.close and req.h is not None and _drain_empty_body(req.h):
            conn.buf = req.h.trailing_data[0]
            kept = True
        else:
            rej.close = True
        await conn.send_generated(rej, head_only=req.head_only)
        _log_reject(conn, rej, req)
        return kept
    return await _forward(conn, req)


def _drain_empty_body(h: h11.Connection) -> bool:
    """For a request without body, consume its EndOfMessage so pipelined bytes can be carried over."""
    if h.their_state is h11.DONE:
        return True
    try:
        event = h.next_event()
    except h11.RemoteProtocolError:
        return False
    return isinstance(event, h11.EndOfMessage)


def _log_reject(conn: _Conn, rej: _Reject, req: _Request) -> None:
    duration = time.perf_counter() - req.t0
    decision = req.decision
    counted = decision is not None and rej.status == 500
    conn.app.metrics.request(
        decision.metric_host if counted and decision is not None else "_denied",
        rej.decision,
        duration if counted else None,
    )
    conn.app.logger.request(
        request_id=req.request_id,
        client=conn.peer,
        orig_dst=conn.orig,
        host=req.host,
        method=req.method,
        path=req.path,
        decision=rej.decision,
        rule=decision.rule if decision is not None else None,
        headers_rewritten=[],
        upstream_status=None,
        duration_ms=round(duration * 1000, 3),
    )


async def _client_body(conn: _Conn, h: h11.Connection) -> AsyncIterator[bytes]:
    """The client's request body, chunk by chunk as it arrives (never buffered whole)."""
    idle = conn.app.idle_timeout
    if h.they_are_waiting_for_100_continue:
        interim = h.send(h11.InformationalResponse(status_code=100, headers=[]))
        try:
            await conn.send(interim or b"", idle)
        except (TimeoutError, *_CLIENT_IO_ERRORS) as exc:
            raise _ClientGone(type(exc).__name__, timed_out=isinstance(exc, TimeoutError)) from exc
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as exc:
            raise _ClientGone("malformed request body", malformed=True) from exc
        if event is h11.NEED_DATA:
            try:
                data = await conn.recv(idle)
            except (TimeoutError, *_CLIENT_IO_ERRORS) as exc:
                raise _ClientGone(type(exc).__name__, timed_out=isinstance(exc, TimeoutError)) from exc
            h.receive_data(data)
        elif isinstance(event, h11.Data):
            yield bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return
        else:
            raise _ClientGone("client closed the connection mid-body")


async def _relay_response(conn: _Conn, req: _Request, response: UpstreamResponse) -> bool:
    """Send the upstream response to the client, streaming the body; True when keep-alive is possible."""
    h = req.h
    decision = req.decision
    if h is None or decision is None:  # pragma: no cover - _prepare always sets both
        return False
    idle = conn.app.idle_timeout
    down_headers = downstream_response_headers(response.headers, decision)
    if any(n.lower() == b"transfer-encoding" for n, _ in response.headers):
        # RFC 9112 6.3: Transfer-Encoding overrides Content-Length. An upstream that sends both has a
        # Content-Length that does not describe the (chunked) body we relay: never pass it on.
        down_headers = [(n, v) for n, v in down_headers if n.lower() != b"content-length"]
    request = req.request
    if request is None:  # pragma: no cover - _prepare always sets it
        return False
    status = response.status
    reason = getattr(response, "reason", b"")
    # Response framing towards the client (what h11 would choose; serialised here directly, the head
    # and body having been validated by the strict upstream parser): bodiless for HEAD/204/304,
    # else the upstream's Content-Length, else chunked for an HTTP/1.1 client, else close-delimited.
    keep = req.keep_alive and not conn.app.draining
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason if isinstance(reason, bytes) else b"")]
    length: int | None = None
    for name, value in down_headers:
        if len(name) == 14 and name.lower() == b"content-length":
            if _DIGITS.fullmatch(value) is None:
                raise UpstreamProtocolError("invalid Content-Length")
            length = int(value)
        parts += (name, b": ", value, b"\r\n")
    chunked = False
    if req.head_only or status in (204, 304):
        length = 0
    elif length is None:
        if request.http_version == b"1.1":
            chunked = True
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            keep = False  # an HTTP/1.0 client learns the end of the body from the close
    if not keep:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    out = b"".join(parts)
    sent = 0
    # Coalesce: body bytes that arrived with the head go out in the same write (and, for a complete
    # small response, the terminator too): one TLS record/syscall instead of three.
    take = getattr(response, "take_buffered", None)
    first = take() if take is not None else b""
    if first:
        sent = len(first)
        out += b"%x\r\n%b\r\n" % (sent, first) if chunked else first
    if not getattr(response, "complete", False):
        await conn.send(out, idle)
        out = b""
        async for chunk in response.aiter_stream():
            if chunk:
                sent += len(chunk)
                await conn.send(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk, idle)
    if length is not None and sent != (0 if req.head_only else length) and status not in (204, 304):
        raise UpstreamProtocolError("response body length differs from its Content-Length")
    if chunked:
        out += b"0\r\n\r\n"
    if out:
        await conn.send(out, idle)
    # A bodiless request is complete once its head is parsed (h11's zero-length body reader consumes
    # nothing, so trailing_data is exactly the pipelined bytes); a body must have been read to its end.
    if keep and (not req.has_body or h.their_state is h11.DONE):
        conn.buf = h.trailing_data[0]
        return True
    return False


def _upstream_framing(req: _Request) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Headers for upstream with framing exactly as parsed from the client; and whether a body follows."""
    headers = [(n, v) for (n, v) in req.up_headers if n.lower() not in _FRAMING]
    if req.chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
    elif req.cl_value is not None:
        headers.append((b"Content-Length", req.cl_value))
    return headers, req.has_body


async def _forward(conn: _Conn, req: _Request) -> bool:
    """Forward an allowed request upstream over TLS and relay the response."""
    app = conn.app
    metrics = app.metrics
    h = req.h
    request = req.request
    decision = req.decision
    if h is None or request is None or decision is None:  # pragma: no cover - set by _prepare
        return False
    mhost = decision.metric_host
    headers, has_body = _upstream_framing(req)
    upstream_status: int | None = None
    problem: str | None = None
    verdict = "allow"
    response: UpstreamResponse | None = None
    keep = False
    try:
        response = await app.upstream.send(
            request.method,
            host=decision.host,
            port=decision.port,
            target=req.upstream_target,
            headers=headers,
            body=_client_body(conn, h) if has_body else None,
        )
        upstream_status = response.status
        if upstream_status >= 500:
            metrics.upstream_error(mhost, str(upstream_status))
        if req.rewritten:
            metrics.header_rewrite(mhost)
        keep = await _relay_response(conn, req, response)
    except _ClientGone as exc:
        problem = f"client: {exc}"
        if exc.timed_out:  # a stalled request body is cut off like a slowloris head, and counted
            metrics.connections_rejected_total.labels(reason="timeout").inc()
        if exc.malformed:
            verdict = "bad_request"  # counted and logged like a malformed head (CONTRACT §5)
            if upstream_status is None:
                await conn.send_generated(_bad(), head_only=req.head_only)
    except _TIMEOUT_ERRORS:
        problem = "upstream timeout"
        metrics.upstream_error(mhost, "timeout")
        if upstream_status is None:
            await conn.send_generated(_Reject(504, MSG_TIMEOUT, "allow"), head_only=req.head_only)
    except TimeoutError:
        # Only the client-side sends raise TimeoutError (upstream timeouts are
        # UpstreamTimeout). Must precede _CONN_ERRORS: TimeoutError is an OSError subclass.
        problem = "client send timeout"
        metrics.connections_rejected_total.labels(reason="timeout").inc()  # a client that stopped reading
    except (*_CONN_ERRORS, h11.LocalProtocolError) as exc:
        # An upstream we cannot reach/verify, a broken connection, or a response we cannot relay
        # faithfully (body length differing from its Content-Length, 101 upgrade): fail closed.
        problem = f"upstream connection failed: {type(exc).__name__}"
        metrics.upstream_error(mhost, "connection_error")
        if upstream_status is None:
            await conn.send_generated(_Reject(502, MSG_BAD_GATEWAY, "allow"), head_only=req.head_only)
    finally:
        if response is not None:
            # Never suspends (the pool's close is synchronous), so no shielded scope is needed.
            with contextlib.suppress(Exception):
                await response.aclose()
        duration = time.perf_counter() - req.t0
        metrics.request(mhost if verdict == "allow" else "_denied", verdict, duration)
        app.logger.request(
            request_id=req.request_id,
            client=conn.peer,
            orig_dst=conn.orig,
            host=decision.host,
            method=req.method,
            path=req.path,
            decision=verdict,
            rule=decision.rule,
            headers_rewritten=req.rewritten,
            upstream_status=upstream_status,
            duration_ms=round(duration * 1000, 3),
        )
        if problem is not None:
            app.logger.warning("request failed", request_id=req.request_id, reason=problem)
    return keep and problem is None
