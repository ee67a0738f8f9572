"""The fault suite (bounded for CI): every failure mode converges without data loss.

Each test runs QSD + repagent + rephub on loopback with a FaultProxy in the
agent-hub link (tests/faults/cluster.py) and a QD1 writer whose acknowledged
writes are the oracle (tests/oracle.py).  ``make soak ROUNDS=N`` runs the
same rounds for as long as asked (tests/faults/soak.py).
"""

from __future__ import annotations

import signal
import socket
import time

import pytest

import protocol as p
import rephub
from faults.cluster import LINK_AND_PROCESS_FAULTS, Cluster, Fault
from faults.proxy import FaultProxy
from hubtools import TestAgent, MemVolume, make_agents_file
from oracle import first_difference
from qemu_harness import MiB, requires_qemu, wait_until

SIZE = 16 * MiB


def run_round(cl: Cluster, fault: Fault, index: int, write_for: float = 0.6,
              hold: float = 1.0) -> dict:
    """Writes, a fault under writes, more writes; then converge, compare, checkpoint."""
    writer = cl.writer
    if not writer.is_alive():
        writer.start()
    writer.resume()
    start_count = writer.count
    wait_until(lambda: writer.count >= start_count + 5 or writer.error, 30, "writes flow")
    time.sleep(write_for)           # let the workload run: time, not synchronisation
    up, down = cl.proxy.bytes_up, cl.proxy.bytes_down
    written_before = writer.bytes
    cl.inject(fault, hold)
    time.sleep(write_for)
    writer.pause()
    took = cl.converge()
    cl.check_identical()
    name = f"round-{index}"
    cl.checkpoint(name)
    return dict(fault=fault.value, converge_s=took, bytes_up=cl.proxy.bytes_up - up,
                bytes_down=cl.proxy.bytes_down - down,
                written=writer.bytes - written_before)


def check_checkpoints(cl: Cluster, tmp_path) -> int:
    """Replica-state oracle: each checkpoint's export == the model at that prefix."""
    for name in cl.checkpoints:
        got = cl.export(name, tmp_path / "export.raw")
        problem = first_difference(got, cl.model.image_at(name))
        assert problem is None, f"checkpoint {name}: {problem}"
    return len(cl.checkpoints)


@requires_qemu
def test_every_fault_kind_converges_and_checkpoints_match_the_oracle(tmp_path):
    """One round of each fault, in a seeded random order (async mode)."""
    kinds = list(LINK_AND_PROCESS_FAULTS)
    with Cluster(tmp_path, size=SIZE, mode="async", seed=61) as cl:
        cl.rng.shuffle(kinds)
        cl.converge()
        results = [run_round(cl, fault, i) for i, fault in enumerate(kinds)]
        cl.writer.stop()
        for r in results:
            # Bytes resent are accounted for: what the agent sent up is the new
            # writes plus resynced dirty chunks, never a full copy of the volume
            # (a 16 MiB volume; each round writes well under that).
            assert r["bytes_up"] < 2 * r["written"] + SIZE // 2, r
        assert check_checkpoints(cl, tmp_path) == len(kinds)
        log = cl.hub.log.read_text() + cl.agent.log.read_text()
        assert "Traceback" not in log, log[-5000:]


@requires_qemu
def test_sync_mode_every_acknowledged_write_survives_a_hub_kill(tmp_path):
    """Sync mode: QEMU's ack means durable at the hub.  Kill the hub during
    writes, freeze the agent so it cannot resend, restart the hub: the replica
    is exactly the prefix acknowledged at the kill (or one more: the write in
    flight).  Then the timestamps between writes recover exact prefixes."""
    with Cluster(tmp_path, size=SIZE, mode="sync", seed=62,
                 agent_extra=["--sync-timeout", "5"]) as cl:
        cl.converge()
        wait_until(lambda: cl.agent.status()["mode"] == "sync", 20, "sync mode")
        cl.writer.start()
        wait_until(lambda: cl.writer.count >= 40 or cl.writer.error, 60, "writes")
        acked = cl.writer.count
        prefix = cl.kill_hub_check_acked()     # raises if an acknowledged write is missing
        assert prefix >= acked
        marks = list(cl.writer.marks[:acked])
        cl.writer.pause()
        cl.converge()
        cl.check_identical()
        # Recoverable timestamps: between write i's ack and write i+1's issue the
        # hub held exactly the first i+1 writes (sync mode, no fault in between).
        checked = 0
        for i in range(5, acked - 1, max(1, acked // 8)):
            t_ns = marks[i][1]    # write i's ACK: its record is journaled before it
            if t_ns >= marks[i + 1][0]:
                continue   # write i+1 was issued in the same ns
            got = cl.export(p.format_point_time(t_ns), tmp_path / "t.raw")
            problem = first_difference(got, cl.model.image_at(i + 1))
            assert problem is None, f"point at write {i}: {problem}"
            checked += 1
        assert checked >= 3


@requires_qemu
def test_a_stopped_hub_never_stalls_guest_writes_beyond_the_sync_timeout(tmp_path):
    with Cluster(tmp_path, size=SIZE, mode="sync", seed=63,
                 agent_extra=["--sync-timeout", "0.5", "--hub-timeout", "2"]) as cl:
        cl.converge()
        wait_until(lambda: cl.agent.status()["mode"] == "sync", 20, "sync mode")
        cl.writer.start()
        wait_until(lambda: cl.writer.count >= 10 or cl.writer.error, 30, "writes")
        first = cl.writer.count
        cl.hub.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: cl.writer.count >= first + 30 or cl.writer.error, 60,
                       "writes go on while the hub is stopped")
            cl.writer.pause()
            latencies = [(acked - issued) / 1e9 for issued, acked in cl.writer.marks[first:]]
            assert max(latencies) < 0.5 + 1.5, \
                f"a guest write took {max(latencies):.2f} s with the hub stopped"
        finally:
            cl.hub.proc.send_signal(signal.SIGCONT)
        cl.converge()
        cl.check_identical()


@requires_qemu
def test_online_verify_ships_checksums_only_and_repairs_what_differs(tmp_path):
    with Cluster(tmp_path, size=SIZE, mode="async", seed=64) as cl:
        cl.writer.start()
        wait_until(lambda: cl.writer.count >= 40 or cl.writer.error, 30, "writes")
        cl.writer.pause()
        cl.converge()
        up, down = cl.proxy.bytes_up, cl.proxy.bytes_down
        res = cl.hub.request({"cmd": "verify", "volume": "vol0"}, timeout=60)
        shipped = cl.proxy.bytes_up - up + cl.proxy.bytes_down - down
        assert res["differing"] == [] and res["bytes_fetched"] == 0, res
        assert shipped < SIZE // 100, f"verify of an identical volume shipped {shipped} bytes"
        # Bit rot in the replica: found, reported, and repaired on request.
        with open(cl.hub.replica("vol0"), "r+b") as f:
            f.seek(5 * MiB + 100)
            f.write(b"\xff" * 10)
        res = cl.hub.request({"cmd": "verify", "volume": "vol0"}, timeout=60)
        assert res["differing"] == [dict(offset=5 * MiB, length=64 * 1024)], res
        assert not res["repaired"] and res["bytes_fetched"] == 0
        out = rephub.main(["verify", "--data", str(cl.hub.data), "vol0", "--repair"])
        assert out == 0
        cl.converge()
        cl.check_identical()
        res = cl.hub.request({"cmd": "verify", "volume": "vol0"}, timeout=60)
        assert res["differing"] == []


def test_half_open_connection_is_closed_by_the_hubs_heartbeat(tmp_path):
    """A stalled link (FaultProxy.stall: open, silent) is closed by the hub
    after PEER_SILENCE_INTERVALS heartbeats; another agent is unaffected."""
    secrets = make_agents_file(str(tmp_path / "agents.json"), "a1", "a2")
    hub = rephub.Hub(str(tmp_path / "hub"), str(tmp_path / "agents.json"), heartbeat=0.2)
    hub.start()
    try:
        with FaultProxy(hub.address) as proxy:
            stalled = TestAgent(proxy.address, "a1", secrets["a1"]).connect()
            direct = TestAgent(hub.address, "a2", secrets["a2"]).connect()
            try:
                stalled.attach("s1", MemVolume(1 * MiB))
                vid, _ = direct.attach("d1", MemVolume(1 * MiB))
                wait_until(lambda: len(hub.status()["agents"]) == 2, 10, "both connected")
                proxy.stall()
                start = time.monotonic()
                wait_until(lambda: [c["agent_id"] for c in hub.status()["agents"]]
                           == ["a2"], 10, "the stalled connection closed")
                took = time.monotonic() - start
                assert took < 0.2 * (rephub.PEER_SILENCE_INTERVALS + 3), took
                direct.expect_ack(direct.write(vid, 0, b"x" * 4096))
            finally:
                proxy.resume()
                stalled.close()
                direct.close()
    finally:
        hub.shutdown()


def test_online_verify_in_process_reports_differences_and_refuses_without_an_agent(tmp_path):
    """The control command against an in-process hub and a test agent: a
    difference in the agent's copy is reported, not repaired, then repaired on
    request; with the agent gone verify says why it cannot run."""
    secrets = make_agents_file(str(tmp_path / "agents.json"), "a1")
    hub = rephub.Hub(str(tmp_path / "hub"), str(tmp_path / "agents.json"))
    hub.start()
    try:
        agent = TestAgent(hub.address, "a1", secrets["a1"]).connect()
        vol = MemVolume(2 * MiB, bytes(range(256)) * (2 * MiB // 256))
        vid, _ = agent.attach("v", vol)
        wait_until(lambda: hub.store.volume("v").state == rephub.VolState.CONSISTENT
                   and hub.store.volume("v").sync is None, 20, "first sync")
        ask = lambda repair: rephub.control_request(  # noqa: E731
            str(tmp_path / "hub"), {"cmd": "verify", "volume": "v", "repair": repair},
            timeout=10)
        assert ask(False)["differing"] == []
        with vol.lock:   # the agent's copy changes behind the stream's back
            vol.buf[MiB + 5] ^= 0xFF
        res = ask(False)
        assert res["differing"] == [dict(offset=MiB, length=65536)] and not res["repaired"]
        res = ask(True)
        assert res["repaired"] and res["bytes_fetched"] == 65536
        assert ask(False)["differing"] == []
        agent.close()
        wait_until(lambda: not hub.store.volume("v").attached_to, 10, "detached")
        with pytest.raises(rephub.CommandError, match="BUSY: volume 'v' is not attached"):
            ask(False)
        with pytest.raises(rephub.CommandError, match="NO_SUCH_VOLUME"):
            rephub.control_request(str(tmp_path / "hub"), {"cmd": "verify", "volume": "w"})
    finally:
        hub.shutdown(grace=5)
