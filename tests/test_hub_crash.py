"""rephub as a subprocess: SIGKILL mid-stream and restart, torn journal tail, SIGTERM.

The promise under test: an ACK means durable.  Whatever the hub was doing
when it died, every write it ACKed is in the replica after a restart, and a
record cut short by the crash is detected by its CRC and never applied.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import protocol as p
import rephub
from hubtools import REPHUB, MemVolume, TestAgent, make_agents_file, wait_until
from procs import HubProc
from smallfs import tmpfs

MiB = 1024 * 1024
PIECE = 65536


@pytest.fixture
def env(tmp_path):
    agents = str(tmp_path / "agents")
    sec = make_agents_file(agents, "a1")
    procs = []

    def start(name="hub", args=(), data=tmp_path / "data"):
        """A hub on the one data directory, logging to ``name``.log."""
        hp = HubProc(tmp_path, data=data, agents=agents, args=args,
                     log=tmp_path / f"{name}.log").start()
        procs.append(hp)
        return hp
    try:
        yield tmp_path, sec, start
    finally:
        for hp in procs:
            hp.kill()


def status(data_dir):
    out = subprocess.run([sys.executable, REPHUB, "status", "--data", data_dir, "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def acked_requests(agent: TestAgent) -> set[int]:
    with agent.reply_cond:
        return {req for req, msg in agent.replies.items() if isinstance(msg, p.Ack)}


def test_sigkill_mid_stream_then_restart_keeps_every_acked_write(env):
    tmp_path, sec, start = env
    data_dir = str(tmp_path / "data")
    hub = start("hub1")
    agent = TestAgent(hub.address, "a1", sec["a1"]).connect()
    mv = MemVolume(16 * MiB)
    vid, plan = agent.attach("k", mv)
    wait_until(lambda: status(data_dir)["volumes"][0]["state"] == "consistent", 20)
    rnd = random.Random(7)
    written = {}
    for i in range(200):  # pipelined: nothing waits for an ACK
        data = rnd.randbytes(PIECE)
        written[agent.write(vid, i * PIECE, data)] = (i * PIECE, data)
        if i == 120:
            wait_until(lambda: len(acked_requests(agent)) >= 20, 20, "some ACKs")
            hub.kill(signal.SIGKILL)
            break
    wait_until(agent.closed.is_set, 10, "connection dropped by the killed hub")
    acked = acked_requests(agent)
    agent.close()
    assert len(acked) >= 20

    # A crash in the middle of an append: a whole header, part of the payload.
    seg_dir = os.path.join(data_dir, "journal")
    last_seg = sorted(os.listdir(seg_dir))[-1]
    path = os.path.join(seg_dir, last_seg)
    records = rephub.SegmentLog(seg_dir, "scan")._scan(int(last_seg[:-4]), last=True)
    payload = b"\xee" * PIECE
    header = rephub.encode_record(rephub.RecordKind.WRITE, 0, records[-1].seq + 1,
                                  time.time_ns(), vid, 15 * MiB, PIECE, PIECE,
                                  rephub.zlib.crc32(payload))
    with open(path, "ab") as f:
        f.write(header + payload[:rnd.randrange(1, PIECE)])

    hub2 = start("hub2")
    st = wait_until(lambda: (lambda s: s if s["journal"]["applied_seq"] ==
                             s["journal"]["last_seq"] else None)(status(data_dir)), 20)
    log_text = hub2.read_log()
    assert "WARNING" in log_text and "torn tail in" in log_text
    assert st["journal"]["last_seq"] == records[-1].seq
    with open(os.path.join(data_dir, "volumes", "k", "replica"), "rb") as f:
        replica = f.read()
    for req in acked:
        off, data = written[req]
        assert replica[off:off + PIECE] == data, f"ACKed write req={req} off={off} lost"
    assert replica[15 * MiB:15 * MiB + PIECE] == bytes(PIECE)  # torn record never applied
    # The volume is still consistent and the agent can carry on after the restart.
    agent = TestAgent(hub2.address, "a1", sec["a1"]).connect()
    try:
        vid, plan = agent.attach("k", mv, state=p.VolumeState.UNKNOWN)
        assert plan == p.SyncPlan.VERIFY
    finally:
        agent.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_while_segments_are_written_over_keeps_every_acked_write(env, seed):
    """Retention drops segments and the journal writes its new ones over them.
    A SIGKILL at a random point still loses no ACKed write, and no record of a
    file's earlier use comes back: every slot of the replica holds its last
    ACKed write or one sent after it.  The slots differ in size, so segments
    end at different bytes than their earlier use did.

    Where the kill lands is the machine's timing: a round whose kill left no
    segment ending before its earlier use did is checked all the same, and
    another round runs on a new data directory, at most three."""
    tmp_path, sec, start = env
    with tmpfs(tmp_path / "fs", 64 * MiB) as fs:   # its free space is the test's own
        for attempt in range(3):
            data = fs / f"data{attempt}"
            if written_over_then_killed(tmp_path / f"round{attempt}", sec, start, data,
                                        seed * 10 + attempt):
                break
            shutil.rmtree(data)
        else:
            pytest.fail("in 3 rounds no kill left a segment ending before its earlier use did")


def written_over_then_killed(tmp_path, sec, start, data_path, seed) -> bool:
    """One round: writes until segments are written over, a SIGKILL, the
    checks after a restart.  True if the kill left a segment ending before
    its earlier use did (bytes of that use after its last record)."""
    tmp_path.mkdir()
    data_dir = str(data_path)
    small = ["--journal-segment-bytes", str(4 * (PIECE + 64)),
             "--journal-max-bytes", str(12 * (PIECE + 64))]
    hub = start(f"{tmp_path.name}-hub1", small, data_path)
    agent = TestAgent(hub.address, "a1", sec["a1"]).connect()
    rnd = random.Random(seed)
    sizes = [rnd.randrange(1, 17) * 4096 for _ in range(16)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    mv = MemVolume(16 * PIECE)
    vid, plan = agent.attach("k", mv)
    wait_until(lambda: status(data_dir)["volumes"][0]["state"] == "consistent", 20)
    sent: dict[int, list[tuple[int, bytes]]] = {s: [] for s in range(len(sizes))}

    def burst(n):
        for _ in range(n):
            slot = rnd.randrange(len(sizes))
            data = rnd.randbytes(sizes[slot])
            sent[slot].append((agent.write(vid, starts[slot], data), data))

    deadline = time.monotonic() + 30
    while status(data_dir)["journal"]["recycled_segments"] < 3:
        assert time.monotonic() < deadline, "no segment was written over"
        burst(24)
        last = max(req for hist in sent.values() for req, _ in hist)
        wait_until(lambda: last in acked_requests(agent), 20, "the burst's ACKs")
    burst(rnd.randrange(1, 40))          # pipelined: the kill lands among these
    hub.kill(signal.SIGKILL)
    wait_until(agent.closed.is_set, 10, "connection dropped by the killed hub")
    acked = acked_requests(agent)
    agent.close()
    copy = tmp_path / "journal-at-the-kill"
    shutil.copytree(os.path.join(data_dir, "journal"), copy)
    scan = rephub.SegmentLog(str(copy), "scan", spare_bytes=rephub.SPARE_BYTES)
    scan.open()
    scan.close()
    stale_tail = any(os.path.getsize(scan.path(seg)) > size
                     for seg, size in scan.segment_sizes.items())

    hub2 = start(f"{tmp_path.name}-hub2", small, data_path)
    st = wait_until(lambda: (lambda s: s if s["journal"]["applied_seq"] ==
                             s["journal"]["last_seq"] else None)(status(data_dir)), 20)
    assert st["journal"]["damage"] == [] and st["journal"]["lost_seqs"] == []
    assert "seq jumps" not in hub2.read_log()
    with open(os.path.join(data_dir, "volumes", "k", "replica"), "rb") as f:
        replica = f.read()
    for slot, hist in sent.items():
        last_acked = max((i for i, (req, _) in enumerate(hist) if req in acked), default=None)
        allowed = [bytes(sizes[slot])] if last_acked is None else []
        allowed += [data for _, data in hist[last_acked or 0:]]
        assert replica[starts[slot]:starts[slot] + sizes[slot]] in allowed, \
            f"slot {slot}: not its last ACKed write nor a later one"
    hub2.kill()   # before its file system is unmounted
    return stale_tail


def test_sigterm_finishes_frames_makes_durable_and_exits_zero(env):
    tmp_path, sec, start = env
    data_dir = str(tmp_path / "data")
    hub = start("hub1")
    agent = TestAgent(hub.address, "a1", sec["a1"]).connect()
    mv = MemVolume(8 * MiB)
    vid, _ = agent.attach("t", mv)
    wait_until(lambda: status(data_dir)["volumes"][0]["state"] == "consistent", 20)
    written = {agent.write(vid, i * PIECE, os.urandom(PIECE)): i * PIECE for i in range(64)}
    wait_until(lambda: len(acked_requests(agent)) >= 10, 20, "some ACKs")
    hub.proc.send_signal(signal.SIGTERM)
    assert hub.proc.wait(timeout=30) == 0
    wait_until(agent.closed.is_set, 10, "connection closed")
    assert agent.goodbye == "hub shutting down"
    acked = acked_requests(agent)
    agent.close()
    log_text = hub.read_log()
    assert "hub stopped" in log_text
    # Clean stop: the replicas hold everything; nothing is torn.
    applied = json.load(open(os.path.join(data_dir, "applied.json")))["applied_seq"]
    with open(os.path.join(data_dir, "volumes", "t", "replica"), "rb") as f:
        replica = f.read()
    for req in acked:
        off = written[req]
        assert replica[off:off + PIECE] == bytes(mv.buf[off:off + PIECE])
    hub2 = start("hub2")
    st = status(data_dir)
    assert st["journal"]["applied_seq"] == applied == st["journal"]["last_seq"]
    assert "torn" not in hub2.read_log()


def test_second_signal_exits_at_once_without_corrupting(env):
    tmp_path, sec, start = env
    data_dir = str(tmp_path / "data")
    hub = start("hub1")
    agent = TestAgent(hub.address, "a1", sec["a1"]).connect()
    vid, _ = agent.attach("s", MemVolume(MiB))
    agent.expect_ack(agent.write(vid, 0, b"kept" * 1024))
    # A frame that never ends holds the first, graceful stop.
    header = p.encode_header(p.MsgType.WRITE, 0, 999, vid, PIECE, 0, PIECE, 0)
    agent.send_raw(bytes(header) + b"\x00" * 100)
    hub.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "hub stopping" in hub.read_log(), 10, "graceful stop begun")
    t0 = time.monotonic()
    hub.proc.send_signal(signal.SIGINT)
    assert hub.proc.wait(timeout=10) == 128 + signal.SIGINT
    assert time.monotonic() - t0 < 5
    agent.close()
    hub2 = start("hub2")
    st = status(data_dir)
    assert st["volumes"][0]["name"] == "s"
    wait_until(lambda: status(data_dir)["journal"]["applied_seq"] ==
               status(data_dir)["journal"]["last_seq"], 10)
    with open(os.path.join(data_dir, "volumes", "s", "replica"), "rb") as f:
        assert f.read(4096) == b"kept" * 1024
    assert hub2.proc.poll() is None


def test_sigkill_mid_first_sync_redoes_it_in_full(env):
    """A crash in the middle of the first full sync leaves the volume
    inconsistent; its next sync is FULL again and rewrites every byte, so
    nothing of the first try survives where the disk has changed since."""
    tmp_path, sec, start = env
    data_dir = str(tmp_path / "data")
    hub = start("hub1")
    mv = MemVolume(32 * MiB, os.urandom(32 * MiB))
    agent = TestAgent(hub.address, "a1", sec["a1"]).connect()
    held = threading.Event()
    agent.before_read_reply = lambda read: len(agent.reads) == 12 and held.wait(30)
    try:
        vid, plan = agent.attach("f", mv)
        assert plan == p.SyncPlan.FULL
        # 11 replies sent, the 12th held back: kill the hub once they are durable.
        wait_until(lambda: status(data_dir)["journal"]["durable_seq"] >= 11, 20,
                   "the first replies durable")
        hub.kill(signal.SIGKILL)
    finally:
        held.set()
    wait_until(agent.closed.is_set, 20, "connection dropped by the killed hub")
    agent.close()
    replica = os.path.join(data_dir, "volumes", "f", "replica")
    for off in range(0, 32 * MiB, 4 * MiB):      # the disk changes while the hub is down
        mv.write(off + 4096, b"\xc3" * 8192)
    hub2 = start("hub2")
    assert status(data_dir)["volumes"][0]["state"] == "inconsistent"
    with TestAgent(hub2.address, "a1", sec["a1"]).connect() as agent:
        vid, plan = agent.attach("f", mv)
        assert plan == p.SyncPlan.FULL
        wait_until(lambda: (lambda v: v["state"] == "consistent" and v["lag_bytes"] == 0)(
            status(data_dir)["volumes"][0]), 30, "the second FULL sync")
    with open(replica, "rb") as f:
        assert f.read() == bytes(mv.buf)
