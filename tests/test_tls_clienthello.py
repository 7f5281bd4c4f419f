"""SNI/ALPN parser against real ClientHellos produced by Python's ssl (OpenSSL), and hostile bytes."""

from __future__ import annotations

import contextlib
import itertools
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from botbox.tls.clienthello import (
    MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloBuffer,
    ClientHelloError,
    NotTLSError,
    parse_client_hello,
)


def real_client_hello(
    server_hostname: str | None,
    alpn: list[str] | None = None,
    *,
    maximum: ssl.TLSVersion | None = None,
) -> bytes:
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        ctx.maximum_version = maximum
    inbio, outbio = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inbio, outbio, server_side=False, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outbio.read()


def test_real_client_hello_sni_and_alpn() -> None:
    data = real_client_hello("api.example.com", ["h2", "http/1.1"])
    got = parse_client_hello(data)
    assert got == ClientHello(
        server_name="api.example.com", alpn_protocols=(b"h2", b"http/1.1"), legacy_version=0x0303,
        consumed=len(data),
    )


def test_real_client_hello_tls12_only() -> None:
    data = real_client_hello("tls12.example", maximum=ssl.TLSVersion.TLSv1_2)
    got = parse_client_hello(data)
    assert got is not None and got.server_name == "tls12.example" and got.alpn_protocols is None


def test_no_sni_when_connecting_without_hostname() -> None:
    got = parse_client_hello(real_client_hello(None))
    assert got is not None and got.server_name is None


def test_ip_literal_hostname_sends_no_sni() -> None:
    # OpenSSL (RFC 6066) never puts an IP literal in SNI; the listener then sees "missing SNI" (T6).
    got = parse_client_hello(real_client_hello("127.0.0.1"))
    assert got is not None and got.server_name is None


def test_every_prefix_needs_more_and_extra_bytes_are_not_consumed() -> None:
    data = real_client_hello("prefix.example", ["http/1.1"])
    for i in range(len(data)):
        assert parse_client_hello(data[:i]) is None, i
    got = parse_client_hello(data + b"\x14\x03\x03\x00\x01\x01")  # a following CCS record is left alone
    assert got is not None and got.consumed == len(data)


def _records(msg: bytes, size: int) -> bytes:
    out = b""
    for i in range(0, len(msg), size):
        part = msg[i : i + size]
        out += b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part
    return out


def test_client_hello_fragmented_over_several_records() -> None:
    data = real_client_hello("frag.example")
    msg = data[5:]
    frag = _records(msg, 7)
    got = parse_client_hello(frag)
    assert got is not None and got.server_name == "frag.example" and got.consumed == len(frag)
    assert parse_client_hello(frag[:-1]) is None


def _hello_with_extensions(exts: bytes) -> bytes:
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(exts).to_bytes(2, "big") + exts
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(msg).to_bytes(2, "big") + msg


def _sni_ext(*names: tuple[int, bytes]) -> bytes:
    lst = b"".join(bytes([t]) + len(n).to_bytes(2, "big") + n for t, n in names)
    body = len(lst).to_bytes(2, "big") + lst
    return b"\x00\x00" + len(body).to_bytes(2, "big") + body


def test_handcrafted_minimal_hello() -> None:
    got = parse_client_hello(_hello_with_extensions(_sni_ext((0, b"a.example"))))
    assert got is not None and got.server_name == "a.example"


@pytest.mark.parametrize(
    ("exts", "why"),
    [
        (_sni_ext((0, b"a.example"), (0, b"b.example")), "more than one host_name"),
        (_sni_ext((0, b"a.example")) + _sni_ext((0, b"b.example")), "duplicate extension"),
        (_sni_ext((0, b"")), "empty host_name"),
        (_sni_ext((0, "bücher.example".encode())), "not ASCII"),
        (_sni_ext((1, b"other")), "without host_name"),
        (b"\x00\x00\x00\x02\x00\x00", "empty server_name_list"),
        (b"\x00\x10\x00\x03\x00\x01\x00", "empty ALPN protocol name"),
    ],
)
def test_malformed_sni_is_rejected(exts: bytes, why: str) -> None:
    with pytest.raises(ClientHelloError, match=why):
        parse_client_hello(_hello_with_extensions(exts))


def test_not_tls() -> None:
    with pytest.raises(NotTLSError):
        parse_client_hello(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(NotTLSError):
        parse_client_hello(b"\x80\x2e\x01\x03\x01")  # SSLv2-style hello


def test_oversized_hello_is_refused_not_buffered() -> None:
    msg_len = MAX_CLIENT_HELLO + 10
    head = b"\x16\x03\x01\x40\x00" + b"\x01" + msg_len.to_bytes(3, "big")
    with pytest.raises(ClientHelloError, match="too large"):
        parse_client_hello(head + b"\x00" * (0x4000 - 4))


def test_non_handshake_record_and_bad_lengths() -> None:
    with pytest.raises(ClientHelloError):
        parse_client_hello(b"\x16\x03\x01\x00\x00")  # zero-length record
    with pytest.raises(ClientHelloError):
        parse_client_hello(b"\x16\x03\x01\x48\x01")  # > 2^14
    with pytest.raises(ClientHelloError):
        parse_client_hello(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00")  # ServerHello, not ClientHello


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(ClientHelloError):
        parse_client_hello(data)


_REAL = real_client_hello("fuzz.example", ["http/1.1"])


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(_REAL) - 1), st.integers(min_value=0, max_value=255))
def test_mutated_real_hello_never_crashes(pos: int, value: int) -> None:
    data = bytearray(_REAL)
    data[pos] = value
    try:
        got = parse_client_hello(bytes(data))
    except ClientHelloError:
        return
    assert got is None or isinstance(got, ClientHello)


def test_incremental_buffer_byte_by_byte_matches_one_shot() -> None:
    data = _records(real_client_hello("trickle.example", ["http/1.1"])[5:], 3)  # many tiny records
    buf = ClientHelloBuffer()
    results = [buf.feed(data[i : i + 1]) for i in range(len(data))]
    assert all(r is None for r in results[:-1])
    assert results[-1] == parse_client_hello(data)
    assert bytes(buf.raw) == data


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(_REAL)), max_size=8))
def test_incremental_buffer_any_split(cuts: list[int]) -> None:
    points = sorted({0, len(_REAL), *cuts})
    buf = ClientHelloBuffer()
    got = None
    for a, b in itertools.pairwise(points):
        got = buf.feed(_REAL[a:b])
    assert got == parse_client_hello(_REAL)


def test_incremental_buffer_refuses_oversize_trickle() -> None:
    buf = ClientHelloBuffer()
    head = b"\x16\x03\x01\x40\x00\x01\xff\xff\xff"  # announces a 16 MiB ClientHello
    with pytest.raises(ClientHelloError, match="too large"):
        buf.feed(head)
