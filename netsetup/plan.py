"""The rule plan (pure data, no I/O) and its renderings.

``build_plan(settings, families)`` turns :class:`~netsetup.settings.Settings` into a :class:`Plan` with one
:class:`FamilyPlan` per address family.  Everything else renders from that plan:

* :func:`iptables_lines` — the canonical ``iptables-save`` lines of one family, per table (what ``verify``
  expects to read back from the legacy backend; the legacy backend programs exactly these rules through
  python-iptables);
* :func:`render_iptables_save` — an ``iptables-restore --noflush`` fragment per family (what ``plan``
  prints);
* :func:`nft_table_json` / :func:`nft_apply_commands` — the libnftables JSON of the ``inet botbox`` table
  (what the nft backend loads in one transaction and what ``verify`` expects to read back);
* :func:`render_nft` — the same table in nft's text syntax (what ``plan`` prints).

Rule order in the NAT chain (N1)::

    -o lo                 RETURN    traffic delivered inside the namespace (127/8, ::1 and the pod's own
                                    addresses all route via lo) is never egress; the proxy's own admin
                                    port etc. keep working
    --uid-owner UID       RETURN    the proxy
    -p tcp --dport 80     REDIRECT --to-ports 8080
    -p tcp --dport 443    REDIRECT --to-ports 8443      (interception only)

Rule order in the filter chain (N2)::

    -d 127.0.0.1 (::1) -p tcp --dport 8080 ctstate DNAT   ACCEPT   redirected traffic (precise: the
                                    conntrack entry proves NAT rewrote the destination, and the destination
                                    is the proxy listener; a REDIRECT in OUTPUT always rewrites to
                                    127.0.0.1 / ::1)
    -o lo                 ACCEPT    stays in the namespace
    --uid-owner UID       ACCEPT    the proxy
    ctstate ESTABLISHED,RELATED ctdir REPLY  ACCEPT   replies to connections that were opened *towards*
                                    the pod (inbound).  ``--ctdir REPLY`` matters: an outbound flow's own
                                    packets are ORIGINAL direction, so this can never admit an outbound
                                    connection, and a RELATED flow the pod opens is ORIGINAL too.
    udp/tcp dport 53 [-d server]  ACCEPT   DNS (only to BOTBOX_DNS_SERVERS of this family when set)
    (IPv6) icmpv6 RS/NS/NA hop-limit 255, MLD reports hop-limit 1  ACCEPT   neighbour discovery
                                    (kernel-originated, carries no socket owner; link-local by design)
    -p tcp  REJECT --reject-with tcp-reset
    -p udp  REJECT --reject-with icmp(6)-port-unreachable     (QUIC included)
    DROP                             everything else (ICMP echo, SCTP, raw IP, ...)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from netsetup.settings import Settings

Family = Literal["ipv4", "ipv6"]
Table = Literal["nat", "filter"]
Action = Literal["RETURN", "ACCEPT", "REDIRECT", "REJECT", "DROP", "JUMP"]

TAG_PREFIX = "botbox:"
NFT_TABLE = "botbox"
NFT_NAT_PRIORITY = -110  # before iptables-nft's nat OUTPUT (-100): the first NAT binding wins
NFT_FILTER_PRIORITY = 0
ALL_FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")

_ICMPV6_NAMES = {
    133: "nd-router-solicit",
    135: "nd-neighbor-solicit",
    136: "nd-neighbor-advert",
    131: "mld-listener-report",
    143: "mld2-listener-report",
}


@dataclass(frozen=True)
class Rule:
    """One rule.  Matches are ANDed; ``None``/empty means "not matched on"."""

    purpose: str  # tag suffix: comment "botbox:<purpose>"
    action: Action
    out_interface: str | None = None
    protocol: Literal["tcp", "udp", "icmpv6"] | None = None
    dst: str | None = None  # CIDR, canonical ("127.0.0.1/32")
    dport: int | None = None
    uid_owner: int | None = None
    ctstate: tuple[str, ...] = ()  # iptables names, e.g. ("RELATED", "ESTABLISHED"), ("DNAT",)
    ctdir: Literal["ORIGINAL", "REPLY"] | None = None
    icmpv6_type: int | None = None
    hop_limit: int | None = None
    to_port: int | None = None  # REDIRECT
    reject_with: str | None = None  # REJECT: "tcp-reset", "icmp-port-unreachable", "icmp6-port-unreachable"
    jump: str | None = None  # JUMP target chain

    @property
    def comment(self) -> str:
        return TAG_PREFIX + self.purpose


@dataclass(frozen=True)
class ChainPlan:
    table: Table
    name: str
    rules: tuple[Rule, ...]
    jump: Rule  # iptables: the tagged rule inserted first in the built-in OUTPUT chain


@dataclass(frozen=True)
class FamilyPlan:
    family: Family
    nat: ChainPlan
    filter: ChainPlan

    @property
    def chains(self) -> tuple[ChainPlan, ChainPlan]:
        return (self.nat, self.filter)


@dataclass(frozen=True)
class Plan:
    settings: Settings
    families: tuple[FamilyPlan, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def family(self, fam: Family) -> FamilyPlan | None:
        for fp in self.families:
            if fp.family == fam:
                return fp
        return None


def _loopback(fam: Family) -> str:
    return "127.0.0.1/32" if fam == "ipv4" else "::1/128"


def _host_cidr(ip: str) -> str:
    return ip + ("/128" if ":" in ip else "/32")


def build_family_plan(s: Settings, fam: Family) -> FamilyPlan:
    redirects: list[tuple[str, int, int]] = [("http", s.redirect_from_port, s.proxy_port)]
    if s.https_interception:
        redirects.append(("https", 443, s.https_interception_port))

    nat_rules: list[Rule] = [
        Rule("loopback", "RETURN", out_interface="lo"),
        Rule("proxy-uid", "RETURN", uid_owner=s.uid),
    ]
    for name, from_port, to_port in redirects:
        nat_rules.append(Rule(f"redirect-{name}", "REDIRECT", protocol="tcp", dport=from_port,
                              to_port=to_port))

    f: list[Rule] = []
    for name, _from_port, to_port in redirects:
        f.append(Rule(f"redirected-{name}", "ACCEPT", dst=_loopback(fam), protocol="tcp", dport=to_port,
                      ctstate=("DNAT",)))
    f.append(Rule("loopback", "ACCEPT", out_interface="lo"))
    f.append(Rule("proxy-uid", "ACCEPT", uid_owner=s.uid))
    f.append(Rule("inbound-reply", "ACCEPT", ctstate=("RELATED", "ESTABLISHED"), ctdir="REPLY"))
    family_num = 4 if fam == "ipv4" else 6
    servers = s.dns_servers_for(family_num)
    for proto in ("udp", "tcp"):
        if s.dns_servers:
            for srv in servers:
                f.append(Rule(f"dns-{proto}", "ACCEPT", dst=_host_cidr(srv), protocol=proto, dport=53))
        else:
            f.append(Rule(f"dns-{proto}", "ACCEPT", protocol=proto, dport=53))
    if fam == "ipv6":
        for t, purpose in ((133, "ndp-rs"), (135, "ndp-ns"), (136, "ndp-na")):
            f.append(Rule(purpose, "ACCEPT", protocol="icmpv6", icmpv6_type=t, hop_limit=255))
        for t, purpose in ((143, "mld2-report"), (131, "mld-report")):
            f.append(Rule(purpose, "ACCEPT", protocol="icmpv6", icmpv6_type=t, hop_limit=1))
    f.append(Rule("reject-tcp", "REJECT", protocol="tcp", reject_with="tcp-reset"))
    f.append(Rule("reject-udp", "REJECT", protocol="udp",
                  reject_with="icmp-port-unreachable" if fam == "ipv4" else "icmp6-port-unreachable"))
    f.append(Rule("drop-other", "DROP"))

    return FamilyPlan(
        family=fam,
        nat=ChainPlan("nat", s.nat_chain, tuple(nat_rules), Rule("jump-nat", "JUMP", jump=s.nat_chain)),
        filter=ChainPlan("filter", s.filter_chain, tuple(f),
                         Rule("jump-filter", "JUMP", jump=s.filter_chain)),
    )


def build_plan(s: Settings, families: tuple[Family, ...] = ALL_FAMILIES) -> Plan:
    """The desired ruleset for ``families`` (the caller resolves ``BOTBOX_ENABLE_IPV6``)."""
    if "ipv4" not in families:
        raise ValueError("the IPv4 plan is always required")
    warnings: list[str] = []
    if "ipv6" not in families:
        warnings.append("IPv6 is NOT covered by BotBox rules: IPv6 egress from the app is neither redirected "
                        "nor filtered (BOTBOX_ENABLE_IPV6=0 or IPv6 disabled in this namespace)")
    if not s.dns_servers:
        warnings.append("BOTBOX_DNS_SERVERS is empty: the app may send UDP/TCP port 53 to ANY address, a "
                        "known tunnelling/exfiltration channel; set it to the pod's resolvers")
    if s.dns_servers and "ipv6" in families and not s.dns_servers_for(6):
        warnings.append("BOTBOX_DNS_SERVERS has no IPv6 server: DNS over IPv6 is blocked")
    return Plan(s, tuple(build_family_plan(s, f) for f in families if f in ALL_FAMILIES), tuple(warnings))


# --------------------------------------------------------------------------- iptables (legacy) rendering


def iptables_rule_args(rule: Rule, fam: Family) -> list[str]:
    """Canonical ``iptables-save`` argument list of ``rule`` (without ``-A CHAIN``)."""
    a: list[str] = []
    if rule.dst:
        a += ["-d", rule.dst]
    if rule.out_interface:
        a += ["-o", rule.out_interface]
    if rule.protocol:
        a += ["-p", "ipv6-icmp" if rule.protocol == "icmpv6" else rule.protocol]
        if rule.protocol in ("tcp", "udp") and rule.dport is not None:
            a += ["-m", rule.protocol, "--dport", str(rule.dport)]
        if rule.protocol == "icmpv6" and rule.icmpv6_type is not None:
            a += ["-m", "icmp6", "--icmpv6-type", str(rule.icmpv6_type)]
    if rule.hop_limit is not None:
        a += ["-m", "hl", "--hl-eq", str(rule.hop_limit)]
    if rule.uid_owner is not None:
        a += ["-m", "owner", "--uid-owner", str(rule.uid_owner)]
    if rule.ctstate or rule.ctdir:
        a += ["-m", "conntrack"]
        if rule.ctstate:
            a += ["--ctstate", ",".join(rule.ctstate)]
        if rule.ctdir:
            a += ["--ctdir", rule.ctdir]
    a += ["-m", "comment", "--comment", json.dumps(rule.comment)]
    if rule.action == "JUMP":
        a += ["-j", str(rule.jump)]
    else:
        a += ["-j", rule.action]
    if rule.action == "REDIRECT":
        a += ["--to-ports", str(rule.to_port)]
    if rule.action == "REJECT":
        a += ["--reject-with", str(rule.reject_with)]
    return a


def iptables_rule_line(chain: str, rule: Rule, fam: Family) -> str:
    return " ".join(["-A", chain, *iptables_rule_args(rule, fam)])


@dataclass(frozen=True)
class TableLines:
    """Expected ``iptables-save`` content of one table that belongs to BotBox."""

    table: Table
    chain: str
    jump_line: str  # "-A OUTPUT ... -j CHAIN"
    rule_lines: tuple[str, ...]


def iptables_lines(fp: FamilyPlan) -> tuple[TableLines, TableLines]:
    out = []
    for cp in fp.chains:
        out.append(TableLines(
            table=cp.table,
            chain=cp.name,
            jump_line=iptables_rule_line("OUTPUT", cp.jump, fp.family),
            rule_lines=tuple(iptables_rule_line(cp.name, r, fp.family) for r in cp.rules),
        ))
    return out[0], out[1]


def render_iptables_save(plan: Plan) -> dict[Family, str]:
    """Per family: an ``iptables-restore --noflush`` fragment equivalent to what ``apply`` installs.

    Declaring ``:CHAIN - [0:0]`` flushes (or creates) BotBox's chain; the jump is inserted first in OUTPUT.
    """
    res: dict[Family, str] = {}
    for fp in plan.families:
        tool = "iptables" if fp.family == "ipv4" else "ip6tables"
        lines: list[str] = [f"# BotBox {fp.family} rules ({tool}-restore --noflush)"]
        for tl in iptables_lines(fp):
            lines.append(f"*{tl.table}")
            lines.append(f":{tl.chain} - [0:0]")
            lines.append(tl.jump_line.replace("-A OUTPUT", "-I OUTPUT 1", 1))
            lines.extend(tl.rule_lines)
            lines.append("COMMIT")
        res[fp.family] = "\n".join(lines) + "\n"
    return res


# --------------------------------------------------------------------------- nft rendering


def _m(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def nft_rule_exprs(rule: Rule, fam: Family, *, listing: bool = False) -> list[dict[str, Any]]:
    """libnftables JSON statements of ``rule`` in the ``inet`` table.

    Every rule pins its family (``meta nfproto``), so the IPv4 plan never touches IPv6 packets.  With
    ``listing=True`` the result is what ``nft -j list`` prints back: nft hides an ``nfproto`` match that it
    considers implied by a later ICMPv6 header match (the kernel keeps it).
    """
    e: list[dict[str, Any]] = []
    hide_nfproto = listing and rule.icmpv6_type is not None
    l3 = "ip" if fam == "ipv4" else "ip6"
    if rule.dst:
        addr, plen = rule.dst.split("/")
        full = (fam == "ipv4" and plen == "32") or (fam == "ipv6" and plen == "128")
        right: Any = addr if full else {"prefix": {"addr": addr, "len": int(plen)}}
        e.append(_m({"payload": {"protocol": l3, "field": "daddr"}}, right))
    elif not hide_nfproto:
        # With a daddr match nft adds (and lists) the family dependency itself.
        e.append(_m({"meta": {"key": "nfproto"}}, fam))
    if rule.out_interface:
        e.append(_m({"meta": {"key": "oifname"}}, rule.out_interface))
    if rule.protocol in ("tcp", "udp"):
        if rule.dport is not None:
            e.append(_m({"payload": {"protocol": rule.protocol, "field": "dport"}}, rule.dport))
        else:
            e.append(_m({"meta": {"key": "l4proto"}}, rule.protocol))
    elif rule.protocol == "icmpv6":
        if rule.icmpv6_type is not None:
            e.append(_m({"payload": {"protocol": "icmpv6", "field": "type"}},
                        _ICMPV6_NAMES[rule.icmpv6_type]))
        else:
            e.append(_m({"meta": {"key": "l4proto"}}, "ipv6-icmp"))
    if rule.hop_limit is not None:
        e.append(_m({"payload": {"protocol": "ip6", "field": "hoplimit"}}, rule.hop_limit))
    if rule.uid_owner is not None:
        e.append(_m({"meta": {"key": "skuid"}}, rule.uid_owner))
    if rule.ctstate:
        if rule.ctstate == ("DNAT",):
            e.append(_m({"ct": {"key": "status"}}, "dnat", "in"))
        else:
            states = [s.lower() for s in sorted(rule.ctstate, key=lambda x: x != "ESTABLISHED")]
            e.append(_m({"ct": {"key": "state"}}, states if len(states) > 1 else states[0], "in"))
    if rule.ctdir:
        e.append(_m({"ct": {"key": "direction"}}, rule.ctdir.lower()))
    e.append({"counter": None})  # like iptables, every rule counts (operators: which rule dropped it?)
    if rule.action == "ACCEPT":
        e.append({"accept": None})
    elif rule.action == "DROP":
        e.append({"drop": None})
    elif rule.action == "RETURN":
        e.append({"return": None})
    elif rule.action == "REDIRECT":
        e.append({"redirect": {"port": rule.to_port}})
    elif rule.action == "REJECT":
        if rule.reject_with == "tcp-reset":
            e.append({"reject": {"type": "tcp reset"}})
        else:
            e.append({"reject": {"type": "icmp" if fam == "ipv4" else "icmpv6", "expr": "port-unreachable"}})
    else:
        raise ValueError(f"action {rule.action} has no nft rendering")
    return e


def nft_chain_defs(plan: Plan) -> list[dict[str, Any]]:
    s = plan.settings
    return [
        {"family": "inet", "table": NFT_TABLE, "name": s.nat_chain, "type": "nat", "hook": "output",
         "prio": NFT_NAT_PRIORITY, "policy": "accept"},
        {"family": "inet", "table": NFT_TABLE, "name": s.filter_chain, "type": "filter", "hook": "output",
         "prio": NFT_FILTER_PRIORITY, "policy": "accept"},
    ]


def nft_rules(plan: Plan, *, listing: bool = False) -> dict[str, list[dict[str, Any]]]:
    """chain name -> rules (each ``{"family","table","chain","expr","comment"}``) in order."""
    s = plan.settings
    out: dict[str, list[dict[str, Any]]] = {s.nat_chain: [], s.filter_chain: []}
    # NAT rules of all families first, in plan order per family; same for filter.  Families never
    # interact (every rule pins its family), so concatenation preserves each family's order.
    for fp in plan.families:
        for cp in fp.chains:
            for r in cp.rules:
                out[cp.name].append({"family": "inet", "table": NFT_TABLE, "chain": cp.name,
                                     "expr": nft_rule_exprs(r, fp.family, listing=listing),
                                     "comment": r.comment})
    return out


def nft_apply_commands(plan: Plan) -> dict[str, Any]:
    """One libnftables JSON batch that atomically (re)creates ``table inet botbox`` exactly as planned.

    ``add`` + ``delete`` + ``add`` of the table makes it idempotent whether or not the table exists; the
    kernel applies the whole batch as one transaction, so there is no moment without our chains.
    """
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": "inet", "name": NFT_TABLE}}},
        {"delete": {"table": {"family": "inet", "name": NFT_TABLE}}},
        {"add": {"table": {"family": "inet", "name": NFT_TABLE}}},
    ]
    for c in nft_chain_defs(plan):
        cmds.append({"add": {"chain": c}})
    for rules in nft_rules(plan).values():
        for r in rules:
            cmds.append({"add": {"rule": r}})
    return {"nftables": cmds}


def nft_text_expr(m: dict[str, Any]) -> str:
    if "match" in m:
        mm = m["match"]
        left = mm["left"]
        if "meta" in left:
            lt = f"meta {left['meta']['key']}"
        elif "payload" in left:
            lt = f"{left['payload']['protocol']} {left['payload']['field']}"
        else:
            lt = f"ct {left['ct']['key']}"
        r = mm["right"]
        if isinstance(r, list):
            rt = ",".join(r)
        elif isinstance(r, dict):
            rt = f"{r['prefix']['addr']}/{r['prefix']['len']}"
        elif isinstance(r, str) and lt == "meta oifname":
            rt = json.dumps(r)
        else:
            rt = str(r)
        return f"{lt} {rt}"
    if "counter" in m:
        return "counter"
    if "redirect" in m:
        return f"redirect to :{m['redirect']['port']}"
    if "reject" in m:
        rj = m["reject"]
        if rj["type"] == "tcp reset":
            return "reject with tcp reset"
        return f"reject with {rj['type']} {rj['expr']}"
    (verdict,) = m.keys()
    return str(verdict)


def render_nft(plan: Plan) -> str:
    """The ``table inet botbox`` in nft syntax (same content as :func:`nft_apply_commands`)."""
    lines = [f"table inet {NFT_TABLE} {{"]
    rules = nft_rules(plan)
    for c in nft_chain_defs(plan):
        lines.append(f"\tchain {c['name']} {{")
        lines.append(f"\t\ttype {c['type']} hook {c['hook']} priority {c['prio']}; policy {c['policy']};")
        for r in rules[c["name"]]:
            body = " ".join(nft_text_expr(x) for x in r["expr"])
            lines.append(f"\t\t{body} comment {json.dumps(r['comment'])}")
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"
