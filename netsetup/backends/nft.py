"""nf_tables backend: ``nft -j`` (libnftables JSON), one ``table inet botbox``, one transaction per apply.

The table is BotBox's tag: ``remove`` deletes exactly that table; nothing else is touched.  An ``inet``
table sees both IPv4 and IPv6; every rule pins its family with ``meta nfproto`` so an IPv4-only plan
leaves IPv6 packets alone.

Coexistence: iptables-nft (``table ip nat`` / ``ip filter`` ...) and other nft tables keep working next to
ours.  At one hook every base chain of every table runs (in priority order); an ``accept`` only ends the
current base chain, so a packet must be accepted by *all* of them — an ``accept`` elsewhere never
overrides our ``drop``/``reject``, and a ``drop`` elsewhere still applies to traffic we accept.  For NAT
the first chain that sets up a mapping wins, which is why our nat chain runs at priority -110, before
iptables(-nft)'s nat OUTPUT at -100.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any, Literal

from netsetup.backends import BackendError, BackendUnavailable, Check, compare_rules
from netsetup.plan import NFT_TABLE, Plan, nft_apply_commands, nft_chain_defs, nft_rules, nft_text_expr
from netsetup.settings import Settings

NFT = "nft"


def _rule_key(expr: list[dict[str, Any]], comment: str | None) -> str:
    # counter values are state, not configuration
    text = " ".join(_safe_text({"counter": None} if "counter" in x else x) for x in expr)
    return f"{text} comment {json.dumps(comment)}" if comment is not None else text


def _safe_text(x: dict[str, Any]) -> str:
    try:
        return nft_text_expr(x)
    except (KeyError, TypeError, ValueError):
        return json.dumps(x, sort_keys=True)


class NftBackend:
    name: Literal["legacy", "nft"] = "nft"

    def __init__(self, nft: str = NFT) -> None:
        self.nft = nft

    def _run(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self.nft, *args], input=stdin, capture_output=True, text=True,
                                  timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BackendUnavailable(f"nft unavailable: {e}") from e

    def _ruleset(self) -> list[dict[str, Any]]:
        p = self._run(["-j", "list", "ruleset"])
        if p.returncode != 0:
            raise BackendUnavailable(f"nft list ruleset failed: {p.stderr.strip()}")
        try:
            items: list[dict[str, Any]] = json.loads(p.stdout or '{"nftables": []}')["nftables"]
        except (ValueError, KeyError) as e:
            raise BackendError(f"nft returned unparsable JSON: {e}") from e
        return items

    def probe(self, families: tuple[str, ...]) -> None:
        self._ruleset()
        # A check-only transaction: the kernel validates nat/filter base chains and every expression
        # (e.g. IPv6 NAT support) without committing anything.
        from netsetup.plan import build_plan
        from netsetup.settings import Settings as _S

        fams = tuple(f for f in ("ipv4", "ipv6") if f in families)
        plan = build_plan(_S(), fams)
        p = self._run(["-c", "-j", "-f", "-"], json.dumps(nft_apply_commands(plan)))
        if p.returncode != 0:
            raise BackendUnavailable(f"nft cannot install the BotBox table for {'+'.join(fams)}: "
                                     f"{p.stderr.strip()}")

    def rule_count(self) -> int:
        try:
            return sum(1 for o in self._ruleset() if "rule" in o)
        except BackendUnavailable:
            return 0

    def holds_ours(self, settings: Settings) -> bool:
        try:
            items = self._ruleset()
        except BackendUnavailable:
            return False
        return any("table" in o and o["table"]["family"] == "inet" and o["table"]["name"] == NFT_TABLE
                   for o in items)

    def apply(self, plan: Plan) -> list[str]:
        existed = self.holds_ours(plan.settings)
        p = self._run(["-j", "-f", "-"], json.dumps(nft_apply_commands(plan)))
        if p.returncode != 0:
            raise BackendError(f"nft transaction failed (nothing changed): {p.stderr.strip()}")
        n = sum(len(r) for r in nft_rules(plan).values())
        fams = "+".join(fp.family for fp in plan.families)
        return [f"nft: table inet {NFT_TABLE} {'replaced' if existed else 'created'} ({fams}, {n} rules) "
                "in one transaction"]

    def remove(self, settings: Settings) -> list[str]:
        if not self.holds_ours(settings):
            return [f"nft: no table inet {NFT_TABLE}"]
        p = self._run(["delete", "table", "inet", NFT_TABLE])
        if p.returncode != 0:
            raise BackendError(f"nft delete table failed: {p.stderr.strip()}")
        return [f"nft: deleted table inet {NFT_TABLE}"]

    def read_back(self, plan: Plan) -> list[Check]:
        p = self._run(["-j", "list", "table", "inet", NFT_TABLE])
        items: list[dict[str, Any]] = []
        if p.returncode == 0:
            items = json.loads(p.stdout)["nftables"]
        fams = "+".join(fp.family for fp in plan.families)
        checks: list[Check] = []
        if not any("table" in o for o in items):
            checks.append(Check("inet", fams, "-", f"table inet {NFT_TABLE}", "missing"))
        chains = {o["chain"]["name"]: o["chain"] for o in items if "chain" in o}
        expected_rules = nft_rules(plan, listing=True)
        for want in nft_chain_defs(plan):
            got = chains.get(want["name"])
            desc = f"type {want['type']} hook {want['hook']} priority {want['prio']} policy {want['policy']}"
            if got is None:
                checks.append(Check(want["type"], fams, want["name"], desc, "missing"))
            elif any(got.get(k) != want[k] for k in ("type", "hook", "prio", "policy")):
                checks.append(Check(want["type"], fams, want["name"], desc, "wrong"))
            else:
                checks.append(Check(want["type"], fams, want["name"], desc, "ok"))
            exp = [_rule_key(r["expr"], r["comment"]) for r in expected_rules[want["name"]]]
            act = [_rule_key(o["rule"]["expr"], o["rule"].get("comment")) for o in items
                   if "rule" in o and o["rule"]["chain"] == want["name"]]
            checks.extend(compare_rules(exp, act, table=want["type"], family=fams, chain=want["name"]))
        for name in chains:
            if name not in expected_rules:
                checks.append(Check("inet", fams, name, f"chain {name}", "extra"))
        return checks
