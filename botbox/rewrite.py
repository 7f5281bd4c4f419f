"""Header rewriting (SECURITY-SPEC R2, R3, R7, S2-S4). Pure, on ``(name, value)`` bytes tuples as
h11 produces them (names are lowercased here anyway, so mixed-case input is handled too).

Request side (:func:`upstream_request_headers`):

1. ``Host`` first, derived from the decision's canonical host (``[v6]`` bracketed; port omitted
   when 443) - every client ``Host`` is dropped (R3).
2. Hop-by-hop headers and every header named by a ``Connection``/``Proxy-Connection`` token are
   removed (R2). ``Transfer-Encoding`` is hop-by-hop: the caller must set the upstream framing
   itself (``Transfer-Encoding: chunked`` for a chunked client body). ``Content-Length`` is kept
   even when a ``Connection`` token names it: it is end-to-end, and dropping it would let a client
   desynchronise framing (smuggling).
3. For every configured rewrite, every client header of that name (any case, any count) is removed
   and the configured value appended (delete-then-add, S2). ``{value}`` comes from the secret (S3).
   A missing, wiped or empty secret, a value containing a control character other than HTAB (CR,
   LF and NUL above all, S4), or one that would give the header leading/trailing whitespace (h11
   refuses those and would echo the value in its error) raises :class:`SecretUnavailable`: the
   request fails closed.

Client ``Forwarded`` / ``X-Forwarded-*`` headers are left alone: the proxy adds none (the upstream
learns nothing about the pod) and removing the app's own headers is not the proxy's business; an
operator who must strip one can override it with a static rewrite.

Response side (:func:`downstream_response_headers`): hop-by-hop (and ``Connection``-named) headers
and every header whose name matches one of the decision's rewrites are removed (R7), so an
upstream that echoes a credential header cannot hand it to the app.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from botbox.hostname import format_authority
from botbox.policy import Decision
from botbox.secrets import SecretLookup, SecretWiped

__all__ = [
    "HOP_BY_HOP",
    "SecretUnavailable",
    "downstream_response_headers",
    "secret_usable",
    "upstream_request_headers",
]

Headers = Sequence[tuple[bytes, bytes]]

HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_CONNECTION_HEADERS = (b"connection", b"proxy-connection")
# Never removed because a Connection token names them (framing; Host is rewritten anyway).
_NOT_NOMINATABLE = frozenset({b"content-length", b"host"})
_UNSAFE_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_OWS = (b" ", b"\t")


class SecretUnavailable(Exception):
    """A referenced secret is missing or unusable. The message names the reference, never a value."""

    def __init__(self, secret_ref: str, why: str) -> None:
        self.secret_ref = secret_ref
        super().__init__(f"secret {secret_ref!r} {why}")


def _nominated(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in Connection / Proxy-Connection tokens (lowercased)."""
    out: set[bytes] = set()
    for name, value in headers:
        if name.lower() in _CONNECTION_HEADERS:
            for tok in value.split(b","):
                t = tok.strip(b" \t").lower()
                if t and t not in _NOT_NOMINATABLE:
                    out.add(t)
    return out


def _has_connection_header(headers: Headers) -> bool:
    for name, _ in headers:
        n = name.lower()
        if n in _CONNECTION_HEADERS:
            return True
    return False


def upstream_request_headers(
    client_headers: Headers, decision: Decision, secrets: SecretLookup
) -> tuple[list[tuple[bytes, bytes]], list[str]]:
    """Headers to send upstream (``Host`` first) and the names of the configured headers rewritten.

    Raises :class:`SecretUnavailable` (missing/wiped secret or a value unsafe in a header, S3/S4).
    """
    rewrites = decision.rewrites
    # Render injected values first: fail closed before building anything else.
    injected: list[tuple[bytes, bytes]] = []
    for rw in rewrites:
        ref = rw.secret_ref
        if ref is None:
            value = rw.parts[0]
        else:
            sv = secrets.get(ref)
            if sv is None:
                raise SecretUnavailable(ref, "is not available")
            try:
                value = sv.fill(rw.parts)  # atomic snapshot w.r.t. a concurrent wipe
            except SecretWiped:
                # A reload (worker thread) swapped the store and then wiped the value we held: the
                # store already has the new one, so rotation never fails a request (S7).
                sv = secrets.get(ref)
                if sv is None:
                    raise SecretUnavailable(ref, "is not available") from None
                try:
                    value = sv.fill(rw.parts)
                except SecretWiped:
                    raise SecretUnavailable(ref, "was replaced while in use") from None
            # The template is validated printable ASCII at config load, so anything unsafe in the
            # rendered value came from the secret.
            if len(value) == rw.static_len:
                raise SecretUnavailable(ref, "is empty")
            if _UNSAFE_VALUE.search(value):
                raise SecretUnavailable(ref, "contains a control character (CR, LF, NUL, ...): refused")
            if value[:1] in _OWS or value[-1:] in _OWS:
                # h11 would refuse the header and echo the value in its exception message.
                raise SecretUnavailable(ref, "yields a header value with leading/trailing whitespace")
        injected.append((rw.name_bytes, value))

    drop = HOP_BY_HOP
    if _has_connection_header(client_headers):
        drop = drop | _nominated(client_headers)
    if rewrites:
        drop = drop | {rw.name_lower for rw in rewrites}

    host_value = format_authority(decision.host, decision.port).encode("ascii")
    out: list[tuple[bytes, bytes]] = [(b"host", host_value)]
    for name, value in client_headers:
        n = name.lower()
        if n in drop or n == b"host":
            continue
        out.append((name, value))
    out.extend(injected)
    return out, [rw.name for rw in rewrites]


def secret_usable(secrets: SecretLookup, ref: str) -> bool:
    """Whether secret ``ref`` exists and could be injected (non-empty, no CR/LF/NUL or other control
    character: S4). Readiness (S8) uses it: a secret that every request would refuse is not available.
    A value wiped by a concurrent reload is looked up once more (the store swaps before it wipes)."""
    for _ in range(2):
        sv = secrets.get(ref)
        if sv is None:
            return False
        try:
            view = sv.buffer()
        except SecretWiped:
            continue
        try:
            return len(view) > 0 and _UNSAFE_VALUE.search(view) is None
        finally:
            view.release()
    return False


def downstream_response_headers(upstream_headers: Headers, decision: Decision) -> list[tuple[bytes, bytes]]:
    """Response headers for the app: hop-by-hop removed (R2), rewritten header names removed (R7)."""
    drop = HOP_BY_HOP
    if _has_connection_header(upstream_headers):
        drop = drop | _nominated(upstream_headers)
    if decision.rewrites:
        drop = drop | {rw.name_lower for rw in decision.rewrites}
    return [(name, value) for name, value in upstream_headers if name.lower() not in drop]
