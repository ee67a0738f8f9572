"""make demo keeps working: the newcomer's first command must never rot."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_end_to_end_and_proves_identity(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "demo", "demo.py")],
                         env={**os.environ, "DEMO_WORK": str(tmp_path / "work")},
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "e2fsck: clean; /motd at v2 reads 'version 2: after the first upgrade'" in out
    assert "byte-identical to the guest's v2" in out
    digests = {line.split()[0]: line.split()[-1] for line in out.splitlines()
               if line.strip().startswith(("source  sha256", "replica sha256"))}
    assert len(digests["source"]) == 64 and digests["source"] == digests["replica"]
    log = (tmp_path / "work" / "commands.log").read_text()
    assert "repagent.py protect" in log and "rephub.py serve" in log
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True)
    assert leftovers.returncode == 1, f"processes left running: {leftovers.stdout!r}"
