"""botbox/logs.py: access lines written from the event loop are batched into one write per loop
iteration, without reordering against other lines and without waiting for a later line."""

from __future__ import annotations

import asyncio
import io
import json

from botbox.logs import JsonLogger


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def _request(log: JsonLogger, rid: str) -> None:
    log.request(request_id=rid, client="127.0.0.1:1", orig_dst=None, host="h", method="GET", path="/",
                decision="allow", rule="h", headers_rewritten=[], upstream_status=200, duration_ms=1.0)


def test_access_lines_batched_per_loop_iteration_and_ordered() -> None:
    out = CountingStream()
    log = JsonLogger(out)

    async def main() -> None:
        for i in range(3):
            _request(log, f"r{i}")
        assert out.writes == 0  # pending until the loop iterates
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert out.writes == 1  # one write for the three lines, without any later line
        _request(log, "r3")
        log.warning("after r3")  # flushes the pending line first: order kept
        assert out.writes == 2

    asyncio.run(main())
    _request(log, "no-loop")  # outside a loop: written at once
    assert out.writes == 3
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r.get("request_id", r["msg"]) for r in records] == ["r0", "r1", "r2", "r3", "after r3", "no-loop"]
