"""Network-namespace helpers (pyroute2) for tests, the integration world and the demo.

Nothing here is used by ``netsetup apply`` itself (in a pod the namespace already exists); these helpers
build *throwaway* namespaces so rules can be exercised for real without touching the host namespace.

Typical use::

    from netsetup import netns

    with netns.namespace(prefix="bbt") as pod, netns.namespace(prefix="bbi") as inet:
        netns.connect(pod.name, inet.name,
                      a_v4="10.203.10.2/24", b_v4="10.203.10.1/24",
                      a_v6="fd00:203:10::2/64", b_v6="fd00:203:10::1/64")
        netns.add_default_route(pod.name, "10.203.10.1")
        netns.add_default_route(pod.name, "fd00:203:10::1")
        out = pod.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
        addr = pod.call(lambda: socket.gethostname())   # any picklable result

Rules of the road:

* Every name carries a per-run random suffix (:func:`unique_name`) so parallel runs never collide;
  names are at most 15 characters (the kernel's ``IFNAMSIZ`` limit applies to veth names, and keeping
  namespace names short keeps them readable in ``ip netns list``).
* :func:`namespace` is a context manager that always deletes the namespace (and kills processes we
  started in it through :meth:`Namespace.popen`) on exit, even when the body raises.  Deleting a
  namespace also deletes every veth end inside it, which removes the peer in the other namespace.
* IPv6 addresses are added with ``IFA_F_NODAD`` so they are usable immediately (no 1-2 s of
  duplicate-address detection in ``tentative`` state).
* :func:`call_in_netns` runs a Python callable in a *forked* child that ``setns()``-es into the
  namespace; the parent's namespace is never changed.  The result (or exception) travels back pickled.
  Join cgroups or open pinned BPF objects *before* entering the namespace when that matters: ``ip
  netns exec`` remounts ``/sys`` (so ``/sys/fs/cgroup`` and ``/sys/fs/bpf`` look different inside);
  :func:`call_in_netns` does not remount anything.
* Subprocesses run through ``ip netns exec NAME ...`` (:func:`run_in_netns`, :func:`popen_in_netns`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import pickle
import secrets
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as _pr_netns

__all__ = [
    "NETNS_RUN_DIR",
    "Namespace",
    "NetnsCallError",
    "add_address",
    "add_default_route",
    "add_route",
    "call_in_netns",
    "connect",
    "create_netns",
    "create_veth",
    "destroy_netns",
    "exists",
    "ipv6_enabled",
    "link_up",
    "namespace",
    "popen_in_netns",
    "run_in_netns",
    "set_ipv6_enabled",
    "unique_name",
]

T = TypeVar("T")

NETNS_RUN_DIR = Path("/var/run/netns")
IFNAMSIZ_MAX = 15
_IFA_F_NODAD = 0x02


class NetnsCallError(RuntimeError):
    """A callable run by :func:`call_in_netns` raised, died, or returned something unpicklable.

    ``remote_type`` is the exception class name raised in the child (``""`` if the child died), and
    ``remote_traceback`` the child's formatted traceback, for debugging.
    """

    def __init__(self, message: str, remote_type: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


def unique_name(prefix: str = "bb") -> str:
    """Return ``prefix`` + 6 random hex characters, at most 15 characters in total.

    Usable both as a namespace name and as an interface name.
    """
    if not prefix or len(prefix) > IFNAMSIZ_MAX - 6 or not prefix.replace("-", "").isalnum():
        raise ValueError(f"bad name prefix {prefix!r} (1..9 alphanumerics or '-')")
    return prefix + secrets.token_hex(3)


def exists(name: str) -> bool:
    """True if a named namespace ``/var/run/netns/NAME`` exists."""
    return (NETNS_RUN_DIR / name).exists()


def create_netns(name: str, *, lo_up: bool = True) -> None:
    """Create the named namespace (fails with ``FileExistsError`` if it exists) and bring ``lo`` up."""
    if exists(name):
        raise FileExistsError(errno.EEXIST, "network namespace exists", name)
    _pr_netns.create(name)
    if lo_up:
        try:
            link_up(name, "lo")
        except BaseException:
            destroy_netns(name)
            raise


def _pids_in_netns(name: str) -> list[int]:
    path = NETNS_RUN_DIR / name
    try:
        st = path.stat()
    except FileNotFoundError:
        return []
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry))
    return pids


def destroy_netns(name: str, *, kill_processes: bool = True) -> None:
    """Delete the named namespace; missing is not an error.

    With ``kill_processes`` (default) every process still living in the namespace is SIGKILLed first,
    otherwise the namespace (and its veths) would outlive the name.
    """
    if kill_processes:
        me = os.getpid()
        for pid in _pids_in_netns(name):
            if pid != me:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    if not exists(name):
        return
    with contextlib.suppress(FileNotFoundError):
        _pr_netns.remove(name)


@contextlib.contextmanager
def _ipr(ns: str | None) -> Iterator[Any]:
    ipr = IPRoute(netns=ns) if ns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _ifindex(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no interface {ifname!r}")
    return int(found[0])


def link_up(ns: str | None, ifname: str) -> None:
    """Set ``ifname`` up in namespace ``ns`` (``None`` = the caller's namespace)."""
    with _ipr(ns) as ipr:
        ipr.link("set", index=_ifindex(ipr, ifname), state="up")


def create_veth(ifname: str, peer_ifname: str, peer_ns: str, *, ns: str | None = None,
                up: bool = True) -> None:
    """Create veth pair ``ifname``/``peer_ifname``; move ``peer_ifname`` into ``peer_ns``.

    ``ifname`` stays in ``ns`` (``None`` = the caller's namespace; tests should always pass a
    namespace of their own, never leave a veth end in the host namespace).  With ``up`` both ends
    are brought up.
    """
    for n in (ifname, peer_ifname):
        if not n or len(n) > IFNAMSIZ_MAX:
            raise ValueError(f"interface name {n!r} must be 1..15 characters")
    with _ipr(ns) as ipr:
        ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": peer_ifname})
        try:
            peer_idx = _ifindex(ipr, peer_ifname)
            fd = os.open(str(NETNS_RUN_DIR / peer_ns), os.O_RDONLY)
            try:
                ipr.link("set", index=peer_idx, net_ns_fd=fd)
            finally:
                os.close(fd)
            if up:
                ipr.link("set", index=_ifindex(ipr, ifname), state="up")
        except BaseException:
            with contextlib.suppress(Exception):
                ipr.link("del", index=_ifindex(ipr, ifname))
            raise
    if up:
        link_up(peer_ns, peer_ifname)


def add_address(ns: str | None, ifname: str, cidr: str) -> None:
    """Add ``cidr`` (``"10.203.10.2/24"`` or ``"fd00:203:10::2/64"``) to ``ifname``.

    IPv6 addresses get ``nodad`` so they are usable at once.
    """
    iface = ipaddress.ip_interface(cidr)
    kwargs: dict[str, Any] = {
        "address": str(iface.ip),
        "prefixlen": iface.network.prefixlen,
    }
    if iface.version == 6:
        kwargs["flags"] = _IFA_F_NODAD
    with _ipr(ns) as ipr:
        ipr.addr("add", index=_ifindex(ipr, ifname), **kwargs)


def add_route(ns: str | None, dst: str, gateway: str | None = None, ifname: str | None = None) -> None:
    """Add a route to ``dst`` (CIDR or ``"default"``) via ``gateway`` and/or out of ``ifname``.

    For ``"default"`` the family is taken from ``gateway`` (``ifname`` alone means IPv4).
    """
    if gateway is None and ifname is None:
        raise ValueError("need a gateway or an interface")
    with _ipr(ns) as ipr:
        kwargs: dict[str, Any] = {}
        if dst == "default":
            family = ipaddress.ip_address(gateway).version if gateway else 4
            kwargs["dst"] = "0.0.0.0/0" if family == 4 else "::/0"
        else:
            kwargs["dst"] = str(ipaddress.ip_network(dst, strict=False))
            family = ipaddress.ip_network(dst, strict=False).version
        kwargs["family"] = 2 if family == 4 else 10
        if gateway is not None:
            kwargs["gateway"] = gateway
        if ifname is not None:
            kwargs["oif"] = _ifindex(ipr, ifname)
        ipr.route("add", **kwargs)


def add_default_route(ns: str | None, gateway: str, ifname: str | None = None) -> None:
    """Add a default route via ``gateway`` (IPv4 or IPv6, taken from the address)."""
    add_route(ns, "default", gateway=gateway, ifname=ifname)


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _read_sysctl(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def set_ipv6_enabled(ns: str, enabled: bool) -> None:
    """Set ``net.ipv6.conf.{all,default}.disable_ipv6`` inside ``ns`` (and on ``lo``).

    ``/proc/sys/net`` shows the sysctls of the namespace of the task that opens the file, so the write
    happens in a forked child inside the namespace.
    """
    value = "0" if enabled else "1"

    def _set() -> None:
        for key in ("all", "default", "lo"):
            p = f"/proc/sys/net/ipv6/conf/{key}/disable_ipv6"
            if os.path.exists(p):
                _write_sysctl(p, value)

    call_in_netns(ns, _set)


def ipv6_enabled(ns: str) -> bool:
    """True if IPv6 is enabled in ``ns`` (``net.ipv6.conf.all.disable_ipv6 == 0``)."""

    def _get() -> bool:
        p = "/proc/sys/net/ipv6/conf/all/disable_ipv6"
        return os.path.exists(p) and _read_sysctl(p) == "0"

    return call_in_netns(ns, _get)


_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    """``setns(fd, CLONE_NEWNET)`` (``os.setns`` only exists from Python 3.12)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def call_in_netns(ns: str, fn: Callable[..., T], *args: Any, timeout: float | None = 60.0,
                  **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in a forked child that joined namespace ``ns``; return its result.

    The child may change its uid, bind sockets, etc. — nothing leaks into the caller.  The result must
    be picklable.  An exception in the child is re-raised as :class:`NetnsCallError` (with the child's
    exception type name and traceback); if the child does not finish within ``timeout`` seconds it is
    killed and ``TimeoutError`` is raised.  The child exits with ``os._exit`` and never runs the parent's
    cleanup handlers (atexit, pytest finalizers).
    """
    path = str(NETNS_RUN_DIR / ns)
    nsfd = os.open(path, os.O_RDONLY)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.close(r)
                _setns(nsfd)
                try:
                    payload = pickle.dumps(("ok", fn(*args, **kwargs)))
                except BaseException as exc:
                    payload = pickle.dumps(("err", type(exc).__name__, str(exc), traceback.format_exc()))
                view = memoryview(payload)
                while view:
                    n = os.write(w, view)
                    view = view[n:]
            except BaseException:
                code = 1
                with contextlib.suppress(BaseException):
                    os.write(2, traceback.format_exc().encode())
            finally:
                os._exit(code)
    finally:
        os.close(nsfd)
    os.close(w)
    try:
        data = _wait_read(r, pid, timeout)
    finally:
        os.close(r)
    if not data:
        raise NetnsCallError(f"child in netns {ns} died without a result")
    result = pickle.loads(data)  # noqa: S301 - our own forked child wrote it
    if result[0] == "ok":
        return result[1]  # type: ignore[no-any-return]
    raise NetnsCallError(f"{result[1]}: {result[2]}", result[1], result[3])


def _wait_read(r: int, pid: int, timeout: float | None) -> bytes:
    import select
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    chunks: list[bytes] = []
    timed_out = False
    try:
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([r], [], [], remaining)
            if not ready:
                timed_out = True
                break
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
    finally:
        if timed_out or sys.exc_info()[0] is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if timed_out:
        raise TimeoutError(f"child {pid} did not finish within {timeout}s")
    return b"".join(chunks)


def run_in_netns(ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(["ip", "netns", "exec", ns, *argv], **kwargs)`` (remounts ``/sys``)."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=kwargs.pop("check", False), **kwargs)


def popen_in_netns(ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)``; caller must reap it."""
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)


@dataclass
class Namespace:
    """Handle on a namespace created by :func:`namespace`; methods are thin wrappers bound to it."""

    name: str
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        return run_in_netns(self.name, argv, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in the namespace; it is killed when the namespace context exits."""
        p = popen_in_netns(self.name, argv, **kwargs)
        self._procs.append(p)
        return p

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = 60.0, **kwargs: Any) -> T:
        return call_in_netns(self.name, fn, *args, timeout=timeout, **kwargs)

    def add_address(self, ifname: str, cidr: str) -> None:
        add_address(self.name, ifname, cidr)

    def add_route(self, dst: str, gateway: str | None = None, ifname: str | None = None) -> None:
        add_route(self.name, dst, gateway, ifname)

    def add_default_route(self, gateway: str, ifname: str | None = None) -> None:
        add_default_route(self.name, gateway, ifname)

    def link_up(self, ifname: str) -> None:
        link_up(self.name, ifname)

    def set_ipv6_enabled(self, enabled: bool) -> None:
        set_ipv6_enabled(self.name, enabled)

    def ipv6_enabled(self) -> bool:
        return ipv6_enabled(self.name)

    def _reap(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
        self._procs.clear()


@contextlib.contextmanager
def namespace(name: str | None = None, *, prefix: str = "bb",
              ipv6: bool | None = None) -> Iterator[Namespace]:
    """Create a namespace (``name`` or :func:`unique_name` of ``prefix``), ``lo`` up; always delete it.

    ``ipv6=True/False`` enables/disables IPv6 in it; ``None`` leaves the kernel default.
    """
    nsname = name or unique_name(prefix)
    create_netns(nsname)
    handle = Namespace(nsname)
    try:
        if ipv6 is not None:
            set_ipv6_enabled(nsname, ipv6)
        yield handle
    finally:
        handle._reap()
        destroy_netns(nsname)


def connect(ns_a: str, ns_b: str, *, a_v4: str | None = None, b_v4: str | None = None,
            a_v6: str | None = None, b_v6: str | None = None,
            a_ifname: str | None = None, b_ifname: str | None = None) -> tuple[str, str]:
    """Link two namespaces with a veth pair, add the given addresses, bring both ends up.

    Returns the interface names ``(in ns_a, in ns_b)``.  Deleting either namespace deletes the pair.
    """
    a_if = a_ifname or unique_name("va")
    b_if = b_ifname or unique_name("vb")
    create_veth(a_if, b_if, ns_b, ns=ns_a)
    for ns, ifn, cidr in ((ns_a, a_if, a_v4), (ns_b, b_if, b_v4), (ns_a, a_if, a_v6), (ns_b, b_if, b_v6)):
        if cidr:
            add_address(ns, ifn, cidr)
    return a_if, b_if
