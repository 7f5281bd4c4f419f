"""Legacy x_tables backend: python-iptables (libiptc), one worker subprocess per address family."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from netsetup.backends import BackendError, BackendUnavailable, Check, compare_rules
from netsetup.plan import TAG_PREFIX, FamilyPlan, Plan, iptables_lines
from netsetup.settings import Settings

SAVE_TOOLS = {"ipv4": "iptables-legacy-save", "ipv6": "ip6tables-legacy-save"}
_PKG_PARENT = str(Path(__file__).resolve().parents[2])


def parse_save(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """``iptables-save`` text -> {table: (chain declaration names, rule lines in order)}."""
    tables: dict[str, tuple[list[str], list[str]]] = {}
    cur: tuple[list[str], list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            cur = tables.setdefault(line[1:], ([], []))
        elif cur is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            cur[0].append(line[1:].split()[0])
        elif line.startswith("-A "):
            cur[1].append(line)
    return tables


def _rule_chain(line: str) -> str:
    return line.split()[1]


def _is_tagged(line: str) -> bool:
    return f'--comment "{TAG_PREFIX}' in line or f"--comment {TAG_PREFIX}" in line


def _send(p: subprocess.Popen[str], req: dict[str, Any]) -> None:
    if p.stdin is None:
        raise OSError("worker stdin missing")
    p.stdin.write(json.dumps(req) + "\n")
    p.stdin.flush()


def _recv(p: subprocess.Popen[str], deadline: float) -> tuple[str, str]:
    """One answer line from worker ``p`` (or ``""`` and its stderr if it died)."""
    if p.stdout is None:
        raise OSError("worker stdout missing")
    if not select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
        raise subprocess.TimeoutExpired(str(p.args), deadline)
    line = p.stdout.readline()
    if line:
        return line, ""
    p.wait(timeout=10)
    return "", p.stderr.read() if p.stderr is not None else ""


class LegacyBackend:
    name: Literal["legacy", "nft"] = "legacy"

    def __init__(self, wait_seconds: int = 5, python: str | None = None) -> None:
        self.wait_seconds = wait_seconds
        self.python = python or sys.executable
        self._procs: dict[str, subprocess.Popen[str]] = {}

    # -- plumbing
    def _worker(self, req: dict[str, Any]) -> dict[str, Any]:
        return self._workers([req])[0]

    def _spawn(self, family: str) -> subprocess.Popen[str]:
        p = self._procs.get(family)
        if p is not None and p.poll() is None:
            return p
        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            p = subprocess.Popen([self.python, "-m", "netsetup._legacy_worker"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        except OSError as e:
            raise BackendError(f"legacy worker failed to start: {e}") from e
        self._procs[family] = p
        return p

    def close(self) -> None:
        """Stop the worker processes (they also exit on their own when we exit: stdin EOF)."""
        for p in self._procs.values():
            with contextlib.suppress(OSError):
                if p.stdin is not None:
                    p.stdin.close()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()
        self._procs.clear()

    def _workers(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send each request to its family's worker (requests of different families run concurrently)."""
        if len({r["family"] for r in reqs}) != len(reqs):
            raise ValueError("at most one request per family per call")
        outs: list[tuple[str, str]] = []
        try:
            procs = [self._spawn(r["family"]) for r in reqs]
            for p, r in zip(procs, reqs, strict=True):
                _send(p, r)
            deadline = time.monotonic() + 60 + self.wait_seconds
            outs = [_recv(p, deadline) for p in procs]
        except (OSError, subprocess.TimeoutExpired) as e:
            self.close()
            raise BackendError(f"legacy worker failed: {e}") from e
        results: list[dict[str, Any]] = []
        unavailable: list[str] = []
        errors: list[str] = []
        for req, (stdout, stderr) in zip(reqs, outs, strict=True):
            try:
                res: dict[str, Any] = json.loads(stdout)
            except ValueError:
                tail = (stderr.strip().splitlines() or ["no output"])[-1]
                errors.append(f"legacy worker ({req['family']} {req['op']}) crashed: {tail}")
                continue
            if not res.get("ok"):
                if res.get("unavailable"):
                    unavailable.append(str(res.get("error")))
                else:
                    errors.append(f"legacy {req['family']} {req['op']}: {res.get('error')}")
            results.append(res)
        if unavailable:
            raise BackendUnavailable("; ".join(unavailable))
        if errors:
            raise BackendError("; ".join(errors))
        return results

    def save(self, family: str) -> str:
        try:
            p = subprocess.run([SAVE_TOOLS[family]], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BackendUnavailable(f"{SAVE_TOOLS[family]} unavailable: {e}") from e
        if p.returncode != 0:
            raise BackendUnavailable(f"{SAVE_TOOLS[family]} failed: {p.stderr.strip()}")
        return p.stdout

    # -- Backend protocol
    def probe(self, families: tuple[str, ...]) -> None:
        self._workers([{"op": "probe", "family": fam} for fam in families])
        for fam in families:
            self.save(fam)

    def rule_count(self) -> int:
        n = 0
        for fam in ("ipv4", "ipv6"):
            try:
                text = self.save(fam)
            except BackendUnavailable:
                continue
            n += sum(len(rules) for _, rules in parse_save(text).values())
        return n

    def holds_ours(self, settings: Settings) -> bool:
        for fam in ("ipv4", "ipv6"):
            try:
                text = self.save(fam)
            except BackendUnavailable:
                continue
            for chains, rules in parse_save(text).values():
                if settings.nat_chain in chains or settings.filter_chain in chains:
                    return True
                if any(_is_tagged(r) for r in rules):
                    return True
        return False

    def apply(self, plan: Plan) -> list[str]:
        # Families are independent (separate kernel tables): both workers run at once.  Every table of a
        # family was opened by probe() before; a failure here leaves the rules as they are (fail closed).
        reqs = []
        for fp in plan.families:
            tables = [{"table": cp.table, "chain": cp.name, "jump": dataclasses.asdict(cp.jump),
                       "rules": [dataclasses.asdict(r) for r in cp.rules]}
                      # filter before nat: on a fresh install the egress filter is never missing
                      # while the redirect already works (fail closed in between)
                      for cp in (fp.filter, fp.nat)]
            reqs.append({"op": "apply", "family": fp.family, "wait": self.wait_seconds, "tables": tables})
        # First every family checks that no foreign rule would be flushed, so a conflict in one family
        # never leaves the other half-applied.
        self._workers([{**r, "op": "check"} for r in reqs])
        return [m for res in self._workers(reqs) for m in res.get("messages", [])]

    def remove(self, settings: Settings) -> list[str]:
        msgs: list[str] = []
        for fam in ("ipv4", "ipv6"):
            try:
                parsed = parse_save(self.save(fam))
            except BackendUnavailable as e:
                msgs.append(f"{fam}: skipped ({e})")
                continue
            tables = []
            for tname, chain in (("nat", settings.nat_chain), ("filter", settings.filter_chain)):
                chains, rules = parsed.get(tname, ([], []))
                if chain in chains or any(_is_tagged(r) for r in rules):
                    tables.append({"table": tname, "chain": chain})
            if not tables:
                msgs.append(f"{fam}: nothing of BotBox's installed")
                continue
            res = self._worker({"op": "remove", "family": fam, "wait": self.wait_seconds, "tables": tables})
            msgs.extend(res.get("messages", []))
        return msgs

    def read_back(self, plan: Plan) -> list[Check]:
        checks: list[Check] = []
        inspect: list[dict[str, Any]] = []
        for fp in plan.families:
            checks.extend(self._read_back_family(fp, inspect))
        # iptables-save prints an interface name but not its mask: check the binary rules too.
        for req, res in zip(inspect, self._workers(inspect), strict=True):
            for problem in res.get("problems", []):
                table, chain = problem.split()[:2]
                checks.append(Check(table, req["family"], chain, problem, "wrong"))
        return checks

    def _read_back_family(self, fp: FamilyPlan, inspect: list[dict[str, Any]]) -> list[Check]:
        parsed = parse_save(self.save(fp.family))
        checks: list[Check] = []
        for tl in iptables_lines(fp):
            chains, rules = parsed.get(tl.table, ([], []))
            output = [r for r in rules if _rule_chain(r) == "OUTPUT"]
            ours = [r for r in output if r == tl.jump_line]
            if not ours:
                checks.append(Check(tl.table, fp.family, "OUTPUT", tl.jump_line, "missing"))
            elif output[0] != tl.jump_line:
                checks.append(Check(tl.table, fp.family, "OUTPUT", tl.jump_line, "misplaced"))
            else:
                checks.append(Check(tl.table, fp.family, "OUTPUT", tl.jump_line, "ok"))
            for r in ours[1:]:
                checks.append(Check(tl.table, fp.family, "OUTPUT", r, "extra"))
            for r in output:
                if r != tl.jump_line and (_is_tagged(r) or r.endswith(f"-j {tl.chain}")):
                    checks.append(Check(tl.table, fp.family, "OUTPUT", r, "extra"))
            if tl.chain not in chains:
                checks.append(Check(tl.table, fp.family, tl.chain, f":{tl.chain} (chain)", "missing"))
            actual = [r for r in rules if _rule_chain(r) == tl.chain]
            checks.extend(compare_rules(list(tl.rule_lines), actual, table=tl.table, family=fp.family,
                                        chain=tl.chain))
        present = {tl.table: tl.chain for tl in iptables_lines(fp)
                   if tl.chain in parsed.get(tl.table, ([], []))[0]}
        if present:
            inspect.append({"op": "inspect", "family": fp.family, "tables": present})
        return checks
