"""The `https_interception` block's ranges (CONTRACT §2) as the interception code relies on them."""

from __future__ import annotations

from typing import Any

import pytest

from botbox.config import ConfigError, parse_config

BASE: dict[str, Any] = {"egress_policy": {"rules": [{"host": "a.example", "action": "allow"}]}}


def cfg(**hi: Any) -> Any:
    return parse_config({**BASE, "https_interception": {"enabled": True, **hi}})


def test_defaults_match_the_contract() -> None:
    hi = cfg().https_interception
    assert hi is not None
    assert (hi.listen_addr, hi.listen_port) == ("127.0.0.1", 8443)
    assert hi.enforce_sni_host_match is True and hi.deny_handshake_on_disallowed_sni is False
    got = (hi.cert_ttl_seconds, hi.cert_cache_size, hi.cert_cache_ttl_seconds, hi.handshake_timeout_ms)
    assert got == (86400, 1024, 3600, 5000)
    assert str(hi.ca_cert_path) == "/etc/botbox/ca/tls.crt"
    assert str(hi.ca_key_path) == "/etc/botbox/ca/tls.key"


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("cert_ttl_seconds", [60, 604800], [59, 604801, 0, -1]),
        ("cert_cache_size", [1], [0, -5]),
        ("handshake_timeout_ms", [100, 60000], [99, 60001]),
    ],
)
def test_ranges(field: str, good: list[int], bad: list[int]) -> None:
    extra = {"cert_cache_ttl_seconds": 60} if field == "cert_ttl_seconds" else {}
    for v in good:
        assert getattr(cfg(**{field: v, **extra}).https_interception, field) == v
    for v in bad:
        with pytest.raises(ConfigError) as info:
            cfg(**{field: v, **extra})
        errors = info.value.errors
        assert any(line.startswith(f"https_interception.{field}") for line in errors), errors


def test_cache_ttl_must_not_exceed_cert_ttl_and_be_positive() -> None:
    cfg(cert_ttl_seconds=600, cert_cache_ttl_seconds=600)
    for bad in (601, 0):
        with pytest.raises(ConfigError) as info:
            cfg(cert_ttl_seconds=600, cert_cache_ttl_seconds=bad)
        assert any("cert_cache_ttl_seconds" in e for e in info.value.errors)


@pytest.mark.parametrize("addr", ["0.0.0.0", "10.0.0.1", "::", "localhost", "example.com"])
def test_listener_is_loopback_only_l2(addr: str) -> None:
    with pytest.raises(ConfigError):
        cfg(listen_addr=addr)
    # ... even with allow_non_loopback, which only concerns the HTTP/admin listeners
    with pytest.raises(ConfigError):
        parse_config({**BASE, "allow_non_loopback": True,
                      "https_interception": {"enabled": True, "listen_addr": addr}})


def test_ipv6_loopback_is_accepted() -> None:
    hi = cfg(listen_addr="::1").https_interception
    assert hi is not None and hi.listen_addr == "::1"


@pytest.mark.parametrize("port_key", ["listen_port", "metrics_port"])
def test_port_must_differ_from_the_other_listeners(port_key: str) -> None:
    with pytest.raises(ConfigError):
        parse_config({**BASE, port_key: 8443, "https_interception": {"enabled": True}})


@pytest.mark.parametrize(("key", "value"), [("cert_ttl_seconds", "86400"), ("enabled", "yes"),
                                            ("handshake_timeout_ms", 5000.5), ("unknown_key", 1)])
def test_strict_types_and_unknown_keys(key: str, value: Any) -> None:
    with pytest.raises(ConfigError):
        cfg(**{key: value})
