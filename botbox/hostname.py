"""Host name canonicalisation (SECURITY-SPEC P1) and authority parsing.

One function, :func:`canonicalize_host`, is used both when the configuration is loaded and for every
request, so a rule and a request can only match when they name the same host byte for byte.

Canonical form:

* DNS names: lowercase ASCII, IDNA (UTS-46 mapping, non-transitional, STD3 rules) A-labels for
  non-ASCII labels, no trailing dot, labels of letters/digits/hyphens (1..63 octets, no leading or
  trailing hyphen), total length at most 253.
* IPv4 literals: canonical dotted-quad decimal only (``127.0.0.1``). Integer, octal, hex and
  shortened forms (``2130706433``, ``017.0.0.1``, ``0x7f.0.0.1``, ``127.1``) are rejected: they are
  classic allowlist-bypass tricks and some resolvers and clients interpret them differently.
* IPv6 literals: compressed lowercase (``ipaddress``), without brackets, without zone id.

Choices beyond the spec (documented in the report):

* Only space and horizontal tab are trimmed (HTTP OWS); any other whitespace or control character
  is rejected, never silently stripped.
* Underscores are rejected (not valid in host names; STD3 rules).
* A last label that is all digits or ``0x``-hex is treated as an IPv4 attempt (as WHATWG URL does)
  and must then be a canonical dotted quad; ``foo.123`` is therefore invalid.
* ``--`` in label positions 3-4 is accepted for plain ASCII labels (real hosts such as
  ``r3---sn-abc.googlevideo.com`` use it); a label starting with ``xn--`` must be a valid A-label
  that round-trips.
* Raw input longer than 1024 characters is rejected before any processing.
"""

from __future__ import annotations

import functools
import ipaddress
import re

import idna

__all__ = ["InvalidHost", "canonicalize_host", "format_authority", "parse_authority"]

_MAX_RAW = 1024
_MAX_NAME = 253
_MAX_LABEL = 63

# Characters that can never appear in a host (before IDNA mapping). Anything < 0x20, DEL and C1
# controls are caught separately.
_FORBIDDEN = frozenset('@/\\%?#[]<>"`{}|^ \t,;=!$&\'()*+~')
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
_ASCII_NAME_FAST = re.compile(r"[a-z0-9.-]+", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_HEX_NUM = re.compile(r"0x[0-9a-f]*", re.ASCII)
_CANON_OCTET = re.compile(r"(?:0|[1-9][0-9]{0,2})", re.ASCII)
_PORT = re.compile(r"[1-9][0-9]{0,4}", re.ASCII)
_IPV6_CHARS = re.compile(r"[0-9a-f:.]+", re.ASCII)


class InvalidHost(ValueError):
    """The input is not a valid host (or authority). The message is safe to log."""


def _is_control(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F


def _describe(raw: str) -> str:
    # repr() escapes control characters, so messages stay on one line; bound the length.
    return repr(raw[:80] + ("…" if len(raw) > 80 else ""))


def _canonical_ipv4(name: str) -> str:
    parts = name.split(".")
    if len(parts) != 4:
        raise InvalidHost(f"{_describe(name)}: numeric host is not a canonical dotted-quad IPv4 address")
    for p in parts:
        if not _CANON_OCTET.fullmatch(p) or int(p) > 255:
            raise InvalidHost(
                f"{_describe(name)}: IPv4 literal must be canonical dotted-quad decimal "
                "(no octal, hex, integer or leading zeros)"
            )
    return name


def _canonical_ipv6(inner: str) -> str:
    if not inner or not _IPV6_CHARS.fullmatch(inner):
        raise InvalidHost(f"{_describe(inner)}: not a valid IPv6 literal")
    try:
        return ipaddress.IPv6Address(inner).compressed
    except ValueError:
        raise InvalidHost(f"{_describe(inner)}: not a valid IPv6 literal") from None


def _check_ascii_label(label: str, whole: str) -> None:
    if not label:
        raise InvalidHost(f"{_describe(whole)}: empty label")
    if len(label) > _MAX_LABEL:
        raise InvalidHost(f"{_describe(whole)}: label longer than 63 characters")
    if not _LDH_LABEL.fullmatch(label):
        raise InvalidHost(f"{_describe(whole)}: label {label!r} is not letters, digits and inner hyphens")
    if label.startswith("xn--"):
        try:
            decoded = idna.ulabel(label)
            again = idna.alabel(decoded).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise InvalidHost(f"{_describe(whole)}: label {label!r} is not a valid IDNA A-label") from None
        if again != label:
            raise InvalidHost(f"{_describe(whole)}: label {label!r} is not a canonical IDNA A-label")


def _finish_name(name: str, raw: str) -> str:
    """``name`` is lowercase ASCII without trailing dot; validate labels and numeric forms."""
    if not name:
        raise InvalidHost(f"{_describe(raw)}: empty host")
    if len(name) > _MAX_NAME:
        raise InvalidHost(f"{_describe(raw)}: host name longer than 253 characters")
    labels = name.split(".")
    last = labels[-1]
    if _DIGITS.fullmatch(last) or _HEX_NUM.fullmatch(last):
        # WHATWG treats a numeric last label as an IPv4 address; only the canonical form is accepted.
        return _canonical_ipv4(name)
    for label in labels:
        _check_ascii_label(label, raw)
    return name


@functools.lru_cache(maxsize=4096)
def _canonicalize(raw: str) -> str:
    s = raw.strip(" \t")
    if not s:
        raise InvalidHost("empty host")
    # Fast path: the overwhelmingly common plain ASCII name.
    lowered = s.lower() if s.isascii() else s
    if _ASCII_NAME_FAST.fullmatch(lowered):
        if lowered.endswith("."):
            lowered = lowered[:-1]
        return _finish_name(lowered, raw)

    for ch in s:
        if _is_control(ch):
            raise InvalidHost(f"{_describe(raw)}: control character in host")
        if ch.isspace():
            raise InvalidHost(f"{_describe(raw)}: whitespace in host")

    if s.startswith("["):
        if not s.endswith("]") or len(s) < 3:
            raise InvalidHost(f"{_describe(raw)}: unterminated IPv6 literal")
        inner = s[1:-1].lower()
        if "%" in inner:
            raise InvalidHost(f"{_describe(raw)}: IPv6 zone identifiers are not allowed")
        return _canonical_ipv6(inner)
    if ":" in s:
        lowered_s = s.lower()
        if "%" in lowered_s:
            raise InvalidHost(f"{_describe(raw)}: IPv6 zone identifiers are not allowed")
        if _IPV6_CHARS.fullmatch(lowered_s) and lowered_s.count(":") >= 2:
            return _canonical_ipv6(lowered_s)
        raise InvalidHost(f"{_describe(raw)}: a port is not allowed here (and bare IPv6 must be valid)")

    for ch in s:
        if ch in _FORBIDDEN:
            raise InvalidHost(f"{_describe(raw)}: character {ch!r} not allowed in a host")

    if s.isascii():
        name = s.lower()
    else:
        try:
            mapped = idna.uts46_remap(s, std3_rules=True, transitional=False)
        except (idna.IDNAError, UnicodeError, ValueError, IndexError):
            raise InvalidHost(f"{_describe(raw)}: not a valid internationalised host name") from None
        for ch in mapped:
            if ch in _FORBIDDEN or _is_control(ch) or ch.isspace():
                raise InvalidHost(f"{_describe(raw)}: character {ch!r} not allowed in a host")
        if mapped.endswith("."):
            mapped = mapped[:-1]
        out: list[str] = []
        for label in mapped.split("."):
            if label.isascii():
                out.append(label)
                continue
            try:
                out.append(idna.alabel(label).decode("ascii"))
            except (idna.IDNAError, UnicodeError, ValueError, IndexError):
                raise InvalidHost(f"{_describe(raw)}: label is not a valid IDNA label") from None
        name = ".".join(out)
        return _finish_name(name, raw)

    if name.endswith("."):
        name = name[:-1]
    return _finish_name(name, raw)


def canonicalize_host(raw: str) -> str:
    """Return the canonical form of a host (no port). Raises :class:`InvalidHost`, nothing else."""
    if not isinstance(raw, str):
        raise InvalidHost("host must be a string")
    if len(raw) > _MAX_RAW:
        raise InvalidHost("host too long")
    return _canonicalize(raw)


def parse_authority(raw: str) -> tuple[str, int | None]:
    """Parse ``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` into (canonical host, port or None).

    For wire authorities (``Host`` header, absolute-form URI): non-ASCII input is refused.

    Ports are decimal 1..65535 without sign, leading zeros or surrounding space; an empty port
    (``host:``) is rejected. A bare (unbracketed) IPv6 literal is rejected: it is ambiguous in an
    authority. Raises :class:`InvalidHost`, nothing else.
    """
    if not isinstance(raw, str):
        raise InvalidHost("authority must be a string")
    if len(raw) > _MAX_RAW:
        raise InvalidHost("authority too long")
    if not raw.isascii():
        # On the wire (Host header, absolute URI, SNI) an IDN must already be punycode. Refusing
        # non-ASCII here also stops aliasing through decoding: e.g. the latin-1 byte 0xAA is
        # U+00AA, which UTS-46 maps to "a".
        raise InvalidHost(f"{_describe(raw)}: non-ASCII authority (send IDNs as punycode)")
    s = raw.strip(" \t")
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise InvalidHost(f"{_describe(raw)}: unterminated IPv6 literal")
        host_part, rest = s[: end + 1], s[end + 1 :]
        if rest == "":
            return canonicalize_host(host_part), None
        if not rest.startswith(":"):
            raise InvalidHost(f"{_describe(raw)}: junk after IPv6 literal")
        return canonicalize_host(host_part), _parse_port(rest[1:], raw)
    colons = s.count(":")
    if colons == 0:
        return canonicalize_host(s), None
    if colons > 1:
        raise InvalidHost(f"{_describe(raw)}: IPv6 literals must be bracketed in an authority")
    host_part, port_part = s.split(":", 1)
    if host_part.endswith((" ", "\t")):
        raise InvalidHost(f"{_describe(raw)}: whitespace before port")
    return canonicalize_host(host_part), _parse_port(port_part, raw)


def _parse_port(text: str, raw: str) -> int:
    if not _PORT.fullmatch(text):
        raise InvalidHost(f"{_describe(raw)}: port must be decimal 1..65535 without sign or leading zeros")
    port = int(text)
    if port > 65535:
        raise InvalidHost(f"{_describe(raw)}: port out of range 1..65535")
    return port


def format_authority(host: str, port: int, default_port: int = 443) -> str:
    """Render a canonical host and port for a ``Host`` header: ``[v6]`` bracketed, port omitted
    when it equals ``default_port``."""
    h = f"[{host}]" if ":" in host else host
    return h if port == default_port else f"{h}:{port}"
