"""repagent's answers to EXTENT_QUERY (feature EXTENTS), and a sparse volume's
FULL sync end to end.

Sources first: a raw file's holes (SEEK_DATA/SEEK_HOLE) and QSD's NBD block
status (raw and qcow2), checked against what the volume reads.  Then the
agent against a scripted hub (the ``rig`` of test_agent.py): the feature must
be granted, the answer is ordered with the writes (a write landing during the
query is held behind the EXTENTS frame), and SYNCED for it clears dirty marks.
Last, ``repagent.py protect`` and ``rephub.py serve`` sync a sparse QSD disk
byte-identical while the agent sends about its data, not its size.
"""

from __future__ import annotations

import threading

import pytest

import nbd
import protocol as p
import repagent as ra
from hubtools import wait_until
from qemu_harness import MiB, qemu_io, qsd_factory, requires_qemu  # noqa: F401 - fixture
from test_agent import CHUNK, SIZE, Replies, rig  # noqa: F401 - rig: fixture
from test_agent_e2e import assert_identical, world  # noqa: F401 - fixture


def check_runs(runs, read, offset: int, length: int) -> None:
    """Runs are consecutive from ``offset``, within the range, and a zero run reads
    as zeroes (PROTOCOL.md [SY-18])."""
    assert runs and all(n > 0 for n, _ in runs)
    assert sum(n for n, _ in runs) <= length
    pos = offset
    for n, zero in runs:
        if zero:
            assert not any(read(pos, n)), f"zero run [{pos}, +{n}) holds data"
        pos += n


# ---------------------------------------------------------------------------
# Sources


def test_file_source_reports_holes_and_the_part_past_the_end_as_zero(tmp_path):
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"\x42" * 65536)
        f.seek(5 * MiB)
        f.write(b"\x43" * 4096)
    src = ra.FileSource(str(path))
    try:
        runs = src.extents(0, 12 * MiB)          # the node may be larger than the file
        assert sum(n for n, _ in runs) == 12 * MiB
        check_runs(runs, src.read, 0, 12 * MiB)
        data = sum(n for n, zero in runs if not zero)
        assert 65536 + 4096 <= data <= 2 * MiB, runs   # the file system's granularity
        assert runs[-1][1], "past the end of the file reads as zeroes"
        runs = src.extents(MiB + 4096, 4096)
        assert runs == [(4096, False)]
    finally:
        src.close()


@requires_qemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_nbd_source_reports_qsd_zero_extents(qsd_factory, fmt):
    qsd = qsd_factory(size=64 * MiB, fmt=fmt)
    qemu_io(qsd.export_path, "write -P 0xab 1M 64k", "write -z 20M 2M", "write -P 1 63M 1M",
            export=qsd.export_name)
    src = ra.NBDSource(str(qsd.export_path), qsd.export_name)
    try:
        runs = src.extents(0, 64 * MiB)
        check_runs(runs, src.read, 0, 64 * MiB)
        zero = sum(n for n, z in runs if z)
        assert zero >= 60 * MiB, runs
        pos = 0
        for n, z in runs:
            if pos <= MiB < pos + n or pos <= 63 * MiB < pos + n:
                assert not z
            pos += n
        # READ through the same (structured-reply) connection still returns the bytes.
        assert src.read(MiB - 4096, 8192) == bytes(4096) + b"\xab" * 4096
    finally:
        src.close()


@requires_qemu
def test_nbd_client_without_block_status_at_the_server_keeps_simple_replies(tmp_path):
    from qemu_harness import MemoryHandler
    handler = MemoryHandler(MiB)
    path = str(tmp_path / "n.sock")
    with nbd.NBDServer(path, "m", MiB, handler):
        with nbd.NBDClient(path, "m", block_status=True) as client:
            assert not client.structured and not client.can_block_status
            client.write(4096, b"z" * 4096)
            assert client.read(4096, 4096) == b"z" * 4096
            with pytest.raises(nbd.RequestError):
                client.block_status(0, MiB)
        src = ra.NBDSource(path, "m")
        try:
            assert src.extents(0, MiB) == [(MiB, False)], "all data: never a false zero"
        finally:
            src.close()


# ---------------------------------------------------------------------------
# The agent, against a scripted hub


def sparse_image(tmp_path) -> str:
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(4 * CHUNK)
        f.write(b"\x55" * CHUNK)
    return str(path)


def test_extent_query_needs_the_feature(rig):
    agent, vol, conn, hub = rig()
    hub.send(p.ExtentQuery(request_id=40, volume=1, offset=0, length=SIZE))
    err, _ = hub.recv_until(p.MsgType.ERROR)
    assert err.request_id == 40 and err.code == p.ErrorCode.UNSUPPORTED


def test_extent_query_answers_zero_and_data_and_synced_clears_marks(rig, tmp_path):
    path = sparse_image(tmp_path)
    agent, vol, conn, hub = rig(reader=lambda: ra.FileSource(path), features=p.Feature.EXTENTS)
    with agent.lock:
        vol.bitmap.mark(range(0, 16))
        vol.bitmap.lose(range(0, 16), 1)      # as if loaded from an earlier run
    hub.send(p.ExtentQuery(request_id=41, volume=1, offset=0, length=SIZE))
    msg, _ = hub.recv_until(p.MsgType.EXTENTS)
    assert (msg.request_id, msg.volume, msg.offset, msg.length) == (41, 1, 0, SIZE)
    pos, data = 0, []
    for n, flags in msg.extents:
        if not flags & p.EXTENT_ZERO:
            data.append((pos, n))
        pos += n
    assert pos == SIZE
    assert any(o <= 4 * CHUNK and 5 * CHUNK <= o + n for o, n in data), msg.extents
    assert sum(n for _, n in data) <= 4 * CHUNK, "holes are zero extents"
    assert vol.counters["extent_replies"] == 1
    # SYNCED for the whole range (as a hub sends for zero extents) clears the marks.
    hub.send(p.Synced(request_id=41, volume=1, offset=0, length=SIZE))
    wait_until(lambda: vol.bitmap.dirty_count == 0, 5.0, "SYNCED for EXTENTS clears the bits")
    # Out of range: an ERROR, and the stream goes on.
    hub.send(p.ExtentQuery(request_id=42, volume=1, offset=SIZE - 4096, length=8192))
    err, _ = hub.recv_until(p.MsgType.ERROR)
    assert err.request_id == 42 and err.code == p.ErrorCode.OUT_OF_RANGE


class BlockingExtents:
    """A FileSource whose extents() waits for ``release`` once ``started`` is set."""

    def __init__(self, path, started: threading.Event, release: threading.Event):
        self.inner = ra.FileSource(path)
        self.started, self.release = started, release

    def read(self, offset, length):
        return self.inner.read(offset, length)

    def extents(self, offset, length):
        runs = self.inner.extents(offset, length)
        self.started.set()
        if not self.release.wait(10):
            raise OSError("test never released the query")
        return runs

    def close(self):
        self.inner.close()


def test_a_write_during_an_extent_query_is_sent_after_the_answer(rig, tmp_path):
    """[SY-16]: the answer may call the region zero; the write it missed follows it."""
    path = sparse_image(tmp_path)
    started, release = threading.Event(), threading.Event()
    agent, vol, conn, hub = rig(reader=lambda: BlockingExtents(path, started, release),
                                features=p.Feature.EXTENTS)
    hub.send(p.ExtentQuery(request_id=43, volume=1, offset=0, length=4 * CHUNK))
    assert started.wait(5)
    inside, outside = Replies(), Replies()
    agent.stream.protected_write(vol, CHUNK, 4096, memoryview(b"N" * 4096), inside)
    agent.stream.protected_write(vol, 8 * CHUNK, 4096, memoryview(b"O" * 4096), outside)
    assert inside.codes == [0] and outside.codes == [0], "QEMU never waits for a query"
    first = hub.recv()
    assert (first.TYPE, first.offset) == (p.MsgType.WRITE, 8 * CHUNK)
    release.set()
    answer = hub.recv()
    assert answer.TYPE == p.MsgType.EXTENTS and answer.request_id == 43
    assert answer.extents == [(4 * CHUNK, p.EXTENT_ZERO)]
    held = hub.recv()
    assert (held.TYPE, held.offset) == (p.MsgType.WRITE, CHUNK)


# ---------------------------------------------------------------------------
# End to end


def prefill_sparse(qsd) -> None:
    """256 KiB of data in each of 8 places of the 32 MiB disk: 2 MiB in all."""
    qemu_io(qsd.export_path, *(f"write -P {i + 1} {i * 4 + 1}M 256k" for i in range(8)),
            export=qsd.export_name)


@requires_qemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_sparse_volume_syncs_identical_sending_about_its_data(world, fmt):  # noqa: F811
    qsd, hub, agent = world(fmt=fmt, prefill=prefill_sparse, source=(fmt == "qcow2"))
    assert_identical(qsd, hub, agent)
    counters = agent.vol()["counters"]
    data = 8 * 256 * 1024
    assert counters["extent_replies"] >= 1
    # The raw image's first block is allocated by QEMU's probing: one more chunk.
    assert data <= counters["read_reply_bytes"] <= data + 2 * CHUNK, counters
    sync = hub.volume("vol0")["sync"]
    assert sync["plan"] == "FULL" and sync["bytes_done"] == sync["bytes_total"], sync
    assert sync["bytes_fetched"] <= data + 2 * CHUNK, sync
