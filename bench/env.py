"""Machine plumbing for the benchmark: tool installation, a private network namespace, CPU pinning
and /proc accounting (CPU time of process trees, other processes' CPU, RSS).

Everything the benchmark sends stays on the loopback interface of a network namespace this module
creates (and deletes again); the host namespace is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import resource
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

APT_TOOLS = {"nginx": "nginx-light", "haproxy": "haproxy", "squid": "squid-openssl", "wrk": "wrk"}
BENCH_VENV = Path(os.environ.get("BOTBOX_BENCH_VENV", "/opt/botbox/bench-venv"))
BENCH_PIP = ["mitmproxy", "py-spy"]
PROJECT_PY = Path(sys.executable)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

CPU_PEER = 1  # the contender runs here
CPU_LOAD = 0  # wrk, origin and helper clients run here


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- install


def ensure_tools() -> None:
    """Install nginx, HAProxy, Squid (OpenSSL build), wrk from Debian and mitmproxy + py-spy into a
    separate venv (never into the project's)."""
    missing = [pkg for tool, pkg in APT_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        log(f"installing Debian packages: {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        # Debian starts daemons on install unless policy-rc.d says no; the benchmark starts its own
        # instances with private configs and must not leave system services listening.
        policy = Path("/usr/sbin/policy-rc.d")
        created = False
        if not policy.exists():
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            created = True
        try:
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
            subprocess.run(
                [
                    "apt-get",
                    "-o",
                    "DPkg::Lock::Timeout=600",
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    *missing,
                ],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )
        finally:
            if created:
                policy.unlink()
    if not (BENCH_VENV / "bin" / "mitmdump").exists() or not (BENCH_VENV / "bin" / "py-spy").exists():
        log(f"installing {' '.join(BENCH_PIP)} into {BENCH_VENV}")
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", *BENCH_PIP], check=True)


def tool_versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "unavailable"
        out = (p.stdout + p.stderr).strip().splitlines()
        return out[0] if out else "unknown"

    return {
        "nginx": first_line(["nginx", "-v"]).replace("nginx version: ", ""),
        "haproxy": first_line(["haproxy", "-v"]).split(" - ")[0],
        "squid": first_line(["squid", "-v"]),
        "mitmproxy": first_line([str(BENCH_VENV / "bin" / "mitmdump"), "--version"]),
        "wrk": first_line(["wrk", "-v"]).split(" Copyright")[0],
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def machine_line() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return (
        f"{os.cpu_count()} vCPU {model}, {mem_kib // 1024 // 1024} GiB RAM, "
        f"Linux {platform.release()}, {platform.freedesktop_os_release().get('PRETTY_NAME', '?')}"
    )


# ---------------------------------------------------------------------------------------------- netns

_CLONE_NEWNET = 0x40000000


class PrivateNetns:
    """A fresh network namespace holding only `lo`; the calling process moves into it so every child
    inherits it. Deleted on close (processes still inside keep it alive until they exit)."""

    def __init__(self) -> None:
        self.name = f"bbbench-{uuid.uuid4().hex[:8]}"
        self._created = False

    def enter(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self._created = True
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({self.name}): {os.strerror(err)}")
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._created:
            subprocess.run(["ip", "netns", "del", self.name], check=False)
            self._created = False


def raise_nofile(limit: int = 200_000) -> int:
    """Raise RLIMIT_NOFILE towards `limit` (children inherit it); returns the soft limit obtained.
    Without CAP_SYS_RESOURCE only the soft limit can grow, up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(limit, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces/parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def proc_cpu_ticks(pid: int) -> int:
    f = _stat_fields(pid)
    if f is None:
        return 0
    return int(f[11]) + int(f[12])  # utime + stime (fields 14, 15)


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid in all_pids():
        f = _stat_fields(pid)
        if f is not None:
            kids.setdefault(int(f[1]), []).append(pid)
    return kids


def tree(root: int, kids: dict[int, list[int]] | None = None) -> list[int]:
    kids = children_map() if kids is None else kids
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def kernel_threads() -> list[int]:
    return tree(2)[1:]


def cpu_ticks(pids: Iterable[int]) -> int:
    return sum(proc_cpu_ticks(p) for p in pids)


def system_busy_ticks() -> int:
    """user + nice + system over all CPUs (irq/softirq excluded: loopback packet work of our own
    traffic lands there, not in any process)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[1]) + int(fields[2]) + int(fields[3])


def rss_kib(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            statm = Path(f"/proc/{pid}/statm").read_text().split()
        except OSError:
            continue
        total += int(statm[1]) * PAGE_KIB
    return total


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of every process in the tree of `pid`."""
    for p in tree(pid):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            continue
        for t in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(t, cpus)


@dataclass
class CpuSnapshot:
    ours: int
    kthreads: int
    busy: int


class CpuMeter:
    """Measures CPU ticks of a set of process trees and what everything else used meanwhile."""

    def __init__(self, our_roots: Iterable[int], include_self: bool = True) -> None:
        self.roots = list(our_roots)
        self.include_self = include_self

    def _pids(self) -> list[int]:
        kids = children_map()
        pids: set[int] = {os.getpid()} if self.include_self else set()
        for r in self.roots:
            pids.update(tree(r, kids))
        return sorted(pids)

    def snapshot(self) -> tuple[CpuSnapshot, list[int]]:
        pids = self._pids()
        kth = kernel_threads()
        # reaped children of this process (wrk, helper clients) are charged to our cutime/cstime
        own = _stat_fields(os.getpid()) if self.include_self else None
        reaped = int(own[13]) + int(own[14]) if own else 0
        return CpuSnapshot(cpu_ticks(pids) + reaped, cpu_ticks(kth), system_busy_ticks()), pids

    @staticmethod
    def other_ticks(a: CpuSnapshot, b: CpuSnapshot) -> int:
        return max(0, (b.busy - a.busy) - (b.ours - a.ours) - (b.kthreads - a.kthreads))
