"""`botbox ca init` and `botbox run` exit codes for CA problems (real subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from botbox.tls.ca import load_ca

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


def botbox(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("BOTBOX_ALLOW_INSECURE_CA_KEY_MODE", None)
    return subprocess.run([PY, "-m", "botbox", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def test_ca_init_writes_a_loadable_pair_with_safe_modes(tmp_path: Path) -> None:
    out = tmp_path / "new" / "ca"
    res = botbox("ca", "init", "--out", str(out), "--days", "30", "--name", "Acme Agents CA")
    assert res.returncode == 0, res.stderr
    crt, key = out / "tls.crt", out / "tls.key"
    assert crt.stat().st_mode & 0o777 == 0o644
    assert key.stat().st_mode & 0o777 == 0o400
    ca = load_ca(crt, key, env={})
    assert ca.cert.subject.rfc4514_string() == "O=BotBox,CN=Acme Agents CA"
    lifetime = ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc
    assert 29 <= lifetime.days <= 30
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    # prints how to mount the public part into app containers, never the key
    for word in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "update-ca-certificates",
                 str(crt)):
        assert word in res.stdout
    assert "PRIVATE KEY" not in res.stdout + res.stderr


def test_ca_init_refuses_to_overwrite(tmp_path: Path) -> None:
    assert botbox("ca", "init", "--out", str(tmp_path)).returncode == 0
    before = (tmp_path / "tls.key").read_bytes()
    res = botbox("ca", "init", "--out", str(tmp_path))
    assert res.returncode == 1
    assert "already exists" in res.stderr and "tls.crt" in res.stderr
    assert (tmp_path / "tls.key").read_bytes() == before


@pytest.mark.parametrize("args", [["--days", "0"], ["--days", "x"], ["--days", "99999"], ["--name", ""], []])
def test_ca_init_bad_arguments(tmp_path: Path, args: list[str]) -> None:
    argv = ["ca", "init", *args] + (["--out", str(tmp_path / "o")] if args else [])
    res = botbox(*argv)
    assert res.returncode == 2, res.stderr
    assert not (tmp_path / "o" / "tls.key").exists()


def _config(tmp: Path, crt: Path, key: Path) -> Path:
    (tmp / "secrets").mkdir(exist_ok=True)
    cfg = {
        "listen_port": 28180, "metrics_port": 29190, "secrets_dir": str(tmp / "secrets"),
        "egress_policy": {"rules": [{"host": "api.example.com", "action": "allow"}]},
        "https_interception": {"enabled": True, "listen_port": 28543,
                               "ca_cert_path": str(crt), "ca_key_path": str(key)},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_exits_1_naming_the_file_when_ca_key_is_group_readable(tmp_path: Path) -> None:
    assert botbox("ca", "init", "--out", str(tmp_path / "ca")).returncode == 0
    key = tmp_path / "ca" / "tls.key"
    key.chmod(0o440)
    res = botbox("run", "-c", str(_config(tmp_path, tmp_path / "ca" / "tls.crt", key)))
    assert res.returncode == 1, res.stderr
    assert f"CA key file {key}: mode 0440" in res.stderr
    assert "BOTBOX_ALLOW_INSECURE_CA_KEY_MODE" in res.stderr


def test_run_exits_1_when_cert_and_key_do_not_match(tmp_path: Path) -> None:
    assert botbox("ca", "init", "--out", str(tmp_path / "a")).returncode == 0
    assert botbox("ca", "init", "--out", str(tmp_path / "b")).returncode == 0
    res = botbox("run", "-c", str(_config(tmp_path, tmp_path / "a" / "tls.crt", tmp_path / "b" / "tls.key")))
    assert res.returncode == 1
    assert "does not match" in res.stderr and str(tmp_path / "b" / "tls.key") in res.stderr
    assert "PRIVATE" not in res.stderr


def test_run_exits_1_when_ca_files_are_missing(tmp_path: Path) -> None:
    res = botbox("run", "-c", str(_config(tmp_path, tmp_path / "nope.crt", tmp_path / "nope.key")))
    assert res.returncode == 1
    assert f"CA certificate file {tmp_path / 'nope.crt'}: file not found" in res.stderr


def test_ca_check_uses_the_same_checks_as_run(tmp_path: Path) -> None:
    assert botbox("ca", "init", "--out", str(tmp_path / "ca")).returncode == 0
    crt, key = tmp_path / "ca" / "tls.crt", tmp_path / "ca" / "tls.key"
    cfg = _config(tmp_path, crt, key)
    res = botbox("ca", "check", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "CN=BotBox Interception CA" in res.stdout and "is usable" in res.stdout
    key.chmod(0o640)
    res = botbox("ca", "check", "-c", str(cfg))
    assert res.returncode == 1 and f"CA key file {key}: mode 0640" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("https_interception: {enabled: true, cert_ttl_seconds: 5}\n")
    res = botbox("ca", "check", "-c", str(bad))
    assert res.returncode == 2 and "https_interception.cert_ttl_seconds" in res.stderr
    off = tmp_path / "off.yaml"
    off.write_text(f"secrets_dir: {tmp_path / 'secrets'}\n")
    res = botbox("ca", "check", "-c", str(off))
    assert res.returncode == 0 and "not enabled" in res.stdout
