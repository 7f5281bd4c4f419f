"""A private Docker engine for the compose test, confined to a network namespace of its own.

dockerd programs iptables, creates bridges and assigns addresses wherever it runs. Started in the host
namespace it would change the host's firewall and routes, so the test starts it inside a fresh network
namespace (``nsenter --net``, keeping the host's mounts and cgroups): every bridge, veth, address and
rule it makes lives and dies there, and the containers' "internet" is an internal network in it.

Its data root (``/var/lib/botbox-docker``) persists between runs so image layers and the build cache
stay warm; an exclusive lock serialises concurrent test runs on it. The engine is stopped by PID and
the namespace deleted when the test ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# BOTBOX_TEST_DOCKER_ROOT selects another data root (e.g. to time a cold build); socket, pidfile and
# lock are derived from it, so engines on different data roots never collide.
DATA_ROOT = Path(os.environ.get("BOTBOX_TEST_DOCKER_ROOT", "/var/lib/botbox-docker"))
RUN_ROOT = Path("/run") / DATA_ROOT.name
LOCK_FILE = DATA_ROOT.with_name(DATA_ROOT.name + ".lock")
NEEDED = {"dockerd": "docker.io", "docker-compose": "docker-compose", "debootstrap": "debootstrap",
          "nsenter": "util-linux", "ip": "iproute2"}


class EngineUnavailable(Exception):
    """The engine cannot be started here; the message says why and what to install."""


@dataclass(frozen=True)
class Engine:
    host: str  # DOCKER_HOST
    docker: str  # client binary
    netns: str | None  # namespace the engine runs in (None: an external engine was given)
    log: Path | None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
        env.update(DOCKER_HOST=self.host, DOCKER=self.docker, DOCKER_BUILDKIT="0",
                   COMPOSE_DOCKER_CLI_BUILD="0")
        return env


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start a Docker engine in its own network namespace"
    missing = sorted({pkg for tool, pkg in NEEDED.items() if shutil.which(tool) is None})
    if missing:
        return f"Docker engine tools missing: apt-get install -y {' '.join(missing)}"
    return None


def _client() -> str:
    # Prefer Debian's client (same release as the engine); any client negotiates the API version.
    for cand in ("/usr/bin/docker", shutil.which("docker")):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise EngineUnavailable("no docker client binary (apt-get install -y docker.io)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def private_engine(start_timeout: float = 60.0) -> Iterator[Engine]:
    """Yield a running engine; stop everything this function started on exit (even on failure)."""
    external = os.environ.get("BOTBOX_TEST_DOCKER_HOST")
    if external:  # an operator-provided engine: use it, never stop it
        yield Engine(host=external, docker=_client(), netns=None, log=None)
        return
    reason = unavailable_reason()
    if reason:
        raise EngineUnavailable(reason)
    client = _client()
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one engine per data root; concurrent runs queue here
        pidfile = RUN_ROOT / "docker.pid"
        if pidfile.exists():
            try:
                stale = int(pidfile.read_text().strip() or "0")
            except ValueError:
                stale = 0
            if stale and _alive(stale):
                raise EngineUnavailable(
                    f"a dockerd (pid {stale}) from an earlier run still owns {DATA_ROOT}; stop it first"
                )
            pidfile.unlink()
        suffix = uuid.uuid4().hex[:8]
        netns = f"bbdkr-{suffix}"
        RUN_ROOT.mkdir(parents=True, exist_ok=True)
        sock = RUN_ROOT / "docker.sock"
        log = RUN_ROOT / f"dockerd-{suffix}.log"
        proc: subprocess.Popen[bytes] | None = None
        subprocess.run(["ip", "netns", "add", netns], check=True)
        try:
            subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
            with open(log, "wb") as logf:
                proc = subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/{netns}", "dockerd",
                     "--data-root", str(DATA_ROOT), "--exec-root", str(RUN_ROOT / "exec"),
                     "-H", f"unix://{sock}", "--pidfile", str(pidfile),
                     "--bridge", "none", "--log-level", "warn"],
                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                )
            engine = Engine(host=f"unix://{sock}", docker=client, netns=netns, log=log)
            deadline = time.monotonic() + start_timeout
            while True:
                ok = subprocess.run([client, "version"], env=engine.env(), capture_output=True,
                                    timeout=20, check=False).returncode == 0
                if ok:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-2000:]
                    raise EngineUnavailable(f"dockerd did not start (exit {proc.poll()}):\n{tail}")
                time.sleep(0.3)
            yield engine
        finally:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            subprocess.run(["ip", "netns", "delete", netns], check=False)
            with contextlib.suppress(FileNotFoundError):
                log.replace(RUN_ROOT / "dockerd-last.log")
