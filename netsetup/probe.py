"""Live probe of the installed rules (SECURITY-SPEC N6), run inside the pod's network namespace as root.

For every planned family and every redirect (``REDIRECT_FROM_PORT -> PROXY_PORT`` and, with interception,
``443 -> INTERCEPTION_PORT``):

1. a listener is bound on the loopback address of the family (``127.0.0.1`` / ``::1``: where REDIRECT
   delivers) at the target port;
2. a forked child that dropped to the *probe uid* (default 65534 ``nobody``; ``BOTBOX_UID + 1`` if the
   proxy uid is 65534) connects to a reserved documentation address (``192.0.2.1`` / ``2001:db8::1``) on
   the redirected port; the connection must arrive at the listener and ``SO_ORIGINAL_DST`` must show the
   documentation address and port;
3. a child running as the proxy uid does the same and must NOT arrive (owner exemption);

and per family: a UDP datagram to the documentation address port 443 (QUIC) from the probe uid must be
refused by the kernel (``EPERM`` from the REJECT rule), and a TCP connection to a port that is not
redirected must be refused (``ECONNREFUSED`` from ``tcp-reset`` or ``EPERM``).

The documentation addresses need a route for ``connect()`` to get as far as netfilter.  When the
namespace has none (no default route), the probe adds a temporary veth pair (``bbprb`` + random, both
ends in this namespace) with host routes to them and deletes it afterwards.  Packets the probe lets
through (only the proxy-uid check, by design) go to an address reserved for documentation.  Nothing
else is changed; conntrack entries of the probe connections expire on their own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from netsetup.plan import Family, Plan

TEST_ADDR: dict[Family, str] = {"ipv4": "192.0.2.1", "ipv6": "2001:db8::1"}
LOOPBACK: dict[Family, str] = {"ipv4": "127.0.0.1", "ipv6": "::1"}
SO_ORIGINAL_DST = 80  # SOL_IP / SOL_IPV6 (IP6T_SO_ORIGINAL_DST)
DEFAULT_PROBE_UID = 65534
CONNECT_TIMEOUT = 3.0
EXEMPT_WAIT = 0.5


@dataclass(frozen=True)
class ProbeResult:
    family: str
    check: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"probe {self.family} {self.check}: {'ok' if self.ok else 'FAILED'} ({self.detail})"


def default_probe_uid(proxy_uid: int) -> int:
    return DEFAULT_PROBE_UID if proxy_uid != DEFAULT_PROBE_UID else proxy_uid + 1


def original_dst(conn: socket.socket, family: Family) -> tuple[str, int]:
    if family == "ipv4":
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def as_uid(uid: int, fn: Callable[[], str], timeout: float = 10.0) -> str:
    """Run ``fn`` in a forked child that dropped to ``uid`` (gid = uid, no supplementary groups)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            res = fn()
        except BaseException as e:
            res = f"error:{type(e).__name__}:{e}"
            code = 1
        try:
            os.write(w, res.encode()[:4000])
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        data = os.read(r, 4096) if ready else b""
        if not ready:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return data.decode(errors="replace") if data else "error:timeout"


def _af(family: Family) -> socket.AddressFamily:
    return socket.AF_INET if family == "ipv4" else socket.AF_INET6


def _tcp_connect(family: Family, addr: str, port: int, timeout: float) -> str:
    s = socket.socket(_af(family), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
        return "connected"
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return f"errno:{errno.errorcode.get(e.errno or 0, str(e.errno))}"
    finally:
        s.close()


def _udp_send(family: Family, addr: str, port: int) -> str:
    s = socket.socket(_af(family), socket.SOCK_DGRAM)
    try:
        s.sendto(b"botbox-probe", (addr, port))
        return "sent"
    except OSError as e:
        return f"errno:{errno.errorcode.get(e.errno or 0, str(e.errno))}"
    finally:
        s.close()


def _has_route(family: Family) -> bool:
    s = socket.socket(_af(family), socket.SOCK_DGRAM)
    try:
        s.connect((TEST_ADDR[family], 9))
        return True
    except OSError:
        return False
    finally:
        s.close()


@contextlib.contextmanager
def _temporary_routes(families: tuple[Family, ...]) -> Iterator[list[str]]:
    """Give the documentation addresses a route if they have none.

    Uses a temporary veth pair with both ends in this namespace (veth is available wherever pods run;
    the dummy driver often is not), a documentation source address on it and host routes to the test
    addresses; deleting the veth removes all of it.
    """
    notes: list[str] = []
    missing = [f for f in families if not _has_route(f)]
    if not missing:
        yield notes
        return
    from pyroute2 import IPRoute

    ifname = "bbprb" + secrets.token_hex(3)
    with IPRoute() as ipr:
        ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": ifname + "p"})
        try:
            idx = ipr.link_lookup(ifname=ifname)[0]
            for name in (ifname, ifname + "p"):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
            for f in missing:
                if f == "ipv4":
                    ipr.addr("add", index=idx, address="192.0.2.2", prefixlen=32)
                    ipr.route("add", dst="192.0.2.1/32", oif=idx, family=socket.AF_INET)
                else:
                    ipr.addr("add", index=idx, address="2001:db8::2", prefixlen=128, flags=0x02)  # nodad
                    ipr.route("add", dst="2001:db8::1/128", oif=idx, family=socket.AF_INET6)
            notes.append(f"no route to {', '.join(TEST_ADDR[f] for f in missing)}: "
                         f"temporary interface {ifname} used")
            yield notes
        finally:
            with contextlib.suppress(Exception):
                ipr.link("del", index=ipr.link_lookup(ifname=ifname)[0])


def _listener(family: Family, port: int) -> socket.socket:
    s = socket.socket(_af(family), socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == "ipv6":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((LOOPBACK[family], port))
        s.listen(16)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def _accept_within(lst: socket.socket, timeout: float) -> socket.socket | None:
    ready, _, _ = select.select([lst], [], [], timeout)
    if not ready:
        return None
    conn, _ = lst.accept()
    return conn


def _probe_redirect(family: Family, from_port: int, to_port: int, probe_uid: int,
                    proxy_uid: int) -> list[ProbeResult]:
    out: list[ProbeResult] = []
    addr = TEST_ADDR[family]
    name = f"tcp/{from_port}->{to_port}"
    try:
        lst = _listener(family, to_port)
    except OSError as e:
        hint = {errno.EADDRINUSE: " (is the proxy already running? probe before it starts)",
                errno.EADDRNOTAVAIL: " (no loopback address: is lo up?)"}.get(e.errno or 0, "")
        return [ProbeResult(family, name, False,
                            f"cannot listen on {LOOPBACK[family]} port {to_port}: {e.strerror}{hint}")]
    with lst:
        # Redirected: runs in a child so the parent can accept concurrently.
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                lst.close()
                os.setgroups([])
                os.setgid(probe_uid)
                os.setuid(probe_uid)
                res = _tcp_connect(family, addr, from_port, CONNECT_TIMEOUT)
                os.write(w, res.encode())
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        try:
            conn = _accept_within(lst, CONNECT_TIMEOUT)
            if conn is None:
                out.append(ProbeResult(family, f"{name} as uid {probe_uid}", False,
                                       f"connection to [{addr}]:{from_port} did not reach the listener"))
            else:
                with conn:
                    got = original_dst(conn, family)
                ok = got == (addr, from_port)
                out.append(ProbeResult(family, f"{name} as uid {probe_uid}", ok,
                                       f"SO_ORIGINAL_DST [{got[0]}]:{got[1]}"
                                       + ("" if ok else f", expected [{addr}]:{from_port}")))
        finally:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
        # Exempt: the proxy uid's connection must go out unchanged, never to the listener.
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                lst.close()
                os.setgroups([])
                os.setgid(proxy_uid)
                os.setuid(proxy_uid)
                _tcp_connect(family, addr, from_port, EXEMPT_WAIT + 0.5)
            finally:
                os._exit(0)
        os.close(w)
        try:
            conn = _accept_within(lst, EXEMPT_WAIT)
            if conn is None:
                out.append(ProbeResult(family, f"{name} as proxy uid {proxy_uid}", True, "not redirected"))
            else:
                conn.close()
                out.append(ProbeResult(family, f"{name} as proxy uid {proxy_uid}", False,
                                       "proxy uid was redirected to the listener (owner exemption broken)"))
        finally:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
    return out


def run_probe(plan: Plan, probe_uid: int | None = None) -> list[ProbeResult]:
    """Run every probe check; an error while probing is a failed check, never a pass."""
    try:
        return _run_probe(plan, probe_uid)
    except Exception as e:
        return [ProbeResult("-", "probe", False, f"probe could not run: {type(e).__name__}: {e}")]


def _run_probe(plan: Plan, probe_uid: int | None = None) -> list[ProbeResult]:
    s = plan.settings
    uid = probe_uid if probe_uid is not None else default_probe_uid(s.uid)
    if uid == s.uid:
        return [ProbeResult("-", "setup", False, f"probe uid {uid} equals BOTBOX_UID")]
    families = tuple(fp.family for fp in plan.families)
    results: list[ProbeResult] = []
    redirects = [(s.redirect_from_port, s.proxy_port)]
    if s.https_interception:
        redirects.append((443, s.https_interception_port))
    redirected_ports = {p for p, _ in redirects}
    other_port = next(p for p in (443, 22, 25, 8) if p not in redirected_ports and p != 53)
    with _temporary_routes(families) as notes:
        results.extend(ProbeResult("-", "setup", True, n) for n in notes)
        for fam in families:
            for from_port, to_port in redirects:
                results.extend(_probe_redirect(fam, from_port, to_port, uid, s.uid))
            addr = TEST_ADDR[fam]
            res = as_uid(uid, lambda fam=fam, addr=addr: _udp_send(fam, addr, 443))  # type: ignore[misc]
            results.append(ProbeResult(fam, f"udp/443 as uid {uid}", res == "errno:EPERM",
                                       "blocked (EPERM)" if res == "errno:EPERM" else f"NOT blocked: {res}"))
            t0 = time.monotonic()
            res = as_uid(uid, lambda fam=fam, addr=addr: _tcp_connect(  # type: ignore[misc]
                fam, addr, other_port, CONNECT_TIMEOUT))
            ok = res in ("errno:ECONNREFUSED", "errno:EPERM")
            results.append(ProbeResult(fam, f"tcp/{other_port} as uid {uid}", ok,
                                       f"refused ({res[6:]}, {time.monotonic() - t0:.2f}s)" if ok
                                       else f"NOT refused: {res}"))
    return results
