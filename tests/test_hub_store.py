"""rephub's VolumeStore without a server: journal replay, undo log, points in time.

These drive the store API that recovery builds on (append_data,
applier.wait_applied, window.read_at, window.resolve_point) across close and
reopen.
"""

from __future__ import annotations

import logging
import os
import random
import zlib

import pytest

import protocol as p
import rephub

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
