"""Server-sent-events origin and first-event timing client.

    python -m bench.sse serve --port 9443 --cert C --key K --token T
    python -m bench.sse client --port P --host-header H [--tls-ca CA] [--auth T] --n 200

The origin answers each keep-alive request with a chunked `text/event-stream`: the first event at once,
the second after --gap-ms, then the end of the body. The client measures, per request, the time from
sending the request to having the first event's bytes (a buffering proxy shows up as >= gap).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import statistics
import sys
import time

FIRST = b'data: {"delta":"first"}\n\n'
SECOND = b'data: {"delta":"second"}\n\ndata: [DONE]\n\n'


def _chunk(b: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(b), b)


async def _serve_conn(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: bytes, gap: float
) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            want = b"Bearer " + token
            auth_ok = any(
                line.lower().startswith(b"authorization:") and line.split(b":", 1)[1].strip() == want
                for line in head.split(b"\r\n")
            )
            if not auth_ok:
                writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                continue
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunk(FIRST)
            )
            await writer.drain()
            await asyncio.sleep(gap)
            writer.write(_chunk(SECOND) + b"0\r\n\r\n")
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        return
    finally:
        writer.close()


async def serve(port: int, cert: str, key: str, token: str, gap: float) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    tok = token.encode()
    servers = [
        await asyncio.start_server(
            lambda r, w: _serve_conn(r, w, tok, gap), host, port, ssl=ctx, backlog=1024
        )
        for host in ("127.0.0.1", "::1")
    ]
    await asyncio.gather(*(s.serve_forever() for s in servers))


class _Conn:
    def __init__(self, port: int, ctx: ssl.SSLContext | None) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = ctx.wrap_socket(raw, server_hostname="localhost") if ctx else raw
        self.buf = b""
        self.closed = False

    def fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            raise ConnectionError("closed")
        self.buf += data

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self.fill()
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def one(conn: _Conn, host_header: str, auth: str | None) -> tuple[float, int]:
    req = f"GET /v1/stream HTTP/1.1\r\nHost: {host_header}\r\nAccept: text/event-stream\r\n"
    if auth:
        req += f"Authorization: Bearer {auth}\r\n"
    req += "\r\n"
    t0 = time.perf_counter()
    conn.sock.sendall(req.encode())
    head = conn.until(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    first_at: float | None = None
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int(conn.until(b"\r\n").strip().split(b";")[0], 16)
            if size == 0:
                conn.until(b"\r\n")
                break
            data = conn.take(size + 2)
            if first_at is None and b"first" in data:
                first_at = time.perf_counter()
    elif b"content-length:" in lower:
        n = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        got = b""
        while len(got) < n:
            need = n - len(got)
            if not conn.buf:
                conn.fill()
            piece, conn.buf = conn.buf[:need], conn.buf[need:]
            got += piece
            if first_at is None and b"first" in got:
                first_at = time.perf_counter()
    else:  # close-delimited
        while True:
            if first_at is None and b"first" in conn.buf:
                first_at = time.perf_counter()
            try:
                conn.fill()
            except ConnectionError:
                break
    if b"connection: close" in lower:
        conn.closed = True
    if first_at is None:
        raise RuntimeError(f"no first event (status {status})")
    return (first_at - t0) * 1000.0, status


def client(port: int, host_header: str, ca: str | None, auth: str | None, n: int) -> dict[str, float]:
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    conn = _Conn(port, ctx)
    samples: list[float] = []
    errors = 0
    for _ in range(n):
        try:
            if conn.closed:
                conn = _Conn(port, ctx)
            ms, status = one(conn, host_header, auth)
            if status != 200:
                errors += 1
            else:
                samples.append(ms)
        except (OSError, RuntimeError, ValueError):
            errors += 1
            conn = _Conn(port, ctx)
    if not samples:
        return {"n": 0, "errors": errors}
    samples.sort()
    return {
        "n": len(samples),
        "errors": errors,
        "p50_ms": statistics.median(samples),
        "p90_ms": samples[int(0.9 * (len(samples) - 1))],
        "min_ms": samples[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--token", required=True)
    s.add_argument("--gap-ms", type=float, default=20.0)
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--host-header", required=True)
    c.add_argument("--tls-ca")
    c.add_argument("--auth")
    c.add_argument("--n", type=int, default=200)
    a = ap.parse_args()
    if a.cmd == "serve":
        coro = serve(a.port, a.cert, a.key, a.token, a.gap_ms / 1000.0)
        try:
            import uvloop
        except ImportError:
            asyncio.run(coro)
        else:
            uvloop.run(coro)
    else:
        print(json.dumps(client(a.port, a.host_header, a.tls_ca, a.auth, a.n)))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
