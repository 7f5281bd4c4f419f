"""CI smoke for the atheris target (bounded) and a deterministic replay of the committed seed corpus.

The long run is a documented command (README "Adversarial testing", and ``fuzz_request.py``).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import fuzz_request
from tests.fuzz.fuzz_request import SEEDS_DIR, Harness
from tests.fuzz.smuggling_corpus import seed_inputs

REPO = Path(__file__).resolve().parents[2]
SMOKE_SECONDS = 20


def test_seed_corpus_is_committed_and_current() -> None:
    """The committed corpus holds every (small) case of the smuggling corpus."""
    files = {p.name.rsplit("-", 2)[0] for p in SEEDS_DIR.iterdir()}
    wanted = {
        n for n, raw in seed_inputs(fuzz_request.ALLOWED_HOST.encode()).items() if len(raw) <= 4096
    }
    assert wanted <= files, f"regenerate with --write-seeds: missing {sorted(wanted - files)}"


def test_seed_corpus_replays_clean() -> None:
    """Every seed through the real pipeline: no exception, every invariant of ``check`` holds."""
    harness = Harness()
    forwarded = 0
    for path in sorted(SEEDS_DIR.iterdir()):
        harness.run_one(path.read_bytes())
        forwarded += len(harness.upstream.hits)
    # The well-formed seeds must really reach the (fake) upstream, or the invariants checked nothing.
    assert forwarded >= 8


def test_invariant_checker_catches_a_leak() -> None:
    """The harness's checker is not vacuous: a forwarded request to a denied host is a finding."""
    hits = [(b"GET", "denied.example", 443, b"/", [(b"host", b"denied.example")], b"")]
    with pytest.raises(AssertionError, match=r"forwarded to denied\.example"):
        fuzz_request.check(b"", True, hits, "")
    with pytest.raises(AssertionError, match="secret value reached the client"):
        fuzz_request.check(b"HTTP/1.1 200 OK\r\n\r\n" + fuzz_request.SECRET, True, [], "")
    with pytest.raises(AssertionError, match="bytes after a 400"):
        fuzz_request.check(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            True, [], "",
        )


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_smoke(tmp_path: Path) -> None:
    """Coverage-guided run of the request-parsing target for a bounded time; any finding fails."""
    work = tmp_path / "corpus"
    shutil.copytree(SEEDS_DIR, work)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.fuzz_request", str(work),
         f"-max_total_time={SMOKE_SECONDS}", "-max_len=4096", "-timeout=10", "-rss_limit_mb=1024",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        cwd=str(REPO), capture_output=True, text=True, timeout=SMOKE_SECONDS + 60, check=False,
    )
    artifacts = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]
    tail = proc.stderr[-3000:]
    assert proc.returncode == 0 and not artifacts, f"fuzz finding {artifacts}:\n{tail}"
    assert "Done " in proc.stderr and "stat::number_of_executed_units" in proc.stderr, tail
    runs = int(proc.stderr.split("stat::number_of_executed_units:")[1].split()[0])
    assert runs > 1000, f"the target barely ran ({runs} executions):\n{tail}"
    assert fuzz_request.SECRET.decode() not in proc.stderr + proc.stdout
