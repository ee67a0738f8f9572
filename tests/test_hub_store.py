"""rephub's VolumeStore without a server: journal replay, undo log, points in time.

These drive the store API that recovery builds on (append_data,
applier.wait_applied, window.read_at, window.resolve_point) across close and
reopen.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import threading
import zlib

import pytest

import protocol as p
import rephub
from hubtools import make_agents_file, wait_until

MiB = 1024 * 1024


def open_store(path, **kw) -> rephub.VolumeStore:
    store = rephub.VolumeStore(str(path), **kw)
    store.open()
    store.start()
    return store


def durable(store, rec):
    assert store.journal.wait_durable(rec.seq, timeout=10)
    return rec.seq


def journal_only(tmp_path):
    """A store whose committer runs but whose applier does not (a crash before apply)."""
    store = rephub.VolumeStore(str(tmp_path))
    store.open()
    store.journal.start()
    return store


def abandon(store):
    store.journal.stop()
    store.journal.close()
    store.undo_log.close()
    for v in store.volumes.values():
        v.close()
    os.close(store.lock_fd)


def test_read_at_walks_undo_back_across_a_reopen(tmp_path):
    store = open_store(tmp_path)
    vol = store.create_volume("v", MiB, 65536, "a1", bytes(16))
    seqs = [durable(store, store.append_data(vol, 0, 8192, b"A" * 8192))]
    seqs.append(durable(store, store.append_data(vol, 4096, 8192, b"B" * 8192)))
    seqs.append(durable(store, store.append_data(vol, 0, 4096, None)))  # ZERO over data
    seqs.append(durable(store, store.append_data(vol, MiB - 4096, 4096, b"C" * 4096)))
    store.applier.wait_applied(seqs[-1])
    store.close()

    store = open_store(tmp_path)
    try:
        vol = store.volume("v")
        expect = [b"A" * 8192 + bytes(4096),
                  b"A" * 4096 + b"B" * 8192,
                  bytes(4096) + b"B" * 8192,
                  bytes(4096) + b"B" * 8192]
        for seq, image in zip(seqs, expect):
            assert store.window.read_at(vol, seq, 0, 12288) == image, seq
        assert store.window.read_at(vol, seqs[0] - 1, 0, 12288) is None  # before any write: zeroes
        assert store.window.read_at(vol, seqs[2], MiB - 4096, 4096) is None
        assert store.window.read_at(vol, seqs[3], MiB - 4096, 4096) == b"C" * 4096
        with pytest.raises(p.OutOfRange):
            store.window.read_at(vol, seqs[3], MiB - 4096, 8192)
    finally:
        store.close()


def test_read_summed_gives_the_crc_of_exactly_the_bytes_it_returns(tmp_path):
    """The CRC a read gives for its reply (from the chunk sums it checked) is
    zlib's CRC-32 of the bytes returned, for chunk-aligned ranges, ranges cut
    inside a chunk at either edge, and the volume's short last chunk; where an
    undo record was laid over the bytes there is none (the reply sums them)."""
    size = 5 * 65536 + 12345                     # a short last check chunk
    store = open_store(tmp_path)
    try:
        vol = store.create_volume("v", size, 65536, "a1", bytes(16))
        rnd = random.Random(7)
        image = bytearray(rnd.randbytes(size))
        first = durable(store, store.append_data(vol, 0, size, bytes(image)))
        store.applier.wait_applied(first)
        ranges = [(0, size), (0, 65536), (65536, 2 * 65536), (1, 65536), (100, 3 * 65536),
                  (65536 - 1, 2), (4 * 65536, size - 4 * 65536), (size - 1, 1),
                  (5 * 65536 + 7, 100)]
        ranges += [(o, rnd.randrange(1, size - o + 1))
                   for o in (rnd.randrange(size) for _ in range(40))]
        for off, n in ranges:
            data, crc = store.window.read_summed(vol, first, off, n)
            assert data == image[off:off + n], (off, n)
            assert crc == zlib.crc32(image[off:off + n]), (off, n)
        image[70000:70010] = b"X" * 10
        last = durable(store, store.append_data(vol, 70000, 10, b"X" * 10))
        store.applier.wait_applied(last)
        data, crc = store.window.read_summed(vol, last, 65536, 65536)
        assert data == image[65536:2 * 65536] and crc == zlib.crc32(data)
        data, crc = store.window.read_summed(vol, first, 65536, 65536)   # the undo laid over
        assert bytes(data) != image[65536:2 * 65536] and crc is None
        assert store.window.read_summed(vol, first, 0, 10, check=False)[1] is None
    finally:
        store.close()


def test_read_at_answers_a_view_and_copies_only_to_lay_undo_over(tmp_path):
    """No undo record applies: a view of the bytes the replica's pread returned;
    one applies: a view of the copy it was laid over.  Either way a range that
    reads as zeroes is None, although the chunk read around it holds data."""
    store = open_store(tmp_path)
    try:
        vol = store.create_volume("v", MiB, 65536, "a1", bytes(16))
        first = durable(store, store.append_data(vol, 0, 4096, b"A" * 4096))
        durable(store, store.append_data(vol, 4096, 4096, bytes(4096)))  # zeroes, as data
        last = durable(store, store.append_data(vol, 8192, 4096, b"B" * 4096))
        store.applier.wait_applied(last)
        got = store.window.read_at(vol, last, 0, 12288)
        assert isinstance(got, memoryview) and isinstance(got.obj, bytes)
        assert got == b"A" * 4096 + bytes(4096) + b"B" * 4096
        assert store.window.read_at(vol, last, 4096, 4096) is None
        assert store.window.read_at(vol, last, 4096, 4097) == bytes(4096) + b"B"
        older = store.window.read_at(vol, first, 0, 12288)
        assert isinstance(older, memoryview) and isinstance(older.obj, bytearray)
        assert older == b"A" * 4096 + bytes(8192)
        assert store.window.read_at(vol, first, 4096, 8192) is None   # undone: zeroes again
    finally:
        store.close()


def test_unapplied_records_are_replayed_on_open(tmp_path):
    store = journal_only(tmp_path)
    vol = store.create_volume("v", MiB, 65536, "a1", bytes(16))
    rec = store.append_data(vol, 65536, 4096, b"R" * 4096)
    durable(store, rec)
    abandon(store)

    store = open_store(tmp_path)
    try:
        vol = store.volume("v")
        store.applier.wait_applied(rec.seq)
        with open(os.path.join(vol.dir, "replica"), "rb") as f:
            f.seek(65536)
            assert f.read(4096) == b"R" * 4096
    finally:
        store.close()


def test_undo_records_after_the_last_commit_are_dropped(tmp_path, caplog):
    store = open_store(tmp_path)
    vol = store.create_volume("v", MiB, 65536, "a1", bytes(16))
    seq = durable(store, store.append_data(vol, 0, 4096, b"x" * 4096))
    store.applier.wait_applied(seq)
    store.close()
    # A batch whose undo was written but never committed (crash before its fdatasync).
    undo_dir = os.path.join(str(tmp_path), "undo")
    seg = sorted(os.listdir(undo_dir))[-1]
    payload = rephub.UNDO_COUNT.pack(1) + rephub.UNDO_EXTENT.pack(0, 4096, rephub.UNDO_HOLE)
    with open(os.path.join(undo_dir, seg), "ab") as f:
        f.write(rephub.encode_record(rephub.RecordKind.UNDO, 0, seq + 1, 0, vol.id, 0, 4096,
                                     len(payload), rephub.zlib.crc32(payload)) + payload)
    with caplog.at_level(logging.WARNING, logger="rephub"):
        store = open_store(tmp_path)
    try:
        assert "after the last commit" in caplog.text
        assert [u.seq for u in store.volume("v").undo] == [seq]
    finally:
        store.close()


def test_corruption_before_the_last_segment_keeps_every_later_record(tmp_path, caplog):
    """Damage at rest in an older segment is reported, copied aside and skipped
    (its record is lost, the seqs stay in order); nothing after it is cut."""
    store = open_store(tmp_path, segment_bytes=16 * 1024)
    vol = store.create_volume("v", MiB, 65536, "a1", bytes(16))
    payloads = {}
    for i in range(8):
        data = os.urandom(8192)
        payloads[durable(store, store.append_data(vol, i * 8192, 8192, data))] = data
    store.applier.wait_applied(store.journal.durable_seq)
    store.close()
    first = sorted(os.listdir(tmp_path / "journal"))[0]
    with open(tmp_path / "journal" / first, "r+b") as f:
        f.seek(rephub.RECORD.size + 10)
        f.write(b"\xff")
    with caplog.at_level(logging.INFO, logger="rephub"):
        store = rephub.VolumeStore(str(tmp_path))
        store.open()
    try:
        assert [seq for seq, _, _ in store.journal.lost] == [1]
        kept = {r.seq: store.journal.log.read_payload(r) for r in store.journal.records
                if r.kind == rephub.RecordKind.WRITE}
        assert kept == {seq: data for seq, data in payloads.items() if seq != 1}
        assert os.path.exists(store.journal.log.damage[0]["copy"])
        assert "is damaged at bytes" in caplog.text
    finally:
        store.close()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="rephub"):
        store = rephub.VolumeStore(str(tmp_path))
        store.open()   # the same damage, already handled: not reported as new
    store.close()
    assert "is damaged" not in caplog.text


def test_data_directory_is_locked_by_its_user(tmp_path):
    store = open_store(tmp_path)
    try:
        with pytest.raises(rephub.StoreError, match="in use"):
            rephub.VolumeStore(str(tmp_path)).open()
    finally:
        store.close()


def test_volume_names_never_leave_the_data_directory(tmp_path):
    store = open_store(tmp_path)
    try:
        for bad in ("..", "../x", "a/b", "", ".x"):
            with pytest.raises(p.InvalidField):
                store.create_volume(bad, MiB, 65536, "a1", bytes(16))
        assert os.listdir(tmp_path / "volumes") == []
    finally:
        store.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_journal_truncated_at_a_random_byte_drops_only_the_torn_record(tmp_path, caplog, seed):
    rnd = random.Random(seed)
    store = journal_only(tmp_path)
    vol = store.create_volume("v", MiB, 65536, "a1", bytes(16))
    recs = [store.append_data(vol, i * 65536, 65536, bytes([i + 1]) * 65536) for i in range(5)]
    durable(store, recs[-1])
    abandon(store)
    last = recs[-1]
    path = os.path.join(str(tmp_path), "journal", f"{last.segment:020d}.seg")
    cut = rnd.randrange(last.pos - rephub.RECORD.size + 1, last.pos + last.payload_length)
    os.truncate(path, cut)
    with caplog.at_level(logging.WARNING, logger="rephub"):
        store = open_store(tmp_path)
    try:
        assert "torn tail in" in caplog.text
        assert store.journal.last_seq == recs[-2].seq
        vol = store.volume("v")
        store.applier.wait_applied(recs[-2].seq)
        with open(os.path.join(vol.dir, "replica"), "rb") as f:
            image = f.read()
        for i in range(4):
            assert image[i * 65536:(i + 1) * 65536] == bytes([i + 1]) * 65536
        assert image[4 * 65536:5 * 65536] == bytes(65536)  # the torn record: never applied
        # The journal goes on from the cut: the next record gets the torn one's seq.
        assert store.append_data(vol, 0, 512, b"n" * 512).seq == last.seq
    finally:
        store.close()


def test_ranges_refuses_exactly_the_overlapping_ones():
    """The applier's batch test (rephub.Ranges) against the obvious quadratic one."""
    rng = random.Random(7)
    for _ in range(500):
        ranges, taken = rephub.Ranges(), []
        for _ in range(rng.randint(1, 40)):
            start = rng.randrange(0, 300)
            end = start + rng.randint(1, 25)
            overlaps = any(s < end and start < e for s, e in taken)
            assert ranges.add(start, end) is not overlaps, (taken, start, end)
            if not overlaps:
                taken.append((start, end))


# -- journal segments written over -------------------------------------------------------

SMALL_SEGMENT = 8192


@pytest.fixture
def any_free_space(monkeypatch):
    """Spares are kept whatever share of this machine's disk is free (that rule
    is tested on a small tmpfs in test_hub_storage_faults)."""
    monkeypatch.setattr(rephub, "SPARE_FREE_FRACTION", 1 << 40)


def payload_of(seq: int) -> bytes:
    """Record ``seq``'s payload: its own bytes and length, so a stale one shows."""
    return random.Random(seq).randbytes(200 + seq * 37 % 1500)


def append_records(seglog, first: int, end: int) -> None:
    for seq in range(first, end):
        data = payload_of(seq)
        seglog.append(seq, rephub.RecordKind.WRITE, 0, seq, 1, 0, len(data), [data])


def reopened(directory) -> dict[int, bytes]:
    """Scan ``directory`` afresh: seq -> payload (no damage allowed)."""
    again = rephub.SegmentLog(str(directory), "journal", SMALL_SEGMENT, rephub.SPARE_BYTES)
    try:
        records = again.open()
        assert again.damage == []
        return {r.seq: again.read_payload(r) for r in records}
    finally:
        again.close()


def recycling_log(directory):
    """A journal's SegmentLog whose three oldest segments were dropped as spares:
    return it, the next seq, the first live seq and {spare bound: its bytes}."""
    seglog = rephub.SegmentLog(str(directory), "journal", SMALL_SEGMENT, rephub.SPARE_BYTES)
    seglog.open()
    append_records(seglog, 1, 61)
    segments = seglog.segments()
    assert len(segments) >= 5
    old = {}
    for seg, nxt in zip(segments[:3], segments[1:4]):
        seglog.delete_segment(seg, spare_bound=nxt)
        old[nxt] = open(seglog.spare_path(nxt), "rb").read()
    return seglog, 61, segments[3], old


def test_dropped_segments_are_written_over_and_their_old_records_never_read(tmp_path, caplog,
                                                                          any_free_space):
    journal = tmp_path / "journal"
    seglog, nxt, first, old = recycling_log(journal)
    assert sorted(n for n in os.listdir(journal) if not n.endswith(".seg")) == [
        f"{b:020d}.spare" for b in sorted(old)]
    inodes = {os.stat(seglog.spare_path(b)).st_ino for b in old}
    end = nxt
    while seglog.recycled < 3 or os.path.getsize(seglog.path(seglog.segment)) <= seglog.size:
        append_records(seglog, end, end + 1)   # until the last spare is partly written over
        end += 1
        if seglog.recycled == 1 and seglog.size > SMALL_SEGMENT // 4:
            seglog._roll(end)                  # the first one ends early, as if full
    assert seglog.spares == {}
    reused = [s for s in seglog.segments() if os.stat(seglog.path(s)).st_ino in inodes]
    assert len(reused) == 3 and reused[-1] == seglog.segment
    # Bytes of the file's earlier use past the last record: what the scan must skip.
    assert any(os.path.getsize(seglog.path(s)) > seglog.segment_sizes[s] for s in reused[:2])
    expected = {seq: payload_of(seq) for seq in range(first, end)}
    crashed = tmp_path / "crashed"
    shutil.copytree(journal, crashed)     # as a SIGKILL leaves it: nothing cut
    with caplog.at_level(logging.INFO, logger="rephub"):
        assert reopened(crashed) == expected
    assert "earlier use" in caplog.text and "WARNING" not in caplog.text
    seglog.close()                        # a clean stop cuts the last one to its end
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rephub"):
        assert reopened(journal) == expected
    assert "earlier use" not in caplog.text
    # The log goes on after the reopen, over the crashed copy's recycled tail too.
    again = rephub.SegmentLog(str(crashed), "journal", SMALL_SEGMENT, rephub.SPARE_BYTES)
    again.open()
    append_records(again, end, end + 20)
    again.close()
    assert reopened(crashed) == {seq: payload_of(seq) for seq in range(first, end + 20)}


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_crash_inside_a_written_over_segment_keeps_exactly_the_whole_new_records(
        tmp_path, seed, any_free_space):
    """The last segment after a crash: its new bytes up to some point, then the
    bytes of the file's earlier use.  The scan keeps each new record wholly
    before that point and nothing else, wherever the point falls."""
    rnd = random.Random(seed)
    seglog, nxt, first, old = recycling_log(tmp_path / "journal")
    bound = min(old)
    end = nxt
    while seglog.recycled == 0 or seglog.size < len(old[bound]) // 2:
        append_records(seglog, end, end + 1)
        end += 1
    current, new_end = seglog.segment, seglog.size
    assert seglog.recycled == 1 and new_end < len(old[bound])
    new = open(seglog.path(current), "rb").read()
    record_ends = {}                      # seq -> end of its record in the segment
    for seq in range(current, end):
        record_ends[seq] = (record_ends.get(seq - 1, 0) + rephub.RECORD.size
                            + len(payload_of(seq)))
    assert record_ends[end - 1] == new_end
    seglog.close()
    cuts = [0, new_end, *(rnd.randrange(1, new_end) for _ in range(12)),
            *(record_ends[s] for s in rnd.sample(sorted(record_ends), 3))]
    for cut in cuts:
        crashed = tmp_path / f"cut{cut}"
        shutil.copytree(tmp_path / "journal", crashed)
        with open(crashed / f"{current:020d}.seg", "wb") as f:
            f.write(new[:cut] + old[bound][cut:])
        kept = [s for s, e in record_ends.items() if e <= cut]
        want = {seq: payload_of(seq) for seq in range(first, current)} | {
            seq: payload_of(seq) for seq in kept}
        assert reopened(crashed) == want, f"cut at byte {cut}"
        shutil.rmtree(crashed)


def test_a_spare_is_never_written_over_by_an_older_seq(tmp_path, any_free_space):
    """A spare whose records are not all older than the new segment's first seq
    (the journal was started again lower) is deleted, not used."""
    seglog, nxt, first, old = recycling_log(tmp_path / "journal")
    bound = max(old)
    seglog.spares = {bound: len(old[bound])}
    for b in old:
        if b != bound:
            os.unlink(seglog.spare_path(b))
    seglog._roll(bound - 1)
    assert seglog.recycled == 0 and not os.path.exists(seglog.spare_path(bound))
    assert os.path.getsize(seglog.path(bound - 1)) == 0
    seglog.close()


def test_no_spare_is_kept_while_the_journal_refuses_records(tmp_path, any_free_space):
    health = rephub.Health()
    journal = rephub.Journal(str(tmp_path / "journal"), SMALL_SEGMENT, health)
    journal.open()
    for seq in range(1, 31):
        journal.append(rephub.RecordKind.WRITE, 1, 0, 700, [payload_of(seq)[:700]])
    first, nxt = journal.log.segments()[:2]
    health.fail(rephub.Fault.JOURNAL_FULL, "append failed: no space")
    journal.drop_segment(first, nxt)
    assert journal.log.spares == {} and not os.path.exists(journal.log.spare_path(nxt))
    health.clear(rephub.Fault.JOURNAL_FULL)
    first, nxt = journal.log.segments()[:2]
    journal.drop_segment(first, nxt)
    assert list(journal.log.spares) == [nxt] and os.path.exists(journal.log.spare_path(nxt))
    journal.close()


def resident_bytes(path) -> int:
    """How much of ``path`` is in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                          str(path)], capture_output=True, text=True, check=True, timeout=30)
    return int(out.stdout.split()[0])


def test_applied_journal_records_leave_the_page_cache(tmp_path):
    """The applier lets the kernel drop the pages of what it applied, so the
    journal's appends reuse them instead of filling memory with history."""
    store = open_store(tmp_path)
    try:
        vol = store.create_volume("v", 8 * MiB, 65536, "a1", bytes(16))
        recs = [store.append_data(vol, i * MiB, MiB, os.urandom(MiB)) for i in range(8)]
        durable(store, recs[-1])
        segment = store.journal.log.path(recs[0].segment)
        assert resident_bytes(segment) >= 4 * MiB      # written a moment ago
        store.applier.wait_applied(recs[-1].seq)
        # The applier drops the pages just after it publishes applied_seq
        # (outside the apply lock that readers wait on), so wait for it.
        wait_until(lambda: resident_bytes(segment) < MiB, what="applied pages dropped")
        with open(os.path.join(vol.dir, "replica"), "rb") as f:
            assert f.read(MiB) == store.journal.log.read_payload(recs[0])
    finally:
        store.close()


def test_a_zeroed_range_leaves_the_sums_of_what_the_replica_reads(tmp_path):
    """A ZERO's sums are not read back for the chunks it covers whole (they are
    zeroes); the chunks it cuts at either edge and a short last chunk are, and
    every sum kept equals the CRC-32 of the chunk as the replica holds it."""
    chunk = rephub.CHECK_CHUNK
    size = 8 * chunk + 20 * 1024                  # a short last chunk
    store = open_store(tmp_path)
    try:
        vol = store.create_volume("v", size, 65536, "a1", bytes(16))
        durable(store, store.append_data(vol, 0, size, os.urandom(size)))
        for offset, length in ((chunk + 4096, 3 * chunk), (5 * chunk, size - 5 * chunk),
                               (0, 8192)):
            seq = durable(store, store.append_data(vol, offset, length, None))
            store.applier.wait_applied(seq)
            with open(os.path.join(vol.dir, "replica"), "rb") as f:
                image = f.read()
            kept = vol.sums.expected(0, -(-size // chunk))
            assert kept == [rephub.ReplicaSums.kept(zlib.crc32(image[c:c + chunk]))
                            for c in range(0, size, chunk)], (offset, length)
            assert image[offset:offset + length] == bytes(length)
    finally:
        store.close()


def test_the_applier_is_not_woken_by_each_commit_but_by_a_reader(tmp_path, monkeypatch):
    """Commits wake the ackers, not the applier: it looks every APPLY_POLL
    (here an hour), so 20 commits cost it no look.  A reader waiting in
    ``wait_applied`` wakes it at once, gathering or not."""
    monkeypatch.setattr(rephub, "APPLY_POLL", 3600.0)
    monkeypatch.setattr(rephub, "APPLY_DELAY", 3600.0)
    store = open_store(tmp_path)
    looks = []
    real_ready = rephub.Applier._apply_ready

    def apply_ready(self):
        looks.append(self.journal.durable_seq)
        return real_ready(self)
    try:
        vol = store.create_volume("v", MiB, 65536, "a1", bytes(16))
        store.applier.wait_applied(store.journal.last_seq, timeout=10)   # the applier sleeps
        monkeypatch.setattr(rephub.Applier, "_apply_ready", apply_ready)
        recs = [durable(store, store.append_data(vol, i * 4096, 4096, os.urandom(4096)))
                for i in range(20)]
        assert len(looks) <= 1 and store.applier.applied_seq < recs[0]
        store.applier.wait_applied(recs[-1], timeout=10)
        assert store.applier.applied_seq >= recs[-1]
    finally:
        store.close()


def test_the_applier_runs_at_background_priority_and_the_write_path_does_not(tmp_path):
    """The applier's batches yield the CPU to the threads a write waits for:
    it runs at BACKGROUND_NICE, the committer (and the caller) at their own."""
    store = open_store(tmp_path)
    try:
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert own < rephub.BACKGROUND_NICE
        applier = store.applier.thread.native_id
        wait_until(lambda: os.getpriority(os.PRIO_PROCESS, applier) == rephub.BACKGROUND_NICE,
                   10, "the applier to lower its priority")
        committer = next(t for t in threading.enumerate() if t.name == "journal-committer")
        assert os.getpriority(os.PRIO_PROCESS, committer.native_id) == own
    finally:
        store.close()


def test_the_scrub_runs_at_background_priority_and_the_accept_loop_does_not(tmp_path):
    """The scrub reads whole replicas in the background: BACKGROUND_NICE;
    the hub's accept thread stays at the caller's priority."""
    agents = str(tmp_path / "agents")
    make_agents_file(agents, "a1")
    hub = rephub.Hub(str(tmp_path / "data"), agents, scrub_interval=3600.0)
    hub.start()
    try:
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        threads = {t.name: t.native_id for t in hub.threads}
        wait_until(lambda: os.getpriority(os.PRIO_PROCESS, threads["scrub"])
                   == rephub.BACKGROUND_NICE, 10, "the scrub to lower its priority")
        assert os.getpriority(os.PRIO_PROCESS, threads["accept"]) == own
    finally:
        hub.shutdown(grace=5)


def test_background_priority_only_ever_lowers():
    """A thread already nicer than BACKGROUND_NICE stays so (raising a
    priority needs a privilege the hub should not use); one at the usual is lowered."""
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert own < rephub.BACKGROUND_NICE
    seen = []

    def run(start):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, start)
        rephub.background_priority()
        seen.append(os.getpriority(os.PRIO_PROCESS, tid))
    for start in (own, rephub.BACKGROUND_NICE + 5):
        t = threading.Thread(target=run, args=(start,))
        t.start()
        t.join(10)
    assert seen == [rephub.BACKGROUND_NICE, rephub.BACKGROUND_NICE + 5]


def test_a_record_table_reads_as_the_list_of_its_records():
    """RecordTable, the journal's and the undo index's packed storage, against
    a plain list: every field at its widest (LOST records have pos -1)."""
    rng = random.Random(4)
    records = [rephub.Record(seq, 1_700_000_000_000_000_000 + seq * 7, rng.choice(list(
        rephub.RecordKind)), rng.randrange(256), rng.randrange(1 << 32), rng.randrange(1 << 50),
        rng.randrange(1 << 40), rng.randrange(1 << 32), rng.randrange(1 << 32),
        seq - seq % 100, -1 if rng.random() < 0.1 else rng.randrange(1 << 40))
        for seq in range(1000, 1400)]
    table = rephub.RecordTable(records[:10])
    table.extend(records[10:])
    assert len(table) == len(records) and bool(table) and not rephub.RecordTable()
    assert list(table) == records
    assert table[0] == records[0] and table[-1] == records[-1] and table[5:9] == records[5:9]
    assert table[table.span("seq", 1100, 1199)] == records[100:200]
    assert table[table.span("segment", 1200, 1200)] == [r for r in records if r.segment == 1200]
    del table[table.span("seq", 1050, 1149)]
    del records[50:150]
    del table[:20]
    del records[:20]
    table.append(records[0])
    records.append(records[0])
    assert list(table) == records
    assert list(table.column("offset")) == [r.offset for r in records]
    assert all(table.field(i, name) == getattr(rec, name)
               for i, rec in enumerate(records) for name in rephub.RecordTable.FIELDS)


def test_a_time_names_the_last_record_stamped_at_or_before_it(tmp_path):
    store = open_store(tmp_path)
    try:
        vol = store.create_volume("v", MiB, 65536, "a1", bytes(16))
        recs = [store.append_data(vol, i * 4096, 4096, os.urandom(4096)) for i in range(50)]
        durable(store, recs[-1])
        j = store.journal
        first = j.record(j.first_seq)
        assert [j.record_field(r.seq, "time_ns") for r in recs] == [r.time_ns for r in recs]
        assert j.record_field(j.first_seq - 1, "pos") is None
        assert j.record_field(j.last_seq + 1, "pos") is None
        assert j.seq_at_time(first.time_ns - 1) is None
        for rec in recs[:-1]:
            # The last record of that stamp (several may share one)
            same = max(r.seq for r in recs if r.time_ns == rec.time_ns)
            want = j.durable_seq if same == j.last_seq else same
            assert j.seq_at_time(rec.time_ns) == want
        assert j.seq_at_time(recs[-1].time_ns + 10**9) == j.durable_seq
    finally:
        store.close()


def test_replica_sums_follow_random_writes_and_zeroes_across_flushes(tmp_path):
    """ReplicaSums against the replica itself: after random WRITEs and ZEROs
    (whole chunks, cut chunks, the short last chunk, one chunk written again
    after a ZERO and zeroed again after a WRITE) the sums it gives equal the
    CRC-32 of each chunk as the file holds it, before and after each flush;
    a second ReplicaSums opened on the same directory reads what was flushed.
    Half the writes come with their data's sums (DataSums), as from the wire."""
    chunk = rephub.CHECK_CHUNK
    size = 40 * chunk + 12 * 1024
    rng = random.Random(31)
    fd = os.open(tmp_path / "replica", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    sums = rephub.ReplicaSums(str(tmp_path), size)
    sums.note_zeroes(fd, 0, size)                 # every chunk known from here on

    def truth():
        image = os.pread(fd, size, 0)
        return [rephub.ReplicaSums.kept(zlib.crc32(image[c:c + chunk]))
                for c in range(0, size, chunk)]
    try:
        for step in range(400):
            off = rng.randrange(0, size - 1)
            n = rng.randrange(1, min(size - off, 9 * chunk) + 1)
            if rng.random() < 0.5:
                data = os.urandom(n)
                os.pwrite(fd, data, off)
                # Half the writes bring the sums of the chunks they cover wholly.
                known = rephub.DataSums.of_frame(off, data)[1] if rng.random() < 0.5 else None
                sums.note(fd, off, n, known)
            else:
                rephub.write_zeroes(fd, off, n)
                sums.note_zeroes(fd, off, n)
            assert sums.expected(0, sums.chunks) == truth(), step
            if rng.random() < 0.2:
                sums.flush()
                assert not sums.pending and not sums.zeroed
                again = rephub.ReplicaSums(str(tmp_path), size)
                try:
                    assert again.expected(0, sums.chunks) == truth(), step
                finally:
                    again.close()
    finally:
        sums.close()
        os.close(fd)


def test_a_write_with_its_data_sums_reads_back_only_the_chunks_it_cuts(tmp_path):
    """The chunks a write covers wholly take the sums of its data; a chunk it
    covers in part, or the volume's short last chunk, is read back: noted
    through a descriptor that cannot read, only the first succeeds."""
    chunk = rephub.CHECK_CHUNK
    size = 8 * chunk + 512
    sums = rephub.ReplicaSums(str(tmp_path), size)
    unreadable = os.open(tmp_path / "replica", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        data = os.urandom(4 * chunk)
        crc, known = rephub.DataSums.of_frame(chunk + 100, data)
        assert crc == zlib.crc32(data) and known.first == 2 and len(known.crcs) == 3
        assert rephub.DataSums.of_frame(4096, data[:chunk]) == (zlib.crc32(data[:chunk]), None)
        sums.note(unreadable, 2 * chunk, 3 * chunk, known)
        assert sums.pending == {c: rephub.ReplicaSums.kept(zlib.crc32(
            data[c * chunk - chunk - 100:(c + 1) * chunk - chunk - 100])) for c in (2, 3, 4)}
        for cut in ((chunk + 100, 4 * chunk), (8 * chunk, 512)):
            with pytest.raises(OSError):
                sums.note(unreadable, *cut, rephub.DataSums.of_frame(cut[0], bytes(cut[1]))[1])
    finally:
        os.close(unreadable)
        sums.close()


def test_the_journal_keeps_a_bounded_number_of_data_sums(tmp_path, monkeypatch):
    """Sums wait in memory for their record's apply, at most DATA_SUMS_KEPT of
    them: past it a record is applied as one without (its chunks read back),
    and the replica's sums are right either way."""
    monkeypatch.setattr(rephub, "DATA_SUMS_KEPT", 2)
    chunk = rephub.CHECK_CHUNK
    store = journal_only(tmp_path)
    try:
        vol = store.create_volume("v", 4 * chunk, chunk, "a1", bytes(16))
        datas = [os.urandom(chunk) for _ in range(3)]
        for i, data in enumerate(datas):
            crc, sums = rephub.DataSums.of_frame(i * chunk, data)
            durable(store, store.append_data(vol, i * chunk, chunk, data, crc, sums=sums))
        assert len(store.journal.data_sums) == 2
        store.applier.apply_some(force=True)
        assert store.journal.data_sums == {}
        assert vol.sums.expected(0, 3) == [rephub.ReplicaSums.kept(zlib.crc32(d)) for d in datas]
    finally:
        abandon(store)


def test_a_zero_extent_over_a_terabyte_is_one_run_of_sums(tmp_path):
    """A sparse 1 TiB volume's first sync zeroes 16 Mi chunks: their sums are
    kept as one run until the flush writes them (not 16 Mi entries in memory),
    and a WRITE after the ZERO is newer than it."""
    chunk = rephub.CHECK_CHUNK
    size = 1 << 40
    fd = os.open(tmp_path / "replica", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    sums = rephub.ReplicaSums(str(tmp_path), size)
    try:
        zero = rephub.ReplicaSums.kept(zlib.crc32(bytes(chunk)))
        for off in range(0, size, rephub.ZERO_RECORD_MAX):
            sums.note_zeroes(fd, off, rephub.ZERO_RECORD_MAX)
        assert sums.zeroed == [range(0, size // chunk)] and not sums.pending
        data = os.urandom(chunk)
        os.pwrite(fd, data, 5_000_000 * chunk)
        sums.note(fd, 5_000_000 * chunk, chunk)
        want = rephub.ReplicaSums.kept(zlib.crc32(data))
        assert sums.expected(4_999_999, 3) == [zero, want, zero]
        sums.flush()
        again = rephub.ReplicaSums(str(tmp_path), size)
        try:
            assert again.expected(0, 2) == [zero, zero]
            assert again.expected(4_999_999, 3) == [zero, want, zero]
            assert again.expected(size // chunk - 2, 2) == [zero, zero]
        finally:
            again.close()
    finally:
        sums.close()
        os.close(fd)


def test_a_segment_written_over_a_spare_is_read_ahead_of_small_appends(tmp_path,
                                                                         any_free_space):
    """Small records would each read a page of the spare on the write's path if
    it is not cached: the journal asks the kernel for the spare's bytes ahead."""
    seglog = rephub.SegmentLog(str(tmp_path), "journal", 4 * MiB, rephub.SPARE_BYTES)
    seglog.open()
    seq = 1
    while len(seglog.segments()) < 2:             # one whole segment of 4 KiB records
        seglog.append(seq, rephub.RecordKind.WRITE, 0, seq, 1, 0, 4096, [bytes(4096)])
        seq += 1
    first, nxt = seglog.segments()
    seglog.delete_segment(first, spare_bound=nxt)
    spare = seglog.spare_path(nxt)
    with open(spare, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert resident_bytes(spare) < rephub.READ_AHEAD // 2
    inode = os.stat(spare).st_ino
    while seglog.recycled == 0:
        seglog.append(seq, rephub.RecordKind.WRITE, 0, seq, 1, 0, 4096, [bytes(4096)])
        seq += 1
    path = seglog.path(seglog.segment)
    assert os.stat(path).st_ino == inode
    wait_until(lambda: resident_bytes(path) >= rephub.READ_AHEAD,   # read in the background
               what="the spare read ahead")
    seglog.close()
