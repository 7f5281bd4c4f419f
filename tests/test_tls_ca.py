"""CA loading fails closed (SECURITY-SPEC T1) and `ca init` writes a usable pair with safe modes."""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import tempfile
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from botbox.tls.ca import INSECURE_KEY_MODE_ENV, CAError, generate_ca, load_ca, write_ca

NO_ENV: dict[str, str] = {}


def _write(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture
def ca_pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = generate_ca("Test CA", days=30)
    return write_ca(tmp_path / "ca", cert, key)


def test_generated_pair_loads(ca_pair: tuple[Path, Path]) -> None:
    crt, key = ca_pair
    ca = load_ca(crt, key, env=NO_ENV)
    assert ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    assert "PRIVATE" not in repr(ca) and "redacted" in repr(ca)


def test_write_ca_modes_and_refuses_overwrite(tmp_path: Path) -> None:
    old = os.umask(0o077)  # modes must not depend on the umask
    try:
        crt, key = write_ca(tmp_path / "out", *generate_ca())
    finally:
        os.umask(old)
    assert crt.stat().st_mode & 0o777 == 0o644
    assert key.stat().st_mode & 0o777 == 0o400
    before = key.read_bytes()
    with pytest.raises(CAError, match="already exists"):
        write_ca(tmp_path / "out", *generate_ca())
    assert key.read_bytes() == before
    # Only the cert exists: still refused, and nothing half-written is left behind.
    other = tmp_path / "other"
    other.mkdir()
    (other / "tls.crt").write_bytes(b"x")
    with pytest.raises(CAError, match="already exists"):
        write_ca(other, *generate_ca())
    assert not (other / "tls.key").exists()


def test_missing_files(tmp_path: Path, ca_pair: tuple[Path, Path]) -> None:
    crt, key = ca_pair
    with pytest.raises(CAError, match=rf"CA certificate file {tmp_path}/nope.crt: file not found"):
        load_ca(tmp_path / "nope.crt", key, env=NO_ENV)
    with pytest.raises(CAError, match=rf"CA key file {tmp_path}/nope.key: file not found"):
        load_ca(crt, tmp_path / "nope.key", env=NO_ENV)


def test_key_readable_by_group_or_others_is_refused(ca_pair: tuple[Path, Path]) -> None:
    crt, key = ca_pair
    for mode in (0o440, 0o404, 0o640, 0o600 | 0o020):
        key.chmod(mode)
        with pytest.raises(CAError, match=rf"CA key file {key}: mode 0{mode:o} .*{INSECURE_KEY_MODE_ENV}"):
            load_ca(crt, key, env=NO_ENV)
    key.chmod(0o600)
    load_ca(crt, key, env=NO_ENV)


def test_insecure_mode_override_warns(ca_pair: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    crt, key = ca_pair
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="botbox.tls"):
        load_ca(crt, key, env={INSECURE_KEY_MODE_ENV: "1"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(INSECURE_KEY_MODE_ENV in w for w in warnings)
    with pytest.raises(CAError):
        load_ca(crt, key, env={INSECURE_KEY_MODE_ENV: "0"})


def test_mismatched_key(tmp_path: Path, ca_pair: tuple[Path, Path]) -> None:
    crt, _ = ca_pair
    other = _write(tmp_path / "other.key", _key_pem(ec.generate_private_key(ec.SECP256R1())), 0o400)
    with pytest.raises(CAError, match=rf"CA key file {other} does not match the certificate in {crt}"):
        load_ca(crt, other, env=NO_ENV)


def test_not_pem_and_garbage(tmp_path: Path, ca_pair: tuple[Path, Path]) -> None:
    crt, key = ca_pair
    der = x509.load_pem_x509_certificate(crt.read_bytes()).public_bytes(serialization.Encoding.DER)
    bad_crt = _write(tmp_path / "der.crt", der, 0o644)
    with pytest.raises(CAError, match="not a PEM certificate"):
        load_ca(bad_crt, key, env=NO_ENV)
    bogus = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    garbage = _write(tmp_path / "garbage.crt", bogus, 0o644)
    with pytest.raises(CAError, match="not a valid PEM certificate"):
        load_ca(garbage, key, env=NO_ENV)
    bad_key = _write(tmp_path / "bad.key", b"hello", 0o400)
    with pytest.raises(CAError, match="not a PEM file"):
        load_ca(crt, bad_key, env=NO_ENV)
    empty = _write(tmp_path / "empty.key", b"", 0o400)
    with pytest.raises(CAError, match="empty"):
        load_ca(crt, empty, env=NO_ENV)
    with pytest.raises(CAError, match=r"not a regular file|is a directory"):
        load_ca(tmp_path, key, env=NO_ENV)


def test_encrypted_key(tmp_path: Path) -> None:
    cert, key = generate_ca()
    crt = _write(tmp_path / "c.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    enc = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(b"pw"))
    k = _write(tmp_path / "c.key", enc, 0o400)
    with pytest.raises(CAError, match="encrypted"):
        load_ca(crt, k, env=NO_ENV)


def _self_signed(key: ec.EllipticCurvePrivateKey, *, ca: bool | None, key_cert_sign: bool | None,
                 not_before: dt.datetime, not_after: dt.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(1).not_valid_before(not_before).not_valid_after(not_after))
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if key_cert_sign is not None:
        ku = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                           data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                           crl_sign=False, encipher_only=False, decipher_only=False)
        b = b.add_extension(ku, critical=True)
    return b.sign(key, hashes.SHA256())


@pytest.mark.parametrize(
    ("ca", "kcs", "why"),
    [
        (None, True, "no basicConstraints"),
        (False, True, "CA:FALSE"),
        (True, None, "no keyUsage"),
        (True, False, "keyCertSign"),
    ],
)
def test_not_a_ca(tmp_path: Path, ca: bool | None, kcs: bool | None, why: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = _self_signed(key, ca=ca, key_cert_sign=kcs, not_before=now - dt.timedelta(days=1),
                        not_after=now + dt.timedelta(days=1))
    crt = _write(tmp_path / "c.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    k = _write(tmp_path / "c.key", _key_pem(key), 0o400)
    with pytest.raises(CAError, match=why):
        load_ca(crt, k, env=NO_ENV)


def test_a_trustme_leaf_is_not_a_ca(tmp_path: Path) -> None:
    leaf = trustme.CA().issue_cert("server.example")
    crt = _write(tmp_path / "l.crt", leaf.cert_chain_pems[0].bytes(), 0o644)
    k = _write(tmp_path / "l.key", leaf.private_key_pem.bytes(), 0o400)
    with pytest.raises(CAError, match="not a CA"):
        load_ca(crt, k, env=NO_ENV)


def test_expired_and_not_yet_valid(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    k = _write(tmp_path / "c.key", _key_pem(key), 0o400)
    expired = _self_signed(key, ca=True, key_cert_sign=True, not_before=now - dt.timedelta(days=10),
                           not_after=now - dt.timedelta(days=1))
    crt = _write(tmp_path / "e.crt", expired.public_bytes(serialization.Encoding.PEM), 0o644)
    with pytest.raises(CAError, match="expired"):
        load_ca(crt, k, env=NO_ENV)
    future = _self_signed(key, ca=True, key_cert_sign=True, not_before=now + dt.timedelta(days=1),
                          not_after=now + dt.timedelta(days=10))
    crt2 = _write(tmp_path / "f.crt", future.public_bytes(serialization.Encoding.PEM), 0o644)
    with pytest.raises(CAError, match="not valid before"):
        load_ca(crt2, k, env=NO_ENV)


def test_small_rsa_key_refused_and_trustme_rsa_ca_accepted(tmp_path: Path) -> None:
    # trustme's CA is RSA-2048 with CA:TRUE + keyCertSign: accepted.
    tca = trustme.CA(key_type=trustme.KeyType.RSA)
    crt = _write(tmp_path / "t.crt", tca.cert_pem.bytes(), 0o644)
    k = _write(tmp_path / "t.key", tca.private_key_pem.bytes(), 0o400)
    ca = load_ca(crt, k, env=NO_ENV)
    assert isinstance(ca.key, rsa.RSAPrivateKey)


def test_unreadable_key_as_other_uid() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch uid")
    with tempfile.TemporaryDirectory(prefix="botbox-ca-") as d:
        Path(d).chmod(0o755)  # world-traversable so uid 1337 reaches the (readable) cert
        crt, key = write_ca(Path(d) / "ca", *generate_ca())
        _assert_uid_1337_cannot_read(crt, key)


def _assert_uid_1337_cannot_read(crt: Path, key: Path) -> None:
    # key is 0400 and owned by root: uid 1337 cannot read it
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 3
        try:
            os.setgid(1337)
            os.setuid(1337)
            try:
                load_ca(crt, key, env=NO_ENV)
                code = 1
            except CAError as exc:
                code = 0 if "permission denied" in str(exc) and str(key) in str(exc) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_key_material_never_in_errors(tmp_path: Path) -> None:
    cert, _ = generate_ca()
    other = ec.generate_private_key(ec.SECP256R1())
    pem = _key_pem(other)
    crt = _write(tmp_path / "c.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    k = _write(tmp_path / "c.key", pem, 0o644)
    body = b"".join(pem.splitlines()[1:-1]).decode()
    for env in (NO_ENV, {INSECURE_KEY_MODE_ENV: "1"}):
        with pytest.raises(CAError) as info:
            load_ca(crt, k, env=env)
        assert body[:16] not in str(info.value) and "PRIVATE" not in str(info.value)


def test_ssl_accepts_generated_ca_as_trust_root(ca_pair: tuple[Path, Path]) -> None:
    crt, _ = ca_pair
    ctx = ssl.create_default_context(cafile=str(crt))
    assert ctx.cert_store_stats()["x509_ca"] == 1
