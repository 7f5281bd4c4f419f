"""Every metric of CONTRACT §5, in one registry owned by the app (not the process-global default).

Label children that are hit per request are cached in plain dicts so the hot path is one dict lookup
plus one ``inc()``/``observe()``; host labels are bounded by the policy (canonical allowed hosts plus
``_denied``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "DECISIONS", "Metrics"]

DECISIONS = ("allow", "deny", "denied_connect", "denied_no_host", "bad_request")
UPSTREAM_ERROR_CONNECTION = "connection_error"
UPSTREAM_ERROR_TIMEOUT = "timeout"

# Latency buckets (seconds) covering fast API calls up to long streamed completions.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The metric families of CONTRACT §5 with exact names, labels and types."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests_total = Counter(
            "botbox_requests_total", "Requests handled by the proxy, by host and decision.",
            ["host", "decision"], registry=r,
        )
        self.request_duration_seconds = Histogram(
            "botbox_request_duration_seconds", "Time from request head received to response end.",
            ["host"], registry=r, buckets=_DURATION_BUCKETS,
        )
        self.upstream_errors_total = Counter(
            "botbox_upstream_errors_total",
            "Upstream failures: HTTP status >= 500, connection_error or timeout.",
            ["host", "status_code"], registry=r,
        )
        self.header_rewrites_total = Counter(
            "botbox_header_rewrites_total", "Requests forwarded with at least one header rewritten.",
            ["host"], registry=r,
        )
        self.secrets_reload_total = Counter(
            "botbox_secrets_reload_total", "Secret store reloads by result.", ["result"], registry=r,
        )
        self.active_connections = Gauge(
            "botbox_active_connections", "Open client connections per proxy listener.", ["listener"],
            registry=r, multiprocess_mode="livesum",
        )
        self.connections_rejected_total = Counter(
            "botbox_connections_rejected_total", "Client connections refused or closed by the proxy.",
            ["reason"], registry=r,
        )
        self.tls_handshakes_total = Counter(
            "botbox_tls_handshakes_total", "Inbound TLS handshakes on the interception listener.",
            ["result"], registry=r,
        )
        self.https_interception_cert_issued_total = Counter(
            "botbox_https_interception_cert_issued_total", "Leaf certificate issuance decisions.",
            ["decision"], registry=r,
        )
        self.https_interception_cert_cache_total = Counter(
            "botbox_https_interception_cert_cache_total", "Leaf certificate cache lookups.",
            ["result"], registry=r,
        )
        self.https_interception_host_mismatch_total = Counter(
            "botbox_https_interception_host_mismatch_total",
            "Intercepted requests whose Host differed from the TLS SNI.", registry=r,
        )
        # Pre-create the fixed label sets so every series is exported (at 0) from the start.
        for listener in ("http", "https_interception"):
            self.active_connections.labels(listener=listener)
        for reason in ("max_connections", "timeout"):
            self.connections_rejected_total.labels(reason=reason)
        for result in ("ok", "error"):
            self.secrets_reload_total.labels(result=result)
        for result in ("ok", "io_error", "timeout", "denied"):
            self.tls_handshakes_total.labels(result=result)
        for decision in ("issued", "denied"):
            self.https_interception_cert_issued_total.labels(decision=decision)
        for result in ("hit", "miss"):
            self.https_interception_cert_cache_total.labels(result=result)
        self._req: dict[tuple[str, str], Counter] = {}
        self._dur: dict[str, Histogram] = {}
        self._rw: dict[str, Counter] = {}
        self._uerr: dict[tuple[str, str], Counter] = {}

    # Hot-path helpers (label children cached).
    def request(self, host: str, decision: str, duration: float | None) -> None:
        key = (host, decision)
        child = self._req.get(key)
        if child is None:
            child = self._req[key] = self.requests_total.labels(host=host, decision=decision)
        child.inc()
        if duration is not None:
            hist = self._dur.get(host)
            if hist is None:
                hist = self._dur[host] = self.request_duration_seconds.labels(host=host)
            hist.observe(duration)

    def header_rewrite(self, host: str) -> None:
        child = self._rw.get(host)
        if child is None:
            child = self._rw[host] = self.header_rewrites_total.labels(host=host)
        child.inc()

    def upstream_error(self, host: str, status_code: str) -> None:
        key = (host, status_code)
        child = self._uerr.get(key)
        if child is None:
            child = self._uerr[key] = self.upstream_errors_total.labels(host=host, status_code=status_code)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
