"""Egress policy decisions (SECURITY-SPEC P1-P4, R7). Pure: no I/O, one dict lookup per request.

``Policy.decide`` expects a host already canonicalised with :func:`botbox.hostname.canonicalize_host`
(the same function used for the rules). Decisions for allowed rule matches are precomputed, so the
hot path allocates nothing.

``metric_host`` (CONTRACT §5 ``host`` label) is the canonical rule host for allowed rule matches,
``_default_allow`` for hosts admitted by ``default_action: allow`` (the contract only defines
``_denied``; labelling each unknown host would make metric cardinality unbounded, so they share one
label: a contract gap noted in the report) and ``_denied`` for every denial.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from botbox.config import EgressPolicyConfig

__all__ = [
    "DEFAULT_ALLOW_METRIC_HOST",
    "DENIED_METRIC_HOST",
    "Decision",
    "HeaderRewrite",
    "Policy",
]

DENIED_METRIC_HOST = "_denied"
DEFAULT_ALLOW_METRIC_HOST = "_default_allow"
DEFAULT_RULE = "default"
DEFAULT_ALLOW_PORT = 443
PLACEHOLDER = b"{value}"

# Decision.reason values
REASON_RULE_ALLOW = "rule_allow"
REASON_DEFAULT_ALLOW = "default_allow"
REASON_RULE_DENY = "rule_deny"
REASON_NO_RULE = "no_rule"
REASON_PORT = "port"


@dataclass(frozen=True, slots=True)
class HeaderRewrite:
    name: str
    name_lower: bytes
    template: str
    secret_ref: str | None
    # Pre-split template: the value is secret.join(parts) (or parts[0] for a static template).
    parts: tuple[bytes, ...] = field(init=False, repr=False, compare=False)
    name_bytes: bytes = field(init=False, repr=False, compare=False)
    # Length of the rendered value without the secret (to detect an empty secret).
    static_len: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tpl = self.template.encode("ascii")
        parts = tuple(tpl.split(PLACEHOLDER)) if self.secret_ref is not None else (tpl,)
        object.__setattr__(self, "parts", parts)
        object.__setattr__(self, "name_bytes", self.name.encode("ascii"))
        object.__setattr__(self, "static_len", sum(len(p) for p in parts))

    def __repr__(self) -> str:
        # The template is deliberately not shown: a static template may itself be a credential.
        return f"HeaderRewrite(name={self.name!r}, secret_ref={self.secret_ref!r})"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    host: str  # canonical host the proxy will connect to (P5)
    port: int
    rule: str  # matched rule's canonical host, or "default"
    rewrites: tuple[HeaderRewrite, ...]  # empty for TRACE, default-allow hosts and denies
    metric_host: str  # canonical rule host, "_default_allow" or "_denied"
    reason: str  # "rule_allow", "default_allow", "rule_deny", "no_rule", "port"


@dataclass(frozen=True, slots=True)
class _Rule:
    host: str
    allow: bool
    ports: frozenset[int]
    # port -> precomputed decision (normal methods / TRACE)
    decisions: dict[int, Decision]
    trace_decisions: dict[int, Decision]


class Policy:
    """Immutable compiled policy. Build with :meth:`from_config`."""

    __slots__ = ("_default_allow", "_rules", "referenced_secrets", "rewritten_header_names")

    def __init__(self, rules: dict[str, _Rule], default_allow: bool) -> None:
        self._rules = rules
        self._default_allow = default_allow
        self.referenced_secrets: frozenset[str] = frozenset(
            hr.secret_ref
            for r in rules.values()
            for d in r.decisions.values()
            for hr in d.rewrites
            if hr.secret_ref is not None
        )
        self.rewritten_header_names: frozenset[bytes] = frozenset(
            hr.name_lower for r in rules.values() for d in r.decisions.values() for hr in d.rewrites
        )

    @classmethod
    def from_config(cls, cfg: EgressPolicyConfig) -> Policy:
        rules: dict[str, _Rule] = {}
        for rc in cfg.rules:
            if rc.host in rules:  # config validation already refuses this (P2); never shadow silently
                raise ValueError(f"duplicate rule for host {rc.host!r}")
            allow = rc.action == "allow"
            rewrites = tuple(
                HeaderRewrite(
                    name=hr.name,
                    name_lower=hr.name.lower().encode("ascii"),
                    template=hr.value,
                    secret_ref=hr.secret_ref,
                )
                for hr in rc.header_rewrites
            )
            ports = frozenset(rc.ports) if allow else frozenset()
            decisions = {
                p: Decision(True, rc.host, p, rc.host, rewrites, rc.host, REASON_RULE_ALLOW) for p in ports
            }
            trace = {p: Decision(True, rc.host, p, rc.host, (), rc.host, REASON_RULE_ALLOW) for p in ports}
            rules[rc.host] = _Rule(rc.host, allow, ports, decisions, trace)
        return cls(rules, cfg.default_action == "allow")

    def decide(self, host: str, port: int, method: str) -> Decision:
        """Decide for a canonical ``host``, the destination ``port`` and the request ``method``.

        TRACE (compared case-insensitively: some servers fold method case) never gets rewrites (R7).
        """
        rule = self._rules.get(host)
        if rule is not None:
            if not rule.allow:
                return Decision(False, host, port, host, (), DENIED_METRIC_HOST, REASON_RULE_DENY)
            table = rule.trace_decisions if method.upper() == "TRACE" else rule.decisions
            d = table.get(port)
            if d is not None:
                return d
            return Decision(False, host, port, host, (), DENIED_METRIC_HOST, REASON_PORT)
        if self._default_allow:
            if port == DEFAULT_ALLOW_PORT:
                return Decision(
                    True, host, port, DEFAULT_RULE, (), DEFAULT_ALLOW_METRIC_HOST, REASON_DEFAULT_ALLOW
                )
            return Decision(False, host, port, DEFAULT_RULE, (), DENIED_METRIC_HOST, REASON_PORT)
        return Decision(False, host, port, DEFAULT_RULE, (), DENIED_METRIC_HOST, REASON_NO_RULE)

    @property
    def default_allow(self) -> bool:
        return self._default_allow

    def rule_hosts(self) -> frozenset[str]:
        return frozenset(self._rules)
