"""The agent's dirty bitmap at 4 KiB: the second level (VOLUME.bitmap.fine) and
the hub's side of it.

The rules run per 4 KiB block (docs/SEMANTICS.md "Agent's dirty bitmap"):
marks, ACKs, losses and partial SYNCEDs; the files survive a reopen, damage
and an upgrade from version 2 without ever saying less than was written;
and an agent SIGKILLed at random points while it marks random writes leaves
files that cover every write it reported done.  The hub READs the 4 KiB
extents it is given, and chunk-aligned ones from an agent that tracks only
chunks.
"""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import subprocess
import sys
import time
import types

import pytest

import protocol as p
import rephub
import repagent as ra
from hubtools import MemVolume, TestAgent, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 64 * 1024
BLOCK = 4096
SIZE = 16 * CHUNK
MiB = 1024 * 1024


@pytest.fixture
def bitmap(tmp_path):
    bm = ra.DirtyBitmap(str(tmp_path / "v.bitmap"), SIZE, CHUNK)
    yield bm
    bm.close()


def write(bm: ra.DirtyBitmap, offset: int, length: int, seq: int | None = None) -> ra.Span:
    """A guest write as the stream makes it: marked, then in flight (or lost at seq)."""
    span = bm.block_span(offset, length)
    bm.mark(span)
    if seq is None:
        bm.add_inflight(span)
    else:
        bm.lose(span, seq)
    return span


def reopen(bm: ra.DirtyBitmap) -> ra.DirtyBitmap:
    bm.close()                      # as a SIGKILL would leave it: the mmaps hold it
    return ra.DirtyBitmap(bm.path, bm.size, bm.chunk_size)


def slot_offsets(bm: ra.DirtyBitmap) -> dict[int, int]:
    """chunk -> the file offset of its slot in VOLUME.bitmap.fine."""
    return {c: bm.fine.offset(s) for c, s in bm.fine.slot_of.items()}


# ---------------------------------------------------------------------------
# Marks and clears, per block


def test_a_small_write_marks_its_blocks_not_its_chunk(bitmap):
    write(bitmap, 3 * CHUNK + 5 * BLOCK, BLOCK)
    write(bitmap, 7 * CHUNK + BLOCK - 512, 1024)          # straddles two blocks
    assert bitmap.is_set(3) and bitmap.is_set(7) and bitmap.dirty_count == 2
    assert bitmap.extents() == [(3 * CHUNK + 5 * BLOCK, BLOCK), (7 * CHUNK, 2 * BLOCK)]
    assert bitmap.dirty_block_bytes == 3 * BLOCK and bitmap.dirty_bytes == 2 * CHUNK


def test_an_ack_clears_its_blocks_and_the_bit_goes_with_the_last(bitmap):
    first = write(bitmap, 2 * CHUNK, BLOCK)
    second = write(bitmap, 2 * CHUNK + 8 * BLOCK, 2 * BLOCK)
    again = write(bitmap, 2 * CHUNK, BLOCK)                # the same block, twice in flight
    bitmap.ack(first)
    assert bitmap.extents() == [(2 * CHUNK, BLOCK), (2 * CHUNK + 8 * BLOCK, 2 * BLOCK)], \
        "the block still has a write in flight"
    bitmap.ack(again)
    assert bitmap.extents() == [(2 * CHUNK + 8 * BLOCK, 2 * BLOCK)] and bitmap.is_set(2)
    bitmap.ack(second)
    assert not bitmap.is_set(2) and bitmap.dirty_count == 0 and bitmap.dirty_blocks == 0
    assert bitmap.states == {} and bitmap.fine.slot_of == {}, "nothing left, in memory or slots"


def test_a_partial_synced_clears_the_blocks_it_covers_whole(bitmap):
    write(bitmap, 0, 2 * CHUNK, seq=5)                     # dropped: only a SYNCED clears
    bitmap.synced(bitmap.covered_span(BLOCK + 100, CHUNK), seq=6)
    # Covered whole: blocks 2 to 16 (block 1 and block 17 only in part).
    assert bitmap.extents() == [(0, 2 * BLOCK), (17 * BLOCK, 2 * CHUNK - 17 * BLOCK)]
    assert bitmap.is_set(0) and bitmap.is_set(1)
    bitmap.synced(bitmap.covered_span(0, 2 * CHUNK), seq=5)
    assert bitmap.dirty_block_bytes == 2 * CHUNK - 15 * BLOCK, \
        "a reply queued before the loss clears nothing"
    bitmap.synced(bitmap.covered_span(0, 2 * CHUNK), seq=6)
    assert bitmap.dirty_count == 0


def test_each_block_keeps_its_own_loss(bitmap):
    write(bitmap, 4 * CHUNK, BLOCK, seq=10)
    write(bitmap, 4 * CHUNK + BLOCK, BLOCK, seq=20)        # lost later, same chunk
    bitmap.synced(bitmap.covered_span(4 * CHUNK, CHUNK), seq=15)
    assert bitmap.extents() == [(4 * CHUNK + BLOCK, BLOCK)], \
        "the reply at 15 repairs the loss at 10, not the one at 20"
    assert bitmap.lost_seq == {4: 20} and bitmap.has_losses


def test_losses_and_synceds_clear_as_a_block_by_block_model_says(bitmap):
    """Random drops and SYNCEDs over two chunks, against the rule applied to
    each block alone: a block stays marked while its latest loss is not
    older than every SYNCED reply that covered it."""
    rnd = random.Random(5)
    latest: dict[int, int] = {}             # block -> its latest loss
    seq = 2
    for _ in range(2000):
        first = rnd.randrange(0, 32)
        span = ra.Span(first, rnd.randrange(first + 1, 33))
        if rnd.random() < 0.5:
            seq += rnd.randrange(0, 3)      # several drops may share a stream position
            bitmap.mark(span)
            bitmap.lose(span, seq)
            latest.update(dict.fromkeys(range(*span), seq))
        else:
            reply = rnd.randrange(1, seq + 3)
            bitmap.synced(span, reply)
            for b in range(*span):
                if latest.get(b, reply) < reply:
                    del latest[b]
        marked = {b for off, n in bitmap.extents() for b in range(off // BLOCK,
                                                                  (off + n) // BLOCK)}
        assert marked == set(latest)
        assert bitmap.lost_seq == {c: max(s for b, s in latest.items() if b // 16 == c)
                                   for c in {b // 16 for b in latest}}


def test_a_synced_does_not_clear_a_block_with_a_write_in_flight(bitmap):
    write(bitmap, 6 * CHUNK, 2 * BLOCK, seq=3)
    flying = write(bitmap, 6 * CHUNK + BLOCK, BLOCK)
    bitmap.synced(bitmap.covered_span(6 * CHUNK, CHUNK), seq=4)
    assert bitmap.extents() == [(6 * CHUNK + BLOCK, BLOCK)] and not bitmap.has_losses
    bitmap.ack(flying)
    assert bitmap.dirty_count == 0


def test_a_connection_loss_turns_the_blocks_in_flight_into_losses(bitmap):
    span = write(bitmap, 9 * CHUNK + 3 * BLOCK, BLOCK)
    bitmap.drop_inflight(span, seq=7)
    bitmap.ack(span)                                       # a late ACK cannot clear it now
    assert bitmap.extents() == [(9 * CHUNK + 3 * BLOCK, BLOCK)]
    assert bitmap.inflight == {} and bitmap.lost_seq == {9: 7}
    bitmap.synced(bitmap.covered_span(9 * CHUNK + 3 * BLOCK, BLOCK), seq=8)
    assert bitmap.dirty_count == 0


def test_the_volume_end_bounds_the_last_block(tmp_path):
    size = 3 * CHUNK + 5000                                # the last block is 904 bytes
    bm = ra.DirtyBitmap(str(tmp_path / "v.bitmap"), size, CHUNK)
    try:
        write(bm, size - 100, 100, seq=2)
        assert bm.extents() == [(3 * CHUNK + BLOCK, 904)]
        assert bm.dirty_block_bytes == 904
        assert bm.covered_span(3 * CHUNK + BLOCK, 904) == ra.Span(49, 50), \
            "a read to the volume's end covers the short last block"
        bm.synced(bm.covered_span(3 * CHUNK, 5000), seq=3)
        assert bm.dirty_count == 0
    finally:
        bm.close()


# ---------------------------------------------------------------------------
# The files: reopen, damage, upgrade


def test_fine_marks_survive_a_reopen_and_only_a_synced_clears_them(bitmap):
    write(bitmap, CHUNK + 2 * BLOCK, BLOCK)                # in flight when the agent died
    write(bitmap, 5 * CHUNK, CHUNK, seq=4)                 # a whole chunk: no slot needed
    write(bitmap, 8 * CHUNK + 15 * BLOCK, 2 * BLOCK, seq=4)   # across two chunks
    before = bitmap.extents()
    again = reopen(bitmap)
    try:
        assert not again.created and not again.damaged and again.fine.untrusted == 0
        assert again.extents() == before
        assert again.dirty_block_bytes == 3 * BLOCK + CHUNK
        assert again.lost_seq == {1: 1, 5: 1, 8: 1, 9: 1}
        again.ack(again.block_span(CHUNK + 2 * BLOCK, BLOCK))
        assert again.is_set(1), "an ACK cannot clear what an earlier run lost"
        again.synced(again.covered_span(8 * CHUNK, 2 * CHUNK), seq=2)
        assert again.extents() == before[:2]
    finally:
        again.close()


def test_a_damaged_slot_makes_its_chunk_whole_never_clean(bitmap, caplog):
    write(bitmap, 2 * CHUNK + 4 * BLOCK, BLOCK, seq=2)
    write(bitmap, 3 * CHUNK + 9 * BLOCK, BLOCK, seq=2)
    offset = slot_offsets(bitmap)[2]
    bitmap.close()
    with open(bitmap.fine.path, "r+b") as f:             # bit rot in chunk 2's sub-bits
        f.seek(offset + ra.FINE_SLOT.size)
        f.write(b"\x01")
    with caplog.at_level(logging.INFO, logger="repagent"):
        again = ra.DirtyBitmap(bitmap.path, SIZE, CHUNK)
    try:
        assert again.fine.untrusted == 1 and not again.damaged
        assert again.extents() == [(2 * CHUNK, CHUNK), (3 * CHUNK + 9 * BLOCK, BLOCK)]
        assert any(again.fine.path in r.getMessage() and "resent whole" in r.getMessage()
                   for r in caplog.records), caplog.text
    finally:
        again.close()


def test_a_kill_while_bits_change_leaves_the_block_trusted_not_damaged(bitmap, tmp_path):
    """The first change to a block's bits stores BITMAP_CRC_CHANGING as its CRC;
    an agent killed before the CRC is sealed leaves that, and the next open
    keeps the bits as they are (only the operation in flight could differ).
    Bits changed under a sealed CRC are still damage."""
    write(bitmap, 5 * CHUNK, BLOCK, seq=2)
    assert bitmap.chunk_bits.stored_crc(0) == bitmap.chunk_bits.block_crc(0)
    bitmap.chunk_bits.set(9)                           # killed before seal()
    assert bitmap.chunk_bits.stored_crc(0) == ra.BITMAP_CRC_CHANGING
    again = reopen(bitmap)
    try:
        assert again.damaged == [] and again.chunk_bits.torn == 1
        assert again.is_set(5) and again.is_set(9)
        assert again.chunk_bits.stored_crc(0) == again.chunk_bits.block_crc(0), "sealed at open"
        again.chunk_bits.bits[0] ^= 0x10                # rot under a sealed CRC
    finally:
        again.close()
    rotten = ra.DirtyBitmap(str(tmp_path / "v.bitmap"), SIZE, CHUNK)
    try:
        assert rotten.damaged == [0] and rotten.chunk_bits.torn == 0
    finally:
        rotten.close()


def test_a_slot_torn_by_a_crash_fails_its_crc(bitmap):
    write(bitmap, 4 * CHUNK, BLOCK, seq=2)
    offset = slot_offsets(bitmap)[4]
    write(bitmap, 4 * CHUNK + 7 * BLOCK, BLOCK, seq=3)
    # Sub-bits the CRC does not match, as a store cut short would leave them.
    bitmap.fine.map[offset + ra.FINE_SLOT.size] &= 0xFE    # block 0 forgotten ...
    again = reopen(bitmap)
    try:
        assert again.fine.untrusted == 1
        assert again.extents() == [(4 * CHUNK, CHUNK)], "... and the whole chunk is resent"
    finally:
        again.close()


@pytest.mark.parametrize("what", ["stale", "twice", "out_of_range", "empty"])
def test_slots_that_say_nothing_trustworthy_are_freed(bitmap, what):
    write(bitmap, CHUNK, BLOCK, seq=2)
    write(bitmap, 6 * CHUNK, BLOCK, seq=2)
    slots = slot_offsets(bitmap)
    size = ra.FINE_SLOT.size + bitmap.fine.sub_bytes
    spare = bitmap.fine.offset(bitmap.fine.free[-1])

    def forge(chunk: int, mask: int) -> bytes:
        head, bits = (chunk + 1).to_bytes(8, "big"), mask.to_bytes(bitmap.fine.sub_bytes, "little")
        return ra.FINE_SLOT.pack(chunk + 1, bitmap.fine.crc(head, bits)) + bits

    if what == "stale":             # a slot of a chunk whose bit is clear: a clear cut short
        bitmap.fine.map[spare:spare + size] = forge(11, 0b1)
    elif what == "twice":           # two slots of one chunk: neither is trusted
        bitmap.fine.map[spare:spare + size] = forge(6, 0b100)
    elif what == "out_of_range":
        bitmap.fine.map[slots[6]:slots[6] + size] = forge(SIZE // CHUNK, 0b1)
    else:
        bitmap.fine.map[slots[6]:slots[6] + size] = forge(6, 0)
    again = reopen(bitmap)
    try:
        assert again.extents()[0] == (CHUNK, BLOCK), "the good slot is kept"
        if what == "stale":
            assert again.fine.untrusted == 0 and not again.is_set(11)
            assert again.extents() == [(CHUNK, BLOCK), (6 * CHUNK, BLOCK)]
        else:
            assert again.fine.untrusted == (2 if what == "twice" else 1)
            assert again.extents() == [(CHUNK, BLOCK), (6 * CHUNK, CHUNK)]
        assert len(again.fine.free) + len(again.fine.slot_of) == again.fine.slots
    finally:
        again.close()
    third = ra.DirtyBitmap(bitmap.path, SIZE, CHUNK)
    try:
        assert third.fine.untrusted == 0, "what was not trusted was freed at the last open"
    finally:
        third.close()


@pytest.mark.parametrize("how", ["missing", "cut_short", "other_generation"])
def test_a_second_level_that_cannot_be_trusted_leaves_every_chunk_whole(bitmap, how, caplog):
    write(bitmap, 2 * CHUNK + BLOCK, BLOCK, seq=2)
    write(bitmap, 12 * CHUNK, 3 * BLOCK, seq=2)
    bitmap.close()
    if how == "missing":
        os.unlink(bitmap.fine.path)
    elif how == "cut_short":
        os.truncate(bitmap.fine.path, ra.FINE_TABLE_OFFSET + 100)
    else:
        with open(bitmap.fine.path, "r+b") as f:
            f.seek(24)
            f.write(os.urandom(16))
    with caplog.at_level(logging.INFO, logger="repagent"):
        again = ra.DirtyBitmap(bitmap.path, SIZE, CHUNK)
    try:
        assert again.extents() == [(2 * CHUNK, CHUNK), (12 * CHUNK, CHUNK)]
        assert not again.damaged
        assert any(again.fine.path in r.getMessage() and "the 2 chunks marked are resent "
                   "whole" in r.getMessage() for r in caplog.records), caplog.text
        write(again, 14 * CHUNK, BLOCK, seq=2)              # the new file works at once
    finally:
        again.close()
    third = ra.DirtyBitmap(bitmap.path, SIZE, CHUNK)
    try:
        assert third.extents()[-1] == (14 * CHUNK, BLOCK)
    finally:
        third.close()


def version_2_file(path, chunks: dict[int, int]) -> bytes:
    """A bitmap as the version before the second level wrote it: the same
    header, bits and block CRCs (``chunks``: byte index -> bits)."""
    generation = os.urandom(p.GENERATION_SIZE)
    bits = bytearray(SIZE // CHUNK // 8)
    for byte, value in chunks.items():
        bits[byte] = value
    path.write_bytes(ra.BITMAP_HEADER.pack(ra.BITMAP_MAGIC, 2, 0, CHUNK, SIZE, generation)
                     + bytes(bits) + ra.BITMAP_CRC.pack(ra.zlib.crc32(bytes(bits))))
    return generation


def test_a_version_2_bitmap_is_upgraded_its_marks_whole(tmp_path, caplog):
    path = tmp_path / "v.bitmap"
    generation = version_2_file(path, {0: 0x21})         # chunks 0 and 5
    with caplog.at_level(logging.INFO, logger="repagent"):
        bm = ra.DirtyBitmap(str(path), SIZE, CHUNK)
    try:
        assert not bm.created and not bm.damaged and bm.generation == generation
        assert bm.extents() == [(0, CHUNK), (5 * CHUNK, CHUNK)]
        assert any("upgraded from bitmap version 2 to 3" in r.getMessage()
                   and "resent whole" in r.getMessage() for r in caplog.records), caplog.text
        write(bm, 9 * CHUNK + BLOCK, BLOCK, seq=2)
    finally:
        bm.close()
    assert ra.BITMAP_HEADER.unpack(path.read_bytes()[:64])[1] == ra.BITMAP_VERSION == 3
    again = ra.DirtyBitmap(str(path), SIZE, CHUNK)
    try:
        assert not again.damaged and again.fine.untrusted == 0
        assert again.extents() == [(0, CHUNK), (5 * CHUNK, CHUNK), (9 * CHUNK + BLOCK, BLOCK)]
    finally:
        again.close()


def test_an_upgrade_never_trusts_a_second_level_left_beside_an_old_bitmap(tmp_path):
    """A version 2 bitmap changed by an agent that kept no second level: a
    VOLUME.bitmap.fine there (from an upgrade cut short, or older) may say
    less than the bits, so the upgrade makes it anew."""
    path = tmp_path / "v.bitmap"
    bm = ra.DirtyBitmap(str(path), SIZE, CHUNK)
    write(bm, 3 * CHUNK, BLOCK, seq=2)                     # a slot: block 0 of chunk 3
    bm.close()
    raw = bytearray(path.read_bytes())
    raw[8:10] = (2).to_bytes(2, "big")                     # as a version 2 agent's file
    path.write_bytes(bytes(raw))
    again = ra.DirtyBitmap(str(path), SIZE, CHUNK)
    try:
        assert again.extents() == [(3 * CHUNK, CHUNK)] and again.fine.slot_of == {}
    finally:
        again.close()


def test_a_crash_between_a_slot_and_its_chunk_bit_marks_nothing_stale(bitmap):
    """A chunk becoming dirty gets its slot first: killed before the bit, the
    slot names a clean chunk and is freed; the write was not answered yet."""
    write(bitmap, 7 * CHUNK + BLOCK, BLOCK, seq=2)
    byte = 7 >> 3
    bitmap.chunk_bits.bits[byte] &= ~(1 << 7)              # the bit never made it
    bitmap.chunk_bits.seal(range(bitmap.chunk_bits.blocks))
    again = reopen(bitmap)
    try:
        assert again.dirty_count == 0 and again.extents() == [] and again.fine.slot_of == {}
        assert again.fine.untrusted == 0
    finally:
        again.close()


def test_a_terabyte_disk_takes_a_few_mib_of_files(tmp_path):
    bm = ra.DirtyBitmap(str(tmp_path / "big.bitmap"), 1 << 40, CHUNK)
    try:
        assert bm.fine.slots == 65536 and bm.fine.slot_size == 16
        write(bm, 123_456 * CHUNK + 3 * BLOCK, BLOCK, seq=2)
        assert bm.extents() == [(123_456 * CHUNK + 3 * BLOCK, BLOCK)]
    finally:
        bm.close()
    assert os.path.getsize(tmp_path / "big.bitmap") == 64 + 2 * MiB + 2048
    assert os.path.getsize(tmp_path / "big.bitmap.fine") == 4096 + MiB


def test_a_synced_over_a_whole_terabyte_visits_only_the_chunks_it_can_change(tmp_path,
                                                                              monkeypatch):
    """A sparse disk's first sync has the hub SYNCED zero extents of up to 64 MiB,
    and a DIRTY_MAP may span the disk: the rules visit the chunks that hold
    marks (in memory, or loaded from the files), not every chunk of the span."""
    path = str(tmp_path / "big.bitmap")
    bm = ra.DirtyBitmap(path, 1 << 40, CHUNK)
    write(bm, 7 * CHUNK, BLOCK, seq=2)                      # loaded marks, after a reopen
    write(bm, 9_000_000 * CHUNK + BLOCK, BLOCK, seq=2)
    bm = reopen(bm)
    try:
        flying = write(bm, 12_345_678 * CHUNK, 2 * BLOCK)   # in memory, in flight
        write(bm, 16_000_000 * CHUNK + 3 * BLOCK, BLOCK, seq=5)
        visited = []
        state = bm._state
        monkeypatch.setattr(bm, "_state", lambda c, create: visited.append(c) or state(c, create))
        bm.synced(bm.covered_span(0, bm.size), seq=4)       # newer than the loaded losses only
        assert sorted(visited) == [7, 9_000_000, 12_345_678, 16_000_000]
        assert bm.extents() == [(12_345_678 * CHUNK, 2 * BLOCK),
                                (16_000_000 * CHUNK + 3 * BLOCK, BLOCK)]
        visited.clear()
        bm.ack(flying)
        bm.synced(range(0, bm.chunks), seq=6)               # the whole disk, as chunks
        assert visited == [12_345_678, 16_000_000]
        assert bm.dirty_count == 0 and not bm.has_losses
    finally:
        bm.close()


def test_long_and_short_spans_follow_the_block_rules_alike(tmp_path):
    """Random writes, ACKs, drops and SYNCEDs of every length over a disk of 64
    chunks, against the rules applied to each block alone (the model of the
    SIGKILL test below); a reopen halfway leaves the marks loaded, and a
    SYNCED newer than every loss then clears the disk."""
    size = 64 * CHUNK - 5000
    rng = random.Random(77)
    bm = ra.DirtyBitmap(str(tmp_path / "v.bitmap"), size, CHUNK)
    model = Model(bm)
    flying: dict[int, ra.Span] = {}
    seq = 2
    try:
        for step in range(3000):
            r = rng.random()
            if r < 0.45:
                off = rng.randrange(0, size - 1)
                n = rng.randrange(1, min(size - off, 3 * CHUNK) + 1)
                span = bm.block_span(off, n)
                bm.mark(span)
                if r < 0.2:
                    bm.lose(span, seq)
                    model.feed(f"L {seq} {off} {n}")
                else:
                    bm.add_inflight(span)
                    model.feed(f"F {seq} {off} {n}")
                    flying[seq] = span
                seq += 1
            elif r < 0.7 and flying:
                k = rng.choice(list(flying))
                bm.ack(flying.pop(k))
                model.feed(f"A {k}")
            else:
                off = rng.randrange(0, size - 1)
                n = size - off if rng.random() < 0.3 else rng.randrange(1, size - off + 1)
                reply = rng.randrange(1, seq + 2)
                bm.synced(bm.covered_span(off, n), reply)
                model.feed(f"S {reply} {off} {n}")
            if step == 1500:                    # the agent restarts: marks loaded
                bm = model.bm = reopen(bm)
                model.reloaded()
                flying.clear()
            marked = {b for off, n in bm.extents() for b in range(off // BLOCK,
                                                                  -(-(off + n) // BLOCK))}
            if step < 1500:
                assert marked == model.required(), step
            else:                               # the files may give whole chunks
                assert marked >= model.required(), step
        for span in flying.values():
            bm.ack(span)
        bm.synced(bm.covered_span(0, size), seq + 1)
        assert bm.dirty_count == 0 and not bm.has_losses and bm.extents() == []
    finally:
        bm.close()


def test_4_kib_chunks_need_no_second_level(tmp_path):
    bm = ra.DirtyBitmap(str(tmp_path / "v.bitmap"), 64 * BLOCK, BLOCK)
    try:
        write(bm, 5 * BLOCK + 10, 100, seq=2)
        assert bm.extents() == [(5 * BLOCK, BLOCK)] and bm.fine.map is None
    finally:
        bm.close()
    assert not os.path.exists(tmp_path / "v.bitmap.fine")


def test_when_the_slots_run_out_chunks_are_whole_until_one_frees(tmp_path, monkeypatch):
    monkeypatch.setattr(ra, "FINE_SLOTS", 2)
    bm = ra.DirtyBitmap(str(tmp_path / "v.bitmap"), SIZE, CHUNK)
    try:
        a = write(bm, 1 * CHUNK, BLOCK)
        write(bm, 2 * CHUNK, BLOCK, seq=2)
        write(bm, 3 * CHUNK + BLOCK, BLOCK, seq=2)         # no slot left: whole in the file
        assert sorted(bm.fine.slot_of) == [1, 2]
        assert bm.extents()[-1] == (3 * CHUNK + BLOCK, BLOCK), "memory still knows the block"
        bm.ack(a)                                          # chunk 1 clears: its slot frees
        write(bm, 3 * CHUNK + 2 * BLOCK, BLOCK, seq=3)     # chunk 3 takes it
        assert sorted(bm.fine.slot_of) == [2, 3]
        write(bm, 4 * CHUNK, BLOCK, seq=3)                 # none free again
        bm = reopen(bm)
        assert bm.extents() == [(2 * CHUNK, BLOCK), (3 * CHUNK + BLOCK, 2 * BLOCK),
                                (4 * CHUNK, CHUNK)]
    finally:
        bm.close()


def test_clear_all_forgets_both_levels(bitmap):
    write(bitmap, 2 * CHUNK + BLOCK, BLOCK, seq=2)
    bitmap.clear_all()
    assert bitmap.dirty_count == 0 and bitmap.fine.slot_of == {} and len(bitmap.fine.free) == 16
    again = reopen(bitmap)
    try:
        assert again.extents() == [] and again.fine.untrusted == 0
    finally:
        again.close()


# ---------------------------------------------------------------------------
# SIGKILL at random points


CHILD = r"""
import os, random, sys
sys.path.insert(0, sys.argv[1])
import repagent as ra
path, seed, slots, size, chunk = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), int(sys.argv[6])
if slots:
    ra.FINE_SLOTS = slots
bm = ra.DirtyBitmap(path, size, chunk)
rng = random.Random(seed)
say = lambda line: os.write(1, (line + "\n").encode())
flying = {}
say("READY")
for seq in range(2, 200_000):
    r = rng.random()
    if r < 0.6:
        kind = rng.random()
        if kind < 0.8:
            off, n = rng.randrange(0, size, 4096), 4096
        elif kind < 0.95:
            off, n = rng.randrange(0, size - 8192, 512), rng.randrange(512, 8193, 512)
        else:
            off, n = rng.randrange(0, size - 4 * chunk, 4096), rng.randrange(chunk, 4 * chunk)
        span = bm.block_span(off, n)
        bm.mark(span)
        if r < 0.3:
            bm.lose(span, seq)
            say(f"L {seq} {off} {n}")
        else:
            bm.add_inflight(span)
            flying[seq] = span
            say(f"F {seq} {off} {n}")
    elif r < 0.85 and flying:
        k = rng.choice(list(flying))
        say(f"A {k}")                   # told before it is done: never required after
        bm.ack(flying.pop(k))
    else:
        off = rng.randrange(0, size, 512)
        n = min(rng.randrange(1, 8 * chunk), size - off)
        say(f"S {seq} {off} {n}")
        bm.synced(bm.covered_span(off, n), seq)
"""


class Model:
    """What the child reported, as the rules say it must stay marked: per block,
    the latest loss and the writes in flight."""

    def __init__(self, bm: ra.DirtyBitmap):
        self.bm = bm
        self.lost: dict[int, int] = {}
        self.flying: dict[int, range] = {}
        self.inflight: dict[int, set] = {}

    def feed(self, line: str) -> None:
        kind, *args = line.split()
        if kind == "L":
            seq, off, n = map(int, args)
            for b in range(*self.bm.block_span(off, n)):
                self.lost[b] = max(self.lost.get(b, 0), seq)
        elif kind == "F":
            seq, off, n = map(int, args)
            self.flying[seq] = range(*self.bm.block_span(off, n))
            for b in self.flying[seq]:
                self.inflight.setdefault(b, set()).add(seq)
        elif kind == "A":
            seq = int(args[0])
            for b in self.flying.pop(seq):
                self.inflight[b].discard(seq)
        elif kind == "S":
            seq, off, n = map(int, args)
            for b in range(*self.bm.covered_span(off, n)):
                if self.lost.get(b, seq) < seq:
                    del self.lost[b]

    def required(self) -> set[int]:
        return set(self.lost) | {b for b, ids in self.inflight.items() if ids}

    def reloaded(self) -> None:
        """The next run finds every required block loaded: lost before its replies."""
        self.lost = dict.fromkeys(self.required(), ra.LOADED_SEQ)
        self.flying.clear()
        self.inflight.clear()


def run_child(path: str, seed: int, slots: int, kill_after: int, deadline: float):
    """Start the child, SIGKILL it once it reported ``kill_after`` marks (or at
    the deadline), and return every line it wrote before it died."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, ROOT, path, str(seed), str(slots),
                              str(SIZE * 4), str(CHUNK)], stdout=subprocess.PIPE)
    got, buf = [], b""
    try:
        fd = child.stdout.fileno()
        while len(got) < kill_after + 1 and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            data = os.read(fd, 65536) if ready else b""
            if ready and not data:
                break                                   # it ended by itself
            buf += data
            *lines, buf = buf.split(b"\n")
            got += lines
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        rest = child.stdout.read()
        child.stdout.close()
    lines = (buf + rest).split(b"\n")
    return [line.decode() for line in got + lines if line]


@pytest.mark.parametrize("slots", [0, 8], ids=["slots-default", "slots-8"])
def test_sigkill_at_random_points_never_loses_a_reported_write(tmp_path, slots):
    path = str(tmp_path / "v.bitmap")
    rng = random.Random(1234 + slots)
    deadline = time.monotonic() + 120
    model = None
    rounds = finer = torn = 0
    for r in range(30):
        assert time.monotonic() < deadline, f"only {r} rounds in the time allowed"
        lines = run_child(path, rng.randrange(1 << 30), slots, rng.randrange(20, 3000),
                          min(deadline, time.monotonic() + 10))
        assert lines and lines[0] == "READY", lines[:3]
        bm = ra.DirtyBitmap(path, SIZE * 4, CHUNK)
        try:
            if model is None:
                model = Model(bm)
            model.bm = bm
            for line in lines[1:]:
                model.feed(line)
            covered = {b for off, n in bm.extents()
                       for b in range(off // BLOCK, -(-(off + n) // BLOCK))}
            missing = model.required() - covered
            assert not missing, f"round {r}: blocks {sorted(missing)[:8]} written and " \
                f"reported, not marked after the kill ({len(lines)} events)"
            finer += bm.dirty_block_bytes < bm.dirty_bytes
            torn += bm.chunk_bits.torn
            assert not bm.damaged, f"round {r}: a kill left blocks {bm.damaged} failing " \
                "their CRC: the hub would verify the whole volume"
        finally:
            bm.close()
        model.reloaded()
        rounds += 1
    assert rounds == 30
    assert finer >= 20, f"only {finer} of 30 rounds kept marks finer than whole chunks"
    logging.getLogger(__name__).info("%d of 30 kills left a block changing", torn)


# ---------------------------------------------------------------------------
# The hub: READ what the agent reported, widened to 4 KiB, never to chunks


def pieces(extents, size):
    job = types.SimpleNamespace(vol=types.SimpleNamespace(size=size))
    return list(rephub.SyncJob.pieces(job, extents))


def test_the_hub_reads_4_kib_extents_as_they_are():
    size = 8 * MiB
    assert pieces([(3 * CHUNK + BLOCK, BLOCK), (5 * CHUNK, 3 * BLOCK)], size) == \
        [(3 * CHUNK + BLOCK, BLOCK), (5 * CHUNK, 3 * BLOCK)]
    assert pieces([(CHUNK, CHUNK)], size) == [(CHUNK, CHUNK)], "chunk-aligned maps stay so"
    assert pieces([(CHUNK + 100, 200)], size) == [(CHUNK, BLOCK)], "widened to 4 KiB"
    assert pieces([(size - 150, 100)], size - 50) == [(size - BLOCK, BLOCK - 50)], \
        "the last piece stops at the volume's end"
    assert pieces([(BLOCK, 2 * MiB)], size) == [(BLOCK, MiB), (BLOCK + MiB, MiB)]


def test_an_agents_extents_and_the_hubs_reads_clear_each_other(tmp_path):
    """The agent's DIRTY_MAP, cut into the hub's READs, SYNCED back: every mark
    clears, and the bytes read are the blocks written."""
    bm = ra.DirtyBitmap(str(tmp_path / "v.bitmap"), 64 * MiB, CHUNK)
    try:
        rnd = random.Random(3)
        offsets = rnd.sample(range(0, 64 * MiB, BLOCK), 500)
        for off in offsets:
            write(bm, off, BLOCK, seq=2)
        reads = pieces(bm.extents(), bm.size)
        assert sum(n for _, n in reads) == 500 * BLOCK
        for off, n in reads:
            bm.synced(bm.covered_span(off, n), seq=3)
        assert bm.dirty_count == 0
    finally:
        bm.close()


def resync(hub, secret, dirty: list[tuple[int, int]]) -> list[p.Read]:
    """A consistent volume, a change while disconnected reported as ``dirty``,
    then the DIRTY resync: the READs it made, once the replica is the volume."""
    mv = MemVolume(4 * MiB, os.urandom(4 * MiB))
    gen = os.urandom(16)
    with TestAgent(hub.address, "a1", secret).connect() as agent:
        agent.attach("fine", mv, generation=gen)
        wait_until(lambda: hub.store.volume("fine").state == rephub.VolState.CONSISTENT
                   and hub.store.volume("fine").sync is None, 20, "the first sync")
    wait_until(lambda: hub.store.volume("fine").attached_to is None, 10, "detached")
    for off, n in dirty:
        mv.write(off, os.urandom(n))
    mv.dirty = dirty
    with TestAgent(hub.address, "a1", secret).connect() as agent:
        vid, plan = agent.attach("fine", mv, state=p.VolumeState.DIRTY, generation=gen)
        assert plan == p.SyncPlan.DIRTY
        wait_until(lambda: hub.store.volume("fine").state == rephub.VolState.CONSISTENT
                   and hub.store.volume("fine").sync is None, 20, "the resync")
        hub.store.applier.wait_applied(hub.store.journal.durable_seq)
        with open(os.path.join(hub.store.dir, "volumes", "fine", "replica"), "rb") as f:
            assert f.read() == bytes(mv.buf)
        return list(agent.reads)


def test_a_dirty_resync_reads_the_4_kib_extents_reported(hub_a1):
    hub, secret = hub_a1
    dirty = [(CHUNK + BLOCK, BLOCK), (7 * CHUNK + 3 * BLOCK, 2 * BLOCK), (40 * CHUNK, BLOCK)]
    reads = resync(hub, secret, dirty)
    assert [(r.offset, r.length) for r in reads] == dirty


def test_a_dirty_resync_still_takes_a_chunk_aligned_map(hub_a1):
    hub, secret = hub_a1
    dirty = [(2 * CHUNK, CHUNK), (9 * CHUNK, 2 * CHUNK)]
    reads = resync(hub, secret, dirty)
    assert [(r.offset, r.length) for r in reads] == dirty
