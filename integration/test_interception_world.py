"""HTTPS interception in the namespace world: redirected TCP 443 (IPv4 + IPv6) → botbox TLS → upstream.

World 24: ``netsetup`` with ``BOTBOX_ENABLE_HTTPS_INTERCEPTION=1``; botbox (uid 1337) with a CA made by
``generate_ca`` (key 0400 owned by uid 1337, unreadable to the app); the app (uid 1000) trusts only the
public certificate, the way the README tells users to (``--cacert`` / ``SSL_CERT_FILE``).  Evidence comes
from the fake upstream's hit log (SNI, Host, credential fingerprints) and from botbox's logs/metrics.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from botbox.tls.ca import generate_ca, write_ca
from integration.world import APP_UID, OPENAI_SECRET, PROXY_UID, World, WorldOptions, parse_response

OPENAI = "api.openai.test"
TLS_PORT = 8443


def _enable_interception(ca_dir: Path) -> Any:
    def patch(cfg: dict[str, Any]) -> None:
        cfg["https_interception"] = {
            "enabled": True,
            "listen_addr": "127.0.0.1",
            "listen_port": TLS_PORT,
            "ca_cert_path": str(ca_dir / "tls.crt"),
            "ca_key_path": str(ca_dir / "tls.key"),
            "handshake_timeout_ms": 3000,
        }

    return patch


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    opts = WorldOptions(index=24, start_proxy=False,
                        netsetup_env={"BOTBOX_ENABLE_HTTPS_INTERCEPTION": "1",
                                      "BOTBOX_HTTPS_INTERCEPTION_PORT": str(TLS_PORT)})
    with World(opts) as w:
        ca_dir = w.root / "pki" / "botbox-ca"
        _, key = write_ca(ca_dir, *generate_ca("BotBox world CA", days=7))
        os.chown(key, PROXY_UID, PROXY_UID)  # 0400, readable by the proxy only (D3)
        os.chmod(ca_dir, 0o755)  # noqa: S103 - the public cert must be reachable by the app (umask-proof)
        w.opts.config_patch = _enable_interception(ca_dir)
        w.start_proxy()
        yield w


def ca_cert(world: World) -> str:
    return str(world.root / "pki" / "botbox-ca" / "tls.crt")


def assert_single_injected(world: World, echo: dict[str, Any]) -> None:
    assert echo["headers"]["counts"].get("authorization") == 1, echo["headers"]["counts"]
    assert echo["headers"]["sha256"]["authorization"] == [world.expected_fingerprint("authorization")]


@pytest.mark.parametrize("family", [4, 6])
def test_curl_over_redirected_443_gets_the_key_injected(world: World, family: int) -> None:
    mark, log_mark = world.hits_mark(), world.proxy_log_mark()
    ok0 = world.metric("botbox_tls_handshakes_total", result="ok")
    proc = world.curl(f"-{family}", "-i", "--cacert", ca_cert(world), "-H", "Authorization: Bearer dummy",
                      f"https://{OPENAI}/v1/echo?x=1")
    assert proc.returncode == 0, proc.stderr
    resp = parse_response(proc.stdout)
    assert resp.status == 200
    echo = resp.json()
    assert echo["sni"] == OPENAI and echo["target"] == "/v1/echo?x=1"
    assert echo["headers"]["values"]["host"] == [OPENAI]
    assert_single_injected(world, echo)
    assert world.secrets[OPENAI_SECRET] not in proc.stdout
    assert len(world.hits(mark, kind="https")) == 1
    assert world.metric("botbox_tls_handshakes_total", result="ok") == ok0 + 1
    ip = world.host_ip(OPENAI, family)
    want = f"[{ip}]:443" if family == 6 else f"{ip}:443"
    recs = [r for r in world.proxy_log_records(log_mark) if r.get("host") == OPENAI and "decision" in r]
    assert recs and recs[-1]["orig_dst"] == want and recs[-1]["decision"] == "allow"


def _python_as_app(world: World, code: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    assert world.rt is not None
    proc = world.run(world.pod, [world.rt.python, "-c", code], uid=APP_UID, env=env, timeout=60)
    assert proc.returncode == 0, world.redact(proc.stderr)[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_httpx_trusting_the_ca_over_ipv4_and_ipv6(world: World) -> None:
    code = f"""
import json, ssl, httpx
ctx = ssl.create_default_context(cafile={ca_cert(world)!r})
out = []
for local in ("0.0.0.0", "::"):
    transport = httpx.HTTPTransport(verify=ctx, local_address=local)
    with httpx.Client(verify=ctx, trust_env=False, transport=transport) as c:
        r = c.get("https://{OPENAI}/echo")
        out.append([r.status_code, r.json()["sni"], r.json()["headers"]["sha256"].get("authorization")])
print(json.dumps(out))
"""
    res = _python_as_app(world, code)
    want = [world.expected_fingerprint("authorization")]
    assert res == [[200, OPENAI, want], [200, OPENAI, want]]


def test_openai_sdk_over_https_with_ssl_cert_file(world: World) -> None:
    mark = world.hits_mark()
    code = f"""
import json, openai
c = openai.OpenAI(base_url="https://{OPENAI}/v1", api_key="sk-dummy-from-app", max_retries=0, timeout=20)
models = [m.id for m in c.models.list()]
msgs = [{{"role": "user", "content": "hi"}}]
chat = c.chat.completions.create(model="fake-model", messages=msgs)
stream = c.chat.completions.create(model="fake-model", messages=msgs, stream=True)
streamed = "".join((x.choices[0].delta.content or "") for x in stream if x.choices)
print(json.dumps({{"models": models, "content": chat.choices[0].message.content, "streamed": streamed}}))
"""
    res = _python_as_app(world, code, env={"SSL_CERT_FILE": ca_cert(world)})
    assert res["models"] and res["content"] and res["streamed"]
    hits = world.hits(mark, kind="https")
    assert len(hits) >= 3 and all(h["sni"] == OPENAI for h in hits)
    for h in hits:  # the upstream saw the injected key, never the app's dummy
        assert h["credentials"].get("authorization") == [world.expected_fingerprint("authorization")]


def test_denied_and_unlisted_hosts_get_403_and_reach_nothing(world: World) -> None:
    mark = world.hits_mark()
    for host in ("evil.test", "unlisted.test"):
        proc = world.curl("-4", "-i", "--cacert", ca_cert(world), f"https://{host}/")
        assert proc.returncode == 0, proc.stderr
        resp = parse_response(proc.stdout)
        assert (resp.status, resp.body) == (403, "host not allowed")
    assert world.hits(mark) == []


def test_domain_fronting_is_refused(world: World) -> None:
    mark = world.hits_mark()
    before = world.metric("botbox_https_interception_host_mismatch_total")
    proc = world.curl("-4", "-i", "--cacert", ca_cert(world), "-H", "Host: evil.test", f"https://{OPENAI}/")
    resp = parse_response(proc.stdout)
    assert (resp.status, resp.body) == (400, "SNI/Host header mismatch")
    assert world.metric("botbox_https_interception_host_mismatch_total") == before + 1
    assert world.hits(mark) == []


def test_app_without_the_ca_fails_and_nothing_is_forwarded(world: World) -> None:
    mark = world.hits_mark()
    proc = world.curl("-4", f"https://{OPENAI}/")  # system trust store only
    assert proc.returncode == 60, proc.stderr
    assert world.hits(mark) == []


def test_app_cannot_read_the_ca_key(world: World) -> None:
    res = world.app("read_file", path=str(world.root / "pki" / "botbox-ca" / "tls.key"))
    assert not res["ok"] and "Permission denied" in json.dumps(res)
    assert world.app("read_file", path=ca_cert(world))["ok"]


def test_healthz_ready_and_no_secret_or_key_in_logs(world: World) -> None:
    assert world.admin("/healthz") == (200, "ok")
    log = world.proxy_log.read_text(errors="replace")
    assert world.secrets[OPENAI_SECRET] not in log
    key_pem = (world.root / "pki" / "botbox-ca" / "tls.key").read_text()
    assert "".join(key_pem.splitlines()[1:-1])[:24] not in log
    assert "https interception enabled" in log


def test_streaming_through_interception_sse_and_large_bodies(world: World) -> None:
    n, interval_ms, size = 4, 300, 8 * 1024 * 1024
    code = f"""
import hashlib, json, ssl, time, httpx
ctx = ssl.create_default_context(cafile={ca_cert(world)!r})
out = {{}}
with httpx.Client(verify=ctx, trust_env=False, timeout=30) as c:
    events = []
    with c.stream("GET", "https://{OPENAI}/sse?n={n}&interval_ms={interval_ms}") as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append({{"recv": time.time(), "data": json.loads(line[6:])}})
    out["events"] = events
    h = hashlib.sha256()
    with c.stream("GET", "https://{OPENAI}/download?bytes={size}") as r:
        for chunk in r.iter_bytes():
            h.update(chunk)
        out["download"] = [h.hexdigest(), r.headers.get("x-body-sha256")]
    from integration.upstream import pattern_chunks
    r = c.post("https://{OPENAI}/upload", content=pattern_chunks({size}))
    out["upload"] = r.json()
print(json.dumps(out))
"""
    res = _python_as_app(world, code)
    events = res["events"]
    assert [e["data"]["i"] for e in events] == list(range(n))
    for cur, nxt in itertools.pairwise(events):  # each event arrived before the next was sent
        assert cur["recv"] < nxt["data"]["sent"], (cur, nxt)
    digest, expected = res["download"]
    assert digest == expected
    from integration.upstream import pattern_digest

    assert res["upload"]["sha256"] == pattern_digest(size) and res["upload"]["bytes"] == size


def test_interception_specific_refusals_over_redirected_443(world: World) -> None:
    """No SNI (IP-literal URL) ends the handshake; absolute-form → 400; Host port ≠ 443 → 403."""
    mark = world.hits_mark()
    ip = world.host_ip(OPENAI)
    code = f"""
import json, socket, ssl
ctx = ssl.create_default_context(cafile={ca_cert(world)!r})
def raw(req):
    with socket.create_connection(({ip!r}, 443), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname={OPENAI!r}) as t:
            t.sendall(req)
            data = b""
            while chunk := t.recv(65536):
                data += chunk
            return data.decode()
out = {{}}
try:
    nosni = ssl.create_default_context(cafile={ca_cert(world)!r})
    nosni.check_hostname = False
    with socket.create_connection(({ip!r}, 443), timeout=10) as s, nosni.wrap_socket(s) as t:
        out["nosni"] = "handshake completed?!"
except ssl.SSLError as exc:
    out["nosni"] = exc.reason
out["absolute"] = raw(b"GET https://{OPENAI}/x HTTP/1.1\\r\\nHost: {OPENAI}\\r\\n"
                      b"Connection: close\\r\\n\\r\\n")
out["port"] = raw(b"GET / HTTP/1.1\\r\\nHost: {OPENAI}:8443\\r\\nConnection: close\\r\\n\\r\\n")
print(json.dumps(out))
"""
    res = _python_as_app(world, code)
    assert res["nosni"] == "TLSV1_UNRECOGNIZED_NAME"
    absolute = parse_response(res["absolute"])
    assert (absolute.status, absolute.body) == (
        400, "absolute-form request not allowed on HTTPS interception listener")
    port = parse_response(res["port"])
    assert (port.status, port.body) == (403, "HTTPS interception listener only accepts port 443 traffic")
    assert world.hits(mark) == []
