"""Summarise a py-spy `--format raw` (collapsed stacks) profile of BotBox.

    python -m bench.profile bench/out/<stamp>/botbox-profile.txt [--us-per-req 1600] [--top 30]

Prints the functions with the most self samples and the most inclusive samples (a function counted
once per stack), as % of all samples and, given the measured CPU µs/request, as µs/request.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# a sample whose stack contains one of these is a thread waiting, not burning CPU (py-spy --native
# does not always tell idle threads apart)
IDLE = (
    "Condition.wait",
    "Queue.get",
    "_rust_notify",
    "epoll_wait",
    "epoll_pwait",
    "clock_nanosleep",
    "take_gil",
    "select.select",
    "sem_wait",
)
_LINE = re.compile(r"\s*\(([^()]*?)(?::\d+)?\)$")


def _frame(raw: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)'; native frames keep their library."""
    m = _LINE.search(raw)
    if not m:
        return raw.strip()
    where = m.group(1)
    short = "/".join(where.split("/")[-2:])
    return f"{raw[: m.start()].strip()} ({short})"


def load(path: Path) -> tuple[Counter[str], Counter[str], Counter[str], int, int]:
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        if any(m in stack for m in IDLE):
            idle += k
            continue
        frames = [_frame(f) for f in stack.split(";")]
        total += k
        self_c[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
        # attribute the sample to the innermost Python-level project/library module
        for f in reversed(frames):
            if ".py)" in f:
                mod = f.rsplit("(", 1)[1].rstrip(")")
                modules[mod] += k
                break
        else:
            modules["<native only>"] += k
    return self_c, incl, modules, total, idle


def report(path: Path, us_per_req: float | None, top: int) -> str:
    self_c, incl, modules, total, idle = load(path)
    out = [f"{total} busy samples ({idle} idle/waiting samples dropped) from {path.name}"]

    def row(name: str, n: int) -> str:
        pct = 100.0 * n / total
        us = f"{pct / 100 * us_per_req:8.1f} µs/req" if us_per_req else ""
        return f"{pct:6.1f}%  {us}  {name}"

    out.append("\n## self (innermost frame)")
    out += [row(k, v) for k, v in self_c.most_common(top)]
    out.append("\n## inclusive")
    out += [row(k, v) for k, v in incl.most_common(top)]
    out.append("\n## innermost Python file")
    out += [row(k, v) for k, v in modules.most_common(top)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile", type=Path)
    ap.add_argument("--us-per-req", type=float)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    print(report(a.profile, a.us_per_req, a.top))


if __name__ == "__main__":
    main()
