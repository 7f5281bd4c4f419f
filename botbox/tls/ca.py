"""Loading (and creating) the interception CA; SECURITY-SPEC T1.

The CA certificate and key are read exactly once, at startup.  Every problem is fatal and reported as
:class:`CAError` whose message names the offending file and the reason, never key material:
missing/unreadable file, not PEM, encrypted key, unsupported key type, certificate/key mismatch, a
certificate that is not a CA (basicConstraints CA:TRUE and keyUsage keyCertSign are both required),
outside its validity period, or a key file readable by group/others (``mode & 0o077``).  The last check
can be overridden with ``BOTBOX_ALLOW_INSECURE_CA_KEY_MODE=1`` which logs a warning.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

__all__ = [
    "INSECURE_KEY_MODE_ENV",
    "CAError",
    "CAKey",
    "CertificateAuthority",
    "generate_ca",
    "load_ca",
    "write_ca",
]

log = logging.getLogger("botbox.tls")

#: Environment variable that downgrades the key-file permission check to a logged warning.
INSECURE_KEY_MODE_ENV = "BOTBOX_ALLOW_INSECURE_CA_KEY_MODE"

#: Hard cap on what we read from either file (a CA bundle is a few KiB).
_MAX_FILE = 1024 * 1024
#: Warn at startup when the CA expires sooner than this.
_EXPIRY_WARNING = dt.timedelta(days=30)

CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

SignHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512

_CURVE_HASH: Mapping[str, type[SignHash]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}


class CAError(Exception):
    """The interception CA cannot be used.  The message names the file and why (never key bytes)."""


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: CAKey
    #: PEM of the CA certificate followed by any further certificates found in the cert file
    #: (intermediates); this is appended to every leaf so clients get leaf + CA.
    chain_pem: bytes
    #: hash used to sign leaves (matches the CA key strength)
    sign_hash: SignHash
    cert_path: str
    key_path: str

    def __repr__(self) -> str:  # never show the key object
        return f"CertificateAuthority(subject={self.cert.subject.rfc4514_string()!r}, key=<redacted>)"

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    def is_valid_now(self, now: dt.datetime | None = None) -> bool:
        now = now or dt.datetime.now(dt.UTC)
        return self.cert.not_valid_before_utc <= now < self.cert.not_valid_after_utc


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _read_capped(path: Path, what: str) -> bytearray:
    try:
        with path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise CAError(f"{what} {path}: not a regular file")
            data = bytearray(fh.read(_MAX_FILE + 1))
    except FileNotFoundError:
        raise CAError(f"{what} {path}: file not found") from None
    except PermissionError:
        raise CAError(f"{what} {path}: permission denied (the proxy must be able to read it)") from None
    except IsADirectoryError:
        raise CAError(f"{what} {path}: is a directory") from None
    except OSError as exc:
        raise CAError(f"{what} {path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if len(data) > _MAX_FILE:
        raise CAError(f"{what} {path}: larger than {_MAX_FILE} bytes")
    if not data.strip():
        raise CAError(f"{what} {path}: file is empty")
    return data


def _wipe(buf: bytearray) -> None:
    buf[:] = b"\x00" * len(buf)


def _check_key_mode(path: Path, env: Mapping[str, str]) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CAError(f"CA key file {path}: file not found") from None
    except OSError as exc:
        raise CAError(f"CA key file {path}: cannot stat ({exc.strerror or type(exc).__name__})") from None
    if mode & 0o077:
        msg = (
            f"CA key file {path}: mode {stat.S_IMODE(mode):04o} is readable or writable by group/others; "
            "it must be 0400 or 0600"
        )
        if _env_flag(env, INSECURE_KEY_MODE_ENV):
            log.warning("%s; continuing because %s=1 (insecure)", msg, INSECURE_KEY_MODE_ENV)
            return
        raise CAError(f"{msg} (set {INSECURE_KEY_MODE_ENV}=1 to override)")


def _load_key(path: Path) -> CAKey:
    raw = _read_capped(path, "CA key file")
    try:
        if b"-----BEGIN" not in raw:
            raise CAError(f"CA key file {path}: not a PEM file")
        try:
            key = serialization.load_pem_private_key(bytes(raw), password=None)
        except TypeError:
            raise CAError(f"CA key file {path}: key is encrypted; provide an unencrypted key") from None
        except (ValueError, UnsupportedAlgorithm):
            raise CAError(f"CA key file {path}: not a valid PEM private key") from None
    finally:
        _wipe(raw)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in _CURVE_HASH:
            raise CAError(f"CA key file {path}: unsupported EC curve {key.curve.name}")
        return key
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise CAError(f"CA key file {path}: RSA key of {key.key_size} bits is too small (>= 2048)")
        return key
    raise CAError(f"CA key file {path}: unsupported key type (use ECDSA P-256/P-384/P-521 or RSA >= 2048)")


def _load_certs(path: Path) -> list[x509.Certificate]:
    raw = _read_capped(path, "CA certificate file")
    if b"-----BEGIN CERTIFICATE-----" not in raw:
        raise CAError(f"CA certificate file {path}: not a PEM certificate")
    try:
        certs = x509.load_pem_x509_certificates(bytes(raw))
    except ValueError:
        raise CAError(f"CA certificate file {path}: not a valid PEM certificate") from None
    if not certs:
        raise CAError(f"CA certificate file {path}: no certificate found")
    return certs


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CAError(f"CA certificate file {path}: not a CA certificate (no basicConstraints)") from None
    if not bc.ca:
        raise CAError(f"CA certificate file {path}: not a CA certificate (basicConstraints CA:FALSE)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CAError(f"CA certificate file {path}: not a CA certificate (no keyUsage keyCertSign)") from None
    if not ku.key_cert_sign:
        raise CAError(f"CA certificate file {path}: keyUsage does not allow keyCertSign")


def _public_der(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_ca(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    now: dt.datetime | None = None,
) -> CertificateAuthority:
    """Read and validate the CA pair once.  Raises :class:`CAError` (fail closed) on any problem."""
    env = os.environ if env is None else env
    cpath, kpath = Path(cert_path), Path(key_path)
    certs = _load_certs(cpath)
    _check_key_mode(kpath, env)
    key = _load_key(kpath)
    cert = certs[0]
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        raise CAError(f"CA key file {kpath} does not match the certificate in {cpath}")
    _check_is_ca(cert, cpath)
    now = now or dt.datetime.now(dt.UTC)
    if now < cert.not_valid_before_utc:
        raise CAError(
            f"CA certificate file {cpath}: not valid before {cert.not_valid_before_utc.isoformat()}"
        )
    if now >= cert.not_valid_after_utc:
        raise CAError(f"CA certificate file {cpath}: expired on {cert.not_valid_after_utc.isoformat()}")
    if cert.not_valid_after_utc - now < _EXPIRY_WARNING:
        log.warning(
            "CA certificate %s expires on %s; rotate it soon", cpath, cert.not_valid_after_utc.isoformat()
        )
    # Self-check: the key really signs what the certificate claims (catches a swapped key of the same
    # public key only in theory, but mainly a broken/HSM-less key object).
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sign_hash: SignHash = _CURVE_HASH[key.curve.name]()
        probe = b"botbox-ca-selftest"
        try:
            key.public_key().verify(key.sign(probe, ec.ECDSA(sign_hash)), probe, ec.ECDSA(sign_hash))
        except InvalidSignature:  # pragma: no cover - only with a broken backend
            raise CAError(f"CA key file {kpath}: key failed a signing self-test") from None
    else:
        sign_hash = hashes.SHA256()
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    return CertificateAuthority(
        cert=cert, key=key, chain_pem=chain_pem, sign_hash=sign_hash,
        cert_path=str(cpath), key_path=str(kpath),
    )


def generate_ca(
    common_name: str = "BotBox Interception CA", days: int = 365, *, now: dt.datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create a fresh ECDSA P-256 CA (pathLen 0: it can only sign leaves)."""
    if days < 1:
        raise ValueError("days must be >= 1")
    if not 1 <= len(common_name) <= 64:
        raise ValueError("name must be 1..64 characters")
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "BotBox"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def write_ca(
    out_dir: str | os.PathLike[str], cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    """Write ``tls.crt`` (0644) and ``tls.key`` (0400) into ``out_dir``; never overwrite.

    Raises :class:`CAError` if either file exists or cannot be written; nothing is left half-written.
    """
    out = Path(out_dir)
    try:
        out.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise CAError(f"output directory {out}: cannot create ({why})") from None
    if not out.is_dir():
        raise CAError(f"output directory {out}: not a directory")
    crt, keyf = out / "tls.crt", out / "tls.key"
    for p in (crt, keyf):
        if p.exists() or p.is_symlink():
            raise CAError(f"{p} already exists; refusing to overwrite (remove it or choose another --out)")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    created: list[Path] = []
    try:
        for path, data, mode in ((keyf, key_pem, 0o400), (crt, cert_pem, 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            created.append(path)
            try:
                os.fchmod(fd, mode)  # the umask must not loosen or tighten what we promise
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
    except FileExistsError:
        for p in created:
            p.unlink(missing_ok=True)
        raise CAError(f"{path} already exists; refusing to overwrite") from None
    except OSError as exc:
        for p in created:
            p.unlink(missing_ok=True)
        raise CAError(f"{path}: cannot write ({exc.strerror or type(exc).__name__})") from None
    return crt, keyf
