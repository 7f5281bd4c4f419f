"""Listeners, connection limits, shutdown drain and the process runtime.

``Server`` owns the proxy listeners. Each listener is registered with :meth:`Server.add_listener`
(name ``"http"`` or ``"https_interception"``, address, port, handler); all of them share:

* ``max_connections``: a connection beyond the limit is accepted and closed immediately, counted as
  ``botbox_connections_rejected_total{reason="max_connections"}``;
* the ``botbox_active_connections{listener}`` gauge;
* the ``[::1]`` twin: a listener on ``127.0.0.1`` also listens on ``[::1]`` at the same port when the
  namespace has IPv6 (ip6tables REDIRECT delivers there). No IPv6 in the namespace → info log and
  no twin; IPv6 present but the twin cannot bind (e.g. the port is taken by another process, which
  would then receive redirected IPv6 traffic) → startup failure;
* the drain on shutdown: stop accepting, close idle keep-alive connections at once, let in-flight
  requests finish for up to ``shutdown_grace_seconds``, then cancel what is left.

HTTPS interception hook: when ``https_interception.enabled`` is true, :class:`Runtime` imports
``botbox.tls.install_interception(server: Server, app: ProxyApp) -> None`` which loads the CA (raise
any exception to fail startup with exit 1), sets ``app.ca_ready = True`` and calls
``server.add_listener("https_interception", addr, port, handler)``. The handler receives the accepted
TCP stream and a :class:`~botbox.pipeline.ConnectionContext` (``sni=None``), wraps the stream in TLS
and calls ``serve_connection(tls_stream, dataclasses.replace(ctx, sni=...), app)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from botbox.admin import AdminHandler
from botbox.config import Config, startup_warnings
from botbox.fastio import FastStream
from botbox.logs import JsonLogger
from botbox.metrics import Metrics
from botbox.origdst import format_addr, original_dst
from botbox.pipeline import (
    CURRENT_CONNECTION,
    ConnectionContext,
    ConnectionState,
    ListenerName,
    ProxyApp,
    serve_connection,
)
from botbox.policy import Policy
from botbox.secrets import SecretStore, watch_secrets
from botbox.upstream import UpstreamPool, build_ssl_context

__all__ = ["ConnectionHandler", "Runtime", "Server", "StartupError", "ipv6_enabled"]

ConnectionHandler = Callable[[anyio.abc.SocketStream, ConnectionContext], Awaitable[None]]

_LISTEN_BACKLOG = 1024
_SECRETS_RECHECK_SECONDS = 10.0


class StartupError(Exception):
    """A startup failure other than invalid configuration (exit code 1). The message is safe to log."""


def ipv6_enabled() -> bool:
    """True when IPv6 is usable on loopback in the current network namespace."""
    if not socket.has_ipv6:
        return False
    try:
        return Path("/proc/sys/net/ipv6/conf/lo/disable_ipv6").read_text().strip() == "0"
    except OSError:
        return False


def _bind(addr: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr, port))
        sock.listen(_LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _fmt(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def bind_with_twin(
    what: str, addr: str, port: int, *, twin: bool, reuse_port: bool, logger: JsonLogger
) -> list[socket.socket]:
    """Bind ``addr:port`` and, for ``127.0.0.1`` with IPv6 enabled, ``[::1]`` at the same port."""
    try:
        first = _bind(addr, port, reuse_port=reuse_port)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise StartupError(f"cannot listen on {_fmt(addr, port)} ({what}): {why}") from exc
    socks = [first]
    if twin and addr == "127.0.0.1":
        real_port = first.getsockname()[1]
        if not ipv6_enabled():
            logger.info("IPv6 disabled in this network namespace; no [::1] twin listener",
                        listener=what, port=real_port)
        else:
            try:
                socks.append(_bind("::1", real_port, reuse_port=reuse_port))
            except OSError as exc:
                if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    logger.warning("cannot listen on [::1]; redirected IPv6 connections will fail",
                                   listener=what, port=real_port, error=exc.strerror)
                else:
                    first.close()
                    raise StartupError(
                        f"cannot listen on {_fmt('::1', real_port)} ({what} IPv6 twin): {exc.strerror or exc}"
                    ) from exc
    return socks


@dataclass
class _ListenerSpec:
    name: ListenerName
    addr: str
    port: int
    handler: ConnectionHandler
    twin_v6: bool
    sockets: list[socket.socket] = field(default_factory=list)


class Server:
    """Proxy listeners sharing ``max_connections``, the active gauge, the ``[::1]`` twin and the drain."""

    def __init__(
        self,
        app: ProxyApp,
        *,
        max_connections: int,
        shutdown_grace: float,
        reuse_port: bool = False,
    ) -> None:
        self.app = app
        self.metrics: Metrics = app.metrics
        self.logger: JsonLogger = app.logger
        self.max_connections = max_connections
        self.shutdown_grace = shutdown_grace
        self.reuse_port = reuse_port
        self._specs: list[_ListenerSpec] = []
        self._admin: tuple[str, int, AdminHandler] | None = None
        self._admin_socks: list[socket.socket] = []
        self._active = 0
        self._conns: set[ConnectionState] = set()
        self._idle_event = anyio.Event()
        self._accept_scope = anyio.CancelScope()
        self._gauges = {
            "http": self.metrics.active_connections.labels(listener="http"),
            "https_interception": self.metrics.active_connections.labels(listener="https_interception"),
        }
        self._rejected_max = self.metrics.connections_rejected_total.labels(reason="max_connections")
        self.bound: dict[str, list[tuple[str, int]]] = {}

    # -- registration --------------------------------------------------------------------------

    def add_listener(
        self,
        name: ListenerName,
        addr: str,
        port: int,
        handler: ConnectionHandler,
        *,
        twin_v6: bool = True,
    ) -> None:
        """Register a proxy listener; must be called before :meth:`bind`."""
        if any(s.name == name for s in self._specs):
            raise ValueError(f"listener {name!r} already registered")
        self._specs.append(_ListenerSpec(name, addr, port, handler, twin_v6))

    def set_admin(self, addr: str, port: int, handler: AdminHandler) -> None:
        self._admin = (addr, port, handler)

    @property
    def active_connections(self) -> int:
        return self._active

    # -- binding -------------------------------------------------------------------------------

    def _bind_with_twin(self, what: str, addr: str, port: int, twin: bool) -> list[socket.socket]:
        return bind_with_twin(what, addr, port, twin=twin, reuse_port=self.reuse_port, logger=self.logger)

    def bind(self) -> None:
        """Bind every registered listener (and the admin listener). Raises ``StartupError``."""
        try:
            for spec in self._specs:
                spec.sockets = self._bind_with_twin(spec.name, spec.addr, spec.port, spec.twin_v6)
                self.bound[spec.name] = [s.getsockname()[:2] for s in spec.sockets]
            if self._admin is not None:
                addr, port, _ = self._admin
                self._admin_socks = self._bind_with_twin("admin", addr, port, True)
                self.bound["admin"] = [s.getsockname()[:2] for s in self._admin_socks]
        except BaseException:
            self.close_sockets()
            raise

    def close_sockets(self) -> None:
        for spec in self._specs:
            for s in spec.sockets:
                s.close()
        for s in self._admin_socks:
            s.close()

    # -- serving -------------------------------------------------------------------------------

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until :meth:`drain` (or cancellation); connection tasks live in here."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            with self._accept_scope:
                async with anyio.create_task_group() as accept_tg:
                    for spec in self._specs:
                        for sock in spec.sockets:
                            accept_tg.start_soon(self._accept_loop, sock, spec)
                    if self._admin is not None:
                        for sock in self._admin_socks:
                            listener = await anyio.abc.SocketListener.from_socket(sock)
                            accept_tg.start_soon(self._admin_loop, listener, self._admin[2])
                    task_status.started()
            # Accepting stopped; connection tasks (children of ``tg``) drain on their own.

    async def _accept_loop(self, sock: socket.socket, spec: _ListenerSpec) -> None:
        # Accepted connections are served on FastStream (native transport; see botbox/fastio.py).
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    conn, remote = await loop.sock_accept(sock)
                except OSError as exc:  # EMFILE and friends: back off, never spin
                    self.logger.error("accept failed", listener=spec.name, error=exc.strerror)  # noqa: TRY400
                    await anyio.sleep(0.1)
                    continue
                self._tg.start_soon(self._handle_accepted, conn, remote, spec)
        finally:
            sock.close()  # draining: new connections are refused from now on

    async def _handle_accepted(self, conn: socket.socket, remote: Any, spec: _ListenerSpec) -> None:
        if self._active >= self.max_connections or self.app.draining:
            if not self.app.draining:
                self._rejected_max.inc()
            conn.close()
            return
        try:
            stream = await FastStream.from_accepted(conn, remote)
        except OSError:
            return  # the client went away between accept and setup
        await self._handle(stream, spec)

    async def _admin_loop(self, listener: anyio.abc.SocketListener, handler: AdminHandler) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError:
                    await anyio.sleep(0.1)
                    continue
                self._tg.start_soon(handler, stream)

    async def _handle(self, stream: anyio.abc.SocketStream, spec: _ListenerSpec) -> None:
        if self._active >= self.max_connections or self.app.draining:
            if not self.app.draining:
                self._rejected_max.inc()
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.aclose()
            return
        self._active += 1
        gauge = self._gauges[spec.name]
        gauge.inc()
        state = ConnectionState()
        self._conns.add(state)
        token = CURRENT_CONNECTION.set(state)
        try:
            with state.scope:
                ctx = self._context(stream, spec.name)
                await spec.handler(stream, ctx)
        except Exception as exc:  # a handler bug must not take the server down
            self.logger.error(  # noqa: TRY400 - JsonLogger, and never a traceback (could quote data)
                "connection handler failed", listener=spec.name, error=type(exc).__name__
            )
        finally:
            CURRENT_CONNECTION.reset(token)
            self._conns.discard(state)
            self._active -= 1
            gauge.dec()
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0), contextlib.suppress(Exception):
                await stream.aclose()
            if self._active == 0:
                self._idle_event.set()

    def _context(self, stream: anyio.abc.SocketStream, name: ListenerName) -> ConnectionContext:
        remote: Any = stream.extra(SocketAttribute.remote_address, None)  # noqa: S610
        peer = format_addr((str(remote[0]), int(remote[1]))) if isinstance(remote, tuple) else str(remote)
        sock: socket.socket | None = stream.extra(SocketAttribute.raw_socket, None)  # noqa: S610
        orig: tuple[str, int] | None = None
        if sock is not None:
            try:
                orig = original_dst(sock)
            except OSError as exc:
                self.logger.warning("SO_ORIGINAL_DST failed; treating connection as not redirected",
                                    client=peer, error=exc.strerror)
        return ConnectionContext(listener=name, peer=peer or "", orig_dst=orig)

    async def drain(self) -> None:
        """Stop accepting, close idle connections, wait up to the grace period, cancel the rest."""
        self.app.draining = True
        self._accept_scope.cancel()
        for state in list(self._conns):
            if state.idle:
                state.scope.cancel()
        if self._active:
            self._idle_event = anyio.Event()
            with anyio.move_on_after(self.shutdown_grace):
                while self._active:
                    await self._idle_event.wait()
                    self._idle_event = anyio.Event()
        for state in list(self._conns):
            state.scope.cancel()
        with anyio.move_on_after(2.0):
            while self._active:  # noqa: ASYNC110 - cancelled tasks finish within a few ticks
                await anyio.sleep(0.01)


class Runtime:
    """Builds the app from a validated config and runs it (used by ``botbox run`` and the tests)."""

    def __init__(
        self, config: Config, *, logger: JsonLogger | None = None, worker_ready_fd: int | None = None
    ) -> None:
        self.config = config
        self.logger = logger or JsonLogger()
        self.metrics = Metrics()
        # Worker of a ``workers > 1`` supervisor: SO_REUSEPORT listeners, no admin listener (the
        # supervisor serves it), readiness reported by writing one byte to this fd.
        self.worker_ready_fd = worker_ready_fd
        self._stop: anyio.Event | None = None
        self._stop_requested = False
        self.server: Server | None = None
        self.app: ProxyApp | None = None

    def build(self) -> Server:
        cfg = self.config
        log = self.logger
        policy = Policy.from_config(cfg.egress_policy)
        secrets = SecretStore(cfg.secrets_dir)
        if not secrets.initial_load_ok:
            if policy.referenced_secrets:
                raise StartupError(
                    f"secrets_dir {str(cfg.secrets_dir)!r} is not readable: {secrets.last_error}"
                )
            log.info("secrets_dir not readable; no rule references a secret",
                     secrets_dir=str(cfg.secrets_dir))
        missing = sorted(n for n in policy.referenced_secrets if secrets.get(n) is None)
        if missing:
            log.warning("referenced secrets not available yet; /healthz is 503 and requests needing "
                        "them fail with 500 until they appear", secrets=missing)
        try:
            ssl_ctx = build_ssl_context(cfg.upstream_ca_file)
        except (OSError, ValueError) as exc:
            raise StartupError(f"upstream_ca_file {str(cfg.upstream_ca_file)!r} unusable: {exc}") from exc
        upstream = UpstreamPool(
            ssl_context=ssl_ctx,
            connect_timeout=cfg.connect_timeout_seconds,
            idle_timeout=cfg.upstream_idle_timeout_seconds,
            max_connections=max(cfg.max_connections, 16),
        )
        app = ProxyApp(config=cfg, policy=policy, secrets=secrets, upstream=upstream,
                       metrics=self.metrics, logger=log)
        self.app = app
        server = Server(app, max_connections=cfg.max_connections, shutdown_grace=cfg.shutdown_grace_seconds,
                        reuse_port=self.worker_ready_fd is not None)

        async def http_handler(stream: anyio.abc.SocketStream, ctx: ConnectionContext) -> None:
            await serve_connection(stream, ctx, app)

        server.add_listener("http", cfg.listen_addr, cfg.listen_port, http_handler)
        if app.interception_enabled:
            try:
                from botbox.tls import install_interception  # type: ignore[attr-defined,unused-ignore]
            except ImportError as exc:
                raise StartupError("https_interception is enabled but botbox.tls is not available") from exc
            try:
                install_interception(server, app)
            except StartupError:
                raise
            except Exception as exc:
                raise StartupError(f"HTTPS interception setup failed: {exc}") from exc
        if self.worker_ready_fd is None:
            server.set_admin(cfg.metrics_addr, cfg.metrics_port,
                             AdminHandler(ready=app.ready, render_metrics=self.metrics.render,
                                          header_timeout=cfg.request_header_timeout_seconds))
            for warning in startup_warnings(cfg):
                log.warning(warning)
        server.bind()
        self.server = server
        return server

    def request_stop(self) -> None:
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    def _on_secrets_reload(self, ok: bool) -> None:
        self.metrics.secrets_reload_total.labels(result="ok" if ok else "error").inc()
        if ok:
            self.logger.info("secrets reloaded")
        else:
            self.logger.error("secrets reload failed; keeping last known-good values")

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Build (if needed), serve until :meth:`request_stop`, drain, and clean up."""
        server = self.server or self.build()
        app = self.app
        self._stop = anyio.Event()
        if self._stop_requested:
            self._stop.set()
        if app is None:  # pragma: no cover - build() sets it
            raise StartupError("runtime not built")
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                tg.start_soon(watch_secrets, app.secrets, self._on_secrets_reload, _SECRETS_RECHECK_SECONDS)
                self.logger.info("listening", pid=os.getpid(), **{
                    k: [_fmt(a, p) for a, p in v] for k, v in server.bound.items()
                })
                if self.worker_ready_fd is not None:
                    os.write(self.worker_ready_fd, b"1")
                    os.close(self.worker_ready_fd)
                task_status.started()
                await self._stop.wait()
                self.logger.info("shutting down", grace_seconds=server.shutdown_grace,
                                 active_connections=server.active_connections)
                await server.drain()
                tg.cancel_scope.cancel()
        finally:
            server.close_sockets()
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0), contextlib.suppress(Exception):
                await app.upstream.aclose()
        self.logger.info("stopped")


async def run_until_signal(runtime: Runtime) -> None:
    """Serve until SIGTERM/SIGINT, then drain (``botbox run``). A second signal skips the drain."""
    runtime.build()  # StartupError surfaces here, before any task group wraps it
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                first = True
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if first:
                        runtime.logger.info("signal received; draining", signal=name)
                        runtime.request_stop()
                        first = False
                    else:
                        runtime.logger.warning("second signal; stopping without waiting for the drain",
                                               signal=name)
                        tg.cancel_scope.cancel()

        tg.start_soon(watch_signals)
        await runtime.serve()
        tg.cancel_scope.cancel()


def run_workers(cfg: Config, config_path: str, logger: JsonLogger) -> int:
    """``workers > 1``: supervise N ``botbox run`` worker processes sharing the proxy ports.

    Each worker binds the proxy listeners itself with ``SO_REUSEPORT`` (the kernel spreads connections)
    and writes its metrics to a private prometheus multiprocess directory; this supervisor serves the
    admin listener, aggregating the metrics of all workers. ``/healthz`` is 200 while every worker is
    up and every referenced secret resolves. SIGTERM/SIGINT is forwarded to every worker (each drains
    up to ``shutdown_grace_seconds``). A worker that dies is restarted. Returns the exit code.
    ``max_connections`` applies per worker.
    """
    import shutil
    import tempfile

    try:
        mpdir = tempfile.mkdtemp(prefix="botbox-metrics-")
    except OSError as exc:
        logger.error("workers > 1 needs a writable temp dir for shared metrics (set TMPDIR, e.g. to an "  # noqa: TRY400
                     "emptyDir mount)", error=exc.strerror or str(exc))
        return 1
    try:
        return anyio.run(_supervise, cfg, config_path, logger, mpdir, backend="asyncio",
                         backend_options=_loop_options())
    except StartupError as exc:
        logger.error("startup failed", error=str(exc))  # noqa: TRY400 - JsonLogger
        return 1
    finally:
        shutil.rmtree(mpdir, ignore_errors=True)


def _loop_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


@dataclass
class _Worker:
    index: int
    proc: Any  # subprocess.Popen[bytes]
    ready_r: int


def _spawn_worker(index: int, config_path: str, mpdir: str) -> _Worker:
    import subprocess
    import sys

    r, w = os.pipe()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": mpdir}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "botbox", "run", "--config", config_path, "--worker-ready-fd", str(w)],
            pass_fds=(w,), env=env,
        )
    finally:
        os.close(w)
    return _Worker(index, proc, r)


async def _wait_ready(worker: _Worker, limit: float) -> bool:
    def read() -> bytes:
        try:
            return os.read(worker.ready_r, 1)
        finally:
            os.close(worker.ready_r)

    with anyio.move_on_after(limit):
        return await anyio.to_thread.run_sync(read, abandon_on_cancel=True) == b"1"
    return False


async def _supervise(cfg: Config, config_path: str, logger: JsonLogger, mpdir: str) -> int:
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=mpdir)  # type: ignore[no-untyped-call]
    policy = Policy.from_config(cfg.egress_policy)
    secrets = SecretStore(cfg.secrets_dir)
    for warning in startup_warnings(cfg):
        logger.warning(warning)

    workers = [_spawn_worker(i, config_path, mpdir) for i in range(cfg.workers)]

    def stop_all(sig: int = signal.SIGTERM) -> None:
        for wk in workers:
            if wk.proc.poll() is None:
                wk.proc.send_signal(sig)

    async def reap(limit: float) -> None:
        with anyio.move_on_after(limit):
            while any(wk.proc.poll() is None for wk in workers):  # noqa: ASYNC110 - polling child processes
                await anyio.sleep(0.05)
        for wk in workers:
            if wk.proc.poll() is None:
                wk.proc.kill()
                await anyio.to_thread.run_sync(wk.proc.wait)

    # Startup: every worker must report ready; the first failure decides the exit code.
    for wk in workers:
        if not await _wait_ready(wk, 60.0):
            stop_all()
            await reap(5.0)
            code = wk.proc.returncode
            logger.error("worker failed to start", worker=wk.index, exit_code=code)
            return code if code in (1, 2) else 1
    try:
        admin_socks = bind_with_twin("admin", cfg.metrics_addr, cfg.metrics_port, twin=True,
                                     reuse_port=False, logger=logger)
    except StartupError:
        stop_all()
        await reap(cfg.shutdown_grace_seconds + 5)
        raise

    stopping = False

    def ready() -> bool:
        return not stopping and all(wk.proc.poll() is None for wk in workers) and secrets.available(
            policy.referenced_secrets
        )

    admin = AdminHandler(ready=ready, render_metrics=lambda: generate_latest(registry),
                         header_timeout=cfg.request_header_timeout_seconds)

    async def admin_loop(sock: socket.socket) -> None:
        listener = await anyio.abc.SocketListener.from_socket(sock)
        async with listener, anyio.create_task_group() as conns:
            while True:
                try:
                    stream = await listener.accept()
                except OSError:
                    await anyio.sleep(0.1)
                    continue
                conns.start_soon(admin, stream)

    async def monitor() -> None:
        while True:
            await anyio.sleep(0.5)
            for i, wk in enumerate(workers):
                code = wk.proc.poll()
                if code is None or stopping:
                    continue
                logger.error("worker exited unexpectedly; restarting", worker=wk.index,
                             pid=wk.proc.pid, exit_code=code)
                multiprocess.mark_process_dead(wk.proc.pid, mpdir)  # type: ignore[no-untyped-call]
                await anyio.sleep(1.0)
                if stopping:
                    return
                workers[i] = _spawn_worker(wk.index, config_path, mpdir)
                if not await _wait_ready(workers[i], 60.0):
                    logger.error("restarted worker failed to start", worker=wk.index)

    def on_reload(ok: bool) -> None:
        if not ok:
            logger.error("secrets reload failed in supervisor; keeping last known-good values")

    logger.info("listening", pid=os.getpid(), workers=[wk.proc.pid for wk in workers],
                admin=[_fmt(*s.getsockname()[:2]) for s in admin_socks])
    async with anyio.create_task_group() as tg:
        for sock in admin_socks:
            tg.start_soon(admin_loop, sock)
        tg.start_soon(monitor)
        tg.start_soon(watch_secrets, secrets, on_reload, _SECRETS_RECHECK_SECONDS)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logger.info("signal received; draining workers", signal=signal.Signals(signum).name)
                break
        stopping = True
        stop_all()
        await reap(cfg.shutdown_grace_seconds + 5)
        for wk in workers:
            multiprocess.mark_process_dead(wk.proc.pid, mpdir)  # type: ignore[no-untyped-call]
        tg.cancel_scope.cancel()
    logger.info("stopped")
    return 0
