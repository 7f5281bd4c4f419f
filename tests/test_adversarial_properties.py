"""Hypothesis properties for host canonicalisation, policy decisions and header rewriting (issue 6).

These run the pure core with adversarially shaped inputs: arbitrary text and bytes for hosts,
random rule sets against random (host, port, method) queries compared with an independent model of
the policy, and random client header lists full of smuggling spellings against the rewriter.
"""

from __future__ import annotations

import ipaddress
import re
import string

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from botbox.config import parse_config
from botbox.hostname import InvalidHost, canonicalize_host, parse_authority
from botbox.policy import Decision, HeaderRewrite, Policy
from botbox.rewrite import (
    HOP_BY_HOP,
    SecretUnavailable,
    downstream_response_headers,
    upstream_request_headers,
)
from botbox.secrets import SecretValue

CI = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_CANON_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?", re.ASCII)

# --------------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------------
_label = st.from_regex(r"\A[a-z](?:[a-z0-9-]{0,10}[a-z0-9])?\Z", fullmatch=True).filter(
    lambda s: s[2:4] != "--"
)
valid_hosts = st.lists(_label, min_size=1, max_size=4).map(".".join).filter(lambda h: len(h) <= 253)
ports = st.integers(min_value=1, max_value=65535)
methods = st.sampled_from(
    ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "get", "Trace"]
)

# Text that looks like hosts but is full of the characters attackers use.
_hostile_alphabet = st.sampled_from(
    [
        *(string.ascii_letters + string.digits + ".-:[]@%/\\ \t_#?,;"),
        *["\x00", "\r", "\n", "\x7f", "\u0430", "\u200b", "\uff0e", "\u3002", "ß", "İ", "\ufeff", "\u2024"],
    ]
)
hostile_text = st.one_of(
    st.text(),
    st.text(alphabet=_hostile_alphabet, max_size=40),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),  # how raw header bytes may be decoded
)


def _is_canonical_output(h: str) -> bool:
    if ":" in h:
        try:
            return ipaddress.IPv6Address(h).compressed == h
        except ValueError:
            return False
    return bool(_CANON_NAME.fullmatch(h)) and ".." not in h and len(h) <= 253


# --------------------------------------------------------------------------------------------------
# canonicalisation
# --------------------------------------------------------------------------------------------------
@CI
@given(hostile_text)
@example("[fe80::1%25eth0]")
@example("xn--")
@example("\udcff")  # lone surrogate
@example("a" * 5000)
@example("0x")
@example("[" + ":" * 200 + "]")
def test_canonicalize_never_raises_anything_but_invalid_host(raw: str) -> None:
    try:
        out = canonicalize_host(raw)
    except InvalidHost as exc:
        assert "\n" not in str(exc) and "\r" not in str(exc)  # error text is safe to log on one line
        return
    assert _is_canonical_output(out), (raw, out)
    assert canonicalize_host(out) == out  # idempotent
    assert not out.endswith(".")


@CI
@given(hostile_text)
@example("[::1]:0443")
@example("h:65536")
@example("h:\uff14\uff14\uff13")
def test_parse_authority_never_raises_anything_but_invalid_host(raw: str) -> None:
    try:
        host, port = parse_authority(raw)
    except InvalidHost:
        return
    assert _is_canonical_output(host)
    assert port is None or 1 <= port <= 65535
    # a parsed authority re-parses to itself
    rendered = (f"[{host}]" if ":" in host else host) + ("" if port is None else f":{port}")
    assert parse_authority(rendered) == (host, port)


@CI
@given(valid_hosts, ports)
def test_spelling_variants_share_one_key(host: str, port: int) -> None:
    key = canonicalize_host(host)
    assert canonicalize_host(host.upper()) == key
    assert canonicalize_host(host + ".") == key
    assert canonicalize_host(f" {host}\t") == key
    assert parse_authority(f"{host.upper()}.:{port}") == (key, port)
    assert parse_authority(f"{host}") == (key, None)


@CI
@given(valid_hosts, ports, st.sampled_from(["0", "00", "+", "-", " ", "0x"]))
def test_port_tricks_rejected(host: str, port: int, prefix: str) -> None:
    try:
        parse_authority(f"{host}:{prefix}{port}")
    except InvalidHost:
        return
    raise AssertionError(f"{host}:{prefix}{port} accepted")


@CI
@given(valid_hosts, st.sampled_from(["..", "@", "/", "\\", "%2e", "\x00", "\r\n", " ", "#", "?"]))
def test_injected_separators_rejected(host: str, junk: str) -> None:
    for raw in (host + junk + "evil.example", junk + host, host + junk):
        if junk == " " and raw.strip(" ") == host:
            continue  # surrounding OWS is trimmed by design
        try:
            out = canonicalize_host(raw)
        except InvalidHost:
            continue
        raise AssertionError(f"{raw!r} accepted as {out!r}")


# --------------------------------------------------------------------------------------------------
# policy decisions against an independent model
# --------------------------------------------------------------------------------------------------
rule_sets = st.lists(
    st.tuples(
        valid_hosts,
        st.sampled_from(["allow", "deny"]),
        st.none() | st.lists(ports, min_size=1, max_size=3, unique=True),
        st.booleans(),  # with a header rewrite
    ),
    max_size=6,
    unique_by=lambda r: r[0],
)


def _build(rules: list[tuple[str, str, list[int] | None, bool]], default: str) -> Policy:
    raw_rules: list[dict[str, object]] = []
    for host, action, allowed_ports, rewrite in rules:
        r: dict[str, object] = {"host": host, "action": action}
        if allowed_ports is not None and action == "allow":
            r["allowed_ports"] = allowed_ports  # a deny rule may not list ports (config error)
        if rewrite and action == "allow":
            r["header_rewrites"] = [{"name": "X-Api-Key", "value": "{value}", "secret_ref": "k"}]
        raw_rules.append(r)
    cfg = parse_config({"egress_policy": {"default_action": default, "rules": raw_rules}})
    return Policy.from_config(cfg.egress_policy)


@CI
@given(rule_sets, st.sampled_from(["deny", "allow"]), st.data())
def test_policy_matches_model(
    rules: list[tuple[str, str, list[int] | None, bool]], default: str, data: st.DataObject
) -> None:
    policy = _build(rules, default)
    known = {h: (a, p if p is not None and a == "allow" else [443], rw) for h, a, p, rw in rules}
    host = data.draw(st.sampled_from([*known, "unlisted.example"]) if known else st.just("unlisted.example"))
    port = data.draw(st.sampled_from([443, 80, 8443, 1, 65535]) | ports)
    method = data.draw(methods)
    d = policy.decide(canonicalize_host(host), port, method)
    assert isinstance(d, Decision)
    if host in known:
        action, allowed_ports, rw = known[host]
        expect = action == "allow" and port in allowed_ports
        if expect:
            assert d.rule == host
    else:
        expect = default == "allow" and port == 443
        rw = False
    assert d.allowed is expect, (rules, default, host, port, method, d)
    if not d.allowed:
        assert d.metric_host == "_denied"
        assert d.rewrites == ()
    else:
        assert d.host == host and d.port == port
        if method.upper() == "TRACE" or host not in known:
            assert d.rewrites == ()  # R7, P4
        else:
            assert bool(d.rewrites) is rw


# --------------------------------------------------------------------------------------------------
# header rewriting
# --------------------------------------------------------------------------------------------------
SECRET = b"sk-test-PROPERTY-0123456789abcdef"


class _Lookup:
    def __init__(self, values: dict[str, bytes]) -> None:
        self._v = {k: SecretValue(v) for k, v in values.items()}

    def get(self, name: str) -> SecretValue | None:
        return self._v.get(name)


def _decision(
    rewrites: tuple[HeaderRewrite, ...], host: str = "api.example.com", port: int = 443
) -> Decision:
    return Decision(
        allowed=True, host=host, port=port, rule=host, rewrites=rewrites, metric_host=host,
        reason="rule_allow",
    )


AUTH = HeaderRewrite(name="Authorization", name_lower=b"authorization", template="Bearer {value}",
                     secret_ref="key")
STATIC = HeaderRewrite(name="X-Team", name_lower=b"x-team", template="blue", secret_ref=None)

_names = st.sampled_from(
    [b"authorization", b"Authorization", b"AUTHORIZATION", b"aUtHoRiZaTiOn", b"x-team", b"X-TEAM",
     b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
     b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host", b"Host", b"x-drop", b"x-keep",
     b"content-type", b"accept", b"x-forwarded-for"]
)
_values = st.binary(max_size=20).map(lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E)) | st.sampled_from(
    [b"x-drop", b"close, x-drop", b"keep-alive, X-Keep", b"Bearer attacker", b"chunked", b"h2c"]
)
client_header_lists = st.lists(st.tuples(_names, _values), max_size=25)


@CI
@given(client_header_lists, st.sampled_from([443, 8443]))
def test_rewrite_delete_then_add_and_hop_by_hop(headers: list[tuple[bytes, bytes]], port: int) -> None:
    decision = _decision((AUTH, STATIC), port=port)
    out, rewritten = upstream_request_headers(headers, decision, _Lookup({"key": SECRET}))
    names = [n.lower() for n, _ in out]
    # R3: Host first, deterministic from the canonical host, exactly once
    assert names[0] == b"host"
    assert out[0][1] == (b"api.example.com" if port == 443 else b"api.example.com:%d" % port)
    assert names.count(b"host") == 1
    # S2: exactly the configured values, once each, whatever the client sent
    assert [v for n, v in out if n.lower() == b"authorization"] == [b"Bearer " + SECRET]
    assert [v for n, v in out if n.lower() == b"x-team"] == [b"blue"]
    assert sorted(n.lower() for n in rewritten) == ["authorization", "x-team"]
    # R2: no hop-by-hop header and nothing named by a Connection token survives
    connection_tokens = {
        t.strip().lower()
        for n, v in headers
        if n.lower() in (b"connection", b"proxy-connection")
        for t in v.split(b",")
        if t.strip()
    }
    for n in names:
        assert n not in HOP_BY_HOP
        assert n not in connection_tokens or n in (b"authorization", b"x-team", b"host")
    # everything else is forwarded untouched and in order
    dropped = set(HOP_BY_HOP) | connection_tokens | {b"host", b"authorization", b"x-team"}
    expected_rest = [(n.lower(), v) for n, v in headers if n.lower() not in dropped]
    assert [(n.lower(), v) for n, v in out if n.lower() not in {b"host", b"authorization", b"x-team"}] == (
        expected_rest
    )


@CI
@given(
    st.binary(min_size=1, max_size=30),
    st.sampled_from([b"\r", b"\n", b"\x00", b"\r\nX-Injected: 1"]),
    st.integers(min_value=0, max_value=30),
)
def test_secret_with_crlf_nul_fails_closed_without_leaking(base: bytes, bad: bytes, pos: int) -> None:
    value = base[:pos] + bad + base[pos:]
    marker = b"LEAKMARK" + value
    try:
        upstream_request_headers([(b"host", b"x")], _decision((AUTH,)), _Lookup({"key": marker}))
    except SecretUnavailable as exc:
        text = str(exc) + repr(exc)
        assert "LEAKMARK" not in text
        return
    raise AssertionError("secret containing CR/LF/NUL was accepted")


@CI
@given(st.lists(st.tuples(_names, _values), max_size=25))
def test_response_strip(headers: list[tuple[bytes, bytes]]) -> None:
    out = downstream_response_headers(headers, _decision((AUTH, STATIC)))
    for n, _ in out:
        assert n.lower() not in HOP_BY_HOP
        assert n.lower() not in (b"authorization", b"x-team")  # R7: never echo the credential header back
