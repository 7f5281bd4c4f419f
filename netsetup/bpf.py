"""eBPF awareness (SECURITY-SPEC N7): programs attached to our cgroup on sock_addr/getsockopt hooks.

cgroup BPF programs of these types run *before* netfilter sees a packet (``connect4/6``, ``sendmsg4/6``
can rewrite the destination) or can fake what a socket option returns (``getsockopt`` can fake
``SO_ORIGINAL_DST``).  A mesh or CNI that uses them (e.g. Cilium's socket-LB) can silently bypass or
confuse the redirect, so ``verify`` lists them and ``verify --strict`` fails on them.

The query uses the ``bpf()`` syscall directly through ctypes (no bpftool needed):
``BPF_PROG_QUERY`` with ``BPF_F_QUERY_EFFECTIVE`` on the cgroup v2 directory of the current process, so
programs inherited from ancestor cgroups are included; names come from ``BPF_OBJ_GET_INFO_BY_FD``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass
from pathlib import Path

BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_F_QUERY_EFFECTIVE = 1

#: attach type name -> enum bpf_attach_type
WATCHED_ATTACH_TYPES: dict[str, int] = {
    "connect4": 10,  # BPF_CGROUP_INET4_CONNECT
    "connect6": 11,  # BPF_CGROUP_INET6_CONNECT
    "sendmsg4": 14,  # BPF_CGROUP_UDP4_SENDMSG
    "sendmsg6": 15,  # BPF_CGROUP_UDP6_SENDMSG
    "getsockopt": 21,  # BPF_CGROUP_GETSOCKOPT
}

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}


class BpfQueryError(OSError):
    pass


@dataclass(frozen=True)
class AttachedProgram:
    attach_type: str
    prog_id: int
    name: str

    def line(self) -> str:
        return f"bpf cgroup {self.attach_type}: prog id {self.prog_id} name {self.name or '?'}"


def _syscall_nr() -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise BpfQueryError(errno.ENOSYS, f"bpf() syscall number unknown on {platform.machine()}")
    return nr


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    res = int(libc.syscall(ctypes.c_long(_syscall_nr()), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr))))
    if res < 0:
        err = ctypes.get_errno()
        raise BpfQueryError(err, os.strerror(err))
    return res


def cgroup2_mount() -> Path | None:
    """Mount point of the cgroup v2 hierarchy (``/sys/fs/cgroup`` or ``/sys/fs/cgroup/unified``)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return Path(left.split()[4])
    except OSError:
        return None
    return None


def current_cgroup_dir(pid: int | str = "self") -> Path | None:
    mnt = cgroup2_mount()
    if mnt is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return mnt / line[3:].lstrip("/")
    except OSError:
        return None
    return None


def query_cgroup(cgroup_dir: Path, attach_type: int) -> list[int]:
    """Effective program ids attached to ``cgroup_dir`` for ``attach_type``."""
    fd = os.open(str(cgroup_dir), os.O_RDONLY | os.O_DIRECTORY)
    try:
        cap = 64
        while True:
            ids = (ctypes.c_uint32 * cap)()
            attr = ctypes.create_string_buffer(40)
            ctypes.memmove(ctypes.byref(attr, 0), ctypes.byref(ctypes.c_uint32(fd)), 4)
            ctypes.memmove(ctypes.byref(attr, 4), ctypes.byref(ctypes.c_uint32(attach_type)), 4)
            ctypes.memmove(ctypes.byref(attr, 8), ctypes.byref(ctypes.c_uint32(BPF_F_QUERY_EFFECTIVE)), 4)
            ctypes.memmove(ctypes.byref(attr, 16), ctypes.byref(ctypes.c_uint64(ctypes.addressof(ids))), 8)
            ctypes.memmove(ctypes.byref(attr, 24), ctypes.byref(ctypes.c_uint32(cap)), 4)
            try:
                _bpf(BPF_PROG_QUERY, attr)
            except BpfQueryError as e:
                if e.errno == errno.ENOSPC:
                    cap *= 4
                    continue
                raise
            count = ctypes.c_uint32.from_buffer_copy(attr.raw[24:28]).value
            return [int(ids[i]) for i in range(min(count, cap))]
    finally:
        os.close(fd)


def prog_name(prog_id: int) -> str:
    attr = ctypes.create_string_buffer(12)
    ctypes.memmove(ctypes.byref(attr, 0), ctypes.byref(ctypes.c_uint32(prog_id)), 4)
    try:
        pfd = _bpf(BPF_PROG_GET_FD_BY_ID, attr)
    except BpfQueryError:
        return ""
    try:
        info = ctypes.create_string_buffer(256)
        a = ctypes.create_string_buffer(16)
        ctypes.memmove(ctypes.byref(a, 0), ctypes.byref(ctypes.c_uint32(pfd)), 4)
        ctypes.memmove(ctypes.byref(a, 4), ctypes.byref(ctypes.c_uint32(len(info))), 4)
        ctypes.memmove(ctypes.byref(a, 8), ctypes.byref(ctypes.c_uint64(ctypes.addressof(info))), 8)
        _bpf(BPF_OBJ_GET_INFO_BY_FD, a)
        return info.raw[64:80].split(b"\0", 1)[0].decode("ascii", "replace")
    except BpfQueryError:
        return ""
    finally:
        os.close(pfd)


def attached_programs(cgroup_dir: Path | None = None) -> list[AttachedProgram]:
    """Programs on the watched hooks effective for ``cgroup_dir`` (default: our own cgroup).

    When no cgroup v2 hierarchy is mounted in our mount namespace (``ip netns exec`` remounts ``/sys``),
    a forked child mounts one privately (its own mount namespace, gone when it exits) to query.
    Raises :class:`BpfQueryError` when the query itself is impossible (no cgroup v2, no permission).
    """
    cg = cgroup_dir or current_cgroup_dir()
    if cg is None:
        return _query_in_private_mount()
    return _query(cg)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _query_in_private_mount() -> list[AttachedProgram]:
    import json
    import select
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="botbox-cg2-")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: private mount namespace, mount cgroup2, query, report as JSON
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            _check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
            _check(libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None), "mount --make-rprivate /")
            _check(libc.mount(b"cgroup2", tmp.encode(), b"cgroup2", 0, None), "mount -t cgroup2")
            rel = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
                       if line.startswith("0::"))
            progs = _query(Path(tmp) / rel.lstrip("/"))
            payload = json.dumps({"ok": [[p.attach_type, p.prog_id, p.name] for p in progs]})
        except BaseException as e:
            payload = json.dumps({"err": [getattr(e, "errno", None) or errno.EIO, str(e)]})
        try:
            os.write(w, payload.encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        data = os.read(r, 1 << 20) if ready else b""
    finally:
        os.close(r)
        os.waitpid(pid, 0)
        shutil.rmtree(tmp, ignore_errors=True)
    if not data:
        raise BpfQueryError(errno.EIO, "cgroup BPF query child failed")
    res = json.loads(data)
    if "err" in res:
        raise BpfQueryError(res["err"][0], f"no cgroup v2 hierarchy mounted and mounting one failed: "
                                           f"{res['err'][1]}")
    return [AttachedProgram(a, int(i), n) for a, i, n in res["ok"]]


def _query(cg: Path) -> list[AttachedProgram]:
    out: list[AttachedProgram] = []
    for name, at in WATCHED_ATTACH_TYPES.items():
        try:
            ids = query_cgroup(cg, at)
        except BpfQueryError as e:
            if e.errno == errno.EINVAL:  # attach type unknown to this kernel: nothing can be attached
                continue
            raise
        out.extend(AttachedProgram(name, i, prog_name(i)) for i in ids)
    return out
