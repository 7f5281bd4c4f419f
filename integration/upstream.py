"""The fake internet: TLS upstreams plus catch-all TCP/UDP/ICMP listeners that record every hit.

Run inside the *internet* namespace as ``python -m integration.upstream SPEC.json``. The spec names the
certificate (issued by a throwaway trustme CA), the addresses to serve and the ports to watch. Every
accepted TCP connection, every HTTP request, every UDP datagram and every ICMP echo request is appended
as one JSON object per line to ``spec["hits_log"]``; the tests read that file to prove that a bypass
attempt reached nothing, and that a control attempt (as the exempt proxy uid) did.

HTTPS endpoints (any of the served names, TLS on 443):

* ``/sse?n=N&interval_ms=T`` — N server-sent events T ms apart, each carrying its send time.
* ``/download?bytes=N`` — N bytes of a deterministic pattern (``pattern_digest`` gives the sha256).
* ``/upload`` (POST) — consumes the body as it streams; answers its byte count and sha256.
* ``/v1/models``, ``/v1/chat/completions`` (incl. ``stream: true``) — enough for the ``openai`` SDK;
  the assistant message is a JSON digest of the received credential headers.
* ``/reflect-credentials`` — answers with credential-named *response* headers (R7 check).
* anything else — echo: request line, SNI and, per header, name, count and SHA-256 fingerprint of each
  value. Raw values are returned only for a few non-sensitive headers; credentials never are.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import signal
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

RAW_VALUE_HEADERS = frozenset(
    {
        b"host",
        b"user-agent",
        b"accept",
        b"content-type",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"x-probe",
    }
)
CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key", b"proxy-authorization", b"cookie"})
_PATTERN_BLOCK = hashlib.sha256(b"botbox-pattern").digest() * 2048  # 64 KiB


def fingerprint(value: bytes | str) -> str:
    """SHA-256 hex of a header value: what the upstream reports instead of the value itself."""
    if isinstance(value, str):
        value = value.encode()
    return hashlib.sha256(value).hexdigest()


def pattern_chunks(total: int) -> Iterator[bytes]:
    remaining = total
    while remaining > 0:
        chunk = _PATTERN_BLOCK[: min(remaining, len(_PATTERN_BLOCK))]
        remaining -= len(chunk)
        yield chunk


def pattern_digest(total: int) -> str:
    h = hashlib.sha256()
    for chunk in pattern_chunks(total):
        h.update(chunk)
    return h.hexdigest()


class HitLog:
    def __init__(self, path: str) -> None:
        self._fh = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives for the process

    def write(self, **record: Any) -> None:
        record["t"] = time.time()
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()


IPPROTO_UDPLITE = 136


def _fam(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _addr(sockname: Any) -> tuple[str, int]:
    return str(sockname[0]), int(sockname[1])


def header_report(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    report: dict[str, Any] = {"order": [], "counts": {}, "sha256": {}, "values": {}}
    for name, value in headers:
        n = name.decode("latin-1").lower()
        report["order"].append(n)
        report["counts"][n] = report["counts"].get(n, 0) + 1
        report["sha256"].setdefault(n, []).append(fingerprint(value))
        if name.lower() in RAW_VALUE_HEADERS:
            report["values"].setdefault(n, []).append(value.decode("latin-1"))
    return report


class HttpsHandler:
    def __init__(self, hits: HitLog, ctx: ssl.SSLContext) -> None:
        self.hits = hits
        self.ctx = ctx
        # Server-side SSLObject.server_hostname is always None: record the SNI in the callback.
        self._sni: dict[int, str | None] = {}
        ctx.sni_callback = self._on_sni

    def _on_sni(self, sslobj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        self._sni[id(sslobj)] = name

    async def accept_loop(self, lsock: socket.socket) -> None:
        """Accept raw TCP first (so every connection is recorded, TLS or not), then wrap in TLS.

        ``start_server`` + ``StreamWriter.start_tls`` would race: the stream reader may swallow the
        ClientHello before the TLS layer is installed.  ``connect_accepted_socket`` has no such window.
        """
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        while True:
            sock, _ = await loop.sock_accept(lsock)
            task = asyncio.create_task(self._connection(sock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _connection(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        local, peer = _addr(sock.getsockname()), _addr(sock.getpeername())
        self.hits.write(kind="tcp", local_ip=local[0], local_port=local[1], peer=peer[0])
        reader = asyncio.StreamReader(limit=1 << 20)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock=sock, ssl=self.ctx, ssl_handshake_timeout=10
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self.hits.write(
                kind="tls_error", local_ip=local[0], local_port=local[1], error=type(exc).__name__
            )
            sock.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        sslobj = transport.get_extra_info("ssl_object")
        sni = self._sni.pop(id(sslobj), None)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                event = await self._next(conn, reader)
                if isinstance(event, h11.Request):
                    await self._serve(conn, reader, writer, event, sni=sni, local=local, peer=peer)
                    if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                        break
                    conn.start_next_cycle()
                else:
                    break
        except (h11.RemoteProtocolError, ConnectionError, ssl.SSLError, TimeoutError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 2)

    @staticmethod
    async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(65536), timeout=60)
                conn.receive_data(data)
                continue
            return event

    @staticmethod
    async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, event: Any) -> None:
        data = conn.send(event)
        if data:
            writer.write(data)
            await writer.drain()

    async def _serve(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        req: h11.Request,
        *,
        sni: str | None,
        local: tuple[str, int],
        peer: tuple[str, int],
    ) -> None:
        target = req.target.decode("latin-1")
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        headers = [(bytes(n), bytes(v)) for n, v in req.headers.raw_items()]
        report = header_report(headers)
        method = req.method.decode()
        # Body: hashed as it streams, never buffered beyond a small prefix (for JSON endpoints).
        h = hashlib.sha256()
        size = 0
        prefix = bytearray()
        while True:
            event = await self._next(conn, reader)
            if isinstance(event, h11.Data):
                h.update(event.data)
                size += len(event.data)
                if len(prefix) < 1 << 20:
                    prefix += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return
        self.hits.write(
            kind="https",
            local_ip=local[0],
            local_port=local[1],
            peer=peer[0],
            sni=sni,
            method=method,
            target=target,
            host=report["values"].get("host", []),
            credentials={k: v for k, v in report["sha256"].items() if k.encode() in CREDENTIAL_HEADERS},
            body_bytes=size,
        )
        echo: dict[str, Any] = {
            "sni": sni,
            "local": f"{local[0]}:{local[1]}",
            "method": method,
            "target": target,
            "http_version": req.http_version.decode(),
            "headers": report,
            "body_bytes": size,
            "body_sha256": h.hexdigest(),
        }
        path = url.path
        if path == "/sse":
            await self._sse(conn, writer, int(query.get("n", "5")), int(query.get("interval_ms", "300")))
        elif path == "/download":
            await self._download(conn, writer, int(query.get("bytes", str(1 << 20))))
        elif path == "/upload":
            await self._json(conn, writer, {"bytes": size, "sha256": h.hexdigest()})
        elif path == "/v1/models":
            await self._json(
                conn,
                writer,
                {
                    "object": "list",
                    "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "botbox"}],
                },
            )
        elif path == "/v1/chat/completions" and method == "POST":
            await self._chat(conn, writer, bytes(prefix), report)
        elif path == "/reflect-credentials":
            extra = [
                (b"authorization", b"Bearer reflected-by-upstream"),
                (b"x-api-key", b"reflected-by-upstream"),
                (b"x-benign", b"kept"),
            ]
            await self._json(conn, writer, echo, extra)
        elif path.startswith("/status/"):
            await self._json(conn, writer, echo, status=int(path.rsplit("/", 1)[1]))
        else:
            await self._json(conn, writer, echo)

    async def _json(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        obj: Any,
        extra: list[tuple[bytes, bytes]] | None = None,
        status: int = 200,
    ) -> None:
        body = json.dumps(obj).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += extra or []
        await self._send(conn, writer, h11.Response(status_code=status, headers=headers))
        await self._send(conn, writer, h11.Data(data=body))
        await self._send(conn, writer, h11.EndOfMessage())

    async def _sse(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, n: int, interval_ms: int
    ) -> None:
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await self._send(conn, writer, h11.Response(status_code=200, headers=headers))
        for i in range(n):
            if i:
                await asyncio.sleep(interval_ms / 1000)
            event = json.dumps({"i": i, "sent": time.time()})
            await self._send(conn, writer, h11.Data(data=f"id: {i}\ndata: {event}\n\n".encode()))
        await self._send(conn, writer, h11.EndOfMessage())

    async def _download(self, conn: h11.Connection, writer: asyncio.StreamWriter, total: int) -> None:
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(total).encode()),
            (b"x-body-sha256", pattern_digest(total).encode()),
        ]
        await self._send(conn, writer, h11.Response(status_code=200, headers=headers))
        for chunk in pattern_chunks(total):
            await self._send(conn, writer, h11.Data(data=chunk))
        await self._send(conn, writer, h11.EndOfMessage())

    async def _chat(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, body: bytes, report: dict[str, Any]
    ) -> None:
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            await self._json(conn, writer, {"error": {"message": "bad json"}}, status=400)
            return
        model = str(req.get("model", "fake-model"))
        content = json.dumps(
            {
                "authorization_count": report["counts"].get("authorization", 0),
                "authorization_sha256": report["sha256"].get("authorization", []),
            }
        )
        created = int(time.time())
        if not req.get("stream"):
            await self._json(
                conn,
                writer,
                {
                    "id": "chatcmpl-botbox",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            )
            return
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await self._send(conn, writer, h11.Response(status_code=200, headers=headers))
        pieces = [content[i : i + 16] for i in range(0, len(content), 16)]
        for idx, piece in enumerate(pieces):
            chunk = {
                "id": "chatcmpl-botbox",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": piece} if idx == 0 else {"content": piece},
                        "finish_reason": None,
                    }
                ],
            }
            await self._send(conn, writer, h11.Data(data=f"data: {json.dumps(chunk)}\n\n".encode()))
            await asyncio.sleep(0.01)
        await self._send(conn, writer, h11.Data(data=b"data: [DONE]\n\n"))
        await self._send(conn, writer, h11.EndOfMessage())


class CatchAllTcp:
    def __init__(self, hits: HitLog) -> None:
        self.hits = hits

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local = _addr(writer.get_extra_info("sockname"))
        peer = _addr(writer.get_extra_info("peername"))
        self.hits.write(kind="tcp", local_ip=local[0], local_port=local[1], peer=peer[0])
        try:
            data = await asyncio.wait_for(reader.read(4096), timeout=1.0)
            if data:
                self.hits.write(kind="tcp_data", local_ip=local[0], local_port=local[1], bytes=len(data))
                writer.write(b"catch-all\n")
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


class CatchAllUdp(asyncio.DatagramProtocol):
    def __init__(self, hits: HitLog, local: tuple[str, int], kind: str = "udp") -> None:
        self.hits = hits
        self.local = local
        self.kind = kind
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.hits.write(
            kind=self.kind, local_ip=self.local[0], local_port=self.local[1], peer=str(addr[0]),
            bytes=len(data),
        )
        if self.transport is not None:
            self.transport.sendto(b"catch-all", addr)


def _icmp_reader(hits: HitLog, sock: socket.socket, family: int) -> None:
    try:
        data, addr = sock.recvfrom(65535)
    except BlockingIOError:
        return
    if family == socket.AF_INET:
        ihl = (data[0] & 0x0F) * 4
        if len(data) > ihl and data[ihl] == 8:  # echo request
            hits.write(kind="icmp", family=4, peer=socket.inet_ntoa(data[12:16]),
                       local_ip=socket.inet_ntoa(data[16:20]))
    elif data and data[0] == 128:  # ICMPv6 echo request
        hits.write(kind="icmp", family=6, peer=str(addr[0]))


async def serve(spec: dict[str, Any]) -> None:
    hits = HitLog(spec["hits_log"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(spec["cert_file"], spec["key_file"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    https = HttpsHandler(hits, ctx)
    catch_tcp = CatchAllTcp(hits)
    loop = asyncio.get_running_loop()
    servers: list[Any] = []
    accept_tasks = []
    for addr in spec["https_addresses"]:
        lsock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((addr, 443))
        lsock.listen(128)
        lsock.setblocking(False)
        servers.append(lsock)
        accept_tasks.append(asyncio.create_task(https.accept_loop(lsock)))
    for addr in spec["catchall_addresses"]:
        for port in spec["tcp_ports"]:
            servers.append(await asyncio.start_server(catch_tcp, host=addr, port=port))
        for port in spec["udp_ports"]:
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(CatchAllUdp, hits, (addr, port)), local_addr=(addr, port)
            )
            servers.append(transport)
        for port in spec.get("udplite_ports", []):
            # UDP-Lite (IP protocol 136) is not "-p udp": a classic hole in UDP-only filters.
            sock = socket.socket(_fam(addr), socket.SOCK_DGRAM, IPPROTO_UDPLITE)
            sock.bind((addr, port))
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(CatchAllUdp, hits, (addr, port), "udplite"), sock=sock
            )
            servers.append(transport)
    for port in spec.get("wildcard_ports", []):
        # TCP + UDP on every address of the namespace: the gateway, IPv6 link-local, ...
        for fam, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            tsock = socket.socket(fam, socket.SOCK_STREAM)
            tsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                tsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            tsock.bind((any_addr, port))
            servers.append(await asyncio.start_server(catch_tcp, sock=tsock))
            usock = socket.socket(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                usock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            usock.bind((any_addr, port))
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(CatchAllUdp, hits, (any_addr, port)), sock=usock
            )
            servers.append(transport)
    for family, proto in ((socket.AF_INET, socket.IPPROTO_ICMP), (socket.AF_INET6, socket.IPPROTO_ICMPV6)):
        raw = socket.socket(family, socket.SOCK_RAW, proto)
        raw.setblocking(False)
        loop.add_reader(raw.fileno(), _icmp_reader, hits, raw, family)
        servers.append(raw)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    Path(spec["ready_file"]).write_text("ready\n")
    await stop.wait()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m integration.upstream SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    asyncio.run(serve(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
