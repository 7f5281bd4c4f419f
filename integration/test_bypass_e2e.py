"""Bypass attempts from the app (uid 1000): each must fail AND leave evidence.

For every attempt the test checks (1) the app saw a failure, (2) the catch-all recorder in the internet
namespace saw nothing from the pod, (3) netsetup's REJECT/DROP counters moved for that family; and a
*control* — the same attempt as the exempt proxy uid 1337 — reaches the recorder, which proves the
listener was there to catch a leak.  IPv4 and IPv6 alike.

The module runs twice, once per netsetup backend: ``legacy`` (python-iptables) and ``nft`` (``table inet
botbox``).  Rule counters are read from whichever backend has them; where rules carry no counter the
recorders and the control carry the proof.  ``test_proxy_e2e`` uses ``auto``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from integration.world import (
    ADMIN_PORT,
    PROXY_PORT,
    PROXY_UID,
    UDPLITE_PORT,
    WILDCARD_PORT,
    World,
    WorldOptions,
    parse_response,
)

FAMILIES = [4, 6]
SETTLE = 0.3  # seconds for an in-flight packet to reach (and be logged by) a recorder


@pytest.fixture(scope="module", params=["legacy", "nft"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    backend = request.param
    index = 22 if backend == "legacy" else 25
    with World(WorldOptions(index=index, netsetup_env={"BOTBOX_IPTABLES_BACKEND": backend})) as w:
        # Exactly one backend holds BotBox's rules (never both: SECURITY-SPEC N3).
        sources = w.counted_sources()
        expected = ["iptables-legacy-save", "ip6tables-legacy-save"] if backend == "legacy" else []
        if backend == "legacy":
            assert sources == expected, sources
        else:
            assert not [s for s in sources if "iptables" in s], sources
        yield w


def has_counters(world: World) -> bool:
    """The legacy rules always count packets; the nft table does when its rules carry ``counter``."""
    return bool(world.counted_sources())


def fam_key(family: int) -> str:
    return "ipv4" if family == 4 else "ipv6"


def attempt_blocked(world: World, family: int, op: str, match: dict[str, Any], **args: Any) -> dict[str, Any]:
    """Run ``op`` as the app: assert failure, no recorder hit matching ``match``, filter counter moved."""
    before = world.filter_counters()
    mark = world.hits_mark()
    res = world.app(op, **args)
    time.sleep(SETTLE)
    assert not res["ok"], f"app {op} {args} succeeded: {res}"
    leaked = world.hits(mark, **match)
    assert leaked == [], f"recorder saw the app's {op}: {leaked}"
    after = world.filter_counters()
    if has_counters(world):
        fam = fam_key(family)
        assert after[fam] > before[fam], f"no REJECT/DROP counted: {before} -> {after}"
    return res


def control_reaches(world: World, op: str, match: dict[str, Any], **args: Any) -> None:
    """The same attempt as the proxy uid (exempt) is recorded: the recorder would have seen a leak."""
    mark = world.hits_mark()
    res = world.app(op, uid=PROXY_UID, **args)
    deadline = time.monotonic() + 3
    while not world.hits(mark, **match) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert world.hits(mark, **match), f"control {op} as uid {PROXY_UID} not recorded: {res}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("port", [443, 22, 4444, 8080, 8443, 9090])
def test_direct_tcp_to_upstream_ip_is_rejected(world: World, family: int, port: int) -> None:
    ip = world.host_ip("api.openai.test", family)
    match = {"kind": "tcp", "local_ip": ip, "local_port": port}
    res = attempt_blocked(world, family, "tcp", match, host=ip, port=port, send="hello", timeout=2)
    assert res["error"] in ("ECONNREFUSED", "TimeoutError", "EPERM"), res
    control_reaches(world, "tcp", match, host=ip, port=port, send="hello", timeout=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_tcp_80_to_upstream_ip_lands_at_the_proxy_not_the_internet(world: World, family: int) -> None:
    """Port 80 is not blocked but redirected: the proxy answers (an IP literal is not allowed)."""
    ip = world.host_ip("evil.test", family)
    mark = world.hits_mark()
    authority = ip if family == 4 else f"[{ip}]"
    request = f"GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    res = world.app("tcp", host=ip, port=80, send=request, timeout=5)
    time.sleep(SETTLE)
    assert res["ok"], res
    resp = parse_response(res["response"])
    assert (resp.status, resp.body) == (403, "host not allowed")
    assert world.hits(mark) == [], "something reached the internet"
    control_reaches(world, "tcp", {"kind": "tcp", "local_ip": ip, "local_port": 80}, host=ip, port=80,
                    send="x", timeout=2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("port", [443, 123, 4444, 5353])
def test_udp_is_rejected(world: World, family: int, port: int) -> None:
    """QUIC (UDP 443) and any other UDP (port 53 is open here: no BOTBOX_DNS_SERVERS, see test_dns_e2e)."""
    ip = world.host_ip("api.openai.test", family)
    match = {"kind": "udp", "local_ip": ip, "local_port": port}
    attempt_blocked(world, family, "udp", match, host=ip, port=port, payload="quic-initial", timeout=1)
    control_reaches(world, "udp", match, host=ip, port=port, timeout=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_udplite_is_dropped(world: World, family: int) -> None:
    """UDP-Lite (IP protocol 136) is open to unprivileged apps and is not matched by ``-p udp``."""
    ip = world.host_ip("api.openai.test", family)
    match = {"kind": "udplite", "local_ip": ip, "local_port": UDPLITE_PORT}
    attempt_blocked(world, family, "udp", match, host=ip, port=UDPLITE_PORT, udplite=True, timeout=1)
    control_reaches(world, "udp", match, host=ip, port=UDPLITE_PORT, udplite=True, timeout=1)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ipv6_link_local_is_blocked(world: World, proto: str) -> None:
    """fe80::/10 on the pod's link: a hole for rules that only think about global addresses."""
    target = world.inet_link_local()
    match = {"kind": proto, "local_port": WILDCARD_PORT}
    args: dict[str, Any] = {"host": target, "port": WILDCARD_PORT, "timeout": 1.5}
    if proto == "tcp":
        args["send"] = "hello"
    attempt_blocked(world, 6, proto, match, **args)
    control_reaches(world, proto, match, **args)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ipv4_mapped_ipv6_destination_is_blocked(world: World, proto: str) -> None:
    """An AF_INET6 socket connecting to ``::ffff:a.b.c.d`` sends IPv4: the IPv4 rules must catch it."""
    ip = world.host_ip("public.test")
    match = {"kind": proto, "local_ip": ip, "local_port": 4444}
    args: dict[str, Any] = {"host": f"::ffff:{ip}", "port": 4444, "timeout": 1.5}
    if proto == "tcp":
        args["send"] = "hello"
    attempt_blocked(world, 4, proto, match, **args)
    control_reaches(world, proto, match, **args)


@pytest.mark.parametrize("family", FAMILIES)
def test_gateway_address_is_blocked(world: World, family: int) -> None:
    """Not only the upstreams' addresses: the next hop itself is just another destination."""
    gw = world.v4(1) if family == 4 else world.v6(1)
    match = {"kind": "tcp", "local_ip": gw, "local_port": WILDCARD_PORT}
    attempt_blocked(world, family, "tcp", match, host=gw, port=WILDCARD_PORT, send="hello", timeout=1.5)
    control_reaches(world, "tcp", match, host=gw, port=WILDCARD_PORT, send="hello", timeout=1.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_icmp_echo_is_dropped(world: World, family: int) -> None:
    ip = world.host_ip("public.test", family)
    # The sysctl allows ICMP datagram sockets for the app's gid: only the firewall can stop it.
    rng = world.run(world.pod, ["cat", "/proc/sys/net/ipv4/ping_group_range"]).stdout.split()
    assert int(rng[0]) <= 1000 <= int(rng[1])
    match = {"kind": "icmp", "family": family, "peer": world.pod_v4 if family == 4 else world.pod_v6}
    res = attempt_blocked(world, family, "ping", match, host=ip, timeout=1)
    assert res.get("stage") in ("send", "recv"), res  # the socket itself was allowed
    control_reaches(world, "ping", match, host=ip, timeout=1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("port", [PROXY_PORT, ADMIN_PORT])
def test_proxy_listeners_unreachable_from_the_internet(world: World, family: int, port: int) -> None:
    pod_ip = world.pod_v4 if family == 4 else world.pod_v6
    from integration.appclient import op_tcp
    from netsetup import netns

    probe = {"host": pod_ip, "port": port, "send": "GET / HTTP/1.0\r\n\r\n", "timeout": 2}
    res = netns.call_in_netns(world.inet, op_tcp, probe)
    assert not res["ok"], f"pod port {port} reachable from the internet: {res}"
    assert res["error"] == "ECONNREFUSED", res  # nothing listens on a non-loopback address


def test_proxy_binds_loopback_only(world: World) -> None:
    out = world.run(world.pod, ["ss", "-Htlnp"]).stdout
    assert world.proxy is not None
    proxy_lines = [line for line in out.splitlines() if f"pid={world.proxy.pid}," in line]
    assert proxy_lines, out
    for line in proxy_lines:
        local = line.split()[3]
        addr = local.rsplit(":", 1)[0].strip("[]")
        assert addr in ("127.0.0.1", "::1"), f"proxy listens on {local}"


@pytest.mark.parametrize("family", FAMILIES)
def test_app_as_root_uid_is_not_exempt(world: World, family: int) -> None:
    """Only the proxy uid is exempt: uid 0 processes in the app container are filtered too."""
    ip = world.host_ip("api.openai.test", family)
    mark = world.hits_mark()
    res = world.app("tcp", uid=0, host=ip, port=443, timeout=2)
    time.sleep(SETTLE)
    assert not res["ok"], res
    assert world.hits(mark, kind="tcp", local_ip=ip) == []


def test_without_dns_servers_any_resolver_is_reachable(world: World) -> None:
    """CONTRACT §1: empty BOTBOX_DNS_SERVERS keeps DNS open (the control for test_dns_e2e)."""
    res = world.app("dns", server=world.rogue_dns_v4, name="api.openai.test")
    assert res["ok"] and res["answers"] == [world.host_ip("evil.test")], res
