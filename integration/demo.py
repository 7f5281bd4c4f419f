"""``./dev demo``: build a pod and a fake internet, show BotBox at work, tear everything down.

Runs as root (network namespaces).  Prints one line per expectation with ✔/✘ and exits 1 if any
failed.  Credentials are shown as SHA-256 fingerprints only.  Uses its own addresses
(10.203.28.0/24, fd00:203:28::/64) and per-run namespace names, so it never collides with the tests.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from integration.upstream import fingerprint
from integration.world import PROXY_UID, World, WorldError, WorldOptions, parse_response

OPENAI = "api.openai.test"
DEMO_INDEX = 28


@dataclass
class Outcome:
    ok: bool
    detail: str


class Demo:
    def __init__(self, color: bool) -> None:
        self.color = color
        self.results: list[bool] = []

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def section(self, title: str) -> None:
        print(f"\n{self._c('1', title)}")

    def check(self, label: str, fn: Callable[[], Outcome]) -> None:
        try:
            out = fn()
        except Exception as exc:
            out = Outcome(False, f"error: {type(exc).__name__}: {exc}")
        self.results.append(out.ok)
        mark = self._c("32", "✔") if out.ok else self._c("31", "✘")
        print(f"  {mark} {label:<44} {out.detail}")


def short(fp: str) -> str:
    return f"sha256:{fp[:12]}…"


def blocked(world: World, op: str, match: dict[str, Any], **args: Any) -> Outcome:
    mark = world.hits_mark()
    res = world.app(op, **args)
    time.sleep(0.3)
    leaked = world.hits(mark, **match)
    if res["ok"] or leaked:
        app = res.get("error", "ok")
        return Outcome(False, f"NOT blocked (app: {app}, internet saw {len(leaked)} hit(s))")
    return Outcome(True, f"blocked ({res['error']}); nothing arrived")


def run_demo(world: World, demo: Demo) -> None:
    key_fp = world.expected_fingerprint("authorization")
    ip4, ip6 = world.host_ip(OPENAI), world.host_ip(OPENAI, 6)

    demo.section("Allowed egress: the app speaks plain HTTP and holds no key")

    def allowed_curl() -> Outcome:
        proc = world.curl("-i", f"http://{OPENAI}/v1/echo", "-H", "Authorization: Bearer app-made-this-up")
        resp = parse_response(proc.stdout)
        echo = resp.json()
        fps = echo["headers"]["sha256"].get("authorization", [])
        ok = resp.status == 200 and echo["sni"] == OPENAI and fps == [key_fp]
        return Outcome(ok, f"{resp.status}; upstream got TLS (SNI {echo['sni']}), 1 Authorization = "
                           f"{short(fps[0]) if fps else 'none'} (injected key {short(key_fp)})")

    demo.check(f"curl http://{OPENAI}/ (IPv4)", allowed_curl)

    def allowed_v6() -> Outcome:
        proc = world.curl("-6", f"http://{OPENAI}/v1/echo")
        echo = json.loads(proc.stdout)
        fps = echo["headers"]["sha256"].get("authorization", [])
        return Outcome(fps == [key_fp], f"200 over IPv6; key {short(fps[0]) if fps else 'missing'}")

    demo.check(f"curl -6 http://{OPENAI}/", allowed_v6)

    def openai_sdk() -> Outcome:
        dummy = "sk-dummy"
        res = world.app("openai", base_url=f"http://{OPENAI}/v1", api_key=dummy, timeout=90)
        seen = json.loads(res["content"])["authorization_sha256"]
        ok = seen == [key_fp] and fingerprint("Bearer " + dummy) not in seen
        return Outcome(ok, f"chat.completions OK; upstream saw {short(seen[0])}, not the dummy key")

    demo.check("openai SDK, api_key='sk-dummy'", openai_sdk)

    demo.section("Denied egress")
    for host in ("evil.test", "unlisted.test"):

        def denied(host: str = host) -> Outcome:
            mark = world.hits_mark()
            resp = parse_response(world.curl("-i", f"http://{host}/").stdout)
            ok = resp.status == 403 and not world.hits(mark)
            return Outcome(ok, f"{resp.status} {resp.body!r}; upstream contacted: {bool(world.hits(mark))}")

        demo.check(f"curl http://{host}/", denied)

    def connect() -> Outcome:
        req = f"CONNECT {OPENAI}:443 HTTP/1.1\r\nHost: {OPENAI}\r\n\r\n"
        res = world.app("tcp", host=ip4, port=80, send=req)
        resp = parse_response(res["response"])
        return Outcome(resp.status == 405, f"{resp.status} {resp.body!r}")

    demo.check("CONNECT tunnel", connect)

    for fam, ip in ((4, ip4), (6, ip6)):
        demo.section(f"Bypass attempts over IPv{fam} (app uid 1000)")
        for port in (443, 22):
            demo.check(f"TCP {ip} port {port}", functools.partial(
                blocked, world, "tcp", {"kind": "tcp", "local_ip": ip, "local_port": port},
                host=ip, port=port, timeout=2))
        demo.check(f"UDP {ip} port 443 (QUIC)", functools.partial(
            blocked, world, "udp", {"kind": "udp", "local_ip": ip}, host=ip, port=443, timeout=1))
        demo.check(f"ICMP echo to {ip}", functools.partial(
            blocked, world, "ping", {"kind": "icmp", "family": fam}, host=ip, timeout=1))

    demo.section("DNS restricted to the configured resolver (BOTBOX_DNS_SERVERS)")

    def dns_ok() -> Outcome:
        res = world.app("dns", server=world.dns_v4, name=OPENAI)
        return Outcome(res.get("answers") == [ip4], f"{world.dns_v4} answered {res.get('answers')}")

    demo.check("query the configured resolver", dns_ok)
    for server in (world.rogue_dns_v4, world.rogue_dns_v6):

        def rogue(server: str = server) -> Outcome:
            res = world.app("dns", server=server, name=OPENAI, timeout=1.5)
            return Outcome(not res["ok"], "blocked" if not res["ok"] else f"answered {res.get('answers')}")

        demo.check(f"query rogue resolver {server}", rogue)

    demo.section("The sidecar itself")

    def unreachable() -> Outcome:
        from integration.appclient import op_tcp
        from netsetup import netns

        res = netns.call_in_netns(world.inet, op_tcp, {"host": world.pod_v4, "port": 8080, "timeout": 2})
        return Outcome(not res["ok"], f"from the internet namespace: {res.get('error', 'CONNECTED')}")

    demo.check("proxy listener reachable from outside?", unreachable)

    def uid() -> Outcome:
        assert world.proxy is not None
        with open(f"/proc/{world.proxy.pid}/status", encoding="ascii") as fh:
            line = next(x for x in fh if x.startswith("Uid:"))
        uids = set(line.split()[1:])
        return Outcome(uids == {str(PROXY_UID)}, f"botbox runs as uid {','.join(sorted(uids))}")

    demo.check("proxy is unprivileged", uid)

    def no_secret_in_logs() -> Outcome:
        text = world.proxy_log.read_text(errors="replace")
        leaked = any(v in text for v in world.secret_history)
        n = len(world.proxy_log_records())
        return Outcome(not leaked and n > 0, f"{n} JSON log lines, key value present: {leaked}")

    demo.check("no credential in the proxy's logs", no_secret_in_logs)


def main() -> int:
    if os.geteuid() != 0:
        print("the demo needs root (network namespaces); run: sudo ./dev demo", file=sys.stderr)
        return 2
    demo = Demo(color=sys.stdout.isatty())
    t0 = time.monotonic()
    print("BotBox demo: building a pod and a fake internet in network namespaces …")
    try:
        with World(WorldOptions(index=DEMO_INDEX, dns_restricted=True)) as world:
            print(f"  pod {world.pod} ({world.pod_v4}, {world.pod_v6}) ⇄ internet {world.inet}; "
                  f"netsetup applied, botbox running as uid {PROXY_UID}, app as uid 1000 "
                  f"[{time.monotonic() - t0:.1f}s]")
            run_demo(world, demo)
            if not all(demo.results):
                print("\n" + world.debug_tail(15))
    except WorldError as exc:
        print(f"\n✘ could not build the world: {exc}", file=sys.stderr)
        return 1
    passed = sum(demo.results)
    print(f"\n{passed}/{len(demo.results)} expectations met; everything torn down "
          f"[{time.monotonic() - t0:.1f}s]")
    return 0 if demo.results and all(demo.results) else 1


if __name__ == "__main__":
    sys.exit(main())
