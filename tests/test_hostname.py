"""SECURITY-SPEC P1: one canonicalisation for config and requests; authority parsing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from botbox.hostname import InvalidHost, canonicalize_host, format_authority, parse_authority

CI = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("example.com", "example.com"),
        ("EXAMPLE.COM", "example.com"),
        ("Example.Com.", "example.com"),
        ("  api.openai.com\t", "api.openai.com"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("BÜCHER.de", "xn--bcher-kva.de"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("XN--BCHER-KVA.DE.", "xn--bcher-kva.de"),
        ("ＥＸＡＭＰＬＥ．ｃｏｍ", "example.com"),  # fullwidth letters and full stop (UTS-46 mapping)
        ("example。com", "example.com"),  # ideographic full stop
        ("exa\u00admple.com", "example.com"),  # soft hyphen: UTS-46 "ignored", as browsers do
        ("r3---sn-abc.googlevideo.com", "r3---sn-abc.googlevideo.com"),
        ("localhost", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("10.0.0.255", "10.0.0.255"),
        ("0.0.0.0", "0.0.0.0"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("[2001:DB8:0:0:0:0:0:1]", "2001:db8::1"),
        ("2001:0db8::0001", "2001:db8::1"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_canonical_forms(raw: str, canonical: str) -> None:
    assert canonicalize_host(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        ".",
        "example..com",
        ".example.com",
        "example.com..",  # only ONE trailing dot is dropped
        "user@example.com",
        "example.com/path",
        "example.com\\x",
        "example.com%2f",
        "exa mple.com",
        "example.com\x00",
        "example.com\r\nX-Injected: 1",
        "exam\x7fple.com",
        "exam\x85ple.com",  # C1 control
        "\x1fexample.com",  # Python's str.strip() would eat this; we refuse it
        "example.com\n",
        "example.com:443",  # no port in canonicalize_host
        "a_b.example.com",
        "-leading.com",
        "trailing-.com",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 4),  # 255 chars > 253
        "xn--abc.de",  # invalid A-label
        "xn--.de",
        "ex?ample.com",
        "ex#ample.com",
        "[::1",
        "[::1]:443",
        "[127.0.0.1]",
        "[fe80::1%25eth0]",
        "fe80::1%eth0",
        "[]",
        # numeric bypass tricks (WHATWG/inet_aton forms)
        "2130706433",
        "0x7f000001",
        "0x7f.0.0.1",
        "017.0.0.1",
        "127.000.0.1",
        "127.1",
        "127.0.1",
        "256.0.0.1",
        "1.2.3.4.5",
        "foo.123",
        "foo.0x1",
        "0x",
        "a" * 2000,
        "ex/ample.com",
        "example.com\u2044evil",  # fraction slash
        "ａ／ｂ.com",  # fullwidth solidus maps to '/': refused
        "sub.exam@ple.com",
    ],
)
def test_rejected(raw: str) -> None:
    with pytest.raises(InvalidHost):
        canonicalize_host(raw)


def test_non_string_rejected() -> None:
    with pytest.raises(InvalidHost):
        canonicalize_host(b"example.com")  # type: ignore[arg-type]
    with pytest.raises(InvalidHost):
        parse_authority(None)  # type: ignore[arg-type]


def test_trailing_dot_ipv4_is_the_same_address() -> None:
    assert canonicalize_host("127.0.0.1.") == "127.0.0.1"


def test_error_message_is_single_line_and_bounded() -> None:
    with pytest.raises(InvalidHost) as ei:
        canonicalize_host("evil\r\nX-Injected: yes" + "a" * 500)
    msg = str(ei.value)
    assert "\r" not in msg and "\n" not in msg
    assert len(msg) < 300


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("example.com", ("example.com", None)),
        ("EXAMPLE.com.:443", ("example.com", 443)),
        ("example.com:8443", ("example.com", 8443)),
        ("example.com:1", ("example.com", 1)),
        ("example.com:65535", ("example.com", 65535)),
        ("[::1]", ("::1", None)),
        ("[::1]:443", ("::1", 443)),
        ("[2001:DB8::1]:8080", ("2001:db8::1", 8080)),
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("xn--bcher-kva.de:443", ("xn--bcher-kva.de", 443)),
    ],
)
def test_parse_authority(raw: str, expected: tuple[str, int | None]) -> None:
    assert parse_authority(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:99999",
        "example.com:0443",
        "example.com:+443",
        "example.com:-1",
        "example.com: 443",
        "example.com :443",
        "example.com:443 x",
        "example.com:4a3",
        "example.com:٤٤٣",  # Arabic-Indic digits: str.isdigit() would accept them
        "example.com:443:443",
        "::1",
        "::1:443",
        "[::1]443",
        "[::1]:",
        "[::1]:0",
        "[::1",
        "user@example.com:443",
        ":443",
        "",
        "bücher.de",  # wire authorities must be ASCII (punycode)
        "\xaapi.openai.com",  # latin-1 decoded byte 0xAA: UTS-46 would map it to "a"
        "ＡＰＩ.openai.com:443",
    ],
)
def test_parse_authority_rejects(raw: str) -> None:
    with pytest.raises(InvalidHost):
        parse_authority(raw)


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("example.com", 443, "example.com"),
        ("example.com", 8443, "example.com:8443"),
        ("::1", 443, "[::1]"),
        ("2001:db8::1", 8443, "[2001:db8::1]:8443"),
    ],
)
def test_format_authority(host: str, port: int, expected: str) -> None:
    assert format_authority(host, port) == expected
    # and it round-trips through the parser
    h, p = parse_authority(expected)
    assert h == host and (p or 443) == port


# ---- property tests ----------------------------------------------------------------------------

_label = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True).filter(
    lambda s: not s.startswith("xn--") and not s.isdigit() and not s.startswith("0x")
)
_names = st.lists(_label, min_size=1, max_size=4).map(".".join)


def _case_variant(draw: st.DrawFn, s: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(s), max_size=len(s)))
    return "".join(c.upper() if f else c for c, f in zip(s, flips, strict=True))


@CI
@given(st.data(), _names)
def test_variants_map_to_one_key(data: st.DataObject, name: str) -> None:
    key = canonicalize_host(name)
    variant = _case_variant(data.draw, name)
    if data.draw(st.booleans()):
        variant += "."
    ws = data.draw(st.sampled_from(["", " ", "\t", "  "]))
    variant = ws + variant + ws[::-1]
    assert canonicalize_host(variant) == key
    port = data.draw(st.integers(1, 65535))
    assert parse_authority(f"{variant.strip()}:{port}") == (key, port)
    assert parse_authority(variant.strip()) == (key, None)


@CI
@given(st.text(max_size=80))
def test_arbitrary_text_never_crashes_and_is_idempotent(raw: str) -> None:
    try:
        out = canonicalize_host(raw)
    except InvalidHost:
        return
    assert canonicalize_host(out) == out
    assert out == out.lower() and out.isascii()
    assert not any(c in out for c in "@/\\% \t\r\n\x00[]")
    assert len(out) <= 253


@CI
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_arbitrary_authority_never_crashes(raw: str) -> None:
    try:
        host, port = parse_authority(raw)
    except InvalidHost:
        return
    assert raw.isascii()
    assert canonicalize_host(host) == host
    assert port is None or 1 <= port <= 65535


@CI
@given(st.text(alphabet="0123456789abcdefxX.:[]%@ ", max_size=30))
def test_numeric_and_ip_like_inputs(raw: str) -> None:
    try:
        out = canonicalize_host(raw)
    except InvalidHost:
        return
    assert canonicalize_host(out) == out
    if out.replace(".", "").isdigit():
        # every accepted all-numeric host is a canonical dotted quad
        assert str(ipaddress.IPv4Address(out)) == out


@CI
@given(st.ip_addresses(v=4))
def test_every_ipv4_canonical_form_accepted(ip: ipaddress.IPv4Address) -> None:
    assert canonicalize_host(str(ip)) == str(ip)
    assert parse_authority(f"{ip}:443") == (str(ip), 443)


@CI
@given(st.ip_addresses(v=6))
def test_every_ipv6_normalised(ip: ipaddress.IPv6Address) -> None:
    exploded = ip.exploded.upper()
    assert canonicalize_host(f"[{exploded}]") == ip.compressed
    assert parse_authority(f"[{exploded}]:8443") == (ip.compressed, 8443)


@CI
@given(st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x2FFF), min_size=1, max_size=12))
def test_idna_output_is_stable(label: str) -> None:
    try:
        out = canonicalize_host(label + ".example")
    except InvalidHost:
        return
    assert out.endswith(".example")
    assert canonicalize_host(out) == out
