"""Proxy configuration: pydantic models of CONTRACT §2, loading and validation.

Every model forbids unknown keys and validates strictly (``"443"`` is not a port, ``true`` is not a
number). Validation errors are reported as :class:`ConfigError` whose ``errors`` are lines like
``egress_policy.rules[2].host: why``. No error message ever echoes a header template (a static
template may itself be a credential).

Choices where the contract is silent (all "fail closed"):

* ``rules[].action`` is required (a rule without an explicit action is ambiguous).
* ``deny`` rules may carry neither ``header_rewrites`` nor ``allowed_ports`` (a deny rule denies
  every port; either field would suggest a misunderstanding).
* Timeouts are numbers > 0 and at most one day; ``shutdown_grace_seconds`` may be 0.
* Header templates must be printable ASCII (plus inner spaces/tabs), without leading/trailing
  whitespace; the only placeholder is ``{value}``; no other ``{``/``}`` is allowed.
* ``Content-Length`` is refused as a rewrite name in addition to SECURITY-SPEC S1's list.
* YAML mappings with duplicate keys are refused (PyYAML would silently keep the last one).
* ``https_interception`` port checks apply even when ``enabled: false``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from botbox.hostname import InvalidHost, canonicalize_host, parse_authority

__all__ = [
    "PROXY_UID",
    "RESERVED_HEADER_NAMES",
    "Config",
    "ConfigError",
    "EgressPolicyConfig",
    "HeaderRewriteConfig",
    "HttpsInterception",
    "RuleConfig",
    "describe_effective_policy",
    "load_config",
    "non_loopback_warnings",
    "parse_config",
    "startup_warnings",
]

PROXY_UID = 1337
_MAX_CONFIG_BYTES = 4 * 1024 * 1024
_MAX_TIMEOUT = 86400.0

# SECURITY-SPEC S1 plus Content-Length: rewriting Content-Length would let a rule desynchronise the
# upstream message framing from the body the proxy actually forwards (request smuggling), and the
# proxy alone decides framing. The rest are hop-by-hop (R2) or the Host the proxy derives itself (R3).
RESERVED_HEADER_NAMES: frozenset[str] = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)
_SECRET_REF = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,252}", re.ASCII)
_TEMPLATE_CHARS = re.compile(r"[\x20-\x7e\t]*", re.ASCII)
_PLACEHOLDER = "{value}"

Port = Annotated[int, Field(ge=1, le=65535, strict=True)]
Timeout = Annotated[float, Field(gt=0, le=_MAX_TIMEOUT, allow_inf_nan=False)]
def _path_text(v: object) -> object:
    if isinstance(v, str) and (not v.strip() or "\x00" in v):
        raise ValueError("must be a non-empty path without NUL")
    if not isinstance(v, str | Path):
        raise ValueError("must be a path string")  # noqa: TRY004 - pydantic only converts ValueError
    return v


FilePath = Annotated[Path, BeforeValidator(_path_text), Field(strict=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class HeaderRewriteConfig(_Model):
    name: str
    value: str = Field(repr=False)  # a static template may itself be a credential
    secret_ref: str | None = Field(default=None, validate_default=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TOKEN.fullmatch(v):
            raise ValueError("header name must be a valid HTTP token (RFC 7230)")
        if v.lower() in RESERVED_HEADER_NAMES:
            raise ValueError(f"header {v!r} is reserved/hop-by-hop and cannot be rewritten")
        return v

    @field_validator("value")
    @classmethod
    def _value(cls, v: str) -> str:
        if any(c in v for c in "\r\n\x00"):
            raise ValueError("template must not contain CR, LF or NUL")
        if not _TEMPLATE_CHARS.fullmatch(v):
            raise ValueError("template must be printable ASCII (control characters and non-ASCII refused)")
        if v != v.strip(" \t"):
            raise ValueError("template must not start or end with whitespace")
        rest = v.replace(_PLACEHOLDER, "")
        if "{" in rest or "}" in rest:
            raise ValueError("template may contain no placeholder other than {value}")
        return v

    @field_validator("secret_ref")
    @classmethod
    def _secret_ref(cls, v: str | None, info: ValidationInfo) -> str | None:
        template = info.data.get("value")
        if v is None:
            if template is not None and _PLACEHOLDER in template:
                raise ValueError("template uses {value} but no secret_ref is set")
            return v
        if not _SECRET_REF.fullmatch(v):
            raise ValueError(
                "secret_ref must be a plain file name (letters, digits, '.', '_', '-'; "
                "no '/', not starting with '.')"
            )
        if template is not None and _PLACEHOLDER not in template:
            raise ValueError("secret_ref is set but the template does not contain {value}")
        return v


class RuleConfig(_Model):
    host: str
    action: Literal["allow", "deny"]
    allowed_ports: list[Port] | None = None
    header_rewrites: list[HeaderRewriteConfig] = Field(default_factory=list)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        try:
            return canonicalize_host(v)  # also accepts a bare IPv6 literal
        except InvalidHost as e:
            first_error = str(e)
        try:
            _, port = parse_authority(v)
        except InvalidHost:
            raise ValueError(first_error) from None
        if port is not None:
            raise ValueError(f"{v!r}: a port does not belong in host; list it in allowed_ports")
        raise ValueError(first_error)  # pragma: no cover - parse_authority is stricter

    @field_validator("allowed_ports")
    @classmethod
    def _ports(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if v is None:
            return v
        if info.data.get("action") == "deny":
            raise ValueError("a deny rule denies every port; allowed_ports is not allowed on it")
        if not v:
            raise ValueError("must not be empty (omit it for the default [443])")
        if len(set(v)) != len(v):
            raise ValueError("duplicate ports")
        return v

    @field_validator("header_rewrites")
    @classmethod
    def _rewrites(cls, v: list[HeaderRewriteConfig], info: ValidationInfo) -> list[HeaderRewriteConfig]:
        if v and info.data.get("action") == "deny":
            raise ValueError("a deny rule must not carry header_rewrites")
        seen: dict[str, int] = {}
        for i, hr in enumerate(v):
            key = hr.name.lower()
            if key in seen:
                raise ValueError(
                    f"header_rewrites[{seen[key]}] and header_rewrites[{i}] both rewrite {hr.name!r}"
                )
            seen[key] = i
        return v

    @property
    def ports(self) -> tuple[int, ...]:
        """Effective allowed ports (P3: omitted = 443 only)."""
        return tuple(self.allowed_ports) if self.allowed_ports is not None else (443,)


class EgressPolicyConfig(_Model):
    default_action: Literal["allow", "deny"] = "deny"
    rules: list[RuleConfig] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _unique(cls, v: list[RuleConfig]) -> list[RuleConfig]:
        problems = _duplicate_messages([(i, r.host) for i, r in enumerate(v)])
        if problems:
            raise ValueError("; ".join(problems))
        return v


def _duplicate_messages(hosts: list[tuple[int, str]]) -> list[str]:
    first: dict[str, int] = {}
    out: list[str] = []
    for i, h in hosts:
        if h in first:
            out.append(f"rules[{first[h]}] and rules[{i}] both canonicalise to host {h!r} (P2)")
        else:
            first[h] = i
    return out


class HttpsInterception(_Model):
    enabled: bool = False
    listen_addr: str = "127.0.0.1"
    listen_port: Port = 8443
    ca_cert_path: FilePath = Path("/etc/botbox/ca/tls.crt")
    ca_key_path: FilePath = Path("/etc/botbox/ca/tls.key")
    enforce_sni_host_match: bool = True
    deny_handshake_on_disallowed_sni: bool = False
    cert_ttl_seconds: Annotated[int, Field(ge=60, le=604800)] = 86400
    cert_cache_size: Annotated[int, Field(gt=0, le=1_000_000)] = 1024
    cert_cache_ttl_seconds: Annotated[int, Field(gt=0)] = 3600
    handshake_timeout_ms: Annotated[int, Field(ge=100, le=60000)] = 5000

    @field_validator("listen_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        ip = _ip_literal(v)
        if not ip.is_loopback:
            raise ValueError("the interception listener must be loopback (L2)")
        return ip.compressed

    @field_validator("cert_cache_ttl_seconds")
    @classmethod
    def _cache_ttl(cls, v: int, info: ValidationInfo) -> int:
        ttl = info.data.get("cert_ttl_seconds")
        if ttl is not None and v > ttl:
            raise ValueError(f"must be <= cert_ttl_seconds ({ttl})")
        return v


def _ip_literal(v: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if "%" in v:
        raise ValueError("IPv6 zone identifiers are not allowed")
    try:
        return ipaddress.ip_address(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an IP literal (host names are not allowed here)") from None


class Config(_Model):
    # allow_non_loopback is declared first so the address validators can see it.
    allow_non_loopback: bool = False
    listen_addr: str = "127.0.0.1"
    listen_port: Port = 8080
    metrics_addr: str = "127.0.0.1"
    metrics_port: Port = Field(default=9090, validate_default=True)
    secrets_dir: FilePath = Path("/var/run/secrets/botbox")
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    upstream_ca_file: FilePath | None = None
    connect_timeout_seconds: Timeout = 10.0
    upstream_idle_timeout_seconds: Timeout = 300.0
    request_header_timeout_seconds: Timeout = 10.0
    shutdown_grace_seconds: Annotated[float, Field(ge=0, le=_MAX_TIMEOUT, allow_inf_nan=False)] = 30.0
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    egress_policy: EgressPolicyConfig = Field(default_factory=EgressPolicyConfig)
    https_interception: HttpsInterception | None = None

    @field_validator("listen_addr", "metrics_addr")
    @classmethod
    def _addr(cls, v: str, info: ValidationInfo) -> str:
        ip = _ip_literal(v)
        if not ip.is_loopback and not info.data.get("allow_non_loopback", False):
            raise ValueError(
                f"{v!r} is not loopback; set allow_non_loopback: true to expose it (L1), "
                "which makes the proxy reachable from outside the pod"
            )
        return ip.compressed

    @field_validator("metrics_port")
    @classmethod
    def _metrics_port(cls, v: int, info: ValidationInfo) -> int:
        if v == info.data.get("listen_port"):
            raise ValueError(f"{v} must differ from listen_port ({v})")
        return v

    @field_validator("https_interception")
    @classmethod
    def _interception(cls, v: HttpsInterception | None, info: ValidationInfo) -> HttpsInterception | None:
        if v is None:
            return v
        clashes = [k for k in ("listen_port", "metrics_port") if info.data.get(k) == v.listen_port]
        if clashes:
            raise ValueError(
                f"listen_port {v.listen_port} must differ from the top-level " + " and ".join(clashes)
            )
        return v

    @property
    def interception_enabled(self) -> bool:
        return self.https_interception is not None and self.https_interception.enabled


class ConfigError(Exception):
    """Invalid configuration. ``errors`` holds one ``path: why`` line per problem."""

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n" + "\n".join(f"  {e}" for e in self.errors))


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}", re.ASCII)


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            # Unknown keys come from the file: quote them so control characters or dots cannot
            # forge another path or break the one-line-per-error output.
            shown = part if len(part) <= 60 else part[:60] + "…"
            out += f"[{shown!r}]"
    return out or "<top level>"


def _format_errors(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        msg = str(err["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{_loc_to_path(tuple(err['loc']))}: {msg}")
    return lines


def _raw_duplicate_scan(data: object) -> list[str]:
    """Best-effort P2 scan on raw data, so duplicates are reported even when another error in a
    rule (e.g. a port in ``host``) stops pydantic from reaching the list-level check."""
    if not isinstance(data, dict):
        return []
    ep = data.get("egress_policy")
    rules = ep.get("rules") if isinstance(ep, dict) else None
    if not isinstance(rules, list):
        return []
    hosts: list[tuple[int, str]] = []
    for i, r in enumerate(rules):
        if isinstance(r, dict) and isinstance(r.get("host"), str):
            try:
                hosts.append((i, canonicalize_host(r["host"])))
                continue
            except InvalidHost:
                pass
            try:
                hosts.append((i, parse_authority(r["host"])[0]))
            except InvalidHost:
                continue
    return [f"egress_policy.rules: {m}" for m in _duplicate_messages(hosts)]


def parse_config(data: object, source: str | None = None) -> Config:
    """Validate already-parsed YAML. Raises :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["<top level>: must be a mapping"], source)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        errors = _format_errors(e)
        for extra in _raw_duplicate_scan(data):
            if extra not in errors:
                errors.append(extra)
        raise ConfigError(errors, source) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            dup = key in seen
        except TypeError:
            continue
        if dup:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file. Raises :class:`ConfigError` naming the file for a
    missing/unreadable file, invalid YAML, a non-mapping top level or any validation error."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"<file>: cannot read: {e.strerror or type(e).__name__}"], name) from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ConfigError([f"<file>: larger than {_MAX_CONFIG_BYTES} bytes"], name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(["<file>: not valid UTF-8"], name) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError([f"<yaml>: {where}{e.problem or e.context or 'invalid YAML'}"], name) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"<yaml>: invalid YAML ({type(e).__name__})"], name) from None
    return parse_config(data, name)


# --- helpers for the runtime and check-config ---------------------------------------------------


def non_loopback_warnings(cfg: Config) -> list[str]:
    """Warnings the runtime must log at startup for non-loopback listeners (L1)."""
    out: list[str] = []
    for field in ("listen_addr", "metrics_addr"):
        addr = getattr(cfg, field)
        if not ipaddress.ip_address(addr).is_loopback:
            out.append(
                f"{field} {addr} is not loopback (allow_non_loopback: true): the listener is reachable "
                "from outside the pod; anyone who can reach it can use the proxy's allowlist and "
                "injected credentials"
            )
    return out


def startup_warnings(cfg: Config) -> list[str]:
    """Every warning due at startup: non-loopback listeners and ``default_action: allow``."""
    out = non_loopback_warnings(cfg)
    if cfg.egress_policy.default_action == "allow":
        out.append(
            "egress_policy.default_action is allow: unknown hosts are reachable on port 443 "
            "(without credentials); deny is the safe default"
        )
    return out


def _iter_policy_lines(cfg: Config) -> Iterator[str]:
    ep = cfg.egress_policy
    yield f"listener: http {_hostport(cfg.listen_addr, cfg.listen_port)}"
    hi = cfg.https_interception
    if hi is not None and hi.enabled:
        yield f"listener: https_interception {_hostport(hi.listen_addr, hi.listen_port)}"
    yield f"listener: admin {_hostport(cfg.metrics_addr, cfg.metrics_port)}"
    yield f"workers: {cfg.workers}, max_connections: {cfg.max_connections}"
    yield f"secrets_dir: {cfg.secrets_dir}"
    extra_ca = f" + {cfg.upstream_ca_file}" if cfg.upstream_ca_file else ""
    yield f"upstream trust: certifi web PKI roots{extra_ca}"
    yield f"default_action: {ep.default_action}"
    if ep.default_action == "allow":
        yield (
            "WARNING: default_action allow admits every unknown host on port 443 (never with "
            "credentials); prefer deny"
        )
    yield f"rules: {len(ep.rules)}"
    for r in ep.rules:
        if r.action == "deny":
            yield f"  - {r.host}: deny (all ports)"
            continue
        ports = ",".join(str(p) for p in r.ports)
        yield f"  - {r.host}: allow ports [{ports}]"
        for hr in r.header_rewrites:
            src = f"secret {hr.secret_ref!r}" if hr.secret_ref else "static value"
            yield f"      rewrites header {hr.name} from {src}"
    refs = sorted({hr.secret_ref for r in ep.rules for hr in r.header_rewrites if hr.secret_ref})
    yield "referenced secrets: " + (", ".join(refs) if refs else "(none)")
    if hi is None or not hi.enabled:
        yield "https_interception: disabled"
    else:
        yield (
            f"https_interception: enabled, CA {hi.ca_cert_path} (key {hi.ca_key_path}), "
            f"enforce_sni_host_match={str(hi.enforce_sni_host_match).lower()}, "
            f"deny_handshake_on_disallowed_sni={str(hi.deny_handshake_on_disallowed_sni).lower()}, "
            f"cert_ttl={hi.cert_ttl_seconds}s, cache={hi.cert_cache_size} for {hi.cert_cache_ttl_seconds}s, "
            f"handshake_timeout={hi.handshake_timeout_ms}ms"
        )
    for w in non_loopback_warnings(cfg):
        yield f"WARNING: {w}"
    yield (
        f"REMINDER: the app must not run as uid {PROXY_UID} (the proxy uid): traffic of that uid is "
        "exempt from the redirect and filter (SECURITY-SPEC D2)"
    )


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def describe_effective_policy(cfg: Config) -> str:
    """Human-readable effective policy for ``botbox check-config``. Names secrets, never values;
    never prints header templates (a static template may itself be a credential)."""
    return "\n".join(_iter_policy_lines(cfg)) + "\n"
