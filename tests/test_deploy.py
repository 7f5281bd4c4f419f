"""Kubernetes manifests (deploy/kubernetes): schema validation and the security properties users rely on.

Every manifest is validated offline against the Kubernetes OpenAPI schemas shipped in
``kubernetes-validate`` (strict: unknown fields are errors), for the oldest version with native sidecars
on by default (1.29) and the newest the package carries. Then SECURITY-SPEC D1-D3 and the wiring
between the pieces are checked on the parsed YAML.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from botbox.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
PROXY_UID = 1337
PROXY_PORTS = {8080, 8443, 9090}
SIDECAR = "botbox"
INIT = "iptables-init"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
K8S_VERSIONS = ["1.29", kubernetes_validate.utils.latest_version()]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in _docs(p)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _all_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment")["spec"]["template"]["spec"]
    return spec


def _containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for c in spec.get("initContainers", []):
        yield "init", c
    for c in spec.get("containers", []):
        yield "main", c


def _container(name: str) -> dict[str, Any]:
    matches = [c for _, c in _containers(_pod_spec()) if c["name"] == name]
    assert len(matches) == 1, name
    return matches[0]


def _app_containers() -> list[dict[str, Any]]:
    return [c for c in _pod_spec()["containers"]]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _volume_secret_items(volume: dict[str, Any]) -> list[tuple[str, str | None, int | None]]:
    """(secret name, key or None for 'all keys', effective mode) for every secret projected by a volume."""
    out: list[tuple[str, str | None, int | None]] = []
    if "secret" in volume:
        s = volume["secret"]
        items = s.get("items")
        mode = s.get("defaultMode")
        if items:
            out += [(s["secretName"], i["key"], i.get("mode", mode)) for i in items]
        else:
            out.append((s["secretName"], None, mode))
    if "projected" in volume:
        mode = volume["projected"].get("defaultMode")
        for src in volume["projected"]["sources"]:
            if "secret" in src:
                s = src["secret"]
                items = s.get("items")
                if items:
                    out += [(s["name"], i["key"], i.get("mode", mode)) for i in items]
                else:
                    out.append((s["name"], None, mode))
    return out


def _mounted_volumes(container: dict[str, Any]) -> set[str]:
    return {m["name"] for m in container.get("volumeMounts", [])}


def _sidecar_config() -> Any:
    cm = _one("ConfigMap", "botbox-config")
    return yaml.safe_load(cm["data"]["config.yaml"])


# --------------------------------------------------------------------------------------- schema checks
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schema(path: Path, version: str) -> None:
    docs = _docs(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_rejects_a_broken_manifest() -> None:
    """The validator is really strict: a misspelt field in our Deployment is an error."""
    dep = _one("Deployment")
    dep["spec"]["template"]["spec"]["initContainers"][1]["securityContex"] = {"runAsUser": 0}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest_and_one_namespace() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    assert sorted(kust["resources"]) == sorted(p.name for p in MANIFESTS)
    ns = _one("Namespace")["metadata"]["name"]
    assert kust["namespace"] == ns
    for doc in _all_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == ns, doc["metadata"]["name"]
    image_names = {i["name"] for i in kust["images"]}
    for _, c in _containers(_pod_spec()):
        if c["name"] in {SIDECAR, INIT}:
            assert c["image"].rsplit(":", 1)[0] in image_names


# -------------------------------------------------------------------------------------- D1: the proxy
def test_sidecar_is_a_native_sidecar_started_after_the_init_container() -> None:
    names = [c["name"] for c in _pod_spec()["initContainers"]]
    assert names.index(INIT) < names.index(SIDECAR), "netsetup must finish before the proxy starts"
    assert _container(SIDECAR)["restartPolicy"] == "Always"
    assert "restartPolicy" not in _container(INIT)


def test_sidecar_runs_as_1337_unprivileged_read_only_without_capabilities() -> None:
    sc = _container(SIDECAR)["securityContext"]
    assert sc["runAsUser"] == PROXY_UID
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add")
    seccomp = sc.get("seccompProfile") or _pod_spec()["securityContext"]["seccompProfile"]
    assert seccomp["type"] == "RuntimeDefault"


def test_only_the_init_container_has_net_admin() -> None:
    for _, c in _containers(_pod_spec()):
        caps = c.get("securityContext", {}).get("capabilities", {})
        added = set(caps.get("add", []))
        assert caps.get("drop") == ["ALL"], c["name"]
        assert not c.get("securityContext", {}).get("privileged", False), c["name"]
        if c["name"] == INIT:
            # netfilter, plus SETUID/SETGID for the live probe's uid switches (N6); never SYS_ADMIN & co.
            assert added == {"NET_ADMIN", "NET_RAW", "SETUID", "SETGID"}
        else:
            assert not added, f"{c['name']} must not add capabilities: {added}"
    assert not _pod_spec().get("hostNetwork", False)
    assert not _pod_spec().get("shareProcessNamespace", False)
    assert _pod_spec()["automountServiceAccountToken"] is False


# ---------------------------------------------------------------------------------------- D2: the app
def test_app_never_runs_as_the_exempt_proxy_uid() -> None:
    init_uid = int(_env(_container(INIT)).get("BOTBOX_UID", str(PROXY_UID)))
    assert init_uid == _container(SIDECAR)["securityContext"]["runAsUser"]
    pod_uid = _pod_spec().get("securityContext", {}).get("runAsUser")
    assert pod_uid != PROXY_UID
    apps = _app_containers()
    assert apps
    for c in apps:
        sc = c["securityContext"]
        uid = sc.get("runAsUser", pod_uid)
        assert uid is not None, f"{c['name']}: set runAsUser explicitly (the image default could be 1337)"
        assert uid not in {init_uid, 0}
        assert sc["runAsNonRoot"] is True
        assert sc["allowPrivilegeEscalation"] is False


# ---------------------------------------------------------------------- D3: secrets, CA key, exposure
def test_secret_volumes_are_mode_0400_and_read_only() -> None:
    spec = _pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    for vname, vol in volumes.items():
        for secret, key, mode in _volume_secret_items(vol):
            public = secret == "botbox-ca" and key == "tls.crt"
            if not public:
                assert mode == 0o400, f"volume {vname}: secret {secret}/{key} mode {mode!r} != 0400"
    for _, c in _containers(spec):
        for m in c.get("volumeMounts", []):
            if _volume_secret_items(volumes[m["name"]]) or "configMap" in volumes[m["name"]]:
                assert m.get("readOnly") is True, f"{c['name']}: {m['name']} must be mounted readOnly"


def test_ca_key_and_api_keys_are_mounted_only_into_the_sidecar() -> None:
    spec = _pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    sensitive = {
        name
        for name, vol in volumes.items()
        for secret, key, _ in _volume_secret_items(vol)
        if (secret == "botbox-ca" and key in {None, "tls.key"}) or secret == "botbox-api-keys"
    }
    assert sensitive, "expected the CA key and API keys to be mounted somewhere"
    for _, c in _containers(spec):
        leaked = _mounted_volumes(c) & sensitive
        if c["name"] == SIDECAR:
            assert leaked == sensitive
        else:
            assert not leaked, f"{c['name']} mounts {leaked}"


def test_no_service_or_port_exposes_the_proxy() -> None:
    for doc in _all_docs():
        if doc["kind"] == "Service":
            for p in doc["spec"].get("ports", []):
                assert p["port"] not in PROXY_PORTS and p.get("targetPort") not in PROXY_PORTS, p
        assert doc["kind"] not in {"Ingress", "Route"}
    for _, c in _containers(_pod_spec()):
        for p in c.get("ports", []):
            assert p["containerPort"] not in PROXY_PORTS
            assert "hostPort" not in p


def test_probes_use_healthz_for_readiness_and_livez_for_liveness() -> None:
    side = _container(SIDECAR)

    def probe_path(probe: dict[str, Any]) -> str:
        if "httpGet" in probe:
            return str(probe["httpGet"]["path"])
        return str(probe["exec"]["command"][-1])

    assert probe_path(side["readinessProbe"]) == "/healthz"
    assert probe_path(side["livenessProbe"]) == "/livez"
    assert probe_path(side["startupProbe"]) == "/livez"


# --------------------------------------------------------------------------------- wiring / consistency
def test_shipped_config_is_valid_and_matches_the_pod() -> None:
    raw = _sidecar_config()
    cfg = parse_config(raw)
    side = _container(SIDECAR)
    mounts = {m["name"]: m["mountPath"] for m in side["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    # secrets_dir is the API key volume, and every secret_ref exists in the Secret
    assert str(cfg.secrets_dir) == mounts["botbox-secrets"]
    api_keys = _one("Secret", "botbox-api-keys")
    refs = {h.secret_ref for r in cfg.egress_policy.rules for h in r.header_rewrites if h.secret_ref}
    assert refs
    assert refs <= set(api_keys["stringData"]), refs - set(api_keys["stringData"])
    assert volumes["botbox-secrets"]["secret"]["secretName"] == "botbox-api-keys"
    # config file and CA paths resolve inside the projected /etc/botbox volume
    etc = mounts["botbox-etc"]
    projected = {
        f"{etc}/{item['path']}"
        for src in volumes["botbox-etc"]["projected"]["sources"]
        for item in next(iter(src.values()))["items"]
    }
    assert side["args"][-1] in projected
    assert cfg.https_interception is not None and cfg.https_interception.enabled
    assert str(cfg.https_interception.ca_cert_path) in projected
    assert str(cfg.https_interception.ca_key_path) in projected
    # netsetup redirects to the ports the proxy listens on
    env = _env(_container(INIT))
    assert int(env["BOTBOX_PROXY_PORT"]) == cfg.listen_port
    assert env["BOTBOX_ENABLE_HTTPS_INTERCEPTION"] == "1"
    assert int(env["BOTBOX_HTTPS_INTERCEPTION_PORT"]) == cfg.https_interception.listen_port
    # listeners stay on loopback and the policy denies by default
    assert cfg.listen_addr == "127.0.0.1" and cfg.metrics_addr == "127.0.0.1"
    assert not cfg.allow_non_loopback
    assert cfg.egress_policy.default_action == "deny"


def test_app_trusts_only_the_public_ca_certificate() -> None:
    agent = _app_containers()[0]
    env = _env(agent)
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    vol = next(v for v in _pod_spec()["volumes"] if v["name"] == "botbox-ca-public")
    assert [(s, k) for s, k, _ in _volume_secret_items(vol)] == [("botbox-ca", "tls.crt")]
    assert env["SSL_CERT_FILE"] == f"{mounts['botbox-ca-public']}/{vol['secret']['items'][0]['path']}"


def test_network_policy_limits_the_pod_to_dns_and_https_and_blocks_metadata() -> None:
    pol = _one("NetworkPolicy")
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = pol["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert set(pol["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not pol["spec"].get("ingress")
    ports = {(p["protocol"], p["port"]) for rule in pol["spec"]["egress"] for p in rule["ports"]}
    assert ports == {("UDP", 53), ("TCP", 53), ("TCP", 443)}
    metadata_ip = ipaddress.ip_address("169.254.169.254")
    for rule in pol["spec"]["egress"]:
        assert rule.get("ports"), "every egress rule must name its ports"
        for peer in rule["to"]:
            block = peer.get("ipBlock")
            if block is None:
                continue
            net = ipaddress.ip_network(block["cidr"])
            if metadata_ip.version == net.version and metadata_ip in net:
                excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
                assert any(metadata_ip in e for e in excepted), "cloud metadata must stay unreachable"
                for private in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"):
                    assert ipaddress.ip_network(private) in excepted
