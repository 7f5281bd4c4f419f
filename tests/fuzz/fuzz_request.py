"""Coverage-guided fuzz target (atheris / libFuzzer) for the request-parsing entry point.

The input is the raw byte stream a hostile app writes to the HTTP listener. It is fed to the real
``botbox.pipeline.serve_connection`` (raw head pre-check, h11, authority parsing, policy, header
rewrite, body framing) over an in-memory stream; the upstream is an in-process fake that records
every request it would have received. A finding is any of:

* an exception escaping ``serve_connection`` (it must absorb every client-side problem);
* output that is not a sequence of HTTP/1.1 responses, or bytes after a ``400`` (which must close);
* a forwarded request to anything but the allowed host/ports, without exactly one injected
  credential, with a hop-by-hop header or with a non-canonical ``Host``;
* the secret value in the client-visible output or in the logs.

Usage (documented in the README, "Adversarial testing")::

    # long run (stop with Ctrl-C); new interesting inputs go to the first directory
    /opt/botbox/venv/bin/python -m tests.fuzz.fuzz_request /tmp/botbox-fuzz-corpus tests/fuzz/corpus \
        -max_len=4096 -timeout=10 -artifact_prefix=/tmp/botbox-fuzz-
    # regenerate the committed seed corpus from tests/fuzz/smuggling_corpus.py
    /opt/botbox/venv/bin/python -m tests.fuzz.fuzz_request --write-seeds

CI runs a bounded smoke of this target (``tests/fuzz/test_fuzz_smoke.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import shutil
import sys
import tempfile
from collections.abc import AsyncIterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.lowlevel

# h11/httpcore are imported lazily so that ``main`` can instrument h11 for coverage (atheris only
# instruments modules imported inside ``instrument_imports``).

if TYPE_CHECKING:
    import httpcore

SEEDS_DIR = Path(__file__).with_name("corpus")
SECRET = b"sk-FUZZ-7c1d2e3f4a5b6c7d8e9f"
ALLOWED_HOST = "allowed.example"
ALLOWED_PORTS = (443, 8443)
HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
}


class MemoryStream(anyio.abc.ByteStream):
    """Client side of the connection: hands out the fuzz input in small pieces, records output."""

    def __init__(self, data: bytes, piece: int) -> None:
        self._data = data
        self._pos = 0
        self._piece = max(1, piece)
        self.out = bytearray()
        self.closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self.closed:
            raise anyio.ClosedResourceError
        if self._pos >= len(self._data):
            raise anyio.EndOfStream
        n = min(max_bytes, self._piece)
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        await anyio.lowlevel.checkpoint()
        return chunk

    async def send(self, item: bytes) -> None:
        if self.closed:
            raise anyio.ClosedResourceError
        self.out += item
        await anyio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        return None

    async def aclose(self) -> None:
        self.closed = True


class FakeUpstream:
    """Stands in for ``botbox.upstream.UpstreamPool``: consumes the body, answers 200 ``ok``."""

    def __init__(self) -> None:
        self.hits: list[tuple[bytes, str, int, bytes, list[tuple[bytes, bytes]], bytes]] = []

    async def send(
        self,
        method: bytes,
        *,
        host: str,
        port: int,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | None,
    ) -> httpcore.Response:
        import httpcore

        data = b""
        if body is not None:
            async for chunk in body:
                data += chunk
        self.hits.append((method, host, port, target, list(headers), data))
        headers_out = [(b"Content-Length", b"2"), (b"Authorization", b"x")]
        return httpcore.Response(200, headers=headers_out, content=b"ok")

    async def aclose(self) -> None:
        return None


class Harness:
    """One ProxyApp reused across inputs (like a long-running proxy), fresh connection per input."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        from botbox.config import parse_config
        from botbox.logs import JsonLogger
        from botbox.metrics import Metrics
        from botbox.pipeline import ConnectionContext, ProxyApp
        from botbox.policy import Policy
        from botbox.secrets import SecretStore

        # libFuzzer leaves through C exit(), which skips Python finalizers: the directory is removed
        # right after the store has loaded (values stay in memory), not at exit.
        tmp = tempfile.mkdtemp(prefix="botbox-fuzz-")
        (Path(tmp) / "key").write_bytes(SECRET + b"\n")
        cfg = parse_config(
            {
                "secrets_dir": tmp,
                "request_header_timeout_seconds": 5,
                "upstream_idle_timeout_seconds": 5,
                "egress_policy": {
                    "default_action": "deny",
                    "rules": [
                        {
                            "host": ALLOWED_HOST,
                            "action": "allow",
                            "allowed_ports": list(ALLOWED_PORTS),
                            "header_rewrites": [
                                {"name": "Authorization", "value": "Bearer {value}", "secret_ref": "key"}
                            ],
                        },
                        {"host": "denied.example", "action": "deny"},
                    ],
                },
            }
        )
        try:
            store = SecretStore(Path(tmp))
            if not store.reload():
                raise RuntimeError("fuzz harness: secret store did not load")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.log = io.StringIO()
        self.upstream = FakeUpstream()
        self.app = ProxyApp(
            config=cfg,
            policy=Policy.from_config(cfg.egress_policy),
            secrets=store,
            upstream=self.upstream,  # type: ignore[arg-type]
            metrics=Metrics(CollectorRegistry()),
            logger=JsonLogger(stream=self.log),
        )
        self.ctx_plain = ConnectionContext(listener="http", peer="127.0.0.1:40000", orig_dst=None)
        self.ctx_redirected = ConnectionContext(
            listener="http", peer="127.0.0.1:40001", orig_dst=("203.0.113.7", 80)
        )
        self.ctx_intercept = ConnectionContext(
            listener="https_interception", peer="127.0.0.1:40002", orig_dst=("203.0.113.7", 443),
            sni=ALLOWED_HOST,
        )
        self.loop = asyncio.new_event_loop()

    def run_one(self, data: bytes) -> None:
        from botbox.pipeline import serve_connection

        if not data:
            return
        # First byte picks delivery granularity and context, so the fuzzer explores split reads too.
        ctl, payload = data[0], data[1:]
        piece = (1, 3, 7, 64, 65536)[ctl % 5]
        # bit 7: redirected from port 80; bit 6: the interception listener (T4/T5 paths, SNI set)
        ctx = self.ctx_intercept if ctl & 0x40 else self.ctx_redirected if ctl & 0x80 else self.ctx_plain
        stream = MemoryStream(payload, piece)
        self.upstream.hits.clear()
        self.log.seek(0)
        self.log.truncate()
        self.loop.run_until_complete(serve_connection(stream, ctx, self.app))
        # A response to HEAD has no body whatever its Content-Length: the structural check cannot
        # tell which response answers a HEAD, so it only runs when no HEAD was sent.
        check(bytes(stream.out), stream.closed, self.upstream.hits, self.log.getvalue(),
              structure=b"HEAD" not in payload)


def check(
    out: bytes,
    closed: bool,
    hits: list[tuple[bytes, str, int, bytes, list[tuple[bytes, bytes]], bytes]],
    log: str,
    *,
    structure: bool = True,
) -> None:
    assert closed, "serve_connection returned without closing the client stream"
    assert SECRET not in out, "secret value reached the client"
    assert SECRET.decode() not in log, "secret value reached the logs"
    for method, host, port, target, headers, _body in hits:
        assert host == ALLOWED_HOST and port in ALLOWED_PORTS, f"forwarded to {host}:{port}"
        names = [n.lower() for n, _ in headers]
        assert names[0] == b"host", "Host is not the first upstream header"
        want_host = ALLOWED_HOST.encode() if port == 443 else f"{ALLOWED_HOST}:{port}".encode()
        assert headers[0][1] == want_host, f"upstream Host {headers[0][1]!r}"
        assert names.count(b"host") == 1
        auth = [v for n, v in headers if n.lower() == b"authorization"]
        if method.upper() == b"TRACE":
            assert b"Bearer " + SECRET not in auth, "credential injected into TRACE"
        else:
            assert auth == [b"Bearer " + SECRET], "credential not injected exactly once"
        for n in names:
            assert n not in HOP_BY_HOP or n == b"transfer-encoding", f"hop-by-hop {n!r} forwarded"
        assert target.startswith(b"/"), f"non origin-form target forwarded: {target!r}"
        assert b" " not in target and b"\r" not in target and b"\n" not in target
    if structure:
        _check_responses(out)
    else:
        assert not out or out.startswith(b"HTTP/1.1 "), "output is not an HTTP/1.1 response"


def _check_responses(out: bytes) -> None:
    """The output must parse as HTTP/1.1 responses; nothing may follow a 400."""
    import h11

    if not out:
        return
    client = h11.Connection(h11.CLIENT)
    client.receive_data(out)
    client.receive_data(b"")
    while True:
        # Give the client a request to match each response against (h11 needs one in flight).
        if client.our_state is h11.IDLE:
            client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())
        event = client.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
            assert 200 <= status < 600, status
            while not isinstance(event, h11.EndOfMessage):
                event = client.next_event()
                assert event is not h11.NEED_DATA, "truncated response"
            if status == 400:
                client.start_next_cycle() if client.our_state is h11.DONE else None
                assert client.trailing_data[0] == b"", "bytes after a 400 response"
                return
            if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
                return  # connection: close
            client.start_next_cycle()
            if not client.trailing_data[0] and client.trailing_data[1]:
                return
            continue
        if event is h11.ConnectionClosed or event is h11.NEED_DATA:
            return
        raise AssertionError(f"unexpected event {event!r}")


_HARNESS: Harness | None = None


def test_one_input(data: bytes) -> None:
    global _HARNESS
    if _HARNESS is None:
        _HARNESS = Harness()
    _HARNESS.run_one(data)


def write_seeds(directory: Path = SEEDS_DIR) -> int:
    from tests.fuzz.smuggling_corpus import seed_inputs

    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, raw in sorted(seed_inputs(allowed=ALLOWED_HOST.encode(), denied=b"denied.example").items()):
        if len(raw) > 4096:  # the huge cases (70 KB line, 10,000 headers) are covered end to end
            continue
        # whole input at once (plain), 1-byte pieces (redirected), 3-byte pieces (interception)
        for ctl in (0x04, 0x80, 0x41):
            payload = bytes([ctl]) + raw
            digest = hashlib.sha1(payload, usedforsecurity=False).hexdigest()[:12]
            (directory / f"{name}-{ctl:02x}-{digest}").write_bytes(payload)
            n += 1
    return n


def main(argv: list[str]) -> None:
    if "--write-seeds" in argv:
        print(f"wrote {write_seeds()} seeds to {SEEDS_DIR}")
        return
    import atheris

    with atheris.instrument_imports(include=["botbox", "h11"]):
        import botbox.pipeline  # noqa: F401  (pulls in hostname, policy, rewrite, h11)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
