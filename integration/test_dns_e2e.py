"""DNS restriction: with ``BOTBOX_DNS_SERVERS`` set, the app may only talk DNS to that resolver.

This world runs netsetup on the nft backend (``table inet botbox``), so the filter has no per-rule
counters; the evidence of a blocked query is the rogue resolver's own query log (it logs every query it
receives) and the catch-all UDP/TCP recorders, next to a control query as the exempt proxy uid.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from integration.world import PROXY_UID, World, WorldOptions

FAMILIES = [4, 6]
OPENAI = "api.openai.test"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    opts = WorldOptions(index=23, dns_restricted=True, netsetup_env={"BOTBOX_IPTABLES_BACKEND": "nft"})
    with World(opts) as w:
        yield w


def queries_from_pod(world: World, label: str) -> list[str]:
    pod = (world.pod_v4, world.pod_v6)
    return [line for line in world.dns_log(label).splitlines()
            if "query[" in line and line.rsplit(" from ", 1)[-1].strip() in pod]


def test_nft_backend_is_in_use(world: World) -> None:
    out = world.run(world.pod, ["nft", "list", "table", "inet", "botbox"]).stdout
    assert "EGRESS_FILTER" in out
    assert world.dns_v4 in out and world.dns_v6 in out  # the DNS accept rules name the resolver


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_configured_resolver_answers(world: World, family: int, tcp: bool) -> None:
    server = world.dns_v4 if family == 4 else world.dns_v6
    before = len(queries_from_pod(world, "legit"))
    res = world.app("dns", server=server, name=OPENAI, qtype="A", tcp=tcp)
    assert res["ok"] and res["answers"] == [world.host_ip(OPENAI)], res
    assert len(queries_from_pod(world, "legit")) == before + 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_rogue_resolver_is_blocked(world: World, family: int, tcp: bool) -> None:
    server = world.rogue_dns_v4 if family == 4 else world.rogue_dns_v6
    before = len(queries_from_pod(world, "rogue"))
    res = world.app("dns", server=server, name=OPENAI, tcp=tcp, timeout=1.5)
    assert not res["ok"], f"rogue resolver answered the app: {res}"
    time.sleep(0.3)
    assert len(queries_from_pod(world, "rogue")) == before, "the rogue resolver received the app's query"
    # Control: the exempt proxy uid reaches it, so the resolver was up and logging.
    ctl = world.app("dns", uid=PROXY_UID, server=server, name=OPENAI, tcp=tcp)
    assert ctl["ok"] and ctl["answers"] == [world.host_ip("evil.test")], ctl
    assert len(queries_from_pod(world, "rogue")) == before + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_port_53_to_a_non_resolver_is_blocked(world: World, family: int) -> None:
    ip = world.host_ip("public.test", family)
    mark = world.hits_mark()
    res = world.app("udp", host=ip, port=53, timeout=1)
    time.sleep(0.3)
    assert not res["ok"], res
    assert world.hits(mark, kind="udp", local_ip=ip) == []


def test_libc_resolution_and_proxied_request_still_work(world: World) -> None:
    res = world.app("resolve", name=OPENAI)
    assert res["ok"] and res["addresses"] == sorted([world.host_ip(OPENAI), world.host_ip(OPENAI, 6)])
    proc = world.curl(f"http://{OPENAI}/echo")
    assert proc.returncode == 0, proc.stderr
    echo = json.loads(proc.stdout)
    assert echo["sni"] == OPENAI
    assert echo["headers"]["sha256"]["authorization"] == [world.expected_fingerprint("authorization")]
