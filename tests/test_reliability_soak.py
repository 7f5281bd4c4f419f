"""Short soak in CI (issue 6): ``bench.soak`` for ~20 s — ``botbox run`` as a subprocess under a mixed
keep-alive load with secret rotations, RSS sampled twice a second.

Bound (documented in README "Adversarial testing" and ``bench/soak.py``): after discarding the first
quarter as warm-up, the median RSS of the last quarter may exceed the median of the first
post-warm-up quarter by at most max(8 MiB, 10 % of baseline). A Python process's RSS wobbles by a few
MiB; a leak of ~1 KiB per request (tens of thousands of requests in 20 s) would overshoot it.
The long run is ``python -m bench.soak --minutes 10``.
"""

from __future__ import annotations

from bench.soak import run_soak


def test_short_soak_has_no_errors_and_no_memory_growth() -> None:
    res = run_soak(20, concurrency=8, sample_every=0.5, rotate_every=4.0, log=False)
    summary = (
        f"{res.requests} requests ({res.rps}/s), errors {res.errors} {res.error_samples[:3]}, "
        f"rotations {res.rotations}, baseline {res.baseline_kib / 1024:.1f} MiB, "
        f"growth {res.growth_kib / 1024:+.2f} MiB (bound {res.bound_kib / 1024:.1f}), "
        f"slope {res.slope_mib_per_hour:+.1f} MiB/h"
    )
    print(summary)
    assert res.errors == 0, summary
    assert res.unknown_fingerprints == 0, summary  # every credential upstream was a written value
    assert res.requests > 2000, summary  # the load was real
    assert res.bad_requests > 0 and res.denied > 0, summary  # the hostile mix ran too
    assert res.rotations >= 3, summary
    assert len(res.rss_kib) >= 20, summary
    assert res.growth_kib <= res.bound_kib, summary
    assert res.passed, summary
