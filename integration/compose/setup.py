"""One-shot ``setup`` service of compose.yaml: demo key material, written once into named volumes.

    python -m integration.compose.setup OUT_DIR

OUT_DIR holds one mounted volume per consumer, so each container mounts only what it needs:

* ``ca/``        interception CA for the sidecar: ``tls.crt`` and ``tls.key`` (0400, uid 1337)
* ``secrets/``   the sidecar's API keys: ``openai-api-key`` (0400, uid 1337) from $BOTBOX_DEMO_OPENAI_KEY
* ``trust/``     public certificates: ``botbox-ca.crt`` (the app trusts it) and ``upstream-ca.pem``
                 (the sidecar's ``upstream_ca_file``, standing in for the web PKI)
* ``upstream/``  the fake upstream's certificate, key and ``spec.json`` for ``integration.upstream``

Existing material is kept, so ``docker compose up`` can be re-run; the API key file is rewritten
every run from the environment. Runs as root (to chown) with no network.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from botbox.tls.ca import generate_ca

PROXY_UID = 1337
UPSTREAM_NAMES = ("api.openai.test", "denied.test", "upstream.test")
UPSTREAM_IPS = ("10.203.50.20", "fd00:203:50::20")
DEFAULT_KEY = "sk-demo-0000-not-a-real-key"
BOTBOX = "/opt/botbox/venv/bin/botbox"


def _write(path: Path, data: bytes, mode: int, uid: int = 0) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chown(tmp, uid, uid)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    # The stand-in "web PKI" CA is built exactly like an interception CA; reuse the product's generator.
    cert, key = generate_ca(common_name[:64])
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in UPSTREAM_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in UPSTREAM_IPS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, UPSTREAM_NAMES[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m integration.compose.setup OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    ca_dir, secrets_dir, trust_dir, upstream_dir = (out / d for d in ("ca", "secrets", "trust", "upstream"))
    for d in (ca_dir, secrets_dir, trust_dir, upstream_dir):
        d.mkdir(parents=True, exist_ok=True)
    for d in (ca_dir, secrets_dir):  # only the proxy may list or read these
        os.chown(d, PROXY_UID, PROXY_UID)
        os.chmod(d, 0o500)
    os.chmod(trust_dir, 0o755)  # noqa: S103 - public certificates only, read by every container
    os.chmod(upstream_dir, 0o700)

    if not (ca_dir / "tls.key").exists():
        # the product's own command, as users create their CA (writes tls.crt 0644, tls.key 0400)
        subprocess.run([BOTBOX, "ca", "init", "--out", str(ca_dir), "--name", "BotBox demo interception CA"],
                       check=True)
        for name in ("tls.crt", "tls.key"):
            os.chown(ca_dir / name, PROXY_UID, PROXY_UID)
        _write(trust_dir / "botbox-ca.crt", (ca_dir / "tls.crt").read_bytes(), 0o444)
        print("setup: created the interception CA (botbox ca init)", flush=True)
    if not (upstream_dir / "key.pem").exists():
        up_key, up_ca = _ca("BotBox demo upstream CA (stands in for the web PKI)")
        cert_pem, key_pem = _leaf(up_key, up_ca)
        _write(trust_dir / "upstream-ca.pem", up_ca.public_bytes(serialization.Encoding.PEM), 0o444)
        _write(upstream_dir / "cert.pem", cert_pem, 0o400)
        _write(upstream_dir / "key.pem", key_pem, 0o400)
        print("setup: created the fake upstream's certificate", flush=True)
    spec = {
        "cert_file": str(upstream_dir / "cert.pem"),
        "key_file": str(upstream_dir / "key.pem"),
        "https_addresses": list(UPSTREAM_IPS),
        "catchall_addresses": list(UPSTREAM_IPS),
        "tcp_ports": [53, 80, 8443],
        "udp_ports": [53, 443],
        "hits_log": "/tmp/hits.jsonl",
        "ready_file": "/tmp/ready",
    }
    _write(upstream_dir / "spec.json", json.dumps(spec, indent=2).encode(), 0o400)
    api_key = os.environ.get("BOTBOX_DEMO_OPENAI_KEY") or DEFAULT_KEY
    _write(secrets_dir / "openai-api-key", api_key.encode(), 0o400, PROXY_UID)
    print("setup: installed the API key for the sidecar (mode 0400, uid 1337)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
