"""Host tricks against the policy (issue 6), at the pure level.

Every spelling an attacker might use to reach a host other than the one a rule names, or to make a
denied host look allowed, must either canonicalise to exactly the rule's key or be rejected with
``InvalidHost`` (never any other exception). The end-to-end versions (nothing forwarded, clean
400/403) live in ``test_adversarial_smuggling.py``.
"""

from __future__ import annotations

import pytest

from botbox.config import parse_config
from botbox.hostname import InvalidHost, canonicalize_host, parse_authority
from botbox.policy import Policy

# (raw Host header value, reason) — every one must raise InvalidHost from parse_authority.
REJECTED_AUTHORITIES: list[tuple[str, str]] = [
    ("api.example.com..", "two trailing dots (empty label)"),
    ("api..example.com", "empty label"),
    (".api.example.com", "leading dot"),
    ("user@api.example.com", "user-info"),
    ("user:pass@api.example.com", "user-info with password"),
    ("api.example.com@evil.example", "user-info that names the allowed host"),
    ("api%2eexample.com", "percent-encoded dot"),
    ("%61pi.example.com", "percent-encoded letter"),
    ("api.example.com%00", "percent-encoded NUL"),
    ("api.example.com\x00.evil", "NUL"),
    ("api.example.com\r\nX: y", "CRLF"),
    ("api.example.com/evil", "path"),
    ("api.example.com\\evil", "backslash"),
    ("api.example.com#frag", "fragment"),
    ("api.example.com?q", "query"),
    ("api example.com", "inner space"),
    ("api\texample.com", "inner tab"),
    ("api.example.com,evil.example", "list"),
    ("api_x.example.com", "underscore"),
    ("-api.example.com", "leading hyphen"),
    ("api-.example.com", "trailing hyphen"),
    ("a" * 64 + ".example.com", "label longer than 63"),
    (".".join(["a" * 50] * 6), "name longer than 253"),
    ("xn--.example.com", "empty A-label"),
    ("xn--zz-zzzzz.example.com", "invalid A-label"),
    # IPv4 in non-canonical forms (allowlist bypass through resolver leniency)
    ("2130706433", "IPv4 as one decimal integer"),
    ("0x7f000001", "IPv4 as one hex integer"),
    ("017700000001", "IPv4 as one octal integer"),
    ("0x7f.0.0.1", "hex octet"),
    ("0177.0.0.1", "octal octet"),
    ("127.0.0.01", "leading zero octet"),
    ("127.1", "shortened IPv4"),
    ("127.0.1", "three-part IPv4"),
    ("127.0.0.256", "octet out of range"),
    ("256.0.0.1", "octet out of range"),
    ("1.2.3.4.5", "five parts"),
    ("foo.123", "numeric last label that is not an address"),
    # IPv6 literals
    ("[fe80::1%25eth0]", "zone id (RFC 6874 encoding)"),
    ("[fe80::1%eth0]", "zone id"),
    ("::1", "unbracketed IPv6 in an authority"),
    ("[::1", "unterminated bracket"),
    ("[::1]x", "junk after bracket"),
    ("[::1]:", "empty port after IPv6"),
    ("[127.0.0.1]", "IPv4 in brackets"),
    ("[::g]", "invalid IPv6"),
    ("[]", "empty brackets"),
    # ports
    ("api.example.com:0", "port 0"),
    ("api.example.com:65536", "port 65536"),
    ("api.example.com:99999", "port far out of range"),
    ("api.example.com:0443", "leading zero"),
    ("api.example.com:00443", "leading zeros"),
    ("api.example.com:+443", "sign"),
    ("api.example.com:-443", "negative"),
    ("api.example.com:", "empty port"),
    ("api.example.com:443:443", "two ports"),
    ("api.example.com: 443", "space before port"),
    ("api.example.com :443", "space before colon"),
    ("api.example.com:44 3", "space in port"),
    ("api.example.com:0x1bb", "hex port"),
    ("api.example.com:４４３", "full-width digits"),
    ("api.example.com:443\x00", "NUL after port"),
    ("", "empty"),
    ("   ", "only whitespace"),
    (":443", "port without host"),
]


@pytest.mark.parametrize(("raw", "why"), REJECTED_AUTHORITIES, ids=[w for _, w in REJECTED_AUTHORITIES])
def test_hostile_authority_rejected(raw: str, why: str) -> None:
    with pytest.raises(InvalidHost):
        parse_authority(raw)


# (variant, canonical key) — equivalent spellings must land on exactly one key (P1).
EQUIVALENT: list[tuple[str, str]] = [
    ("API.EXAMPLE.COM", "api.example.com"),
    ("Api.Example.Com", "api.example.com"),
    ("api.example.com.", "api.example.com"),
    ("  api.example.com\t", "api.example.com"),
    ("[::1]", "::1"),
    ("[0:0:0:0:0:0:0:1]", "::1"),
    ("[::FFFF:7F00:1]", "::ffff:7f00:1"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("ｅｘａｍｐｌｅ.com", "example.com"),  # full-width: UTS-46 maps to the same ASCII host
    ("example。com", "example.com"),  # ideographic full stop is a label separator under UTS-46
]


@pytest.mark.parametrize(("raw", "canonical"), EQUIVALENT)
def test_equivalent_spellings_map_to_one_key(raw: str, canonical: str) -> None:
    assert canonicalize_host(raw) == canonical
    assert canonicalize_host(canonical) == canonical


@pytest.fixture(scope="module")
def policy() -> Policy:
    cfg = parse_config(
        {
            "egress_policy": {
                "default_action": "deny",
                "rules": [
                    {"host": "paypal.com", "action": "allow"},
                    {"host": "127.0.0.1", "action": "allow", "allowed_ports": [443, 8443]},
                    {"host": "api.example.com", "action": "allow"},
                    {"host": "blocked.example.com", "action": "deny"},
                ],
            }
        }
    )
    return Policy.from_config(cfg.egress_policy)


HOMOGRAPHS = [
    "pаypal.com",  # Cyrillic а (U+0430)
    "paypaI.com",  # capital I for l  -> lowercase "paypai.com", a different host
    "pаypаl.com",  # two Cyrillic а
    "раураl.com",  # all-Cyrillic lookalike
    "paypal.com\u200b",  # zero-width space (UTS-46 maps it away or rejects it; never a new spelling)
    "xn--pypal-4ve.com",  # the punycode of the Cyrillic homograph
    "paypal.co",
    "paypal.com.evil.example",
    "evil-paypal.com",
]


@pytest.mark.parametrize("raw", HOMOGRAPHS)
def test_homographs_never_match_the_rule(policy: Policy, raw: str) -> None:
    try:
        host, port = parse_authority(raw)
    except InvalidHost:
        return  # rejected outright: fine
    decision = policy.decide(host, port or 443, "GET")
    if host == "paypal.com":
        # The only admissible way to be allowed is to *be* paypal.com after canonicalisation
        # (the zero-width space is mapped away by UTS-46, which is the same host).
        assert raw.replace("\u200b", "") == "paypal.com"
        assert decision.allowed
    else:
        assert not decision.allowed, f"{raw!r} canonicalised to {host!r} and was allowed"
        assert decision.rewrites == ()


@pytest.mark.parametrize(
    "raw",
    ["2130706433", "0x7f.0.0.1", "0177.0.0.1", "127.1", "127.0.0.01", "017700000001", "[::ffff:127.0.0.1]",
     "[::ffff:7f00:1]", "[::127.0.0.1]", "[64:ff9b::7f00:1]"],
)
def test_ipv4_aliases_never_reach_the_ipv4_rule(policy: Policy, raw: str) -> None:
    """Alternate spellings of 127.0.0.1 are rejected or are a *different* (unlisted) host."""
    try:
        host, _ = parse_authority(raw)
    except InvalidHost:
        return
    assert host != "127.0.0.1"
    assert not policy.decide(host, 443, "GET").allowed


@pytest.mark.parametrize(
    ("authority", "allowed"),
    [
        ("api.example.com", True),
        ("API.example.com.", True),
        ("api.example.com:443", True),
        ("api.example.com:8443", False),  # P3: port not listed
        ("api.example.com:80", False),
        ("127.0.0.1:8443", True),
        ("127.0.0.1:8080", False),
        ("blocked.example.com", False),
        ("BLOCKED.example.com.", False),
        ("sub.api.example.com", False),  # exact match only, no suffix matching
        ("example.com", False),
        ("com", False),
    ],
)
def test_policy_on_hostile_spellings(policy: Policy, authority: str, allowed: bool) -> None:
    host, port = parse_authority(authority)
    decision = policy.decide(host, port or 443, "POST")
    assert decision.allowed is allowed
    if not allowed:
        assert decision.metric_host == "_denied"
        assert decision.rewrites == ()
