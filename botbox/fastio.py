"""A lean anyio ``ByteStream`` over a native asyncio (uvloop) transport for accepted client sockets.

anyio's own asyncio ``SocketStream`` pauses and resumes reading around every ``receive`` (two
``epoll_ctl`` calls), adds a scheduling checkpoint to every ``send`` and looks up the current task
(a ``getpid()`` syscall on CPython 3.11) several times per call; on the proxy's hot path that was a
large share of the CPU per request. This stream keeps anyio's contract (``receive`` raises
``EndOfStream`` at EOF, ``BrokenResourceError`` when the connection broke, ``ClosedResourceError``
after ``aclose``; cancellation by anyio scopes works because every wait is a plain future) and the
same socket attributes (``remote_address``, ``local_address``, ``raw_socket``, ``family``), so the
pipeline and the TLS interception layer use it unchanged.

Flow control: ``send`` waits while the transport's write buffer is above its high-water mark
(``pause_writing``); reading is paused while more than ``READ_HIGH_WATER`` received bytes are waiting
for ``receive`` (a client cannot make the proxy buffer an unbounded request body).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

__all__ = ["READ_HIGH_WATER", "READ_LOW_WATER", "BufferedProtocol", "FastStream"]


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())

READ_HIGH_WATER = 256 * 1024
READ_LOW_WATER = 64 * 1024


class BufferedProtocol(asyncio.Protocol):
    """Buffers received bytes and wakes one waiting reader; flow control in both directions (reading is
    paused above ``READ_HIGH_WATER`` buffered bytes, writers wait while the transport asks to pause);
    tracks EOF and connection loss. Shared by accepted client sockets and upstream connections.
    ``HALF_CLOSE`` says whether a peer's EOF keeps our sending side open."""

    HALF_CLOSE = True
    __slots__ = ("buf", "drainer", "eof", "exc", "lost", "reader", "reading_paused", "transport",
                 "write_paused")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.lost = False
        self.exc: BaseException | None = None
        self.reader: asyncio.Future[None] | None = None
        self.drainer: asyncio.Future[None] | None = None
        self.write_paused = False
        self.reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > READ_HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True
        reader = self.reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return self.HALF_CLOSE  # True: half-close, the response may still be written

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = True
        self.exc = exc
        self.write_paused = False
        self._wake()
        drainer = self.drainer
        if drainer is not None and not drainer.done():
            drainer.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        drainer = self.drainer
        if drainer is not None and not drainer.done():
            drainer.set_result(None)

    def _wake(self) -> None:
        reader = self.reader
        if reader is not None and not reader.done():
            reader.set_result(None)


class FastStream(anyio.abc.SocketStream):
    """An accepted TCP connection as an anyio byte stream (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                 protocol: BufferedProtocol, sock: socket.socket, remote: Any) -> None:
        self._loop = loop
        self._transport = transport
        self._p = protocol
        self._sock = sock
        self._remote = remote
        self._closed = False

    @classmethod
    async def from_accepted(cls, sock: socket.socket, remote: Any) -> FastStream:
        """Wrap an accepted socket (ownership passes to the stream)."""
        loop = asyncio.get_running_loop()
        protocol = BufferedProtocol()
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
        except BaseException:
            sock.close()
            raise
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(remote, tuple):
            remote = (str(remote[0]), int(remote[1]))  # IPv6: drop flowinfo/scope like anyio
        return cls(loop, transport, protocol, sock, remote)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        p = self._p
        if not p.buf and not p.eof and not self._closed:
            fut = self._loop.create_future()
            p.reader = fut
            try:
                await fut
            finally:
                p.reader = None
        return self._take(max_bytes)

    async def receive_within(self, max_bytes: int, seconds: float) -> bytes:
        """``receive`` bounded by ``seconds`` (raises ``TimeoutError``) without a cancel scope: the
        timer exists only while actually waiting."""
        p = self._p
        if not p.buf and not p.eof and not self._closed:
            loop = self._loop
            fut = loop.create_future()
            p.reader = fut
            timer = loop.call_later(seconds, _expire, fut)
            try:
                await fut
            finally:
                p.reader = None
                timer.cancel()
        return self._take(max_bytes)

    def _take(self, max_bytes: int) -> bytes:
        p = self._p
        buf = p.buf
        if not buf:
            if self._closed:
                raise anyio.ClosedResourceError
            if p.exc is not None:
                raise anyio.BrokenResourceError from p.exc
            raise anyio.EndOfStream
        if len(buf) <= max_bytes:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:max_bytes])
            del buf[:max_bytes]
        if p.reading_paused and len(buf) < READ_LOW_WATER and not p.lost:
            p.reading_paused = False
            self._transport.resume_reading()
        return data

    async def send(self, item: bytes) -> None:
        await self.send_within(item, None)

    async def send_within(self, item: bytes, seconds: float | None) -> None:
        """``send``; waiting for the peer to drain the write buffer is bounded by ``seconds`` (raises
        ``TimeoutError``). No timer at all unless the buffer is above its high-water mark."""
        if self._closed:
            raise anyio.ClosedResourceError
        p = self._p
        if p.lost or self._transport.is_closing():
            raise anyio.BrokenResourceError from p.exc
        self._transport.write(item)
        if p.write_paused:
            loop = self._loop
            fut = loop.create_future()
            p.drainer = fut
            timer = loop.call_later(seconds, _expire, fut) if seconds is not None else None
            try:
                await fut
            finally:
                p.drainer = None
                if timer is not None:
                    timer.cancel()
            if p.lost:
                raise anyio.BrokenResourceError from p.exc

    async def send_eof(self) -> None:
        if not self._transport.is_closing() and self._transport.can_write_eof():
            self._transport.write_eof()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._transport.close()  # flushes what is buffered, then closes
            self._p._wake()

    def abort(self) -> None:
        self._closed = True
        self._transport.abort()

    @property
    def _raw_socket(self) -> socket.socket:
        return self._sock

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        sock = self._sock
        remote = self._remote

        def local() -> Any:
            name = self._transport.get_extra_info("sockname")
            return (str(name[0]), int(name[1])) if isinstance(name, tuple) else name

        attrs: dict[Any, Callable[[], Any]] = {
            SocketAttribute.family: lambda: sock.family,
            SocketAttribute.local_address: local,
            SocketAttribute.remote_address: lambda: remote,
            SocketAttribute.raw_socket: lambda: sock,
            SocketAttribute.local_port: lambda: local()[1],
        }
        if isinstance(remote, tuple):
            attrs[SocketAttribute.remote_port] = lambda: remote[1]
        return attrs
