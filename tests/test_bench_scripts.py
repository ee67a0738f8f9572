"""Every benchmark script still starts: ``--help`` runs its imports and its
argument parser, so a name it imports from the code or from the test
helpers cannot be renamed under it unnoticed.  (The benchmarks themselves
run in ``make bench``, not here.)"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "bench", "*.py")))


def test_there_are_benchmarks():
    assert any(os.path.basename(s).startswith("bench_") for s in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_the_script_starts(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_the_profile_probes_find_what_they_wrap():
    """bench_profile wraps methods of the daemons by name to time each stage
    of a write: installing its probes (in a process of its own, since they
    patch the classes) fails on a method that was renamed or moved, and the
    wrapped ``send_message`` still takes the arguments the daemons pass."""
    code = ("import sys; sys.path[:0] = ['bench', 'tests', '.']; import bench_profile as b; "
            "p = b.Probe('x', 'timers'); b.install_agent_timers(p); b.install_hub_timers(p); "
            "import protocol\n"
            "class Sock:\n    def sendmsg(self, parts): return sum(len(x) for x in parts)\n"
            "protocol.send_message(Sock(), protocol.Ack(request_id=1), None)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("argv, error", [
    (["--levels", "timers"], "--levels timers: plain and any of timers, cprofile"),
    (["--levels", "plain,gil"], "--levels plain,gil: plain and any of timers, cprofile"),
    (["--levels", "plain,timers", "--json"], "--json needs --levels plain,timers,cprofile")])
def test_bench_profile_refuses_passes_its_report_cannot_use(argv, error):
    """Its report needs the plain pass, and --json every pass: a run without
    them is refused before anything is started, not ended by a traceback."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_profile.py"),
                           *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert error in done.stderr
