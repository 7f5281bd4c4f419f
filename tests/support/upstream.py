"""A real TLS upstream for tests: threaded, h11-based, certificates from a throwaway trustme CA.

It records every request it receives (method, target, raw header list, body digest) in ``requests``
so tests assert on what *actually* reached the upstream, and counts TLS handshakes (``handshakes``)
to prove keep-alive reuse. Endpoints (query parameters in the target):

* ``/sse?n=N&interval_ms=T``  N server-sent events T ms apart (chunked), each ``data: i <monotonic>``
* ``/download?bytes=N``       N bytes of a deterministic pattern, streamed in 64 KiB chunks
* ``/upload``                 consumes the body as it arrives; answers ``<count> <sha256>``
* ``/status?code=C``          answers status C
* ``/slow?delay=S``           sleeps S seconds before answering (504 tests)
* ``/stall-body?delay=S``     sends headers then stalls S seconds mid-body
* ``/reflect``                answers with credential-named response headers (R7)
* ``/close``                  closes the connection without a response
* anything else               ``200 ok`` with a short body
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11
import trustme

PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern(n: int) -> bytes:
    reps, rest = divmod(n, len(PATTERN))
    return PATTERN * reps + PATTERN[:rest]


@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body_len: int = 0
    body_sha256: str = ""
    sni: str | None = None

    def values(self, name: str) -> list[bytes]:
        n = name.lower().encode()
        return [v for k, v in self.headers if k.lower() == n]


@dataclass
class TLSUpstream:
    """Start with :meth:`start`; stop with :meth:`stop`. ``port`` is the bound port."""

    ca: trustme.CA
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    bind: str = "127.0.0.1"
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    handshakes: int = 0
    connections: int = 0
    download_sent: int = 0  # body bytes handed to the socket by /download so far
    _sock: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _conns: list[socket.socket] = field(default_factory=list)

    def start(self) -> TLSUpstream:
        cert = self.ca.issue_cert(*self.hosts)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(ctx)
        ctx.set_alpn_protocols(["http/1.1"])
        self._sni: dict[int, str | None] = {}

        def on_sni(sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
            self._sni[id(sslobj)] = name

        ctx.sni_callback = on_sni  # type: ignore[assignment]
        self._ctx = ctx
        fam = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.bind, self.port))
        s.listen(128)
        s.settimeout(0.2)
        self._sock = s
        self.port = s.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name="tls-upstream", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            self._sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
        for t in self._threads:
            t.join(timeout=5)

    def last(self) -> Received:
        with self._lock:
            return self.requests[-1]

    # -- internals ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                raw, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(30)
            with self._lock:
                self.connections += 1
                self._conns.append(raw)
            t = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, raw: socket.socket) -> None:
        try:
            tls = self._ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        with self._lock:
            self.handshakes += 1
            self._conns.append(tls)
        sni = self._sni.get(id(tls))
        conn = h11.Connection(h11.SERVER)
        try:
            while not self._stop.is_set():
                if not self._one(tls, conn, sni):
                    break
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except (OSError, ssl.SSLError, h11.ProtocolError):
            pass
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def _next(self, tls: ssl.SSLSocket, conn: h11.Connection) -> object:
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(tls.recv(65536))
                continue
            return ev

    def _one(self, tls: ssl.SSLSocket, conn: h11.Connection, sni: str | None) -> bool:
        ev = self._next(tls, conn)
        if not isinstance(ev, h11.Request):
            return False
        target = ev.target.decode()
        url = urlsplit(target)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        rec = Received(ev.method.decode(), target, list(ev.headers.raw_items()), sni=sni)
        with self._lock:
            self.requests.append(rec)
        path = url.path

        if path == "/upload":
            digest = hashlib.sha256()
            n = 0
            while True:
                body_ev = self._next(tls, conn)
                if isinstance(body_ev, h11.Data):
                    n += len(body_ev.data)
                    digest.update(body_ev.data)
                elif isinstance(body_ev, h11.EndOfMessage):
                    break
                else:
                    return False
            rec.body_len, rec.body_sha256 = n, digest.hexdigest()
            self._respond(tls, conn, 200, f"{n} {digest.hexdigest()}".encode())
            return True

        # Every other endpoint: read (and digest) the body first.
        digest = hashlib.sha256()
        while True:
            body_ev = self._next(tls, conn)
            if isinstance(body_ev, h11.Data):
                rec.body_len += len(body_ev.data)
                digest.update(body_ev.data)
            elif isinstance(body_ev, h11.EndOfMessage):
                break
            else:
                return False
        rec.body_sha256 = digest.hexdigest()

        if path == "/sse":
            n, interval = int(q.get("n", "5")), int(q.get("interval_ms", "200")) / 1000
            tls.sendall(conn.send(h11.Response(status_code=200, headers=[
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")])) or b"")
            for i in range(n):
                if i:
                    time.sleep(interval)
                event = f"data: {i} {time.monotonic():.6f}\n\n".encode()
                tls.sendall(conn.send(h11.Data(data=event)) or b"")
            tls.sendall(conn.send(h11.EndOfMessage()) or b"")
            return True
        if path == "/download":
            total = int(q.get("bytes", "0"))
            head = h11.Response(status_code=200, headers=[
                (b"content-type", b"application/octet-stream"), (b"content-length", str(total).encode())])
            tls.sendall(conn.send(head) or b"")
            sent = 0
            while sent < total:
                chunk = PATTERN[: min(len(PATTERN), total - sent)]
                tls.sendall(conn.send(h11.Data(data=chunk)) or b"")
                sent += len(chunk)
                self.download_sent = sent
            tls.sendall(conn.send(h11.EndOfMessage()) or b"")
            return True
        if path == "/status":
            self._respond(tls, conn, int(q.get("code", "200")), b"status")
            return True
        if path == "/slow":
            time.sleep(float(q.get("delay", "1")))
            self._respond(tls, conn, 200, b"slow")
            return True
        if path == "/stall-body":
            tls.sendall(conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"10")])) or b"")
            tls.sendall(conn.send(h11.Data(data=b"12345")) or b"")
            time.sleep(float(q.get("delay", "1")))
            return False
        if path == "/reflect":
            self._respond(tls, conn, 200, b"reflect", extra=[
                (b"Authorization", b"Bearer reflected"), (b"x-api-key", b"reflected"),
                (b"X-Safe", b"kept")])
            return True
        if path == "/close":
            return False
        self._respond(tls, conn, 200, b"ok")
        return True

    @staticmethod
    def _respond(tls: ssl.SSLSocket, conn: h11.Connection, status: int, body: bytes,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        headers += extra or []
        out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        tls.sendall(out)
