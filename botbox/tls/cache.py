"""Leaf-certificate cache: LRU-bounded, TTL-expiring, single-flight (SECURITY-SPEC T2).

* at most ``max_size`` hosts; the least recently used entry is evicted first;
* an entry is served for at most ``ttl`` seconds after it was *issued* (never refreshed by use), and
  never later than a safety margin before the leaf's own ``notAfter`` (so a client whose clock runs a
  little fast never sees an expired leaf);
* concurrent misses for one host share one issuance: the first caller signs (in a worker thread, the
  event loop keeps serving), the others wait for its result.  At most ``max_inflight`` different hosts
  are signed concurrently; a miss beyond that fails at once (load shedding under an SNI flood).
* a caller that is cancelled (handshake timeout) does not cancel the issuance for the others: signing
  runs shielded and the result is cached.

Counting: every lookup counts ``cert_cache_total{result="hit"|"miss"}`` (a caller that waits on another
caller's in-flight issuance counts as a miss: the cache did not have the certificate); every signing
counts ``cert_issued_total{decision="issued"}``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.to_thread

from botbox.tls.issuer import IssuedLeaf

__all__ = ["CertCache", "IssuanceError"]

_EXPIRY_MARGIN_MAX = 300.0


class IssuanceError(Exception):
    """Signing a leaf failed (the message never contains key material)."""


@dataclass(slots=True)
class _Flight:
    done: anyio.Event = field(default_factory=anyio.Event)
    leaf: IssuedLeaf | None = None
    error: str | None = None


class CertCache:
    def __init__(
        self,
        issue: Callable[[str], IssuedLeaf],
        *,
        max_size: int,
        ttl_seconds: float,
        on_lookup: Callable[[str], None] | None = None,
        on_issued: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_inflight: int = 8,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be > 0")
        self._issue = issue
        self.max_size = max_size
        self.ttl = float(ttl_seconds)
        self.max_inflight = max_inflight
        self._on_lookup = on_lookup
        self._on_issued = on_issued
        self._clock = clock
        self._wall = wall_clock
        self._entries: OrderedDict[str, tuple[float, IssuedLeaf]] = OrderedDict()
        self._inflight: dict[str, _Flight] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, host: object) -> bool:
        return host in self._entries

    def _expiry(self, leaf: IssuedLeaf) -> float:
        """Monotonic deadline of a fresh entry: issue time + ttl, capped before the leaf's notAfter."""
        now_m = self._clock()
        remaining = leaf.cert.not_valid_after_utc.timestamp() - self._wall()
        margin = min(_EXPIRY_MARGIN_MAX, remaining / 10)
        return now_m + max(0.0, min(self.ttl, remaining - margin))

    def peek(self, host: str) -> IssuedLeaf | None:
        """Fresh cached entry (marks it recently used), or None.  Does not count."""
        item = self._entries.get(host)
        if item is None:
            return None
        deadline, leaf = item
        if self._clock() >= deadline:
            del self._entries[host]
            return None
        self._entries.move_to_end(host)
        return leaf

    def _count(self, result: str) -> None:
        if self._on_lookup is not None:
            self._on_lookup(result)

    async def get(self, host: str) -> IssuedLeaf:
        """Return the leaf for ``host`` (canonical DNS name), issuing it at most once concurrently."""
        leaf = self.peek(host)
        if leaf is not None:
            self._count("hit")
            return leaf
        self._count("miss")
        flight = self._inflight.get(host)
        if flight is not None:
            await flight.done.wait()
            if flight.leaf is None:
                raise IssuanceError(flight.error or "certificate issuance failed")
            return flight.leaf
        if len(self._inflight) >= self.max_inflight:
            # Shed load instead of queueing: a flood of distinct SNIs must not occupy every worker
            # thread (anyio's default pool also serves DNS lookups for upstream connections).
            raise IssuanceError("too many certificate issuances in flight")
        flight = self._inflight[host] = _Flight()
        try:
            # Shielded: a cancelled first caller must not strand the callers waiting on this flight.
            with anyio.CancelScope(shield=True):
                try:
                    issued = await anyio.to_thread.run_sync(self._issue, host)
                except Exception as exc:
                    flight.error = f"certificate issuance for {host} failed: {type(exc).__name__}"
                    raise IssuanceError(flight.error) from None
            self._store(host, issued)
            flight.leaf = issued
            if self._on_issued is not None:
                self._on_issued()
            return issued
        finally:
            del self._inflight[host]
            flight.done.set()

    def _store(self, host: str, leaf: IssuedLeaf) -> None:
        self._entries[host] = (self._expiry(leaf), leaf)
        self._entries.move_to_end(host)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)
