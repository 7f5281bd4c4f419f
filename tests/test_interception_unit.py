"""Interceptor handshake logic over a real socketpair (no listener, no namespace)."""

from __future__ import annotations

import io
import socket
import ssl
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import pytest

import botbox.tls.listener as listener_mod
from botbox.config import parse_config
from botbox.logs import JsonLogger
from botbox.metrics import Metrics
from botbox.policy import Policy
from botbox.tls.ca import CertificateAuthority, generate_ca, load_ca, write_ca
from botbox.tls.issuer import IssuedLeaf
from botbox.tls.listener import Interceptor, sni_host


@pytest.fixture(scope="module")
def ca_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_ca(tmp_path_factory.mktemp("ca") / "ca", *generate_ca("Unit CA", days=60))


def _interceptor(ca_files: tuple[Path, Path], **overrides: Any) -> tuple[Interceptor, Any]:
    crt, key = ca_files
    cfg = parse_config({
        "egress_policy": {"rules": [{"host": "api.example.com", "action": "allow"}]},
        "https_interception": {"enabled": True, "ca_cert_path": str(crt), "ca_key_path": str(key),
                               "handshake_timeout_ms": 300, **overrides},
    })
    assert cfg.https_interception is not None
    app = SimpleNamespace(config=cfg, metrics=Metrics(), policy=Policy.from_config(cfg.egress_policy),
                          logger=JsonLogger(stream=io.StringIO()), ca_ready=False)
    ca: CertificateAuthority = load_ca(crt, key, env={})
    return Interceptor(app, cfg.https_interception, ca), app  # type: ignore[arg-type]


def _client(sock: socket.socket, crt: Path, sni: str) -> str:
    ctx = ssl.create_default_context(cafile=str(crt))
    with ctx.wrap_socket(sock, server_hostname=sni) as tls:
        return str(tls.version())


async def _run(interceptor: Interceptor, crt: Path, sni: str) -> tuple[str | None, BaseException | None]:
    """Server side: Interceptor.handshake on one end of a socketpair; client: ssl in a thread."""
    a, b = socket.socketpair()
    server = await anyio.abc.SocketStream.from_socket(a)
    result: dict[str, Any] = {"host": None, "err": None}

    async def client() -> None:
        try:
            await anyio.to_thread.run_sync(_client, b, crt, sni)
        except (ssl.SSLError, OSError) as exc:
            result["err"] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        got = await interceptor.handshake(server)
        if got is not None:
            tls, host = got
            result["host"] = host
            await tls.aclose()
    b.close()
    return result["host"], result["err"]


def _count(app: Any, result: str) -> float:
    v = app.metrics.registry.get_sample_value("botbox_tls_handshakes_total", {"result": result})
    return 0.0 if v is None else float(v)


def test_handshake_returns_canonical_sni(ca_files: tuple[Path, Path]) -> None:
    interceptor, app = _interceptor(ca_files)
    host, err = anyio.run(_run, interceptor, ca_files[0], "API.Example.com")
    assert (host, err) == ("api.example.com", None)
    assert _count(app, "ok") == 1


def test_expired_ca_at_runtime_refuses_and_turns_not_ready(
    ca_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    interceptor, app = _interceptor(ca_files)
    app.ca_ready = True
    monkeypatch.setattr(listener_mod, "_now", lambda: interceptor.ca.not_after.timestamp() + 1)
    host, err = anyio.run(_run, interceptor, ca_files[0], "api.example.com")
    assert host is None and isinstance(err, ssl.SSLError) and "INTERNAL_ERROR" in str(err)
    assert app.ca_ready is False
    assert _count(app, "io_error") == 1
    assert len(interceptor.cache) == 0  # nothing was issued with an expired CA


def test_slow_issuance_times_out_but_still_lands_in_cache(ca_files: tuple[Path, Path]) -> None:
    interceptor, app = _interceptor(ca_files)
    real = interceptor.cache._issue

    def slow(host: str) -> IssuedLeaf:
        time.sleep(0.6)  # > handshake_timeout_ms (300)
        return real(host)

    interceptor.cache._issue = slow
    host, err = anyio.run(_run, interceptor, ca_files[0], "api.example.com")
    assert host is None and err is not None
    assert _count(app, "timeout") == 1
    assert "api.example.com" in interceptor.cache  # shielded issuance finished; next client is a hit
    interceptor.cache._issue = real
    host, err = anyio.run(_run, interceptor, ca_files[0], "api.example.com")
    assert host == "api.example.com"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Example.COM.", "example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        (None, None),
        ("127.0.0.1", None),
        ("::1", None),
        ("[::1]", None),
        ("2130706433", None),
        ("a..b", None),
        ("a b", None),
        ("", None),
        ("evil.com:443", None),
        ("*.example.com", None),  # never a wildcard certificate
        ("a_b.example", None),
        ("0x7f.0.0.1", None),
    ],
)
def test_sni_host(raw: str | None, expected: str | None) -> None:
    assert sni_host(raw) == expected
