"""Secret values and the secret store (SECURITY-SPEC S3-S8).

``SecretValue`` keeps a credential in a ``bytearray`` so it can be overwritten when it is replaced
or dropped, and redacts itself in ``repr``/``str``/``format``/pickling.

Limits of Python (best effort, documented): ``reveal()``/``fill()`` necessarily create immutable
``bytes`` (h11 and the socket layer need them) which cannot be wiped and live until the garbage
collector frees them; the allocator may keep freed copies in memory; the interpreter, TLS library
and kernel buffers hold copies while a request is sent. Wiping limits how long the store itself
keeps a replaced value; it is no protection against an attacker who can read the proxy's memory.

``SecretStore`` loads a directory (Kubernetes Secret volume layout supported):

* names starting with ``.`` are skipped (``..data``, ``..2025_...``), and so are non-regular files;
* a symlink is followed only if its fully resolved target stays inside the resolved ``secrets_dir``
  (the top-level ``key -> ..data/key`` links of the Kubernetes layout resolve inside);
* files larger than 1 MiB are skipped and logged as errors (never loaded truncated);
* exactly one trailing ``\\n`` is stripped (not ``\\r\\n``: a remaining CR is refused at use, S4);
* a reload builds a complete new dict and swaps it in one assignment; a failed reload (directory
  missing/unreadable, I/O or permission error on an entry) keeps the last known-good values and
  returns False; values that changed or disappeared are wiped, unchanged values are kept as the
  same objects (so a reload racing with a request never wipes a value still in use unless it
  changed; a wiped value raises :class:`SecretWiped` instead of yielding an empty credential).

The constructor performs the initial load (its result is ``initial_load_ok``).
Logging goes to ``botbox.secrets`` and names files, never contents.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

__all__ = [
    "MAX_SECRET_BYTES",
    "SecretLookup",
    "SecretStore",
    "SecretValue",
    "SecretWiped",
    "watch_secrets",
]

log = logging.getLogger("botbox.secrets")

MAX_SECRET_BYTES = 1024 * 1024
_REDACTED = "SecretValue(<redacted>)"
_ENOENT_RETRIES = 3


class SecretWiped(RuntimeError):
    """The value was wiped (replaced by a reload or dropped); it must not be used."""


class SecretValue:
    """A credential in a mutable buffer. ``repr``/``str``/``format`` never show it."""

    __slots__ = ("__weakref__", "_buf", "_lock", "_wiped")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._buf = bytearray(data)
        self._wiped = False
        # A reload (worker thread) may wipe a value while a request renders it; the lock makes
        # rendering see either the whole value or SecretWiped, never a half-zeroed credential.
        self._lock = threading.Lock()

    def reveal(self) -> bytes:
        """Return the value as (unwipeable) bytes. Raises :class:`SecretWiped` after ``wipe()``."""
        with self._lock:
            if self._wiped:
                raise SecretWiped("secret value has been wiped")
            return bytes(self._buf)

    def fill(self, parts: Sequence[bytes]) -> bytes:
        """``value.join(parts)`` in one allocation (template rendering without an extra copy)."""
        if len(parts) == 1:
            return parts[0]
        with self._lock:
            if self._wiped:
                raise SecretWiped("secret value has been wiped")
            buf = self._buf
            pieces: list[bytes | bytearray] = [parts[0]]
            for p in parts[1:]:
                pieces.append(buf)
                pieces.append(p)
            return b"".join(pieces)

    def buffer(self) -> memoryview:
        """Read-only view of the value, for checks without copying. Do not keep it."""
        if self._wiped:
            raise SecretWiped("secret value has been wiped")
        return memoryview(self._buf).toreadonly()

    def wipe(self) -> None:
        """Overwrite the buffer with zeros and mark the value unusable."""
        with self._lock:
            buf = self._buf
            buf[:] = bytes(len(buf))  # same length: overwrites in place, no reallocation
            self._wiped = True
            with contextlib.suppress(BufferError):  # a view from buffer() is still alive; zeros stay
                del buf[:]

    @property
    def wiped(self) -> bool:
        return self._wiped

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        return _REDACTED

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return _REDACTED

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SecretValue):
            return hmac.compare_digest(self._buf, other._buf)
        if isinstance(other, bytes | bytearray):
            return hmac.compare_digest(self._buf, other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, and hashing would leak via timing

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretValue cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("SecretValue cannot be copied")

    def __deepcopy__(self, memo: dict[int, Any]) -> NoReturn:
        raise TypeError("SecretValue cannot be copied")

    def __del__(self) -> None:
        try:
            if not self._wiped:
                self.wipe()
        except AttributeError:  # partially constructed
            pass


class SecretLookup(Protocol):
    def get(self, name: str) -> SecretValue | None: ...


class _ReloadFailed(Exception):
    pass


class SecretStore:
    """Secrets loaded from a directory; ``get`` is a dict lookup, ``reload`` swaps atomically."""

    def __init__(self, secrets_dir: Path | str) -> None:
        self.secrets_dir = Path(secrets_dir)
        self._values: dict[str, SecretValue] = {}
        self._lock = threading.Lock()  # serialises reloads; readers never block
        self.last_error: str | None = None
        self.initial_load_ok = self.reload()

    # -- lookup ----------------------------------------------------------------------------

    def get(self, name: str) -> SecretValue | None:
        return self._values.get(name)

    def available(self, names: Iterable[str]) -> bool:
        values = self._values
        return all(n in values for n in names)

    def names(self) -> frozenset[str]:
        return frozenset(self._values)

    def __repr__(self) -> str:
        return f"SecretStore({str(self.secrets_dir)!r}, {len(self._values)} secrets)"

    # -- loading ---------------------------------------------------------------------------

    def reload(self) -> bool:
        """Load the directory into a new dict and swap it in. False (and last-known-good kept)
        when the directory or an entry cannot be read."""
        with self._lock:
            try:
                new = self._load_with_retries()
            except _ReloadFailed as e:
                self.last_error = str(e)
                log.error("secrets reload failed, keeping last known-good values: %s", e)  # noqa: TRY400
                return False
            old = self._values
            # Keep unchanged values as the same objects; wipe everything replaced or dropped.
            for name, value in list(new.items()):
                prev = old.get(name)
                if prev is not None and not prev.wiped and prev == value:
                    value.wipe()
                    new[name] = prev
            self._values = new  # single reference assignment: readers see old or new, never a mix
            keep = {id(v) for v in new.values()}
            for v in old.values():
                if id(v) not in keep:
                    v.wipe()
            self.last_error = None
            log.info("secrets loaded: %d (%s)", len(new), ", ".join(sorted(new)) or "none")
            return True

    def _load_with_retries(self) -> dict[str, SecretValue]:
        # A Kubernetes ..data swap can remove the old timestamped directory between resolving a
        # link and opening it; retrying resolves through the new ..data.
        for attempt in range(_ENOENT_RETRIES):
            try:
                return self._load(final=attempt == _ENOENT_RETRIES - 1)
            except _Transient:
                continue
        raise _ReloadFailed("directory kept changing while loading")  # pragma: no cover

    def _load(self, final: bool) -> dict[str, SecretValue]:
        try:
            root = self.secrets_dir.resolve(strict=True)
            entries = sorted(os.listdir(root))
        except OSError as e:
            raise _ReloadFailed(f"cannot read {str(self.secrets_dir)!r}: {_err(e)}") from None
        out: dict[str, SecretValue] = {}
        try:
            for name in entries:
                if name.startswith("."):
                    continue
                value = self._load_one(root, name, final)
                if value is not None:
                    out[name] = value
        except BaseException:
            for v in out.values():
                v.wipe()
            raise
        return out

    def _load_one(self, root: Path, name: str, final: bool) -> SecretValue | None:
        path = root / name
        try:
            real = Path(os.path.realpath(path, strict=True))
        except FileNotFoundError:
            if not final:
                raise _Transient from None
            log.warning("secret %r skipped: dangling symlink", name)
            return None
        except OSError as e:
            raise _ReloadFailed(f"cannot resolve {name!r}: {_err(e)}") from None
        if real != root and not real.is_relative_to(root):
            log.warning("secret %r skipped: symlink resolves outside secrets_dir", name)
            return None
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
        try:
            st = os.stat(real)
            if not stat.S_ISREG(st.st_mode):
                if not stat.S_ISDIR(st.st_mode):
                    log.warning("secret %r skipped: not a regular file", name)
                return None
            fd = os.open(real, flags)
        except FileNotFoundError:
            if not final:
                raise _Transient from None
            log.warning("secret %r skipped: vanished while loading", name)
            return None
        except OSError as e:
            if e.errno == errno.ELOOP and not final:  # resolved path became a symlink: being swapped
                raise _Transient from None
            raise _ReloadFailed(f"cannot open {name!r}: {_err(e)}") from None
        try:
            with os.fdopen(fd, "rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    log.warning("secret %r skipped: not a regular file", name)
                    return None
                if st.st_size > MAX_SECRET_BYTES:
                    log.error("secret %r skipped: larger than %d bytes", name, MAX_SECRET_BYTES)
                    return None
                return self._read_into_secret(f, name, st.st_size)
        except OSError as e:
            raise _ReloadFailed(f"cannot read {name!r}: {_err(e)}") from None

    @staticmethod
    def _read_into_secret(f: Any, name: str, size_hint: int) -> SecretValue | None:
        # Read straight into a bytearray (never through intermediate bytes objects), at most
        # MAX_SECRET_BYTES + 1 bytes so an oversized (or growing) file is detected, not truncated.
        buf = bytearray(min(size_hint, MAX_SECRET_BYTES) + 1)
        n = 0
        try:
            while True:
                if n == len(buf):
                    if len(buf) > MAX_SECRET_BYTES:
                        break
                    bigger = bytearray(MAX_SECRET_BYTES + 1)
                    bigger[:n] = buf
                    buf[:] = bytes(len(buf))
                    buf = bigger
                got = f.readinto(memoryview(buf)[n:])
                if not got:
                    break
                n += got
            if n > MAX_SECRET_BYTES:
                log.error("secret %r skipped: larger than %d bytes", name, MAX_SECRET_BYTES)
                return None
            end = n - 1 if n and buf[n - 1] == 0x0A else n  # strip exactly one trailing LF
            return SecretValue(memoryview(buf)[:end])
        finally:
            buf[:] = bytes(len(buf))

    def fingerprint(self) -> tuple[object, ...] | None:
        """Cheap summary of the directory (names, link targets, inode, size, mtime) used by the
        watcher's periodic safety-net check; None when the directory cannot be read."""
        try:
            root = self.secrets_dir.resolve(strict=True)
            items: list[object] = [str(root)]
            for name in sorted(os.listdir(root)):
                p = root / name
                try:
                    real = os.path.realpath(p)
                    st = os.stat(real)
                except OSError:
                    items.append((name, None))
                    continue
                items.append((name, real, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            return tuple(items)
        except OSError:
            return None


class _Transient(Exception):
    pass


def _err(e: OSError) -> str:
    return e.strerror or type(e).__name__


async def watch_secrets(
    store: SecretStore, on_reload: Callable[[bool], None], interval: float = 10.0
) -> None:
    """Reload ``store`` whenever ``secrets_dir`` changes; call ``on_reload(ok)`` after each reload.

    Uses ``watchfiles.awatch`` (inotify) on the directory, plus a periodic check every
    ``interval`` seconds as a safety net (missed events, a directory that appears later, a failed
    reload to retry). Runs until cancelled. Reloads run in a worker thread.
    """
    import anyio

    last_fp: list[tuple[object, ...] | None] = [store.fingerprint()]
    lock = anyio.Lock()

    async def do_reload() -> None:
        async with lock:
            ok = await anyio.to_thread.run_sync(store.reload)
            last_fp[0] = await anyio.to_thread.run_sync(store.fingerprint)
        try:
            on_reload(ok)
        except Exception:  # a broken callback must not stop secret rotation
            log.exception("secrets on_reload callback failed")

    # awatch runs the inotify wait in a worker thread that cancellation cannot interrupt; this
    # event (checked by watchfiles every ``step`` ms) is set when the watcher is cancelled.
    stop = threading.Event()

    async def inotify_loop() -> None:
        from watchfiles import awatch

        while not stop.is_set():
            try:
                if not store.secrets_dir.is_dir():
                    await anyio.sleep(interval)
                    continue
                async for _changes in awatch(
                    store.secrets_dir,
                    watch_filter=None,
                    debounce=200,
                    step=50,
                    stop_event=stop,
                    rust_timeout=1000,
                    recursive=True,
                ):
                    await do_reload()
            except (OSError, RuntimeError) as e:
                log.warning("secrets watcher error (%s); relying on the periodic check", type(e).__name__)
            await anyio.sleep(interval)

    async def periodic_loop() -> None:
        try:
            while True:
                await anyio.sleep(interval)
                fp = await anyio.to_thread.run_sync(store.fingerprint)
                if fp != last_fp[0] or store.last_error is not None:
                    await do_reload()
        finally:
            stop.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(inotify_loop)
        tg.start_soon(periodic_loop)
