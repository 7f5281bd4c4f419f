"""Origin servers and contenders, each configured for the same job: accept plain HTTP/1.1, originate
verified TLS (SNI + hostname check against the throwaway bench CA) to the origin over pooled keep-alive
connections and add one request header (`Authorization: Bearer <token>`). The origin answers 401 when
that header is missing or wrong, so a misconfigured contender shows up as errors, not as speed."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from bench.env import BENCH_VENV, CPU_LOAD, CPU_PEER, PROJECT_PY, pin

ORIGIN_HOST = "localhost"
ORIGIN_PORT = 443  # private netns: the real port, so BotBox's interception (Host port must be 443) works
SSE_PORT = 9443
TOKEN = "bench-token-4b1d9c"  # lives only in the throwaway namespace; not a real credential
BODY = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-1",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":9,"completion_tokens":1}}'
)
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    icept_ca_cert: Path
    icept_ca_key: Path


def make_certs(work: Path) -> Certs:
    ca = trustme.CA(organization_name="BotBox bench throwaway CA")
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")
    paths = Certs(
        work / "ca.pem",
        work / "origin.pem",
        work / "origin.key",
        work / "icept-ca.pem",
        work / "icept-ca.key",
    )
    ca.cert_pem.write_to_path(str(paths.ca))
    leaf.private_key_pem.write_to_path(str(paths.key))
    with paths.cert.open("wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    # negative controls: a cert from the trusted CA for another name, and one for localhost from a CA
    # nobody trusts; every contender must refuse both (proves hostname check + chain verification)
    for stem, issuer, names in (
        ("origin-wrongname", ca, ("not-localhost.invalid",)),
        (
            "origin-rogue",
            trustme.CA(organization_name="Untrusted rogue CA"),
            ("localhost", "127.0.0.1", "::1"),
        ),
    ):
        bad = issuer.issue_cert(*names)
        bad.private_key_pem.write_to_path(str(work / f"{stem}.key"))
        (work / f"{stem}.key").chmod(0o600)
        with (work / f"{stem}.pem").open("wb") as f:
            for blob in bad.cert_chain_pems:
                f.write(blob.bytes())
    icept = trustme.CA(organization_name="BotBox bench interception CA")
    icept.cert_pem.write_to_path(str(paths.icept_ca_cert))
    icept.private_key_pem.write_to_path(str(paths.icept_ca_key))
    for p in (paths.ca, paths.cert, paths.icept_ca_cert):
        p.chmod(0o644)  # squid runs as uid proxy and must read the trust anchor
    for p in (paths.key, paths.icept_ca_key):
        p.chmod(0o600)  # read by root-started nginx and by BotBox, which refuses group/other-readable CA keys
    return paths


# ------------------------------------------------------------------------------------------ processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    cpus: set[int]
    teardown: list[Callable[[], None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def truncate_log(self) -> None:
        with contextlib.suppress(OSError):
            os.truncate(self.log_path, 0)

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        for fn in self.teardown:
            fn()


def spawn(
    name: str,
    argv: list[str],
    work: Path,
    cpus: set[int],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    log_path = work / f"{name}.log"
    fh = log_path.open("ab")
    cpu_list = ",".join(str(c) for c in sorted(cpus))
    popen = subprocess.Popen(
        ["taskset", "-c", cpu_list, *argv],
        stdout=fh,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        start_new_session=True,  # RLIMIT_NOFILE inherited (raise_nofile)
    )
    fh.close()
    return Proc(name, popen, log_path, cpus)


def wait_port(port: int, proc: Proc, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not listen on {port} within {timeout}s:\n{proc.log_tail()}")


def http_get(
    port: int, host_header: str, tls_ctx: ssl.SSLContext | None = None, path: str = "/", extra: str = ""
) -> tuple[int, bytes]:
    """One raw HTTP/1.1 request (Connection: close); returns (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        sock: socket.socket = raw
        if tls_ctx is not None:
            sock = tls_ctx.wrap_socket(raw, server_hostname=ORIGIN_HOST)
        req = f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n{extra}Connection: close\r\n\r\n"
        sock.sendall(req.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


# ---------------------------------------------------------------------------------------------- origin


def _nginx_common(work: Path, name: str) -> str:
    tmp = work / f"{name}-tmp"
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o777)
    return textwrap.dedent(f"""\
        worker_processes 1;
        worker_rlimit_nofile 20000;
        pid {work}/{name}.pid;
        error_log {work}/{name}.log warn;
        user nobody nogroup;
        events {{ worker_connections 19000; multi_accept off; }}
        """) + textwrap.dedent(f"""\
        http {{
            access_log off;
            client_body_temp_path {tmp}/body;
            proxy_temp_path {tmp}/proxy;
            fastcgi_temp_path {tmp}/fcgi;
            uwsgi_temp_path {tmp}/uwsgi;
            scgi_temp_path {tmp}/scgi;
            keepalive_requests 100000000;
            keepalive_timeout 600s;
        """)


def start_origin(work: Path, certs: Certs, variant: str = "") -> Proc:
    """nginx serving a ~200-byte JSON over TLS 1.3 with keep-alive; 401 without the injected header.
    `variant` "wrongname"/"rogue" serves a certificate every contender must reject."""
    cert, key = (
        (certs.cert, certs.key)
        if not variant
        else (work / f"origin-{variant}.pem", work / f"origin-{variant}.key")
    )
    conf = _nginx_common(work, "origin") + textwrap.dedent(f"""\
            map $http_authorization $bench_auth_ok {{ "Bearer {TOKEN}" 1; default 0; }}
            server {{
                listen 127.0.0.1:{ORIGIN_PORT} ssl backlog=8192;
                listen [::1]:{ORIGIN_PORT} ssl backlog=8192;
                server_name localhost;
                ssl_certificate {cert};
                ssl_certificate_key {key};
                ssl_protocols TLSv1.3;
                ssl_session_cache shared:SSL:10m;
                location / {{
                    if ($bench_auth_ok = 0) {{ return 401 "missing or wrong injected header\\n"; }}
                    default_type application/json;
                    return 200 '{BODY}';
                }}
            }}
        }}
        """)
    path = work / "origin-nginx.conf"
    path.write_text(conf)
    proc = spawn("origin", ["nginx", "-c", str(path), "-g", "daemon off;", "-p", str(work)], work, {CPU_LOAD})
    wait_port(ORIGIN_PORT, proc)
    return proc


def start_sse_origin(work: Path, certs: Certs) -> Proc:
    proc = spawn(
        "sse-origin",
        [
            str(PROJECT_PY),
            "-m",
            "bench.sse",
            "serve",
            "--port",
            str(SSE_PORT),
            "--cert",
            str(certs.cert),
            "--key",
            str(certs.key),
            "--token",
            TOKEN,
        ],
        work,
        {CPU_LOAD},
        cwd=REPO,
    )
    wait_port(SSE_PORT, proc)
    return proc


# ------------------------------------------------------------------------------------------ contenders


@dataclass
class Contender:
    name: str
    port: int
    scheme: str = "http"  # how the client talks to it
    host_header: str = f"{ORIGIN_HOST}:{ORIGIN_PORT}"
    sse_host_header: str = f"{ORIGIN_HOST}:{SSE_PORT}"
    sse_port: int | None = None  # port serving the SSE route (None: same as port)
    proc: Proc | None = None
    extra_headers: tuple[str, ...] = ()
    note: str = ""

    @property
    def url(self) -> str:
        return f"{self.scheme}://{ORIGIN_HOST}:{self.port}/"


def start_nginx(work: Path, certs: Certs, port: int, sse_port: int, tls_port: int) -> Proc:
    def server(listen: str, upstream: str, extra: str = "") -> str:
        return textwrap.dedent(f"""\
            server {{
                listen {listen} backlog=8192;
                {extra}
                location / {{
                    proxy_pass https://{upstream};
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                    proxy_set_header Host $http_host;
                    proxy_set_header Authorization "Bearer {TOKEN}";
                    proxy_ssl_verify on;
                    proxy_ssl_verify_depth 3;
                    proxy_ssl_trusted_certificate {certs.ca};
                    proxy_ssl_name {ORIGIN_HOST};
                    proxy_ssl_server_name on;
                    proxy_ssl_session_reuse on;
                    proxy_ssl_protocols TLSv1.2 TLSv1.3;
                }}
            }}
            """)

    conf = (
        _nginx_common(work, "nginx")
        + textwrap.indent(
            textwrap.dedent(f"""\
        upstream origin {{ server 127.0.0.1:{ORIGIN_PORT}; keepalive 1024; keepalive_requests 100000000;
                           keepalive_timeout 600s; }}
        upstream sse {{ server 127.0.0.1:{SSE_PORT}; keepalive 64; }}
        """)
            + server(f"127.0.0.1:{port}", "origin")
            + server(f"127.0.0.1:{sse_port}", "sse")
            + server(
                f"127.0.0.1:{tls_port} ssl",
                "origin",
                f"ssl_certificate {certs.cert}; ssl_certificate_key {certs.key}; ssl_protocols TLSv1.3;",
            ),
            "    ",
        )
        + "}\n"
    )
    path = work / "nginx.conf"
    path.write_text(conf)
    proc = spawn("nginx", ["nginx", "-c", str(path), "-g", "daemon off;", "-p", str(work)], work, {CPU_PEER})
    wait_port(port, proc)
    return proc


def start_haproxy(work: Path, certs: Certs, port: int, sse_port: int) -> Proc:
    srv = (
        f"ssl verify required ca-file {certs.ca} sni str({ORIGIN_HOST}) verifyhost {ORIGIN_HOST} "
        "alpn http/1.1"
    )
    conf = textwrap.dedent(f"""\
        global
            nbthread 1
            maxconn 10500
            no strict-limits
            tune.ssl.default-dh-param 2048
            log stderr format short local0 err
        defaults
            mode http
            timeout connect 10s
            timeout client 600s
            timeout server 600s
            timeout http-keep-alive 600s
            option http-keep-alive
            http-reuse always
            maxconn 10500
        frontend fe
            bind 127.0.0.1:{port}
            http-request set-header Authorization "Bearer {TOKEN}"
            default_backend origin
        frontend fe_sse
            bind 127.0.0.1:{sse_port}
            option http-no-delay
            http-request set-header Authorization "Bearer {TOKEN}"
            default_backend sse
        backend origin
            server o 127.0.0.1:{ORIGIN_PORT} {srv} maxconn 10500 pool-max-conn 1024
        backend sse
            option http-no-delay
            server s 127.0.0.1:{SSE_PORT} {srv}
        """)
    path = work / "haproxy.cfg"
    path.write_text(conf)
    proc = spawn("haproxy", ["haproxy", "-f", str(path), "-db"], work, {CPU_PEER})
    wait_port(port, proc)
    return proc


def start_squid(work: Path, certs: Certs, port: int, sse_port: int) -> Proc:
    sq = work / "squid"
    sq.mkdir(exist_ok=True)
    proxy_user = pwd.getpwnam("proxy")
    os.chown(sq, proxy_user.pw_uid, proxy_user.pw_gid)
    tls = f"tls tls-cafile={certs.ca} tls-domain={ORIGIN_HOST}"
    conf = textwrap.dedent(f"""\
        workers 1
        http_port 127.0.0.1:{port} accel defaultsite={ORIGIN_HOST} vhost
        http_port 127.0.0.1:{sse_port} accel defaultsite={ORIGIN_HOST}:{SSE_PORT} vhost name=ssefe
        cache_peer 127.0.0.1 parent {ORIGIN_PORT} 0 no-query no-digest originserver name=origin {tls}
        cache_peer 127.0.0.1 parent {SSE_PORT} 0 no-query no-digest originserver name=sse {tls}
        acl ssefe myportname ssefe
        cache_peer_access sse allow ssefe
        cache_peer_access sse deny all
        cache_peer_access origin deny ssefe
        cache_peer_access origin allow all
        never_direct allow all
        http_access allow all
        cache deny all
        cache_mem 8 MB
        request_header_add Authorization "Bearer {TOKEN}" all
        server_persistent_connections on
        client_persistent_connections on
        pconn_timeout 600 seconds
        client_idle_pconn_timeout 600 seconds
        max_filedescriptors 65535
        access_log none
        cache_store_log none
        cache_log {sq}/cache.log
        pid_filename {sq}/squid.pid
        coredump_dir {sq}
        cache_effective_user proxy
        shutdown_lifetime 1 seconds
        via on
        forwarded_for delete
        """)
    path = work / "squid.conf"
    path.write_text(conf)
    proc = spawn("squid", ["squid", "-N", "-f", str(path)], work, {CPU_PEER})
    wait_port(port, proc)
    return proc


def start_mitmproxy(work: Path, certs: Certs, port: int, sse_port: int) -> Proc:
    conf = work / "mitmproxy-conf"
    conf.mkdir(exist_ok=True)
    argv = [
        str(BENCH_VENV / "bin" / "mitmdump"),
        "-q",
        "--mode",
        f"reverse:https://{ORIGIN_HOST}:{ORIGIN_PORT}@{port}",
        "--mode",
        f"reverse:https://{ORIGIN_HOST}:{SSE_PORT}@{sse_port}",
        "--listen-host",
        "127.0.0.1",
        "--set",
        f"confdir={conf}",
        "--set",
        f"ssl_verify_upstream_trusted_ca={certs.ca}",
        "--set",
        "stream_large_bodies=1",  # stream (do not buffer) bodies, as every other peer does
        "--set",
        "connection_strategy=lazy",
        "--modify-headers",
        f"/~q/Authorization/Bearer {TOKEN}",
    ]
    proc = spawn("mitmproxy", argv, work, {CPU_PEER})
    wait_port(port, proc, timeout=60)
    return proc


def botbox_config(
    work: Path, certs: Certs, port: int, *, workers: int, intercept_port: int | None, metrics_port: int
) -> Path:
    secrets = work / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "bench-token").write_text(TOKEN)
    secrets.chmod(0o755)
    (secrets / "bench-token").chmod(0o644)
    icept = ""
    if intercept_port is not None:
        icept = textwrap.dedent(f"""\
            https_interception:
              enabled: true
              listen_addr: "127.0.0.1"
              listen_port: {intercept_port}
              ca_cert_path: {certs.icept_ca_cert}
              ca_key_path: {certs.icept_ca_key}
              enforce_sni_host_match: true
              cert_cache_size: 1024
            """)
    cfg = (
        textwrap.dedent(f"""\
        listen_addr: "127.0.0.1"
        listen_port: {port}
        metrics_addr: "127.0.0.1"
        metrics_port: {metrics_port}
        secrets_dir: {secrets}
        max_connections: 60000
        upstream_ca_file: {certs.ca}
        upstream_idle_timeout_seconds: 600
        shutdown_grace_seconds: 2
        workers: {workers}
        egress_policy:
          default_action: deny
          rules:
            - host: {ORIGIN_HOST}
              action: allow
              allowed_ports: [{ORIGIN_PORT}, {SSE_PORT}]
              header_rewrites:
                - name: Authorization
                  value: "Bearer {{value}}"
                  secret_ref: bench-token
        """)
        + icept
    )
    path = work / f"botbox-{port}.yaml"
    path.write_text(cfg)
    path.chmod(0o644)
    return path


def snapshot_botbox(src: Path) -> str:
    """Extract the *committed* botbox/ of HEAD (half-saved edits in the checkout are not measured);
    without git, copy the working tree. Returns what was measured."""
    src.mkdir(parents=True, exist_ok=True)
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False
    ).stdout.strip()
    if rev:
        archive = subprocess.run(
            ["git", "archive", "HEAD", "botbox"], capture_output=True, cwd=REPO, check=False
        )
        if archive.returncode == 0:
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
            return f"git {rev} (committed botbox/)"
    shutil.copytree(REPO / "botbox", src / "botbox", ignore=shutil.ignore_patterns("__pycache__"))
    return "working tree copy"


def start_botbox(
    work: Path,
    certs: Certs,
    port: int,
    *,
    workers: int = 1,
    intercept_port: int | None = None,
    metrics_port: int = 9090,
    cpus: set[int] | None = None,
    name: str = "botbox",
) -> Proc:
    cfg = botbox_config(
        work, certs, port, workers=workers, intercept_port=intercept_port, metrics_port=metrics_port
    )
    # run a snapshot of botbox/ taken at the start of the benchmark, so every BotBox start in one run
    # (rounds, workers=2, RSS rows) measures the same code even while the checkout is being edited
    src = work / "src"
    if not (src / "botbox").exists():
        snapshot_botbox(src)
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")
    proc = spawn(
        name,
        [str(PROJECT_PY), "-m", "botbox", "run", "--config", str(cfg)],
        work,
        cpus if cpus is not None else {CPU_PEER},
        env=env,
        cwd=src,  # `python -m` puts the cwd first on sys.path
    )
    wait_port(port, proc, timeout=30)
    if intercept_port is not None:
        wait_port(intercept_port, proc, timeout=10)
    return proc


def refuses_bad_origin(contender: Contender) -> tuple[bool, str]:
    """With a bad origin certificate in place: the contender must not deliver the origin's body."""
    try:
        status, body = http_get(contender.port, contender.host_header)
    except OSError as e:
        return True, f"connection error ({type(e).__name__})"
    return (status != 200 and body != BODY.encode()), str(status)


def verify(contender: Contender, certs: Certs) -> None:
    """Prove the contender does the job: 200 + the origin's body (the origin only answers 200 when the
    injected header arrived)."""
    ctx: ssl.SSLContext | None = None
    if contender.scheme == "https":
        ctx = ssl.create_default_context(
            cafile=str(certs.icept_ca_cert if contender.name.startswith("botbox") else certs.ca)
        )
    extra = "".join(f"{h}\r\n" for h in contender.extra_headers)
    status, body = http_get(contender.port, contender.host_header, ctx, extra=extra)
    if status != 200 or body != BODY.encode():
        raise RuntimeError(f"{contender.name}: sanity request got {status} {body[:200]!r}")


def repin(proc: Proc, cpus: set[int]) -> None:
    pin(proc.pid, cpus)


def python_ok() -> bool:
    return sys.version_info >= (3, 11)
