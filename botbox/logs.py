"""JSON-lines logging on stderr (CONTRACT §6).

One object per line: ``ts`` (RFC 3339 UTC), ``level``, ``msg`` plus event fields. Request lines carry
exactly the CONTRACT §6 fields. Values that are not JSON types are rendered with ``str()``, which for a
``SecretValue`` is its redacted placeholder, so an accidental secret can never be printed in clear.
Callers never pass header values; ``headers_rewritten`` holds names only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=str).encode


# (second, "YYYY-MM-DDTHH:MM:SS"): strftime once per second, not per line; replaced as one tuple so a
# logging thread never sees a second paired with another second's text.
_ts_cache: tuple[int, str] = (-1, "")


def _ts() -> str:
    global _ts_cache  # noqa: PLW0603 - a one-entry cache
    now = time.time()
    secs = int(now)
    cached = _ts_cache
    if cached[0] != secs:
        cached = _ts_cache = (secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)))
    return f"{cached[1]}.{int((now - secs) * 1000):03d}Z"


class JsonLogger:
    """Minimal structured logger; ``stream`` defaults to ``sys.stderr`` (looked up per write)."""

    def __init__(self, stream: TextIO | None = None, level: str = "info") -> None:
        self._stream = stream
        self._min = _LEVELS[level]

    def _write(self, level: str, msg: str, fields: dict[str, Any]) -> None:
        if _LEVELS[level] < self._min:
            return
        record: dict[str, Any] = {"ts": _ts(), "level": level, "msg": msg}
        record.update(fields)
        line = _dumps(record) + "\n"
        stream = self._stream if self._stream is not None else sys.stderr
        try:
            stream.write(line)
            stream.flush()
        except (OSError, ValueError):  # stderr closed: logging must never take the proxy down
            pass

    def debug(self, msg: str, **fields: Any) -> None:
        self._write("debug", msg, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._write("info", msg, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._write("warning", msg, fields)

    def error(self, msg: str, **fields: Any) -> None:
        self._write("error", msg, fields)

    def request(
        self,
        *,
        request_id: str,
        client: str | None,
        orig_dst: str | None,
        host: str | None,
        method: str | None,
        path: str | None,
        decision: str,
        rule: str | None,
        headers_rewritten: list[str],
        upstream_status: int | None,
        duration_ms: float,
    ) -> None:
        """The per-request access line: exactly the CONTRACT §6 fields plus ts/level/msg."""
        self._write(
            "info",
            "request",
            {
                "request_id": request_id,
                "client": client,
                "orig_dst": orig_dst,
                "host": host,
                "method": method,
                "path": path,
                "decision": decision,
                "rule": rule,
                "headers_rewritten": headers_rewritten,
                "upstream_status": upstream_status,
                "duration_ms": duration_ms,
            },
        )


class JsonLogHandler(logging.Handler):
    """Routes stdlib ``logging`` records (e.g. ``botbox.secrets``) into the JSON-lines stream."""

    def __init__(self, logger: JsonLogger) -> None:
        super().__init__()
        self._logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string must not crash the proxy
            msg = str(record.msg)
        level = record.levelname.lower()
        if level not in _LEVELS:
            level = "error" if record.levelno >= logging.ERROR else "info"
        fields: dict[str, Any] = {"logger": record.name}
        if record.exc_info and record.exc_info[0] is not None:
            fields["error"] = record.exc_info[0].__name__  # type only: messages may quote data
        self._logger._write(level, msg, fields)


def install_stdlib_bridge(logger: JsonLogger, level: int = logging.INFO) -> None:
    """Make the root stdlib logger write JSON lines through ``logger`` (replaces existing handlers)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(JsonLogHandler(logger))
    root.setLevel(level)
