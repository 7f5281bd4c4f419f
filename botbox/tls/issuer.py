"""Leaf certificate issuance and the per-host server ``SSLContext`` (SECURITY-SPEC T2).

Each SNI host gets its own ECDSA P-256 key (a leaked leaf key then only affects one host; generation costs
~50 µs, negligible next to the signature) and a certificate with exactly one SAN (the DNS name),
EKU serverAuth, keyUsage digitalSignature, basicConstraints CA:FALSE, AKI/SKI, issuer = CA subject.
``notBefore`` is backdated a little for clients with a slow clock; ``notAfter`` is
``cert_ttl_seconds`` from now, but never beyond the CA's own ``notAfter``.

``ssl.SSLContext.load_cert_chain`` only reads files, so the PEM (leaf + CA chain + leaf key) is written to
an anonymous in-memory file (``memfd_create``) and loaded through ``/proc/self/fd``: no key ever touches
a filesystem, and the proxy keeps working on a read-only root filesystem.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from botbox.tls.ca import CertificateAuthority

__all__ = ["CLOCK_SKEW", "IssuedLeaf", "LeafIssuer", "make_server_context"]

#: How far ``notBefore`` is backdated.
CLOCK_SKEW = dt.timedelta(minutes=5)
ALPN_PROTOCOLS = ("http/1.1",)


@dataclass(frozen=True, slots=True)
class IssuedLeaf:
    host: str
    cert: x509.Certificate
    context: ssl.SSLContext


def _load_chain_from_memory(ctx: ssl.SSLContext, pem: bytes) -> None:
    fd = os.memfd_create("botbox-leaf", os.MFD_CLOEXEC)
    try:
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view) :]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def make_server_context(
    chain_and_key_pem: bytes, sni_check: Callable[[str | None], bool] | None = None
) -> ssl.SSLContext:
    """A TLS server context: TLS >= 1.2, ALPN ``http/1.1`` only, no renegotiation, no compression.

    ``sni_check`` is called by OpenSSL with the server name *it* parsed; returning False aborts the
    handshake with ``unrecognized_name`` (guards against any disagreement with our own parser).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    _load_chain_from_memory(ctx, chain_and_key_pem)
    if sni_check is not None:
        check = sni_check

        def _cb(_obj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> int | None:
            return None if check(name) else ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

        ctx.sni_callback = _cb
    return ctx


class LeafIssuer:
    """Signs leaves with the CA.  Thread-safe (called from worker threads)."""

    def __init__(self, ca: CertificateAuthority, cert_ttl_seconds: int) -> None:
        if cert_ttl_seconds < 1:
            raise ValueError("cert_ttl_seconds must be positive")
        self.ca = ca
        self.ttl = dt.timedelta(seconds=cert_ttl_seconds)
        self._issuer_name = ca.cert.subject
        try:
            ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
        self._ca_chain = ca.chain_pem

    def build_certificate(
        self, host: str, *, now: dt.datetime | None = None
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """Sign a leaf for ``host`` (already canonical, a DNS name, not an IP literal)."""
        now = now or dt.datetime.now(dt.UTC)
        not_after = min(now + self.ttl, self.ca.cert.not_valid_after_utc)
        not_before = max(now - CLOCK_SKEW, self.ca.cert.not_valid_before_utc)
        key = ec.generate_private_key(ec.SECP256R1())
        # CN is informational (clients match the SAN); X.520 caps it at 64 characters. Without a CN the
        # subject is empty and RFC 5280 requires the SAN to be critical.
        cn_ok = len(host) <= 64
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)] if cn_ok else [])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=not cn_ok)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(self._aki, critical=False)
        )
        cert = builder.sign(self.ca.key, self.ca.sign_hash)
        return cert, key

    def issue(self, host: str, *, now: dt.datetime | None = None) -> IssuedLeaf:
        """Sign a leaf and build the server context presenting leaf + CA chain (CPU work: run in a thread)."""
        cert, key = self.build_certificate(host, now=now)
        # The leaf key lives on inside the SSLContext anyway; the PEM copy is dropped right after loading.
        pem = (
            cert.public_bytes(serialization.Encoding.PEM)
            + self._ca_chain
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        ctx = make_server_context(pem, _sni_matcher(host))
        return IssuedLeaf(host=host, cert=cert, context=ctx)


def _sni_matcher(host: str) -> Callable[[str | None], bool]:
    from botbox.hostname import InvalidHost, canonicalize_host

    def check(name: str | None) -> bool:
        if name is None:
            return False
        try:
            return canonicalize_host(name) == host
        except InvalidHost:
            return False

    return check
