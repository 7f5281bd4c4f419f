"""A tiny authoritative DNS server for the compose demo (A/AAAA only, UDP and TCP).

    python -m integration.compose.fakedns --listen 10.203.50.53 --listen fd00:203:50::53 \
        --record api.openai.test=10.203.50.20,fd00:203:50::20 ...

Names not listed get NXDOMAIN; other query types get an empty answer. Every query is logged to stdout
as one JSON line (name, type, client), so the tests can see who asked. Standard library only.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import socket
import socketserver
import struct
import sys
import threading
from typing import Any

QTYPE_A, QTYPE_AAAA = 1, 28
Records = dict[str, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]


def _parse_question(msg: bytes) -> tuple[int, int, str, int, int]:
    qid, flags, qdcount = struct.unpack("!HHH", msg[:6])
    if qdcount != 1:
        raise ValueError("exactly one question supported")
    pos, labels = 12, []
    while True:
        ln = msg[pos]
        if ln == 0 or ln & 0xC0:
            if ln:
                raise ValueError("compressed question name")
            pos += 1
            break
        labels.append(msg[pos + 1 : pos + 1 + ln].decode("ascii").lower())
        pos += 1 + ln
    qtype, _qclass = struct.unpack("!HH", msg[pos : pos + 4])
    return qid, flags, ".".join(labels), qtype, pos + 4


def answer(msg: bytes, records: Records) -> tuple[bytes, dict[str, Any]]:
    qid, flags, name, qtype, qend = _parse_question(msg)
    question = msg[12:qend]
    rd = flags & 0x0100
    addrs = records.get(name.rstrip("."))
    rcode = 0 if addrs is not None else 3  # NXDOMAIN
    answers = b""
    count = 0
    for addr in addrs or []:
        if (qtype == QTYPE_A and addr.version == 4) or (qtype == QTYPE_AAAA and addr.version == 6):
            rtype = QTYPE_A if addr.version == 4 else QTYPE_AAAA
            answers += struct.pack("!HHHIH", 0xC00C, rtype, 1, 5, len(addr.packed)) + addr.packed
            count += 1
    header = struct.pack("!HHHHHH", qid, 0x8400 | rd | rcode, 1, count, 0, 0)
    return header + question + answers, {"name": name, "qtype": qtype, "rcode": rcode, "answers": count}


def _log(entry: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(entry) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fakedns")
    ap.add_argument("--listen", action="append", required=True, help="IP to serve on (port 53)")
    ap.add_argument("--port", type=int, default=53)
    ap.add_argument("--record", action="append", default=[], help="NAME=IP[,IP...]")
    args = ap.parse_args(argv)
    records: Records = {}
    for rec in args.record:
        name, _, ips = rec.partition("=")
        records[name.lower().rstrip(".")] = [ipaddress.ip_address(i) for i in ips.split(",") if i]

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            try:
                resp, entry = answer(data, records)
            except (ValueError, IndexError, struct.error, UnicodeDecodeError):
                return
            sock.sendto(resp, self.client_address)
            _log({**entry, "proto": "udp", "client": self.client_address[0]})

    class Tcp(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            try:
                (length,) = struct.unpack("!H", self.rfile.read(2))
                resp, entry = answer(self.rfile.read(length), records)
            except (ValueError, IndexError, struct.error, UnicodeDecodeError):
                return
            self.wfile.write(struct.pack("!H", len(resp)) + resp)
            _log({**entry, "proto": "tcp", "client": self.client_address[0]})

    servers: list[socketserver.BaseServer] = []
    for ip in args.listen:
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        for base, handler in ((socketserver.ThreadingUDPServer, Udp), (socketserver.ThreadingTCPServer, Tcp)):
            cls = type(f"{base.__name__}{fam.name}", (base,), {"address_family": fam,
                                                               "allow_reuse_address": True,
                                                               "daemon_threads": True})
            servers.append(cls((ip, args.port), handler))
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    _log({"ready": True, "listen": args.listen, "names": sorted(records)})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for srv in servers:
        srv.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
