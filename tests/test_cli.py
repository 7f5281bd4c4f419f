"""``botbox`` CLI as a real subprocess: exit codes, check-config, SIGTERM drain, JSON logs on stderr."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SECRET_VALUE
from tests.support.proxy import get, read_response, run_botbox, spawn_botbox, write_config
from tests.support.upstream import TLSUpstream


def test_check_config_valid_prints_policy_without_secret_values(
    tmp_path: Path, base_config: dict[str, Any]
) -> None:
    path = write_config(tmp_path / "c.yaml", base_config)
    out = run_botbox(["check-config", "--config", str(path)])
    assert out.returncode == 0, out.stderr
    assert "127.0.0.1" in out.stdout and "api-key" in out.stdout
    assert SECRET_VALUE not in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c: c.update(bogus_key=1), "bogus_key"),
        (lambda c: c.update(listen_addr="localhost"), "listen_addr"),
        (lambda c: c["egress_policy"]["rules"][0].update(allowed_ports=[]),
         "egress_policy.rules[0].allowed_ports"),
    ],
    ids=["unknown-key", "hostname-listen-addr", "empty-ports"],
)
def test_invalid_config_exits_2_naming_field(
    tmp_path: Path, base_config: dict[str, Any], mutate: Any, field: str
) -> None:
    mutate(base_config)
    path = write_config(tmp_path / "c.yaml", base_config)
    for cmd in ("check-config", "run"):
        out = run_botbox([cmd, "-c", str(path)])
        assert out.returncode == 2, (cmd, out.stderr)
        assert field in out.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    out = run_botbox(["run", "--config", str(tmp_path / "nope.yaml")])
    assert out.returncode == 2


def test_run_port_in_use_exits_1(tmp_path: Path, base_config: dict[str, Any]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", base_config["listen_port"]))
        s.listen(1)
        path = write_config(tmp_path / "c.yaml", base_config)
        out = run_botbox(["run", "-c", str(path)])
    assert out.returncode == 1
    assert "cannot listen" in out.stderr


def test_run_unreadable_upstream_ca_exits_1(tmp_path: Path, base_config: dict[str, Any]) -> None:
    base_config["upstream_ca_file"] = str(tmp_path / "missing-ca.pem")
    path = write_config(tmp_path / "c.yaml", base_config)
    out = run_botbox(["run", "-c", str(path)])
    assert out.returncode == 1
    assert "upstream_ca_file" in out.stderr


def test_run_serves_then_sigterm_drains_in_flight_and_exits_0(
    tmp_path: Path, base_config: dict[str, Any], upstream: TLSUpstream
) -> None:
    path = write_config(tmp_path / "c.yaml", base_config)
    p = spawn_botbox(["run", "--config", str(path)], tmp_path)
    try:
        p.wait_listening()
        port = base_config["listen_port"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(get(f"127.0.0.1:{upstream.port}", "/v1/x?key=querysecret",
                          headers=[("Authorization", "Bearer app-supplied-zzz")]))
            assert read_response(s).status == 200
        assert upstream.last().values("Authorization") == [b"Bearer " + SECRET_VALUE.encode()]
        busy = socket.create_connection(("127.0.0.1", port), timeout=10)
        busy.sendall(get(f"127.0.0.1:{upstream.port}", "/slow?delay=1"))
        time.sleep(0.3)
        p.proc.send_signal(signal.SIGTERM)
        r = read_response(busy)
        busy.close()
        assert r.status == 200 and r.body == b"slow"
        assert p.proc.wait(timeout=15) == 0
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
    err = p.stderr()
    records = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    reqs = [r for r in records if r["msg"] == "request"]
    assert len(reqs) == 2
    assert reqs[0]["path"] == "/v1/x" and reqs[0]["headers_rewritten"] == ["Authorization"]
    assert reqs[0]["orig_dst"] is None and reqs[0]["upstream_status"] == 200
    assert any(r["msg"].startswith("signal received") for r in records)
    for needle in (SECRET_VALUE, "app-supplied-zzz", "querysecret"):
        assert needle not in err


def test_run_with_non_loopback_warns(tmp_path: Path, base_config: dict[str, Any]) -> None:
    base_config["allow_non_loopback"] = True
    base_config["metrics_addr"] = "0.0.0.0"
    path = write_config(tmp_path / "c.yaml", base_config)
    p = spawn_botbox(["run", "-c", str(path)], tmp_path)
    try:
        p.wait_listening()
        p.proc.send_signal(signal.SIGINT)
        assert p.proc.wait(timeout=15) == 0
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
    warnings = [json.loads(line) for line in p.stderr().splitlines() if '"level":"warning"' in line]
    assert any("metrics_addr" in w["msg"] and "not loopback" in w["msg"] for w in warnings)


def test_workers_share_port_and_aggregate_metrics(
    tmp_path: Path, base_config: dict[str, Any], upstream: TLSUpstream
) -> None:
    base_config["workers"] = 2
    path = write_config(tmp_path / "c.yaml", base_config)
    p = spawn_botbox(["run", "--config", str(path)], tmp_path)
    try:
        deadline = time.monotonic() + 20
        while '"workers":[' not in p.stderr():
            assert p.proc.poll() is None, p.stderr()
            assert time.monotonic() < deadline, p.stderr()
            time.sleep(0.05)
        n = 12
        for _ in range(n):  # separate connections: the kernel spreads them over the workers
            with socket.create_connection(("127.0.0.1", base_config["listen_port"]), timeout=10) as s:
                s.sendall(get(f"127.0.0.1:{upstream.port}"))
                assert read_response(s).status == 200
        with socket.create_connection(("127.0.0.1", base_config["metrics_port"]), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            metrics = read_response(s).body.decode()
        with socket.create_connection(("127.0.0.1", base_config["metrics_port"]), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s).status == 200
        assert f'botbox_requests_total{{decision="allow",host="127.0.0.1"}} {float(n)}' in metrics
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=20) == 0
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
    listening = [json.loads(line) for line in p.stderr().splitlines() if '"msg":"listening"' in line]
    worker_pids = {r["pid"] for r in listening if "http" in r}
    assert len(worker_pids) == 2
    assert SECRET_VALUE not in p.stderr() and SECRET_VALUE not in metrics


def test_workers_startup_failure_exits_1(tmp_path: Path, base_config: dict[str, Any]) -> None:
    base_config["workers"] = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", base_config["listen_port"]))  # no SO_REUSEPORT: workers cannot join
        s.listen(1)
        path = write_config(tmp_path / "c.yaml", base_config)
        out = run_botbox(["run", "-c", str(path)])
    assert out.returncode == 1
    assert "cannot listen" in out.stderr
