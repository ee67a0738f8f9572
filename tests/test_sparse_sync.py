"""Sparse-aware FULL sync (feature EXTENTS): the hub asks EXTENT_QUERY, journals
the zero extents at the answer's place in the stream and READs only the data.
On a volume whose copy at the hub read as zeroes when the sync began, the zero
extents need no record, only their SYNCED.

A real in-process hub on 127.0.0.1:0 and ``SparseAgent``, a ``TestAgent`` that
offers EXTENTS and answers EXTENT_QUERY from its in-memory volume, atomically
with its writes (the stale-read rule, PROTOCOL.md [SY-16]).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading

import pytest

import protocol as p
import rephub
from hubtools import MemVolume, TestAgent, wait_detached, wait_until

MiB = 1024 * 1024
CHUNK = 65536
BLOCK = 4096          # the granularity SparseAgent sees zeroes at


class SparseAgent(TestAgent):
    """Offers EXTENTS; answers EXTENT_QUERY with runs of zero / non-zero blocks.

    ``max_extents`` cuts answers to a prefix; ``before_extents(msg)`` runs
    outside the stream lock before the answer is computed (a test's chance to
    race a write against it); ``stale`` computes the answer, then lets that
    hook write, then sends: the broken agent the stale-read rule forbids.
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.features = int(p.Feature.EXTENTS)
        self.queries: list[p.ExtentQuery] = []
        self.max_extents: int | None = None
        self.before_extents = None
        self.stale = False
        self.answer_with = None     # a test may send its own (bad) EXTENTS instead

    def extents_of(self, vol: MemVolume, offset: int, length: int) -> list:
        data = vol.read(offset, length)
        runs: list[list[int]] = []
        for pos in range(0, length, BLOCK):
            n = min(BLOCK, length - pos)
            zero = data[pos:pos + n].count(0) == n
            if runs and runs[-1][1] == zero:
                runs[-1][0] += n
            else:
                runs.append([n, zero])
        extents = [(n, p.EXTENT_ZERO if zero else 0) for n, zero in runs]
        return extents[:self.max_extents] if self.max_extents else extents

    def on_EXTENT_QUERY(self, msg: p.ExtentQuery) -> None:
        self.queries.append(msg)
        if self.answer_with is not None:
            self.send(self.answer_with(msg))
            return
        vol = self.volumes[msg.volume]
        if self.stale:
            extents = self.extents_of(vol, msg.offset, msg.length)
            if self.before_extents:
                self.before_extents(msg)
            with self.stream_lock:
                self.send(p.Extents(request_id=msg.request_id, volume=msg.volume,
                                    offset=msg.offset, length=msg.length, extents=extents))
            return
        if self.before_extents:
            self.before_extents(msg)
        with self.stream_lock:  # SY-16: the answer and the writes it reflects, in order
            extents = self.extents_of(vol, msg.offset, msg.length)
            self.send(p.Extents(request_id=msg.request_id, volume=msg.volume,
                                offset=msg.offset, length=msg.length, extents=extents))


def sparse_volume(size: int, pieces: int, seed: int = 1) -> tuple[MemVolume, int]:
    """A volume with ``pieces`` random 64 KiB pieces of data; (volume, data bytes)."""
    rng = random.Random(seed)
    vol = MemVolume(size)
    offsets = rng.sample(range(0, size // CHUNK), pieces)
    for chunk in offsets:
        vol.write(chunk * CHUNK + rng.randrange(0, CHUNK // 2, 512),
                  rng.randbytes(CHUNK // 2) + b"\x01")
    return vol, pieces * CHUNK


def replica(hub, name: str) -> tuple[bytes, int]:
    """The replica's bytes and its allocated size."""
    hub.store.applier.wait_applied(hub.store.journal.durable_seq)
    path = os.path.join(hub.store.dir, "volumes", name, "replica")
    with open(path, "rb") as f:
        return f.read(), os.stat(path).st_blocks * 512


def zero_records(hub, vid: int) -> list:
    """The ZERO records of volume ``vid`` in the hub's journal."""
    return [r for r in hub.store.journal.records
            if r.kind == rephub.RecordKind.ZERO and r.volume == vid]


def cut_short(hub, secret, name: str, vol: MemVolume, reads: int, applied=True) -> None:
    """Begin the first sync of ``vol`` as ``name``, answer only its first
    ``reads`` READs and end the connection once they are durable, and in the
    replica if ``applied``: the hub's copy holds that data, and the sync is
    owed, so the next ATTACH is a FULL over that copy."""
    with SparseAgent(hub.address, "a1", secret).connect() as agent:
        answered = set()

        def first_reads(msg):
            if len(answered) < reads:
                answered.add(msg.request_id)
                SparseAgent.on_READ(agent, msg)
        agent.on_READ = first_reads
        agent.attach(name, vol)
        wait_until(lambda: len({s.request_id for s in agent.synced} & answered) == reads, 10,
                   f"the first {reads} READs to be SYNCED")
        if applied:
            assert replica(hub, name)[1] > 0, "the hub's copy holds data"
    wait_detached(hub, name)


def wait_consistent(hub, name: str, timeout: float = 30.0):
    wait_until(lambda: hub.store.volume(name).state == rephub.VolState.CONSISTENT
               and hub.store.volume(name).sync is None, timeout, f"{name} consistent")
    return hub.store.volume(name)


def test_full_sync_reads_only_the_data_and_keeps_holes(hub_a1):
    hub, secret = hub_a1
    vol, data_bytes = sparse_volume(64 * MiB, 20)
    with SparseAgent(hub.address, "a1", secret).connect() as agent:
        assert agent.granted == p.Feature.EXTENTS
        vid, plan = agent.attach("sparse", vol)
        assert plan == p.SyncPlan.FULL
        hvol = wait_consistent(hub, "sparse")
        data, allocated = replica(hub, "sparse")
        assert data == bytes(vol.buf)
        assert not zero_records(hub, vid)   # the new replica read as zeroes already
        assert agent.queries and all(q.volume == vid for q in agent.queries)
        read = sum(r.length for r in agent.reads)
        assert data_bytes <= read <= 2 * data_bytes       # pieces are whole chunks
        assert allocated <= 2 * data_bytes               # zero extents stayed holes
        st = hvol.last_sync
        assert st["bytes_done"] == st["bytes_total"] == 64 * MiB
        assert st["bytes_fetched"] == read
        # Every byte is covered by a SYNCED: of a READ or of a zero extent.
        covered = sorted((s.offset, s.offset + s.length) for s in agent.synced)
        pos = 0
        for start, end in covered:
            assert start <= pos
            pos = max(pos, end)
        assert pos == 64 * MiB


def test_without_the_feature_the_hub_grants_nothing_and_reads_everything(hub_a1):
    hub, secret = hub_a1
    vol, _ = sparse_volume(8 * MiB, 3)
    with TestAgent(hub.address, "a1", secret).connect() as agent:
        assert agent.granted == 0
        agent.attach("dense", vol)
        wait_consistent(hub, "dense")
        assert sum(r.length for r in agent.reads) == 8 * MiB
        assert replica(hub, "dense")[0] == bytes(vol.buf)


@pytest.mark.parametrize("max_extents", [1, 2])
def test_prefix_answers_are_asked_again_for_the_rest(hub_a1, max_extents):
    hub, secret = hub_a1
    vol, _ = sparse_volume(16 * MiB, 12, seed=max_extents)
    # Unaligned data too: a prefix may end inside a chunk.
    vol.write(5 * MiB + 1000, b"\x07" * 3000)
    with SparseAgent(hub.address, "a1", secret).connect() as agent:
        agent.max_extents = max_extents
        agent.attach("prefix", vol)
        wait_consistent(hub, "prefix")
        assert replica(hub, "prefix")[0] == bytes(vol.buf)
        assert len(agent.queries) > 12
        starts = [q.offset for q in agent.queries]
        assert starts[0] == 0 and len(set(starts)) == len(starts)


@pytest.mark.parametrize("stale", [False, True])
@pytest.mark.parametrize("fresh", [True, False])
def test_a_write_racing_an_extents_answer_is_not_lost(hub_a1, stale, fresh):
    """Writes land in zero regions while the hub asks about them.  A correct
    agent's answer is ordered with its writes, so the replica ends equal to the
    volume; the broken ``stale`` agent shows the test would notice where the
    hub's copy held data before (not ``fresh``): the hub zeroes a write that
    was sent before the stale answer.  Over a copy that read as zeroes the hub
    writes no zeroes, so not even a stale answer loses the write."""
    hub, secret = hub_a1
    size = 8 * MiB
    if not fresh:
        old = MemVolume(size)
        old.write(2 * MiB, b"\x33" * (2 * MiB))      # around the race's write
        cut_short(hub, secret, "race", old, reads=1)
    vol = MemVolume(size)
    with SparseAgent(hub.address, "a1", secret).connect() as agent:
        agent.stale = stale
        vid_box = {}

        def race(msg):  # one write into a region the answer will call zero
            vid_box["req"] = agent.write(msg.volume, msg.offset + 3 * MiB, b"\x5a" * 8192)

        agent.before_extents = race
        vid, _ = agent.attach("race", vol)
        wait_consistent(hub, "race")
        agent.expect_ack(vid_box["req"])
        rng = random.Random(4)
        for _ in range(20):  # and more writes while nothing is being asked (not on the race's)
            agent.expect_ack(agent.write(vid, rng.randrange(0, 2 * MiB), b"\x11" * 4096))
        data, _ = replica(hub, "race")
        if stale and not fresh:
            assert data[3 * MiB:3 * MiB + 8192] == bytes(8192)
            assert data != bytes(vol.buf)
        else:
            assert data == bytes(vol.buf)
        assert bool(zero_records(hub, vid)) == (not fresh)


@pytest.mark.parametrize("applied", [True, False])
def test_a_full_sync_over_an_older_copy_zeroes_what_is_now_zeroes(hub_a1, applied):
    """The hub's copy holds data from an earlier sync, cut short, where the
    volume now reads as zeroes: the zero extents are journaled as ZERO
    records, so the replica ends equal to the volume, its old data gone.
    Not ``applied``: the old data is still only in the journal when the FULL
    sync begins (the test holds the applier back), its replica all holes."""
    hub, secret = hub_a1
    size = 16 * MiB
    old, _ = sparse_volume(size, 60, seed=11)
    vol, _ = sparse_volume(size, 20, seed=12)
    with contextlib.ExitStack() as held:
        if not applied:
            held.enter_context(hub.store.apply_lock)
        cut_short(hub, secret, "older", old, reads=10, applied=applied)
        agent = SparseAgent(hub.address, "a1", secret).connect()
        vid, plan = agent.attach("older", vol)     # the sync has begun
    with agent:
        assert plan == p.SyncPlan.FULL
        wait_consistent(hub, "older")
        assert replica(hub, "older")[0] == bytes(vol.buf)
        assert zero_records(hub, vid)


def test_a_write_reported_dropped_gives_the_zero_extents_records(hub_a1):
    """A write the agent could not send (reported by an unsolicited DIRTY_MAP,
    ahead of every later frame [SY-19]) is missing from the hub's copy: from
    then on a zero extent may not read as zeroes there, so the zero extents
    of the answers that follow are journaled, and the reported region is
    READ before the sync ends."""
    hub, secret = hub_a1
    size = 8 * MiB
    half, _ = sparse_volume(4 * MiB, 12, seed=5)
    vol = MemVolume(size, bytes(half.buf) + bytes(size - half.size))   # data in the first half
    with SparseAgent(hub.address, "a1", secret).connect() as agent:
        agent.max_extents = 4            # several answers: the first before the drop
        dropped = {}

        def drop(msg):   # before the second answer: a write sent, then one over it dropped
            if len(agent.queries) != 2:
                return
            dropped["at"], dropped["query"] = 6 * MiB, msg.offset
            dropped["req"] = agent.write(msg.volume, dropped["at"], b"\x5a" * 8192)
            with agent.stream_lock:
                vol.write(dropped["at"], bytes(8192))
                agent.send(p.DirtyMap(request_id=0, volume=msg.volume,
                                      extents=[(dropped["at"], 8192)]))

        agent.before_extents = drop
        vid, _ = agent.attach("dropped", vol)
        wait_consistent(hub, "dropped")
        assert dropped, "no answer came after the drop"
        agent.expect_ack(dropped["req"])
        assert replica(hub, "dropped")[0] == bytes(vol.buf)
        zeros = zero_records(hub, vid)
        assert any(r.offset <= dropped["at"] and r.length > 8192 for r in zeros), \
            "the zero extent over the dropped write is journaled"
        assert all(r.offset >= dropped["query"] for r in zeros), \
            "the zero extents answered before the drop needed no record"


def test_concurrent_writes_during_a_sparse_sync_converge(hub_a1):
    hub, secret = hub_a1
    size = 32 * MiB
    vol, _ = sparse_volume(size, 30, seed=7)
    stop = threading.Event()
    with SparseAgent(hub.address, "a1", secret).connect() as agent:
        agent.max_extents = 16         # many queries, so writes race many answers
        vid, _ = agent.attach("busy", vol)
        rng = random.Random(3)
        reqs = []

        def writer():
            while not stop.is_set() and len(reqs) < 200:
                off = rng.randrange(0, size // BLOCK) * BLOCK
                if rng.random() < 0.3:
                    reqs.append(agent.zero(vid, off, BLOCK))
                else:
                    reqs.append(agent.write(vid, off, rng.randbytes(BLOCK)))

        t = threading.Thread(target=writer, name="test-writer")
        t.start()
        try:
            wait_consistent(hub, "busy", 60)
        finally:
            stop.set()
            t.join(10)
        for req in reqs:
            agent.expect_ack(req)
        assert replica(hub, "busy")[0] == bytes(vol.buf)


@pytest.mark.parametrize("bad", ["too_long", "zero_length", "unknown_flag", "wrong_range",
                                 "no_extent"])
def test_bad_extents_are_refused_and_end_the_sync(hub_a1, bad):
    hub, secret = hub_a1
    vol, _ = sparse_volume(4 * MiB, 2)

    def answer(msg):
        ext = {"too_long": [(msg.length, 0), (1, p.EXTENT_ZERO)],
               "zero_length": [(0, 0), (msg.length, 0)],
               "unknown_flag": [(msg.length, 2)],
               "wrong_range": [(msg.length - 4096, 0)],
               "no_extent": []}[bad]
        offset = msg.offset + (4096 if bad == "wrong_range" else 0)
        return p.Extents(request_id=msg.request_id, volume=msg.volume, offset=offset,
                         length=msg.length - (4096 if bad == "wrong_range" else 0),
                         extents=ext)

    with SparseAgent(hub.address, "a1", secret).connect() as agent:
        agent.answer_with = answer
        vid, _ = agent.attach("bad", vol)
        err = wait_until(lambda: next((e for e in agent.errors
                                       if e.failed_type == p.MsgType.EXTENTS), None),
                         10, "ERROR for the bad EXTENTS")
        assert err.code == p.ErrorCode.INVALID
        hvol = hub.store.volume("bad")
        wait_until(lambda: hvol.sync is None, 10, "the sync to end")
        assert hvol.state == rephub.VolState.INCONSISTENT
        assert hvol.last_sync["error"]
        assert not agent.reads                  # nothing of the refused answer was used
        # The connection goes on: a write is still acknowledged.
        agent.expect_ack(agent.write(vid, 0, b"x" * 512))


def test_unsolicited_extents_are_refused(hub_a1):
    hub, secret = hub_a1
    vol = MemVolume(MiB)
    with SparseAgent(hub.address, "a1", secret).connect() as agent:
        vid, _ = agent.attach("u", vol)
        wait_consistent(hub, "u")
        agent.send(p.Extents(request_id=999, volume=vid, offset=0, length=MiB,
                             extents=[(MiB, p.EXTENT_ZERO)]))
        err = wait_until(lambda: next((e for e in agent.errors if e.request_id == 999), None),
                         10, "ERROR for the unsolicited EXTENTS")
        assert err.code == p.ErrorCode.INVALID


def test_a_bad_agent_request_sharing_an_id_with_a_query_leaves_the_sync_alone(hub_a1):
    """Request ids of the agent and of the hub are separate spaces: a refused
    WRITE numbered like an outstanding EXTENT_QUERY must not end that sync."""
    hub, secret = hub_a1
    vol, _ = sparse_volume(4 * MiB, 2)
    with SparseAgent(hub.address, "a1", secret).connect() as agent:
        held = []
        agent.on_EXTENT_QUERY = held.append            # held: answered below
        vid, _ = agent.attach("ids", vol)
        q = wait_until(lambda: held and held[0], 10, "the EXTENT_QUERY")
        frame = bytearray(p.encode(p.Write(request_id=q.request_id, volume=vid, offset=0,
                                           data=b"w" * 512)))
        frame[7] |= 0x02            # an undefined must-understand flag: refused by the codec
        frame[44:48] = rephub.zlib.crc32(frame[:44]).to_bytes(4, "big")
        agent.send_raw(bytes(frame))
        wait_until(lambda: any(e.request_id == q.request_id for e in agent.errors), 10,
                   "ERROR for the bad WRITE")
        assert hub.store.volume("ids").sync is not None, "the sync must go on"
        SparseAgent.on_EXTENT_QUERY(agent, q)
        wait_consistent(hub, "ids")
        assert replica(hub, "ids")[0] == bytes(vol.buf)
