"""End-to-end: the app (uid 1000) talks plain HTTP; the proxy (uid 1337) enforces, injects, originates TLS.

Every request here leaves the app as ordinary plain HTTP to port 80 of a name resolved through the
pod's resolver, is redirected by netsetup's rules to the proxy, and reaches the fake upstream (if at
all) over verified TLS.  Assertions look at both ends: what the app got back and what the upstream saw
(SNI, Host, credential fingerprints).
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.upstream import fingerprint, pattern_digest
from integration.world import (
    ANTHROPIC_SECRET,
    OPENAI_SECRET,
    PROXY_UID,
    RawResponse,
    World,
    WorldOptions,
    parse_response,
)

OPENAI = "api.openai.test"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with World(WorldOptions(index=20)) as w:
        yield w


def raw_http(world: World, request: str, host_ip: str | None = None, port: int = 80) -> RawResponse:
    """Send ``request`` verbatim from the app to ``host_ip:port`` (redirected to the proxy)."""
    res = world.app("tcp", host=host_ip or world.host_ip(OPENAI), port=port, send=request, timeout=10)
    assert res["ok"], res
    return parse_response(res["response"])


def get(path: str, host_header: str, extra: str = "") -> str:
    return f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n{extra}Connection: close\r\n\r\n"


def https_hits(world: World, since: int) -> list[dict[str, Any]]:
    return world.hits(since, kind="https")


def assert_single_injected(world: World, echo: dict[str, Any], header: str = "authorization") -> None:
    headers = echo["headers"]
    assert headers["counts"].get(header) == 1, headers["counts"]
    assert headers["sha256"][header] == [world.expected_fingerprint(header)]


def test_allowed_plain_http_is_upgraded_to_tls_with_exactly_one_credential(world: World) -> None:
    mark, log_mark = world.hits_mark(), world.proxy_log_mark()
    allow0 = world.metric("botbox_requests_total", host=OPENAI, decision="allow")
    rewrites0 = world.metric("botbox_header_rewrites_total", host=OPENAI)

    proc = world.curl("-4", "-i", f"http://{OPENAI}/v1/echo?q=secret-free")
    assert proc.returncode == 0, proc.stderr
    resp = parse_response(proc.stdout)
    assert resp.status == 200
    echo = resp.json()
    # The upstream is TLS-only: it answering at all proves the upgrade; SNI and Host are the policy host.
    assert echo["sni"] == OPENAI
    # P5: the proxy resolved the name itself and connected to one of its addresses on 443.
    assert echo["local"] in (f"{world.host_ip(OPENAI)}:443", f"{world.host_ip(OPENAI, 6)}:443")
    assert echo["headers"]["values"]["host"] == [OPENAI]
    assert echo["target"] == "/v1/echo?q=secret-free"
    assert_single_injected(world, echo)
    # The credential never comes back to the app.
    assert world.secrets[OPENAI_SECRET] not in proc.stdout

    hits = https_hits(world, mark)
    assert len(hits) == 1 and hits[0]["sni"] == OPENAI
    assert world.metric("botbox_requests_total", host=OPENAI, decision="allow") == allow0 + 1
    assert world.metric("botbox_header_rewrites_total", host=OPENAI) == rewrites0 + 1
    records = [r for r in world.proxy_log_records(log_mark) if r.get("host") == OPENAI]
    assert records, "no request log line for the allowed request"
    rec = records[-1]
    assert rec["decision"] == "allow"
    assert rec["orig_dst"] == f"{world.host_ip(OPENAI)}:80"
    assert rec["path"] == "/v1/echo"  # no query string in logs
    assert [h.lower() for h in rec["headers_rewritten"]] == ["authorization"]


def test_allowed_over_ipv6(world: World) -> None:
    log_mark = world.proxy_log_mark()
    proc = world.curl("-6", f"http://{OPENAI}/echo")
    assert proc.returncode == 0, proc.stderr
    echo = json.loads(proc.stdout)
    assert echo["sni"] == OPENAI
    assert_single_injected(world, echo)
    records = [r for r in world.proxy_log_records(log_mark) if r.get("host") == OPENAI]
    assert records and world.host_ip(OPENAI, 6) in str(records[-1]["orig_dst"])


@pytest.mark.parametrize("host", ["evil.test", "unlisted.test"])
def test_denied_host_gets_403_and_reaches_nothing(world: World, host: str) -> None:
    mark = world.hits_mark()
    denied0 = world.metric("botbox_requests_total", host="_denied", decision="deny")
    proc = world.curl("-i", f"http://{host}/echo")
    assert proc.returncode == 0, proc.stderr
    resp = parse_response(proc.stdout)
    assert resp.status == 403
    assert resp.body == "host not allowed"
    assert world.hits(mark) == [], "the denied upstream was contacted"
    assert world.metric("botbox_requests_total", host="_denied", decision="deny") == denied0 + 1


def test_allowed_host_on_non_allowed_port_is_denied(world: World) -> None:
    mark = world.hits_mark()
    # Through the redirect, with the port named in Host: checked as given (CONTRACT §2).
    resp = raw_http(world, get("/echo", f"{OPENAI}:8443"))
    assert resp.status == 403 and resp.body == "host not allowed"
    # Directly to the port: not redirected, so the filter must stop it.
    direct = world.app("tcp", host=world.host_ip(OPENAI), port=8443, send="GET / HTTP/1.0\r\n\r\n",
                       timeout=1.5)
    assert not direct["ok"], direct
    assert world.hits(mark) == []
    # Control: the same request naming 443 explicitly is allowed.
    ok = raw_http(world, get("/echo", f"{OPENAI}:443"))
    assert ok.status == 200
    assert ok.json()["headers"]["values"]["host"] == [OPENAI]  # R3: port 443 omitted


def test_attacker_supplied_credentials_are_replaced(world: World) -> None:
    extra = "Authorization: Bearer attacker-1\r\nAUTHORIZATION: Basic YXR0YWNrZXI=\r\nauthorization: x\r\n"
    resp = raw_http(world, get("/echo", OPENAI, extra))
    assert resp.status == 200
    assert_single_injected(world, resp.json())
    # Same for a custom header name (x-api-key) on another rule.
    extra = "X-Api-Key: attacker\r\nx-api-key: attacker-2\r\n"
    anthropic = "api.anthropic.test"
    resp = raw_http(world, get("/echo", anthropic, extra), host_ip=world.host_ip(anthropic))
    assert resp.status == 200
    echo = resp.json()
    assert_single_injected(world, echo, "x-api-key")
    assert "authorization" not in echo["headers"]["counts"]  # no cross-rule leak


def test_no_credential_for_allowed_host_without_rewrite(world: World) -> None:
    resp = raw_http(world, get("/echo", "public.test", "Authorization: Bearer app-own\r\n"),
                    host_ip=world.host_ip("public.test"))
    assert resp.status == 200
    echo = resp.json()
    injected = {world.expected_fingerprint("authorization"), world.expected_fingerprint("x-api-key")}
    seen = {fp for fps in echo["headers"]["sha256"].values() for fp in fps}
    assert not injected & seen


def test_upstream_certificate_is_verified(world: World) -> None:
    """R4: an allowed host whose upstream presents a certificate for other names gets 502, no request."""
    host = "wrongcert.test"
    mark = world.hits_mark()
    errors0 = world.metric("botbox_upstream_errors_total", host=host)
    proc = world.curl("-i", f"http://{host}/echo")
    assert proc.returncode == 0, proc.stderr
    resp = parse_response(proc.stdout)
    assert (resp.status, resp.body) == (502, "upstream connection failed")
    hits = world.hits(mark)
    assert any(h["kind"] == "tcp" and h["local_port"] == 443 for h in hits), "proxy never tried the upstream"
    assert [h for h in hits if h["kind"] == "https"] == [], "a request went over unverified TLS"
    assert world.metric("botbox_upstream_errors_total", host=host) == errors0 + 1


def test_credential_named_response_headers_are_removed(world: World) -> None:
    resp = raw_http(world, get("/reflect-credentials", OPENAI))
    assert resp.status == 200
    assert resp.header("authorization") == []
    assert resp.header("x-benign") == ["kept"]


def test_connect_is_refused_with_405(world: World) -> None:
    mark = world.hits_mark()
    c0 = world.metric("botbox_requests_total", decision="denied_connect")
    resp = raw_http(world, f"CONNECT {OPENAI}:443 HTTP/1.1\r\nHost: {OPENAI}:443\r\n\r\n")
    assert resp.status == 405
    assert resp.body == "CONNECT method not allowed"
    assert world.hits(mark) == []
    assert world.metric("botbox_requests_total", decision="denied_connect") == c0 + 1
    # curl's proxy tunnel fails the same way.
    proc = world.curl("-p", "-x", f"http://{OPENAI}:80", f"https://{OPENAI}/")
    assert proc.returncode != 0
    assert "405" in proc.stderr


def test_sse_arrives_incrementally(world: World) -> None:
    n, interval_ms = 5, 400
    res = world.app("sse", url=f"http://{OPENAI}/sse?n={n}&interval_ms={interval_ms}")
    assert res["status"] == 200
    events = res["events"]
    assert [e["data"]["i"] for e in events] == list(range(n))
    # Each event reached the app before the upstream had even produced the next one.
    for cur, nxt in itertools.pairwise(events):
        assert cur["recv"] < nxt["data"]["sent"], (cur, nxt)


def _proxy_hwm_kib(world: World) -> int:
    assert world.proxy is not None
    for line in Path(f"/proc/{world.proxy.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_large_bodies_stream_both_ways(world: World) -> None:
    size = 48 << 20
    hwm0 = _proxy_hwm_kib(world)
    down = world.app("download", url=f"http://{OPENAI}/download?bytes={size}", timeout=120)
    assert down["status"] == 200
    assert down["bytes"] == size
    assert down["sha256"] == down["expected_sha256"] == pattern_digest(size)
    up = world.app("upload", url=f"http://{OPENAI}/upload", bytes=size, timeout=120)
    assert up["status"] == 200
    assert json.loads(up["body"]) == {"bytes": size, "sha256": pattern_digest(size)}
    # Streaming, not buffering: the proxy's peak RSS grew by far less than one body.
    growth_mib = (_proxy_hwm_kib(world) - hwm0) / 1024
    assert growth_mib < 24, f"proxy peak RSS grew {growth_mib:.1f} MiB for 48 MiB bodies"


def test_httpx_keepalive_requests_each_get_the_credential(world: World) -> None:
    res = world.app("http", url=f"http://{OPENAI}/echo", repeat=3,
                    headers={"Authorization": "Bearer from-the-app"})
    assert [r["status"] for r in res["responses"]] == [200, 200, 200]
    for r in res["responses"]:
        assert_single_injected(world, json.loads(r["body"]))


def test_official_openai_sdk_gets_injected_key_not_dummy(world: World) -> None:
    dummy = "sk-dummy-not-a-real-key"
    res = world.app("openai", base_url=f"http://{OPENAI}/v1", api_key=dummy, timeout=90)
    assert res["models"] == ["fake-model"]
    for content in (res["content"], res["streamed"]):
        seen = json.loads(content)
        assert seen["authorization_count"] == 1
        assert seen["authorization_sha256"] == [world.expected_fingerprint("authorization")]
        assert fingerprint("Bearer " + dummy) not in seen["authorization_sha256"]


# ---------------------------------------------------------------- Host-header tricks
@pytest.mark.parametrize("host_header", ["api.openai.test.", "API.OpenAI.TEST", "Api.OpenAI.Test.:443"])
def test_host_variants_canonicalise_to_the_rule(world: World, host_header: str) -> None:
    mark = world.hits_mark()
    resp = raw_http(world, get("/echo", host_header))
    assert resp.status == 200
    echo = resp.json()
    assert echo["sni"] == OPENAI
    assert echo["headers"]["values"]["host"] == [OPENAI]
    assert_single_injected(world, echo)
    assert len(https_hits(world, mark)) == 1


@pytest.mark.parametrize(
    "host_header",
    [
        "api.openai.test:8443",
        "api.openai.test:0443",
        "api.openai.test:+443",
        "api.openai.test:99999",
        "api.openai.test:443:443",
        "api.openai.test@evil.test",
        "evil.test:443",
        "EVIL.TEST.",
        "api.openai.test..",
        "api.openai.test%2e",
        "localhost",
        "127.0.0.1:9090",  # the proxy's own admin listener
        "[::1]:8080",
    ],
)
def test_host_tricks_never_reach_an_upstream(world: World, host_header: str) -> None:
    mark = world.hits_mark()
    resp = raw_http(world, get("/echo", host_header))
    assert resp.status in (400, 403), resp
    assert world.hits(mark) == []


def test_each_pipelined_request_is_decided_on_its_own(world: World) -> None:
    """One client connection, three Hosts: the decision, the upstream and the key follow each request."""
    mark = world.hits_mark()
    request = (
        get("/echo?n=1", "public.test").replace("Connection: close\r\n", "")
        + get("/echo?n=2", OPENAI).replace("Connection: close\r\n", "")
        + get("/echo?n=3", "evil.test")
    )
    res = world.app("tcp", host=world.host_ip("public.test"), port=80, send=request, timeout=10)
    assert res["ok"], res
    statuses = [int(code) for code in re.findall(r"HTTP/1\.1 (\d{3}) ", res["response"])]
    assert statuses == [200, 200, 403], res["response"][:500]
    hits = {h["target"]: h for h in https_hits(world, mark)}
    assert set(hits) == {"/echo?n=1", "/echo?n=2"}
    assert hits["/echo?n=1"]["sni"] == "public.test" and hits["/echo?n=1"]["credentials"] == {}
    assert hits["/echo?n=2"]["sni"] == OPENAI
    assert hits["/echo?n=2"]["credentials"]["authorization"] == [world.expected_fingerprint("authorization")]


def test_ambiguous_framing_is_rejected_before_anything_is_forwarded(world: World) -> None:
    """R5 end to end: Content-Length + Transfer-Encoding → 400, connection closed, upstream untouched."""
    mark = world.hits_mark()
    req = (f"POST /upload HTTP/1.1\r\nHost: {OPENAI}\r\nContent-Length: 5\r\n"
           "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    res = world.app("tcp", host=world.host_ip(OPENAI), port=80, send=req, timeout=10)
    assert res["ok"] and not res.get("read_timeout"), res  # the proxy closed the connection
    resp = parse_response(res["response"])
    assert (resp.status, resp.body) == (400, "bad request")
    assert res["response"].count("HTTP/1.1 ") == 1
    assert world.hits(mark) == []


def test_missing_host_is_rejected(world: World) -> None:
    mark = world.hits_mark()
    c0 = world.metric("botbox_requests_total", decision="denied_no_host")
    resp = raw_http(world, "GET /echo HTTP/1.0\r\n\r\n")
    assert (resp.status, resp.body) == (400, "missing host")
    assert world.hits(mark) == []
    assert world.metric("botbox_requests_total", decision="denied_no_host") == c0 + 1


def test_duplicate_host_is_rejected(world: World) -> None:
    mark = world.hits_mark()
    resp = raw_http(world, f"GET /echo HTTP/1.1\r\nHost: {OPENAI}\r\nHost: evil.test\r\n\r\n")
    assert resp.status == 400
    assert world.hits(mark) == []


def test_absolute_form_for_a_denied_host_is_denied(world: World) -> None:
    """The request-target's authority wins over Host (RFC 9112 §3.2.2): evil.test, not api.openai.test."""
    mark = world.hits_mark()
    req = f"GET http://evil.test/echo HTTP/1.1\r\nHost: {OPENAI}\r\nConnection: close\r\n\r\n"
    resp = raw_http(world, req)
    assert resp.status in (400, 403), resp
    assert world.hits(mark) == []


def test_absolute_form_never_sends_a_credential_to_another_host(world: World) -> None:
    """``GET http://public.test/`` + ``Host: api.openai.test``: the OpenAI key must not go to public.test."""
    mark = world.hits_mark()
    resp = raw_http(
        world,
        f"GET http://public.test/echo HTTP/1.1\r\nHost: {OPENAI}\r\nConnection: close\r\n\r\n",
        host_ip=world.host_ip("public.test"),
    )
    assert resp.status in (200, 400, 403), resp
    injected = world.expected_fingerprint("authorization")
    for hit in https_hits(world, mark):
        # Whatever was contacted, SNI and Host agree, and the key only ever goes to its own host.
        assert hit["host"] == [hit["sni"]]
        if injected in hit["credentials"].get("authorization", []):
            assert hit["sni"] == OPENAI


def test_direct_upstream_ip_in_host_header_is_denied(world: World) -> None:
    mark = world.hits_mark()
    resp = raw_http(world, get("/echo", world.host_ip(OPENAI)))
    assert resp.status == 403
    resp = raw_http(world, get("/echo", f"[{world.host_ip(OPENAI, 6)}]"), host_ip=world.host_ip(OPENAI, 6))
    assert resp.status == 403
    assert world.hits(mark) == []


# ---------------------------------------------------------------- secrets never leak (keep last)
def test_zz_no_secret_in_logs_metrics_or_hits(world: World) -> None:
    time.sleep(0.2)  # let the last log lines land
    _, metrics_text = world.admin("/metrics")
    texts = {
        "proxy log": world.proxy_log.read_text(errors="replace"),
        "metrics": metrics_text,
        "upstream hits": world.hits_log.read_text(),
        "netsetup output": world.netsetup_output,
    }
    for name in (OPENAI_SECRET, ANTHROPIC_SECRET):
        value = world.secrets[name]
        for where, text in texts.items():
            assert value not in text, f"secret {name} appears in {where}"
    # And the proxy did log requests (so the check above looked at something real).
    assert any(r.get("decision") == "allow" for r in world.proxy_log_records())
    # The proxy really runs as the exempt uid.
    assert world.proxy is not None
    status = Path(f"/proc/{world.proxy.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(PROXY_UID)] * 4


def test_zzz_sigterm_drains_the_in_flight_stream_and_exits_zero(world: World) -> None:
    """CONTRACT §1: SIGTERM stops accepting, lets in-flight requests finish (grace 2 s here), exits 0."""
    assert world.proxy is not None
    result: dict[str, Any] = {}

    def stream() -> None:
        try:
            result["sse"] = world.app("sse", url=f"http://{OPENAI}/sse?n=4&interval_ms=300")
        except Exception as exc:
            result["error"] = exc

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 10
    while not world.hits(0, kind="https", target="/sse?n=4&interval_ms=300") and time.monotonic() < deadline:
        time.sleep(0.02)
    world.proxy.send_signal(signal.SIGTERM)
    t.join(timeout=30)
    assert "error" not in result, result
    events = result["sse"]["events"]
    assert [e["data"]["i"] for e in events] == [0, 1, 2, 3], "in-flight stream cut by shutdown"
    assert world.proxy.wait(timeout=15) == 0
