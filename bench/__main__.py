"""BotBox benchmark: `./dev bench` (full, ~15-20 min) or `./dev bench --quick` (smoke check).

Runs inside a private network namespace (loopback only): an nginx TLS 1.3 origin and an SSE origin on
CPU 0 with wrk, each contender on CPU 1, interleaved rounds. Writes bench/RESULTS.md and raw JSON under
bench/out/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import peers, report
from bench.env import (
    CPU_LOAD,
    CPU_PEER,
    PROJECT_PY,
    PrivateNetns,
    ensure_tools,
    log,
    machine_line,
    raise_nofile,
    rss_kib,
    tool_versions,
    tree,
)
from bench.loadgen import RedoBudget, RunResult, measured_run, run_wrk, write_lua
from bench.peers import Certs, Contender, Proc

HERE = Path(__file__).resolve().parent
PORTS = {"nginx": 8001, "haproxy": 8002, "squid": 8003, "mitmproxy": 8004, "botbox": 8080}
SSE_PORTS = {"nginx": 8101, "haproxy": 8102, "squid": 8103, "mitmproxy": 8104}
NGINX_TLS_PORT = 8201
INTERCEPT_PORT = 8443
ALL = ["direct", "nginx", "haproxy", "squid", "mitmproxy", "botbox"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="one round of 3 s runs, 1,000 idle connections")
    ap.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per wrk run, default 10 (3)")
    ap.add_argument("--warmup", type=float, default=None, help="default 3 s (1)")
    ap.add_argument("--conc", default="1,32,256")
    ap.add_argument("--contenders", default=",".join(ALL))
    ap.add_argument(
        "--idle", default=None, help="idle keep-alive connection counts for RSS, default 1000,10000 (1000)"
    )
    ap.add_argument("--sse-n", type=int, default=None, help="SSE requests per contender, default 200 (100)")
    ap.add_argument(
        "--max-other-pct",
        type=float,
        default=25.0,
        help="redo a run when other processes used more than this %% of a core",
    )
    ap.add_argument("--max-retries", type=int, default=1)
    ap.add_argument(
        "--redo-budget",
        type=float,
        default=None,
        help="total seconds that may be spent redoing disturbed runs, default 90 (30 with --quick)",
    )
    ap.add_argument(
        "--skip", default="", help="comma list of phases to skip: tlscheck,onecore,sse,rss,intercept,w2"
    )
    ap.add_argument(
        "--profile",
        type=float,
        default=0.0,
        help="after the benchmark, py-spy BotBox for this many seconds under load",
    )
    ap.add_argument("--profile-conc", type=int, default=32)
    ap.add_argument(
        "--profile-listener",
        choices=["http", "tls"],
        default="http",
        help="profile the plain-HTTP listener or the HTTPS interception listener",
    )
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument(
        "--results",
        default=None,
        help="where to write the Markdown table (default: bench/RESULTS.md for a full run; "
        "--quick runs only write bench/out/<stamp>/RESULTS.md)",
    )
    a = ap.parse_args(argv)
    defaults = (
        {"rounds": 1, "duration": 3.0, "warmup": 1.0, "idle": "1000", "sse_n": 100, "redo_budget": 30.0}
        if a.quick
        else {
            "rounds": 3,
            "duration": 10.0,
            "warmup": 3.0,
            "idle": "1000,10000",
            "sse_n": 200,
            "redo_budget": 90.0,
        }
    )
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, out: Path) -> None:
        self.a = args
        self.work = work
        self.out = out
        self.skip = {s for s in args.skip.split(",") if s}
        self.names = [n for n in args.contenders.split(",") if n]
        self.concs = [int(c) for c in args.conc.split(",")]
        self.certs: Certs | None = None
        self.origin: Proc | None = None
        self.sse_origin: Proc | None = None
        self.live: dict[str, Contender] = {}
        self.failed: dict[str, str] = {}
        self.runs: list[RunResult] = []
        self.extra: dict[str, object] = {}
        self.lua = write_lua(work)
        self.budget = RedoBudget(args.redo_budget)

    # -------------------------------------------------------------------------------- contenders
    def _start(self, name: str, *, cpus: set[int] | None = None, intercept: bool = False) -> Contender:
        c = self.certs
        assert c is not None
        w = self.work
        if name == "direct":
            return Contender(
                "direct",
                peers.ORIGIN_PORT,
                scheme="https",
                sse_port=peers.SSE_PORT,
                extra_headers=(f"Authorization: Bearer {peers.TOKEN}",),
                note="wrk speaks TLS to the origin itself (the floor)",
            )
        starters: dict[str, Callable[[], Proc]] = {
            "nginx": lambda: peers.start_nginx(w, c, PORTS["nginx"], SSE_PORTS["nginx"], NGINX_TLS_PORT),
            "haproxy": lambda: peers.start_haproxy(w, c, PORTS["haproxy"], SSE_PORTS["haproxy"]),
            "squid": lambda: peers.start_squid(w, c, PORTS["squid"], SSE_PORTS["squid"]),
            "mitmproxy": lambda: peers.start_mitmproxy(w, c, PORTS["mitmproxy"], SSE_PORTS["mitmproxy"]),
            "botbox": lambda: peers.start_botbox(
                w, c, PORTS["botbox"], cpus=cpus, intercept_port=INTERCEPT_PORT if intercept else None
            ),
            "botbox-w2": lambda: peers.start_botbox(
                w, c, 8090, workers=2, metrics_port=9092, cpus={0, 1}, name="botbox-w2"
            ),
        }
        proc = starters[name]()
        port = 8090 if name == "botbox-w2" else PORTS[name]
        con = Contender(name, port, proc=proc, sse_port=SSE_PORTS.get(name, port))
        try:
            peers.verify(con, c)
        except Exception:
            proc.stop()
            raise
        return con

    def start_all(self) -> None:
        for name in self.names:
            try:
                self.live[name] = self._start(
                    name, intercept=(name == "botbox" and "intercept" not in self.skip)
                )
                log(f"{name}: up and verified")
            except Exception as e:
                if name == "botbox" and "intercept" not in self.skip:
                    log(f"botbox with interception failed ({str(e)[:300]}); retrying without interception")
                    self.extra["intercept_start_error"] = str(e)[-2000:]
                    try:
                        self.live[name] = self._start(name, intercept=False)
                        log(f"{name}: up and verified (no interception listener)")
                        continue
                    except Exception as e2:
                        e = e2
                self.failed[name] = str(e)[-2000:]
                log(f"{name}: FAILED to start: {str(e)[:500]}")

    def tls_checks(self) -> None:
        """Swap the origin for one with a wrong-name certificate, then one from an untrusted CA: every
        proxy must refuse both (no 200 with the origin's body); then restore and re-verify."""
        assert self.certs is not None and self.origin is not None
        checks: dict[str, dict[str, str]] = {}
        for variant in ("wrongname", "rogue"):
            self.origin.stop()
            self.origin = peers.start_origin(self.work, self.certs, variant)
            for con in self.live.values():
                if con.proc is None:
                    continue  # direct: wrk does not verify, it is only the floor
                ok, what = peers.refuses_bad_origin(con)
                checks.setdefault(con.name, {})[variant] = ("refused " if ok else "ACCEPTED ") + what
                if not ok:
                    log(f"  {con.name} ACCEPTED a {variant} origin certificate")
        self.origin.stop()
        self.origin = peers.start_origin(self.work, self.certs)
        for con in self.live.values():
            peers.verify(con, self.certs)
        self.extra["tls_checks"] = checks
        log(f"  {checks}")

    def stop_all(self) -> None:
        for con in self.live.values():
            if con.proc is not None:
                con.proc.stop()
        self.live.clear()

    def _headers(self, con: Contender, host: str | None = None) -> dict[str, str]:
        h = {"Host": host or con.host_header}
        for line in con.extra_headers:
            k, v = line.split(": ", 1)
            h[k] = v
        return h

    def _wrk(
        self,
        con: Contender,
        conc: int,
        layout: str,
        rnd: int,
        *,
        url: str | None = None,
        host: str | None = None,
        label: str | None = None,
    ) -> RunResult:
        roots = [p.pid for p in (self.origin, self.sse_origin) if p is not None]
        res = measured_run(
            name=label or con.name,
            url=url or con.url,
            conc=conc,
            duration=self.a.duration,
            lua=self.lua,
            headers=self._headers(con, host),
            peer_root=con.proc.pid if con.proc else None,
            other_roots=roots,
            layout=layout,
            rnd=rnd,
            max_other_pct=self.a.max_other_pct,
            max_retries=self.a.max_retries,
            budget=self.budget,
        )
        if con.proc is not None:
            con.proc.truncate_log()
        log(
            f"  r{rnd} {layout:7s} c={conc:<3d} {res.contender:12s} {res.rps:9.0f} req/s"
            f"  p50 {res.p50_ms:7.3f} ms"
            f"  p99 {res.p99_ms:7.3f} ms  cpu {res.cpu_us_per_req or 0:7.1f} us/req  err {res.errors}"
            f"  other {res.other_cpu_pct:4.0f}%"
        )
        self.runs.append(res)
        return res

    # -------------------------------------------------------------------------------- phases
    def warmup(self) -> None:
        for con in self.live.values():
            run_wrk(con.url, 32, self.a.warmup, self.lua, self._headers(con))

    def rounds(self) -> None:
        order = list(self.live.values())
        for rnd in range(self.a.rounds):
            for ci, conc in enumerate(self.concs):
                k = (rnd + ci) % len(order)
                for con in order[k:] + order[:k]:
                    self._wrk(con, conc, "split", rnd)
            if "onecore" not in self.skip:
                k = rnd % len(order)
                for con in order[k:] + order[:k]:
                    if con.proc is not None:
                        peers.repin(con.proc, {CPU_LOAD})
                    try:
                        self._wrk(con, 1, "onecore", rnd)
                    finally:
                        if con.proc is not None:
                            peers.repin(con.proc, {CPU_PEER})

    def sse(self) -> None:
        results: dict[str, dict[str, float]] = {}
        for con in self.live.values():
            port = con.sse_port or con.port
            argv = [
                "taskset",
                "-c",
                str(CPU_LOAD),
                str(PROJECT_PY),
                "-m",
                "bench.sse",
                "client",
                "--port",
                str(port),
                "--host-header",
                con.sse_host_header,
                "--n",
                str(self.a.sse_n),
            ]
            if con.name == "direct":
                argv += ["--tls-ca", str(self.certs.ca if self.certs else ""), "--auth", peers.TOKEN]
            p = subprocess.run(
                argv, capture_output=True, text=True, timeout=300, cwd=HERE.parent, check=False
            )
            try:
                results[con.name] = json.loads(p.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                results[con.name] = {"n": 0, "errors": -1}
                log(f"  sse {con.name}: client failed: {p.stderr[-500:]}")
            log(f"  sse {con.name}: {results[con.name]}")
        self.extra["sse"] = results

    def intercept(self) -> None:
        bb = self.live.get("botbox")
        rows: list[dict[str, object]] = []
        if bb is None or "intercept_start_error" in self.extra:
            self.extra["intercept"] = rows
            return
        nginx = self.live.get("nginx")
        icept = Contender(
            "botbox-tls", INTERCEPT_PORT, scheme="https", host_header=peers.ORIGIN_HOST, proc=bb.proc
        )
        try:
            peers.verify(icept, self.certs)  # type: ignore[arg-type]
        except Exception as e:
            self.extra["intercept_error"] = str(e)[-1000:]
            log(f"interception listener does not serve the job: {e}")
            self.extra["intercept"] = rows
            return
        # warm the certificate cache
        run_wrk(icept.url, 8, 1.0, self.lua, self._headers(icept))
        cands = [icept]
        if nginx is not None:
            cands.append(Contender("nginx-tls", NGINX_TLS_PORT, scheme="https", proc=nginx.proc))
        for rnd in range(self.a.rounds):
            for conc in self.concs:
                for con in cands if rnd % 2 == 0 else cands[::-1]:
                    self._wrk(con, conc, "tls-in", rnd)

    def workers2(self) -> None:
        if "botbox" not in self.names or "botbox" in self.failed:
            return
        try:
            con = self._start("botbox-w2")
        except Exception as e:
            self.extra["w2_error"] = str(e)[-1000:]
            log(f"botbox workers=2 failed: {str(e)[:300]}")
            return
        try:
            assert con.proc is not None
            self.extra["w2_processes"] = len(tree(con.proc.pid))
            run_wrk(con.url, 32, self.a.warmup, self.lua, self._headers(con))
            for rnd in range(self.a.rounds):
                for conc in [c for c in self.concs if c > 1]:
                    self._wrk(con, conc, "w2", rnd)
        finally:
            assert con.proc is not None
            con.proc.stop()

    def rss(self) -> None:
        counts = [int(x) for x in self.a.idle.split(",") if x]
        rows: list[dict[str, object]] = []
        for name in [n for n in self.names if n != "direct"]:
            if name in self.failed:
                continue
            for n in counts:
                row: dict[str, object] = {"contender": name, "n": n}
                try:
                    con = self._start(name)
                except Exception as e:
                    row["error"] = f"start: {str(e)[:300]}"
                    rows.append(row)
                    continue
                assert con.proc is not None
                try:
                    run_wrk(con.url, 8, 1.0, self.lua, self._headers(con))
                    time.sleep(0.5)
                    pids = tree(con.proc.pid)
                    base = rss_kib(pids)
                    cl = subprocess.Popen(
                        [
                            "taskset",
                            "-c",
                            str(CPU_LOAD),
                            str(PROJECT_PY),
                            "-m",
                            "bench.idleconns",
                            "--port",
                            str(con.port),
                            "--host-header",
                            con.host_header,
                            "--n",
                            str(n),
                        ],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        cwd=HERE.parent,
                    )
                    assert cl.stdout is not None and cl.stdin is not None
                    ready = json.loads(cl.stdout.readline() or "{}")
                    time.sleep(1.0)
                    pids = tree(con.proc.pid)
                    held = rss_kib(pids)
                    cl.stdin.write("\n")
                    cl.stdin.flush()
                    after = json.loads(cl.stdout.readline() or "{}")
                    cl.wait(timeout=60)
                    row.update(
                        base_kib=base,
                        held_kib=held,
                        ok=ready.get("ok"),
                        errors=ready.get("errors"),
                        error_kinds=ready.get("error_kinds"),
                        open_seconds=ready.get("open_seconds"),
                        still_open=after.get("still_open"),
                        kib_per_conn=round((held - base) / n, 2),
                        alive=con.proc.alive(),
                    )
                except Exception as e:
                    row["error"] = str(e)[:300]
                finally:
                    con.proc.stop()
                log(f"  rss {name} n={n}: {row}")
                rows.append(row)
        self.extra["rss"] = rows

    def profile(self) -> None:
        """py-spy BotBox (native frames included) under c=32 load; the run's own CPU µs/req scales the
        summary (py-spy pauses the process while sampling, so req/s of this run is not comparable)."""
        bb = self.live.get("botbox")
        if bb is None or bb.proc is None:
            return
        from bench.env import BENCH_VENV
        from bench.profile import report as profile_report

        if self.a.profile_listener == "tls":
            bb = Contender(
                "botbox-tls", INTERCEPT_PORT, scheme="https", host_header=peers.ORIGIN_HOST, proc=bb.proc
            )
            run_wrk(bb.url, 8, 1.0, self.lua, self._headers(bb))  # warm the certificate cache
        assert bb.proc is not None
        dur = self.a.profile
        path = self.out / f"botbox-profile-{self.a.profile_listener}-c{self.a.profile_conc}.txt"
        spy = subprocess.Popen(
            [
                str(BENCH_VENV / "bin" / "py-spy"),
                "record",
                "--native",
                "-r",
                "200",
                "-d",
                str(int(dur) + 2),
                "-f",
                "raw",
                "-o",
                str(path),
                "-p",
                str(bb.proc.pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)
        saved = self.a.duration
        self.a.duration = dur
        try:
            res = self._wrk(bb, self.a.profile_conc, "profile", 0)
        finally:
            self.a.duration = saved
        spy.wait(timeout=dur + 60)
        summary = profile_report(path, res.cpu_us_per_req, 40) if path.exists() else "py-spy wrote nothing"
        path.with_suffix(".summary.txt").write_text(summary + "\n")
        self.extra["profile"] = {"raw": str(path), "cpu_us_per_req": res.cpu_us_per_req, "rps": res.rps}
        log(f"profile written: {path} (+ summary)")

    def run(self) -> None:
        self.certs = peers.make_certs(self.work)
        self.origin = peers.start_origin(self.work, self.certs)
        self.sse_origin = peers.start_sse_origin(self.work, self.certs)
        self.start_all()
        if not self.live:
            raise RuntimeError("no contender started")
        if "tlscheck" not in self.skip:
            log("negative controls: origin cert for another name / from an untrusted CA")
            self.tls_checks()
        log("warm-up")
        self.warmup()
        log(f"{self.a.rounds} interleaved round(s) of {self.a.duration:g} s runs at c={self.concs}")
        self.rounds()
        if "sse" not in self.skip:
            log("SSE first-event latency")
            self.sse()
        if "intercept" not in self.skip:
            log("interception rows")
            self.intercept()
        if self.a.profile > 0:
            self.profile()
        self.stop_all()
        if "w2" not in self.skip:
            log("BotBox workers: 2")
            self.workers2()
        if "rss" not in self.skip:
            log("RSS per idle keep-alive connection")
            self.rss()


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    # clean up (namespace, peers, temp dir) on SIGTERM and on SIGINT even when started in the
    # background, where a non-interactive shell leaves SIGINT ignored
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if os.geteuid() != 0:
        print("run as root (network namespace, CPU pinning, squid/nginx user switch)", file=sys.stderr)
        return 1
    if (os.cpu_count() or 1) < 2:
        print("needs at least 2 CPUs (contender on CPU 1, load on CPU 0)", file=sys.stderr)
        return 1
    if not a.no_install:
        ensure_tools()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = HERE / "out" / stamp
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="botbox-bench-"))
    work.chmod(0o755)
    started = time.monotonic()
    meta: dict[str, object] = {
        "machine": machine_line(),
        "tools": tool_versions(),
        "started": stamp,
        "args": vars(a),
        "git": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=HERE.parent,
            check=False,
        ).stdout.strip(),
    }
    meta["botbox_code"] = peers.snapshot_botbox(work / "src")
    ns = PrivateNetns()
    bench: Bench | None = None
    rc = 0
    try:
        ns.enter()
        meta["nofile"] = raise_nofile()
        bench = Bench(a, work, out)
        try:
            bench.run()
        finally:
            bench.stop_all()
            for p in (bench.origin, bench.sse_origin):
                if p is not None:
                    p.stop()
    except KeyboardInterrupt:
        rc = 130
    except Exception as e:
        log(f"benchmark failed: {e}")
        rc = 1
    finally:
        ns.close()
        for f in work.glob("*.log"):
            shutil.copy(f, out / f.name)
        shutil.rmtree(work, ignore_errors=True)
    if bench is None:
        return rc or 1
    meta["wall_seconds"] = round(time.monotonic() - started, 1)
    meta["failed"] = bench.failed
    meta["redone_runs"] = bench.budget.redone
    meta["redo_budget_left_s"] = round(bench.budget.left, 1)
    raw = {"meta": meta, "runs": [r.to_json() for r in bench.runs], **bench.extra}
    (out / "results.json").write_text(json.dumps(raw, indent=1, default=str))
    md = report.render(raw)
    (out / "RESULTS.md").write_text(md)
    target = a.results or (None if a.quick else str(HERE / "RESULTS.md"))
    if bench.runs and target and rc == 0:
        Path(target).write_text(md)
    log(f"wrote {target or ''} {out / 'RESULTS.md'} {out / 'results.json'} ({meta['wall_seconds']} s)")
    print(md)
    return rc


if __name__ == "__main__":
    sys.exit(main())
