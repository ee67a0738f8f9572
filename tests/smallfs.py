"""A real small file system for the disk-full tests: ``tmpfs(path, size)``
mounts a tmpfs of ``size`` bytes at ``path`` for a ``with`` block (the test
is skipped, saying why, where the kernel refuses), and ``ballast(path,
leave)`` fills it until about ``leave`` bytes stay free."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest

MiB = 1024 * 1024


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def tmpfs(path, size: int):
    """A tmpfs of ``size`` bytes mounted at ``path`` (made if missing), unmounted after."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        why = f"cannot mount a small tmpfs at {path} ({out.stderr.strip()})"
        # Only a machine that cannot mount skips; as root, the tests must run.
        assert os.geteuid() != 0, why
        pytest.skip(f"{why}: the disk-full tests need one")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def ballast(path, leave: int) -> Path:
    """Write ``path``/ballast until about ``leave`` bytes stay free; return it."""
    name = Path(path) / "ballast"
    with open(name, "wb") as f:
        while (free := free_bytes(path)) > leave:
            try:
                f.write(b"\xa5" * min(MiB, free - leave))
                f.flush()
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                break   # full already: what was asked
    return name
