"""Open N keep-alive connections to a proxy, do one request on each, then hold them idle.

    python -m bench.idleconns --port P --host-header H --n 10000

Prints one JSON line once every connection has its response ({"ok": n, "errors": e, ...}), then keeps
the connections open until stdin is closed or a line arrives; then prints whether they are all still
open and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time


async def _one(
    port: int,
    request: bytes,
    sem: asyncio.Semaphore,
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
) -> str | None:
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
        except (OSError, TimeoutError) as e:
            return f"connect: {type(e).__name__}"
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            status = head.split(b" ", 2)[1]
            length = 0
            for line in head.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await asyncio.wait_for(reader.readexactly(length), 60)
        except (
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            IndexError,
        ) as e:
            writer.close()
            return f"request: {type(e).__name__}"
        held.append((reader, writer))
        if status != b"200":
            return f"status {status.decode(errors='replace')}"
        return None


async def run(port: int, host_header: str, n: int, parallel: int) -> None:
    request = f"GET / HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode()
    sem = asyncio.Semaphore(parallel)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    t0 = time.monotonic()
    results = await asyncio.gather(*(_one(port, request, sem, held) for _ in range(n)))
    errors: dict[str, int] = {}
    for r in results:
        if r is not None:
            errors[r] = errors.get(r, 0) + 1
    print(
        json.dumps(
            {
                "ok": n - sum(errors.values()),
                "errors": sum(errors.values()),
                "error_kinds": errors,
                "open_seconds": round(time.monotonic() - t0, 2),
            }
        ),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    still_open = sum(1 for r, _ in held if not r.at_eof())
    print(json.dumps({"still_open": still_open}), flush=True)
    for _, w in held:
        w.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host-header", required=True)
    ap.add_argument("--n", type=int, required=True)
    # few requests in flight at once, so pooling proxies keep a handful of upstream connections and the
    # figure is the cost of an idle *client* connection (mitmproxy still pins one upstream per client)
    ap.add_argument("--parallel", type=int, default=8)
    a = ap.parse_args()
    want = a.n + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(a.port, a.host_header, a.n, a.parallel))
    else:
        uvloop.run(run(a.port, a.host_header, a.n, a.parallel))


if __name__ == "__main__":
    main()
