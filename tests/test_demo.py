"""make demo keeps working: the newcomer's first command must never rot."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_end_to_end_and_proves_identity(tmp_path):
    # The demo bounds each of its steps itself (and then says which step failed
    # and shows the daemons' logs); this outer bound only catches a hang of the demo.
    try:
        res = subprocess.run([sys.executable, os.path.join(ROOT, "demo", "demo.py")],
                             env={**os.environ, "DEMO_WORK": str(tmp_path / "work")},
                             capture_output=True, text=True, timeout=480)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace")
        pytest.fail(f"the demo hung; its output ends with:\n{out[-3000:]}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "e2fsck: clean; /motd at v2 reads 'version 2: after the first upgrade'" in out
    assert "byte-identical to the guest's v2" in out
    digests = {line.split()[0]: line.split()[-1] for line in out.splitlines()
               if line.strip().startswith(("source  sha256", "replica sha256"))}
    assert len(digests["source"]) == 64 and digests["source"] == digests["replica"]
    # The fail-over test (step 7) leaves protection alone: the agent attached
    # once at start and once after the hub's restart (step 6), never again.
    agent_log = (tmp_path / "work" / "agent.log").read_text()
    assert agent_log.count("attached as id") == 2, agent_log[-3000:]
    assert "degraded" not in agent_log, agent_log[-3000:]
    log = (tmp_path / "work" / "commands.log").read_text()
    assert "repagent.py protect" in log and "rephub.py serve" in log
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True)
    assert leftovers.returncode == 1, f"processes left running: {leftovers.stdout!r}"
