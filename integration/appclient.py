"""What the sandboxed app does: one operation per run, as uid 1000 inside the pod namespace.

``python -m integration.appclient '{"op": "tcp", "host": "10.203.20.10", "port": 443}'`` prints one JSON
object with the outcome. Socket operations never raise: a blocked attempt is an ordinary result
(``ok: false`` with the errno name), so the test can assert on *how* it failed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any


def _err(exc: BaseException) -> dict[str, Any]:
    code = getattr(exc, "errno", None)
    name = errno.errorcode.get(code, str(code)) if isinstance(code, int) else type(exc).__name__
    return {"ok": False, "error": name, "detail": str(exc)}


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _sockaddr(host: str, port: int) -> tuple[Any, ...]:
    """``(host, port)``, or the 4-tuple with a scope id for ``fe80::…%ifname`` link-local addresses."""
    if "%" in host:
        addr, ifname = host.split("%", 1)
        return (addr, port, 0, socket.if_nametoindex(ifname))
    return (host, port)


def op_tcp(a: dict[str, Any]) -> dict[str, Any]:
    """Connect; optionally send bytes and read the answer until EOF/timeout."""
    host, port, timeout = a["host"], int(a["port"]), float(a.get("timeout", 2.0))
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(_sockaddr(host, port))
    except OSError as exc:
        s.close()
        return _err(exc)
    result: dict[str, Any] = {"ok": True, "connected": True}
    try:
        if a.get("send") is not None:
            s.sendall(a["send"].encode("latin-1"))
            chunks = []
            try:
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
                    if sum(map(len, chunks)) > 1 << 20:
                        break
            except TimeoutError:
                result["read_timeout"] = True
            except OSError as exc:
                result["read_error"] = _err(exc)["error"]
            result["response"] = b"".join(chunks).decode("latin-1")
    except OSError as exc:
        result.update(_err(exc))
    finally:
        s.close()
    return result


def op_udp(a: dict[str, Any]) -> dict[str, Any]:
    """Send a datagram (connected socket, so an ICMP error surfaces) and wait briefly for a reply.

    ``"udplite": true`` uses UDP-Lite (IP protocol 136) instead of UDP.
    """
    host, port = a["host"], int(a["port"])
    s = socket.socket(_family(host), socket.SOCK_DGRAM, 136 if a.get("udplite") else 0)
    s.settimeout(float(a.get("timeout", 1.0)))
    try:
        s.connect(_sockaddr(host, port))
        s.send(a.get("payload", "botbox-probe").encode())
        data = s.recv(4096)
        return {"ok": True, "reply": data.decode("latin-1")}
    except OSError as exc:
        return _err(exc)
    finally:
        s.close()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def op_ping(a: dict[str, Any]) -> dict[str, Any]:
    """ICMP echo through an unprivileged ICMP datagram socket (what ``ping`` uses without caps)."""
    host = a["host"]
    fam = _family(host)
    proto = socket.IPPROTO_ICMPV6 if fam == socket.AF_INET6 else socket.IPPROTO_ICMP
    try:
        s = socket.socket(fam, socket.SOCK_DGRAM, proto)
    except OSError as exc:
        return {**_err(exc), "stage": "socket"}
    s.settimeout(float(a.get("timeout", 1.0)))
    icmp_type = 128 if fam == socket.AF_INET6 else 8
    header = struct.pack("!BBHHH", icmp_type, 0, 0, 0, 1)
    payload = b"botbox-ping"
    packet = struct.pack("!BBHHH", icmp_type, 0, _checksum(header + payload), 0, 1) + payload
    try:
        s.sendto(packet, (host, 0))
    except OSError as exc:
        s.close()
        return {**_err(exc), "stage": "send"}
    try:
        data = s.recv(4096)
        return {"ok": True, "reply_type": data[0]}
    except OSError as exc:
        return {**_err(exc), "stage": "recv"}
    finally:
        s.close()


def dns_query_packet(name: str, qtype: str, qid: int = 0x4242) -> bytes:
    code = {"A": 1, "AAAA": 28}[qtype]
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", code, 1)


def parse_dns_answers(resp: bytes) -> list[str]:
    qd, an = struct.unpack("!HH", resp[4:8])
    pos = 12

    def skip_name(p: int) -> int:
        while True:
            ln = resp[p]
            if ln & 0xC0 == 0xC0:
                return p + 2
            if ln == 0:
                return p + 1
            p += ln + 1

    for _ in range(qd):
        pos = skip_name(pos) + 4
    out = []
    for _ in range(an):
        pos = skip_name(pos)
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", resp[pos : pos + 10])
        pos += 10
        rdata = resp[pos : pos + rdlen]
        pos += rdlen
        if rtype == 1:
            out.append(socket.inet_ntop(socket.AF_INET, rdata))
        elif rtype == 28:
            out.append(socket.inet_ntop(socket.AF_INET6, rdata))
    return out


def op_dns(a: dict[str, Any]) -> dict[str, Any]:
    """One DNS query straight to ``server`` over UDP or TCP (no libc resolver involved)."""
    server, name, qtype = a["server"], a["name"], a.get("qtype", "A")
    packet = dns_query_packet(name, qtype)
    timeout = float(a.get("timeout", 1.5))
    try:
        if a.get("tcp"):
            with socket.socket(_family(server), socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect((server, 53))
                s.sendall(struct.pack("!H", len(packet)) + packet)
                buf = b""
                while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
                    data = s.recv(4096)
                    if not data:
                        break
                    buf += data
                resp = buf[2:]
        else:
            with socket.socket(_family(server), socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.connect((server, 53))
                s.send(packet)
                resp = s.recv(4096)
    except OSError as exc:
        return _err(exc)
    return {"ok": True, "answers": parse_dns_answers(resp)}


def op_resolve(a: dict[str, Any]) -> dict[str, Any]:
    """Resolve through libc (the pod's /etc/resolv.conf)."""
    try:
        infos = socket.getaddrinfo(a["name"], 80, type=socket.SOCK_STREAM)
    except OSError as exc:
        return _err(exc)
    return {"ok": True, "addresses": sorted({str(i[4][0]) for i in infos})}


def _httpx_client(a: dict[str, Any]) -> Any:
    import httpx

    transport = httpx.HTTPTransport(local_address=a.get("local_address"))
    return httpx.Client(transport=transport, timeout=float(a.get("timeout", 20.0)), trust_env=False)


def op_http(a: dict[str, Any]) -> dict[str, Any]:
    """One or more requests with httpx over one keep-alive connection."""
    results = []
    with _httpx_client(a) as client:
        for _ in range(int(a.get("repeat", 1))):
            r = client.request(a.get("method", "GET"), a["url"], headers=a.get("headers") or {})
            results.append(
                {"status": r.status_code, "headers": [[k, v] for k, v in r.headers.multi_items()],
                 "body": r.text}
            )
    return {"ok": True, "responses": results}


def op_sse(a: dict[str, Any]) -> dict[str, Any]:
    events = []
    with _httpx_client(a) as client, client.stream("GET", a["url"]) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append({"recv": time.time(), "data": json.loads(line[6:])})
        status = r.status_code
    return {"ok": True, "status": status, "events": events}


def op_download(a: dict[str, Any]) -> dict[str, Any]:
    h = hashlib.sha256()
    n = 0
    with _httpx_client(a) as client, client.stream("GET", a["url"]) as r:
        for chunk in r.iter_bytes():
            h.update(chunk)
            n += len(chunk)
        return {"ok": True, "status": r.status_code, "bytes": n, "sha256": h.hexdigest(),
                "expected_sha256": r.headers.get("x-body-sha256")}


def op_upload(a: dict[str, Any]) -> dict[str, Any]:
    total = int(a["bytes"])
    from integration.upstream import pattern_chunks

    def body() -> Iterator[bytes]:
        yield from pattern_chunks(total)

    with _httpx_client(a) as client:
        r = client.post(a["url"], content=body())
        return {"ok": True, "status": r.status_code, "body": r.text}


def op_openai(a: dict[str, Any]) -> dict[str, Any]:
    """The official SDK, pointed at plain HTTP; the dummy key must never reach the upstream."""
    import openai

    client = openai.OpenAI(base_url=a["base_url"], api_key=a["api_key"], max_retries=0, timeout=20.0)
    models = [m.id for m in client.models.list()]
    chat = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hello"}]
    )
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    streamed = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
    return {"ok": True, "models": models, "content": chat.choices[0].message.content, "streamed": streamed}


def op_read_file(a: dict[str, Any]) -> dict[str, Any]:
    try:
        with open(a["path"], "rb") as fh:
            fh.read(1)
    except OSError as exc:
        return _err(exc)
    return {"ok": True}


OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "tcp": op_tcp,
    "udp": op_udp,
    "ping": op_ping,
    "dns": op_dns,
    "resolve": op_resolve,
    "http": op_http,
    "sse": op_sse,
    "download": op_download,
    "upload": op_upload,
    "openai": op_openai,
    "read_file": op_read_file,
}


def main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    result = OPS[args["op"]](args)
    result["uid"] = os.getuid()
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
