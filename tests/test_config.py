"""CONTRACT §2 schema, SECURITY-SPEC L1/L2/P2/P3/S1 validation, load_config error handling."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from botbox.config import (
    Config,
    ConfigError,
    describe_effective_policy,
    load_config,
    non_loopback_warnings,
    parse_config,
    startup_warnings,
)

CONTRACT_EXAMPLE = """\
listen_addr: "127.0.0.1"
listen_port: 8080
metrics_addr: "127.0.0.1"
metrics_port: 9090
secrets_dir: "/var/run/secrets/botbox"
max_connections: 1024
allow_non_loopback: false
upstream_ca_file: null
connect_timeout_seconds: 10
upstream_idle_timeout_seconds: 300
request_header_timeout_seconds: 10
shutdown_grace_seconds: 30
workers: 1
egress_policy:
  default_action: deny
  rules:
    - host: api.openai.com
      action: allow
      allowed_ports: [443]
      header_rewrites:
        - name: Authorization
          value: "Bearer {value}"
          secret_ref: openai-api-key
https_interception:
  enabled: false
  listen_addr: "127.0.0.1"
  listen_port: 8443
  ca_cert_path: /etc/botbox/ca/tls.crt
  ca_key_path: /etc/botbox/ca/tls.key
  enforce_sni_host_match: true
  deny_handshake_on_disallowed_sni: false
  cert_ttl_seconds: 86400
  cert_cache_size: 1024
  cert_cache_ttl_seconds: 3600
  handshake_timeout_ms: 5000
"""


def _rule(**kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"host": "api.example.com", "action": "allow"}
    r.update(kw)
    return r


def _cfg(*rules: dict[str, Any], **top: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"egress_policy": {"rules": list(rules)}}
    d.update(top)
    return d


def _errors(data: object) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert ei.value.errors, "ConfigError without error lines"
    return ei.value.errors


def _one_error(data: object, path: str) -> str:
    errs = _errors(data)
    hits = [e for e in errs if e.startswith(path + ": ")]
    assert hits, f"no error at {path!r}: {errs}"
    return hits[0]


def test_contract_example_loads(tmp_path: Path) -> None:
    p = tmp_path / "config.yaml"
    p.write_text(CONTRACT_EXAMPLE)
    cfg = load_config(p)
    assert cfg.listen_addr == "127.0.0.1" and cfg.listen_port == 8080
    assert cfg.metrics_port == 9090 and cfg.max_connections == 1024 and cfg.workers == 1
    assert cfg.secrets_dir == Path("/var/run/secrets/botbox")
    assert cfg.upstream_ca_file is None
    assert cfg.connect_timeout_seconds == 10.0
    rule = cfg.egress_policy.rules[0]
    assert rule.host == "api.openai.com" and rule.ports == (443,)
    hr = rule.header_rewrites[0]
    assert (hr.name, hr.value, hr.secret_ref) == ("Authorization", "Bearer {value}", "openai-api-key")
    hi = cfg.https_interception
    assert hi is not None and not hi.enabled and hi.listen_port == 8443
    assert not cfg.interception_enabled


def test_defaults_of_empty_config() -> None:
    cfg = parse_config({})
    assert cfg.listen_addr == "127.0.0.1" and cfg.listen_port == 8080
    assert cfg.metrics_addr == "127.0.0.1" and cfg.metrics_port == 9090
    assert cfg.egress_policy.default_action == "deny"  # P4: deny is the default
    assert cfg.egress_policy.rules == []
    assert cfg.https_interception is None
    assert cfg.shutdown_grace_seconds == 30 and cfg.request_header_timeout_seconds == 10
    assert cfg.upstream_idle_timeout_seconds == 300
    assert parse_config(None) == cfg  # an empty YAML file


def test_rule_host_is_stored_canonical() -> None:
    cfg = parse_config(_cfg(_rule(host=" API.Example.COM. "), _rule(host="bücher.de"),
                            _rule(host="2001:DB8::1"), _rule(host="[2001:db8::2]")))
    assert [r.host for r in cfg.egress_policy.rules] == [
        "api.example.com", "xn--bcher-kva.de", "2001:db8::1", "2001:db8::2"]
    _one_error(_cfg(_rule(host="[2001:db8::1]:443")), "egress_policy.rules[0].host")
    _one_error(_cfg(_rule(host="2001:db8::1"), _rule(host="[2001:0db8::1]")), "egress_policy.rules")


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"listen_prot": 8080}, "listen_prot"),
        ({"egress_policy": {"rulez": []}}, "egress_policy.rulez"),
        (_cfg(_rule(extra=1)), "egress_policy.rules[0].extra"),
        (_cfg(_rule(header_rewrites=[{"name": "X-A", "value": "v", "oops": 1}])),
         "egress_policy.rules[0].header_rewrites[0].oops"),
        ({"https_interception": {"enabled": True, "bogus": 1}}, "https_interception.bogus"),
    ],
)
def test_unknown_keys_are_errors(data: dict[str, Any], path: str) -> None:
    _one_error(data, path)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"listen_port": "8080"}, "listen_port"),
        ({"listen_port": True}, "listen_port"),
        ({"listen_port": 8080.0}, "listen_port"),
        ({"metrics_port": "9090"}, "metrics_port"),
        ({"workers": True}, "workers"),
        ({"max_connections": "10"}, "max_connections"),
        ({"connect_timeout_seconds": "10"}, "connect_timeout_seconds"),
        ({"connect_timeout_seconds": True}, "connect_timeout_seconds"),
        ({"allow_non_loopback": "yes"}, "allow_non_loopback"),
        ({"allow_non_loopback": 1}, "allow_non_loopback"),
        (_cfg(_rule(allowed_ports=["443"])), "egress_policy.rules[0].allowed_ports[0]"),
        (_cfg(_rule(allowed_ports=[True])), "egress_policy.rules[0].allowed_ports[0]"),
        (_cfg(_rule(allowed_ports=443)), "egress_policy.rules[0].allowed_ports"),
        (_cfg(_rule(host=123)), "egress_policy.rules[0].host"),
        ({"https_interception": {"cert_ttl_seconds": "86400"}}, "https_interception.cert_ttl_seconds"),
        ({"https_interception": {"enabled": "true"}}, "https_interception.enabled"),
        ({"secrets_dir": ""}, "secrets_dir"),
        ({"secrets_dir": 5}, "secrets_dir"),
        ({"upstream_ca_file": "a\x00b"}, "upstream_ca_file"),
        ({"https_interception": {"ca_key_path": " "}}, "https_interception.ca_key_path"),
    ],
)
def test_strict_types(data: dict[str, Any], path: str) -> None:
    _one_error(data, path)


def test_odd_unknown_keys_are_quoted_in_one_line() -> None:
    errs = _errors({"evil\nlisten_port": 1, "egress_policy": {"a.b": 1}})
    assert all("\n" not in e for e in errs)
    assert "['evil\\nlisten_port']: Extra inputs are not permitted" in errs
    assert "egress_policy['a.b']: Extra inputs are not permitted" in errs


def test_error_paths_are_dotted_and_indexed() -> None:
    data = _cfg(_rule(host="a.example"), _rule(host="b.example"), _rule(host="bad host!"))
    msg = _one_error(data, "egress_policy.rules[2].host")
    assert "bad host" in msg


# ---- L1 / L2 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["listen_addr", "metrics_addr"])
@pytest.mark.parametrize("value", ["localhost", "example.com", "[::1]", "127.1", "fe80::1%lo", ""])
def test_listen_addr_must_be_ip_literal(field: str, value: str) -> None:
    _one_error({field: value, "allow_non_loopback": True}, field)


@pytest.mark.parametrize("field", ["listen_addr", "metrics_addr"])
@pytest.mark.parametrize("value", ["0.0.0.0", "::", "10.1.2.3", "2001:db8::1"])
def test_non_loopback_needs_opt_in(field: str, value: str) -> None:
    msg = _one_error({field: value}, field)
    assert "allow_non_loopback" in msg
    cfg = parse_config({field: value, "allow_non_loopback": True})
    warnings = non_loopback_warnings(cfg)
    assert len(warnings) == 1 and field in warnings[0] and "outside the pod" in warnings[0]


@pytest.mark.parametrize("value", ["127.0.0.1", "127.0.0.53", "::1", "0:0:0:0:0:0:0:1"])
def test_loopback_needs_no_opt_in_and_no_warning(value: str) -> None:
    cfg = parse_config({"listen_addr": value, "metrics_addr": value, "metrics_port": 9091})
    assert non_loopback_warnings(cfg) == []
    assert startup_warnings(cfg) == []
    assert cfg.listen_addr in ("127.0.0.1", "127.0.0.53", "::1")


@pytest.mark.parametrize("value", ["0.0.0.0", "10.0.0.1", "::", "localhost"])
def test_interception_listener_always_loopback(value: str) -> None:
    msg = _one_error(
        {"allow_non_loopback": True, "https_interception": {"enabled": True, "listen_addr": value}},
        "https_interception.listen_addr",
    )
    assert "loopback" in msg or "IP literal" in msg


# ---- P2 / P3 ------------------------------------------------------------------------------------


def test_duplicate_hosts_after_canonicalisation_name_both_rules() -> None:
    msg = _one_error(
        _cfg(_rule(host="other.com"), _rule(host="Example.com"), _rule(host="EXAMPLE.COM.")),
        "egress_policy.rules",
    )
    assert "rules[1]" in msg and "rules[2]" in msg and "example.com" in msg


def test_duplicate_with_port_in_host_is_still_reported() -> None:
    # SECURITY-SPEC P2's own example: the port in host is an error of its own, and the duplicate
    # is reported too.
    errs = _errors(_cfg(_rule(host="example.com"), _rule(host="EXAMPLE.COM:443")))
    assert any(e.startswith("egress_policy.rules[1].host: ") and "allowed_ports" in e for e in errs)
    assert any("rules[0]" in e and "rules[1]" in e and "example.com" in e for e in errs)


def test_duplicate_allow_and_deny_is_an_error() -> None:
    _one_error(_cfg(_rule(host="x.com"), {"host": "X.com", "action": "deny"}), "egress_policy.rules")


def test_idna_duplicates() -> None:
    _one_error(_cfg(_rule(host="bücher.de"), _rule(host="xn--bcher-kva.de")), "egress_policy.rules")


def test_allowed_ports() -> None:
    cfg = parse_config(_cfg(_rule(host="a.com"), _rule(host="b.com", allowed_ports=[443, 8443])))
    assert cfg.egress_policy.rules[0].ports == (443,)
    assert cfg.egress_policy.rules[1].ports == (443, 8443)
    assert "empty" in _one_error(_cfg(_rule(allowed_ports=[])), "egress_policy.rules[0].allowed_ports")
    _one_error(_cfg(_rule(allowed_ports=[0])), "egress_policy.rules[0].allowed_ports[0]")
    _one_error(_cfg(_rule(allowed_ports=[65536])), "egress_policy.rules[0].allowed_ports[0]")
    _one_error(_cfg(_rule(allowed_ports=[-1])), "egress_policy.rules[0].allowed_ports[0]")
    assert "duplicate" in _one_error(
        _cfg(_rule(allowed_ports=[443, 443])), "egress_policy.rules[0].allowed_ports"
    )


def test_action_required_and_literal() -> None:
    _one_error(_cfg({"host": "a.com"}), "egress_policy.rules[0].action")
    _one_error(_cfg(_rule(action="ALLOW")), "egress_policy.rules[0].action")
    _one_error({"egress_policy": {"default_action": "permit"}}, "egress_policy.default_action")


def test_deny_rule_cannot_carry_rewrites_or_ports() -> None:
    rw = [{"name": "X-Key", "value": "static"}]
    _one_error(_cfg({"host": "a.com", "action": "deny", "header_rewrites": rw}),
               "egress_policy.rules[0].header_rewrites")
    _one_error(_cfg({"host": "a.com", "action": "deny", "allowed_ports": [443]}),
               "egress_policy.rules[0].allowed_ports")
    cfg = parse_config(_cfg({"host": "a.com", "action": "deny"}))
    assert cfg.egress_policy.rules[0].action == "deny"


# ---- S1 / templates / secret_ref ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Host", "host", "Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
        "Proxy-Authorization", "TE", "te", "Trailer", "Transfer-Encoding", "UPGRADE", "Content-Length",
    ],
)
def test_reserved_rewrite_names_refused(name: str) -> None:
    msg = _one_error(_cfg(_rule(header_rewrites=[{"name": name, "value": "x"}])),
                     "egress_policy.rules[0].header_rewrites[0].name")
    assert "reserved" in msg


@pytest.mark.parametrize("name", ["", "X Key", "X:Key", "X-Key\r\n", "Ä", "X(Key)", "X/Key", "X\x00"])
def test_rewrite_name_must_be_token(name: str) -> None:
    _one_error(_cfg(_rule(header_rewrites=[{"name": name, "value": "x"}])),
               "egress_policy.rules[0].header_rewrites[0].name")


def test_duplicate_rewrite_names_in_rule() -> None:
    rws = [{"name": "X-Key", "value": "a"}, {"name": "x-key", "value": "b"}]
    msg = _one_error(_cfg(_rule(header_rewrites=rws)), "egress_policy.rules[0].header_rewrites")
    assert "[0]" in msg and "[1]" in msg


@pytest.mark.parametrize(
    "value",
    ["Bearer\r\nX: y", "a\nb", "a\x00b", "a\x01b", "caf\u00e9", " leading", "trailing ", "{other}",
     "Bearer {value} {x}", "{", "}", "{value", "{VALUE}"],
)
def test_bad_templates(value: str) -> None:
    rw = {"name": "Authorization", "value": value, "secret_ref": "k"}
    _one_error(_cfg(_rule(header_rewrites=[rw])), "egress_policy.rules[0].header_rewrites[0].value")


def test_bad_template_errors_do_not_echo_the_template() -> None:
    static_credential = "Bearer sk-static-credential-in-config\n"
    errs = _errors(_cfg(_rule(header_rewrites=[{"name": "Authorization", "value": static_credential}])))
    assert not any("sk-static" in e for e in errs)


def test_value_placeholder_and_secret_ref_go_together() -> None:
    msg = _one_error(_cfg(_rule(header_rewrites=[{"name": "A", "value": "Bearer {value}"}])),
                     "egress_policy.rules[0].header_rewrites[0].secret_ref")
    assert "{value}" in msg
    msg = _one_error(_cfg(_rule(header_rewrites=[{"name": "A", "value": "static", "secret_ref": "k"}])),
                     "egress_policy.rules[0].header_rewrites[0].secret_ref")
    assert "{value}" in msg
    cfg = parse_config(_cfg(_rule(header_rewrites=[
        {"name": "OpenAI-Beta", "value": "assistants=v2"},
        {"name": "X-Key", "value": "{value}", "secret_ref": "key.v1_a-b"},
    ])))
    assert [h.secret_ref for h in cfg.egress_policy.rules[0].header_rewrites] == [None, "key.v1_a-b"]


@pytest.mark.parametrize(
    "ref", ["", ".hidden", "..data", "a/b", "../etc/passwd", "a b", "a\x00", "ü", "/abs", "a" * 254]
)
def test_secret_ref_must_be_plain_file_name(ref: str) -> None:
    _one_error(_cfg(_rule(header_rewrites=[{"name": "A", "value": "{value}", "secret_ref": ref}])),
               "egress_policy.rules[0].header_rewrites[0].secret_ref")


# ---- ranges -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"listen_port": 0}, "listen_port"),
        ({"listen_port": 65536}, "listen_port"),
        ({"metrics_port": 8080}, "metrics_port"),
        ({"listen_port": 9090}, "metrics_port"),
        ({"max_connections": 0}, "max_connections"),
        ({"workers": 0}, "workers"),
        ({"workers": 65}, "workers"),
        ({"connect_timeout_seconds": 0}, "connect_timeout_seconds"),
        ({"connect_timeout_seconds": -1}, "connect_timeout_seconds"),
        ({"connect_timeout_seconds": float("inf")}, "connect_timeout_seconds"),
        ({"connect_timeout_seconds": float("nan")}, "connect_timeout_seconds"),
        ({"upstream_idle_timeout_seconds": 0}, "upstream_idle_timeout_seconds"),
        ({"request_header_timeout_seconds": 0}, "request_header_timeout_seconds"),
        ({"shutdown_grace_seconds": -1}, "shutdown_grace_seconds"),
        ({"https_interception": {"cert_ttl_seconds": 59}}, "https_interception.cert_ttl_seconds"),
        ({"https_interception": {"cert_ttl_seconds": 604801}}, "https_interception.cert_ttl_seconds"),
        ({"https_interception": {"cert_cache_size": 0}}, "https_interception.cert_cache_size"),
        ({"https_interception": {"cert_cache_ttl_seconds": 0}}, "https_interception.cert_cache_ttl_seconds"),
        ({"https_interception": {"cert_ttl_seconds": 600, "cert_cache_ttl_seconds": 601}},
         "https_interception.cert_cache_ttl_seconds"),
        ({"https_interception": {"handshake_timeout_ms": 99}}, "https_interception.handshake_timeout_ms"),
        ({"https_interception": {"handshake_timeout_ms": 60001}}, "https_interception.handshake_timeout_ms"),
        ({"https_interception": {"listen_port": 8080}}, "https_interception"),
        ({"https_interception": {"listen_port": 9090}}, "https_interception"),
        ({"listen_port": 8443, "https_interception": {"enabled": True}}, "https_interception"),
    ],
)
def test_ranges(data: dict[str, Any], path: str) -> None:
    _one_error(data, path)


def test_boundaries_accepted() -> None:
    cfg = parse_config({
        "listen_port": 1, "metrics_port": 65535, "workers": 64, "max_connections": 1,
        "shutdown_grace_seconds": 0, "connect_timeout_seconds": 0.5,
        "https_interception": {"enabled": True, "listen_port": 2, "listen_addr": "::1",
                               "cert_ttl_seconds": 60, "cert_cache_ttl_seconds": 60,
                               "cert_cache_size": 1, "handshake_timeout_ms": 100},
    })
    assert cfg.interception_enabled
    assert cfg.https_interception is not None and cfg.https_interception.listen_addr == "::1"
    parse_config({"https_interception": {"cert_ttl_seconds": 604800, "handshake_timeout_ms": 60000}})


def test_config_is_immutable() -> None:
    cfg = parse_config({})
    with pytest.raises(ValidationError, match="frozen"):
        cfg.listen_port = 1


# ---- load_config --------------------------------------------------------------------------------


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(p) in str(ei.value) and ei.value.source == str(p)


def test_unreadable_file(tmp_path: Path) -> None:
    p = tmp_path / "dir.yaml"
    p.mkdir()  # reading a directory fails for root too
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(p) in str(ei.value)


def test_unreadable_file_as_other_uid() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch uid")
    d = Path(tempfile.mkdtemp(prefix="botbox-config-test-", dir="/tmp"))
    try:
        d.chmod(0o755)
        readable = d / "readable.yaml"
        readable.write_text("listen_port: 8081\n")
        readable.chmod(0o644)
        private = d / "private.yaml"
        private.write_text("{}")
        private.chmod(0o600)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                ok = load_config(readable).listen_port == 8081  # the directory is reachable
                try:
                    load_config(private)
                    code = 2
                except ConfigError as e:
                    code = 0 if ok and "cannot read" in str(e) and str(private) in str(e) else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("listen_port: [", "line"),
        ("- a\n- b\n", "mapping"),
        ("just a string", "mapping"),
        ("listen_port: 1\nlisten_port: 2\n", "duplicate key"),
        ("egress_policy:\n  default_action: deny\n  default_action: allow\n", "duplicate key"),
        ("a: !!python/object/apply:os.system ['true']\n", "<yaml>"),
    ],
)
def test_bad_yaml(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert needle in str(ei.value) and str(p) in str(ei.value)


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(b"listen_addr: \xff\xfe\n")
    with pytest.raises(ConfigError):
        load_config(p)


def test_empty_file_is_default_config(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("")
    assert load_config(p) == Config()


def test_all_errors_reported_at_once() -> None:
    errs = _errors({"listen_port": "x", "workers": 0, "egress_policy": {"default_action": "maybe"}})
    paths = {e.split(":")[0] for e in errs}
    assert {"listen_port", "workers", "egress_policy.default_action"} <= paths


# ---- check-config description ------------------------------------------------------------------


def test_describe_effective_policy(tmp_path: Path) -> None:
    data: dict[str, Any] = {
        "egress_policy": {
            "default_action": "allow",
            "rules": [
                {"host": "api.openai.com", "action": "allow", "allowed_ports": [443, 8443],
                 "header_rewrites": [
                     {"name": "Authorization", "value": "Bearer {value}", "secret_ref": "openai-api-key"},
                     {"name": "X-Static", "value": "static-credential-do-not-print"},
                 ]},
                {"host": "evil.example", "action": "deny"},
            ],
        },
        "https_interception": {"enabled": True},
    }
    text = describe_effective_policy(parse_config(copy.deepcopy(data)))
    assert "api.openai.com" in text and "443,8443" in text
    assert "Authorization" in text and "openai-api-key" in text and "X-Static" in text
    assert "evil.example: deny" in text
    assert "default_action: allow" in text and "WARNING" in text
    assert "8443" in text and "https_interception: enabled" in text
    assert "1337" in text and "must not run as" in text
    assert "Bearer" not in text and "static-credential" not in text  # templates never printed
    plain = describe_effective_policy(parse_config({}))
    assert "default_action: deny" in plain and "WARNING" not in plain and "disabled" in plain
    assert "1337" in plain


def test_startup_warning_for_default_allow() -> None:
    cfg = parse_config({"egress_policy": {"default_action": "allow"}})
    w = startup_warnings(cfg)
    assert len(w) == 1 and "default_action" in w[0]


# ---- property: arbitrary input only ever yields a Config or a ConfigError ---------------------

_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
_json = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
_KEYS = ["listen_addr", "listen_port", "metrics_addr", "metrics_port", "secrets_dir", "max_connections",
         "allow_non_loopback", "upstream_ca_file", "connect_timeout_seconds", "workers", "egress_policy",
         "https_interception"]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_arbitrary_input_yields_config_or_config_error(data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        doc: object = data.draw(_json)
    else:  # mutate the contract example: one field (or one rule field) replaced by random data
        doc = {
            "egress_policy": {"rules": [{"host": "api.openai.com", "action": "allow",
                                         "header_rewrites": [dict(AUTH_RW)]}]},
        }
        assert isinstance(doc, dict)
        if data.draw(st.booleans()):
            doc[data.draw(st.sampled_from(_KEYS))] = data.draw(_json)
        else:
            rule = doc["egress_policy"]["rules"][0]
            rule[data.draw(st.sampled_from(["host", "action", "allowed_ports", "header_rewrites"]))] = (
                data.draw(_json)
            )
    try:
        cfg = parse_config(doc)
    except ConfigError as e:
        assert e.errors
        for line in e.errors:
            _path, sep, why = line.partition(": ")
            assert sep and why and "\n" not in line and "\r" not in line, line
        return
    assert isinstance(cfg, Config)
    for r in cfg.egress_policy.rules:
        assert r.ports and all(1 <= p <= 65535 for p in r.ports)
    describe_effective_policy(cfg)


AUTH_RW = {"name": "Authorization", "value": "Bearer {value}", "secret_ref": "openai-api-key"}
