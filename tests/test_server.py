"""Server runtime: max_connections, header timeout (slowloris), drain, [::1] twin, secret rotation."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from botbox.config import parse_config
from botbox.logs import JsonLogger
from botbox.server import Runtime, StartupError, ipv6_enabled
from tests.conftest import SECRET_VALUE
from tests.support.proxy import LogCapture, RunningProxy, get, is_closed, read_response
from tests.support.upstream import TLSUpstream

StartProxy = Callable[[dict[str, Any]], RunningProxy]


def test_max_connections_excess_accepted_then_closed(
    proxy_factory: StartProxy, base_config: dict[str, Any], upstream: TLSUpstream
) -> None:
    base_config["max_connections"] = 2
    proxy = proxy_factory(base_config)
    a, b = proxy.connect(), proxy.connect()
    try:
        deadline = time.monotonic() + 2
        while proxy.metric("botbox_active_connections", listener="http") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.metric("botbox_active_connections", listener="http") == 2
        with proxy.connect() as c:
            assert is_closed(c, 2.0)
        assert proxy.metric("botbox_connections_rejected_total", reason="max_connections") == 1
        # The held connections still work.
        a.sendall(get(f"127.0.0.1:{upstream.port}"))
        assert read_response(a).status == 200
    finally:
        a.close()
        b.close()
    # Slots are released: a new connection is served again.
    deadline = time.monotonic() + 2
    while proxy.metric("botbox_active_connections", listener="http") > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.exchange(get(f"127.0.0.1:{upstream.port}")).status == 200


def test_slowloris_header_timeout(proxy_factory: StartProxy, base_config: dict[str, Any]) -> None:
    base_config["request_header_timeout_seconds"] = 0.5
    proxy = proxy_factory(base_config)
    with proxy.connect() as s:
        t0 = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nHost: local")
        for _ in range(3):  # dribbling bytes does not extend the deadline
            time.sleep(0.1)
            s.sendall(b"h")
        assert is_closed(s, 3.0)
        assert time.monotonic() - t0 < 2.0
    assert proxy.metric("botbox_connections_rejected_total", reason="timeout") == 1
    # A connection that never sends anything is closed as well.
    with proxy.connect() as s:
        assert is_closed(s, 3.0)
    assert proxy.metric("botbox_connections_rejected_total", reason="timeout") == 2


def test_drain_finishes_in_flight_request_and_stops_accepting(
    base_config: dict[str, Any], upstream: TLSUpstream
) -> None:
    from tests.support.proxy import running_proxy

    with running_proxy(base_config) as proxy:
        idle = proxy.connect()
        busy = proxy.connect()
        busy.sendall(get(f"127.0.0.1:{upstream.port}", "/slow?delay=0.8"))
        time.sleep(0.2)
        proxy.portal.call(proxy.runtime.request_stop)
        # Idle keep-alive connection: closed at once. New connections: refused.
        assert is_closed(idle, 1.0)
        time.sleep(0.1)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).recv(1)
        r = read_response(busy, check_closed=True)
        assert r.status == 200 and r.body == b"slow"
        assert r.header("connection") == b"close" and r.closed
        proxy._future.result(timeout=10)
        idle.close()
        busy.close()


def test_drain_grace_cancels_overlong_requests(base_config: dict[str, Any], upstream: TLSUpstream) -> None:
    from tests.support.proxy import running_proxy

    base_config["shutdown_grace_seconds"] = 0.3
    with running_proxy(base_config) as proxy:
        busy = proxy.connect()
        busy.sendall(get(f"127.0.0.1:{upstream.port}", "/slow?delay=1.2"))
        time.sleep(0.2)
        t0 = time.monotonic()
        proxy.portal.call(proxy.runtime.request_stop)
        proxy._future.result(timeout=10)
        assert time.monotonic() - t0 < 2.0
        assert is_closed(busy, 1.0)
        busy.close()


@pytest.mark.skipif(not ipv6_enabled(), reason="IPv6 disabled on loopback in this namespace")
def test_ipv6_twin_listener_serves(proxy: RunningProxy, upstream: TLSUpstream) -> None:
    assert ("::1", proxy.port) in proxy.runtime.server.bound["http"]  # type: ignore[union-attr]
    with socket.create_connection(("::1", proxy.port), timeout=5) as s:
        s.sendall(get(f"127.0.0.1:{upstream.port}"))
        assert read_response(s).status == 200
    log = proxy.request_logs()[-1]
    assert log["client"].startswith("[::1]:")


def test_port_in_use_is_a_startup_error(base_config: dict[str, Any]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", base_config["listen_port"]))
        s.listen(1)
        cfg = parse_config(base_config)

        async def build() -> None:
            Runtime(cfg, logger=JsonLogger(stream=LogCapture())).build()

        import anyio

        with pytest.raises(StartupError, match=r"cannot listen on 127\.0\.0\.1"):
            anyio.run(build)


def test_unreadable_secrets_dir_with_referenced_secret_is_startup_error(
    base_config: dict[str, Any], tmp_path: Path
) -> None:
    import anyio

    base_config["secrets_dir"] = str(tmp_path / "does-not-exist")
    cfg = parse_config(base_config)

    async def build() -> None:
        Runtime(cfg, logger=JsonLogger(stream=LogCapture())).build()

    with pytest.raises(StartupError, match="secrets_dir"):
        anyio.run(build)


def _write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(data)
    os.replace(tmp, path)


def test_secret_rotation_and_removal_picked_up_without_restart(
    proxy: RunningProxy, upstream: TLSUpstream, secrets_dir: Path
) -> None:
    h = f"127.0.0.1:{upstream.port}"
    assert proxy.exchange(get(h)).status == 200
    assert upstream.last().values("Authorization") == [b"Bearer " + SECRET_VALUE.encode()]
    os.chmod(secrets_dir / "api-key", 0o600)
    _write_atomic(secrets_dir / "api-key", "sk-rotated-value\n")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert proxy.exchange(get(h)).status == 200
        if upstream.last().values("Authorization") == [b"Bearer sk-rotated-value"]:
            break
        time.sleep(0.1)
    assert upstream.last().values("Authorization") == [b"Bearer sk-rotated-value"]
    assert proxy.metric("botbox_secrets_reload_total", result="ok") >= 1
    # Deleted secret: requests fail closed with 500 after the next reload.
    (secrets_dir / "api-key").unlink()
    deadline = time.monotonic() + 5
    status = 200
    while time.monotonic() < deadline and status == 200:
        status = proxy.exchange(get(h)).status
        time.sleep(0.05)
    assert status == 500
    assert "sk-rotated-value" not in proxy.logs.text() and SECRET_VALUE not in proxy.logs.text()


def test_kubernetes_data_symlink_swap_and_failed_reload_keep_last_known_good(
    proxy_factory: StartProxy, base_config: dict[str, Any], upstream: TLSUpstream, tmp_path: Path
) -> None:
    """Secret volume layout (key -> ..data/key, ..data -> ..<timestamp>): an atomic ..data swap is picked
    up without restart; a reload that fails (directory gone) is counted and keeps the last good value."""
    vol = tmp_path / "k8s-secrets"
    vol.mkdir()
    (vol / "..2026_01").mkdir()
    (vol / "..2026_01" / "api-key").write_text("sk-first\n")
    os.symlink("..2026_01", vol / "..data")
    os.symlink("..data/api-key", vol / "api-key")
    base_config["secrets_dir"] = str(vol)
    proxy = proxy_factory(base_config)
    h = f"127.0.0.1:{upstream.port}"
    assert proxy.exchange(get(h)).status == 200
    assert upstream.last().values("Authorization") == [b"Bearer sk-first"]
    (vol / "..2026_02").mkdir()
    (vol / "..2026_02" / "api-key").write_text("sk-second\n")
    os.symlink("..2026_02", vol / "..data_tmp")
    os.replace(vol / "..data_tmp", vol / "..data")  # what kubelet does
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        proxy.exchange(get(h))
        if upstream.last().values("Authorization") == [b"Bearer sk-second"]:
            break
        time.sleep(0.1)
    assert upstream.last().values("Authorization") == [b"Bearer sk-second"]
    # The whole volume disappears: reload fails, counted as error, last known-good values stay.
    errors_before = proxy.metric("botbox_secrets_reload_total", result="error")
    vol.rename(tmp_path / "gone")
    assert not proxy.runtime.app.secrets.reload()  # type: ignore[union-attr]
    proxy.runtime._on_secrets_reload(False)  # what the watcher reports for that failure
    assert proxy.metric("botbox_secrets_reload_total", result="error") == errors_before + 1
    assert proxy.exchange(get(h)).status == 200
    assert upstream.last().values("Authorization") == [b"Bearer sk-second"]


def test_header_timeout_applies_to_later_requests_on_keepalive(
    proxy_factory: StartProxy, base_config: dict[str, Any], upstream: TLSUpstream
) -> None:
    base_config["request_header_timeout_seconds"] = 0.5
    proxy = proxy_factory(base_config)
    with proxy.connect() as s:
        s.sendall(get(f"127.0.0.1:{upstream.port}"))
        assert read_response(s).status == 200
        time.sleep(0.7)  # idle between requests is bounded by the idle timeout, not the header timeout
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1")  # ...but a started head must complete in time
        assert is_closed(s, 3.0)
    assert proxy.metric("botbox_connections_rejected_total", reason="timeout") == 1
