"""``netsetup plan|apply|verify|remove`` (CONTRACT §1).

Exit codes: 0 ok; 2 invalid settings; 3 required backend or table unavailable; 95 verification failed;
1 any other failure (e.g. the kernel refused a transaction) — rules are then left as they are (fail
closed; a failing init container keeps the pod from starting).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from netsetup.backends import Backend, BackendError, BackendUnavailable
from netsetup.detect import close_backend, detect, ipv6_state, make_backend, resolve_families
from netsetup.plan import Plan, build_plan, render_iptables_save, render_nft
from netsetup.settings import ENV_DEFAULTS, FLAGS, Settings, SettingsError, parse_settings
from netsetup.verify import verify

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_SETTINGS = 2
EXIT_UNAVAILABLE = 3
EXIT_VERIFY = 95


def _say(msg: str) -> None:
    print(f"netsetup: {msg}", flush=True)


def _warn(msg: str) -> None:
    print(f"netsetup: {msg}", file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"netsetup: invalid arguments: {message}", file=sys.stderr)
        raise SystemExit(EXIT_SETTINGS)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    for var, flag in FLAGS.items():
        common.add_argument(flag, dest=var, metavar="VALUE", default=None,
                            help=f"overrides ${var} (default {ENV_DEFAULTS[var] or 'empty'})")
    p = _Parser(prog="netsetup", description="Program and verify BotBox's redirect/egress rules.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    pp = sub.add_parser("plan", parents=[common], help="print the rules, touch nothing")
    pp.add_argument("--format", choices=["auto", "iptables", "nft", "both"], default="auto",
                    help="auto: the backend from BOTBOX_IPTABLES_BACKEND, both when auto")
    for name, hlp in (("apply", "install the rules, then verify"), ("verify", "read back and compare")):
        sp = sub.add_parser(name, parents=[common], help=hlp)
        sp.add_argument("--probe", action="store_true", help="also prove the redirect live (N6)")
        sp.add_argument("--strict", action="store_true", help="fail on cgroup BPF programs (N7)")
        sp.add_argument("--probe-uid", type=int, default=None,
                        help="non-proxy uid for --probe (default 65534, or BOTBOX_UID+1 if that is 65534)")
        if name == "apply":
            sp.add_argument("--dry-run", action="store_true", help="print the plan instead (same as plan)")
    sub.add_parser("remove", parents=[common], help="delete exactly BotBox's rules/chains/table")
    return p


def _settings(ns: argparse.Namespace) -> Settings:
    flags = {var: getattr(ns, var, None) for var in FLAGS}
    return parse_settings(os.environ, flags)


def _print_plan(plan: Plan, fmt: str) -> None:
    if fmt in ("iptables", "both"):
        for text in render_iptables_save(plan).values():
            print(text, end="")
    if fmt in ("nft", "both"):
        print(render_nft(plan), end="")


def _prepare(settings: Settings) -> tuple[Plan, list[str]]:
    families, warnings = resolve_families(settings, ipv6_state())
    plan = build_plan(settings, families)
    return plan, warnings + list(plan.warnings)


def _choose(settings: Settings, plan: Plan) -> Backend:
    families = tuple(fp.family for fp in plan.families)
    backend, decision = detect(settings, families)
    for w in decision.warnings:
        _warn(w)
    _say(f"backend: {decision.reason}")
    return backend


def run(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        settings = _settings(ns)
    except SettingsError as e:
        _warn(f"invalid settings: {e}")
        return EXIT_SETTINGS
    try:
        if ns.cmd == "remove":
            return _remove(settings)
        plan, warnings = _prepare(settings)
        for w in warnings:
            _warn(w)
        if ns.cmd == "plan" or (ns.cmd == "apply" and ns.dry_run):
            fmt = getattr(ns, "format", "auto")
            if fmt == "auto":
                fmt = {"legacy": "iptables", "nft": "nft"}.get(settings.backend, "both")
            _print_plan(plan, fmt)
            return EXIT_OK
        backend = _choose(settings, plan)
        try:
            if ns.cmd == "apply":
                _say(f"applying {'+'.join(fp.family for fp in plan.families)} rules")
                for m in backend.apply(plan):
                    _say(m)
                _remove_stale(settings, backend.name)
            rep = verify(backend, plan, probe=ns.probe, strict=ns.strict, probe_uid=ns.probe_uid,
                         emit=print)
        finally:
            close_backend(backend)
        return EXIT_OK if rep.ok else EXIT_VERIFY
    except BackendUnavailable as e:
        _warn(f"unavailable: {e}")
        return EXIT_UNAVAILABLE
    except BackendError as e:
        _warn(f"error: {e} (installed rules left as they are)")
        return EXIT_ERROR


def _remove_stale(settings: Settings, current: str) -> None:
    """BotBox objects left in the *other* backend (backend switched) would keep enforcing old settings
    (e.g. an old proxy uid); remove them now that the current backend's rules are in place."""
    other = "legacy" if current == "nft" else "nft"
    b = make_backend(other, settings)
    try:
        if b.holds_ours(settings):
            _warn(f"{other} still holds BotBox objects from an earlier run; removing them "
                  f"(the {current} rules are already in place)")
            for m in b.remove(settings):
                _say(m)
    finally:
        close_backend(b)


def _remove(settings: Settings) -> int:
    names = ["nft", "legacy"] if settings.backend == "auto" else [settings.backend]
    for n in names:
        b = make_backend(n, settings)
        try:
            if settings.backend == "auto" and not b.holds_ours(settings):
                _say(f"{n}: nothing of BotBox's installed")
                continue
            for m in b.remove(settings):
                _say(m)
        finally:
            close_backend(b)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv)
