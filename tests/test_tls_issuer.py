"""Leaf certificates (SECURITY-SPEC T2) and the certificate cache (LRU, TTL, single-flight)."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
import time

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from botbox.metrics import Metrics
from botbox.tls.ca import CertificateAuthority, generate_ca, load_ca, write_ca
from botbox.tls.cache import CertCache, IssuanceError
from botbox.tls.issuer import CLOCK_SKEW, IssuedLeaf, LeafIssuer


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    crt, key = write_ca(tmp_path_factory.mktemp("ca") / "ca", *generate_ca("Issuer Test CA", days=10))
    return load_ca(crt, key, env={})


def _memory_handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, sni: str) -> ssl.SSLObject:
    """Real TLS handshake between two SSLObjects over memory BIOs; returns the client side."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=sni)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(20):
        if not c_done:
            try:
                client.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            try:
                server.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                # deliver the server's alert so the client reports what it saw
                c_in.write(s_out.read())
                client.do_handshake()
                raise
        c_in.write(s_out.read())
        if c_done and s_done:
            return client
    raise AssertionError("handshake did not finish")


def _client_ctx(ca: CertificateAuthority) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.chain_pem.decode())
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def test_leaf_fields(ca: CertificateAuthority) -> None:
    issuer = LeafIssuer(ca, cert_ttl_seconds=3600)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    leaf = issuer.issue("api.example.com")
    after = dt.datetime.now(dt.UTC)
    cert = leaf.cert
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["api.example.com"]
    assert len(list(san.value)) == 1  # SAN = the SNI host only, no IPs, no wildcards
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign
    assert cert.issuer == ca.cert.subject
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    # validity: notAfter = now + ttl; notBefore backdated by the clock-skew allowance
    ttl = dt.timedelta(seconds=3600)
    assert before + ttl <= cert.not_valid_after_utc <= after + ttl
    assert before - CLOCK_SKEW <= cert.not_valid_before_utc <= after - CLOCK_SKEW
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "api.example.com"


def test_chain_verifies_against_ca_with_cryptography_and_openssl(ca: CertificateAuthority) -> None:
    leaf = LeafIssuer(ca, 600).issue("verify.example")
    verifier = PolicyBuilder().store(Store([ca.cert])).build_server_verifier(x509.DNSName("verify.example"))
    chain = verifier.verify(leaf.cert, [])
    assert chain[-1] == ca.cert
    client = _memory_handshake(leaf.context, _client_ctx(ca), "verify.example")
    assert client.selected_alpn_protocol() == "http/1.1"  # h2 offered, only http/1.1 served
    peer = client.getpeercert(binary_form=True)
    assert peer is not None and x509.load_der_x509_certificate(peer) == leaf.cert


def test_leaf_for_other_name_is_rejected_by_a_verifying_client(ca: CertificateAuthority) -> None:
    leaf = LeafIssuer(ca, 600).issue("a.example")
    with pytest.raises(ssl.SSLError):
        # our sni guard aborts, and the client would fail hostname verification anyway
        _memory_handshake(leaf.context, _client_ctx(ca), "b.example")


def test_sni_guard_aborts_when_openssl_sees_another_name(ca: CertificateAuthority) -> None:
    leaf = LeafIssuer(ca, 600).issue("a.example")
    lax = _client_ctx(ca)
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    with pytest.raises(ssl.SSLError, match="TLSV1_UNRECOGNIZED_NAME"):
        _memory_handshake(leaf.context, lax, "b.example")
    # the same lax client with the right name passes, so the failure above is the guard
    _memory_handshake(leaf.context, lax, "A.Example")


def test_long_host_has_no_cn_and_critical_san(ca: CertificateAuthority) -> None:
    host = ".".join(["a" * 60] * 3) + ".example"
    leaf = LeafIssuer(ca, 600).issue(host)
    assert list(leaf.cert.subject) == []
    assert leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    _memory_handshake(leaf.context, _client_ctx(ca), host)


def test_leaf_never_outlives_the_ca(ca: CertificateAuthority) -> None:
    leaf = LeafIssuer(ca, 604800 * 4).issue("long.example")  # CA is valid for 10 days only
    assert leaf.cert.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_each_host_gets_its_own_key(ca: CertificateAuthority) -> None:
    issuer = LeafIssuer(ca, 600)
    a, b = issuer.issue("a.example").cert, issuer.issue("b.example").cert
    assert a.public_key() != b.public_key()
    assert a.serial_number != b.serial_number


# ---------------------------------------------------------------------------------------------- cache


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _counting_issuer(ca: CertificateAuthority, delay: float = 0.0) -> tuple[list[str], LeafIssuer]:
    calls: list[str] = []
    real = LeafIssuer(ca, 3600)
    lock = threading.Lock()

    class Counting(LeafIssuer):
        def issue(self, host: str, *, now: dt.datetime | None = None) -> IssuedLeaf:
            with lock:
                calls.append(host)
            if delay:
                time.sleep(delay)
            return real.issue(host)

    return calls, Counting(ca, 3600)


def _cache(ca: CertificateAuthority, metrics: Metrics, **kw: object) -> tuple[list[str], CertCache]:
    calls, issuer = _counting_issuer(ca, float(kw.pop("delay", 0.0)))  # type: ignore[arg-type]
    cache = CertCache(
        issuer.issue,
        on_lookup=lambda r: metrics.https_interception_cert_cache_total.labels(result=r).inc(),
        on_issued=lambda: metrics.https_interception_cert_issued_total.labels(decision="issued").inc(),
        **kw,  # type: ignore[arg-type]
    )
    return calls, cache


def _val(metrics: Metrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_hit_miss_and_lru_eviction(ca: CertificateAuthority) -> None:
    m = Metrics()
    calls, cache = _cache(ca, m, max_size=2, ttl_seconds=3600)

    async def main() -> None:
        a1 = await cache.get("a.example")
        await cache.get("b.example")
        assert await cache.get("a.example") is a1  # hit; a is now most recently used
        await cache.get("c.example")  # evicts b (least recently used), not a
        assert "b.example" not in cache and "a.example" in cache and len(cache) == 2
        assert await cache.get("a.example") is a1
        await cache.get("b.example")  # re-issued

    anyio.run(main)
    assert calls == ["a.example", "b.example", "c.example", "b.example"]
    assert _val(m, "botbox_https_interception_cert_cache_total", result="hit") == 2
    assert _val(m, "botbox_https_interception_cert_cache_total", result="miss") == 4
    assert _val(m, "botbox_https_interception_cert_issued_total", decision="issued") == 4


def test_ttl_expiry(ca: CertificateAuthority) -> None:
    clock = FakeClock()
    calls, cache = _cache(ca, Metrics(), max_size=10, ttl_seconds=60, clock=clock)

    async def main() -> None:
        first = await cache.get("t.example")
        clock.t += 59.9
        assert await cache.get("t.example") is first  # use does not extend the lifetime...
        clock.t += 0.2
        second = await cache.get("t.example")  # ...60 s after issuance it is gone
        assert second is not first

    anyio.run(main)
    assert calls == ["t.example", "t.example"]


def test_entry_expires_before_the_leaf_does(ca: CertificateAuthority) -> None:
    clock = FakeClock()
    issuer = LeafIssuer(ca, 120)
    cache = CertCache(issuer.issue, max_size=10, ttl_seconds=120, clock=clock)

    async def main() -> None:
        first = await cache.get("edge.example")
        clock.t += 119  # cache TTL == cert TTL: a margin keeps us from serving an about-to-expire leaf
        assert await cache.get("edge.example") is not first

    anyio.run(main)


def test_single_flight_under_50_concurrent_misses(ca: CertificateAuthority) -> None:
    m = Metrics()
    calls, cache = _cache(ca, m, max_size=10, ttl_seconds=3600, delay=0.2)
    results: list[IssuedLeaf] = []

    async def one() -> None:
        results.append(await cache.get("busy.example"))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(one)
            # the loop is not blocked while signing runs in a worker thread
            t0 = time.monotonic()
            await anyio.sleep(0.01)
            assert time.monotonic() - t0 < 0.15

    anyio.run(main)
    assert calls == ["busy.example"]
    assert len(results) == 50 and all(r is results[0] for r in results)
    assert _val(m, "botbox_https_interception_cert_issued_total", decision="issued") == 1
    assert _val(m, "botbox_https_interception_cert_cache_total", result="miss") == 50


def test_cancelled_first_caller_does_not_strand_waiters(ca: CertificateAuthority) -> None:
    calls, cache = _cache(ca, Metrics(), max_size=10, ttl_seconds=3600, delay=0.3)
    got: list[IssuedLeaf] = []

    async def main() -> None:
        async def first() -> None:
            with anyio.move_on_after(0.05):
                await cache.get("c.example")

        async def second() -> None:
            await anyio.sleep(0.01)
            got.append(await cache.get("c.example"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            tg.start_soon(second)
        assert "c.example" in cache  # the shielded issuance still landed in the cache

    anyio.run(main)
    assert calls == ["c.example"] and len(got) == 1


def test_issuance_failure_reaches_waiters_and_is_retried() -> None:
    attempts: list[str] = []

    def failing(host: str) -> IssuedLeaf:
        attempts.append(host)
        time.sleep(0.05)
        raise RuntimeError("boom")

    cache = CertCache(failing, max_size=4, ttl_seconds=10)
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await cache.get("f.example")
        except IssuanceError as exc:
            errors.append(exc)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(one)
        await one()

    anyio.run(main)
    assert len(errors) == 6 and attempts == ["f.example", "f.example"]
    assert "f.example" not in cache


def test_bad_cache_parameters() -> None:
    with pytest.raises(ValueError, match="max_size"):
        CertCache(lambda h: None, max_size=0, ttl_seconds=1)  # type: ignore[arg-type, return-value]
    with pytest.raises(ValueError, match="ttl"):
        CertCache(lambda h: None, max_size=1, ttl_seconds=0)  # type: ignore[arg-type, return-value]


def test_distinct_host_flood_is_shed_beyond_max_inflight(ca: CertificateAuthority) -> None:
    calls, cache = _cache(ca, Metrics(), max_size=100, ttl_seconds=3600, delay=0.3, max_inflight=3)
    outcomes: list[str] = []

    async def one(i: int) -> None:
        try:
            await cache.get(f"flood{i}.example")
            outcomes.append("ok")
        except IssuanceError as exc:
            assert "in flight" in str(exc)
            outcomes.append("shed")

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(one, i)
        # capacity is back once the flights land
        await cache.get("after.example")

    anyio.run(main)
    assert sorted(outcomes) == ["ok"] * 3 + ["shed"] * 3
    assert len(calls) == 4
