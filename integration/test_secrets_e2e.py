"""End-to-end secret handling: fail closed while a secret is missing, pick up new files without restart.

The world starts with ``anthropic-api-key`` absent from the (kubelet-style) secret volume, so the
proxy must come up live but not ready.  Secrets are then published, rotated and deleted the way the
kubelet does it (``..data`` symlink swap).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from integration.upstream import fingerprint
from integration.world import (
    ANTHROPIC_SECRET,
    APP_UID,
    OPENAI_SECRET,
    PROXY_UID,
    World,
    WorldOptions,
    parse_response,
)

ANTHROPIC = "api.anthropic.test"
OPENAI = "api.openai.test"
RELOAD_WAIT = 40.0  # seconds; the contract's watcher may poll every 10 s


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    opts = WorldOptions(index=21, present_secrets=[OPENAI_SECRET], wait_healthy=False)
    with World(opts) as w:
        yield w


def request(world: World, host: str) -> tuple[int, Any]:
    proc = world.curl("-i", f"http://{host}/echo")
    assert proc.returncode == 0, proc.stderr
    resp = parse_response(proc.stdout)
    for value in world.secret_history:
        assert value not in proc.stdout
    body: Any = resp.body
    if resp.status == 200:
        body = resp.json()
    return resp.status, body


def wait_until(cond: Callable[[], bool], what: str, timeout: float = RELOAD_WAIT) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"{what} not observed within {timeout}s")


def test_secret_files_are_readable_by_the_proxy_uid_only(world: World) -> None:
    path = str(world.secrets_dir / OPENAI_SECRET)
    assert world.app("read_file", path=path, uid=PROXY_UID)["ok"]
    denied = world.app("read_file", path=path, uid=APP_UID)
    assert not denied["ok"] and denied["error"] == "EACCES"


def test_missing_secret_fails_closed_then_recovers_without_restart(world: World) -> None:
    assert world.proxy is not None
    pid = world.proxy.pid
    assert world.admin("/healthz") == (503, "not ready")
    assert world.admin("/livez") == (200, "ok")

    mark = world.hits_mark()
    status, body = request(world, ANTHROPIC)
    assert (status, body) == (500, "internal error: secret not available")
    assert world.hits(mark, kind="https") == [], "request forwarded without its credential"
    # Other rules keep working while one secret is missing.
    status, echo = request(world, OPENAI)
    assert status == 200
    assert echo["headers"]["sha256"]["authorization"] == [world.expected_fingerprint("authorization")]

    world.write_secret(ANTHROPIC_SECRET, "sk-ant-fresh-" + secrets.token_hex(8))
    wait_until(lambda: world.admin("/healthz") == (200, "ok"), "/healthz 200 after the secret appeared")
    status, echo = request(world, ANTHROPIC)
    assert status == 200
    assert echo["headers"]["counts"]["x-api-key"] == 1
    assert echo["headers"]["sha256"]["x-api-key"] == [world.expected_fingerprint("x-api-key")]
    assert world.proxy.poll() is None and world.proxy.pid == pid, "proxy restarted"
    assert world.metric("botbox_secrets_reload_total", result="ok") >= 1


def test_rotation_is_used_by_the_next_request(world: World) -> None:
    old_fp = world.expected_fingerprint("authorization")
    world.write_secret(OPENAI_SECRET, "sk-fake-rotated-" + secrets.token_hex(8))
    new_fp = world.expected_fingerprint("authorization")
    assert new_fp != old_fp
    seen: list[str] = []

    def rotated() -> bool:
        status, echo = request(world, OPENAI)
        assert status == 200
        fps = echo["headers"]["sha256"]["authorization"]
        assert len(fps) == 1 and fps[0] in (old_fp, new_fp), "neither the old nor the new credential"
        seen.append(fps[0])
        return bool(fps[0] == new_fp)

    wait_until(rotated, "rotated credential upstream")
    # From the switch on, every request carries the new value (no flapping back to the old one).
    for _ in range(3):
        status, echo = request(world, OPENAI)
        assert status == 200
        assert echo["headers"]["sha256"]["authorization"] == [new_fp]
    assert seen[-1] == new_fp and old_fp not in seen[seen.index(new_fp):]


def test_deleted_secret_fails_closed_until_restored(world: World) -> None:
    value = world.secrets[OPENAI_SECRET]
    world.delete_secret(OPENAI_SECRET)
    try:
        wait_until(lambda: request(world, OPENAI)[0] == 500, "500 after the secret file was deleted")
        assert world.admin("/healthz") == (503, "not ready")
        mark = world.hits_mark()
        assert request(world, OPENAI) == (500, "internal error: secret not available")
        assert world.hits(mark, kind="https") == []
    finally:
        world.write_secret(OPENAI_SECRET, value)
    wait_until(lambda: request(world, OPENAI)[0] == 200, "200 after the secret was restored")
    wait_until(lambda: world.admin("/healthz") == (200, "ok"), "/healthz 200 after restore")


def test_secret_with_newline_injection_fails_closed(world: World) -> None:
    """S4: a secret file that would smuggle a header is refused; nothing is forwarded with it."""
    good = world.secrets[ANTHROPIC_SECRET]
    world.write_secret(ANTHROPIC_SECRET, "sk-ant-evil\r\nX-Injected: yes")
    try:
        def refused() -> bool:
            return request(world, ANTHROPIC)[0] == 500

        wait_until(refused, "500 for a secret containing CR/LF")
        mark = world.hits_mark()
        assert request(world, ANTHROPIC)[0] == 500
        assert world.hits(mark, kind="https") == []
    finally:
        world.write_secret(ANTHROPIC_SECRET, good)
    wait_until(lambda: request(world, ANTHROPIC)[0] == 200, "200 after the good secret was restored")


def test_zz_secret_values_never_logged(world: World) -> None:
    log = world.proxy_log.read_text(errors="replace")
    assert log, "proxy wrote no logs at all"
    for value in world.secret_history:  # every value this module ever published
        assert value not in log
        assert fingerprint(value) not in log  # not even a digest of the raw value
    assert "sk-ant-evil" not in log
    for rec in world.proxy_log_records():
        assert "X-Injected" not in json.dumps(rec)
