"""Legacy x_tables backend: python-iptables (libiptc), one worker subprocess per address family."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
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


class LegacyBackend:
    name: Literal["legacy", "nft"] = "legacy"

    def __init__(self, wait_seconds: int = 5, python: str | None = None) -> None:
        self.wait_seconds = wait_seconds
        self.python = python or sys.executable

    # -- plumbing
    def _worker(self, req: dict[str, Any]) -> dict[str, Any]:
        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            p = subprocess.run([self.python, "-m", "netsetup._legacy_worker"], input=json.dumps(req),
                               capture_output=True, text=True, env=env, timeout=60 + self.wait_seconds,
                               check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BackendError(f"legacy worker failed to run: {e}") from e
        try:
            res: dict[str, Any] = json.loads(p.stdout)
        except ValueError:
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            raise BackendError(f"legacy worker ({req['family']} {req['op']}) crashed: {tail}") from None
        if not res.get("ok"):
            if res.get("unavailable"):
                raise BackendUnavailable(str(res.get("error")))
            raise BackendError(f"legacy {req['family']} {req['op']}: {res.get('error')}")
        return res

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
        for fam in families:
            self._worker({"op": "probe", "family": fam})
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
        msgs: list[str] = []
        for fp in plan.families:
            tables = [{"table": cp.table, "chain": cp.name, "jump": dataclasses.asdict(cp.jump),
                       "rules": [dataclasses.asdict(r) for r in cp.rules]} for cp in fp.chains]
            res = self._worker({"op": "apply", "family": fp.family, "wait": self.wait_seconds,
                                "tables": tables})
            msgs.extend(res.get("messages", []))
        return msgs

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
        for fp in plan.families:
            checks.extend(self._read_back_family(fp))
        return checks

    def _read_back_family(self, fp: FamilyPlan) -> list[Check]:
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
        # iptables-save prints an interface name but not its mask: check the binary rules too.
        present = {tl.table: tl.chain for tl in iptables_lines(fp)
                   if tl.chain in parsed.get(tl.table, ([], []))[0]}
        if present:
            res = self._worker({"op": "inspect", "family": fp.family, "tables": present})
            for problem in res.get("problems", []):
                checks.append(Check(problem.split()[0], fp.family, problem.split()[1], problem, "wrong"))
        return checks
