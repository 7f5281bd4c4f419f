"""wrk driver: one run = one contender at one concurrency, with CPU accounting around it."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.env import CLK_TCK, CPU_LOAD, CpuMeter, log

LUA = r"""
local hdrs = {}
function init(args)
  for i = 1, #args, 2 do hdrs[args[i]] = args[i + 1] end
  for k, v in pairs(hdrs) do wrk.headers[k] = v end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


@dataclass
class RunResult:
    contender: str
    conc: int
    layout: str  # "split" (contender CPU1, load CPU0) or "onecore"
    round: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float | None  # contender process tree utime+stime / requests
    peer_cpu_pct: float  # contender CPU as % of one core
    other_cpu_pct: float  # everything not ours, % of one core
    retries: int = 0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class RedoBudget:
    """Seconds the whole benchmark may spend redoing disturbed runs (the machine is shared)."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds
        self.redone = 0

    def take(self, seconds: float) -> bool:
        if self.left < seconds:
            return False
        self.left -= seconds
        self.redone += 1
        return True

    def wait_quiet(self, roots: list[int], max_other_pct: float, max_wait: float = 5.0) -> None:
        t_end = time.monotonic() + min(max_wait, max(0.0, self.left))
        while time.monotonic() < t_end:
            meter = CpuMeter(roots)
            a, _ = meter.snapshot()
            t0 = time.monotonic()
            time.sleep(0.5)
            b, _ = meter.snapshot()
            spent = time.monotonic() - t0
            self.left -= spent
            if 100.0 * CpuMeter.other_ticks(a, b) / CLK_TCK / spent <= max_other_pct:
                return


def write_lua(work: Path) -> Path:
    p = work / "report.lua"
    p.write_text(LUA)
    return p


def run_wrk(
    url: str, conc: int, duration: float, lua: Path, headers: dict[str, str], *, timeout_s: int = 10
) -> dict[str, float]:
    threads = 1
    argv = [
        "taskset",
        "-c",
        str(CPU_LOAD),
        "wrk",
        f"-t{threads}",
        f"-c{conc}",
        f"-d{duration:g}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(lua),
        url,
        "--",
    ]
    for k, v in headers.items():
        argv += [k, v]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            data: dict[str, float] = json.loads(line)
            return data
    raise RuntimeError(f"wrk produced no report (rc={p.returncode}): {p.stdout[-500:]} {p.stderr[-500:]}")


def measured_run(
    *,
    name: str,
    url: str,
    conc: int,
    duration: float,
    lua: Path,
    headers: dict[str, str],
    peer_root: int | None,
    other_roots: list[int],
    layout: str,
    rnd: int,
    max_other_pct: float,
    max_retries: int,
    budget: RedoBudget,
) -> RunResult:
    """Run wrk once, redoing up to `max_retries` times (while the shared redo budget lasts) when other
    processes used more than `max_other_pct` % of a core meanwhile; before a redo, wait up to a few
    seconds for a quiet moment. The least disturbed attempt is kept."""
    best: RunResult | None = None
    for attempt in range(max_retries + 1):
        if attempt:
            budget.wait_quiet(other_roots + ([peer_root] if peer_root is not None else []), max_other_pct)
        roots = [*other_roots] + ([peer_root] if peer_root is not None else [])
        meter = CpuMeter(roots)
        peer_meter = CpuMeter([peer_root], include_self=False) if peer_root is not None else None
        a, _ = meter.snapshot()
        pa = peer_meter.snapshot()[0].ours if peer_meter else 0
        t0 = time.monotonic()
        rep = run_wrk(url, conc, duration, lua, headers)
        wall = time.monotonic() - t0
        pb = peer_meter.snapshot()[0].ours if peer_meter else 0
        b, _ = meter.snapshot()
        peer_ticks = pb - pa
        other = CpuMeter.other_ticks(a, b)
        reqs = int(rep["requests"])
        errors = int(rep["connect"] + rep["read"] + rep["write"] + rep["status"] + rep["timeout"])
        dur_s = rep["duration_us"] / 1e6
        res = RunResult(
            contender=name,
            conc=conc,
            layout=layout,
            round=rnd,
            requests=reqs,
            errors=errors,
            rps=reqs / dur_s if dur_s else 0.0,
            p50_ms=rep["p50_us"] / 1000,
            p99_ms=rep["p99_us"] / 1000,
            cpu_us_per_req=(peer_ticks / CLK_TCK * 1e6 / reqs) if (peer_meter and reqs) else None,
            peer_cpu_pct=100.0 * peer_ticks / CLK_TCK / wall if peer_meter else 0.0,
            other_cpu_pct=100.0 * other / CLK_TCK / wall,
            retries=attempt,
        )
        if best is None or res.other_cpu_pct < best.other_cpu_pct:
            best = res
        if res.other_cpu_pct <= max_other_pct:
            break
        if attempt == max_retries or not budget.take(wall):
            break
        log(f"  {name} c={conc}: other processes used {res.other_cpu_pct:.0f}% of a core, redoing")
    assert best is not None
    best.retries = attempt
    return best
