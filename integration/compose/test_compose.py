"""compose.yaml end to end: the documented image build and the demo stack, for real.

One module fixture starts a private Docker engine in its own network namespace (engine.py), builds the
images with ``images/build.sh --local-base`` (debootstrapped base, hermetic wheelhouse; no registry
here), runs ``docker-compose up -d``, waits for the app container to exit (``docker wait``), collects
the app's observations, the init container's netsetup report and the fake upstream's hit log, runs the
same bypass attempts once more as uid 1337 (the control: the filter is what stops the app), and always
tears the stack down with ``down -v -t 1``. The tests below assert on what was collected.

Skipped, with the reason in the summary, only when no Docker engine can be started (not root, or
``docker.io docker-compose debootstrap`` not installed; ``./dev test`` installs them).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from integration.compose.engine import Engine, EngineUnavailable, private_engine

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
TAG = "e2e"
UPSTREAM_V4 = "10.203.50.20"
UPSTREAM_V6 = "fd00:203:50::20"
POD_V4 = "10.203.50.10"
POD_V6 = "fd00:203:50::10"

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1200)]


@dataclass
class Run:
    api_key: str
    timings: dict[str, float] = field(default_factory=dict)
    app: dict[str, Any] = field(default_factory=dict)
    app_exit: int | None = None
    init_exit: int | None = None
    init_log: str = ""
    all_logs: str = ""
    hits_before_control: list[dict[str, Any]] = field(default_factory=list)
    hits_after_control: list[dict[str, Any]] = field(default_factory=list)
    control: dict[str, Any] = field(default_factory=dict)
    image_sizes: dict[str, int] = field(default_factory=dict)


def _sh(engine: Engine, *argv: str, timeout: float = 600, check: bool = True) -> str:
    proc = subprocess.run(argv, env=engine.env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc.stdout


def _results(log: str) -> dict[str, Any]:
    for line in log.splitlines():
        if line.startswith("RESULTS "):
            data: dict[str, Any] = json.loads(line[len("RESULTS "):])
            return data
    raise AssertionError(f"no RESULTS line in the app's output:\n{log[-3000:]}")


def _hits(engine: Engine, container: str) -> list[dict[str, Any]]:
    out = _sh(engine, engine.docker, "exec", container, "cat", "/tmp/hits.jsonl")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    result = Run(api_key="sk-compose-" + secrets.token_hex(16))
    t0 = time.monotonic()
    try:
        with private_engine() as engine:
            result.timings["engine_start_s"] = time.monotonic() - t0
            _collect(engine, result)
            t_stop = time.monotonic()
        result.timings["engine_stop_s"] = time.monotonic() - t_stop
    except EngineUnavailable as exc:
        pytest.skip(f"compose end-to-end test SKIPPED: no Docker engine: {exc}")
    result.timings["total_s"] = time.monotonic() - t0
    print(f"\ncompose e2e timings: {json.dumps({k: round(v, 1) for k, v in result.timings.items()})}"
          f" image sizes (MB): {json.dumps({k: round(v / 1e6) for k, v in result.image_sizes.items()})}")
    yield result


def _collect(engine: Engine, result: Run) -> None:
    project = f"bbe2e{uuid.uuid4().hex[:8]}"
    compose = ["docker-compose", "-p", project, "-f", str(COMPOSE_FILE)]
    t = time.monotonic()
    _sh(engine, str(ROOT / "images" / "build.sh"), "--local-base", "--tag", TAG, timeout=900)
    result.timings["build_s"] = time.monotonic() - t
    for target in ("sidecar", "iptables-init", "demo"):
        size = _sh(engine, engine.docker, "image", "inspect", "-f", "{{.Size}}", f"botbox/{target}:{TAG}")
        result.image_sizes[target] = int(size.strip())
    env_cmd = ["env", f"BOTBOX_TAG={TAG}", f"BOTBOX_DEMO_OPENAI_KEY={result.api_key}"]
    t = time.monotonic()
    try:
        _sh(engine, *env_cmd, *compose, "up", "-d", "--no-build", timeout=300)
        app_id = _sh(engine, *compose, "ps", "-q", "app").strip()
        assert app_id, "compose did not create the app container"
        result.app_exit = int(_sh(engine, engine.docker, "wait", app_id, timeout=300).strip())
        result.timings["up_to_app_exit_s"] = time.monotonic() - t
        result.app = _results(_sh(engine, engine.docker, "logs", app_id))
        init_id = _sh(engine, *compose, "ps", "-q", "iptables-init").strip()
        result.init_exit = int(_sh(engine, engine.docker, "inspect", "-f", "{{.State.ExitCode}}", init_id))
        result.init_log = _sh(engine, engine.docker, "logs", init_id)
        upstream_id = _sh(engine, *compose, "ps", "-q", "upstream").strip()
        result.hits_before_control = _hits(engine, upstream_id)
        pod_id = _sh(engine, *compose, "ps", "-q", "pod").strip()
        control_log = _sh(engine, engine.docker, "run", "--rm", "--network", f"container:{pod_id}",
                          "--user", "1337:1337", "--read-only", "--cap-drop", "ALL",
                          f"botbox/demo:{TAG}", "python", "-m", "integration.compose.app_checks",
                          "--control", timeout=120)
        result.control = _results(control_log)
        result.timings["through_control_s"] = time.monotonic() - t
        result.hits_after_control = _hits(engine, upstream_id)
        result.all_logs = _sh(engine, *compose, "logs", "--no-color", "--timestamps", check=False)
    finally:
        t = time.monotonic()
        _sh(engine, *compose, "down", "-v", "-t", "1", "--remove-orphans", check=False, timeout=300)
        result.timings["down_s"] = time.monotonic() - t
        t = time.monotonic()
        # Old untagged images only: recent ones are the classic builder's cache (deps stage etc.).
        _sh(engine, engine.docker, "image", "prune", "-f", "--filter", "until=168h", check=False)
        result.timings["prune_s"] = time.monotonic() - t


def _fingerprint(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# --------------------------------------------------------------------------------------------- tests
def test_init_container_applied_and_live_probe_passed(run: Run) -> None:
    assert run.init_exit == 0, run.init_log[-3000:]
    log = run.init_log
    assert "FAILED" not in log, log[-3000:]
    assert "verify: ok" in log
    for fam in ("ipv4", "ipv6"):
        # the live probe (N6): a non-proxy uid is redirected, the proxy uid is not, UDP is blocked
        assert f"probe {fam} tcp/80->8080 as uid 65534: ok" in log, log[-3000:]
        assert f"probe {fam} tcp/80->8080 as proxy uid 1337: ok" in log
        assert f"probe {fam} udp/443 as uid 65534: ok" in log


def test_app_ran_as_non_proxy_uid_and_finished(run: Run) -> None:
    assert run.app_exit == 0
    assert run.app["uid"] == 1000
    assert run.app["resolve_allowed"]["addresses"] == sorted([UPSTREAM_V4, UPSTREAM_V6])


@pytest.mark.parametrize("check", ["http_allowed", "http_allowed_v4", "http_allowed_v6", "https_allowed"])
def test_allowed_host_gets_the_injected_key_instead_of_the_apps_header(run: Run, check: str) -> None:
    res = run.app[check]
    assert res["ok"] and res["status"] == 200, res
    seen = res["json"]["headers"]
    # exactly one Authorization reached the upstream, and it is the sidecar's key (S2 delete-then-add)
    assert seen["counts"]["authorization"] == 1
    assert seen["sha256"]["authorization"] == [_fingerprint(f"Bearer {run.api_key}")]
    assert seen["values"]["host"] == ["api.openai.test"]
    assert res["json"]["sni"] == "api.openai.test"  # the proxy originated verified TLS (R4)
    # the key never travels back to the app
    assert run.api_key not in json.dumps(res)


def test_allowed_requests_really_used_both_address_families(run: Run) -> None:
    upstream_seen = {h["local_ip"] for h in run.hits_before_control if h.get("kind") == "https"}
    assert upstream_seen  # the proxy reached the upstream
    assert "/echo?via=http-v4" in json.dumps(run.app["http_allowed_v4"]["json"])
    assert "/echo?via=http-v6" in json.dumps(run.app["http_allowed_v6"]["json"])


@pytest.mark.parametrize("check", ["http_denied", "https_denied", "http_v6_literal"])
def test_denied_host_gets_403(run: Run, check: str) -> None:
    res = run.app[check]
    assert res["ok"], res
    assert (res["status"], res["body"]) == (403, "host not allowed")


@pytest.mark.parametrize("fam", ["v4", "v6"])
@pytest.mark.parametrize("kind", ["tcp", "udp", "dns"])
def test_direct_bypass_fails_for_the_app_but_works_for_the_proxy_uid(run: Run, kind: str, fam: str) -> None:
    name = {"tcp": f"tcp_{fam}_8443", "udp": f"udp_{fam}_443", "dns": f"dns_{fam}_rogue"}[kind]
    app, control = run.app[name], run.control[name]
    assert app["ok"] is False, f"app bypass {name} succeeded: {app}"
    # the control (uid 1337, same namespace, same target) gets through: the filter stopped the app
    assert run.control["uid"] == 1337
    assert control["ok"] is True, f"control {name} failed, so the app's failure proves nothing: {control}"


def test_no_bypass_attempt_reached_the_upstream(run: Run) -> None:
    pod = {POD_V4, POD_V6}
    direct = [h for h in run.hits_before_control if h.get("peer") in pod and h.get("kind") in {"tcp", "udp"}
              and h.get("local_port") != 443]
    assert direct == [], direct
    udp443 = [h for h in run.hits_before_control if h.get("kind") == "udp"]
    assert udp443 == []
    after = {(h["kind"], h["local_port"]) for h in run.hits_after_control if h.get("peer") in pod}
    assert {("tcp", 8443), ("udp", 443), ("udp", 53)} <= after  # the control's hits are recorded


def test_app_cannot_read_the_sidecars_key_material(run: Run) -> None:
    assert run.app["read_ca_key"]["error"] == "ENOENT"
    assert run.app["read_api_key"]["error"] == "ENOENT"


def test_secret_never_appears_in_any_container_log(run: Run) -> None:
    assert run.all_logs, "no logs collected"
    assert '"headers_rewritten":["Authorization"]' in run.all_logs.replace(" ", "")
    assert run.api_key not in run.all_logs
    assert run.api_key not in run.init_log
