"""netsetup against the real kernel: every test builds its own pod + "internet" namespace pair.

Topology per test (unique names per run, deleted in fixture finalizers even on failure)::

    pod ns  va0xxxxx 10.203.1N.2/24 fd00:203:1N::2/64  <-veth->  inet ns 10.203.1N.1/24 fd00:203:1N::1/64

The pod-side veth name deliberately starts with ``va0``: its characters share their lowest bits with
``lo\\0``, so a rule whose interface mask only compares the lowest bit (python-iptables' IPv6 bug) would
treat it as loopback.  That keeps the mask regression deterministic.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import secrets
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netsetup import bpf, netns

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, iptables, nft)"),
    pytest.mark.skipif(shutil.which("nft") is None or shutil.which("iptables-legacy-save") is None,
                       reason="needs nft and iptables-legacy"),
]

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = "/opt/botbox/venv/bin/python"
PY = VENV_PY if os.path.exists(VENV_PY) else shutil.which("python3")
APP_UID = 65534
PROXY_UID = 1337
_subnets = itertools.count()
BACKENDS = ["nft", "legacy"]


@dataclass
class World:
    pod: netns.Namespace
    inet: netns.Namespace
    pod_if: str
    n: int

    @property
    def inet_v4(self) -> str:
        return f"10.203.{10 + self.n}.1"

    @property
    def inet_v6(self) -> str:
        return f"fd00:203:{10 + self.n}::1"

    def netsetup(self, *args: str, env: dict[str, str] | None = None,
                 path: str | None = None) -> subprocess.CompletedProcess[str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("BOTBOX_")}
        e["PYTHONPATH"] = str(ROOT)
        if path is not None:
            e["PATH"] = path
        e.update(env or {})
        return self.pod.run([str(PY), "-m", "netsetup", *args], env=e, cwd=str(ROOT), capture_output=True,
                            text=True, timeout=120)

    def sh(self, cmd: str, ns: netns.Namespace | None = None) -> str:
        p = (ns or self.pod).run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"{cmd}: {p.stderr}"
        return p.stdout

    def ruleset(self) -> str:
        """Both backends' full view, counters normalised (for before/after comparisons)."""
        text = self.sh("iptables-legacy-save; ip6tables-legacy-save; nft list ruleset")
        text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
        text = re.sub(r"counter packets \d+ bytes \d+", "counter", text)
        return re.sub(r"\[\d+:\d+\]", "[0:0]", text)


@pytest.fixture
def world() -> Iterator[World]:
    n = next(_subnets) % 10
    with netns.namespace(prefix="bbnsp", ipv6=True) as pod, \
            netns.namespace(prefix="bbnsi", ipv6=True) as inet:
        pod_if = "va0" + secrets.token_hex(3)
        netns.connect(pod.name, inet.name, a_ifname=pod_if,
                      a_v4=f"10.203.{10 + n}.2/24", b_v4=f"10.203.{10 + n}.1/24",
                      a_v6=f"fd00:203:{10 + n}::2/64", b_v6=f"fd00:203:{10 + n}::1/64")
        pod.add_default_route(f"10.203.{10 + n}.1")
        pod.add_default_route(f"fd00:203:{10 + n}::1")
        yield World(pod, inet, pod_if, n)


def _ok(p: subprocess.CompletedProcess[str], rc: int = 0) -> str:
    assert p.returncode == rc, f"rc={p.returncode}\nSTDOUT:\n{p.stdout}\nSTDERR:\n{p.stderr}"
    return p.stdout


# Small stdlib-only programs (run as other uids, which cannot import from /root).
LISTENER = r"""
import select, socket, sys
socks = []
for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, int(sys.argv[1]))); s.listen(512); socks.append(s)
print("ready", flush=True)
n = 0
while True:
    r, _, _ = select.select(socks + [sys.stdin], [], [])
    for s in socks:
        if s in r:
            c, _ = s.accept(); n += 1; c.close()
    if sys.stdin in r:
        if not sys.stdin.readline():
            break
        print(n, flush=True)  # "count?" query: a line on stdin
print(n, flush=True)
"""

HAMMER = r"""
import errno, json, select, socket, sys, time
targets = [(socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])]
port = int(sys.argv[3])
res = {}
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    for fam, addr in targets:
        s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(0.5)
        try:
            s.connect((addr, port)); k = "CONNECTED"
        except socket.timeout:
            k = "timeout"
        except OSError as e:
            k = errno.errorcode.get(e.errno, str(e.errno))
        finally:
            s.close()
        res[k] = res.get(k, 0) + 1
    time.sleep(0.001)
print(json.dumps(res), flush=True)
"""


@contextlib.contextmanager
def _proc(ns: netns.Namespace, argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    p = ns.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def _finish(p: subprocess.Popen[str]) -> str:
    out, _ = p.communicate(input="", timeout=30)
    return out.strip().splitlines()[-1]


def _as(uid: int, *argv: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


# --------------------------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_probe_idempotent_remove(world: World, backend: str) -> None:
    """N1/N2/N4/N5/N6: apply + live probe for IPv4 and IPv6; re-apply changes nothing; remove is clean."""
    before = world.ruleset()
    out = _ok(world.netsetup("apply", "--probe", "--backend", backend))
    assert "verify: ok" in out
    for fam, addr in (("ipv4", "192.0.2.1"), ("ipv6", "2001:db8::1")):
        assert f"probe {fam} tcp/80->8080 as uid 65534: ok (SO_ORIGINAL_DST [{addr}]:80)" in out
        assert f"probe {fam} tcp/80->8080 as proxy uid 1337: ok (not redirected)" in out
        assert f"probe {fam} udp/443 as uid 65534: ok (blocked (EPERM))" in out
        assert f"probe {fam} tcp/443 as uid 65534: ok" in out
    assert ": missing" not in out and ": extra" not in out
    first = world.ruleset()
    assert "botbox:reject-udp" in first
    _ok(world.netsetup("apply", "--backend", backend))
    assert world.ruleset() == first, "re-running apply changed the ruleset"
    _ok(world.netsetup("remove", "--backend", backend))
    after = world.ruleset()
    assert "botbox" not in after and "EGRESS_" not in after
    if backend == "nft":
        assert after == before
    # the probe leaves nothing behind (no temporary interface, no listener)
    assert "bbprb" not in world.sh("ip -o link")
    out = _ok(world.netsetup("verify", "--backend", backend), 95)
    assert ": missing" in out


def _reapply(backend: str, times: int) -> int:
    """In the pod namespace: re-install the plan ``times`` times through the backend (what apply does)."""
    from netsetup.detect import make_backend
    from netsetup.plan import build_plan
    from netsetup.settings import parse_settings

    settings = parse_settings({"BOTBOX_IPTABLES_BACKEND": backend})
    plan = build_plan(settings, ("ipv4", "ipv6"))
    b = make_backend(backend, settings)
    try:
        for _ in range(times):
            b.apply(plan)
    finally:
        close = getattr(b, "close", None)
        if close is not None:
            close()
    return times


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_window_while_reapplying(world: World, backend: str) -> None:
    """N5: an app-uid client hammering an outside listener never gets through while apply re-runs 20x."""
    _ok(world.netsetup("apply", "--backend", backend))
    with _proc(world.inet, [str(PY), "-c", LISTENER, "8000"]) as listener:
        assert listener.stdin is not None and listener.stdout is not None
        hammer = _as(APP_UID, str(PY), "-c", HAMMER, world.inet_v4, world.inet_v6, "8000")
        with _proc(world.pod, hammer) as ham:
            assert world.pod.call(_reapply, backend, 20, timeout=180) == 20
            results = json.loads(_finish(ham))
        listener.stdin.write("count?\n")
        listener.stdin.flush()
        accepted_during_apply = int(listener.stdout.readline())
        _ok(world.netsetup("remove", "--backend", backend))
        # control: without rules the very same client does get through (the test can fail)
        with _proc(world.pod, hammer) as ham2:
            time.sleep(0.3)
            control = json.loads(_finish(ham2))
        _finish(listener)
    print(f"{backend}: attempts during 20 re-applies {results}, control without rules {control}")
    assert control.get("CONNECTED", 0) > 0, control
    assert accepted_during_apply == 0, results
    assert sum(results.values()) >= 40, results
    assert set(results) <= {"ECONNREFUSED", "EPERM"}, results


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_and_probe_fail_when_rule_deleted_by_hand(world: World, backend: str) -> None:
    """N6: read-back reports the missing rule and the live probe fails; both exit 95."""
    _ok(world.netsetup("apply", "--backend", backend))
    if backend == "legacy":
        world.sh("iptables-legacy -t nat -D EGRESS_REDIRECT 3")
    else:
        listing = json.loads(world.sh("nft -a -j list chain inet botbox EGRESS_REDIRECT"))["nftables"]
        (handle,) = [o["rule"]["handle"] for o in listing
                     if "rule" in o and o["rule"].get("comment") == "botbox:redirect-http"
                     and {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}}
                     in o["rule"]["expr"]]
        world.sh(f"nft delete rule inet botbox EGRESS_REDIRECT handle {handle}")
    out = _ok(world.netsetup("verify", "--backend", backend), 95)
    missing = [ln for ln in out.splitlines() if ln.endswith(": missing")]
    assert len(missing) == 1 and "redirect-http" in missing[0] and "ipv4" in missing[0], out
    out = _ok(world.netsetup("verify", "--probe", "--backend", backend), 95)
    assert "probe ipv4 tcp/80->8080 as uid 65534: FAILED" in out
    assert "probe ipv6 tcp/80->8080 as uid 65534: ok" in out
    # apply repairs it
    _ok(world.netsetup("apply", "--probe", "--backend", backend))


def test_apply_fails_closed_when_probe_cannot_run(world: World) -> None:
    """apply ends with verify; a failed probe exits 95 and leaves the rules installed (fail closed)."""
    with _proc(world.pod, [str(PY), "-c", LISTENER.replace('"0.0.0.0"', '"127.0.0.1"'), "8080"]):
        p = world.netsetup("apply", "--probe", "--backend", "nft")
        out = _ok(p, 95)
    assert "cannot listen on 127.0.0.1 port 8080" in out and "verify: FAILED" in out
    assert "botbox:reject-tcp" in world.sh("nft list table inet botbox")
    _ok(world.netsetup("verify", "--backend", "nft"))


def test_legacy_ipv6_interface_mask_checked(world: World) -> None:
    """python-iptables writes IPv6 '-o lo' with a 0x01 mask; iptables-save cannot show it, verify must."""
    _ok(world.netsetup("apply", "--backend", "legacy", "--enable-ipv6", "1"))
    script = (
        "import iptc\n"
        "t = iptc.Table6(iptc.Table6.FILTER); t.autocommit = False\n"
        "c = iptc.Chain(t, 'EGRESS_FILTER')\n"
        "old = c.rules[1]; assert old.out_interface == 'lo'\n"
        "r = iptc.Rule6(); r.out_interface = 'lo'\n"  # library default: the buggy mask
        "m = r.create_match('comment'); m.comment = 'botbox:loopback'\n"
        "r.create_target('ACCEPT')\n"
        "c.delete_rule(old); c.insert_rule(r, 1); t.commit()\n"
    )
    world.sh(f"{PY} -c \"{script}\"")
    out = _ok(world.netsetup("verify", "--backend", "legacy"), 95)
    assert re.search(r"filter ipv6 EGRESS_FILTER .*outiface 'lo' has mask 010101.*: wrong", out), out
    out = _ok(world.netsetup("verify", "--probe", "--backend", "legacy"), 95)
    assert "probe ipv6 udp/443 as uid 65534: FAILED" in out  # the bad mask really lets IPv6 out


def test_probe_without_route_uses_temporary_interface_and_removes_it() -> None:
    """N6: a namespace without a default route still gets probed; nothing is left behind."""
    with netns.namespace(prefix="bbnsr", ipv6=True) as bare:
        e = {k: v for k, v in os.environ.items() if not k.startswith("BOTBOX_")}
        e["PYTHONPATH"] = str(ROOT)
        links_before = bare.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        p = bare.run([str(PY), "-m", "netsetup", "apply", "--probe", "--backend", "nft"], env=e,
                     cwd=str(ROOT), capture_output=True, text=True, timeout=120)
        out = _ok(p)
        assert "temporary interface bbprb" in out
        assert "probe ipv6 tcp/80->8080 as uid 65534: ok (SO_ORIGINAL_DST [2001:db8::1]:80)" in out
        assert bare.run(["ip", "-o", "link"], capture_output=True, text=True).stdout == links_before


# --------------------------------------------------------------------------------------------- foreign rules


def test_remove_leaves_foreign_rules_legacy(world: World) -> None:
    """N5: remove deletes only BotBox-tagged objects; foreign rules (even inside our chain) survive."""
    world.sh("iptables-legacy -A OUTPUT -p tcp --dport 9999 -j ACCEPT;"
             "iptables-legacy -t nat -N FOREIGN; iptables-legacy -t nat -A FOREIGN -j RETURN;"
             "ip6tables-legacy -A OUTPUT -p udp --dport 9999 -m comment --comment mine -j ACCEPT")
    foreign = world.sh("iptables-legacy-save; ip6tables-legacy-save")
    foreign_lines = [ln for ln in foreign.splitlines() if ln.startswith(("-A", ":FOREIGN"))]
    assert len(foreign_lines) == 4
    _ok(world.netsetup("apply", "--backend", "legacy"))
    world.sh("iptables-legacy -A EGRESS_FILTER -p tcp --dport 7777 -j ACCEPT")  # foreign rule in our chain
    out = _ok(world.netsetup("remove", "--backend", "legacy"))
    assert "kept chain EGRESS_FILTER" in out
    after = world.sh("iptables-legacy-save; ip6tables-legacy-save")
    for ln in foreign_lines:
        assert ln in after
    assert "-A EGRESS_FILTER -p tcp -m tcp --dport 7777 -j ACCEPT" in after
    assert "botbox" not in after and "EGRESS_REDIRECT" not in after


def test_apply_refuses_to_flush_a_foreign_chain_of_the_same_name(world: World) -> None:
    world.sh("ip6tables-legacy -N EGRESS_FILTER;"
             "ip6tables-legacy -A EGRESS_FILTER -p tcp --dport 7 -j ACCEPT")
    p = world.netsetup("apply", "--backend", "legacy")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "chain EGRESS_FILTER exists and holds 1 rule(s) BotBox did not install" in p.stderr
    after = world.ruleset()
    assert "-A EGRESS_FILTER -p tcp -m tcp --dport 7 -j ACCEPT" in after
    assert "botbox" not in after  # IPv4 was not applied either


def test_remove_leaves_foreign_rules_nft(world: World) -> None:
    world.sh("nft add table inet foreign; "
             "nft add chain inet foreign out '{ type filter hook output priority 10; }'; "
             "nft add rule inet foreign out tcp dport 9999 accept; "
             "iptables-nft -A OUTPUT -p tcp --dport 9998 -j ACCEPT")
    foreign = world.sh("nft list ruleset")
    _ok(world.netsetup("apply", "--backend", "nft"))
    assert "table inet botbox" in world.sh("nft list ruleset")
    _ok(world.netsetup("remove", "--backend", "nft"))
    assert world.sh("nft list ruleset") == foreign


# --------------------------------------------------------------------------------------------- detection


def test_detection_prefers_backend_in_use_and_warns_when_both(world: World) -> None:
    """N3: fresh -> nft; legacy rules present -> legacy; rules in both -> loud warning."""
    out = _ok(world.netsetup("apply"))
    assert "backend: nft (no rules installed yet" in out
    _ok(world.netsetup("remove"))
    world.sh("iptables-legacy -A OUTPUT -p tcp --dport 9999 -j ACCEPT")
    p = world.netsetup("apply")
    assert "backend: legacy (already holds" in _ok(p)
    assert "both iptables-legacy" not in p.stderr
    assert "EGRESS_FILTER" in world.sh("iptables-legacy-save")
    assert "botbox" not in world.sh("nft list ruleset")
    world.sh("nft add table inet foreign; nft add chain inet foreign c; nft add rule inet foreign c accept")
    p = world.netsetup("apply")
    _ok(p)
    assert "*** WARNING: both iptables-legacy" in p.stderr
    assert "backend: legacy" in p.stdout  # holds BotBox's rules already


def test_switching_backend_removes_stale_botbox_objects(world: World) -> None:
    _ok(world.netsetup("apply", "--backend", "legacy", "--uid", "2000"))
    p = world.netsetup("apply", "--backend", "nft")
    _ok(p)
    assert "legacy still holds BotBox objects" in p.stderr
    assert "botbox" not in world.sh("iptables-legacy-save; ip6tables-legacy-save")
    assert "skuid 1337" in world.sh("nft list table inet botbox")


def test_unavailable_backend_or_ipv6_exits_3_and_touches_nothing(world: World, tmp_path: Path) -> None:
    """N4 / exit 3: nft missing; IPv6 required but the kernel has none (simulated)."""
    before = world.ruleset()
    bindir = tmp_path / "bin"  # everything netsetup needs except nft
    bindir.mkdir()
    for tool in ("ip", "iptables-legacy-save", "ip6tables-legacy-save"):
        (bindir / tool).symlink_to(str(shutil.which(tool)))
    p = world.netsetup("apply", "--backend", "nft", path=str(bindir))
    assert p.returncode == 3, p.stderr
    assert "unavailable" in p.stderr and "nft" in p.stderr

    def run_without_kernel_ipv6() -> int:
        import netsetup.cli as c

        c.ipv6_state = lambda *a, **k: "absent"  # type: ignore[assignment]
        return c.run(["apply", "--enable-ipv6", "1"])

    assert world.pod.call(run_without_kernel_ipv6) == 3
    assert world.ruleset() == before


def test_ipv6_disabled_in_namespace_programs_ipv4_only(world: World) -> None:
    world.pod.set_ipv6_enabled(False)
    p = world.netsetup("apply", "--probe")
    out = _ok(p)
    assert "IPv6 is disabled in this namespace" in p.stderr
    assert "probe ipv4 tcp/80->8080 as uid 65534: ok" in out and "probe ipv6" not in out
    p = world.netsetup("apply", "--enable-ipv6", "0")
    assert "*** WARNING: BOTBOX_ENABLE_IPV6=0" in p.stderr


# --------------------------------------------------------------------------------------------- semantics


def _udp_server(port: int) -> str:
    return (f"import socket,sys\n"
            f"socks=[]\n"
            f"for f,a in ((socket.AF_INET,'0.0.0.0'),(socket.AF_INET6,'::')):\n"
            f"    s=socket.socket(f,socket.SOCK_DGRAM)\n"
            f"    if f==socket.AF_INET6: s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,1)\n"
            f"    s.bind((a,{port})); s.settimeout(3); socks.append(s)\n"
            f"print('ready',flush=True)\n"
            f"got=[]\n"
            f"for s in socks:\n"
            f"    try: got.append(s.recv(100).decode())\n"
            f"    except OSError: got.append('-')\n"
            f"print(','.join(got),flush=True)\n")


def _app(world: World, code: str, uid: int = APP_UID) -> str:
    p = world.pod.run(_as(uid, str(PY), "-c", code), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_traffic_semantics(world: World, backend: str) -> None:
    """N2: DNS allowed, ICMP and other TCP blocked, inbound replies flow, the proxy uid reaches out over
    IPv6 after the neighbour cache is flushed (kernel ND is not blocked by the owner-based rules)."""
    world.sh("echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range")
    _ok(world.netsetup("apply", "--backend", backend))
    v4, v6 = world.inet_v4, world.inet_v6
    # DNS (any resolver when BOTBOX_DNS_SERVERS is empty), both families
    with _proc(world.inet, [str(PY), "-c", _udp_server(53)]) as srv:
        sent = _app(world, "import socket\n"
                           f"socket.socket(socket.AF_INET,socket.SOCK_DGRAM).sendto(b'q4',('{v4}',53))\n"
                           f"socket.socket(socket.AF_INET6,socket.SOCK_DGRAM).sendto(b'q6',('{v6}',53))\n"
                           "print('sent')")
        assert "sent" in sent
        assert _finish(srv) == "q4,q6"
    # ICMP echo from the app (ping socket) is another protocol: dropped
    icmp = _app(world, "import socket,errno\n"
                       "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM,socket.IPPROTO_ICMP)\n"
                       "try:\n"
                       f"    s.sendto(bytes([8,0,0,0,0,1,0,1]),('{v4}',0)); print('sent')\n"
                       "except OSError as e: print(errno.errorcode[e.errno])")
    assert icmp.strip() == "EPERM"
    # inbound: the outside connects to an app listener in the pod; the reply direction is allowed
    with _proc(world.pod, _as(APP_UID, str(PY), "-c", LISTENER, "7000")) as app_listener:
        for addr in (f"10.203.{10 + world.n}.2", f"fd00:203:{10 + world.n}::2"):
            r = world.inet.call(_tcp_connect, addr, 7000)
            assert r == "connected", r
        assert _finish(app_listener) == "2"
    # the proxy uid reaches the outside over IPv6 with an empty neighbour cache; the app does not
    world.sh("ip -6 neigh flush all; ip -4 neigh flush all")
    with _proc(world.inet, [str(PY), "-c", LISTENER, "8001"]) as outside:
        code = ("import socket\n"
                f"for f,a in ((socket.AF_INET6,'{v6}'),(socket.AF_INET,'{v4}')):\n"
                "    s=socket.socket(f); s.settimeout(3)\n"
                "    try: s.connect((a,8001)); print('connected')\n"
                "    except OSError as e: print('error', e.errno)\n")
        assert _app(world, code, uid=PROXY_UID).split("\n")[:2] == ["connected", "connected"]
        assert _app(world, code).split("\n")[:2] == ["error 111", "error 111"]
        assert _finish(outside) == "2"
    assert "REACHABLE" in world.sh("ip -6 neigh") or "STALE" in world.sh("ip -6 neigh")


def _tcp_connect(addr: str, port: int) -> str:
    import socket

    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam)
    s.settimeout(3)
    try:
        s.connect((addr, port))
        s.close()
        return "connected"
    except OSError as e:
        return f"error {e}"


def test_dns_servers_restrict_resolvers(world: World) -> None:
    v4 = world.inet_v4
    _ok(world.netsetup("apply", env={"BOTBOX_DNS_SERVERS": f"10.203.{10 + world.n}.53"}))
    code = ("import socket,errno\n"
            "try:\n"
            f"    socket.socket(socket.AF_INET,socket.SOCK_DGRAM).sendto(b'q',('{v4}',53)); print('sent')\n"
            "except OSError as e: print(errno.errorcode[e.errno])")
    assert _app(world, code).strip() == "EPERM"


# --------------------------------------------------------------------------------------------- eBPF (N7)

BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_DETACH = 5, 8, 9
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_CGROUP_INET4_CONNECT = 10


def _load_allow_all_connect4() -> int:
    """A two-instruction cgroup/connect4 program (``r0 = 1; exit``: allow everything)."""
    insns = ctypes.create_string_buffer(struct.pack("<BBhi", 0xB7, 0, 0, 1)  # mov64 r0, 1
                                        + struct.pack("<BBhi", 0x95, 0, 0, 0))  # exit
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(struct.pack(
        "<IIQQIIQII16sII", BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 2, ctypes.addressof(insns), ctypes.addressof(lic),
        0, 0, 0, 0, 0, b"bbtest_conn4", 0, BPF_CGROUP_INET4_CONNECT))
    return bpf._bpf(BPF_PROG_LOAD, attr)


def test_bpf_connect4_program_reported_and_strict_fails(world: World) -> None:
    mnt = bpf.cgroup2_mount()
    if mnt is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    _ok(world.netsetup("apply"))
    cg = mnt / ("bbtest" + secrets.token_hex(4))
    cg.mkdir()
    prog_fd = cg_fd = -1
    try:
        prog_fd = _load_allow_all_connect4()
        cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
        bpf._bpf(BPF_PROG_ATTACH, ctypes.create_string_buffer(
            struct.pack("<IIII", cg_fd, prog_fd, BPF_CGROUP_INET4_CONNECT, 0)))

        def run_in_cgroup(*args: str) -> subprocess.CompletedProcess[str]:
            e = {k: v for k, v in os.environ.items() if not k.startswith("BOTBOX_")}
            e["PYTHONPATH"] = str(ROOT)
            return subprocess.run(
                ["ip", "netns", "exec", world.pod.name, str(PY), "-m", "netsetup", *args], env=e,
                cwd=str(ROOT), capture_output=True, text=True, timeout=60, check=False,
                preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())))

        p = run_in_cgroup("verify")
        out = _ok(p)
        assert re.search(r"bpf cgroup connect4: prog id \d+ name bbtest_conn4: WARNING", out), out
        out = _ok(run_in_cgroup("verify", "--strict"), 95)
        assert re.search(r"bpf cgroup connect4: prog id \d+ name bbtest_conn4: FAILED \(--strict\)", out)
        # outside that cgroup the same verify is clean and strict passes
        out = _ok(world.netsetup("verify", "--strict"))
        assert "bpf: no connect4/6" in out
    finally:
        if prog_fd >= 0 and cg_fd >= 0:
            with contextlib.suppress(OSError):
                bpf._bpf(BPF_PROG_DETACH, ctypes.create_string_buffer(
                    struct.pack("<IIII", cg_fd, prog_fd, BPF_CGROUP_INET4_CONNECT, 0)))
        for fd in (prog_fd, cg_fd):
            if fd >= 0:
                os.close(fd)
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


# --------------------------------------------------------------------------------------------- netns helpers


def _boom() -> None:
    raise KeyError("inside")


def _sleep_forever() -> None:
    time.sleep(60)


def test_netns_helpers_isolate_report_errors_and_clean_up() -> None:
    with netns.namespace(prefix="bbnsh", ipv6=False) as a:
        name = a.name
        assert netns.exists(name) and not a.ipv6_enabled()
        a.set_ipv6_enabled(True)
        assert a.ipv6_enabled()
        assert a.call(os.readlink, "/proc/self/ns/net") != os.readlink("/proc/self/ns/net")
        with pytest.raises(netns.NetnsCallError) as ei:
            a.call(_boom)
        assert ei.value.remote_type == "KeyError" and "inside" in str(ei.value)
        with pytest.raises(TimeoutError):
            a.call(_sleep_forever, timeout=0.3)
        sleeper = a.popen(["sleep", "60"])
        with pytest.raises(FileExistsError):
            netns.create_netns(name)
    assert not netns.exists(name)
    assert sleeper.poll() is not None  # processes started in the namespace were killed
    assert len(netns.unique_name("bbveth")) <= 15
    with pytest.raises(ValueError):
        netns.unique_name("much-too-long-prefix")
