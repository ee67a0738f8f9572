"""The hub's own disk fills up under a real guest workload (bounded for CI).

QSD + repagent + rephub with the hub's data directory on a 96 MiB tmpfs
(tests/faults/cluster.py ``hub_fs_size``).  Each round fills it with a
ballast file under random writes until ``status`` says degraded, restarts
the hub by SIGTERM or SIGKILL at a random moment (or not), frees the space,
and then asserts: convergence without a restart of anything else, replica
sha256 == source sha256 == the oracle of every write QEMU acknowledged, a
checkpoint that exports equal to the oracle, and no traceback in the logs.
``make soak-disk-full`` runs the same fault among the others for longer.
"""

from __future__ import annotations

import pytest

import nbd
import repagent
from faults.cluster import Cluster, Fault
from procs import start_recover
from qemu_harness import MiB, requires_qemu, wait_until
from oracle import first_difference
from test_faults import run_round

SIZE = 16 * MiB


@requires_qemu
@pytest.mark.parametrize("mode,seed", [("async", 141), ("sync", 142)])
def test_a_full_hub_disk_loses_no_acknowledged_write(tmp_path, mode, seed):
    # Small segments kept 10 s: retention frees space as the writes go on, so
    # only the ballast fills the disk (as a full disk on a busy site would).
    with Cluster(tmp_path, size=SIZE, mode=mode, seed=seed, hub_fs_size=96 * MiB,
                 hub_args=["--journal-retention", "10", "--journal-segment-bytes", str(4 * MiB)],
                 writer_gap=0.01, max_write=32 * 1024,
                 agent_extra=["--sync-timeout", "2"] if mode == "sync" else ()) as cl:
        cl.converge()
        for i in range(2):   # the hub restarted by SIGTERM, then by SIGKILL, while full
            run_round(cl, Fault.DISK_FULL, i)   # converged, replica == source == oracle
            name = f"round-{i}"
            problem = first_difference(cl.export(name, tmp_path / "cp.raw"),
                                       cl.model.image_at(name))
            assert problem is None, f"checkpoint {name}: {problem}"
        cl.writer.stop()
        assert len(cl.degraded_seen) >= 2 and all("journal full" in d or "replica" in d
                                                  or "metadata" in d
                                                  for d in cl.degraded_seen), cl.degraded_seen
        assert not cl.hub.status()["degraded"], "still degraded after the space came back"
        log = cl.hub.log.read_text(errors="replace") + cl.agent.log.read_text(errors="replace")
        assert "Traceback" not in log, log[-5000:]


@requires_qemu
def test_a_recovery_test_with_the_protected_agents_id_leaves_protection_up(tmp_path):
    """README walkthrough step 6 with real processes: ``repagent.py recover
    --test`` under the protected agent's own id opens a session, reads the
    volume and closes, while protection goes on: the protect agent neither
    loses its hub connection nor re-attaches, and its writes keep flowing."""
    with Cluster(tmp_path, size=SIZE, mode="sync", seed=143,
                 agent_extra=["--sync-timeout", "2"]) as cl:
        cl.converge()
        cl.writer.start()
        before = cl.agent.log.read_text(errors="replace")
        proc, uri = start_recover(f"127.0.0.1:{cl.hub.port}", "agent1",
                                  cl.hub.secret_files["agent1"], cl.volume, "latest",
                                  "--test", tmp_path / "recover.log")
        try:
            assert uri, (tmp_path / "recover.log").read_text(errors="replace")
            with nbd.NBDClient(*repagent.parse_nbd_uri(uri)) as client:
                assert len(client.read(0, 65536)) == 65536
            count = cl.writer.count
            wait_until(lambda: cl.writer.count > count + 10 or cl.writer.error, 30,
                       "guest writes during the test session")
        finally:
            proc.terminate()
            proc.wait(30)
        cl.writer.pause()
        cl.converge()
        cl.check_identical()
        during = cl.agent.log.read_text(errors="replace")[len(before):]
        for line in ("hub connection lost", "degraded", "attached by"):
            assert line not in during, f"protection disturbed: {line!r}\n{during[-3000:]}"
        assert cl.agent.status()["mode"] == "sync"
