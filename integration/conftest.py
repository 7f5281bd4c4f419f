"""Fixtures for the end-to-end suite: one namespace world per test module (built once, torn down after).

Every test in ``integration/`` needs root (network namespaces, iptables, setpriv); without it the tests
are skipped with the reason, never silently passed.  When a test fails, the recent logs of the world
(proxy, upstreams, resolvers, netsetup output; known secret values redacted) are attached to the report.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from integration.world import World

_HERE = Path(__file__).resolve().parent


def root_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, setpriv)"
    for tool in ("ip", "setpriv", "curl"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not os.path.exists("/usr/sbin/dnsmasq"):
        return "needs dnsmasq (apt-get install dnsmasq-base)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = root_unavailable_reason()
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.root)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        funcargs = getattr(item, "funcargs", {})
        for value in funcargs.values():
            if isinstance(value, World):
                rep.sections.append((f"world {value.index} logs (secrets redacted)", value.debug_tail()))
