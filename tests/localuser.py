"""A second local user for the security tests: ``other_user`` (fixture, in
tests/conftest.py) makes a throw-away user with useradd and removes it;
``probe_as(user, paths)`` tries, as that user, to read each file (or connect
to each unix socket: names ending .sock or .nbd) and says what happened."""

from __future__ import annotations

import itertools
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

_made = itertools.count()


def local_user():
    """Make a throw-away local user (useradd), yield it, remove it.  Only a
    machine that cannot make one skips: as root, a failed useradd or userdel
    fails the test, so a CI run never passes with the check left out."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("userdel"):
        pytest.skip("needs root and useradd/userdel")
    name = f"rpsec{os.getpid() % 100000}x{next(_made)}"
    made = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                           "--user-group", name], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, f"useradd {name} failed: {made.stderr.strip()}"
    try:
        yield pwd.getpwnam(name)
    finally:
        gone = subprocess.run(["userdel", name], capture_output=True, text=True, timeout=30)
        assert gone.returncode == 0, f"userdel {name} failed: {gone.stderr.strip()}"


#: Run as the other user: try each path (read a byte, or connect to a socket).
PROBE = r"""
import json, os, socket, stat, sys
out = {}
for path in sys.argv[1:]:
    try:
        if path.endswith((".sock", ".nbd")):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
        else:
            with open(path, "rb") as f:
                f.read(1)
        out[path] = "ok"
    except OSError as err:
        out[path] = type(err).__name__
print(json.dumps(out))
"""


def python_for_anyone() -> str:
    """A Python interpreter every user may run (the test's own may live under /root)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/bin/python3"):
        path = Path(candidate)
        if path.exists() and all(stat.S_IMODE(q.stat().st_mode) & 0o001
                                 for q in [path.resolve(), *path.resolve().parents]):
            return str(path)
    pytest.skip("no Python interpreter that another user may run")


def probe_as(user, paths) -> dict:
    res = subprocess.run([python_for_anyone(), "-I", "-c", PROBE, *map(str, paths)],
                         user=user.pw_uid,
                         group=user.pw_gid, extra_groups=[], capture_output=True, text=True,
                         timeout=30, cwd="/")
    assert res.returncode == 0, res
    return json.loads(res.stdout)
