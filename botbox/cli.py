"""``botbox`` command line: ``run``, ``check-config`` (and ``ca ...`` when ``botbox.tls.cli`` provides it).

Exit codes (CONTRACT §1): 0 ok / clean shutdown; 2 invalid configuration (stderr names the field and
why); 1 any other startup failure (port in use, unreadable CA or ``upstream_ca_file``, unreadable
``secrets_dir`` while a rule references a secret, ...).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from botbox import __version__

DEFAULT_CONFIG = "/etc/botbox/config.yaml"
EXIT_OK = 0
EXIT_STARTUP = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="botbox", description="BotBox egress proxy sidecar")
    p.add_argument("--version", action="version", version=f"botbox {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="start the proxy")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    run.add_argument("--worker-ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # internal
    check = sub.add_parser("check-config", help="validate the config and print the effective policy")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file")
    try:  # optional: CA management lives with the interception code (``botbox ca ...``)
        tls_cli = importlib.import_module("botbox.tls.cli")
    except ImportError:
        pass
    else:
        add_parser = getattr(tls_cli, "add_parser", None)
        if callable(add_parser):
            add_parser(sub)
    return p


def _load(path: str):  # type: ignore[no-untyped-def]  # returns Config; import kept lazy for startup time
    from botbox.config import load_config

    return load_config(path)


def _config_errors(exc: Exception, path: str) -> int:
    errors = getattr(exc, "errors", None) or [str(exc)]
    print(f"botbox: invalid configuration {path}:", file=sys.stderr)
    for line in errors:
        print(f"  {line}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_check_config(path: str) -> int:
    from botbox.config import ConfigError, describe_effective_policy

    try:
        cfg = _load(path)
    except ConfigError as exc:
        return _config_errors(exc, path)
    sys.stdout.write(describe_effective_policy(cfg))
    print(f"configuration {path} is valid")
    return EXIT_OK


def cmd_run(path: str, worker_ready_fd: int | None = None) -> int:
    from botbox.config import ConfigError

    try:
        cfg = _load(path)
    except ConfigError as exc:
        return _config_errors(exc, path)

    import anyio

    from botbox.logs import JsonLogger, install_stdlib_bridge
    from botbox.server import Runtime, StartupError, run_until_signal

    logger = JsonLogger()
    install_stdlib_bridge(logger)
    if cfg.workers > 1 and worker_ready_fd is None:
        from botbox.server import run_workers

        return run_workers(cfg, path, logger)

    if worker_ready_fd is not None:
        _die_with_parent()

    async def main() -> None:
        await run_until_signal(Runtime(cfg, logger=logger, worker_ready_fd=worker_ready_fd))

    backend_options: dict[str, object] = {}
    try:
        import uvloop  # noqa: F401

        backend_options["use_uvloop"] = True
    except ImportError:
        pass
    try:
        anyio.run(main, backend="asyncio", backend_options=backend_options)
    except StartupError as exc:
        logger.error("startup failed", error=str(exc))  # noqa: TRY400 - not stdlib logging
        print(f"botbox: startup failed: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _die_with_parent() -> None:
    """A worker gets SIGTERM (and drains) if its supervisor dies, instead of lingering orphaned."""
    import ctypes
    import os
    import signal

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the supervisor already died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args.config, args.worker_ready_fd)
    if args.command == "check-config":
        return cmd_check_config(args.config)
    handler = getattr(args, "handler", None)
    if callable(handler):
        return int(handler(args))
    return EXIT_CONFIG
