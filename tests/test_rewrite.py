"""Header rewriting: R2 hop-by-hop, R3 Host, S2 delete-then-add, S3/S4 secrets, R7 responses."""

from __future__ import annotations

from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from botbox.config import parse_config
from botbox.policy import Decision, Policy
from botbox.rewrite import (
    HOP_BY_HOP,
    SecretUnavailable,
    downstream_response_headers,
    upstream_request_headers,
)
from botbox.secrets import SecretValue

CI = settings(max_examples=200, deadline=None)
SECRET = b"sk-test-0123456789abcdef"


class Lookup:
    def __init__(self, **values: bytes) -> None:
        self.values = {k.replace("_", "-"): SecretValue(v) for k, v in values.items()}

    def get(self, name: str) -> SecretValue | None:
        return self.values.get(name)


def _decision(host: str = "api.openai.com", port: int = 443, method: str = "POST",
              rewrites: list[dict[str, Any]] | None = None, ports: list[int] | None = None) -> Decision:
    rule: dict[str, Any] = {"host": host, "action": "allow"}
    if rewrites is not None:
        rule["header_rewrites"] = rewrites
    rule["allowed_ports"] = ports or [port]
    cfg = parse_config({"egress_policy": {"rules": [rule]}})
    d = Policy.from_config(cfg.egress_policy).decide(cfg.egress_policy.rules[0].host, port, method)
    assert d.allowed
    return d


AUTH = {"name": "Authorization", "value": "Bearer {value}", "secret_ref": "openai-api-key"}


def _names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n.lower() for n, _ in headers]


def test_host_first_and_rewritten_r3() -> None:
    out, names = upstream_request_headers(
        [(b"user-agent", b"x"), (b"host", b"evil.example"), (b"Host", b"evil2")], _decision(), Lookup()
    )
    assert out[0] == (b"host", b"api.openai.com")
    assert _names(out).count(b"host") == 1
    assert (b"user-agent", b"x") in out
    assert names == []


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("api.openai.com", 8443, b"api.openai.com:8443"),
        ("2001:db8::1", 443, b"[2001:db8::1]"),
        ("2001:db8::1", 8443, b"[2001:db8::1]:8443"),
        ("127.0.0.1", 443, b"127.0.0.1"),
    ],
)
def test_host_port_rendering(host: str, port: int, expected: bytes) -> None:
    out, _ = upstream_request_headers([], _decision(host=host, port=port), Lookup())
    assert out[0] == (b"host", expected)


def test_hop_by_hop_removed_r2() -> None:
    client = [
        (b"connection", b"keep-alive, X-Custom-Hop , x-other"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-connection", b"x-proxy-nominated"),
        (b"proxy-authorization", b"Basic Zm9vOmJhcg=="),
        (b"proxy-authenticate", b"Basic"),
        (b"te", b"trailers"),
        (b"trailer", b"x-t"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"websocket"),
        (b"x-custom-hop", b"1"),
        (b"X-Other", b"2"),
        (b"x-proxy-nominated", b"3"),
        (b"x-end-to-end", b"kept"),
        (b"content-type", b"application/json"),
    ]
    out, _ = upstream_request_headers(client, _decision(), Lookup())
    got = set(_names(out))
    assert not (got & HOP_BY_HOP)
    assert not (got & {b"x-custom-hop", b"x-other", b"x-proxy-nominated"})
    assert {b"x-end-to-end", b"content-type", b"host"} <= got


def test_connection_cannot_nominate_content_length() -> None:
    out, _ = upstream_request_headers(
        [(b"connection", b"content-length, host"), (b"content-length", b"5")], _decision(), Lookup()
    )
    assert (b"content-length", b"5") in out
    assert out[0] == (b"host", b"api.openai.com")


def test_delete_then_add_s2() -> None:
    client = [
        (b"authorization", b"Bearer attacker-1"),
        (b"AUTHORIZATION", b"Bearer attacker-2"),
        (b"Authorization", b"Bearer attacker-3"),
        (b"accept", b"*/*"),
    ]
    out, names = upstream_request_headers(client, _decision(rewrites=[AUTH]), Lookup(openai_api_key=SECRET))
    auth = [v for n, v in out if n.lower() == b"authorization"]
    assert auth == [b"Bearer " + SECRET]
    assert names == ["Authorization"]
    assert not any(b"attacker" in v for _, v in out)


def test_connection_token_cannot_remove_injected_credential() -> None:
    out, _ = upstream_request_headers(
        [(b"connection", b"authorization")], _decision(rewrites=[AUTH]), Lookup(openai_api_key=SECRET)
    )
    assert (b"Authorization", b"Bearer " + SECRET) in out


def test_static_and_multiple_rewrites() -> None:
    rws = [AUTH, {"name": "OpenAI-Beta", "value": "assistants=v2"},
           {"name": "X-Twice", "value": "{value}/{value}", "secret_ref": "k"}]
    out, names = upstream_request_headers(
        [(b"openai-beta", b"client-value")], _decision(rewrites=rws), Lookup(openai_api_key=SECRET, k=b"v")
    )
    assert (b"OpenAI-Beta", b"assistants=v2") in out and (b"openai-beta", b"client-value") not in out
    assert (b"X-Twice", b"v/v") in out
    assert names == ["Authorization", "OpenAI-Beta", "X-Twice"]


def test_missing_secret_fails_closed_s3() -> None:
    with pytest.raises(SecretUnavailable) as ei:
        upstream_request_headers([(b"authorization", b"Bearer client")], _decision(rewrites=[AUTH]), Lookup())
    assert "openai-api-key" in str(ei.value) and ei.value.secret_ref == "openai-api-key"


@pytest.mark.parametrize(
    "bad",
    [b"sk-abc\r\nX-Injected: 1", b"sk-abc\n", b"sk\x00abc", b"sk\rabc", b"sk\x0babc", b"sk\x7f", b"",
     b"sk-abc ", b"\tsk-abc"],
)
def test_unsafe_secret_values_fail_closed_s4(bad: bytes) -> None:
    rw = {"name": "X-Key", "value": "{value}", "secret_ref": "k"}
    with pytest.raises(SecretUnavailable) as ei:
        upstream_request_headers([], _decision(rewrites=[rw]), Lookup(k=bad))
    msg = str(ei.value)
    assert "'k'" in msg
    if bad.strip():
        assert bad.strip(b" \t\r\n\x00").decode("latin-1") not in msg


def test_wiped_secret_fails_closed() -> None:
    lookup = Lookup(openai_api_key=SECRET)
    lookup.values["openai-api-key"].wipe()
    with pytest.raises(SecretUnavailable):
        upstream_request_headers([], _decision(rewrites=[AUTH]), lookup)


def test_trace_gets_no_credentials_r7() -> None:
    d = _decision(rewrites=[AUTH], method="TRACE")
    out, names = upstream_request_headers(
        [(b"authorization", b"Bearer client")], d, Lookup(openai_api_key=SECRET)
    )
    assert names == [] and not any(SECRET in v for _, v in out)


def test_response_strips_hop_by_hop_and_rewritten_names_r7() -> None:
    d = _decision(rewrites=[AUTH, {"name": "X-Api-Key", "value": "{value}", "secret_ref": "k"}])
    upstream = [
        (b"content-type", b"text/event-stream"),
        (b"connection", b"close, x-hop"),
        (b"x-hop", b"1"),
        (b"transfer-encoding", b"chunked"),
        (b"keep-alive", b"timeout=5"),
        (b"authorization", b"Bearer echoed-secret"),
        (b"X-API-KEY", b"echoed"),
        (b"x-request-id", b"abc"),
        (b"content-length", b"10"),
    ]
    out = downstream_response_headers(upstream, d)
    assert out == [
        (b"content-type", b"text/event-stream"), (b"x-request-id", b"abc"), (b"content-length", b"10")
    ]


def test_response_without_rewrites_keeps_authorization_like_headers() -> None:
    upstream = [(b"www-authenticate", b"Bearer"), (b"authorization", b"x")]
    out = downstream_response_headers(upstream, _decision())
    assert out == [(b"www-authenticate", b"Bearer"), (b"authorization", b"x")]


def test_output_is_accepted_by_h11() -> None:
    """The rewritten header list is a valid request for the HTTP/1.1 library the runtime uses."""
    client = [(b"host", b"x"), (b"authorization", b"old"), (b"content-length", b"2"),
              (b"connection", b"keep-alive"), (b"accept", b"*/*")]
    out, _ = upstream_request_headers(client, _decision(rewrites=[AUTH]), Lookup(openai_api_key=SECRET))
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(h11.Request(method="POST", target="/v1/x", headers=out))
    assert data is not None
    assert data.startswith(b"POST /v1/x HTTP/1.1\r\nhost: api.openai.com\r\n")
    assert b"\r\nAuthorization: Bearer " + SECRET + b"\r\n" in data


# ---- property tests -----------------------------------------------------------------------------

_names_st = st.sampled_from(
    [b"authorization", b"Authorization", b"AUTHORIZATION", b"host", b"connection", b"x-a", b"X-B",
     b"te", b"transfer-encoding", b"upgrade", b"accept", b"content-length", b"proxy-connection"]
)
_values_st = st.sampled_from([b"x-a", b"x-b, authorization", b"close", b"keep-alive", b"1", b"x-a,,x-b"])


@CI
@given(st.lists(st.tuples(_names_st, _values_st), max_size=12), st.booleans())
def test_rewrite_invariants(client: list[tuple[bytes, bytes]], trace: bool) -> None:
    d = _decision(rewrites=[AUTH], method="TRACE" if trace else "GET")
    out, names = upstream_request_headers(client, d, Lookup(openai_api_key=SECRET))
    lowered = _names(out)
    assert out[0] == (b"host", b"api.openai.com") and lowered.count(b"host") == 1
    assert not (set(lowered) & HOP_BY_HOP)
    auth = [v for n, v in out if n.lower() == b"authorization"]
    if trace:
        assert names == [] and all(SECRET not in v for v in auth)
    else:
        assert auth == [b"Bearer " + SECRET] and names == ["Authorization"]
    # Connection-nominated names are gone (except the framing header and our own injection)
    nominated = {t.strip().lower() for n, v in client if n.lower() in (b"connection", b"proxy-connection")
                 for t in v.split(b",") if t.strip()}
    for name in nominated - {b"content-length", b"host", b"authorization"}:
        assert name not in lowered
    # content-length values are carried unchanged
    assert [v for n, v in out if n.lower() == b"content-length"] == [
        v for n, v in client if n.lower() == b"content-length"]


def test_forwarded_headers_are_left_alone_and_none_added() -> None:
    client = [(b"forwarded", b"for=10.0.0.1"), (b"x-forwarded-for", b"10.0.0.1")]
    out, _ = upstream_request_headers(client, _decision(), Lookup())
    assert out[1:] == client  # documented choice: the app's own headers pass unchanged
    assert not any(n.lower() in (b"via", b"x-forwarded-host") for n, _ in out)  # nothing about the pod
