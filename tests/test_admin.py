"""Admin listener (CONTRACT §4, §5; SECURITY-SPEC S8)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SECRET_VALUE
from tests.support.proxy import RunningProxy, get, read_response
from tests.support.upstream import TLSUpstream

CONTRACT_METRICS = {
    "botbox_requests_total": ("counter", {"host", "decision"}),
    "botbox_request_duration_seconds": ("histogram", {"host"}),
    "botbox_upstream_errors_total": ("counter", {"host", "status_code"}),
    "botbox_header_rewrites_total": ("counter", {"host"}),
    "botbox_secrets_reload_total": ("counter", {"result"}),
    "botbox_active_connections": ("gauge", {"listener"}),
    "botbox_connections_rejected_total": ("counter", {"reason"}),
    "botbox_tls_handshakes_total": ("counter", {"result"}),
    "botbox_https_interception_cert_issued_total": ("counter", {"decision"}),
    "botbox_https_interception_cert_cache_total": ("counter", {"result"}),
    "botbox_https_interception_host_mismatch_total": ("counter", set()),
}


def admin_get(proxy: RunningProxy, path: str, method: str = "GET") -> tuple[int, bytes, bytes | None]:
    with socket.create_connection(("127.0.0.1", proxy.admin_port), timeout=5) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        r = read_response(s, method=method.encode())
    return r.status, r.body, r.header("content-type")


def test_livez_healthz_and_404(proxy: RunningProxy) -> None:
    assert admin_get(proxy, "/livez")[:2] == (200, b"ok")
    assert admin_get(proxy, "/healthz")[:2] == (200, b"ok")
    status, body, ctype = admin_get(proxy, "/nope")
    assert (status, body) == (404, b"not found") and ctype is not None and ctype.startswith(b"text/plain")
    assert admin_get(proxy, "/healthz", method="POST")[:2] == (404, b"not found")
    assert admin_get(proxy, "/livez", method="HEAD")[:2] == (200, b"")


def test_healthz_503_until_secret_available(proxy: RunningProxy, secrets_dir: Path) -> None:
    secret = secrets_dir / "api-key"
    secret.unlink()
    assert proxy.runtime.app.secrets.reload()  # type: ignore[union-attr]
    assert admin_get(proxy, "/healthz")[:2] == (503, b"not ready")
    assert admin_get(proxy, "/livez")[:2] == (200, b"ok")
    secret.write_text("back\n")
    deadline = time.monotonic() + 5
    while admin_get(proxy, "/healthz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert admin_get(proxy, "/healthz")[:2] == (200, b"ok")


def test_metrics_exposes_every_contract_metric(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    proxy.exchange(get(f"127.0.0.1:{upstream.port}", headers=[("Authorization", "x")]))
    proxy.exchange(get("denied.example"))
    proxy.metric("botbox_requests_total", host="_denied", decision="deny")  # wait for accounting
    status, body, ctype = admin_get(proxy, "/metrics")
    assert status == 200 and ctype is not None and ctype.startswith(b"text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name, (mtype, labels) in CONTRACT_METRICS.items():
        base = name.removesuffix("_total")
        fam = families.get(base) or families.get(name)
        assert fam is not None, name
        assert fam.type == mtype, name
        for sample in fam.samples:
            if sample.name.endswith(("_created",)):
                continue
            got = set(sample.labels) - {"le"}
            assert got == labels, (name, got)
    text = body.decode()
    assert 'botbox_requests_total{decision="allow",host="127.0.0.1"} 1.0' in text
    assert 'botbox_requests_total{decision="deny",host="_denied"} 1.0' in text
    assert "denied.example" not in text  # cardinality bounded: denied hosts never become labels
    assert SECRET_VALUE not in text


def test_admin_rejects_garbage_and_slow_clients(proxy: RunningProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.admin_port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
