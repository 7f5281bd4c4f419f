"""Secret values never appear in logs, exception messages, reprs or check-config output (S5, §6).

Drives every failure and success path of the pure core with distinctive secret values and scans
everything a user or operator could see.
"""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

import pytest

from botbox.config import ConfigError, describe_effective_policy, parse_config
from botbox.policy import Policy
from botbox.rewrite import SecretUnavailable, downstream_response_headers, upstream_request_headers
from botbox.secrets import MAX_SECRET_BYTES, SecretStore

GOOD = b"sk-GOODSECRET-4f9a1c"
CRLF = b"sk-CRLFSECRET-77\r\nX-Evil: 1"
NUL = b"sk-NULSECRET-55\x00x"
TRAILING = b"sk-TRAILSECRET-31 "
BIG_MARKER = b"sk-BIGSECRET-99"
ROTATED = b"sk-ROTATEDSECRET-12"
STATIC = "static-STATICSECRET-8"
MARKERS = ("GOODSECRET", "CRLFSECRET", "NULSECRET", "TRAILSECRET", "BIGSECRET", "ROTATEDSECRET",
           "STATICSECRET")


def _scan(text: str) -> None:
    for m in MARKERS:
        assert m not in text, f"secret marker {m} leaked: {text[:200]!r}"


def test_nothing_leaks(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                       capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    sdir = tmp_path / "secrets"
    sdir.mkdir()
    (sdir / "good").write_bytes(GOOD + b"\n")
    (sdir / "crlf").write_bytes(CRLF)
    (sdir / "nul").write_bytes(NUL)
    (sdir / "trailing").write_bytes(TRAILING)
    (sdir / "big").write_bytes(BIG_MARKER * (MAX_SECRET_BYTES // len(BIG_MARKER) + 2))
    outside = tmp_path / "outside"
    outside.write_bytes(b"sk-GOODSECRET-outside")
    os.symlink(outside, sdir / "escape")

    store = SecretStore(sdir)
    seen: list[str] = [repr(store), str(store)]
    for name in ("good", "crlf", "nul", "trailing"):
        v = store.get(name)
        assert v is not None
        seen += [repr(v), str(v), f"{v}", f"{v!s:>30}", "%s" % (v,)]  # noqa: UP031

    rules = [
        {"host": f"{name}.example", "action": "allow", "header_rewrites": [
            {"name": "Authorization", "value": "Bearer {value}", "secret_ref": name},
            {"name": "X-Static", "value": STATIC},
        ]}
        for name in ("good", "crlf", "nul", "trailing", "big", "missing")
    ]
    cfg = parse_config({"egress_policy": {"rules": rules}})
    seen.append(describe_effective_policy(cfg))
    seen.append(repr(cfg))  # templates are repr=False: a static template may be a credential
    policy = Policy.from_config(cfg.egress_policy)

    # success path: the value goes upstream, but nowhere else
    d = policy.decide("good.example", 443, "GET")
    seen.append(repr(d))
    out, names = upstream_request_headers([(b"authorization", b"client")], d, store)
    assert (b"Authorization", b"Bearer " + GOOD) in out
    seen.append(repr(names))
    resp = downstream_response_headers([(b"authorization", b"Bearer " + GOOD), (b"x-ok", b"1")], d)
    assert resp == [(b"x-ok", b"1")]  # R7: an echoed credential never reaches the app

    # failure paths
    for host in ("crlf.example", "nul.example", "trailing.example", "big.example", "missing.example"):
        with pytest.raises(SecretUnavailable) as ei:
            upstream_request_headers([], policy.decide(host, 443, "GET"), store)
        seen += [str(ei.value), repr(ei.value), "".join(traceback.format_exception(ei.value))]

    # rotation and a failed reload
    (sdir / "good").write_bytes(ROTATED)
    assert store.reload()
    sdir.rename(tmp_path / "gone")
    assert not store.reload()
    seen.append(str(store.last_error))

    # config errors never echo templates
    with pytest.raises(ConfigError) as ce:
        parse_config({"egress_policy": {"rules": [{"host": "a.com", "action": "allow", "header_rewrites": [
            {"name": "Authorization", "value": f"Bearer {STATIC}\n"},
            {"name": "Host", "value": STATIC},
        ]}]}})
    seen.append(str(ce.value))

    captured = capsys.readouterr()
    seen += [caplog.text, captured.out, captured.err]
    seen += [r.getMessage() for r in caplog.records]
    assert "escape" in caplog.text and "'big'" in caplog.text  # the paths were really exercised
    for text in seen:
        _scan(text)
