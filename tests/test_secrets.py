"""SECURITY-SPEC S5-S7: SecretValue, SecretStore loading/reload, the watcher (Kubernetes layout)."""

from __future__ import annotations

import copy
import errno
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from botbox import secrets as secrets_mod
from botbox.secrets import MAX_SECRET_BYTES, SecretStore, SecretValue, SecretWiped, watch_secrets

pytestmark = pytest.mark.timeout(60)


# ---- Kubernetes Secret volume layout --------------------------------------------------------------


def k8s_publish(root: Path, version: str, data: dict[str, bytes]) -> None:
    """What kubelet's AtomicWriter does: new timestamped dir, atomic ..data swap (rename of a new
    symlink), top-level key -> ..data/key links, old dir removed."""
    old = os.readlink(root / "..data") if (root / "..data").is_symlink() else None
    ts = root / f"..{version}"
    ts.mkdir()
    for k, v in data.items():
        (ts / k).write_bytes(v)
    tmp = root / "..data_tmp"
    os.symlink(ts.name, tmp)
    os.rename(tmp, root / "..data")
    for k in data:
        if not (root / k).is_symlink():
            os.symlink(f"..data/{k}", root / k)
    for entry in os.listdir(root):
        if not entry.startswith(".") and entry not in data:
            os.unlink(root / entry)
    if old is not None:
        for f in (root / old).iterdir():
            f.unlink()
        (root / old).rmdir()


@pytest.fixture
def sdir(tmp_path: Path) -> Path:
    d = tmp_path / "secrets"
    d.mkdir()
    return d


# ---- SecretValue ----------------------------------------------------------------------------------


def test_secret_value_redaction() -> None:
    v = SecretValue(b"sk-very-secret")
    percent = "%s %r" % (v, v)  # noqa: UP031 - logging formats this way
    for text in (repr(v), str(v), f"{v}", f"{v!r}", f"{v:>40}", percent, repr([v]), repr({"k": v})):
        assert "sk-very" not in text
        assert "redacted" in text
    assert v.reveal() == b"sk-very-secret"
    assert len(v) == 14


def test_secret_value_cannot_be_pickled_or_copied() -> None:
    v = SecretValue(b"sk-very-secret")
    with pytest.raises(TypeError):
        pickle.dumps(v)
    with pytest.raises(TypeError):
        copy.copy(v)
    with pytest.raises(TypeError):
        copy.deepcopy(v)
    with pytest.raises(TypeError):
        hash(v)


def test_secret_value_equality() -> None:
    assert SecretValue(b"abc") == SecretValue(b"abc")
    assert SecretValue(b"abc") != SecretValue(b"abd")
    assert SecretValue(b"abc") != SecretValue(b"abcd")
    assert SecretValue(b"abc") == b"abc"
    assert SecretValue(b"abc") != "abc"


def test_wipe_overwrites_the_buffer() -> None:
    v = SecretValue(b"sk-very-secret")
    buf = v._buf  # the very buffer object the value lives in
    v.wipe()
    assert v.wiped
    assert b"sk-very" not in bytes(buf)
    with pytest.raises(SecretWiped):
        v.reveal()
    with pytest.raises(SecretWiped):
        v.fill([b"Bearer ", b""])


def test_wipe_while_a_view_is_alive_still_zeroes() -> None:
    v = SecretValue(b"sk-very-secret")
    view = v.buffer()
    v.wipe()
    assert bytes(view) == bytes(14)
    view.release()


def test_fill() -> None:
    v = SecretValue(b"K")
    assert v.fill([b"Bearer ", b""]) == b"Bearer K"
    assert v.fill([b"", b"/", b""]) == b"K/K"
    assert v.fill([b"static"]) == b"static"


def test_constructor_copies_its_input() -> None:
    src = bytearray(b"abc")
    v = SecretValue(src)
    src[:] = b"xyz"
    assert v.reveal() == b"abc"


# ---- loading -------------------------------------------------------------------------------------


def test_plain_files_and_trailing_newline(sdir: Path) -> None:
    (sdir / "a").write_bytes(b"value-a\n")
    (sdir / "b").write_bytes(b"value-b\n\n")
    (sdir / "c").write_bytes(b"value-c\r\n")
    (sdir / "d").write_bytes(b"value-d")
    (sdir / "e").write_bytes(b"")
    store = SecretStore(sdir)
    assert store.initial_load_ok
    assert store.get("a") == b"value-a"
    assert store.get("b") == b"value-b\n"  # exactly one newline stripped
    assert store.get("c") == b"value-c\r"  # CR kept: refused at use (S4)
    assert store.get("d") == b"value-d"
    assert store.get("e") == b""
    assert store.get("missing") is None
    assert store.available(["a", "d"]) and not store.available(["a", "missing"])
    assert store.available([])


def test_kubernetes_layout_loads(sdir: Path) -> None:
    k8s_publish(sdir, "2025_01_01_00_00_00.1", {"openai-api-key": b"sk-one\n", "other": b"o"})
    store = SecretStore(sdir)
    assert store.names() == {"openai-api-key", "other"}
    assert store.get("openai-api-key") == b"sk-one"


def test_dotfiles_and_non_regular_files_skipped(sdir: Path) -> None:
    (sdir / ".hidden").write_bytes(b"h")
    (sdir / "subdir").mkdir()
    (sdir / "subdir" / "nested").write_bytes(b"n")
    os.mkfifo(sdir / "fifo")
    os.symlink("/dev/null", sdir / "devnull")
    (sdir / "ok").write_bytes(b"v")
    store = SecretStore(sdir)  # must not block on the FIFO
    assert store.names() == {"ok"}


def test_symlink_escape_refused(sdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"outside-value")
    os.symlink(outside, sdir / "abs-escape")
    os.symlink("../outside", sdir / "rel-escape")
    (sdir / "inner").mkdir()
    os.symlink("../../outside", sdir / "inner" / "x")
    os.symlink("inner/x", sdir / "chained-escape")
    os.symlink("/etc/hostname", sdir / "etc")
    (sdir / "real").write_bytes(b"r")
    os.symlink("real", sdir / "alias")
    caplog.set_level(logging.WARNING, "botbox.secrets")
    store = SecretStore(sdir)
    assert store.names() == {"real", "alias"}
    assert "outside secrets_dir" in caplog.text
    assert "outside-value" not in caplog.text


def test_symlinked_secrets_dir_itself_is_resolved(tmp_path: Path) -> None:
    real = tmp_path / "real-dir"
    real.mkdir()
    (real / "k").write_bytes(b"v")
    os.symlink("k", real / "alias")
    link = tmp_path / "link-dir"
    os.symlink(real, link)
    store = SecretStore(link)
    assert store.names() == {"k", "alias"}


def test_size_cap(sdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (sdir / "exact").write_bytes(b"x" * MAX_SECRET_BYTES)
    (sdir / "exact-nl").write_bytes(b"y" * MAX_SECRET_BYTES + b"\n")
    (sdir / "big").write_bytes(b"z" * (MAX_SECRET_BYTES + 1))
    caplog.set_level(logging.ERROR, "botbox.secrets")
    store = SecretStore(sdir)
    assert store.initial_load_ok
    v = store.get("exact")
    assert v is not None and len(v) == MAX_SECRET_BYTES
    assert store.get("exact-nl") is None and store.get("big") is None  # skipped, not truncated
    assert "'big'" in caplog.text and "larger than" in caplog.text


def test_missing_dir_fails_but_store_usable(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "absent")
    assert not store.initial_load_ok and store.last_error
    assert store.get("x") is None and not store.available(["x"])
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / "x").write_bytes(b"1")
    assert store.reload() and store.get("x") == b"1" and store.last_error is None


# ---- reload --------------------------------------------------------------------------------------


def test_reload_swaps_and_wipes_replaced_values(sdir: Path) -> None:
    (sdir / "a").write_bytes(b"old-a")
    (sdir / "b").write_bytes(b"same-b")
    (sdir / "c").write_bytes(b"gone-c")
    store = SecretStore(sdir)
    old_a, old_b, old_c = store.get("a"), store.get("b"), store.get("c")
    assert old_a is not None and old_b is not None and old_c is not None
    (sdir / "a").write_bytes(b"new-a")
    (sdir / "c").unlink()
    assert store.reload()
    assert store.get("a") == b"new-a"
    assert store.get("c") is None  # deleted file gone after a successful reload (S7)
    assert old_a.wiped and old_c.wiped
    assert store.get("b") is old_b and not old_b.wiped  # unchanged values are not disturbed


def test_failed_reload_keeps_last_known_good(sdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (sdir / "a").write_bytes(b"value-a")
    store = SecretStore(sdir)
    moved = sdir.with_name("moved")
    sdir.rename(moved)
    caplog.set_level(logging.ERROR, "botbox.secrets")
    assert store.reload() is False
    assert store.get("a") == b"value-a" and not store.get("a").wiped  # type: ignore[union-attr]
    assert "keeping last known-good" in caplog.text
    moved.rename(sdir)
    assert store.reload()


def test_io_error_mid_read_keeps_last_known_good(sdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (sdir / "a").write_bytes(b"value-a")
    (sdir / "b").write_bytes(b"value-b")
    store = SecretStore(sdir)
    (sdir / "a").write_bytes(b"new-a")
    real_read = SecretStore._read_into_secret
    calls = {"n": 0}

    def flaky(f: object, name: str, size_hint: int) -> SecretValue | None:
        calls["n"] += 1
        if name == "b":
            raise OSError(errno.EIO, "Input/output error")
        return real_read(f, name, size_hint)

    monkeypatch.setattr(SecretStore, "_read_into_secret", staticmethod(flaky))
    assert store.reload() is False
    assert store.get("a") == b"value-a" and store.get("b") == b"value-b"  # nothing half-swapped
    monkeypatch.setattr(SecretStore, "_read_into_secret", staticmethod(real_read))
    assert store.reload() and store.get("a") == b"new-a"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A temp dir other uids can traverse (pytest's tmp_path lives under a 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="botbox-secrets-test-", dir="/tmp"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_unreadable_dir_for_proxy_uid(shared_dir: Path) -> None:
    """As an unprivileged uid (like the proxy's 1337): losing read access keeps last-known-good."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch uid")
    sdir = shared_dir / "secrets"
    sdir.mkdir()
    sdir.chmod(0o755)
    (sdir / "k").write_bytes(b"value-k")
    (sdir / "k").chmod(0o644)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 10
        try:
            os.setgid(65534)
            os.setuid(65534)
            store = SecretStore(sdir)
            ok1 = store.initial_load_ok and store.get("k") == b"value-k"
            os.write(w1, b"1")
            os.read(r2, 1)  # parent revoked access
            failed = store.reload() is False
            kept = store.get("k") == b"value-k"
            code = 0 if (ok1 and failed and kept) else 20 + ok1 * 4 + failed * 2 + kept
        finally:
            os._exit(code)
    try:
        assert os.read(r1, 1) == b"1"
        sdir.chmod(0o700)
        os.write(w2, b"1")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_kubernetes_swap_reload(sdir: Path) -> None:
    k8s_publish(sdir, "2025_01_01_00_00_00.1", {"key": b"v1\n", "dropped": b"d"})
    store = SecretStore(sdir)
    v1 = store.get("key")
    k8s_publish(sdir, "2025_01_01_00_00_01.2", {"key": b"v2\n"})
    assert store.reload()
    assert store.get("key") == b"v2" and store.get("dropped") is None
    assert v1 is not None and v1.wiped


def test_transient_enoent_during_swap_is_retried(sdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (sdir / "key").write_bytes(b"v")
    store = SecretStore(sdir)
    real_realpath = os.path.realpath
    state = {"fail": 1}

    def racy_realpath(path: str | os.PathLike[str], *, strict: bool = False) -> str:
        if strict and str(path).endswith("/key") and state["fail"]:
            state["fail"] -= 1
            raise FileNotFoundError(errno.ENOENT, "gone")
        return real_realpath(path, strict=strict)

    monkeypatch.setattr(secrets_mod.os.path, "realpath", racy_realpath)
    assert store.reload()
    assert store.get("key") == b"v"  # not dropped by a transient race


# ---- watcher -------------------------------------------------------------------------------------


async def _wait_until(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        await anyio.sleep(0.02)
    return bool(pred())  # type: ignore[operator]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_watcher_picks_up_kubernetes_swap(sdir: Path) -> None:
    k8s_publish(sdir, "2025_01_01_00_00_00.1", {"key": b"v1\n"})
    store = SecretStore(sdir)
    results: list[bool] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_secrets, store, results.append, 30.0)  # periodic check out of the picture
        await anyio.sleep(0.3)  # let inotify watches be installed
        k8s_publish(sdir, "2025_01_01_00_00_01.2", {"key": b"v2\n"})
        # the value is swapped in (worker thread) just before the callback runs: wait for both
        assert await _wait_until(lambda: store.get("key") == b"v2" and results, 10)
        assert results[-1] is True
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_watcher_periodic_safety_net(sdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import watchfiles

    def broken_awatch(*a: object, **kw: object) -> Iterator[object]:
        raise OSError("inotify unavailable")

    monkeypatch.setattr(watchfiles, "awatch", broken_awatch)
    (sdir / "key").write_bytes(b"v1")
    store = SecretStore(sdir)
    results: list[bool] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_secrets, store, results.append, 0.2)
        await anyio.sleep(0.05)
        (sdir / ".tmp-key").write_bytes(b"v2-longer")
        os.rename(sdir / ".tmp-key", sdir / "key")  # atomic: the check sees one change, not two
        assert await _wait_until(lambda: store.get("key") == b"v2-longer" and results, 10)
        assert results == [True]  # one reload for one change: no churn when nothing changed
        await anyio.sleep(0.6)
        assert results == [True]
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_watcher_retries_failed_reload_and_handles_late_dir(tmp_path: Path) -> None:
    d = tmp_path / "late"
    store = SecretStore(d)
    assert not store.initial_load_ok
    results: list[bool] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_secrets, store, results.append, 0.2)
        await anyio.sleep(0.1)
        d.mkdir()
        (d / "key").write_bytes(b"v")
        assert await _wait_until(lambda: store.get("key") == b"v" and results, 10)
        assert results[-1] is True
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_watcher_stops_promptly_on_cancel(sdir: Path) -> None:
    store = SecretStore(sdir)
    start = time.monotonic()
    with anyio.move_on_after(0.3):
        await watch_secrets(store, lambda ok: None, 30.0)
    assert time.monotonic() - start < 5


@pytest.mark.anyio
async def test_watcher_survives_a_failing_callback(sdir: Path) -> None:
    (sdir / "key").write_bytes(b"v1")
    store = SecretStore(sdir)
    calls: list[bool] = []

    def bad_callback(ok: bool) -> None:
        calls.append(ok)
        raise RuntimeError("metrics backend exploded")

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_secrets, store, bad_callback, 0.2)
        await anyio.sleep(0.3)
        (sdir / "key").write_bytes(b"v2")
        assert await _wait_until(lambda: store.get("key") == b"v2", 10)
        await anyio.sleep(0.3)
        (sdir / "key").write_bytes(b"v3-longer")
        assert await _wait_until(lambda: store.get("key") == b"v3-longer" and len(calls) >= 2, 10)
        tg.cancel_scope.cancel()
