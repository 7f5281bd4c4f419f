"""What the sandboxed app does in the compose demo: try the allowed, the denied and the forbidden.

    python -m integration.compose.app_checks            # as the app (uid 1000): the whole scenario
    python -m integration.compose.app_checks --control  # as uid 1337: the same bypass attempts succeed

It runs in the app container (sharing the pod's network namespace, no proxy settings, no credentials)
and prints a human-readable line per step, then one line ``RESULTS {json}`` with every observation.
It asserts nothing itself: tests/compose assertions read the JSON. Blocked attempts are ordinary
results (``ok: false`` with the errno name), via the integration suite's ``appclient`` operations.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import sys
from typing import Any

from integration.appclient import op_read_file, op_resolve, op_tcp, op_udp

UPSTREAM_V4 = "10.203.50.20"
UPSTREAM_V6 = "fd00:203:50::20"
ALLOWED = "api.openai.test"
DENIED = "denied.test"
FORGED = "Bearer forged-by-the-app"


def http_get(url_host: str, port: int, path: str, *, tls: bool, host_header: str | None = None,
             connect_to: str | None = None) -> dict[str, Any]:
    """One GET; the app sends its own (forged) Authorization header, which must not survive."""
    target = connect_to or url_host
    try:
        if tls:
            cafile = os.environ.get("SSL_CERT_FILE")
            ctx = ssl.create_default_context(cafile=cafile)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                target, port, timeout=15, context=ctx)
        else:
            conn = http.client.HTTPConnection(target, port, timeout=15)
        headers = {"Authorization": FORGED, "X-Probe": "compose-e2e", "Host": host_header or url_host}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
        conn.close()
    except (OSError, http.client.HTTPException) as exc:
        return {"ok": False, "error": type(exc).__name__, "detail": str(exc)[:300]}
    out: dict[str, Any] = {"ok": True, "status": resp.status, "body": body[:4000],
                           "headers": [[k.lower(), v] for k, v in resp.getheaders()]}
    with contextlib.suppress(ValueError):
        out["json"] = json.loads(body)
    return out


def scenario() -> dict[str, Any]:
    r: dict[str, Any] = {"uid": os.getuid()}
    r["resolve_allowed"] = op_resolve({"name": ALLOWED})
    r["http_allowed"] = http_get(ALLOWED, 80, "/echo?via=http", tls=False)
    # the same over each address family explicitly (libc may prefer either)
    r["http_allowed_v4"] = http_get(ALLOWED, 80, "/echo?via=http-v4", tls=False, connect_to=UPSTREAM_V4)
    r["http_allowed_v6"] = http_get(ALLOWED, 80, "/echo?via=http-v6", tls=False, connect_to=UPSTREAM_V6)
    r["https_allowed"] = http_get(ALLOWED, 443, "/echo?via=https", tls=True)
    r["http_denied"] = http_get(DENIED, 80, "/", tls=False)
    r["https_denied"] = http_get(DENIED, 443, "/", tls=True)
    # IPv6: plain HTTP to the upstream's v6 address is redirected to the proxy too (denied: IP literal)
    r["http_v6_literal"] = http_get(f"[{UPSTREAM_V6}]", 80, "/", tls=False, connect_to=UPSTREAM_V6)
    r.update(bypass_attempts())
    # the sidecar's key material is not in this container at all
    r["read_ca_key"] = op_read_file({"path": "/etc/botbox/ca/tls.key"})
    r["read_api_key"] = op_read_file({"path": "/var/run/secrets/botbox/openai-api-key"})
    return r


def bypass_attempts() -> dict[str, Any]:
    r: dict[str, Any] = {}
    for fam, ip in (("v4", UPSTREAM_V4), ("v6", UPSTREAM_V6)):
        r[f"tcp_{fam}_8443"] = op_tcp({"host": ip, "port": 8443, "send": "GET / HTTP/1.0\r\n\r\n",
                                      "timeout": 2.0})
        r[f"udp_{fam}_443"] = op_udp({"host": ip, "port": 443, "payload": "quic-initial", "timeout": 1.0})
        # DNS to a resolver other than the pod's (the upstream's catch-all answers on 53)
        r[f"dns_{fam}_rogue"] = op_udp({"host": ip, "port": 53, "payload": "dns-query", "timeout": 1.0})
    return r


def main(argv: list[str]) -> int:
    results = bypass_attempts() if argv[1:] == ["--control"] else scenario()
    results["uid"] = os.getuid()
    results["hostname"] = socket.gethostname()
    for name, res in results.items():
        if isinstance(res, dict):
            summary = res.get("status", "ok" if res.get("ok") else res.get("error"))
            print(f"app: {name:<18} -> {summary}", flush=True)
    print("RESULTS " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
