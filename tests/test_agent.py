"""repagent without QEMU: the dirty-bitmap rules, and the hub stream's ordering.

The stream tests run the real Agent code paths (protected_write, the
send/recv threads, the sync workers) against a scripted hub on the other end
of a socketpair; the protected volume is read from a plain file (the
FileSource the agent uses for raw images), or from a reader that blocks
until the test lets it go, to catch a write in the middle of a READ.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time

import pytest

import protocol as p
import repagent as ra
from hubtools import CountingSocket, wait_until

CHUNK = 64 * 1024
SIZE = 16 * CHUNK


# ---------------------------------------------------------------------------
# The bitmap rules (docs/SEMANTICS.md "Agent's dirty bitmap")


@pytest.fixture
def bitmap(tmp_path):
    bm = ra.DirtyBitmap(str(tmp_path / "v.bitmap"), SIZE, CHUNK)
    yield bm
    bm.close()


def test_ack_clears_a_chunk_only_when_every_write_is_acked(bitmap):
    c = bitmap.chunk_range(0, 100)
    bitmap.mark(c)
    bitmap.add_inflight(c)
    bitmap.mark(c)
    bitmap.add_inflight(c)
    bitmap.ack(c)
    assert bitmap.is_set(0), "one of two writes is still un-ACKed"
    bitmap.ack(c)
    assert not bitmap.is_set(0)
    assert bitmap.dirty_count == 0


def test_chunk_range_covers_every_touched_chunk(bitmap):
    assert bitmap.chunk_range(CHUNK - 1, 2) == range(0, 2)
    assert bitmap.chunk_range(CHUNK, CHUNK) == range(1, 2)
    assert bitmap.chunk_range(3 * CHUNK + 5, 2 * CHUNK) == range(3, 6)


def test_a_dropped_write_needs_a_synced_read_made_after_it(bitmap):
    c = range(2, 3)
    bitmap.mark(c)
    bitmap.lose(c, seq=10)
    bitmap.synced(c, seq=10)          # the reply was queued before the drop
    assert bitmap.is_set(2)
    bitmap.synced(c, seq=11)          # a reply queued after it
    assert not bitmap.is_set(2)


def test_synced_does_not_clear_a_chunk_with_a_write_in_flight(bitmap):
    c = range(4, 5)
    bitmap.mark(c)
    bitmap.lose(c, seq=3)
    bitmap.add_inflight(c)
    bitmap.synced(c, seq=5)
    assert bitmap.is_set(4) and 4 not in bitmap.lost_seq
    bitmap.ack(c)
    assert not bitmap.is_set(4)


def test_connection_loss_turns_inflight_writes_into_losses(bitmap):
    c = range(1, 3)
    bitmap.mark(c)
    bitmap.add_inflight(c)
    bitmap.drop_inflight(c, seq=7)
    assert bitmap.inflight == {} and bitmap.lost_seq == {1: 7, 2: 7}
    bitmap.ack(range(0, 0))
    assert bitmap.is_set(1) and bitmap.is_set(2)


def test_bits_survive_a_reload_and_only_synced_clears_them(tmp_path):
    path = str(tmp_path / "v.bitmap")
    bm = ra.DirtyBitmap(path, SIZE, CHUNK)
    generation = bm.generation
    bm.mark(range(3, 5))
    bm.mark(range(15, 16))
    bm.close()                        # as a SIGKILL would leave it: the mmap holds it
    again = ra.DirtyBitmap(path, SIZE, CHUNK)
    try:
        assert not again.created and again.generation == generation
        assert again.dirty_count == 3
        assert again.lost_seq == {3: 1, 4: 1, 15: 1}
        again.ack(range(3, 5))        # an ACK cannot clear what an earlier run lost
        assert again.is_set(3)
        again.synced(range(3, 4), seq=2)
        assert not again.is_set(3) and again.is_set(4)
        assert again.extents() == [(4 * CHUNK, CHUNK), (15 * CHUNK, CHUNK)]
    finally:
        again.close()


def test_extents_merge_neighbours_and_stop_at_the_volume_end(tmp_path):
    size = 5 * CHUNK + 100
    bm = ra.DirtyBitmap(str(tmp_path / "v.bitmap"), size, CHUNK)
    try:
        bm.mark(range(0, 2))
        bm.mark(range(2, 3))
        bm.mark(range(5, 6))
        assert bm.extents() == [(0, 3 * CHUNK), (5 * CHUNK, 100)]
        assert bm.extents({5, 0}) == [(0, CHUNK), (5 * CHUNK, 100)]
    finally:
        bm.close()


def test_many_bits_are_found_past_the_first_block(tmp_path):
    size = 100000 * 4096
    bm = ra.DirtyBitmap(str(tmp_path / "big.bitmap"), size, 4096)
    try:
        bm.mark(range(99999, 100000))
        bm.mark(range(40000, 40001))
        assert list(bm.set_chunks()) == [40000, 99999]
    finally:
        bm.close()


@pytest.mark.parametrize("change, words", [
    ("magic", "bad magic"), ("chunk", "chunk_size 65536, expected 131072"),
    ("size", "volume size"), ("truncate", "file is")])
def test_a_bitmap_that_does_not_fit_is_refused_with_the_reason(tmp_path, change, words):
    path = str(tmp_path / "v.bitmap")
    ra.DirtyBitmap(path, SIZE, CHUNK).close()
    size, chunk = SIZE, CHUNK
    if change == "magic":
        with open(path, "r+b") as f:
            f.write(b"XXXX")
    elif change == "chunk":
        chunk = 2 * CHUNK
    elif change == "size":
        size = 2 * SIZE
    else:
        os.truncate(path, 64)
    with pytest.raises(ra.BitmapError, match=words):
        ra.DirtyBitmap(path, size, chunk)


# ---------------------------------------------------------------------------
# Small parsers


def test_sizes_and_uris_and_qemu_names():
    assert ra.parse_size("64K") == 65536 and ra.parse_size("1MiB") == 1 << 20
    assert ra.parse_size("4096") == 4096
    with pytest.raises(Exception, match="not a number"):
        ra.parse_size("lots")
    assert ra.parse_nbd_uri("nbd+unix:///disk0?socket=/run/q.sock") == ("/run/q.sock", "disk0")
    assert ra.parse_nbd_uri("nbd://h:10810/e") == (("h", 10810), "e")
    with pytest.raises(ValueError, match="socket"):
        ra.parse_nbd_uri("nbd+unix:///disk0")
    job, target, top = ra.qemu_names("disk0")
    assert (job, target, top) == ("ra-disk0", "ra-disk0-tgt", "ra-disk0-top")
    long = ra.qemu_names("n" * 40)
    assert all(len(name) <= 31 for name in long)
    assert ra.parse_host_port("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert ra.parse_host_port("[::1]:7000") == ("::1", 7000)
    for bad in ("127.0.0.1", "h:port", "h:65536"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected HOST:PORT"):
            ra.parse_host_port(bad)
    with pytest.raises(ValueError, match="expected unix:PATH or HOST:PORT"):
        ra.parse_listen("nope")
    assert ra.parse_node("disk0=vm1-root") == ("disk0", "vm1-root")
    with pytest.raises(Exception, match="characters"):
        ra.parse_node("disk0=../x")


# ---------------------------------------------------------------------------
# The stream, against a scripted hub


class BlockingReader:
    """Reads a file, but waits for ``release`` once ``started`` is set."""

    def __init__(self, path, started: threading.Event, release: threading.Event):
        self.inner = ra.FileSource(path)
        self.started, self.release = started, release

    def read(self, offset, length):
        data = self.inner.read(offset, length)
        self.started.set()
        if not self.release.wait(10):
            raise OSError("test never released the read")
        return data

    def close(self):
        self.inner.close()


class ScriptedHub:
    """The hub's end of a socketpair: read frames, send frames."""

    def __init__(self, sock):
        self.sock = sock
        sock.settimeout(10)

    def recv(self) -> p.Message:
        msg = p.recv_message(self.sock)
        assert msg is not None, "agent closed the connection"
        return msg

    def recv_until(self, msg_type, skip=(p.MsgType.PING,)):
        seen = []
        while True:
            msg = self.recv()
            if msg.TYPE == msg_type:
                return msg, seen
            if msg.TYPE not in skip:
                seen.append(msg)

    def send(self, msg):
        p.send_message(self.sock, msg)


class Replies:
    """Collects the answers the agent gives QEMU."""

    def __init__(self):
        self.codes = []
        self.event = threading.Event()

    def __call__(self, code):
        self.codes.append(code)
        self.event.set()


@pytest.fixture
def rig(tmp_path):
    """An Agent with one 16-chunk volume (id 1) wired to a ScriptedHub."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(range(256)) * (SIZE // 256))
    made = []

    def make(mode="async", max_queue=ra.DEFAULT_MAX_QUEUE, sync_timeout=5.0, start=True,
             reader=None, features=p.Feature.NONE):
        cfg = ra.Config(hub=("127.0.0.1", 1), agent_id="a1", secret=b"s" * 32, qmp="-",
                        nodes=[("disk0", "vol0")], state_dir=str(tmp_path / "state"),
                        mode=mode, max_queue=max_queue, sync_timeout=sync_timeout)
        os.makedirs(cfg.state_dir, exist_ok=True)
        agent = ra.Agent(cfg)
        vol = agent.volumes[0]
        vol.size = SIZE
        vol.bitmap = ra.DirtyBitmap(vol.bitmap_path, SIZE, CHUNK)
        vol.source = reader or (lambda: ra.FileSource(str(image)))
        ours, theirs = socket.socketpair()
        conn = agent.link.adopt(ours, {vol: 1}, features, start=False)
        for name, target in (("repagent-timer", agent.stream.timer_loop),
                             ("repagent-sync-0", agent.sync.run)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            agent.threads.append(t)
        if start:
            conn.start()
        made.append((agent, conn, theirs))
        return agent, vol, conn, ScriptedHub(theirs)

    yield make
    for agent, conn, theirs in made:
        agent.stopping.set()
        conn.close("test over")
        with agent.lock:
            agent.stream.timer_cond.notify_all()
        conn.join(2)
        for t in agent.threads:
            t.join(2)
        theirs.close()
        agent.volumes[0].bitmap.close()


def test_async_write_is_answered_once_marked_and_cleared_by_ack(rig):
    agent, vol, conn, hub = rig()
    replies = Replies()
    agent.stream.protected_write(vol, 4096, 8192, memoryview(b"x" * 8192), replies)
    assert replies.codes == [0]
    assert vol.bitmap.is_set(0)
    msg = hub.recv()
    assert (msg.TYPE, msg.offset, msg.length, bytes(msg.data)) == \
        (p.MsgType.WRITE, 4096, 8192, b"x" * 8192)
    hub.send(p.Ack(request_id=msg.request_id))
    wait_until(lambda: not vol.bitmap.is_set(0), 5.0, "bit cleared by ACK")


def test_write_zeroes_becomes_zero(rig):
    agent, vol, conn, hub = rig()
    agent.stream.protected_write(vol, CHUNK, CHUNK, None, Replies())
    msg = hub.recv()
    assert (msg.TYPE, msg.offset, msg.length) == (p.MsgType.ZERO, CHUNK, CHUNK)


def test_sync_write_waits_for_the_ack(rig):
    agent, vol, conn, hub = rig(mode="sync")
    replies = Replies()
    agent.stream.protected_write(vol, 0, 4096, memoryview(b"y" * 4096), replies)
    msg = hub.recv()
    assert replies.codes == [], "sync mode answered QEMU before the hub's ACK"
    hub.send(p.Ack(request_id=msg.request_id))
    assert replies.event.wait(5) and replies.codes == [0]
    assert not agent.stream.degraded


def test_sync_write_past_the_timeout_is_answered_and_degrades(rig):
    agent, vol, conn, hub = rig(mode="sync", sync_timeout=0.2)
    replies = Replies()
    start = time.monotonic()
    agent.stream.protected_write(vol, 0, 4096, memoryview(b"y" * 4096), replies)
    msg = hub.recv()
    assert replies.event.wait(5), "a late ACK must not hang QEMU"
    assert 0.15 < time.monotonic() - start < 3
    assert agent.stream.degraded and vol.bitmap.is_set(0)
    second = Replies()
    agent.stream.protected_write(vol, CHUNK, 4096, memoryview(b"z" * 4096), second)
    assert second.codes == [0], "degraded sync mode answers once marked"
    hub.send(p.Ack(request_id=msg.request_id))
    hub.send(p.Ack(request_id=hub.recv().request_id))
    wait_until(lambda: not agent.stream.degraded and vol.bitmap.dirty_count == 0, 5.0,
               "sync mode restored once everything is ACKed")


def test_connection_loss_drops_inflight_writes_and_answers_sync_waiters(rig):
    agent, vol, conn, hub = rig(mode="sync")
    replies = Replies()
    agent.stream.protected_write(vol, 2 * CHUNK, 4096, memoryview(b"q" * 4096), replies)
    hub.recv()
    hub.sock.close()
    assert replies.event.wait(5) and replies.codes == [0]
    wait_until(lambda: agent.conn is None, 5.0, "connection forgotten")
    assert vol.bitmap.lost_seq.get(2) is not None and vol.bitmap.is_set(2)
    assert vol.volume_id is None and agent.stream.degraded
    assert vol.attach_state() == p.VolumeState.DIRTY
    later = Replies()
    agent.stream.protected_write(vol, 5 * CHUNK, 10, memoryview(b"w" * 10), later)
    assert later.codes == [0] and vol.bitmap.lost_seq.get(5)


def blocked_reads(rig):
    """``rig()`` whose sync reads of the image wait for ``release`` once they
    set ``started``: (agent, vol, conn, hub, started, release)."""
    started, release = threading.Event(), threading.Event()
    image = None

    def reader():
        return BlockingReader(image, started, release)

    agent, vol, conn, hub = rig(reader=reader)
    image = os.path.join(os.path.dirname(vol.state_dir), "disk.raw")
    return agent, vol, conn, hub, started, release


def test_read_reply_goes_before_a_write_the_read_may_have_missed(rig):
    """Rule 4: a write landing during a READ of its region is sent after the reply."""
    agent, vol, conn, hub, started, release = blocked_reads(rig)
    hub.send(p.Read(request_id=900, volume=1, offset=0, length=2 * CHUNK))
    assert started.wait(5)
    same, other = Replies(), Replies()
    agent.stream.protected_write(vol, CHUNK, 4096, memoryview(b"N" * 4096), same)
    agent.stream.protected_write(vol, 8 * CHUNK, 4096, memoryview(b"O" * 4096), other)
    assert same.codes == [0] and other.codes == [0], "QEMU never waits for a sync read"
    first = hub.recv()
    assert (first.TYPE, first.offset) == (p.MsgType.WRITE, 8 * CHUNK), \
        "a write outside the read's range need not wait"
    release.set()
    reply = hub.recv()
    assert reply.TYPE == p.MsgType.READ_REPLY and reply.request_id == 900
    assert bytes(reply.data[:256]) == bytes(range(256))
    held = hub.recv()
    assert (held.TYPE, held.offset, bytes(held.data[:1])) == (p.MsgType.WRITE, CHUNK, b"N")
    # SYNCED for the read clears chunk 0; chunk 1 waits for its write's ACK.
    hub.send(p.Synced(request_id=900, volume=1, offset=0, length=2 * CHUNK))
    hub.send(p.Ack(request_id=first.request_id))
    wait_until(lambda: not vol.bitmap.is_set(8), 5.0, "ACK of the unrelated write")
    assert vol.bitmap.is_set(1)
    hub.send(p.Ack(request_id=held.request_id))
    wait_until(lambda: vol.bitmap.dirty_count == 0, 5.0, "every bit cleared")


def test_a_hub_request_id_still_outstanding_closes_the_connection(rig):
    """RP-12, the agent's side: once a request is answered its id may come
    again, but while READ 901 is being read a PING 901 is a protocol error
    (the hub could not tell the answers apart): ERROR(PROTOCOL), and the
    connection ends."""
    agent, vol, conn, hub, started, release = blocked_reads(rig)
    release.set()
    for _ in range(2):                     # the same id, each time after its answer
        hub.send(p.Read(request_id=900, volume=1, offset=0, length=CHUNK))
        reply, _ = hub.recv_until(p.MsgType.READ_REPLY)
        assert reply.request_id == 900
    hub.send(p.Ping(request_id=900, sent_ns=1))
    assert hub.recv_until(p.MsgType.PONG)[0].request_id == 900
    release.clear()
    started.clear()
    hub.send(p.Read(request_id=901, volume=1, offset=0, length=CHUNK))
    assert started.wait(5)
    hub.send(p.Ping(request_id=901, sent_ns=2))
    error, seen = hub.recv_until(p.MsgType.ERROR)
    assert error.code == p.ErrorCode.PROTOCOL and "901" in error.message, error
    assert not any(m.request_id == 901 for m in seen), "no answer to either 901"
    assert conn.closed.wait(5), "a reused outstanding id ends the connection"
    release.set()


def test_synced_clears_loaded_bits_and_zero_reads_carry_no_data(rig, tmp_path):
    agent, vol, conn, hub = rig()
    with agent.lock:
        vol.bitmap.mark(range(3, 4))
        vol.bitmap.lose(range(3, 4), 1)       # as if loaded from an earlier run
    (tmp_path / "disk.raw").write_bytes(bytes(SIZE))
    hub.send(p.DirtyQuery(request_id=5, volume=1))
    dmap = hub.recv()
    assert dmap.TYPE == p.MsgType.DIRTY_MAP and dmap.extents == [(3 * CHUNK, CHUNK)]
    hub.send(p.Read(request_id=6, volume=1, offset=3 * CHUNK, length=CHUNK))
    reply = hub.recv()
    assert reply.TYPE == p.MsgType.READ_REPLY and reply.is_zero and not len(reply.data)
    hub.send(p.Synced(request_id=6, volume=1, offset=3 * CHUNK, length=CHUNK))
    wait_until(lambda: vol.bitmap.dirty_count == 0, 5.0, "SYNCED clears the loaded bit")


def test_checksums_match_the_volume(rig, tmp_path):
    import hashlib
    agent, vol, conn, hub = rig()
    hub.send(p.ChecksumQuery(request_id=7, volume=1, offset=CHUNK, length=2 * CHUNK + 100,
                             chunk_size=CHUNK))
    msg = hub.recv()
    data = (tmp_path / "disk.raw").read_bytes()
    want = [hashlib.sha256(data[o:min(o + CHUNK, 3 * CHUNK + 100)]).digest()
            for o in range(CHUNK, 3 * CHUNK + 100, CHUNK)]
    assert msg.TYPE == p.MsgType.CHECKSUMS and msg.digests == want


def test_bad_requests_from_the_hub_get_errors_and_the_stream_goes_on(rig):
    agent, vol, conn, hub = rig()
    hub.send(p.Read(request_id=8, volume=77, offset=0, length=4096))
    err = hub.recv()
    assert err.TYPE == p.MsgType.ERROR and err.code == p.ErrorCode.NO_SUCH_VOLUME
    hub.send(p.Read(request_id=9, volume=1, offset=SIZE - 10, length=4096))
    err = hub.recv()
    assert (err.code, err.request_id) == (p.ErrorCode.OUT_OF_RANGE, 9)
    hub.send(p.Attach(request_id=10, size=SIZE, name="x"))   # hub may not send ATTACH
    err = hub.recv()
    assert err.code == p.ErrorCode.UNSUPPORTED
    hub.send(p.Ping(request_id=11, sent_ns=123))
    pong = hub.recv()
    assert (pong.TYPE, pong.echo_ns) == (p.MsgType.PONG, 123)


def test_a_full_queue_drops_to_bitmap_and_reports_a_dirty_map(rig):
    agent, vol, conn, hub = rig(max_queue=3 * CHUNK, start=False)
    replies = Replies()
    for i in range(5):
        agent.stream.protected_write(vol, i * CHUNK, CHUNK, memoryview(bytes([i + 1]) * CHUNK),
                              replies)
    assert replies.codes == [0] * 5, "async QEMU is never blocked by a full queue"
    assert vol.counters["dropped_writes"] == 2
    conn.start()
    acks = []
    dmap, seen = hub.recv_until(p.MsgType.DIRTY_MAP)
    assert [m.offset for m in seen] == [0, CHUNK, 2 * CHUNK]
    assert dmap.request_id == 0 and dmap.extents == [(3 * CHUNK, 2 * CHUNK)]
    for m in seen:
        hub.send(p.Ack(request_id=m.request_id))
        acks.append(m.request_id)
    wait_until(lambda: vol.bitmap.extents() == [(3 * CHUNK, 2 * CHUNK)], 5.0,
               "only the dropped chunks stay marked")
    hub.send(p.Read(request_id=50, volume=1, offset=3 * CHUNK, length=2 * CHUNK))
    hub.recv_until(p.MsgType.READ_REPLY)
    hub.send(p.Synced(request_id=50, volume=1, offset=3 * CHUNK, length=2 * CHUNK))
    wait_until(lambda: vol.bitmap.dirty_count == 0, 5.0, "resync clears the dropped chunks")


def test_the_dirty_map_of_a_dropped_write_goes_ahead_of_every_later_frame(rig):
    """[SY-19]: the hub learns where the stream starts to lack a write, so no
    point after it passes for crash-consistent; later drops ride along."""
    agent, vol, conn, hub = rig(max_queue=2 * CHUNK, start=False)
    replies = Replies()
    for i in range(2):                                    # fills the queue
        agent.stream.protected_write(vol, i * CHUNK, CHUNK, memoryview(b"a" * CHUNK), replies)
    agent.stream.protected_write(vol, 5 * CHUNK, CHUNK, memoryview(b"b" * CHUNK), replies)  # dropped
    agent.stream.protected_write(vol, 9 * CHUNK, CHUNK, None, replies)  # a ZERO is always queued
    agent.stream.protected_write(vol, 7 * CHUNK, CHUNK, memoryview(b"c" * CHUNK), replies)  # dropped
    assert vol.counters["dropped_writes"] == 2
    conn.start()
    frames = [hub.recv() for _ in range(4)]
    assert [(m.TYPE, m.offset) for m in frames if m.TYPE != p.MsgType.DIRTY_MAP] == \
        [(p.MsgType.WRITE, 0), (p.MsgType.WRITE, CHUNK), (p.MsgType.ZERO, 9 * CHUNK)]
    assert frames[2].TYPE == p.MsgType.DIRTY_MAP, "reported before the frame queued next"
    assert (frames[2].request_id, frames[2].extents) == (0, [(5 * CHUNK, CHUNK),
                                                             (7 * CHUNK, CHUNK)])
    agent.stream.protected_write(vol, 12 * CHUNK, CHUNK, memoryview(b"d" * CHUNK), replies)
    assert hub.recv().TYPE == p.MsgType.WRITE           # room again: nothing more dropped
    assert not vol.dropped and vol.drop_report is None


def test_synced_for_part_of_a_block_clears_nothing_of_it(rig):
    """Marks clear per 4 KiB block: a SYNCED clears the blocks it covers whole,
    and nothing of a block it covers in part (here block 1 and block 33)."""
    agent, vol, conn, hub = rig()
    with agent.lock:
        vol.bitmap.mark(range(0, 3))
        vol.bitmap.lose(range(0, 3), 1)
    hub.send(p.Read(request_id=12, volume=1, offset=4096 + 512, length=2 * CHUNK))
    hub.recv_until(p.MsgType.READ_REPLY)
    hub.send(p.Synced(request_id=12, volume=1, offset=4096 + 512, length=2 * CHUNK))
    hub.send(p.Ping(request_id=13, sent_ns=1))
    hub.recv_until(p.MsgType.PONG)
    assert vol.bitmap.extents() == [(0, 2 * 4096), (2 * CHUNK + 4096, CHUNK - 4096)], \
        "only blocks 2 to 32 were read whole"


def test_a_burst_of_frames_from_the_hub_takes_one_recv(rig):
    """The recv thread reads the hub's frames through a buffer (a sync's
    READs come eight to a send): 40 PINGs already in the socket take one
    recv, not one per frame, and each gets its PONG, in order."""
    agent, vol, conn, hub = rig(start=False)
    counted = conn.sock = CountingSocket(conn.sock)
    hub.sock.sendall(b"".join(p.encode(p.Ping(request_id=i, sent_ns=i)) for i in range(1, 41)))
    conn.start()
    pongs = [hub.recv_until(p.MsgType.PONG)[0] for _ in range(40)]
    assert [m.request_id for m in pongs] == list(range(1, 41))
    assert counted.calls <= 2, f"{counted.calls} recvs: one for the burst, one waiting for more"


def test_a_write_the_hub_refuses_stays_marked_and_is_reported(rig):
    agent, vol, conn, hub = rig()
    agent.stream.protected_write(vol, 6 * CHUNK, 100, memoryview(b"r" * 100), Replies())
    msg = hub.recv()
    hub.send(p.Error(request_id=msg.request_id, code=p.ErrorCode.IO_ERROR, failed_type=msg.TYPE,
                     message="disk full"))
    dmap = hub.recv()
    assert dmap.request_id == 0 and dmap.extents == [(6 * CHUNK, 4096)], \
        "the 4 KiB block written, not its chunk"
    assert vol.bitmap.is_set(6)


def test_a_dirty_map_too_long_for_one_frame_is_coarsened(tmp_path):
    bm = ra.DirtyBitmap(str(tmp_path / "v.bitmap"), 1000 * 4096, 4096)
    try:
        for chunk in range(0, 1000, 3):
            bm.mark(range(chunk, chunk + 1))
        exact = bm.extents()
        assert len(exact) == 334
        coarse = bm.extents(limit=10)
        assert len(coarse) <= 10
        covered = {c for off, n in coarse for c in range(off // 4096, (off + n) // 4096)}
        assert set(bm.set_chunks()) <= covered, "a coarse map still covers every dirty chunk"
    finally:
        bm.close()


class FakeQMP:
    """QSD's job and node bookkeeping as the mirror's QMP commands see it,
    recording each command and whether ``mirror_lock`` was held for it."""

    def __init__(self, lock: threading.Lock, jobs: dict, nodes: set):
        self.lock, self.jobs, self.nodes = lock, jobs, nodes
        self.closed = threading.Event()
        self.commands: list[tuple[str, bool]] = []

    def execute(self, cmd: str, **args):
        self.commands.append((cmd, self.lock.locked()))
        if cmd == "query-block-jobs":
            return [{"device": job_id, "status": status, "io-status": "ok"}
                    for job_id, status in self.jobs.items()]
        if cmd == "query-named-block-nodes":
            return [{"node-name": name} for name in sorted(self.nodes)]
        if cmd == "x-debug-query-block-graph":
            return {"nodes": [], "edges": []}
        if cmd in ("block-job-cancel", "job-finalize"):
            self.jobs[args.get("device", args.get("id"))] = "concluded"
        elif cmd == "job-dismiss":
            del self.jobs[args["id"]]
        elif cmd == "blockdev-add":
            self.nodes.add(args["node-name"])
        elif cmd == "blockdev-del":
            self.nodes.discard(args["node-name"])
        elif cmd == "blockdev-mirror":
            self.jobs[args["job-id"]] = "ready"
        return {}


def test_once_unprotect_has_begun_the_jobs_thread_sets_no_mirror_up(tmp_path):
    """``protect --unprotect`` tears the mirrors down while the jobs thread
    still runs: a round of it must not find the job cancelled and start a
    new one into a target about to go away (the guest's writes would stall
    on it once the agent is gone)."""
    cfg = ra.Config(hub=("127.0.0.1", 1), agent_id="a1", secret=b"s" * 32, qmp="-",
                    nodes=[("disk0", "vol0")], state_dir=str(tmp_path / "state"))
    os.makedirs(cfg.state_dir)
    agent = ra.Agent(cfg)
    vol, side = agent.volumes[0], agent.qemu
    vol.bitmap = ra.DirtyBitmap(vol.bitmap_path, SIZE, CHUNK)
    job_id, target = vol.meta["job_id"], vol.meta["target_node"]
    vol.meta["mirror"] = True
    qmp = side.qmp = FakeQMP(side.mirror_lock, {job_id: "ready"}, {"disk0", target})
    try:
        side.check_jobs()
        assert vol.job_status == "ready" and qmp.jobs == {job_id: "ready"}
        side.unprotect()
        assert qmp.jobs == {} and target not in qmp.nodes
        assert all(locked for cmd, locked in qmp.commands
                   if cmd in ("block-job-cancel", "job-dismiss", "blockdev-del")), \
            "the teardown holds mirror_lock, so no round of the jobs thread runs inside it"
        assert not vol.meta["mirror"] and vol.meta["needs_verify"]
        side.check_jobs()
        assert qmp.jobs == {} and target not in qmp.nodes, \
            "the jobs thread set the mirror up again"
        assert "blockdev-mirror" not in [cmd for cmd, _ in qmp.commands]
    finally:
        vol.bitmap.close()
