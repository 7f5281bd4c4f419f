"""botbox/fastio.py: the native-transport client stream keeps anyio's stream contract, bounds what it
buffers from a fast client, and its timeouts fire only when a wait really stalls."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable

import anyio
import pytest

from botbox.fastio import READ_HIGH_WATER, FastStream
from tests.support.proxy import RunningProxy, get, read_response
from tests.support.upstream import TLSUpstream


def _run(fn: Callable[[], Awaitable[None]], uvloop: bool) -> None:
    anyio.run(fn, backend="asyncio", backend_options={"use_uvloop": uvloop})


async def _pair() -> tuple[FastStream, socket.socket]:
    """A FastStream on an accepted loopback connection, and the (blocking) client socket."""
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.setblocking(False)
    client = socket.socket()
    try:
        client.connect(lsock.getsockname())
        conn, remote = await loop.sock_accept(lsock)
    finally:
        lsock.close()
    stream = await FastStream.from_accepted(conn, remote)
    return stream, client


@pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_contract_eof_timeout_close_and_attributes(uvloop: bool) -> None:
    async def main() -> None:
        stream, client = await _pair()
        with client:
            remote = stream.extra(anyio.abc.SocketAttribute.remote_address)  # noqa: S610 - anyio
            assert remote == client.getsockname()
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610 - anyio
            assert raw.family == socket.AF_INET
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await stream.receive_within(100, 0.2)
            assert time.monotonic() - t0 >= 0.15
            client.sendall(b"hello")
            assert await stream.receive_within(3, 5) == b"hel"  # max_bytes honoured, rest kept
            assert await stream.receive(100) == b"lo"
            await stream.send_within(b"pong", 1.0)
            assert client.recv(10) == b"pong"
            client.shutdown(socket.SHUT_WR)  # half-close: we can still answer
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()
            await stream.send(b"after-eof")
            assert client.recv(20) == b"after-eof"
            await stream.aclose()
            with pytest.raises(anyio.ClosedResourceError):
                await stream.receive()
            with pytest.raises(anyio.ClosedResourceError):
                await stream.send(b"x")
            await asyncio.sleep(0.05)  # the transport closes on the next loop iteration
            client.settimeout(5)
            assert client.recv(10) == b""

    _run(main, uvloop)


@pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_fast_client_is_paused_not_buffered(uvloop: bool) -> None:
    """A client sending faster than the proxy reads fills kernel buffers, not the proxy's memory."""
    total = 8 * 1024 * 1024
    payload = bytes(range(256)) * (total // 256)

    async def main() -> None:
        stream, client = await _pair()
        with client:
            client.setblocking(False)
            sent = 0
            stalled_since = None
            deadline = time.monotonic() + 5
            while sent < total and time.monotonic() < deadline:
                try:
                    sent += client.send(payload[sent:sent + 65536])
                    stalled_since = None
                except BlockingIOError:
                    now = time.monotonic()
                    stalled_since = stalled_since or now
                    if now - stalled_since > 0.3:
                        break  # pushed back: kernel buffers full, the stream stopped reading
                    await asyncio.sleep(0.01)  # let the loop read until it pauses
            buffered = len(stream._p.buf)
            assert stream._p.reading_paused
            assert buffered <= READ_HIGH_WATER + 256 * 1024, buffered
            assert sent < total, "the client could push everything: nothing pushed back"
            got = bytearray()
            while len(got) < sent:
                got += await stream.receive_within(65536, 5)
                if sent < total:
                    with contextlib.suppress(BlockingIOError):
                        sent += client.send(payload[sent:sent + 65536])
            assert bytes(got[:sent]) == payload[:sent]
            await stream.aclose()

    _run(main, uvloop)


@pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_send_within_times_out_on_a_client_that_does_not_read(uvloop: bool) -> None:
    async def main() -> None:
        stream, client = await _pair()
        with client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            chunk = b"x" * (1024 * 1024)
            with pytest.raises(TimeoutError):
                for _ in range(64):
                    await stream.send_within(chunk, 0.3)
            stream.abort()

    _run(main, uvloop)


def test_half_closed_client_still_gets_its_response(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    """A client that shuts down its sending side after the request (``curl``-less scripts, ``nc -q``)
    must still receive the response."""
    with proxy.connect() as s:
        s.sendall(get(f"127.0.0.1:{upstream.port}", "/half", headers=[("Connection", "close")]))
        s.shutdown(socket.SHUT_WR)
        r = read_response(s)
    assert r.status == 200
    assert upstream.last().target == "/half"
