"""TLSServerStream: the MemoryBIO TLS server stream under real OpenSSL clients over a socketpair."""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import pytest
from anyio.streams.tls import TLSAttribute

from botbox.tls.ca import CertificateAuthority, generate_ca, load_ca, write_ca
from botbox.tls.issuer import IssuedLeaf, LeafIssuer
from botbox.tls.stream import TLSHandshakeError, TLSServerStream

pytestmark = pytest.mark.timeout(30)  # a deadlock must fail fast, not eat the CI budget


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertificateAuthority, IssuedLeaf, Path]:
    crt, key = write_ca(tmp_path_factory.mktemp("ca") / "ca", *generate_ca("Stream CA", days=60))
    ca = load_ca(crt, key, env={})
    return ca, LeafIssuer(ca, 3600).issue("stream.example"), crt


def _client_ctx(crt: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(crt))
    ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return ctx


async def _serve(pki: Any, client: Callable[[socket.socket], Any],
                 server: Callable[[TLSServerStream], Any]) -> tuple[Any, Any]:
    _, leaf, _ = pki
    a, b = socket.socketpair()
    transport = await anyio.abc.SocketStream.from_socket(a)
    out: dict[str, Any] = {}

    async def run_client() -> None:
        try:
            out["client"] = await anyio.to_thread.run_sync(client, b)
        finally:
            b.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_client)
        tls = await TLSServerStream.handshake(transport, leaf.context, b"")
        try:
            out["server"] = await server(tls)
        finally:
            await tls.aclose()
    return out["client"], out["server"]


def test_echo_large_payload_both_ways_and_attributes(pki: Any) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB

    def client(sock: socket.socket) -> str:
        with _client_ctx(pki[2]).wrap_socket(sock, server_hostname="stream.example",
                                             suppress_ragged_eofs=False) as tls:
            tls.sendall(payload)
            tls.unwrap()  # close_notify: the server sees EndOfStream
            return "done"

    async def server(tls: TLSServerStream) -> tuple[str, str | None, str]:
        assert tls.extra(TLSAttribute.server_side) is True  # noqa: S610 - anyio, not Django
        h = hashlib.sha256()
        n = 0
        while True:
            try:
                chunk = await tls.receive()
            except anyio.EndOfStream:
                break
            h.update(chunk)
            n += len(chunk)
        assert n == len(payload)
        alpn = tls.extra(TLSAttribute.alpn_protocol)  # noqa: S610 - anyio, not Django
        return h.hexdigest(), alpn, tls.extra(TLSAttribute.tls_version)  # noqa: S610

    c, (digest, alpn, version) = anyio.run(_serve, pki, client, server)
    assert c == "done" and digest == hashlib.sha256(payload).hexdigest()
    assert alpn is None and version in ("TLSv1.3", "TLSv1.2")


def test_concurrent_send_and_receive(pki: Any) -> None:
    """The pipeline may read the client while streaming a response; records must never interleave."""
    down = b"d" * (1 << 20)

    def client(sock: socket.socket) -> int:
        with _client_ctx(pki[2]).wrap_socket(sock, server_hostname="stream.example") as tls:
            tls.sendall(b"u" * (1 << 20))
            got = 0
            while got < len(down):
                chunk = tls.recv(65536)
                if not chunk:
                    break
                got += len(chunk)
            return got

    async def server(tls: TLSServerStream) -> int:
        received = 0

        async def reader() -> None:
            nonlocal received
            while received < (1 << 20):
                received += len(await tls.receive())

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            for i in range(0, len(down), 16384):
                await tls.send(down[i : i + 16384])
        return received

    got, received = anyio.run(_serve, pki, client, server)
    assert got == len(down) and received == 1 << 20


def test_ragged_client_eof_is_end_of_stream(pki: Any) -> None:
    def client(sock: socket.socket) -> str:
        tls = _client_ctx(pki[2]).wrap_socket(sock, server_hostname="stream.example")
        tls.sendall(b"hello")
        assert tls.recv(2) == b"ok"  # also drains the session tickets, so closing sends FIN, not RST
        tls.shutdown(socket.SHUT_RDWR)  # TCP FIN without close_notify (SSLSocket.shutdown skips it)
        tls.close()
        return "gone"

    async def server(tls: TLSServerStream) -> bytes:
        data = await tls.receive()
        await tls.send(b"ok")
        with pytest.raises(anyio.EndOfStream):
            await tls.receive()
        with pytest.raises(anyio.EndOfStream):  # stays at EOF
            await tls.receive()
        return data

    assert anyio.run(_serve, pki, client, server) == ("gone", b"hello")


def test_closed_stream_refuses_io(pki: Any) -> None:
    def client(sock: socket.socket) -> None:
        with _client_ctx(pki[2]).wrap_socket(sock, server_hostname="stream.example") as tls:
            tls.recv(1)

    async def server(tls: TLSServerStream) -> None:
        await tls.aclose()
        await tls.aclose()  # idempotent
        with pytest.raises(anyio.ClosedResourceError):
            await tls.send(b"x")
        with pytest.raises(anyio.ClosedResourceError):
            await tls.receive()

    anyio.run(_serve, pki, client, server)


def test_handshake_error_when_client_distrusts_the_certificate(pki: Any) -> None:
    _, leaf, _ = pki

    async def main() -> str:
        a, b = socket.socketpair()
        transport = await anyio.abc.SocketStream.from_socket(a)

        def client() -> str:
            try:
                ssl.create_default_context().wrap_socket(b, server_hostname="stream.example")
            except ssl.SSLCertVerificationError:
                return "rejected"
            finally:
                b.close()
            return "accepted?!"

        async with anyio.create_task_group() as tg:
            res: list[str] = []

            async def run_client() -> None:
                res.append(await anyio.to_thread.run_sync(client))

            tg.start_soon(run_client)
            with pytest.raises(TLSHandshakeError):
                await TLSServerStream.handshake(transport, leaf.context, b"")
            await transport.aclose()
        return res[0]

    assert anyio.run(main) == "rejected"
