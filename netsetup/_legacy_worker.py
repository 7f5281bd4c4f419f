"""python-iptables worker: programs ONE address family of the legacy (x_tables) backend per process.

python-iptables cannot use IPv4 and IPv6 tables in the same process, so the legacy backend runs
``python -m netsetup._legacy_worker`` once per family and talks JSON lines over its stdin/stdout (one
request per line, one answer per line; a worker refuses requests for another family).  Requests::

    {"op": "probe",  "family": "ipv4"}                      # can libiptc open nat and filter?
    {"op": "check",  "family": "ipv4", "tables": [TABLE, ...]}  # would apply have to flush foreign rules?
    {"op": "apply",  "family": "ipv4", "wait": 5, "tables": [TABLE, ...]}
    {"op": "remove", "family": "ipv4", "wait": 5, "tables": [{"table": "nat", "chain": "EGRESS_REDIRECT"}]}

    TABLE = {"table": "nat", "chain": "EGRESS_REDIRECT", "jump": RULE, "rules": [RULE, ...]}
    RULE  = dataclasses.asdict(netsetup.plan.Rule)

Answer: ``{"ok": true, "messages": [...]}`` or ``{"ok": false, "error": "...", "unavailable": bool}``.

Each table is changed in ONE libiptc commit (``autocommit`` off): the chain is created or flushed and
refilled, and the jump from OUTPUT is put first, all in the same in-memory table that the kernel swaps in
atomically (``IPT_SO_SET_REPLACE``).  There is never a moment where the filter chain is empty or
unreferenced.  The xtables lock (``/run/xtables.lock``, the one iptables uses) is held during the commit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

TAG_PREFIX = "botbox:"
XTABLES_LOCK = "/run/xtables.lock"


class Unavailable(Exception):
    pass


class Conflict(Exception):
    pass


@contextlib.contextmanager
def xtables_lock(wait: int) -> Iterator[None]:
    """Hold the xtables lock like ``iptables -w WAIT``; raise ``TimeoutError`` after ``wait`` seconds."""
    fd = os.open(XTABLES_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"xtables lock {XTABLES_LOCK} still held after {wait}s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _iptc(family: str) -> Any:
    import iptc

    return iptc


def _table(family: str, name: str) -> Any:
    iptc = _iptc(family)
    tname = {"nat": "nat", "filter": "filter"}[name]
    try:
        t = iptc.Table(tname) if family == "ipv4" else iptc.Table6(tname)
        t.autocommit = False
        t.refresh()
    except Exception as e:
        raise Unavailable(f"{'ip' if family == 'ipv4' else 'ip6'}tables-legacy table {name!r} "
                          f"unavailable: {e}") from e
    return t


def _build_rule(family: str, spec: dict[str, Any]) -> Any:
    iptc = _iptc(family)
    r = iptc.Rule() if family == "ipv4" else iptc.Rule6()
    if spec.get("dst"):
        r.dst = spec["dst"]
    if spec.get("out_interface"):
        name = spec["out_interface"]
        r.out_interface = name
        if family == "ipv6":
            # python-iptables (1.2.0 and earlier) fills the IPv6 interface mask with 0x01 bytes instead
            # of 0xff, so the kernel compares only the lowest bit of each character: "-o lo" then also
            # matches e.g. "va0..." and the loopback RETURN/ACCEPT swallow real egress.  Set the mask
            # iptables sets.
            n = len(name) + 1
            r.entry.ipv6.outiface_mask = b"\xff" * n + b"\x00" * (16 - n)
    proto = spec.get("protocol")
    if proto:
        r.protocol = "58" if proto == "icmpv6" else proto
        if proto in ("tcp", "udp") and spec.get("dport") is not None:
            m = r.create_match(proto)
            m.dport = str(spec["dport"])
        if proto == "icmpv6" and spec.get("icmpv6_type") is not None:
            m = r.create_match("icmp6")
            m.icmpv6_type = str(spec["icmpv6_type"])
    if spec.get("hop_limit") is not None:
        m = r.create_match("hl")
        m.hl_eq = str(spec["hop_limit"])
    if spec.get("uid_owner") is not None:
        m = r.create_match("owner")
        m.uid_owner = str(spec["uid_owner"])
    if spec.get("ctstate") or spec.get("ctdir"):
        m = r.create_match("conntrack")
        if spec.get("ctstate"):
            m.ctstate = ",".join(spec["ctstate"])
        if spec.get("ctdir"):
            m.ctdir = spec["ctdir"]
    m = r.create_match("comment")
    m.comment = TAG_PREFIX + spec["purpose"]
    action = spec["action"]
    if action == "JUMP":
        r.create_target(spec["jump"])
    else:
        t = r.create_target(action)
        if action == "REDIRECT":
            t.to_ports = str(spec["to_port"])
        elif action == "REJECT":
            t.reject_with = spec["reject_with"]
    return r


def _comment(rule: Any) -> str | None:
    for m in rule.matches:
        if m.name == "comment":
            c = m.comment
            return str(c).strip('"') if c is not None else None
    return None


def _target_name(rule: Any) -> str:
    return str(rule.target.name) if rule.target is not None else ""


def _is_tagged(rule: Any) -> bool:
    c = _comment(rule)
    return c is not None and c.startswith(TAG_PREFIX)


def _check_no_foreign(family: str, spec: dict[str, Any]) -> None:
    """Open the table (Unavailable if impossible) and refuse chains holding foreign rules (Conflict)."""
    iptc = _iptc(family)
    table = _table(family, spec["table"])
    if table.is_chain(spec["chain"]):
        foreign = sum(1 for r in iptc.Chain(table, spec["chain"]).rules if not _is_tagged(r))
        if foreign:
            raise Conflict(f"{family} {spec['table']}: chain {spec['chain']} exists and holds {foreign} "
                           "rule(s) BotBox did not install; refusing to flush it (remove them, or choose "
                           "another BOTBOX_NAT_CHAIN/BOTBOX_FILTER_CHAIN)")


def _apply_table(family: str, spec: dict[str, Any], messages: list[str]) -> None:
    iptc = _iptc(family)
    table = _table(family, spec["table"])
    chain_name = spec["chain"]
    if table.is_chain(chain_name):
        chain = iptc.Chain(table, chain_name)
        chain.flush()
        action = "flushed and refilled"
    else:
        chain = table.create_chain(chain_name)
        action = "created"
    for rs in spec["rules"]:
        chain.append_rule(_build_rule(family, rs))
    output = iptc.Chain(table, "OUTPUT")
    jump_comment = TAG_PREFIX + spec["jump"]["purpose"]
    ours = [r for r in output.rules if _comment(r) == jump_comment and _target_name(r) == chain_name]
    first = output.rules[0] if output.rules else None
    first_ok = first is not None and _comment(first) == jump_comment and _target_name(first) == chain_name
    if not (first_ok and len(ours) == 1):
        for r in ours:
            output.delete_rule(r)
        output.insert_rule(_build_rule(family, spec["jump"]), 0)
        messages.append(f"{family} {spec['table']}: jump OUTPUT -> {chain_name} inserted first")
    # Jumps tagged by BotBox towards a chain we no longer use (chain renamed) are dropped in the same commit.
    for r in list(output.rules):
        if _is_tagged(r) and _target_name(r) != chain_name:
            output.delete_rule(r)
            messages.append(f"{family} {spec['table']}: removed stale BotBox jump to {_target_name(r)}")
    table.commit()
    table.refresh()
    messages.append(f"{family} {spec['table']}: chain {chain_name} {action} "
                    f"({len(spec['rules'])} rules), committed in one transaction")


def _remove_table(family: str, spec: dict[str, Any], messages: list[str]) -> None:
    iptc = _iptc(family)
    table = _table(family, spec["table"])
    chain_name = spec["chain"]
    output = iptc.Chain(table, "OUTPUT")
    for r in list(output.rules):
        if _is_tagged(r):
            output.delete_rule(r)
            messages.append(f"{family} {spec['table']}: deleted BotBox jump OUTPUT -> {_target_name(r)}")
    if table.is_chain(chain_name):
        chain = iptc.Chain(table, chain_name)
        foreign = 0
        for r in list(chain.rules):
            if _is_tagged(r):
                chain.delete_rule(r)
            else:
                foreign += 1
        referenced = [c.name for c in table.chains for r in c.rules if _target_name(r) == chain_name]
        if foreign or referenced:
            messages.append(f"{family} {spec['table']}: kept chain {chain_name}: {foreign} untagged rule(s) "
                            f"inside, referenced from {sorted(set(referenced)) or 'nothing'}")
        else:
            table.delete_chain(chain_name)
            messages.append(f"{family} {spec['table']}: deleted chain {chain_name}")
    table.commit()
    table.refresh()


def _inspect(family: str, tables: dict[str, str]) -> list[str]:
    """Interface-mask problems of rules in BotBox's chains (invisible in ``iptables-save`` output)."""
    iptc = _iptc(family)
    problems: list[str] = []
    for tname, chain_name in tables.items():
        table = _table(family, tname)
        if not table.is_chain(chain_name):
            continue
        for i, r in enumerate(iptc.Chain(table, chain_name).rules):
            ent = r.entry.ip if family == "ipv4" else r.entry.ipv6
            for attr in ("outiface", "iniface"):
                name = bytes(getattr(ent, attr)).split(b"\0", 1)[0]
                mask = bytes(getattr(ent, attr + "_mask"))
                if not name:
                    continue
                wildcard = not mask[len(name):len(name) + 1].startswith(b"\xff")
                want_len = len(name) if wildcard else len(name) + 1
                if mask[:want_len] != b"\xff" * want_len or mask[want_len:].strip(b"\0"):
                    problems.append(f"{tname} {chain_name} rule {i + 1}: {attr} {name.decode()!r} has mask "
                                    f"{mask.hex()} (kernel would match other interfaces)")
    return problems


def handle(req: dict[str, Any]) -> dict[str, Any]:
    family = req["family"]
    if family not in ("ipv4", "ipv6"):
        raise ValueError(f"bad family {family!r}")
    messages: list[str] = []
    op = req["op"]
    if op == "probe":
        for name in ("nat", "filter"):
            _table(family, name)
        return {"ok": True, "messages": messages}
    if op == "check":
        for spec in req["tables"]:
            _check_no_foreign(family, spec)
        return {"ok": True, "messages": messages}
    if op == "inspect":
        return {"ok": True, "messages": messages, "problems": _inspect(family, req["tables"])}
    with xtables_lock(int(req.get("wait", 5))):
        if op == "apply":
            # Open every table first, so an unavailable one fails before anything is changed.
            for spec in req["tables"]:
                _check_no_foreign(family, spec)
            for spec in req["tables"]:
                _apply_table(family, spec, messages)
        elif op == "remove":
            for spec in req["tables"]:
                _remove_table(family, spec, messages)
        else:
            raise ValueError(f"bad op {op!r}")
    return {"ok": True, "messages": messages}


def _serve_one(req: dict[str, Any]) -> dict[str, Any]:
    try:
        return handle(req)
    except Unavailable as e:
        return {"ok": False, "error": str(e), "unavailable": True}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "unavailable": False}


def main() -> int:
    """Serve one JSON request per stdin line, one JSON answer per stdout line, until EOF.

    (Importing python-iptables is slow, so the backend keeps one worker per family for its lifetime.)
    """
    family: str | None = None
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except ValueError as e:
            req = {"op": "invalid", "family": None, "error": str(e)}
        family = family or req.get("family")
        if req.get("family") != family:
            res: dict[str, Any] = {"ok": False, "error": "one family per worker", "unavailable": False}
        else:
            res = _serve_one(req)
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
