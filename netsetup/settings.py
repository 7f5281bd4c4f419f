"""netsetup settings: CONTRACT §1 environment variables and equivalent ``--flags`` (flags win).

Parsing is strict: anything that is not exactly a valid value raises :class:`SettingsError` whose message
is one line naming the variable (or flag) and why.  The CLI turns it into exit code 2.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Backend = Literal["auto", "legacy", "nft"]
Ipv6Mode = Literal["auto", "0", "1"]

# (env var, flag, default)
ENV_DEFAULTS: dict[str, str] = {
    "BOTBOX_UID": "1337",
    "BOTBOX_PROXY_PORT": "8080",
    "BOTBOX_REDIRECT_FROM_PORT": "80",
    "BOTBOX_ENABLE_HTTPS_INTERCEPTION": "0",
    "BOTBOX_HTTPS_INTERCEPTION_PORT": "8443",
    "BOTBOX_ENABLE_IPV6": "auto",
    "BOTBOX_IPTABLES_BACKEND": "auto",
    "BOTBOX_NAT_CHAIN": "EGRESS_REDIRECT",
    "BOTBOX_FILTER_CHAIN": "EGRESS_FILTER",
    "BOTBOX_IPTABLES_WAIT_SECONDS": "5",
    "BOTBOX_DNS_SERVERS": "",
}

#: env var -> CLI flag (``--uid`` etc.); the flag takes the same textual value as the variable.
FLAGS: dict[str, str] = {
    "BOTBOX_UID": "--uid",
    "BOTBOX_PROXY_PORT": "--proxy-port",
    "BOTBOX_REDIRECT_FROM_PORT": "--redirect-from-port",
    "BOTBOX_ENABLE_HTTPS_INTERCEPTION": "--enable-https-interception",
    "BOTBOX_HTTPS_INTERCEPTION_PORT": "--https-interception-port",
    "BOTBOX_ENABLE_IPV6": "--enable-ipv6",
    "BOTBOX_IPTABLES_BACKEND": "--backend",
    "BOTBOX_NAT_CHAIN": "--nat-chain",
    "BOTBOX_FILTER_CHAIN": "--filter-chain",
    "BOTBOX_IPTABLES_WAIT_SECONDS": "--wait-seconds",
    "BOTBOX_DNS_SERVERS": "--dns-servers",
}

_CHAIN_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,27}$")  # xtables: at most 28 characters
_BUILTIN_CHAINS = frozenset({"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"})
_TARGET_NAMES = frozenset({"ACCEPT", "DROP", "RETURN", "QUEUE", "REJECT", "REDIRECT", "DNAT", "SNAT",
                           "MASQUERADE", "LOG", "MARK", "CT", "TPROXY", "NFQUEUE"})
MAX_UID = 2**32 - 2  # (uid_t)-1 is "no uid"
MAX_WAIT_SECONDS = 3600


class SettingsError(ValueError):
    """Invalid setting; ``str()`` is a one-line reason naming the variable."""


@dataclass(frozen=True)
class Settings:
    uid: int = 1337
    proxy_port: int = 8080
    redirect_from_port: int = 80
    https_interception: bool = False
    https_interception_port: int = 8443
    enable_ipv6: Ipv6Mode = "auto"
    backend: Backend = "auto"
    nat_chain: str = "EGRESS_REDIRECT"
    filter_chain: str = "EGRESS_FILTER"
    wait_seconds: int = 5
    dns_servers: tuple[str, ...] = field(default_factory=tuple)

    def dns_servers_for(self, family: int) -> tuple[str, ...]:
        return tuple(s for s in self.dns_servers if ipaddress.ip_address(s).version == family)


def _name(var: str, from_flag: bool) -> str:
    return f"{FLAGS[var]} ({var})" if from_flag else var


def _int(var: str, raw: str, from_flag: bool, *, lo: int, hi: int, what: str) -> int:
    # Strict decimal: no sign, no whitespace, no leading zeros, no underscores (int() accepts all of those).
    if not re.fullmatch(r"0|[1-9][0-9]*", raw):
        raise SettingsError(f"{_name(var, from_flag)}: {what} must be a decimal integer, got {raw!r}")
    v = int(raw)
    if not lo <= v <= hi:
        raise SettingsError(f"{_name(var, from_flag)}: {what} must be in {lo}..{hi}, got {v}")
    return v


def _port(var: str, raw: str, from_flag: bool) -> int:
    return _int(var, raw, from_flag, lo=1, hi=65535, what="port")


def _chain(var: str, raw: str, from_flag: bool) -> str:
    if not _CHAIN_RE.match(raw):
        raise SettingsError(
            f"{_name(var, from_flag)}: chain name must be 1..28 characters [A-Za-z0-9_-] starting with a "
            f"letter, got {raw!r}")
    if raw.upper() in _BUILTIN_CHAINS or raw.upper() in _TARGET_NAMES:
        raise SettingsError(f"{_name(var, from_flag)}: {raw!r} is a built-in chain or target name")
    return raw


def _dns(var: str, raw: str, from_flag: bool) -> tuple[str, ...]:
    if raw == "":
        return ()
    out: list[str] = []
    for item in raw.split(","):
        s = item.strip()
        try:
            addr = ipaddress.ip_address(s)
        except ValueError:
            raise SettingsError(
                f"{_name(var, from_flag)}: {s!r} is not an IP address (comma-separated IPs expected)"
            ) from None
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
            raise SettingsError(f"{_name(var, from_flag)}: {s!r}: scoped IPv6 addresses are not supported")
        if addr.is_unspecified or addr.is_multicast:
            raise SettingsError(f"{_name(var, from_flag)}: {s!r} is not a unicast address")
        if str(addr) not in out:
            out.append(str(addr))
    return tuple(out)


def parse_settings(env: Mapping[str, str], flags: Mapping[str, str | None] | None = None) -> Settings:
    """Build :class:`Settings` from environment ``env`` and ``flags`` (env var name -> flag value).

    A flag value of ``None`` means "not given".  Raises :class:`SettingsError`.
    """
    flags = flags or {}
    raw: dict[str, tuple[str, bool]] = {}
    for var, default in ENV_DEFAULTS.items():
        fv = flags.get(var)
        if fv is not None:
            raw[var] = (fv, True)
        else:
            raw[var] = (env.get(var, default), False)

    def get(var: str) -> tuple[str, str, bool]:
        v, ff = raw[var]
        return var, v, ff

    uid = _int(*get("BOTBOX_UID"), lo=0, hi=MAX_UID, what="uid")
    if uid == 0:
        raise SettingsError(f"{_name('BOTBOX_UID', raw['BOTBOX_UID'][1])}: uid 0 cannot be the proxy uid "
                            "(every root process in the pod would bypass the redirect and the filter)")
    proxy_port = _port(*get("BOTBOX_PROXY_PORT"))
    redirect_from = _port(*get("BOTBOX_REDIRECT_FROM_PORT"))
    var, v, ff = get("BOTBOX_ENABLE_HTTPS_INTERCEPTION")
    if v not in ("0", "1"):
        raise SettingsError(f"{_name(var, ff)}: must be 0 or 1, got {v!r}")
    interception = v == "1"
    interception_port = _port(*get("BOTBOX_HTTPS_INTERCEPTION_PORT"))
    var, v, ff = get("BOTBOX_ENABLE_IPV6")
    if v not in ("auto", "0", "1"):
        raise SettingsError(f"{_name(var, ff)}: must be auto, 0 or 1, got {v!r}")
    ipv6: Ipv6Mode = v  # type: ignore[assignment]
    var, v, ff = get("BOTBOX_IPTABLES_BACKEND")
    if v not in ("auto", "legacy", "nft"):
        raise SettingsError(f"{_name(var, ff)}: must be auto, legacy or nft, got {v!r}")
    backend: Backend = v  # type: ignore[assignment]
    nat_chain = _chain(*get("BOTBOX_NAT_CHAIN"))
    filter_chain = _chain(*get("BOTBOX_FILTER_CHAIN"))
    if nat_chain == filter_chain:
        raise SettingsError(
            f"{_name('BOTBOX_FILTER_CHAIN', raw['BOTBOX_FILTER_CHAIN'][1])}: must differ from "
            f"BOTBOX_NAT_CHAIN (the nft backend keeps both chains in one table)")
    wait = _int(*get("BOTBOX_IPTABLES_WAIT_SECONDS"), lo=0, hi=MAX_WAIT_SECONDS, what="seconds")
    dns = _dns(*get("BOTBOX_DNS_SERVERS"))

    if interception and redirect_from == 443:
        raise SettingsError(
            f"{_name('BOTBOX_REDIRECT_FROM_PORT', raw['BOTBOX_REDIRECT_FROM_PORT'][1])}: 443 cannot be "
            "redirected to the HTTP listener while BOTBOX_ENABLE_HTTPS_INTERCEPTION=1 (443 goes to the "
            "interception listener)")
    if interception and interception_port == proxy_port:
        raise SettingsError(
            f"{_name('BOTBOX_HTTPS_INTERCEPTION_PORT', raw['BOTBOX_HTTPS_INTERCEPTION_PORT'][1])}: must "
            f"differ from BOTBOX_PROXY_PORT ({proxy_port})")
    return Settings(
        uid=uid, proxy_port=proxy_port, redirect_from_port=redirect_from, https_interception=interception,
        https_interception_port=interception_port, enable_ipv6=ipv6, backend=backend, nat_chain=nat_chain,
        filter_chain=filter_chain, wait_seconds=wait, dns_servers=dns,
    )
