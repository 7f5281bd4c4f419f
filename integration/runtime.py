"""Runtime for processes that run as other uids (proxy as 1337, app as 1000).

The checkout may live under a 0700 directory (``/root/...`` in CI), which uid 1337 and uid 1000
cannot traverse.  ``Runtime`` copies the ``botbox``, ``netsetup`` and ``integration`` packages into a
fresh world-readable temp directory and builds the ``PYTHONPATH``/interpreter used to start those
processes.  The interpreter must itself be executable by every uid: ``/opt/botbox/venv/bin/python``
(built from Debian's ``/usr/bin/python3``), or ``sys.executable`` when that already is a venv every uid
can use.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV_PYTHON = Path(os.environ.get("BOTBOX_VENV", "/opt/botbox/venv")) / "bin" / "python"
PACKAGES = ("botbox", "netsetup", "integration")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".mypy_cache", ".pytest_cache")


def _world_executable(path: Path) -> bool:
    """True when every uid can execute ``path`` (file o+x and every parent directory o+x)."""
    try:
        real = path.resolve(strict=True)
    except OSError:
        return False
    if not real.stat().st_mode & stat.S_IXOTH:
        return False
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)


def interpreter() -> str:
    """An interpreter every uid can execute, with the project's dependencies installed."""
    if _world_executable(DEFAULT_VENV_PYTHON):
        return str(DEFAULT_VENV_PYTHON)
    if sys.prefix != sys.base_prefix and _world_executable(Path(sys.executable)):
        return sys.executable
    raise RuntimeError(
        f"no interpreter usable by uid 1337/1000: {DEFAULT_VENV_PYTHON} missing or not world-executable; "
        "run ./dev venv"
    )


@dataclass
class Runtime:
    """A world-readable copy of the sources plus the interpreter to run them with."""

    root: Path
    python: str
    _owned: bool = field(default=True, repr=False)

    @classmethod
    def create(cls, prefix: str = "botbox-rt-") -> Runtime:
        root = Path(tempfile.mkdtemp(prefix=prefix))
        try:
            os.chmod(root, 0o755)  # noqa: S103 - must be readable by uid 1337/1000
            src_dir = root / "src"
            src_dir.mkdir(mode=0o755)
            for pkg in PACKAGES:
                shutil.copytree(REPO_ROOT / pkg, src_dir / pkg, ignore=_IGNORE)
            for dirpath, dirnames, filenames in os.walk(root):
                os.chmod(dirpath, 0o755)  # noqa: S103 - world-readable copy by design
                for name in dirnames:
                    os.chmod(os.path.join(dirpath, name), 0o755)  # noqa: S103
                for name in filenames:
                    os.chmod(os.path.join(dirpath, name), 0o644)
            return cls(root=root, python=interpreter())
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise

    @property
    def src(self) -> Path:
        return self.root / "src"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A minimal, explicit environment for child processes (never the test runner's secrets)."""
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONPATH": str(self.src),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "LANG": "C.UTF-8",
            "HOME": "/nonexistent",
        }
        if extra:
            env.update(extra)
        return env

    def mkdir(self, name: str, mode: int = 0o755) -> Path:
        path = self.root / name
        path.mkdir(mode=mode)
        os.chmod(path, mode)
        return path

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
