"""``verify``: read back + compare (N6), optional live probe (N6), eBPF report (N7)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from netsetup import bpf
from netsetup.backends import Backend
from netsetup.plan import Plan
from netsetup.probe import run_probe


@dataclass
class VerifyReport:
    lines: list[str] = field(default_factory=list)
    failures: int = 0

    @property
    def ok(self) -> bool:
        return self.failures == 0


def verify(backend: Backend, plan: Plan, *, probe: bool = False, strict: bool = False,
           probe_uid: int | None = None, emit: Callable[[str], None] | None = None) -> VerifyReport:
    rep = VerifyReport()

    def out(line: str, failed: bool = False) -> None:
        rep.lines.append(line)
        if failed:
            rep.failures += 1
        if emit is not None:
            emit(line)

    for c in backend.read_back(plan):
        out(c.line(), not c.ok)
    try:
        progs = bpf.attached_programs()
    except OSError as e:
        suffix = " -- failing because of --strict" if strict else ""
        out(f"bpf: cannot query cgroup programs ({e}){suffix}", strict)
    else:
        if not progs:
            out("bpf: no connect4/6, sendmsg4/6 or getsockopt programs attached to this cgroup: ok")
        for p in progs:
            out(p.line() + (": FAILED (--strict)" if strict else
                            ": WARNING (can rewrite destinations or fake SO_ORIGINAL_DST before netfilter)"),
                strict)
    if probe:
        for r in run_probe(plan, probe_uid):
            out(r.line(), not r.ok)
    out(f"verify: {'ok' if rep.ok else f'FAILED ({rep.failures} problem(s))'}")
    return rep
