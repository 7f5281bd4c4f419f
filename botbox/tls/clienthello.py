"""Sans-I/O parser for the first TLS ClientHello of a connection.

The interception listener needs the SNI *before* it answers the ClientHello: the policy decides whether a
certificate may be issued at all (SECURITY-SPEC T3, T6) and issuance is asynchronous (a worker thread,
single-flight).  ``ssl.SSLContext.sni_callback`` is synchronous, so instead the listener reads the
ClientHello off the socket, parses it here, awaits the certificate, and then feeds the *same bytes* into
an ``ssl.MemoryBIO`` handshake.  OpenSSL re-parses exactly those bytes, and a ``sni_callback`` on the
per-host context checks that OpenSSL saw the same name (defence in depth against parser differentials).

The parser is strict and total: for any ``bytes`` input it returns a :class:`ClientHello`, returns
``None`` ("need more bytes"), or raises :class:`ClientHelloError`.  It never raises anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MAX_CLIENT_HELLO",
    "ClientHello",
    "ClientHelloBuffer",
    "ClientHelloError",
    "NotTLSError",
    "parse_client_hello",
]

#: Upper bound for the buffered ClientHello (all records).  Real ClientHellos are < 2 KiB (a few KiB
#: with post-quantum key shares and PSKs); anything larger is refused instead of buffered.
MAX_CLIENT_HELLO = 64 * 1024

_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_NAME_TYPE_HOST = 0
_MAX_RECORD = 2**14


class ClientHelloError(ValueError):
    """The bytes are not a well-formed TLS ClientHello."""


class NotTLSError(ClientHelloError):
    """The first byte is not a TLS handshake record (e.g. plaintext HTTP sent to the TLS port)."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    #: raw ``host_name`` from the server_name extension (ASCII-decoded), ``None`` when absent
    server_name: str | None
    #: ALPN protocol names offered, ``None`` when the extension is absent
    alpn_protocols: tuple[bytes, ...] | None
    #: legacy_version field of the ClientHello body (0x0303 for TLS 1.2 and 1.3)
    legacy_version: int
    #: number of bytes of the input consumed by the records carrying the ClientHello
    consumed: int


class _Reader:
    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes | memoryview, start: int = 0, end: int | None = None) -> None:
        self._data = data
        self._pos = start
        self._end = len(data) if end is None else end

    def remaining(self) -> int:
        return self._end - self._pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self._pos + n > self._end:
            raise ClientHelloError(f"truncated {what}")
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, len_size: int, what: str) -> _Reader:
        n = self.uint(len_size, f"{what} length")
        if self._pos + n > self._end:
            raise ClientHelloError(f"truncated {what}")
        sub = _Reader(self._data, self._pos, self._pos + n)
        self._pos += n
        return sub


class ClientHelloBuffer:
    """Incremental reassembly: each :meth:`feed` costs O(len(new bytes)), never a re-parse of the buffer.

    A client trickling its ClientHello one byte per TCP segment must not make the proxy do quadratic
    work within the handshake timeout.
    """

    __slots__ = ("_need", "_payload", "_pos", "raw")

    def __init__(self) -> None:
        self.raw = bytearray()  # every byte received so far (handed to OpenSSL afterwards)
        self._payload = bytearray()  # handshake-layer bytes reassembled from complete records
        self._pos = 0  # offset in ``raw`` of the next record header
        self._need: int | None = None  # total handshake message length once known

    @staticmethod
    def _check_header(payload: bytes | bytearray) -> int | None:
        """Total ClientHello length from the handshake header, once 4 bytes of it are known."""
        if len(payload) < 4:
            return None
        if payload[0] != _HANDSHAKE_CLIENT_HELLO:
            raise ClientHelloError("first handshake message is not a ClientHello")
        need = 4 + int.from_bytes(payload[1:4], "big")
        if need > MAX_CLIENT_HELLO:
            raise ClientHelloError("ClientHello too large")
        return need

    def feed(self, data: bytes) -> ClientHello | None:
        """Add bytes; return the parsed ClientHello once complete, else None.  Raises ClientHelloError."""
        if not self.raw and data and data[0] != _CONTENT_HANDSHAKE:
            raise NotTLSError("not a TLS handshake record")
        self.raw += data
        raw = self.raw
        while len(raw) - self._pos >= 5:
            pos = self._pos
            if raw[pos] != _CONTENT_HANDSHAKE:
                raise ClientHelloError("non-handshake record before ClientHello completed")
            if raw[pos + 1] != 3:
                raise ClientHelloError("unsupported record version")
            length = int.from_bytes(raw[pos + 3 : pos + 5], "big")
            if length == 0 or length > _MAX_RECORD:
                raise ClientHelloError("invalid record length")
            if pos + 5 + length > MAX_CLIENT_HELLO:
                raise ClientHelloError("ClientHello too large")
            if len(raw) - pos - 5 < length:
                if self._need is None:  # refuse a bogus/oversize ClientHello before buffering it all
                    self._check_header(self._payload[:4] + raw[pos + 5 : pos + 9])
                break
            self._payload += raw[pos + 5 : pos + 5 + length]
            self._pos = pos + 5 + length
            payload = self._payload
            if self._need is None:
                self._need = self._check_header(payload)
            if self._need is not None and len(payload) >= self._need:
                if len(payload) > self._need:
                    # A second handshake message in the same flight before ServerHello is a protocol error.
                    raise ClientHelloError("unexpected data after ClientHello")
                return _parse_body(bytes(payload), self._pos)
        if len(raw) > MAX_CLIENT_HELLO:
            raise ClientHelloError("ClientHello too large")
        return None


def _parse_server_name(ext: _Reader) -> str:
    names = ext.vector(2, "server_name_list")
    if ext.remaining():
        raise ClientHelloError("trailing bytes in server_name extension")
    if not names.remaining():
        raise ClientHelloError("empty server_name_list")
    host: str | None = None
    while names.remaining():
        name_type = names.uint(1, "server name type")
        value = names.vector(2, "server name")
        raw = value.take(value.remaining(), "server name")
        if name_type != _NAME_TYPE_HOST:
            continue  # RFC 6066: unknown name types are ignored
        if host is not None:
            raise ClientHelloError("more than one host_name in server_name extension")
        if not raw:
            raise ClientHelloError("empty host_name")
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ClientHelloError("host_name is not ASCII") from None
    if host is None:
        raise ClientHelloError("server_name extension without host_name")
    return host


def _parse_alpn(ext: _Reader) -> tuple[bytes, ...]:
    lst = ext.vector(2, "protocol_name_list")
    if ext.remaining():
        raise ClientHelloError("trailing bytes in ALPN extension")
    out: list[bytes] = []
    while lst.remaining():
        name = lst.vector(1, "protocol name")
        if not name.remaining():
            raise ClientHelloError("empty ALPN protocol name")
        out.append(name.take(name.remaining(), "protocol name"))
    if not out:
        raise ClientHelloError("empty ALPN protocol list")
    return tuple(out)


def _parse_body(msg: bytes, consumed: int) -> ClientHello:
    r = _Reader(msg, 4)
    legacy_version = r.uint(2, "client version")
    if legacy_version >> 8 != 3:
        raise ClientHelloError("unsupported client version")
    r.take(32, "random")
    session_id = r.vector(1, "session id")
    if session_id.remaining() > 32:
        raise ClientHelloError("session id too long")
    suites = r.vector(2, "cipher suites")
    if suites.remaining() == 0 or suites.remaining() % 2:
        raise ClientHelloError("invalid cipher suites")
    compression = r.vector(1, "compression methods")
    if compression.remaining() == 0:
        raise ClientHelloError("invalid compression methods")
    server_name: str | None = None
    alpn: tuple[bytes, ...] | None = None
    if r.remaining():
        exts = r.vector(2, "extensions")
        if r.remaining():
            raise ClientHelloError("trailing bytes after extensions")
        seen: set[int] = set()
        while exts.remaining():
            ext_type = exts.uint(2, "extension type")
            body = exts.vector(2, "extension")
            if ext_type in seen:
                raise ClientHelloError("duplicate extension")
            seen.add(ext_type)
            if ext_type == _EXT_SERVER_NAME:
                server_name = _parse_server_name(body)
            elif ext_type == _EXT_ALPN:
                alpn = _parse_alpn(body)
    return ClientHello(
        server_name=server_name, alpn_protocols=alpn, legacy_version=legacy_version, consumed=consumed
    )


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Parse the ClientHello at the start of ``data``.

    Returns ``None`` when ``data`` is a valid prefix that needs more bytes, raises
    :class:`NotTLSError` when the stream does not start with a TLS handshake record, and
    :class:`ClientHelloError` for every other malformation (including duplicate extensions,
    several host names, oversize messages and non-ASCII names).
    """
    return ClientHelloBuffer().feed(data)
