"""netsetup pure parts: settings parsing, the rule plan and its renderings, backend decision (no root)."""

from __future__ import annotations

import json

import pytest

from netsetup import cli
from netsetup.backends import BackendUnavailable, compare_rules
from netsetup.detect import decide, resolve_families
from netsetup.plan import (
    build_plan,
    iptables_lines,
    nft_apply_commands,
    nft_rules,
    render_iptables_save,
    render_nft,
)
from netsetup.settings import Settings, SettingsError, parse_settings

# ------------------------------------------------------------------------------------------- golden

GOLDEN_DEFAULT_V4 = """\
# BotBox ipv4 rules (iptables-restore --noflush)
*nat
:EGRESS_REDIRECT - [0:0]
-I OUTPUT 1 -m comment --comment "botbox:jump-nat" -j EGRESS_REDIRECT
-A EGRESS_REDIRECT -o lo -m comment --comment "botbox:loopback" -j RETURN
-A EGRESS_REDIRECT -m owner --uid-owner 1337 -m comment --comment "botbox:proxy-uid" -j RETURN
-A EGRESS_REDIRECT -p tcp -m tcp --dport 80 -m comment --comment "botbox:redirect-http" -j REDIRECT --to-ports 8080
COMMIT
*filter
:EGRESS_FILTER - [0:0]
-I OUTPUT 1 -m comment --comment "botbox:jump-filter" -j EGRESS_FILTER
-A EGRESS_FILTER -d 127.0.0.1/32 -p tcp -m tcp --dport 8080 -m conntrack --ctstate DNAT -m comment --comment "botbox:redirected-http" -j ACCEPT
-A EGRESS_FILTER -o lo -m comment --comment "botbox:loopback" -j ACCEPT
-A EGRESS_FILTER -m owner --uid-owner 1337 -m comment --comment "botbox:proxy-uid" -j ACCEPT
-A EGRESS_FILTER -m conntrack --ctstate RELATED,ESTABLISHED --ctdir REPLY -m comment --comment "botbox:inbound-reply" -j ACCEPT
-A EGRESS_FILTER -p udp -m udp --dport 53 -m comment --comment "botbox:dns-udp" -j ACCEPT
-A EGRESS_FILTER -p tcp -m tcp --dport 53 -m comment --comment "botbox:dns-tcp" -j ACCEPT
-A EGRESS_FILTER -p tcp -m comment --comment "botbox:reject-tcp" -j REJECT --reject-with tcp-reset
-A EGRESS_FILTER -p udp -m comment --comment "botbox:reject-udp" -j REJECT --reject-with icmp-port-unreachable
-A EGRESS_FILTER -m comment --comment "botbox:drop-other" -j DROP
COMMIT
"""  # noqa: E501

GOLDEN_INTERCEPT_DNS_V6 = """\
# BotBox ipv6 rules (ip6tables-restore --noflush)
*nat
:BB_NAT - [0:0]
-I OUTPUT 1 -m comment --comment "botbox:jump-nat" -j BB_NAT
-A BB_NAT -o lo -m comment --comment "botbox:loopback" -j RETURN
-A BB_NAT -m owner --uid-owner 2000 -m comment --comment "botbox:proxy-uid" -j RETURN
-A BB_NAT -p tcp -m tcp --dport 8081 -m comment --comment "botbox:redirect-http" -j REDIRECT --to-ports 18080
-A BB_NAT -p tcp -m tcp --dport 443 -m comment --comment "botbox:redirect-https" -j REDIRECT --to-ports 18443
COMMIT
*filter
:BB_FILTER - [0:0]
-I OUTPUT 1 -m comment --comment "botbox:jump-filter" -j BB_FILTER
-A BB_FILTER -d ::1/128 -p tcp -m tcp --dport 18080 -m conntrack --ctstate DNAT -m comment --comment "botbox:redirected-http" -j ACCEPT
-A BB_FILTER -d ::1/128 -p tcp -m tcp --dport 18443 -m conntrack --ctstate DNAT -m comment --comment "botbox:redirected-https" -j ACCEPT
-A BB_FILTER -o lo -m comment --comment "botbox:loopback" -j ACCEPT
-A BB_FILTER -m owner --uid-owner 2000 -m comment --comment "botbox:proxy-uid" -j ACCEPT
-A BB_FILTER -m conntrack --ctstate RELATED,ESTABLISHED --ctdir REPLY -m comment --comment "botbox:inbound-reply" -j ACCEPT
-A BB_FILTER -d fd00:203:10::53/128 -p udp -m udp --dport 53 -m comment --comment "botbox:dns-udp" -j ACCEPT
-A BB_FILTER -d fd00:203:10::53/128 -p tcp -m tcp --dport 53 -m comment --comment "botbox:dns-tcp" -j ACCEPT
-A BB_FILTER -p ipv6-icmp -m icmp6 --icmpv6-type 133 -m hl --hl-eq 255 -m comment --comment "botbox:ndp-rs" -j ACCEPT
-A BB_FILTER -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m hl --hl-eq 255 -m comment --comment "botbox:ndp-ns" -j ACCEPT
-A BB_FILTER -p ipv6-icmp -m icmp6 --icmpv6-type 136 -m hl --hl-eq 255 -m comment --comment "botbox:ndp-na" -j ACCEPT
-A BB_FILTER -p ipv6-icmp -m icmp6 --icmpv6-type 143 -m hl --hl-eq 1 -m comment --comment "botbox:mld2-report" -j ACCEPT
-A BB_FILTER -p ipv6-icmp -m icmp6 --icmpv6-type 131 -m hl --hl-eq 1 -m comment --comment "botbox:mld-report" -j ACCEPT
-A BB_FILTER -p tcp -m comment --comment "botbox:reject-tcp" -j REJECT --reject-with tcp-reset
-A BB_FILTER -p udp -m comment --comment "botbox:reject-udp" -j REJECT --reject-with icmp6-port-unreachable
-A BB_FILTER -m comment --comment "botbox:drop-other" -j DROP
COMMIT
"""  # noqa: E501

GOLDEN_NFT_V4_INTERCEPT = """\
table inet botbox {
	chain BB_NAT {
		type nat hook output priority -110; policy accept;
		meta nfproto ipv4 meta oifname "lo" counter return comment "botbox:loopback"
		meta nfproto ipv4 meta skuid 2000 counter return comment "botbox:proxy-uid"
		meta nfproto ipv4 tcp dport 8081 counter redirect to :18080 comment "botbox:redirect-http"
		meta nfproto ipv4 tcp dport 443 counter redirect to :18443 comment "botbox:redirect-https"
	}
	chain BB_FILTER {
		type filter hook output priority 0; policy accept;
		ip daddr 127.0.0.1 tcp dport 18080 ct status dnat counter accept comment "botbox:redirected-http"
		ip daddr 127.0.0.1 tcp dport 18443 ct status dnat counter accept comment "botbox:redirected-https"
		meta nfproto ipv4 meta oifname "lo" counter accept comment "botbox:loopback"
		meta nfproto ipv4 meta skuid 2000 counter accept comment "botbox:proxy-uid"
		meta nfproto ipv4 ct state established,related ct direction reply counter accept comment "botbox:inbound-reply"
		ip daddr 10.203.10.53 udp dport 53 counter accept comment "botbox:dns-udp"
		ip daddr 10.203.10.53 tcp dport 53 counter accept comment "botbox:dns-tcp"
		meta nfproto ipv4 meta l4proto tcp counter reject with tcp reset comment "botbox:reject-tcp"
		meta nfproto ipv4 meta l4proto udp counter reject with icmp port-unreachable comment "botbox:reject-udp"
		meta nfproto ipv4 counter drop comment "botbox:drop-other"
	}
}
"""  # noqa: E501

CUSTOM_ENV = {
    "BOTBOX_UID": "2000",
    "BOTBOX_PROXY_PORT": "18080",
    "BOTBOX_REDIRECT_FROM_PORT": "8081",
    "BOTBOX_ENABLE_HTTPS_INTERCEPTION": "1",
    "BOTBOX_HTTPS_INTERCEPTION_PORT": "18443",
    "BOTBOX_NAT_CHAIN": "BB_NAT",
    "BOTBOX_FILTER_CHAIN": "BB_FILTER",
    "BOTBOX_DNS_SERVERS": "10.203.10.53, fd00:203:10::53",
}


def test_golden_default_iptables_v4() -> None:
    plan = build_plan(parse_settings({}), ("ipv4", "ipv6"))
    assert render_iptables_save(plan)["ipv4"] == GOLDEN_DEFAULT_V4


def test_golden_interception_custom_chains_dns_iptables_v6() -> None:
    plan = build_plan(parse_settings(CUSTOM_ENV), ("ipv4", "ipv6"))
    assert render_iptables_save(plan)["ipv6"] == GOLDEN_INTERCEPT_DNS_V6


def test_golden_nft_ipv4_only_interception() -> None:
    plan = build_plan(parse_settings(CUSTOM_ENV), ("ipv4",))
    assert render_nft(plan) == GOLDEN_NFT_V4_INTERCEPT
    assert "ipv6" not in render_iptables_save(plan)


def test_nft_batch_is_one_idempotent_transaction() -> None:
    plan = build_plan(parse_settings({}), ("ipv4", "ipv6"))
    cmds = nft_apply_commands(plan)["nftables"]
    # add (so delete never fails) + delete + add: replaces any old table inside the same transaction
    assert [next(iter(c)) for c in cmds[:3]] == ["add", "delete", "add"]
    assert all("table" in c[next(iter(c))] for c in cmds[:3])
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    assert rules and all(r["comment"].startswith("botbox:") for r in rules)
    # every rule pins its family so an IPv4-only plan never touches IPv6 packets
    for r in rules:
        first = r["expr"][0]["match"]["left"]
        assert first in ({"meta": {"key": "nfproto"}}, {"payload": {"protocol": "ip", "field": "daddr"}},
                         {"payload": {"protocol": "ip6", "field": "daddr"}})


def test_both_renderings_come_from_the_same_plan() -> None:
    plan = build_plan(parse_settings(CUSTOM_ENV), ("ipv4", "ipv6"))
    n_ipt = sum(len(tl.rule_lines) for fp in plan.families for tl in iptables_lines(fp))
    n_nft = sum(len(v) for v in nft_rules(plan).values())
    assert n_ipt == n_nft == sum(len(cp.rules) for fp in plan.families for cp in fp.chains)


# ------------------------------------------------------------------------------------------- plan semantics


def _purposes(plan_rules: object) -> list[str]:
    return [r.purpose for r in plan_rules]  # type: ignore[attr-defined]


def test_filter_order_accepts_before_rejects_and_drop_last() -> None:
    plan = build_plan(parse_settings({}), ("ipv4", "ipv6"))
    for fp in plan.families:
        p = _purposes(fp.filter.rules)
        assert p[-3:] == ["reject-tcp", "reject-udp", "drop-other"]
        assert p.index("proxy-uid") < p.index("reject-tcp")
        nat = _purposes(fp.nat.rules)
        assert nat[:2] == ["loopback", "proxy-uid"]  # returns come before any redirect
        assert ("ndp-ns" in p) == (fp.family == "ipv6")


def test_inbound_reply_rule_is_reply_direction_only() -> None:
    plan = build_plan(parse_settings({}), ("ipv4",))
    (rule,) = [r for r in plan.families[0].filter.rules if r.purpose == "inbound-reply"]
    assert rule.ctdir == "REPLY"
    assert "NEW" not in rule.ctstate


def test_dns_servers_restrict_per_family_and_warn_without_v6_server() -> None:
    plan = build_plan(parse_settings({"BOTBOX_DNS_SERVERS": "10.203.10.53"}), ("ipv4", "ipv6"))
    v4, v6 = plan.families
    assert [r.dst for r in v4.filter.rules if r.purpose.startswith("dns")] == ["10.203.10.53/32"] * 2
    assert [r for r in v6.filter.rules if r.purpose.startswith("dns")] == []
    assert any("DNS over IPv6 is blocked" in w for w in plan.warnings)


def test_interception_adds_443_redirect_only_when_enabled() -> None:
    off = build_plan(parse_settings({}), ("ipv4",))
    on = build_plan(parse_settings({"BOTBOX_ENABLE_HTTPS_INTERCEPTION": "1"}), ("ipv4",))
    assert [r.dport for r in off.families[0].nat.rules if r.action == "REDIRECT"] == [80]
    assert [(r.dport, r.to_port) for r in on.families[0].nat.rules if r.action == "REDIRECT"] == [
        (80, 8080), (443, 8443)]


def test_unrestricted_dns_warns() -> None:
    assert any("port 53 to ANY address" in w for w in build_plan(parse_settings({}), ("ipv4",)).warnings)
    restricted = build_plan(parse_settings({"BOTBOX_DNS_SERVERS": "10.0.0.53,fd00:203:10::53"}))
    assert not any("53" in w for w in restricted.warnings)


def test_ipv4_only_plan_warns() -> None:
    plan = build_plan(parse_settings({}), ("ipv4",))
    assert any("IPv6 is NOT covered" in w for w in plan.warnings)


# ------------------------------------------------------------------------------------------- settings


def test_defaults_match_contract() -> None:
    assert parse_settings({}) == Settings()
    s = Settings()
    assert (s.uid, s.proxy_port, s.redirect_from_port, s.https_interception, s.https_interception_port,
            s.enable_ipv6, s.backend, s.nat_chain, s.filter_chain, s.wait_seconds, s.dns_servers) == (
        1337, 8080, 80, False, 8443, "auto", "auto", "EGRESS_REDIRECT", "EGRESS_FILTER", 5, ())


def test_flags_win_over_env() -> None:
    s = parse_settings({"BOTBOX_PROXY_PORT": "9000", "BOTBOX_UID": "4000"}, {"BOTBOX_PROXY_PORT": "9001"})
    assert (s.proxy_port, s.uid) == (9001, 4000)


@pytest.mark.parametrize(
    ("env", "var"),
    [
        ({"BOTBOX_IPTABLES_BACKEND": "iptables"}, "BOTBOX_IPTABLES_BACKEND"),
        ({"BOTBOX_PROXY_PORT": "0"}, "BOTBOX_PROXY_PORT"),
        ({"BOTBOX_PROXY_PORT": "65536"}, "BOTBOX_PROXY_PORT"),
        ({"BOTBOX_PROXY_PORT": "+80"}, "BOTBOX_PROXY_PORT"),
        ({"BOTBOX_PROXY_PORT": " 80"}, "BOTBOX_PROXY_PORT"),
        ({"BOTBOX_PROXY_PORT": "08080"}, "BOTBOX_PROXY_PORT"),
        ({"BOTBOX_PROXY_PORT": "8_080"}, "BOTBOX_PROXY_PORT"),
        ({"BOTBOX_REDIRECT_FROM_PORT": "http"}, "BOTBOX_REDIRECT_FROM_PORT"),
        ({"BOTBOX_ENABLE_IPV6": "maybe"}, "BOTBOX_ENABLE_IPV6"),
        ({"BOTBOX_ENABLE_IPV6": "true"}, "BOTBOX_ENABLE_IPV6"),
        ({"BOTBOX_ENABLE_HTTPS_INTERCEPTION": "yes"}, "BOTBOX_ENABLE_HTTPS_INTERCEPTION"),
        ({"BOTBOX_UID": "proxy"}, "BOTBOX_UID"),
        ({"BOTBOX_UID": "-1"}, "BOTBOX_UID"),
        ({"BOTBOX_UID": "0"}, "BOTBOX_UID"),
        ({"BOTBOX_UID": "4294967295"}, "BOTBOX_UID"),
        ({"BOTBOX_NAT_CHAIN": "OUTPUT"}, "BOTBOX_NAT_CHAIN"),
        ({"BOTBOX_NAT_CHAIN": "A" * 29}, "BOTBOX_NAT_CHAIN"),
        ({"BOTBOX_FILTER_CHAIN": "bad chain"}, "BOTBOX_FILTER_CHAIN"),
        ({"BOTBOX_FILTER_CHAIN": "EGRESS_REDIRECT"}, "BOTBOX_FILTER_CHAIN"),
        ({"BOTBOX_IPTABLES_WAIT_SECONDS": "-1"}, "BOTBOX_IPTABLES_WAIT_SECONDS"),
        ({"BOTBOX_DNS_SERVERS": "10.0.0.1,dns.example"}, "BOTBOX_DNS_SERVERS"),
        ({"BOTBOX_DNS_SERVERS": "10.0.0.1,"}, "BOTBOX_DNS_SERVERS"),
        ({"BOTBOX_DNS_SERVERS": "0.0.0.0"}, "BOTBOX_DNS_SERVERS"),
        ({"BOTBOX_ENABLE_HTTPS_INTERCEPTION": "1", "BOTBOX_REDIRECT_FROM_PORT": "443"},
         "BOTBOX_REDIRECT_FROM_PORT"),
        ({"BOTBOX_ENABLE_HTTPS_INTERCEPTION": "1", "BOTBOX_HTTPS_INTERCEPTION_PORT": "8080"},
         "BOTBOX_HTTPS_INTERCEPTION_PORT"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], var: str) -> None:
    with pytest.raises(SettingsError) as ei:
        parse_settings(env)
    msg = str(ei.value)
    assert var in msg
    assert "\n" not in msg


def test_redirect_443_without_interception_is_valid() -> None:
    assert parse_settings({"BOTBOX_REDIRECT_FROM_PORT": "443"}).redirect_from_port == 443


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["plan", "--proxy-port", "99999"], {}),
        (["apply", "--backend", "iptables"], {}),
        (["verify", "--enable-ipv6", "maybe"], {}),
        (["apply"], {"BOTBOX_ENABLE_HTTPS_INTERCEPTION": "1", "BOTBOX_REDIRECT_FROM_PORT": "443"}),
        (["remove"], {"BOTBOX_UID": "x"}),
        (["frobnicate"], {}),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_reason(argv: list[str], env: dict[str, str],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    def never(*_a: object, **_k: object) -> None:  # this runs in the host namespace: touch nothing
        raise AssertionError("netsetup went past settings validation")

    monkeypatch.setattr(cli, "detect", never)
    monkeypatch.setattr(cli, "_remove", never)
    try:
        rc = cli.run(argv)
    except SystemExit as e:
        rc = int(e.code or 0)
    assert rc == 2
    err_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("netsetup:")]
    assert len(err_lines) == 1


def test_cli_plan_touches_nothing_and_prints_both_renderings(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["plan", "--enable-ipv6", "1"]) == 0
    out = capsys.readouterr().out
    assert "*nat" in out and "table inet botbox" in out and "ip6tables-restore" in out


def test_cli_apply_dry_run_prints_plan_for_the_backend(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    def never(*_a: object, **_k: object) -> None:
        raise AssertionError("--dry-run must not reach a backend")

    monkeypatch.setattr(cli, "detect", never)
    assert cli.run(["apply", "--dry-run", "--backend", "legacy", "--enable-ipv6", "1"]) == 0
    out = capsys.readouterr().out
    assert "-I OUTPUT 1 -m comment" in out and "table inet" not in out


def test_cli_plan_ipv6_off_warns_loudly(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["plan", "--enable-ipv6", "0", "--format", "iptables"]) == 0
    cap = capsys.readouterr()
    assert "*** WARNING: BOTBOX_ENABLE_IPV6=0" in cap.err
    assert "ip6tables" not in cap.out


# ------------------------------------------------------------------------------------------- decisions


@pytest.mark.parametrize(
    ("state", "mode", "families"),
    [
        ("enabled", "auto", ("ipv4", "ipv6")),
        ("disabled", "auto", ("ipv4",)),
        ("absent", "auto", ("ipv4",)),
        ("disabled", "1", ("ipv4", "ipv6")),
        ("enabled", "0", ("ipv4",)),
    ],
)
def test_resolve_families(state: str, mode: str, families: tuple[str, ...]) -> None:
    fams, _ = resolve_families(parse_settings({"BOTBOX_ENABLE_IPV6": mode}), state)
    assert fams == families


def test_ipv6_required_without_kernel_ipv6_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable):
        resolve_families(parse_settings({"BOTBOX_ENABLE_IPV6": "1"}), "absent")


OK = {"nft": None, "legacy": None}


@pytest.mark.parametrize(
    ("requested", "unavail", "rules", "ours", "expect", "warn"),
    [
        ("auto", OK, {}, {}, "nft", False),                                      # fresh: nft preferred
        ("auto", {"nft": "no nft", "legacy": None}, {}, {}, "legacy", False),    # nft missing
        ("auto", OK, {"legacy": 12}, {}, "legacy", False),                       # legacy in use
        ("auto", OK, {"nft": 3}, {}, "nft", False),                              # iptables-nft in use
        ("auto", OK, {"nft": 3, "legacy": 9}, {}, "legacy", True),               # both: more rules
        ("auto", OK, {"nft": 30, "legacy": 9}, {"legacy": True}, "legacy", True),  # both: ours wins
        ("legacy", OK, {"nft": 4}, {}, "legacy", False),
        ("nft", OK, {"nft": 1, "legacy": 1}, {}, "nft", True),
    ],
)
def test_decide(requested: str, unavail: dict[str, str | None], rules: dict[str, int],  # noqa: PLR0917
                ours: dict[str, bool], expect: str, warn: bool) -> None:
    d = decide(requested, unavail, rules, ours)
    assert d.backend == expect
    assert bool(d.warnings) == warn
    assert expect in d.reason


@pytest.mark.parametrize(
    ("requested", "unavail"),
    [("nft", {"nft": "nft: not found", "legacy": None}),
     ("legacy", {"nft": None, "legacy": "no ip_tables"}),
     ("auto", {"nft": "x", "legacy": "y"})],
)
def test_decide_unavailable(requested: str, unavail: dict[str, str | None]) -> None:
    with pytest.raises(BackendUnavailable):
        decide(requested, unavail, {}, {})


def test_compare_rules_statuses() -> None:
    checks = compare_rules(["a", "b", "c"], ["b", "a", "x"], table="filter", family="ipv4", chain="C")
    status = {c.rule: c.status for c in checks}
    assert status == {"a": "misplaced", "b": "misplaced", "c": "missing", "x": "extra"}
    assert all(c.ok for c in compare_rules(["a"], ["a"], table="t", family="f", chain="c"))
    assert checks[0].line() == "filter ipv4 C a: misplaced"


def test_plan_json_roundtrip_is_plain_data() -> None:
    # the legacy worker receives the plan as JSON: it must be plain data
    plan = build_plan(parse_settings(CUSTOM_ENV), ("ipv4", "ipv6"))
    json.dumps(nft_apply_commands(plan))
