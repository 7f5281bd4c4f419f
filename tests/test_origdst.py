"""SO_ORIGINAL_DST for IPv4 and IPv6, for real: a network namespace with iptables REDIRECT rules."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from botbox.origdst import format_addr, original_dst, parse_sockaddr_in, parse_sockaddr_in6

REPO = Path(__file__).resolve().parents[1]

# Runs inside the namespace: listeners on 127.0.0.1/::1, connects to the redirected test addresses
# and to the listener directly, prints what original_dst() returned for each accepted connection.
PROBE = r"""
import json, socket, sys
from botbox.origdst import original_dst
port = int(sys.argv[1])
out = {}
for fam, listen, targets in (
    (socket.AF_INET, "127.0.0.1", [("redirected", "10.203.30.2", 80), ("direct", "127.0.0.1", port)]),
    (socket.AF_INET6, "::1", [("redirected", "fd00:203:30::2", 80), ("direct", "::1", port)]),
):
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((listen, port)); srv.listen(4); srv.settimeout(5)
    for name, host, dport in targets:
        c = socket.create_connection((host, dport), timeout=5)
        a, _ = srv.accept()
        out[f"{fam.name}-{name}"] = original_dst(a)
        a.close(); c.close()
    srv.close()
print(json.dumps(out))
"""


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and iptables")
@pytest.mark.skipif(
    shutil.which("ip") is None or shutil.which("iptables") is None, reason="iproute2/iptables missing"
)
def test_original_dst_v4_and_v6_in_namespace() -> None:
    ns = f"bbod-{uuid.uuid4().hex[:8]}"
    port = 18080
    _run("ip", "netns", "add", ns)
    try:
        ex = ("ip", "netns", "exec", ns)
        _run(*ex, "ip", "link", "set", "lo", "up")
        # A veth pair with both ends inside the namespace gives the test addresses a route.
        _run(*ex, "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        _run(*ex, "ip", "link", "set", "d0", "up")
        _run(*ex, "ip", "link", "set", "d1", "up")
        _run(*ex, "ip", "addr", "add", "10.203.30.1/24", "dev", "d0")
        _run(*ex, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0")
        _run(*ex, "ip", "-6", "addr", "add", "fd00:203:30::1/64", "dev", "d0", "nodad")
        _run(*ex, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.203.30.2", "--dport", "80",
             "-j", "REDIRECT", "--to-ports", str(port))
        _run(*ex, "ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "fd00:203:30::2",
             "--dport", "80", "-j", "REDIRECT", "--to-ports", str(port))
        out = subprocess.run(
            [*ex, sys.executable, "-c", PROBE, str(port)], capture_output=True, text=True, timeout=30,
            env={**os.environ, "PYTHONPATH": str(REPO)}, check=False,
        )
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)
    assert got["AF_INET-redirected"] == ["10.203.30.2", 80]
    assert got["AF_INET6-redirected"] == ["fd00:203:30::2", 80]
    # Tracked but not NATed (or not tracked at all): not redirected.
    assert got["AF_INET-direct"] is None
    assert got["AF_INET6-direct"] is None


def test_parse_sockaddrs() -> None:
    raw4 = (struct.pack("=H", socket.AF_INET) + struct.pack("!H", 443)
            + socket.inet_pton(socket.AF_INET, "192.0.2.7"))
    assert parse_sockaddr_in(raw4 + b"\0" * 8) == ("192.0.2.7", 443)
    raw6 = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 80) + b"\0" * 4
            + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + b"\0" * 4)
    assert parse_sockaddr_in6(raw6) == ("2001:db8::1", 80)
    with pytest.raises(ValueError):
        parse_sockaddr_in(raw6)
    with pytest.raises(ValueError):
        parse_sockaddr_in6(raw4 + b"\0" * 8)
    assert format_addr(("2001:db8::1", 80)) == "[2001:db8::1]:80"
    assert format_addr(None) is None


def test_unredirected_loopback_connection_is_none() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        with socket.create_connection(srv.getsockname()) as c:
            a, _ = srv.accept()
            with a:
                assert original_dst(a) is None
            c.close()
