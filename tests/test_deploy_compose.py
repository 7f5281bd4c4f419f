"""compose.yaml without Docker: the pod wiring and SECURITY-SPEC D1-D3 on the parsed file.

The end-to-end run is integration/compose/test_compose.py; this checks the file itself in milliseconds,
so a careless edit (a published port, a writable secret mount, the app as uid 1337) fails everywhere,
also where no Docker engine can be started.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml

from botbox.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
SENSITIVE_VOLUMES = {"botbox-ca", "botbox-secrets"}


def _uid(svc: dict[str, Any]) -> int:
    return int(str(svc["user"]).split(":")[0])


def _volumes(svc: dict[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    for v in svc.get("volumes", []):
        parts = v.split(":")
        out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return out


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    assert isinstance(env, dict)
    return {k: str(v) for k, v in env.items()}


def test_pod_members_share_the_pods_namespace() -> None:
    for name in ("iptables-init", "botbox", "app"):
        assert SERVICES[name]["network_mode"] == "service:pod", name
    assert "network_mode" not in SERVICES["pod"]


def test_start_order_init_then_proxy_then_app() -> None:
    assert SERVICES["botbox"]["depends_on"]["iptables-init"]["condition"] == "service_completed_successfully"
    assert SERVICES["app"]["depends_on"]["botbox"]["condition"] == "service_healthy"
    assert "/healthz" in SERVICES["botbox"]["healthcheck"]["test"]


def test_proxy_is_uid_1337_read_only_without_capabilities() -> None:
    side = SERVICES["botbox"]
    assert _uid(side) == 1337
    assert side["read_only"] is True
    assert side["cap_drop"] == ["ALL"]
    assert not side.get("cap_add")
    assert "no-new-privileges:true" in side["security_opt"]


def test_only_init_has_net_admin_and_app_is_not_1337() -> None:
    init_env = _env(SERVICES["iptables-init"])
    exempt = int(init_env.get("BOTBOX_UID", "1337"))
    assert exempt == _uid(SERVICES["botbox"])
    for name, svc in SERVICES.items():
        caps = set(svc.get("cap_add", []))
        assert svc.get("cap_drop") == ["ALL"], name
        assert not svc.get("privileged", False), name
        in_pod = name == "pod" or svc.get("network_mode") == "service:pod"
        if name == "iptables-init":
            assert caps == {"NET_ADMIN", "NET_RAW", "SETUID", "SETGID"}
        elif in_pod:
            assert not caps, f"{name} shares the pod's namespace and must not add capabilities"
        else:  # demo scaffolding on the fake internet (the upstream records ICMP with a raw socket)
            assert not caps & {"NET_ADMIN", "SYS_ADMIN"}, name
    assert _uid(SERVICES["app"]) not in {exempt, 0}


def test_secrets_and_ca_are_read_only_and_only_in_the_sidecar() -> None:
    for name, svc in SERVICES.items():
        for source, _target, mode in _volumes(svc):
            if source in SENSITIVE_VOLUMES:
                assert name in {"botbox", "setup"}, f"{name} mounts {source}"
                if name == "botbox":
                    assert mode == "ro", f"botbox mounts {source} {mode}"
    mounted = {src for src, _, _ in _volumes(SERVICES["botbox"])}
    assert mounted >= SENSITIVE_VOLUMES
    assert all(mode == "ro" for _, _, mode in _volumes(SERVICES["botbox"]))
    assert all(mode == "ro" for _, _, mode in _volumes(SERVICES["app"]))


def test_nothing_is_published_and_the_internet_is_internal() -> None:
    for name, svc in SERVICES.items():
        assert not svc.get("ports"), f"{name} publishes ports"
        assert svc.get("network_mode") != "host", name
    net = COMPOSE["networks"]["internet"]
    assert net["internal"] is True
    assert net["enable_ipv6"] is True
    subnets = [ipaddress.ip_network(c["subnet"]) for c in net["ipam"]["config"]]
    assert {s.version for s in subnets} == {4, 6}
    for s in subnets:  # private test ranges, never the host's fd00::/64
        if s.version == 4:
            assert s.subnet_of(ipaddress.ip_network("10.203.0.0/16"))
        else:
            assert s.subnet_of(ipaddress.ip_network("fc00::/7"))
            assert not s.overlaps(ipaddress.ip_network("fd00::/64"))


def test_demo_config_is_valid_and_matches_netsetup() -> None:
    side = SERVICES["botbox"]
    cfg_src = next(src for src, tgt, _ in _volumes(side) if tgt == "/etc/botbox/config.yaml")
    cfg = parse_config(yaml.safe_load((ROOT / cfg_src).read_text()))
    env = _env(SERVICES["iptables-init"])
    assert int(env.get("BOTBOX_PROXY_PORT", "8080")) == cfg.listen_port
    assert cfg.https_interception is not None and cfg.https_interception.enabled
    assert env["BOTBOX_ENABLE_HTTPS_INTERCEPTION"] == "1"
    assert int(env.get("BOTBOX_HTTPS_INTERCEPTION_PORT", "8443")) == cfg.https_interception.listen_port
    assert cfg.egress_policy.default_action == "deny"
    dns = SERVICES["pod"]["dns"]
    assert env["BOTBOX_DNS_SERVERS"].split(",") == [str(d) for d in dns]
    mounts = {tgt for _, tgt, _ in _volumes(side)}
    assert str(cfg.secrets_dir) in mounts
    assert str(cfg.https_interception.ca_key_path.parent) in mounts
