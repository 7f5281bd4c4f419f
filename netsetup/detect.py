"""Which address families and which backend (SECURITY-SPEC N3/N4).

``decide()`` is the pure decision; ``detect()`` gathers the facts by probing the backends in the current
network namespace.

Families (``BOTBOX_ENABLE_IPV6``): ``auto`` covers IPv6 when it is enabled in the namespace
(``net.ipv6.conf.all.disable_ipv6 == 0``); ``1`` always covers IPv6 and fails (exit 3) when the kernel has
no IPv6 at all or the backend cannot program IPv6 NAT/filter; ``0`` covers IPv4 only (loud warning).

Backend (``BOTBOX_IPTABLES_BACKEND=auto``): probe both; a backend is usable when its nat and filter
tables can be opened for every planned family (legacy: libiptc opens them; nft: a check-only
transaction of the real table is accepted by the kernel).  Prefer the backend that already holds rules
(BotBox's own objects first, then the one with more rules; both holding rules prints a warning since
both are evaluated by the kernel and either can drop traffic), else nft, else legacy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from netsetup.backends import Backend, BackendUnavailable
from netsetup.backends.legacy import LegacyBackend
from netsetup.backends.nft import NftBackend
from netsetup.plan import Family
from netsetup.settings import Settings

PROC_IPV6_ALL = "/proc/sys/net/ipv6/conf/all/disable_ipv6"


def ipv6_state(path: str = PROC_IPV6_ALL) -> str:
    """``"enabled"``, ``"disabled"`` (sysctl) or ``"absent"`` (kernel without IPv6)."""
    p = Path(path)
    if not p.exists():
        return "absent"
    return "enabled" if p.read_text().strip() == "0" else "disabled"


def resolve_families(settings: Settings, state: str) -> tuple[tuple[Family, ...], list[str]]:
    """Families to program for ``BOTBOX_ENABLE_IPV6`` given the namespace's IPv6 ``state``."""
    warnings: list[str] = []
    if settings.enable_ipv6 == "1":
        if state == "absent":
            raise BackendUnavailable("BOTBOX_ENABLE_IPV6=1 but this kernel has no IPv6 support "
                                     "(/proc/sys/net/ipv6 missing)")
        return ("ipv4", "ipv6"), warnings
    if settings.enable_ipv6 == "0":
        warnings.append("*** WARNING: BOTBOX_ENABLE_IPV6=0: IPv6 traffic is NOT redirected or filtered. "
                        f"IPv6 in this namespace is {state}; if the pod has IPv6 connectivity the app can "
                        "bypass BotBox over IPv6. ***")
        return ("ipv4",), warnings
    if state == "enabled":
        return ("ipv4", "ipv6"), warnings
    warnings.append(f"IPv6 is {state} in this namespace: programming IPv4 only (BOTBOX_ENABLE_IPV6=auto)")
    return ("ipv4",), warnings


@dataclass
class Decision:
    backend: str
    reason: str
    warnings: list[str] = field(default_factory=list)


def decide(requested: str, unavailable: Mapping[str, str | None], rules: Mapping[str, int],
           ours: Mapping[str, bool]) -> Decision:
    """Pick a backend.  ``unavailable[name]`` is ``None`` when usable, else why not.

    Raises :class:`BackendUnavailable` when the requested (or every) backend is unusable.
    """
    names = ("nft", "legacy")
    usable = [n for n in names if unavailable.get(n) is None]
    in_use = [n for n in names if rules.get(n, 0) > 0 or ours.get(n, False)]
    warnings: list[str] = []
    if len(in_use) == 2:
        warnings.append(
            f"*** WARNING: both iptables-legacy ({rules.get('legacy', 0)} rules) and nftables "
            f"({rules.get('nft', 0)} rules) hold rules in this namespace. The kernel evaluates both; "
            "make sure no other tool's rules undermine BotBox's. ***")
    if requested != "auto":
        why = unavailable.get(requested)
        if why is not None:
            raise BackendUnavailable(f"backend {requested} unavailable: {why}")
        return Decision(requested, f"{requested} (BOTBOX_IPTABLES_BACKEND={requested})", warnings)
    if not usable:
        raise BackendUnavailable("no usable backend: " + "; ".join(
            f"{n}: {unavailable.get(n)}" for n in names))
    candidates = [n for n in in_use if n in usable]
    if len(candidates) == 2:
        with_ours = [n for n in candidates if ours.get(n)]
        if len(with_ours) == 1:
            return Decision(with_ours[0], f"{with_ours[0]} (holds BotBox's rules already)", warnings)
        best = max(candidates, key=lambda n: (rules.get(n, 0), n == "nft"))
        return Decision(best, f"{best} (both in use; {best} holds more rules)", warnings)
    if len(candidates) == 1:
        n = candidates[0]
        return Decision(n, f"{n} (already holds {rules.get(n, 0)} rules"
                           f"{', including BotBox' if ours.get(n) else ''})", warnings)
    if "nft" in usable:
        return Decision("nft", "nft (no rules installed yet; nft preferred)", warnings)
    return Decision("legacy", f"legacy (no rules installed yet; nft unavailable: {unavailable.get('nft')})",
                    warnings)


def make_backend(name: str, settings: Settings) -> Backend:
    if name == "legacy":
        return LegacyBackend(wait_seconds=settings.wait_seconds)
    if name == "nft":
        return NftBackend()
    raise ValueError(name)


def detect(settings: Settings, families: tuple[Family, ...]) -> tuple[Backend, Decision]:
    """Probe the backends here and return the one to use (raises :class:`BackendUnavailable`)."""
    unavailable: dict[str, str | None] = {}
    rules: dict[str, int] = {}
    ours: dict[str, bool] = {}
    names = ["nft", "legacy"] if settings.backend == "auto" else [settings.backend]
    backends = {n: make_backend(n, settings) for n in ("nft", "legacy")}
    for n in names:
        try:
            backends[n].probe(families)
            unavailable[n] = None
        except BackendUnavailable as e:
            unavailable[n] = str(e)
    for n in ("nft", "legacy"):
        # Counting rules never changes anything (it only lists tables that exist).
        rules[n] = backends[n].rule_count()
        ours[n] = backends[n].holds_ours(settings)
    try:
        d = decide(settings.backend, unavailable, rules, ours)
    except BackendUnavailable:
        for b in backends.values():
            close_backend(b)
        raise
    for n, b in backends.items():
        if n != d.backend:
            close_backend(b)
    return backends[d.backend], d


def close_backend(b: Backend) -> None:
    """Stop helper processes a backend may keep (the legacy backend's per-family workers)."""
    close = getattr(b, "close", None)
    if close is not None:
        close()


def in_netns_hint() -> str:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return "?"
