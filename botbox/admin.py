"""Admin listener (CONTRACT §4): ``/healthz``, ``/livez``, ``/metrics``; anything else 404.

A deliberately tiny h11 server: GET/HEAD only, no request bodies, one short-lived keep-alive connection
per scraper, header timeout and size limits like the proxy listener. It is not counted in
``max_connections`` (CONTRACT §2) but has its own small connection cap so it cannot be used to
exhaust file descriptors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import anyio
import anyio.abc
import h11

from botbox.metrics import CONTENT_TYPE_LATEST

__all__ = ["ADMIN_MAX_CONNECTIONS", "AdminHandler"]

ADMIN_MAX_CONNECTIONS = 64
_MAX_HEAD = 8192
_TEXT = b"text/plain; charset=utf-8"


class AdminHandler:
    """Serves one admin connection at a time per call; ``ready`` and ``render_metrics`` are callbacks."""

    def __init__(
        self,
        *,
        ready: Callable[[], bool],
        render_metrics: Callable[[], bytes],
        header_timeout: float = 10.0,
    ) -> None:
        self._ready = ready
        self._render_metrics = render_metrics
        self._header_timeout = header_timeout
        self._active = 0

    def _route(self, method: bytes, target: bytes) -> tuple[int, bytes, bytes]:
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 404, _TEXT, b"not found"
        if path == b"/livez":
            return 200, _TEXT, b"ok"
        if path == b"/healthz":
            if self._ready():
                return 200, _TEXT, b"ok"
            return 503, _TEXT, b"not ready"
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST.encode("ascii"), self._render_metrics()
        return 404, _TEXT, b"not found"

    async def __call__(self, stream: anyio.abc.ByteStream) -> None:
        if self._active >= ADMIN_MAX_CONNECTIONS:
            with contextlib.suppress(Exception):
                await stream.aclose()
            return
        self._active += 1
        try:
            await self._serve(stream)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError,
                TimeoutError):
            pass
        finally:
            self._active -= 1
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0), contextlib.suppress(Exception):
                await stream.aclose()

    async def _serve(self, stream: anyio.abc.ByteStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        while True:
            event: object = None
            with anyio.fail_after(self._header_timeout):
                while True:
                    try:
                        event = conn.next_event()
                    except h11.RemoteProtocolError:
                        await stream.send(
                            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                            b"Content-Length: 11\r\nConnection: close\r\n\r\nbad request"
                        )
                        return
                    if event is h11.NEED_DATA:
                        data = await stream.receive(65536)
                        conn.receive_data(data)
                        continue
                    break
            if not isinstance(event, h11.Request):
                return
            status, ctype, body = self._route(event.method, event.target)
            # Any request body is not read: answer and close in that case.
            has_body = any(n in (b"content-length", b"transfer-encoding") for n, _ in event.headers)
            headers = [(b"Content-Type", ctype), (b"Content-Length", b"%d" % len(body))]
            if has_body:
                headers.append((b"Connection", b"close"))
            out = conn.send(h11.Response(status_code=status, headers=headers))
            if event.method != b"HEAD":
                out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
            out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
            await stream.send(out)
            if has_body or conn.our_state is not h11.DONE:
                return
            try:
                nxt = conn.next_event()
            except h11.RemoteProtocolError:
                return
            if not isinstance(nxt, h11.EndOfMessage) or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
