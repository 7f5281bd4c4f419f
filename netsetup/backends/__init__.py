"""Rule backends (legacy x_tables via python-iptables, nf_tables via ``nft -j``) and ``auto`` detection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from netsetup.plan import Plan
from netsetup.settings import Settings

Status = Literal["ok", "missing", "extra", "misplaced", "wrong"]


class BackendUnavailable(Exception):
    """The required backend, table or family cannot be used here (CLI exit 3)."""


class BackendError(Exception):
    """The backend failed while changing rules (CLI exit 1; rules are left as they are: fail closed)."""


@dataclass(frozen=True)
class Check:
    """One line of the verify report: ``table family chain rule: status``."""

    table: str
    family: str
    chain: str
    rule: str
    status: Status

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def line(self) -> str:
        return f"{self.table} {self.family} {self.chain} {self.rule}: {self.status}"


class Backend(Protocol):
    name: Literal["legacy", "nft"]

    def probe(self, families: tuple[str, ...]) -> None:
        """Raise :class:`BackendUnavailable` unless every table needed for ``families`` works here."""

    def rule_count(self) -> int:
        """Number of rules currently installed through this backend (any owner, any family)."""

    def holds_ours(self, settings: Settings) -> bool:
        """True if BotBox objects exist in this backend."""

    def apply(self, plan: Plan) -> list[str]:
        """Install ``plan`` atomically per table and family; return what was done."""

    def remove(self, settings: Settings) -> list[str]:
        """Delete exactly BotBox-tagged objects; return what was done."""

    def read_back(self, plan: Plan) -> list[Check]:
        """Compare the installed rules with ``plan``."""


def compare_rules(expected: list[str], actual: list[str], *, table: str, family: str,
                  chain: str) -> list[Check]:
    """Per-rule report of ``actual`` (installed, in order) against ``expected`` (planned, in order).

    Each planned rule is ``ok`` when it sits at its planned position, ``misplaced`` when it is present but
    elsewhere (order matters: a REJECT before an ACCEPT changes meaning), ``missing`` when absent; every
    installed rule that is not planned (or a surplus duplicate) is ``extra``.
    """
    checks: list[Check] = []
    remaining = list(actual)
    for i, e in enumerate(expected):
        if i < len(actual) and actual[i] == e:
            checks.append(Check(table, family, chain, e, "ok"))
            remaining.remove(e)
        elif e in remaining:
            checks.append(Check(table, family, chain, e, "misplaced"))
            remaining.remove(e)
        else:
            checks.append(Check(table, family, chain, e, "missing"))
    for a in remaining:
        checks.append(Check(table, family, chain, a, "extra"))
    return checks
