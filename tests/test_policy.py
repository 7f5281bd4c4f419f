"""Policy decisions: P1 exact match, P3 ports, P4 default action, R7 TRACE, metric labels."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from botbox.config import EgressPolicyConfig, parse_config
from botbox.hostname import InvalidHost, canonicalize_host, parse_authority
from botbox.policy import Decision, HeaderRewrite, Policy

CI = settings(max_examples=200, deadline=None)

AUTH = {"name": "Authorization", "value": "Bearer {value}", "secret_ref": "openai-api-key"}


def _policy(rules: list[dict[str, Any]], default: str = "deny") -> Policy:
    cfg = parse_config({"egress_policy": {"default_action": default, "rules": rules}})
    return Policy.from_config(cfg.egress_policy)


@pytest.fixture
def policy() -> Policy:
    return _policy([
        {"host": "api.openai.com", "action": "allow", "header_rewrites": [AUTH]},
        {"host": "alt.example.com", "action": "allow", "allowed_ports": [8443, 443]},
        {"host": "blocked.example.com", "action": "deny"},
        {"host": "[2001:db8::1]", "action": "allow"},
    ])


def test_allowed_rule_match(policy: Policy) -> None:
    d = policy.decide("api.openai.com", 443, "POST")
    assert d.allowed and d.host == "api.openai.com" and d.port == 443
    assert d.rule == "api.openai.com" and d.metric_host == "api.openai.com"
    assert [r.name for r in d.rewrites] == ["Authorization"]
    assert d.rewrites[0].name_lower == b"authorization" and d.rewrites[0].secret_ref == "openai-api-key"
    assert d.reason == "rule_allow"


def test_request_host_variants_match_through_the_same_canonicalisation(policy: Policy) -> None:
    for raw in ("API.OpenAI.com", "api.openai.com.", "API.OPENAI.COM.:443"):
        host, port = parse_authority(raw)
        assert policy.decide(host, port or 443, "GET").allowed
    assert policy.decide(canonicalize_host("[2001:DB8:0::1]"), 443, "GET").allowed


def test_near_misses_are_denied(policy: Policy) -> None:
    for host in ("openai.com", "evil.api.openai.com", "api.openai.com.evil.com", "api-openai.com"):
        d = policy.decide(host, 443, "GET")
        assert not d.allowed and d.reason == "no_rule" and d.rule == "default"
        assert d.metric_host == "_denied" and d.rewrites == ()


def test_port_must_be_allowed_p3(policy: Policy) -> None:
    d = policy.decide("api.openai.com", 8443, "GET")
    assert not d.allowed and d.reason == "port" and d.rule == "api.openai.com"
    assert d.metric_host == "_denied" and d.rewrites == ()
    assert not policy.decide("api.openai.com", 80, "GET").allowed
    assert policy.decide("alt.example.com", 8443, "GET").allowed
    assert policy.decide("alt.example.com", 443, "GET").allowed
    assert not policy.decide("alt.example.com", 8080, "GET").allowed


def test_deny_rule_always_denies(policy: Policy) -> None:
    for port in (443, 80, 8443):
        d = policy.decide("blocked.example.com", port, "GET")
        assert not d.allowed and d.reason == "rule_deny" and d.rule == "blocked.example.com"
        assert d.metric_host == "_denied"


def test_deny_rule_wins_over_default_allow() -> None:
    p = _policy([{"host": "blocked.example.com", "action": "deny"}], default="allow")
    assert not p.decide("blocked.example.com", 443, "GET").allowed
    assert p.decide("other.example.com", 443, "GET").allowed


def test_default_allow_p4() -> None:
    p = _policy([{"host": "api.openai.com", "action": "allow", "header_rewrites": [AUTH]}], default="allow")
    d = p.decide("unknown.example", 443, "GET")
    assert d.allowed and d.rewrites == () and d.rule == "default"
    assert d.metric_host == "_default_allow" and d.reason == "default_allow"
    assert d.host == "unknown.example"
    d = p.decide("unknown.example", 80, "GET")
    assert not d.allowed and d.reason == "port" and d.metric_host == "_denied"
    assert not p.decide("unknown.example", 8443, "GET").allowed
    # a rule's own port list still applies under default allow
    assert not p.decide("api.openai.com", 8443, "GET").allowed


def test_default_deny_is_default() -> None:
    p = Policy.from_config(EgressPolicyConfig())
    d = p.decide("example.com", 443, "GET")
    assert not d.allowed and d.reason == "no_rule"
    assert not p.default_allow


@pytest.mark.parametrize("method", ["TRACE", "trace", "Trace"])
def test_trace_gets_no_rewrites_r7(policy: Policy, method: str) -> None:
    d = policy.decide("api.openai.com", 443, method)
    assert d.allowed and d.rewrites == ()
    assert policy.decide("api.openai.com", 443, "GET").rewrites  # sanity: GET does get them


def test_referenced_secrets_and_header_names(policy: Policy) -> None:
    assert policy.referenced_secrets == frozenset({"openai-api-key"})
    assert policy.rewritten_header_names == frozenset({b"authorization"})
    assert policy.rule_hosts() == {"api.openai.com", "alt.example.com", "blocked.example.com", "2001:db8::1"}


def test_static_rewrite_is_not_a_secret_reference() -> None:
    p = _policy([{"host": "a.com", "action": "allow",
                  "header_rewrites": [{"name": "X-Static", "value": "v"}]}])
    assert p.referenced_secrets == frozenset()
    assert p.rewritten_header_names == frozenset({b"x-static"})


def test_decisions_are_precomputed_for_the_hot_path(policy: Policy) -> None:
    assert policy.decide("api.openai.com", 443, "GET") is policy.decide("api.openai.com", 443, "POST")


def test_header_rewrite_repr_hides_template() -> None:
    hr = HeaderRewrite("X-Static", b"x-static", "static-credential-123", None)
    assert "static-credential" not in repr(hr)
    d = Decision(True, "a", 443, "a", (hr,), "a", "rule_allow")
    assert "static-credential" not in repr(d)


def test_duplicate_hosts_refused_even_without_config_validation() -> None:
    cfg = EgressPolicyConfig.model_construct(
        default_action="deny",
        rules=[
            parse_config({"egress_policy": {"rules": [{"host": "a.com", "action": "allow"}]}})
            .egress_policy.rules[0]
        ] * 2,
    )
    with pytest.raises(ValueError, match="duplicate"):
        Policy.from_config(cfg)


# ---- property tests -----------------------------------------------------------------------------

_hosts = st.sampled_from(["a.example", "b.example", "c.example", "d.example", "e.example"])
_ports = st.sampled_from([80, 443, 8080, 8443, 9000])
_rules = st.dictionaries(
    _hosts,
    st.tuples(st.sampled_from(["allow", "deny"]), st.none() | st.sets(_ports, min_size=1),
              st.booleans()),
    max_size=5,
)


@CI
@given(_rules, st.sampled_from(["allow", "deny"]), _hosts | st.just("zzz.example"), _ports,
       st.sampled_from(["GET", "POST", "TRACE", "trace", "DELETE"]))
def test_decision_model(rules: dict[str, tuple[str, set[int] | None, bool]], default: str,
                        host: str, port: int, method: str) -> None:
    raw_rules: list[dict[str, Any]] = []
    for h, (action, ports, rewrite) in rules.items():
        r: dict[str, Any] = {"host": h.upper(), "action": action}
        if action == "allow":
            if ports is not None:
                r["allowed_ports"] = sorted(ports)
            if rewrite:
                r["header_rewrites"] = [AUTH]
        raw_rules.append(r)
    p = _policy(raw_rules, default)
    d = p.decide(host, port, method)
    assert d.host == host and d.port == port
    if host in rules:
        action, ports, rewrite = rules[host]
        allowed_ports = ports if ports is not None else {443}
        expect = action == "allow" and port in allowed_ports
        assert d.rule == host
        assert d.rewrites == () or (expect and rewrite and method.upper() != "TRACE")
        if expect and rewrite and method.upper() != "TRACE":
            assert len(d.rewrites) == 1
    else:
        expect = default == "allow" and port == 443
        assert d.rule == "default" and d.rewrites == ()  # P4: never credentials for unknown hosts
    assert d.allowed is expect
    if not d.allowed:
        assert d.metric_host == "_denied" and d.rewrites == ()
    elif host in rules:
        assert d.metric_host == host
    else:
        assert d.metric_host == "_default_allow"


@CI
@given(st.text(max_size=30), st.integers(1, 65535))
def test_only_the_exact_canonical_host_matches(raw: str, port: int) -> None:
    p = _policy([{"host": "api.openai.com", "action": "allow", "allowed_ports": [port]}])
    try:
        host = canonicalize_host(raw)
    except InvalidHost:
        return
    assert p.decide(host, port, "GET").allowed == (host == "api.openai.com")
