# ruff: noqa: E501  (a table of exact byte strings reads better one case per line)
"""The raw-byte request smuggling / malformed-framing corpus (issue 6).

Each case is the exact byte sequence a hostile app writes to the proxy's HTTP listener. ``{H}`` is
replaced by the authority of an *allowed* upstream (so a parser mistake would actually forward the
request — the tests assert with the upstream's hit log that nothing was), ``{D}`` by a denied host.

Used by ``tests/test_adversarial_smuggling.py`` (end to end against a running proxy) and as the
seed corpus of the atheris target (``tests/fuzz/fuzz_request.py``).

Expectations:
- ``REJECT``: 400 ``bad request`` and the connection closed (CONTRACT §3 last row, SECURITY-SPEC R5);
  nothing reaches the upstream.
- ``REJECT_ANY``: a clean 4xx (400 or 403 — e.g. an unparsable host may be reported either way, a
  request without Host gets ``missing host``) and nothing reaches the upstream.

Chunk extensions are not in the reject list: h11 parses and discards them and the proxy re-frames
the body towards the upstream, so an extension (however odd) never travels; a bare LF inside one is
still a framing error and is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Expect = Literal["REJECT", "REJECT_ANY"]


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    expect: Expect
    why: str
    in_body: bool = False  # the error is in the body: the head may already be streaming upstream


    def render(self, allowed: bytes, denied: bytes = b"denied.example") -> bytes:
        return self.raw.replace(b"{H}", allowed).replace(b"{D}", denied)


def _c(name: str, raw: bytes, why: str, expect: Expect = "REJECT", *, in_body: bool = False) -> Case:
    return Case(name, raw, expect, why, in_body)


_POST = b"POST /smuggle HTTP/1.1\r\nHost: {H}\r\n"
_SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: {D}\r\n\r\n"

CORPUS: tuple[Case, ...] = (
    # --- CL.TE / TE.CL: both framings present -------------------------------------------------------
    _c("cl_te", _POST + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX", "CL then TE"),
    _c("te_cl", _POST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
       "TE then CL"),
    _c("cl_te_smuggled_request",
       _POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5c\r\n" + _SMUGGLED + b"\r\n0\r\n\r\n",
       "classic CL.TE with a hidden request for a denied host"),
    _c("cl_zero_te", _POST + b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
       "CL 0 plus TE"),
    # --- TE.TE: obfuscated Transfer-Encoding ----------------------------------------------------------
    _c("te_chunked_identity", _POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
       "coding list"),
    _c("te_identity_chunked", _POST + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
       "coding list, chunked last"),
    _c("te_duplicate", _POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
       "duplicate TE header"),
    _c("te_duplicate_other", _POST + b"Transfer-Encoding: chunked\r\nTransfer-encoding: cow\r\n\r\n0\r\n\r\n",
       "second TE with another case and a bogus coding"),
    _c("te_xchunked", _POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", "unknown coding"),
    _c("te_identity", _POST + b"Transfer-Encoding: identity\r\nContent-Length: 1\r\n\r\nX", "identity + CL"),
    _c("te_space_before_colon", _POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
       "whitespace between name and colon (RFC 9112 5.1: MUST reject)"),
    _c("te_vtab", _POST + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n", "vertical tab as OWS"),
    _c("te_formfeed", _POST + b"Transfer-Encoding:\x0cchunked\r\n\r\n0\r\n\r\n", "form feed as OWS"),
    _c("te_obs_fold", _POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", "TE value on a folded line"),
    _c("te_obs_fold_with_cl",
       _POST + b"Content-Length: 3\r\nTransfer-Encoding: x\r\n chunked\r\n\r\n0\r\n\r\n", "fold hides chunked"),
    _c("te_leading_space_name", _POST + b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
       "header line starting with whitespace (a fold of the previous line)"),
    _c("te_nul", _POST + b"Transfer-Encoding: chunked\x00\r\n\r\n0\r\n\r\n", "NUL after the coding"),
    _c("te_quoted", _POST + b'Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n', "quoted coding"),
    # --- Content-Length ---------------------------------------------------------------------------------
    _c("cl_duplicate_conflicting", _POST + b"Content-Length: 3\r\nContent-Length: 5\r\n\r\nAAAAA",
       "two different lengths"),
    _c("cl_duplicate_same", _POST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nAAA",
       "duplicate Content-Length (R5: rejected even when equal)"),
    _c("cl_list", _POST + b"Content-Length: 3, 3\r\n\r\nAAA", "list-valued Content-Length"),
    _c("cl_negative", _POST + b"Content-Length: -1\r\n\r\n", "negative length"),
    _c("cl_plus", _POST + b"Content-Length: +3\r\n\r\nAAA", "signed length"),
    _c("cl_hex", _POST + b"Content-Length: 0x3\r\n\r\nAAA", "hex length"),
    _c("cl_space_inside", _POST + b"Content-Length: 1 0\r\n\r\nAAAAAAAAAA", "space inside the number"),
    _c("cl_empty", _POST + b"Content-Length: \r\n\r\n", "empty length"),
    _c("cl_huge", _POST + b"Content-Length: 999999999999999999999999999999\r\n\r\n", "absurd length"),
    _c("cl_float", _POST + b"Content-Length: 3.0\r\n\r\nAAA", "decimal point"),
    _c("cl_underscore", _POST + b"Content-Length: 1_0\r\n\r\nAAAAAAAAAA", "Python int() accepts 1_0"),
    _c("cl_unicode_digits", _POST + "Content-Length: ３\r\n\r\nAAA".encode(), "full-width digit"),
    # --- chunked body framing ---------------------------------------------------------------------------
    _c("chunk_size_not_hex", _POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nAAA\r\n0\r\n\r\n", "bad size", in_body=True),
    _c("chunk_size_negative", _POST + b"Transfer-Encoding: chunked\r\n\r\n-1\r\nA\r\n0\r\n\r\n", "negative", in_body=True),
    _c("chunk_size_0x", _POST + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nAAA\r\n0\r\n\r\n", "0x prefix", in_body=True),
    _c("chunk_size_overlong", _POST + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\nA\r\n0\r\n\r\n",
       "size overflows 64 bits", in_body=True),
    _c("chunk_data_too_long", _POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nAAAAA\r\n0\r\n\r\n",
       "data longer than declared, no CRLF after the declared size", in_body=True),
    _c("chunk_ext_bare_lf", _POST + b"Transfer-Encoding: chunked\r\n\r\n3;x\n\r\nAAA\r\n0\r\n\r\n",
       "bare LF inside a chunk extension", in_body=True),
    _c("chunk_space_in_size", _POST + b"Transfer-Encoding: chunked\r\n\r\n3 3\r\nAAA\r\n0\r\n\r\n",
       "space inside the size", in_body=True),
    # --- line endings, control characters -----------------------------------------------------------
    _c("bare_lf_everywhere", b"GET / HTTP/1.1\nHost: {H}\n\n", "bare LF line endings (R5)"),
    _c("bare_lf_header", b"GET / HTTP/1.1\r\nHost: {H}\nX-A: b\r\n\r\n", "one header ended by bare LF"),
    _c("bare_lf_injects_header", b"GET / HTTP/1.1\r\nHost: {H}\r\nX-A: b\nAuthorization: Bearer stolen\r\n\r\n",
       "bare LF used to inject a header"),
    _c("bare_cr_terminator", b"GET / HTTP/1.1\rHost: {H}\r\r\n\r\n", "bare CR as line terminator"),
    _c("bare_cr_in_value", b"GET / HTTP/1.1\r\nHost: {H}\r\nX-A: a\rInjected: b\r\n\r\n", "CR inside a value"),
    _c("nul_in_value", b"GET / HTTP/1.1\r\nHost: {H}\r\nX-A: a\x00b\r\n\r\n", "NUL in a value"),
    _c("nul_in_name", b"GET / HTTP/1.1\r\nHost: {H}\r\nX-\x00A: b\r\n\r\n", "NUL in a name"),
    _c("nul_in_target", b"GET /a\x00b HTTP/1.1\r\nHost: {H}\r\n\r\n", "NUL in the target"),
    _c("ctl_in_value", b"GET / HTTP/1.1\r\nHost: {H}\r\nX-A: a\x1bb\r\n\r\n", "ESC in a value"),
    _c("del_in_value", b"GET / HTTP/1.1\r\nHost: {H}\r\nX-A: a\x7fb\r\n\r\n", "DEL in a value"),
    _c("obs_fold_plain", b"GET / HTTP/1.1\r\nHost: {H}\r\nX-A: a\r\n b\r\n\r\n", "obs-fold (R5)"),
    _c("obs_fold_tab", b"GET / HTTP/1.1\r\nHost: {H}\r\nX-A: a\r\n\tb\r\n\r\n", "obs-fold with a tab"),
    _c("obs_fold_host", b"GET / HTTP/1.1\r\nHost: {D}\r\n {H}\r\n\r\n", "obs-fold inside Host"),
    _c("space_after_request_line", b"GET / HTTP/1.1\r\n Host: {H}\r\n\r\n", "first header is a fold"),
    # --- header names ----------------------------------------------------------------------------------
    _c("name_with_space", b"GET / HTTP/1.1\r\nHost: {H}\r\nX Foo: a\r\n\r\n", "space inside a name"),
    _c("name_empty", b"GET / HTTP/1.1\r\nHost: {H}\r\n: a\r\n\r\n", "empty name"),
    _c("name_pseudo_header", b"GET / HTTP/1.1\r\nHost: {H}\r\n:authority: {D}\r\n\r\n", "h2 pseudo-header"),
    _c("name_no_colon", b"GET / HTTP/1.1\r\nHost: {H}\r\nJustAName\r\n\r\n", "header line without colon"),
    _c("name_non_token", b"GET / HTTP/1.1\r\nHost: {H}\r\nX(A): a\r\n\r\n", "separator in a name"),
    _c("name_utf8", b"GET / HTTP/1.1\r\nHost: {H}\r\n" + "Ñame: a\r\n\r\n".encode(), "non-ASCII name"),
    # --- request line ------------------------------------------------------------------------------------
    _c("http09", b"GET /\r\n\r\n", "HTTP/0.9 simple request (400 missing host is fine)", "REJECT_ANY"),
    _c("http2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/2 prior-knowledge preface", "REJECT_ANY"),
    _c("http2_version_with_host", b"GET / HTTP/2.0\r\nHost: {H}\r\n\r\n", "HTTP/2.0 in an HTTP/1 request line"),
    _c("http_version_9", b"GET / HTTP/9.9\r\nHost: {H}\r\n\r\n", "unknown major version"),
    _c("http_version_lower", b"GET / http/1.1\r\nHost: {H}\r\n\r\n", "lowercase protocol name"),
    _c("request_line_tab", b"GET\t/\tHTTP/1.1\r\nHost: {H}\r\n\r\n", "tabs as separators"),
    _c("request_line_double_space", b"GET  / HTTP/1.1\r\nHost: {H}\r\n\r\n", "two spaces"),
    _c("target_with_space", b"GET /a b HTTP/1.1\r\nHost: {H}\r\n\r\n", "space inside the target"),
    _c("request_line_trailing_space", b"GET / HTTP/1.1 \r\nHost: {H}\r\n\r\n", "trailing space"),
    _c("method_empty", b" / HTTP/1.1\r\nHost: {H}\r\n\r\n", "empty method"),
    _c("method_non_token", b"G(T / HTTP/1.1\r\nHost: {H}\r\n\r\n", "separator in method"),
    _c("leading_blank_lines_garbage", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", "TLS ClientHello"),
    _c("overlong_request_line", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: {H}\r\n\r\n",
       "request line far above the head limit"),
    _c("overlong_header_value", b"GET / HTTP/1.1\r\nHost: {H}\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
       "one header far above the head limit"),
    _c("ten_thousand_headers",
       b"GET / HTTP/1.1\r\nHost: {H}\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(10_000)) + b"\r\n",
       "10,000 headers"),
    # --- Host ------------------------------------------------------------------------------------------
    _c("duplicate_host", b"GET / HTTP/1.1\r\nHost: {H}\r\nHost: {D}\r\n\r\n", "two Host headers"),
    _c("duplicate_host_same", b"GET / HTTP/1.1\r\nHost: {H}\r\nHost: {H}\r\n\r\n", "two equal Host headers"),
    _c("duplicate_host_case", b"GET / HTTP/1.1\r\nHost: {H}\r\nhOST: {D}\r\n\r\n", "Host twice, other case"),
    _c("host_list", b"GET / HTTP/1.1\r\nHost: {H}, {D}\r\n\r\n", "comma list in Host", "REJECT_ANY"),
    _c("host_empty", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", "empty Host", "REJECT_ANY"),
    _c("absolute_uri_host_mismatch", b"GET http://{D}/ HTTP/1.1\r\nHost: {H}\r\n\r\n",
       "absolute-URI and Host disagree"),
    _c("absolute_uri_host_mismatch_rev", b"GET http://{H}/ HTTP/1.1\r\nHost: {D}\r\n\r\n",
       "absolute-URI and Host disagree (allowed in the URI)"),
    _c("absolute_uri_userinfo", b"GET http://{H}@{D}/ HTTP/1.1\r\nHost: {D}\r\n\r\n",
       "user-info in the absolute-URI", "REJECT_ANY"),
    _c("host_userinfo", b"GET / HTTP/1.1\r\nHost: user@{H}\r\n\r\n", "user-info in Host", "REJECT_ANY"),
    _c("host_with_path", b"GET / HTTP/1.1\r\nHost: {H}/x\r\n\r\n", "path in Host", "REJECT_ANY"),
    _c("host_backslash", b"GET / HTTP/1.1\r\nHost: {D}\\{H}\r\n\r\n", "backslash in Host", "REJECT_ANY"),
)

# Pipelining / connection-state cases are sequences rather than single malformed requests; the
# smuggling tests build them explicitly, the fuzz seed corpus includes their raw bytes too.
# A chunked body whose lines end in bare LF: h11 keeps waiting for a CRLF-terminated chunk line, so
# the proxy cannot tell it from a slow body until the client half-closes (then: 400) or the idle
# timeout ends it; either way no complete request is forwarded (tested separately).
CHUNK_BARE_LF = _POST + b"Transfer-Encoding: chunked\r\n\r\n3\nAAA\n0\n\n"

PIPELINE_ALLOWED_THEN_DENIED = (
    b"GET /first HTTP/1.1\r\nHost: {H}\r\n\r\n"
    b"GET /second HTTP/1.1\r\nHost: {D}\r\n\r\n"
)
PIPELINE_AFTER_CLOSE = (
    b"GET /first HTTP/1.1\r\nHost: {H}\r\nConnection: close\r\n\r\n"
    b"GET /second HTTP/1.1\r\nHost: {H}\r\n\r\n"
)


def seed_inputs(allowed: bytes = b"localhost:8443", denied: bytes = b"denied.example") -> dict[str, bytes]:
    """Every corpus entry rendered, plus a few well-formed requests, keyed by a file-safe name."""
    seeds = {c.name: c.render(allowed, denied) for c in CORPUS}
    seeds["ok_get"] = b"GET /ok HTTP/1.1\r\nHost: " + allowed + b"\r\n\r\n"
    seeds["ok_post_cl"] = b"POST /ok HTTP/1.1\r\nHost: " + allowed + b"\r\nContent-Length: 3\r\n\r\nabc"
    seeds["ok_post_chunked"] = (
        b"POST /ok HTTP/1.1\r\nHost: " + allowed + b"\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    seeds["ok_absolute"] = b"GET http://" + allowed + b"/ok HTTP/1.1\r\nHost: " + allowed + b"\r\n\r\n"
    seeds["ok_auth_dup"] = (
        b"GET /ok HTTP/1.1\r\nHost: " + allowed + b"\r\nAuthorization: a\r\nauthorization: b\r\n"
        b"Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\n\r\n"
    )
    seeds["chunk_bare_lf"] = CHUNK_BARE_LF.replace(b"{H}", allowed)
    seeds["connect"] = b"CONNECT " + allowed + b" HTTP/1.1\r\nHost: " + allowed + b"\r\n\r\n"
    seeds["trace"] = b"TRACE / HTTP/1.1\r\nHost: " + allowed + b"\r\n\r\n"
    seeds["pipeline_allowed_then_denied"] = PIPELINE_ALLOWED_THEN_DENIED.replace(b"{H}", allowed).replace(
        b"{D}", denied
    )
    seeds["pipeline_after_close"] = PIPELINE_AFTER_CLOSE.replace(b"{H}", allowed).replace(b"{D}", denied)
    return seeds
