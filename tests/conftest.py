"""Shared fixtures: throwaway CA, a real TLS upstream, a secrets dir, and in-process proxies."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.proxy import RunningProxy, make_config, running_proxy
from tests.support.upstream import TLSUpstream

SECRET_VALUE = "sk-test-5ecr3t-VALUE-never-logged-0123456789"


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def upstream(ca: trustme.CA) -> Iterator[TLSUpstream]:
    up = TLSUpstream(ca).start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    d = tmp_path / "secrets"
    d.mkdir()
    (d / "api-key").write_text(SECRET_VALUE + "\n")
    os.chmod(d / "api-key", 0o400)
    return d


@pytest.fixture
def base_config(secrets_dir: Path, ca_file: Path, upstream: TLSUpstream) -> dict[str, Any]:
    return make_config(secrets_dir=secrets_dir, ca_file=ca_file, upstream_port=upstream.port)


@pytest.fixture
def proxy_factory() -> Iterator[Callable[[dict[str, Any]], RunningProxy]]:
    with ExitStack() as stack:
        def start(cfg: dict[str, Any]) -> RunningProxy:
            return stack.enter_context(running_proxy(cfg))
        yield start


@pytest.fixture
def proxy(
    proxy_factory: Callable[[dict[str, Any]], RunningProxy], base_config: dict[str, Any]
) -> RunningProxy:
    return proxy_factory(base_config)
