"""The README's first command (``./dev demo``) must keep working: run it and check its verdict."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from integration.runtime import REPO_ROOT, interpreter


def test_demo_meets_every_expectation_and_cleans_up() -> None:
    netns_dir = Path("/var/run/netns")
    before = set(os.listdir(netns_dir)) if netns_dir.exists() else set()
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "BOTBOX_VENV")}
    proc = subprocess.run(
        [interpreter(), "-m", "integration.demo"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "✘" not in out
    summary = [line for line in out.splitlines() if "expectations met" in line]
    assert summary, out[-2000:]
    met, total = summary[0].split()[0].split("/")
    assert met == total and int(total) >= 15
    # Fingerprints only: no raw fake key in the output (keys start with these prefixes).
    assert "sk-fake-" not in out and "sk-ant-fake-" not in out
    after = set(os.listdir(netns_dir)) if netns_dir.exists() else set()
    assert not {n for n in after - before if n.startswith(("bbpod28", "bbnet28"))}, "demo left namespaces"
