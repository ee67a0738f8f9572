"""rephub: handshake, journaled writes, group commit, sync plans, bad input, status.

Every test runs a real hub (in-process, or ``rephub.py serve`` as a
subprocess) on 127.0.0.1:0 with a data directory in tmp_path, and talks to it
with ``hubtools.TestAgent``.
"""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import zlib

import pytest

import protocol as p
import rephub
from hubtools import (REPHUB, AgentError, CountingSocket, MemVolume, TestAgent, make_agents_file,
                      send_wrong_answers, wait_detached, wait_until)
from procs import HubProc

MiB = 1024 * 1024


@pytest.fixture
def hubenv(hub_factory):
    """An in-process hub with agents a1 and a2: (hub, {agent: secret})."""
    hub = hub_factory("a1", "a2", heartbeat=0.2)
    return hub, hub.secrets


def connect(hub, secrets_by_id, agent="a1") -> TestAgent:
    return TestAgent(hub.address, agent, secrets_by_id[agent]).connect()


def replica_bytes(hub, name: str) -> bytes:
    hub.store.applier.wait_applied(hub.store.journal.durable_seq)
    with open(os.path.join(hub.store.dir, "volumes", name, "replica"), "rb") as f:
        return f.read()


def attach_synced(agent: TestAgent, hub, name: str, vol: MemVolume, **kw) -> int:
    vid, plan = agent.attach(name, vol, **kw)
    wait_until(lambda: hub.store.volume(name).state == rephub.VolState.CONSISTENT
               and hub.store.volume(name).sync is None, 20, f"{name} consistent")
    return vid


# -- handshake ---------------------------------------------------------------------


def test_handshake_good_secret_gets_auth_ok(hubenv):
    hub, sec = hubenv
    with connect(hub, sec) as agent:
        assert agent.hub_id == hub.store.hub_id
        req = agent.request_id()
        agent.send(p.Ping(request_id=req, sent_ns=123))
        pong = agent.wait_reply(req)
        assert isinstance(pong, p.Pong) and pong.echo_ns == 123


@pytest.mark.parametrize("agent_id,secret", [("a1", bytes(32)), ("nobody", bytes(32))])
def test_wrong_secret_and_unknown_agent_both_fail_auth(hubenv, agent_id, secret):
    hub, _ = hubenv
    agent = TestAgent(hub.address, agent_id, secret)
    with pytest.raises(AgentError) as info:
        agent.connect()
    # The hub proof is made from a secret the agent does not have: the agent
    # refuses it first, and the hub never says whether the id exists.
    assert "hub proof does not match" in str(info.value)
    agent.close()


def test_hub_refuses_bad_agent_proof_and_replayed_auth(hubenv):
    hub, sec = hubenv
    # A normal handshake, recording what went over the wire.
    sock = socket.create_connection(hub.address)
    nonce = os.urandom(32)
    p.send_message(sock, p.Hello(nonce=nonce, agent_id="a1"))
    reply = p.recv_message(sock)
    auth = p.Auth(proof=p.agent_proof(sec["a1"], nonce, reply.nonce, "a1", reply.hub_id))
    p.send_message(sock, auth)
    assert isinstance(p.recv_message(sock), p.AuthOk)
    sock.close()
    # Replay HELLO and AUTH on a new connection: the hub's fresh nonce defeats it.
    sock = socket.create_connection(hub.address)
    p.send_message(sock, p.Hello(nonce=nonce, agent_id="a1"))
    reply2 = p.recv_message(sock)
    assert reply2.nonce != reply.nonce
    p.send_message(sock, auth)
    err = p.recv_message(sock)
    assert isinstance(err, p.Error) and err.code == p.ErrorCode.AUTH_FAILED
    assert p.recv_message(sock) is None  # closed
    sock.close()


def test_frames_before_auth_ok_are_refused_and_closed(hubenv):
    hub, _ = hubenv
    sock = socket.create_connection(hub.address)
    p.send_message(sock, p.Write(request_id=5, volume=1, offset=0, data=b"x" * 512))
    err = p.recv_message(sock)
    assert isinstance(err, p.Error) and err.code == p.ErrorCode.BAD_PHASE
    assert err.request_id == 5
    assert p.recv_message(sock) is None
    sock.close()


def test_no_common_version_is_refused(hubenv):
    hub, _ = hubenv
    sock = socket.create_connection(hub.address)
    p.send_message(sock, p.Hello(min_version=2, max_version=3, nonce=os.urandom(32),
                                 agent_id="a1"))
    err = p.recv_message(sock)
    assert isinstance(err, p.Error) and err.code == p.ErrorCode.VERSION
    sock.close()


# -- writes, durability, group commit ---------------------------------------------------


def test_pipelined_writes_from_several_agents_and_volumes_group_commit(hubenv, monkeypatch):
    hub, sec = hubenv
    real_fdatasync = os.fdatasync

    def disk_like_fdatasync(fd):  # a flush that takes as long as a real disk's
        real_fdatasync(fd)
        rephub.time.sleep(0.004)
    monkeypatch.setattr(os, "fdatasync", disk_like_fdatasync)
    agents = [connect(hub, sec, a) for a in ("a1", "a2")]
    vols = {}
    for agent in agents:
        for k in range(2):
            name = f"{agent.agent_id}-disk{k}"
            mv = MemVolume(4 * MiB)
            vid = attach_synced(agent, hub, name, mv)
            vols[name] = (agent, vid, mv)
    syncs_before = hub.store.journal.fdatasyncs
    n_writes = 150
    errors = []

    def writer(agent, vid, seed):
        rnd = random.Random(seed)
        try:
            reqs = []
            for _ in range(n_writes):
                off = rnd.randrange(0, 4 * MiB - 65536, 512)
                reqs.append(agent.write(vid, off, rnd.randbytes(rnd.choice([512, 4096, 65536]))))
            for req in reqs:
                agent.expect_ack(req)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(a, vid, i))
               for i, (a, vid, _) in enumerate(vols.values())]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    total = n_writes * len(vols)
    syncs = hub.store.journal.fdatasyncs - syncs_before
    assert syncs * 5 < total, f"{syncs} fdatasyncs for {total} writes: no group commit"
    for name, (_, _, mv) in vols.items():
        assert replica_bytes(hub, name) == bytes(mv.buf), name
    for agent in agents:
        agent.close()


def test_the_acks_one_commit_makes_durable_leave_in_one_send(hubenv, monkeypatch):
    """Writes appended while a commit's fdatasync runs are made durable by the
    next one, and their ACKs go out together (one ``send_many``), in order."""
    hub, sec = hubenv
    journal_log = hub.store.journal.log
    syncing, release = threading.Event(), threading.Event()
    real_do_sync = rephub.SegmentLog.do_sync

    def held_do_sync(self, work):
        if self is journal_log:
            syncing.set()
            release.wait(20)
        real_do_sync(self, work)
    sends = []
    real_send_many = rephub.AgentConnection.send_many

    def send_many(self, msgs):
        sends.append([m.request_id for m in msgs])
        real_send_many(self, msgs)
    with connect(hub, sec) as agent:
        vid = attach_synced(agent, hub, "v", MemVolume(MiB))
        monkeypatch.setattr(rephub.SegmentLog, "do_sync", held_do_sync)
        monkeypatch.setattr(rephub.AgentConnection, "send_many", send_many)
        held = agent.write(vid, 0, b"h" * 4096)
        assert syncing.wait(10), "the commit of the first write did not start"
        last = hub.store.journal.last_seq
        reqs = [agent.write(vid, i * 4096, bytes([i]) * 4096) for i in range(1, 9)]
        wait_until(lambda: hub.store.journal.last_seq == last + 8, 10, "8 writes journaled")
        release.set()
        for req in [held, *reqs]:
            agent.expect_ack(req)
    acks = [r for batch in sends for r in batch]
    assert acks[acks.index(held):] == [held, *reqs]
    # The commit held may have been an earlier record's, and the first write's
    # may then join the next: the 8 journaled behind it leave together.
    assert any(set(reqs) <= set(batch) for batch in sends), sends


def test_zero_and_flush_and_checkpoint_are_acked(hubenv):
    hub, sec = hubenv
    with connect(hub, sec) as agent:
        mv = MemVolume(1 * MiB)
        vid = attach_synced(agent, hub, "z", mv)
        agent.expect_ack(agent.write(vid, 0, b"\xff" * 65536))
        agent.expect_ack(agent.zero(vid, 4096, 8192))
        agent.expect_ack(agent.checkpoint("cp-1"))
        agent.flush()
        assert replica_bytes(hub, "z") == bytes(mv.buf)
        assert [c[3] for c in hub.store.journal.checkpoints] == ["cp-1"]


def test_ownership_and_name_validation(hubenv):
    hub, sec = hubenv
    a1, a2 = connect(hub, sec, "a1"), connect(hub, sec, "a2")
    try:
        attach_synced(a1, hub, "owned", MemVolume(MiB))
        with pytest.raises(AgentError) as info:
            a2.attach("owned", MemVolume(MiB))
        assert info.value.error.code == p.ErrorCode.NOT_OWNER
        a3 = connect(hub, sec, "a1")    # a1's own connection has it attached (VO-9)
        try:
            with pytest.raises(AgentError) as info:
                a3.attach("owned", MemVolume(2 * MiB))
            assert info.value.error.code == p.ErrorCode.INVALID
        finally:
            a3.close()
        for bad in ("../etc", "a/b", ".hidden", "-dash", "..", "nul\0"):
            with pytest.raises(AgentError) as info:
                a1.attach(bad, MemVolume(MiB))
            assert info.value.error.code == p.ErrorCode.BAD_NAME, bad
        assert sorted(os.listdir(os.path.join(hub.store.dir, "volumes"))) == ["owned"]
        # a2 cannot write into a1's volume id either: it is not attached there.
        vid = hub.store.volume("owned").id
        req = a2.write(vid, 0, b"evil" * 128)
        assert a2.wait_reply(req).code == p.ErrorCode.NO_SUCH_VOLUME
    finally:
        a1.close()
        a2.close()


def test_bad_input_is_answered_while_another_connection_carries_on(hubenv):
    hub, sec = hubenv
    good = connect(hub, sec, "a2")
    mv = MemVolume(MiB)
    gvid = attach_synced(good, hub, "good", mv)
    stop = threading.Event()
    acked = []

    def keep_writing():
        i = 0
        while not stop.is_set() and i < 2000:
            req = good.write(gvid, (i % 16) * 65536, os.urandom(4096))
            good.expect_ack(req)
            acked.append(req)
            i += 1
    t = threading.Thread(target=keep_writing)
    t.start()
    try:
        bad = connect(hub, sec, "a1")
        bvid = attach_synced(bad, hub, "bad", MemVolume(MiB))
        # offset past the end: ERROR(OUT_OF_RANGE), the connection goes on
        req = bad.write(bvid, MiB - 100, b"x" * 512)
        assert bad.wait_reply(req).code == p.ErrorCode.OUT_OF_RANGE
        # unknown volume id
        req = bad.write(9999, 0, b"x" * 512)
        assert bad.wait_reply(req).code == p.ErrorCode.NO_SUCH_VOLUME
        # unknown message type: UNSUPPORTED, goes on
        frame = bytearray(p.encode(p.Flush(request_id=77)))
        frame[5] = 0x7E
        frame[44:48] = (rephub.zlib.crc32(frame[:44])).to_bytes(4, "big")
        bad.send_raw(bytes(frame))
        assert bad.wait_reply(77).code == p.ErrorCode.UNSUPPORTED
        bad.expect_ack(bad.write(bvid, 0, b"still fine" * 50))
        # bad payload CRC: ERROR(PROTOCOL) and the connection is closed
        frame = bytearray(p.encode(p.Write(request_id=90, volume=bvid, offset=0, data=b"y" * 512)))
        frame[-1] ^= 1
        bad.send_raw(bytes(frame))
        wait_until(bad.closed.is_set, 10, "bad connection closed")
        assert any(e.code == p.ErrorCode.PROTOCOL for e in bad.errors)
        bad.close()
        # oversize payload length in the header: closed before anything is allocated
        bad = connect(hub, sec, "a1")
        header = p.encode_header(p.MsgType.WRITE, 0, 91, bvid, p.MAX_PAYLOAD + 1, 0,
                                 p.MAX_PAYLOAD + 1, 0)
        bad.send_raw(bytes(header))
        wait_until(bad.closed.is_set, 10, "oversize connection closed")
        assert any("MAX_PAYLOAD" in e.message for e in bad.errors)
        bad.close()
        n = len(acked)
        wait_until(lambda: len(acked) > n + 5, 10, "good connection still acked")
    finally:
        stop.set()
        t.join(timeout=30)
        good.close()
    assert replica_bytes(hub, "good") == bytes(mv.buf)


@pytest.mark.parametrize("how", ["write", "sync"])
def test_the_replica_takes_its_sums_of_whole_chunks_from_the_data_received(hubenv, monkeypatch,
                                                                          how):
    """The hub sums the 64 KiB chunks a WRITE or a sync's READ_REPLY covers
    wholly as it checks the payload's CRC; once the applier has copied the data
    into the replica it keeps those sums, and reads back only the chunks the
    data covers in part.  The sums equal the replica's, and none is left over."""
    hub, sec = hubenv
    chunk = rephub.CHECK_CHUNK
    size = 32 * chunk + 4096                      # a short last chunk
    data = random.Random(7).randbytes(16 * chunk)
    start = 3 * chunk + 4096                      # chunks 3 and 19 in part, 4..18 wholly
    vol = MemVolume(size)
    if how == "sync":
        vol.write(start, data)
        vol.write(size - 4096, data[:4096])
    reads = []                                    # chunks the hub read from the replica
    real_pread = os.pread

    def pread(fd, n, offset):
        replica = hub.store.volume("v")
        if replica is not None and fd == replica.fd:
            reads.append(offset // chunk)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    with connect(hub, sec) as agent:
        vid = attach_synced(agent, hub, "v", vol)
        if how == "write":
            agent.expect_ack(agent.write(vid, start, data))
            agent.expect_ack(agent.write(vid, size - 4096, data[:4096]))
        image = replica_bytes(hub, "v")
    monkeypatch.undo()
    assert image == bytes(vol.buf)
    assert sorted(set(reads)) == ([3, 19, 32] if how == "write" else [32])
    sums = hub.store.volume("v").sums
    assert sums.expected(0, sums.chunks) == [
        rephub.ReplicaSums.kept(zlib.crc32(image[c:c + chunk])) for c in range(0, size, chunk)]
    assert hub.store.journal.data_sums == {}


@pytest.mark.parametrize("pieces", ["whole", "trickle", "random"])
def test_the_recv_loop_reads_frames_of_every_size_through_its_buffer(pieces):
    """After the handshake the hub reads its socket RECV_BUFFER at a time: the
    frames come out whole and in order however the bytes arrive, payloads
    around the buffer's size included; a burst of small frames takes few
    recvs; a connection that ends inside a payload is a TruncatedFrame."""
    big = p.RECV_BUFFER
    sizes = [0, 1, 4096, big - p.HEADER_SIZE, big - 1, big, big + 1, 3 * big + 7, 4096, 0]
    rng = random.Random(11)
    msgs = [p.Write(request_id=i + 1, volume=1, offset=i * 8 * big, data=rng.randbytes(n))
            if n else p.Flush(request_id=i + 1) for i, n in enumerate(sizes)]
    wire = b"".join(p.encode(m) for m in msgs)
    a, b = socket.socketpair()
    reader = CountingSocket(b)
    conn = rephub.AgentSocket(reader, "test", 10.0, lambda: False, True)
    legal = p.legality(p.Side.HUB, 0)

    def send():
        if pieces == "whole":
            a.sendall(wire)
        else:
            pos = 0
            while pos < len(wire):
                n = 1 if pieces == "trickle" and pos < 3 * big else rng.randrange(1, 2 * big)
                a.sendall(wire[pos:pos + n])
                pos += n
        a.sendall(p.encode(p.Write(request_id=99, volume=1, offset=0, data=bytes(100)))[:-10])
        a.shutdown(socket.SHUT_WR)
    sender = threading.Thread(target=send)
    sender.start()
    try:
        for want in msgs:
            header, got, _ = conn.recv_frame(None, legal)
            assert (got.TYPE, got.request_id) == (want.TYPE, want.request_id)
            assert bytes(getattr(got, "data", b"")) == bytes(getattr(want, "data", b""))
        with pytest.raises(p.TruncatedFrame, match="inside a payload"):
            conn.recv_frame(None, legal)
    finally:
        sender.join(30)
        a.close()
        b.close()


def test_a_burst_of_small_frames_takes_one_recv():
    """40 WRITEs of 1 KiB already in the socket: the recv loop takes them in
    one recv (they fit RECV_BUFFER), not two per frame, and waits for none."""
    msgs = [p.Write(request_id=i + 1, volume=1, offset=i * 1024, data=bytes([i]) * 1024)
            for i in range(40)]
    wire = b"".join(p.encode(m) for m in msgs)
    assert len(wire) < p.RECV_BUFFER
    a, b = socket.socketpair()
    try:
        a.sendall(wire)
        reader = CountingSocket(b)
        conn = rephub.AgentSocket(reader, "test", 10.0, lambda: False, True)
        got = [conn.recv_frame(None, p.legality(p.Side.HUB, 0))[1] for _ in msgs]
        assert [(m.request_id, bytes(m.data)) for m in got] == [
            (m.request_id, m.data) for m in msgs]
        assert reader.calls == 1
    finally:
        a.close()
        b.close()


# -- sync plans ---------------------------------------------------------------------------


def patterned_volume(size: int, seed: int, fill: float = 0.5) -> MemVolume:
    """A volume where about ``fill`` of the 64 KiB chunks hold data, the rest zero."""
    rnd = random.Random(seed)
    mv = MemVolume(size)
    for off in range(0, size, 65536):
        if rnd.random() < fill:
            mv.write(off, rnd.randbytes(65536))
    return mv


def test_full_sync_with_writes_to_the_regions_being_read(hubenv):
    hub, sec = hubenv
    size = 24 * MiB
    mv = patterned_volume(size, 1)
    agent = connect(hub, sec)
    rnd = random.Random(2)
    pending = []

    # Race a write against every READ: sometimes it lands before the read takes
    # its data (the reply has it), sometimes after (it follows the reply).
    def inject(read):
        off = read.offset + rnd.randrange(0, read.length - 4096, 512)
        data = rnd.randbytes(4096)
        if rnd.random() < 0.5:
            pending.append(agent.write(read.volume, off, data))
        else:
            threading.Thread(target=lambda: pending.append(
                agent.write(read.volume, off, data))).start()
    agent.before_read_reply = inject
    try:
        vid, plan = agent.attach("full", mv)
        assert plan == p.SyncPlan.FULL
        assert hub.store.volume("full").state == rephub.VolState.INCONSISTENT
        wait_until(lambda: hub.store.volume("full").state == rephub.VolState.CONSISTENT, 30)
        agent.before_read_reply = None
        wait_until(lambda: len(pending) >= len(agent.reads), 10, "injected writes sent")
        for req in list(pending):
            agent.expect_ack(req)
        assert len(agent.reads) == size // MiB
        # The last SYNCEDs may still be on their way when the volume turns consistent.
        wait_until(lambda: {s.request_id for s in agent.synced}
                   == {r.request_id for r in agent.reads}, 10, "a SYNCED for every READ")
        assert replica_bytes(hub, "full") == bytes(mv.buf)
        assert hub.store.volume("full").meta["full_synced"] is True
    finally:
        agent.close()


def test_full_sync_keeps_reading_while_the_journal_is_not_yet_durable(hubenv):
    """A READ leaves the sync window when its reply arrives, not when it is
    durable: a slow group commit does not stall the stream.  The replies are
    SYNCED only once durable, and the volume turns consistent only then."""
    hub, sec = hubenv
    window = rephub.SYNC_WINDOW * rephub.SYNC_PIECE
    mv = MemVolume(2 * window, os.urandom(2 * window))
    log = hub.store.journal.log
    do_sync, release = log.do_sync, threading.Event()

    def slow_sync(work):
        release.wait(30)
        do_sync(work)
    log.do_sync = slow_sync
    agent = connect(hub, sec)
    try:
        agent.attach("slow", mv)
        # More than a window's worth of READs answered while nothing is durable.
        wait_until(lambda: len(agent.reads) * rephub.SYNC_PIECE > window, 20,
                   "READs beyond one window before the first fdatasync")
        assert agent.synced == []
        assert hub.store.volume("slow").state == rephub.VolState.INCONSISTENT
        release.set()
        wait_until(lambda: hub.store.volume("slow").state == rephub.VolState.CONSISTENT, 30)
        assert len(agent.reads) == len(mv.buf) // rephub.SYNC_PIECE
        wait_until(lambda: len(agent.synced) == len(agent.reads), 10, "a SYNCED for every READ")
        assert replica_bytes(hub, "slow") == bytes(mv.buf)
    finally:
        release.set()
        agent.close()


def test_full_sync_sends_its_reads_a_batch_at_a_time(hubenv, monkeypatch):
    """The job thread waits until SYNC_BATCH more READs fit its window, then
    sends that many in one send: one answer short of a batch sends nothing,
    and the answers and SYNCEDs that leave it short do not wake the thread
    (with POLL_INTERVAL at a minute, a wake-up it needed and missed would
    stall the sync past the test's deadlines)."""
    hub, sec = hubenv
    batch, window = rephub.SYNC_BATCH, rephub.SYNC_WINDOW
    mv = MemVolume(2 * window * rephub.SYNC_PIECE, os.urandom(2 * window * rephub.SYNC_PIECE))
    sent: list[int] = []
    ask_many = rephub.RequestWindow.ask_many

    def counted(self, requests):
        sent.append(len(requests))
        ask_many(self, requests)
    monkeypatch.setattr(rephub.RequestWindow, "ask_many", counted)
    monkeypatch.setattr(rephub, "POLL_INTERVAL", 60.0)
    agent = connect(hub, sec)
    held: list[p.Read] = []
    answer = agent.on_READ
    agent.on_READ = held.append
    try:
        agent.attach("batched", mv)
        wait_until(lambda: len(held) == window, 20, "a window of READs")
        job = hub.store.volume("batched").sync
        wait_until(lambda: job.waiting is not None, 20, "the job waiting for room")
        assert sent == [batch] * (window // batch)
        woken = []
        notify_all = job.cond.notify_all
        job.cond.notify_all = lambda: (woken.append(1), notify_all())
        for read in held[:batch - 1]:
            answer(read)
        wait_until(lambda: len(job.reads.asked) == window - batch + 1, 20, "the answers taken")
        wait_until(lambda: len(job.unsynced) == window - batch + 1, 20, "their SYNCEDs")
        assert job.waiting is not None and len(held) == window, "no READ before a batch fits"
        assert woken == [], "the answers short of a batch woke the job thread"
        answer(held[batch - 1])
        wait_until(lambda: len(held) == window + batch, 20, "the next batch")
        assert woken
        assert sent == [batch] * (window // batch + 1)
        agent.on_READ = answer
        for read in held[batch:]:
            answer(read)
        wait_until(lambda: hub.store.volume("batched").state == rephub.VolState.CONSISTENT, 20,
                   "consistent")
        assert sorted(r.offset for r in agent.reads) == list(
            range(0, len(mv.buf), rephub.SYNC_PIECE)), "each piece READ once"
        assert sum(sent) == 2 * window and set(sent) == {batch}
        monkeypatch.undo()
        assert replica_bytes(hub, "batched") == bytes(mv.buf)
    finally:
        monkeypatch.undo()
        agent.close()


def test_a_request_id_still_outstanding_closes_the_connection(hubenv):
    """RP-12: while the journal holds WRITE 7 un-durable, a second request 7
    is a protocol error: the hub closes without an ACK for either id 7, so the
    agent keeps both writes marked.  Once 7 is ACKed the id is free again."""
    hub, sec = hubenv
    log = hub.store.journal.log
    do_sync, release = log.do_sync, threading.Event()

    def slow_sync(work):
        release.wait(30)
        do_sync(work)
    with connect(hub, sec) as agent:
        vid = attach_synced(agent, hub, "reuse", MemVolume(MiB))
        req = agent.write(vid, 0, b"\x01" * 4096)
        assert agent.wait_reply(req).TYPE is p.MsgType.ACK
        agent.send(p.Write(request_id=req, volume=vid, offset=4096, data=b"\x02" * 4096))
        assert agent.wait_reply(req).TYPE is p.MsgType.ACK, "an answered id may be used again"
        log.do_sync = slow_sync
        try:
            agent.send(p.Write(request_id=7000, volume=vid, offset=8192, data=b"\x03" * 4096))
            agent.send(p.Write(request_id=7000, volume=vid, offset=12288, data=b"\x04" * 4096))
            wait_until(lambda: agent.errors, 20, "the hub's ERROR")
            assert [e.code for e in agent.errors] == [p.ErrorCode.PROTOCOL], agent.errors
            assert 7000 not in agent.replies, "nothing answered id 7000 before the ERROR"
        finally:
            release.set()
            log.do_sync = do_sync
        assert agent.closed.wait(20), "a reused outstanding id ends the connection"
        assert 7000 not in agent.replies, "no ACK follows the ERROR: it could be either's"
    hub.store.applier.wait_applied(hub.store.journal.durable_seq)
    assert replica_bytes(hub, "reuse")[12288:16384] == bytes(4096), \
        "the frame that reused id 7000 was applied"


def test_full_sync_stores_zero_answers_as_holes(hubenv):
    hub, sec = hubenv
    size = 16 * MiB
    mv = MemVolume(size)
    mv.write(3 * MiB, os.urandom(MiB))
    mv.write(9 * MiB + 4096, os.urandom(8192))
    with connect(hub, sec) as agent:
        attach_synced(agent, hub, "sparse", mv)
        assert replica_bytes(hub, "sparse") == bytes(mv.buf)
    st = os.stat(os.path.join(hub.store.dir, "volumes", "sparse", "replica"))
    assert st.st_blocks * 512 <= 2 * MiB + 64 * 1024


@pytest.mark.parametrize("punch", [True, False], ids=["punch-hole", "write-zeroes"])
def test_zero_frees_the_replicas_space_and_keeps_the_point_before(hubenv, monkeypatch, punch):
    hub, sec = hubenv
    if not punch:
        monkeypatch.setattr(rephub, "punch_holes", False)
    elif not rephub.punch_holes:
        pytest.skip("no fallocate(2) here")
    data = os.urandom(4 * MiB)
    with connect(hub, sec) as agent:
        vid = attach_synced(agent, hub, "z", MemVolume(4 * MiB, data))
        path = os.path.join(hub.store.dir, "volumes", "z", "replica")
        agent.expect_ack(agent.checkpoint("before"))
        replica_bytes(hub, "z")
        allocated = os.stat(path).st_blocks * 512
        agent.expect_ack(agent.zero(vid, MiB + 4096, 2 * MiB))
        assert replica_bytes(hub, "z") == data[:MiB + 4096] + bytes(2 * MiB) + \
            data[3 * MiB + 4096:]
        freed = allocated - os.stat(path).st_blocks * 512
        if punch:
            assert freed >= 2 * MiB - 8192, f"only {freed} bytes freed"
        else:
            assert freed == 0
        vol = hub.store.volume("z")
        seq, _ = hub.store.window.resolve_point(vol, "before")
        assert hub.store.window.read_at(vol, seq, MiB, 2 * MiB) == data[MiB:3 * MiB]


def test_stale_read_reply_would_be_caught(hubenv):
    """The check above has teeth: an agent that breaks rule 4 leaves a stale replica."""
    hub, sec = hubenv
    mv = MemVolume(2 * MiB, b"\x01" * 2 * MiB)
    agent = connect(hub, sec)

    def broken_on_read(msg):
        vol = agent.volumes[msg.volume]
        stale = vol.read(msg.offset, msg.length)       # read ...
        agent.write(msg.volume, msg.offset, b"\x02" * 4096)  # ... a write slips in ...
        agent.send(p.ReadReply(request_id=msg.request_id, volume=msg.volume,
                               offset=msg.offset, data=stale))  # ... stale reply after it
    agent.on_READ = broken_on_read
    try:
        agent.attach("stale", mv)
        wait_until(lambda: hub.store.volume("stale").state == rephub.VolState.CONSISTENT, 20)
        agent.flush()
        assert replica_bytes(hub, "stale") != bytes(mv.buf)
    finally:
        agent.close()


def test_dirty_resync_reads_only_the_dirty_extents(hubenv):
    hub, sec = hubenv
    size = 8 * MiB
    mv = patterned_volume(size, 3)
    gen = os.urandom(16)
    agent = connect(hub, sec)
    attach_synced(agent, hub, "dv", mv, generation=gen)
    agent.close()
    wait_detached(hub, "dv")
    # While disconnected, two regions change and are marked dirty.
    mv.write(65536 * 3, b"\xaa" * 70000)
    mv.write(5 * MiB, b"\xbb" * 100)
    mv.dirty = [(65536 * 3, 3 * 65536), (5 * MiB, 65536)]
    agent = connect(hub, sec)
    try:
        vid, plan = agent.attach("dv", mv, state=p.VolumeState.DIRTY, generation=gen)
        assert plan == p.SyncPlan.DIRTY
        wait_until(lambda: hub.store.volume("dv").state == rephub.VolState.CONSISTENT
                   and hub.store.volume("dv").sync is None, 20)
        assert sum(r.length for r in agent.reads) == 4 * 65536
        assert replica_bytes(hub, "dv") == bytes(mv.buf)
        # Same generation and CLEAN: nothing to do.
        agent.close()
        wait_detached(hub, "dv")
        agent = connect(hub, sec)
        assert agent.attach("dv", mv, state=p.VolumeState.CLEAN, generation=gen)[1] == \
            p.SyncPlan.NONE
    finally:
        agent.close()


class WrongKindAgent(TestAgent):
    """Before its right answer to the hub's first DIRTY_QUERY, CHECKSUM_QUERY
    and READ, sends every other kind of answer naming that request's id, each
    one plausible for its range: all answer nothing [ER-7]."""

    features = p.Feature.EXTENTS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: list[p.MsgType] = []               # requests answered wrongly
        self.wrong: list[tuple[int, p.MsgType]] = []   # (request id, type sent)

    def _wrong_answers(self, msg) -> None:
        if msg.TYPE not in self.asked:
            self.asked.append(msg.TYPE)
            self.wrong += send_wrong_answers(self, msg)

    def on_DIRTY_QUERY(self, msg: p.DirtyQuery) -> None:
        self._wrong_answers(msg)
        super().on_DIRTY_QUERY(msg)

    def on_CHECKSUM_QUERY(self, msg: p.ChecksumQuery) -> None:
        self._wrong_answers(msg)
        super().on_CHECKSUM_QUERY(msg)

    def on_READ(self, msg: p.Read) -> None:
        self._wrong_answers(msg)
        super().on_READ(msg)


@pytest.mark.parametrize("state", [p.VolumeState.DIRTY, p.VolumeState.UNKNOWN])
def test_answers_of_another_type_are_invalid_and_the_resync_goes_on(hubenv, state):
    """ER-7 for a SyncJob: a READ_REPLY, CHECKSUMS or EXTENTS naming a
    DIRTY_QUERY (and so on for CHECKSUM_QUERY and READ) is ERROR(INVALID) and
    not acted on: no zero record from an EXTENTS, no data from a READ_REPLY;
    the right answers that follow end the resync as if nothing had happened."""
    hub, sec = hubenv
    mv = patterned_volume(4 * MiB, 7)
    gen = os.urandom(16)
    agent = connect(hub, sec)
    attach_synced(agent, hub, "wk", mv, generation=gen)
    agent.close()
    wait_detached(hub, "wk")
    mv.write(MiB, b"\xab" * 65536)
    mv.dirty = [(MiB, 65536)]
    agent = WrongKindAgent(hub.address, "a1", sec["a1"]).connect()
    try:
        plan = agent.attach("wk", mv, state=state, generation=gen)[1]
        assert plan == (p.SyncPlan.DIRTY if state == p.VolumeState.DIRTY
                        else p.SyncPlan.VERIFY)
        wait_until(lambda: hub.store.volume("wk").state == rephub.VolState.CONSISTENT
                   and hub.store.volume("wk").sync is None, 30, "resync done")
        asked = {p.MsgType.READ} | ({p.MsgType.DIRTY_QUERY} if plan == p.SyncPlan.DIRTY
                                    else {p.MsgType.CHECKSUM_QUERY})
        assert set(agent.asked) == asked
        assert len(agent.wrong) == 3 * len(asked)
        wait_until(lambda: len(agent.errors) >= len(agent.wrong), 10, "an ERROR for each")
        assert sorted((e.request_id, e.code, e.failed_type) for e in agent.errors) == \
            sorted((req, p.ErrorCode.INVALID, kind) for req, kind in agent.wrong)
        assert replica_bytes(hub, "wk") == bytes(mv.buf)
    finally:
        agent.close()


def test_unsolicited_dirty_map_is_resynced(hubenv):
    """[SY-9] the reported regions are READ; the points from the DIRTY_MAP's
    place in the stream until that resync ends lack the write the agent
    could not stream, so they are not offered for recovery."""
    hub, sec = hubenv
    mv = patterned_volume(4 * MiB, 4)
    with connect(hub, sec) as agent:
        vid = attach_synced(agent, hub, "ud", mv)
        vol = hub.store.volume("ud")
        agent.expect_ack(agent.checkpoint("before"))
        mv.write(MiB, b"\xcc" * 65536)  # a write the agent could not stream
        n = len(agent.reads)
        # One send: the checkpoint follows the DIRTY_MAP, ahead of the READ_REPLY.
        req = agent.request_id()
        agent.send_raw(p.DirtyMap(request_id=0, volume=vid, extents=[(MiB, 65536)]).to_bytes()
                       + p.Checkpoint(request_id=req, name="during").to_bytes())
        agent.expect_ack(req)
        wait_until(lambda: len(agent.synced) > n and agent.synced[-1].offset == MiB, 10,
                   "resync READ and SYNCED")
        assert [(r.offset, r.length) for r in agent.reads[n:]] == [(MiB, 65536)]
        wait_until(lambda: vol.sync is None, 10)
        with pytest.raises(p.RequestError, match="inside a resync"):
            hub.store.window.resolve_point(vol, "during")
        agent.expect_ack(agent.checkpoint("after"))
        window = hub.store.window
        for point in ("before", "after"):
            assert window.seq_problem(vol, window.resolve_point(vol, point)[0]) is None
        assert replica_bytes(hub, "ud") == bytes(mv.buf)


def test_unsolicited_dirty_map_during_a_report_only_verify(hubenv):
    """A report-only online verify takes the reported regions in (READ) and
    keeps the points from the DIRTY_MAP to its end out of recovery."""
    hub, sec = hubenv
    mv = patterned_volume(4 * MiB, 6)
    with connect(hub, sec) as agent:
        vid = attach_synced(agent, hub, "uv", mv)
        vol = hub.store.volume("uv")
        answer = agent.on_CHECKSUM_QUERY

        def report_first(msg):
            if agent.on_CHECKSUM_QUERY is report_first:
                agent.on_CHECKSUM_QUERY = answer
                mv.write(2 * MiB, b"\xab" * 65536)         # could not be streamed
                agent.send(p.DirtyMap(request_id=0, volume=vid, extents=[(2 * MiB, 65536)]))
                agent.checkpoint("during")
            answer(msg)
        agent.on_CHECKSUM_QUERY = report_first
        n = len(agent.reads)
        result = hub.verify("uv", repair=False)
        assert result is not None
        assert [(r.offset, r.length) for r in agent.reads[n:]] == [(2 * MiB, 65536)]
        with pytest.raises(p.RequestError, match="inside a resync"):
            hub.store.window.resolve_point(vol, "during")
        agent.expect_ack(agent.checkpoint("after"))
        window = hub.store.window
        assert window.seq_problem(vol, window.resolve_point(vol, "after")[0]) is None
        assert replica_bytes(hub, "uv") == bytes(mv.buf)


def test_verify_ships_only_differing_chunks(hubenv):
    hub, sec = hubenv
    size = 20 * MiB
    mv = patterned_volume(size, 5, fill=0.8)
    agent = connect(hub, sec)
    attach_synced(agent, hub, "vv", mv, generation=b"g" * 16)
    agent.close()
    changed = [3, 17, 18, 200]  # 64 KiB chunks changed behind the hub's back
    for c in changed:
        mv.write(c * 65536 + 10, b"\xdd" * 1000)
    agent = connect(hub, sec)
    try:
        reads_before = len(agent.reads)
        vid, plan = agent.attach("vv", mv, state=p.VolumeState.UNKNOWN, generation=b"g" * 16)
        assert plan == p.SyncPlan.VERIFY
        wait_until(lambda: hub.store.volume("vv").state == rephub.VolState.CONSISTENT
                   and hub.store.volume("vv").sync is None, 30)
        fetched = sorted((r.offset, r.length) for r in agent.reads[reads_before:])
        assert fetched == [(3 * 65536, 65536), (17 * 65536, 2 * 65536), (200 * 65536, 65536)]
        matched = sum(s.length for s in agent.synced if s.request_id not in
                      {r.request_id for r in agent.reads})
        assert matched == size - 4 * 65536
        assert replica_bytes(hub, "vv") == bytes(mv.buf)
    finally:
        agent.close()


# -- points in time -------------------------------------------------------------------------


def test_checkpoints_points_and_export(hubenv, tmp_path):
    hub, sec = hubenv
    mv = MemVolume(2 * MiB)
    images = {}
    with connect(hub, sec) as agent:
        vid = attach_synced(agent, hub, "pt", mv)
        for phase in range(3):
            for i in range(8):
                agent.expect_ack(agent.write(vid, random.randrange(0, 2 * MiB - 8192, 4096),
                                             bytes([phase + 1]) * 8192))
            if phase == 1:
                agent.expect_ack(agent.zero(vid, 0, MiB))
            agent.expect_ack(agent.checkpoint(f"phase{phase}"))
            images[f"phase{phase}"] = bytes(mv.buf)
        agent.expect_ack(agent.write(vid, 0, b"\x09" * 4096))
        images["latest"] = bytes(mv.buf)
    vol = hub.store.volume("pt")
    pts = hub.store.window.points(vol)
    assert [c["name"] for c in pts["checkpoints"]] == ["phase0", "phase1", "phase2"]
    for point, image in images.items():
        out = str(tmp_path / f"{point}.img")
        rephub.export_volume(hub.store, vol, point, out)
        with open(out, "rb") as f:
            assert f.read() == image, point
    # phase1's checkpoint time, as points shows it, names phase1's point
    # exactly; one ns earlier is the record before it (RC-8).
    cp1 = pts["checkpoints"][1]
    assert p.parse_point_time(cp1["time"]) == cp1["time_ns"]
    seq, _ = hub.store.window.resolve_point(vol, cp1["time"])
    assert seq == cp1["seq"]
    seq, _ = hub.store.window.resolve_point(vol, p.format_point_time(cp1["time_ns"] - 1))
    assert seq < cp1["seq"]
    with pytest.raises(rephub.PointError):
        hub.store.window.resolve_point(vol, "no-such-checkpoint")
    with pytest.raises(rephub.PointError):
        hub.store.window.resolve_point(vol, "2000-01-01T00:00:00Z")
    for other_grammar in ("2026-11-25T18:00:00+00:00", "2026-11-25 18:00:00Z",
                          "2026-11-25T18:00:00", "2026-11-25t18:00:00z"):
        with pytest.raises(rephub.PointError, match="RFC 3339"):
            hub.store.window.resolve_point(vol, other_grammar)
    with pytest.raises(rephub.PointError, match="day is out of range"):
        hub.store.window.resolve_point(vol, "2026-02-30T00:00:00Z")
    # Through the CLI and the control socket.
    out = str(tmp_path / "cli.img")
    res = subprocess.run([sys.executable, REPHUB, "export", "--data", hub.store.dir, "pt",
                          "--at", "phase0", "-o", out], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    assert "100.0%" in res.stderr
    with open(out, "rb") as f:
        assert f.read() == images["phase0"]
    res = subprocess.run([sys.executable, REPHUB, "points", "--data", hub.store.dir, "pt",
                          "--json"], capture_output=True, text=True, timeout=30)
    assert [c["name"] for c in json.loads(res.stdout)["checkpoints"]] == \
        ["phase0", "phase1", "phase2"]


def test_export_refuses_inconsistent_volume(hubenv, tmp_path):
    hub, sec = hubenv
    agent = connect(hub, sec)
    # The agent vanishes at the first READ: the full sync never completes.
    agent.before_read_reply = lambda msg: agent.sock.shutdown(socket.SHUT_RDWR)
    try:
        agent.attach("never", MemVolume(MiB, b"n" * MiB))
        vol = hub.store.volume("never")
        wait_until(lambda: vol.sync is None, 10, "sync job ended")
        assert vol.state == rephub.VolState.INCONSISTENT
        with pytest.raises(p.RequestError) as info:
            rephub.export_volume(hub.store, vol, "latest", str(tmp_path / "x"))
        assert info.value.code == p.ErrorCode.INCONSISTENT
        assert "not consistent" in str(info.value)
    finally:
        agent.close()


def test_retention_drops_old_segments_and_refuses_points_outside(tmp_path):
    agents = str(tmp_path / "agents")
    sec = make_agents_file(agents, "a1")
    hub = rephub.Hub(str(tmp_path / "data"), agents, retention=0.0,
                     segment_bytes=256 * 1024)
    hub.start()
    try:
        with connect(hub, sec) as agent:
            mv = MemVolume(MiB)
            vid = attach_synced(agent, hub, "r", mv)
            agent.expect_ack(agent.checkpoint("early"))
            for i in range(40):
                agent.expect_ack(agent.write(vid, (i % 16) * 65536, os.urandom(65536)))
            agent.flush()
        wait_until(lambda: hub.store.journal.first_seq > 5, 10, "segments dropped")
        vol = hub.store.volume("r")
        with pytest.raises(rephub.PointError):
            hub.store.window.resolve_point(vol, "early")
        out = str(tmp_path / "r.img")
        rephub.export_volume(hub.store, vol, "latest", out)
        with open(out, "rb") as f:
            assert f.read() == bytes(mv.buf)
    finally:
        hub.shutdown(grace=5)


# -- TLS, status, CLI ------------------------------------------------------------------------


def make_cert(tmp_path):
    import shutil
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_handshake_then_hmac(tmp_path):
    cert, key = make_cert(tmp_path)
    agents = str(tmp_path / "agents")
    sec = make_agents_file(agents, "a1")
    hub = rephub.Hub(str(tmp_path / "data"), agents, tls_cert=cert, tls_key=key)
    hub.start()
    try:
        ctx = rephub.ssl.create_default_context(cafile=cert)
        with TestAgent(hub.address, "a1", sec["a1"], tls=ctx,
                       server_hostname="localhost").connect() as agent:
            mv = MemVolume(2 * MiB, os.urandom(2 * MiB))
            vid = attach_synced(agent, hub, "tls", mv)
            agent.expect_ack(agent.write(vid, 4096, b"t" * 8192))
            # Pipelined: the hub's recv loop and its acker share the TLS connection.
            reqs = [agent.write(vid, (i % 32) * 65536, os.urandom(65536)) for i in range(200)]
            for req in reqs:
                agent.expect_ack(req)
            assert replica_bytes(hub, "tls") == bytes(mv.buf)
        # TLS still runs the HMAC handshake inside: a wrong secret fails.
        with pytest.raises(AgentError):
            TestAgent(hub.address, "a1", bytes(32), tls=ctx,
                      server_hostname="localhost").connect()
        # A plain-TCP client gets no HELLO_REPLY.
        with pytest.raises((AgentError, OSError, p.ReplicationError)):
            TestAgent(hub.address, "a1", sec["a1"]).connect(timeout=5)
    finally:
        hub.shutdown(grace=5)


def test_status_text_and_json(hubenv):
    hub, sec = hubenv
    with connect(hub, sec) as agent:
        attach_synced(agent, hub, "st", MemVolume(MiB, b"s" * MiB))
        wait_until(lambda: hub.status()["agents"][0]["rtt_ms"] is not None, 10, "heartbeat")
        res = subprocess.run([sys.executable, REPHUB, "status", "--data", hub.store.dir,
                              "--json"], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        st = json.loads(res.stdout)
        (vol,) = st["volumes"]
        assert (vol["name"], vol["owner"], vol["state"], vol["size"]) == \
            ("st", "a1", "consistent", MiB)
        assert vol["sync"]["plan"] == "FULL" and vol["sync"]["bytes_done"] == MiB
        assert st["agents"][0]["agent_id"] == "a1" and st["agents"][0]["rtt_ms"] > 0
        res = subprocess.run([sys.executable, REPHUB, "status", "--data", hub.store.dir],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0
        line = next(x for x in res.stdout.splitlines() if x.startswith("st "))
        assert "a1" in line and "consistent" in line and "1.0 MiB" in line
        assert "127.0.0.1:" in res.stdout and " ms" in res.stdout


def test_status_without_hub_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, REPHUB, "status", "--data", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "no hub is running" in res.stderr


def test_add_agent_prints_secret_and_keeps_file_private(tmp_path):
    path = str(tmp_path / "agents")
    res = subprocess.run([sys.executable, REPHUB, "add-agent", "--agents", path, "vm1"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0
    secret = res.stdout.strip()
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert rephub.load_agents(path) == {"vm1": bytes.fromhex(secret)}
    res = subprocess.run([sys.executable, REPHUB, "add-agent", "--agents", path, "vm1"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "already" in res.stderr
    res = subprocess.run([sys.executable, REPHUB, "add-agent", "--agents", path, "../x"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1


def test_handshake_deadline_closes_a_silent_peer(hubenv, monkeypatch):
    hub, sec = hubenv
    monkeypatch.setattr(rephub, "HANDSHAKE_TIMEOUT", 0.5)
    sock = socket.create_connection(hub.address)
    sock.settimeout(10)
    try:
        assert sock.recv(1) == b""  # closed by the hub, not by our timeout
    finally:
        sock.close()
    with connect(hub, sec) as agent:  # the hub still serves others
        assert agent.hub_id


def test_serve_heartbeat_closes_a_peer_silent_for_four_intervals(tmp_path):
    """``serve --heartbeat``: an agent that answers no PING is closed after
    PEER_SILENCE_INTERVALS of them (20 s with the default 5 s)."""
    agents = str(tmp_path / "agents")
    sec = make_agents_file(agents, "a1")
    for bad in ("0", "-1", "soon"):
        res = subprocess.run([sys.executable, REPHUB, "serve", "--data", str(tmp_path / "d"),
                              "--listen", "127.0.0.1:0", "--agents", agents, "--heartbeat", bad],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 2 and "--heartbeat" in res.stderr, res.stderr
    hub = HubProc(tmp_path, agents=agents, args=["--heartbeat", "0.2"]).start()
    try:
        agent = TestAgent(hub.address, "a1", sec["a1"])
        agent.on_PING = lambda msg: None
        agent.connect()
        try:
            wait_until(agent.closed.is_set, 10, "the hub to close a silent agent")
            assert "PINGs unanswered" in hub.read_log()
        finally:
            agent.close()
    finally:
        hub.kill()


def test_reconnecting_agent_takes_its_volume_over_from_the_old_connection(hubenv):
    """Authenticating takes nothing over (a recovery session of the same agent id
    leaves protection alone); attaching the volume does, and since the old
    connection was still alive, the new one gets a VERIFY, never NONE."""
    hub, sec = hubenv
    old = connect(hub, sec)
    mv = MemVolume(MiB)
    attach_synced(old, hub, "re", mv)
    new = connect(hub, sec)
    try:
        old.flush()   # still served after the second connection authenticated
        vid, plan = new.attach("re", mv, state=p.VolumeState.CLEAN)
        assert plan == p.SyncPlan.VERIFY
        wait_until(old.closed.is_set, 10, "old connection closed once its volume was taken")
        wait_until(lambda: hub.store.volume("re").state == rephub.VolState.CONSISTENT
                   and hub.store.volume("re").sync is None, 20, "the verify")
        new.expect_ack(new.write(vid, 0, b"n" * 4096))
        assert replica_bytes(hub, "re") == bytes(mv.buf)
        assert [a["agent_id"] for a in hub.status()["agents"]] == ["a1"]
    finally:
        old.close()
        new.close()


def test_sync_rate_throttles_sync_reads(tmp_path):
    agents = str(tmp_path / "agents")
    sec = make_agents_file(agents, "a1")
    hub = rephub.Hub(str(tmp_path / "data"), agents, sync_rate=8 * MiB)
    hub.start()
    try:
        with connect(hub, sec) as agent:
            t0 = rephub.time.monotonic()
            attach_synced(agent, hub, "slow", MemVolume(4 * MiB))
            # 4 MiB at 8 MiB/s: the first piece is free, the other three wait.
            assert rephub.time.monotonic() - t0 >= 0.3
    finally:
        hub.shutdown(grace=5)


def test_cli_checkpoint_through_the_running_hub_and_offline_export(hubenv, tmp_path):
    hub, sec = hubenv
    mv = MemVolume(MiB)
    with connect(hub, sec) as agent:
        vid = attach_synced(agent, hub, "cli", mv)
        agent.expect_ack(agent.write(vid, 0, b"1" * 65536))
        res = subprocess.run([sys.executable, REPHUB, "checkpoint", "--data", hub.store.dir,
                              "cli", "before-2"], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        image1 = bytes(mv.buf)
        agent.expect_ack(agent.write(vid, 0, b"2" * 65536))
    data_dir = hub.store.dir
    hub.shutdown(grace=5)
    # Offline: the CLI opens the store itself.
    res = subprocess.run([sys.executable, REPHUB, "points", "--data", data_dir, "cli"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "before-2" in res.stdout, res.stderr
    out = str(tmp_path / "cli.img")
    for at, image in (("before-2", image1), ("latest", bytes(mv.buf))):
        res = subprocess.run([sys.executable, REPHUB, "export", "--data", data_dir, "cli",
                              "--at", at, "-o", out], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        with open(out, "rb") as f:
            assert f.read() == image, at
    res = subprocess.run([sys.executable, REPHUB, "export", "--data", data_dir, "cli",
                          "--at", "1999-01-01T00:00:00Z", "-o", out],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "BAD_POINT" in res.stderr


def test_handshake_request_error_is_answered_then_closed(hubenv):
    hub, _ = hubenv
    sock = socket.create_connection(hub.address)
    try:
        # A HELLO whose agent_id is not a name: ERROR(BAD_NAME), then close (HS-10).
        raw = bytearray(p.encode(p.Hello(nonce=os.urandom(32), agent_id="okname")))
        payload = raw[p.HEADER_SIZE:].replace(b"okname", b"../etc")
        header = p.encode_header(p.MsgType.HELLO, 0, 0, 0, len(payload), 0, 0,
                                 rephub.zlib.crc32(payload))
        sock.sendall(bytes(header) + payload)
        err = p.recv_message(sock)
        assert isinstance(err, p.Error) and err.code == p.ErrorCode.BAD_NAME
        assert p.recv_message(sock) is None
    finally:
        sock.close()


def test_acks_errors_and_synced_from_the_agent_are_never_answered(hubenv):
    hub, sec = hubenv
    with connect(hub, sec) as agent:
        agent.send(p.Ack(request_id=4242))
        agent.send(p.Error(request_id=4243, code=p.ErrorCode.INVALID, message="x"))
        agent.send(p.Synced(request_id=4244, volume=1, offset=0, length=512))
        agent.send(p.Pong(request_id=4245))
        agent.send(p.DirtyMap(request_id=0, volume=77, extents=[(0, 4096)]))
        req = agent.request_id()
        agent.send(p.Read(request_id=req, volume=1, offset=0, length=512))  # wrong direction
        assert agent.wait_reply(req).code == p.ErrorCode.UNSUPPORTED
        assert [e.request_id for e in agent.errors] == [req]


def test_unfinished_verify_is_redone_as_verify(hubenv):
    hub, sec = hubenv
    mv = patterned_volume(4 * MiB, 9)
    agent = connect(hub, sec)
    attach_synced(agent, hub, "uv", mv, generation=b"1" * 16)
    agent.close()
    agent = connect(hub, sec)
    # The agent goes away at the first CHECKSUM_QUERY: the verify never finishes.
    agent.on_CHECKSUM_QUERY = lambda msg: agent.sock.shutdown(socket.SHUT_RDWR)
    vid, plan = agent.attach("uv", mv, state=p.VolumeState.UNKNOWN, generation=b"1" * 16)
    assert plan == p.SyncPlan.VERIFY
    vol = hub.store.volume("uv")
    wait_until(lambda: vol.sync is None, 10, "verify stopped")
    agent.close()
    assert (vol.state, vol.meta["pending_plan"]) == (rephub.VolState.SYNCING, "VERIFY")
    # The agent says CLEAN now: the hub still verifies.
    agent = connect(hub, sec)
    try:
        vid, plan = agent.attach("uv", mv, state=p.VolumeState.CLEAN, generation=b"1" * 16)
        assert plan == p.SyncPlan.VERIFY
        wait_until(lambda: vol.state == rephub.VolState.CONSISTENT and vol.sync is None, 20)
        assert vol.meta["pending_plan"] is None
        assert replica_bytes(hub, "uv") == bytes(mv.buf)
    finally:
        agent.close()


def test_detach_acks_after_durable_and_invalidates_the_id(hubenv):
    hub, sec = hubenv
    mv = MemVolume(MiB)
    with connect(hub, sec) as agent:
        vid = attach_synced(agent, hub, "det", mv)
        agent.write(vid, 0, b"d" * 4096)  # not waited for: DETACH's ACK covers it
        req = agent.request_id()
        agent.send(p.Detach(request_id=req, volume=vid))
        agent.expect_ack(req)
        assert hub.store.journal.durable_seq == hub.store.journal.last_seq
        assert hub.store.volume("det").attached_to is None
        req = agent.write(vid, 0, b"x" * 512)
        assert agent.wait_reply(req).code == p.ErrorCode.NO_SUCH_VOLUME
    assert replica_bytes(hub, "det")[:4096] == b"d" * 4096
