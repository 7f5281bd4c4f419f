"""A server-side TLS byte stream driven over ``ssl.MemoryBIO`` on top of an anyio byte stream.

Why not ``anyio.streams.tls.TLSStream``: the listener has already read the ClientHello off the socket
(to learn the SNI and await the certificate before answering), so those bytes must be fed to OpenSSL
first; and on close we want to *send* ``close_notify`` without waiting (possibly forever) for the peer's.

Properties:
* ``receive`` raises ``EndOfStream`` on ``close_notify`` and on a TCP FIN without it (clients often skip
  ``close_notify``; HTTP/1.1 framing, checked by h11, detects truncated requests);
* ``receive`` never writes to the transport (so a reader is never stuck behind a writer waiting for
  the peer); sends are serialised with a lock and each flush drains every pending record, including
  those the read path produced (TLS 1.3 KeyUpdate answers);
* renegotiation is disabled on the context, so ``send`` never has to read;
* ``aclose`` sends ``close_notify`` best-effort (bounded by a short timeout) and closes the transport.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream
from anyio.abc import ByteStream
from anyio.streams.tls import TLSAttribute

__all__ = ["TLSHandshakeError", "TLSServerStream"]

_CLOSE_NOTIFY_TIMEOUT = 1.0


class TLSHandshakeError(Exception):
    """The TLS handshake failed (protocol error, peer alert, or the peer went away)."""


class TLSServerStream(ByteStream):
    def __init__(self, transport: ByteStream, ssl_object: ssl.SSLObject, inbio: ssl.MemoryBIO,
                 outbio: ssl.MemoryBIO) -> None:
        self.transport = transport
        self._ssl = ssl_object
        self._in = inbio
        self._out = outbio
        self._send_lock = anyio.Lock()
        self._eof = False
        self._closed = False
        self._broken = False

    @classmethod
    async def handshake(
        cls, transport: ByteStream, context: ssl.SSLContext, initial: bytes
    ) -> TLSServerStream:
        """Run the server handshake, feeding ``initial`` (the already-read ClientHello bytes) first.

        Raises :class:`TLSHandshakeError` on any TLS or transport failure.
        """
        inbio, outbio = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(inbio, outbio, server_side=True)
        inbio.write(initial)
        self = cls(transport, obj, inbio, outbio)
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush_or_fail()
                try:
                    data = await transport.receive()
                except (EndOfStream, BrokenResourceError, ClosedResourceError, OSError):
                    raise TLSHandshakeError("peer closed the connection during the TLS handshake") from None
                inbio.write(data)
            except ssl.SSLWantWriteError:  # pragma: no cover - a MemoryBIO never fills up
                await self._flush_or_fail()
            except ssl.SSLError as exc:
                # Send our alert (if OpenSSL produced one) so the client sees why.
                await self._flush_quietly()
                raise TLSHandshakeError(f"TLS handshake failed: {exc.reason or type(exc).__name__}") from None
        await self._flush_or_fail()
        return self

    async def _flush_or_fail(self) -> None:
        try:
            await self._flush()
        except (BrokenResourceError, ClosedResourceError, OSError):
            raise TLSHandshakeError("peer closed the connection during the TLS handshake") from None

    async def _flush_quietly(self) -> None:
        try:
            with anyio.move_on_after(_CLOSE_NOTIFY_TIMEOUT):
                await self._flush()
        except Exception:  # noqa: S110 - best effort only (peer already gone)
            pass

    async def _flush(self) -> None:
        """Send every pending TLS record (also records a concurrent ``receive`` produced meanwhile)."""
        if not self._out.pending:
            return
        async with self._send_lock:
            while self._out.pending:
                data = self._out.read()
                try:
                    await self.transport.send(data)
                except BaseException:
                    self._broken = True
                    raise

    # ByteStream API -----------------------------------------------------------------------------
    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._closed:
            raise ClosedResourceError
        while True:
            if self._eof:
                raise EndOfStream
            try:
                data = self._ssl.read(max_bytes)
            except ssl.SSLWantReadError:
                # Never flush here: a receive blocked behind a send that waits for the peer to read
                # (while the peer waits for us to read) would deadlock.  Records the read path produces
                # (TLS 1.3 KeyUpdate answers) go out with the next send or at close.
                try:
                    chunk = await self.transport.receive()
                except EndOfStream:
                    self._eof = True
                    raise
                except OSError as exc:
                    self._broken = True
                    raise BrokenResourceError from exc
                self._in.write(chunk)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True
                raise EndOfStream from None
            except ssl.SSLError as exc:
                self._broken = True
                raise BrokenResourceError from exc
            if not data:
                self._eof = True
                raise EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        if self._closed:
            raise ClosedResourceError
        if self._broken:
            raise BrokenResourceError
        view = memoryview(item)
        try:
            while view:
                n = self._ssl.write(view)
                view = view[n:]
        except ssl.SSLError as exc:
            self._broken = True
            raise BrokenResourceError from exc
        await self._flush()

    async def send_eof(self) -> None:
        raise NotImplementedError("half-close is not supported on intercepted TLS connections")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._broken:
            # WantRead after queueing our close_notify: we do not wait for the peer's.
            with contextlib.suppress(ssl.SSLError):
                self._ssl.unwrap()
            with anyio.CancelScope(shield=True):
                await self._flush_quietly()
        await self.transport.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        obj = self._ssl
        return {
            **self.transport.extra_attributes,
            TLSAttribute.alpn_protocol: obj.selected_alpn_protocol,
            TLSAttribute.cipher: obj.cipher,
            TLSAttribute.server_side: lambda: True,
            TLSAttribute.shared_ciphers: obj.shared_ciphers,
            TLSAttribute.ssl_object: lambda: obj,
            TLSAttribute.standard_compatible: lambda: False,
            TLSAttribute.tls_version: obj.version,
        }
