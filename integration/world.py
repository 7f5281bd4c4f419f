"""The integration world: a pod and a fake internet, each in its own network namespace.

::

    pod namespace                                     internet namespace
    ┌───────────────────────────────────┐  veth   ┌──────────────────────────────────────────┐
    │ app (uid 1000)                    │─────────│ .1 / ::1   gateway                       │
    │ botbox run (uid 1337) 127.0.0.1   │ .2/::2  │ .10-.14    TLS upstreams :443 + catch-all │
    │ netsetup apply (root)             │         │ .53 / .54  dnsmasq (legit / rogue)       │
    └───────────────────────────────────┘         └──────────────────────────────────────────┘

Addresses are ``10.203.<index>.0/24`` and ``fd00:203:<index>::/64``; namespace and interface names are
random per run (``netsetup.netns.unique_name``), so parallel runs never collide.  Everything created is
torn down in ``World.close`` (also when ``start`` fails half-way).

The proxy reads its secrets from a Kubernetes-Secret-volume lookalike (``..data`` symlink swapped
atomically, files mode 0400 owned by uid 1337); ``write_secret``/``delete_secret`` rotate it like the
kubelet does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
import yaml

from integration.runtime import Runtime
from integration.upstream import fingerprint
from netsetup import netns

PROXY_UID = 1337
APP_UID = 1000
PROXY_PORT = 8080
ADMIN_PORT = 9090

HOST_OCTETS = {
    "api.openai.test": 10,  # allowed, Authorization injected from secret openai-api-key
    "api.anthropic.test": 11,  # allowed, x-api-key injected from secret anthropic-api-key
    "public.test": 12,  # allowed, no credential
    "evil.test": 13,  # explicit deny rule
    "unlisted.test": 14,  # no rule: default deny
    "wrongcert.test": 15,  # allowed, but its upstream's certificate does not name it (R4: must fail)
}
UNCERTIFIED_HOSTS = frozenset({"wrongcert.test"})
DNS_OCTET = 53
ROGUE_DNS_OCTET = 54
TCP_CATCHALL_PORTS = (22, 80, 4444, 8080, 8443, 9090)
UDP_CATCHALL_PORTS = (53, 123, 443, 4444, 5353)
UDPLITE_PORT = 4444
WILDCARD_PORT = 7777  # TCP + UDP on every internet-side address (gateway, link-local, ...)

OPENAI_SECRET = "openai-api-key"
ANTHROPIC_SECRET = "anthropic-api-key"


def _default_secrets() -> dict[str, str]:
    return {
        OPENAI_SECRET: "sk-fake-openai-" + secrets.token_hex(12),
        ANTHROPIC_SECRET: "sk-ant-fake-" + secrets.token_hex(12),
    }


def proxy_config(secrets_dir: Path, ca_file: Path) -> dict[str, Any]:
    return {
        "listen_addr": "127.0.0.1",
        "listen_port": PROXY_PORT,
        "metrics_addr": "127.0.0.1",
        "metrics_port": ADMIN_PORT,
        "secrets_dir": str(secrets_dir),
        "upstream_ca_file": str(ca_file),
        "connect_timeout_seconds": 5,
        "request_header_timeout_seconds": 5,
        "shutdown_grace_seconds": 2,
        "egress_policy": {
            "default_action": "deny",
            "rules": [
                {
                    "host": "api.openai.test",
                    "action": "allow",
                    "header_rewrites": [
                        {"name": "Authorization", "value": "Bearer {value}", "secret_ref": OPENAI_SECRET}
                    ],
                },
                {
                    "host": "api.anthropic.test",
                    "action": "allow",
                    "header_rewrites": [
                        {"name": "x-api-key", "value": "{value}", "secret_ref": ANTHROPIC_SECRET}
                    ],
                },
                {"host": "public.test", "action": "allow"},
                {"host": "wrongcert.test", "action": "allow"},
                {"host": "evil.test", "action": "deny"},
            ],
        },
    }


@dataclass
class WorldOptions:
    index: int  # third octet / third hextet: 20..29 (28 = demo)
    dns_restricted: bool = False  # BOTBOX_DNS_SERVERS = the legit resolver (v4 + v6)
    secrets: dict[str, str] = field(default_factory=_default_secrets)
    present_secrets: Sequence[str] | None = None  # None = all of ``secrets`` exist at start
    start_proxy: bool = True
    apply_netsetup: bool = True
    wait_healthy: bool = True  # False: wait for /livez only (a secret is missing on purpose)
    netsetup_env: dict[str, str] = field(default_factory=dict)
    # Edits the proxy config dict before it is written (e.g. add an https_interception block).
    config_patch: Callable[[dict[str, Any]], None] | None = None


class WorldError(RuntimeError):
    pass


class World:
    def __init__(self, opts: WorldOptions) -> None:
        if not 20 <= opts.index <= 29:
            raise ValueError("world index must be within the reserved 10.203.20-29 range")
        self.opts = opts
        self.index = opts.index
        self.secrets = dict(opts.secrets)
        self.secret_history: list[str] = list(self.secrets.values())  # every value ever published
        self._stack = contextlib.ExitStack()
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.rt: Runtime | None = None
        self.pod = ""
        self.inet = ""
        self.pod_if = ""
        self.inet_if = ""
        self.proxy: subprocess.Popen[bytes] | None = None
        self.netsetup_output = ""

    # ---------------------------------------------------------------- addressing
    def v4(self, octet: int) -> str:
        return f"10.203.{self.index}.{octet}"

    def v6(self, octet: int) -> str:
        return f"fd00:203:{self.index}::{octet}"

    def host_ip(self, name: str, family: int = 4) -> str:
        octet = HOST_OCTETS[name]
        return self.v4(octet) if family == 4 else self.v6(octet)

    @property
    def dns_v4(self) -> str:
        return self.v4(DNS_OCTET)

    @property
    def dns_v6(self) -> str:
        return self.v6(DNS_OCTET)

    @property
    def rogue_dns_v4(self) -> str:
        return self.v4(ROGUE_DNS_OCTET)

    @property
    def rogue_dns_v6(self) -> str:
        return self.v6(ROGUE_DNS_OCTET)

    def inet_link_local(self) -> str:
        """The internet side's IPv6 link-local address, scoped for use from the pod (``fe80::…%if``)."""
        def usable(ns: str, ifname: str) -> str | None:
            out = self.run(ns, ["ip", "-6", "-o", "addr", "show", "dev", ifname, "scope", "link"]).stdout
            if not out or "tentative" in out:  # still in duplicate address detection
                return None
            return out.split()[3].split("/")[0]

        _wait_for(lambda: usable(self.pod, self.pod_if) and usable(self.inet, self.inet_if),
                  "IPv6 link-local addresses", 10)
        return f"{usable(self.inet, self.inet_if)}%{self.pod_if}"

    @property
    def pod_v4(self) -> str:
        return self.v4(2)

    @property
    def pod_v6(self) -> str:
        return self.v6(2)

    # ---------------------------------------------------------------- paths
    @property
    def root(self) -> Path:
        assert self.rt is not None
        return self.rt.root

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    @property
    def hits_log(self) -> Path:
        return self.root / "logs" / "hits.jsonl"

    @property
    def proxy_log(self) -> Path:
        return self.root / "logs" / "botbox.log"

    @property
    def ca_file(self) -> Path:
        return self.root / "pki" / "ca.pem"

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> World:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.rt = Runtime.create(prefix=f"botbox-world{self.index}-")
        self._stack.callback(self.rt.cleanup)
        for d in ("logs", "pki", "etc", "run"):
            self.rt.mkdir(d)
        self._make_pki()
        self._make_namespaces()
        self._start_dns()
        self._start_upstream()
        self._write_resolv_conf()
        self._make_secrets()
        if self.opts.apply_netsetup:
            self.apply_netsetup()
        if self.opts.start_proxy:
            self.start_proxy()

    def close(self) -> None:
        try:
            for _name, proc in reversed(self._procs):
                # Keep stopping the rest on error; namespace teardown SIGKILLs any leftover anyway.
                with contextlib.suppress(Exception):
                    _stop(proc)
            self._procs.clear()
        finally:
            self._stack.close()

    # ---------------------------------------------------------------- building blocks
    def _make_pki(self) -> None:
        self.ca = trustme.CA(organization_name="BotBox throwaway test CA")
        leaf = self.ca.issue_cert(*(h for h in HOST_OCTETS if h not in UNCERTIFIED_HOSTS))
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        leaf.private_key_and_cert_chain_pem.write_to_path(str(self.root / "pki" / "upstream.pem"))
        os.chmod(self.ca_file, 0o644)
        os.chmod(self.root / "pki" / "upstream.pem", 0o600)

    def _make_namespaces(self) -> None:
        pod = self._stack.enter_context(netns.namespace(prefix=f"bbpod{self.index}", ipv6=True))
        inet = self._stack.enter_context(netns.namespace(prefix=f"bbnet{self.index}", ipv6=True))
        self.pod, self.inet = pod.name, inet.name
        self.pod_if, self.inet_if = netns.connect(
            self.pod,
            self.inet,
            a_v4=f"{self.pod_v4}/24",
            b_v4=f"{self.v4(1)}/24",
            a_v6=f"{self.pod_v6}/64",
            b_v6=f"{self.v6(1)}/64",
        )
        for octet in (*HOST_OCTETS.values(), DNS_OCTET, ROGUE_DNS_OCTET):
            netns.add_address(self.inet, self.inet_if, f"{self.v4(octet)}/24")
            netns.add_address(self.inet, self.inet_if, f"{self.v6(octet)}/64")
        netns.add_default_route(self.pod, self.v4(1))
        netns.add_default_route(self.pod, self.v6(1))
        # ICMP datagram sockets for every gid, so it is the *firewall* that stops the app's ping
        # (the default "1 0" would make socket() fail before a packet exists).
        netns.call_in_netns(self.pod, _write_proc, "/proc/sys/net/ipv4/ping_group_range", "0 2147483647")

    def _dnsmasq(self, label: str, addrs: Sequence[str], answers: dict[str, tuple[str, str]]) -> None:
        log = self.root / "logs" / f"dnsmasq-{label}.log"
        argv = [
            "/usr/sbin/dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--port=53",
            "--user=root",
            "--group=root",
            "--log-queries",
            f"--log-facility={log}",
            f"--pid-file={self.root / 'run' / f'dnsmasq-{label}.pid'}",
        ]
        argv += [f"--listen-address={a}" for a in addrs]
        for name, (a4, a6) in answers.items():
            argv += [f"--address=/{name}/{a4}", f"--address=/{name}/{a6}"]
        self._popen(f"dnsmasq-{label}", self.inet, argv, log=self.root / "logs" / f"dnsmasq-{label}.out")
        _wait_for(lambda: _dns_answers(self.inet, addrs[0], "api.openai.test"), f"dnsmasq {label}", 10)

    def _start_dns(self) -> None:
        names = {n: (self.host_ip(n), self.host_ip(n, 6)) for n in HOST_OCTETS}
        self._dnsmasq("legit", [self.dns_v4, self.dns_v6], names)
        # The rogue resolver would send every name to evil.test's address.
        evil = (self.host_ip("evil.test"), self.host_ip("evil.test", 6))
        self._dnsmasq("rogue", [self.rogue_dns_v4, self.rogue_dns_v6], dict.fromkeys(HOST_OCTETS, evil))

    def _start_upstream(self) -> None:
        https_addrs = [self.host_ip(n, f) for n in HOST_OCTETS for f in (4, 6)]
        spec = {
            "hits_log": str(self.hits_log),
            "cert_file": str(self.root / "pki" / "upstream.pem"),
            "key_file": str(self.root / "pki" / "upstream.pem"),
            "https_addresses": https_addrs,
            "catchall_addresses": https_addrs,
            "tcp_ports": list(TCP_CATCHALL_PORTS),
            "udp_ports": list(UDP_CATCHALL_PORTS),
            "udplite_ports": [UDPLITE_PORT],
            "wildcard_ports": [WILDCARD_PORT],
            "ready_file": str(self.root / "run" / "upstream.ready"),
        }
        spec_path = self.root / "etc" / "upstream.json"
        spec_path.write_text(json.dumps(spec))
        self.hits_log.touch()
        assert self.rt is not None
        self._popen(
            "upstream",
            self.inet,
            [self.rt.python, "-m", "integration.upstream", str(spec_path)],
            log=self.root / "logs" / "upstream.log",
        )
        ready = self.root / "run" / "upstream.ready"
        _wait_for(ready.exists, "fake upstreams", 20, self._procs[-1][1])

    def _write_resolv_conf(self) -> None:
        etc = Path("/etc/netns") / self.pod
        etc.mkdir(parents=True, exist_ok=False)
        self._stack.callback(shutil.rmtree, etc, True)
        (etc / "resolv.conf").write_text(
            f"nameserver {self.dns_v4}\nnameserver {self.dns_v6}\noptions timeout:1 attempts:2\n"
        )
        os.chmod(etc / "resolv.conf", 0o644)

    def _make_secrets(self) -> None:
        d = self.secrets_dir
        d.mkdir(mode=0o700)
        os.chown(d, PROXY_UID, PROXY_UID)
        present = self.opts.present_secrets
        names = list(self.secrets) if present is None else list(present)
        self._publish({n: self.secrets[n] for n in names})

    # ---------------------------------------------------------------- secrets (kubelet-style)
    def _publish(self, values: dict[str, str]) -> None:
        """Atomically publish exactly ``values`` like the kubelet's AtomicWriter does."""
        d = self.secrets_dir
        stamp = d / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{secrets.token_hex(4)}"
        stamp.mkdir(mode=0o700)
        for name, value in values.items():
            f = stamp / name
            f.write_text(value + "\n")
            os.chmod(f, 0o400)
            os.chown(f, PROXY_UID, PROXY_UID)
        os.chown(stamp, PROXY_UID, PROXY_UID)
        tmp = d / "..data_tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(stamp.name)
        old = os.readlink(d / "..data") if (d / "..data").is_symlink() else None
        os.replace(tmp, d / "..data")
        for name in values:
            link = d / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        for entry in d.iterdir():
            if not entry.name.startswith(".") and entry.name not in values:
                entry.unlink()
        if old is not None:
            shutil.rmtree(d / old, ignore_errors=True)
        self._published = dict(values)

    def write_secret(self, name: str, value: str) -> None:
        """Create or rotate one secret (the others keep their current values)."""
        self.secrets[name] = value
        self.secret_history.append(value)
        self._publish({**self._published, name: value})

    def delete_secret(self, name: str) -> None:
        self._publish({k: v for k, v in self._published.items() if k != name})

    def expected_fingerprint(self, header: str) -> str:
        """Fingerprint of the header value the proxy must inject (as the upstream reports it)."""
        if header.lower() == "authorization":
            return fingerprint("Bearer " + self.secrets[OPENAI_SECRET])
        if header.lower() == "x-api-key":
            return fingerprint(self.secrets[ANTHROPIC_SECRET])
        raise KeyError(header)

    # ---------------------------------------------------------------- netsetup + proxy
    def netsetup_env(self) -> dict[str, str]:
        env = {"BOTBOX_UID": str(PROXY_UID), "BOTBOX_PROXY_PORT": str(PROXY_PORT)}
        if self.opts.dns_restricted:
            env["BOTBOX_DNS_SERVERS"] = f"{self.dns_v4},{self.dns_v6}"
        env.update(self.opts.netsetup_env)
        return env

    def netsetup(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.rt is not None
        proc = netns.run_in_netns(
            self.pod,
            [self.rt.python, "-m", "netsetup", *args],
            env=self.rt.env(self.netsetup_env()),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.rt.root,
        )
        cmd = f"netsetup {' '.join(args)}"
        self.netsetup_output += f"$ {cmd} -> {proc.returncode}\n{proc.stdout}{proc.stderr}"
        if check and proc.returncode != 0:
            raise WorldError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def apply_netsetup(self) -> None:
        self.netsetup("apply")

    def start_proxy(self) -> None:
        assert self.rt is not None
        cfg = self.root / "etc" / "config.yaml"
        config = proxy_config(self.secrets_dir, self.ca_file)
        if self.opts.config_patch is not None:
            self.opts.config_patch(config)
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        os.chmod(cfg, 0o644)
        self.proxy = self._popen(
            "botbox",
            self.pod,
            [*_as_uid(PROXY_UID), self.rt.python, "-m", "botbox", "run", "--config", str(cfg)],
            log=self.proxy_log,
        )
        path = "/healthz" if self.opts.wait_healthy else "/livez"
        _wait_for(lambda: self.admin(path)[0] == 200, f"botbox {path}", 30, self.proxy)

    # ---------------------------------------------------------------- running things
    def _popen(self, label: str, ns: str, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        assert self.rt is not None
        with open(log, "ab") as fh:
            proc = netns.popen_in_netns(
                ns, list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.rt.env(), start_new_session=True, cwd=self.rt.root,
            )
        self._procs.append((label, proc))
        return proc

    def run(
        self, ns: str, argv: Sequence[str], *, uid: int | None = None, timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        assert self.rt is not None
        prefix = _as_uid(uid) if uid is not None else []
        proc = netns.run_in_netns(
            ns, [*prefix, *argv], env=self.rt.env(env), capture_output=True, timeout=timeout,
            cwd=self.rt.root,
        )
        # Decode by hand: text=True would translate CRLF, and raw HTTP must stay byte-exact.
        return subprocess.CompletedProcess(
            proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"),
        )

    def app(self, op: str, *, uid: int = APP_UID, **args: Any) -> dict[str, Any]:
        """Run one ``integration.appclient`` operation in the pod as ``uid`` (default: the app).

        ``args`` go to the operation (``timeout`` included: the op's own socket/HTTP timeout); the
        process itself gets a generous multiple of it.
        """
        assert self.rt is not None
        proc = self.run(
            self.pod, [self.rt.python, "-m", "integration.appclient", json.dumps({"op": op, **args})],
            uid=uid, timeout=30 + 3 * float(args.get("timeout", 20)),
        )
        if proc.returncode != 0:
            raise WorldError(f"appclient {op} failed ({proc.returncode}): {self.redact(proc.stderr)[-3000:]}")
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        if result.get("uid") != uid:
            raise WorldError(f"appclient ran as uid {result.get('uid')}, expected {uid}")
        return result

    def curl(self, *args: str, uid: int = APP_UID, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.run(self.pod, ["curl", "-sS", "--max-time", "20", *args], uid=uid, timeout=timeout)

    def admin(self, path: str) -> tuple[int, str]:
        """GET the admin listener from inside the pod (as root, over loopback)."""
        proc = self.run(
            self.pod,
            ["curl", "-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}",
             f"http://127.0.0.1:{ADMIN_PORT}{path}"],
            timeout=15,
        )
        if proc.returncode != 0:
            return 0, proc.stderr
        body, _, code = proc.stdout.rpartition("\n")
        return int(code), body

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        from prometheus_client.parser import text_string_to_metric_families

        status, text = self.admin("/metrics")
        if status != 200:
            raise WorldError(f"/metrics answered {status}")
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of samples of ``name`` whose labels include ``labels`` (0 when absent)."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.metrics().items() if n == name and want <= set(lab))

    # ---------------------------------------------------------------- evidence
    def hits_mark(self) -> int:
        return len(self.hits_log.read_bytes().splitlines())

    def hits(self, since: int = 0, **match: Any) -> list[dict[str, Any]]:
        lines = self.hits_log.read_text().splitlines()[since:]
        out = []
        for line in lines:
            rec = json.loads(line)
            if all(rec.get(k) == v for k, v in match.items()):
                out.append(rec)
        return out

    def proxy_log_mark(self) -> int:
        return len(self.proxy_log.read_bytes().splitlines())

    def proxy_log_records(self, since: int = 0) -> list[dict[str, Any]]:
        out = []
        for line in self.proxy_log.read_text(errors="replace").splitlines()[since:]:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def dns_log(self, label: str) -> str:
        return (self.root / "logs" / f"dnsmasq-{label}.log").read_text(errors="replace")

    def filter_counters(self) -> dict[str, int]:
        """Packets counted by netsetup's REJECT/DROP rules in the pod, per family.

        Sums every DROP/REJECT rule of BotBox's filter chain (``BOTBOX_FILTER_CHAIN``, default
        ``EGRESS_FILTER``) as seen by iptables-legacy, iptables-nft and nft's ``inet botbox`` table
        (an nft rule without a family match counts for both).  ``counted_sources`` tells whether any
        of those rules carries a counter at all.
        """
        totals, _ = self._filter_counters()
        return totals

    def counted_sources(self) -> list[str]:
        return self._filter_counters()[1]

    def _filter_counters(self) -> tuple[dict[str, int], list[str]]:
        chain = self.netsetup_env().get("BOTBOX_FILTER_CHAIN", "EGRESS_FILTER")
        totals = {"ipv4": 0, "ipv6": 0}
        sources: list[str] = []
        for fam, tools in (("ipv4", ("iptables-legacy-save", "iptables-nft-save")),
                           ("ipv6", ("ip6tables-legacy-save", "ip6tables-nft-save"))):
            for tool in tools:
                proc = self.run(self.pod, [tool, "-c", "-t", "filter"], timeout=30)
                for line in proc.stdout.splitlines():
                    m = re.match(r"^\[(\d+):(\d+)\] -A (\S+) .*-j (DROP|REJECT)\b", line)
                    if m and m.group(3) == chain:
                        totals[fam] += int(m.group(1))
                        if tool not in sources:
                            sources.append(tool)
        proc = self.run(self.pod, ["nft", "-j", "list", "table", "inet", "botbox"], timeout=30)
        if proc.returncode == 0:
            for item in json.loads(proc.stdout).get("nftables", []):
                rule = item.get("rule")
                if not rule or rule.get("chain") != chain:
                    continue
                exprs = rule.get("expr", [])
                if not any("drop" in e or "reject" in e for e in exprs):
                    continue
                packets = next((e["counter"]["packets"] for e in exprs if "counter" in e), None)
                if packets is None:
                    continue
                text = json.dumps(exprs)
                family_marks = (("ipv4", ('"ipv4"', '"ip"')), ("ipv6", ('"ipv6"', '"ip6"', "icmpv6")))
                fams = [f for f, marks in family_marks if any(m in text for m in marks)] or ["ipv4", "ipv6"]
                for f in fams:
                    totals[f] += int(packets)
                if "nft" not in sources:
                    sources.append("nft")
        return totals, sources

    def redact(self, text: str) -> str:
        for value in sorted(self.secret_history, key=len, reverse=True):
            text = text.replace(value, "<redacted>")
        return text

    def debug_tail(self, lines: int = 40) -> str:
        """Recent logs for a failure report, with every known secret value redacted."""
        parts = []
        if self.rt is None:
            return ""
        for p in sorted((self.root / "logs").glob("*")):
            with contextlib.suppress(OSError):
                tail = p.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {p.name}\n" + "\n".join(tail))
        parts.append("--- netsetup\n" + self.netsetup_output[-4000:])
        return self.redact("\n".join(parts))


def _as_uid(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]


def _write_proc(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as fh:
        fh.write(value)


def _dns_query_in(server: str, name: str) -> list[str]:
    from integration.appclient import op_dns

    res = op_dns({"server": server, "name": name, "timeout": 0.5})
    return list(res.get("answers", []))


def _dns_answers(ns: str, server: str, name: str) -> bool:
    try:
        return bool(netns.call_in_netns(ns, _dns_query_in, server, name, timeout=5))
    except (netns.NetnsCallError, TimeoutError):
        return False


def _wait_for(
    cond: Any, what: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise WorldError(f"{what}: process exited with {proc.returncode} before becoming ready")
        time.sleep(interval)
    raise WorldError(f"{what} not ready within {timeout}s")


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=5)


@contextlib.contextmanager
def running_world(opts: WorldOptions) -> Iterator[World]:
    with World(opts) as world:
        yield world


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: str

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(raw: str) -> RawResponse:
    """Parse one HTTP/1.1 response as read off the wire (Content-Length or chunked body)."""
    head, sep, rest = raw.partition("\r\n\r\n")
    if not sep:
        raise ValueError(f"no complete response head in {raw[:200]!r}")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    hmap = {k.lower(): v for k, v in headers}
    if "chunked" in hmap.get("transfer-encoding", "").lower():
        body, pos = [], 0
        while True:
            size_end = rest.index("\r\n", pos)
            size = int(rest[pos:size_end].split(";")[0], 16)
            if size == 0:
                break
            body.append(rest[size_end + 2 : size_end + 2 + size])
            pos = size_end + 2 + size + 2
        return RawResponse(status, headers, "".join(body))
    if "content-length" in hmap:
        return RawResponse(status, headers, rest[: int(hmap["content-length"])])
    return RawResponse(status, headers, rest)
