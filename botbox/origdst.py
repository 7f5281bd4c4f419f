"""Original destination of a redirected connection (``SO_ORIGINAL_DST``), IPv4 and IPv6.

netfilter's REDIRECT target rewrites the destination of the app's connection to the proxy's loopback
listener; the original destination survives in the conntrack entry and is read back with
``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` (IPv4) or ``getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`` (IPv6).

A connection that was not redirected has either no conntrack entry (``ENOENT``) or one whose original
destination is the listener itself (conntrack tracks loopback connections too); both mean "not
redirected" and return ``None``, so an explicit/loopback client is handled with the Host it names.
"""

from __future__ import annotations

import errno
import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

_SOCKADDR_IN_LEN = 16
_SOCKADDR_IN6_LEN = 28
_NOT_REDIRECTED = frozenset({errno.ENOENT, errno.ENOPROTOOPT, errno.ENOTCONN, errno.EOPNOTSUPP})


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """Parse a ``struct sockaddr_in`` (family, port in network order, 4-byte address)."""
    if len(raw) < 8:
        raise ValueError("sockaddr_in too short")
    family = struct.unpack_from("=H", raw, 0)[0]
    if family != socket.AF_INET:
        raise ValueError(f"unexpected address family {family} in sockaddr_in")
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


def parse_sockaddr_in6(raw: bytes) -> tuple[str, int]:
    """Parse a ``struct sockaddr_in6`` (family, port, flowinfo, 16-byte address, scope id)."""
    if len(raw) < 24:
        raise ValueError("sockaddr_in6 too short")
    family = struct.unpack_from("=H", raw, 0)[0]
    if family != socket.AF_INET6:
        raise ValueError(f"unexpected address family {family} in sockaddr_in6")
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def _strip_mapped(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """Return ``(ip, port)`` the client originally connected to, or ``None`` when not redirected.

    Raises ``OSError`` for unexpected failures (the caller logs and treats the connection as not
    redirected only for the documented "no entry" errnos).
    """
    family = sock.family
    try:
        if family == socket.AF_INET:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
            dst = parse_sockaddr_in(raw)
        elif family == socket.AF_INET6:
            try:
                raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
                dst = parse_sockaddr_in6(raw)
            except OSError as exc:
                # An IPv4 client on a dual-stack socket (::ffff:a.b.c.d) is tracked as IPv4.
                if exc.errno not in _NOT_REDIRECTED:
                    raise
                raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
                dst = parse_sockaddr_in(raw)
        else:
            return None
    except OSError as exc:
        if exc.errno in _NOT_REDIRECTED:
            return None
        raise
    local = sock.getsockname()
    if _strip_mapped(str(local[0])) == _strip_mapped(dst[0]) and int(local[1]) == dst[1]:
        return None  # conntrack entry without NAT: a direct connection to the listener
    return dst


def format_addr(addr: tuple[str, int] | None) -> str | None:
    """``ip:port`` with IPv6 in brackets, as logged in ``orig_dst`` and ``client``."""
    if addr is None:
        return None
    host, port = addr
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
